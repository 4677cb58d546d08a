"""GPU backend: transformers on CUDA through PyTorch."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

from rm_runner.backends.base import Availability, BackendOptions, VLLMServerSettings, tool_output
from rm_runner.backends.transformers_torch import TransformersTorchBackend

log = logging.getLogger(__name__)

INSTALL = "on a host with an NVIDIA GPU and driver, install a CUDA build of torch, then pip install 'rm-runner[gpu]'"


class GPUMode(str, Enum):
    auto = "auto"  # vllm when installed, else pytorch
    vllm = "vllm"
    pytorch = "pytorch"


@dataclass
class GPUOptions(BackendOptions):
    # CUDA device ordinal, as in torch's `cuda:N` (after CUDA_VISIBLE_DEVICES).
    device_id: int = 0
    mode: GPUMode = GPUMode.auto
    # pytorch mode: a static KV cache, which makes transformers compile the decode step with
    # CUDA graphs (one compile per shape, then several times faster at small batch).
    static_cache: bool = True
    # vllm mode, as vLLM's own arguments
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False


class GPUBackend(TransformersTorchBackend):
    name = "gpu"
    priority = 300
    options_class = GPUOptions
    packages = ("torch", "transformers", "vllm")
    vllm_install = "on a CUDA host: pip install 'rm-runner[gpu]'"
    supported_dtypes = ("bfloat16", "float16", "float32")
    default_dtype = "bfloat16"

    @classmethod
    def hardware(cls) -> list[str]:
        """Name, memory and driver of each GPU, from nvidia-smi."""
        out = tool_output("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader") or ""
        return [f"{name.strip()}, {memory.strip()}, driver {driver.strip()}"
                for name, memory, driver in (line.split(",") for line in out.splitlines() if line.count(",") == 2)]

    @classmethod
    def is_available(cls) -> Availability:
        if importlib.util.find_spec("torch") is None:
            return Availability(False, "torch is not installed", INSTALL)
        import torch

        if torch.version.cuda is None:
            return Availability(
                False, f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)", INSTALL
            )
        count = torch.cuda.device_count()
        if count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = f" with CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
            return Availability(False, f"no CUDA device visible (torch.cuda.device_count() == 0{where})", INSTALL)
        return Availability(True)

    def availability(self) -> Availability:
        if self.options.mode == GPUMode.vllm and importlib.util.find_spec("vllm") is None:
            return Availability(False, "device.mode=vllm but vLLM is not installed", "pip install 'rm-runner[gpu]'")
        return self.is_available()

    def uses_vllm(self) -> bool:
        if self.options.mode == GPUMode.auto:
            return importlib.util.find_spec("vllm") is not None
        return self.options.mode == GPUMode.vllm

    def vllm_engine_args(self) -> dict[str, Any]:
        return {
            "tensor_parallel_size": self.options.tensor_parallel_size,
            "gpu_memory_utilization": self.options.gpu_memory_utilization,
            "enforce_eager": self.options.enforce_eager,
        }

    def vllm_server_settings(self, model_path: Any, model_config: Any) -> VLLMServerSettings:
        args = ["--dtype", self.dtype_name(model_config.dtype),
                "--tensor-parallel-size", str(self.options.tensor_parallel_size),
                "--gpu-memory-utilization", str(self.options.gpu_memory_utilization)]
        if self.options.enforce_eager:
            args.append("--enforce-eager")
        return VLLMServerSettings(model=model_path, args=args)

    def generate_defaults(self, model: Any, inputs: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        if not self.options.static_cache or self.caller_manages_cache(kwargs):
            return {}
        return {"cache_implementation": "static"}

    def device_memory(self) -> dict[str, float] | None:
        import torch

        if not torch.cuda.is_initialized():
            return None
        index = self.options.device_id
        return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(index) / 2**30, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(index) / 2**30, 3)}

    def torch_device(self) -> str:
        return f"cuda:{self.options.device_id}"

    def initialize(self) -> None:
        import torch

        count = torch.cuda.device_count()
        if self.options.device_id >= count:
            from rm_runner.errors import ConfigError

            raise ConfigError(f"device.device_id={self.options.device_id} but only {count} CUDA device(s) are visible")
        torch.cuda.set_device(self.options.device_id)
        log.info("gpu backend: %s", torch.cuda.get_device_name(self.options.device_id))

    def cleanup(self) -> None:
        super().cleanup()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
