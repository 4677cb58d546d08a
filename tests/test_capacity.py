"""The capacity search: its bracket on a known answer, its ends, and a real search against the API
(records, probes and the answer agree; a hopeless pass stops early)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rm_runner.benchmark.capacity import Probe, misses_allowed, search
from rm_runner.errors import ConfigError
from tests.conftest import compose_run


def server(capacity: float):
    """A probe that meets the SLO at or below ``capacity`` req/s, and the rates it was asked."""
    asked: list[float] = []

    def probe(rate: float) -> Probe:
        asked.append(rate)
        return Probe(rate, rate <= capacity)

    return probe, asked


def test_misses_allowed() -> None:
    assert misses_allowed(48, 0.9) == 4 and misses_allowed(10, 0.9) == 1 and misses_allowed(10, 1.0) == 0
    assert misses_allowed(16, 0.5) == 8


@pytest.mark.parametrize("truth", [0.3, 1.9, 3.7, 7.9])
def test_the_bracket_holds_the_answer_and_is_as_narrow_as_asked(truth: float) -> None:
    probe, asked = server(truth)
    found = search((2.0, True), lambda: 8.0, probe, tolerance=0.1, max_probes=12)
    assert found.met_rate <= truth < found.unmet_rate and found.capacity == found.met_rate
    assert (found.unmet_rate - found.met_rate) / found.met_rate <= 0.1 and found.reason == "bracket within 10%"
    assert asked[:2] == [8.0, 5.0] and len(found.probes) == len(asked) <= 12
    assert (2.0 in asked) == (truth < 5.0)  # the slow probe at the synchronous rate only when 5 failed
    assert [p.rate for p in found.probes] == asked


def test_the_ends_of_the_search() -> None:
    probe, asked = server(5.0)
    missed_alone = search((2.0, False), lambda: pytest.fail("not measured"), probe)
    assert missed_alone.capacity == 0 and missed_alone.unmet_rate == 2.0 and asked == []
    unbound = search((2.0, True), lambda: 4.0, probe)
    assert unbound.capacity == 4.0 and unbound.unmet_rate is None and asked == [4.0] and "does not bind" in unbound.reason
    probe, asked = server(0.001)
    hopeless = search((2.0, True), lambda: 8.0, probe, max_probes=5)
    assert hopeless.capacity == 0 and hopeless.met_rate is None and asked == [8.0, 5.0, 2.0, 1.0, 0.5]
    probe, asked = server(3.0)
    spent = search((1.0, True), lambda: 100.0, probe, tolerance=0.01, max_probes=4)
    assert spent.capacity == 1.0 and spent.unmet_rate == 25.75 and "4 probes spent" in spent.reason


def test_capacity_needs_an_slo_and_the_http_target(tiny) -> None:
    from rm_runner.config import validated

    with pytest.raises(ConfigError, match=r"profile=capacity searches for the highest rate within a latency SLO: set one"):
        validated(compose_run("pipeline=benchmark", "benchmark.load.profile=capacity"))
    with pytest.raises(ConfigError, match=r"profile=capacity does not apply to the in-process target"):
        tiny("pipeline=benchmark", "benchmark.load.profile=capacity", "benchmark.slo.preset=mlperf-server")


COMMON = ("pipeline=benchmark", "benchmark.target=api", "benchmark.load.profile=capacity", "benchmark.warmup=0",
          "generation.max_new_tokens=8", "generation.ignore_eos=true", "benchmark.load.concurrency=8",
          "pipeline.steps.benchmark.print_table=false")


def test_a_pass_that_cannot_meet_the_slo_stops_early(tiny) -> None:
    run = tiny(*COMMON, "benchmark.slo.ttft_s.max=0.000001")
    bench = run.read_json("metrics.json")["benchmark"]
    (synchronous,) = bench["repetitions"]
    requests = bench["requests"]
    allowed = misses_allowed(requests, 0.9)
    assert synchronous["probe"] == "synchronous" and synchronous["stopped_early"] is True
    assert len(run.read_jsonl("benchmark.jsonl")) == allowed + 1 < requests  # one at a time: then it stopped
    assert synchronous["slo"] == {**synchronous["slo"], "good": 0, "requests": requests, "attained": False}
    assert bench["capacity"]["capacity_rps"] == 0 and "one request at a time" in bench["capacity"]["reason"]


def test_a_capacity_search_against_the_api_keeps_every_probe(tiny) -> None:
    run = tiny(*COMMON, "benchmark.slo.e2el_s.max=1.0", "benchmark.load.max_probes=4", "benchmark.load.tolerance=0.3")
    bench = run.read_json("metrics.json")["benchmark"]
    records = run.read_jsonl("benchmark.jsonl")
    reps = bench["repetitions"]
    assert [r["probe"] for r in reps[:2]] == ["synchronous", "saturated"] and len(reps) <= 2 + 4
    for rep in reps:  # each pass's verdict is its own records'
        mine = [r for r in records if r["repetition"] == rep["repetition"]]
        assert rep["slo"]["good"] == sum(r["ok"] and r["e2el_s"] <= 1.0 for r in mine)
        assert rep["slo"]["attained"] == (not rep.get("stopped_early") and rep["slo"]["good"] >= 0.9 * rep["slo"]["requests"])
    probes = [r for r in reps if r["probe"] == "poisson"]
    met = [p["rate"] for p in probes if p["slo"]["attained"]]
    missed = [p["rate"] for p in probes if not p["slo"]["attained"]]
    found = bench["capacity"]
    assert found["capacity_rps"] == pytest.approx(max(met) if met else 0.0, abs=1e-4)
    assert found["bracket"] == [pytest.approx(max(met), abs=1e-4) if met else None,
                                pytest.approx(min(missed), abs=1e-4) if missed else None]
    assert set(bench["by_rate"]) == {f"{p['rate']:.4g}" for p in probes}
    assert bench["summary"]["capacity_rps"]["mean"] == found["capacity_rps"]


def capacity_job(path: Path, found: float, bracket: list, rates: dict[float, float], tok_per_j: float) -> None:
    """A capacity run's metrics.json from the schema's own functions: a probe per rate whose
    requests take ``tpot`` seconds per token."""
    from rm_runner.benchmark.metrics import across, summarize_repetition
    from rm_runner.config import Objective

    by_rate, reps = {}, []
    for rate, tpot in rates.items():
        records = [{"ok": True, "ttft_s": 0.1, "e2el_s": 0.1 + 9 * tpot, "output_tokens": 10, "prompt_tokens": 5,
                    "itl_s": [tpot] * 9, "start_s": 0.0, "error": None} for _ in range(4)]
        rep = {**summarize_repetition(records, 2.0, {"tpot_s": Objective(0.2)}), "probe": "poisson", "rate": rate,
               "energy": {"output_tokens_per_joule": tok_per_j}}
        reps.append(rep)
        by_rate[f"{rate:.4g}"] = across([rep])
    bench = {"summary": {"capacity_rps": {"mean": found, "stdev": 0.0, "n": 1}}, "by_rate": by_rate,
             "repetitions": reps, "capacity": {"capacity_rps": found, "bracket": bracket, "probes": len(rates)},
             "energy": {"output_tokens_per_joule": tok_per_j}}
    path.mkdir(parents=True)
    (path / "status.json").write_text(json.dumps({"status": "ok"}))
    (path / "overrides.json").write_text(json.dumps([f"device={path.name.split('=')[-1]}"]))
    (path / "metrics.json").write_text(json.dumps({"benchmark": bench}))


def test_a_capacity_sweep_draws_capacity_pareto_and_energy(tmp_path: Path) -> None:
    from rm_runner.sweep.summary import write_summary

    sweep = tmp_path / "sweep"
    capacity_job(sweep / "0_device=cpu", 2.0, [2.0, 2.5], {4.0: 0.3, 2.0: 0.1}, 3.0)
    capacity_job(sweep / "1_device=gpu", 40.0, [40.0, None], {40.0: 0.01}, 30.0)
    rows = write_summary(sweep)
    assert {(r["label"], r["rate"], r["capacity req/s"]) for r in rows} == {
        ("device=cpu", 4.0, 2.0), ("device=cpu", 2.0, 2.0), ("device=gpu", 40.0, 40.0)}
    assert {r["tok/J"] for r in rows} == {3.0, 30.0} and {r["SLO met"] for r in rows} == {0.0, 1.0}
    assert {(r["label"], r["_run tok/J"], tuple(r["_bracket"])) for r in rows} == {
        ("device=cpu", 3.0, (2.0, 2.5)), ("device=gpu", 30.0, (40.0, None))}  # the run's, on each of its rows
    for name in ("capacity.png", "pareto.png", "energy.png", "latency_vs_throughput.png", "summary.html"):
        assert (sweep / name).stat().st_size > 0, name
    assert "capacity req/s" in (sweep / "summary.md").read_text()
