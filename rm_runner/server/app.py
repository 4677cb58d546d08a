"""The OpenAI-compatible app: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (both
with ``stream: true`` as server-sent events ending in ``data: [DONE]``), ``/health``, ``/metrics``.

Whatever engine the run started sits behind it: handlers render prompts to token ids, check
them against the limits, and hand them to the dynamic batcher, which owns the engine. Every
answer, error or not, is counted and recorded through ``on_record``; every error has OpenAI's
shape, so the official clients raise their usual exception classes.
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

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rm_runner.config import GenerationConfig, ServerConfig
from rm_runner.engines.local import render
from rm_runner.errors import ConfigError
from rm_runner.requests import Request as PromptRequest
from rm_runner.server.batcher import DynamicBatcher, Job, QueueFull, Sampling, ShuttingDown
from rm_runner.server.metrics import ServerMetrics
from rm_runner.server.schemas import (
    ChatCompletionRequest, CompletionRequest, SamplingRequest, error_body, new_id, now, usage,
)

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "internal_server_error", 503: "service_unavailable"}


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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        on_ready()
        yield
        batcher.close()  # after uvicorn's graceful wait: cancel what is still running

    app = FastAPI(title="rm_runner", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.batcher = batcher

    def record(route: str, status: int, **fields: Any) -> None:
        entry = {"time": time.time(), "route": route, "status": status, **fields}
        metrics.observe(entry)
        on_record(entry)

    def error_response(request: Request, status: int, message: str, param: Optional[str] = None,
                       code: Optional[str] = None) -> JSONResponse:
        type_ = ERROR_TYPES.get(status, "invalid_request_error")
        record(request.url.path, status, error_type=code or type_, error=message)
        return JSONResponse(error_body(message, type_, param, code), status_code=status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = exc.errors()[0]
        if problem.get("type") == "json_invalid":
            return error_response(request, 400, f"the request body is not valid JSON: {problem.get('msg')}",
                                  code="json_invalid")
        where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body")
        got = "" if problem.get("type") == "missing" else f" (got {reprlib.repr(problem.get('input'))})"
        return error_response(request, 422, f"{where}: {problem.get('msg')}{got}", param=where or None,
                              code=problem.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, _TooLarge):  # a chunked body that outgrew the limit while being read
            return error_response(request, 413, _TooLarge.message(settings.max_body_bytes), code="request_too_large")
        message = exc.detail if exc.status_code != 404 else f"no route {request.method} {request.url.path}"
        return error_response(request, exc.status_code, str(message))

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes,
                       on_reject=lambda path: record(path, 413, error_type="request_too_large"))

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

    @app.get("/health")
    async def health() -> Response:
        if batcher.alive and served.engine.health():
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body("the engine is not ready", "service_unavailable"), status_code=503)

    @app.get("/metrics", dependencies=guarded)
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    def model_card() -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": int(metrics.started), "owned_by": "rm_runner",
                "max_model_len": served.max_model_len}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=guarded)
    async def model(model: str) -> dict[str, Any]:
        check_model(model)
        return model_card()

    def check_model(name: str) -> None:
        if name != served.name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{served.name}`.",
                           param="model", code="model_not_found")

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        ids = [p if isinstance(p, list) else render(tokenizer, PromptRequest(id="api", prompt=p, chat_template=False))
               for p in prompt]
        vocab = len(tokenizer)
        for i, row in enumerate(ids):  # refused here, or the batch it would join fails with it
            if not row:
                raise APIError(400, f"prompt {i} has no tokens; a prompt needs at least one", param="prompt")
            outside = next((t for t in row if not 0 <= t < vocab), None)
            if outside is not None:
                raise APIError(400, f"prompt {i}: token id {outside} is out of vocabulary (0..{vocab - 1})",
                               param="prompt")
        return await respond(body, request, ids, chat=False)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            ids = render(tokenizer, PromptRequest(id="api", messages=body.conversation()))
        except ConfigError:
            raise APIError(400, f"the model `{served.name}` has no chat template; use /v1/completions",
                           param="messages") from None
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await respond(body, request, [ids], chat=True)

    def make_job(body: SamplingRequest, ids: list[list[int]], emit: Callable[[Any], None]) -> Job:
        check_model(body.model)
        field = body.unsupported()
        if field is not None:
            raise APIError(400, f"{field} is not supported by this server; leave it at its default", param=field)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        longest = max(len(p) for p in ids)
        prompt_limit = min(settings.max_prompt_tokens or served.max_model_len, served.max_model_len - 1)
        if longest > prompt_limit:
            raise APIError(400, f"the prompt has {longest} tokens; this server takes at most {prompt_limit}",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = min(served.defaults.max_new_tokens, settings.max_tokens, served.max_model_len - longest)
        elif max_tokens > settings.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {settings.max_tokens} "
                                "(server.max_tokens)", param="max_tokens")
        elif longest + max_tokens > served.max_model_len:
            raise APIError(400, f"This model's maximum context length is {served.max_model_len} tokens. However, "
                                f"you requested {longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} "
                                "for the completion). Reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        rows = len(ids) * body.n
        if rows > settings.max_batch_size:
            raise APIError(400, f"{len(ids)} prompt(s) x n={body.n} = {rows} sequences; this server runs at most "
                                f"{settings.max_batch_size} at once (server.max_batch_size)", param="n")
        if len(body.stop_list()) > 4:
            raise APIError(400, "stop takes at most 4 sequences", param="stop")
        return Job(prompts=ids, n=body.n, max_tokens=max_tokens, sampling=sampling(body), stop=body.stop_list(),
                   emit=emit, stream=body.stream)

    def sampling(body: SamplingRequest) -> Sampling:
        defaults = served.defaults
        do_sample = defaults.do_sample if body.temperature is None else body.temperature > 0
        if not do_sample:
            return Sampling(False, None, None, None, None, body.ignore_eos)
        top_k = defaults.top_k if body.top_k is None else (body.top_k if body.top_k > 0 else None)
        return Sampling(True, body.temperature or defaults.temperature,
                        body.top_p if body.top_p is not None else defaults.top_p, top_k, body.seed, body.ignore_eos)

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
        reply = Reply(served.name, chat, job)
        route = request.url.path
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(reply, events, include_usage, route), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while True:
            try:
                kind, index, value = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    cancelled(reply, route, stream=False)
                    return Response(status_code=499)
                continue
            if kind == "error":
                raise APIError(500, f"generation failed: {value}", code="engine_error")
            if kind == "done":
                record(route, 200, **reply.figures(), **text_fields(reply, body))
                return JSONResponse(reply.whole())

    background: set[asyncio.Task[None]] = set()

    def cancelled(reply: Reply, route: str, stream: bool) -> None:
        """Stop the job's rows; record it once they have stopped, with the tokens it really cost."""
        reply.job.cancel()

        async def record_when_ended() -> None:
            await asyncio.to_thread(reply.job.ended.wait)
            record(route, 499, error_type="client_disconnected", stream=stream, **reply.figures())

        task = asyncio.get_running_loop().create_task(record_when_ended())
        background.add(task)
        task.add_done_callback(background.discard)

    def text_fields(reply: Reply, body: SamplingRequest) -> dict[str, Any]:
        if not settings.record_text:
            return {}
        prompt = body.conversation() if isinstance(body, ChatCompletionRequest) else getattr(body, "prompt", None)
        return {"prompt": prompt, "outputs": [c.text for c in reply.job.choices]}

    async def stream(reply: Reply, events: asyncio.Queue[Any], include_usage: bool, route: str) -> AsyncIterator[str]:
        finished = False
        try:
            for index in range(reply.job.rows) if reply.chat else ():
                yield sse(reply.chunk(index, role=True))
            while True:
                kind, index, value = await events.get()
                if kind == "error":
                    yield sse(error_body(f"generation failed: {value}", "internal_server_error", code="engine_error"))
                    record(route, 500, error_type="engine_error", error=str(value), **reply.figures())
                    break
                if kind == "done":
                    if include_usage:
                        yield sse(reply.usage_chunk())
                    record(route, 200, stream=True, **reply.figures())
                    break
                if kind == "delta":
                    yield sse(reply.chunk(index, text=value))
                else:
                    yield sse(reply.chunk(index, finish_reason=value))
            finished = True
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away mid-stream: free its rows
                cancelled(reply, route, stream=True)

    return app


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Reply:
    """One response being assembled from a job's events, in completions or chat form."""

    def __init__(self, model: str, chat: bool, job: Job) -> None:
        self.model, self.chat, self.job = model, chat, job
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.object = "chat.completion" if chat else "text_completion"

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

    def whole(self) -> dict[str, Any]:
        """The non-streamed response, once the job is done."""
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                        "finish_reason": c.finish_reason} for i, c in enumerate(self.job.choices)]
        else:
            choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                       for i, c in enumerate(self.job.choices)]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def chunk(self, index: int, text: str = "", finish_reason: Optional[str] = None,
              role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.usage()}


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before any handler parses it."""

    def __init__(self, app: Any, limit: int, on_reject: Callable[[str], None]) -> None:
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
        self.on_reject(scope.get("path", ""))
        body = error_body(_TooLarge.message(self.limit), "invalid_request_error", code="request_too_large")
        await JSONResponse(body, status_code=413)(scope, receive, send)


class _TooLarge(Exception):
    @staticmethod
    def message(limit: int) -> str:
        return f"the request body is over this server's limit of {limit} bytes (server.max_body_bytes)"
