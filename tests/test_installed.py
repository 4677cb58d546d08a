"""An installed (not editable) rm_runner finds its config tree from any directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """``pip install .`` (a real wheel build) into a target dir that shadows the checkout."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--target", str(target), str(REPO)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return {"PYTHONPATH": str(target)}


def test_installed_copy_is_the_one_imported(installed, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import rm_runner.conf, rm_runner; print(rm_runner.__file__)"],
                          cwd=tmp_path, env={**os.environ, **installed}, capture_output=True, text=True)
    assert proc.stdout.startswith(installed["PYTHONPATH"]), proc.stdout + proc.stderr


def test_installed_runs_from_another_directory(installed, tmp_path: Path) -> None:
    proc = cli("model=tiny-random", "generation.max_new_tokens=4", cwd=tmp_path, env=installed)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (status,) = tmp_path.glob("outputs/*/*/status.json")
    assert json.loads(status.read_text())["status"] == "ok"
    assert "tiny-random" in status.parent.name and "cpu" in status.parent.name


def test_user_config_dir_extends_the_tree(installed, tmp_path: Path) -> None:
    mine = tmp_path / "my-conf" / "model"
    mine.mkdir(parents=True)
    (mine / "my-tiny.yaml").write_text(
        "name: my-tiny\nsource:\n  _target_: rm_runner.models.tiny_random.TinyRandom\n  seed: 7\n"
        "dtype: float32\nmax_model_len: 512\n"
    )
    proc = cli("--config-dir", str(tmp_path / "my-conf"), "model=my-tiny", "device=cpu",
               "generation.max_new_tokens=4", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=installed)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: my-tiny" in (tmp_path / "run" / "config.yaml").read_text()


def test_installed_copy_ships_the_whole_config_tree(installed, tmp_path: Path) -> None:
    tree = REPO / "rm_runner" / "conf"
    shipped = Path(installed["PYTHONPATH"]) / "rm_runner" / "conf"
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*.yaml")) == \
        sorted(p.relative_to(tree) for p in tree.rglob("*.yaml"))
    proc = subprocess.run([sys.executable, "-m", "rm_runner.recipes", "validate"], cwd=tmp_path,
                          env={**os.environ, **installed}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
