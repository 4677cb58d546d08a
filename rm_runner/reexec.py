"""A job whose device names its own environment (``device.python``) runs there.

The run starts in whatever Python the user typed; when the device's SDK lives in another venv
(its pins conflict with the rest), the same command is re-run with that interpreter into the
same run directory, and its exit code is this run's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from rm_runner import pyenv
from rm_runner.errors import ConfigError


def interpreter(cfg: DictConfig) -> Optional[str]:
    """The interpreter this job must run in, when it is not this one."""
    python = cfg.device.get("python") if "device" in cfg else None
    if not python:
        return None
    path = pyenv.resolve(python)
    if os.path.abspath(path) == os.path.abspath(sys.executable):  # venv pythons are symlinks: no resolve()
        return None
    if not pyenv.exists(path):
        raise ConfigError(f"device.python={python} does not exist; create that venv (see `rm-runner-doctor`) "
                          "or set device.python=null to run in this one")
    return path


def run_with(python: str, overrides: list[str], run_dir: Path) -> int:
    quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")  # override grammar: = and , need quotes
    proc = subprocess.Popen([python, "-m", "rm_runner", *overrides, f"hydra.run.dir='{quoted}'"])
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C / SIGTERM: the job goes too
        proc.terminate()
        proc.wait()
        raise
