"""The device controller: owns the active backend and re-prepares proxied models on a switch."""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from rm_runner.backends import registry
from rm_runner.backends.base import Backend
from rm_runner.errors import DeviceUnavailableError

if TYPE_CHECKING:
    from rm_runner.hooks.proxy import ModelProxy

log = logging.getLogger(__name__)


def build_backend(device: str | Backend, **options: Any) -> Backend:
    """A ready backend from a registered name (or ``auto``), or the instance given."""
    backend = device if isinstance(device, Backend) else registry.by_name(device, **options)
    availability = backend.availability()
    if not availability:
        raise DeviceUnavailableError(availability.unavailable(backend.name))
    return backend


class DeviceController:
    def __init__(self) -> None:
        self.backend: Backend | None = None
        self._proxies: weakref.WeakSet[ModelProxy] = weakref.WeakSet()

    def activate(self, device: str | Backend, **options: Any) -> Backend:
        if self.backend is not None:
            return self.switch_device(device, **options)
        backend = build_backend(device, **options)
        backend.initialize()
        self.backend = backend
        log.info("device %s active", backend.name)
        return backend

    def switch_device(self, device: str | Backend, **options: Any) -> Backend:
        """Clean up the old backend, initialise the new one, move every proxied model over."""
        new = build_backend(device, **options)  # fail before tearing anything down
        if self.backend is not None:
            self.backend.cleanup()
        new.initialize()
        self.backend = new
        for proxy in list(self._proxies):
            proxy._prepare_on(new)
        log.info("switched to device %s (%d models re-prepared)", new.name, len(self._proxies))
        return new

    def track(self, proxy: ModelProxy) -> None:
        self._proxies.add(proxy)

    def deactivate(self) -> None:
        if self.backend is not None:
            self.backend.cleanup()
        self.backend = None
        self._proxies = weakref.WeakSet()
