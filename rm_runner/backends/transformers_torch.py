"""Shared by the backends that run on a PyTorch device (CPU, CUDA): transformers or in-process vLLM.

In ``pytorch`` mode ``execute`` is Hugging Face's own ``generate()``, so outputs are exactly
what user code gets from transformers; in ``vllm`` mode the same inputs go through
``vllm.LLM`` and come back in the same form. The backends differ in device, dtypes, set-up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Optional

from rm_runner.backends import hf_generate, vllm_inprocess
from rm_runner.backends.base import Backend, OnStep
from rm_runner.backends.vllm_inprocess import VLLMModel
from rm_runner.errors import ConfigError, RunnerError
from rm_runner.requests import GenerationRequest

log = logging.getLogger(__name__)


class TransformersTorchBackend(Backend):
    supported_dtypes: ClassVar[tuple[str, ...]]
    default_dtype: ClassVar[str]

    def torch_device(self) -> str:
        raise NotImplementedError

    def uses_vllm(self) -> bool:
        """True when this backend runs models through in-process vLLM instead of transformers."""
        return False

    def vllm_engine_args(self) -> dict[str, Any]:
        return {}

    def generate_defaults(self, model: Any, inputs: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """``generate()`` keywords this device adds to this call unless the caller sets them."""
        return {}

    @staticmethod
    def caller_manages_cache(kwargs: dict[str, Any]) -> bool:
        """True when a ``generate()`` call brings its own cache or turns caching off: a device's
        cache default must then stay out (transformers refuses a cache object beside
        ``cache_implementation``)."""
        return bool({"cache", "past_key_values"} & kwargs.keys() or kwargs.get("cache_implementation")
                    or kwargs.get("use_cache") is False)

    def dtype_name(self, dtype: Any) -> str:
        name = getattr(dtype, "value", dtype)
        if name == "auto":
            name = self.default_dtype
        if name not in self.supported_dtypes:
            raise ConfigError(
                f"model.dtype={name} is not supported on device {self.name}; "
                f"use one of: {', '.join(self.supported_dtypes)}"
            )
        return name

    def prepare_model(self, model: Any, model_config: Any) -> Any:
        """Load from a local directory (or take a loaded model), cast, move and switch to eval.

        A caller's model is never converted in place (``Module.to`` is in place): the hook's user keeps
        their weights as given however many devices and dtypes the model visits (see ``converted``).
        """
        if self.uses_vllm():
            return vllm_inprocess.load(model, model_config, self.dtype_name(model_config.dtype),
                                       **self.vllm_engine_args())
        import torch
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, self.dtype_name(model_config.dtype))
        device = torch.device(self.torch_device())
        if isinstance(model, (str, Path)):
            model = AutoModelForCausalLM.from_pretrained(
                str(model), dtype=dtype, trust_remote_code=model_config.trust_remote_code
            ).to(device)
        else:
            model = converted(model, dtype, device)
        model.eval()
        return model

    def describe(self) -> dict[str, Any]:
        """The options as configured, and the mode that runs (``mode: auto`` resolves to one of them)."""
        return {**super().describe(), "mode": "vllm" if self.uses_vllm() else "pytorch"}

    def streams(self, model: Any) -> bool:
        return not isinstance(model, VLLMModel)

    def running_batch(self, model: Any) -> Any:
        """transformers' model stepped row by row (in-process vLLM schedules for itself: None)."""
        if isinstance(model, VLLMModel):
            return None
        from rm_runner.backends.running_batch import RunningBatch

        return RunningBatch(model, lambda: self.step_cache(model), packs=self.packs_steps(model))

    def packs_steps(self, model: Any) -> bool:
        """Whether a step can run joining rows' prompts with the running rows' tokens (a backend's
        own forward does it: ``CPUBackend``); transformers' forward takes one padded batch."""
        return False

    def step_cache(self, model: Any) -> Any:
        """An empty KV cache for a running batch's prefill."""
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def generate(self, model: Any, request: GenerationRequest, on_step: Optional[OnStep] = None) -> list[list[int]]:
        if isinstance(model, VLLMModel):
            return vllm_inprocess.generate(model, request)
        return super().generate(model, request, on_step)

    def execute(self, model: Any, inputs: dict[str, Any], method: str = "generate", **kwargs: Any) -> Any:
        """``model.generate(**inputs, **kwargs)`` (or the forward pass, for logits) under inference mode.

        ``seed`` seeds sampling.
        """
        if isinstance(model, VLLMModel):  # transformers code (the hook) on in-process vLLM
            if method == "forward":
                raise RunnerError(f"device={self.name} in vllm mode returns tokens, not logits; use device.mode=pytorch")
            request = hf_generate.request_of_call(inputs, kwargs, f"device={self.name} in vllm mode")
            return hf_generate.as_sequences(inputs, vllm_inprocess.generate(model, request), request.pad_token_id)
        import torch

        seed = kwargs.pop("seed", None)
        if seed is not None:
            torch.manual_seed(seed)
        device = model.device
        moved = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.inference_mode():
            if method == "forward":
                return model(**moved, **kwargs)
            return model.generate(**moved, **{**self.generate_defaults(model, moved, kwargs), **kwargs})

    def cleanup(self) -> None:
        import gc

        gc.collect()


def converted(model: Any, dtype: Any, device: Any) -> Any:
    """``model`` with its floating-point tensors in ``dtype`` and all on ``device`` (what ``Module.to``
    gives), leaving ``model`` itself as it was.

    Nothing is copied when nothing needs converting (a float32 CPU model on the CPU is used as is).
    Otherwise the copy is built around parameters and buffers converted straight from the originals,
    so they cost their converted size only, never a second copy at the original size; one that needs
    no conversion is shared, and tied weights stay tied.
    """
    import copy

    import torch

    def floating(t: torch.Tensor) -> bool:
        return t.is_floating_point() or t.is_complex()

    def target(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype if floating(t) else None)

    if all(t.device == device and (t.dtype == dtype or not floating(t))
           for t in [*model.parameters(), *model.buffers()]):
        return model
    memo: dict[int, Any] = {}  # deepcopy takes these in place of the originals it meets
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = torch.nn.Parameter(target(p.detach()), requires_grad=p.requires_grad)
        for b in module._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = target(b)
    return copy.deepcopy(model, memo)
