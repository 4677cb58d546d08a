"""rm-runner-recipes: every shipped recipe lists its question and validates (this is CI's recipe
check); a broken recipe fails naming the key; validating never imports torch."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rm_runner.recipes import main, parse_header, sweep_jobs
from tests.conftest import REPO, cli

SHIPPED = sorted(p.stem for p in (REPO / "rm_runner" / "conf" / "recipe").glob("*.yaml"))
CPU_SMOKE_QUESTION = ("how fast is the packaged SmolLM2-135M on this CPU, in-process, on a fixed synthetic workload "
                      "(16 prompts of 64 tokens, exactly 64 new tokens each, greedy, float32)?")


def write_recipe(config_dir: Path, name: str, body: str, header: str = "# @package _global_\n") -> None:
    (config_dir / "recipe").mkdir(parents=True, exist_ok=True)
    (config_dir / "recipe" / f"{name}.yaml").write_text(header + body)


def test_shipped_recipes_validate_without_importing_torch() -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "rm_runner.recipes", "validate"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for name in SHIPPED:
        assert any(line.startswith(f"ok      {name}") for line in proc.stdout.splitlines()), proc.stdout
    assert proc.stdout.splitlines()[-1] == f"{len(SHIPPED)} ok, 0 failed"
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "hydra" in imported and "rm_runner" in imported  # the import log is really there
    assert not {"torch", "transformers", "tokenizers", "numpy"} & imported


def test_list_shows_each_recipe_with_its_question(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["NAME", "QUESTION"]
    assert " ".join(table.split()).count(CPU_SMOKE_QUESTION) == 1  # wrapped to the terminal, same words
    assert "run: python -m rm_runner recipe=cpu-smoke" in table

    assert main(["list", "--json"]) == 0
    recipes = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(recipes) == set(SHIPPED)
    smoke = recipes["cpu-smoke"]
    assert smoke["question"] == CPU_SMOKE_QUESTION
    assert smoke["run"] == "python -m rm_runner recipe=cpu-smoke"
    assert smoke["sweep"] == {} and smoke["jobs"] == 1
    assert all(r["question"] for r in recipes.values()), "every shipped recipe says what it asks"


def test_header_rule() -> None:
    text = ("# @package _global_\n# Question: how fast is it\n#   on two lines?  Run:  python -m rm_runner\n"
            "#   recipe=x\n\n# Needs: a GPU.\ndefaults: []\n# not part of the header\n")
    assert parse_header(text) == ("how fast is it on two lines?", "python -m rm_runner",
                                  "recipe=x Needs: a GPU.", True)
    assert parse_header("# Question: no command\nx: 1\n") == ("no command", None, None, False)
    assert parse_header("# just a comment\nx: 1\n") == (None, None, None, False)


def test_sweep_params_expand_like_the_basic_sweeper() -> None:
    assert sweep_jobs({"device": "cpu,gpu", "generation.max_new_tokens": "8", "+x": "choice(a,b)"}) == [
        ["device=cpu", "generation.max_new_tokens=8", "+x=a"], ["device=cpu", "generation.max_new_tokens=8", "+x=b"],
        ["device=gpu", "generation.max_new_tokens=8", "+x=a"], ["device=gpu", "generation.max_new_tokens=8", "+x=b"],
    ]


def test_user_sweep_recipe_is_listed_and_every_job_composed(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    write_recipe(tmp_path, "devices", "# Question: which device is fastest?\n"
                 "defaults:\n  - override /model: tiny-random\n"
                 "hydra:\n  sweeper:\n    params:\n      device: cpu,gpu,rbln\n      generation.max_new_tokens: 8,16\n")
    write_recipe(tmp_path, "cpu-smoke", "# Question: mine?\n")
    assert main(["--config-dir", str(tmp_path), "list", "--json"]) == 0
    recipes = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert recipes["cpu-smoke"]["question"] == CPU_SMOKE_QUESTION  # Hydra loads the shipped one first ...
    assert recipes["cpu-smoke"]["shadowed"] == [str(tmp_path / "recipe" / "cpu-smoke.yaml")]  # ... and says so
    assert recipes["devices"]["sweep"] == {"device": "cpu,gpu,rbln", "generation.max_new_tokens": "8,16"}
    assert recipes["devices"]["jobs"] == 6
    assert recipes["devices"]["run"] == f"python -m rm_runner --config-dir {tmp_path} -m recipe=devices"
    assert main(["--config-dir", str(tmp_path), "validate", "devices"]) == 0
    assert capsys.readouterr().out.splitlines() == ["ok      devices (6 sweep jobs)", "1 ok, 0 failed"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("generation:\n  max_new_token: 4\n",
         "generation.max_new_token: no such key (did you mean generation.max_new_tokens?); valid keys: max_new_tokens,"),
        ("device:\n  num_thread: 4\n",
         "device.num_thread: no such key (did you mean device.num_threads?); valid keys: python, num_threads,"),
        ("engine:\n  batchsize: 4\n", "engine.batchsize: no such key (did you mean engine.batch_size?); valid keys: batch_size"),
        ("pipeline:\n  steps:\n    generate:\n      _target_: rm_runner.pipeline.generate.Generat\n",
         "pipeline.steps.generate._target_: rm_runner.pipeline.generate.Generat not found"),
        ("generation:\n  temperature: 0\n", "generation.temperature must be > 0"),
        ("defaults:\n  - override /device: tpu\n",
         "device=tpu: no such option (did you mean gpu?); available options in 'device': auto, cpu,"),
        ("hydra:\n  sweeper:\n    params:\n      device: cpu,remote\n      ++device.num_threads: 2\n",
         "[device=remote ++device.num_threads=2] device.num_threads: unknown option"),
        ("hydra:\n  sweeper:\n    params:\n      generation.max_new_tokens: 8,0\n",
         "[generation.max_new_tokens=0] generation.max_new_tokens must be >= 1"),
    ],
    ids=["schema-key", "backend-option", "engine-arg", "target", "value", "group", "sweep-key", "sweep-value"],
)
def test_broken_recipe_fails_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            body: str, error: str) -> None:
    write_recipe(tmp_path, "broken", "# Question: does it break?\n" + body)
    assert main(["--config-dir", str(tmp_path), "validate"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "ok      cpu-smoke" in lines  # the others still get checked
    failed = [line for line in lines if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith("FAILED  broken: ")
    assert error in failed[0], failed[0]
    assert lines[-1] == f"{len(SHIPPED)} ok, 1 failed"


def test_a_recipe_must_say_its_question_and_be_global(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_recipe(tmp_path, "silent", "generation:\n  max_new_tokens: 4\n")
    write_recipe(tmp_path, "local", "generation:\n  max_new_tokens: 4\n", header="# Question: is it global?\n")
    assert main(["--config-dir", str(tmp_path), "validate", "silent", "local", "nope"]) == 1
    out = capsys.readouterr().out
    assert "FAILED  silent: no '# Question:' comment at the top" in out
    assert "FAILED  local: the first line must be '# @package _global_'" in out
    assert "FAILED  nope: no such recipe; available: " in out


def test_a_user_sweep_recipe_runs_as_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each sweep job is a child process: it must find the recipe in the folder the sweep was given."""
    config_dir = tmp_path / "my configs"  # a space: the folder travels through Hydra's override grammar
    write_recipe(config_dir, "mine", "# Question: does my sweep run?\ndefaults:\n  - override /model: tiny-random\n"
                 "hydra:\n  sweeper:\n    params:\n      generation.max_new_tokens: 2,3\n")
    assert main(["--config-dir", str(config_dir), "list", "--json"]) == 0
    (recipe,) = [r for r in json.loads(capsys.readouterr().out) if r["name"] == "mine"]
    python, dash_m, module, *args = shlex.split(recipe["run"])  # the command as printed, quoting and all
    assert (python, dash_m, module) == ("python", "-m", "rm_runner")
    proc = cli(*args, f"hydra.sweep.dir='{tmp_path / 'sweep'}'")
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = [json.loads(p.read_text())["status"] for p in sorted((tmp_path / "sweep").glob("*/status.json"))]
    assert statuses == ["ok", "ok"]


def test_a_recipe_naming_the_sweep_folder_validates_from_a_folder_with_spaces(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_dir = tmp_path / "my configs, v2"  # a comma and a space: both need quoting in an override
    write_recipe(config_dir, "here", "# Question: does it resolve?\nworkload:\n  path: ${hydra:sweep.dir}/p.jsonl\n")
    assert main(["--config-dir", str(config_dir), "validate", "here"]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.splitlines() == ["ok      here", "1 ok, 0 failed"]
