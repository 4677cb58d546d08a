"""rm-runner-compare: verdicts from the spread across repetitions, sweep matching, runs not compared.

The run directories are written here, but their ``benchmark`` sections come from the real
schema code (``summarize_repetition`` and ``across`` over per-request records), so the
fixtures follow the schema wherever it goes.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rm_runner.benchmark.metrics import HEADLINE, SCHEMA, across, summarize_repetition
from rm_runner.compare import NO_SPREAD, WITHIN_NOISE, higher_is_better, main

OUTPUT_TOKENS = 20
REQUESTS = 4


def repetition(duration_s: float) -> dict[str, Any]:
    """One repetition whose requests each take the whole duration (so latency tracks throughput)."""
    step = duration_s / OUTPUT_TOKENS
    records = [{"repetition": 0, "id": i, "prompt_tokens": 10, "output_tokens": OUTPUT_TOKENS, "start_s": 0.0,
                "ttft_s": step, "e2el_s": duration_s, "itl_s": [step] * (OUTPUT_TOKENS - 1), "ok": True,
                "error": None} for i in range(REQUESTS)]
    return summarize_repetition(records, duration_s)


def write_run(path: Path, metrics: dict[str, Any] | None, status: str = "ok", reason: str | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "status.json").write_text(json.dumps({"status": status, "reason": reason, "elapsed_s": 1.0}))
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def bench_run(path: Path, durations: list[float], by_rate: dict[str, list[float]] | None = None) -> Path:
    reps = [repetition(d) for d in durations]
    benchmark: dict[str, Any] = {"schema": SCHEMA, "repetitions": reps, "summary": across(reps)}
    if by_rate:
        benchmark["by_rate"] = {rate: across([repetition(d) for d in ds]) for rate, ds in by_rate.items()}
    return write_run(path, {"load_time_s": 3.0, "benchmark": benchmark})


def compare_json(*dirs: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main([*map(str, dirs), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def verdicts(data: dict[str, Any], group: int = 0) -> dict[str, str]:
    return {row["name"]: row["others"][0]["verdict"] for row in data["groups"][group]["figures"]}


def test_direction_of_each_figure() -> None:
    assert higher_is_better("output_throughput") and higher_is_better("output_tokens_per_s")
    assert not higher_is_better("ttft_s.p50") and not higher_is_better("generate_time_s")
    assert not higher_is_better("e2el_s.p50@rate=2.0") and higher_is_better("request_throughput@rate=2.0")


def test_clear_change_is_faster_or_slower(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    slow = bench_run(tmp_path / "slow", [1.00, 1.01, 0.99])
    fast = bench_run(tmp_path / "fast", [0.50, 0.51, 0.49])
    data = compare_json(slow, fast, capsys=capsys)
    assert data["groups"][0]["job"] is None
    # Goodput needs an SLO and tokens per joule a meter; these runs have neither.
    assert set(verdicts(data)) == set(HEADLINE) - {"request_goodput", "output_goodput", "slo_attainment",
                                                   "energy.output_tokens_per_joule"}
    assert set(verdicts(data).values()) == {"faster"}  # throughputs up and latencies down
    output = next(r for r in data["groups"][0]["figures"] if r["name"] == "output_throughput")
    assert output["baseline"]["n"] == 3 and output["baseline"]["stdev"] > 0
    assert output["others"][0]["change"] == pytest.approx(1.0, rel=0.02)  # twice the tokens/s

    data = compare_json(fast, slow, capsys=capsys)
    assert set(verdicts(data).values()) == {"slower"}
    ttft = next(r for r in data["groups"][0]["figures"] if r["name"] == "ttft_s.p50")
    assert ttft["better"] == "lower" and ttft["others"][0]["change"] > 0


def test_change_inside_the_spread_is_noise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = bench_run(tmp_path / "a", [1.0, 1.2, 0.8])
    b = bench_run(tmp_path / "b", [0.95, 1.15, 0.85])  # 5% faster on the best run, well inside the spread
    data = compare_json(a, b, capsys=capsys)
    assert set(verdicts(data).values()) == {WITHIN_NOISE}
    assert all(row["others"][0]["change"] != 0 for row in data["groups"][0]["figures"])


def test_single_values_get_no_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_run(tmp_path / "a", {"load_time_s": 3.0, "generate_time_s": 2.0, "output_tokens_per_s": 100.0})
    b = write_run(tmp_path / "b", {"load_time_s": 3.0, "generate_time_s": 1.0, "output_tokens_per_s": 200.0})
    data = compare_json(a, b, capsys=capsys)
    assert verdicts(data) == {"output_tokens_per_s": NO_SPREAD, "generate_time_s": NO_SPREAD}
    rows = {r["name"]: r for r in data["groups"][0]["figures"]}
    assert rows["output_tokens_per_s"]["others"][0]["change"] == pytest.approx(1.0)
    assert rows["generate_time_s"]["others"][0]["change"] == pytest.approx(-0.5)

    assert main([str(a), str(b)]) == 0  # the Markdown table says the same
    table = capsys.readouterr().out
    assert "| output_tokens_per_s | higher | 100 (n=1) | 200 (n=1) | +100.0% " + NO_SPREAD + " |" in table


def test_sweeps_match_on_overrides_and_skipped_jobs_are_listed(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    skipped = "device=gpu is not available here: torch is a CPU-only build"
    old, new = tmp_path / "old", tmp_path / "new"
    bench_run(old / "0_device=cpu", [1.00, 1.01, 0.99])
    write_run(old / "1_device=gpu", None, status="skipped", reason=skipped)
    (old / "multirun.yaml").write_text("hydra: {}\n")  # what Hydra leaves beside the jobs
    write_run(new / "0_device=gpu", None, status="skipped", reason=skipped)  # other job numbers
    bench_run(new / "1_device=cpu", [0.50, 0.51, 0.49])
    bench_run(new / "2_device=rbln", [0.5, 0.5, 0.5])

    data = compare_json(old, new, capsys=capsys)
    groups = {g["job"]: g for g in data["groups"]}
    assert list(groups) == ["device=cpu", "device=gpu", "device=rbln"]
    assert [r["path"] for r in groups["device=cpu"]["runs"]] == [str(old / "0_device=cpu"), str(new / "1_device=cpu")]
    assert set(verdicts(data, 0).values()) == {"faster"}
    assert groups["device=gpu"]["figures"] == [] and groups["device=rbln"]["figures"] == []
    listed = {(r["job"], r["label"], r["status"]): r["reason"] for r in data["not_compared"]}
    assert listed == {("device=gpu", str(old), "skipped"): skipped, ("device=gpu", str(new), "skipped"): skipped,
                      ("device=rbln", str(old), "missing"): "no job device=rbln in this sweep"}

    assert main([str(old), str(new)]) == 0
    table = capsys.readouterr().out
    assert "## device=cpu" in table and "| output_throughput | higher |" in table
    assert f"- not compared: {new} ({new / '0_device=gpu'}): skipped: {skipped}" in table


def test_failed_run_is_listed_not_compared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = bench_run(tmp_path / "a", [1.0, 1.0, 1.0])
    b = write_run(tmp_path / "b", {"engine": {}}, status="failed", reason="ConfigError: device.mode: bad")
    c = bench_run(tmp_path / "c", [1.0, 1.0, 1.0])
    data = compare_json(a, b, c, capsys=capsys)
    assert [e["label"] for e in data["groups"][0]["figures"][0]["others"]] == [str(c)]
    assert data["not_compared"] == [{"job": None, "label": str(b), "path": str(b), "status": "failed",
                                     "reason": "ConfigError: device.mode: bad"}]
    assert set(verdicts(data).values()) == {WITHIN_NOISE}  # identical figures, zero spread


def test_rate_sweep_figures_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = bench_run(tmp_path / "a", [1.0, 1.01, 0.99], by_rate={"2.0": [1.0, 1.01, 0.99]})
    b = bench_run(tmp_path / "b", [1.0, 1.01, 0.99], by_rate={"2.0": [2.0, 2.02, 1.98]})
    out = tmp_path / "cmp.csv"
    assert main([str(a), str(b), "--csv", str(out)]) == 0
    rows = {r["figure"]: r for r in csv.DictReader(out.open())}
    assert rows["output_throughput"]["verdict"] == WITHIN_NOISE
    assert rows["output_throughput@rate=2.0"]["verdict"] == "slower"
    assert rows["e2el_s.p50@rate=2.0"]["verdict"] == "slower"
    assert float(rows["e2el_s.p50@rate=2.0"]["change"]) == pytest.approx(1.0, rel=0.02)
    assert rows["ttft_s.p50"]["baseline"] == str(a) and rows["ttft_s.p50"]["run"] == str(b)
    assert "output_throughput@rate=2.0" in capsys.readouterr().out


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_a_path_that_is_no_run_exits_2(tmp_path: Path, make: str, capsys: pytest.CaptureFixture[str]) -> None:
    good = bench_run(tmp_path / "good", [1.0, 1.0])
    bad = tmp_path / "bad"
    if make == "empty":
        (bad / "sub").mkdir(parents=True)
    elif make == "file":
        bad.write_text("x")
    assert main([str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rm-runner-compare: error: {bad}")
    assert {"missing": "no such directory", "empty": "not a run directory", "file": "not a directory"}[make] in err


def test_malformed_run_files_are_listed_not_compared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = bench_run(tmp_path / "a", [1.0, 1.0, 1.0])
    listed = write_run(tmp_path / "listed", {})
    (listed / "status.json").write_text("[1, 2]")
    shaped = write_run(tmp_path / "shaped", {"benchmark": {"summary": {"output_throughput": {"mean": 1.0, "n": "x"}}}})
    data = compare_json(a, listed, shaped, capsys=capsys)
    reasons = {r["label"]: (r["status"], r["reason"]) for r in data["not_compared"]}
    assert reasons[str(listed)] == ("unreadable", "status.json: not a JSON object")
    assert reasons[str(shaped)][0] == "no metrics" and "not as rm_runner writes it" in reasons[str(shaped)][1]


def test_csv_is_written_whole_or_the_command_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = bench_run(tmp_path / "a", [1.0, 1.0]), bench_run(tmp_path / "b", [1.0, 1.0])
    nested = tmp_path / "new" / "dir" / "cmp.csv"
    assert main([str(a), str(b), "--csv", str(nested)]) == 0 and nested.read_text().startswith("job,figure")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    assert main([str(a), str(b), "--csv", str(blocker / "cmp.csv")]) == 2
    assert f"rm-runner-compare: error: --csv {blocker / 'cmp.csv'}: " in capsys.readouterr().err


def test_module_runs_as_a_command(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", {"generate_time_s": 2.0, "output_tokens_per_s": 100.0})
    b = write_run(tmp_path / "b", {"generate_time_s": 2.0, "output_tokens_per_s": 100.0})
    proc = subprocess.run([sys.executable, "-m", "rm_runner.compare", str(a), str(b)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| generate_time_s | lower |" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "rm_runner.compare", str(a), str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
