"""The OpenAI-compatible app: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (both
with ``stream: true`` as server-sent events ending in ``data: [DONE]``, both with vLLM's logprobs
where the batcher keeps them), vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``
(unless ``server.openai_extensions=false``), ``/health``, ``/metrics``.

Whatever engine the run started sits behind it: handlers render prompts to token ids, check
them against the limits, and hand them to the dynamic batcher, which owns the engine. Every
answer, error or not, is counted and recorded through ``on_record``; every error has OpenAI's
shape, so the official clients raise their usual exception classes. ``/openapi.json`` describes
this server as it runs: its model, its limits, every status a route answers and the error shape.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import reprlib
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from rm_runner.config import GenerationConfig, ServerConfig
from rm_runner.engines.local import render
from rm_runner.errors import ConfigError, UnsupportedSampling
from rm_runner.requests import Request as PromptRequest
from rm_runner.requests import SAMPLING_EPS, SamplingParams, TokenLogprob
from rm_runner.server.batcher import Job, QueueFull, ShuttingDown
from rm_runner.server.continuous import batcher_for
from rm_runner.server.choice import Ending
from rm_runner.server.metrics import ServerMetrics
from rm_runner.server.schemas import (
    EXTENSIONS, SEED_MAX, SEED_MIN, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
    CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse, Health, ModelCard, ModelList,
    SamplingRequest, TokenizeChatRequest, TokenizeCompletionRequest, TokenizeRequest, TokenizeResponse,
    TokenizerInfoResponse, conversation, error_body, new_id, now, usage,
)

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable"}

# The 400s a request that is valid per the served schema can still get: limits that span fields
# or depend on the tokenizer, which a JSON schema cannot state (tests/test_server_schema.py holds
# the server to this list).
CROSS_FIELD_CODES = ("context_length_exceeded", "too_many_sequences", "min_tokens_over_max_tokens",
                     "stream_options_without_stream", "top_logprobs_without_logprobs", "max_tokens_zero_without_echo")

# What each error status means here, for the OpenAPI spec.
STATUS_TEXT = {
    400: "A value outside its bounds, an unknown or unsupported field, malformed JSON, or a prompt over the limits",
    401: "No API key, or the wrong one",
    404: "The model is not served here",
    413: "The body is over server.max_body_bytes",
    422: "The body has the wrong shape: a field of the wrong type, or a required field missing",
    429: "More requests are waiting than server.max_queue",
    500: "The engine failed while generating",
    503: "The server is shutting down",
}
# One server-sent event (OpenAPI 3.1 has an event stream's schema describe each event).
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "description": "A chunk as JSON, an error object, or [DONE]"}}}
STREAM_TEXT = ("With `stream: true`: server-sent events, one `data: <chunk JSON>` line each (OpenAI's chunk "
               "format), ending with `data: [DONE]`; a request the server cuts ends with "
               '`data: {"error": ...}` and `data: [DONE]`.')


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class Served:
    """What the app serves and how: the loaded engine, its name for clients, limits, defaults."""

    engine: Any
    name: str
    settings: ServerConfig
    defaults: GenerationConfig
    max_model_len: int
    api_key: Optional[str] = None


def create_app(served: Served, on_record: Callable[[dict[str, Any]], None] = lambda record: None,
               on_ready: Callable[[], None] = lambda: None) -> FastAPI:
    settings = served.settings
    metrics = ServerMetrics()
    batcher = batcher_for(served.engine, settings, on_batch=metrics.batch_size.observe,
                          on_step=metrics.step_seconds.observe)
    metrics.waiting.set_function(batcher.waiting)
    metrics.running.set_function(batcher.running)
    # The handlers tokenize on the event loop while the batcher decodes on its thread: each gets
    # its own tokenizer, since a fast tokenizer is not safe to share across threads.
    tokenizer = copy.deepcopy(served.engine.tokenizer)
    vocab = len(tokenizer)
    prompt_limit = min(settings.max_prompt_tokens or served.max_model_len, served.max_model_len - 1)
    token_text = TokenText(tokenizer)
    engine_name = getattr(served.engine, "name", type(served.engine).__name__)
    # Where the batcher keeps no logprobs, a server behind the engine that has them (vLLM) answers
    # the requests that ask for them, as they are.
    passthrough = None if batcher.supports_logprobs else served.engine.passthrough()
    has_logprobs = batcher.supports_logprobs or passthrough is not None
    start_token = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), None)
    extensions = settings.openai_extensions

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        on_ready()
        yield
        batcher.close()  # after uvicorn's graceful wait: cancel what is still running

    app = FastAPI(title="rm_runner", version="1", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.batcher = batcher

    def place(scope: dict[str, Any]) -> dict[str, str]:
        """Where a request went: its route's template (the metrics' label: one per route, however
        many paths clients make up; "unmatched" for paths no route takes) and the path itself."""
        route = scope.get("route")
        if route is None:  # not routed yet (the body limit) or no route matched
            route = next((r for r in app.router.routes if r.matches(scope)[0] != Match.NONE), None)
        label = getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"
        return {"route": label, "path": scope.get("path", "")}

    def record(where: dict[str, str], status: int, **fields: Any) -> None:
        entry = {"time": time.time(), **where, "status": status, **fields}
        metrics.observe(entry)
        on_record(entry)

    def error_response(request: Request, status: int, message: str, param: Optional[str] = None,
                       code: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> JSONResponse:
        type_ = ERROR_TYPES.get(status, "invalid_request_error")
        record(place(request.scope), status, error_type=code or type_, error=message)
        return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = invalid_body(exc, place(request.scope)["route"])
        return error_response(request, error.status, error.message, error.param, error.code)

    def invalid_body(exc: RequestValidationError, route: str) -> APIError:
        """The one problem to name: malformed JSON or a body that is no object (400); a field the
        server does not know (400, OpenAI's words); a value outside its bounds (400); else the
        wrong shape (422)."""
        problems = exc.errors()
        first = problems[0]
        if first.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first.get('msg')}", code="json_invalid")
        if any(tuple(p.get("loc", ())) == ("body",) for p in problems):
            return APIError(400, "the request body must be a JSON object with the request's fields "
                                 "(model, prompt or messages, ...)", code="invalid_body")
        body = exc.body if isinstance(exc.body, dict) else {}
        if route == "/tokenize" and "prompt" in body and "messages" in body:
            return APIError(400, "give /tokenize a prompt or messages, not both", param="prompt")
        known = body_model(route, body)
        name = next((k for k in body if known and (k not in known.model_fields or not allowed(k))), None)
        if name is None:
            name = next((path_of(p) for p in problems if p.get("type") == "extra_forbidden"), None)
        if name is not None:
            return unrecognized(name, route)
        problem = next((p for p in problems if not wrong_shape(p)), first)  # a union: the branch that fit
        where = path_of(problem)
        got = "" if problem.get("type") == "missing" else f" (got {reprlib.repr(problem.get('input'))})"
        return APIError(422 if wrong_shape(problem) else 400, f"{where}: {problem.get('msg')}{got}",
                        param=where or None, code=problem.get("type"))

    def allowed(field: str) -> bool:
        return extensions or field not in EXTENSIONS

    def unrecognized(name: str, route: str = "") -> APIError:
        message = f"Unrecognized request argument supplied: {name}"  # OpenAI's own words
        if route in TOKENIZER_ROUTES:
            fields = sorted(set().union(*(m.model_fields for m in TOKENIZER_ROUTES[route])))
            message += f" ({route} takes {', '.join(fields)})"
        elif extensions:
            message += f" (this server takes OpenAI's fields and vLLM's {', '.join(EXTENSIONS)})"
        return APIError(400, message, param=name)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, _TooLarge):  # a chunked body that outgrew the limit while being read
            return error_response(request, 413, _TooLarge.message(settings.max_body_bytes), code="request_too_large")
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; use {(exc.headers or {}).get('Allow')}"
        else:
            message = str(exc.detail)
        return error_response(request, exc.status_code, message, headers=exc.headers)  # 405 keeps its Allow

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes,
                       on_reject=lambda scope: record(place(scope), 413, error_type="request_too_large"))

    async def authorized(request: Request) -> None:
        if served.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise APIError(401, "You didn't provide an API key. Send it as an Authorization header using Bearer "
                                "auth (Authorization: Bearer YOUR_KEY).", code="invalid_api_key")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), served.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    guarded = [Depends(authorized)]

    def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
        """OpenAPI responses: each error status with the error shape (401 only where a key is needed)."""
        return {s: {"model": ErrorResponse, "description": STATUS_TEXT[s]}
                for s in statuses if s != 401 or served.api_key is not None}

    def streamed(model: type) -> dict[int | str, dict[str, Any]]:
        return {200: {"model": model, "description": "The whole answer as JSON. " + STREAM_TEXT,
                      "content": {"text/event-stream": {"schema": SSE_EVENT}}},
                **errors(400, 401, 404, 413, 422, 429, 500, 503)}

    @app.get("/health", responses={200: {"model": Health}, **errors(503)})
    async def health() -> Response:
        if batcher.alive and served.engine.health():
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body("the engine is not ready", "service_unavailable"), status_code=503)

    @app.get("/metrics", dependencies=guarded, responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
        **errors(401)})
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    def model_card() -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": int(metrics.started), "owned_by": "rm_runner",
                "max_model_len": served.max_model_len}

    @app.get("/v1/models", dependencies=guarded, responses={200: {"model": ModelList}, **errors(401)})
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model:path}", dependencies=guarded,
             responses={200: {"model": ModelCard}, **errors(401, 404)})
    async def model(model: str) -> Response:
        check_model(model)
        return JSONResponse(model_card())

    def check_model(name: str) -> None:
        if name != served.name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{served.name}`.",
                           param="model", code="model_not_found")

    def check_tokenizer_request(body: BaseModel) -> None:
        model_name = getattr(body, "model", None)
        if model_name is not None:
            check_model(model_name)
        unsupported = getattr(body, "unsupported", lambda: None)()
        if unsupported is not None:
            raise APIError(400, f"{unsupported} is not supported by this server; leave it at its default",
                           param=unsupported)

    def tokenizer_routes() -> None:
        """vLLM's tokenizer routes: what the served model's tokenizer makes of a prompt or a
        conversation, the text of token ids, and the tokenizer's configuration."""

        @app.post("/tokenize", dependencies=guarded,
                  responses={200: {"model": TokenizeResponse}, **errors(400, 401, 404, 413, 422)})
        async def tokenize(body: TokenizeRequest) -> Response:
            check_tokenizer_request(body)
            if isinstance(body, TokenizeChatRequest):
                text = chat_text(body.messages, body.add_generation_prompt)
            else:
                text = body.prompt
            ids = tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"]
            strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
            return JSONResponse({"count": len(ids), "max_model_len": served.max_model_len, "tokens": ids,
                                 "token_strs": strs})

        @app.post("/detokenize", dependencies=guarded,
                  responses={200: {"model": DetokenizeResponse}, **errors(400, 401, 404, 413, 422)})
        async def detokenize(body: DetokenizeRequest) -> Response:
            check_tokenizer_request(body)
            outside = next((t for t in body.tokens if not 0 <= t < vocab), None)
            if outside is not None:
                raise APIError(400, f"token id {outside} is out of vocabulary (0..{vocab - 1})", param="tokens")
            return JSONResponse({"prompt": tokenizer.decode(body.tokens)})

        info = tokenizer_info(tokenizer)

        @app.get("/tokenizer_info", dependencies=guarded,
                 responses={200: {"model": TokenizerInfoResponse}, **errors(401)})
        async def get_tokenizer_info() -> Response:
            return JSONResponse(info)

    def chat_text(messages: list[Any], add_generation_prompt: bool = True) -> str:
        """A conversation through the model's chat template, as text (400 where it has none or
        its template refuses the messages)."""
        if not tokenizer.chat_template:
            raise APIError(400, f"the model `{served.name}` has no chat template; use /v1/completions",
                           param="messages")
        try:
            return tokenizer.apply_chat_template(conversation(messages), add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)
        except jinja2.TemplateError as exc:
            raise APIError(400, f"the model's chat template refused these messages: {exc}", param="messages") from None

    if extensions:
        tokenizer_routes()

    @app.post("/v1/completions", dependencies=guarded, responses=streamed(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if check_request(body):
            return await passed(body, request, "/completions")
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        ids = []
        for i, p in enumerate(prompt):
            row = p if isinstance(p, list) else render(tokenizer, PromptRequest(id="api", prompt=p,
                                                                                chat_template=False))
            if not row and isinstance(p, str) and start_token is not None:
                row = [start_token]  # nothing to go on: start a new document, as OpenAI does for ""
            if not row:  # refused here, or the batch it would join fails with it
                raise APIError(400, f"prompt {i} has no tokens; a prompt needs at least one", param="prompt")
            outside = next((t for t in row if not 0 <= t < vocab), None)
            if outside is not None:
                raise APIError(400, f"prompt {i}: token id {outside} is out of vocabulary (0..{vocab - 1})",
                               param="prompt")
            ids.append(row)
        # echo: each prompt's text as given (token ids: their text), as vLLM echoes it
        echoed = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompt] if body.echo else None
        return await respond(body, request, ids, chat=False, echoed=echoed)

    @app.post("/v1/chat/completions", dependencies=guarded, responses=streamed(ChatCompletionResponse))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if check_request(body):
            return await passed(body, request, "/chat/completions")
        try:
            ids = render(tokenizer, PromptRequest(id="api", messages=body.conversation()))
        except ConfigError:
            raise APIError(400, f"the model `{served.name}` has no chat template; use /v1/completions",
                           param="messages") from None
        except jinja2.TemplateError as exc:  # a template that refuses a conversation (roles out of order, ...)
            raise APIError(400, f"the model's chat template refused these messages: {exc}", param="messages") from None
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await respond(body, request, [ids], chat=True)

    def check_request(body: SamplingRequest) -> bool:
        """What the body says, before any tokenizing: the model, fields known and supported; True
        when it goes to the server behind the engine as it is (``passthrough``)."""
        check_model(body.model)
        if not extensions:
            name = next((k for k in EXTENSIONS if k in body.model_fields_set), None)
            if name is not None:
                raise unrecognized(name)
        field = body.unsupported()
        if field is not None:
            raise APIError(400, f"{field} is not supported by this server; leave it at its default", param=field)
        for name in ("max_tokens", "max_completion_tokens", "min_tokens"):
            asked = getattr(body, name, None)
            if asked is not None and asked > settings.max_tokens:
                raise APIError(400, f"{name}={asked} is over this server's limit of {settings.max_tokens} "
                                    "(server.max_tokens)", param=name)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options",
                           code="stream_options_without_stream")
        return check_logprobs(body)

    def check_logprobs(body: SamplingRequest) -> bool:
        """vLLM's rules for logprobs, echo and max_tokens=0, and logprobs only where the batcher
        keeps them (one that runs whole batches through the engine gets tokens only) or the server
        behind the engine answers them (True: this request goes there)."""
        if isinstance(body, ChatCompletionRequest):
            if body.top_logprobs and not body.logprobs:
                raise APIError(400, "when using `top_logprobs`, `logprobs` must be set to true", param="top_logprobs",
                               code="top_logprobs_without_logprobs")
            asked = bool(body.logprobs)
        else:
            assert isinstance(body, CompletionRequest)
            if body.max_tokens == 0 and not body.echo:
                raise APIError(400, "max_tokens=0 is only allowed with echo=true (the prompt alone, no completion); "
                                    "ask for at least 1 token", param="max_tokens", code="max_tokens_zero_without_echo")
            asked = body.logprobs is not None
        if asked and not has_logprobs:
            raise APIError(400, f"logprobs are not served here: {LOGPROBS_UNSUPPORTED.format(engine=engine_name)}",
                           param="logprobs", code="logprobs_not_supported")
        return asked and passthrough is not None

    async def passed(body: SamplingRequest, request: Request, path: str) -> Response:
        """The request answered by the server behind the engine (its status and body as they are)."""
        where, began = place(request.scope), time.perf_counter()
        status, answer = await passthrough.send(path, body.model_dump(exclude_unset=True), served.name)
        if status == 200 and body.stream:
            async def relayed() -> AsyncIterator[str]:
                first, ended = None, False

                def done(status: int, **error: Any) -> None:
                    record(where, status, passthrough=True, stream=True, latency_s=round(time.perf_counter() - began, 6),
                           ttft_s=round(first - began, 6) if first else None, **error)

                try:
                    async for line in answer:
                        if line.startswith("data: [DONE]"):  # recorded first: a client may close on it
                            ended = True
                            done(200)
                        first = first or (time.perf_counter() if line.startswith("data: ") else None)
                        yield line
                    if not ended:  # the server behind ended without [DONE]
                        ended = True
                        done(200)
                except Exception as exc:  # the server behind broke off mid-stream
                    ended = True
                    done(502, error_type="upstream_error", error=str(exc))
                    raise
                finally:
                    if not ended:  # the client went away mid-stream
                        done(499, error_type="client_disconnected")

            return StreamingResponse(relayed(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        usage = (answer.get("usage") or {}) if isinstance(answer, dict) else {}
        error = (answer.get("error") or {}) if isinstance(answer, dict) and status >= 400 else {}
        record(where, status, passthrough=True, stream=False, latency_s=round(time.perf_counter() - began, 6),
               prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0),
               **({"error_type": error.get("type") or "upstream_error", "error": error.get("message")} if error else {}))
        return JSONResponse(answer, status_code=status)

    def make_job(body: SamplingRequest, ids: list[list[int]], emit: Callable[[Any], None]) -> Job:
        longest = max(len(p) for p in ids)
        if longest > prompt_limit:
            raise APIError(400, f"the prompt has {longest} tokens; this server takes at most {prompt_limit}",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = min(served.defaults.max_new_tokens, settings.max_tokens, served.max_model_len - longest)
        elif longest + max_tokens > served.max_model_len:
            raise APIError(400, f"This model's maximum context length is {served.max_model_len} tokens. However, "
                                f"you requested {longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} "
                                "for the completion). Reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens={body.min_tokens} is more than max_tokens={max_tokens}; "
                                "ask for at most as many as max_tokens", param="min_tokens",
                           code="min_tokens_over_max_tokens")
        rows = len(ids) * body.n
        if rows > batcher.max_batch_size:
            raise APIError(400, f"{len(ids)} prompt(s) x n={body.n} = {rows} sequences; this server runs at most "
                                f"{batcher.max_batch_size} at once (server.max_batch_size)", param="n",
                           code="too_many_sequences")
        ending = Ending(stop=tuple(body.stop_list()), stop_token_ids=tuple(body.stop_token_ids or ()),
                        ignore_eos=body.ignore_eos, min_tokens=body.min_tokens,
                        include_stop_str_in_output=body.include_stop_str_in_output,
                        skip_special_tokens=body.skip_special_tokens)
        logprobs, prompt_logprobs = wanted_logprobs(body)
        asked = sampling(body)
        try:
            served.engine.check_sampling(asked)
        except UnsupportedSampling as exc:
            raise APIError(400, f"{exc.field} is a vLLM extension and {exc.why}; leave it out", param=exc.field,
                           code="unsupported_by_upstream") from None
        # max_tokens=0 (echo): one token is made and left out of the answer, as vLLM does
        return Job(prompts=ids, n=body.n, max_tokens=max(max_tokens, 1), sampling=asked, ending=ending,
                   emit=emit, stream=bool(body.stream),
                   logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def sampling(body: SamplingRequest) -> SamplingParams:
        """The request's settings, the server's ``generation`` defaults for what it leaves out."""
        defaults = SamplingParams.from_generation(served.defaults)
        if body.temperature is not None and body.temperature < SAMPLING_EPS:
            defaults = SamplingParams()  # greedy, as in vLLM: dividing logits by it overflows
        return SamplingParams(
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            top_k=defaults.top_k if body.top_k is None else max(body.top_k, 0),
            min_p=body.min_p or 0.0, repetition_penalty=body.repetition_penalty or 1.0,
            seed=body.seed, ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens)

    async def respond(body: SamplingRequest, request: Request, ids: list[list[int]], chat: bool,
                      echoed: Optional[list[str]] = None) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        job = make_job(body, ids, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            batcher.submit(job)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}; retry later", code="queue_full") from None
        except ShuttingDown as exc:
            raise APIError(503, str(exc), code="shutting_down") from None
        reply = Reply(served.name, chat, job, body.return_token_ids, token_text=token_text, logprobs=job.logprobs,
                      echoed=echoed, echo_only=echoed is not None and body.max_tokens == 0)
        where = place(request.scope)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(reply, events, include_usage, where), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while True:
            try:
                kind, index, value = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    cancelled(reply, where, stream=False)
                    return Response(status_code=499)
                continue
            if kind == "error":
                raise APIError(500, f"generation failed: {value}", code="engine_error")
            if kind == "abort":
                raise APIError(503, value, code="shutting_down")
            if kind == "done":
                try:
                    answer = reply.whole()
                except LogprobsMissing as exc:
                    raise APIError(500, f"generation failed: {exc}", code="engine_error") from None
                record(where, 200, **reply.figures(), **text_fields(reply, body))
                return JSONResponse(answer)

    background: set[asyncio.Task[None]] = set()

    def cancelled(reply: Reply, where: dict[str, str], stream: bool) -> None:
        """Stop the job's rows; record it once they have stopped, with the tokens it really cost."""
        reply.job.cancel()

        async def record_when_ended() -> None:
            await asyncio.to_thread(reply.job.ended.wait)
            record(where, 499, error_type="client_disconnected", stream=stream, **reply.figures())

        task = asyncio.get_running_loop().create_task(record_when_ended())
        background.add(task)
        task.add_done_callback(background.discard)

    def text_fields(reply: Reply, body: SamplingRequest) -> dict[str, Any]:
        if not settings.record_text:
            return {}
        prompt = body.conversation() if isinstance(body, ChatCompletionRequest) else getattr(body, "prompt", None)
        return {"prompt": prompt, "outputs": [c.text for c in reply.job.choices]}

    async def stream(reply: Reply, events: asyncio.Queue[Any], include_usage: bool,
                     where: dict[str, str]) -> AsyncIterator[str]:
        finished = False
        try:
            for index in range(reply.job.rows) if reply.chat else ():
                yield sse(reply.chunk(index, role=True))
            while True:
                kind, index, value = await events.get()
                if kind == "error":
                    yield sse(error_body(f"generation failed: {value}", "internal_server_error", code="engine_error"))
                    record(where, 500, error_type="engine_error", error=str(value), **reply.figures())
                    break
                if kind == "abort":  # the shutdown deadline: say so, then end the stream as usual
                    yield sse(error_body(value, "service_unavailable", code="shutting_down"))
                    record(where, 503, error_type="shutting_down", error=value, stream=True, **reply.figures())
                    break
                if kind == "done":
                    if include_usage:
                        yield sse(reply.usage_chunk())
                    record(where, 200, stream=True, **reply.figures())
                    break
                if kind == "delta":
                    text, ids, logprobs, finish_reason = value
                    try:
                        yield sse(reply.chunk(index, text=text, token_ids=ids, logprobs=logprobs,
                                              finish_reason=finish_reason))
                    except LogprobsMissing as exc:
                        yield sse(error_body(f"generation failed: {exc}", "internal_server_error", code="engine_error"))
                        record(where, 500, error_type="engine_error", error=str(exc), **reply.figures())
                        reply.job.cancel()
                        break
                else:
                    yield sse(reply.chunk(index, finish_reason=value))
            finished = True
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away mid-stream: free its rows
                cancelled(reply, where, stream=True)

    def served_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            describe(schema, served, vocab, prompt_limit, batcher.max_batch_size, has_logprobs, engine_name)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = served_openapi  # type: ignore[method-assign]
    return app


ROUTE_MODELS: dict[str, type[SamplingRequest]] = {"/v1/completions": CompletionRequest,
                                                  "/v1/chat/completions": ChatCompletionRequest}
# vLLM's tokenizer routes and their bodies (/tokenize takes either form, by whether it has messages).
TOKENIZER_ROUTES: dict[str, tuple[type[BaseModel], ...]] = {
    "/tokenize": (TokenizeCompletionRequest, TokenizeChatRequest), "/detokenize": (DetokenizeRequest,)}


def body_model(route: str, body: dict[str, Any]) -> Optional[type[BaseModel]]:
    """The request model a route's body is checked against (None: a route without a body)."""
    if route == "/tokenize":
        return TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
    if route in TOKENIZER_ROUTES:
        return TOKENIZER_ROUTES[route][0]
    return ROUTE_MODELS.get(route)


# Why a batcher without logprobs refuses them (``{engine}``: the engine's name).
LOGPROBS_UNSUPPORTED = ("this server's batcher runs whole batches through engine={engine}, which hand back tokens "
                        "only; logprobs need continuous batching (server.batching=auto or continuous), where the "
                        "model is stepped in this process (engine=local on device=cpu or gpu, pytorch mode), or "
                        "a vLLM server behind the engine (engine=vllm), which answers them itself")


def wanted_logprobs(body: SamplingRequest) -> tuple[Optional[int], Optional[int]]:
    """(alternatives per generated token, per prompt token) a request asks for, None for none:
    completions' ``logprobs`` (over the prompt too with ``echo``), chat's ``top_logprobs`` once
    ``logprobs`` is true (0 when it is left out)."""
    if isinstance(body, ChatCompletionRequest):
        return ((body.top_logprobs or 0) if body.logprobs else None), None
    if isinstance(body, CompletionRequest) and body.logprobs is not None:
        return body.logprobs, (body.logprobs if body.echo else None)
    return None, None


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """vLLM's ``/tokenizer_info``: the tokenizer's settings (``init_kwargs``, what its
    ``tokenizer_config.json`` says) without the vocabulary files' paths, special tokens as their
    text, its class and chat template; the special tokens it has beside them filled in."""
    config = {k: jsonable(v) for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items()
              if k not in ("vocab_file", "merges_file")}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if config.get(name) is None and getattr(tokenizer, name, None) is not None:
            config[name] = str(getattr(tokenizer, name))
    config["tokenizer_class"] = type(tokenizer).__name__
    if getattr(tokenizer, "chat_template", None):
        config["chat_template"] = tokenizer.chat_template
    return config


def jsonable(value: Any) -> Any:
    """A tokenizer setting as JSON: an ``AddedToken`` as its text, containers item by item,
    anything else that JSON has no type for as its ``str``."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def wrong_shape(problem: dict[str, Any]) -> bool:
    """A 422 problem: a value of the wrong type or a field missing (anything else broke a bound: 400)."""
    kind = str(problem.get("type", ""))
    return kind == "missing" or kind.endswith("_type")


def path_of(problem: dict[str, Any]) -> str:
    """The field a validation problem is about, as ``messages.0.content``: the location without
    ``body`` and without the names pydantic gives a union's branches (``list[str]``, ``ContentPart``)."""
    parts = [str(p) for p in problem.get("loc", ())
             if not (p == "body" or isinstance(p, str) and ("[" in p or "-" in p or p[:1].isupper()
                                                           or p in ("str", "int", "float", "bool")))]
    return ".".join(parts)


def describe(schema: dict[str, Any], served: Served, vocab: int, prompt_limit: int, max_rows: int,
             logprobs: bool = True, engine: str = "") -> None:
    """Make the generated spec say what only the running server knows: the one model it serves,
    its limits (server.max_tokens, max_batch_size, the vocabulary, the prompt length in tokens),
    whether a key is needed, whether it serves logprobs, and (server.openai_extensions=false) no
    vLLM fields."""
    settings = served.settings
    components = schema["components"]["schemas"]
    if not logprobs:  # only the values that ask for none
        why = f"Not served here: {LOGPROBS_UNSUPPORTED.format(engine=engine)}."
        components["CompletionRequest"]["properties"]["logprobs"] = {"type": "null", "title": "Logprobs",
                                                                     "description": why}
        components["ChatCompletionRequest"]["properties"]["logprobs"] = {"enum": [False, None], "title": "Logprobs",
                                                                         "default": False, "description": why}
    for name in ("TokenizeCompletionRequest", "TokenizeChatRequest", "DetokenizeRequest"):
        if name in components:
            bound(components[name]["properties"]["model"], enum=[served.name])
    if "DetokenizeRequest" in components:
        components["DetokenizeRequest"]["properties"]["tokens"]["items"].update(minimum=0, maximum=vocab - 1)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = components[name]["properties"]
        props["model"]["enum"] = [served.name]
        bound(props["max_tokens"], maximum=settings.max_tokens)
        bound(props["n"], maximum=max_rows)
        bound(props["min_tokens"], maximum=settings.max_tokens)
        bound(props["seed"], minimum=SEED_MIN, maximum=SEED_MAX)  # exact: FastAPI's spec model made them floats
        if not settings.openai_extensions:
            for field in EXTENSIONS:
                props.pop(field)
    bound(components["ChatCompletionRequest"]["properties"]["max_completion_tokens"], maximum=settings.max_tokens)
    token = {"type": "integer", "minimum": 0, "maximum": vocab - 1}
    ids = {"type": "array", "items": token, "minItems": 1, "maxItems": prompt_limit}
    components["CompletionRequest"]["properties"]["prompt"]["anyOf"] = [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": max_rows},
        ids,
        {"type": "array", "items": ids, "minItems": 1, "maxItems": max_rows},
    ]
    for path in schema["paths"].values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "model":
                    parameter["schema"]["enum"] = [served.name]
            # FastAPI's own 422 for a path parameter: any string is a model name here (a 404 at worst).
            if "HTTPValidationError" in json.dumps(operation["responses"].get("422", {})):
                del operation["responses"]["422"]
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"].pop("application/json")  # text only
    if served.api_key is not None:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for route, path in schema["paths"].items():
            for operation in path.values():
                if route != "/health":
                    operation["security"] = [{"bearer": []}]


def bound(prop: dict[str, Any], **limits: Any) -> None:
    """Add limits to a property's schema (to its non-null branch, for an optional one)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            branch.update(limits)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class LogprobsMissing(Exception):
    """The engine side did not hand back the logprobs a job asked for."""


class TokenText:
    """Each token id's text on its own, as vLLM's logprobs show it: ``decode([id])`` with the
    special tokens kept, and where the tokenizer is SentencePiece-like (a Metaspace pre-tokenizer,
    whose decode drops a word's leading ``▁``) that leading space put back."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.marker = metaspace_marker(tokenizer)
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) or ""
            if self.marker is not None:
                piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
                missing = (len(piece) - len(piece.lstrip(self.marker))) - (len(text) - len(text.lstrip(" ")))
                text = " " * missing + text if missing > 0 else text
            self._texts[token_id] = text
        return text

    def plain(self, token_id: int) -> str:
        """A prompt's first token, which vLLM decodes plainly (no space put back)."""
        return self.tokenizer.decode([token_id]) or ""


def metaspace_marker(tokenizer: Any) -> Optional[str]:
    """The character a SentencePiece-style (Metaspace) pre-tokenizer writes for a space, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    except (ValueError, AttributeError):
        return None
    for part in [pre, *pre.get("pretokenizers", [])]:
        if part.get("type") == "Metaspace":
            return part.get("replacement", "\u2581")
    return None


def _logprob(value: float) -> float:
    return max(value, -9999.0)  # -inf as the JSON number OpenAI and vLLM give


def _ranked(entry: TokenLogprob) -> dict[int, float]:
    """vLLM's per-position dict: the chosen (or given) token first, then the top ones best first
    (a token among them once, where it first appears)."""
    ranked = {entry.token_id: entry.logprob}
    for token_id, logprob in entry.top:
        ranked.setdefault(token_id, logprob)
    return ranked


def completion_logprobs(token_ids: list[int], entries: list[Optional[TokenLogprob]], top: int,
                        text_of: TokenText, offset: int = 0) -> dict[str, Any]:
    """Completions' logprobs over ``token_ids``, as vLLM writes them: each token's text, its
    logprob (None where ``entries`` has None: a prompt's first token), a dict of the chosen token
    and the ``top`` best by text (at most ``top`` + 1: the chosen one may be among them), and each
    token's ``text_offset`` (``offset`` plus the lengths of the token texts before it)."""
    if len(entries) != len(token_ids):
        raise LogprobsMissing(f"the engine gave logprobs for {len(entries)} of {len(token_ids)} tokens")
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: list[Optional[dict[str, float]]] = []
    text_offset: list[int] = []
    for token_id, entry in zip(token_ids, entries):
        if entry is None:
            token = text_of.plain(token_id)
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token = text_of(token_id)
            token_logprobs.append(_logprob(entry.logprob))
            best: dict[str, float] = {}
            for i, (alt, logprob) in enumerate(_ranked(entry).items()):
                if i > top:
                    break
                best[text_of(alt)] = _logprob(logprob)
            top_logprobs.append(best)
        tokens.append(token)
        text_offset.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def chat_logprobs(token_ids: list[int], entries: list[TokenLogprob], top: int, text_of: TokenText) -> dict[str, Any]:
    """Chat's logprobs over ``token_ids``, as vLLM writes them: per token its text, logprob and
    UTF-8 bytes, and the first ``top`` of the chosen token and the best ones (vLLM's order: the
    chosen token first; with greedy decoding the best ``top`` tokens)."""
    if len(entries) != len(token_ids):
        raise LogprobsMissing(f"the engine gave logprobs for {len(entries)} of {len(token_ids)} tokens")

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = text_of(token_id)
        return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}

    return {"content": [{**one(token_id, entry.logprob),
                         "top_logprobs": [one(alt, lp) for alt, lp in list(_ranked(entry).items())[:top]]}
                        for token_id, entry in zip(token_ids, entries)]}


class Reply:
    """One response being assembled from a job's events, in completions or chat form; with
    ``token_ids`` (vLLM's ``return_token_ids``) the token ids too, as vLLM returns them: each
    choice's ``token_ids`` (per chunk when streamed) and the prompt's ``prompt_token_ids`` (per
    choice for completions, once per response for chat; on the first chunk when streamed).

    ``logprobs`` (alternatives per token, None for none) formats each choice's logprobs, per chunk
    when streamed (``completion_logprobs``, ``chat_logprobs``). ``echoed`` (completions' echo: each
    prompt's text) puts the prompt before each choice's text, and with ``logprobs`` the prompt's
    tokens before its generated ones, on the choice's first chunk when streamed; ``echo_only``
    (``max_tokens: 0``) answers the prompt alone. With ``return_token_ids`` vLLM echoes no text."""

    def __init__(self, model: str, chat: bool, job: Job, token_ids: bool = False, *,
                 token_text: Optional[TokenText] = None, logprobs: Optional[int] = None,
                 echoed: Optional[list[str]] = None, echo_only: bool = False) -> None:
        self.model, self.chat, self.job, self.token_ids = model, chat, job, token_ids
        self.token_text, self.logprobs, self.echoed, self.echo_only = token_text, logprobs, echoed, echo_only
        if logprobs is not None and token_text is None:
            raise ValueError("logprobs need token_text")
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.object = "chat.completion" if chat else "text_completion"
        self._prompt_sent: set[int] = set()
        self._echo_sent: set[int] = set()
        self._text_sent: dict[int, int] = {}  # a streamed choice's generated text so far (vLLM's text_offset)

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.job.prompts)
        return usage(prompt, sum(len(c.token_ids) for c in self.job.choices))

    def figures(self) -> dict[str, Any]:
        """What requests.jsonl keeps about this request (never the API key, text only if asked)."""
        job = self.job
        done = time.perf_counter()
        return {"id": self.id, "n": job.rows, "prompt_tokens": sum(len(p) for p in job.prompts),
                "completion_tokens": sum(len(c.token_ids) for c in job.choices),
                "finish_reasons": [c.finish_reason for c in job.choices],
                "ttft_s": round(job.first_token_at - job.arrived, 6) if job.first_token_at else None,
                "latency_s": round(done - job.arrived, 6)}

    def prompt_of(self, index: int) -> list[int]:
        return self.job.prompts[index // self.job.n]

    def _prompt_logprobs(self, index: int) -> list[Optional[TokenLogprob]]:
        results = self.job.prompt_logprob_results
        p = index // self.job.n
        if p >= len(results) or len(results[p]) != len(self.job.prompts[p]):
            got = len(results[p]) if p < len(results) else 0
            raise LogprobsMissing(f"the engine gave prompt logprobs for {got} of {len(self.job.prompts[p])} "
                                  f"tokens of prompt {p}")
        return list(results[p])

    def _with_echo(self, index: int, text: str, ids: list[int],
                   entries: list[Any]) -> tuple[str, list[int], list[Any]]:
        """A completion choice's text and logprob positions with the prompt echoed before them."""
        prompt_text = "" if self.token_ids else self.echoed[index // self.job.n]  # type: ignore[index]
        prompt_ids = self.prompt_of(index)
        prompt_entries = self._prompt_logprobs(index) if self.logprobs is not None else []
        if self.echo_only:
            return prompt_text, list(prompt_ids), prompt_entries
        return prompt_text + text, [*prompt_ids, *ids], [*prompt_entries, *entries]

    def _completion_logprobs(self, ids: list[int], entries: list[Any], offset: int = 0) -> Optional[dict[str, Any]]:
        if self.logprobs is None:
            return None
        return completion_logprobs(ids, entries, self.logprobs, self.token_text, offset)  # type: ignore[arg-type]

    def whole(self) -> dict[str, Any]:
        """The non-streamed response, once the job is done."""
        choices: list[dict[str, Any]] = []
        for i, c in enumerate(self.job.choices):
            if self.chat:
                logprobs = (chat_logprobs(c.token_ids, c.logprobs, self.logprobs, self.token_text)  # type: ignore[arg-type]
                            if self.logprobs is not None else None)
                choice = {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs,
                          "finish_reason": c.finish_reason}
            else:
                text, ids, entries = c.text, c.token_ids, c.logprobs
                if self.echoed is not None:
                    text, ids, entries = self._with_echo(i, text, ids, entries)
                choice = {"index": i, "text": text, "logprobs": self._completion_logprobs(ids, entries),
                          "finish_reason": c.finish_reason}
                if self.token_ids:
                    choice["prompt_token_ids"] = self.prompt_of(i)
            if self.token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        answer = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                  "choices": choices, "usage": self.usage()}
        if self.token_ids and self.chat:
            answer["prompt_token_ids"] = self.job.prompts[0]
        return answer

    def chunk(self, index: int, text: str = "", finish_reason: Optional[str] = None, role: bool = False,
              token_ids: Optional[list[int]] = None, logprobs: Optional[list[TokenLogprob]] = None) -> dict[str, Any]:
        """One streamed chunk of choice ``index``: new text, its token ids and their logprobs (a
        delta event's), or the finish reason, or (chat) the assistant's role first."""
        ids, entries = list(token_ids or []), list(logprobs or [])
        if self.logprobs is not None and not role and len(entries) != len(ids):
            raise LogprobsMissing(f"the engine gave logprobs for {len(entries)} of {len(ids)} tokens")
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            formatted = (chat_logprobs(ids, entries, self.logprobs, self.token_text)  # type: ignore[arg-type]
                         if self.logprobs is not None and ids else None)
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": formatted,
                                      "finish_reason": finish_reason}
        else:
            generated, shown = len(text), text
            offset = self._text_sent.get(index, 0)
            if self.echo_only:
                shown, ids, entries = "", [], []
            if self.echoed is not None and index not in self._echo_sent:
                self._echo_sent.add(index)
                shown, ids, entries = self._with_echo(index, shown, ids, entries)
            self._text_sent[index] = offset + generated
            formatted = self._completion_logprobs(ids, entries, offset) if ids else None
            choice = {"index": index, "text": shown, "logprobs": formatted, "finish_reason": finish_reason}
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": [choice]}
        if self.token_ids:
            choice["token_ids"] = token_ids or []
            first = index not in self._prompt_sent
            self._prompt_sent.add(index)
            if first and self.chat:
                chunk["prompt_token_ids"] = self.prompt_of(index)
            elif first:
                choice["prompt_token_ids"] = self.prompt_of(index)
        return chunk

    def usage_chunk(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.usage()}


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before any handler parses it."""

    def __init__(self, app: Any, limit: int, on_reject: Callable[[dict[str, Any]], None]) -> None:
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        seen = 0
        started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(scope, receive, send)

    async def _reject(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.on_reject(scope)
        body = error_body(_TooLarge.message(self.limit), "invalid_request_error", code="request_too_large")
        await JSONResponse(body, status_code=413)(scope, receive, send)


class _TooLarge(Exception):
    @staticmethod
    def message(limit: int) -> str:
        return f"the request body is over this server's limit of {limit} bytes (server.max_body_bytes)"
