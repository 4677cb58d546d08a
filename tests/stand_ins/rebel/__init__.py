"""Test-only stand-in for Rebellions' ``rebel`` module (rebel-compiler), which needs an NPU and is
not on PyPI. It exists so that the *real* optimum-rbln 0.12 (which imports ``rebel`` at import
time) runs here, and it provides only what optimum-rbln 0.12 and vllm-rbln 0.12 call:

- ``__version__``, ``device_count()``, ``npu_is_available(i)``, ``get_npu_name(i)``
  (optimum-rbln ``utils/runtime_utils.py``, ``utils/deprecation.py``; vllm-rbln ``platform/__init__.py``)
- ``compile`` (only its signature is read: ``runtime_utils.compiler_num_devices_kwarg``),
  ``compile_from_torch`` (``modeling_base.RBLNBaseModel.compile``)
- ``RBLNCompiledModel(path)`` with ``.save(path)`` (``modeling_base``, ``modeling.RBLNModel.from_model``)
- ``Runtime(compiled, tensor_type="pt", device=..., activate_profiler=..., timeout=...)``, called
  with the graph's non-static inputs and ``out=`` (``decoderonly_runtime_utils``, ``runtime_utils``)
- ``compile_context.CompileContext(use_weight_sharing=...)`` with ``mark_static_address``
- the ``torch.ops.rbln_custom_ops`` kernels the decoder-only graph calls (``_ops.py``)

Anything else raises AttributeError naming itself, so a new SDK call shows up as a failure here
instead of passing silently. Every call is appended to ``$RBLN_STANDIN_LOG`` (JSON lines) when set.

What the "compiler" does: it snapshots the graph module it is given (the real compiler traces it),
checks the example inputs against ``input_info`` and writes both into the ``.rbln`` file. The
"runtime" runs that snapshot eagerly on the CPU with KV-cache tensors it owns (the static inputs
marked in the compile context, shared by every graph of one context, as on the device), and
refuses inputs whose shapes or dtypes differ from the compiled ones: the NPU runs only what was
compiled, so a batch or length the model was not compiled for fails here as it would there.

The environment sets the hardware: ``RBLN_STANDIN_NPUS`` (how many NPUs, default 1),
``RBLN_STANDIN_NPU_NAME`` (their name, default RBLN-CA25), ``RBLN_STANDIN_DRIVER_ERROR`` (when
set, ``device_count()`` raises it, as a driver that does not answer). Never installed, never
imported outside tests.
"""

from __future__ import annotations

import io
import json
import os
import uuid
import weakref
from typing import Any

__version__ = "0.12.0"

from rebel import _ops  # noqa: E402,F401  (registers torch.ops.rbln_custom_ops)
from rebel.compile_context import CompileContext  # noqa: E402

_PUBLIC = {"__version__", "device_count", "npu_is_available", "get_npu_name", "compile", "compile_from_torch",
           "RBLNCompiledModel", "Runtime", "compile_context"}


def _record(call: str, **fields: Any) -> None:
    log = os.environ.get("RBLN_STANDIN_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"call": call, **fields}, default=str) + "\n")


def _npus() -> int:
    return int(os.environ.get("RBLN_STANDIN_NPUS", "1"))


def device_count() -> int:
    """How many NPUs the driver reports."""
    _record("device_count")
    error = os.environ.get("RBLN_STANDIN_DRIVER_ERROR")
    if error:
        raise RuntimeError(error)
    return _npus()


def npu_is_available(device_id: int = 0) -> bool:
    _record("npu_is_available", device_id=device_id)
    return 0 <= device_id < _npus()


def get_npu_name(device_id: int = 0) -> str | None:
    """The NPU's product name (RBLN-CA25 for ATOM-Max); None for a device that is not there."""
    _record("get_npu_name", device_id=device_id)
    return os.environ.get("RBLN_STANDIN_NPU_NAME", "RBLN-CA25") if 0 <= device_id < _npus() else None


def compile(model: Any, *, input_info: Any = None, npu: str | None = None, num_devices: int | None = None,
            **kwargs: Any) -> Any:
    """Present because optimum-rbln reads its signature (``num_devices`` vs ``tensor_parallel_size``);
    the decoder-only path compiles through ``compile_from_torch``, so a call here is a new SDK path."""
    raise NotImplementedError("test rebel: rebel.compile() is not mirrored; optimum-rbln 0.12's LLM path "
                              "calls rebel.compile_from_torch()")


_COMPILE_KWARGS = {"example_inputs", "compile_context"}


def compile_from_torch(model: Any, input_info: Any, npu: str | None = None, num_devices: int | None = None,
                       **kwargs: Any) -> "RBLNCompiledModel":
    import torch

    unknown = set(kwargs) - _COMPILE_KWARGS
    if unknown:
        raise TypeError(f"test rebel: compile_from_torch() got keywords it does not mirror: {sorted(unknown)}")
    entries = [(str(name), [int(d) for d in shape], str(dtype)) for name, shape, dtype in input_info]
    target = npu or (get_npu_name(0) if npu_is_available(0) else None)
    _record("compile_from_torch", npu=npu, target=target, num_devices=num_devices,
            input_info=[list(e) for e in entries], kwargs=sorted(kwargs))
    if target is None:
        raise RuntimeError("test rebel: no NPU to compile for: none is attached and `npu` was not given")
    example = kwargs.get("example_inputs")
    if example is not None:
        if len(example) != len(entries):
            raise ValueError(f"test rebel: {len(example)} example inputs for {len(entries)} input_info entries")
        for (name, shape, dtype), tensor in zip(entries, example):
            if list(tensor.shape) != shape or str(tensor.dtype).removeprefix("torch.") != dtype:
                raise ValueError(f"test rebel: example input {name} is {list(tensor.shape)} {tensor.dtype}, "
                                 f"input_info says {shape} {dtype}")
    context = kwargs.get("compile_context")
    static = [name for name, _, _ in entries if context is not None and name in context.static_names]
    graph = io.BytesIO()
    torch.save(model, graph)  # the snapshot: later phase switches on `model` do not reach it
    return RBLNCompiledModel._new({
        "graph": graph.getvalue(), "input_info": entries, "static": static,
        "context": context.id if context is not None else None, "npu": target, "num_devices": num_devices,
    })


class RBLNCompiledModel:
    """A compiled graph, as written to and read from a ``.rbln`` file."""

    def __init__(self, path: Any) -> None:
        import torch

        self._artifact = torch.load(str(path), weights_only=False)
        self.name = os.path.splitext(os.path.basename(str(path)))[0]
        _record("RBLNCompiledModel", path=str(path))

    @classmethod
    def _new(cls, artifact: dict) -> "RBLNCompiledModel":
        compiled = cls.__new__(cls)
        compiled._artifact, compiled.name = artifact, None
        return compiled

    def save(self, path: Any) -> None:
        import torch

        torch.save(self._artifact, str(path))
        _record("RBLNCompiledModel.save", path=str(path))

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"test rebel: RBLNCompiledModel.{name} is not mirrored (add it only if the real "
                             "rebel-compiler has it and optimum-rbln calls it)")


class _DeviceMemory:
    """The static tensors (KV caches) of one compile context on one set of devices."""

    def __init__(self) -> None:
        self.tensors: dict[str, Any] = {}


_MEMORY: "weakref.WeakValueDictionary[tuple, _DeviceMemory]" = weakref.WeakValueDictionary()


class Runtime:
    def __init__(self, compiled_model: RBLNCompiledModel, tensor_type: str = "pt", device: Any = None,
                 activate_profiler: Any = None, timeout: Any = None) -> None:
        import torch

        if tensor_type != "pt":
            raise ValueError(f"test rebel: tensor_type={tensor_type!r} is not mirrored (optimum-rbln uses 'pt')")
        artifact = compiled_model._artifact
        wanted = artifact["num_devices"] or 1
        devices = list(range(wanted)) if device is None else ([device] if isinstance(device, int) else list(device))
        _record("Runtime", model=compiled_model.name, device=devices, num_devices=artifact["num_devices"])
        missing = [d for d in devices if not npu_is_available(d)]
        if missing:
            raise RuntimeError(f"test rebel: NPU {missing} not found ({_npus()} attached); check rbln-smi")
        if len(devices) != wanted:
            raise RuntimeError(f"test rebel: the model was compiled for {wanted} NPUs, got devices {devices}")
        names = {get_npu_name(d) for d in devices}
        if names != {artifact["npu"]}:
            raise RuntimeError(f"test rebel: compiled for {artifact['npu']}, devices {devices} are {sorted(names)}")
        self.model_name = compiled_model.name
        self._graph = torch.load(io.BytesIO(artifact["graph"]), weights_only=False)
        self._entries = artifact["input_info"]
        self._static = set(artifact["static"])
        key = (artifact["context"] or uuid.uuid4().hex, tuple(devices))
        self._memory = _MEMORY.get(key) or _DeviceMemory()
        _MEMORY[key] = self._memory
        for name, shape, dtype in self._entries:
            if name in self._static and name not in self._memory.tensors:
                self._memory.tensors[name] = torch.zeros(shape, dtype=getattr(torch, dtype))

    def __call__(self, *args: Any, out: Any = None) -> Any:
        import torch

        inputs = [e for e in self._entries if e[0] not in self._static]
        _record("Runtime.run", model=self.model_name, shapes=[list(a.shape) for a in args])
        if len(args) != len(inputs):
            raise RuntimeError(f"test rebel: {self.model_name} takes {len(inputs)} inputs "
                               f"({[e[0] for e in inputs]}), got {len(args)}")
        for (name, shape, dtype), tensor in zip(inputs, args):
            if list(tensor.shape) != shape or str(tensor.dtype).removeprefix("torch.") != dtype:
                raise RuntimeError(f"test rebel: {self.model_name} input {name} is {list(tensor.shape)} "
                                   f"{tensor.dtype}; it was compiled for {shape} {dtype}")
        given = iter(args)
        full = [self._memory.tensors[name] if name in self._static else next(given) for name, _, _ in self._entries]
        with torch.no_grad():
            result = self._graph(*full)
        if out is None:
            return result
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        for buffer, value in zip(out, results):
            buffer.copy_(value)
        return out

    def __repr__(self) -> str:
        return f"<test rebel Runtime {self.model_name}>"

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"test rebel: Runtime.{name} is not mirrored")


def __getattr__(name: str) -> Any:
    raise AttributeError(f"test rebel: rebel.{name} is not mirrored; it provides only {sorted(_PUBLIC)}")
