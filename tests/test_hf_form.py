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
