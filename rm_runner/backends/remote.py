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
from typing import Any, Optional

from rm_runner.backends.base import Availability, Backend, BackendOptions
from rm_runner.backends.hf_form import generate_output, prompt_token_lists
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

    def _client(self) -> Any:
        from openai import OpenAI

        key = os.environ.get(self.options.api_key_env) or "EMPTY"
        return OpenAI(base_url=self.options.base_url, api_key=key, timeout=self.options.timeout_s, max_retries=0)

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
        return self.options.base_url, model.served_name, os.environ.get(self.options.api_key_env) or "EMPTY"

    def _complete(self, model: RemoteModel, prompt_ids: list[int], kwargs: dict[str, Any]) -> list[int]:
        sample = bool(kwargs.get("do_sample"))
        extra: dict[str, Any] = {"return_token_ids": True, "skip_special_tokens": False}
        if "eos_token_id" in kwargs and kwargs["eos_token_id"] is None:
            extra["ignore_eos"] = True
        if sample and kwargs.get("top_k"):
            extra["top_k"] = kwargs["top_k"]
        response = model.client.completions.create(
            model=model.served_name, prompt=prompt_ids, max_tokens=kwargs.get("max_new_tokens", 16),
            temperature=(kwargs.get("temperature") or 1.0) if sample else 0.0,
            top_p=(kwargs.get("top_p") or 1.0) if sample else 1.0, seed=kwargs.get("seed"), extra_body=extra,
        )
        choice = response.choices[0]
        ids = getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids")
        if ids is None:  # a server that returns text only
            ids = model.tokenizer(choice.text, add_special_tokens=False)["input_ids"]
        return list(ids)

    def execute(self, model: Any, inputs: dict[str, Any], method: str = "generate", **kwargs: Any) -> Any:
        if method == "forward":
            raise RunnerError("device=remote returns tokens, not logits")
        prompts = prompt_token_lists(inputs)
        with ThreadPoolExecutor(max_workers=self.options.max_concurrency) as pool:
            new = list(pool.map(lambda p: self._complete(model, p, kwargs), prompts))
        pad = kwargs.get("pad_token_id")
        return generate_output(inputs["input_ids"], new, pad if pad is not None else model.tokenizer.pad_token_id or 0)

    def cleanup(self) -> None:
        """Nothing to release: the server is not ours."""
