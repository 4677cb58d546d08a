"""OpenAI request and response shapes (the subset rm_runner serves), checked by pydantic.

Requests are strict: a string where a number belongs is a 422 naming the field, not a silent
conversion (an integral number such as ``1.0`` is an integer, as JSON Schema has it); a value
outside its bounds (which the served OpenAPI spec states) is a 400 naming the field. A field
this server does not know is a 400 naming it, as OpenAI answers (``extra="forbid"``), so nothing
a client asks for is silently ignored. Fields OpenAI defines that rm_runner cannot honour are
accepted at their no-op values only: their schema lists just those (``noop``), so the served
OpenAPI spec says so too, and any other value is a 400 naming the field. The vLLM extensions
rm_runner serves are ``EXTENSIONS``; with ``server.openai_extensions=false`` they are unknown
fields as on OpenAI's own API.

logprobs are vLLM's: completions ``logprobs`` (0..20 alternatives per token) with ``echo``
(the prompt, and with ``logprobs`` its tokens' logprobs, before the answer; ``max_tokens: 0``
with ``echo`` answers the prompt alone), chat ``logprobs`` with ``top_logprobs`` (0..20).

The tokenizer routes (``/tokenize``, ``/detokenize``, ``/tokenizer_info``) are vLLM's, with its
request shapes (``TokenizeCompletionRequest``, ``TokenizeChatRequest``, ``DetokenizeRequest``)
held as strictly as the rest.

The response models describe the answers for the OpenAPI spec; the handlers build the answers
as plain dicts (no validation on the way out).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

# vLLM's bounds for a seed (a 64-bit signed integer, what torch.manual_seed and engines take).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

# The vLLM request extensions this server honours: unknown fields when server.openai_extensions=false.
EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
              "include_stop_str_in_output", "skip_special_tokens", "return_token_ids", "use_beam_search")


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def integer(**bounds: int) -> Any:
    """The type of an integer field with its bounds (in the schema as minimum/maximum): an
    integral number (``1.0``) is that integer, as in JSON Schema; ``1.5`` and ``"1"`` are not."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


def noop(*values: Any, default: Any = None) -> Any:
    """A field this server honours only at ``values`` (its no-op defaults): the schema admits just
    those, and ``SamplingRequest.unsupported`` names the field when it holds anything else."""
    return Field(default, json_schema_extra={"enum": list(values)})


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    """What completions and chat share: sampling, limits, streaming."""

    model: str
    max_tokens: Optional[integer(ge=1)] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: integer(ge=1, le=128) = 1
    stop: Optional[Union[str, Annotated[list[str], Field(max_length=4)]]] = None
    seed: Optional[integer(ge=SEED_MIN, le=SEED_MAX)] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    presence_penalty: Optional[float] = noop(None, 0)
    frequency_penalty: Optional[float] = noop(None, 0)
    logit_bias: Optional[dict[str, float]] = noop(None, {})
    # vLLM's extensions (EXTENSIONS).
    top_k: Optional[integer(ge=-1, le=2**31 - 1)] = None  # -1 or 0: off
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=10)  # 1: off; tiny ones overflow the logits
    min_tokens: integer(ge=0) = 0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[integer(ge=0)]] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool = False
    use_beam_search: bool = noop(False, default=False)

    def unsupported(self) -> Optional[str]:
        """The first field set to something this server cannot do, or None."""
        return beyond_noop(self)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# vLLM's --max-logprobs default, and OpenAI's bound on chat's top_logprobs.
MAX_LOGPROBS = 20


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[integer()], list[list[integer()]]]
    # 0 only with echo: the prompt alone (vLLM's echo without generation).
    max_tokens: Optional[integer(ge=0)] = None
    echo: Optional[bool] = False
    best_of: Optional[integer()] = noop(None, 1)
    suffix: Optional[str] = noop(None, "")
    logprobs: Optional[integer(ge=0, le=MAX_LOGPROBS)] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str = noop("text", default=...)
    text: Optional[str] = None


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    refusal: Optional[str] = noop(None)
    tool_calls: Optional[list[Any]] = noop(None, [])
    tool_call_id: Optional[str] = noop(None)
    function_call: Optional[dict[str, Any]] = noop(None)
    audio: Optional[dict[str, Any]] = noop(None)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[integer(ge=1)] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[integer(ge=0, le=MAX_LOGPROBS)] = None
    tools: Optional[list[Any]] = noop(None, [])
    tool_choice: Optional[Union[str, dict[str, Any]]] = noop(None, "none")
    parallel_tool_calls: Optional[bool] = noop(None, True)
    functions: Optional[list[Any]] = noop(None, [])
    function_call: Optional[Union[str, dict[str, Any]]] = noop(None, "none")
    response_format: Optional[dict[str, Any]] = noop(None, {"type": "text"})
    modalities: Optional[list[str]] = noop(None, ["text"])
    audio: Optional[dict[str, Any]] = noop(None)
    prediction: Optional[dict[str, Any]] = noop(None)
    reasoning_effort: Optional[str] = noop(None)
    verbosity: Optional[str] = noop(None)
    web_search_options: Optional[dict[str, Any]] = noop(None)
    store: Optional[bool] = noop(None, False)
    service_tier: Optional[str] = noop(None, "auto", "default")
    # Bookkeeping that does not change the answer.
    metadata: Optional[dict[str, str]] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None

    def unsupported(self) -> Optional[str]:
        return messages_unsupported(self.messages) or super().unsupported()

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: role and plain-text content."""
        return conversation(self.messages)


def messages_unsupported(messages: list[ChatMessage]) -> Optional[str]:
    """The first message field set to something this server cannot do (``messages[i].field``), or None."""
    for i, message in enumerate(messages):
        parts = message.content if isinstance(message.content, list) else []
        field = "content" if any(beyond_noop(p) for p in parts) else beyond_noop(message)
        if field is not None:
            return f"messages[{i}].{field}"
    return None


def conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template takes them: role and plain-text content."""
    out = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(p.text or "" for p in content)
        out.append({"role": "system" if message.role == "developer" else message.role, "content": content or ""})
    return out


class TokenizeCompletionRequest(Strict):
    """vLLM's ``/tokenize`` of a plain prompt."""

    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True  # the tokenizer's own (BOS, ...), as a completion prompt gets them
    return_token_strs: Optional[bool] = False


class TokenizeChatRequest(Strict):
    """vLLM's ``/tokenize`` of a conversation, through the model's chat template."""

    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # on top of what the template writes (vLLM: leave it off)
    return_token_strs: Optional[bool] = False

    def unsupported(self) -> Optional[str]:
        return messages_unsupported(self.messages)


def _tokenize_kind(body: Any) -> str:
    return "TokenizeChatRequest" if isinstance(body, dict) and "messages" in body else "TokenizeCompletionRequest"


# One body or the other, by whether it has ``messages`` (a body with both is refused as the chat
# form with an unknown ``prompt``); the tags are the class names, which error paths leave out.
TokenizeRequest = Annotated[
    Union[Annotated[TokenizeCompletionRequest, Tag("TokenizeCompletionRequest")],
          Annotated[TokenizeChatRequest, Tag("TokenizeChatRequest")]],
    Discriminator(_tokenize_kind),
]


class DetokenizeRequest(Strict):
    model: Optional[str] = None
    tokens: list[integer(ge=0)]


def beyond_noop(model: BaseModel) -> Optional[str]:
    """The first of ``model``'s ``noop`` fields that holds a value other than its no-op ones."""
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and "enum" in extra and getattr(model, name) not in extra["enum"]:
            return name
    return None


# The answers, for the OpenAPI spec.

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    """OpenAI's error shape, which the official clients parse into their exception classes."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    """vLLM's (and OpenAI's legacy) completion logprobs: per token its text alone, its logprob
    (None for a prompt's first token, which has no context), the chosen token and the top
    alternatives by text, and where its text starts (the sum of the lengths before it)."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: FinishReason
    prompt_token_ids: Optional[list[int]] = None  # with return_token_ids
    token_ids: Optional[list[int]] = None  # with return_token_ids


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]]  # the token's text in UTF-8


class TokenLogprobContent(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: Optional[list[TokenLogprobContent]]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: FinishReason
    token_ids: Optional[list[int]] = None  # with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: Optional[list[int]] = None  # with return_token_ids


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None  # with return_token_strs: the vocabulary's pieces


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """vLLM's ``/tokenizer_info``: the tokenizer's configuration (its ``tokenizer_config.json``
    settings, file paths left out), its class and chat template."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    chat_template: Optional[str] = None
    model_max_length: Optional[int] = None
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    pad_token: Optional[str] = None
    unk_token: Optional[str] = None


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
