"""Server processes that rm_runner starts: ports, readiness, logs, and a stop that leaves no orphan.

The one place that knows how an engine's server is launched and ended. Each server runs in
its own process group (stopped as a group, so its workers go too), is told to die with its
parent (Linux PR_SET_PDEATHSIG) in case rm_runner itself is killed, writes stdout and stderr
to a log file in the run directory, and is polled for readiness against a deadline.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable

import httpx

from rm_runner.errors import RunnerError

log = logging.getLogger(__name__)


class EngineError(RunnerError):
    """A server failed to start, died, or cannot be reached; the message quotes its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def claim_port(host: str, port: int | None, key: str = "engine.port") -> int:
    """``port`` if it is free on ``host`` (a clear error if not), or a free one when None."""
    if port is None:
        return free_port(host)
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise EngineError(
                f"{key}={port} on {host} is in use ({exc.strerror}); choose another port, or {key}=null for a free one"
            ) from None
    return port


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness probe: GET ``url`` answers 200 (a refused or failed connection is "not yet")."""

    def probe() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    return probe


def _child_setup() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background parent may ignore it; servers stop on it
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with rm_runner


class ServerProcess:
    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
                 stop_signal: int = signal.SIGTERM, cwd: Path | None = None, signal_group: bool = False) -> None:
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.env = {**os.environ, **(env or {})}
        self.stop_signal = stop_signal
        # True for launchers that do not pass the stop signal on to the server they started.
        self.signal_group = signal_group
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s: %s (log: %s)", self.name, " ".join(self.cmd), self.log_path)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                cwd=self.cwd, start_new_session=True, preexec_fn=_child_setup,
            )

    def tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(deque(fh, maxlen=lines)).rstrip()
        except OSError:
            return "(no log)"

    def check_alive(self, during: str = "the run", grace_s: float = 0.0) -> None:
        """Raise, quoting the log, if the server has exited (waiting up to ``grace_s`` for an exit in progress)."""
        if self.proc is None:
            return
        if grace_s:
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                return
        if self.proc.poll() is None:
            return
        raise EngineError(
            f"{self.name} server exited with code {self.proc.returncode} during {during}; "
            f"last lines of {self.log_path}:\n{self.tail()}"
        )

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float, poll_s: float = 0.25) -> float:
        """Poll ``probe`` (False until ready) until it holds; fail at once if the server exits, or at the deadline."""
        began = time.monotonic()
        while True:
            self.check_alive(during="start-up")
            if probe():
                ready = time.monotonic() - began
                log.info("%s ready in %.1f s", self.name, ready)
                return ready
            if time.monotonic() - began > timeout_s:
                raise EngineError(
                    f"{self.name} server not ready after {timeout_s:.0f} s (engine.startup_timeout_s); "
                    f"last lines of {self.log_path}:\n{self.tail()}"
                )
            time.sleep(poll_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the server to stop (it shuts its workers down), wait, then kill its whole group. Safe twice."""
        if self.proc is None or self.proc.poll() is not None:
            self._reap_group()
            return
        log.info("stopping %s (pid %d)", self.name, self.proc.pid)
        try:
            if self.signal_group:
                os.killpg(self.proc.pid, self.stop_signal)
            else:
                self.proc.send_signal(self.stop_signal)
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout_s)
        except ProcessLookupError:
            pass
        self._reap_group()

    def _reap_group(self) -> None:
        """Workers the server left in its group after it exited."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
