"""Benchmark: the OpenAI-compatible API against the local engine, on this machine, in one run.

1. Throughput: the 16 prompts of a workload (chat-templated, greedy, exactly --new-tokens each)
   as 16 concurrent streaming-off requests through ``pipeline=serve`` with the official
   ``openai`` client, against the same 16 prompts as one offline batch on the local engine
   (``pipeline=generate``, generation time only). Reported: output tok/s of each and the ratio.
2. Added latency: one fixed request sent N times one at a time through the API (client-side
   wall time) against the same request as a direct engine call (``engine.batch_size=1``, the
   latency the run records around ``backend.execute``). Reported: p50/p90 each and the p50
   difference.

    python benchmarks/serve_vs_offline.py --prompts ../shared/workloads/w16.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from rm_runner.benchmark.metrics import stats

PROMPT = "What is the capital of France?"
MODEL = "smollm2-135m"


def rm_runner(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "rm_runner", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"rm_runner {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc


def offline(prompts: Path, new_tokens: int, rounds: int, latency_requests: int, work: Path) -> dict:
    common = ["model.dtype=float32", "generation.ignore_eos=true", "pipeline.steps.generate.print_outputs=false"]
    rates = []
    for i in range(rounds):
        run = work / f"offline-{i}"
        rm_runner(*common, "workload=jsonl", f"workload.path={prompts}", f"generation.max_new_tokens={new_tokens}",
                  "engine.batch_size=16", f"hydra.run.dir={run}")
        rates.append(json.loads((run / "metrics.json").read_text())["output_tokens_per_s"])
    fixed = work / "fixed.jsonl"
    fixed.write_text("".join(json.dumps({"id": str(i), "prompt": PROMPT}) + "\n" for i in range(latency_requests + 1)))
    rm_runner(*common, "workload=jsonl", f"workload.path={fixed}", "generation.max_new_tokens=32",
              "engine.batch_size=1", f"hydra.run.dir={work / 'direct'}")
    latencies = [json.loads(line)["latency_s"] for line in (work / "direct" / "generations.jsonl").read_text().splitlines()]
    return {"tok_s": statistics.median(rates), "latencies": latencies[1:]}  # the first warms caches


def start_server(work: Path) -> tuple[subprocess.Popen, str]:
    run = work / "serve"
    log = work / "server.err"  # a file, not a pipe: nobody reads a pipe while it serves, and a full one blocks it
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "rm_runner", "pipeline=serve", "server.port=0",
                                 "model.dtype=float32", f"hydra.run.dir={run}"], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "RM_RUNNER_API_KEY": ""})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {log.read_text()[-2000:]}")
        if (run / "server.json").exists():
            url = json.loads((run / "server.json").read_text())["url"]
            try:
                if httpx.get(url.removesuffix("/v1") + "/health").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    proc.kill()
    sys.exit("the server was not ready within 300 s")


def through_api(url: str, prompts: list[str], new_tokens: int, rounds: int, latency_requests: int) -> dict:
    async def burst() -> tuple[float, int]:
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        began = time.perf_counter()
        answers = await asyncio.gather(*(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=new_tokens, temperature=0,
            extra_body={"ignore_eos": True}) for p in prompts))
        elapsed = time.perf_counter() - began
        await client.close()
        return elapsed, sum(a.usage.completion_tokens for a in answers)

    asyncio.run(burst())  # warm-up
    rates = []
    for _ in range(rounds):
        elapsed, tokens = asyncio.run(burst())
        rates.append(tokens / elapsed)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    latencies = []
    for _ in range(latency_requests + 1):
        began = time.perf_counter()
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=32,
                                       temperature=0, extra_body={"ignore_eos": True})
        latencies.append(time.perf_counter() - began)
    return {"tok_s": statistics.median(rates), "latencies": latencies[1:]}


def pct(values: list[float]) -> tuple[float, float]:
    """p50 and p90 in ms, computed as rm_runner's benchmark computes them."""
    figures = stats(values)
    return figures["p50"] * 1000, figures["p90"] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL with 16 {'prompt': ...} lines")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=20)
    args = parser.parse_args()
    if args.rounds < 1 or args.latency_requests < 1:
        parser.error("--rounds and --latency-requests must be >= 1")
    prompts = [json.loads(line)["prompt"] for line in args.prompts.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory(prefix="rm-runner-bench-") as tmp:
        work = Path(tmp)
        local = offline(args.prompts, args.new_tokens, args.rounds, args.latency_requests, work)
        proc, url = start_server(work)
        try:
            api = through_api(url, prompts, args.new_tokens, args.rounds, args.latency_requests)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    d50, d90 = pct(local["latencies"])
    a50, a90 = pct(api["latencies"])
    print(f"\n{len(prompts)} prompts x {args.new_tokens} tokens, greedy, float32, median of {args.rounds} rounds")
    print("| path | output tok/s | ratio |\n|---|---|---|")
    print(f"| offline batch (local engine) | {local['tok_s']:.1f} | 1.00 |")
    print(f"| API, {len(prompts)} concurrent requests | {api['tok_s']:.1f} | {api['tok_s'] / local['tok_s']:.2f} |")
    print(f"\nfixed request (32 tokens), {args.latency_requests} requests one at a time")
    print("| path | p50 ms | p90 ms |\n|---|---|---|")
    print(f"| direct engine call | {d50:.1f} | {d90:.1f} |")
    print(f"| API (openai client) | {a50:.1f} | {a90:.1f} |")
    print(f"\nadded latency per request (p50): {a50 - d50:+.1f} ms")


if __name__ == "__main__":
    main()
