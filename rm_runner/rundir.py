"""The run directory: every file a run leaves, written atomically.

A file is written to a temporary name beside its target, flushed to disk and renamed over
it, so a crash never leaves a half-written file that looks complete. ``status.json`` is
written first as ``running`` and last as ``ok`` or ``failed``, so a reader can always tell
a finished run from an interrupted one. A run killed outright (SIGKILL, out of memory) cannot
write its end, so the status also names the process (pid, its start time, the host):
``read_status`` reports a ``running`` run whose process is gone as ``died``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from datetime import datetime
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
EVAL = "eval.json"
EVAL_SAMPLES = "eval_samples.jsonl"


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
            **_this_process(),
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


def read_status(path: Path) -> dict[str, Any] | None:
    """A run directory's status as a reader should take it (None when unreadable): a ``running``
    run whose process is gone is ``died``, so a resumed sweep reruns it and tools do not wait
    for it. A run recorded on another host, or before processes were recorded, stays as written."""
    status = read_json_or_none(path / STATUS)
    return None if status is None else as_read(status)


def as_read(status: dict[str, Any]) -> dict[str, Any]:
    """A status record as ``read_status`` takes it, for a reader that parsed the file itself."""
    if status.get("status") != "running" or not _process_gone(status):
        return status
    return {**status, "status": "died",
            "reason": f"its process (pid {status['pid']} on {status['host']}) ended without recording how it ended "
                      "(killed outright, e.g. SIGKILL or the out-of-memory killer)"}


def record_exit(path: Path, returncode: int) -> dict[str, Any]:
    """Mark a run whose process exited without recording its end (``returncode`` != 0) as failed,
    keeping when it started; returns the new status. Its parent (a sweep) calls this."""
    status = read_json_or_none(path / STATUS) or {}
    how = (f"was killed by {signal.Signals(-returncode).name}" if returncode < 0 and -returncode in signal.valid_signals()
           else f"exited with {returncode}")
    now = time.time()
    started = _parse_iso(status.get("started"))
    record = {**status, "status": "failed", "reason": f"the job process {how} before recording why; see its output",
              "updated": _iso(now), "elapsed_s": round(now - started, 3) if started is not None else None}
    atomic_write_text(path / STATUS, to_json(record))
    return record


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


def _parse_iso(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def _this_process() -> dict[str, Any]:
    import psutil

    me = psutil.Process()
    return {"pid": me.pid, "process_started": me.create_time(), "host": socket.gethostname()}


def _process_gone(status: dict[str, Any]) -> bool:
    """The process a status names has ended: same host, and its pid is free, a zombie, or now
    another process (started at another time)."""
    import psutil

    pid, began = status.get("pid"), status.get("process_started")
    if status.get("host") != socket.gethostname() or not isinstance(pid, int) or not isinstance(began, (int, float)):
        return False
    try:
        process = psutil.Process(pid)
        return process.status() == psutil.STATUS_ZOMBIE or abs(process.create_time() - began) > 1.0
    except psutil.NoSuchProcess:
        return True
