"""logprobs and echo in the API, as vLLM serves them.

First the formatting, over hand-made ``TokenLogprob`` lists (what the batcher hands the app), with
a SentencePiece-style tokenizer built here; then a batcher that cannot keep logprobs refusing
them by name (an app in this process over an engine that runs whole batches); then a real
``pipeline=serve`` server of the tiny random model, its logprobs held to the model's own
log-softmax computed here with transformers.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import httpx
import openai
import pytest

from rm_runner.requests import SamplingParams, TokenLogprob
from rm_runner.server.app import LogprobsMissing, Reply, TokenText, wanted_logprobs
from rm_runner.server.batcher import Job
from rm_runner.server.schemas import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
)
from tests.conftest import Server

MODEL = "tiny-random"


# The formatting, over hand-made logprobs.

def sentencepiece_tokenizer():
    """A word-level tokenizer with a Metaspace (SentencePiece-style) pre-tokenizer and decoder:
    decoding a word token alone drops its leading space, as Llama's and Mistral's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581Hello": 3, "\u2581w\u00f6rld": 4, "!": 5, "\u2581the": 6, "end": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def text_of() -> TokenText:
    return TokenText(sentencepiece_tokenizer())


PROMPT = [3, 4]  # "Hello wörld"
PROMPT_LOGPROBS = [None, TokenLogprob(4, -1.5, ((6, -0.5), (4, -1.5)))]
GENERATED = [5, 2]  # "!" then EOS
LOGPROBS = [TokenLogprob(5, -0.25, ((5, -0.25), (7, -2.0))),  # the best token, chosen
            TokenLogprob(2, float("-inf"), ((6, -0.1), (7, -0.2)))]  # an impossible one, chosen


def job_with(choices: list, n: int = 1, prompt_logprobs: list | None = None) -> Job:
    job = Job(prompts=[PROMPT], n=n, max_tokens=2, sampling=SamplingParams(),
              emit=lambda event: None)
    job.choices = choices
    job.prompt_logprob_results = [prompt_logprobs] if prompt_logprobs is not None else []
    return job


def answered(text: str = "!", ids=GENERATED, logprobs=LOGPROBS, finish_reason: str = "stop") -> SimpleNamespace:
    return SimpleNamespace(text=text, token_ids=list(ids), logprobs=list(logprobs), finish_reason=finish_reason)


def test_token_text_is_each_token_alone_with_the_space_sentencepiece_drops(text_of: TokenText) -> None:
    assert text_of.tokenizer.decode([3]) == "Hello"  # what a plain decode makes of the word alone
    assert [text_of(i) for i in (3, 4, 5, 2)] == [" Hello", " w\u00f6rld", "!", "</s>"]  # special tokens kept
    assert text_of.plain(3) == "Hello"  # a prompt's first token: vLLM decodes it plainly


def test_completion_logprobs_as_vllm_writes_them(text_of: TokenText) -> None:
    reply = Reply("m", False, job_with([answered()]), token_text=text_of, logprobs=1)
    answer = reply.whole()
    CompletionResponse.model_validate(answer)  # the spec's response model describes it
    (choice,) = answer["choices"]
    assert choice["text"] == "!"
    assert choice["logprobs"] == {
        "tokens": ["!", "</s>"],
        "token_logprobs": [-0.25, -9999.0],  # -inf as the number OpenAI and vLLM send
        # the chosen token first, then the best ones: logprobs + 1 at most
        "top_logprobs": [{"!": -0.25, "end": -2.0}, {"</s>": -9999.0, " the": -0.1}],
        "text_offset": [0, 1],
    }
    none_asked = Reply("m", False, job_with([answered()]), token_text=text_of).whole()
    assert none_asked["choices"][0]["logprobs"] is None


def test_logprobs_zero_is_the_chosen_token_alone(text_of: TokenText) -> None:
    answer = Reply("m", False, job_with([answered()]), token_text=text_of, logprobs=0).whole()
    assert answer["choices"][0]["logprobs"]["top_logprobs"] == [{"!": -0.25}, {"</s>": -9999.0}]


def test_echo_puts_the_prompt_and_its_logprobs_first(text_of: TokenText) -> None:
    job = job_with([answered()], prompt_logprobs=PROMPT_LOGPROBS)
    answer = Reply("m", False, job, token_text=text_of, logprobs=1, echoed=["Hello w\u00f6rld"]).whole()
    CompletionResponse.model_validate(answer)
    (choice,) = answer["choices"]
    assert choice["text"] == "Hello w\u00f6rld!"
    assert choice["logprobs"] == {
        "tokens": ["Hello", " w\u00f6rld", "!", "</s>"],
        "token_logprobs": [None, -1.5, -0.25, -9999.0],  # the first token has no context
        "top_logprobs": [None, {" w\u00f6rld": -1.5, " the": -0.5}, {"!": -0.25, "end": -2.0},
                         {"</s>": -9999.0, " the": -0.1}],
        "text_offset": [0, 5, 11, 12],
    }
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def test_echo_without_logprobs_and_with_max_tokens_zero(text_of: TokenText) -> None:
    plain = Reply("m", False, job_with([answered()]), token_text=text_of, echoed=["Hello w\u00f6rld"]).whole()
    assert plain["choices"][0]["text"] == "Hello w\u00f6rld!" and plain["choices"][0]["logprobs"] is None
    job = job_with([answered(finish_reason="length")], prompt_logprobs=PROMPT_LOGPROBS)
    only = Reply("m", False, job, token_text=text_of, logprobs=1, echoed=["Hello w\u00f6rld"], echo_only=True).whole()
    (choice,) = only["choices"]
    assert choice["text"] == "Hello w\u00f6rld"  # the prompt alone: the one token made is left out
    assert choice["logprobs"]["tokens"] == ["Hello", " w\u00f6rld"]
    assert choice["logprobs"]["token_logprobs"] == [None, -1.5]


def test_echo_with_return_token_ids_echoes_no_text_as_vllm(text_of: TokenText) -> None:
    job = job_with([answered()], prompt_logprobs=PROMPT_LOGPROBS)
    answer = Reply("m", False, job, True, token_text=text_of, logprobs=0, echoed=["Hello w\u00f6rld"]).whole()
    (choice,) = answer["choices"]
    assert choice["text"] == "!" and choice["prompt_token_ids"] == PROMPT and choice["token_ids"] == GENERATED
    assert choice["logprobs"]["tokens"] == ["Hello", " w\u00f6rld", "!", "</s>"]


def test_n_choices_each_echo_their_prompt(text_of: TokenText) -> None:
    job = job_with([answered(), answered("", [2], LOGPROBS[1:])], n=2, prompt_logprobs=PROMPT_LOGPROBS)
    answer = Reply("m", False, job, token_text=text_of, logprobs=0, echoed=["Hello w\u00f6rld"]).whole()
    assert [c["text"] for c in answer["choices"]] == ["Hello w\u00f6rld!", "Hello w\u00f6rld"]
    assert [len(c["logprobs"]["tokens"]) for c in answer["choices"]] == [4, 3]


def test_chat_logprobs_as_vllm_writes_them(text_of: TokenText) -> None:
    ids = [4, 5]
    logprobs = [TokenLogprob(4, -0.75, ((4, -0.75), (6, -1.0), (7, -3.0))), LOGPROBS[0]]
    job = job_with([answered(" w\u00f6rld!", ids, logprobs)])
    answer = Reply("m", True, job, token_text=text_of, logprobs=2).whole()
    ChatCompletionResponse.model_validate(answer)
    world = list(" w\u00f6rld".encode())
    assert answer["choices"][0]["logprobs"] == {"content": [
        {"token": " w\u00f6rld", "logprob": -0.75, "bytes": world,
         "top_logprobs": [{"token": " w\u00f6rld", "logprob": -0.75, "bytes": world},
                          {"token": " the", "logprob": -1.0, "bytes": list(b" the")}]},
        {"token": "!", "logprob": -0.25, "bytes": [33],
         "top_logprobs": [{"token": "!", "logprob": -0.25, "bytes": [33]},
                          {"token": "end", "logprob": -2.0, "bytes": list(b"end")}]},
    ]}
    bare = Reply("m", True, job, token_text=text_of, logprobs=0).whole()  # logprobs=true, no top_logprobs
    assert [c["top_logprobs"] for c in bare["choices"][0]["logprobs"]["content"]] == [[], []]


def test_streamed_chunks_carry_their_tokens_logprobs(text_of: TokenText) -> None:
    job = job_with([answered()], prompt_logprobs=PROMPT_LOGPROBS)
    whole = Reply("m", False, job, token_text=text_of, logprobs=1, echoed=["Hello w\u00f6rld"]).whole()
    reply = Reply("m", False, job, token_text=text_of, logprobs=1, echoed=["Hello w\u00f6rld"])
    chunks = [reply.chunk(0, text="!", token_ids=[5], logprobs=LOGPROBS[:1]),
              reply.chunk(0, text="", token_ids=[2], logprobs=LOGPROBS[1:]),
              reply.chunk(0, finish_reason="stop")]
    first, second, last = (c["choices"][0] for c in chunks)
    assert first["text"] == "Hello w\u00f6rld!"  # the prompt rides on the choice's first chunk
    assert first["logprobs"]["tokens"] == ["Hello", " w\u00f6rld", "!"]
    assert second["logprobs"]["text_offset"] == [1]  # after the text generated so far, as vLLM counts
    assert last["logprobs"] is None and last["finish_reason"] == "stop"
    joined = {key: first["logprobs"][key] + second["logprobs"][key] for key in ("tokens", "token_logprobs", "top_logprobs")}
    assert joined == {key: whole["choices"][0]["logprobs"][key] for key in joined}

    chat = Reply("m", True, job, token_text=text_of, logprobs=1)
    assert chat.chunk(0, role=True)["choices"][0]["logprobs"] is None
    delta = chat.chunk(0, text="!", token_ids=[5], logprobs=LOGPROBS[:1])["choices"][0]
    assert delta["delta"] == {"content": "!"}
    assert [c["token"] for c in delta["logprobs"]["content"]] == ["!"]


def test_echo_reaches_a_stream_whose_first_event_is_its_finish(text_of: TokenText) -> None:
    job = job_with([answered("", [], [])], prompt_logprobs=PROMPT_LOGPROBS)
    reply = Reply("m", False, job, token_text=text_of, echoed=["Hello w\u00f6rld"])
    choice = reply.chunk(0, finish_reason="stop")["choices"][0]
    assert choice["text"] == "Hello w\u00f6rld" and choice["finish_reason"] == "stop"


def test_missing_logprobs_are_an_error_not_a_short_list(text_of: TokenText) -> None:
    with pytest.raises(LogprobsMissing, match="1 of 2 tokens"):
        Reply("m", False, job_with([answered(logprobs=LOGPROBS[:1])]), token_text=text_of, logprobs=1).whole()
    with pytest.raises(LogprobsMissing, match="prompt logprobs for 0 of 2"):
        Reply("m", False, job_with([answered()]), token_text=text_of, logprobs=1, echoed=["x"]).whole()
    with pytest.raises(LogprobsMissing):
        Reply("m", True, job_with([answered()]), token_text=text_of, logprobs=1).chunk(0, text="!", token_ids=[5])


def test_what_a_request_asks_the_batcher_for() -> None:
    def completion(**fields):
        return CompletionRequest(model="m", prompt="x", **fields)

    def chat(**fields):
        return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **fields)

    assert wanted_logprobs(completion()) == (None, None)
    assert wanted_logprobs(completion(logprobs=3)) == (3, None)
    assert wanted_logprobs(completion(logprobs=0, echo=True)) == (0, 0)
    assert wanted_logprobs(completion(echo=True)) == (None, None)  # echo alone needs no logprobs
    assert wanted_logprobs(chat()) == (None, None)
    assert wanted_logprobs(chat(logprobs=True)) == (0, None)
    assert wanted_logprobs(chat(logprobs=True, top_logprobs=5)) == (5, None)


# A batcher that runs whole batches through the engine keeps no logprobs: refused by name.

class WholeBatchEngine:
    """Just enough of an engine for the app: one that runs whole batches (no running_batch)."""

    name = "triton"
    eos_ids = {2}
    max_model_len = 64

    def __init__(self) -> None:
        self.tokenizer = sentencepiece_tokenizer()

    def health(self) -> bool:
        return True

    def running_batch(self) -> None:
        return None

    def passthrough(self) -> None:  # no server behind it that answers logprobs
        return None

    def check_sampling(self, sampling) -> None:  # takes every setting
        pass


def in_process_app(**settings):
    from fastapi.testclient import TestClient

    from rm_runner.config import GenerationConfig, ServerConfig
    from rm_runner.server.app import Served, create_app

    served = Served(WholeBatchEngine(), "fake", ServerConfig(**settings), GenerationConfig(), max_model_len=64)
    app = create_app(served)
    assert not app.state.batcher.supports_logprobs
    return TestClient(app)


def test_a_batcher_without_logprobs_refuses_them_naming_the_field_and_the_engine() -> None:
    client = in_process_app()
    for path, body in (("/v1/completions", {"prompt": "Hello", "logprobs": 0}),
                       ("/v1/completions", {"prompt": "Hello", "logprobs": 1, "echo": True, "max_tokens": 0}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True})):
        response = client.post(path, json={"model": "fake", "max_tokens": 1, **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "logprobs" and error["code"] == "logprobs_not_supported"
        assert "engine=triton" in error["message"] and "engine=local" in error["message"]
    spec = client.get("/openapi.json").json()["components"]["schemas"]
    assert spec["CompletionRequest"]["properties"]["logprobs"]["type"] == "null"  # the spec says so too
    assert spec["ChatCompletionRequest"]["properties"]["logprobs"]["enum"] == [False, None]


def test_tokenizer_routes_are_vllm_extensions() -> None:
    """server.openai_extensions=false answers as OpenAI: no /tokenize, /detokenize, /tokenizer_info."""
    assert in_process_app().post("/tokenize", json={"prompt": "Hello"}).json()["tokens"] == [3]
    strict = in_process_app(openai_extensions=False)
    for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info")):
        assert strict.request(method, path, json={"prompt": "Hello"}).status_code == 404
    assert "/tokenize" not in strict.get("/openapi.json").json()["paths"]


# A real server of the tiny random model (its batcher keeps logprobs).

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("logprobs") / "run", f"model={MODEL}", "server.max_tokens=64")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    """The tiny random model itself in transformers: (tokenizer, token ids -> log-softmax per position)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rm_runner.models.tiny_random import TinyRandom

    path = str(TinyRandom().resolve())  # the options conf/model/tiny-random.yaml gives
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def log_softmax(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return AutoTokenizer.from_pretrained(path), log_softmax


def post(server: Server, path: str, body: dict) -> dict:
    response = httpx.post(server.base + path, json={"model": MODEL, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_echoed_prompt_and_answer_logprobs_are_the_models_log_softmax(server: Server, reference) -> None:
    tokenizer, log_softmax = reference
    prompt = tokenizer("the capital of France is")["input_ids"]
    answer = post(server, "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 3, "max_tokens": 4,
                                               "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    (choice,) = answer["choices"]
    ids = prompt + choice["token_ids"]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) == answer["usage"]["total_tokens"]
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = log_softmax(ids)
    for i in range(1, len(ids)):
        here = expected[i - 1]  # what the model gave position i after ids[:i]
        assert logprobs["token_logprobs"][i] == pytest.approx(here[ids[i]].item(), abs=1e-3)
        best = here.topk(3)
        top = logprobs["top_logprobs"][i]
        assert set(top) == {tokenizer.decode([t]) for t in [ids[i], *best.indices.tolist()]}  # chosen + 3 best
        for token_id, value in zip(best.indices.tolist(), best.values.tolist()):
            assert top[tokenizer.decode([token_id])] == pytest.approx(value, abs=1e-3)
    for i in range(len(prompt), len(ids)):  # greedy: every generated token is the best one there
        assert logprobs["token_logprobs"][i] == max(logprobs["top_logprobs"][i].values())


def test_echo_with_max_tokens_zero_scores_the_prompt_alone(server: Server, reference) -> None:
    tokenizer, log_softmax = reference
    text = "the capital of France is"
    answer = post(server, "/v1/completions", {"prompt": text, "echo": True, "logprobs": 1, "max_tokens": 0})
    (choice,) = answer["choices"]
    prompt = tokenizer(text)["input_ids"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in prompt]
    expected = log_softmax(prompt)
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [expected[i - 1][prompt[i]].item() for i in range(1, len(prompt))], abs=1e-3)
    plain = post(server, "/v1/completions", {"prompt": text, "echo": True, "max_tokens": 3, "temperature": 0})
    assert plain["choices"][0]["text"].startswith(text) and plain["choices"][0]["logprobs"] is None


def test_streamed_logprobs_add_up_to_the_whole_answers(server: Server) -> None:
    body = {"prompt": "one two three", "echo": True, "logprobs": 2, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    whole = post(server, "/v1/completions", body)["choices"][0]
    with httpx.stream("POST", server.url + "/completions", json={"model": MODEL, **body, "stream": True},
                      timeout=120) as response:
        chunks = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                  if line.startswith("data: {")]
    choices = [c["choices"][0] for c in chunks]
    assert "".join(c["text"] for c in choices) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert [x for c in choices if c["logprobs"] for x in c["logprobs"][key]] == whole["logprobs"][key]


def test_completion_logprobs_through_the_openai_client(client: openai.OpenAI) -> None:
    answer = client.completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=5, temperature=0,
                                       logprobs=2, extra_body={"ignore_eos": True})
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == answer.usage.completion_tokens == 5
    assert all(1 <= len(top) <= 3 and math.isfinite(value) and value <= 0
               for top, value in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]


def test_chat_logprobs_through_the_openai_client(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "what is the capital of France"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 5
    for token in content:
        assert token.bytes == list(token.token.encode()) and len(token.top_logprobs) == 3
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True)  # greedy: the chosen token is the best, first
        assert token.top_logprobs[0].token == token.token and token.top_logprobs[0].logprob == token.logprob
    streamed = [t for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3, stream=True,
        extra_body={"ignore_eos": True}) if chunk.choices and chunk.choices[0].logprobs
        for t in chunk.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    bare = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0, logprobs=True)
    assert [t.top_logprobs for t in bare.choices[0].logprobs.content] == [[], []]


@pytest.mark.parametrize("path, body, param, code", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     "top_logprobs", "top_logprobs_without_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs", "less_than_equal"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "less_than_equal"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens_zero_without_echo"),
])
def test_logprobs_limits_are_400s_naming_the_field(server: Server, path: str, body: dict, param: str,
                                                   code: str) -> None:
    response = httpx.post(server.base + path, json={"model": MODEL, "max_tokens": 1, **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code)
