"""The on-disk cache for models rm_runner builds itself (converted, generated).

An entry is built in a private temporary directory and renamed into place under a file
lock, so two runs converting at once build it once, and an interrupted build never leaves
a folder that looks complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock


def cache_root() -> Path:
    """``$RM_RUNNER_CACHE``, else ``$XDG_CACHE_HOME/rm_runner``, else ``~/.cache/rm_runner``."""
    if os.environ.get("RM_RUNNER_CACHE"):
        return Path(os.environ["RM_RUNNER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rm_runner"


def cached(path: Path, build: Callable[[Path], None]) -> Path:
    """Return ``path``, calling ``build(tmp_dir)`` to create it first if it is missing."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():  # built by another process while we waited
            return path
        for stale in path.parent.glob(path.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted build
        tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
