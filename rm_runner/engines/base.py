"""The serving-engine interface: how a pipeline reaches a model, in-process or over a server."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

from rm_runner.backends.base import Availability, OnStep
from rm_runner.config import GenerationConfig, ModelConfig
from rm_runner.errors import ConfigError
from rm_runner.requests import Completion, GenerationRequest, Request, SamplingParams, TokenLogprob


class Executor(Protocol):
    """What runs a ``GenerationRequest`` for an engine: a device backend in this process, or a
    server's client (Triton's, TorchServe's)."""

    def prepare_model(self, model: Any, model_config: Any) -> Any: ...

    def generate(self, model: Any, request: GenerationRequest, on_step: Optional[OnStep] = None) -> list[list[int]]:
        """Each row's new tokens; ``on_step`` is given only where ``streams`` (see ``Backend.generate``)."""
        ...

    def streams(self, model: Any) -> bool: ...


@runtime_checkable
class ServerClient(Executor, Protocol):
    """An executor that reaches a server (Triton's, TorchServe's, an OpenAI-compatible one's client)."""

    def close(self) -> None:
        """Let go of open connections (some servers wait for them before they exit)."""
        ...


class Engine(ABC):
    """What the pipeline steps, the API and the benchmarks use of an engine; once ``load_model``
    has run, ``tokenizer`` (the model's, for rendering prompts and decoding), ``eos_ids`` (the
    tokens that end a sequence) and ``max_model_len`` (prompt plus output, in tokens; what sets it
    in ``max_model_len_option``, for errors) are set."""

    name: ClassVar[str]
    tokenizer: Any = None
    eos_ids: set[int] = frozenset()  # type: ignore[assignment]
    max_model_len: int = 0
    max_model_len_option: str = "model.max_model_len"
    # Where a server's own logs go: the run directory (set by the runner before start()).
    log_dir: Path | None = None
    # The distributions this engine's environment needs; the doctor shows their versions there.
    packages: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_environment(cls, python: str, backend_cls: type) -> Availability:
        """Can this engine serve ``backend_cls``'s device with the interpreter ``python`` (its
        ``engine.python``)? Cheap, loads nothing; ``start`` fails with the same words."""
        return Availability(True)

    @abstractmethod
    def start(self) -> None:
        """Bring the engine up (claim the device, or start and wait for a server)."""

    @abstractmethod
    def load_model(self, path: Path, config: ModelConfig) -> None:
        """Make the model at ``path`` (a local directory) ready to serve."""

    @abstractmethod
    def infer(self, requests: list[Request], generation: GenerationConfig) -> list[Completion]:
        """Complete every request, in order."""

    def request(self, prompts: list[list[int]], max_new_tokens: Any,
                sampling: SamplingParams = SamplingParams()) -> GenerationRequest:
        """A ``GenerationRequest`` for this engine's model (its EOS and pad ids filled in);
        ``max_new_tokens`` one int for every row or one per row."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return GenerationRequest.of(prompts, max_new_tokens, sampling, self.eos_ids, pad)

    @abstractmethod
    def generate_steps(self, request: GenerationRequest, on_step: OnStep) -> None:
        """The streaming form: generate ``request``, handing each decoding step's new token per
        row to ``on_step``, which answers which rows are finished."""

    def running_batch(self) -> Any:
        """A ``RunningBatch`` of the loaded model (rows that join and leave between decode steps:
        continuous batching), or None where this engine runs whole batches only."""
        return None

    @abstractmethod
    def streams(self) -> bool:
        """True when ``generate_steps`` delivers tokens as they are made (not all at the end)."""

    def score(self, prompts: list[list[int]], top: int = 1) -> list[list[Optional[TokenLogprob]]]:
        """Each prompt token's log-probability given the tokens before it (None for the first), with
        the ``top`` likeliest tokens there (what a loglikelihood needs: an evaluation's). A
        ConfigError where this engine hands back tokens only."""
        raise ConfigError(f"engine={self.name} hands back generated tokens only, no log-probabilities of a given "
                          "text (loglikelihood tasks need them): use engine=local on device=cpu or gpu (pytorch "
                          "mode), or generate_until tasks only")

    def check_sampling(self, sampling: SamplingParams) -> None:
        """Refuse, before any work, settings this engine cannot honour (a ConfigError naming the
        field: ``errors.UnsupportedSampling``); by default every one is taken."""

    def passthrough(self) -> Any:
        """An ``openai_client.Passthrough`` to the server behind this engine where it answers what
        rm_runner's batcher cannot (logprobs: a vLLM server), else None."""
        return None

    def openai_endpoint(self) -> tuple[str, str, str] | None:
        """(base URL, model, API key) when the model is reached through an OpenAI-compatible server."""
        return None

    @abstractmethod
    def stop(self) -> None:
        """Release everything ``start`` took; safe to call twice and after a failed start."""

    @abstractmethod
    def health(self) -> bool:
        """True when the engine can take requests."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}
