"""Latency SLOs and goodput: which requests met every objective, counted by hand from the records
the benchmark writes, in-process and over HTTP; the presets and the errors of benchmark.slo."""

from __future__ import annotations

import pytest

from rm_runner.benchmark.metrics import meets, slo_figures, summarize_repetition
from rm_runner.config import BenchmarkConfig, Objective, SLOConfig
from rm_runner.errors import ConfigError
from tests.conftest import compose_run


def record(ttft: float | None, e2el: float, tokens: int, gaps: list[float] | None = None, ok: bool = True) -> dict:
    return {"ok": ok, "ttft_s": ttft, "e2el_s": e2el, "output_tokens": tokens, "prompt_tokens": 5,
            "itl_s": gaps if gaps is not None else [], "start_s": 0.0, "error": None if ok else "boom"}


def test_a_request_meets_the_slo_only_when_it_meets_every_objective() -> None:
    slo = {"ttft_s": Objective(0.5), "tpot_s": Objective(0.1)}
    assert meets(record(0.4, 0.4 + 9 * 0.1, 10), slo)  # at the limits: met
    assert not meets(record(0.6, 0.7, 2), slo)  # first token late
    assert not meets(record(0.1, 0.1 + 9 * 0.11, 10), slo)  # each later token too slow
    assert meets(record(0.2, 5.0, 1), slo)  # one token: TPOT 0, as vLLM bench --goodput
    assert not meets(record(None, 1.0, 0, ok=False), slo)  # failed
    assert not meets(record(0.1, 0.3, 3), {"e2el_s": Objective(0.25)})
    gaps = [0.01] * 98 + [0.5, 0.5]
    assert meets(record(0.1, 1.0, 101, gaps), {"itl_s": Objective(0.1, p=90)})  # its own p90 gap
    assert not meets(record(0.1, 1.0, 101, gaps), {"itl_s": Objective(0.1, p=100)})


def test_goodput_and_attainment_of_a_repetition() -> None:
    records = [record(0.1, 1.0, 10), record(0.9, 1.5, 10), record(0.2, 1.2, 20), record(None, 0.3, 0, ok=False)]
    out = slo_figures(records, 2.0, {"ttft_s": Objective(0.5, p=50)}, attainment=0.5)
    assert [r["slo_met"] for r in records] == [True, False, True, False]
    assert out["request_goodput"] == 1.0 and out["output_goodput"] == 15.0 and out["slo_attainment"] == 0.5
    slo = out["slo"]
    assert slo["good"] == 2 and slo["requests"] == 4 and slo["attained"] is True
    assert slo["objectives"]["ttft_s"] == {"max": 0.5, "p": 50, "value": 0.2, "met": True}  # median of ok requests
    assert "request_goodput" not in summarize_repetition(records, 2.0)  # no SLO, no goodput


def test_presets_fill_what_is_not_set_and_bad_values_name_the_field() -> None:
    server = SLOConfig(preset="mlperf-server")
    assert {n: (o.max, o.p) for n, o in server.objectives().items()} == {"ttft_s": (2.0, 99.0), "tpot_s": (0.1, 99.0)}
    mine = SLOConfig(preset="mlperf-interactive", ttft_s=Objective(1.0, 90))
    assert mine.objectives()["ttft_s"] == Objective(1.0, 90) and mine.objectives()["tpot_s"].max == 0.03
    assert SLOConfig().objectives() == {} and BenchmarkConfig().slo.objectives() == {}
    from rm_runner.config import validated

    for override, message in (("benchmark.slo.preset=mlperf", "benchmark.slo.preset=mlperf is not a preset"),
                              ("benchmark.slo.ttft_s.max=0", "benchmark.slo.ttft_s.max must be > 0"),
                              ("benchmark.slo.tpot_s.p=0", "benchmark.slo.tpot_s.p must be a percentile"),
                              ("benchmark.slo.attainment=1.5", "benchmark.slo.attainment must be in (0, 1]")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            validated(compose_run(override))


@pytest.mark.parametrize("where", [("benchmark.target=engine",),
                                   ("benchmark.target=api", "benchmark.load.profile=poisson", "benchmark.load.rate=40")],
                         ids=["in-process", "api"])
def test_goodput_agrees_with_a_count_by_hand_from_the_records(tiny, where: tuple[str, ...]) -> None:
    run = tiny("pipeline=benchmark", *where, "benchmark.repetitions=2", "generation.max_new_tokens=8",
               "generation.ignore_eos=true", "benchmark.slo.ttft_s.max=0.05", "benchmark.slo.tpot_s.max=0.5",
               "benchmark.slo.attainment=0.5", "pipeline.steps.benchmark.print_table=false")
    bench = run.read_json("metrics.json")["benchmark"]
    records = run.read_jsonl("benchmark.jsonl")
    assert bench["slo"] == {"preset": None, "attainment": 0.5, "ttft_s": {"max": 0.05, "p": 99.0},
                            "tpot_s": {"max": 0.5, "p": 99.0}}
    for rep in bench["repetitions"]:
        mine = [r for r in records if r["repetition"] == rep["repetition"]]
        by_hand = [r for r in mine if r["ok"] and r["ttft_s"] <= 0.05
                   and (r["e2el_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) <= 0.5]
        assert [r["slo_met"] for r in mine] == [r in by_hand for r in mine]
        assert rep["slo"]["good"] == len(by_hand) and rep["slo_attainment"] == pytest.approx(len(by_hand) / len(mine))
        assert rep["request_goodput"] == pytest.approx(len(by_hand) / rep["duration_s"], rel=1e-4)
        assert rep["output_goodput"] == pytest.approx(8 * len(by_hand) / rep["duration_s"], rel=1e-4)
        assert rep["slo"]["attained"] == (len(by_hand) / len(mine) >= 0.5)
    assert bench["summary"]["slo_attainment"]["n"] == 2
