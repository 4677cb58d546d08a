"""Between Hugging Face's batched tensors and the per-request token lists that servers speak.

Backends that do not run ``generate()`` themselves (vLLM, a remote endpoint) take the same
left-padded ``input_ids``/``attention_mask`` and must hand back what ``generate()`` returns:
the prompt columns followed by the new tokens, right-padded.
"""

from __future__ import annotations

from typing import Any


def prompt_token_lists(inputs: dict[str, Any]) -> list[list[int]]:
    """Each row's prompt without its padding."""
    import torch

    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    return [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]


def generate_output(input_ids: Any, new_tokens: list[list[int]], pad_token_id: int) -> Any:
    """``generate()``-shaped sequences: the padded prompts, then each row's new tokens, right-padded."""
    import torch

    width = max((len(tokens) for tokens in new_tokens), default=0)
    tail = torch.full((len(new_tokens), width), pad_token_id, dtype=input_ids.dtype)
    for i, tokens in enumerate(new_tokens):
        tail[i, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return torch.cat([input_ids.cpu(), tail], dim=1)
