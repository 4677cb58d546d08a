"""Where a sweep writes: ``outputs/sweeps/<its command line>``, so the same sweep run again lands
in the same directory and finds its finished jobs (see ``sweep/job.py``).

The name is computed once, in the process that launches the sweep, from its command line, and
cached in the config (OmegaConf's resolver cache); Hydra copies that cache into every job's
config, so jobs that resolve ``hydra.sweep.dir`` elsewhere (submitit, Ray) agree with it.
"""

from __future__ import annotations

import hashlib
import re
import sys
from typing import Optional

from omegaconf import OmegaConf

def sweep_name(overrides: list[str]) -> str:
    """A readable, filesystem-safe name for a sweep's overrides (their order kept out)."""
    items = sorted(o for o in overrides if not o.startswith(("hydra.", "hydra/", "sweep.force")))
    text = "_".join(items) or "defaults"
    safe = re.sub(r"[^A-Za-z0-9=,.+-]+", "-", text).strip("-")
    if len(safe) > 80:
        safe = f"{safe[:64]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    return safe


def command_line_overrides(argv: Optional[list[str]] = None) -> list[str]:
    from rm_runner.config import command_line

    return list(command_line(sys.argv[1:] if argv is None else argv).overrides)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("rm_runner.sweep_name"):
        OmegaConf.register_new_resolver("rm_runner.sweep_name", lambda: sweep_name(command_line_overrides()),
                                        use_cache=True)
