"""Rebellions RBLN NPU backend: optimum-rbln (compile, then run) or vllm-rbln.

Written against Rebellions SDK 0.12: optimum-rbln 0.12, vllm-rbln 0.12, rebel-compiler 0.12.
Every SDK call below was checked against those packages' sources (the file is named beside it).

``mode: optimum`` compiles with ``RBLNAutoModelForCausalLM.from_pretrained(export=True, rbln_...)``
and runs its ``generate()``; ``mode: vllm`` serves the same compiled folder through vllm-rbln in
this process; ``auto`` takes vllm-rbln when installed. Compiled artifacts are cached
(rbln_compile_cache). Without the SDK, ``availability`` names the missing piece.

A compiled model runs only the shapes it was compiled for (optimum-rbln
``modeling_decoderonly.py``): prefill refuses more rows than ``batch_size``, decode refuses a
batch that is not one of ``decoder_batch_sizes`` and the prompt plus new tokens must fit
``max_seq_len``. ``execute`` therefore splits a batch into chunks of the compiled size, pads a
short chunk with copies of one of its real rows, drops those rows from the output, and checks
lengths against the compiled ``max_seq_len`` before the NPU sees them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from rm_runner.backends import hf_generate, vllm_inprocess
from rm_runner.backends.base import Availability, Backend, BackendOptions, OnStep, tool_output
from rm_runner.backends.rbln_compile_cache import COMPILED_MARKER, compiled_model_dir, is_compiled
from rm_runner.backends.vllm_inprocess import VLLMModel
from rm_runner.errors import ConfigError, RunnerError
from rm_runner.requests import GenerationRequest

log = logging.getLogger(__name__)

SDK_VERSIONS = "optimum-rbln 0.12, vllm-rbln 0.12, rebel-compiler 0.12"
# optimum-rbln 0.12 pins torch/torchaudio/torchvision `+cpu` builds that only the PyTorch CPU
# index has; rebel-compiler comes from Rebellions' own index (an RBLN Portal account).
INSTALL_OPTIMUM = ("pip install 'rm-runner[rbln]' --extra-index-url https://download.pytorch.org/whl/cpu, "
                   "then the compiler: pip install --extra-index-url https://pypi.rbln.ai/simple "
                   "'rebel-compiler>=0.12,<0.13' (needs an RBLN Portal account)")
INSTALL_VLLM_RBLN = ("pip install 'vllm-rbln>=0.12,<0.13' --extra-index-url https://wheels.vllm.ai/0.30.0/cpu "
                     "--extra-index-url https://download.pytorch.org/whl/cpu (it needs vllm==0.30.0+cpu)")
INSTALL_COMPILER = ("pip install --extra-index-url https://pypi.rbln.ai/simple 'rebel-compiler>=0.12,<0.13' "
                    "(Rebellions' index, not PyPI; needs an RBLN Portal account)")
CHECK_NPUS = "check the NPUs and the driver with `rbln-smi`"

# rm_runner's device options, by the optimum-rbln name an SDK error message uses for them.
_OPTION_NAMES = {
    "batch_size": "device.batch_size", "max_seq_len": "device.max_seq_len", "num_devices": "device.num_devices",
    "tensor_parallel_size": "device.num_devices", "kvcache_block_size": "device.kvcache_block_size",
    "kvcache_partition_len": "device.kvcache_partition_len", "prefill_chunk_size": "device.prefill_chunk_size",
    "attn_impl": "device.attn_impl", "npu": "device.npu", "device": "device.device",
}


class RBLNMode(str, Enum):
    auto = "auto"
    optimum = "optimum"
    vllm = "vllm"


@dataclass
class RBLNOptions(BackendOptions):
    mode: RBLNMode = RBLNMode.auto
    # Compile options: each maps to optimum-rbln's `rbln_<name>`; null keeps its default.
    batch_size: int = 1
    max_seq_len: Optional[int] = None  # null: model.max_model_len
    num_devices: Optional[int] = None  # null: num_devices_by_model[model.name], else 1
    # NPUs a model needs when num_devices is null, by rm_runner model name (model.name).
    num_devices_by_model: dict[str, int] = field(default_factory=lambda: {"llama3": 4})
    kvcache_block_size: Optional[int] = None
    kvcache_partition_len: Optional[int] = None
    prefill_chunk_size: Optional[int] = None
    attn_impl: Optional[str] = None
    npu: Optional[str] = None  # the NPU family to compile for, e.g. RBLN-CA25; null: the attached NPU 0
    extra: dict[str, Any] = field(default_factory=dict)
    # Where to run: NPU ids (rbln_device for optimum, RBLN_VISIBLE_DEVICES for vllm-rbln), one per
    # device of num_devices; null: 0..num_devices-1.
    device: Optional[list[int]] = None
    # Compiled artifacts; null = <rm_runner cache>/rbln
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_devices is not None and self.num_devices < 1:
            raise ValueError(f"num_devices must be >= 1 or null, got {self.num_devices}")
        for key in ("dtype", "torch_dtype", "create_runtimes"):
            if key in self.extra or f"rbln_{key}" in self.extra:
                raise ValueError(f"extra.{key} is not an rbln_ option rm_runner passes: "
                                 + ("the compile dtype is model.dtype" if "dtype" in key else
                                    "rm_runner compiles without runtimes and loads with them"))

    def resolved_num_devices(self, model_name: str) -> int:
        """How many NPUs the model is sharded over (tensor parallel), checked against ``device``."""
        count = self.num_devices or self.num_devices_by_model.get(model_name) or 1
        if self.device is not None and len(self.device) != count:
            source = ("device.num_devices" if self.num_devices else
                      f"device.num_devices_by_model.{model_name}" if model_name in self.num_devices_by_model
                      else "device.num_devices (null: 1)")
            raise ConfigError(f"device.device lists {len(self.device)} NPU ids {self.device} but {source} is "
                              f"{count}: list one id per NPU, or set device.num_devices={len(self.device)}")
        return count

    def compile_options(self, model_config: Any) -> dict[str, Any]:
        """The ``from_pretrained(export=True)`` keywords that shape the compiled artifact (and so its
        cache key): ``rbln_*`` options and ``dtype``. optimum-rbln sets ``rbln_config.dtype`` from the
        loaded model (``modeling_base.update_rbln_config``), so the dtype travels as ``dtype=``."""
        num_devices = self.resolved_num_devices(model_config.name)
        kwargs = {
            "rbln_batch_size": self.batch_size,
            "rbln_max_seq_len": self.max_seq_len or model_config.max_model_len,
            "rbln_num_devices": num_devices if num_devices > 1 else None,
            "rbln_kvcache_block_size": self.kvcache_block_size,
            "rbln_kvcache_partition_len": self.kvcache_partition_len,
            "rbln_prefill_chunk_size": self.prefill_chunk_size,
            "rbln_attn_impl": self.attn_impl,
            "rbln_npu": self.npu,
        }
        kwargs.update({f"rbln_{k.removeprefix('rbln_')}": v for k, v in self.extra.items()})
        kwargs["dtype"] = getattr(model_config.dtype, "value", model_config.dtype)
        return {k: v for k, v in kwargs.items() if v is not None}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def smi_rows(table: str) -> list[str]:
    """The NPU rows of ``rbln-smi``'s (or the deprecated ``rbln-stat``'s) device table, one line each.

    A row is ``| NPU | Name | Device | PCI BUS ID | ...``; the rows of an RSD group after its first
    (ATOM-Max) leave Name empty, and are NPUs all the same.
    """
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].isdigit() and re.fullmatch(r"rbln\d+", cells[2]):
            name = cells[1] or "(in the RSD group above)"
            memory = next((c for c in cells[4:] if "/" in c), "")  # used / total (rbln-stat has no Perf column)
            rows.append(f"NPU {cells[0]}: {name} {cells[2]} {cells[3]} {memory}".rstrip())
    return rows


def checkpoint_dtype(path: Path) -> str:
    """The dtype ``dtype="auto"`` loads a checkpoint in: its config.json's (float32 when unnamed)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def compiled_config(folder: Path) -> dict[str, Any]:
    """What a compiled folder was compiled for, from optimum-rbln's ``rbln_config.json``."""
    return json.loads((folder / COMPILED_MARKER).read_text())


class RBLNBackend(Backend):
    name = "rbln"
    priority = 400
    options_class = RBLNOptions
    packages = ("optimum-rbln", "rebel-compiler", "vllm-rbln")

    @classmethod
    def hardware(cls) -> list[str]:
        """The NPUs ``rbln-smi`` lists (``rbln-stat`` on drivers before it; deprecated since SDK 0.10.4)."""
        for tool in ("rbln-smi", "rbln-stat"):
            table = tool_output(tool)
            if table is not None:
                return smi_rows(table)
        return []

    @classmethod
    def is_available(cls) -> Availability:
        if not (_installed("optimum.rbln") or _installed("vllm_rbln")):
            return Availability(False, "neither optimum-rbln nor vllm-rbln is installed", INSTALL_OPTIMUM)
        return cls._npu_present()

    @classmethod
    def _npu_present(cls, devices: Optional[list[int]] = None, num_devices: int = 1) -> Availability:
        """The SDK's own device checks: ``rebel.device_count()`` and ``rebel.get_npu_name(i)`` (as
        optimum-rbln ``utils/runtime_utils.tp_and_devices_are_ok`` and vllm-rbln ``platform`` ask)."""
        if not _installed("rebel"):
            return Availability(False, "the RBLN compiler (python module 'rebel') is not installed", INSTALL_COMPILER)
        import rebel

        try:
            count = rebel.device_count()
            missing = [d for d in devices or [] if rebel.get_npu_name(d) is None]
        except Exception as exc:  # the driver reports its own failures
            return Availability(False, f"the RBLN driver did not answer: {exc}", CHECK_NPUS)
        if not count:
            return Availability(False, "no RBLN NPU found (rebel.device_count() == 0)", CHECK_NPUS)
        if missing:
            return Availability(False, f"device.device names NPU {missing}, which rebel.get_npu_name() does not "
                                       f"find ({count} NPU(s) here)", CHECK_NPUS)
        if count < num_devices:
            return Availability(False, f"device.num_devices={num_devices} but rebel.device_count() == {count}",
                                CHECK_NPUS)
        return Availability(True)

    def resolved_mode(self) -> RBLNMode:
        if self.options.mode == RBLNMode.auto:
            return RBLNMode.vllm if _installed("vllm_rbln") else RBLNMode.optimum
        return self.options.mode

    def availability(self) -> Availability:
        mode = self.options.mode
        if mode == RBLNMode.auto and not (_installed("optimum.rbln") or _installed("vllm_rbln")):
            return Availability(False, "neither optimum-rbln nor vllm-rbln is installed", INSTALL_OPTIMUM)
        if mode == RBLNMode.optimum and not _installed("optimum.rbln"):
            return Availability(False, "device.mode=optimum needs optimum-rbln, which is not installed", INSTALL_OPTIMUM)
        if mode == RBLNMode.vllm and not _installed("vllm_rbln"):
            return Availability(False, "device.mode=vllm needs vllm-rbln, which is not installed", INSTALL_VLLM_RBLN)
        return self._npu_present(self.options.device, self.options.num_devices or 1)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.report: dict[str, Any] = {}  # what preparing the model did: mode, compile cache hit/miss

    def initialize(self) -> None:
        if self.options.device is not None and self.resolved_mode() == RBLNMode.vllm:
            # vllm-rbln 0.12 reads RBLN_VISIBLE_DEVICES (RblnPlatform.device_control_env_var); it
            # folds the deprecated RBLN_DEVICES into it only when it is unset.
            os.environ["RBLN_VISIBLE_DEVICES"] = ",".join(str(d) for d in self.options.device)
        self.report["mode"] = self.resolved_mode().value

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described.update(self.report)
        return described

    def target_npu(self) -> Optional[str]:
        """The NPU family the compile targets: ``device.npu``, else the attached NPU 0 (what
        optimum-rbln ``runtime_utils.resolve_npu_or_none`` resolves), else None."""
        if self.options.npu:
            return self.options.npu
        import rebel

        return rebel.get_npu_name(0) if rebel.npu_is_available(0) else None

    def _compile(self, source: Path, out: Path, options: dict[str, Any]) -> None:
        """Compile without claiming an NPU (``rbln_create_runtimes=False``), then save the artifacts.

        optimum-rbln validates the options before compiling and raises ValueError naming its own
        option (``kvcache_block_size``...); the error says which rm_runner option that is.
        """
        from optimum.rbln import RBLNAutoModelForCausalLM

        try:
            compiled = RBLNAutoModelForCausalLM.from_pretrained(
                str(source), export=True, rbln_create_runtimes=False, **options
            )
        except ValueError as exc:
            raise ConfigError(self._refused(exc, options)) from exc
        compiled.save_pretrained(str(out))

    def _refused(self, exc: Exception, options: dict[str, Any]) -> str:
        """The SDK's message, led by rm_runner's names for the options it mentions and their values."""
        message = str(exc).strip()
        named = []
        for sdk in re.findall(r"`(\w+)`", message):
            ours = _OPTION_NAMES.get(sdk) or (f"device.extra.{sdk}" if f"rbln_{sdk}" in options else None)
            if not ours:
                continue
            value = options.get(f"rbln_{sdk}")
            given = getattr(self.options, ours.removeprefix("device."), value)
            if value is None:
                named.append(f"{ours} (null: optimum-rbln's default)")
            elif given is None:  # filled in by rm_runner: max_seq_len, num_devices
                source = "model.max_model_len=" if sdk == "max_seq_len" else "device.num_devices_by_model: "
                named.append(f"{ours} (null: {source}{value})")
            else:
                named.append(f"{ours}={value}")
        which = f" ({', '.join(dict.fromkeys(named))})" if named else ""
        return f"device=rbln: optimum-rbln refused the compile options{which}: {message}"

    def compiled_dir(self, model: Any, model_config: Any) -> Path:
        """A compiled folder for ``model``: as given when already compiled, else from the cache."""
        path = Path(model if isinstance(model, (str, Path)) else model.name_or_path)
        if is_compiled(path):
            self.report.update(cache="precompiled", compile_s=0.0, compiled_dir=str(path))
            return path
        options = self.options.compile_options(model_config)
        if options["dtype"] == "auto":  # the key names what the compile really gets
            options["dtype"] = checkpoint_dtype(path)
        npu = self.target_npu()
        root = Path(self.options.cache_dir).expanduser() if self.options.cache_dir else None
        folder, report = compiled_model_dir(
            path, options, npu, lambda src, out: self._compile(src, out, options), root=root
        )
        self.report.update(report, npu=npu)
        return folder

    def compiled(self, folder: Path) -> dict[str, Any]:
        """The compiled shapes, recorded for the run directory and used by vLLM's flags."""
        config = compiled_config(folder)
        shapes = {k: config.get(k) for k in ("batch_size", "decoder_batch_sizes", "max_seq_len",
                                              "kvcache_block_size", "prefill_chunk_size", "attn_impl", "dtype")}
        # npu and num_devices are saved per graph (RBLNCompileConfig), not at the top level
        graphs = config.get("_compile_cfgs") or [{}]
        shapes.update(npu=graphs[0].get("npu"), num_devices=graphs[0].get("num_devices") or 1)
        self.report["compiled"] = shapes
        return shapes

    def max_model_len(self, model_config: Any) -> tuple[int, str]:
        compiled = (self.report.get("compiled") or {}).get("max_seq_len")
        if compiled is not None and compiled < model_config.max_model_len:
            return compiled, "the compiled max_seq_len (device.max_seq_len)"
        return model_config.max_model_len, "model.max_model_len"

    def prepare_model(self, model: Any, model_config: Any) -> Any:
        folder = self.compiled_dir(model, model_config)
        compiled = self.compiled(folder)
        if self.resolved_mode() == RBLNMode.vllm:
            return vllm_inprocess.load(
                folder, model_config, "auto", max_num_seqs=compiled["batch_size"],
                block_size=compiled["kvcache_block_size"], max_model_len=compiled["max_seq_len"],
            )
        # one NPU id per device the graphs were sharded over: 0..n-1 unless device.device names them
        # (optimum-rbln runtime_utils.tp_and_devices_are_ok's own default)
        devices = self.options.device
        if devices is None and compiled["num_devices"] > 1:
            devices = list(range(compiled["num_devices"]))
        if devices is not None and len(devices) != compiled["num_devices"]:
            raise ConfigError(f"device.device lists {len(devices)} NPU ids {devices}; {folder} was compiled for "
                              f"{compiled['num_devices']} NPUs")
        from optimum.rbln import RBLNAutoModelForCausalLM

        runtime = {"rbln_device": devices} if devices is not None else {}
        try:
            return RBLNAutoModelForCausalLM.from_pretrained(str(folder), export=False, **runtime)
        except RuntimeError as exc:  # optimum-rbln wraps the runtime's error in advice on compiling
            cause = str(exc.__cause__ or exc).strip().splitlines()[0]
            raise RunnerError(f"device=rbln: the compiled model {folder} did not load onto the NPU "
                              f"(device.device={devices}): {cause}; {CHECK_NPUS}") from exc

    def generate(self, model: Any, request: GenerationRequest, on_step: Optional[OnStep] = None) -> list[list[int]]:
        if isinstance(model, VLLMModel):
            return vllm_inprocess.generate(model, request)
        return super().generate(model, request, on_step)

    def execute(self, model: Any, inputs: dict[str, Any], method: str = "generate", **kwargs: Any) -> Any:
        if isinstance(model, VLLMModel):  # transformers code (the hook) on in-process vLLM
            if method == "forward":
                raise RunnerError("device=rbln in vllm mode returns tokens, not logits; use device.mode=optimum")
            request = hf_generate.request_of_call(inputs, kwargs, "device=rbln in vllm mode")
            return hf_generate.as_sequences(inputs, vllm_inprocess.generate(model, request), request.pad_token_id)
        seed = kwargs.pop("seed", None)
        if seed is not None:
            import torch

            torch.manual_seed(seed)
        batches = CompiledBatches(model.rbln_config)
        if method == "forward":
            return batches.forward(model, inputs, kwargs)
        return batches.generate(model, inputs, kwargs)

    def energy_meter(self, model_config: Any) -> Any:
        """rbln-smi's power of the NPUs the model runs on, sampled."""
        from rm_runner.benchmark.energy import rbln_smi

        npus = self.options.device or list(range(self.options.resolved_num_devices(model_config.name)))
        return rbln_smi(npus, lambda: tool_output("rbln-smi"))

    def cleanup(self) -> None:
        import gc

        gc.collect()


class CompiledBatches:
    """A batch of any size through a model compiled for fixed batch sizes (optimum-rbln 0.12
    ``RBLNDecoderOnlyModelForCausalLM``): chunks of at most ``batch_size`` rows, each padded up
    to the smallest compiled decoder batch that holds it with copies of its first row; the
    copies are dropped from the outputs."""

    def __init__(self, rbln_config: Any) -> None:
        self.batch_size = rbln_config.batch_size
        self.decoder_sizes = sorted(rbln_config.decoder_batch_sizes or [rbln_config.batch_size])
        self.max_seq_len = rbln_config.max_seq_len

    def check_lengths(self, inputs: dict[str, Any], max_new_tokens: Optional[int]) -> None:
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        longest = int(mask.sum(dim=-1).max()) if mask is not None else ids.shape[1]
        wanted = longest + (max_new_tokens or 0)
        if longest > self.max_seq_len or wanted > self.max_seq_len:
            raise ConfigError(
                f"device=rbln: a prompt of {longest} tokens + {max_new_tokens or 0} new tokens exceeds the "
                f"compiled max_seq_len={self.max_seq_len} (device.max_seq_len; null compiles model.max_model_len): "
                "raise device.max_seq_len or shorten the prompts or generation.max_new_tokens"
            )

    def chunks(self, rows: int) -> list[tuple[int, int, int]]:
        """(start, end, padded size) of each chunk of ``rows`` rows."""
        out = []
        for start in range(0, rows, self.batch_size):
            end = min(start + self.batch_size, rows)
            out.append((start, end, next(s for s in self.decoder_sizes if s >= end - start)))
        return out

    @staticmethod
    def _take(inputs: dict[str, Any], start: int, end: int, size: int) -> dict[str, Any]:
        import torch

        def rows(value: Any) -> Any:
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                return value
            part = value[start:end]
            return torch.cat([part, part[:1].expand(size - (end - start), *part.shape[1:])]) if size > end - start \
                else part

        return {k: rows(v) for k, v in inputs.items()}

    def forward(self, model: Any, inputs: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        """Prefill takes up to ``batch_size`` rows (no decoder batch rule), so chunks need no padding."""
        import torch

        self.check_lengths(inputs, None)
        outputs = [model(**self._take(inputs, start, end, end - start), **kwargs)
                   for start, end, _ in self.chunks(inputs["input_ids"].shape[0])]
        if len(outputs) == 1:
            return outputs[0]
        first = outputs[0]
        return type(first)(**{name: torch.cat([o[name] for o in outputs]) if isinstance(value, torch.Tensor)
                              else value for name, value in first.items()})

    def generate(self, model: Any, inputs: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        import torch

        self.check_lengths(inputs, kwargs.get("max_new_tokens"))
        rows = inputs["input_ids"].shape[0]
        chunks = self.chunks(rows)
        criteria = kwargs.get("stopping_criteria")
        if criteria is not None and len(chunks) > 1:
            raise RunnerError(f"device=rbln runs at most device.batch_size={self.batch_size} rows per generate(); "
                              f"a batch of {rows} that reports every step needs engine.batch_size <= "
                              f"{self.batch_size}")
        outputs = []
        for start, end, size in chunks:
            call = dict(kwargs)
            if criteria is not None and size > end - start:
                call["stopping_criteria"] = _real_rows_only(criteria, end - start)
            output = model.generate(**self._take(inputs, start, end, size), **call)
            outputs.append(_first_rows(output, end - start))
        if len(outputs) == 1:
            return outputs[0]
        if any(not isinstance(o, torch.Tensor) for o in outputs):
            raise RunnerError(f"device=rbln: return_dict_in_generate outputs cannot be joined across the "
                              f"{len(outputs)} compiled batches of {self.batch_size} rows; pass at most "
                              f"device.batch_size rows")
        width = max(o.shape[1] for o in outputs)
        pad = kwargs.get("pad_token_id")
        if pad is None:
            pad = getattr(model.generation_config, "pad_token_id", None)
        if pad is None and any(o.shape[1] < width for o in outputs):
            raise RunnerError("device=rbln: chunks ended at different lengths and there is no pad_token_id to "
                              "join them; pass pad_token_id to generate()")
        return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad if pad is not None else 0)
                          for o in outputs])


def _first_rows(output: Any, rows: int) -> Any:
    """``output`` without its padding rows (those after the first ``rows``)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output[:rows]
    for name in ("sequences", "scores", "logits"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            setattr(output, name, value[:rows])
        elif isinstance(value, tuple):
            setattr(output, name, tuple(step[:rows] for step in value))
    return output


def _real_rows_only(criteria: Any, rows: int) -> Any:
    """Stopping criteria that see only the first ``rows`` rows; padding rows count as finished."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class RealRows(StoppingCriteria):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            done = self.inner(input_ids[:rows], scores[:rows] if scores is not None else None, **kwargs)
            done = torch.as_tensor(done, dtype=torch.bool, device=input_ids.device).expand(rows)
            return torch.cat([done, torch.ones(input_ids.shape[0] - rows, dtype=torch.bool, device=input_ids.device)])

    wrapped = StoppingCriteriaList([RealRows(c) for c in criteria])
    return wrapped
