"""Benchmark: each serving engine against the local engine on this machine, in one run.

For every engine it starts a real server through rm_runner, sends the same fixed request N
times one at a time (engine.batch_size=1, greedy, fixed output length), and reports
start-to-ready time, p50/p90 latency per request, and the p50 overhead against the local
engine. Engines whose venv is missing are skipped with the reason.

    python benchmarks/engines_latency.py --vllm-python .venv-vllm/bin/python \\
        --triton-python .venv-triton/bin/python --torchserve-python .venv-torchserve/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rm_runner.benchmark.metrics import stats
from rm_runner.rundir import atomic_write_text

PROMPT = "What is the capital of France?"


def run_engine(python: str, engine: str, requests: int, new_tokens: int, work: Path) -> dict:
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": PROMPT}) + "\n" for i in range(requests)))
    run_dir = work / engine
    cmd = [python, "-m", "rm_runner", f"engine={engine}", "engine.batch_size=1", "workload=jsonl",
           f"workload.path={prompts}", f"generation.max_new_tokens={new_tokens}", "generation.ignore_eos=true",
           "model.dtype=float32", "pipeline.steps.generate.print_outputs=false", f"hydra.run.dir={run_dir}"]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    latencies = [json.loads(line)["latency_s"] for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steady = stats(latencies[1:])  # the first request warms caches in every engine
    return {
        "ready_s": metrics["engine"].get("ready_s") or 0.0,
        "load_s": metrics["load_time_s"],
        "p50_ms": round(1000 * steady["p50"], 1),
        "p90_ms": round(1000 * steady["p90"], 1),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python")
    parser.add_argument("--triton-python")
    parser.add_argument("--torchserve-python")
    parser.add_argument("--requests", type=int, default=21)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench") / f"engines-{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    args = parser.parse_args()
    if args.requests < 2:
        parser.error("--requests must be >= 2 (the first only warms up)")
    engines = {"local": sys.executable, "vllm": args.vllm_python, "triton": args.triton_python,
               "torchserve": args.torchserve_python}
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for engine, python in engines.items():
            if not python:
                results[engine] = {"error": f"skipped: no --{engine}-python given"}
                continue
            print(f"{engine} ...", file=sys.stderr)
            results[engine] = run_engine(python, engine, args.requests, args.new_tokens, Path(work))
    local = results["local"].get("p50_ms")
    lines = [f"Fixed request ({PROMPT!r}, {args.new_tokens} new tokens, float32, greedy), "
             f"{args.requests - 1} measured one at a time after one warm-up",
             "", "| engine | start-to-ready s | p50 ms | p90 ms | p50 overhead vs local | whole run s |",
             "|---|---|---|---|---|---|"]
    for engine, r in results.items():
        if "error" in r:
            lines.append(f"| {engine} | {r['error']} | | | | |")
            continue
        overhead = f"+{r['p50_ms'] - local:.1f} ms ({r['p50_ms'] / local:.2f}x)" if local else ""
        lines.append(f"| {engine} | {r['ready_s']} | {r['p50_ms']} | {r['p90_ms']} | {overhead} | {r['wall_s']} |")
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(args.out / "table.md", table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = {e: r for e, r in results.items() if "error" not in r}
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(list(ok), [r["p50_ms"] for r in ok.values()], label="p50")
        ax.scatter(list(ok), [r["p90_ms"] for r in ok.values()], color="black", zorder=3, label="p90")
        ax.set_ylabel("latency per request, ms")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "plot.png", dpi=120)
    except ImportError:
        print("plot skipped: pip install matplotlib", file=sys.stderr)
    print(table)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
