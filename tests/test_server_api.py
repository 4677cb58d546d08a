"""pipeline=serve: the OpenAI-compatible API, started as a user starts it, driven with the
official ``openai`` client and with raw HTTP for what a client library would never send."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server

KEY = "test-key-3f9a"
MODEL = "tiny-random"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("serve") / "run"
    srv = Server(run_dir, f"model={MODEL}", "server.max_body_bytes=8192", "server.max_tokens=2000",
                 "server.max_wait_ms=100", "server.max_prompt_tokens=256", env={"RM_RUNNER_API_KEY": KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def raw(server: Server, path: str, body: bytes | dict | None = None, key: str | None = KEY,
        method: str = "POST") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    headers["Content-Type"] = "application/json"
    return httpx.request(method, server.base + path, content=content, headers=headers, timeout=60)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_equals_the_offline_run_of_the_same_prompt(client: openai.OpenAI, tiny) -> None:
    answer = client.completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=12, temperature=0)
    offline = tiny("workload.prompts=['the quick brown fox']", "workload.chat_template=false",
                   "generation.max_new_tokens=12")
    record = offline.read_jsonl("generations.jsonl")[0]
    assert answer.choices[0].text == record["text"]
    assert answer.usage.prompt_tokens == record["prompt_tokens"]
    assert answer.usage.completion_tokens == record["output_tokens"]
    assert answer.choices[0].finish_reason == record["finish_reason"] == "length"


def test_chat_completion_applies_the_chat_template(client: openai.OpenAI, tiny) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello there"}],
                                            max_tokens=10, temperature=0)
    offline = tiny("workload.prompts=['hello there']", "generation.max_new_tokens=10").read_jsonl("generations.jsonl")[0]
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == offline["text"]
    assert answer.usage.prompt_tokens == offline["prompt_tokens"]


def test_streaming_gives_the_same_text_in_chunks(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "tell me"}],
                                           max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "tell me"}],
                                                 max_tokens=20, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 1 and "".join(texts) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_is_server_sent_events_ending_with_done(server: Server) -> None:
    with httpx.stream("POST", server.url + "/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": ["a b", "c d"], "max_tokens": 5, "temperature": 0,
                            "stream": True}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    finished = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"][0]["finish_reason"]}
    assert finished == {0: "length", 1: "length"} and all(c["object"] == "text_completion" for c in chunks)


def test_n_stop_and_seed(client: openai.OpenAI) -> None:
    greedy = client.completions.create(model=MODEL, prompt="one two", max_tokens=8, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].text == greedy.choices[1].text
    words = greedy.choices[0].text.split()
    stop = " " + words[2]
    cut = client.completions.create(model=MODEL, prompt="one two", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == greedy.choices[0].text[: greedy.choices[0].text.index(stop)]
    sampled = [client.completions.create(model=MODEL, prompt="one two", max_tokens=8, temperature=1.0, seed=7)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_concurrent_requests_are_batched_together(server: Server) -> None:
    before = _batch_counts(server)
    barrier = threading.Barrier(6)
    results: list[int] = []

    def call() -> None:
        barrier.wait()
        results.append(raw(server, "/v1/completions", {"model": MODEL, "prompt": "x y z", "max_tokens": 4,
                                                        "temperature": 0}).status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    after = _batch_counts(server)
    assert results == [200] * 6
    assert after[1] - before[1] == 6  # six sequences ...
    assert after[0] - before[0] < 6   # ... in fewer batches than requests


def _batch_counts(server: Server) -> tuple[float, float]:
    text = raw(server, "/metrics", method="GET").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("rm_runner_batch_size_")}
    return values.get("rm_runner_batch_size_count", 0.0), values.get("rm_runner_batch_size_sum", 0.0)


def test_client_errors_map_to_openai_exceptions(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    anonymous = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL, prompt="word " * 100, max_tokens=1990)


@pytest.mark.parametrize("case, status, param", [
    ("malformed json", 400, None),
    ("wrong type", 422, "max_tokens"),
    ("unknown model", 404, "model"),
    ("missing key", 401, None),
    ("wrong key", 401, None),
    ("oversize body", 413, None),
    ("max_tokens over the limit", 400, "max_tokens"),
    ("prompt too long", 400, "prompt"),
    ("unsupported field", 400, "logprobs"),
    ("empty messages", 422, "messages"),
    ("empty prompt", 400, "prompt"),
    ("token id out of vocabulary", 400, "prompt"),
    ("missing model", 422, "model"),
])
def test_bad_requests_get_openai_errors(server: Server, case: str, status: int, param: str | None) -> None:
    ok = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    path, body, key = "/v1/completions", ok, KEY
    if case == "malformed json":
        body = b'{"model": "tiny-random", "prompt": '
    elif case == "wrong type":
        body = {**ok, "max_tokens": "two"}
    elif case == "unknown model":
        body = {**ok, "model": "nope"}
    elif case == "missing key":
        key = None
    elif case == "wrong key":
        key = "nope"
    elif case == "oversize body":
        body = {**ok, "prompt": "word " * 4000}
    elif case == "max_tokens over the limit":
        body = {**ok, "max_tokens": 5000}
    elif case == "prompt too long":
        body = {**ok, "prompt": "word " * 1000, "max_tokens": 1}
    elif case == "unsupported field":
        body = {**ok, "logprobs": 3}
    elif case == "empty messages":
        path, body = "/v1/chat/completions", {"model": MODEL, "messages": []}
    elif case == "empty prompt":
        body = {**ok, "prompt": [[5, 6], []]}
    elif case == "token id out of vocabulary":
        body = {**ok, "prompt": [5, 10**6]}
    elif case == "missing model":
        body = {"prompt": "secret " * 50}
    response = raw(server, path, body, key=key)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param:
        assert error["param"] == param
    if case == "missing model":  # a 422 names the field without echoing the request body back
        assert "secret" not in error["message"] and "model" in error["message"]
    if case == "token id out of vocabulary":
        assert error["message"].startswith("prompt 0: token id 1000000 is out of vocabulary")


def test_health_is_open_but_metrics_need_the_key(server: Server) -> None:
    assert raw(server, "/health", key=None, method="GET").status_code == 200
    assert raw(server, "/metrics", key=None, method="GET").status_code == 401
    text = raw(server, "/metrics", method="GET").text
    assert 'rm_runner_requests_total{route="/v1/completions",status="200"}' in text
    assert "rm_runner_time_to_first_token_seconds_bucket" in text


def test_a_client_that_leaves_mid_stream_frees_its_rows(server: Server, client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="go on", max_tokens=1900, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    follow = client.completions.create(model=MODEL, prompt="after", max_tokens=3, temperature=0)
    assert follow.choices[0].finish_reason == "length"
    left = _wait_for_record(server, lambda r: r["status"] == 499)
    assert left["finish_reasons"] == ["cancelled"] and left["error_type"] == "client_disconnected"
    assert left["completion_tokens"] < 1900  # its row stopped when the client left


def _wait_for_record(server: Server, match, timeout_s: float = 30.0) -> dict:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        path = server.run_dir / "requests.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        found = [r for r in records if match(r)]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError("no such record in requests.jsonl")


def test_run_directory_after_sigterm(tmp_path: Path) -> None:
    srv = Server(tmp_path / "run", f"model={MODEL}", "server.served_model_name=my-model")
    client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):  # counted as a failed request in the summary below
        client.completions.create(model="my-model", prompt="", max_tokens=4)
    stream = client.completions.create(
        model="my-model", prompt="go on", max_tokens=600, temperature=0, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    srv.proc.terminate()  # while the stream is still running: it is allowed to finish
    rest = list(stream)
    code, out, err = srv.stop()
    assert code == 0, err[-2000:]
    assert rest[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in [first, *rest] if c.choices[0].text) > 1
    run = tmp_path / "run"
    assert json.loads((run / "status.json").read_text())["status"] == "ok"
    serve = json.loads((run / "metrics.json").read_text())["serve"]
    assert (serve["requests"], serve["requests_ok"], serve["requests_failed"]) == (2, 1, 1)
    latency = serve["latency_s"]  # the answered request's alone: the refused one is not among them
    assert serve["output_tokens"] == 600 and latency["mean"] == latency["p50"] == latency["p99"]
    assert "serving my-model at http://127.0.0.1:" in out
    for name in ("config.yaml", "environment.json", "rm_runner.log", "requests.jsonl", "server.json"):
        assert (run / name).is_file(), name


def test_api_key_never_reaches_the_run_directory(server: Server) -> None:
    for path in server.run_dir.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="replace"), path


def test_port_in_use_is_a_config_error(tmp_path: Path, server: Server) -> None:
    from tests.conftest import cli

    port = json.loads((server.run_dir / "server.json").read_text())["port"]
    result = cli("pipeline=serve", f"model={MODEL}", f"server.port={port}", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 1
    assert f"server.port={port} is already in use" in result.stderr
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"


def test_a_full_queue_answers_429(tmp_path: Path) -> None:
    import time

    srv = Server(tmp_path / "run", f"model={MODEL}", "server.max_queue=1", "server.max_wait_ms=0")
    client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)
    try:
        running = client.completions.create(model=MODEL, prompt="go on", max_tokens=1900, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        next(iter(running))  # the worker is busy with it now
        waiting = threading.Thread(target=lambda: client.completions.create(model=MODEL, prompt="b", max_tokens=2))
        waiting.start()
        deadline = time.monotonic() + 60
        while "rm_runner_requests_waiting 1.0" not in raw(srv, "/metrics", key=None, method="GET").text:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match="server.max_queue=1"):
            client.completions.create(model=MODEL, prompt="c", max_tokens=2)
        running.close()
        waiting.join(timeout=60)
    finally:
        srv.stop()
