"""How a vLLM server runs each device (``engine=vllm``, Triton's vLLM backend): engine-side
adapters, as vLLM's platforms adjust the engine config for theirs, so backends know nothing of
vLLM's server.

An adapter says how to get a vLLM that serves the device (``install``), which modules that
server's interpreter imports (``modules``), and the model folder, flags and environment of the
server for a backend's options (``settings``). Adapters are registered under the entry-point
group ``rm_runner.vllm_devices`` by the device's name, so a device plugin adds its own beside its
backend; a device with none is one vLLM does not run, and two registrations for one name are an
error (either could start the wrong server).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Optional

from rm_runner.backends.cpu import INSTALL_VLLM_CPU
from rm_runner.backends.rbln import INSTALL_OPTIMUM, INSTALL_VLLM_RBLN
from rm_runner.errors import ConfigError, RunnerError

GROUP = "rm_runner.vllm_devices"


@dataclass
class VLLMServerSettings:
    """What a device adds to a vLLM server: model folder, flags, environment."""

    model: Any
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


class VLLMDevice(ABC):
    """One device's adapter."""

    install: ClassVar[str]  # how to get a vLLM that serves this device
    modules: ClassVar[tuple[str, ...]] = ("vllm",)  # what the server's interpreter must import

    @abstractmethod
    def settings(self, backend: Any, model_path: Any, model_config: Any) -> VLLMServerSettings:
        """The server for ``backend`` (its options) serving the model at ``model_path``."""


def vllm_device(device: str) -> Optional[VLLMDevice]:
    """The adapter registered for ``device`` (a backend's name); None where vLLM does not run it."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == device]
    if len({ep.value for ep in found}) > 1:
        raise ConfigError(f"two vLLM adapters are registered for device={device} ({', '.join(ep.value for ep in found)}, "
                          f"entry-point group {GROUP}); uninstall one")
    return found[0].load()() if found else None


def server_settings(backend: Any, model_path: Any, model_config: Any, engine: str) -> VLLMServerSettings:
    """``backend``'s vLLM server settings, or a ConfigError where vLLM does not run that device."""
    adapter = vllm_device(backend.name)
    if adapter is None:
        raise ConfigError(f"{engine} does not support device={backend.name}: vLLM does not run it (no adapter in "
                          f"the entry-point group {GROUP}); use engine=local")
    return adapter.settings(backend, model_path, model_config)


class CPUVLLM(VLLMDevice):
    """vllm-cpu: the run's dtype, eager unless ``device.enforce_eager=false``, its KV-cache space
    and reserved cores from the device's options (the same variables its in-process mode sets)."""

    install = INSTALL_VLLM_CPU

    def settings(self, backend: Any, model_path: Any, model_config: Any) -> VLLMServerSettings:
        args = ["--dtype", backend.dtype_name(model_config.dtype)]
        if backend.options.enforce_eager:
            args.append("--enforce-eager")
        return VLLMServerSettings(model=model_path, args=args, env=backend.vllm_env())


class GPUVLLM(VLLMDevice):
    """CUDA vLLM on the device's GPUs (``CUDA_VISIBLE_DEVICES``), with its parallelism and memory share."""

    install = "on a CUDA host: pip install 'rm-runner[gpu]'"

    def settings(self, backend: Any, model_path: Any, model_config: Any) -> VLLMServerSettings:
        o = backend.options
        args = ["--dtype", backend.dtype_name(model_config.dtype), "--tensor-parallel-size", str(o.tensor_parallel_size),
                "--gpu-memory-utilization", str(o.gpu_memory_utilization)]
        if o.enforce_eager:
            args.append("--enforce-eager")
        return VLLMServerSettings(model=model_path, args=args, env={"CUDA_VISIBLE_DEVICES": backend.cuda_visible_devices()})


class RBLNVLLM(VLLMDevice):
    """vllm-rbln serves the compiled folder, compiled here first (or taken from the cache).

    vllm-rbln 0.12 takes a compiled folder on its optimum path and resets max-num-seqs,
    max-model-len, block size and dtype from its ``rbln_config.json``
    (``utils/optimum/converter/from_optimum.py``); the flags say the same, so the server's log
    and rm_runner's record agree.
    """

    # The server imports both: vllm, and the platform plugin that the `vllm.platform_plugins`
    # entry point `rbln = vllm_rbln:register` names.
    modules = ("vllm", "vllm_rbln")

    install = INSTALL_VLLM_RBLN

    def settings(self, backend: Any, model_path: Any, model_config: Any) -> VLLMServerSettings:
        from rm_runner.backends import rbln

        path = Path(model_path if isinstance(model_path, (str, Path)) else model_path.name_or_path)
        if not rbln.is_compiled(path) and not rbln._installed("optimum.rbln"):
            raise RunnerError(
                "engine=vllm device=rbln compiles the model in this process before the server starts, "
                f"and optimum-rbln is not installed here ({INSTALL_OPTIMUM}); or pass a folder compiled "
                "with optimum-rbln as model.source.path"
            )
        folder = backend.compiled_dir(path, model_config)
        compiled = backend.compiled(folder)
        args = ["--max-num-seqs", str(compiled["batch_size"]), "--max-model-len", str(compiled["max_seq_len"]),
                "--block-size", str(compiled["kvcache_block_size"])]
        devices = backend.options.device
        env = {"RBLN_VISIBLE_DEVICES": ",".join(map(str, devices))} if devices else {}
        return VLLMServerSettings(model=folder, args=args, env=env)
