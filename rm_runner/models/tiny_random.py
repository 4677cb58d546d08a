"""A deterministic tiny random Llama with a word-level tokenizer, built in code for fast tests.

Seeded, so the same options give byte-identical weights. head_dim defaults to 32 because
vLLM's CPU attention rejects smaller heads; the word-level vocabulary decodes to readable
words (a byte-level BPE over random weights decodes to U+FFFD).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from rm_runner.models.cache import cache_root, cached

log = logging.getLogger(__name__)

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find any new work part take get place made live "
    "where after back little only round man year came show every good me give our under name very "
    "through just form sentence great think say help low line differ turn cause much mean before move "
    "right boy old too same tell does set three want air well also play small end put home read hand "
    "port large spell add even land here must big high such follow act why ask men change went light "
    "kind off need house picture try us again animal point mother world near build self earth father "
    "Paris France capital city river answer question model device token . , ? !"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


BUILD_VERSION = 2  # bump when _build changes what it writes, so caches rebuild


class TinyRandom:
    def __init__(self, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                 num_kv_heads: int = 1, intermediate_size: int = 128, seed: int = 0) -> None:
        self.options = {
            "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
            "num_kv_heads": num_kv_heads, "intermediate_size": intermediate_size, "seed": seed,
        }

    def __repr__(self) -> str:
        return f"TinyRandom({self.options})"

    def check(self) -> None:
        o = self.options
        if o["hidden_size"] % o["num_heads"] or o["num_heads"] % o["num_kv_heads"]:
            from rm_runner.errors import ConfigError

            raise ConfigError(
                "model.source: hidden_size must divide by num_heads and num_heads by num_kv_heads, "
                f"got {o['hidden_size']}/{o['num_heads']}/{o['num_kv_heads']}"
            )

    def resolve(self) -> Path:
        self.check()
        key = hashlib.sha256(json.dumps({**self.options, "v": BUILD_VERSION}, sort_keys=True).encode()).hexdigest()[:12]
        return cached(cache_root() / "models" / f"tiny-random-llama-{key}", self._build)

    def _build(self, out: Path) -> None:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
        )
        backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
            additional_special_tokens=SPECIAL[4:],
        )
        tokenizer.chat_template = CHAT_TEMPLATE
        o = self.options
        config = LlamaConfig(
            vocab_size=len(vocab), hidden_size=o["hidden_size"], intermediate_size=o["intermediate_size"],
            num_hidden_layers=o["num_layers"], num_attention_heads=o["num_heads"],
            num_key_value_heads=o["num_kv_heads"], max_position_embeddings=2048,
            bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
            tie_word_embeddings=True,
            initializer_range=0.5,  # far from uniform, so different prompts give different tokens
        )
        torch.manual_seed(o["seed"])
        model = LlamaForCausalLM(config).to(torch.float32)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        log.info("built tiny random llama in %s", out)
