"""The pure parts of benchmarks/serve_vs_vllm_cpu.py: argument parsing, case naming, seeds, the
server order, the Prometheus readings and the summary (no server is started)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_vs_vllm_cpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serve_vs_vllm_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_variants(bench):
    assert bench.parse_variants("rm_runner=") == [("rm_runner", [])]
    assert bench.parse_variants("before=server.max_wait_ms=10; after=server.max_wait_ms=50 server.max_batch_size=8") \
        == [("before", ["server.max_wait_ms=10"]), ("after", ["server.max_wait_ms=50", "server.max_batch_size=8"])]
    assert bench.parse_variants("a='+x=1 2';") == [("a", ["+x=1 2"])]  # shell quoting, a trailing ';'
    for bad in ("", ";", "noequals", "a=;a=x", "vllm-cpu=", "bad label=x"):
        with pytest.raises(ValueError):
            bench.parse_variants(bad)


def test_rates_and_cases(bench):
    assert bench.parse_rates("1,2,4") == [1.0, 2.0, 4.0]
    assert bench.parse_rates("0.5,") == [0.5]
    for bad in ("0", "-1", "inf", "x"):
        with pytest.raises(ValueError):
            bench.parse_rates(bad)
    cases = bench.make_cases([1.0, 2.5], 16)
    assert [c.name for c in cases] == ["rate1", "rate2.5", "inf-c16"]
    assert cases[0].bench_args() == ["--request-rate", "1"]
    assert cases[2].bench_args() == ["--request-rate", "inf", "--max-concurrency", "16"]
    assert [c.name for c in bench.make_cases([4.0], 0)] == ["rate4"]


def test_seeds_differ_per_round_and_case(bench):
    seeds = {bench.case_seed(0, r, c, 4) for r in range(3) for c in range(4)}
    assert len(seeds) == 12 and bench.case_seed(7, 0, 0, 4) == 7


def test_order_rotates(bench):
    names = ["vllm-cpu", "a", "b"]
    assert bench.rotated(names, 0) == names
    assert bench.rotated(names, 1) == ["a", "b", "vllm-cpu"]
    assert bench.rotated(names, 4) == ["a", "b", "vllm-cpu"]
    assert {bench.rotated(names, k)[0] for k in range(3)} == set(names)


def exposition(batches: list[int], hits: float) -> str:
    """/metrics text as prometheus_client writes it: rm_runner's batch-size histogram (its buckets)
    after ``batches``, and a vLLM-named counter."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    registry = CollectorRegistry()
    histogram = Histogram("rm_runner_batch_size", "Sequences per engine batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                          registry=registry)
    for rows in batches:
        histogram.observe(rows)
    Counter("vllm:prefix_cache_hits", "Prefix cache hits", ["engine"], registry=registry).labels("0").inc(hits)
    return generate_latest(registry).decode()


PROM_BEFORE = exposition([1, 1, 4], 32)
PROM_AFTER = exposition([1, 1, 4, 3, 4, 13], 48)


def test_histogram_delta(bench):
    before = bench.histogram(PROM_BEFORE, "rm_runner_batch_size")
    assert before["count"] == 3 and before["sum"] == 6 and before["buckets"]["4.0"] == 3
    delta = bench.histogram_delta(before, bench.histogram(PROM_AFTER, "rm_runner_batch_size"))
    # three batches since: two of 3-4 rows and one of 9-16, 20 sequences in all
    assert delta == {"batches": 3, "sequences": 20, "mean": 6.667, "by_bucket": {"<=4.0": 2.0, "<=16.0": 1.0}}
    assert bench.histogram_delta(before, before)["mean"] is None
    assert bench.histogram("", "rm_runner_batch_size") == {"sum": 0.0, "count": 0.0, "buckets": {}}


def test_snapshots(bench):
    assert bench.counter(PROM_AFTER, "vllm:prefix_cache_hits") == 48
    assert bench.counter(PROM_AFTER, "vllm:absent") == 0
    a, b = bench.snapshot("vllm", PROM_BEFORE), bench.snapshot("vllm", PROM_AFTER)
    assert bench.snapshot_delta(a, b)["prefix_cache_hits"] == 16
    assert bench.snapshot_delta(bench.snapshot("rm_runner", PROM_BEFORE),
                                bench.snapshot("rm_runner", PROM_AFTER))["batch_size"]["batches"] == 3


def test_group_cpu_s(bench, tmp_path):
    tick = os.sysconf("SC_CLK_TCK")
    for pid, pgrp, utime, stime in ((10, 10, 3 * tick, tick), (11, 10, tick, 0), (12, 99, 50 * tick, 0)):
        (tmp_path / str(pid)).mkdir()
        # a command name with spaces and parentheses, as /proc allows
        (tmp_path / str(pid) / "stat").write_text(
            f"{pid} (py (x) y) S 1 {pgrp} {pgrp} 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0 0 0 0\n")
    (tmp_path / "self").mkdir()
    assert bench.group_cpu_s(10, str(tmp_path)) == 5.0
    assert bench.group_cpu_s(7, str(tmp_path)) == 0.0


def _record(bench, rnd, case, server, tok_s, ttft):
    figures = {f: None for f in bench.FIGURES}
    figures.update(output_tok_s=tok_s, ttft_p50_ms=ttft, failed=0, total_input_tokens=256)
    figures["duration"] = 10.0
    return {"round": rnd, "case": case, "server": server, "figures": figures, "others_cpu_s": 0.1,
            "cpu_s": {server: 15.0},
            "metrics": {"batch_size": {"mean": 4.0}} if server != "vllm-cpu" else {"prefix_cache_hits": 0.0},
            **({"served_prompt_tokens": 256} if server != "vllm-cpu" else {})}


def test_summary_ratios_and_wins(bench):
    cases = bench.make_cases([4.0], 0)
    records = [_record(bench, 0, "rate4", "vllm-cpu", 100.0, 50.0), _record(bench, 0, "rate4", "a", 120.0, 60.0),
               _record(bench, 1, "rate4", "vllm-cpu", 100.0, 50.0), _record(bench, 1, "rate4", "a", 90.0, 40.0),
               _record(bench, 0, "rate4", "b", 60.0, 10.0), _record(bench, 1, "rate4", "b", 60.0, 10.0)]
    summary = bench.summarize(records, cases, ["vllm-cpu", "a", "b"], ["a", "b"], rounds=2)["rate4"]
    assert summary["servers"]["a"]["output_tok_s"] == 105.0
    assert summary["servers"]["a"]["mean_batch_size"] == 4.0 and summary["servers"]["a"]["cores"] == 1.5
    assert summary["servers"]["vllm-cpu"]["prefix_cache_hits"] == 0
    vs = summary["vs_vllm"]["a"]
    assert vs["ratio"]["output_tok_s"] == 1.05 and vs["ratio"]["ttft_p50_ms"] == 1.0
    assert vs["wins"]["output_tok_s"] == "1/2" and vs["wins"]["ttft_p50_ms"] == "1/2"
    assert vs["wins"]["tpot_p50_ms"] == "0/2"  # missing figures win nothing
    assert summary["vs_a"]["b"]["wins"]["ttft_p50_ms"] == "2/2"  # lower latency wins
    text = bench.table({"rate4": summary}, {}, {"input_len": 64, "output_len": 64, "num_prompts": 4, "seed": 0,
                                                 "rounds": 2, "offline_batch_size": 16})
    assert "| rate4 | a | 105.0 |" in text and "1.050x (1/2)" in text and "no vLLM prefix-cache hits" in text


def test_better(bench):
    assert bench.better("output_tok_s", 2.0, 1.0) and not bench.better("ttft_p50_ms", 2.0, 1.0)
    assert bench.better("ttft_p50_ms", None, 1.0) is None
    assert bench.ratio(1.0, 0) is None and bench.ratio(3.0, 2.0) == 1.5


def test_summary_without_vllm(bench):
    cases = bench.make_cases([4.0], 0)
    only = bench.summarize([_record(bench, 0, "rate4", "a", 50.0, 5.0)], cases, ["a"], ["a"], rounds=1)
    assert set(only["rate4"]) == {"servers"}
    assert "| rate4 | a | 50.0 |" in bench.table(only, {}, {"input_len": 64, "output_len": 64, "num_prompts": 1,
                                                              "seed": 0, "rounds": 1, "offline_batch_size": 16})
