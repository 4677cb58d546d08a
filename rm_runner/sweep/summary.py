"""The summary across a sweep's jobs: ``summary.csv``, ``summary.md`` and PNG plots.

A Hydra callback (``on_multirun_end``), so it comes out the same whatever launcher ran the
jobs: it reads the job directories under the sweep directory (each a run directory with
``status.json``, ``overrides.json`` and ``metrics.json``), one row per job, or per job and rate
under a rate sweep. A ``pipeline=eval`` job gives one row per task metric (its ``eval.json``),
with the difference against the reference job (``eval.reference_device`` at
``eval.reference_dtype``) and the verdict of ``evaluation.difference``; ``eval.png`` draws the
scores with their stderr. Also ``python -m rm_runner.sweep.summary SWEEP_DIR`` to redraw it.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rm_runner.evaluation.difference import RULE, Score, difference, scores_of
from rm_runner.rundir import (CONFIG, EVAL, METRICS, OVERRIDES, atomic_write_bytes, atomic_write_text, job_dirs,
                              read_json_or_none, read_status)

log = logging.getLogger(__name__)

# Column: (title, how to read it from a job's metrics section).
FIGURES = (
    ("output tok/s", "output_throughput"),
    ("±", "output_throughput:stdev"),
    ("req/s", "request_throughput"),
    ("TTFT p50 s", "ttft_s.p50"),
    ("TPOT p50 s", "tpot_s.p50"),
    ("E2EL p50 s", "e2el_s.p50"),
    ("goodput req/s", "request_goodput"),
    ("SLO met", "slo_attainment"),
    ("capacity req/s", "capacity_rps"),
    ("tok/J", "energy.output_tokens_per_joule"),
)
# An eval job's columns, one row per task metric.
EVAL_COLUMNS = ("task", "metric", "score", "stderr", "n", "device", "dtype", "vs reference", "verdict")


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = write_summary(Path(config.hydra.sweep.dir))
        if any(r["status"] == "failed" for r in rows):
            log.error("some jobs failed; see their status.json")
            sys.exit(1)


def job_rows(job: Path) -> list[dict[str, Any]]:
    """One job's rows: its status and headline figures (one row per rate under a rate sweep)."""
    status = read_status(job) or {}
    metrics = read_json_or_none(job / METRICS) or {}
    overrides = read_json_or_none(job / OVERRIDES, list) or []
    base = {"job": job.name, "overrides": " ".join(o for o in overrides if not o.startswith("hydra.")),
            "status": status.get("status", "unknown"), "reason": status.get("reason") or ""}
    record = read_json_or_none(job / EVAL)
    if record is not None or _pipeline(job) == "eval":
        return eval_rows(record or {}, base)
    bench = metrics.get("benchmark") or {}
    if bench.get("summary"):
        return benchmark_rows(bench, base)
    # a generate run: its single throughput figure
    return [{**base, "rate": None, "output tok/s": metrics.get("output_tokens_per_s"),
             "req/s": metrics.get("requests_per_s")}]


def benchmark_rows(bench: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    """A benchmark section's rows: one per rate under a rate sweep or a capacity search's probes,
    else one; each with what belongs to the whole run (the capacity found and its bracket, the
    run's tokens per joule: the plots read those, not a rate's)."""
    found = bench.get("capacity") or {}
    run = {"capacity req/s": found.get("capacity_rps"), "_bracket": found.get("bracket"),
           "_run tok/J": (bench.get("energy") or {}).get("output_tokens_per_joule")}
    if bench.get("by_rate"):
        return [{**base, "rate": float(rate), **_figures(summary), **run} for rate, summary in bench["by_rate"].items()]
    return [{**base, "rate": None, **_figures(bench.get("summary") or {}), **run}]


def eval_rows(record: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    """An eval job's rows, one per task metric (one row with its status when it has no scores)."""
    where = {"device": record.get("device"), "dtype": record.get("dtype")}
    config = record.get("config") or {}
    reference = (config.get("reference_device", "cpu"), config.get("reference_dtype", "float32"))
    scores = scores_of(record)
    if not scores:
        return [{**base, "kind": "eval", **where, "reference": reference}]
    return [{**base, "kind": "eval", **where, "reference": reference, "task": score.task, "metric": score.metric,
             "score": score.value, "stderr": score.stderr, "n": score.samples, "_score": score} for score in scores]


def _pipeline(job: Path) -> Optional[str]:
    """The pipeline a job was asked to run (its config.yaml is written before anything can fail)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(OmegaConf.load(job / CONFIG), "pipeline.name")
    except Exception:  # no config or an unreadable one: the row keeps its status and reason
        return None


def against_references(rows: list[dict[str, Any]]) -> None:
    """Fill each eval row's difference from its reference job's same task metric, and the verdict.

    The reference job is an ok eval job on the reference device at the reference dtype; where
    several are (a sweep over engines too), the one sharing the most overrides with the row's job."""
    jobs: dict[str, dict[tuple[str, str], Score]] = {}
    where: dict[str, tuple[Any, Any]] = {}
    overrides: dict[str, set[str]] = {}
    for row in rows:
        if row.get("kind") == "eval" and row["status"] == "ok" and "_score" in row:
            jobs.setdefault(row["job"], {})[row["_score"].key] = row["_score"]
            where[row["job"]] = (row.get("device"), row.get("dtype"))
            overrides[row["job"]] = set(row["overrides"].split())
    for row in rows:
        score = row.pop("_score", None)
        if score is None:
            continue
        candidates = [j for j in jobs if where[j] == tuple(row["reference"])]
        if not candidates:
            row["verdict"] = "no reference job ({} at {}) in this sweep".format(*row["reference"])
            continue
        ref = max(candidates, key=lambda j: len(overrides[j] & overrides[row["job"]]))
        if ref == row["job"]:
            row["verdict"] = "reference"
            continue
        theirs = jobs[ref].get(score.key)
        if theirs is None:
            row["verdict"] = f"not in the reference job {ref}"
            continue
        diff = difference(theirs, score)
        row["vs reference"], row["verdict"] = diff.difference, diff.verdict


def _figures(summary: dict[str, Any]) -> dict[str, Optional[float]]:
    row: dict[str, Optional[float]] = {}
    for title, key in FIGURES:
        name, _, stat = key.partition(":")
        value = summary.get(name) or {}
        row[title] = value.get(stat or "mean")
    return row


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = [row for job in job_dirs(sweep_dir) for row in job_rows(job)]
    # Label each job by what sets it apart: the overrides not shared by every job of the sweep.
    split = [row["overrides"].split() for row in rows]
    common = set.intersection(*(set(s) for s in split)) if len(rows) > 1 else set()
    for row, overrides in zip(rows, split):
        row["label"] = " ".join(o for o in overrides if o not in common) or row["job"]
    against_references(rows)
    return rows


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = collect(sweep_dir)
    if not rows:
        log.warning("no jobs under %s", sweep_dir)
        return rows
    evals = any(r.get("kind") == "eval" for r in rows)
    performance = any(r.get("kind") != "eval" for r in rows)
    columns = ["job", "label", "overrides", "status", "reason", *(["rate", *[t for t, _ in FIGURES]] if performance else []),
               *(EVAL_COLUMNS if evals else [])]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep_dir / "summary.csv", buffer.getvalue())
    table = markdown(rows)
    atomic_write_text(sweep_dir / "summary.md", table + "\n")
    plots = draw(rows, sweep_dir)
    from rm_runner.report import write_sweep_report

    report = write_sweep_report(sweep_dir, table, job_dirs(sweep_dir))
    print(f"\nsweep summary ({sweep_dir}):\n{table}\n" + "".join(f"plot: {p}\n" for p in plots)
          + f"report: {report}\n", flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The performance table, the eval table, or both (each for the jobs it fits)."""
    evals = [r for r in rows if r.get("kind") == "eval"]
    performance = [r for r in rows if r.get("kind") != "eval"]
    parts = [performance_table(performance)] if performance else []
    if evals:
        titles = ["label", "status", "task", "metric", "score", "stderr", "n", "vs reference", "verdict", "reason"]
        lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
        lines += ["| " + " | ".join(_cell(row.get(t)) for t in titles) + " |" for row in evals]
        lines.append(f"\nReference: each job's eval.reference_device at eval.reference_dtype. Rule: {RULE}.")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def performance_table(rows: list[dict[str, Any]]) -> str:
    """One row per job (and rate); a figure no job has (goodput without an SLO) is left out."""
    rated = any(r.get("rate") is not None for r in rows)
    shown = [t for t, _ in FIGURES if any(r.get(t) is not None for r in rows)]
    titles = ["label", "status", *(["rate"] if rated else []), *shown, "reason"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        cells = [_cell(row.get(t)) for t in titles]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/")


def draw(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """throughput.png and latency.png per job; latency_vs_throughput.png for rate sweeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "ok" and r.get("output tok/s") is not None]
    scored = [r for r in rows if r["status"] == "ok" and r.get("score") is not None]
    if not done and not scored:
        return []
    written = []

    def save(fig: Any, name: str) -> None:
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(out / name, buffer.getvalue())
        written.append(out / name)

    single = [r for r in done if r.get("rate") is None]
    if single:
        labels = [r["label"] for r in single]
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(single)), 4))
        ax.bar(labels, [r["output tok/s"] for r in single], yerr=[r.get("±") or 0 for r in single], capsize=4)
        ax.set_ylabel("output tokens/s")
        ax.set_title("throughput per job")
        ax.tick_params(axis="x", rotation=20)
        save(fig, "throughput.png")
        latency = [t for t in ("TTFT p50 s", "TPOT p50 s", "E2EL p50 s") if any(r.get(t) for r in single)]
        if latency:
            fig, axes = plt.subplots(1, len(latency), figsize=(4 * len(latency), 4), squeeze=False)
            for ax, title in zip(axes[0], latency):
                ax.bar(labels, [r.get(title) or 0 for r in single])
                ax.set_title(title)
                ax.tick_params(axis="x", rotation=20)
            save(fig, "latency.png")
    rated = [r for r in done if r.get("rate") is not None]
    if rated:
        fig, ax = plt.subplots(figsize=(6, 4))
        for job in dict.fromkeys(r["job"] for r in rated):
            points = sorted((r for r in rated if r["job"] == job), key=lambda r: r["rate"])
            ax.plot([p["output tok/s"] for p in points], [p.get("E2EL p50 s") for p in points], marker="o",
                    label=points[0]["label"])
            for p in points:
                ax.annotate(f"{p['rate']:g}/s", (p["output tok/s"], p.get("E2EL p50 s") or 0), fontsize=7)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("E2E latency p50 (s)")
        ax.set_title("latency against throughput (request rate sweep)")
        ax.legend(fontsize=7)
        save(fig, "latency_vs_throughput.png")
    capacity = {r["job"]: r for r in done if r.get("capacity req/s") is not None}
    if capacity:  # one bar per job: the capacity found, its bracket as the error bar
        jobs = list(capacity.values())
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(jobs)), 4))
        missed = [r["_bracket"][1] if r.get("_bracket") else None for r in jobs]  # the capacity is its low end
        above = [m - r["capacity req/s"] if m is not None else 0 for r, m in zip(jobs, missed)]
        ax.bar([r["label"] for r in jobs], [r["capacity req/s"] for r in jobs], yerr=[[0] * len(jobs), above], capsize=4)
        ax.set_ylabel("req/s within the SLO")
        ax.set_title("capacity per job (whisker: the lowest rate missed)")
        ax.tick_params(axis="x", rotation=20)
        save(fig, "capacity.png")
    per_joule = [r for r in {r["job"]: r for r in done}.values() if r.get("_run tok/J") is not None]
    if per_joule:
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(per_joule)), 4))
        ax.bar([r["label"] for r in per_joule], [r["_run tok/J"] for r in per_joule])
        ax.set_ylabel("output tokens per joule (net of idle)")
        ax.set_title("energy efficiency per job")
        ax.tick_params(axis="x", rotation=20)
        save(fig, "energy.png")
    if rated and any(r.get("TPOT p50 s") for r in rated):
        save(_pareto_figure(plt, rated), "pareto.png")
    if scored:
        save(_eval_figure(plt, scored), "eval.png")
    return written


def _pareto_figure(plt: Any, rows: list[dict[str, Any]]) -> Any:
    """Each job's curve of throughput against the speed one user sees (1 / TPOT p50), by rate:
    the trade-off a device offers, as vLLM's and inference-perf's Pareto plots draw it."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for job in dict.fromkeys(r["job"] for r in rows):
        points = sorted((r for r in rows if r["job"] == job and r.get("TPOT p50 s")), key=lambda r: r["rate"])
        if points:
            ax.plot([1 / p["TPOT p50 s"] for p in points], [p["output tok/s"] for p in points], marker="o",
                    label=points[0]["label"])
    ax.set_xlabel("output tokens/s per user (1 / TPOT p50)")
    ax.set_ylabel("output tokens/s (all users)")
    ax.set_title("throughput against per-user speed")
    ax.legend(fontsize=7)
    return fig


def _eval_figure(plt: Any, rows: list[dict[str, Any]]) -> Any:
    """One panel per task metric: a bar per job with its stderr, the reference job hatched."""
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    fig, axes = plt.subplots(1, len(keys), figsize=(max(4.5, 1.1 * len({r["job"] for r in rows}) + 2) * len(keys), 4),
                             squeeze=False)
    for ax, (task, metric) in zip(axes[0], keys):
        mine = [r for r in rows if (r["task"], r["metric"]) == (task, metric)]
        bars = ax.bar([r["label"] for r in mine], [r["score"] for r in mine],
                      yerr=[r.get("stderr") or 0 for r in mine], capsize=4, color="tab:blue")
        for bar, row in zip(bars, mine):
            if row.get("verdict") == "reference":
                bar.set_facecolor("lightgray")
                bar.set_edgecolor("black")
                bar.set_hatch("//")
            elif row.get("verdict"):
                ax.annotate(row["verdict"], (bar.get_x() + bar.get_width() / 2, 0), xytext=(0, 3),
                            textcoords="offset points", ha="center", fontsize=7, rotation=90, va="bottom", color="white")
        ax.set_title(f"{task}\n{metric}", fontsize=9)
        ax.set_ylabel("score (± stderr)")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("score per job; the reference job hatched", fontsize=10)
    return fig


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python -m rm_runner.sweep.summary SWEEP_DIR")
    write_summary(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
