"""An lm-evaluation-harness model over an rm_runner engine: lm-eval's own tasks, metrics and
few-shot machinery, scoring and generation on the run's device, with no HTTP in between.

lm-eval's ``TemplateLM`` does the tokenizing of (context, continuation) pairs; this class asks
the engine for what it cannot: the log-probabilities of given tokens (``Engine.score``, a
prefill's raw logits, for ``loglikelihood`` and ``loglikelihood_rolling``) and greedy or sampled
text cut at the task's stop strings (``Engine.generate_steps`` with a stop-string ``Choice``, for
``generate_until``), ``batch_size`` rows at a time. lm-eval hands over every task's requests of
one kind at once; they are run task by task, each with its own progress bar and its time kept
(``task_time_s``), so a slow task shows as it runs and in ``eval.json``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from lm_eval.api.model import TemplateLM
from tqdm.auto import tqdm

from rm_runner.errors import ConfigError
from rm_runner.requests import SamplingParams


class EngineLM(TemplateLM):
    """``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` through ``engine``."""

    def __init__(self, engine: Any, batch_size: int = 8, max_gen_toks: int = 256) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {batch_size}")
        self.engine, self.batch_size, self.max_gen_toks = engine, batch_size, max_gen_toks
        self.tokenizer = engine.tokenizer
        self.max_length = engine.max_model_len
        self.task_time_s: dict[str, float] = {}
        self._bar: Optional[tqdm] = None  # the running task's bar, advanced by the batches

    def _by_task(self, kind: str, requests: list[Any], run: Callable[[list[Any]], list[Any]],
                 disable_tqdm: bool) -> list[Any]:
        """``run`` over each task's requests in turn (answers back in lm-eval's order)."""
        answers: list[Any] = [None] * len(requests)
        tasks: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            tasks.setdefault(request.task_name or "requests", []).append(i)  # lm-eval's Instance
        for task, indices in tasks.items():
            began = time.perf_counter()
            self._bar = tqdm(total=len(indices), desc=f"{task} ({kind})", unit="req", disable=disable_tqdm)
            try:
                for i, answer in zip(indices, run([requests[i] for i in indices])):
                    answers[i] = answer
            finally:
                self._bar.close()
                self._bar = None
            self.task_time_s[task] = self.task_time_s.get(task, 0.0) + time.perf_counter() - began
        return answers

    def _advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._by_task("loglikelihood", requests, lambda mine: super(EngineLM, self).loglikelihood(
            mine, disable_tqdm=True), disable_tqdm)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context stands on: the BOS where the model has one, as lm-eval's HFLM does.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _scores(self, rows: list[list[int]]) -> list[list[Any]]:
        """Each row's per-token logprobs (``Engine.score``), ``batch_size`` rows at a time."""
        out: list[list[Any]] = []
        for start in range(0, len(rows), self.batch_size):
            out.extend(self.engine.score(rows[start:start + self.batch_size]))
        return out

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """The continuation's summed logprob given the context (the context cut on the left to fit
        the model), and whether each of its tokens was the likeliest there (greedy)."""
        rows, lengths = [], []
        for (_, _), context, continuation in requests:
            if not continuation:
                raise ConfigError("an lm-eval request has an empty continuation; the task's doc_to_choice or "
                                  "target gives nothing to score")
            if len(continuation) >= self.max_length:
                raise ConfigError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                                  f"{self.max_length} ({self.engine.max_model_len_option})")
            rows.append((context + continuation)[-self.max_length:])
            lengths.append(len(continuation))
        results = []
        for start in range(0, len(rows), self.batch_size):
            for scored, n in zip(self._scores(rows[start:start + self.batch_size]), lengths[start:]):
                tail = scored[-n:]
                results.append((sum(t.logprob for t in tail), all(t.top and t.top[0][0] == t.token_id for t in tail)))
            self._advance(len(rows[start:start + self.batch_size]))
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """A whole text's logprob: windows of the model's length, each token scored once."""
        return self._by_task("loglikelihood_rolling", requests, self._rolling, disable_tqdm)

    def _rolling(self, requests: list[Any]) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        rows, spans = [], []
        for (text,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            spans.append(len(windows))
            for context, predicted in windows:
                rows.append(((context + predicted)[-self.max_length:], len(predicted)))
        scored = self._scores([r for r, _ in rows])
        totals, at = [], 0
        for count in spans:
            totals.append(sum(sum(t.logprob for t in scored[at + i][-rows[at + i][1]:]) for i in range(count)))
            at += count
        self._advance(len(requests))
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, cut before the first of its ``until`` strings, requests of
        equal settings batched together."""
        return self._by_task("generate_until", requests, self._generate, disable_tqdm)

    def _generate(self, requests: list[Any]) -> list[str]:
        from rm_runner.server.choice import Choice, Ending

        answers: list[str] = [""] * len(requests)
        groups: dict[tuple[SamplingParams, tuple[str, ...], int], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._settings(r.args[1]), []).append(i)
        for (sampling, until, max_gen), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen):] for i in chunk]
                choices = [Choice(self.tokenizer, self.engine.eos_ids, max_gen, Ending(stop=until)) for _ in chunk]

                def on_step(tokens: list[int]) -> list[bool]:
                    for choice, token in zip(choices, tokens):
                        if not choice.finished:
                            choice.add(token)
                    return [c.finished for c in choices]

                self.engine.generate_steps(self.engine.request(prompts, max_gen, sampling), on_step)
                for i, choice in zip(chunk, choices):
                    if not choice.finished:
                        choice.finish("length")
                    answers[i] = choice.text
                self._advance(len(chunk))
        return answers

    def _settings(self, gen_kwargs: dict[str, Any]) -> tuple[SamplingParams, tuple[str, ...], int]:
        """A task's generation_kwargs as (sampling, stop strings, max new tokens): equal ones batch together."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = (until,) if isinstance(until, str) else tuple(until)
        max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
        known = {k: kwargs.pop(k) for k in ("top_p", "top_k", "seed") if k in kwargs}
        if kwargs:
            raise ConfigError(f"a task's generation_kwargs {sorted(kwargs)} are not supported here (until, "
                              "max_gen_toks, do_sample, temperature, top_p, top_k, seed are)")
        sampling = SamplingParams(temperature=temperature if sample or temperature > 0 else 0.0,
                                  top_p=float(known.get("top_p", 1.0)), top_k=int(known.get("top_k") or 0),
                                  seed=known.get("seed"))
        return sampling, until, max_gen
