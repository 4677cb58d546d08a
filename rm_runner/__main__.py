"""``python -m rm_runner [group=option ...] [key=value ...]``: one run, or a sweep with ``-m``.

Only Hydra and OmegaConf are imported before the task runs, so ``--cfg job`` and ``--help``
stay fast and never import torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rm_runner.config import register_schema
from rm_runner.sweep.naming import register_resolvers

register_schema()
register_resolvers()


@hydra.main(version_base="1.3", config_path="pkg://rm_runner.conf", config_name="config")
def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from rm_runner.errors import RunnerError
    from rm_runner.runner import run

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        from rm_runner.sweep.job import run_isolated

        run_isolated(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task), hydra_cfg.job.num)
        return
    from rm_runner.errors import ConfigError
    from rm_runner.reexec import interpreter, run_with
    from rm_runner.rundir import RunDir

    overrides = list(hydra_cfg.overrides.task)
    try:
        python = interpreter(cfg)
    except ConfigError as exc:
        RunDir(hydra_cfg.runtime.output_dir).set_status("failed", str(exc), error="ConfigError")
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    if python is not None:
        sys.exit(run_with(python, overrides, Path(hydra_cfg.runtime.output_dir)))
    try:
        run(cfg, hydra_cfg.runtime.output_dir, overrides)
    except RunnerError:
        sys.exit(1)  # already logged as one line, and recorded in status.json


def main() -> None:
    if "--dry-run" in sys.argv[1:]:
        from rm_runner.plan import main as plan

        sys.exit(plan([a for a in sys.argv[1:] if a != "--dry-run"]))
    problem = composition_problem(sys.argv[1:])
    if problem is not None:  # before Hydra makes a run directory: nothing is written for a bad command line
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    _task()


def composition_problem(argv: list[str]) -> str | None:
    """Why the run these arguments ask for does not compose (Hydra's own argument parser reads
    them), or None; Hydra's flags that print instead of running are left to Hydra."""
    from rm_runner.composition import check_overrides
    from rm_runner.config import command_line

    args = command_line(argv)
    if args.help or args.hydra_help or args.info is not None or args.shell_completion or args.config_name \
            or args.config_path:
        return None
    return check_overrides(list(args.overrides), args.config_dir, multirun=bool(args.multirun))


if __name__ == "__main__":
    main()
