"""What the API counts: Prometheus series for ``GET /metrics`` and a summary for ``metrics.json``.

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` histograms) under the
``rm_runner_`` prefix. Each app has its own registry, so two servers in one process (tests)
do not share counts.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rm_runner.benchmark.metrics import stats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rm_runner_requests", "API requests answered", ["route", "status"], registry=r)
        self.errors = Counter("rm_runner_request_errors", "API requests answered with an error",
                              ["route", "type"], registry=r)
        self.prompt_tokens = Counter("rm_runner_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("rm_runner_generation_tokens", "Tokens generated", registry=r)
        self.latency = Histogram("rm_runner_request_latency_seconds", "End-to-end request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("rm_runner_time_to_first_token_seconds", "Time from arrival to the first token",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("rm_runner_batch_size", "Sequences per engine batch (continuous batching: per decode step)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.step_seconds = Histogram("rm_runner_decode_step_seconds",
                                      "Time of one decode step of the running batch (continuous batching)",
                                      buckets=STEP_BUCKETS, registry=r)
        self.running = Gauge("rm_runner_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("rm_runner_requests_waiting", "Requests waiting for a batch", registry=r)
        self.started = time.time()
        # For the summary's percentiles: the two timings of each answered request (one float each,
        # not its whole record: a server may run for weeks), and how many failed.
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.failed = 0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def observe(self, record: dict[str, Any]) -> None:
        """Count one finished request (its requests.jsonl record)."""
        route, status = record["route"], record["status"]
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.failed += 1
            self.errors.labels(route, record.get("error_type") or "error").inc()
            return
        self.prompt_tokens.inc(record.get("prompt_tokens", 0))
        self.generation_tokens.inc(record.get("completion_tokens", 0))
        self.latency.labels(route).observe(record["latency_s"])
        self.latencies.append(record["latency_s"])
        if record.get("ttft_s") is not None:
            self.ttft.labels(route).observe(record["ttft_s"])
            self.ttfts.append(record["ttft_s"])

    def summary(self) -> dict[str, Any]:
        """The serving figures of ``metrics.json``: counts, tokens, latency and TTFT percentiles."""
        return {
            "requests": len(self.latencies) + self.failed,
            "requests_ok": len(self.latencies),
            "requests_failed": self.failed,
            "prompt_tokens": int(self.registry.get_sample_value("rm_runner_prompt_tokens_total")),
            "output_tokens": int(self.registry.get_sample_value("rm_runner_generation_tokens_total")),
            "serve_time_s": round(time.time() - self.started, 3),
            "latency_s": stats(self.latencies),
            "ttft_s": stats(self.ttfts),
        }
