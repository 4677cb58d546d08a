"""Backends are found through the entry-point group ``rm_runner.backends``.

The built-in ones are declared there too (pyproject.toml), so a third-party device is a
package with one entry point, never an edit here. This module is the only place that
chooses between devices.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

from rm_runner.backends.base import Backend
from rm_runner.errors import ConfigError, DeviceUnavailableError

GROUP = "rm_runner.backends"
log = logging.getLogger(__name__)


def backend_classes() -> dict[str, type[Backend]]:
    """Every registered backend by name, highest priority first."""
    found: dict[str, type[Backend]] = {}
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            log.warning("backend plugin %r failed to load: %s", ep.name, exc)
            continue
        found[ep.name] = cls
    return dict(sorted(found.items(), key=lambda item: -item[1].priority))


def check_registered(name: str, field: str, allow_auto: bool = False) -> dict[str, type[Backend]]:
    """The registered backends, once ``name`` (the value of ``field``) is among them: said before
    anything loads, naming the field the user wrote."""
    classes = backend_classes()
    known = ["auto", *classes] if allow_auto else list(classes)
    if name not in known:
        raise ConfigError(f"{field}={name} is not a registered backend; registered: {', '.join(known)}")
    return classes


def get(name: str, options: dict[str, Any] | None = None) -> Backend:
    """Build the backend registered as ``name`` (``device=plugin device.name=NAME``)."""
    return check_registered(name, "device.name")[name](**(options or {}))


def auto(**options: Any) -> Backend:
    """The highest-priority backend available here, with the reasons the others were passed over."""
    selection: list[dict[str, Any]] = []
    chosen: type[Backend] | None = None
    for name, cls in backend_classes().items():
        if chosen is not None:
            selection.append({"name": name, "priority": cls.priority, "chosen": False, "reason": "lower priority"})
            continue
        availability = cls.is_available()
        selection.append(
            {"name": name, "priority": cls.priority, "chosen": availability.ok, "reason": availability.describe()}
        )
        if availability.ok:
            chosen = cls
    if chosen is None:
        reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in selection)
        raise DeviceUnavailableError(f"device=auto found no available backend ({reasons})")
    backend = chosen(**options)
    backend.selection = selection
    log.info("device=auto chose %s (%s)", chosen.name, "; ".join(f"{s['name']}: {s['reason']}" for s in selection))
    return backend


def by_name(device: str, **options: Any) -> Backend:
    """``auto`` or a registered name, as the Python API takes it (``rm_runner.activate("gpu")``)."""
    return auto(**options) if device == "auto" else get(device, options)
