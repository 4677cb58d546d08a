"""A running batch on the CPU path packs joining prompts into the running rows' step: each row's
tokens and logprobs are what transformers' own forward gives it (prefilled apart, then stepped),
and rows join and leave the cache in place, copying only the rows that change."""

from __future__ import annotations

import pytest
import torch

from rm_runner.backends.cpu import CPUBackend
from rm_runner.backends.running_batch import NewRow, RowSampling
from rm_runner.config import ModelConfig
from rm_runner.models.tiny_random import TinyRandom

CONFIG = ModelConfig(name="tiny-random", source=None)
LOGPROBS = RowSampling(logprobs=2, prompt_logprobs=2)


@pytest.fixture(scope="module")
def backends():
    # Grouped-query attention (4 heads, 2 KV heads), as the decode test's model.
    path = str(TinyRandom(num_layers=3, num_heads=4, num_kv_heads=2, hidden_size=128).resolve())
    packed, plain, apart = CPUBackend(), CPUBackend(fast_decode=False), CPUBackend(packed_steps=False)
    return tuple((backend, backend.prepare_model(path, CONFIG)) for backend in (packed, plain, apart))


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(5, 200, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# step -> rows joining then, (key, prompt length); rows leave after their share of tokens
ARRIVALS = {0: [("a", 5), ("b", 9)], 3: [("c", 4), ("d", 30)], 4: [("e", 2)], 9: [("f", 6)]}
TOKENS = {"a": 20, "b": 6, "c": 12, "d": 9, "e": 3, "f": 8}


def drive(backend: CPUBackend, model, sampling: RowSampling = RowSampling()) -> dict[str, list]:
    """Every row's tokens (and logprobs) under ARRIVALS, each row leaving after TOKENS of its own."""
    batch = backend.running_batch(model)
    made: dict[str, list] = {}
    prompts: dict[str, list] = {}

    def take(tokens) -> None:
        for token in tokens:
            made.setdefault(token.key, []).append((token.token_id, token.logprob))
            if token.prompt_logprobs is not None:
                prompts[token.key] = token.prompt_logprobs
        batch.release({key for key, out in made.items() if len(out) == TOKENS[key]})

    for step in range(40):
        new = [NewRow(key, prompt(ord(key), length), sampling) for key, length in ARRIVALS.get(step, [])]
        if batch.packs:
            take(batch.step(new))
        else:
            if new:
                take(batch.prefill(new))
            take(batch.step())
    assert len(batch) == 0 and all(len(made[key]) == n for key, n in TOKENS.items())
    return {"tokens": made, "prompts": prompts}


def test_packed_steps_give_each_row_transformers_own_tokens(backends) -> None:
    (packed_backend, packed_model), (plain_backend, plain_model), _ = backends
    assert packed_backend.running_batch(packed_model).packs and not plain_backend.running_batch(plain_model).packs
    packed, plain = drive(packed_backend, packed_model), drive(plain_backend, plain_model)
    apart = drive(*backends[2])  # the lean layers and the cache grown in place, prefilled apart
    for key in TOKENS:
        ids = [t for t, _ in packed["tokens"][key]]
        assert ids == [t for t, _ in plain["tokens"][key]] == [t for t, _ in apart["tokens"][key]]
        alone = plain_model.generate(torch.tensor([prompt(ord(key), dict(sum(ARRIVALS.values(), []))[key])]),
                                     max_new_tokens=TOKENS[key], do_sample=False, eos_token_id=None)
        assert ids == alone[0, -TOKENS[key]:].tolist()  # what the row gets alone


def test_packed_logprobs_and_prompt_logprobs_are_the_models_own(backends) -> None:
    (packed_backend, packed_model), (plain_backend, plain_model), _ = backends
    packed, plain = drive(packed_backend, packed_model, LOGPROBS), drive(plain_backend, plain_model, LOGPROBS)
    for key in TOKENS:
        for (_, ours), (_, theirs) in zip(packed["tokens"][key], plain["tokens"][key], strict=True):
            assert ours.token_id == theirs.token_id and [t for t, _ in ours.top] == [t for t, _ in theirs.top]
            assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        ours, theirs = packed["prompts"][key], plain["prompts"][key]
        assert ours[0] is None and theirs[0] is None and len(ours) == len(theirs)
        for a, b in zip(ours[1:], theirs[1:]):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_rows_join_and_leave_the_cache_in_place(backends) -> None:
    """Joining rows go into the buffers' spare rows and leaving ones are moved over: the buffers
    stay the same tensors (a copy of every row per join and per leave, before)."""
    (backend, model), _, _ = backends
    batch = backend.running_batch(model)
    batch.step([NewRow(i, prompt(i, 8), RowSampling()) for i in range(3)])
    batch.step()
    layer = batch.cache.layers[0]
    buffer = layer._key_buffer.data_ptr()
    batch.step([NewRow(3, prompt(3, 6), RowSampling())])  # shorter than the batch's 9 columns
    assert len(batch) == 4 and layer._key_buffer.data_ptr() == buffer
    before = layer.keys[[0, 2, 3]].clone()
    batch.release({1})
    assert layer._key_buffer.data_ptr() == buffer
    assert torch.equal(layer.keys, before) and batch.mask.shape == (3, layer.keys.shape[-2])
    batch.step([NewRow(4, prompt(4, 20), RowSampling())])  # wider than the batch: copied once, wider
    assert layer._key_buffer.data_ptr() != buffer and batch.columns == 20 == layer.keys.shape[-2]


def test_padding_columns_go_and_rows_arrive_without_a_new_cache(backends) -> None:
    """Columns that only padding holds are dropped in place, a batch started by one row takes 64
    more before its buffers are replaced, and they stay when the batch empties (before: a new
    cache per trim, past 8 spare rows and per emptied batch, each touching the whole cache anew)."""
    (backend, model), _, _ = backends
    batch = backend.running_batch(model)
    batch.step([NewRow("long", prompt(0, 20), RowSampling())])
    layer = batch.cache.layers[0]
    buffer = layer._key_buffer.data_ptr()
    batch.step([NewRow(i, prompt(i, 4), RowSampling()) for i in range(2)])
    before = layer.keys[1:].clone()
    batch.release({"long"})  # its 20 prompt tokens and first token: 21 columns, the short rows' last 4
    assert layer._key_buffer.data_ptr() == buffer and batch.columns == 4 == layer.keys.shape[-2]
    assert torch.equal(layer.keys, before[:, :, 17:])
    for i in range(2, 64):
        batch.step([NewRow(i, prompt(i, 3), RowSampling())])
    assert len(batch) == 64 and layer._key_buffer.data_ptr() == buffer
    batch.release(set(range(64)))  # the last rows gone: the buffers stay for the next ones, of any width
    tokens = batch.step([NewRow("next", prompt(1, 25), RowSampling())])
    assert batch.cache.layers[0] is layer and layer._key_buffer.data_ptr() == buffer and batch.columns == 25
    alone = backend.running_batch(model).step([NewRow("next", prompt(1, 25), RowSampling())])
    assert tokens[0].token_id == alone[0].token_id


@pytest.mark.parametrize("which", [1, 2], ids=["fast_decode=false", "packed_steps=false"])
def test_a_batch_that_cannot_pack_says_so(backends, which: int) -> None:
    backend, model = backends[which]
    batch = backend.running_batch(model)
    assert not batch.packs
    with pytest.raises(ValueError, match="prefill"):
        batch.step([NewRow("x", [5, 6], RowSampling())])
