"""What a run ran on: Python, packages, hardware and the source revision.

Captured without importing torch or transformers (versions come from package metadata), so
recording the environment never changes what was imported or how long it took.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import psutil

# rm_runner's own stack; each backend and engine adds the packages it declares (``packages``).
CORE_PACKAGES = (
    "rm-runner", "torch", "transformers", "tokenizers", "accelerate", "safetensors", "gguf",
    "hydra-core", "omegaconf", "numpy",
)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "neon", "asimd")


def capture() -> dict[str, Any]:
    from rm_runner.backends.registry import backend_classes

    backends = backend_classes()
    declared = [p for cls in [*backends.values(), *engine_classes()] for p in cls.packages]
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": _packages(dict.fromkeys([*CORE_PACKAGES, *declared])),
        "cpu": cpu_info(),
        "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 2),
        "devices": devices_present(backends),
        "git": _git(Path(__file__).resolve().parent.parent),
        "env": recorded_env(os.environ),
    }


RECORDED_PREFIXES = ("HF_", "CUDA_VISIBLE", "RBLN_", "OMP_", "VLLM_")
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "AUTH")


def recorded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables that change how a run behaves; credentials (HF_TOKEN...) never reach the run directory."""
    return {k: v for k, v in environ.items()
            if k.startswith(RECORDED_PREFIXES) and not any(word in k.upper() for word in SECRET_WORDS)}


def engine_classes() -> list[type]:
    """The engines of the shipped ``engine`` config group (read from their ``_target_``, nothing composed)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    return [get_class(OmegaConf.load(path)._target_)
            for path in sorted((Path(__file__).parent / "conf" / "engine").glob("*.yaml"))]


def devices_present(backends: Mapping[str, Any]) -> dict[str, Any]:
    """Each device kind's hardware here, as its backend finds it (the vendor's tools, no SDK import)."""
    return {name: cls.hardware() for name, cls in backends.items()}


def _packages(names: Iterable[str]) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found


def cpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and "model" not in info:
            info["model"] = value.strip()
        if key.strip() in ("flags", "Features") and "flags" not in info:
            present = set(value.split())
            info["flags"] = [f for f in CPU_FLAGS if f in present]
    return info


def _git(where: Path) -> dict[str, Any] | None:
    git = shutil.which("git")
    if not git:
        return None
    try:
        top = subprocess.run([git, "-C", str(where), "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != where:
            return None  # an installed copy, not a checkout: no commit to report
        head = subprocess.run([git, "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            [git, "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
