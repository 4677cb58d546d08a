"""A job whose device names its own environment (``device.python``; ``device.options.python`` for
``device=plugin``) runs there.

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
from rm_runner.backends.registry import configured_options
from rm_runner.config import quote_override
from rm_runner.errors import ConfigError


def interpreter(cfg: DictConfig) -> Optional[str]:
    """The interpreter this job must run in, when it is not this one: the ``python`` option the device's
    backend is built with, which is where the doctor and the dry run look too."""
    if "device" not in cfg:
        return None
    section, options = configured_options(cfg.device)
    python = options.get("python")
    if not python:
        return None
    path = pyenv.resolve(python)
    if os.path.abspath(path) == os.path.abspath(sys.executable):  # venv pythons are symlinks: no resolve()
        return None
    if not pyenv.exists(path):
        raise ConfigError(f"{section}.python={python} does not exist; create that venv (see `rm-runner-doctor`) "
                          f"or set {section}.python=null to run in this one")
    return path


def config_search_args() -> list[str]:
    """This run's own config folders (``--config-dir``, ``hydra.searchpath``), to hand to a child run."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    args = [f"--config-dir={source.path}" for source in hydra_cfg.runtime.config_sources
            if source.provider == "command-line" and source.schema == "file"]
    paths = [str(p) for p in hydra_cfg.searchpath]
    return args + ([f"hydra.searchpath=[{','.join(quote_override(p) for p in paths)}]"] if paths else [])


def run_with(python: str, overrides: list[str], run_dir: Path) -> int:
    """``python -m rm_runner OVERRIDES`` into ``run_dir``, finding recipes where this run found them."""
    proc = subprocess.Popen([python, "-m", "rm_runner", *config_search_args(), *overrides,
                             f"hydra.run.dir={quote_override(str(run_dir))}"])
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C / SIGTERM: the job goes too
        proc.terminate()
        proc.wait()
        raise
