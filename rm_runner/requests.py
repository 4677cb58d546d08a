"""What flows between workloads, engines and pipeline steps: requests in, completions out."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional


@dataclass
class Request:
    """One prompt: plain text, or a conversation rendered with the model's chat template."""

    id: str
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, str]]] = None
    chat_template: bool = True
    # Token ids sent as they are (synthetic prompts); wins over prompt and messages.
    prompt_ids: Optional[list[int]] = None
    # This request's own output length (ShareGPT, synthetic); None: generation.max_new_tokens.
    max_new_tokens: Optional[int] = None
    # The reply in the source dataset (ShareGPT): its length in the model's tokens becomes
    # max_new_tokens once the tokenizer is loaded (``workload.with_tokenizer``).
    reference_output: Optional[str] = None
    # When the request is sent, in seconds from the start of the pass (a timed trace, replayed by
    # ``benchmark.load.profile=trace``: vLLM bench's trace datasets call it ``timestamp`` too).
    timestamp: Optional[float] = None

    def asked(self) -> Any:
        """What the request asked, in the form the workload gave it (kept in generations.jsonl):
        its messages, its text, or its token ids."""
        if self.messages is not None:
            return self.messages
        return self.prompt if self.prompt_ids is None else list(self.prompt_ids)

    def conversation(self) -> list[dict[str, str]] | None:
        """The messages the chat template renders, or None for a raw completion prompt."""
        if self.messages is not None:
            return self.messages
        if self.chat_template:
            return [{"role": "user", "content": self.prompt or ""}]
        return None


@dataclass
class Completion:
    """One request's result, as written to ``generations.jsonl``."""

    id: str
    prompt: Any
    text: str
    token_ids: list[int]
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    latency_s: float

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probability, as vLLM's ``logprobs`` report it: the chosen (or, for a
    prompt, the given) token's log-probability under the model's raw output (before temperature,
    penalties or top-k/top-p), and the ``top`` most likely tokens there, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# A temperature under this is greedy, as in vLLM: dividing logits by it overflows.
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are picked, named and meant as vLLM's ``SamplingParams``; the no-op value of
    each (temperature 0: greedy; top_p 1, top_k 0, min_p 0, repetition_penalty 1: off) is its
    default. Greedy settings are kept in one form (``__post_init__``), so equal requests compare
    equal and share a batch wherever settings must be equal across it."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS is kept out of the first min_tokens tokens

    def __post_init__(self) -> None:
        checks = {"temperature": self.temperature >= 0, "top_p": 0 < self.top_p <= 1,
                  "top_k": self.top_k >= 0, "min_p": 0 <= self.min_p <= 1,
                  "repetition_penalty": self.repetition_penalty > 0, "min_tokens": self.min_tokens >= 0}
        wrong = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if wrong:
            raise ValueError(f"sampling: {', '.join(wrong)} out of range (temperature >= 0, 0 < top_p <= 1, "
                             "top_k >= 0 (0: off), 0 <= min_p <= 1, repetition_penalty > 0, min_tokens >= 0)")
        if self.greedy:  # what only sampling reads is left at its no-op value
            for name, off in (("temperature", 0.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0), ("seed", None)):
                object.__setattr__(self, name, off)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @classmethod
    def from_generation(cls, generation: Any) -> "SamplingParams":
        """The run's ``generation`` section (Hugging Face's ``do_sample`` switch) in these terms."""
        if not generation.do_sample:
            return cls(ignore_eos=generation.ignore_eos)
        return cls(temperature=generation.temperature, top_p=generation.top_p, top_k=generation.top_k or 0,
                   seed=generation.seed, ignore_eos=generation.ignore_eos)

    def changed(self) -> dict[str, Any]:
        """The settings that differ from their no-op value (what a server must be told)."""
        off = SamplingParams()
        return {k: v for k, v in asdict(self).items() if v != getattr(off, k)}

    def openai_fields(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What an OpenAI-compatible request says of these settings: (OpenAI's own fields, vLLM's
        extensions, for ``extra_body``), each only where it differs from the no-op value, except
        the temperature, always sent (OpenAI's default is 1, not greedy)."""
        changed = self.changed()
        own = {"temperature": self.temperature, **{k: changed[k] for k in ("top_p", "seed") if k in changed}}
        return own, {k: v for k, v in changed.items() if k not in own}


@dataclass(frozen=True)
class GenerationRequest:
    """One batch of rows to generate for, as every engine and executor takes it.

    A row ends at its own ``max_new_tokens``, at one of ``eos_ids`` (kept as its last token)
    unless ``sampling.ignore_eos``, or where the caller's step callback says so. Only the
    executors that call transformers' ``generate()`` or optimum-rbln turn this into keywords and
    padding (``backends/hf_generate.py``); a server's client sends it in its server's terms.
    """

    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    eos_ids: tuple[int, ...] = ()  # the model's end-of-sequence tokens
    pad_token_id: int = 0  # what pads prompts to one width, where an executor pads

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.max_new_tokens):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.max_new_tokens)} max_new_tokens")
        if any(n < 1 for n in self.max_new_tokens):
            raise ValueError(f"max_new_tokens must be >= 1 per row, got {list(self.max_new_tokens)}")

    @classmethod
    def of(cls, prompts: list[list[int]], max_new_tokens: Any, sampling: SamplingParams = SamplingParams(),
           eos_ids: Any = (), pad_token_id: Optional[int] = 0) -> "GenerationRequest":
        """From lists; ``max_new_tokens`` one int for every row or one per row."""
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        return cls(tuple(tuple(p) for p in prompts), tuple(limits), sampling, tuple(sorted(eos_ids)),
                   pad_token_id or 0)

    @property
    def end_ids(self) -> tuple[int, ...]:
        """The tokens that end a row: the EOS ids, none where the request ignores EOS."""
        return () if self.sampling.ignore_eos else self.eos_ids

    def ended(self, row: int, tokens: list[int]) -> list[int]:
        """Row ``row``'s tokens as the request ends them: at its limit, after its first end id
        (none counts before ``sampling.min_tokens``)."""
        tokens = tokens[: self.max_new_tokens[row]]
        ends = set(self.end_ids)
        for i, token in enumerate(tokens):
            if token in ends and i >= self.sampling.min_tokens:
                return tokens[: i + 1]
        return tokens

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "GenerationRequest":
        """What ``to_json`` wrote (a server rebuilds its client's request); unknown fields are an error."""
        data = dict(data)
        sampling = SamplingParams(**data.pop("sampling", {}))
        return cls(prompts=tuple(tuple(p) for p in data.pop("prompts")),
                   max_new_tokens=tuple(data.pop("max_new_tokens")), sampling=sampling,
                   eos_ids=tuple(data.pop("eos_ids", ())), **data)
