"""compose → validate → instantiate → pipeline → run directory.

Hydra composes (``__main__``); this module does the rest and owns the run directory, so a
run replayed from a saved config goes through exactly the same code.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rm_runner import environment
from rm_runner.composition import explain
from rm_runner.config import validated
from rm_runner.errors import ConfigError, DeviceUnavailableError, RunnerError
from rm_runner.pipeline.context import RunContext
from rm_runner.pipeline.step import Step
from rm_runner.rundir import ENVIRONMENT, METRICS, OVERRIDES, RunDir
from rm_runner.workload import load_requests

log = logging.getLogger(__name__)


def build(section: str, node: Any, **kwargs: Any) -> Any:
    """Instantiate a `_target_` node; errors name the config section instead of Hydra internals."""
    try:
        return instantiate(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, RunnerError):
            raise cause from None
        if isinstance(cause, TypeError):
            raise ConfigError(f"{section}: {cause}") from None
        raise ConfigError(f"{section}: {explain(exc)}") from None


def prepare(cfg: DictConfig, run_dir: RunDir) -> tuple[RunContext, list[Any]]:
    """Everything short of loading the model, so bad input fails in seconds."""
    backend = build("device", cfg.device)
    availability = backend.availability()
    if not availability:
        raise DeviceUnavailableError(availability.unavailable(backend.name))
    engine = build("engine", cfg.engine, backend=backend)
    engine.log_dir = run_dir.path
    steps = [build(f"pipeline.steps.{name}", step) for name, step in cfg.pipeline.steps.items() if step is not None]
    model = OmegaConf.to_object(cfg.model)
    source = build("model.source", cfg.model.source)
    source.check()
    requests = load_requests(OmegaConf.to_object(cfg.workload))
    ctx = RunContext(
        cfg=cfg, run_dir=run_dir, engine=engine, device=backend, model=model, model_source=source,
        requests=requests, generation=OmegaConf.to_object(cfg.generation),
    )
    ctx.metrics["engine"] = engine.describe()
    for step in steps:
        if isinstance(step, Step):
            step.check(ctx)
    return ctx, steps


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Let SIGTERM unwind like Ctrl-C, so the status is written and the engine stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(cfg: DictConfig, path: str | Path, overrides: list[str] | None = None) -> RunDir:
    """Run ``cfg`` into the directory ``path``; the status file says ok or failed and why."""
    run_dir = RunDir(path)
    run_dir.set_status("running")
    try:
        with _sigterm_as_interrupt():
            skipped = _run(cfg, run_dir, overrides)
        if skipped is None:
            run_dir.set_status("ok")
    finally:
        _report(run_dir)
    log.info("run directory: %s", run_dir.path)
    return run_dir


def _report(run_dir: RunDir) -> None:
    """``report.html``, however the run ended; a report that cannot be written never fails the run."""
    from rm_runner.report import write_run_report

    try:
        metrics = run_dir.read_json(METRICS) if (run_dir.path / METRICS).exists() else {}
        tables = ""
        if isinstance(metrics.get("benchmark"), dict) and metrics["benchmark"].get("summary"):
            from rm_runner.pipeline.benchmark import table

            tables = table(metrics["benchmark"])
        write_run_report(run_dir.path, tables)
    except Exception as exc:  # the run's own outcome stands; say why there is no report
        log.warning("report.html not written: %s: %s", type(exc).__name__, exc)


def _run(cfg: DictConfig, run_dir: RunDir, overrides: list[str] | None) -> str | None:
    """Run the steps; returns the reason when the run was skipped (device unavailable in a sweep)."""
    ctx: RunContext | None = None
    try:
        run_dir.write_json(OVERRIDES, list(overrides or []))
        run_dir.write_json(ENVIRONMENT, environment.capture())
        run_dir.write_config(cfg, resolve=False)  # what was asked, even if it fails to validate
        cfg = validated(cfg)
        run_dir.write_config(cfg)
        ctx, steps = prepare(cfg, run_dir)
        ctx.engine.start()
        for step in steps:
            step(ctx)
            run_dir.write_json(METRICS, ctx.metrics)
    except DeviceUnavailableError as exc:
        if cfg.get("on_unavailable") == "skip":
            log.warning("skipped: %s", exc)
            run_dir.set_status("skipped", str(exc), error=type(exc).__name__)
            return str(exc)
        log.error("%s", exc)
        run_dir.set_status("failed", str(exc), error=type(exc).__name__)
        raise
    except RunnerError as exc:
        log.error("%s", exc)
        run_dir.set_status("failed", str(exc), error=type(exc).__name__)
        raise
    except KeyboardInterrupt as exc:
        run_dir.set_status("failed", f"interrupted ({exc or 'Ctrl-C'})", error="KeyboardInterrupt")
        raise
    except BaseException as exc:
        run_dir.set_status("failed", f"{type(exc).__name__}: {exc}", error=type(exc).__name__)
        raise
    finally:
        if ctx is not None:
            ctx.engine.stop()
            if ctx.metrics:
                run_dir.write_json(METRICS, ctx.metrics)
    return None
