"""The benchmark metric schema, one for in-process and HTTP targets (vLLM bench's names).

Per request (``benchmark.jsonl``, one line each): ``repetition``, ``id``, ``prompt_tokens``,
``output_tokens``, ``start_s`` (since the repetition began), ``ttft_s`` (time to first token),
``e2el_s`` (end-to-end latency), ``itl_s`` (every gap between consecutive tokens), ``ok``,
``error``, and ``rate`` under a rate sweep.

Per repetition (``metrics.json`` → ``benchmark.repetitions[i]``):
  duration_s, completed, failed,
  request_throughput (req/s), output_throughput (output tok/s), total_token_throughput
  (prompt + output tok/s), and for each of
  ttft_s   time to first token,
  tpot_s   time per output token after the first: (e2el - ttft) / (output_tokens - 1),
  itl_s    inter-token latency: every gap between consecutive tokens, pooled,
  e2el_s   end-to-end request latency,
  the mean, p50, p90 and p99; in-process also ``prefill_s`` (same statistics: the time of each
  batch's first step) and ``decode_throughput`` (tokens after the first over the time after the
  first step).

Across repetitions (``benchmark.summary``): each headline figure (``HEADLINE``) as mean, stdev,
min, max and n, so a comparison can tell a change from noise. Under a rate sweep the same is
given per rate in ``benchmark.by_rate``. Model load, compile and warm-up times are kept apart
(``load_time_s``, ``warmup_s``) and never enter these figures.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Optional

SCHEMA = "rm_runner.benchmark/1"
# The scalar figures compared across repetitions and runs; dotted names reach into a statistic.
HEADLINE = ("output_throughput", "request_throughput", "total_token_throughput",
            "ttft_s.p50", "tpot_s.p50", "itl_s.p50", "e2el_s.p50")


def stats(values: Iterable[float]) -> Optional[dict[str, float]]:
    """Mean, p50, p90, p99 (inclusive linear interpolation, as numpy's default)."""
    data = sorted(values)
    if not data:
        return None

    def pct(q: float) -> float:
        pos = (len(data) - 1) * q
        low = int(pos)
        high = min(low + 1, len(data) - 1)
        return data[low] + (data[high] - data[low]) * (pos - low)

    return {"mean": _r(statistics.fmean(data)), "p50": _r(pct(0.5)), "p90": _r(pct(0.9)), "p99": _r(pct(0.99))}


def summarize_repetition(records: list[dict[str, Any]], duration_s: float) -> dict[str, Any]:
    """One repetition's figures from its per-request records."""
    ok = [r for r in records if r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    prompt_tokens = sum(r["prompt_tokens"] for r in ok)
    summary: dict[str, Any] = {
        "duration_s": _r(duration_s),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "request_throughput": _r(len(ok) / duration_s) if duration_s > 0 else None,
        "output_throughput": _r(out_tokens / duration_s) if duration_s > 0 else None,
        "total_token_throughput": _r((out_tokens + prompt_tokens) / duration_s) if duration_s > 0 else None,
        **{figure: stats(values) for figure, values in latency_series(ok).items()},
    }
    return summary


def latency_series(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """The per-request latencies of successful records, by figure: what both the summary and the
    server-agreement check reduce (TPOT only for requests with a first token and more)."""
    return {
        "ttft_s": [r["ttft_s"] for r in records if r["ttft_s"] is not None],
        "tpot_s": [(r["e2el_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) for r in records
                   if r["output_tokens"] > 1 and r["ttft_s"] is not None],
        "itl_s": [gap for r in records for gap in r["itl_s"]],
        "e2el_s": [r["e2el_s"] for r in records],
    }


def headline(repetition: dict[str, Any], name: str) -> Optional[float]:
    """A headline figure of one repetition (``ttft_s.p50`` reaches into the statistic)."""
    value: Any = repetition
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def across(repetitions: list[dict[str, Any]]) -> dict[str, Any]:
    """Each headline figure over the repetitions: mean, stdev, min, max, n."""
    summary: dict[str, Any] = {}
    for name in HEADLINE:
        values = [v for v in (headline(r, name) for r in repetitions) if v is not None]
        if values:
            summary[name] = {"mean": _r(statistics.fmean(values)),
                             "stdev": _r(statistics.stdev(values)) if len(values) > 1 else 0.0,
                             "min": _r(min(values)), "max": _r(max(values)), "n": len(values)}
    return summary


def _r(value: float) -> float:
    return round(value, 6)
