"""What each engine takes (``engine.*``): one dataclass per engine, as each backend has its options.

They are the schemas of the ``engine`` group's options in Hydra's ConfigStore (``config.py``), so
a misspelt or mistyped ``engine.*`` fails at composition, and the engines check the same
dataclass when they are built (``check_options``), so code that builds one directly gets the
same errors. This module imports nothing heavy: composing a config loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional


@dataclass
class LocalOptions:
    batch_size: int = 16  # prompts per generate() call (left-padded)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class ServedOptions(LocalOptions):
    """An engine that starts a server process and reaches it over its API."""

    host: str = "127.0.0.1"  # every address the server binds
    python: Optional[str] = None  # the interpreter whose venv has the server; null: this one
    startup_timeout_s: float = 300.0  # seconds for the server to become ready

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s}")


@dataclass
class VLLMServerOptions(ServedOptions):
    port: Optional[int] = None  # null: a free port; a taken port is an error
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0  # one request (a long generation on a busy CPU takes minutes)
    max_concurrency: int = 16  # HTTP requests in flight
    extra_args: list[str] = field(default_factory=list)  # more `vllm serve` flags

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")


class TritonServer(str, Enum):
    auto = "auto"  # vllm where tritonserver with its vLLM backend is installed, else pytriton
    pytriton = "pytriton"  # the device's backend inside PyTriton
    vllm = "vllm"  # tritonserver's vLLM backend (GPU hosts)


@dataclass
class TritonOptions(ServedOptions):
    http_port: Optional[int] = None  # null: a free port; a taken port is an error
    grpc_port: Optional[int] = None
    metrics_port: Optional[int] = None
    model_name: str = "rm_runner"
    max_batch_size: int = 64  # Triton's max batch; its dynamic batcher merges requests up to it
    max_queue_delay_us: int = 2000
    request_timeout_s: float = 600.0
    server: TritonServer = TritonServer.auto

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.max_batch_size < self.batch_size:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be >= batch_size={self.batch_size}")


@dataclass
class TorchServeOptions(ServedOptions):
    inference_port: Optional[int] = None  # null: a free port; a taken port is an error
    management_port: Optional[int] = None
    metrics_port: Optional[int] = None
    grpc_inference_port: Optional[int] = None
    grpc_management_port: Optional[int] = None
    model_name: str = "rm_runner"
    response_timeout_s: int = 600


# The engine group's options: the engine each names, and its schema.
ENGINES: dict[str, tuple[str, type]] = {
    "local": ("rm_runner.engines.local.LocalEngine", LocalOptions),
    "vllm": ("rm_runner.engines.vllm.VLLMServerEngine", VLLMServerOptions),
    "triton": ("rm_runner.engines.triton.TritonEngine", TritonOptions),
    "torchserve": ("rm_runner.engines.torchserve.TorchServeEngine", TorchServeOptions),
}
