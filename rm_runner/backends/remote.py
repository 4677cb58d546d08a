"""Remote backend: any OpenAI-compatible endpoint (vLLM, TGI, a hosted API) that rm_runner did not start.

Prompts go out as token ids to ``/v1/completions`` through the official ``openai`` client;
the generated token ids come back from servers that return them (vLLM's
``return_token_ids``) and are re-tokenized from the text otherwise. The API key is read
from an environment variable and never written anywhere.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from rm_runner.backends.base import Availability, Backend, BackendOptions
from rm_runner.backends.hf_form import follow_steps, generate_output, prompt_token_lists
from rm_runner.errors import DeviceUnavailableError, RunnerError

log = logging.getLogger(__name__)


@dataclass
class RemoteOptions(BackendOptions):
    base_url: str = "http://127.0.0.1:8000/v1"
    # The served model name; null takes the first one the server lists.
    model: Optional[str] = None
    # Name of the environment variable holding the API key (never the key itself).
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    max_concurrency: int = 8


@dataclass
class RemoteModel:
    client: Any
    served_name: str
    tokenizer: Any


class RemoteBackend(Backend):
    name = "remote"
    priority = 0
    options_class = RemoteOptions
    packages = ("openai",)

    @classmethod
    def is_available(cls) -> Availability:
        if importlib.util.find_spec("openai") is None:
            return Availability(False, "the openai client is not installed", "pip install openai")
        return Availability(True)

    def availability(self) -> Availability:
        found = self.is_available()
        if not found:
            return found
        try:
            self._client().models.list()
        except Exception as exc:  # connection refused, timeouts, auth: the client's own words
            return Availability(False, f"{self.options.base_url} did not answer GET /models: {exc}",
                                "start the server, or set device.base_url to where it listens")
        return found

    def _api_key(self) -> str:
        return os.environ.get(self.options.api_key_env) or "EMPTY"

    def _client(self) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.options.base_url, api_key=self._api_key(), timeout=self.options.timeout_s,
                      max_retries=0)

    def initialize(self) -> None:
        log.info("remote backend: %s", self.options.base_url)

    def prepare_model(self, model: Any, model_config: Any) -> RemoteModel:
        """Pick the served model; the local copy (``model``) provides the tokenizer only."""
        from transformers import AutoTokenizer

        client = self._client()
        served = [m.id for m in client.models.list().data]
        name = self.options.model or (served[0] if served else None)
        if name is None or name not in served:
            raise DeviceUnavailableError(
                f"device.model={name!r} is not served at {self.options.base_url}; it serves: {', '.join(served)}"
            )
        path = model if isinstance(model, (str, Path)) else model.name_or_path
        return RemoteModel(client=client, served_name=name, tokenizer=AutoTokenizer.from_pretrained(str(path)))

    def openai_endpoint(self, model: RemoteModel) -> tuple[str, str, str]:
        """(base URL, served model name, API key): what a load generator needs to reach the server."""
        return self.options.base_url, model.served_name, self._api_key()

    def streams(self, model: Any) -> bool:
        """The server streams tokens (vLLM's ``return_token_ids`` names them), so rows can be
        followed step by step and cancelled early."""
        return isinstance(model, RemoteModel)

    @staticmethod
    def _request(model: RemoteModel, prompt_ids: list[int], kwargs: dict[str, Any], stream: bool) -> dict[str, Any]:
        sample = bool(kwargs.get("do_sample"))
        extra: dict[str, Any] = {"return_token_ids": True, "skip_special_tokens": False}
        if "eos_token_id" in kwargs and kwargs["eos_token_id"] is None:
            extra["ignore_eos"] = True
        if sample and kwargs.get("top_k"):
            extra["top_k"] = kwargs["top_k"]
        return dict(model=model.served_name, prompt=prompt_ids, max_tokens=kwargs.get("max_new_tokens", 16),
                    temperature=(kwargs.get("temperature") or 1.0) if sample else 0.0,
                    top_p=(kwargs.get("top_p") or 1.0) if sample else 1.0, seed=kwargs.get("seed"),
                    extra_body=extra, stream=stream)

    @staticmethod
    def _token_ids(model: RemoteModel, choice: Any) -> list[int]:
        """A choice's tokens: as the server names them (vLLM's ``token_ids``), else its text re-tokenized."""
        ids = getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids")
        if ids is None:  # a server that returns text only
            ids = model.tokenizer(choice.text, add_special_tokens=False)["input_ids"] if choice.text else []
        return list(ids)

    def _complete(self, model: RemoteModel, prompt_ids: list[int], kwargs: dict[str, Any]) -> list[int]:
        response = model.client.completions.create(**self._request(model, prompt_ids, kwargs, stream=False))
        return self._token_ids(model, response.choices[0])

    def _stream_rows(self, model: RemoteModel, prompts: list[list[int]], kwargs: dict[str, Any], criteria: Any,
                     pad: int) -> list[list[int]]:
        """Every row as its own streamed request, read a step (each running row's next token) at
        a time; a row the criteria stop is closed, which ends it on the server too."""
        import queue
        import threading

        queues: list[queue.Queue] = [queue.Queue() for _ in prompts]
        stop = [threading.Event() for _ in prompts]

        def follow(row: int) -> None:
            try:
                stream = model.client.completions.create(**self._request(model, prompts[row], kwargs, stream=True))
                with stream:
                    for chunk in stream:
                        for choice in chunk.choices:
                            for token in self._token_ids(model, choice):
                                queues[row].put(token)
                        if stop[row].is_set():
                            return
            except Exception as exc:  # handed to the stepping thread
                queues[row].put(exc)
            finally:
                queues[row].put(None)

        def steps() -> Iterator[list[Optional[int]]]:
            while not all(event.is_set() for event in stop):
                step: list[Optional[int]] = []
                for row in range(len(prompts)):
                    token = None if stop[row].is_set() else queues[row].get()
                    if isinstance(token, Exception):
                        raise RunnerError(f"{self.options.base_url}: streaming failed: {token}") from token
                    if token is None:
                        stop[row].set()  # ended by the server (or stopped before): nothing more to read
                    step.append(token)
                yield step

        for row in range(len(prompts)):
            threading.Thread(target=follow, args=(row,), daemon=True).start()
        try:
            return follow_steps(steps(), len(prompts), criteria, pad, on_stop=lambda row: stop[row].set())
        finally:
            for event in stop:
                event.set()

    def execute(self, model: Any, inputs: dict[str, Any], method: str = "generate", **kwargs: Any) -> Any:
        if method == "forward":
            raise RunnerError("device=remote returns tokens, not logits")
        prompts = prompt_token_lists(inputs)
        criteria = kwargs.pop("stopping_criteria", None)
        pad = kwargs.get("pad_token_id")
        pad = pad if pad is not None else model.tokenizer.pad_token_id or 0
        if criteria is not None:
            return generate_output(inputs["input_ids"], self._stream_rows(model, prompts, kwargs, criteria, pad), pad)
        with ThreadPoolExecutor(max_workers=self.options.max_concurrency) as pool:
            new = list(pool.map(lambda p: self._complete(model, p, kwargs), prompts))
        return generate_output(inputs["input_ids"], new, pad)

    def cleanup(self) -> None:
        """Nothing to release: the server is not ours."""
