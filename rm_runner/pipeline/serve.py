"""Step: serve the loaded model over the OpenAI-compatible API until SIGTERM or Ctrl-C.

The listening socket is bound here, before uvicorn starts, so a port in use fails the run with
the key to change, and ``server.port=0`` gets a free port that is known exactly. Readiness is
announced in ``server.json`` (address, model, pid) and on stdout once the app has started.
uvicorn runs in a thread of its own; this (main) thread, which loaded the model, drives it
through the batcher. A signal stops the server gracefully: in-flight requests get
``server.shutdown_timeout_s`` to finish, then are cancelled; the run ends ``ok`` with the
serving figures in ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import threading
from typing import Iterator

import uvicorn
from omegaconf import OmegaConf

from rm_runner.config import ServerConfig
from rm_runner.errors import ConfigError, RunnerError
from rm_runner.pipeline.context import RunContext
from rm_runner.rundir import REQUESTS, SERVER

log = logging.getLogger(__name__)


class Serve:
    def __call__(self, ctx: RunContext) -> None:
        from rm_runner.server.app import Served, create_app

        settings: ServerConfig = OmegaConf.to_object(ctx.cfg.server)
        api_key = os.environ.get(settings.api_key_env) or None
        served = Served(engine=ctx.engine, name=settings.served_model_name or ctx.model.name, settings=settings,
                        defaults=ctx.generation, max_model_len=ctx.model.max_model_len, api_key=api_key)
        sock = bind(settings.host, settings.port)
        host, port = sock.getsockname()[:2]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1"

        def ready() -> None:
            ctx.run_dir.write_json(SERVER, {"url": url, "host": host, "port": port, "model": served.name,
                                            "pid": os.getpid(), "api_key_required": api_key is not None})
            log.info("serving %s at %s (%s); SIGTERM or Ctrl-C stops", served.name, url,
                     f"API key from ${settings.api_key_env}" if api_key else "no API key")
            print(f"serving {served.name} at {url}", flush=True)

        if api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("server.host=%s without an API key: anyone who reaches it can use the model; set $%s",
                        host, settings.api_key_env)
        app = create_app(served, on_record=lambda record: ctx.run_dir.append_jsonl(REQUESTS, record), on_ready=ready)
        config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=settings.shutdown_timeout_s,
                                lifespan="on")
        server = uvicorn.Server(config)
        batcher = app.state.batcher

        def serve_http() -> None:
            try:
                server.run(sockets=[sock])
            finally:
                batcher.close()  # however uvicorn ends, the model loop below ends too

        http = threading.Thread(target=serve_http, name="rm-runner-http")
        try:
            with _stop_on_signals(server):
                http.start()
                try:
                    batcher.run()
                finally:
                    server.should_exit = True
                    http.join()
        finally:
            sock.close()
            stats = batcher.stats
            ctx.metrics["serve"] = {**app.state.metrics.summary(), "batches": stats.batches,
                                    "mean_batch_size": round(stats.rows / stats.batches, 3) if stats.batches else None}
        if not server.started:
            raise RunnerError(f"the API server at {url} did not start; see rm_runner.log in the run directory")
        log.info("server stopped: %d requests", ctx.metrics["serve"]["requests"])


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; a taken port or a bad host is a ConfigError naming the key."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"server.port={port} is already in use on {host}; choose another port "
                              "(server.port=0 picks a free one)") from None
        raise ConfigError(f"server.host={host}, server.port={port}: cannot listen there ({exc.strerror})") from None


@contextlib.contextmanager
def _stop_on_signals(server: uvicorn.Server) -> Iterator[None]:
    """SIGTERM or Ctrl-C ask uvicorn to shut down gracefully (a second Ctrl-C forces it); for a
    serve run that is the normal end, not an interruption."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
