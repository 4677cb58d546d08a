"""oneDNN linear layers over pre-packed weights: the CPU path's matrix multiplies, ~2x faster.

On the CPU a decode step is mostly small-M matrix multiplies. Re-laying every ``nn.Linear``
weight out once in oneDNN's blocked format (the approach vLLM-CPU takes) and calling oneDNN's
linear on it gives the same numbers (identical greedy token ids) in about half the time on
PyTorch's x86 builds. For models rm_runner loaded itself, attention's q/k/v and a gated MLP's
gate/up are also fused into one matmul each; a caller's model is only packed, and
``unpack_linears`` undoes that exactly.
"""

from __future__ import annotations

import logging
import torch
from torch import nn

log = logging.getLogger(__name__)


def supported(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` over a oneDNN-packed weight, for ``x`` of any leading shape."""
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


class PackedLinear(nn.Module):
    """``nn.Linear`` whose weight lives in oneDNN's layout; ``original`` (if kept) restores it."""

    def __init__(self, linear: nn.Linear, keep_original: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        if keep_original:  # the same tensors, registered under the same names: state_dict() is unchanged
            self.weight = linear.weight
            self.bias = linear.bias
            object.__setattr__(self, "original", linear)
        else:
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)
            object.__setattr__(self, "original", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


class PackedGatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` (Llama, Mistral, Qwen2 MLPs) with gate and up in one packed matmul."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.intermediate = mlp.gate_proj.out_features
        self.act_fn = mlp.act_fn
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
        self.gate_up = torch.ops.mkldnn._reorder_linear_weight(gate_up)
        self.down = torch.ops.mkldnn._reorder_linear_weight(mlp.down_proj.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = packed_linear(x, self.gate_up).split(self.intermediate, dim=-1)
        return packed_linear(self.act_fn(gate) * up, self.down)


class _FusedProjections:
    """Several projections of the same input (q, k, v) as one packed matmul, computed once per input."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.sizes = [lin.out_features for lin in linears]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat([lin.weight for lin in linears]).detach())
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else torch.cat(biases).detach()
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._pending: set[int] = set()

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """Every projection of ``x`` side by side, shaped like ``x`` up to the last dimension."""
        return packed_linear(x, self.packed, self.bias)

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._input is not x or index not in self._pending:  # a new input (or asked twice): compute
            outputs = self.compute(x).split(self.sizes, dim=-1)
            self._input, self._outputs, self._pending = x, outputs, set(range(len(self.sizes)))
        out = self._outputs[index]
        self._pending.discard(index)
        if not self._pending:  # every projection taken: let go of the input and outputs
            self._input, self._outputs = None, ()
        return out


class FusedProjection(nn.Module):
    """Stands where ``q_proj``/``k_proj``/``v_proj`` stood; returns its slice of the fused matmul."""

    def __init__(self, fused: _FusedProjections, index: int) -> None:
        super().__init__()
        self.fused, self.index = fused, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output(x, self.index)


def _fusable(module: nn.Module, names: tuple[str, ...]) -> bool:
    parts = [getattr(module, name, None) for name in names]
    return (all(type(p) is nn.Linear for p in parts)
            and len({p.in_features for p in parts}) == 1 and len({p.bias is None for p in parts}) == 1)


def _is_gated_mlp(module: nn.Module) -> bool:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (all(type(p) is nn.Linear and p.bias is None for p in parts) and hasattr(module, "act_fn")
            and parts[0].out_features == parts[1].out_features)


def pack_linears(model: nn.Module, keep_original: bool) -> int:
    """Replace every ``nn.Linear`` of a CPU model in place; returns how many were packed."""
    dtype = next(model.parameters()).dtype
    if not supported(dtype):
        log.info("oneDNN packed linear not used: unsupported for %s on this CPU", dtype)
        return 0
    return _pack(model, keep_original)


QKV = ("q_proj", "k_proj", "v_proj")


def _pack(module: nn.Module, keep_original: bool) -> int:
    count = 0
    if not keep_original and _fusable(module, QKV):  # attention: q, k, v from one matmul
        fused = _FusedProjections([getattr(module, name) for name in QKV])
        for index, name in enumerate(QKV):
            setattr(module, name, FusedProjection(fused, index))
        count += len(QKV)
    for name, child in list(module.named_children()):
        if not keep_original and _is_gated_mlp(child):  # fused: changes the module tree for good
            setattr(module, name, PackedGatedMLP(child))
            count += 3
        elif type(child) is nn.Linear:
            setattr(module, name, PackedLinear(child, keep_original))
            count += 1
        else:
            count += _pack(child, keep_original)
    return count


def release_checkpoint(model: nn.Module) -> int:
    """Give the tensors a packed model still holds (the embedding, the norms, biases) memory of
    their own; returns the bytes copied. transformers maps a safetensors checkpoint and its tensors
    are views of that mapping, so after packing those few keep the whole file mapped, and every
    page of it that packing read stays resident: ~540 MB for SmolLM2 in float32, beside the
    packed copies. Copied, the mapping is released with the last view. Parameters keep their
    identity (tied weights stay tied)."""
    copied = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    return copied


def unpack_linears(model: nn.Module) -> int:
    """Put back the original ``nn.Linear`` modules packed with ``keep_original=True``."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, PackedLinear) and child.original is not None:
                setattr(module, name, child.original)
                count += 1
    return count


