"""Rebellions RBLN NPU backend through optimum-rbln (compile with ``export=True``, then run).

Without the SDK (optimum-rbln and Rebellions' ``rebel-compiler``) ``is_available`` names the
missing piece and the install command instead of failing inside a model load.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rm_runner.backends.base import Availability, Backend, BackendOptions

log = logging.getLogger(__name__)

INSTALL_OPTIMUM = "pip install 'rm-runner[rbln]'"
INSTALL_COMPILER = "install rebel-compiler from Rebellions' package index (it is not on PyPI)"


@dataclass
class RBLNOptions(BackendOptions):
    # Each maps to optimum-rbln's `rbln_<name>` keyword; null keeps optimum-rbln's default.
    batch_size: int = 1
    max_seq_len: Optional[int] = None
    num_devices: Optional[int] = None
    device: Optional[list[int]] = None
    kvcache_block_size: Optional[int] = None
    kvcache_partition_len: Optional[int] = None
    prefill_chunk_size: Optional[int] = None
    attn_impl: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def rbln_kwargs(self, max_model_len: int) -> dict[str, Any]:
        kwargs = {
            "rbln_batch_size": self.batch_size,
            "rbln_max_seq_len": self.max_seq_len or max_model_len,
            "rbln_num_devices": self.num_devices,
            "rbln_device": self.device,
            "rbln_kvcache_block_size": self.kvcache_block_size,
            "rbln_kvcache_partition_len": self.kvcache_partition_len,
            "rbln_prefill_chunk_size": self.prefill_chunk_size,
            "rbln_attn_impl": self.attn_impl,
        }
        kwargs.update({f"rbln_{k}": v for k, v in self.extra.items()})
        return {k: v for k, v in kwargs.items() if v is not None}


class RBLNBackend(Backend):
    name = "rbln"
    priority = 400
    options_class = RBLNOptions

    @classmethod
    def is_available(cls) -> Availability:
        if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.rbln") is None:
            return Availability(False, "optimum-rbln is not installed", INSTALL_OPTIMUM)
        if importlib.util.find_spec("rebel") is None:
            return Availability(False, "the RBLN compiler (python module 'rebel') is not installed", INSTALL_COMPILER)
        import rebel

        try:
            count = rebel.get_npu_count() if hasattr(rebel, "get_npu_count") else None
        except Exception as exc:  # the driver reports its own failures
            return Availability(False, f"the RBLN driver did not answer: {exc}", "check `rbln-stat`")
        if count == 0:
            return Availability(False, "no RBLN NPU found (rebel.get_npu_count() == 0)", "check `rbln-stat`")
        return Availability(True)

    def initialize(self) -> None:
        log.info("rbln backend: options %s", self.options)

    def prepare_model(self, model: Any, model_config: Any) -> Any:
        """Compile the checkpoint for the NPU (or load an already compiled folder)."""
        from optimum.rbln import RBLNAutoModelForCausalLM

        if not isinstance(model, (str, Path)):
            model = model.name_or_path
        compiled = (Path(model) / "rbln_config.json").exists()
        kwargs = {} if compiled else self.options.rbln_kwargs(model_config.max_model_len)
        log.info("rbln: %s %s", "loading compiled" if compiled else "compiling", model)
        return RBLNAutoModelForCausalLM.from_pretrained(str(model), export=not compiled, **kwargs)

    def execute(self, model: Any, inputs: dict[str, Any], method: str = "generate", **kwargs: Any) -> Any:
        seed = kwargs.pop("seed", None)
        if seed is not None:
            import torch

            torch.manual_seed(seed)
        if method == "forward":
            return model(**inputs, **kwargs)
        return model.generate(**inputs, **kwargs)

    def cleanup(self) -> None:
        import gc

        gc.collect()
