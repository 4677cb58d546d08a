"""Patch ``from_pretrained`` so models loaded by unchanged user code come back as ModelProxy.

Both the Auto class and ``PreTrainedModel`` are patched (a model class may be used
directly); a depth counter makes the outermost call the only one that wraps. Deactivating
puts back exactly what was there: the class's own attribute, or none (inherited).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from rm_runner.hooks.controller import DeviceController
from rm_runner.hooks.proxy import ModelProxy

_MISSING = object()
_local = threading.local()


def _targets() -> list[type]:
    from transformers import AutoModelForCausalLM, PreTrainedModel

    return [AutoModelForCausalLM, PreTrainedModel]


class TransformersHook:
    def __init__(self, controller: DeviceController) -> None:
        self.controller = controller
        self._saved: dict[type, Any] = {}

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def enable(self) -> None:
        if self.active:
            return
        for cls in _targets():
            own = cls.__dict__.get("from_pretrained", _MISSING)
            self._saved[cls] = own
            original = cls.from_pretrained.__func__  # the function behind the (inherited) classmethod
            setattr(cls, "from_pretrained", classmethod(self._wrap(original)))

    def disable(self) -> None:
        for cls, own in self._saved.items():
            if own is _MISSING:
                delattr(cls, "from_pretrained")
            else:
                setattr(cls, "from_pretrained", own)
        self._saved.clear()

    def _wrap(self, original: Any) -> Any:
        controller = self.controller

        @functools.wraps(original)
        def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
            depth = getattr(_local, "depth", 0)
            _local.depth = depth + 1
            try:
                model = original(cls, *args, **kwargs)
            finally:
                _local.depth = depth
            if depth or controller.backend is None or isinstance(model, ModelProxy):
                return model
            proxy = ModelProxy(model, controller.backend)
            controller.track(proxy)
            return proxy

        return from_pretrained
