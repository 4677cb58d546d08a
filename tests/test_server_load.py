"""Load on the packaged SmolLM2: 32 concurrent streaming requests all succeed, every stream is
well-formed, and they were batched instead of served one by one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("load") / "run")
    yield srv
    srv.stop()


def test_chat_answers_with_the_real_model(server: Server) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16,
        temperature=0)
    assert "Paris" in answer.choices[0].message.content


def batches_and_records(server: Server) -> tuple[tuple[float, float], list[dict]]:
    """Decode steps run so far and the sequences they held (the server's own counts), and the
    request records written so far."""
    metrics = httpx.get(server.base + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("rm_runner_batch_size_")}
    records = Path(server.run_dir) / "requests.jsonl"
    counts = (values["rm_runner_batch_size_count"], values["rm_runner_batch_size_sum"])
    return counts, [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []


def test_32_concurrent_streams_are_all_well_formed(server: Server) -> None:
    batches_before, records_before = batches_and_records(server)
    prompts = [f"Count from {i} to {i + 5}:" for i in range(32)]

    async def one(client: httpx.AsyncClient, prompt: str) -> list[str]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            return [line async for line in response.aiter_lines() if line]

    async def all_of_them() -> list[list[str]]:
        async with httpx.AsyncClient(base_url=server.base, timeout=300,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    streams = asyncio.run(all_of_them())
    for events in streams:
        assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        body = [c for c in chunks if c["choices"]]
        assert [c["choices"][0]["finish_reason"] for c in body].count(None) == len(body) - 1
        assert body[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in body)
        usage = chunks[-1]["usage"]
        assert text.strip() and 0 < usage["completion_tokens"] <= 12
    batches, records = batches_and_records(server)
    steps, rows = (now - before for now, before in zip(batches, batches_before))
    assert rows / steps > 4  # requests shared decode steps (one at a time: 1.0)
    new = records[len(records_before):]  # one record per request, written as each ended
    assert len(new) == 32 and {r["status"] for r in new} == {200}


def test_staggered_streams_equal_the_offline_batch(server: Server, tmp_path: Path) -> None:
    """Each request arrives while the ones before it stream (continuous batching: it joins their
    running batch); every answer's token ids are the offline batch's, token for token."""
    from tests.conftest import staggered_like_offline

    staggered_like_offline(server, tmp_path)
