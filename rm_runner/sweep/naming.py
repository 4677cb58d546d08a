"""Where a sweep writes: ``outputs/sweeps/<its command line>``, so the same sweep run again lands
in the same directory and finds its finished jobs (see ``sweep/job.py``)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from omegaconf import OmegaConf


def sweep_name(overrides: Any) -> str:
    """A readable, filesystem-safe name for a sweep's command-line overrides (order kept out)."""
    items = sorted(str(o) for o in (overrides or []) if not str(o).startswith(("hydra.", "sweep.force")))
    text = "_".join(items) or "defaults"
    safe = re.sub(r"[^A-Za-z0-9=,.+-]+", "-", text).strip("-")
    if len(safe) > 80:
        safe = f"{safe[:64]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    return safe


_first: list[str] = []


def _sweep_dir_name(overrides: Any) -> str:
    """The name computed from the sweep's overrides, kept for the process: the launcher resolves
    ``hydra.sweep.dir`` with the sweep's overrides first, each job later with its own."""
    if not _first:
        _first.append(sweep_name(overrides))
    return _first[0]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("rm_runner.sweep_name"):
        OmegaConf.register_new_resolver("rm_runner.sweep_name", _sweep_dir_name)
