"""The conversion servers' per-request tokens go through, both ways."""

import torch

from rm_runner.backends.hf_form import generate_output, prompt_token_lists


def test_round_trip_strips_left_padding_and_right_pads_new_tokens() -> None:
    inputs = {"input_ids": torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]),
              "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])}
    assert prompt_token_lists(inputs) == [[5, 6], [7, 8, 9, 10]]
    out = generate_output(inputs["input_ids"], [[11], [12, 13, 14]], pad_token_id=0)
    assert out.tolist() == [[0, 0, 5, 6, 11, 0, 0], [7, 8, 9, 10, 12, 13, 14]]
    assert prompt_token_lists({"input_ids": torch.tensor([[1, 2]])}) == [[1, 2]]


def test_follow_steps_stops_rows_as_the_criteria_say() -> None:
    import torch

    from rm_runner.backends.hf_form import follow_steps

    seen, stopped = [], []

    def criteria(tokens, scores):
        seen.append(tokens[:, 0].tolist())
        return torch.tensor([t == 7 for t in tokens[:, 0].tolist()])

    # row 0 stops itself at 7; row 1 is ended by the server (None) after two tokens
    steps = [[5, 1], [7, 2], [9, None], [9, None]]
    new = follow_steps(iter(steps), 2, criteria, pad_token_id=0, on_stop=stopped.append)
    assert new == [[5, 7], [1, 2]]
    assert stopped == [0]  # the server's own end is not a stop to report
    assert seen == [[5, 1], [7, 2]]  # nothing read after every row ended
    assert follow_steps(iter([]), 3, criteria, 0) == [[], [], []]


def test_follow_server_steps_tells_the_server_each_row_it_must_end() -> None:
    """A row stopped here (a stop string, a client that left) is sent to the server at once; one
    ended at an EOS id the server knows is not; rows still running when reading ends early are."""
    import torch

    from rm_runner.backends.hf_form import follow_server_steps

    class Criteria:
        eos_token_ids = [2]

        def __init__(self, stop_at: dict[int, int]) -> None:
            self.stop_at = stop_at  # row -> token at which the client stops it

        def __call__(self, tokens, scores):
            return torch.tensor([t == 2 or self.stop_at.get(row) == t for row, t in enumerate(tokens[:, 0].tolist())])

    told: list[list[int]] = []
    # row 0 ends at EOS (the server ended it), row 1 at a stop decision, row 2 runs to the stream's end
    steps = [[5, 6, 7], [2, 8, 7], [0, 9, 7], [0, 0, 7]]
    new = follow_server_steps(iter(steps), 3, Criteria({1: 9}), 0, told.append)
    assert new == [[5, 2], [6, 8, 9], [7, 7, 7, 7]]
    assert told == [[1]]  # the stream ended by itself: nothing more to say

    told.clear()  # every row stopped here before the server's stream ended: none is left running
    assert follow_server_steps(iter(steps), 3, Criteria({1: 8, 2: 7}), 0, told.append) == [[5, 2], [6, 8], [7]]
    assert told == [[2], [1]]

    def failing():  # the reader fails mid-stream: every row not ended yet is ended on the server
        yield [5, 6, 7]
        yield [2, 8, 7]
        raise RuntimeError("connection lost")

    told.clear()
    try:
        follow_server_steps(failing(), 3, Criteria({}), 0, told.append)
    except RuntimeError:
        pass
    assert told == [[1, 2]]  # row 0 ended at EOS on the server already
