"""Following a server that generates step by step: each step's tokens handed to the caller's
step callback, rows it finishes ended on the server too (Triton, TorchServe, an OpenAI server)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

OnStep = Callable[[list[int]], list[bool]]


def follow_steps(steps: Iterable[list[Optional[int]]], rows: int, on_step: OnStep, pad_token_id: int,
                 on_stop: Callable[[int], None] = lambda row: None) -> list[list[int]]:
    """Each row's new tokens from a server's stream of steps (every row's next token; None for a
    row the server has ended), handed to ``on_step`` a step at a time (``pad_token_id`` for an
    ended row), which answers which rows are finished. A row it finishes is reported to
    ``on_stop`` and takes no more tokens; reading ends when no row is running."""
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
        for row, stopped in enumerate(on_step([pad_token_id if t is None else t for t in step])):
            if stopped and running[row]:
                running[row] = False
                on_stop(row)
        if not any(running):
            break
    return new


def follow_server_steps(steps: Iterable[list[int]], rows: int, on_step: OnStep, end_ids: Iterable[int],
                        pad_token_id: int, stop_rows: Callable[[list[int]], None]) -> list[list[int]]:
    """``follow_steps`` for a server that generates a batch step by step and ends a row itself at
    ``end_ids`` (the request's) or when told to (``stop_rows``).

    A row ``on_step`` finishes is handed to ``stop_rows`` at once, unless its last token is one of
    ``end_ids`` (the server has ended it already). If reading ends before the server's stream
    does (every row stopped here, or an error), the rows not yet ended on the server go to
    ``stop_rows`` too, so that nothing runs on for a reader that has left.
    """
    eos = set(end_ids)
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
        return follow_steps(watched(), rows, on_step, pad_token_id, on_stop=on_stop)
    finally:
        rest = [row for row in range(rows) if row not in ended and last[row] not in eos]
        if not exhausted and rest:
            stop_rows(rest)
