"""Rebellions RBLN NPU backend: optimum-rbln (compile, then run) or vllm-rbln.

``mode: optimum`` compiles with ``RBLNAutoModelForCausalLM.from_pretrained(export=True,
rbln_...)`` and runs ``generate()``; ``mode: vllm`` serves the same compiled folder through
vllm-rbln in this process; ``auto`` takes vllm-rbln when installed. Compiled artifacts are
cached (rbln_compile_cache). Without the SDK, ``availability`` names the missing piece.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from rm_runner.backends import vllm_inprocess
from rm_runner.backends.base import Availability, Backend, BackendOptions, VLLMServerSettings, tool_output
from rm_runner.backends.rbln_compile_cache import compiled_model_dir, is_compiled
from rm_runner.backends.vllm_inprocess import VLLMModel
from rm_runner.errors import RunnerError

log = logging.getLogger(__name__)

INSTALL_OPTIMUM = "pip install 'rm-runner[rbln]'"
INSTALL_VLLM_RBLN = "pip install vllm-rbln (it needs the matching vllm build from Rebellions)"
INSTALL_COMPILER = "install rebel-compiler from Rebellions' package index (it is not on PyPI)"


class RBLNMode(str, Enum):
    auto = "auto"
    optimum = "optimum"
    vllm = "vllm"


@dataclass
class RBLNOptions(BackendOptions):
    mode: RBLNMode = RBLNMode.auto
    # Compile options: each maps to optimum-rbln's `rbln_<name>`; null keeps its default.
    batch_size: int = 1
    max_seq_len: Optional[int] = None
    num_devices: Optional[int] = None
    kvcache_block_size: Optional[int] = None
    kvcache_partition_len: Optional[int] = None
    prefill_chunk_size: Optional[int] = None
    attn_impl: Optional[str] = None
    dtype: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Where to run: NPU ids (rbln_device for optimum, RBLN_DEVICES for vllm-rbln).
    device: Optional[list[int]] = None
    # Compiled artifacts; null = <rm_runner cache>/rbln
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def compile_options(self, max_model_len: int) -> dict[str, Any]:
        """The ``rbln_*`` keywords that shape the compiled artifact (and so its cache key)."""
        kwargs = {
            "rbln_batch_size": self.batch_size,
            "rbln_max_seq_len": self.max_seq_len or max_model_len,
            "rbln_num_devices": self.num_devices,
            "rbln_kvcache_block_size": self.kvcache_block_size,
            "rbln_kvcache_partition_len": self.kvcache_partition_len,
            "rbln_prefill_chunk_size": self.prefill_chunk_size,
            "rbln_attn_impl": self.attn_impl,
            "rbln_dtype": self.dtype,
        }
        kwargs.update({f"rbln_{k.removeprefix('rbln_')}": v for k, v in self.extra.items()})
        return {k: v for k, v in kwargs.items() if v is not None}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


class RBLNBackend(Backend):
    name = "rbln"
    priority = 400
    options_class = RBLNOptions
    packages = ("optimum-rbln", "rebel-compiler", "vllm-rbln")
    vllm_install = INSTALL_VLLM_RBLN

    @classmethod
    def hardware(cls) -> list[str]:
        """The NPU lines of ``rbln-stat`` (Rebellions' driver tool)."""
        return [line.strip() for line in (tool_output("rbln-stat") or "").splitlines() if "RBLN" in line]

    @classmethod
    def is_available(cls) -> Availability:
        if not (_installed("optimum.rbln") or _installed("vllm_rbln")):
            return Availability(False, "neither optimum-rbln nor vllm-rbln is installed", INSTALL_OPTIMUM)
        return cls._npu_present()

    @classmethod
    def _npu_present(cls) -> Availability:
        if not _installed("rebel"):
            return Availability(False, "the RBLN compiler (python module 'rebel') is not installed", INSTALL_COMPILER)
        import rebel

        try:
            count = rebel.get_npu_count()
        except Exception as exc:  # the driver reports its own failures
            return Availability(False, f"the RBLN driver did not answer: {exc}", "check the driver with `rbln-stat`")
        if not count:
            return Availability(False, "no RBLN NPU found (rebel.get_npu_count() == 0)", "check `rbln-stat`")
        return Availability(True)

    def resolved_mode(self) -> RBLNMode:
        if self.options.mode == RBLNMode.auto:
            return RBLNMode.vllm if _installed("vllm_rbln") else RBLNMode.optimum
        return self.options.mode

    def availability(self) -> Availability:
        if self.options.mode == RBLNMode.auto:
            return self.is_available()
        mode = self.options.mode
        if mode == RBLNMode.optimum and not _installed("optimum.rbln"):
            return Availability(False, "device.mode=optimum needs optimum-rbln, which is not installed", INSTALL_OPTIMUM)
        if mode == RBLNMode.vllm and not _installed("vllm_rbln"):
            return Availability(False, "device.mode=vllm needs vllm-rbln, which is not installed", INSTALL_VLLM_RBLN)
        return self._npu_present()

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.report: dict[str, Any] = {}  # what preparing the model did: mode, compile cache hit/miss

    def initialize(self) -> None:
        if self.options.device is not None and self.resolved_mode() == RBLNMode.vllm:
            os.environ["RBLN_DEVICES"] = ",".join(str(d) for d in self.options.device)
        self.report["mode"] = self.resolved_mode().value

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described.update(self.report)
        return described

    @staticmethod
    def _compile(source: Path, out: Path, options: dict[str, Any]) -> None:
        """Compile without claiming an NPU (no runtimes), then save the artifacts."""
        from optimum.rbln import RBLNAutoModelForCausalLM

        compiled = RBLNAutoModelForCausalLM.from_pretrained(
            str(source), export=True, rbln_create_runtimes=False, **options
        )
        compiled.save_pretrained(str(out))

    def compiled_dir(self, model: Any, model_config: Any) -> Path:
        """A compiled folder for ``model``: as given when already compiled, else from the cache."""
        path = Path(model if isinstance(model, (str, Path)) else model.name_or_path)
        if is_compiled(path):
            self.report.update(cache="precompiled", compile_s=0.0, compiled_dir=str(path))
            return path
        options = self.options.compile_options(model_config.max_model_len)
        root = Path(self.options.cache_dir).expanduser() if self.options.cache_dir else None
        folder, report = compiled_model_dir(
            path, options, lambda src, out: self._compile(src, out, options), root=root
        )
        self.report.update(report)
        return folder

    def vllm_server_settings(self, model_path: Any, model_config: Any) -> VLLMServerSettings:
        """vllm-rbln serves the compiled folder (compiled here first, or taken from the cache)."""
        folder = self.compiled_dir(model_path, model_config)
        options = self.options
        args = ["--max-num-seqs", str(options.batch_size),
                "--max-model-len", str(options.max_seq_len or model_config.max_model_len)]
        if options.kvcache_block_size:
            args += ["--block-size", str(options.kvcache_block_size)]
        env = {"RBLN_DEVICES": ",".join(map(str, options.device))} if options.device is not None else {}
        return VLLMServerSettings(model=folder, args=args, env=env)

    def prepare_model(self, model: Any, model_config: Any) -> Any:
        folder = self.compiled_dir(model, model_config)
        if self.resolved_mode() == RBLNMode.vllm:
            options = self.options
            return vllm_inprocess.load(
                folder, model_config, "auto", max_num_seqs=options.batch_size,
                block_size=options.kvcache_block_size,
                max_model_len=options.max_seq_len or model_config.max_model_len,
            )
        from optimum.rbln import RBLNAutoModelForCausalLM

        runtime = {"rbln_device": self.options.device} if self.options.device is not None else {}
        return RBLNAutoModelForCausalLM.from_pretrained(str(folder), export=False, **runtime)

    def execute(self, model: Any, inputs: dict[str, Any], method: str = "generate", **kwargs: Any) -> Any:
        if isinstance(model, VLLMModel):
            if method == "forward":
                raise RunnerError("device=rbln in vllm mode returns tokens, not logits; use device.mode=optimum")
            return vllm_inprocess.generate(model, inputs, kwargs)
        seed = kwargs.pop("seed", None)
        if seed is not None:
            import torch

            torch.manual_seed(seed)
        if method == "forward":
            return model(**inputs, **kwargs)
        return model.generate(**inputs, **kwargs)

    def cleanup(self) -> None:
        import gc

        gc.collect()
