"""Hosting the API in this process (server/host.py): what serving does to the process around it."""

from __future__ import annotations

import gc

import httpx

from tests.test_server_batcher import engine  # noqa: F401  (the tiny model on the CPU, in-process)


def test_the_start_up_heap_is_frozen_while_serving_and_thawed_after(engine) -> None:
    """A full collection during a step stalls every stream (the GIL is held while it walks the
    heap), so what start-up left is frozen for as long as the server runs, as vLLM does."""
    from rm_runner.config import GenerationConfig, ServerConfig
    from rm_runner.server.host import ApiServer

    assert gc.get_freeze_count() == 0
    server = ApiServer(engine, "tiny-random", engine.max_model_len, ServerConfig(host="127.0.0.1", port=0),
                       GenerationConfig())

    def client(url: str) -> tuple[int, int]:
        answer = httpx.post(f"{url}/completions", json={"model": "tiny-random", "prompt": "hello", "max_tokens": 3},
                            timeout=60)
        return answer.status_code, gc.get_freeze_count()

    status, frozen = server.run(client)
    assert status == 200
    assert frozen > 10_000  # the model, torch, transformers and the app (not an empty freeze)
    assert gc.get_freeze_count() == 0  # a later server, or the test suite, collects the old one's garbage
