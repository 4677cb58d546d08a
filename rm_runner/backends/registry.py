"""Backends are found through the entry-point group ``rm_runner.backends``.

The built-in ones are declared there too (pyproject.toml), so a third-party device is a
package with one entry point, never an edit here. This module is the only place that
chooses between devices.

A registration that cannot be used (it fails to import, is not a ``Backend`` class, lacks
``name`` or ``priority``, or its name is registered by two distributions) never breaks a run
that does not involve it: every run lists the backends (its environment record), and one bad
package must not take every device down. A run that names it (``device.name``,
``parity.reference_device``) fails with what is wrong and in which distribution. ``device=auto``
follows vLLM's platform discovery, which logs and skips a plugin that fails to load and raises
rather than guess when two plugins claim the platform ("Only one platform plugin can be
activated"): a broken plugin is passed over (logged, and recorded with its reason), and two
claims to one name are an error, because either pick could run the wrong device. A missing
priority gets no default: a guessed rank would silently put an NPU below the CPU, or a test stub
above every GPU.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from rm_runner.backends.base import Availability, Backend
from rm_runner.errors import ConfigError, DeviceUnavailableError

GROUP = "rm_runner.backends"
# Each backend class must set these; device=auto orders by priority (NPU 400 > GPU 300 > CPU 100 > Remote 0).
REQUIRED = ("name", "priority")
log = logging.getLogger(__name__)
_warned: set[str] = set()


@dataclass
class Registrations:
    """What the entry points hold: the usable backends and, by name, why the others are not."""

    classes: dict[str, type[Backend]] = field(default_factory=dict)  # highest priority first
    broken: dict[str, str] = field(default_factory=dict)
    ambiguous: dict[str, str] = field(default_factory=dict)

    def problem(self, name: str) -> str | None:
        return self.broken.get(name) or self.ambiguous.get(name)


def _origin(ep: EntryPoint) -> str:
    dist = ep.dist
    return f"{dist.name} {dist.version}" if dist is not None else "an unnamed distribution"


def _contract_problem(ep: EntryPoint, cls: Any) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        return f"{ep.value} is not a subclass of rm_runner.backends.base.Backend"
    missing = [attr for attr in REQUIRED if not hasattr(cls, attr)]
    if missing:
        return (f"{ep.value} has no class attribute {' or '.join(missing)}; set it on the class "
                "(priority: NPU 400, GPU 300, CPU 100, Remote 0; device=auto takes the highest available)")
    if not isinstance(cls.priority, numbers.Real) or isinstance(cls.priority, bool):
        return f"{ep.value}.priority is {cls.priority!r}; set it to a number (NPU 400, GPU 300, CPU 100, Remote 0)"
    return None


def registrations() -> Registrations:
    """Every entry point of ``GROUP``, loaded and checked; never raises (see the module docstring)."""
    claims: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=GROUP):  # one entry per distribution name: a copy found twice on the path is one
        claims.setdefault(ep.name, []).append(ep)
    found = Registrations()
    usable: dict[str, type[Backend]] = {}
    for name, eps in claims.items():
        if len(eps) > 1:
            who = " and ".join(f"{_origin(ep)} ({ep.value})" for ep in eps)
            found.ambiguous[name] = (f"backend {name!r} is registered by {len(eps)} distributions, {who}; "
                                     "uninstall all but one (pip uninstall DISTRIBUTION)")
            continue
        (ep,) = eps
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            found.broken[name] = f"backend plugin {name!r} ({_origin(ep)}) failed to load: {exc}"
            continue
        problem = _contract_problem(ep, cls)
        if problem:
            found.broken[name] = f"backend plugin {name!r} ({_origin(ep)}) is not usable: {problem}"
            continue
        usable[name] = cls
    found.classes = dict(sorted(usable.items(), key=lambda item: -item[1].priority))
    for reason in [*found.broken.values(), *found.ambiguous.values()]:
        if reason not in _warned:  # listed several times a run: said once
            _warned.add(reason)
            log.warning("%s", reason)
    return found


def backend_classes() -> dict[str, type[Backend]]:
    """Every usable registered backend by name, highest priority first."""
    return registrations().classes


def check_registered(name: str, field: str, allow_auto: bool = False) -> dict[str, type[Backend]]:
    """The registered backends, once ``name`` (the value of ``field``) is among them and usable: said
    before anything loads, naming the field the user wrote."""
    found = registrations()
    problem = found.problem(name)
    if problem:
        raise ConfigError(f"{field}={name}: {problem}")
    known = ["auto", *found.classes] if allow_auto else list(found.classes)
    if name not in known:
        raise ConfigError(f"{field}={name} is not a registered backend; registered: {', '.join(known)}")
    return found.classes


def get(name: str, options: dict[str, Any] | None = None) -> Backend:
    """Build the backend registered as ``name`` (``device=plugin device.name=NAME``)."""
    return check_registered(name, "device.name")[name](**(options or {}))


def configured_options(device: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """Where a composed ``device`` config keeps the options its backend is built with, and those options:
    ``device.options`` for ``device=plugin`` (``get`` takes them as one mapping), else the node itself.
    Read without building the backend: a plugin may be importable only in its own ``python``."""
    if device.get("_target_") == f"{__name__}.{get.__name__}":
        return "device.options", device.get("options") or {}
    return "device", device


def _candidate(cls: type[Backend], options: dict[str, Any]) -> tuple[Backend | None, Availability]:
    """``cls`` built with the options given to auto, and its availability with them (a mode may need
    more than the class does); a backend that does not take those options is not a candidate."""
    try:
        backend = cls(**options)
    except ConfigError as exc:
        return None, Availability(False, str(exc))
    return backend, backend.availability()


def auto(**options: Any) -> Backend:
    """The highest-priority backend available here with ``options``, with the reasons the others were
    passed over."""
    found = registrations()
    if found.ambiguous:
        raise ConfigError(f"device=auto cannot choose: {'; '.join(found.ambiguous.values())}")
    selection: list[dict[str, Any]] = []
    chosen: Backend | None = None
    for name, cls in found.classes.items():
        if chosen is not None:
            selection.append({"name": name, "priority": cls.priority, "chosen": False, "reason": "lower priority"})
            continue
        backend, availability = _candidate(cls, options)
        selection.append(
            {"name": name, "priority": cls.priority, "chosen": availability.ok, "reason": availability.describe()}
        )
        if availability.ok:
            chosen = backend
    selection += [{"name": name, "priority": None, "chosen": False, "reason": reason}
                  for name, reason in found.broken.items()]
    reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in selection)
    if chosen is None:
        raise DeviceUnavailableError(f"device=auto found no available backend ({reasons})")
    chosen.selection = selection
    log.info("device=auto chose %s (%s)", chosen.name, reasons)
    return chosen


def by_name(device: str, **options: Any) -> Backend:
    """``auto`` or a registered name, as the Python API takes it (``rm_runner.activate("gpu")``)."""
    return auto(**options) if device == "auto" else get(device, options)
