"""engine=torchserve for real: TorchServe started with the generated handler running the CPU
backend, answering over REST, bound to 127.0.0.1 only, and stopped.

Runs where torchserve is installed (CI's .venv-torchserve); skipped elsewhere with the reason.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.conftest import (Server, ask, local_answer, rows_end_on_the_server, served_like_local,
                            staggered_like_offline)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ts") is None or shutil.which("java") is None,
                                reason="needs torchserve in this Python and Java (CI runs it in .venv-torchserve)")


def test_torchserve_answers_like_the_local_engine_and_binds_loopback_only(tmp_path: Path) -> None:
    served_like_local(tmp_path, "torchserve")
    assert (tmp_path / "torchserve" / "torchserve" / "model_store" / "rm_runner.mar").is_file()
    assert "disable_token_authorization=true" in (tmp_path / "torchserve" / "torchserve" / "config.properties").read_text()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    """One ``pipeline=serve engine=torchserve`` (SmolLM2, float32) for the API tests of this
    module; stopped at the end, where it must exit 0."""
    server = Server(tmp_path_factory.mktemp("serve"), "engine=torchserve", "model.dtype=float32")
    try:
        yield server
    finally:
        code, _, err = server.stop()
    assert code == 0, err[-3000:]


def test_the_api_serves_through_torchserve(tmp_path: Path, api: Server) -> None:
    """pipeline=serve engine=torchserve: OpenAI clients reach a model that TorchServe runs, streamed
    requests through TorchServe's intermediate responses, a step at a time."""
    expected = local_answer(tmp_path)
    answer, chunks = ask(api), ask(api, stream=True)
    assert answer.choices[0].message.content == "".join(chunks) == expected
    assert len(chunks) > 3  # streamed step by step
    assert (api.run_dir / "torchserve").is_dir()


def test_a_streamed_row_that_ends_ends_on_the_server(api: Server) -> None:
    """EOS, a stop string, a client that left: TorchServe's worker stops generating for the row then."""
    rows_end_on_the_server(api, api.run_dir / "torchserve" / "logs" / "model_log.log")


def test_staggered_greedy_streams_equal_the_offline_batch(api: Server, tmp_path: Path) -> None:
    """Requests that arrive while others stream (batched by the torchserve server as they come) get
    the offline batch's token ids."""
    staggered_like_offline(api, tmp_path)
