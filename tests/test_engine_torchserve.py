"""engine=torchserve for real: TorchServe started with the generated handler running the CPU
backend, answering over REST, bound to 127.0.0.1 only, and stopped.

Runs where torchserve is installed (CI's .venv-torchserve); skipped elsewhere with the reason.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import shutil
from pathlib import Path

import psutil
import pytest

from tests.conftest import cli, run_watching_sockets, token_ids

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ts") is None or shutil.which("java") is None,
                                reason="needs torchserve in this Python and Java (CI runs it in .venv-torchserve)")


def test_torchserve_answers_like_the_local_engine_and_binds_loopback_only(tmp_path: Path) -> None:
    common = ("model.dtype=float32", "generation.max_new_tokens=24", "pipeline.steps.1.print_outputs=false")
    local = cli(*common, f"hydra.run.dir={tmp_path}/local")
    assert local.returncode == 0, local.stderr[-3000:]
    addresses, family = run_watching_sockets(tmp_path, "torchserve", *common, "engine=torchserve")
    assert token_ids(tmp_path / "torchserve") == token_ids(tmp_path / "local")
    assert addresses == {ipaddress.ip_address("127.0.0.1")}  # every listening address is loopback
    engine = json.loads((tmp_path / "torchserve" / "metrics.json").read_text())["engine"]
    assert engine["name"] == "torchserve" and engine["ready_s"] > 0
    assert (tmp_path / "torchserve" / "torchserve" / "model_store" / "rm_runner.mar").is_file()
    assert "disable_token_authorization=true" in (tmp_path / "torchserve" / "torchserve" / "config.properties").read_text()
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left behind: {[p.pid for p in alive]}"


def test_the_api_serves_through_torchserve(tmp_path: Path) -> None:
    """pipeline=serve engine=torchserve: OpenAI clients reach a model that TorchServe runs, streamed
    requests through TorchServe's intermediate responses, a step at a time."""
    import openai

    from tests.conftest import Server

    common = ("model.dtype=float32", "generation.max_new_tokens=16", "pipeline.steps.1.print_outputs=false",
              "workload.prompts=['What is the capital of France?']")
    local = cli(*common, f"hydra.run.dir={tmp_path}/local")
    assert local.returncode == 0, local.stderr[-3000:]
    expected = json.loads((tmp_path / "local" / "generations.jsonl").read_text().splitlines()[0])
    server = Server(tmp_path / "serve", "engine=torchserve", "model.dtype=float32")
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="smollm2-135m", max_tokens=16, temperature=0,
                                                messages=[{"role": "user", "content": "What is the capital of France?"}])
        chunks = list(client.chat.completions.create(model="smollm2-135m", max_tokens=16, temperature=0, stream=True,
                                                     messages=[{"role": "user", "content": "What is the capital of France?"}]))
    finally:
        code, _, err = server.stop()
    assert answer.choices[0].message.content == expected["text"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # streamed step by step
    assert code == 0, err[-3000:]
    engine = json.loads((tmp_path / "serve" / "metrics.json").read_text())["engine"]
    assert engine["name"] == "torchserve" and (tmp_path / "serve" / "torchserve").is_dir()
