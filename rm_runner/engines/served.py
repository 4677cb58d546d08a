"""What every engine that starts a server shares: the process, readiness record, faults, stop."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rm_runner.backends.base import Backend
from rm_runner.config import GenerationConfig, ModelConfig
from rm_runner.engines.base import ServerClient
from rm_runner.engines.local import LocalEngine
from rm_runner.engines.options import ServedOptions
from rm_runner.engines.process import ServerProcess
from rm_runner.requests import Completion, Request


class ServedEngine(LocalEngine):
    """A local engine whose executor is a client of a server process this engine started."""

    options_class: type = ServedOptions

    def __init__(self, backend: Backend, **options: Any) -> None:
        super().__init__(backend, **options)
        self.host = self.options.host
        self.python = str(Path(self.options.python).expanduser()) if self.options.python else sys.executable
        self.startup_timeout_s = self.options.startup_timeout_s
        self.server: ServerProcess | None = None
        self.ready_s: float | None = None

    def model_spec(self, path: Path, config: ModelConfig) -> dict[str, Any]:
        """What a server-side process needs to rebuild this device's backend and load the model."""
        model_config = {k: getattr(v, "value", v) for k, v in asdict(config).items()}
        return {"device": self.backend.target_config(), "model_path": str(path),
                "model_config": {**model_config, "source": None}}

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described.update(host=self.host, python=self.python, pid=self.server.pid if self.server else None,
                         ready_s=self.ready_s)
        return described

    def infer(self, requests: list[Request], generation: GenerationConfig) -> list[Completion]:
        try:
            return super().infer(requests, generation)
        except Exception:
            if self.server is not None:
                self.server.check_alive(grace_s=5)  # a dead server explains the failure better than its client
            raise

    def health(self) -> bool:
        return super().health() and self.server is not None and self.server.proc.poll() is None

    def stop(self) -> None:
        if isinstance(self.executor, ServerClient):
            self.executor.close()  # open keep-alive connections hold some servers (Triton) back from exiting
        if self.server is not None:
            self.server.stop()
        self.model = None
        self._started = False
