"""One generated choice: its tokens, the text a client may see so far, and why it ended.

Tokens arrive one at a time; the text is decoded from all of them (so multi-token characters
and merges come out right), cut at the first stop string, and held back by a stop string's
length minus one while it could still be the start of one, as vLLM does.
"""

from __future__ import annotations

from typing import Any, Optional


class Choice:
    def __init__(self, tokenizer: Any, eos_ids: set[int], max_tokens: int, stop: list[str],
                 ignore_eos: bool = False) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = set() if ignore_eos else eos_ids
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of ``text`` already handed out
        self.finish_reason: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        """Take the next token; return the text that is now safe to send (may be empty)."""
        if self.finished:
            return ""
        self.token_ids.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._release()
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # a character still incomplete: wait for its next byte
            self.text = text
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.sent - len(stop) + 1))
            if at != -1:
                self.text, self.finish_reason = self.text[:at], "stop"
        if not self.finished and len(self.token_ids) >= self.max_tokens:
            self.finish_reason = "length"
        return self._release()

    def finish(self, reason: str) -> str:
        """End the choice now (the batch ended, or the request was cancelled); return what is left."""
        if not self.finished:
            self.finish_reason = reason
        return self._release()

    def _release(self) -> str:
        end = len(self.text) if self.finished else max(self.sent, len(self.text) - self.holdback)
        delta, self.sent = self.text[self.sent:end], end
        return delta
