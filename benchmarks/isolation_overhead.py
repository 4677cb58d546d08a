"""Benchmark: what running a job in its own process (as every sweep job does) costs.

The same job (a recipe, by default cpu-smoke) runs alternately as a plain run and as the one job
of a sweep (``-m``: the sweep process starts the job in a child and waits on it), --rounds times.
Reported: the job's measured output tok/s both ways (median over rounds) and their ratio, and
the wall time of the whole command both ways and the difference (what isolation adds).

    python benchmarks/isolation_overhead.py --recipe cpu-smoke --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rm_runner.compare import read_run
from rm_runner.rundir import job_dirs


def timed(args: list[str]) -> float:
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rm_runner", *args], capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"rm_runner {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return wall


def throughput(run_dir: Path) -> float:
    run = read_run(run_dir, str(run_dir))
    if not run.comparable:  # skipped (its device is not here) or failed: say why, as the run did
        sys.exit(f"{run_dir}: {run.status}: {run.reason}")
    figure = run.figures.get("output_throughput")
    if figure is None:
        sys.exit(f"{run_dir}: no benchmark output_throughput; give a --recipe with pipeline=benchmark")
    return figure.mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cpu-smoke")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    plain_rate, plain_wall, iso_rate, iso_wall = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="rm-runner-isolation-") as tmp:
        for i in range(args.rounds):
            run = Path(tmp) / f"plain-{i}"
            plain_wall.append(timed([f"recipe={args.recipe}", f"hydra.run.dir={run}"]))
            plain_rate.append(throughput(run))
            sweep = Path(tmp) / f"sweep-{i}"
            # the job alone: the sweep's summary callback (plots) is not part of isolation's cost
            iso_wall.append(timed(["-m", f"recipe={args.recipe}", f"hydra.sweep.dir={sweep}", "~hydra.callbacks.summary"]))
            iso_rate.append(throughput(job_dirs(sweep)[0]))
            print(f"round {i + 1}: plain {plain_rate[-1]:.1f} tok/s in {plain_wall[-1]:.2f} s, "
                  f"isolated {iso_rate[-1]:.1f} tok/s in {iso_wall[-1]:.2f} s", flush=True)
    p, q = statistics.median(plain_rate), statistics.median(iso_rate)
    pw, qw = statistics.median(plain_wall), statistics.median(iso_wall)
    print(f"\nrecipe={args.recipe}, median of {args.rounds} rounds")
    print("| | output tok/s | wall s |\n|---|---|---|")
    print(f"| plain run | {p:.1f} | {pw:.2f} |")
    print(f"| sweep job in its own process | {q:.1f} | {qw:.2f} |")
    print(f"\nthroughput isolated/plain: {q / p:.3f}; wall added by isolation: {qw - pw:+.2f} s")


if __name__ == "__main__":
    main()
