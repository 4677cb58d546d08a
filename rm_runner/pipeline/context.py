"""What every pipeline step receives: the run's config, parts and where to write."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from rm_runner.backends.base import Backend
from rm_runner.config import GenerationConfig, ModelConfig
from rm_runner.engines.base import Engine
from rm_runner.requests import Request
from rm_runner.rundir import RunDir


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: RunDir
    engine: Engine
    device: Backend  # the device the engine serves (its memory, its name; parity switches to it)
    model: ModelConfig
    model_source: Any
    requests: list[Request]
    generation: GenerationConfig
    # Figures for metrics.json, written after every step so a later failure loses none.
    metrics: dict[str, Any] = field(default_factory=dict)
