"""The run directory: every file a run leaves, written atomically.

A file is written to a temporary name beside its target, flushed to disk and renamed over
it, so a crash never leaves a half-written file that looks complete. ``status.json`` is
written first as ``running`` and last as ``ok`` or ``failed``, so a reader can always tell
a finished run from an interrupted one.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

CONFIG = "config.yaml"
STATUS = "status.json"
METRICS = "metrics.json"
ENVIRONMENT = "environment.json"
GENERATIONS = "generations.jsonl"
LOG = "rm_runner.log"
OVERRIDES = "overrides.json"
REQUESTS = "requests.jsonl"
SERVER = "server.json"


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"


class RunDir:
    """One run's directory; the only place the runner writes to."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._started = time.time()

    def write_json(self, name: str, data: Any) -> Path:
        target = self.path / name
        atomic_write_text(target, to_json(data))
        return target

    def write_jsonl(self, name: str, records: Iterable[dict[str, Any]]) -> Path:
        target = self.path / name
        atomic_write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        return target

    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        """Add one record as one ``write`` to an append-only file (a served request's record): a
        reader sees whole lines, and the records before a crash stay."""
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        fd = os.open(self.path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def write_config(self, cfg: DictConfig, resolve: bool = True) -> Path:
        target = self.path / CONFIG
        atomic_write_text(target, OmegaConf.to_yaml(cfg, resolve=resolve))
        return target

    def set_status(self, status: str, reason: str | None = None, **extra: Any) -> None:
        record = {
            "status": status,
            "reason": reason,
            "started": _iso(self._started),
            "updated": _iso(time.time()),
            "elapsed_s": round(time.time() - self._started, 3),
            **extra,
        }
        self.write_json(STATUS, record)

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        lines = (self.path / name).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def read_json_or_none(path: Path, kind: type = dict) -> Any:
    """A JSON file's content when it is a ``kind`` (an object unless told), else None: missing,
    unreadable or another shape (for tools that list runs and must not stop at one bad file)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, kind) else None


def is_run_dir(path: Path) -> bool:
    """A run directory: every run writes its status first."""
    return (path / STATUS).is_file()


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The run directories of a sweep (``<num>_<overrides>``), in job-number order."""
    def order(path: Path) -> tuple[float, str]:
        num = path.name.partition("_")[0]
        return (int(num) if num.isdigit() else float("inf"), path.name)

    return sorted((p for p in sweep_dir.iterdir() if is_run_dir(p)), key=order)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))
