"""ModelProxy: a loaded Hugging Face model whose generate() and __call__() run on the active backend."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rm_runner.backends.base import Backend
from rm_runner.config import Dtype, ModelConfig


def model_config_of(model: Any) -> ModelConfig:
    """The run-config view of an already loaded model (its dtype, its length limit)."""
    dtype = str(getattr(model, "dtype", "float32")).removeprefix("torch.")
    config = getattr(model, "config", None)
    return ModelConfig(
        name=str(getattr(config, "name_or_path", "") or type(model).__name__),
        source=None,
        dtype=Dtype(dtype) if dtype in Dtype.__members__ else Dtype.auto,
        max_model_len=int(getattr(config, "max_position_embeddings", 2048) or 2048),
    )


class ModelProxy:
    """Everything but ``generate`` and ``__call__`` falls through to the real model."""

    def __init__(self, model: Any, backend: Backend) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_config", model_config_of(model))
        self._prepare_on(backend)

    def _prepare_on(self, backend: Backend) -> None:
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_prepared", backend.prepare_model(self._model, self._config))

    def use_dtype(self, dtype: Dtype | str) -> None:
        """Prepare in ``dtype`` from the next ``switch_device`` on (by default: the dtype it was loaded in)."""
        object.__setattr__(self, "_config", replace(self._config, dtype=Dtype(dtype)))

    @property
    def backend(self) -> Backend:
        return self._backend

    def generate(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
        inputs = {"input_ids": input_ids} if input_ids is not None else {}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        for key in ("inputs_embeds", "position_ids"):
            if key in kwargs:
                inputs[key] = kwargs.pop(key)
        return self._backend.execute(self._prepared, inputs, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs["input_ids"] = args[0]
        return self._backend.execute(self._prepared, kwargs, method="forward")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._model, name, value)

    def __repr__(self) -> str:
        return f"ModelProxy({type(self._model).__name__} on {self._backend.name})"
