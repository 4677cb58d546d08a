"""The benchmark's HTTP load generator (benchmark/http_load.py) against a real server: the arrival
schedule, what it records, and a refused request as a record naming the server's reason."""

from __future__ import annotations

import pytest

from rm_runner.benchmark.http_load import arrivals, run
from rm_runner.config import GenerationConfig, LoadProfile
from rm_runner.requests import Request
from tests.conftest import Server


def test_poisson_arrivals_end_at_count_over_rate_under_any_seed() -> None:
    """As vllm bench serve schedules them: the gaps are drawn, then scaled so the last request goes
    at N / rate; the load a rate means no longer depends on the seed's luck."""
    for seed in range(5):
        times = arrivals(48, 2.0, seed)
        assert times[-1] == pytest.approx(24.0)
        assert all(0 < a < b for a, b in zip(times, times[1:]))
    assert arrivals(48, 2.0, 0) == arrivals(48, 2.0, 0) != arrivals(48, 2.0, 1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("load") / "run", "model=tiny-random")
    yield srv
    srv.stop()


def requests(n: int) -> list[Request]:
    return [Request(id=str(i), prompt_ids=[5 + i, 6, 7, 8]) for i in range(n)]


def test_poisson_requests_go_at_their_scheduled_times_and_are_recorded(server: Server) -> None:
    generation = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    records, duration, stopped = run(server.url, "tiny-random", "EMPTY", requests(8), generation, LoadProfile.poisson,
                                     4, 20.0, 7, lambda: None, None)
    assert not stopped and len(records) == 8 and all(r["ok"] for r in records)
    for record, at in zip(records, arrivals(8, 20.0, 7)):
        assert at <= record["start_s"] < at + 0.1  # sent on time, never early
        assert record["prompt_tokens"] == 4 and record["output_tokens"] == 6  # from the stream's usage
        assert 0 < record["ttft_s"] <= record["e2el_s"] and len(record["itl_s"]) == 5
    assert duration >= arrivals(8, 20.0, 7)[-1]


def test_a_refused_request_is_a_failed_record_with_the_servers_message(server: Server) -> None:
    records, _, _ = run(server.url, "no-such-model", "EMPTY", requests(2), GenerationConfig(max_new_tokens=4),
                        LoadProfile.concurrent, 2, None, 0, lambda: None, None)
    assert [r["ok"] for r in records] == [False, False]
    assert all(r["error"].startswith("RunnerError: HTTP 404: ") and "no-such-model" in r["error"] for r in records)


@pytest.mark.parametrize("path, body", [("completions", {"prompt": "hello"}),
                                        ("chat/completions", {"messages": [{"role": "user", "content": "hello"}]})])
def test_a_stream_has_one_chunk_per_token_the_last_with_its_finish_reason(server: Server, path: str,
                                                                           body: dict) -> None:
    """vLLM's stream shape, which vllm bench serve and this load generator count tokens by: no
    chunk of its own for the finish reason (chat: the assistant's role comes first, as vLLM's)."""
    import json

    import httpx

    request = {"model": "tiny-random", "max_tokens": 5, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}, **body}
    with httpx.stream("POST", f"{server.url}/{path}", json=request, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    with_choices = [e["choices"][0] for e in events if e["choices"]]
    tokens = with_choices[1:] if path.startswith("chat") else with_choices
    assert len(tokens) == events[-1]["usage"]["completion_tokens"] == 5
    assert [c["finish_reason"] for c in tokens] == [None] * 4 + ["length"]
