"""The ``torch.ops.rbln_custom_ops`` kernels, as CPU reference code (test-only).

The real rebel-compiler registers these ops; optimum-rbln's decoder-only graph
(``decoderonly_architecture.py``: AttentionOp / FlashAttentionOp) calls them by keyword, so the
schemas below take exactly the keywords it passes. Only the causal paged-attention ops of the
default decoder path (eager and flash attention, no attention mask, no fp8 KV cache) are here;
any other op is absent, and optimum-rbln then fails with its own "Attention operator ... not found".

The paged KV cache is ``[num_blocks, kv_heads, 1, block_size, head_dim]``; position ``p`` of a row
lives in block ``block_table[p // block_size]`` at offset ``p % block_size``. Prefill takes one
row and a chunk of queries starting at ``seq``; decode takes one query per row at ``seq[b]``.
Each writes its keys and values into the cache, then attends causally over positions 0..its own.
"""

from __future__ import annotations

import torch

def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.linear(input, weight, bias)


def _attend_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor,
                start: int, scale: torch.Tensor, table: torch.Tensor, block_size: int) -> torch.Tensor:
    """One row: q [kv_heads, groups, L, D], k/v [kv_heads, 1, L, D]; queries at start..start+L-1."""
    if kcache.shape[3] != block_size:
        raise RuntimeError(f"test rebel: block_size {block_size} but the cache holds blocks of {kcache.shape[3]}")
    length = q.shape[2]
    capacity = table.numel() * block_size
    positions = torch.arange(start, start + length)
    kept = positions < capacity  # a padded last chunk may run past the cache: nothing to keep there
    blocks, offsets = table.long()[positions[kept] // block_size], positions[kept] % block_size
    kcache[blocks, :, 0, offsets] = k[:, 0, : int(kept.sum())].transpose(0, 1).to(kcache.dtype)
    vcache[blocks, :, 0, offsets] = v[:, 0, : int(kept.sum())].transpose(0, 1).to(vcache.dtype)
    seen = torch.arange(min(start + length, capacity))
    keys = kcache[table.long()[seen // block_size], :, 0, seen % block_size].transpose(0, 1)  # [kv_heads, T, D]
    values = vcache[table.long()[seen // block_size], :, 0, seen % block_size].transpose(0, 1)
    scores = (q.float() @ keys.float().unsqueeze(1).transpose(-1, -2)) * scale.float()  # [kv_heads, G, L, T]
    causal = seen.unsqueeze(0) <= positions.unsqueeze(1)  # [L, T]
    scores = scores.masked_fill(~causal, float("-inf"))
    return (scores.softmax(dim=-1) @ values.float().unsqueeze(1)).to(q.dtype)


def _prefill(q, k, v, kcache, vcache, seq, scale, block_table, block_size, is_bidirectional=False):
    if is_bidirectional:
        raise NotImplementedError("test rebel: bidirectional prefill is not mirrored")
    if q.shape[0] != 1:
        raise RuntimeError(f"test rebel: prefill takes one row, got {q.shape[0]}")
    start = int(seq.reshape(-1)[0])
    return _attend_row(q[0], k[0], v[0], kcache, vcache, start, scale, block_table.reshape(-1), block_size)[None]


def _decode(q, k, v, kcache, vcache, seq, scale, block_table, block_size):
    rows = [_attend_row(q[b], k[b], v[b], kcache, vcache, int(seq[b].reshape(-1)[0]), scale, block_table[b],
                        block_size) for b in range(q.shape[0])]
    return torch.stack(rows)


def _flash_prefill(q, k, v, kcache, vcache, seq, scale, block_table, block_size, partition, is_bidirectional=False):
    if partition != block_size:
        raise RuntimeError(f"test rebel: flash attention with partition {partition} != block_size {block_size}")
    return _prefill(q, k, v, kcache, vcache, seq, scale, block_table, block_size, is_bidirectional)


def _flash_decode(q, k, v, kcache, vcache, seq, scale, block_table, block_size, partition):
    if partition != block_size:
        raise RuntimeError(f"test rebel: flash attention with partition {partition} != block_size {block_size}")
    return _decode(q, k, v, kcache, vcache, seq, scale, block_table, block_size)


_SCHEMA = ("Tensor q, Tensor k, Tensor v, Tensor(a!) kcache, Tensor(b!) vcache, Tensor seq, Tensor scale, "
           "Tensor block_table, int block_size")
_OPS = {
    "linear": ("Tensor input, Tensor weight, Tensor? bias=None", _linear),
    "paged_causal_attn_prefill": (_SCHEMA + ", bool is_bidirectional=False", _prefill),
    "paged_causal_attn_decode": (_SCHEMA, _decode),
    "paged_flash_causal_attn_prefill": (_SCHEMA + ", int partition, bool is_bidirectional=False", _flash_prefill),
    "paged_flash_causal_attn_decode": (_SCHEMA + ", int partition", _flash_decode),
}

# A test that drops `rebel` from sys.modules and imports it again finds the ops already there; the
# library lives on torch so that collecting an old copy of this module does not unregister them.
if not hasattr(torch.ops.rbln_custom_ops, "linear"):
    torch._rbln_standin_library = _LIB = torch.library.Library("rbln_custom_ops", "DEF")
    for _name, (_args, _impl) in _OPS.items():
        _LIB.define(f"{_name}({_args}) -> Tensor")
        _LIB.impl(_name, _impl, "CompositeExplicitAutograd")
