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


NO_PRIORITY = '''
from rm_runner.backends.transformers_torch import TransformersTorchBackend


class NoPriorityBackend(TransformersTorchBackend):
    """A plugin that forgot its rank: it must not break runs that do not name it."""

    name = "nopriority"
'''

TWIN = '''
from rm_runner.backends.cpu import CPUBackend


class TwinBackend(CPUBackend):
    name = "twin"
    priority = 450
'''


def install(tmp_path_factory, *dists: tuple[str, str, str, str]) -> dict[str, str]:
    """Build and pip-install throwaway distributions (name, module, source, entry point name=object)
    into one folder; the environment that puts it on the path."""
    site = tmp_path_factory.mktemp("plugin-site")
    sources = []
    for dist, module, source, entry_point in dists:
        src = tmp_path_factory.mktemp(f"{dist}-src")
        (src / module).mkdir()
        (src / module / "__init__.py").write_text(source)
        name, target = entry_point.split("=")
        (src / "pyproject.toml").write_text(textwrap.dedent(f"""
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "{dist}"
            version = "0.1"
            [project.entry-points."rm_runner.backends"]
            {name} = "{module}:{target}"
        """))
        sources.append(str(src))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), *sources],
                   check=True, capture_output=True, timeout=600)
    return {"PYTHONPATH": str(site)}


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    return install(tmp_path_factory, ("rmr-fakenpu", "rmr_fakenpu", PLUGIN, "fakenpu=FakeNPUBackend"),
                   ("rmr-nopriority", "rmr_nopriority", NO_PRIORITY, "nopriority=NoPriorityBackend"))


@pytest.fixture(scope="module")
def twins_env(tmp_path_factory) -> dict[str, str]:
    """Two distributions registering the same backend name."""
    return install(tmp_path_factory, ("rmr-twin-a", "rmr_twin_a", TWIN, "twin=TwinBackend"),
                   ("rmr-twin-b", "rmr_twin_b", TWIN, "twin=TwinBackend"))


def backend_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["engine"]["backend"]


def test_plugin_is_chosen_by_priority(plugin_env, tmp_path: Path) -> None:
    proc = cli("device=auto", "model=tiny-random", "generation.max_new_tokens=2", f"hydra.run.dir={tmp_path}",
               env=plugin_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    backend = backend_of(tmp_path)
    assert backend["name"] == "fakenpu"
    assert [s["name"] for s in backend["selection"]][:2] == ["fakenpu", "rbln"]
    # a plugin without a priority is passed over with its reason, and does not break the run
    (skipped,) = [s for s in backend["selection"] if s["name"] == "nopriority"]
    assert not skipped["chosen"]
    assert "rmr_nopriority:NoPriorityBackend has no class attribute priority" in skipped["reason"]


def test_plugin_without_priority_is_an_error_when_named(plugin_env, tmp_path: Path) -> None:
    proc = cli("device=plugin", "device.name=nopriority", "model=tiny-random", f"hydra.run.dir={tmp_path}",
               env=plugin_env)
    assert proc.returncode == 1
    assert ("device.name=nopriority: backend plugin 'nopriority' (rmr-nopriority 0.1) is not usable: "
            "rmr_nopriority:NoPriorityBackend has no class attribute priority; set it on the class") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_two_distributions_registering_one_name_are_refused_naming_both(twins_env, tmp_path: Path) -> None:
    both = ("backend 'twin' is registered by 2 distributions, rmr-twin-a 0.1 (rmr_twin_a:TwinBackend) and "
            "rmr-twin-b 0.1 (rmr_twin_b:TwinBackend); uninstall all but one")
    named = cli("device=plugin", "device.name=twin", "model=tiny-random", f"hydra.run.dir={tmp_path}/named",
                env=twins_env)
    assert named.returncode == 1 and f"device.name=twin: {both}" in named.stderr, named.stderr[-2000:]
    auto = cli("device=auto", "model=tiny-random", f"hydra.run.dir={tmp_path}/auto", env=twins_env)
    assert auto.returncode == 1 and f"device=auto cannot choose: {both}" in auto.stderr, auto.stderr[-2000:]
    plain = cli("device=cpu", "model=tiny-random", "generation.max_new_tokens=2", f"hydra.run.dir={tmp_path}/cpu",
                env=twins_env)
    assert plain.returncode == 0, plain.stderr[-2000:]  # a run that does not involve the name is unaffected


def test_plugin_is_chosen_by_name_with_options(plugin_env, tmp_path: Path) -> None:
    proc = cli("device=plugin", "device.name=fakenpu", "+device.options.num_threads=1", "model=tiny-random",
               "generation.max_new_tokens=2", f"hydra.run.dir={tmp_path}", env=plugin_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert backend_of(tmp_path) == {"name": "fakenpu", "mode": "pytorch", "options": {
        "python": None, "num_threads": 1, "mode": "pytorch", "kv_cache_space_gib": 1, "reserved_cpus": 0, "enforce_eager": True,
        "onednn_linear": True, "fast_decode": True, "packed_steps": True}}


def test_unknown_plugin_name_lists_the_registered_ones(tmp_path: Path) -> None:
    proc = cli("device=plugin", "device.name=nope", "model=tiny-random", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    assert "device.name=nope is not a registered backend; registered: rbln, gpu, cpu" in proc.stderr


def test_a_plugin_device_runs_in_the_python_its_options_name(tmp_path: Path) -> None:
    """device=plugin keeps its backend's options under device.options: python among them, as the doctor reads it."""
    import site
    import venv as venvs

    from rm_runner.errors import ConfigError
    from rm_runner.reexec import interpreter
    from tests.conftest import REPO, compose_run

    missing = compose_run("device=plugin", "device.name=cpu", "+device.options.python=/no/such/python")
    with pytest.raises(ConfigError, match="device.options.python=/no/such/python does not exist; .* set "
                                          "device.options.python=null"):
        interpreter(missing)
    venvs.create(tmp_path / "venv", with_pip=False)  # one that sees this venv's packages through a .pth file
    python = tmp_path / "venv" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "parent.pth").write_text("\n".join(site.getsitepackages() + [str(REPO)]) + "\n")
    proc = cli("device=plugin", "device.name=cpu", f"+device.options.python={python}", "model=tiny-random",
               "generation.max_new_tokens=2", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "environment.json").read_text())["executable"] == str(python)
