"""A command line that does not compose fails before the run starts, in one line naming the key
and what it may be instead: the devices' and engines' options are schemas in Hydra's ConfigStore,
and the message is read from Hydra's and OmegaConf's typed errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rm_runner.composition import check_overrides
from tests.conftest import cli, compose_run


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["device.num_thread=2"],
         "device.num_thread: no such key (did you mean device.num_threads?); valid keys: python, num_threads, mode,"),
        (["engine=vllm", "engine.port=abc"], "engine.port: Value 'abc' of type 'str' could not be converted to Integer"),
        (["engine.port=abc"], "engine.port: no such key; valid keys: batch_size"),
        (["engine=triton", "engine.server=tritonserver"], "engine.server: Invalid value 'tritonserver', expected one of"),
        (["device=cpuu"], "device=cpuu: no such option (did you mean cpu?); available options in 'device': auto, cpu,"),
        (["generation.max_new_token=4"], "generation.max_new_token: no such key (did you mean generation.max_new_tokens?)"),
        (["+recipe=cpu-smoke"], "+recipe=cpu-smoke: 'recipe' is in the defaults list already (recipe: null); "
                                "choose it without the +: recipe=cpu-smoke"),
        (["pipeline.steps.generat.print_outputs=false"],
         "pipeline.steps.generat: no such key (did you mean pipeline.steps.generate?); valid keys: load, generate"),
    ],
    ids=["device-typo", "engine-type", "engine-key", "enum", "group-option", "schema-key", "recipe-plus", "step-name"],
)
def test_a_bad_override_names_the_key_and_its_fix(overrides: list[str], message: str) -> None:
    assert check_overrides(overrides).startswith(message)


def test_the_command_line_fails_before_a_run_directory_and_without_torch(tmp_path: Path) -> None:
    proc = cli("device.num_thread=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: device.num_thread: no such key (did you mean device.num_threads?); valid keys: python, num_threads, "
        "mode, kv_cache_space_gib, reserved_cpus, enforce_eager, onednn_linear, fast_decode, packed_steps"]
    assert not (tmp_path / "run").exists()  # nothing written for a command line that is wrong
    probe = ("import sys; from rm_runner.__main__ import composition_problem; "
             "print(json.dumps([composition_problem(sys.argv[1:]), 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + probe, "engine=vllm", "engine.port=abc"],
                         capture_output=True, text=True, check=True).stdout
    problem, torch_imported = json.loads(out)
    assert problem.startswith("engine.port: Value 'abc'") and not torch_imported


def test_every_job_of_a_sweep_is_checked() -> None:
    problem = check_overrides(["device=cpu,remote", "device.num_threads=2"], multirun=True)
    assert problem.startswith("[device=remote device.num_threads=2] device.num_threads: no such key; valid keys: python, base_url,")
    assert check_overrides(["device=cpu,remote"], multirun=True) is None


def test_the_tools_read_the_command_line_as_hydra_does() -> None:
    """A sweep's name, the dry run and the composition check take the overrides from Hydra's own
    parser: a flag's value is not an override (a list of flags kept by hand took --cfg's "job")."""
    from rm_runner.sweep.naming import command_line_overrides, sweep_name

    argv = ["-m", "--cfg", "job", "--config-dir", "/tmp/recipes", "device=cpu,gpu", "--info", "config"]
    assert command_line_overrides(argv) == ["device=cpu,gpu"]
    assert sweep_name(command_line_overrides(argv)) == "device=cpu,gpu"


def test_each_option_group_yaml_is_checked_against_its_schema() -> None:
    """The YAML's keys are the options dataclass's: composing gives the dataclass's types."""
    from hydra.utils import get_class

    from rm_runner.engines.options import ENGINES

    for name, (target, options) in ENGINES.items():
        assert get_class(target).options_class is options
        engine = compose_run(f"engine={name}").engine
        assert engine._target_ == target and set(engine) - {"_target_"} == set(options.__dataclass_fields__)
    device = compose_run("device=cpu").device
    assert device.num_threads is None and device.mode.value == "pytorch"  # an enum, typed at composition


HYDRA_WORDING = ("full_key:", "Available options", "Config search path", "raised while composing", "not in struct",
                 "Could not override", "Could not find", "Could not load")


def test_no_module_reads_hydras_message_text() -> None:
    """Hydra's and OmegaConf's errors are read by their attributes (composition.explain), never
    by looking for their wording: no string in the package's code (docstrings aside) holds it."""
    import ast

    import rm_runner

    found = []
    for path in Path(rm_runner.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                found += [f"{path.name}:{node.lineno}: {w}" for w in HYDRA_WORDING if w in node.value]
    assert not found
