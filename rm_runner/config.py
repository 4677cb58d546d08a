"""Structured configs: the schema every composed run is checked against.

Hydra merges ``conf/config.yaml`` onto ``rm_runner_schema`` (registered below), so a typo in
a key or a wrong type fails at composition, before any model loads. Sections that hold a
``_target_`` (device, engine, model source, pipeline steps) are checked by the class they
name, when the runner instantiates them, still before loading.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rm_runner.errors import ConfigError


class Dtype(str, Enum):
    """Weight/compute precision; names as in ``torch`` and vLLM's ``--dtype``."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class ModelConfig:
    """What runs: a name for the run directory, where the weights come from, and limits."""

    name: str = MISSING
    # A `_target_` node: rm_runner.models.pretrained.Pretrained (hub id or local dir),
    # rm_runner.models.packaged.PackagedGGUF, rm_runner.models.tiny_random.TinyRandom, or yours.
    source: Any = MISSING
    dtype: Dtype = Dtype.float32
    max_model_len: int = 2048
    trust_remote_code: bool = False


@dataclass
class GenerationConfig:
    """Sampling parameters, named as in Hugging Face ``generate()`` and vLLM ``SamplingParams``."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    seed: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(
                f"generation.temperature must be > 0, got {self.temperature} "
                "(for greedy decoding set generation.do_sample=false)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"generation.top_k must be >= 1 or null, got {self.top_k}")


@dataclass
class SyntheticConfig:
    """Seeded random prompts, lengths in tokens of the model's own tokenizer (normal, clipped at 1)."""

    num_prompts: int = 0  # 0: none
    input_tokens: int = 128
    input_tokens_stddev: float = 0.0
    output_tokens: int = 64
    output_tokens_stddev: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts < 0 or self.input_tokens < 1 or self.output_tokens < 1:
            raise ValueError("workload.synthetic: num_prompts must be >= 0, input_tokens and output_tokens >= 1")
        if self.input_tokens_stddev < 0 or self.output_tokens_stddev < 0:
            raise ValueError("workload.synthetic: the stddevs must be >= 0")


@dataclass
class WorkloadConfig:
    """Which prompts run: inline prompts, inline chat conversations, or a JSONL file."""

    name: str = MISSING
    prompts: list[str] = field(default_factory=list)
    # Each conversation is a list of {role, content} messages, rendered by the chat template.
    conversations: list[list[dict[str, str]]] = field(default_factory=list)
    # JSONL file: one object per line with "prompt" (text) or "messages" (a conversation).
    path: Optional[str] = None
    # Wrap plain prompts as a user turn and render them with the model's chat template.
    chat_template: bool = True
    # ShareGPT-style JSON file (a list of {"conversations": [{"from": "human"|"gpt", "value": ...}]}):
    # each conversation's first human turn is a prompt, its first reply's length the output length.
    sharegpt_path: Optional[str] = None
    synthetic: SyntheticConfig = field(default_factory=lambda: SyntheticConfig())
    limit: Optional[int] = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"workload.limit must be >= 0 or null, got {self.limit}")


@dataclass
class PipelineConfig:
    """The steps in order, each named (``pipeline.steps.generate.print_outputs=false``, as
    lightning-hydra-template names its callbacks) and each a `_target_` called with the run
    context; a step set to null (``pipeline.steps.generate=null``) is left out."""

    name: str = MISSING
    steps: dict[str, Any] = MISSING


class Batching(str, Enum):
    """How the API batches requests (``server.batching``)."""

    auto = "auto"
    continuous = "continuous"
    dynamic = "dynamic"


@dataclass
class ServerConfig:
    """The OpenAI-compatible API of ``pipeline=serve``: where it listens, who may call it, its limits."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port; the address is logged and written to server.json
    # The name clients pass as `model`; null serves the model under model.name.
    served_model_name: Optional[str] = None
    # Name of the environment variable holding the API key (never the key itself). When that
    # variable is set, every route but /health needs `Authorization: Bearer <key>`.
    api_key_env: str = "RM_RUNNER_API_KEY"
    # continuous: requests join the running batch at the next decode step, finished ones leave
    # at once (engines that run the model in this process: the PyTorch CPU and GPU paths);
    # dynamic: requests that arrive within max_wait_ms of the first waiting one run as one batch
    # until all of its rows end; auto: continuous where the engine can, else dynamic.
    batching: Batching = Batching.auto
    # At most this many sequences (prompts x n) run at once (vLLM's max_num_seqs); null: 256 with
    # continuous batching (vLLM's default: a decode step grows slowly with its rows), 16 with dynamic.
    max_batch_size: Optional[int] = None
    max_wait_ms: float = 10.0  # dynamic batching only
    # Continuous batching: prompt tokens prefilled per step at most (beyond the first request
    # admitted), so running rows keep streaming while long prompts arrive (vLLM's name).
    max_num_batched_tokens: int = 2048
    # Continuous batching: an empty batch starts its first step once no request has arrived for
    # this long (ten times it at most), so requests that come together share that step; 0: at once.
    burst_window_ms: float = 3.0
    max_queue: int = 256  # waiting requests beyond this get 429
    max_body_bytes: int = 1_048_576  # larger request bodies get 413
    max_prompt_tokens: Optional[int] = None  # null: model.max_model_len
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    shutdown_timeout_s: float = 30.0  # in-flight requests get this long to finish on SIGTERM/Ctrl-C
    record_text: bool = False  # also keep prompts and outputs in requests.jsonl
    # vLLM's request extensions (top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
    # stop_token_ids, include_stop_str_in_output, skip_special_tokens, return_token_ids); false
    # answers as OpenAI's own API does: any field OpenAI does not define is a 400.
    openai_extensions: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"server.port must be in 0..65535, got {self.port}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"server.max_batch_size must be >= 1 or null, got {self.max_batch_size}")
        for key in ("max_queue", "max_body_bytes", "max_tokens", "max_num_batched_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"server.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"server.max_prompt_tokens must be >= 1 or null, got {self.max_prompt_tokens}")
        if self.max_wait_ms < 0 or self.shutdown_timeout_s < 0 or self.burst_window_ms < 0:
            raise ValueError("server.max_wait_ms, server.burst_window_ms and server.shutdown_timeout_s must be >= 0")


class LoadProfile(str, Enum):
    """How a benchmark sends its requests (the names of vLLM bench / guidellm)."""

    batch = "batch"            # in-process: the workload in batches of engine.batch_size (offline)
    synchronous = "synchronous"  # one request at a time
    concurrent = "concurrent"  # at most load.concurrency in flight (over HTTP)
    poisson = "poisson"        # arrivals at load.rate requests/s, exponential gaps (over HTTP)
    sweep = "sweep"            # poisson at each of load.rates in turn (over HTTP)
    capacity = "capacity"      # the highest poisson rate within benchmark.slo (over HTTP)
    trace = "trace"            # each request at its own workload timestamp: a timed trace replayed (over HTTP)


@dataclass
class LoadConfig:
    profile: LoadProfile = LoadProfile.batch
    concurrency: int = 16
    rate: float = 4.0
    rates: list[float] = field(default_factory=list)
    seed: int = 0
    # capacity: stop once the bracket (highest rate met, lowest missed) is this narrow, relative,
    # or after this many Poisson probes.
    tolerance: float = 0.1
    max_probes: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.tolerance < 1 or self.max_probes < 2:
            raise ValueError("benchmark.load.tolerance must be in (0, 1) and benchmark.load.max_probes >= 2")
        if self.concurrency < 1:
            raise ValueError(f"benchmark.load.concurrency must be >= 1, got {self.concurrency}")
        if self.rate <= 0 or any(r <= 0 for r in self.rates):
            raise ValueError("benchmark.load.rate and benchmark.load.rates must be > 0 requests/s")
        if self.profile == LoadProfile.sweep and not self.rates:
            raise ValueError("benchmark.load.profile=sweep needs benchmark.load.rates, e.g. [1,2,4]")


@dataclass
class Objective:
    """One latency objective: a request meets it at or under ``max`` seconds (its own TTFT,
    TPOT, E2EL; for ITL its own gaps' ``p``-th percentile); the run reports its ``p``-th
    percentile against ``max`` too (MLPerf's form: TTFT p99 <= 2 s). ``max`` null: no objective."""

    max: Optional[float] = None
    p: float = 99.0


# MLPerf Inference's LLM server scenarios (Llama-3.1-8B): server TTFT p99 2 s, TPOT p99 100 ms;
# interactive 0.5 s / 30 ms.
SLO_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "mlperf-server": {"ttft_s": (2.0, 99.0), "tpot_s": (0.1, 99.0)},
    "mlperf-interactive": {"ttft_s": (0.5, 99.0), "tpot_s": (0.03, 99.0)},
}
SLO_FIGURES = ("ttft_s", "tpot_s", "itl_s", "e2el_s")


@dataclass
class SLOConfig:
    """``benchmark.slo``: the latency a request must meet to count as served (goodput, as
    DistServe and vLLM bench's --goodput define it: a request meets every objective or none)."""

    preset: Optional[str] = None  # mlperf-server | mlperf-interactive: objectives not set here
    ttft_s: Objective = field(default_factory=Objective)
    tpot_s: Objective = field(default_factory=Objective)
    itl_s: Objective = field(default_factory=Objective)
    e2el_s: Objective = field(default_factory=Objective)
    attainment: float = 0.9  # the fraction of requests that must meet the SLO (capacity search)

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in SLO_PRESETS:
            raise ValueError(f"benchmark.slo.preset={self.preset} is not a preset; presets: {', '.join(SLO_PRESETS)}")
        for name, (limit, p) in SLO_PRESETS.get(self.preset or "", {}).items():
            if getattr(self, name).max is None:
                setattr(self, name, Objective(limit, p))
        for name in SLO_FIGURES:
            objective = getattr(self, name)
            if objective.max is not None and objective.max <= 0:
                raise ValueError(f"benchmark.slo.{name}.max must be > 0 seconds, got {objective.max}")
            if not 0 < objective.p <= 100:
                raise ValueError(f"benchmark.slo.{name}.p must be a percentile in (0, 100], got {objective.p}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"benchmark.slo.attainment must be in (0, 1], got {self.attainment}")

    def objectives(self) -> dict[str, Objective]:
        """The objectives set, by figure name."""
        return {name: getattr(self, name) for name in SLO_FIGURES if getattr(self, name).max is not None}


@dataclass
class EnergyConfig:
    """``benchmark.energy``: the device's own meter around the measured passes (never an estimate)."""

    enabled: bool = True
    idle_s: float = 2.0  # idle power measured this long before the passes and subtracted (0: none)

    def __post_init__(self) -> None:
        if self.idle_s < 0:
            raise ValueError(f"benchmark.energy.idle_s must be >= 0 seconds, got {self.idle_s}")


@dataclass
class BenchmarkConfig:
    """``pipeline=benchmark``: where requests go, how they are sent, how often it is repeated."""

    # auto: over HTTP when the engine serves an OpenAI API (engine=vllm, device=remote), else
    # in-process; api: start rm_runner's own API in front of the engine and load it over HTTP.
    target: str = "auto"
    warmup: int = 1  # unmeasured passes over (up to 4 of) the workload's requests
    repetitions: int = 3  # measured passes; figures are per repetition and their spread
    load: LoadConfig = field(default_factory=LoadConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)  # none set: no goodput figures
    energy: EnergyConfig = field(default_factory=EnergyConfig)

    def __post_init__(self) -> None:
        if self.target not in ("auto", "engine", "api"):
            raise ValueError(f"benchmark.target must be auto, engine or api, got {self.target!r}")
        if self.warmup < 0 or self.repetitions < 1:
            raise ValueError("benchmark.warmup must be >= 0 and benchmark.repetitions >= 1")
        if self.load.profile == LoadProfile.capacity and not self.slo.objectives():
            raise ValueError("benchmark.load.profile=capacity searches for the highest rate within a latency SLO: "
                             "set one, e.g. benchmark.slo.preset=mlperf-server or benchmark.slo.ttft_s.max=SECONDS")


@dataclass
class ParityConfig:
    """``pipeline=parity``: the run's device and dtype against a reference, greedy."""

    reference_device: str = "cpu"
    reference_dtype: Dtype = Dtype.float32
    # Pass when at least this fraction of prompts give identical token ids ...
    min_match_fraction: float = 1.0
    # ... and, where both sides give log-probs, no chosen token's log-prob differs by more.
    max_logprob_diff: Optional[float] = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_match_fraction <= 1:
            raise ValueError(f"parity.min_match_fraction must be in [0, 1], got {self.min_match_fraction}")
        if self.max_logprob_diff is not None and self.max_logprob_diff < 0:
            raise ValueError(f"parity.max_logprob_diff must be >= 0 or null, got {self.max_logprob_diff}")


@dataclass
class EvalConfig:
    """``pipeline=eval``: lm-evaluation-harness tasks, the run's engine as the model."""

    # lm-eval task (or group) names; the shipped offline ones are rm_runner_choice (multiple
    # choice: loglikelihoods) and rm_runner_generate (generate_until).
    tasks: list[str] = field(default_factory=lambda: ["rm_runner_choice", "rm_runner_generate"])
    num_fewshot: Optional[int] = None  # null: each task's own
    limit: Optional[float] = None  # documents per task (a fraction when < 1); null: all
    batch_size: int = 8  # rows per scoring or generation call
    include_path: list[str] = field(default_factory=list)  # folders of task YAML beside the shipped ones
    seed: int = 0  # lm-eval's random, numpy, torch and few-shot seeds
    apply_chat_template: bool = False  # render each prompt through the model's chat template
    # What a sweep's summary and rm-runner-compare measure each score against: the job on this
    # device with this dtype (the verdict reads both sides' stderr).
    reference_device: str = "cpu"
    reference_dtype: Dtype = Dtype.float32

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("eval.tasks must name at least one lm-eval task")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"eval.num_fewshot must be >= 0 or null, got {self.num_fewshot}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"eval.limit must be > 0 or null, got {self.limit}")


@dataclass
class SweepConfig:
    """How a multirun (``-m``) treats its jobs."""

    force: bool = False  # rerun jobs whose directory already holds an ok run of the same config


@dataclass
class RunConfig:
    device: Any = MISSING
    engine: Any = MISSING
    model: ModelConfig = MISSING
    pipeline: PipelineConfig = MISSING
    workload: WorkloadConfig = MISSING
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # In a sweep, a device that is not available here is recorded as skipped (exit 0) instead
    # of failing; single runs fail fast.
    on_unavailable: str = "fail"
    sweep: SweepConfig = field(default_factory=SweepConfig)


# A group option's schema is stored beside it as NAME + this (its YAML's defaults list names it);
# the options a user may pick are the group's other entries.
SCHEMA_SUFFIX = "_schema"


def register_schema() -> None:
    """The run's schema, and each device's and engine's options as the schema its group option's
    YAML extends (``<name>_schema`` in its defaults list, as Hydra's schema pattern has it)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="rm_runner_schema", node=RunConfig)
    for group, schemas in option_schemas().items():
        for name, schema in schemas.items():
            store.store(group=group, name=name + SCHEMA_SUFFIX, node=schema)


def option_schemas() -> dict[str, dict[str, type]]:
    """Per group, per option: the options dataclass with the ``_target_`` that takes them. The
    devices are the registry's (plugins included: the YAML of a device of theirs may extend it)."""
    from rm_runner.backends.registry import registrations
    from rm_runner.engines.options import ENGINES

    devices = {name: targeted(cls.options_class, f"{cls.__module__}.{cls.__qualname__}")
               for name, cls in registrations().classes.items()}
    return {"device": devices, "engine": {name: targeted(options, target) for name, (target, options) in ENGINES.items()}}


def targeted(options_class: type, target: str) -> type:
    """``options_class`` with a ``_target_`` field first: a group option's schema."""
    from dataclasses import make_dataclass

    return make_dataclass(f"{options_class.__name__}Schema", [("_target_", str, field(default=target))],
                          bases=(options_class,))


def quote_override(value: str) -> str:
    """A value in Hydra's override grammar, where = , and spaces need quotes."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def command_line(argv: list[str]) -> Any:
    """``python -m rm_runner``'s arguments as Hydra's own parser reads them (``.overrides``,
    ``.multirun``, ``.config_dir``, ...), so every tool sees the command line Hydra sees."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_known_args(argv)[0]


@contextmanager
def composing(config_dir: Optional[Path] = None) -> Iterator[list[str]]:
    """Compose as ``python -m rm_runner`` does (schema, resolvers, the shipped config tree) outside a run.

    Yields the overrides that add ``config_dir`` (a user's ``--config-dir``) to the search path.
    """
    from hydra import initialize_config_module

    from rm_runner.sweep.naming import register_resolvers

    register_schema()
    register_resolvers()
    with initialize_config_module(config_module="rm_runner.conf", version_base="1.3"):
        yield ([f"hydra.searchpath=[{quote_override(f'file://{config_dir.resolve()}')}]"]
               if config_dir is not None else [])


def validated(cfg: DictConfig) -> DictConfig:
    """Return ``cfg`` with every interpolation resolved and every typed section checked.

    Raises ConfigError naming the key, so a bad value is reported before any model loads.
    """
    try:
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
        schema = OmegaConf.structured(RunConfig)
        merged = OmegaConf.merge(schema, resolved)
        OmegaConf.to_object(merged.generation)
        for section in ("server", "benchmark", "parity", "eval", "workload"):
            OmegaConf.to_object(merged[section])
        if merged.on_unavailable not in ("fail", "skip"):
            raise ValueError(f"on_unavailable must be fail or skip, got {merged.on_unavailable!r}")
    except OmegaConfBaseException as exc:
        from rm_runner.composition import explain

        raise ConfigError(explain(exc)) from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return merged


def check_options(schema: type, options: dict[str, Any], section: str) -> Any:
    """Validate a `_target_`'s keyword options against its dataclass; errors name ``section.key``."""
    from omegaconf.errors import ConfigKeyError

    from rm_runner.composition import did_you_mean, explain

    fields = [f.name for f in schema.__dataclass_fields__.values()]  # type: ignore[attr-defined]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(options))
        return OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        key = str(getattr(exc, "key", "") or "")
        raise ConfigError(f"{section}.{key}: unknown option{did_you_mean(key, fields, f'{section}.')}; "
                          f"valid options are: {', '.join(fields)}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{section}.{explain(exc)}") from None
    except ValueError as exc:  # a __post_init__ check: its message starts with the field's name
        message = str(exc)
        named = message.split(" ", 1)[0].split("=", 1)[0] in fields
        raise ConfigError(f"{section}.{message}" if named else f"{section}: {message}") from None
