"""pipeline=benchmark: the metric schema filled from real runs (tiny random model), workloads,
load profiles over rm_runner's own API, and sweeps with isolated jobs, skips and a summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rm_runner.errors import ConfigError
from tests.conftest import cli


def test_in_process_figures_follow_from_the_records(tiny) -> None:
    run = tiny("pipeline=benchmark", "benchmark.repetitions=2", "generation.max_new_tokens=12",
               "generation.ignore_eos=true", "pipeline.steps.benchmark.print_table=false")
    bench = run.read_json("metrics.json")["benchmark"]
    records = run.read_jsonl("benchmark.jsonl")
    assert bench["schema"] == "rm_runner.benchmark/1" and bench["target"] == "engine"
    assert len(records) == 2 * bench["requests"] and {r["repetition"] for r in records} == {0, 1}
    for rep in bench["repetitions"]:
        mine = [r for r in records if r["repetition"] == rep["repetition"]]
        assert all(r["output_tokens"] == 12 and len(r["itl_s"]) == 11 for r in mine)
        assert rep["output_throughput"] == pytest.approx(12 * len(mine) / rep["duration_s"], rel=1e-3)
        assert rep["prefill_s"]["mean"] > 0 and rep["decode_throughput"] > 0
    headline = ("output_throughput", "request_throughput", "total_token_throughput",
                "ttft_s.p50", "tpot_s.p50", "itl_s.p50", "e2el_s.p50")  # the contract, written out here
    assert set(headline) <= set(bench["summary"]) and bench["summary"]["output_throughput"]["n"] == 2
    assert "warmup_s" in bench and bench["memory"]["peak_rss_gib"] > 0
    # The measuring itself (a timestamp and a few comparisons per step) stays under 1% of the time measured.
    assert 0 < bench["measurement_overhead"]["fraction"] < 0.01


def test_synthetic_workload_has_exact_lengths_in_the_models_tokens(tiny) -> None:
    run = tiny("pipeline=benchmark", "workload.prompts=[]", "workload.synthetic.num_prompts=5",
               "workload.synthetic.input_tokens=20", "workload.synthetic.input_tokens_stddev=4",
               "workload.synthetic.output_tokens=7", "generation.ignore_eos=true", "benchmark.repetitions=1",
               "benchmark.warmup=0", "pipeline.steps.benchmark.print_table=false")
    records = run.read_jsonl("benchmark.jsonl")
    assert len(records) == 5 and all(r["output_tokens"] == 7 for r in records)
    assert len({r["prompt_tokens"] for r in records}) > 1  # lengths drawn, not fixed
    again = tiny("pipeline=benchmark", "workload.prompts=[]", "workload.synthetic.num_prompts=5",
                 "workload.synthetic.input_tokens=20", "workload.synthetic.input_tokens_stddev=4",
                 "workload.synthetic.output_tokens=7", "generation.ignore_eos=true", "benchmark.repetitions=1",
                 "benchmark.warmup=0", "pipeline.steps.benchmark.print_table=false")
    assert [r["prompt_tokens"] for r in again.read_jsonl("benchmark.jsonl")] == [r["prompt_tokens"] for r in records]


def test_sharegpt_workload_takes_output_lengths_from_the_replies(tiny, tmp_path: Path) -> None:
    data = [{"id": "a", "conversations": [{"from": "human", "value": "one two"}, {"from": "gpt", "value": "x y z"}]},
            {"id": "b", "conversations": [{"from": "human", "value": "three"},
                                          {"from": "gpt", "value": "p q r s t u v w"}]},
            {"id": "c", "conversations": [{"from": "gpt", "value": "no question"}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    run = tiny("pipeline=benchmark", "workload.prompts=[]", f"workload.sharegpt_path={path}",
               "generation.ignore_eos=true", "benchmark.repetitions=1", "benchmark.warmup=0",
               "pipeline.steps.benchmark.print_table=false")
    lengths = {r["id"]: r["output_tokens"] for r in run.read_jsonl("benchmark.jsonl")}
    assert lengths == {"a": 3, "b": 8}  # the tiny tokenizer has one token per word


@pytest.mark.parametrize("turns", [[{"from": "human"}], [{"from": "human", "value": "hi"}, "not a turn"],
                                   [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 7}]],
                         ids=["no-value", "turn-not-object", "reply-not-text"])
def test_a_malformed_sharegpt_turn_names_the_entry(tiny, tmp_path: Path, turns: list) -> None:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "fine"}]}, {"conversations": turns}]))
    with pytest.raises(ConfigError, match=r"sharegpt.json: entry 1: every turn needs a string 'value'"):
        tiny("pipeline=benchmark", "workload.prompts=[]", f"workload.sharegpt_path={path}")


def test_load_profiles_through_the_api(tiny) -> None:
    run = tiny("pipeline=benchmark", "benchmark.target=api", "benchmark.load.profile=concurrent",
               "benchmark.load.concurrency=4", "benchmark.repetitions=1", "generation.max_new_tokens=8",
               "server.port=0", "server.max_wait_ms=50", "pipeline.steps.benchmark.print_table=false")
    bench = run.read_json("metrics.json")["benchmark"]
    records = run.read_jsonl("benchmark.jsonl")
    assert bench["target"] == "api" and bench["endpoint"].startswith("http://127.0.0.1:")
    assert all(r["ok"] and r["ttft_s"] > 0 and r["e2el_s"] >= r["ttft_s"] for r in records)
    assert bench["server"]["requests_ok"] == len(records) + 4  # and the warm-up pass: 4 requests
    assert bench["server"]["mean_batch_size"] > 1  # concurrent requests shared batches
    sweep = tiny("pipeline=benchmark", "benchmark.target=api", "benchmark.load.profile=sweep",
                 "benchmark.load.rates=[50,200]", "benchmark.repetitions=1", "benchmark.warmup=0",
                 "generation.max_new_tokens=4", "server.port=0", "pipeline.steps.benchmark.print_table=false")
    by_rate = sweep.read_json("metrics.json")["benchmark"]["by_rate"]
    assert set(by_rate) == {"50.0", "200.0"}
    assert {r["rate"] for r in sweep.read_jsonl("benchmark.jsonl")} == {50.0, 200.0}
    assert (sweep.path / "latency_vs_throughput.png").stat().st_size > 0


def test_a_timed_trace_is_replayed_at_its_timestamps(tiny, tmp_path: Path) -> None:
    """benchmark.load.profile=trace: each request goes at its workload row's "timestamp" (vLLM
    bench's trace field), in whatever order the rows come."""
    times = {"a": 0.4, "b": 0.0, "c": 0.9, "d": 0.2}
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"id": rid, "prompt": f"hello {rid}", "timestamp": at}) + "\n"
                             for rid, at in times.items()))
    run = tiny("pipeline=benchmark", "benchmark.target=api", "benchmark.load.profile=trace", "workload=jsonl",
               f"workload.path={trace}", "benchmark.repetitions=1", "benchmark.warmup=0",
               "generation.max_new_tokens=3", "pipeline.steps.benchmark.print_table=false")
    records = {r["id"]: r for r in run.read_jsonl("benchmark.jsonl")}
    assert set(records) == set(times) and all(r["ok"] for r in records.values())
    for rid, at in times.items():
        assert at <= records[rid]["start_s"] < at + 0.15
    assert run.read_json("metrics.json")["benchmark"]["profile"] == "trace"


def test_a_trace_without_timestamps_fails_before_the_model_loads(tiny, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"id": "a", "prompt": "x", "timestamp": 0.5}\n{"id": "b", "prompt": "y"}\n')
    with pytest.raises(ConfigError, match=r"profile=trace .* 1 of 2 requests have none \(first: id 'b'\)"):
        tiny("pipeline=benchmark", "benchmark.target=api", "benchmark.load.profile=trace", "workload=jsonl",
             f"workload.path={trace}")
    assert not (tmp_path / "run0" / "metrics.json").exists()  # the checks ran before the model loaded
    trace.write_text('{"id": "a", "prompt": "x", "timestamp": -1}\n')
    with pytest.raises(ConfigError, match=r"trace.jsonl:1: 'timestamp' must be seconds from the start"):
        tiny("pipeline=benchmark", "benchmark.load.profile=trace", "workload=jsonl", f"workload.path={trace}")


def test_a_profile_the_target_cannot_do_names_the_fix(tiny) -> None:
    with pytest.raises(ConfigError, match=r"benchmark.load.profile=poisson does not apply to the in-process target.*"
                                          r"benchmark.target=api"):
        tiny("pipeline=benchmark", "benchmark.load.profile=poisson")


def test_sweep_over_devices_skips_the_missing_ones_and_resumes(tmp_path: Path) -> None:
    common = ("pipeline=benchmark", "model=tiny-random", "benchmark.repetitions=1", "generation.max_new_tokens=8",
              f"hydra.sweep.dir={tmp_path}/sweep")
    args = ("-m", "device=cpu,gpu,rbln", *common)
    first = cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    with open(tmp_path / "sweep" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["label"], r["status"]) for r in rows] == [("device=cpu", "ok"), ("device=gpu", "skipped"),
                                                        ("device=rbln", "skipped")]
    assert float(rows[0]["output tok/s"]) > 0 and "not available" in rows[1]["reason"]
    for name in ("summary.md", "throughput.png", "latency.png"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0, name
    cpu_job = next((tmp_path / "sweep").glob("0_*"))
    done = (cpu_job / "metrics.json").read_bytes()
    planned = cli("--dry-run", *args, cwd=tmp_path)
    assert planned.returncode == 0 and "already completed" in planned.stdout  # the plan sees it too
    second = cli(*args, cwd=tmp_path)
    assert second.returncode == 0
    assert "already completed" in second.stderr
    assert (cpu_job / "metrics.json").read_bytes() == done  # not rerun
    forced = cli("-m", "device=cpu", *common, "sweep.force=true", cwd=tmp_path)
    assert forced.returncode == 0 and "already completed" not in forced.stderr
    assert (cpu_job / "metrics.json").read_bytes() != done


def test_a_failing_job_does_not_stop_the_sweep_but_fails_it(tmp_path: Path) -> None:
    result = cli("-m", "model=tiny-random", "generation.max_new_tokens=4,0", f"hydra.sweep.dir={tmp_path}/s",
                 cwd=tmp_path)
    assert result.returncode == 1
    with open(tmp_path / "s" / "summary.csv") as fh:
        statuses = [r["status"] for r in csv.DictReader(fh)]
    assert statuses == ["ok", "failed"]
