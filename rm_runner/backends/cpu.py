"""CPU backend: transformers on PyTorch's CPU path."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Optional

from rm_runner.backends.base import Availability, BackendOptions
from rm_runner.backends.transformers_torch import TransformersTorchBackend

log = logging.getLogger(__name__)


@dataclass
class CPUOptions(BackendOptions):
    # Intra-op threads for matrix multiplies; null keeps PyTorch's default (one per core).
    num_threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or null, got {self.num_threads}")


class CPUBackend(TransformersTorchBackend):
    name = "cpu"
    priority = 100
    options_class = CPUOptions
    # bfloat16 runs everywhere but is only fast with native bf16 (AVX512-BF16 / AMX).
    supported_dtypes = ("float32", "bfloat16")
    default_dtype = "float32"

    @classmethod
    def is_available(cls) -> Availability:
        for module, package in (("torch", "torch"), ("transformers", "transformers")):
            if importlib.util.find_spec(module) is None:
                return Availability(False, f"{package} is not installed", "pip install rm-runner")
        return Availability(True)

    def torch_device(self) -> str:
        return "cpu"

    def initialize(self) -> None:
        import torch

        if self.options.num_threads:
            torch.set_num_threads(self.options.num_threads)
        log.info("cpu backend: %d threads", torch.get_num_threads())
