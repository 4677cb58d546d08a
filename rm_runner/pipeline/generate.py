"""Step: run the workload through the engine and keep every completion."""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

from rm_runner.pipeline.context import RunContext
from rm_runner.pipeline.step import Step
from rm_runner.rundir import GENERATIONS

log = logging.getLogger(__name__)


class Generate(Step):
    def __init__(self, print_outputs: bool = True) -> None:
        self.print_outputs = print_outputs

    def __call__(self, ctx: RunContext) -> None:
        log.info("generating %d requests (max_new_tokens=%d, %s)", len(ctx.requests),
                 ctx.generation.max_new_tokens, "sampling" if ctx.generation.do_sample else "greedy")
        began = time.perf_counter()
        completions = ctx.engine.infer(ctx.requests, ctx.generation)
        elapsed = time.perf_counter() - began
        ctx.run_dir.write_jsonl(GENERATIONS, (c.record() for c in completions))
        output_tokens = sum(c.output_tokens for c in completions)
        ctx.metrics.update(
            requests=len(completions),
            prompt_tokens=sum(c.prompt_tokens for c in completions),
            output_tokens=output_tokens,
            generate_time_s=round(elapsed, 3),
            output_tokens_per_s=round(output_tokens / elapsed, 3) if elapsed > 0 else None,
            requests_per_s=round(len(completions) / elapsed, 3) if elapsed > 0 else None,
            peak_rss_gib=round(_peak_rss_gib(), 3),
        )
        log.info("%d output tokens in %.2f s: %.1f tok/s", output_tokens, elapsed, output_tokens / elapsed)
        if self.print_outputs:
            for c in completions:
                print(f"[{c.id}] {_shown(c.prompt)}\n    -> {c.text.strip()}", flush=True)


def _shown(asked: Any) -> str:
    """A request as one printed line: its text, a conversation's last message, or a token-id count."""
    if isinstance(asked, str):
        return asked
    if asked and isinstance(asked[0], dict):
        return str(asked[-1].get("content", ""))
    return f"<{len(asked or [])} token ids>"


def _peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
