"""vLLM's tokenizer routes on a real ``pipeline=serve`` server of the tiny random model:
``/tokenize`` (a prompt, or messages through the chat template), ``/detokenize`` and
``/tokenizer_info``, held to the model's own tokenizer, behind the API key, with OpenAI errors;
and lm-eval's remote tokenizer, which finds and uses them."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Server

KEY = "tokenize-key"
MODEL = "tiny-random"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the capital of France"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("tokenize") / "run", f"model={MODEL}", "server.max_tokens=16",
                 env={"RM_RUNNER_API_KEY": KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rm_runner.models.tiny_random import TinyRandom

    return AutoTokenizer.from_pretrained(str(TinyRandom().resolve()))


def call(server: Server, path: str, body: dict | None = None, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is None:
        return httpx.get(server.base + path, headers=headers, timeout=60)
    return httpx.post(server.base + path, json=body, headers=headers, timeout=60)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def test_tokenize_a_prompt_as_the_completions_route_does(server: Server, tokenizer) -> None:
    text = "the capital of France is Paris"
    answer = ok(call(server, "/tokenize", {"prompt": text, "model": MODEL}))
    ids = tokenizer(text)["input_ids"]
    assert answer == {"count": len(ids), "max_model_len": 2048, "tokens": ids, "token_strs": None}
    strs = ok(call(server, "/tokenize", {"prompt": text, "return_token_strs": True}))["token_strs"]
    assert strs == tokenizer.convert_ids_to_tokens(ids)
    completion = ok(call(server, "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}))
    assert completion["usage"]["prompt_tokens"] == answer["count"]
    without = ok(call(server, "/tokenize", {"prompt": text, "add_special_tokens": False}))["tokens"]
    assert without == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenize_messages_through_the_chat_template(server: Server, tokenizer) -> None:
    answer = ok(call(server, "/tokenize", {"messages": MESSAGES}))
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert answer["tokens"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    chat = ok(call(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}))
    assert chat["usage"]["prompt_tokens"] == answer["count"]  # what the chat route feeds the model
    bare = ok(call(server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}))["tokens"]
    assert answer["tokens"][:len(bare)] == bare and len(bare) < answer["count"]  # no assistant turn opened
    special = ok(call(server, "/tokenize", {"messages": MESSAGES, "add_special_tokens": True}))["tokens"]
    assert special == tokenizer(rendered, add_special_tokens=True)["input_ids"]


def test_detokenize_gives_the_text_of_token_ids(server: Server, tokenizer) -> None:
    text = "who made the water hot"
    ids = ok(call(server, "/tokenize", {"prompt": text}))["tokens"]
    assert ok(call(server, "/detokenize", {"tokens": ids, "model": MODEL})) == {"prompt": tokenizer.decode(ids)}
    assert tokenizer.decode(ids) == text
    assert ok(call(server, "/detokenize", {"tokens": []})) == {"prompt": ""}


def test_tokenizer_info_is_the_tokenizers_configuration(server: Server, tokenizer) -> None:
    info = ok(call(server, "/tokenizer_info"))
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert (info["bos_token"], info["eos_token"], info["pad_token"], info["unk_token"]) == (
        tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token)
    assert info["chat_template"] == tokenizer.chat_template
    assert info["model_max_length"] == tokenizer.model_max_length
    assert "vocab_file" not in info and "merges_file" not in info


@pytest.mark.parametrize("case, path, body, status, param", [
    ("unknown field", "/tokenize", {"prompt": "hi", "truncate_prompt_tokens": 3}, 400, "truncate_prompt_tokens"),
    ("both forms", "/tokenize", {"prompt": "hi", "messages": MESSAGES}, 400, "prompt"),
    ("wrong type", "/tokenize", {"prompt": 5}, 422, "prompt"),
    ("neither form", "/tokenize", {"model": MODEL}, 422, "prompt"),
    ("unsupported message field", "/tokenize", {"messages": [{"role": "user", "content": "hi", "audio": {}}]},
     400, "messages[0].audio"),
    ("unknown model", "/tokenize", {"prompt": "hi", "model": "nope"}, 404, "model"),
    ("out of vocabulary", "/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
    ("negative id", "/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
    ("missing key", "/tokenize", {"prompt": "hi"}, 401, None),
])
def test_bad_tokenizer_requests_get_openai_errors(server: Server, case: str, path: str, body: dict, status: int,
                                                  param: str | None) -> None:
    response = call(server, path, body, key=None if case == "missing key" else KEY)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    if case == "unknown field":
        assert error["message"].startswith("Unrecognized request argument supplied: truncate_prompt_tokens")
    assert call(server, "/tokenizer_info", key=None).status_code == 401


def test_lm_eval_finds_and_uses_the_remote_tokenizer(server: Server, tokenizer) -> None:
    """lm-eval's local-completions asks /tokenizer_info and /tokenize whether to tokenize on the
    server (its tokenizer_backend=auto), then encodes and decodes through them."""
    from lm_eval import utils

    completions = server.url + "/completions"
    assert utils.check_remote_tokenizer_support(completions, auth_token=KEY)
    remote = utils.RemoteTokenizer(completions, auth_token=KEY)
    text = "the capital of France is Paris"
    assert remote.encode(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert remote.decode(remote.encode(text)) == text
    assert remote.eos_token_id == tokenizer.eos_token_id
    assert remote.apply_chat_template(MESSAGES) == tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False)
