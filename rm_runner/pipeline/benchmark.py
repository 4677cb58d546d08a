"""Step: measure the workload on the engine: warm-up, then repetitions, per-request records.

Where requests go (``benchmark.target``): in-process through the engine's streaming form; over
HTTP to the engine's own OpenAI-compatible server (``engine=vllm``, ``device=remote``); or
(``api``) through rm_runner's API started in front of the engine. The figures follow one schema
(``rm_runner.benchmark.metrics``). After every repetition ``benchmark.jsonl`` and
``metrics.json`` are rewritten whole, so a failure later keeps what was measured.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import replace
import time
from typing import Any, Callable, Optional, Protocol

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from rm_runner.benchmark import metrics as schema
from rm_runner.config import BenchmarkConfig, LoadProfile, ServerConfig
from rm_runner.errors import ConfigError
from rm_runner.pipeline.context import RunContext
from rm_runner.pipeline.step import Step
from rm_runner.requests import Request
from rm_runner.rundir import METRICS

log = logging.getLogger(__name__)

RECORDS = "benchmark.jsonl"
HTTP_PROFILES = {LoadProfile.synchronous, LoadProfile.concurrent, LoadProfile.poisson, LoadProfile.sweep,
                 LoadProfile.capacity, LoadProfile.trace}
INPROCESS_PROFILES = {LoadProfile.batch, LoadProfile.synchronous}

class Send(Protocol):
    """One pass over ``requests`` (at ``rate`` for Poisson): the records, the duration, extra
    figures. Over HTTP a capacity search also picks the pass's ``profile`` and a ``stop``."""

    def __call__(self, requests: list[Request], rate: Optional[float], tick: Callable[[], None],
                 profile: Optional[LoadProfile] = None, stop: Any = None) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
        ...


class Benchmark(Step):
    def __init__(self, print_table: bool = True) -> None:
        self.print_table = print_table

    def check(self, ctx: RunContext) -> None:
        if LoadProfile(ctx.cfg.benchmark.load.profile) != LoadProfile.trace:
            return
        untimed = [r.id for r in ctx.requests if r.timestamp is None]
        if untimed:
            raise ConfigError(f"benchmark.load.profile=trace sends each request at its own 'timestamp' (seconds from "
                              f"the start); {len(untimed)} of {len(ctx.requests)} requests have none (first: id "
                              f"{untimed[0]!r}): give every row of workload.path a \"timestamp\", or use "
                              "benchmark.load.profile=poisson")

    def __call__(self, ctx: RunContext) -> None:
        cfg: BenchmarkConfig = OmegaConf.to_object(ctx.cfg.benchmark)
        endpoint = ctx.engine.openai_endpoint()
        target = cfg.target if cfg.target != "auto" else ("http" if endpoint else "engine")
        over_http = target in ("http", "api")
        allowed = HTTP_PROFILES if over_http else INPROCESS_PROFILES
        if cfg.load.profile not in allowed:
            hint = ("set benchmark.target=api to load rm_runner's API in front of this engine" if not over_http
                    else "use concurrent with benchmark.load.concurrency=N for an offline-like batch")
            raise ConfigError(f"benchmark.load.profile={cfg.load.profile.value} does not apply to the "
                              f"{'HTTP' if over_http else 'in-process'} target "
                              f"(allowed: {', '.join(sorted(p.value for p in allowed))}); {hint}")
        section: dict[str, Any] = {"schema": schema.SCHEMA, "target": target, "profile": cfg.load.profile.value,
                                   "requests": len(ctx.requests), "warmup": cfg.warmup,
                                   "repetitions_requested": cfg.repetitions}
        if cfg.slo.objectives():
            section["slo"] = {"preset": cfg.slo.preset, "attainment": cfg.slo.attainment,
                              **{name: {"max": o.max, "p": o.p} for name, o in cfg.slo.objectives().items()}}
        ctx.metrics["benchmark"] = section
        if target == "engine":
            _measure(ctx, cfg, _inprocess_sender(ctx, cfg), section)
        elif target == "http":
            base_url, model, key = endpoint
            section["endpoint"] = base_url
            _measure(ctx, cfg, _http_sender(base_url, model, key, ctx, cfg), section, (base_url, key))
        else:
            _through_api(ctx, cfg, section)
        section["memory"] = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                             "device": ctx.device.device_memory()}
        if section.get("by_rate"):  # latency against throughput, drawn beside the figures
            from rm_runner.sweep.summary import benchmark_rows, draw

            label = f"{ctx.device.name}/{target}"
            draw(benchmark_rows(section, {"job": label, "label": label, "status": "ok"}), ctx.run_dir.path)
        if self.print_table:
            print(table(section), flush=True)


def _inprocess_sender(ctx: RunContext, cfg: BenchmarkConfig) -> Send:
    from rm_runner.benchmark import inprocess

    def send(requests: list[Request], rate: Optional[float], tick: Callable[[], None],
             profile: Optional[LoadProfile] = None, stop: Any = None):
        result = inprocess.run(ctx.engine, requests, ctx.generation, profile or cfg.load.profile, tick)
        extras: dict[str, Any] = {"measurement_s": round(result.measurement_s, 6),
                                  "measurement_fraction": round(result.measurement_s / result.duration_s, 6)}
        if result.prefill_s:
            extras["prefill_s"] = schema.stats(result.prefill_s)
            extras["decode_throughput"] = round(result.decode_tokens / result.decode_s, 3) if result.decode_s else None
        return result.records, result.duration_s, extras

    return send


def _http_sender(base_url: str, model: str, key: str, ctx: RunContext, cfg: BenchmarkConfig,
                 own_process: bool = False) -> Send:
    from rm_runner.benchmark import http_load

    load = http_load.run_in_subprocess if own_process else http_load.run

    def send(requests: list[Request], rate: Optional[float], tick: Callable[[], None],
             profile: Optional[LoadProfile] = None, stop: Optional[http_load.Stop] = None):
        # A sweep's passes are Poisson; a capacity search names each pass's (its warm-up: concurrent).
        profile = profile or {LoadProfile.sweep: LoadProfile.poisson,
                              LoadProfile.capacity: LoadProfile.concurrent}.get(cfg.load.profile, cfg.load.profile)
        records, duration, early = load(base_url, model, key, requests, ctx.generation, profile, cfg.load.concurrency,
                                        rate or cfg.load.rate, cfg.load.seed, tick, stop)
        return records, duration, {"stopped_early": True} if early else {}

    return send


def _through_api(ctx: RunContext, cfg: BenchmarkConfig, section: dict[str, Any]) -> None:
    from rm_runner.server.host import ApiServer

    # A free port: nothing outside this run talks to this server.
    settings: ServerConfig = replace(OmegaConf.to_object(ctx.cfg.server), port=0)
    server = ApiServer(ctx.engine, ctx.model.name, ctx.engine.max_model_len, settings, ctx.generation)
    section["endpoint"] = server.url
    try:
        server.run(lambda url: _measure(ctx, cfg, _http_sender(url, server.name, server.api_key or "EMPTY", ctx, cfg,
                                                               own_process=True), section, (url, server.api_key)))
    finally:
        section["server"] = server.summary()


def _measure(ctx: RunContext, cfg: BenchmarkConfig, send: Send, section: dict[str, Any],
             server: Optional[tuple[str, Optional[str]]] = None) -> None:
    """Warm-up, then every measured pass; with ``server`` (its URL and key), also what the server's
    own metrics say about the measured requests (``server_reported``); with the device's meter,
    each pass's energy and all of theirs (``energy``)."""
    requests = ctx.requests
    if cfg.warmup:
        began = time.perf_counter()
        for _ in range(cfg.warmup):
            send(requests[:4], None, lambda: None)
        section["warmup_s"] = round(time.perf_counter() - began, 3)
        log.info("warm-up: %d pass(es) in %.1f s (not measured)", cfg.warmup, section["warmup_s"])
    meter = _open_meter(ctx, cfg, section)
    try:
        if meter is not None:
            send = _metered(send, meter)
        if cfg.load.profile == LoadProfile.capacity:
            _capacity(ctx, cfg, send, section)
        else:
            _passes(ctx, cfg, send, section, server)
    finally:
        if meter is not None:
            meter.close()
            _energy_totals(section, meter)
            ctx.run_dir.write_json(METRICS, ctx.metrics)


def _open_meter(ctx: RunContext, cfg: BenchmarkConfig, section: dict[str, Any]) -> Any:
    """The device's meter with its idle power measured, or None and the reason in the section."""
    from rm_runner.benchmark.energy import EnergyUnavailable

    if not cfg.energy.enabled:
        section["energy"] = None
        section["energy_unavailable"] = "benchmark.energy.enabled=false"
        return None
    try:
        meter = ctx.device.energy_meter(ctx.model)
    except EnergyUnavailable as exc:
        section["energy"] = None
        section["energy_unavailable"] = str(exc)
        log.info("energy: not measured: %s", exc)
        return None
    if cfg.energy.idle_s:
        meter.start()
        time.sleep(cfg.energy.idle_s)  # the idle window itself: what the device draws doing nothing
        meter.idle_w = meter.stop() / cfg.energy.idle_s
    log.info("energy: %s%s", meter.source, f", idle {meter.idle_w:.1f} W" if meter.idle_w is not None else "")
    return meter


def _metered(send: Send, meter: Any) -> Send:
    """``send`` with the meter around each pass: the pass's ``energy`` in its extras."""
    from rm_runner.benchmark.energy import summary

    def measured(requests: list[Request], rate: Optional[float], tick: Callable[[], None],
                 profile: Optional[LoadProfile] = None, stop: Any = None):
        meter.start()
        try:
            records, duration, extras = send(requests, rate, tick, profile=profile, stop=stop)
        finally:
            joules = meter.stop()
        ok = [r for r in records if r["ok"]]
        energy = summary(meter.source, joules, duration, meter.idle_w, sum(r["output_tokens"] for r in ok), len(ok))
        return records, duration, {**extras, "energy": energy}

    return measured


def _energy_totals(section: dict[str, Any], meter: Any) -> None:
    """The measured passes' energy together (the warm-up's is not among them)."""
    from rm_runner.benchmark.energy import summary

    passes = [r["energy"] for r in section.get("repetitions", []) if r.get("energy")]
    if passes:
        section["energy"] = summary(meter.source, *(sum(p[k] for p in passes) for k in ("joules", "seconds")),
                                    meter.idle_w, *(sum(p[k] for p in passes) for k in ("output_tokens", "requests")))


def _passes(ctx: RunContext, cfg: BenchmarkConfig, send: Send, section: dict[str, Any],
            server: Optional[tuple[str, Optional[str]]]) -> None:
    """Every measured pass (each rate's repetitions under a sweep)."""
    from rm_runner.benchmark import server_metrics

    requests = ctx.requests
    rates: list[Optional[float]] = list(cfg.load.rates) if cfg.load.profile == LoadProfile.sweep else [None]
    passes = [(rate, rep) for rate in rates for rep in range(cfg.repetitions)]
    records: list[dict[str, Any]] = []
    section["repetitions"] = []
    before = server_metrics.snapshot(*server) if server else None
    with tqdm(total=len(passes) * len(requests), desc="benchmark", unit="req", dynamic_ncols=True) as bar:
        for index, (rate, rep) in enumerate(passes):
            bar.set_postfix_str(f"rate={rate}/s rep={rep + 1}" if rate else f"rep={rep + 1}/{cfg.repetitions}")
            got, duration, extras = send(requests, rate, lambda: bar.update(1))
            for record in got:
                record.update(repetition=index, **({"rate": rate} if rate else {}))
            records.extend(got)
            figures = {"repetition": index, **({"rate": rate} if rate else {}),
                       **schema.summarize_repetition(got, duration, cfg.slo.objectives(), cfg.slo.attainment), **extras}
            section["repetitions"].append(figures)
            _aggregate(section, rates)
            ctx.run_dir.write_jsonl(RECORDS, records)
            ctx.run_dir.write_json(METRICS, ctx.metrics)
            log.info("repetition %d%s: %.1f output tok/s, %d ok, %d failed", index + 1,
                     f" at {rate} req/s" if rate else "", figures["output_throughput"] or 0,
                     figures["completed"], figures["failed"])
    after = server_metrics.snapshot(*server) if before else None
    if before and after:
        section["server_reported"] = server_metrics.agreement(before, after, records)
        ctx.run_dir.write_json(METRICS, ctx.metrics)
    overhead = sum(r.get("measurement_s", 0.0) for r in section["repetitions"])
    if overhead:
        measured = sum(r["duration_s"] for r in section["repetitions"])
        section["measurement_overhead"] = {"seconds": round(overhead, 6), "fraction": round(overhead / measured, 6)}


def _capacity(ctx: RunContext, cfg: BenchmarkConfig, send: Send, section: dict[str, Any]) -> None:
    """``benchmark.load.profile=capacity`` (``benchmark.capacity``): every pass is kept as a
    repetition (``probe``: synchronous (the first ``capacity.SYNCHRONOUS`` requests), saturated
    (concurrent at ``benchmark.load.concurrency``), poisson), the Poisson probes also by rate,
    and the answer in ``capacity`` (its rate, its bracket, why the search ended)."""
    from rm_runner.benchmark import capacity
    from rm_runner.benchmark.http_load import Stop

    requests, objectives, target = ctx.requests, cfg.slo.objectives(), cfg.slo.attainment
    records: list[dict[str, Any]] = []
    section["repetitions"], section["by_rate"] = [], {}

    def measured(kind: str, profile: LoadProfile, rate: Optional[float], bar: tqdm,
                 sent: list[Request] = requests) -> dict[str, Any]:
        bar.set_postfix_str(f"{kind}" + (f" at {rate:.3g} req/s" if rate else ""))
        stop = None if kind == "saturated" else Stop({name: (o.max, o.p) for name, o in objectives.items()},
                                                     capacity.misses_allowed(len(sent), target))
        got, duration, extras = send(sent, rate, lambda: bar.update(1), profile=profile, stop=stop)
        index = len(section["repetitions"])
        for record in got:
            record.update(repetition=index, probe=kind, **({"rate": rate} if rate else {}))
        records.extend(got)
        figures = {"repetition": index, "probe": kind, **({"rate": rate} if rate else {}),
                   **schema.summarize_repetition(got, duration, objectives, target, len(sent)), **extras}
        section["repetitions"].append(figures)
        if rate is not None:
            section["by_rate"][f"{rate:.4g}"] = schema.across([figures])
        ctx.run_dir.write_jsonl(RECORDS, records)
        ctx.run_dir.write_json(METRICS, ctx.metrics)
        log.info("capacity %s%s: %.0f%% met the SLO%s", kind, f" at {rate:.3g} req/s" if rate else "",
                 100 * figures["slo_attainment"], " (stopped early: it cannot pass)" if extras.get("stopped_early") else "")
        return figures

    def probe(rate: float) -> capacity.Probe:
        return capacity.Probe(rate, measured("poisson", LoadProfile.poisson, rate, bar)["slo"]["attained"])

    with tqdm(desc="capacity", unit="req", dynamic_ncols=True) as bar:
        # One at a time is the slowest pass: the first capacity.SYNCHRONOUS requests tell whether
        # the SLO holds unloaded, and the throughput the bisection starts from.
        synchronous = measured("synchronous", LoadProfile.synchronous, None, bar, requests[:capacity.SYNCHRONOUS])
        found = capacity.search(
            (synchronous["request_throughput"] or 0.0, synchronous["slo"]["attained"]),
            lambda: measured("saturated", LoadProfile.concurrent, None, bar)["request_throughput"] or 0.0,
            probe, cfg.load.tolerance, cfg.load.max_probes)
    section["capacity"] = found.summary()
    section["summary"] = {"capacity_rps": {"mean": section["capacity"]["capacity_rps"], "stdev": 0.0, "n": 1}}
    ctx.run_dir.write_json(METRICS, ctx.metrics)


def _aggregate(section: dict[str, Any], rates: list[Optional[float]]) -> None:
    reps = section["repetitions"]
    section["summary"] = schema.across(reps)
    if rates != [None]:
        by_rate = {rate: [r for r in reps if r.get("rate") == rate] for rate in rates}
        section["by_rate"] = {str(rate): schema.across(done) for rate, done in by_rate.items() if done}


def table(section: dict[str, Any]) -> str:
    """The headline figures as a Markdown table: mean ± stdev over the repetitions."""
    lines = [f"benchmark ({section['target']}, {section['profile']}, {section['requests']} requests x "
             f"{len(section.get('repetitions', []))} repetitions)", "", "| figure | mean | stdev |", "|---|---|---|"]
    found = section.get("capacity")
    if found:
        low, high = found["bracket"]
        lines[0:0] = [f"capacity within the SLO: {found['capacity_rps']:.4g} req/s (met at {low}, missed at {high}; "
                      f"{found['probes']} probes; {found['reason']})", ""]
    groups = section.get("by_rate") or {"": section.get("summary", {})}
    for rate, summary in groups.items():
        for name, value in summary.items():
            label = f"{name} @ {rate} req/s" if rate else name
            lines.append(f"| {label} | {value['mean']:.4g} | {value['stdev']:.2g} |")
    energy = section.get("energy")
    if energy:
        per_token = energy["joules_per_output_token"]
        lines += ["", f"energy ({energy['source']}): {energy['average_w']} W on average, "
                      f"{per_token if per_token is not None else 'n/a'} J per output token net of idle "
                      f"({energy['idle_w']} W), {energy['output_tokens_per_joule']} output tokens per J"]
    elif section.get("energy_unavailable"):
        lines += ["", f"energy: not measured: {section['energy_unavailable']}"]
    slo = section.get("slo")
    if slo:
        shown = ", ".join(f"{name} p{o['p']:g} <= {o['max']:g} s" for name, o in slo.items() if isinstance(o, dict))
        reps = section.get("repetitions", [])
        attained = sum(bool(r.get("slo", {}).get("attained")) for r in reps)
        lines += ["", f"SLO {shown}: at least {slo['attainment']:.0%} of requests met it in {attained} of "
                      f"{len(reps)} repetitions (slo_attainment above)"]
    reported = section.get("server_reported")
    if reported:
        lines += ["", f"against the server's own metrics ({section.get('endpoint')}), means over the same requests:",
                  "", "| figure | client | server | client/server |", "|---|---|---|---|"]
        for name, row in reported.items():
            if "client_mean" in row:
                ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else ""
                lines.append(f"| {name} | {row['client_mean']} | {row['server_mean']} | {ratio} |")
            else:
                lines.append(f"| {name} | {row['client']} | {row['server']} | |")
    return "\n".join(lines)
