"""Hosting the API in this process: the socket, uvicorn in a thread, the model in this one.

The listening socket is bound before uvicorn starts, so a port in use fails with the key to
change, and ``server.port=0`` gets a free port that is known exactly. uvicorn runs in a thread
of its own; the calling (main) thread, which loaded the model, drives it through the batcher
(PyTorch on the CPU keeps a thread pool per calling thread). SIGTERM or Ctrl-C stop uvicorn
gracefully: in-flight requests get ``server.shutdown_timeout_s`` to finish; then the batcher cuts
what still runs, so each such request ends as an answer (a 503, or a stream's error event and
``data: [DONE]``) that is recorded, instead of a connection dropped when uvicorn cancels it.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Iterator, Optional

import uvicorn

from rm_runner.config import GenerationConfig, ServerConfig
from rm_runner.errors import ConfigError, RunnerError
from rm_runner.server.app import Served, create_app

log = logging.getLogger(__name__)

# After the shutdown deadline has cut the running requests: how long they get to send their last
# event and close before uvicorn cancels what is left (a generation step that does not return).
CUT_GRACE_S = 5.0


class ApiServer:
    def __init__(self, engine: Any, model_name: str, max_model_len: int, settings: ServerConfig,
                 defaults: GenerationConfig, on_record: Callable[[dict[str, Any]], None] = lambda r: None,
                 on_ready: Callable[["ApiServer"], None] = lambda s: None) -> None:
        self.api_key = os.environ.get(settings.api_key_env) or None
        self.served = Served(engine=engine, name=settings.served_model_name or model_name, settings=settings,
                             defaults=defaults, max_model_len=max_model_len, api_key=self.api_key)
        self.sock = bind(settings.host, settings.port)
        host, self.port = self.sock.getsockname()[:2]
        self.host = host
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}/v1"
        if self.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("server.host=%s without an API key: anyone who reaches it can use the model; set $%s",
                        host, settings.api_key_env)
        self._ready = threading.Event()

        def ready() -> None:
            on_ready(self)
            self._ready.set()

        self.app = create_app(self.served, on_record=on_record, on_ready=ready)
        self.batcher = self.app.state.batcher
        self.metrics = self.app.state.metrics
        graceful = settings.shutdown_timeout_s + CUT_GRACE_S
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_config=None, lifespan="on",
                                                     timeout_graceful_shutdown=graceful))
        self._deadline: Optional[threading.Timer] = None
        self._stopping = threading.Lock()  # a signal and the client thread may both stop

    @property
    def name(self) -> str:
        return self.served.name

    def stop(self) -> None:
        """Stop gracefully: uvicorn takes no new connections, and whatever still runs after
        ``server.shutdown_timeout_s`` is cut by the batcher (answered 503, recorded)."""
        self.uvicorn.should_exit = True
        with self._stopping:
            if self._deadline is None:
                self._deadline = threading.Timer(self.served.settings.shutdown_timeout_s, self.batcher.close)
                self._deadline.daemon = True
                self._deadline.start()

    def run(self, client: Optional[Callable[[str], Any]] = None) -> Any:
        """Serve until SIGTERM/Ctrl-C, or, given ``client``, until ``client(url)`` returns (it runs
        in a thread of its own once the app is up); returns what the client returned."""
        outcome: dict[str, Any] = {}

        def serve_http() -> None:
            try:
                self.uvicorn.run(sockets=[self.sock])
            finally:
                self.batcher.close()  # however uvicorn ends, the model loop below ends too
                self._ready.set()

        def drive() -> None:
            self._ready.wait()  # the app has started; uvicorn serves the socket a moment later
            while not self.uvicorn.started and threads[0].is_alive():
                time.sleep(0.005)
            try:
                if self.uvicorn.started:  # else the check after the joins below says so
                    outcome["value"] = client(self.url)
            except BaseException as exc:  # handed back to the caller's thread
                outcome["error"] = exc
            finally:
                self.stop()

        threads = [threading.Thread(target=serve_http, name="rm-runner-http")]
        if client is not None:
            threads.append(threading.Thread(target=drive, name="rm-runner-client"))
        try:
            with _stop_on_signals(self.uvicorn, self.stop), frozen_heap():
                for thread in threads:
                    thread.start()
                try:
                    self.batcher.run()
                finally:
                    self.uvicorn.should_exit = True
                    for thread in threads:
                        thread.join()
        finally:
            if self._deadline is not None:
                self._deadline.cancel()
            self.sock.close()
        if not self.uvicorn.started:
            raise RunnerError(f"the API server at {self.url} did not start; see rm_runner.log in the run directory")
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def summary(self) -> dict[str, Any]:
        stats = self.batcher.stats
        return {**self.metrics.summary(), "batches": stats.batches,
                "mean_batch_size": round(stats.rows / stats.batches, 3) if stats.batches else None}


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
def frozen_heap() -> Iterator[None]:
    """What start-up left on the heap (the model, the libraries, the app), out of the collector's
    reach while serving, as vLLM's engine and API server do after start-up (``gc.freeze()``). A
    full collection walks every tracked object while holding the GIL: with SmolLM2 and the app
    loaded that is ~440k objects and ~0.3 s on this CPU, a stall of every stream. Python runs one
    when the survivors since the last reach a quarter of the old generation, so it is rare (none
    in 48 requests at 2 req/s here) and lands on a long-running server. Undone when serving
    ends, so a process that serves again (a test, a benchmark through the API) collects what the
    last server left."""
    gc.collect()
    gc.freeze()
    log.info("garbage collector: %d start-up objects frozen while serving", gc.get_freeze_count())
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _stop_on_signals(server: uvicorn.Server, stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM or Ctrl-C ``stop`` gracefully (a second Ctrl-C forces uvicorn out); for a serve run
    that is the normal end, not an interruption."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(sig: int, frame: Any) -> None:
        server.handle_exit(sig, frame)
        stop()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
