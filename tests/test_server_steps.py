"""Following a server's steps: the caller's step callback decides, the server hears of each row it ended."""

import pytest

from rm_runner.backends.server_steps import follow_server_steps, follow_steps


def test_follow_steps_stops_rows_as_the_callback_says() -> None:
    seen, stopped = [], []

    def on_step(tokens: list[int]) -> list[bool]:
        seen.append(list(tokens))
        return [t == 7 for t in tokens]

    # row 0 stops itself at 7; row 1 is ended by the server (None) after two tokens
    steps = [[5, 1], [7, 2], [9, None], [9, None]]
    new = follow_steps(iter(steps), 2, on_step, pad_token_id=0, on_stop=stopped.append)
    assert new == [[5, 7], [1, 2]]
    assert stopped == [0]  # the server's own end is not a stop to report
    assert seen == [[5, 1], [7, 2]]  # nothing read after every row ended
    assert follow_steps(iter([]), 3, on_step, 0) == [[], [], []]


def test_follow_server_steps_tells_the_server_each_row_it_must_end() -> None:
    """A row stopped here (a stop string, a client that left) is sent to the server at once; one
    ended at an end id the server knows is not; rows still running when reading ends early are."""

    def stopper(stop_at: dict[int, int]):  # row -> token at which the client stops it
        return lambda tokens: [t == 2 or stop_at.get(row) == t for row, t in enumerate(tokens)]

    told: list[list[int]] = []
    # row 0 ends at EOS (the server ended it), row 1 at a stop decision, row 2 runs to the stream's end
    steps = [[5, 6, 7], [2, 8, 7], [0, 9, 7], [0, 0, 7]]
    new = follow_server_steps(iter(steps), 3, stopper({1: 9}), [2], 0, told.append)
    assert new == [[5, 2], [6, 8, 9], [7, 7, 7, 7]]
    assert told == [[1]]  # the stream ended by itself: nothing more to say

    told.clear()  # every row stopped here before the server's stream ended: none is left running
    assert follow_server_steps(iter(steps), 3, stopper({1: 8, 2: 7}), [2], 0, told.append) == [[5, 2], [6, 8], [7]]
    assert told == [[2], [1]]

    def failing():  # the reader fails mid-stream: every row not ended yet is ended on the server
        yield [5, 6, 7]
        yield [2, 8, 7]
        raise RuntimeError("connection lost")

    told.clear()
    with pytest.raises(RuntimeError):
        follow_server_steps(failing(), 3, stopper({}), [2], 0, told.append)
    assert told == [[1, 2]]  # row 0 ended at EOS on the server already
