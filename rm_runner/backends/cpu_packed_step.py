"""One forward for a running batch's decode tokens and the prompts of the rows that join it.

A running batch that prefills arrivals apart stops every running row for that prefill: on two
cores a 64-token prompt of SmolLM2-135M is ~205 ms (its matrix multiplies ~138 ms), a decode
step of 32 rows ~141 ms (~93 ms), and the same multiplies over all 96 tokens at once ~182 ms.
vLLM schedules the same way (a step's token budget shared by decodes and prefills). Here every
token of the step, one per running row and all of each new prompt, goes through the layers'
matrix multiplies as one packed ``[1, tokens, hidden]`` input; only attention is split: the
running rows attend to the batch's cache under its padding mask, each new prompt causally to
itself, and the new prompts' keys and values are handed back for the batch to splice in.

It runs the operations of ``cpu_decode``'s lean layer forward (which is Llama's) on the layers
``cpu_decode.install`` gave it, so it applies exactly where every decoder layer took that path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rm_runner.backends import cpu_decode


@dataclass
class Packed:
    """What one packed forward gives back."""

    logits: torch.Tensor  # [running rows + wanted prompt positions, vocab], float32, in that order
    keys: list[list[torch.Tensor]]  # per layer, per new prompt: [1, kv heads, prompt length, head dim]
    values: list[list[torch.Tensor]]


def applies(model: nn.Module) -> bool:
    """Whether every decoder layer runs the lean forward (so this one's arithmetic is the model's)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return (layers is not None and len(layers) > 0
            and all(getattr(layer.forward, "__func__", None) is cpu_decode.lean_forward for layer in layers)
            and all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "norm"))
            and isinstance(getattr(model, "lm_head", None), nn.Module))


def forward(model: nn.Module, last: Optional[torch.Tensor], positions: Optional[torch.Tensor],
            mask: Optional[torch.Tensor], cache: Any, prompts: list[list[int]],
            whole_prompt: list[bool]) -> Packed:
    """Run the running rows' last tokens (``last`` [rows] at ``positions`` [rows], attending to
    ``cache`` under ``mask`` [rows, columns], the new column included) and the new ``prompts``.

    ``cache`` gets the running rows' new keys and values, as a decode step gives it. Logits come
    for each running row, then for each prompt its last position, or all of them where
    ``whole_prompt`` says so (prompt logprobs).
    """
    inner = model.model
    rows = 0 if last is None else last.shape[0]
    device = model.device
    parts = ([last] if rows else []) + [torch.tensor(p, device=device) for p in prompts]
    ids = torch.cat(parts)
    where = ([positions] if rows else []) + [torch.arange(len(p), device=device) for p in prompts]
    hidden = inner.embed_tokens(ids[None])
    cos, sin = (t.unsqueeze(1) for t in inner.rotary_emb(hidden, position_ids=torch.cat(where)[None]))
    spans, start = [], rows
    for prompt in prompts:
        spans.append((start, start + len(prompt)))
        start += len(prompt)
    attend = mask[:, None, None, :].bool() if rows else None  # what transformers' sdpa mask is for one query
    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    for layer in inner.layers:
        hidden, layer_keys, layer_values = _layer(layer, hidden, cos, sin, rows, spans, attend, cache)
        keys.append(layer_keys)
        values.append(layer_values)
    wanted = list(range(rows))
    for (begin, end), whole in zip(spans, whole_prompt):
        wanted.extend(range(begin, end) if whole else [end - 1])
    picked = hidden[0, torch.tensor(wanted, device=device)]
    logits = model.lm_head(cpu_decode.rms_norm(inner.norm, picked)).float()
    return Packed(logits, keys, values)


def _layer(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: int,
           spans: list[tuple[int, int]], attend: Optional[torch.Tensor],
           cache: Any) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    attn = layer.self_attn
    fused = attn.q_proj.fused
    q_size, k_size, _ = fused.sizes
    head_dim, tokens = attn.head_dim, hidden.shape[1]
    heads = q_size // head_dim

    residual = hidden
    qkv = fused.compute(cpu_decode.rms_norm(layer.input_layernorm, hidden))
    qk = cpu_decode.rotate(qkv[..., : q_size + k_size].view(1, tokens, -1, head_dim).transpose(1, 2), cos, sin)
    query, key = qk[:, :heads], qk[:, heads:]
    value = qkv[..., q_size + k_size:].view(1, tokens, -1, head_dim).transpose(1, 2)
    outs = []
    if rows:  # the running rows: one query each, against the batch's cache
        q, k, v = (t[0, :, :rows].transpose(0, 1).unsqueeze(2) for t in (query, key, value))
        k, v = cache.update(k, v, attn.layer_idx)
        out, _ = sdpa_attention_forward(attn, q, k, v, attend, dropout=0.0, scaling=attn.scaling)
        outs.append(out.reshape(1, rows, -1))
    new_keys, new_values = [], []
    for begin, end in spans:  # each new prompt: causal attention over itself
        q, k, v = query[:, :, begin:end], key[:, :, begin:end], value[:, :, begin:end]
        out, _ = sdpa_attention_forward(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling)
        outs.append(out.reshape(1, end - begin, -1))
        new_keys.append(k)
        new_values.append(v)
    attended = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    hidden = residual + attn.o_proj(attended.contiguous())
    return hidden + layer.mlp(cpu_decode.rms_norm(layer.post_attention_layernorm, hidden)), new_keys, new_values
