"""What the server says about the same requests: its Prometheus histograms, read before and after
the measured passes, against the figures the client measured. For vLLM these are its own
per-request timings (``vllm:time_to_first_token_seconds`` ...); for rm_runner's API its own.
Agreement between the two is the check that the benchmark measures what the server does."""

from __future__ import annotations

import statistics
from typing import Any, Optional

from rm_runner.benchmark.metrics import latency_series

# Figure -> the Prometheus families that hold it (a histogram's _sum/_count, a counter's _total).
FAMILIES = {
    "ttft_s": ("vllm:time_to_first_token_seconds", "rm_runner_time_to_first_token_seconds"),
    "itl_s": ("vllm:inter_token_latency_seconds",),
    "tpot_s": ("vllm:request_time_per_output_token_seconds",),
    "e2el_s": ("vllm:e2e_request_latency_seconds", "rm_runner_request_latency_seconds"),
    "output_tokens": ("vllm:generation_tokens", "rm_runner_generation_tokens"),
}
Snapshot = dict[str, tuple[float, float]]


def snapshot(base_url: str, api_key: Optional[str]) -> Optional[Snapshot]:
    """(sum, count) per figure from ``<server>/metrics``; None when the server has no metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    url = base_url.rstrip("/").removesuffix("/v1") + "/metrics"
    try:
        response = httpx.get(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {}, timeout=30)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    wanted = {family: figure for figure, families in FAMILIES.items() for family in families}
    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(response.text):
        figure = wanted.get(family.name)
        if figure is None:
            continue
        totals = found.setdefault(figure, [0.0, 0.0])
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                totals[0] += sample.value
            elif sample.name.endswith("_count"):
                totals[1] += sample.value
            elif sample.name.endswith("_total"):
                totals[0] += sample.value
                totals[1] += 1
    return {figure: (total, count) for figure, (total, count) in found.items()}


def agreement(before: Snapshot, after: Snapshot, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Server and client means over the same requests, side by side, with their ratio."""
    ok = [r for r in records if r["ok"]]
    client = {figure: _mean(values) for figure, values in latency_series(ok).items()}
    rows: dict[str, Any] = {}
    for figure, mine in client.items():
        if figure in after and figure in before:
            total = after[figure][0] - before[figure][0]
            count = after[figure][1] - before[figure][1]
            server = total / count if count else None
            rows[figure] = {"client_mean": mine, "server_mean": _r(server),
                            "ratio": _r(mine / server) if mine and server else None}
    if "output_tokens" in after and "output_tokens" in before:
        rows["output_tokens"] = {"client": sum(r["output_tokens"] for r in ok),
                                 "server": int(after["output_tokens"][0] - before["output_tokens"][0])}
    return rows


def _mean(values: Any) -> Optional[float]:
    data = list(values)
    return _r(statistics.fmean(data)) if data else None


def _r(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 6)
