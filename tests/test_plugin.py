"""A third-party device: a throwaway distribution with one entry point, no edit to rm_runner."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import cli

PLUGIN = '''
from rm_runner.backends.base import Availability
from rm_runner.backends.cpu import CPUBackend


class FakeNPUBackend(CPUBackend):
    """Runs on the CPU underneath, but registers as an NPU with the highest priority."""

    name = "fakenpu"
    priority = 450

    @classmethod
    def is_available(cls):
        return Availability(True)
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    src = tmp_path_factory.mktemp("plugin-src")
    (src / "rmr_fakenpu").mkdir()
    (src / "rmr_fakenpu" / "__init__.py").write_text(PLUGIN)
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "rmr-fakenpu"
        version = "0.1"
        [project.entry-points."rm_runner.backends"]
        fakenpu = "rmr_fakenpu:FakeNPUBackend"
    """))
    site = tmp_path_factory.mktemp("plugin-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(src)],
                   check=True, capture_output=True, timeout=300)
    return {"PYTHONPATH": str(site)}


def backend_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["engine"]["backend"]


def test_plugin_is_chosen_by_priority(plugin_env, tmp_path: Path) -> None:
    proc = cli("device=auto", "model=tiny-random", "generation.max_new_tokens=2", f"hydra.run.dir={tmp_path}",
               env=plugin_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    backend = backend_of(tmp_path)
    assert backend["name"] == "fakenpu"
    assert [s["name"] for s in backend["selection"]][:2] == ["fakenpu", "rbln"]


def test_plugin_is_chosen_by_name_with_options(plugin_env, tmp_path: Path) -> None:
    proc = cli("device=plugin", "device.name=fakenpu", "+device.options.num_threads=1", "model=tiny-random",
               "generation.max_new_tokens=2", f"hydra.run.dir={tmp_path}", env=plugin_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert backend_of(tmp_path) == {"name": "fakenpu", "options": {
        "python": None, "num_threads": 1, "mode": "pytorch", "kv_cache_space_gib": 1, "reserved_cpus": 0, "enforce_eager": True,
        "onednn_linear": True, "fast_decode": True}}


def test_unknown_plugin_name_lists_the_registered_ones(tmp_path: Path) -> None:
    proc = cli("device=plugin", "device.name=nope", "model=tiny-random", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    assert "device.name=nope is not a registered backend; registered: rbln, gpu, cpu" in proc.stderr
