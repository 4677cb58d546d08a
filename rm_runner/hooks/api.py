"""``rm_runner.activate / deactivate / switch_device``: one controller per process."""

from __future__ import annotations

from typing import Any

from rm_runner.backends.base import Backend
from rm_runner.hooks.controller import DeviceController
from rm_runner.hooks.transformers_hook import TransformersHook

_controller = DeviceController()
_hook = TransformersHook(_controller)


class Activation:
    """Returned by ``activate``; as a context manager it deactivates on exit."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def __enter__(self) -> Backend:
        return self.backend

    def __exit__(self, *exc: Any) -> None:
        deactivate()


def activate(device: str | Backend = "auto", **options: Any) -> Activation:
    backend = _controller.activate(device, **options)
    _hook.enable()
    return Activation(backend)


def switch_device(device: str | Backend, **options: Any) -> Backend:
    if _controller.backend is None:
        raise RuntimeError("rm_runner.switch_device() before rm_runner.activate()")
    return _controller.switch_device(device, **options)


def deactivate() -> None:
    _hook.disable()
    _controller.deactivate()


def active_backend() -> Backend | None:
    return _controller.backend
