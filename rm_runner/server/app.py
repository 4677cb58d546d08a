"""The OpenAI-compatible app: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (both
with ``stream: true`` as server-sent events ending in ``data: [DONE]``), ``/health``, ``/metrics``.

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
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from rm_runner.config import GenerationConfig, ServerConfig
from rm_runner.engines.local import render
from rm_runner.errors import ConfigError
from rm_runner.requests import Request as PromptRequest
from rm_runner.server.batcher import DynamicBatcher, Job, QueueFull, Sampling, ShuttingDown
from rm_runner.server.choice import Ending
from rm_runner.server.metrics import ServerMetrics
from rm_runner.server.schemas import (
    EXTENSIONS, SAMPLING_EPS, SEED_MAX, SEED_MIN, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
    CompletionResponse, ErrorResponse, Health, ModelCard, ModelList, SamplingRequest, error_body, new_id, now, usage,
)

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable"}

# The 400s a request that is valid per the served schema can still get: limits that span fields
# or depend on the tokenizer, which a JSON schema cannot state (tests/test_server_schema.py holds
# the server to this list).
CROSS_FIELD_CODES = ("context_length_exceeded", "too_many_sequences", "min_tokens_over_max_tokens",
                     "stream_options_without_stream")

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
    batcher = DynamicBatcher(served.engine, settings.max_batch_size, settings.max_wait_ms / 1000,
                             settings.max_queue, on_batch=metrics.batch_size.observe)
    metrics.waiting.set_function(batcher.waiting)
    metrics.running.set_function(batcher.running)
    # The handlers tokenize on the event loop while the batcher decodes on its thread: each gets
    # its own tokenizer, since a fast tokenizer is not safe to share across threads.
    tokenizer = copy.deepcopy(served.engine.tokenizer)
    vocab = len(tokenizer)
    prompt_limit = min(settings.max_prompt_tokens or served.max_model_len, served.max_model_len - 1)
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
        known = ROUTE_MODELS[route].model_fields if route in ROUTE_MODELS else {}
        name = next((k for k in body if k not in known or not allowed(k)), None)
        if name is None:
            name = next((path_of(p) for p in problems if p.get("type") == "extra_forbidden"), None)
        if name is not None:
            return unrecognized(name)
        problem = next((p for p in problems if not wrong_shape(p)), first)  # a union: the branch that fit
        where = path_of(problem)
        got = "" if problem.get("type") == "missing" else f" (got {reprlib.repr(problem.get('input'))})"
        return APIError(422 if wrong_shape(problem) else 400, f"{where}: {problem.get('msg')}{got}",
                        param=where or None, code=problem.get("type"))

    def allowed(field: str) -> bool:
        return extensions or field not in EXTENSIONS

    def unrecognized(name: str) -> APIError:
        message = f"Unrecognized request argument supplied: {name}"  # OpenAI's own words
        if extensions:
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

    @app.post("/v1/completions", dependencies=guarded, responses=streamed(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_request(body)
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
        return await respond(body, request, ids, chat=False)

    @app.post("/v1/chat/completions", dependencies=guarded, responses=streamed(ChatCompletionResponse))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_request(body)
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

    def check_request(body: SamplingRequest) -> None:
        """What the body says, before any tokenizing: the model, fields known and supported."""
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
        if rows > settings.max_batch_size:
            raise APIError(400, f"{len(ids)} prompt(s) x n={body.n} = {rows} sequences; this server runs at most "
                                f"{settings.max_batch_size} at once (server.max_batch_size)", param="n",
                           code="too_many_sequences")
        ending = Ending(stop=tuple(body.stop_list()), stop_token_ids=tuple(body.stop_token_ids or ()),
                        ignore_eos=body.ignore_eos, min_tokens=body.min_tokens,
                        include_stop_str_in_output=body.include_stop_str_in_output,
                        skip_special_tokens=body.skip_special_tokens)
        return Job(prompts=ids, n=body.n, max_tokens=max_tokens, sampling=sampling(body), ending=ending,
                   emit=emit, stream=bool(body.stream), stream_token_ids=body.return_token_ids)

    def sampling(body: SamplingRequest) -> Sampling:
        """The generate() settings; no-op values left out (None), so that more requests share a batch."""
        defaults = served.defaults
        # A temperature under SAMPLING_EPS is greedy, as in vLLM: dividing logits by it overflows.
        do_sample = defaults.do_sample if body.temperature is None else body.temperature >= SAMPLING_EPS
        penalty = body.repetition_penalty if body.repetition_penalty != 1 else None
        if not do_sample:
            return Sampling(False, None, None, None, None, body.ignore_eos, repetition_penalty=penalty,
                            min_tokens=body.min_tokens)
        top_k = defaults.top_k if body.top_k is None else (body.top_k if body.top_k > 0 else None)
        return Sampling(True, body.temperature or defaults.temperature,
                        body.top_p if body.top_p is not None else defaults.top_p, top_k, body.seed, body.ignore_eos,
                        repetition_penalty=penalty, min_p=body.min_p or None, min_tokens=body.min_tokens)

    async def respond(body: SamplingRequest, request: Request, ids: list[list[int]], chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        job = make_job(body, ids, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            batcher.submit(job)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}; retry later", code="queue_full") from None
        except ShuttingDown as exc:
            raise APIError(503, str(exc), code="shutting_down") from None
        reply = Reply(served.name, chat, job, body.return_token_ids)
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
                record(where, 200, **reply.figures(), **text_fields(reply, body))
                return JSONResponse(reply.whole())

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
                    text, ids, _logprobs = value
                    yield sse(reply.chunk(index, text=text, token_ids=ids))
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
            describe(schema, served, vocab, prompt_limit)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = served_openapi  # type: ignore[method-assign]
    return app


ROUTE_MODELS: dict[str, type[SamplingRequest]] = {"/v1/completions": CompletionRequest,
                                                  "/v1/chat/completions": ChatCompletionRequest}


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


def describe(schema: dict[str, Any], served: Served, vocab: int, prompt_limit: int) -> None:
    """Make the generated spec say what only the running server knows: the one model it serves,
    its limits (server.max_tokens, max_batch_size, the vocabulary, the prompt length in tokens),
    whether a key is needed, and (server.openai_extensions=false) no vLLM fields."""
    settings = served.settings
    components = schema["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = components[name]["properties"]
        props["model"]["enum"] = [served.name]
        bound(props["max_tokens"], maximum=settings.max_tokens)
        bound(props["n"], maximum=settings.max_batch_size)
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
        {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": settings.max_batch_size},
        ids,
        {"type": "array", "items": ids, "minItems": 1, "maxItems": settings.max_batch_size},
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


def bound(prop: dict[str, Any], **limits: int) -> None:
    """Add limits to a property's schema (to its non-null branch, for an optional one)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            branch.update(limits)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Reply:
    """One response being assembled from a job's events, in completions or chat form; with
    ``token_ids`` (vLLM's ``return_token_ids``) the token ids too, as vLLM returns them: each
    choice's ``token_ids`` (per chunk when streamed) and the prompt's ``prompt_token_ids`` (per
    choice for completions, once per response for chat; on the first chunk when streamed)."""

    def __init__(self, model: str, chat: bool, job: Job, token_ids: bool = False) -> None:
        self.model, self.chat, self.job, self.token_ids = model, chat, job, token_ids
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.object = "chat.completion" if chat else "text_completion"
        self._prompt_sent: set[int] = set()

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

    def whole(self) -> dict[str, Any]:
        """The non-streamed response, once the job is done."""
        choices: list[dict[str, Any]] = []
        for i, c in enumerate(self.job.choices):
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                          "finish_reason": c.finish_reason}
            else:
                choice = {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
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
              token_ids: Optional[list[int]] = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
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
