"""OpenAI request and response shapes (the subset rm_runner serves), checked by pydantic.

Requests are strict: a string where a number belongs is a 422 naming the field, not a silent
conversion. Fields OpenAI defines but rm_runner cannot honour are accepted only at their
no-op values, so a client never gets an answer computed differently from what it asked.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What completions and chat share: sampling, limits, streaming."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)  # vLLM's extension; -1 or 0: off
    n: int = Field(1, ge=1, le=128)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False  # vLLM's extension
    user: Optional[str] = None
    # Accepted at their defaults only (see ``unsupported``).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    logprobs: Optional[Any] = None

    def unsupported(self) -> Optional[str]:
        """The first field set to something this server cannot do, or None."""
        checks = {
            "presence_penalty": self.presence_penalty == 0,
            "frequency_penalty": self.frequency_penalty == 0,
            "logit_bias": not self.logit_bias,
            "logprobs": self.logprobs in (None, False, 0),
        }
        return next((name for name, ok in checks.items() if not ok), None)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> Optional[str]:
        if self.echo:
            return "echo"
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        if self.suffix:
            return "suffix"
        return super().unsupported()


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None

    def unsupported(self) -> Optional[str]:
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list) and any(p.type != "text" for p in message.content):
                return f"messages[{i}].content"
        return super().unsupported()

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: role and plain-text content."""
        out = []
        for message in self.messages:
            content = message.content
            if isinstance(content, list):
                content = "".join(p.text or "" for p in content)
            out.append({"role": "system" if message.role == "developer" else message.role, "content": content or ""})
        return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    """OpenAI's error shape, which the official clients parse into their exception classes."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
