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
