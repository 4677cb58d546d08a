"""The one typed request every engine takes: its settings, where its rows end, its wire form,
and the one place it becomes transformers' generate() keywords."""

from __future__ import annotations

import pytest

from rm_runner.backends import hf_generate
from rm_runner.config import GenerationConfig
from rm_runner.errors import RunnerError
from rm_runner.requests import GenerationRequest, SamplingParams


def test_greedy_settings_have_one_form_so_equal_requests_share_a_batch() -> None:
    assert SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2, seed=9) == SamplingParams()
    assert SamplingParams(temperature=1e-6).greedy  # under vLLM's SAMPLING_EPS
    assert SamplingParams(temperature=0.7, seed=1) != SamplingParams(temperature=0.7, seed=2)
    assert SamplingParams(repetition_penalty=1.2) != SamplingParams()  # greedy still applies the penalty
    assert SamplingParams(temperature=0.7, top_k=5).changed() == {"temperature": 0.7, "top_k": 5}


def test_out_of_range_settings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"top_p=0.0.*min_tokens=-1"):
        SamplingParams(temperature=1.0, top_p=0.0, min_tokens=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        GenerationRequest.of([[1]], 0)
    with pytest.raises(ValueError, match="2 prompts but 1 max_new_tokens"):
        GenerationRequest(((1,), (2,)), (3,))


def test_the_generation_section_becomes_vllms_settings() -> None:
    assert SamplingParams.from_generation(GenerationConfig(temperature=0.5, top_k=4, seed=2)) == SamplingParams()
    sampled = SamplingParams.from_generation(GenerationConfig(do_sample=True, temperature=0.5, top_k=4, seed=2,
                                                              ignore_eos=True))
    assert sampled == SamplingParams(temperature=0.5, top_k=4, seed=2, ignore_eos=True)
    own, extensions = sampled.openai_fields()
    assert own == {"temperature": 0.5, "seed": 2} and extensions == {"top_k": 4, "ignore_eos": True}
    assert SamplingParams().openai_fields() == ({"temperature": 0.0}, {})  # OpenAI's default is 1: always sent


def test_rows_end_at_their_own_limit_or_after_an_eos_past_min_tokens() -> None:
    request = GenerationRequest.of([[1], [1], [1]], [3, 5, 5], SamplingParams(min_tokens=2), eos_ids=[0])
    assert request.ended(0, [4, 5, 6, 7]) == [4, 5, 6]
    assert request.ended(1, [0, 4, 0, 9]) == [0, 4, 0]  # the EOS at 0 comes before min_tokens
    assert GenerationRequest.of([[1]], 5, SamplingParams(ignore_eos=True), [0]).ended(0, [4, 0, 6]) == [4, 0, 6]


def test_the_wire_form_reads_back_equal_and_refuses_unknown_fields() -> None:
    request = GenerationRequest.of([[5, 6], [7]], [4, 2], SamplingParams(temperature=0.9, seed=1, min_tokens=1),
                                   eos_ids=[2, 0], pad_token_id=3)
    assert GenerationRequest.from_json(request.to_json()) == request
    assert request.eos_ids == (0, 2)
    with pytest.raises(TypeError, match="beam_width"):
        GenerationRequest.from_json({**request.to_json(), "beam_width": 4})


def test_generate_keywords_are_made_in_one_place() -> None:
    greedy = hf_generate.generate_kwargs(GenerationRequest.of([[1], [2]], [3, 6], eos_ids=[0], pad_token_id=9))
    assert greedy == {"max_new_tokens": 6, "pad_token_id": 9, "seed": None, "eos_token_id": [0], "do_sample": False,
                      "temperature": None, "top_p": None, "top_k": None}
    sampled = hf_generate.generate_kwargs(GenerationRequest.of(
        [[1]], 3, SamplingParams(temperature=0.8, min_p=0.1, repetition_penalty=1.1, ignore_eos=True), eos_ids=[0]))
    assert sampled["eos_token_id"] is None and sampled["do_sample"] and sampled["top_k"] is None
    assert sampled["min_p"] == 0.1 and sampled["repetition_penalty"] == 1.1


def test_a_generate_call_becomes_a_request_and_unknown_keywords_are_named() -> None:
    import torch

    inputs = {"input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}
    request = hf_generate.request_of_call(inputs, {"max_new_tokens": 4, "eos_token_id": None, "pad_token_id": 0},
                                          "device=cpu in vllm mode")
    assert request.prompts == ((5, 6), (7, 8, 9)) and request.max_new_tokens == (4, 4)
    assert request.sampling == SamplingParams(ignore_eos=True)
    assert hf_generate.as_sequences(inputs, [[1], [2, 3]], 0).tolist() == [[0, 5, 6, 1, 0], [7, 8, 9, 2, 3]]
    with pytest.raises(RunnerError, match="device=cpu in vllm mode does not support generate.. arguments: num_beams"):
        hf_generate.request_of_call(inputs, {"num_beams": 2}, "device=cpu in vllm mode")


@pytest.fixture(scope="module")
def tiny():
    from rm_runner.backends.cpu import CPUBackend
    from rm_runner.config import ModelConfig
    from rm_runner.models.tiny_random import TinyRandom

    backend = CPUBackend()
    backend.initialize()
    model = backend.prepare_model(TinyRandom().resolve(), ModelConfig(name="tiny-random", source=None))
    yield backend, model
    backend.cleanup()


def test_a_backend_runs_each_row_to_its_own_end(tiny) -> None:
    """Rows of one request keep their own limits, and a row the step callback finishes stops
    there; the other rows' tokens are what they are alone."""
    backend, model = tiny
    prompts = [[5, 6, 7], [8, 9]]
    request = GenerationRequest.of(prompts, [2, 6], SamplingParams(ignore_eos=True))
    rows = backend.generate(model, request)
    assert [len(r) for r in rows] == [2, 6]
    alone = [backend.generate(model, GenerationRequest.of([p], 6, SamplingParams(ignore_eos=True)))[0] for p in prompts]
    assert rows[0] == alone[0][:2] and rows[1] == alone[1]

    steps: list[list[int]] = []

    def on_step(tokens: list[int]) -> list[bool]:
        steps.append(tokens)
        return [len(steps) >= 3, False]  # row 0 is finished at its third token

    streamed = backend.generate(model, GenerationRequest.of(prompts, 6, SamplingParams(ignore_eos=True)), on_step)
    assert streamed == [alone[0][:3], alone[1]]
    assert [s[1] for s in steps] == alone[1]  # every step's token reached the callback
