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
    steps, rows = after[0] - before[0], after[1] - before[1]
    assert rows / steps > 1  # decode steps ran several of the six at once (one at a time: 1.0)
    timed = [line for line in raw(server, "/metrics", method="GET").text.splitlines()
             if line.startswith("rm_runner_decode_step_seconds_count")]
    assert float(timed[0].split()[1]) >= steps  # every step timed


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
    ("unsupported field", 400, "best_of"),
    ("empty messages", 400, "messages"),
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
        body = {**ok, "best_of": 3}
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
    """Also: a serve run in a directory an earlier one used starts requests.jsonl afresh (it
    appended to the old records while metrics.json counted this run's alone)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "requests.jsonl").write_text(json.dumps({"route": "/v1/completions", "status": 200}) + "\n")
    (run / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:1/v1"}))  # the earlier run's address
    srv = Server(run, f"model={MODEL}", "server.served_model_name=my-model")
    client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):  # counted as a failed request in the summary below
        client.completions.create(model="my-model", prompt="hi", max_tokens=5000)
    stream = client.completions.create(
        model="my-model", prompt="go on", max_tokens=600, temperature=0, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    srv.proc.terminate()  # while the stream is still running: it is allowed to finish
    rest = list(stream)
    code, out, err = srv.stop()
    assert code == 0, err[-2000:]
    assert rest[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in [first, *rest] if c.choices[0].text) > 1
    assert json.loads((run / "status.json").read_text())["status"] == "ok"
    serve = json.loads((run / "metrics.json").read_text())["serve"]
    assert (serve["requests"], serve["requests_ok"], serve["requests_failed"]) == (2, 1, 1)
    records = [json.loads(line) for line in (run / "requests.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == [400, 200]  # this run's, as metrics.json counts them
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

    # One sequence at a time: the second request waits (with room, it would join the running batch).
    srv = Server(tmp_path / "run", f"model={MODEL}", "server.max_queue=1", "server.max_batch_size=1")
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


def _series(server: Server) -> list[str]:
    return [line for line in raw(server, "/metrics", method="GET").text.splitlines() if not line.startswith("#")]


def test_metrics_keep_one_series_per_route_however_many_paths_clients_make_up(server: Server) -> None:
    import uuid

    raw(server, "/x0", method="GET")  # the first of each: its label is new
    raw(server, "/v1/models/m0", method="GET")
    before = _series(server)
    for i in range(25):
        assert raw(server, f"/x{uuid.uuid4().hex}", method="GET").status_code == 404
        assert raw(server, f"/v1/models/{uuid.uuid4().hex}", method="GET").status_code == 404
    after = _series(server)
    assert len(after) == len(before)
    assert any('route="unmatched"' in line for line in after)
    assert any('route="/v1/models/{model}"' in line for line in after)


def test_a_tiny_temperature_is_greedy(client: openai.OpenAI) -> None:
    """1e-45 divided the logits into inf: a 500 for it and for every request batched with it."""
    greedy = client.completions.create(model=MODEL, prompt="one two", max_tokens=6, temperature=0)
    tiny = client.completions.create(model=MODEL, prompt="one two", max_tokens=6, temperature=1e-45)
    assert tiny.choices[0].text == greedy.choices[0].text


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_outside_64_bits_is_a_400_naming_seed(server: Server, seed: int) -> None:
    response = raw(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 1,
                                               "seed": seed})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "seed"
    spec = raw(server, "/openapi.json", method="GET").json()["components"]["schemas"]["CompletionRequest"]
    assert {"minimum": -(2**63), "maximum": 2**63 - 1}.items() <= spec["properties"]["seed"]["anyOf"][0].items()


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.mark.parametrize("field, value, noop", [
    ("functions", [{"name": "f", "parameters": {}}], None),
    ("function_call", "auto", "none"),
    ("tool_choice", "auto", "none"),
    ("tools", [{"type": "function", "function": {"name": "f"}}], []),
    ("modalities", ["text", "audio"], ["text"]),
    ("audio", {"voice": "alloy", "format": "wav"}, None),
    ("prediction", {"type": "content", "content": "x"}, None),
    ("reasoning_effort", "high", None),
    ("parallel_tool_calls", False, None),
    ("web_search_options", {}, None),
    ("use_beam_search", True, False),
    ("presence_penalty", 0.5, 0),
    ("logit_bias", {"5": 1.0}, {}),
    ("response_format", {"type": "json_object"}, {"type": "text"}),
])
def test_fields_this_server_cannot_honour_are_refused_unless_at_their_default(
        server: Server, field: str, value: object, noop: object) -> None:
    """They were answered 200 and silently ignored."""
    refused = raw(server, "/v1/chat/completions", {**CHAT, field: value})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == field and "not supported" in refused.json()["error"]["message"]
    assert raw(server, "/v1/chat/completions", {**CHAT, field: noop}).status_code == 200


def test_unknown_fields_are_refused_by_name(server: Server) -> None:
    for body in ({**CHAT, "spaces_between_special_tokens": False}, {**CHAT, "frobnicate": 1}):
        response = raw(server, "/v1/chat/completions", body)
        name = next(iter(body.keys() - CHAT.keys()))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["message"].startswith(f"Unrecognized request argument supplied: {name}")
        assert error["param"] == name and error["type"] == "invalid_request_error"


def test_return_token_ids_as_vllm_returns_them(server: Server, client: openai.OpenAI) -> None:
    from transformers import AutoTokenizer

    from rm_runner.models.tiny_random import TinyRandom

    tokenizer = AutoTokenizer.from_pretrained(str(TinyRandom().resolve()))
    body = {"model": MODEL, "prompt": ["go on", "one two"], "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    whole = raw(server, "/v1/completions", body).json()
    for choice, prompt in zip(whole["choices"], body["prompt"]):
        assert choice["prompt_token_ids"] == tokenizer(prompt)["input_ids"]
        assert len(choice["token_ids"]) == 8
        assert tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["text"]
    with httpx.stream("POST", server.url + "/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={**body, "stream": True}, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    for index, choice in enumerate(whole["choices"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert [t for c in mine for t in c["token_ids"]] == choice["token_ids"]  # every token once, in order
        assert mine[0]["prompt_token_ids"] == choice["prompt_token_ids"]
        assert all("prompt_token_ids" not in c for c in mine[1:])
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, extra_body={"return_token_ids": True})
    assert len(chat.choices[0].model_extra["token_ids"]) == 4 and chat.model_extra["prompt_token_ids"]
    plain = raw(server, "/v1/completions", {**body, "return_token_ids": False}).json()
    assert "token_ids" not in plain["choices"][0] and "prompt_token_ids" not in plain["choices"][0]


def test_vllm_stop_fields_and_skip_special_tokens(server: Server) -> None:
    """min_tokens, stop_token_ids, include_stop_str_in_output and skip_special_tokens were ignored."""
    def complete(**extra) -> dict:
        response = raw(server, "/v1/completions", {"model": MODEL, "prompt": "go on", "max_tokens": 10,
                                                   "temperature": 0, "return_token_ids": True, **extra})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    free = complete()
    ids = free["token_ids"]
    at = next(i for i, t in enumerate(ids) if i > 0 and t not in ids[:i])  # a token's first time, not the first
    cut = complete(stop_token_ids=[ids[at]])
    assert cut["token_ids"] == ids[: at + 1] and cut["finish_reason"] == "stop"
    assert cut["text"] == complete(max_tokens=at)["text"]  # without the stop token's text ...
    kept = complete(stop_token_ids=[ids[at]], include_stop_str_in_output=True)
    assert kept["text"] == complete(max_tokens=at + 1)["text"]  # ... unless asked for
    late = complete(stop_token_ids=[ids[at]], min_tokens=at + 2)
    assert len(late["token_ids"]) >= at + 2  # not before min_tokens
    word = " " + free["text"].split()[2]
    with_stop = complete(stop=[word], include_stop_str_in_output=True)
    assert with_stop["text"] == free["text"][: free["text"].index(word) + len(word)]
    raw_text = complete(skip_special_tokens=False)
    assert raw_text["token_ids"] == ids
    from transformers import AutoTokenizer

    from rm_runner.models.tiny_random import TinyRandom

    tokenizer = AutoTokenizer.from_pretrained(str(TinyRandom().resolve()))
    assert raw_text["text"] == tokenizer.decode(ids, skip_special_tokens=False)
    assert set(ids) & set(tokenizer.all_special_ids)  # the greedy answer has a special token to show
    assert raw_text["text"] != free["text"]


def test_method_not_allowed_names_the_allowed_ones(server: Server) -> None:
    for method, path in (("DELETE", "/v1/completions"), ("GET", "/v1/chat/completions"), ("POST", "/v1/models")):
        response = raw(server, path, method=method)
        assert response.status_code == 405
        assert response.headers["allow"] == ("GET" if path == "/v1/models" else "POST")
        assert response.json()["error"]["message"].startswith(f"{method} is not allowed on {path}")


@pytest.mark.parametrize("body", [b"", b"[]", b"3", b"null", b'"text"'])
def test_a_body_that_is_no_json_object_is_a_400_saying_so(server: Server, body: bytes) -> None:
    response = raw(server, "/v1/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith("the request body must be a JSON object")


def test_the_served_spec_describes_this_server(server: Server) -> None:
    spec = raw(server, "/openapi.json", method="GET").json()
    text = json.dumps(spec)
    assert "HTTPValidationError" not in text and '"detail"' not in text  # FastAPI's error shape is not ours
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "413", "422", "429", "500", "503"}
        assert "text/event-stream" in responses["200"]["content"]
        for status in set(responses) - {"200"}:
            assert responses[status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"}
        assert spec["paths"][path]["post"]["security"] == [{"bearer": []}]
    request = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["model"]["enum"] == [MODEL]
    assert request["max_tokens"]["anyOf"][0]["maximum"] == 2000  # server.max_tokens
    assert request["top_k"] and request["return_token_ids"]  # the vLLM extensions it serves
    # Requests valid per that schema are answered: an empty prompt, an integral max_tokens.
    assert raw(server, "/v1/completions", {"model": MODEL, "prompt": "", "max_tokens": 1.0}).status_code == 200


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("strict") / "run", f"model={MODEL}", "server.openai_extensions=false")
    yield srv
    srv.stop()


@pytest.mark.parametrize("field, value", [("top_k", 5), ("return_token_ids", True), ("ignore_eos", False),
                                          ("min_tokens", 1), ("repetition_penalty", 1.1), ("skip_special_tokens", True),
                                          ("stop_token_ids", [5]), ("frobnicate", 1)])
def test_strict_mode_answers_unknown_fields_as_openai_does(strict: Server, field: str, value: object) -> None:
    response = raw(strict, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, field: value})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {"message": f"Unrecognized request argument supplied: {field}",
                                        "type": "invalid_request_error", "param": field, "code": None}


def test_strict_mode_serves_openai_fields_and_leaves_vllm_ones_out_of_its_spec(strict: Server) -> None:
    client = openai.OpenAI(base_url=strict.url, api_key="unused", max_retries=0)
    answer = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0.5, seed=3, n=2,
                                       stop=["x"], top_p=0.9)
    assert len(answer.choices) == 2
    properties = raw(strict, "/openapi.json", method="GET").json()["components"]["schemas"]["CompletionRequest"][
        "properties"]
    assert "top_k" not in properties and "return_token_ids" not in properties and "seed" in properties


def test_a_stream_cut_by_the_shutdown_deadline_ends_with_an_error_event_and_is_recorded(tmp_path: Path) -> None:
    """It ended with a dropped connection (no error, no [DONE]), was missing from requests.jsonl and
    metrics.json, and uvicorn logged "Exception in ASGI application"."""
    srv = Server(tmp_path / "run", f"model={MODEL}", "server.shutdown_timeout_s=0.5")
    with httpx.stream("POST", srv.url + "/completions", timeout=60,
                      json={"model": MODEL, "prompt": "go on", "max_tokens": 1900, "temperature": 0, "stream": True,
                            "ignore_eos": True}) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        srv.proc.terminate()  # the stream has ~30 s to go: the 0.5 s deadline cuts it
        rest = [line for line in lines if line]
    code, _, err = srv.stop()
    assert code == 0, err[-2000:]
    assert first.startswith("data: {") and rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "shutting_down"
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "requests.jsonl").read_text().splitlines()]
    assert [(r["status"], r["error_type"], r["stream"]) for r in records] == [(503, "shutting_down", True)]
    assert 0 < records[0]["completion_tokens"] < 1900
    serve = json.loads((run / "metrics.json").read_text())["serve"]
    assert (serve["requests"], serve["requests_failed"]) == (1, 1)
    assert "Exception in ASGI application" not in err + (run / "rm_runner.log").read_text()
