"""The backend registry: entry points, priorities, and device=auto's recorded choice."""

from __future__ import annotations

import json
from pathlib import Path

from rm_runner.backends import registry
from rm_runner.backends.gpu import GPUBackend
from rm_runner.backends.rbln import RBLNBackend
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
