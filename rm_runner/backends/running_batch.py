"""Iteration-level batching of a transformers causal LM: rows join and leave between decode steps.

What vLLM and Orca schedule, over Hugging Face's own cache and attention: the running rows share
one left-padded KV cache (``[rows, heads, length, head_dim]`` per layer) and one attention mask.
A row that joins has its prompt prefilled apart (new rows together, left-padded among
themselves) and its cache spliced in, the shorter side padded on the left so every row's last
token stays in the last column; a row that leaves is cut out at once, and columns that only
padding holds any more are dropped. Each row keeps its own position, so its tokens are what it
would get in any other batch (the arithmetic is the same up to floating-point order) and a
greedy row's tokens are the offline ``generate()`` batch's.

Sampling is per row, in vLLM's order (penalty, temperature, min_p, top_k, top_p), each seeded row
with a generator of its own, so a seeded request draws the same tokens alone and in any batch.
logprobs are taken from the raw logits, as vLLM's default ``raw_logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Sequence

import torch

from rm_runner.requests import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class RowSampling:
    """How one row picks its tokens: its request's settings, and what is the row's own."""

    params: SamplingParams = SamplingParams()
    seed: Optional[int] = None  # the row's generator's (row i of a request with n > 1: seed + i)
    # Tokens kept out until ``params.min_tokens`` tokens are made (EOS and stop ids, as vLLM's min_tokens).
    banned_early: tuple[int, ...] = ()
    logprobs: Optional[int] = None  # alternatives per generated token; None: no logprobs
    prompt_logprobs: Optional[int] = None  # the same over the prompt


@dataclass
class NewRow:
    key: Hashable  # the caller's handle for the row
    prompt: list[int]
    sampling: RowSampling


@dataclass
class Token:
    """What one step made for one row."""

    key: Hashable
    token_id: int
    logprob: Optional[TokenLogprob] = None
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # on a row's first token, if asked


@dataclass
class _Row:
    key: Hashable
    sampling: RowSampling
    history: list[int]  # prompt and generated tokens (the repetition penalty looks at both)
    made: int = 0
    generator: Optional[torch.Generator] = None
    position: int = 0  # of the next token


class RunningBatch:
    """The rows being generated and their shared cache. Driven from one thread.

    Where the model's layers allow it (``packs``: ``cpu_packed_step``), rows join inside a step,
    their prompts run with the running rows' tokens in one forward; otherwise ``prefill`` runs
    them apart first.
    """

    def __init__(self, model: Any, new_cache: Callable[[], Any], packs: bool = False) -> None:
        from rm_runner.backends.cpu_decode import cache_keyword

        self.model = model
        self.new_cache = new_cache
        self.packs = packs
        self.cache_keyword = cache_keyword(model)
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: Optional[torch.Tensor] = None  # [rows, columns]: 1 where a row has a token
        self.last: Optional[torch.Tensor] = None  # [rows]: the token each row feeds next

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def prefill(self, new: list[NewRow]) -> list[Token]:
        """Run the prompts of ``new`` and make their first tokens; the rows join the batch."""
        device = self.model.device
        mask = _padding_mask(new)
        width = mask.shape[1]
        ids = torch.zeros((len(new), width), dtype=torch.long)
        for i, row in enumerate(new):
            ids[i, width - len(row.prompt):] = torch.tensor(row.prompt)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        wants_prompt = any(r.sampling.prompt_logprobs is not None for r in new)
        cache = self.new_cache()
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=True,
                             logits_to_keep=0 if wants_prompt else 1, **{self.cache_keyword: cache})
        logits = out.logits.float()
        rows = _joining(new, device)
        tokens = self._sample(logits[:, -1], rows)
        for i, (row, token) in enumerate(zip(new, tokens)):
            k = row.sampling.prompt_logprobs
            if k is not None:
                token.prompt_logprobs = _prompt_logprobs(logits[i, width - len(row.prompt):], row.prompt, k)
        last = torch.tensor([t.token_id for t in tokens], device=device)
        if self.rows:
            self._join(rows, mask.to(device), last, [[layer.keys] for layer in cache.layers],
                       [[layer.values] for layer in cache.layers])
        else:  # the cache as the forward left it: nothing to splice into
            self._adopt(rows, last)
            self.cache, self.mask = cache, mask.to(device)
        return tokens

    def step(self, new: Sequence[NewRow] = ()) -> list[Token]:
        """One decode step for every row: each feeds its last token and gets the next. ``new``
        rows (where the batch ``packs``) join in the same forward and get their first tokens."""
        if new and not self.packs:
            raise ValueError("this running batch prefills joining rows apart: call prefill() first")
        if self.packs:
            return self._packed_step(list(new))
        if not self.rows:
            return []
        device = self.model.device
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        positions = torch.tensor([[r.position] for r in self.rows], device=device)
        with torch.inference_mode():
            out = self.model(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **{self.cache_keyword: self.cache})
        tokens = self._sample(out.logits[:, -1].float(), self.rows)
        self._advance(tokens)
        self.last = torch.tensor([t.token_id for t in tokens], device=device)
        return tokens

    @torch.inference_mode()  # the cache's tensors were made under it, and change in place
    def release(self, keys: set[Hashable]) -> None:
        """Cut these rows out of the batch (finished, cancelled), freeing their cache."""
        keep = [i for i, r in enumerate(self.rows) if r.key not in keys]
        if len(keep) == len(self.rows):
            return
        if not keep:
            if all(_grows_in_place(layer, 0, 0) for layer in self.cache.layers):
                for layer in self.cache.layers:  # the buffers stay for the rows to come, their pages mapped
                    layer.keep([])
            else:
                self.cache = None
            self.rows, self.mask, self.last = [], None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.last = self.mask[index], self.last[index]
        first = int(self.mask.any(dim=0).long().argmax())  # columns before it hold only padding now
        if 4 * first < self.mask.shape[1]:
            first = 0  # the padding stays a while
        self.mask = self.mask[:, first:]
        layers = self.cache.layers
        if all(_grows_in_place(layer, 0, 0) for layer in layers):
            for layer in layers:  # the rows after the first gap move down, the columns left
                layer.keep(keep)
                if first:
                    layer.drop_columns(first)
            return
        runs = _runs(keep)  # the kept rows as slices: views, so each layer is copied once
        for layer in self.cache.layers:
            _hold(layer, [layer.keys[run, :, first:] for run in runs], [layer.values[run, :, first:] for run in runs],
                  self.mask.shape[1])

    def _packed_step(self, new: list[NewRow]) -> list[Token]:
        from rm_runner.backends import cpu_packed_step

        if not self.rows and not new:
            return []
        device = self.model.device
        running = len(self.rows)
        positions = None
        if running:
            self.mask = torch.cat([self.mask, self.mask.new_ones((running, 1))], dim=1)
            positions = torch.tensor([r.position for r in self.rows], device=device)
        whole = [r.sampling.prompt_logprobs is not None for r in new]
        with torch.inference_mode():
            out = cpu_packed_step.forward(self.model, self.last if running else None, positions, self.mask,
                                          self.cache, [r.prompt for r in new], whole)
        joining = _joining(new, device)
        picks, spans, at = list(range(running)), [], running  # each row's logits row; prompts' spans
        for row, w in zip(new, whole):
            length = len(row.prompt) if w else 1
            spans.append((at, at + length))
            picks.append(at + length - 1)
            at += length
        tokens = self._sample(out.logits[picks], self.rows + joining)
        self._advance(tokens)
        for row, token, (begin, end) in zip(new, tokens[running:], spans):
            k = row.sampling.prompt_logprobs
            if k is not None:
                token.prompt_logprobs = _prompt_logprobs(out.logits[begin:end], row.prompt, k)
        last = torch.tensor([t.token_id for t in tokens], device=device)
        if running:
            self.last = last[:running]
        if new:
            self._join(joining, _padding_mask(new).to(device), last[running:], out.keys, out.values)
        return tokens

    def _advance(self, tokens: list[Token]) -> None:
        """The running rows past the tokens a step made them (the first ``len(self.rows)`` of ``tokens``)."""
        for row, token in zip(self.rows, tokens):
            row.history.append(token.token_id)
            row.made += 1
            row.position += 1

    def _adopt(self, rows: list[_Row], last: torch.Tensor) -> None:
        """The joining rows' first tokens, and the rows in the batch (their cache is the caller's to place)."""
        for row, token in zip(rows, last.tolist()):
            row.history.append(token)
            row.made = 1
        self.rows = self.rows + rows
        self.last = last if self.last is None else torch.cat([self.last, last])

    @torch.inference_mode()
    def _join(self, rows: list[_Row], mask: torch.Tensor, last: torch.Tensor, keys: list[list[torch.Tensor]],
              values: list[list[torch.Tensor]]) -> None:
        """Splice joining rows in: ``keys``/``values`` per layer, their parts (stacked in row order,
        each right-aligned to ``mask``'s width at most), ``mask`` their padding."""
        if self.cache is None:
            self.cache = self.new_cache()
        layers, joining = self.cache.layers, mask.shape[0]
        if all(_grows_in_place(layer, joining, mask.shape[1]) for layer in layers):
            for layer, joining_keys, joining_values in zip(layers, keys, values):
                layer.append(joining_keys, joining_values)
            self.mask = mask if self.mask is None else torch.cat(
                [self.mask, _pad_left(mask, self.columns - mask.shape[1])])
            self._adopt(rows, last)
            return
        width = max(self.columns, mask.shape[1])
        old_pad, new_pad = width - self.columns, width - mask.shape[1]
        self.mask = _pad_left(mask, new_pad) if self.mask is None else torch.cat(
            [_pad_left(self.mask, old_pad), _pad_left(mask, new_pad)])
        held = bool(self.rows)
        for layer, joining_keys, joining_values in zip(self.cache.layers, keys, values):
            _hold(layer, ([layer.keys] if held else []) + joining_keys,
                  ([layer.values] if held else []) + joining_values, width)
        self._adopt(rows, last)

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[Token]:
        """The next token of each row from its logits row ([rows, vocab], float32)."""
        chosen = logits.argmax(dim=-1).tolist()
        logprobs = torch.log_softmax(logits, dim=-1) if any(r.sampling.logprobs is not None for r in rows) else None
        tokens = []
        for i, row in enumerate(rows):
            s, p = row.sampling, row.sampling.params
            if p.repetition_penalty != 1 or not p.greedy or row.made < p.min_tokens:
                chosen[i] = _pick(logits[i], row)
            token = Token(row.key, chosen[i])
            if s.logprobs is not None:
                token.logprob = _token_logprob(logprobs[i], chosen[i], s.logprobs)
            tokens.append(token)
        return tokens


def _joining(new: list[NewRow], device: Any) -> list[_Row]:
    """The rows of ``new`` as the batch keeps them, before their first token."""
    return [_Row(r.key, r.sampling, list(r.prompt), generator=_generator(r.sampling.seed, device),
                 position=len(r.prompt)) for r in new]


def _padding_mask(new: list[NewRow]) -> torch.Tensor:
    """``[rows, longest prompt]``: 1 where a row, left-padded to the longest, has a prompt token."""
    width = max(len(r.prompt) for r in new)
    mask = torch.zeros((len(new), width), dtype=torch.long)
    for i, row in enumerate(new):
        mask[i, width - len(row.prompt):] = 1
    return mask


def _pick(logits: torch.Tensor, row: _Row) -> int:
    s = row.sampling.params
    scores = logits.clone()
    if s.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(row.history)), device=scores.device)
        picked = scores[seen]
        scores[seen] = torch.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
    if row.made < s.min_tokens and row.sampling.banned_early:
        scores[list(row.sampling.banned_early)] = float("-inf")
    if s.greedy:
        return int(scores.argmax())
    scores = scores / s.temperature
    probs = torch.softmax(scores, dim=-1)
    if s.min_p:
        probs = torch.where(probs < s.min_p * probs.max(), 0.0, probs)
    if 0 < s.top_k < probs.numel():
        threshold = torch.topk(probs, s.top_k).values[-1]
        probs = torch.where(probs < threshold, 0.0, probs)
    if s.top_p < 1:
        ordered, order = probs.sort(descending=True)
        cumulative = ordered.cumsum(0) / ordered.sum()
        drop = cumulative - ordered / ordered.sum() >= s.top_p  # keep the smallest set reaching top_p
        drop[0] = False  # and always the most likely token (a top_p that is 0 in float32 keeps it alone)
        probs = probs.scatter(0, order[drop], 0.0)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def _token_logprob(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    top = ()
    if k:
        values, ids = torch.topk(logprobs, k)
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> list[Optional[TokenLogprob]]:
    """Each prompt token's logprob given the tokens before it (None for the first)."""
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return [None] + [_token_logprob(logprobs[i], prompt[i + 1], k) for i in range(len(prompt) - 1)]


def _generator(seed: Optional[int], device: Any) -> Optional[torch.Generator]:
    """A seeded row's own generator (an unseeded row draws from torch's global one)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _runs(indices: list[int]) -> list[slice]:
    """Sorted row indices as slices of consecutive rows: [0, 1, 2, 5, 6] -> [0:3, 5:7]."""
    runs: list[slice] = []
    for i in indices:
        if runs and runs[-1].stop == i:
            runs[-1] = slice(runs[-1].start, i + 1)
        else:
            runs.append(slice(i, i + 1))
    return runs


def _pad_left(t: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _grows_in_place(layer: Any, rows: int, width: int) -> bool:
    """Whether a cache layer can take ``rows`` more rows of ``width`` columns, or drop rows, in
    place (``cpu_decode.PreallocatedLayer`` with room to spare)."""
    has_room = getattr(layer, "has_room", None)
    return has_room is not None and has_room(rows, width)


def _hold(layer: Any, keys: list[torch.Tensor], values: list[torch.Tensor], width: int) -> None:
    """Give a cache layer new contents: the parts' rows stacked, each padded on the left to
    ``width`` columns (a layer that preallocates, ``cpu_decode.PreallocatedLayer``, copies them
    once, into room to grow)."""
    fill = getattr(layer, "fill", None)
    if fill is not None:
        fill(keys, values, width)
        return
    layer.keys = torch.cat([_pad_left(k, width - k.shape[-2], dim=2) for k in keys])
    layer.values = torch.cat([_pad_left(v, width - v.shape[-2], dim=2) for v in values])
