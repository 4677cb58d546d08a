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
