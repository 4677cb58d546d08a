"""Step: lm-evaluation-harness tasks on the run's engine (``evaluation.lm.EngineLM``).

lm-eval's own task loading, few-shot sampling, filters and metrics run unchanged; the engine
answers its requests in this process (a server's engine too, through the engine contract), so
the scores are the device's and no HTTP client or server sits in between. The shipped tasks
(``rm_runner/evaluation/tasks``) are written into the run directory with their data's absolute
path, so the pipeline runs offline from any working directory.
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rm_runner.backends.registry import check_registered
from rm_runner.config import EvalConfig
from rm_runner.errors import ConfigError
from rm_runner.pipeline.context import RunContext
from rm_runner.pipeline.step import Step
from rm_runner.rundir import EVAL, EVAL_SAMPLES

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parents[1] / "evaluation" / "tasks"


class Evaluate(Step):
    def __init__(self) -> None:
        self.task_manager: Any = None  # lm-eval's, indexed once by check()

    def check(self, ctx: RunContext) -> None:
        """lm-eval is installed, every task is one it knows, the reference device is registered."""
        try:
            from lm_eval.tasks import TaskManager
        except ImportError as exc:
            raise ConfigError(f"pipeline=eval needs lm-evaluation-harness ({exc}): pip install 'rm-runner[eval]'") from None
        cfg: EvalConfig = OmegaConf.to_object(ctx.cfg.eval)
        check_registered(cfg.reference_device, "eval.reference_device")
        for folder in cfg.include_path:
            if not Path(folder).expanduser().is_dir():
                raise ConfigError(f"eval.include_path: {folder} is not a folder (give folders of lm-eval task YAML)")
        self.task_manager = TaskManager(include_path=[str(shipped_tasks(ctx.run_dir.path / "eval_tasks")),
                                                      *(str(Path(p).expanduser().resolve()) for p in cfg.include_path)])
        check_tasks(cfg.tasks, self.task_manager.all_tasks)

    def __call__(self, ctx: RunContext) -> None:
        from lm_eval import simple_evaluate

        from rm_runner.evaluation.lm import EngineLM

        if self.task_manager is None:  # called on its own, not by the runner
            self.check(ctx)
        cfg: EvalConfig = OmegaConf.to_object(ctx.cfg.eval)
        log.info("eval: %s on %s (limit %s, %s-shot)", ", ".join(cfg.tasks), ctx.engine.name, cfg.limit,
                 "task" if cfg.num_fewshot is None else cfg.num_fewshot)
        began = time.perf_counter()
        lm = EngineLM(ctx.engine, batch_size=cfg.batch_size)
        results = simple_evaluate(
            model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
            limit=cfg.limit, task_manager=self.task_manager, log_samples=True, apply_chat_template=cfg.apply_chat_template,
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed, bootstrap_iters=1000)
        elapsed = time.perf_counter() - began
        summary = scores(results)
        for task, entry in summary.items():
            spent = lm.task_time_s.get(task)  # a group's scores are its tasks': no time of its own
            entry["time_s"] = round(spent, 3) if spent is not None else None
        # Which device and dtype scored, so a sweep's summary finds eval.reference_device's job.
        record = {"lm_eval_version": version("lm-eval"), "time_s": round(elapsed, 3), "device": ctx.device.name,
                  "dtype": ctx.model.dtype.value, "engine": ctx.engine.name, "model": ctx.model.name,
                  "tasks": summary, "config": OmegaConf.to_container(ctx.cfg.eval, enum_to_str=True)}
        ctx.run_dir.write_json(EVAL, record)
        ctx.run_dir.write_jsonl(EVAL_SAMPLES, sample_records(results))
        ctx.metrics["eval"] = {task: {name: m["value"] for name, m in entry["metrics"].items()}
                               for task, entry in summary.items()}
        for task, entry in summary.items():
            shown = ", ".join(f"{name} {m['value']:.4f}" + (f" ± {m['stderr']:.4f}" if m["stderr"] is not None else "")
                              for name, m in entry["metrics"].items())
            spent = f", {entry['time_s']:.1f} s" if entry["time_s"] is not None else ""
            print(f"[eval] {task} (n={entry['samples']}{spent}): {shown}", flush=True)


def shipped_tasks(where: Path) -> Path:
    """The shipped task YAML, written to ``where`` with each ``{data}`` the absolute path of its JSON lines."""
    where.mkdir(parents=True, exist_ok=True)
    for task in SHIPPED.glob("*.yaml"):
        data = json.dumps(str(task.with_suffix(".jsonl")))[1:-1]  # inside the YAML's double quotes
        (where / task.name).write_text(task.read_text().replace("{data}", data))
    return where


def check_tasks(asked: list[str], known: list[str]) -> None:
    """Every task lm-eval knows, or a ConfigError naming the unknown ones with the closest names."""
    missing = [t for t in asked if t not in known]
    if missing:
        hints = "; ".join(f"{t}: did you mean {', '.join(difflib.get_close_matches(t, known, n=3)) or 'none close'}?"
                          for t in missing)
        raise ConfigError(f"eval.tasks: lm-eval knows no task {', '.join(missing)} ({hints}); name tasks lm-eval "
                          "lists (lm-eval ls tasks) or a folder of task YAML in eval.include_path")


def scores(results: dict[str, Any]) -> dict[str, Any]:
    """Per task: its version, documents scored, and each metric (``metric,filter``) with its stderr
    and whether higher is better (lm-eval's word for the metric)."""
    out: dict[str, Any] = {}
    for task, values in results["results"].items():
        better = results.get("higher_is_better", {}).get(task) or {}
        metrics = {}
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            name, flt = key.split(",", 1)
            stderr = values.get(f"{name}_stderr,{flt}")
            metrics[key] = {"value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None,
                            "higher_is_better": bool(better.get(name, True))}
        out[task] = {"version": results.get("versions", {}).get(task),
                     "samples": (results.get("n-samples", {}).get(task) or {}).get("effective"), "metrics": metrics}
    return out


def sample_records(results: dict[str, Any]) -> Any:
    """lm-eval's logged samples, one line each, with their task."""
    from lm_eval.utils import handle_non_serializable

    for task, samples in (results.get("samples") or {}).items():
        for sample in samples:
            yield json.loads(json.dumps({"task": task, **sample}, default=handle_non_serializable))
