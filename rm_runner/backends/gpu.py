"""GPU backend: vLLM in this process, or transformers on CUDA through PyTorch.

``device_id`` picks the GPU on every path. PyTorch takes it as ``cuda:N``; vLLM has no device
option (it runs on the first ``tensor_parallel_size`` visible GPUs), so on its paths the device is
chosen through ``CUDA_VISIBLE_DEVICES``: in the server's environment, or in this process before
CUDA initialises (vLLM's engine and workers read it when they start).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

from rm_runner.backends.base import Availability, BackendOptions, tool_output
from rm_runner.backends.transformers_torch import TransformersTorchBackend
from rm_runner.errors import ConfigError

log = logging.getLogger(__name__)

INSTALL = "on a host with an NVIDIA GPU and driver, install a CUDA build of torch, then pip install 'rm-runner[gpu]'"


class GPUMode(str, Enum):
    auto = "auto"  # vllm when installed, else pytorch
    vllm = "vllm"
    pytorch = "pytorch"


@dataclass
class GPUOptions(BackendOptions):
    # CUDA device ordinal, as in torch's `cuda:N` (counted within CUDA_VISIBLE_DEVICES when it is set);
    # vllm mode and engine=vllm: the first of the tensor_parallel_size GPUs vLLM runs on.
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

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # In-process vLLM: the CUDA_VISIBLE_DEVICES initialize() set, and the one it replaced (None: unset),
        # which cleanup() puts back so a later backend in this process counts device_id as the user did.
        self.vllm_visible_devices: str | None = None
        self._narrowed = False
        self._visible_before: str | None = None

    def availability(self) -> Availability:
        if self.options.mode == GPUMode.vllm and importlib.util.find_spec("vllm") is None:
            return Availability(False, "device.mode=vllm but vLLM is not installed", "pip install 'rm-runner[gpu]'")
        found = self.is_available()
        if not found:
            return found
        import torch

        return self._fits(torch.cuda.device_count(), self.options.tensor_parallel_size if self.uses_vllm() else 1)

    def _fits(self, count: int, width: int) -> Availability:
        """Whether ``width`` GPUs from ``device_id`` on are among the ``count`` visible ones."""
        if self.options.device_id < 0 or self.options.device_id + width > count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            wants = (f"device.device_id={self.options.device_id} with device.tensor_parallel_size={width}"
                     if width > 1 else f"device.device_id={self.options.device_id}")
            return Availability(False, f"{wants} needs CUDA devices {self.options.device_id}.."
                                       f"{self.options.device_id + width - 1}, but {count} are visible{where}",
                                f"set device.device_id between 0 and {count - width} (counted within "
                                "CUDA_VISIBLE_DEVICES)" if count >= width else "run on a host with more GPUs")
        return Availability(True)

    def cuda_visible_devices(self) -> str:
        """The CUDA_VISIBLE_DEVICES that shows vLLM exactly this backend's GPUs, as its devices
        0..tensor_parallel_size-1: the ``device_id``-th visible device on (the existing
        CUDA_VISIBLE_DEVICES entries when it is set, GPU UUIDs included). Unset, the ids are the
        host's own: this process's torch need not see the GPUs a server's venv will (a CPU-only
        torch beside engine.python), and ``availability`` counts them where it can."""
        width = self.options.tensor_parallel_size
        current = os.environ.get("CUDA_VISIBLE_DEVICES")
        if current is None:
            return ",".join(str(i) for i in range(self.options.device_id, self.options.device_id + width))
        entries = [entry.strip() for entry in current.split(",") if entry.strip()]
        fits = self._fits(len(entries), width)
        if not fits:
            raise ConfigError(fits.describe())
        return ",".join(entries[self.options.device_id:self.options.device_id + width])

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

    def energy_meter(self, model_config: Any) -> Any:
        from rm_runner.benchmark.energy import NvmlMeter

        return NvmlMeter([self.options.device_id])

    def torch_device(self) -> str:
        return f"cuda:{self.options.device_id}"

    def initialize(self) -> None:
        if self.uses_vllm():
            self._show_vllm_its_devices()
            return
        import torch

        fits = self._fits(torch.cuda.device_count(), 1)
        if not fits:
            raise ConfigError(fits.describe())
        torch.cuda.set_device(self.options.device_id)
        log.info("gpu backend: pytorch on %s", torch.cuda.get_device_name(self.options.device_id))

    def _show_vllm_its_devices(self) -> None:
        """Narrow CUDA_VISIBLE_DEVICES to this backend's GPUs before vLLM starts. Once CUDA is initialised
        here, this process's devices are fixed and vLLM would take its first ones: only device_id=0 is
        then what the user asked for, so any other is refused rather than run on the wrong GPU."""
        import torch

        visible = self.cuda_visible_devices()
        if torch.cuda.is_initialized() and self.options.device_id != 0:
            current = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ConfigError(
                f"device.device_id={self.options.device_id} cannot reach in-process vLLM: CUDA is already "
                f"initialised in this process (CUDA_VISIBLE_DEVICES={current!r}), and vLLM runs on its first "
                f"GPU; run this device in a process of its own (python -m rm_runner device=gpu "
                f"device.device_id={self.options.device_id}), or start Python with CUDA_VISIBLE_DEVICES={visible} "
                "and device.device_id=0")
        if not self._narrowed:
            self._narrowed, self._visible_before = True, os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = self.vllm_visible_devices = visible
        log.info("gpu backend: vllm on CUDA_VISIBLE_DEVICES=%s", visible)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if self.vllm_visible_devices is not None:
            described["cuda_visible_devices"] = self.vllm_visible_devices
        return described

    def cleanup(self) -> None:
        super().cleanup()
        if self._narrowed:
            if self._visible_before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = self._visible_before
            self._narrowed = False
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
