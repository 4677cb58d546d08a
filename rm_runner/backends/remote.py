"""Remote backend: any OpenAI-compatible endpoint (vLLM, TGI, a hosted API) that rm_runner did not start.

The device is the server: its options say where it listens and how to talk to it, and engines
reach it through their OpenAI client (``engines/openai_client.py``, which asks the server what it
takes beyond OpenAI's own fields and says what it does with the answer).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Optional

from rm_runner.backends.base import Availability, Backend, BackendOptions, OpenAIEndpoint
from rm_runner.errors import RunnerError

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
    # vLLM's request extensions (return_token_ids, ignore_eos, top_k, ...): auto asks the server once, when the model is
    # prepared, with a 1-token request; true sends them without asking (a vLLM server); false never
    # sends them (OpenAI's own API, and servers as strict).
    openai_extensions: Any = "auto"
    # Prompts as token ids (OpenAI's API defines them; auto: where the server takes them) or, with
    # false, as text decoded with the local tokenizer, which the server tokenizes itself.
    token_prompts: Any = "auto"

    def __post_init__(self) -> None:
        for key in ("openai_extensions", "token_prompts"):
            value = getattr(self, key)
            if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
                value = {"auto": "auto", "true": True, "false": False}[value.lower()]
            if not (value == "auto" or isinstance(value, bool)):
                raise ValueError(f"device.{key} must be auto, true or false, got {value!r}")
            setattr(self, key, value)


class RemoteBackend(Backend):
    """A device that is a server rm_runner did not start: engines reach it through their OpenAI
    client (``engines/openai_client.py``) at ``endpoint()``; nothing runs in this process."""

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
        from rm_runner.engines.openai_client import served_models

        found = self.is_available()
        if not found:
            return found
        try:
            served_models(self.endpoint())
        except Exception as exc:  # connection refused, timeouts, auth: the client's own words
            return Availability(False, f"{self.options.base_url} did not answer GET /models: {exc}",
                                "start the server, or set device.base_url to where it listens")
        return found

    def endpoint(self) -> OpenAIEndpoint:
        o = self.options
        return OpenAIEndpoint(base_url=o.base_url, model=o.model, api_key_env=o.api_key_env, timeout_s=o.timeout_s,
                              max_concurrency=o.max_concurrency, openai_extensions=o.openai_extensions,
                              token_prompts=o.token_prompts, section="device")

    def initialize(self) -> None:
        log.info("remote backend: %s", self.options.base_url)

    def prepare_model(self, model: Any, model_config: Any) -> Any:
        raise RunnerError("device=remote is a server: engines reach it through its OpenAI endpoint, nothing is "
                          "prepared in this process")

    def execute(self, model: Any, inputs: dict[str, Any], method: str = "generate", **kwargs: Any) -> Any:
        raise RunnerError("device=remote runs rm_runner's requests (engines), not generate() keywords or logits")

    def energy_meter(self, model_config: Any) -> Any:
        from rm_runner.benchmark.energy import EnergyUnavailable

        raise EnergyUnavailable("device=remote: the model runs on a server elsewhere, whose meters are not read here")

    def cleanup(self) -> None:
        """Nothing to release: the server is not ours."""
