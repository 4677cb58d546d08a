"""Incremental detokenization (server/choice.py): the text a choice hands out token by token is
exactly the full decode of its tokens, for byte-level BPE (``Ġ``, characters split across
tokens), sentencepiece-style BPE with byte fallback (``▁``, emoji and CJK as byte tokens) and a
word-level tokenizer whose decoder puts spaces between words; each step decodes a few tokens,
not the whole output; stops (strings, token ids, EOS, min_tokens) work on that text."""

from __future__ import annotations

import random

import pytest

from rm_runner.server.choice import Choice, Ending

PIECES = ["hello", "world", "the", "naïve", "café", "中文", "日本語", "한국어", "€5", "©", "🙂", "🚀", "👩‍💻",
          "x", "!", ",", "?", "123", "ünïcödé", "価格は", "です", "\n", "tab\t"]
CORPUS = [" ".join(PIECES[i:] + PIECES[:i]) for i in range(len(PIECES))] * 20
RARE = ["😀", "🎉", "漢字", "Ωμέγα", "ñandú", "𝔘𝔫𝔦"]  # not in CORPUS: split into bytes by both BPEs


def byte_level_bpe():
    """GPT-2 style: bytes as printable characters (``Ġ`` a space), merges learnt from CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"],
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def sentencepiece_bpe():
    """Llama-2 style: ``▁`` for spaces, characters outside the learnt alphabet as ``<0xXX>`` byte
    tokens, the first space stripped by the decoder."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizer
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, limit_alphabet=45, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    learnt = json.loads(learner.to_str())["model"]
    vocab = dict(learnt["vocab"])
    for byte in range(256):  # ordinary tokens, as in Llama's vocabulary
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learnt["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.normalizer = normalizer
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def word_level():
    """The tiny random model's: whole words, joined with spaces by its decoder."""
    from transformers import AutoTokenizer

    from rm_runner.models.tiny_random import TinyRandom

    return AutoTokenizer.from_pretrained(str(TinyRandom().resolve()))


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return {"byte-level": byte_level_bpe(), "sentencepiece": sentencepiece_bpe(), "word-level": word_level()}


def streamed(tokenizer, ids: list[int], ending: Ending = Ending(), eos: set[int] = frozenset(),
             max_tokens: int | None = None) -> tuple[list[str], Choice]:
    """The pieces a choice hands out for ``ids``, one token at a time, and the choice."""
    choice = Choice(tokenizer, set(eos), max_tokens or len(ids) + 1, ending)
    pieces = [choice.add(token) for token in ids if not choice.finished]
    pieces.append(choice.finish("length"))
    return pieces, choice


def random_text(rng: random.Random) -> str:
    return rng.choice(["", " ", "  ", "\n"]).join(rng.choice(PIECES + RARE) for _ in range(rng.randint(1, 12)))


def sequences(tokenizer, rng: random.Random, count: int, random_ids: bool) -> list[list[int]]:
    """Encodings of random texts, concatenations of them (with special tokens between), and, where
    any id sequence decodes consistently (not with byte fallback: see below), random ids."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    specials = sorted(tokenizer.all_special_ids)
    out = []
    for i in range(count):
        ids = encode(random_text(rng))
        if i % 3 == 1:
            ids = ids + [rng.choice(specials)] + encode(random_text(rng))
        if random_ids and i % 3 == 2:
            ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        out.append(ids)
    return out


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece", "word-level"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_text_is_the_full_decode(tokenizers: dict, name: str, skip_special_tokens: bool) -> None:
    """Byte fallback turns a whole run of byte tokens into U+FFFDs when any of it is invalid, which
    no decoder that streams can know in advance: its random sequences are encodings only (what a
    model generates); the other tokenizers get random ids too."""
    tokenizer = tokenizers[name]
    rng = random.Random(f"{name}-{skip_special_tokens}")
    seen_split_character = False
    for ids in sequences(tokenizer, rng, 300, random_ids=name != "sentencepiece"):
        pieces, choice = streamed(tokenizer, ids, Ending(skip_special_tokens=skip_special_tokens))
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == choice.text == expected, (ids, pieces)
        seen_split_character |= any(tokenizer.decode([t]).endswith("\ufffd") for t in ids) and "\ufffd" not in expected
    if name != "word-level":
        assert seen_split_character  # characters split across tokens were among them


def test_a_split_character_waits_for_its_last_byte(tokenizers: dict) -> None:
    tokenizer = tokenizers["sentencepiece"]
    ids = tokenizer("a 👩‍💻 b", add_special_tokens=False)["input_ids"]
    pieces, _ = streamed(tokenizer, ids)
    assert "\ufffd" not in "".join(pieces) and any(p == "" for p in pieces)  # held while incomplete
    assert "".join(pieces) == "a 👩‍💻 b"


def test_each_step_decodes_a_few_tokens_not_the_whole_output(tokenizers: dict) -> None:
    """Decoding everything at every token made a 4000-token answer cost ~8 million token decodes."""
    tokenizer = tokenizers["byte-level"]

    class Counting:
        def __init__(self) -> None:
            self.decoded = 0
            self.backend_tokenizer = tokenizer.backend_tokenizer

        def decode(self, ids, **kwargs):
            self.decoded += len(ids)
            return tokenizer.decode(ids, **kwargs)

    ids = tokenizer(" ".join(CORPUS), add_special_tokens=False)["input_ids"][:2000]
    counting = Counting()
    pieces, _ = streamed(counting, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert counting.decoded < 8 * len(ids)


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece"])
def test_stop_strings_across_multi_byte_characters(tokenizers: dict, name: str) -> None:
    tokenizer = tokenizers[name]
    text = "価格は€5です🙂 then 中文 more"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for stop, include in (("🙂", False), ("🙂", True), ("です🙂", False), ("中文", True), ("nowhere", False)):
        pieces, choice = streamed(tokenizer, ids, Ending(stop=(stop,), include_stop_str_in_output=include))
        full = tokenizer.decode(ids)
        if stop in full:
            cut = full[: full.index(stop) + (len(stop) if include else 0)]
            assert choice.finish_reason == "stop"
        else:
            cut = full
        assert "".join(pieces) == choice.text == cut
        if not include:  # never sent, not even its first characters ahead of the rest
            assert all(stop not in "".join(pieces[:i]) for i in range(len(pieces) + 1))


def test_text_that_may_start_a_stop_string_is_held_back_then_released(tokenizers: dict) -> None:
    tokenizer = tokenizers["byte-level"]
    ids = tokenizer("café 中文 naïve", add_special_tokens=False)["input_ids"]
    choice = Choice(tokenizer, set(), 100, Ending(stop=("中文 x",)))
    sent = ""
    for token in ids:
        sent += choice.add(token)
        assert choice.text.startswith(sent) and len(choice.text) - len(sent) <= len("中文 x") - 1
    assert choice.text == "café 中文 naïve" and sent != choice.text  # the tail still held ...
    assert sent + choice.finish("length") == "café 中文 naïve"  # ... until the choice ends


def test_stop_token_ids_eos_and_min_tokens(tokenizers: dict) -> None:
    tokenizer = tokenizers["byte-level"]
    eos = tokenizer.eos_token_id
    ids = tokenizer(" hello world hello world", add_special_tokens=False)["input_ids"]
    first = next(i for i, t in enumerate(ids) if i > 0 and t in ids[i + 1:])  # a token that comes back later
    token, later = ids[first], ids.index(ids[first], first + 1)

    pieces, choice = streamed(tokenizer, ids, Ending(stop_token_ids=(token,)))
    assert choice.finish_reason == "stop" and choice.token_ids == ids[: first + 1]
    assert "".join(pieces) == tokenizer.decode(ids[:first])  # the stop token's text left out ...
    pieces, choice = streamed(tokenizer, ids, Ending(stop_token_ids=(token,), include_stop_str_in_output=True))
    assert "".join(pieces) == tokenizer.decode(ids[: first + 1])  # ... unless asked for
    pieces, choice = streamed(tokenizer, ids, Ending(stop_token_ids=(token,), min_tokens=first + 2))
    assert choice.token_ids == ids[: later + 1]  # too early the first time: it stops where it comes back

    with_eos = ids[:2] + [eos] + ids[2:]
    pieces, choice = streamed(tokenizer, with_eos, eos={eos})
    assert choice.token_ids == with_eos[:3] and choice.finish_reason == "stop"
    pieces, choice = streamed(tokenizer, with_eos, Ending(min_tokens=4), eos={eos})
    assert choice.token_ids == with_eos and "".join(pieces) == tokenizer.decode(ids)  # EOS too early: goes on
    pieces, choice = streamed(tokenizer, with_eos, Ending(ignore_eos=True), eos={eos})
    assert choice.token_ids == with_eos
    full = tokenizer.decode(ids)
    pieces, choice = streamed(tokenizer, ids, Ending(stop=(" world",), min_tokens=len(ids)))
    assert choice.finish_reason == "stop" and "".join(pieces) == full[: full.rindex(" world")]  # the first too early
