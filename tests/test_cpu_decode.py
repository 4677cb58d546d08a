"""The CPU backend's lean decode path gives transformers' numbers exactly: same logits at every
step, not just the same tokens, on a left-padded batch, past the cache's first size, in beam
search; it stays off for callers' models and for attention implementations it does not cover."""

from __future__ import annotations

import pytest
import torch

from rm_runner.backends import cpu_decode, cpu_linear
from rm_runner.backends.cpu import CPUBackend
from rm_runner.config import ModelConfig
from rm_runner.models.tiny_random import TinyRandom

CONFIG = ModelConfig(name="tiny-random", source=None)


@pytest.fixture(scope="module")
def path() -> str:
    # Grouped-query attention (4 heads, 2 KV heads) and enough layers for the cache to matter.
    return str(TinyRandom(num_layers=3, num_heads=4, num_kv_heads=2, hidden_size=128).resolve())


@pytest.fixture(scope="module")
def models(path: str):
    """The same weights behind the lean decode path and behind transformers' own forward."""
    fast, plain = CPUBackend(), CPUBackend(fast_decode=False)
    return fast, fast.prepare_model(path, CONFIG), plain, plain.prepare_model(path, CONFIG)


def padded_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[3, 3, 3, 7, 8, 9], [3, 10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25]])
    return {"input_ids": ids, "attention_mask": (ids != 3).long()}


def generate(backend: CPUBackend, model, **kwargs):
    return backend.execute(model, padded_batch(), max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=3, output_scores=True, return_dict_in_generate=True, **kwargs)


def assert_same(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True))


def test_lean_decode_gives_transformers_logits_exactly(models) -> None:
    fast, fast_model, plain, plain_model = models
    assert cpu_decode.installed(fast_model) and not cpu_decode.installed(plain_model)
    assert all("forward" in vars(layer) for layer in fast_model.model.layers)
    out = generate(fast, fast_model)
    assert_same(out, generate(plain, plain_model))
    # it really ran on the preallocated cache, sized for prompt + new tokens up front
    layers = getattr(out, "cache", None) or out.past_key_values
    layers = layers.layers
    assert {type(layer) for layer in layers} == {cpu_decode.PreallocatedLayer}
    assert layers[0]._key_buffer.shape[-2] == 6 + 12 and layers[0].keys.shape[-2] == 6 + 11
    # a prompt longer than its answer still gets a buffer of exactly prompt + new tokens
    short = fast.execute(fast_model, padded_batch(), max_new_tokens=2, do_sample=False, eos_token_id=None,
                         pad_token_id=3, return_dict_in_generate=True)
    assert (getattr(short, "cache", None) or short.past_key_values).layers[0]._key_buffer.shape[-2] == 6 + 2


def test_cache_outgrowing_its_buffers_and_beam_search_stay_exact(models) -> None:
    fast, fast_model, plain, plain_model = models
    small = cpu_decode.new_cache(fast_model, capacity=2)  # regrown (and copied) twice on the way
    assert_same(generate(fast, fast_model, **{cpu_decode.cache_keyword(fast_model): small}), generate(plain, plain_model))
    # beams reorder the cache: the layer notices the replaced tensors and rebuilds its buffers
    beams = {"num_beams": 3, "num_return_sequences": 2}
    assert torch.equal(generate(fast, fast_model, **beams).sequences, generate(plain, plain_model, **beams).sequences)


def test_other_attention_and_callers_models_keep_transformers_forward(models, path: str) -> None:
    fast, fast_model, plain, plain_model = models
    try:
        for model in (fast_model, plain_model):
            model.set_attn_implementation("eager")
        assert_same(generate(fast, fast_model), generate(plain, plain_model))
    finally:
        for model in (fast_model, plain_model):
            model.set_attn_implementation("sdpa")
    from transformers import AutoModelForCausalLM

    callers = CPUBackend().prepare_model(AutoModelForCausalLM.from_pretrained(path), CONFIG)
    assert not cpu_decode.installed(callers) and not any("forward" in vars(m) for m in callers.modules())


@pytest.mark.skipif(not cpu_linear.supported(torch.bfloat16), reason="oneDNN bfloat16 needs AVX512-BF16 or AMX")
def test_lean_decode_is_exact_in_bfloat16_too(path: str) -> None:
    config = ModelConfig(name="tiny-random", source=None, dtype="bfloat16")
    fast, plain = CPUBackend(), CPUBackend(fast_decode=False)
    fast_model, plain_model = fast.prepare_model(path, config), plain.prepare_model(path, config)
    assert cpu_decode.installed(fast_model) and next(fast_model.parameters()).dtype == torch.bfloat16
    assert_same(generate(fast, fast_model), generate(plain, plain_model))
