"""The HTTP target: an OpenAI-compatible server loaded as ``vllm bench serve`` loads it.

Every request streams (``stream_options.include_usage`` gives the exact output token count);
the arrival of each chunk with a choice is a token time, text or not, and the last one ends the
request, as in ``vllm bench serve``. Profiles:
synchronous (one at a time), concurrent (at most N in flight, all queued at t=0), poisson
(seeded exponential gaps at ``rate`` requests/s, the last sent at N / rate: ``arrivals``), trace
(each request at its own ``timestamp``). Chat requests go to ``/chat/completions``,
raw prompts and token-id prompts to ``/completions``. With ``stop`` (a capacity probe: the SLO's
objectives and how many requests may miss it), the pass ends as soon as more have missed it:
requests not yet sent are not sent, those in flight are cancelled (the server frees their rows).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from rm_runner.config import GenerationConfig, LoadProfile
from rm_runner.errors import RunnerError
from rm_runner.requests import Request, SamplingParams


Result = tuple[list[dict[str, Any]], float, bool]  # records (the requests that ended), duration, stopped early


@dataclass(frozen=True)
class Stop:
    """End a pass once more than ``misses_allowed`` requests have missed the SLO ``objectives``
    (figure -> (max seconds, percentile))."""

    objectives: dict[str, tuple[float, float]]
    misses_allowed: int

    def missed(self, record: dict[str, Any]) -> bool:
        from rm_runner.benchmark.metrics import meets
        from rm_runner.config import Objective

        return not meets(record, {name: Objective(m, p) for name, (m, p) in self.objectives.items()})


def run(base_url: str, model: str, api_key: str, requests: list[Request], generation: GenerationConfig,
        profile: LoadProfile, concurrency: int, rate: Optional[float], seed: int,
        on_request_done: Callable[[], None] = lambda: None, stop: Optional[Stop] = None) -> Result:
    """All requests once under ``profile`` (or until ``stop``); the per-request records, the duration."""
    return asyncio.run(_run(base_url, model, api_key, requests, generation, profile, concurrency, rate, seed,
                            on_request_done, stop))


def run_in_subprocess(base_url: str, model: str, api_key: str, requests: list[Request], generation: GenerationConfig,
                      profile: LoadProfile, concurrency: int, rate: Optional[float], seed: int,
                      on_request_done: Callable[[], None] = lambda: None, stop: Optional[Stop] = None) -> Result:
    """``run`` in a process of its own: for a server hosted in this process, whose model thread a
    client here would slow down (one GIL), as real clients never do."""
    spec = {"base_url": base_url, "model": model, "requests": [asdict(r) for r in requests],
            "generation": asdict(generation), "profile": profile.value, "concurrency": concurrency, "rate": rate,
            "seed": seed, "stop": asdict(stop) if stop else None}
    proc = subprocess.Popen([sys.executable, "-m", "rm_runner.benchmark.http_load"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "RM_RUNNER_LOAD_API_KEY": api_key})
    last = ""
    with proc:  # closes the pipes and waits for the child
        try:
            proc.stdin.write(json.dumps(spec))
            proc.stdin.close()
            for line in proc.stdout:  # "done" as each request ends (progress as it happens), the result last
                if line.strip() == "done":
                    on_request_done()
                else:
                    last = line
        except BaseException:  # Ctrl-C, or the caller's callback failing: the child goes too
            proc.kill()
            raise
    if proc.returncode != 0:
        raise RunnerError(f"the load generator exited with {proc.returncode} (its error is above)")
    result = json.loads(last)
    return result["records"], result["duration_s"], result["stopped_early"]


def _main() -> None:
    """``python -m rm_runner.benchmark.http_load``: a spec on stdin, "done" per request and the
    result as the last line on stdout; the API key comes in $RM_RUNNER_LOAD_API_KEY."""
    spec = json.loads(sys.stdin.read())
    stop = spec.get("stop")
    records, duration, early = run(
        spec["base_url"], spec["model"], os.environ.get("RM_RUNNER_LOAD_API_KEY", "EMPTY"),
        [Request(**r) for r in spec["requests"]], GenerationConfig(**spec["generation"]), LoadProfile(spec["profile"]),
        spec["concurrency"], spec["rate"], spec["seed"], lambda: print("done", flush=True),
        Stop({k: tuple(v) for k, v in stop["objectives"].items()}, stop["misses_allowed"]) if stop else None)
    print(json.dumps({"records": records, "duration_s": duration, "stopped_early": early}), flush=True)


async def _run(base_url: str, model: str, api_key: str, requests: list[Request], generation: GenerationConfig,
               profile: LoadProfile, concurrency: int, rate: Optional[float], seed: int,
               on_request_done: Callable[[], None], stop: Optional[Stop]) -> Result:
    import httpx

    limit = 1 if profile == LoadProfile.synchronous else concurrency if profile == LoadProfile.concurrent else None
    client = httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", timeout=3600,
                               headers={"Authorization": f"Bearer {api_key}"},
                               limits=httpx.Limits(max_connections=max(64, limit or 0)))
    gate = asyncio.Semaphore(limit) if limit else None
    began = time.perf_counter()
    hopeless = asyncio.Event()  # more requests missed the SLO than stop allows
    misses = 0

    async def one(request: Request, delay: float) -> dict[str, Any]:
        nonlocal misses
        if delay:
            await asyncio.sleep(delay - (time.perf_counter() - began))  # its scheduled arrival, not a wait for readiness
        if gate is not None:
            async with gate:
                record = await _send(client, model, request, generation, began)
        else:
            record = await _send(client, model, request, generation, began)
        on_request_done()
        if stop is not None and stop.missed(record):
            misses += 1
            if misses > stop.misses_allowed:
                hopeless.set()
        return record

    if profile == LoadProfile.trace:
        delays = [r.timestamp or 0.0 for r in requests]
    elif profile == LoadProfile.poisson and rate:
        delays = arrivals(len(requests), rate, seed)
    else:
        delays = [0.0] * len(requests)
    tasks = [asyncio.create_task(one(r, d)) for r, d in zip(requests, delays)]
    watch = asyncio.create_task(hopeless.wait())
    everything = asyncio.gather(*tasks, return_exceptions=True)
    try:
        await asyncio.wait([everything, watch], return_when=asyncio.FIRST_COMPLETED)
        if hopeless.is_set():
            for task in tasks:
                task.cancel()
        await everything
    finally:
        watch.cancel()
        await client.aclose()
    records = [t.result() for t in tasks if not t.cancelled()]
    return records, time.perf_counter() - began, hopeless.is_set()


def arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Each request's send time, in seconds from the start, for Poisson arrivals at ``rate``: seeded
    exponential gaps, scaled so that the last request goes at ``count / rate`` exactly, as ``vllm bench
    serve`` schedules them. Unscaled, the span of 48 gaps varies by ~14% from one seed to another,
    and with it the load and every figure; scaled, a rate is the same load under any seed."""
    rng = random.Random(seed)
    at, times = 0.0, []
    for _ in range(count):
        at += rng.expovariate(rate)
        times.append(at)
    scale = (count / rate) / times[-1] if times else 1.0
    return [t * scale for t in times]


async def _send(client: Any, model: str, request: Request, generation: GenerationConfig, began: float) -> dict[str, Any]:
    """One streamed request, read as raw server-sent events: a load generator spends as little CPU
    per chunk as it can, since on a small machine it shares the cores with the server it measures
    (the ``openai`` package's typed stream took ~0.55 ms of CPU per chunk here, this ~0.19 ms)."""
    max_tokens = request.max_new_tokens or generation.max_new_tokens
    own, extra = SamplingParams.from_generation(generation).openai_fields()
    body: dict[str, Any] = {"model": model, **own, **extra, "max_tokens": max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}}
    conversation = None if request.prompt_ids is not None else request.conversation()
    if conversation is not None:
        path, body["messages"] = "chat/completions", conversation
    else:
        path, body["prompt"] = "completions", request.prompt_ids if request.prompt_ids is not None else request.prompt or ""
    start = time.perf_counter()
    stamps: list[float] = []
    usage = None
    record: dict[str, Any] = {"id": request.id, "start_s": round(start - began, 6)}
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                raise RunnerError(f"HTTP {response.status_code}: {_message(await response.aread())}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RunnerError(f"the stream ended with an error: {_message(data.encode())}")
                if event.get("choices"):  # a token, its text empty or not (a special token), as vllm bench counts
                    stamps.append(time.perf_counter())
                usage = event.get("usage") or usage
    except Exception as exc:  # a failed request is a record, not the end of the benchmark
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}", prompt_tokens=0, output_tokens=0,
                      ttft_s=None, e2el_s=round(time.perf_counter() - start, 6), itl_s=[])
        return record
    end = time.perf_counter()
    record.update(ok=True, error=None,
                  prompt_tokens=usage["prompt_tokens"] if usage else 0,
                  output_tokens=usage["completion_tokens"] if usage else len(stamps),
                  ttft_s=round(stamps[0] - start, 6) if stamps else None,
                  e2el_s=round((stamps[-1] if stamps else end) - start, 6),  # to the last token, as vllm bench
                  itl_s=[round(b - a, 6) for a, b in zip(stamps, stamps[1:])])
    return record


def _message(body: bytes) -> str:
    """The error message of an OpenAI-shaped error body (``{"error": {"message": ...}}``), or the body."""
    try:
        error = json.loads(body).get("error")
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return body.decode(errors="replace")[:500]


if __name__ == "__main__":
    _main()
