"""Shared fixtures. Every test runs offline; the model cache is shared across the session
(``$RM_RUNNER_CACHE`` when set, as in CI, else the user's default) so SmolLM2 converts once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_W16 = REPO.parent / "shared" / "workloads" / "w16.jsonl"


def compose_run(*overrides: str) -> DictConfig:
    """The config ``python -m rm_runner OVERRIDES`` would run, composed in-process."""
    from rm_runner.config import register_schema

    register_schema()
    with initialize_config_module(config_module="rm_runner.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        python: str = sys.executable, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``python -m rm_runner ARGS`` as a user would."""
    return subprocess.run(
        [python, "-m", "rm_runner", *args], cwd=cwd, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture()
def tiny(tmp_path: Path):
    """Run the tiny random model in-process into a fresh run directory; returns the RunDir."""
    from rm_runner.runner import run

    counter = iter(range(1000))

    def _run(*overrides: str):
        cfg = compose_run("model=tiny-random", *overrides)
        return run(cfg, tmp_path / f"run{next(counter)}", list(overrides))

    return _run
