"""Between Hugging Face's batched tensors and the per-request token lists that servers speak.

Backends that do not run ``generate()`` themselves (vLLM, a remote endpoint) take the same
left-padded ``input_ids``/``attention_mask`` and must hand back what ``generate()`` returns:
the prompt columns followed by the new tokens, right-padded.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional


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


def follow_steps(steps: Iterable[list[Optional[int]]], rows: int, criteria: Any, pad_token_id: int,
                 on_stop: Callable[[int], None] = lambda row: None) -> list[list[int]]:
    """Each row's new tokens from a server's stream of steps (every row's next token; None for a
    row the server has ended), handed to Hugging Face ``stopping_criteria`` a step at a time, as
    ``generate()`` would. A row the criteria stop is reported to ``on_stop`` and takes no more
    tokens; reading ends when no row is running."""
    import torch

    new: list[list[int]] = [[] for _ in range(rows)]
    running = [True] * rows
    for step in steps:
        for row, token in enumerate(step):
            if token is None:
                running[row] = False
            elif running[row]:
                new[row].append(token)
        if not any(running):
            break
        tokens = torch.tensor([pad_token_id if t is None else t for t in step])
        for row, stopped in enumerate(criteria(tokens[:, None], None).tolist()):
            if stopped and running[row]:
                running[row] = False
                on_stop(row)
        if not any(running):
            break
    return new


def follow_server_steps(steps: Iterable[list[int]], rows: int, criteria: Any, pad_token_id: int,
                        stop_rows: Callable[[list[int]], None]) -> list[list[int]]:
    """``follow_steps`` for a server that generates a batch step by step and ends a row itself at
    the criteria's EOS ids (``criteria.eos_token_ids``) or when told to (``stop_rows``).

    A row the criteria stop is handed to ``stop_rows`` at once, unless its last token is one of
    those EOS ids (the server has ended it already). If reading ends before the server's stream
    does (every row stopped here, or an error), the rows not yet ended on the server go to
    ``stop_rows`` too, so that nothing runs on for a reader that has left.
    """
    eos = set(getattr(criteria, "eos_token_ids", None) or ())
    last: list[Optional[int]] = [None] * rows
    ended: set[int] = set()  # rows the server has ended or been told to end
    exhausted = False

    def watched() -> Iterator[list[int]]:
        nonlocal exhausted
        for step in steps:
            last[:] = step
            yield step
        exhausted = True

    def on_stop(row: int) -> None:
        ended.add(row)
        if last[row] not in eos:
            stop_rows([row])

    try:
        return follow_steps(watched(), rows, criteria, pad_token_id, on_stop=on_stop)
    finally:
        rest = [row for row in range(rows) if row not in ended and last[row] not in eos]
        if not exhausted and rest:
            stop_rows(rest)
