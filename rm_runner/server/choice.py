"""One generated choice: its tokens, the text a client may see so far, and why it ended.

Tokens arrive one at a time and are detokenized incrementally, the prefix/read-offset way of
vLLM and TGI: each step decodes only a short window of the latest tokens, ``ids[prefix:read]``
(already seen) and ``ids[prefix:]`` (the same plus what is new), and the difference is the new
text. A step then costs the same at token 10 as at token 4000, where decoding the whole output
again at every token made a long answer quadratic, on the model's thread. The window starts at a
token that is already decoded, so whatever joins tokens (a ``▁`` or ``Ġ`` that is a space only
after another token, a decoder that puts spaces between words) comes out as the full decode has
it; while the new text ends in U+FFFD a multi-byte character is still incomplete and the window
waits for its next byte. Special tokens that the decode skips never enter the window.

Stops, as vLLM has them: EOS (unless ``ignore_eos``) or one of ``stop_token_ids`` ends the
choice, that token's text left out unless ``include_stop_str_in_output``; a stop string cuts the
text at its start (after its end with ``include_stop_str_in_output``); none of them counts before
``min_tokens`` tokens. While the text could still be the start of a stop string it is held back by
the longest stop string's length minus one (nothing is held back when stop strings stay in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from rm_runner.requests import TokenLogprob


@dataclass(frozen=True)
class Ending:
    """A request's rules for when a choice ends and what of its text is shown (per row, unlike
    ``Sampling``: rows with different endings share a batch)."""

    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


class Choice:
    def __init__(self, tokenizer: Any, eos_ids: set[int], max_tokens: int, ending: Ending = Ending()) -> None:
        self.tokenizer = tokenizer
        self.ending = ending
        self.stop_ids = set(ending.stop_token_ids) | (set() if ending.ignore_eos else set(eos_ids))
        self.max_tokens = max_tokens
        self.stop = [s for s in ending.stop if s]
        self.holdback = 0 if ending.include_stop_str_in_output else max((len(s) for s in self.stop), default=1) - 1
        self.skipped = skipped_ids(tokenizer) if ending.skip_special_tokens else frozenset()
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of ``text`` already handed out
        self.ids_sent = 0  # entries of ``token_ids`` already handed out (``take_ids``)
        self.logprobs: list[TokenLogprob] = []  # one per token id, when the request asked for them
        self.finish_reason: Optional[str] = None
        self._ids: list[int] = []  # the tokens that make text: token_ids less the skipped special ones
        self._prefix = self._read = 0  # the decode window: _ids[_prefix:_read] is decoded already
        self._prefix_text = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: Optional[TokenLogprob] = None) -> str:
        """Take the next token (and its logprob, when the request asked for them); return the
        text that is now safe to send (may be empty)."""
        if self.finished:
            return ""
        self.token_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        may_stop = len(self.token_ids) >= self.ending.min_tokens
        if token in self.stop_ids and may_stop:
            if self.ending.include_stop_str_in_output:
                self._decode(token)
            self.finish_reason = "stop"
            self._flush()
            return self._release()
        before = len(self.text)
        self._decode(token)
        if self.stop and may_stop:
            self._cut_at_stop_string(before)
        if not self.finished and len(self.token_ids) >= self.max_tokens:
            self.finish_reason = "length"
            self._flush()
        return self._release()

    def finish(self, reason: str) -> str:
        """End the choice now (the batch ended, or the request was cancelled); return what is left."""
        if not self.finished:
            self.finish_reason = reason
            self._flush()
        return self._release()

    def take_ids(self) -> tuple[list[int], Optional[list[TokenLogprob]]]:
        """The token ids not handed out yet, and their logprobs (None when none are kept): a
        stream sends each once."""
        start, self.ids_sent = self.ids_sent, len(self.token_ids)
        return self.token_ids[start:], (self.logprobs[start:] if self.logprobs else None)

    def _decode(self, token: int) -> None:
        """Extend the text by what ``token`` adds, once it adds whole characters."""
        if token in self.skipped:  # the decode leaves it out: so can the window
            return
        self._ids.append(token)
        new_text = self._text_of(self._ids[self._prefix:])
        if len(new_text) > len(self._prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(self._prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._text_of(self._ids[self._prefix:self._read])

    def _flush(self) -> None:
        """The choice ended: what the window still waits on (an incomplete character) is text now,
        as the full decode has it."""
        if self._read < len(self._ids):
            new_text = self._text_of(self._ids[self._prefix:])
            self.text += new_text[len(self._prefix_text):]
            self._prefix = self._read = len(self._ids)
            self._prefix_text = ""

    def _text_of(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.ending.skip_special_tokens) if ids else ""

    def _cut_at_stop_string(self, before: int) -> None:
        """End at the earliest stop string in the text added since ``before`` (a stop string may
        begin in text added earlier, up to its length minus one characters back)."""
        found = [(at, stop) for stop in self.stop
                 if (at := self.text.find(stop, max(0, before - len(stop) + 1))) != -1]
        if found:
            at, stop = min(found)
            self.text = self.text[:at + len(stop) if self.ending.include_stop_str_in_output else at]
            self.finish_reason = "stop"

    def _release(self) -> str:
        end = len(self.text) if self.finished else max(self.sent, len(self.text) - self.holdback)
        delta, self.sent = self.text[self.sent:end], end
        return delta


def skipped_ids(tokenizer: Any) -> frozenset[int]:
    """The ids ``decode(skip_special_tokens=True)`` leaves out: a fast tokenizer's special added
    tokens, as its Rust decoder flags them (nothing for other tokenizers: their decode skips them
    itself, inside the window)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return frozenset()
    return frozenset(i for i, token in backend.get_added_tokens_decoder().items() if token.special)
