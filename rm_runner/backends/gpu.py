"""GPU backend: transformers on CUDA through PyTorch."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

from rm_runner.backends.base import Availability, BackendOptions
from rm_runner.backends.transformers_torch import TransformersTorchBackend

log = logging.getLogger(__name__)

INSTALL = "on a host with an NVIDIA GPU and driver, install a CUDA build of torch, then pip install 'rm-runner[gpu]'"


@dataclass
class GPUOptions(BackendOptions):
    # CUDA device ordinal, as in torch's `cuda:N` (after CUDA_VISIBLE_DEVICES).
    device_id: int = 0


class GPUBackend(TransformersTorchBackend):
    name = "gpu"
    priority = 300
    options_class = GPUOptions
    supported_dtypes = ("bfloat16", "float16", "float32")
    default_dtype = "bfloat16"

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
