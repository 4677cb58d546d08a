"""Step: fetch or build the model's files, then load it into the engine."""

from __future__ import annotations

import logging
import time

from rm_runner.pipeline.context import RunContext
from rm_runner.pipeline.step import Step
from rm_runner.workload import with_tokenizer

log = logging.getLogger(__name__)


class LoadModel(Step):
    def __call__(self, ctx: RunContext) -> None:
        began = time.perf_counter()
        log.info("resolving model %s from %r", ctx.model.name, ctx.model_source)
        path = ctx.model_source.resolve()
        resolved = time.perf_counter()
        log.info("loading %s (%s) on %s", path, ctx.model.dtype.value, ctx.engine.name)
        ctx.engine.load_model(path, ctx.model)
        loaded = time.perf_counter()
        ctx.requests = with_tokenizer(ctx.requests, ctx.engine.tokenizer, ctx.cfg.workload)
        ctx.metrics["engine"] = ctx.engine.describe()  # now with what loading did (e.g. compile cache hit)
        ctx.metrics.update(
            model_path=str(path),
            model_resolve_s=round(resolved - began, 3),
            load_time_s=round(loaded - resolved, 3),
        )
        log.info("model ready in %.1f s (resolve %.1f s, load %.1f s)", loaded - began, resolved - began, loaded - resolved)
