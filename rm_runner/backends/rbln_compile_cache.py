"""Compiled RBLN models, cached on disk under a key that says everything that shaped them.

A compiled folder (optimum-rbln's ``save_pretrained`` after ``export=True``) holds the ``*.rbln``
graphs and copies of the source's config, tokenizer and generation config, so the key covers:

- every top-level file of the source model by content: the weights (a fine-tune saved over the
  same file names must miss), config.json, the tokenizer files and generation_config.json;
- every option passed to the compile, the compile dtype among them;
- the NPU the graphs are built for (``device.npu`` or the attached NPU 0): a cache shared over
  NFS or SLURM must not hand one card family's artifact to another;
- the versions of optimum-rbln, the compiler and transformers (whose modeling code optimum-rbln
  wraps). vllm-rbln's own compile cache leaves the versions out (its own FIXME in
  ``utils/optimum/converter/dispatch.py``), so an upgrade there reuses stale artifacts.

Hashing multi-GB weights on every run would cost more than it saves, so a weight file's digest is
remembered per (real path, size, mtime); a Hugging Face cache blob is named by its own hash and is
not read at all.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from rm_runner.models.cache import cache_root, cached

log = logging.getLogger(__name__)

COMPILED_MARKER = "rbln_config.json"
KEY_RECORD = "rm_runner_cache_key.json"
VERSIONED = ("optimum-rbln", "rebel-compiler", "transformers")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")  # huggingface_hub names an LFS blob by its sha256


def is_compiled(path: Path) -> bool:
    """A folder optimum-rbln wrote with save_pretrained() after compiling (``*.rbln`` + config)."""
    return (path / COMPILED_MARKER).is_file() and any(path.glob("*.rbln"))


def _version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """The packages whose versions change a compiled artifact; a compiler without package metadata
    (a source build) is named by ``rebel.__version__``."""
    found = {p: _version(p) for p in VERSIONED}
    if found["rebel-compiler"] is None:
        try:
            import rebel

            found["rebel-compiler"] = getattr(rebel, "__version__", None)
        except ImportError:
            pass
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a weight file: its blob name in a Hugging Face cache, else read once and
    remembered for this (real path, size, mtime), so a file rewritten in place is read again."""
    real = path.resolve()
    if _BLOB_NAME.fullmatch(real.name):
        return real.name
    stat = real.stat()
    memo_key = hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    memo = (memo_dir or cache_root() / "rbln" / "digests") / memo_key
    if memo.is_file():
        return memo.read_text().strip()
    began = time.perf_counter()
    value = _sha256(real)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.tmp-{os.getpid()}")
    tmp.write_text(value + "\n")
    os.replace(tmp, memo)
    log.info("rbln: hashed %s (%.1f GB) in %.1f s for the compile cache key", real.name, stat.st_size / 1e9,
             time.perf_counter() - began)
    return value


def model_fingerprint(path: Path) -> dict[str, Any]:
    """Each top-level file of the model folder by content (subfolders, such as Meta's original/
    checkpoints, are not what optimum-rbln loads)."""
    files = {}
    for entry in sorted(path.iterdir()):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        files[entry.name] = weights_digest(entry) if entry.suffix in WEIGHT_SUFFIXES else _sha256(entry)
    return {"path": str(path.resolve()), "files": files}


def cache_key(model_path: Path, compile_options: dict[str, Any], target_npu: str | None) -> tuple[str, dict[str, Any]]:
    """The key and the record it was made from (kept beside the artifacts)."""
    record = {
        "model": model_fingerprint(model_path),
        "options": compile_options,
        "npu": target_npu,
        "versions": versions(),
    }
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest, record


def compiled_model_dir(
    model_path: Path, compile_options: dict[str, Any], target_npu: str | None,
    compile: Callable[[Path, Path], None], root: Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The compiled folder for this model, options and NPU, compiling into it only on a miss.

    Returns the folder and a report (cache hit or miss, compile seconds, key) for the run directory.
    """
    key, record = cache_key(model_path, compile_options, target_npu)
    target = (root or cache_root() / "rbln") / f"{model_path.name}-{key}"
    report: dict[str, Any] = {"cache": "hit", "compile_s": 0.0, "key": key, "compiled_dir": str(target)}

    def build(tmp: Path) -> None:
        report["cache"] = "miss"
        began = time.perf_counter()
        log.info("rbln: compiling %s for %s (options %s); this takes minutes", model_path, target_npu,
                 compile_options)
        compile(model_path, tmp)
        report["compile_s"] = round(time.perf_counter() - began, 3)
        (tmp / KEY_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
        log.info("rbln: compiled in %.1f s into %s", report["compile_s"], target)

    cached(target, build)
    return target, report
