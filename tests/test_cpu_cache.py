"""The CPU backend's growing KV cache: the same tokens as transformers' DynamicCache, without
copying the whole cache at every step."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from rm_runner.backends.cpu_cache import GrowingCache, fits, generate_kwarg


def test_same_tokens_as_dynamic_cache_and_no_copy_per_step(tiny) -> None:
    run = tiny("generation.max_new_tokens=2")
    model = AutoModelForCausalLM.from_pretrained(run.read_json("metrics.json")["model_path"], dtype=torch.float32)
    assert fits(model)
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 5, 9, 13, 2]])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
    plain = model.generate(**kwargs, **{generate_kwarg(): DynamicCache()})
    cache = GrowingCache()
    grown = model.generate(**kwargs, **{generate_kwarg(): cache})
    assert torch.equal(plain, grown)
    layer = cache.layers[0]
    assert layer.get_seq_length() == 5 + 40 - 1  # the last token is sampled, not cached
    assert layer.keys.data_ptr() == layer._key_buffer.data_ptr()  # a view of the buffer, not a copy
    assert layer._key_buffer.shape[-2] >= 5 + 128  # one allocation held the prompt and every step


def test_crop_and_reorder_keep_it_consistent() -> None:
    cache = GrowingCache()
    k = torch.arange(2 * 1 * 6 * 4, dtype=torch.float32).reshape(2, 1, 6, 4)
    cache.update(k, k + 1, 0)
    cache.layers[0].crop(-2)
    keys, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)
    assert keys.shape[-2] == 5 and torch.equal(keys[:, :, :4], k[:, :, :4]) and torch.equal(keys[:, :, 4:], k[:, :, :1])
    cache.layers[0].batch_select_indices(torch.tensor([1]))
    keys, _ = cache.update(k[1:, :, :1], k[1:, :, :1], 0)
    assert keys.shape == (1, 1, 6, 4) and torch.equal(keys[0, :, :4], k[1, :, :4])
