"""One sweep job, run in a process of its own.

Hydra's launcher calls the task once per job; in a multirun the task does not run the job
itself but starts ``python -m rm_runner <the job's overrides>`` into the job's directory and
waits for it (blocking, no polling), so one job's memory, threads and failures never reach the
next, and the launcher (basic, submitit, Ray) is whatever Hydra was told. A job whose directory
already holds an ``ok`` run of the same config is skipped unless ``sweep.force=true``; a device
that is not available here is recorded by the child as ``skipped`` with the reason.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rm_runner.reexec import run_with
from rm_runner.rundir import CONFIG, read_status, record_exit

log = logging.getLogger(__name__)

# Overrides that steer the sweep itself; they do not change what a job computes.
SWEEP_KEYS = ("sweep.force",)


def job_overrides(overrides: list[str]) -> list[str]:
    """The overrides that say what a job computes (those steering the sweep left out)."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in SWEEP_KEYS]


def run_isolated(cfg: DictConfig, job_dir: Path, overrides: list[str], job_num: int) -> str:
    """Run one job in a child process; returns its status (ok, skipped, failed, or done before)."""
    if not cfg.sweep.force and completed(cfg, job_dir):
        log.info("job %d (%s): already completed in %s; skipped (sweep.force=true reruns it)",
                 job_num, " ".join(overrides) or "defaults", job_dir)
        return "done before"
    args = job_overrides(overrides)
    log.info("job %d (%s): running in its own process", job_num, " ".join(args) or "defaults")
    code = run_with(sys.executable, [*args, "on_unavailable=skip"], job_dir)
    status = _status(job_dir)
    if code != 0 and status.get("status") in (None, "running", "died"):  # it died before it could say why
        status = record_exit(job_dir, code)
    log.info("job %d: %s%s", job_num, status.get("status"), f" ({status['reason']})" if status.get("reason") else "")
    return str(status.get("status"))


def _status(job_dir: Path) -> dict[str, Any]:
    return read_status(job_dir) or {}


def completed(cfg: DictConfig, job_dir: Path) -> bool:
    """An ``ok`` run of exactly this config (sweep settings aside) is already in ``job_dir``."""
    from rm_runner.config import validated
    from rm_runner.errors import ConfigError

    if _status(job_dir).get("status") != "ok" or not (job_dir / CONFIG).exists():
        return False
    try:
        wanted = OmegaConf.to_container(validated(cfg), enum_to_str=True)
    except ConfigError:
        return False  # the child reports it
    done = OmegaConf.to_container(OmegaConf.load(job_dir / CONFIG), enum_to_str=True)
    for section in (wanted, done):
        section.pop("sweep", None)
        section.pop("on_unavailable", None)
    return wanted == done
