"""Scores across runs: the verdict read from the stderr, a sweep's summary against its reference
job, rm-runner-compare on eval runs, and a real dtype sweep of pipeline=eval.

The hand-made runs' ``eval.json`` come from ``pipeline.eval.scores`` over lm-eval's results
shape, so the fixtures follow what the step writes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from rm_runner.compare import main as compare
from rm_runner.evaluation.difference import Score, difference, scores_of
from rm_runner.pipeline.eval import scores
from rm_runner.sweep.summary import write_summary
from tests.conftest import cli


def results(values: dict[str, tuple[float, float]], samples: int = 400) -> dict[str, Any]:
    """lm-eval's results for task "t" with metrics name -> (value, stderr); perplexity lower is better."""
    return {"results": {"t": {"alias": "t", **{f"{m},none": v for m, (v, _) in values.items()},
                              **{f"{m}_stderr,none": se for m, (_, se) in values.items()}}},
            "versions": {"t": 1.0}, "n-samples": {"t": {"original": samples, "effective": samples}},
            "higher_is_better": {"t": {m: m != "word_perplexity" for m in values}}}


def eval_job(path: Path, overrides: list[str], device: str, dtype: str, values: dict[str, tuple[float, float]],
             status: str = "ok") -> Path:
    path.mkdir(parents=True)
    (path / "status.json").write_text(json.dumps({"status": status, "reason": None if status == "ok" else "not here"}))
    (path / "overrides.json").write_text(json.dumps(overrides))
    (path / "config.yaml").write_text("pipeline:\n  name: eval\n")
    if status == "ok":
        record = {"device": device, "dtype": dtype, "tasks": scores(results(values)),
                  "config": {"reference_device": "cpu", "reference_dtype": "float32"}}
        (path / "eval.json").write_text(json.dumps(record))
        (path / "metrics.json").write_text(json.dumps({"eval": {"t": {f"{m},none": v for m, (v, _) in values.items()}}}))
    return path


def test_the_verdict_reads_the_stderr_of_the_difference() -> None:
    ref = Score("t", "acc,none", 0.60, 0.02, 400)
    assert difference(ref, Score("t", "acc,none", 0.60, 0.02)).verdict == "same"
    near = difference(ref, Score("t", "acc,none", 0.57, 0.02))
    assert near.verdict == "within error (1.1 stderr)" and near.stderr == pytest.approx(math.hypot(0.02, 0.02))
    far = difference(ref, Score("t", "acc,none", 0.50, 0.02))
    assert far.verdict == "lower by 3.5 stderr (worse)" and far.difference == pytest.approx(-0.10)
    assert difference(ref, Score("t", "acc,none", 0.70, 0.02)).verdict == "higher by 3.5 stderr (better)"
    perplexity = Score("t", "word_perplexity,none", 20.0, 0.5, higher_is_better=False)
    assert difference(perplexity, Score("t", "word_perplexity,none", 18.0, 0.5, higher_is_better=False)).verdict \
        == "lower by 2.8 stderr (better)"
    assert difference(Score("t", "m", 1.0, 0.0), Score("t", "m", 0.0, 0.0)).verdict == \
        "lower, worse (stderr 0 on both sides)"
    assert difference(Score("t", "m", 1.0), Score("t", "m", 0.5, 0.1)).verdict == "lower, worse (no stderr to judge by)"


def test_scores_of_reads_what_the_step_writes() -> None:
    read = {s.key: s for s in scores_of({"tasks": scores(results({"acc": (0.5, 0.025), "word_perplexity": (9.0, 0.3)}))})}
    assert read[("t", "acc,none")] == Score("t", "acc,none", 0.5, 0.025, 400, True)
    assert read[("t", "word_perplexity,none")].higher_is_better is False


def test_a_sweep_summary_judges_each_job_against_its_reference(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    eval_job(sweep / "0_device=cpu,model.dtype=float32", ["device=cpu", "model.dtype=float32"], "cpu", "float32",
             {"acc": (0.60, 0.02), "word_perplexity": (20.0, 0.5)})
    eval_job(sweep / "1_device=cpu,model.dtype=bfloat16", ["device=cpu", "model.dtype=bfloat16"], "cpu", "bfloat16",
             {"acc": (0.57, 0.02), "word_perplexity": (20.2, 0.5)})
    eval_job(sweep / "2_device=gpu,model.dtype=bfloat16", ["device=gpu", "model.dtype=bfloat16"], "gpu", "bfloat16",
             {"acc": (0.50, 0.02), "word_perplexity": (25.0, 0.5)})
    eval_job(sweep / "3_device=rbln,model.dtype=bfloat16", ["device=rbln", "model.dtype=bfloat16"], "rbln",
             "bfloat16", {}, status="skipped")
    write_summary(sweep)
    with open(sweep / "summary.csv") as fh:
        rows = {(r["label"], r["metric"]): r for r in csv.DictReader(fh)}
    assert rows[("device=cpu model.dtype=float32", "acc,none")]["verdict"] == "reference"
    assert rows[("device=cpu model.dtype=bfloat16", "acc,none")]["verdict"] == "within error (1.1 stderr)"
    gpu = rows[("device=gpu model.dtype=bfloat16", "acc,none")]
    assert gpu["verdict"] == "lower by 3.5 stderr (worse)" and float(gpu["vs reference"]) == pytest.approx(-0.10)
    assert gpu["score"] == "0.5" and gpu["stderr"] == "0.02" and gpu["n"] == "400" and gpu["device"] == "gpu"
    assert rows[("device=gpu model.dtype=bfloat16", "word_perplexity,none")]["verdict"] == "higher by 7.1 stderr (worse)"
    skipped = rows[("device=rbln model.dtype=bfloat16", "")]
    assert skipped["status"] == "skipped" and skipped["reason"] == "not here"
    table = (sweep / "summary.md").read_text()
    assert "| device=gpu model.dtype=bfloat16 | ok | t | acc,none | 0.5 | 0.02 | 400 | -0.1 | lower by 3.5 stderr (worse) |" \
        in table and "output tok/s" not in table and "Rule: within error" in table
    assert (sweep / "eval.png").stat().st_size > 0


def test_without_a_reference_job_the_summary_says_which_it_wanted(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for i, dtype in enumerate(("bfloat16", "float16")):
        eval_job(sweep / f"{i}_model.dtype={dtype}", [f"model.dtype={dtype}"], "cpu", dtype, {"acc": (0.5, 0.02)})
    rows = write_summary(sweep)
    assert {r["verdict"] for r in rows} == {"no reference job (cpu at float32) in this sweep"}


def test_compare_judges_two_eval_runs_by_their_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = eval_job(tmp_path / "fp32", [], "cpu", "float32", {"acc": (0.60, 0.02)})
    other = eval_job(tmp_path / "bf16", [], "cpu", "bfloat16", {"acc": (0.50, 0.02)})
    assert compare([str(base), str(other), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = data["groups"][0]["scores"]
    assert (row["task"], row["metric"], row["better"]) == ("t", "acc,none", "higher")
    assert row["baseline"]["value"] == 0.6 and row["others"][0]["verdict"] == "lower by 3.5 stderr (worse)"
    assert compare([str(base), str(other), "--csv", str(tmp_path / "c.csv")]) == 0
    table = capsys.readouterr().out
    assert "| t | acc,none | higher | 0.6 ± 0.02 (n=400) | 0.5 ± 0.02 (n=400) | -0.1 lower by 3.5 stderr (worse) |" in table
    with open(tmp_path / "c.csv") as fh:
        (written,) = list(csv.DictReader(fh))
    assert written["figure"] == "t acc,none" and float(written["difference"]) == pytest.approx(-0.1)


@pytest.mark.slow
def test_a_dtype_sweep_of_pipeline_eval_gives_the_per_dtype_table(tmp_path: Path) -> None:
    """The real thing: two jobs, each lm-eval over the shipped tasks on the CPU, then the summary."""
    run = cli("-m", "pipeline=eval", "model=tiny-random", "model.dtype=float32,bfloat16",
              f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "sweep" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["label"], r["task"], r["status"]) for r in rows] == [
        ("model.dtype=float32", "rm_runner_choice", "ok"), ("model.dtype=float32", "rm_runner_generate", "ok"),
        ("model.dtype=bfloat16", "rm_runner_choice", "ok"), ("model.dtype=bfloat16", "rm_runner_generate", "ok")]
    assert [r["verdict"] for r in rows[:2]] == ["reference", "reference"]
    for ref, row in zip(rows[:2], rows[2:]):
        assert row["dtype"] == "bfloat16" and row["device"] == "cpu"
        assert float(row["vs reference"]) == pytest.approx(float(row["score"]) - float(ref["score"]))
        expected = difference(Score(ref["task"], ref["metric"], float(ref["score"]), float(ref["stderr"])),
                              Score(row["task"], row["metric"], float(row["score"]), float(row["stderr"])))
        assert row["verdict"] == expected.verdict
    assert (tmp_path / "sweep" / "eval.png").stat().st_size > 0
    assert "rm_runner_choice (loglikelihood)" in run.stderr  # a progress bar per task
