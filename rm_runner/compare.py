"""``python -m rm_runner.compare BASELINE OTHER [OTHER ...]``: is a difference between runs real?

Each argument is a run directory (it has ``status.json``; ``metrics.json`` when it ran) or a
sweep directory (its subdirectories are run directories). Sweeps are matched job by job on the
override part of Hydra's job folder name ``${hydra.job.num}_${hydra.job.override_dirname}``
(what follows the first ``_``), so job numbers may differ; a single run directory given beside
sweeps is compared with every job. The first argument is the baseline.

Figures: a benchmark run's ``benchmark.summary`` (``rm_runner.benchmark.metrics.HEADLINE``, each
as mean, stdev, n over repetitions) and, under a rate sweep, ``benchmark.by_rate`` (named
``FIGURE@rate=R``). A run without a benchmark section (``pipeline=generate``) gives its
top-level ``output_tokens_per_s`` and ``generate_time_s`` as single values (n=1). A
``pipeline=eval`` run gives its task scores (``eval.json``: each task metric's value and stderr),
judged by ``rm_runner.evaluation.difference`` (within error, or higher/lower by N stderr).

The rule, for each figure of each run against the baseline:

- **no spread: rerun with benchmark.repetitions>1** when either side has n < 2: one number
  carries no noise estimate, so no verdict is given, however large the change;
- **within noise** when the intervals mean ± 2·stdev of the two sides overlap
  (|a.mean - b.mean| <= 2·a.stdev + 2·b.stdev);
- otherwise **faster** or **slower**: figures whose name (before any ``.`` or ``@``) ends in
  ``_s`` are times (``ttft_s.p50``, ``generate_time_s``) and lower is faster; all others are
  rates (``*_throughput``, ``*_per_s``) and higher is faster.

The change is (run.mean - baseline.mean) / baseline.mean. Runs whose status is not ``ok``
(skipped, failed, still running) are listed with their reason, never compared.
Exit status: 0, or 2 when an argument is neither a run nor a sweep directory.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from rm_runner.benchmark.metrics import HEADLINE
from rm_runner.evaluation.difference import RULE as SCORE_RULE
from rm_runner.evaluation.difference import Score, difference, scores_of
from rm_runner.rundir import EVAL, METRICS, STATUS, atomic_write_text, is_run_dir, as_read, job_dirs

NO_SPREAD = "no spread: rerun with benchmark.repetitions>1"
WITHIN_NOISE = "within noise"
RULE = ("within noise when the intervals mean ± 2·stdev overlap; no verdict when either side has n < 2; "
        "otherwise faster/slower (times *_s: lower is faster; rates: higher is faster)")
# Figures of a run without a benchmark section (pipeline=generate), one value each.
SINGLE_FIGURES = ("output_tokens_per_s", "generate_time_s")


class NotARunError(Exception):
    """An argument is neither a run directory nor a sweep directory."""


@dataclass
class Figure:
    mean: float
    stdev: float = 0.0
    n: int = 1

    def text(self) -> str:
        if self.n < 2:
            return f"{self.mean:.4g} (n={self.n})"
        return f"{self.mean:.4g} ± {self.stdev:.2g} (n={self.n})"


@dataclass
class Run:
    """One run directory as read: its status, and its figures when it finished ok."""

    label: str
    path: str
    status: str
    reason: Optional[str] = None
    figures: dict[str, Figure] = field(default_factory=dict)
    scores: dict[tuple[str, str], Score] = field(default_factory=dict)  # (task, metric): an eval run's

    @property
    def comparable(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------------------------------- reading

def higher_is_better(name: str) -> bool:
    """Times (``*_s``) are better low, rates (throughputs, ``*_per_s``) high: see the module rule."""
    base = name.split("@", 1)[0].split(".", 1)[0]
    return not (base.endswith("_s") and not base.endswith("_per_s"))


def _summary_figures(summary: Any, suffix: str = "") -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    if isinstance(summary, dict):
        for name, value in summary.items():
            if isinstance(value, dict) and isinstance(value.get("mean"), (int, float)):
                figures[f"{name}{suffix}"] = Figure(float(value["mean"]), float(value.get("stdev") or 0.0),
                                                    int(value.get("n") or 1))
    return figures


def figures_of(metrics: dict[str, Any]) -> dict[str, Figure]:
    """The comparable figures of one ``metrics.json`` (see the module docstring)."""
    benchmark = metrics.get("benchmark")
    if isinstance(benchmark, dict) and benchmark.get("summary"):
        figures = _summary_figures(benchmark["summary"])
        by_rate = benchmark.get("by_rate") or {}  # {rate: a summary like the one above}
        for rate, summary in (by_rate.items() if isinstance(by_rate, dict) else ()):
            figures.update(_summary_figures(summary, f"@rate={rate}"))
        return figures
    return {name: Figure(float(metrics[name])) for name in SINGLE_FIGURES
            if isinstance(metrics.get(name), (int, float))}


def read_run(path: Path, label: str) -> Run:
    """A run directory's status and figures; anything unreadable becomes the reason it is not compared."""
    try:
        status = json.loads((path / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return Run(label, str(path), "unreadable", f"{STATUS}: {exc}")
    if not isinstance(status, dict):
        return Run(label, str(path), "unreadable", f"{STATUS}: not a JSON object")
    status = as_read(status)
    state = str(status.get("status"))
    if state != "ok":
        reason = status.get("reason") or {"running": "not finished (still running)"}.get(state)
        return Run(label, str(path), state, reason)
    try:
        metrics = json.loads((path / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return Run(label, str(path), "no metrics", f"{METRICS}: {exc}")
    try:
        figures = figures_of(metrics)
    except (TypeError, AttributeError, ValueError) as exc:  # valid JSON, not the shape rm_runner writes
        return Run(label, str(path), "no metrics", f"{METRICS}: not as rm_runner writes it ({exc})")
    scores: dict[tuple[str, str], Score] = {}
    if (path / EVAL).exists():
        try:
            scores = {score.key: score for score in scores_of(json.loads((path / EVAL).read_text(encoding="utf-8")))}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            return Run(label, str(path), "no metrics", f"{EVAL}: not as rm_runner writes it ({exc})")
    if not figures and not scores:
        return Run(label, str(path), "no metrics", f"{METRICS} has no benchmark summary and no "
                                                   f"{' or '.join(SINGLE_FIGURES)}, and there is no {EVAL}")
    return Run(label, str(path), "ok", None, figures, scores)


def job_key(folder_name: str) -> str:
    """The override part of ``${hydra.job.num}_${hydra.job.override_dirname}``."""
    num, sep, rest = folder_name.partition("_")
    return rest if sep and num.isdigit() else folder_name


def jobs_by_key(path: Path) -> dict[str, Path]:
    """A sweep directory's run directories by job key, in job-number order."""
    jobs: dict[str, Path] = {}
    for sub in job_dirs(path):
        jobs.setdefault(job_key(sub.name), sub)
    return jobs


def expand(argument: str) -> Optional[dict[str, Path]]:
    """None for a run directory, its jobs for a sweep directory; NotARunError otherwise."""
    path = Path(argument)
    if not path.is_dir():
        raise NotARunError(f"{argument}: {'not a directory' if path.exists() else 'no such directory'}")
    if is_run_dir(path):
        return None
    jobs = jobs_by_key(path)
    if not jobs:
        raise NotARunError(f"{argument}: not a run directory (no {STATUS}) and not a sweep directory "
                           f"(no subdirectory with {STATUS})")
    return jobs


# ---------------------------------------------------------------------------------------- comparing

def verdict(name: str, base: Figure, other: Figure) -> str:
    """The module docstring's rule."""
    if base.n < 2 or other.n < 2:
        return NO_SPREAD
    if abs(other.mean - base.mean) <= 2 * base.stdev + 2 * other.stdev:
        return WITHIN_NOISE
    return "faster" if (other.mean > base.mean) == higher_is_better(name) else "slower"


def change(base: Figure, other: Figure) -> Optional[float]:
    return (other.mean - base.mean) / base.mean if base.mean else None


def _against_baseline(runs: list[Run], values: Callable[[Run], dict[Any, Any]], keys: Callable[[Run, list[Run]], list[Any]],
                      judge: Callable[[Any, Any, Any], dict[str, Any]],
                      blank: dict[str, Any]) -> list[tuple[Any, Any, list[dict[str, Any]]]]:
    """For each key: the baseline's value and each other ok run's entry (``judge``'s fields, or
    ``blank`` and which side misses it)."""
    base = runs[0]
    others = [r for r in runs[1:] if r.comparable]
    if not base.comparable or not others:
        return []
    out = []
    for key in dict.fromkeys(keys(base, others)):
        b = values(base).get(key)
        entries = []
        for run in others:
            o = values(run).get(key)
            if b is None or o is None:
                entries.append({"label": run.label, "value": asdict(o) if o else None, **blank,
                                "verdict": f"missing in {base.label if b is None else run.label}"})
            else:
                entries.append({"label": run.label, "value": asdict(o), **judge(key, b, o)})
        out.append((key, b, entries))
    return out


def compare_group(runs: list[Run]) -> list[dict[str, Any]]:
    """One entry per figure: the baseline's value and each other run's value, change and verdict."""
    def names(base: Run, others: list[Run]) -> list[str]:
        return ([n for n in HEADLINE if n in base.figures] + [n for n in base.figures if n not in HEADLINE]
                + [n for r in others for n in r.figures if n not in base.figures])

    compared = _against_baseline(runs, lambda r: r.figures, names,
                                 lambda name, b, o: {"change": change(b, o), "verdict": verdict(name, b, o)},
                                 {"change": None})
    return [{"name": name, "better": "higher" if higher_is_better(name) else "lower",
             "baseline": asdict(b) if b else None, "others": entries} for name, b, entries in compared]


def compare_scores(runs: list[Run]) -> list[dict[str, Any]]:
    """One entry per task metric: the baseline's score and each other run's, difference and verdict."""
    def judged(key: Any, b: Score, o: Score) -> dict[str, Any]:
        d = difference(b, o)
        return {"difference": d.difference, "stderr": d.stderr, "verdict": d.verdict}

    compared = _against_baseline(runs, lambda r: r.scores,
                                 lambda base, others: [*base.scores, *(k for r in others for k in r.scores)],
                                 judged, {"difference": None, "stderr": None})
    rows = []
    for (task, metric), b, entries in compared:
        better = (b or next(Score(**e["value"]) for e in entries if e["value"])).higher_is_better
        rows.append({"task": task, "metric": metric, "better": "higher" if better else "lower",
                     "baseline": asdict(b) if b else None, "others": entries})
    return rows


def collect(arguments: list[str]) -> list[tuple[Optional[str], list[Run]]]:
    """(job key or None, the runs to compare, baseline first) for each job."""
    expanded = [expand(a) for a in arguments]
    if all(e is None for e in expanded):
        return [(None, [read_run(Path(a), a) for a in arguments])]
    keys = list(dict.fromkeys(k for e in expanded if e is not None for k in e))
    groups = []
    for key in keys:
        runs = []
        for argument, jobs in zip(arguments, expanded):
            if jobs is None:
                runs.append(read_run(Path(argument), argument))
            elif key in jobs:
                runs.append(read_run(jobs[key], argument))
            else:
                runs.append(Run(argument, argument, "missing", f"no job {key or '(no overrides)'} in this sweep"))
        groups.append((key, runs))
    return groups


def report(arguments: list[str]) -> dict[str, Any]:
    """Everything the table, JSON and CSV show."""
    groups = []
    for key, runs in collect(arguments):
        groups.append({"job": key, "runs": [{k: v for k, v in asdict(r).items() if k not in ("figures", "scores")}
                                            for r in runs],
                       "figures": compare_group(runs), "scores": compare_scores(runs)})
    not_compared = [{"job": g["job"], **r} for g in groups for r in g["runs"] if r["status"] != "ok"]
    return {"baseline": arguments[0], "groups": groups, "not_compared": not_compared,
            "rule": RULE, "score_rule": SCORE_RULE}


# ---------------------------------------------------------------------------------------- output

def _value(value: Optional[dict[str, Any]]) -> str:
    return Figure(**value).text() if value else "—"


def _change(value: Optional[float]) -> str:
    return f"{value:+.1%}" if value is not None else "n/a"


def _score(value: Optional[dict[str, Any]]) -> str:
    return Score(**value).text() if value else "—"


def _scores_table(data: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    labels = [e["label"] for e in rows[0]["others"]]
    header = ["task", "metric", "better", f"{data['baseline']} (baseline)"]
    for label in labels:
        header += [label, "vs baseline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["task"], row["metric"], row["better"], _score(row["baseline"])]
        for entry in row["others"]:
            shown = f"{entry['difference']:+.4g} " if entry["difference"] is not None else ""
            cells += [_score(entry["value"]), f"{shown}{entry['verdict']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def markdown(data: dict[str, Any]) -> str:
    out = io.StringIO()
    for group in data["groups"]:
        if group["job"] is not None:
            out.write(f"## {group['job'] or '(no overrides)'}\n\n")
        if group["figures"]:
            labels = [e["label"] for e in group["figures"][0]["others"]]
            header = ["figure", "better", f"{data['baseline']} (baseline)"]
            for label in labels:
                header += [label, "vs baseline"]
            out.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
            for row in group["figures"]:
                cells = [row["name"], row["better"], _value(row["baseline"])]
                for entry in row["others"]:
                    cells += [_value(entry["value"]), f"{_change(entry['change'])} {entry['verdict']}"]
                out.write("| " + " | ".join(cells) + " |\n")
            out.write("\n")
        if group["scores"]:
            out.write(_scores_table(data, group["scores"]))
        if not group["figures"] and not group["scores"]:
            out.write("Nothing to compare: the baseline and at least one other run must be ok.\n\n")
        for run in group["runs"]:
            if run["status"] != "ok":
                where = f" ({run['path']})" if run["path"] != run["label"] else ""
                out.write(f"- not compared: {run['label']}{where}: {run['status']}: {run['reason']}\n")
        if any(run["status"] != "ok" for run in group["runs"]):
            out.write("\n")
    scored = any(g["scores"] for g in data["groups"])
    if any(g["figures"] for g in data["groups"]) or not scored:
        out.write(f"Rule: {data['rule']}.\n")
    if scored:
        out.write(f"Scores: {data['score_rule']}.\n")
    return out.getvalue()


CSV_FIELDS = ["job", "figure", "better", "baseline", "baseline_mean", "baseline_stdev", "baseline_n",
              "run", "mean", "stdev", "n", "change", "verdict", "baseline_stderr", "stderr", "difference"]


def write_csv(data: dict[str, Any], path: Path) -> None:
    """One row per figure and run, written whole (atomically) or not at all."""
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for group in data["groups"]:
        for row in group["figures"]:
            base = row["baseline"] or {}
            for entry in row["others"]:
                value = entry["value"] or {}
                writer.writerow({
                    "job": group["job"] or "", "figure": row["name"], "better": row["better"],
                    "baseline": data["baseline"], "baseline_mean": base.get("mean"),
                    "baseline_stdev": base.get("stdev"), "baseline_n": base.get("n"),
                    "run": entry["label"], "mean": value.get("mean"), "stdev": value.get("stdev"),
                    "n": value.get("n"), "change": entry["change"], "verdict": entry["verdict"],
                })
        for row in group["scores"]:  # a task score: its value as the mean, its own stderr
            base = row["baseline"] or {}
            for entry in row["others"]:
                value = entry["value"] or {}
                writer.writerow({
                    "job": group["job"] or "", "figure": f"{row['task']} {row['metric']}", "better": row["better"],
                    "baseline": data["baseline"], "baseline_mean": base.get("value"), "baseline_n": base.get("samples"),
                    "baseline_stderr": base.get("stderr"), "run": entry["label"], "mean": value.get("value"),
                    "n": value.get("samples"), "stderr": value.get("stderr"), "difference": entry["difference"],
                    "verdict": entry["verdict"],
                })
    atomic_write_text(path, handle.getvalue())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="rm-runner-compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="DIR", help="run or sweep directories; the first is the baseline")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write one CSV row per figure and run")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two directories: a baseline and a run to compare with it")
    try:
        data = report(args.runs)
    except NotARunError as exc:
        print(f"rm-runner-compare: error: {exc}", file=sys.stderr)
        return 2
    if args.csv:
        try:
            write_csv(data, args.csv)
        except OSError as exc:
            print(f"rm-runner-compare: error: --csv {args.csv}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    print(json.dumps(data, indent=2) if args.json else markdown(data), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
