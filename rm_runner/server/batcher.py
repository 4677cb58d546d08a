"""Dynamic batching: requests that arrive together run through the engine as one batch.

API handlers ``submit`` jobs from the event loop's thread; ``run`` owns the engine and runs in
the thread that loaded the model (the main thread: PyTorch on the CPU keeps a thread pool per
calling thread, and a second thread driving the model costs a third of the speed on 2 cores). It takes
the oldest waiting job, gathers every compatible job (same sampling settings) that arrives
within ``max_wait_s`` of it, up to ``max_batch_size`` sequences, and runs them as one padded
batch through ``engine.generate_steps``. Each step's tokens go to their jobs' choices and out
to the handlers as events; a choice that hits a stop or its ``max_tokens``, or whose client
left, stops its row, and the batch ends when every row has. ``close`` (the server's shutdown
deadline) cuts what still runs: those jobs end with an "abort" event instead of "done".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rm_runner.requests import SamplingParams, TokenLogprob
from rm_runner.server.choice import Choice, Ending

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than ``server.max_queue`` allows (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests (HTTP 503)."""


# What a job tells its handler, from the model's thread: ("delta", index, (text, token_ids,
# logprobs, finish_reason)) when streamed (logprobs: a TokenLogprob per token id, or None when
# the job asked for none; finish_reason on the row's last token, else None), ("finish", index,
# reason) for a streamed row that ended without a token of its own, then ("done", None, None),
# ("error", None, message) when the engine failed, or ("abort", None, message) when the server's
# shutdown cut the job.
Event = tuple[str, Optional[int], Any]


@dataclass
class Job:
    """One API request: its prompts (token ids) times ``n`` choices, and where events go."""

    prompts: list[list[int]]
    n: int
    max_tokens: int
    sampling: SamplingParams
    emit: Callable[[Event], None]
    ending: Ending = Ending()
    # vLLM's logprobs: for each generated token its log-probability and this many alternatives
    # (0: the chosen token's only); None: none. ``prompt_logprobs`` the same over the prompt
    # (``echo``), in ``prompt_logprob_results`` (one list per prompt, None first: the first
    # token has no context) before the job's first event.
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    prompt_logprob_results: list[list[Optional[TokenLogprob]]] = field(default_factory=list)
    # Streamed jobs get every delta as it is made; the others only "done" (each wake-up of the
    # event loop costs the model thread time on a small machine).
    stream: bool = True
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    cut: bool = False  # cancelled by the server's shutdown, not by its client
    ended: threading.Event = field(default_factory=threading.Event)  # set when no row of it runs any more
    choices: list[Choice] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def cancel(self) -> None:
        """The client is gone: stop its rows at the next step, or drop it if still waiting."""
        self.cancelled.set()


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0


class DynamicBatcher:
    # Whether jobs may ask for logprobs (``Job.logprobs``, ``Job.prompt_logprobs``): a whole-batch
    # engine call returns tokens only.
    supports_logprobs = False

    def __init__(self, engine: Any, max_batch_size: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[int], None] = lambda rows: None) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._serving = False

    @property
    def alive(self) -> bool:
        return self._serving and not self._closing

    def waiting(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (server.max_queue={self.max_queue})")
            self._waiting.append(job)
            self._cond.notify()

    def close(self) -> None:
        """Refuse new jobs, cut the waiting and the running ones ("abort"); ``run`` returns after
        its batch. Closing again does nothing more."""
        with self._cond:
            self._closing = True
            waiting, self._waiting = list(self._waiting), deque()
            for job in self._running:
                job.cut = True
                job.cancel()
            self._cond.notify_all()
        for job in waiting:
            job.emit(("abort", None, "the server shut down before this request started"))
            job.ended.set()

    def _next_batch(self) -> list[Job]:
        with self._cond:
            while True:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                self._drop_cancelled()
                if self._closing:
                    return []
                if not self._waiting:
                    continue
                deadline = self._waiting[0].arrived + self.max_wait_s
                while not self._closing:
                    remaining = deadline - time.perf_counter()
                    if sum(j.rows for j in self._compatible()) >= self.max_batch_size or remaining <= 0:
                        break
                    self._cond.wait(remaining)
                    self._drop_cancelled()
                    if not self._waiting:
                        break
                picked = self._compatible()
                if not picked:
                    continue
                for job in picked:
                    self._waiting.remove(job)
                self._running = picked
                return picked

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.cancelled.is_set()]:
            self._waiting.remove(job)
            job.ended.set()

    def _compatible(self) -> list[Job]:
        """The oldest job and the later ones that can share its batch, in arrival order."""
        if not self._waiting:
            return []
        first = self._waiting[0]
        picked, rows = [first], first.rows
        for job in list(self._waiting)[1:]:
            if job.sampling == first.sampling and rows + job.rows <= self.max_batch_size:
                picked.append(job)
                rows += job.rows
        return picked

    def run(self) -> None:
        """Serve batches until ``close``; call it from the thread that should drive the model."""
        self._serving = True
        while True:
            batch = self._next_batch()
            if not batch:
                self._serving = False
                return
            try:
                self._run(batch)
            except Exception as exc:  # one failed batch fails its requests, not the server
                log.exception("batch of %d requests failed", len(batch))
                for job in batch:
                    job.emit(("error", None, f"{type(exc).__name__}: {exc}"))
            finally:
                with self._cond:
                    self._running = []
                for job in batch:
                    job.ended.set()

    def _run(self, batch: list[Job]) -> None:
        engine = self.engine
        rows: list[tuple[Job, int, Choice]] = []
        ids: list[list[int]] = []
        limits: list[int] = []
        for job in batch:
            job.choices = [Choice(engine.tokenizer, engine.eos_ids, job.max_tokens, job.ending)
                           for _ in range(job.rows)]
            for index, choice in enumerate(job.choices):
                rows.append((job, index, choice))
                ids.append(job.prompts[index // job.n])
                limits.append(job.max_tokens)
        self.stats.batches += 1
        self.stats.rows += len(rows)
        self.on_batch(len(rows))
        log.debug("batch: %d requests, %d sequences", len(batch), len(rows))

        def on_step(tokens: list[int]) -> list[bool]:
            now = time.perf_counter()
            for (job, index, choice), token in zip(rows, tokens):
                deliver(job, index, choice, token, now)
            return [choice.finished for _, _, choice in rows]

        engine.generate_steps(engine.request(ids, limits, batch[0].sampling), on_step)
        for job, index, choice in rows:  # rows the engine ended (its own limit) without us
            if not choice.finished:
                delta = choice.finish("length")
                if job.stream and delta:
                    job.emit(("delta", index, (delta, *choice.take_ids(), choice.finish_reason)))
                elif job.stream:
                    job.emit(("finish", index, choice.finish_reason))
        for job in batch:
            conclude(job)


def deliver(job: Job, index: int, choice: Choice, token: int, now: float,
            logprob: Optional[TokenLogprob] = None) -> None:
    """One new token of a job's row: into its choice, and out to the handler as it streams. A
    cancelled job's row ends here, as "cancelled"."""
    if job.cancelled.is_set():
        choice.finish("cancelled")
    elif not choice.finished:
        job.first_token_at = job.first_token_at or now
        delta = choice.add(token, logprob)
        if job.stream:  # a chunk per token, text or not (a special token, half a character), the
            # last one with its finish reason, as vLLM's
            job.emit(("delta", index, (delta, *choice.take_ids(), choice.finish_reason if choice.finished else None)))


def conclude(job: Job) -> None:
    """Every row of the job has ended: "done", or "abort" where the server's shutdown cut it."""
    if job.cut and any(c.finish_reason == "cancelled" for c in job.choices):
        job.emit(("abort", None, "the server shut down before this request finished (server.shutdown_timeout_s)"))
    else:
        job.emit(("done", None, None))
