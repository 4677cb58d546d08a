"""The one OpenAI-compatible HTTP client of rm_runner's engines: ``device=remote`` (a server
rm_runner did not start: vLLM, TGI, a hosted API) and ``engine=vllm`` (vLLM's server it started)
reach their server through it, as an executor (``Executor``) that runs ``GenerationRequest``s.

Requests go to ``/v1/completions`` through the official ``openai`` client, each row its own
request. What a server takes beyond OpenAI's own fields is asked once, when the model is prepared
(``openai_extensions``, ``token_prompts`` of the ``OpenAIEndpoint``): vLLM takes its extensions
(``return_token_ids``, ``skip_special_tokens``, ``ignore_eos``, ``top_k``, ...) and token-id
prompts, and names the generated token ids; a server as strict as OpenAI's own API refuses any
field it does not define (400 "Unrecognized request argument supplied: ..."), so there prompts go
out as token ids or as text decoded with the local tokenizer, and the generated ids are the local
tokenization of the text the server returns (a streamed row's text joined, see ``StreamedText``).
vLLM's sampling settings cannot reach such a server: asking for them is an error naming the
field. The API key is read from an environment variable and never written anywhere.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from rm_runner.backends.base import OnStep, OpenAIEndpoint
from rm_runner.backends.server_steps import follow_steps
from rm_runner.errors import ConfigError, DeviceUnavailableError, RunnerError, UnsupportedSampling
from rm_runner.requests import GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

# Sampling settings that vLLM's OpenAI server takes as request extensions (OpenAI defines none of them).
VLLM_SAMPLING = ("repetition_penalty", "min_p", "min_tokens")
Switch = Union[str, bool]  # "auto", True or False


def openai_client(endpoint: OpenAIEndpoint) -> Any:
    """The official client for ``endpoint``, its key from the environment, no retries (a failure
    is reported, not hidden behind a retry's delay)."""
    from openai import OpenAI

    return OpenAI(base_url=endpoint.base_url, api_key=api_key(endpoint), timeout=endpoint.timeout_s, max_retries=0)


def api_key(endpoint: OpenAIEndpoint) -> str:
    return os.environ.get(endpoint.api_key_env) or "EMPTY"


def served_models(endpoint: OpenAIEndpoint) -> list[str]:
    """``GET /models``: the names the server serves (the client's own error where it does not answer)."""
    return [m.id for m in openai_client(endpoint).models.list().data]


@dataclass(frozen=True)
class Dialect:
    """What one server takes and returns beyond OpenAI's own completion fields."""

    extensions: bool  # vLLM's request fields (return_token_ids, skip_special_tokens, ignore_eos, top_k, ...)
    token_prompts: bool  # prompts as lists of token ids
    returns_ids: bool  # answers name the generated token ids (vLLM's return_token_ids)
    refused: str = ""  # the server's answer to the forms it refused, when it was asked

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"openai_extensions": self.extensions, "token_prompts": self.token_prompts,
                                     "returns_token_ids": self.returns_ids}
        if self.refused:
            described["refused"] = self.refused
        return described


@dataclass
class ServedModel:
    client: Any
    served_name: str
    tokenizer: Any
    dialect: Dialect = Dialect(True, True, True)
    eos_token_id: Optional[int] = None  # stands for the EOS a server stopped at without naming its id
    lock: threading.Lock = field(default_factory=threading.Lock)  # fast tokenizers are not thread-safe
    _warned: bool = False

    def encode(self, text: str) -> list[int]:
        with self.lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def pieces(self, text: str) -> list[tuple[str, tuple[int, int]]]:
        """``text`` as the tokenizer's pre-tokenizer splits it; [] where it has none."""
        pre = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
        if pre is None:
            return []
        with self.lock:
            return pre.pre_tokenize_str(text)

    def prompt(self, ids: list[int]) -> Union[list[int], str]:
        """A prompt as this server takes it: its token ids, or their text for it to tokenize. The ids
        the tokenizer adds around any text itself (a BOS) are left out of the text: the server adds them."""
        if self.dialect.token_prompts:
            return ids
        with self.lock:
            framed = self.tokenizer("a")["input_ids"]
            bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
            at = framed.index(bare[0]) if bare and bare[0] in framed else 0
            head, tail = framed[:at], framed[at + len(bare):] if bare else []
            body = ids[len(head):] if head and ids[: len(head)] == head else ids
            body = body[: len(body) - len(tail)] if tail and body[len(body) - len(tail):] == tail else body
            text = self.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if self.tokenizer(text)["input_ids"] != ids and not self._warned:
                self._warned = True
                log.warning("device=remote: a prompt's text does not tokenize back to its %d token ids, so the "
                            "server sees it slightly differently (prompts go out as text: device.token_prompts, "
                            "or a server that takes token ids)", len(ids))
        return text

    def text_ids(self, text: str, finish_reason: Optional[str], before: Optional[list[int]] = None,
                 eos_token_id: Optional[int] = None) -> list[int]:
        """An answer's token ids from its text (after the ids ``before`` it): the text tokenized, then
        the EOS where the server stopped at one (rm_runner sends no stop strings: its ``stop`` is an EOS)."""
        ids = self.encode(text)
        eos = eos_token_id if eos_token_id is not None else self.eos_token_id
        if finish_reason == "stop" and eos is not None and ((before or []) + ids)[-1:] != [eos]:
            ids.append(eos)
        return ids


class StreamedText:
    """One row's token ids from the text fragments a server streams without naming token ids.

    A fragment tokenized alone is not the text's tokenization (a word split over fragments, a
    character split over tokens), so the fragments are joined and the text is tokenized again.
    Ids are handed out once text to come can no longer change them: they lie before the last
    piece the pre-tokenizer splits the text into (a merge never crosses pieces, and only the last
    piece can still grow), and splitting there tokenizes the same. Only the text after what was
    handed out is tokenized again (a long answer costs linear time, not quadratic). ``finish``
    hands out the rest: the row's ids are then the tokenization of its whole text.
    """

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.text = ""
        self.base = 0  # characters of ``text`` that ``emitted`` stands for
        self.emitted: list[int] = []

    def add(self, fragment: str) -> list[int]:
        if not fragment:
            return []
        self.text += fragment
        window = self.text[self.base:]
        pieces = self.model.pieces(window)
        if len(pieces) < 2 and any(c.isspace() for c in window.strip()):
            # no pre-tokenizer, or one that does not split (SentencePiece's Metaspace): tokens do not
            # cross the start of a run of whitespace there
            starts = [i for i in range(1, len(window)) if window[i].isspace() and not window[i - 1].isspace()]
            cut = starts[-1] if starts else 0
        else:
            cut = pieces[-1][1][0] if len(pieces) >= 2 else 0
        if cut <= 0:
            return []
        head, tail = self.model.encode(window[:cut]), self.model.encode(window[cut:])
        if not head or head + tail != self.model.encode(window):
            return []  # the tokenizer splits differently there (a special token, a merge across): wait
        self.base += cut
        self.emitted += head
        return head

    def finish(self, finish_reason: Optional[str], eos_token_id: Optional[int] = None) -> list[int]:
        """The rest of the row's ids once its text is complete."""
        rest = self.model.text_ids(self.text[self.base:], finish_reason, self.emitted, eos_token_id)
        if self.emitted + self.model.encode(self.text[self.base:]) != self.model.encode(self.text):
            log.warning("device=remote: a streamed row's tokens changed after they were handed out; its text "
                        "is unchanged, its token ids are not the tokenization of the whole text")
        self.emitted += rest
        return rest


class OpenAIClient:
    """The executor for an OpenAI-compatible server: ``prepare_model`` picks the served model and
    learns what the server takes, ``generate`` sends each row as its own completion request."""

    def __init__(self, endpoint: OpenAIEndpoint) -> None:
        self.endpoint = endpoint
        self.dialect: Optional[Dialect] = None

    def describe(self) -> dict[str, Any]:
        return self.dialect.describe() if self.dialect is not None else {}

    def close(self) -> None:
        """Nothing held between requests (each ``prepare_model`` makes its client)."""

    def prepare_model(self, model: Any, model_config: Any) -> ServedModel:
        """Pick the served model and learn what the server takes; the local copy (``model``)
        provides the tokenizer only."""
        from transformers import AutoTokenizer, GenerationConfig

        client = openai_client(self.endpoint)
        try:
            served = [m.id for m in client.models.list().data]
        except Exception as exc:  # it answered availability() a moment ago
            raise DeviceUnavailableError(f"{self.endpoint.base_url} did not answer GET /models: {exc}") from exc
        if not served:
            raise DeviceUnavailableError(f"{self.endpoint.base_url} serves no model yet (GET /models lists none)")
        name = self.endpoint.model or served[0]
        if name not in served:
            key = f"{self.endpoint.section}.model"
            raise ConfigError(f"{key}={name!r} is not served at {self.endpoint.base_url}; it serves: "
                              f"{', '.join(served)}. Set {key} to one of them (or null for the first)")
        path = str(model if isinstance(model, (str, Path)) else model.name_or_path)
        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer knows
            eos = None
        tokenizer = AutoTokenizer.from_pretrained(path)
        eos = eos if eos is not None else tokenizer.eos_token_id
        handle = ServedModel(client=client, served_name=name, tokenizer=tokenizer,
                             eos_token_id=eos[0] if isinstance(eos, list) and eos else eos)
        handle.dialect = self.dialect = self._ask_dialect(handle)
        log.info("%s: %s", self.endpoint.base_url, self.dialect.describe())
        return handle

    def _ask_dialect(self, model: ServedModel) -> Dialect:
        """What the server takes: the preferred request form first, each asked with a 1-token request."""
        import openai

        extensions, prompts = self.endpoint.openai_extensions, self.endpoint.token_prompts
        if extensions is True:  # a vLLM server: no need to ask
            return Dialect(True, prompts is not False, True)
        if extensions is False and prompts != "auto":  # nothing left to ask
            return Dialect(False, prompts, False)
        preferred = ((True, True), (False, True), (True, False), (False, False))  # (extensions, token prompts)
        forms = [(e, p) for e, p in preferred if extensions in ("auto", e) and prompts in ("auto", p)]
        probe_ids = model.encode("Hello")[:1] or [0]
        refused: list[str] = []
        for ext, ids in forms:
            form = f"{'with' if ext else 'without'} vLLM's extensions, prompt as {'token ids' if ids else 'text'}"
            request = dict(model=model.served_name, prompt=probe_ids if ids else "Hello", max_tokens=1, temperature=0.0)
            if ext:
                request["extra_body"] = {"return_token_ids": True, "skip_special_tokens": False, "ignore_eos": False,
                                         "top_k": -1}
            try:
                response = model.client.completions.create(**request)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                refused.append(f"{form}: {exc.status_code} {_server_message(exc)}")
                continue
            except openai.APIConnectionError as exc:
                raise DeviceUnavailableError(f"{self.endpoint.base_url} did not answer POST /completions: {exc}") from exc
            except openai.APIStatusError as exc:
                raise RunnerError(f"{self.endpoint.base_url}: POST /completions ({form}) answered {exc.status_code} "
                                  f"{_server_message(exc)}") from exc
            returns_ids = ext and bool(response.choices) and _named_ids(response.choices[0]) is not None
            return Dialect(ext, ids, returns_ids, "; ".join(refused))
        raise RunnerError(f"{self.endpoint.base_url} refused every request form rm_runner can send "
                          f"({self.endpoint.section}.openai_extensions={_switch(extensions)}, "
                          f"{self.endpoint.section}.token_prompts={_switch(prompts)}): "
                          + "; ".join(refused))

    def openai_endpoint(self, model: ServedModel) -> tuple[str, str, str]:
        """(base URL, served model name, API key): what a load generator needs to reach the server."""
        return self.endpoint.base_url, model.served_name, api_key(self.endpoint)

    def streams(self, model: Any) -> bool:
        """The server streams tokens (vLLM's ``return_token_ids`` names them; otherwise they come from
        its joined text), so rows can be followed step by step and cancelled early."""
        return isinstance(model, ServedModel)

    def check(self, model: ServedModel, sampling: SamplingParams) -> None:
        """Refuse what a server without vLLM's extensions cannot be asked for, naming the field
        (``UnsupportedSampling``: a run's ConfigError, the API's 400)."""
        if model.dialect.extensions:
            return
        why = (f"{self.endpoint.base_url} does not take vLLM's request extensions "
               f"({self.endpoint.section}.openai_extensions={_switch(self.endpoint.openai_extensions)}"
               + (f"; it answered {model.dialect.refused}" if model.dialect.refused else "") + ")")
        if sampling.top_k:
            raise UnsupportedSampling("top_k", why, f"generation.top_k={sampling.top_k}: top_k is a vLLM extension and "
                                      f"{why}. Set generation.top_k=null, or use a server that takes vLLM's extensions")
        if sampling.ignore_eos:
            raise UnsupportedSampling("ignore_eos", why, f"generation.ignore_eos=true: ignore_eos is a vLLM extension "
                                      f"and {why}. Set generation.ignore_eos=false, or use a server that takes vLLM's "
                                      "extensions")
        asked = [name for name in VLLM_SAMPLING if name in sampling.changed()]
        if asked:
            raise UnsupportedSampling(asked[0], why, f"{', '.join(asked)}: vLLM sampling extensions, and {why}; leave "
                                      "them out, or use a server that takes vLLM's extensions")

    @staticmethod
    def _request(model: ServedModel, prompt_ids: tuple[int, ...], max_tokens: int, sampling: SamplingParams,
                 stream: bool) -> dict[str, Any]:
        """One row as an OpenAI completion request: OpenAI's own fields, vLLM's where the server takes them."""
        own, extensions = sampling.openai_fields()
        extra: dict[str, Any] = {}
        if model.dialect.extensions:  # a server without them was refused these settings (check)
            extra.update(return_token_ids=True, skip_special_tokens=False, **extensions)
        request = dict(model=model.served_name, prompt=model.prompt(list(prompt_ids)), max_tokens=max_tokens,
                       stream=stream, **own)
        if extra:
            request["extra_body"] = extra
        return request

    def _complete(self, model: ServedModel, request: GenerationRequest, row: int) -> list[int]:
        body = self._request(model, request.prompts[row], request.max_new_tokens[row], request.sampling, False)
        choice = model.client.completions.create(**body).choices[0]
        ids = _named_ids(choice)
        return ids if ids is not None else model.text_ids(choice.text or "", choice.finish_reason)

    def _stream_rows(self, model: ServedModel, request: GenerationRequest, on_step: OnStep) -> list[list[int]]:
        """Every row as its own streamed request, read a step (each running row's next token) at
        a time; a row ``on_step`` finishes is closed, which ends it on the server too. A server that
        names no token ids stops at EOS itself, and that stop is handed on as the EOS."""
        import queue

        rows = len(request.prompts)
        eos = request.end_ids[0] if request.end_ids else None
        queues: list[queue.Queue] = [queue.Queue() for _ in range(rows)]
        stop = [threading.Event() for _ in range(rows)]

        def follow(row: int) -> None:
            text = StreamedText(model)  # where the server names no token ids
            named_any, finish = False, None
            try:
                body = self._request(model, request.prompts[row], request.max_new_tokens[row], request.sampling, True)
                stream = model.client.completions.create(**body)
                with stream:
                    for chunk in stream:
                        for choice in chunk.choices:
                            named = _named_ids(choice)
                            named_any = named_any or named is not None
                            for token in named if named is not None else text.add(choice.text or ""):
                                queues[row].put(token)
                            finish = choice.finish_reason or finish
                        if stop[row].is_set():
                            return
                for token in [] if named_any else text.finish(finish, eos):
                    queues[row].put(token)
            except Exception as exc:  # handed to the stepping thread
                queues[row].put(exc)
            finally:
                queues[row].put(None)

        def steps() -> Iterator[list[Optional[int]]]:
            while not all(event.is_set() for event in stop):
                step: list[Optional[int]] = []
                for row in range(rows):
                    token = None if stop[row].is_set() else queues[row].get()
                    if isinstance(token, Exception):
                        if isinstance(token, RunnerError):
                            raise token
                        raise RunnerError(f"{self.endpoint.base_url}: streaming failed: {token}") from token
                    if token is None:
                        stop[row].set()  # ended by the server (or stopped before): nothing more to read
                    step.append(token)
                yield step

        for row in range(rows):
            threading.Thread(target=follow, args=(row,), daemon=True).start()
        try:
            return follow_steps(steps(), rows, on_step, request.pad_token_id, on_stop=lambda row: stop[row].set())
        finally:
            for event in stop:
                event.set()

    def generate(self, model: Any, request: GenerationRequest, on_step: Optional[OnStep] = None) -> list[list[int]]:
        """Each row as its own request, ``max_concurrency`` at a time (streamed where ``on_step``
        follows it); the server stops rows at EOS itself."""
        self.check(model, request.sampling)
        if on_step is not None:
            return self._stream_rows(model, request, on_step)
        with ThreadPoolExecutor(max_workers=self.endpoint.max_concurrency) as pool:
            return list(pool.map(lambda row: self._complete(model, request, row), range(len(request.prompts))))


def _named_ids(choice: Any) -> Optional[list[int]]:
    """A choice's token ids as the server names them (vLLM's ``token_ids``); None where it names none."""
    ids = getattr(choice, "token_ids", None)
    if ids is None:
        ids = (choice.model_extra or {}).get("token_ids")
    return None if ids is None else list(ids)


def _server_message(exc: Any) -> str:
    """The message inside an OpenAI-shaped error body, else the client's own words."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message) if not isinstance(message, list) else "; ".join(map(str, message))
    return str(getattr(exc, "message", exc))


def _switch(value: Switch) -> str:
    return value if isinstance(value, str) else str(value).lower()


class Passthrough:
    """Requests handed as they are to the OpenAI-compatible server behind an engine, for what only
    that server can answer (logprobs, echo: rm_runner's own batcher runs whole batches through a
    server's engine, which hands back tokens only). vLLM answers them as it documents them; the
    served model's name is put back in each answer."""

    def __init__(self, endpoint: OpenAIEndpoint, served_name: str) -> None:
        self.endpoint, self.served_name = endpoint, served_name

    async def send(self, path: str, body: dict[str, Any], model: str) -> tuple[int, Any]:
        """POST ``body`` (``model`` in it swapped for the server's name) to ``path`` (``/completions``):
        (status, the answer's JSON), or for a streamed body (status, an async iterator of SSE
        lines). A server that does not answer is a 502 in OpenAI's error shape."""
        import httpx

        client = httpx.AsyncClient(base_url=self.endpoint.base_url, timeout=self.endpoint.timeout_s,
                                   headers={"Authorization": f"Bearer {api_key(self.endpoint)}"})
        request = client.build_request("POST", path, json={**body, "model": self.served_name})
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await client.aclose()
            return 502, {"error": {"message": f"{self.endpoint.base_url} did not answer: {exc}",
                                   "type": "bad_gateway", "param": None, "code": None}}
        if not body.get("stream") or response.status_code != 200:
            try:
                await response.aread()
                return response.status_code, self._named(response.json(), model)
            finally:
                await response.aclose()
                await client.aclose()

        async def lines() -> Any:
            import json

            try:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        line = "data: " + json.dumps(self._named(json.loads(line[6:]), model))
                    yield line + "\n"
            finally:
                await response.aclose()
                await client.aclose()

        return 200, lines()

    def _named(self, answer: Any, model: str) -> Any:
        if isinstance(answer, dict) and answer.get("model") == self.served_name:
            answer["model"] = model
        return answer
