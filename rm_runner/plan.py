"""``python -m rm_runner --dry-run [-m] OVERRIDES``: what would run, be skipped, and why.

Composes the run (or every job of the sweep, command-line sweeps and a recipe's
``hydra.sweeper.params`` alike), validates each against the structured configs and its
``_target_`` classes, probes the device (in its ``device.python`` when it has one) and the
engine's environment, and finds jobs already completed in the sweep directory; no model is
loaded, nothing is written. Exit 1 when a job is invalid, or a single run could not run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from rm_runner.errors import ConfigError
from rm_runner.sweep.job import completed


def _split(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """Plain overrides, and the sweep ones as ``{key: values}`` (``recipes.sweep_jobs`` expands them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain, sweeps = [], {}
    for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if parsed.is_sweep_override():
            sweeps[parsed.get_key_element()] = text.split("=", 1)[1]
        else:
            plain.append(text)
    return plain, sweeps


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose

    return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def plan(overrides: list[str], multirun: bool, config_dir: Optional[Path] = None) -> list[dict[str, Any]]:
    from rm_runner.config import composing
    from rm_runner.composition import explain
    from rm_runner.recipes import check_job, sweep_jobs

    plain, sweeps = _split(overrides)
    if sweeps and not multirun:
        key, values = next(iter(sweeps.items()))
        raise ConfigError(f"{key}={values}: a sweep (a,b values) needs -m")
    jobs: list[dict[str, Any]] = []
    with composing(config_dir) as search:
        plain = [*plain, *search]
        base = _compose(plain)
        params = (OmegaConf.select(base, "hydra.sweeper.params") or {}) if multirun else {}
        # As Hydra's basic sweeper: a recipe's params first, then the command line's; a key given in
        # both keeps its place and takes the command line's value (a plain one ends that sweep).
        merged = {str(k): str(v) for k, v in params.items()}
        for text in plain:
            key, _, value = text.lstrip("+~").partition("=")
            if key in merged:
                merged[key] = value
        combos = sweep_jobs({**merged, **sweeps})  # [[]] without sweeps
        for num, combo in enumerate(combos):
            entry: dict[str, Any] = {"job": num, "overrides": " ".join(combo) or "(defaults)"}
            try:
                cfg = _compose([*plain, *combo, f"hydra.job.num={num}"])
                # where Hydra would put this job (the same interpolations a -m run resolves)
                job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir) if multirun else None
                choices = cfg.hydra.runtime.choices
                entry.update(device=choices.get("device"), engine=choices.get("engine"),
                             pipeline=choices.get("pipeline"), model=choices.get("model"))
                check_job(cfg.copy())  # validated, every _target_ checked (sets HydraConfig as a run does)
                with open_dict(cfg):
                    del cfg["hydra"]
                entry.update(_judge(cfg, job_dir))
            except Exception as exc:  # composition and validation errors are the plan's answer
                entry.update(would="invalid", reason=explain(exc))
            jobs.append(entry)
    return jobs


def _judge(cfg: DictConfig, job_dir: Optional[Path]) -> dict[str, Any]:
    """What the job would do: skip (done before, or its device is missing in a sweep), fail, or run."""
    from rm_runner import pyenv
    from rm_runner.doctor import device_availability
    from rm_runner.runner import build

    if job_dir is not None and not cfg.sweep.force and completed(cfg, job_dir):
        return {"would": "skip", "reason": f"already completed in {job_dir} (sweep.force=true reruns it)"}
    backend = build("device", cfg.device)
    available = device_availability(backend)
    if not available:
        return {"would": "skip" if job_dir is not None else "fail", "reason": available.unavailable(backend.name)}
    from hydra.utils import get_class

    engine_cls = get_class(cfg.engine._target_)
    engine_ok = engine_cls.check_environment(pyenv.resolve(cfg.engine.get("python")), type(backend))
    if not engine_ok:
        return {"would": "fail", "reason": f"engine={engine_cls.name}: {engine_ok.describe()}"}
    return {"would": "run", "reason": ""}


def render(jobs: list[dict[str, Any]]) -> str:
    titles = ["job", "overrides", "device", "engine", "pipeline", "model", "would", "reason"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for job in jobs:
        lines.append("| " + " | ".join(str(job.get(t, "")).replace("|", "/") for t in titles) + " |")
    counts = {w: sum(1 for j in jobs if j["would"] == w) for w in ("run", "skip", "fail", "invalid")}
    lines.append("\n" + ", ".join(f"{n} would {w}" if w != "invalid" else f"{n} invalid"
                                  for w, n in counts.items() if n) + " (dry run: nothing loaded, nothing written)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from hydra.errors import HydraException

    from rm_runner.config import command_line

    args = command_line(argv)
    multirun = bool(args.multirun)
    config_dir = Path(args.config_dir) if args.config_dir else None

    from rm_runner.composition import explain

    try:
        jobs = plan(list(args.overrides), multirun, config_dir)
    except (HydraException, ConfigError) as exc:  # the command line does not compose: one line naming it
        print(f"error: {explain(exc)}", file=sys.stderr)
        return 2
    print(render(jobs))
    bad = any(j["would"] == "invalid" for j in jobs) or (not multirun and jobs[0]["would"] != "run")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
