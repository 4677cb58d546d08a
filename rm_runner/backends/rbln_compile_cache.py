"""Compiled RBLN models, cached on disk under a key that says everything that shaped them.

The key covers the model (its resolved path and a fingerprint of config.json and the weight
files' names and sizes), every compile option, and the versions of optimum-rbln and the
compiler. vllm-rbln's own cache leaves the versions out, so a compiler upgrade would reuse
stale artifacts; this one recompiles instead.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from rm_runner.models.cache import cache_root, cached

log = logging.getLogger(__name__)

COMPILED_MARKER = "rbln_config.json"
VERSIONED = ("optimum-rbln", "rebel-compiler")


def is_compiled(path: Path) -> bool:
    """A folder optimum-rbln wrote with save_pretrained() after compiling (``*.rbln`` + config)."""
    return (path / COMPILED_MARKER).is_file() and any(path.glob("*.rbln"))


def _version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def model_fingerprint(path: Path) -> dict[str, Any]:
    config = path / "config.json"
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    return {
        "path": str(path.resolve()),
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weights": [[p.name, p.stat().st_size] for p in weights],
    }


def cache_key(model_path: Path, compile_options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The key and the record it was made from (kept beside the artifacts)."""
    record = {
        "model": model_fingerprint(model_path),
        "options": compile_options,
        "versions": {p: _version(p) for p in VERSIONED},
    }
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest, record


def compiled_model_dir(
    model_path: Path, compile_options: dict[str, Any], compile: Callable[[Path, Path], None],
    root: Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The compiled folder for this model and options, compiling into it only on a miss.

    Returns the folder and a report (cache hit or miss, compile seconds, key) for the run directory.
    """
    key, record = cache_key(model_path, compile_options)
    target = (root or cache_root() / "rbln") / f"{model_path.name}-{key}"
    report: dict[str, Any] = {"cache": "hit", "compile_s": 0.0, "key": key, "compiled_dir": str(target)}

    def build(tmp: Path) -> None:
        report["cache"] = "miss"
        began = time.perf_counter()
        log.info("rbln: compiling %s (options %s); this takes minutes", model_path, compile_options)
        compile(model_path, tmp)
        report["compile_s"] = round(time.perf_counter() - began, 3)
        (tmp / "rm_runner_cache_key.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        log.info("rbln: compiled in %.1f s into %s", report["compile_s"], target)

    cached(target, build)
    return target, report
