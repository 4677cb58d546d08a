"""The in-process target: requests go through the engine's streaming form, timed at every step.

Every decoding step calls back with the batch's new tokens; the callback only notes the time
and which rows are still going (EOS, their own output length), so measuring costs a few
microseconds a step, and that cost is itself measured (``measurement_s``) and reported.
Engines whose executor cannot stream (a server's client) still give end-to-end latency and
throughput; their per-token figures are left empty rather than made up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from rm_runner.config import GenerationConfig, LoadProfile
from rm_runner.requests import Request, SamplingParams

if TYPE_CHECKING:  # every engine is one (served ones too); imported for the type only
    from rm_runner.engines.local import LocalEngine


@dataclass
class InProcessResult:
    records: list[dict[str, Any]]
    duration_s: float
    measurement_s: float = 0.0  # time spent in the step callback: the cost of measuring
    prefill_s: list[float] = field(default_factory=list)
    decode_tokens: int = 0
    decode_s: float = 0.0


def run(engine: LocalEngine, requests: list[Request], generation: GenerationConfig, profile: LoadProfile,
        on_request_done: Callable[[], None] = lambda: None) -> InProcessResult:
    """All requests once: in batches of ``engine.batch_size`` (``batch``, all submitted at t=0) or
    one at a time (``synchronous``, each sent when the previous one finished)."""
    size = engine.batch_size if profile == LoadProfile.batch else 1
    encoded = [engine.render(r) for r in requests]
    engine.check_lengths(requests, encoded, generation)
    timed = engine.streams()
    sampling = SamplingParams.from_generation(generation)
    result = InProcessResult(records=[], duration_s=0.0)
    began = time.perf_counter()
    for first in range(0, len(requests), size):
        batch, ids = requests[first:first + size], encoded[first:first + size]
        sent = time.perf_counter()
        limits = [r.max_new_tokens or generation.max_new_tokens for r in batch]
        eos = set() if generation.ignore_eos else engine.eos_ids
        counts = [0] * len(batch)
        times: list[list[float]] = [[] for _ in batch]
        done = [False] * len(batch)

        def on_step(tokens: list[int]) -> list[bool]:
            now = time.perf_counter()
            for row, token in enumerate(tokens):
                if not done[row]:
                    counts[row] += 1
                    times[row].append(now)
                    done[row] = counts[row] >= limits[row] or token in eos
            result.measurement_s += time.perf_counter() - now
            return done

        engine.generate_steps(engine.request(ids, limits, sampling), on_step)
        finished = time.perf_counter()
        start = 0.0 if profile == LoadProfile.batch else sent - began
        for request, prompt, count, stamps in zip(batch, ids, counts, times):
            record = {"id": request.id, "prompt_tokens": len(prompt), "output_tokens": count,
                      "start_s": round(start, 6), "ok": True, "error": None}
            if timed and stamps:
                record.update(ttft_s=round(stamps[0] - began - start, 6), e2el_s=round(stamps[-1] - began - start, 6),
                              itl_s=[round(b - a, 6) for a, b in zip(stamps, stamps[1:])])
            else:
                record.update(ttft_s=None, e2el_s=round(finished - began - start, 6), itl_s=[])
            result.records.append(record)
            on_request_done()
        if timed and any(times):
            first_step = min(t[0] for t in times if t)
            last_step = max(t[-1] for t in times if t)
            result.prefill_s.append(first_step - sent)
            result.decode_tokens += sum(max(0, c - 1) for c in counts)
            result.decode_s += last_step - first_step
    result.duration_s = time.perf_counter() - began
    return result
