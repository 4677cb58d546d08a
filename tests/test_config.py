"""Composition: every group option composes and validates; composing never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rm_runner.config import validated
from rm_runner.errors import ConfigError
from tests.conftest import REPO, cli, compose_run

CONF = REPO / "rm_runner" / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [f"device={o}" for o in options("device") if o != "plugin"]
    + [f"model={o}" for o in options("model") if o != "local"]
    + [f"workload={o}" for o in options("workload") if o != "jsonl"]
    + [f"recipe={o}" for o in options("recipe")],
)
def test_every_option_composes_and_validates(override: str) -> None:
    cfg = validated(compose_run(override))
    assert "${" not in OmegaConf.to_yaml(cfg)  # fully resolved
    assert cfg.pipeline.steps and cfg.model.source._target_


@pytest.mark.parametrize(("override", "key"), [("model=local", "model.source.path"), ("device=plugin", "device.name")])
def test_missing_mandatory_value_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key} is required: set it on the command line \({key}=...\)"):
        validated(compose_run(override))


def test_cfg_job_prints_config_without_importing_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rm_runner", "--cfg", "job"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert OmegaConf.create(proc.stdout).model.name == "smollm2-135m"
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "hydra" in imported  # the import log is really there
    assert not {"torch", "transformers", "tokenizers", "numpy"} & imported


def test_unknown_device_lists_valid_options(tmp_path: Path) -> None:
    proc = cli("device=tpu", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: device=tpu: no such option (did you mean gpu?); available options in "
                                  "'device': auto, cpu, gpu, plugin, rbln, remote\n")  # not the schemas (cpu_schema)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generation.max_new_tokens=abc", "could not be converted to Integer"),
        ("model.dtype=float64", "expected one of [auto, float32, bfloat16, float16]"),
        ("device.nthreads=2", "device.nthreads: no such key (did you mean device.num_threads?)"),
    ],
)
def test_wrong_type_or_key_rejected_at_composition(tmp_path: Path, override: str, message: str) -> None:
    proc = cli(override, f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()  # rejected before any run started


def test_steps_are_named_and_a_null_step_is_left_out(tiny) -> None:
    """pipeline.steps is keyed by name, run in order; null drops a step (here the generation,
    so the run loads the model and writes no generations)."""
    cfg = compose_run("pipeline=benchmark", "pipeline.steps.benchmark.print_table=false")
    assert list(cfg.pipeline.steps) == ["load", "benchmark"] and cfg.pipeline.steps.benchmark.print_table is False
    both, loaded_only = tiny("generation.max_new_tokens=2"), tiny("pipeline.steps.generate=null")
    assert (both.path / "generations.jsonl").exists() and not (loaded_only.path / "generations.jsonl").exists()
    assert loaded_only.read_json("status.json")["status"] == "ok"
    assert loaded_only.read_json("metrics.json")["load_time_s"] > 0
