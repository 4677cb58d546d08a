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

With a latency SLO (``benchmark.slo``: any of ttft_s, tpot_s, itl_s, e2el_s with a ``max`` and a
percentile ``p``), each record also says ``slo_met``: whether the request met every objective (its
own TTFT, TPOT (0 for one token, as vLLM bench's --goodput), E2EL at or under the max; for ITL
its own gaps' p-th percentile; a failed request meets none), and each repetition adds
``request_goodput`` and ``output_goodput`` (req/s and output tok/s of the requests that met it),
``slo_attainment`` (their fraction of all requests) and ``slo``: per objective the run's p-th
percentile against its max, the count of good requests, and whether the attainment reached
``benchmark.slo.attainment``.

Where the device's meter is readable (``benchmark.energy``), each repetition also has ``energy``:
joules gross and net of idle, average watts, joules per output token and per request, output
tokens per joule; otherwise ``benchmark.energy`` is null and ``energy_unavailable`` says why.

Across repetitions (``benchmark.summary``): each headline figure (``HEADLINE``) as mean, stdev,
min, max and n, so a comparison can tell a change from noise. Under a rate sweep the same is
given per rate in ``benchmark.by_rate``. Model load, compile and warm-up times are kept apart
(``load_time_s``, ``warmup_s``) and never enter these figures.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Optional, Protocol

SCHEMA = "rm_runner.benchmark/1"
# The scalar figures compared across repetitions and runs; dotted names reach into a statistic.
HEADLINE = ("output_throughput", "request_throughput", "total_token_throughput",
            "ttft_s.p50", "tpot_s.p50", "itl_s.p50", "e2el_s.p50",
            "request_goodput", "output_goodput", "slo_attainment", "energy.output_tokens_per_joule")


class Objective(Protocol):
    """``config.Objective``: seconds and a percentile."""

    max: Optional[float]
    p: float


def percentile(data: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of sorted ``data``: inclusive linear interpolation, numpy's default."""
    pos = (len(data) - 1) * p / 100
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def stats(values: Iterable[float]) -> Optional[dict[str, float]]:
    """Mean, p50, p90, p99."""
    data = sorted(values)
    if not data:
        return None
    return {"mean": _r(statistics.fmean(data)), "p50": _r(percentile(data, 50)), "p90": _r(percentile(data, 90)),
            "p99": _r(percentile(data, 99))}


def request_figures(record: dict[str, Any]) -> dict[str, Optional[float]]:
    """One request's TTFT, TPOT and E2EL as the SLO reads them (TPOT 0 for one token, vLLM's rule)."""
    ttft, out = record["ttft_s"], record["output_tokens"]
    tpot = None if ttft is None else ((record["e2el_s"] - ttft) / (out - 1) if out > 1 else 0.0)
    return {"ttft_s": ttft, "tpot_s": tpot, "e2el_s": record["e2el_s"]}


def meets(record: dict[str, Any], objectives: dict[str, Objective]) -> bool:
    """Whether one request met every objective (a failed one meets none)."""
    if not record["ok"]:
        return False
    figures = request_figures(record)
    for name, objective in objectives.items():
        if name == "itl_s":
            gaps = sorted(record["itl_s"])
            value: Optional[float] = percentile(gaps, objective.p) if gaps else 0.0
        else:
            value = figures[name]
        if value is None or value > objective.max:
            return False
    return True


def slo_figures(records: list[dict[str, Any]], duration_s: float, objectives: dict[str, Objective],
                attainment: float, sent: Optional[int] = None) -> dict[str, Any]:
    """Goodput and attainment of one repetition, marking each record's ``slo_met``. ``sent``: the
    requests the pass was given, where it stopped before all had ended (those count as missed)."""
    good = []
    for record in records:
        record["slo_met"] = meets(record, objectives)
        if record["slo_met"]:
            good.append(record)
    series = latency_series([r for r in records if r["ok"]])
    judged = {}
    for name, objective in objectives.items():
        data = sorted(series[name])
        value = _r(percentile(data, objective.p)) if data else None
        judged[name] = {"max": objective.max, "p": objective.p, "value": value,
                        "met": value is not None and value <= objective.max}
    total = len(records) if sent is None else sent
    share = len(good) / total if total else 0.0
    return {
        "request_goodput": _r(len(good) / duration_s) if duration_s > 0 else None,
        "output_goodput": _r(sum(r["output_tokens"] for r in good) / duration_s) if duration_s > 0 else None,
        "slo_attainment": _r(share),
        "slo": {"objectives": judged, "good": len(good), "requests": total, "attainment_target": attainment,
                "attained": share >= attainment},
    }


def summarize_repetition(records: list[dict[str, Any]], duration_s: float,
                         objectives: Optional[dict[str, Objective]] = None, attainment: float = 0.9,
                         sent: Optional[int] = None) -> dict[str, Any]:
    """One repetition's figures from its per-request records (with goodput where ``objectives``;
    ``sent`` as ``slo_figures`` takes it)."""
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
    if objectives:
        summary.update(slo_figures(records, duration_s, objectives, attainment, sent))
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
