"""Continuous batching: requests join the running batch at the next decode step and leave it at once.

For engines that run the model in this process and can step it (``engine.running_batch()``: the
PyTorch CPU and GPU paths). Where the dynamic batcher runs a batch until every row has ended, so
that a request arriving meanwhile waits for the whole batch, here each iteration of ``run``
admits what waits (oldest first, up to ``max_batch_size`` rows and ``max_num_batched_tokens``
prompt tokens: a running row waits for one prefill of that size at most), runs one step in
which the running rows make a token each and the admitted rows' prompts their first (one
forward where the batch packs, else their prefill first), and cuts out the rows that ended (a
stop, ``max_tokens``, a client that left) before the next. Rows of any sampling settings share
the batch: each samples for itself. The queue, its limits, cancellation and shutdown are the dynamic batcher's.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Hashable

from rm_runner.config import Batching, ServerConfig
from rm_runner.errors import ConfigError
from rm_runner.server.batcher import DynamicBatcher, Job, conclude, deliver
from rm_runner.server.choice import Choice

if TYPE_CHECKING:  # running_batch imports torch: the server's module stays light to import
    from rm_runner.backends.running_batch import NewRow, RowSampling, RunningBatch, Token

log = logging.getLogger(__name__)


class ContinuousBatcher(DynamicBatcher):
    supports_logprobs = True

    def __init__(self, engine: Any, max_batch_size: int, max_queue: int, max_num_batched_tokens: int,
                 on_batch: Callable[[int], None] = lambda rows: None,
                 on_step: Callable[[float], None] = lambda seconds: None, burst_window_s: float = 0.0) -> None:
        super().__init__(engine, max_batch_size, 0.0, max_queue, on_batch)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.burst_window_s = burst_window_s
        self.on_step = on_step  # each decode step's time, in seconds (its rows go to on_batch)
        self._rows: dict[Hashable, tuple[Job, int, Choice]] = {}  # running rows by key: (id(job), index)

    def run(self) -> None:
        """Serve until ``close``; call it from the thread that should drive the model."""
        self._serving = True
        batch = self.engine.running_batch()
        try:
            while True:
                admitted = self._admit()
                if admitted is None:
                    return
                try:
                    new = self._new_rows(admitted) if admitted else []
                    if new and not batch.packs:  # prefilled apart, then stepped with the rest
                        self._deliver(batch.prefill(new), batch)
                        new = []
                    if len(batch) or new:
                        rows = len(batch) + len(new)
                        self.on_batch(rows)
                        self.stats.rows += rows
                        began = time.perf_counter()
                        tokens = batch.step(new)
                        self.on_step(time.perf_counter() - began)
                        self._deliver(tokens, batch)
                except Exception as exc:  # a failed step fails the requests it ran, not the server
                    log.exception("a step of %d sequences failed", len(batch))
                    self._fail(f"{type(exc).__name__}: {exc}")
                    batch = self.engine.running_batch()
        finally:
            self._serving = False

    def _admit(self) -> list[Job] | None:
        """The waiting jobs that join now (empty: none fit, or none wait while rows run); None
        once closed with nothing left running."""
        with self._cond:
            while not self._waiting and not self._rows and not self._closing:
                self._cond.wait()
            if not self._rows:
                self._gather_burst()
            self._drop_cancelled()
            if self._closing and not self._rows:
                return None
            admitted: list[Job] = []
            rows, tokens = len(self._rows), 0
            while self._waiting and not self._closing:
                job = self._waiting[0]
                cost = sum(len(p) for p in job.prompts) * job.n
                if rows + job.rows > self.max_batch_size or (admitted and tokens + cost > self.max_num_batched_tokens):
                    break
                self._waiting.popleft()
                admitted.append(job)
                rows, tokens = rows + job.rows, tokens + cost
            if admitted:
                self.stats.batches += 1
            self._running.extend(admitted)
            return admitted

    def _gather_burst(self) -> None:
        """An empty batch's first step waits for the requests that arrive with the first (a
        burst, a client's wave of concurrent requests) until none has come for
        ``burst_window_s`` (ten windows at most): they share that step, where otherwise all but
        the first would wait for it (sixteen at once on two cores: TTFT 1.35 s, not 1.2 s).
        Called holding the lock."""
        if self.burst_window_s <= 0:
            return
        limit, seen = time.perf_counter() + 10 * self.burst_window_s, -1
        while not self._closing and seen != len(self._waiting) and len(self._waiting) < self.max_batch_size:
            seen = len(self._waiting)
            remaining = min(self.burst_window_s, limit - time.perf_counter())
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _new_rows(self, jobs: list[Job]) -> list[NewRow]:
        from rm_runner.backends.running_batch import NewRow

        engine = self.engine
        new = []
        for job in jobs:
            job.choices = [Choice(engine.tokenizer, engine.eos_ids, job.max_tokens, job.ending)
                           for _ in range(job.rows)]
            if job.prompt_logprobs is not None:
                job.prompt_logprob_results = [[] for _ in job.prompts]
            for index, choice in enumerate(job.choices):
                key = (id(job), index)
                self._rows[key] = (job, index, choice)
                new.append(NewRow(key, job.prompts[index // job.n], row_sampling(job, index, engine.eos_ids)))
        return new

    def _deliver(self, tokens: list[Token], batch: RunningBatch) -> None:
        now = time.perf_counter()
        ended = set()
        for token in tokens:
            job, index, choice = self._rows[token.key]
            if token.prompt_logprobs is not None:
                job.prompt_logprob_results[index // job.n] = token.prompt_logprobs
            deliver(job, index, choice, token.token_id, now, token.logprob)
            if choice.finished:
                ended.add(token.key)
        batch.release(ended)
        for key in ended:
            self._end_row(key)

    def _end_row(self, key: Hashable) -> None:
        job, _, _ = self._rows.pop(key)
        if not any(k[0] == key[0] for k in self._rows):  # its last row
            with self._cond:
                self._running.remove(job)
            conclude(job)
            job.ended.set()

    def _fail(self, message: str) -> None:
        jobs = {id(job): job for job, _, _ in self._rows.values()}
        self._rows.clear()
        with self._cond:
            self._running = []
        for job in jobs.values():
            job.emit(("error", None, message))
            job.ended.set()


def row_sampling(job: Job, index: int, eos_ids: set[int]) -> RowSampling:
    """One row's sampling from its job's settings: the n rows of a seeded request each draw with
    a generator of their own (seed + row), so they differ from each other but not between runs."""
    from rm_runner.backends.running_batch import RowSampling

    s, ending = job.sampling, job.ending
    banned = tuple(sorted(set(ending.stop_token_ids) | (set() if ending.ignore_eos else set(eos_ids))))
    return RowSampling(params=s, seed=None if s.seed is None else s.seed + index % job.n, banned_early=banned,
                       logprobs=job.logprobs, prompt_logprobs=job.prompt_logprobs)


def batcher_for(engine: Any, settings: ServerConfig, on_batch: Callable[[int], None],
                on_step: Callable[[float], None]) -> DynamicBatcher:
    """The batcher ``server.batching`` asks for; continuous where the engine can step rows (auto)."""
    steps = engine.running_batch() is not None
    if settings.batching == Batching.continuous and not steps:
        raise ConfigError(f"server.batching=continuous needs an engine that runs the model in this process "
                          f"(engine=local on device=cpu or gpu in pytorch mode); engine={engine.name} runs "
                          "whole batches: use server.batching=dynamic or auto")
    if settings.batching == Batching.dynamic or not steps:
        return DynamicBatcher(engine, settings.max_batch_size or 16, settings.max_wait_ms / 1000,
                              settings.max_queue, on_batch=on_batch)
    return ContinuousBatcher(engine, settings.max_batch_size or 256, settings.max_queue,
                             settings.max_num_batched_tokens, on_batch=on_batch, on_step=on_step,
                             burst_window_s=settings.burst_window_ms / 1000)
