"""engine=torchserve for real: TorchServe started with the generated handler running the CPU
backend, answering over REST, bound to 127.0.0.1 only, and stopped.

Runs where torchserve is installed (CI's .venv-torchserve); skipped elsewhere with the reason.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.conftest import Server, ask, local_answer, served_like_local

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ts") is None or shutil.which("java") is None,
                                reason="needs torchserve in this Python and Java (CI runs it in .venv-torchserve)")


def test_torchserve_answers_like_the_local_engine_and_binds_loopback_only(tmp_path: Path) -> None:
    served_like_local(tmp_path, "torchserve")
    assert (tmp_path / "torchserve" / "torchserve" / "model_store" / "rm_runner.mar").is_file()
    assert "disable_token_authorization=true" in (tmp_path / "torchserve" / "torchserve" / "config.properties").read_text()


def test_the_api_serves_through_torchserve(tmp_path: Path) -> None:
    """pipeline=serve engine=torchserve: OpenAI clients reach a model that TorchServe runs, streamed
    requests through TorchServe's intermediate responses, a step at a time."""
    expected = local_answer(tmp_path)
    server = Server(tmp_path / "serve", "engine=torchserve", "model.dtype=float32")
    try:
        answer, chunks = ask(server), ask(server, stream=True)
    finally:
        code, _, err = server.stop()
    assert answer.choices[0].message.content == "".join(chunks) == expected
    assert len(chunks) > 3  # streamed step by step
    assert code == 0, err[-3000:]
    assert (tmp_path / "serve" / "torchserve").is_dir()
