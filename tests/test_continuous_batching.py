"""Continuous batching on a real engine (the tiny random model on the CPU backend, in-process):
rows join at the next step and leave at once, outputs equal the offline batch's, seeded rows
draw alike in any batch, logprobs are the model's."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from rm_runner.config import GenerationConfig
from rm_runner.requests import Request, SamplingParams
from rm_runner.server.batcher import Job
from rm_runner.server.choice import Ending
from rm_runner.server.continuous import ContinuousBatcher
from tests.test_server_batcher import GREEDY, collect, engine, job  # noqa: F401  (engine: a fixture)

LONG = SamplingParams(ignore_eos=True)  # greedy, EOS ignored: runs to max_tokens


def batcher_of(engine, **kwargs) -> ContinuousBatcher:
    return ContinuousBatcher(engine, **{"max_batch_size": 8, "max_queue": 8, "max_num_batched_tokens": 2048, **kwargs})


def serve(batcher: ContinuousBatcher, driver) -> None:
    """Run the batcher here (the model's thread) while ``driver`` submits and waits in another
    thread; close once the driver is done."""
    failure: list[BaseException] = []

    def drive() -> None:
        try:
            driver()
        except BaseException as exc:  # reported from the test's thread
            failure.append(exc)
        finally:
            batcher.close()

    thread = threading.Thread(target=drive)
    thread.start()
    batcher.run()
    thread.join()
    if failure:
        raise failure[0]


def first_event(events: queue.Queue, timeout: float = 60.0) -> tuple:
    """Wait for the stream's first event and leave it where it is, at the front: collect() reads
    the stream in order (putting it back at the end would reorder it behind later deltas)."""
    with events.not_empty:
        if not events.not_empty.wait_for(lambda: len(events.queue) > 0, timeout):
            raise AssertionError(f"no event within {timeout} s")
        return events.queue[0]


def test_staggered_arrivals_join_the_running_batch_and_match_offline(engine) -> None:
    """A request that arrives while another runs joins at the next step and ends long before it;
    every row's tokens are the offline batch's, token for token."""
    prompts = ["a b c d", "e f", "g h i"]
    limits = [40, 6, 9]
    batcher = batcher_of(engine)
    jobs = [job(engine, p, max_tokens=m, sampling=LONG) for p, m in zip(prompts, limits)]
    seen_when_done: list[int] = []

    def driver() -> None:
        batcher.submit(jobs[0][0])
        first_event(jobs[0][1])  # the first row runs
        for j, _ in jobs[1:]:
            batcher.submit(j)
        for j, _ in jobs[1:]:
            j.ended.wait(60)
        seen_when_done.append(len(jobs[0][0].choices[0].token_ids))
        jobs[0][0].ended.wait(60)

    serve(batcher, driver)
    assert seen_when_done[0] < limits[0]  # the late ones did not wait for the long row to end
    offline = engine.infer([Request(id=str(i), prompt=p, chat_template=False) for i, p in enumerate(prompts)],
                           GenerationConfig(max_new_tokens=max(limits), ignore_eos=True))
    for (j, events), done, limit in zip(jobs, offline, limits):
        texts, finish = collect(events)
        assert j.choices[0].token_ids == done.token_ids[:limit]
        assert finish == {0: "length"} and texts[0] == j.choices[0].text


def test_a_seeded_request_draws_the_same_tokens_alone_and_in_a_batch(engine) -> None:
    seeded = SamplingParams(temperature=1.0, seed=11)
    alone, _ = job(engine, "one two", max_tokens=12, sampling=seeded)
    batcher = batcher_of(engine)
    serve(batcher, lambda: (batcher.submit(alone), alone.ended.wait(60)))
    together = [job(engine, "one two", max_tokens=12, sampling=s) for s in (GREEDY, seeded, seeded)]
    batcher = batcher_of(engine)

    def driver() -> None:
        for j, _ in together:
            batcher.submit(j)
        for j, _ in together:
            j.ended.wait(60)

    serve(batcher, driver)
    mine = alone.choices[0].token_ids
    assert together[1][0].choices[0].token_ids == together[2][0].choices[0].token_ids == mine
    other = SamplingParams(temperature=1.0, seed=12)  # another seed draws otherwise: the seed counts
    two, _ = job(engine, "one two", max_tokens=12, sampling=other, n=2)
    batcher = batcher_of(engine)
    serve(batcher, lambda: (batcher.submit(two), two.ended.wait(60)))
    assert two.choices[0].token_ids != mine and two.choices[0].token_ids != two.choices[1].token_ids


def test_a_cancelled_row_leaves_at_the_next_step(engine) -> None:
    batcher = batcher_of(engine)
    staying, staying_events = job(engine, "stay here", max_tokens=30, sampling=LONG)
    leaving, leaving_events = job(engine, "go away", max_tokens=1000, sampling=LONG)
    sizes: list[int] = []
    batcher.on_batch = sizes.append

    def driver() -> None:
        batcher.submit(staying)
        batcher.submit(leaving)
        first_event(leaving_events)
        leaving.cancel()
        leaving.ended.wait(60)
        staying.ended.wait(60)

    serve(batcher, driver)
    assert leaving.choices[0].finish_reason == "cancelled" and len(leaving.choices[0].token_ids) < 30
    assert staying.choices[0].finish_reason == "length" and len(staying.choices[0].token_ids) == 30
    assert sizes[-1] == 1  # the last steps ran the staying row alone
    assert leaving_events.queue[-1][0] == "done"


def test_arrivals_run_inside_the_step_where_the_batch_packs(engine) -> None:
    """On the CPU path a request's prompt runs in a step with the running rows, not in a prefill
    of its own: three tokens take three steps (prefilled apart: a prefill and two steps)."""
    assert engine.running_batch().packs
    batcher = batcher_of(engine)
    steps: list[float] = []
    sizes: list[int] = []
    batcher.on_step, batcher.on_batch = steps.append, sizes.append
    first, _ = job(engine, "a b c", max_tokens=3, sampling=LONG)
    second, _ = job(engine, "d e", max_tokens=3, sampling=LONG)
    batcher.submit(first)
    batcher.submit(second)
    serve(batcher, lambda: (first.ended.wait(60), second.ended.wait(60)))
    assert len(steps) == 3 and sizes == [2, 2, 2]
    assert len(first.choices[0].token_ids) == len(second.choices[0].token_ids) == 3


def test_requests_that_arrive_together_share_an_empty_batchs_first_step(engine) -> None:
    """Requests a few ms apart, to an idle server, start in one step (before: the first alone,
    the others waiting for its step); once rows run, an arrival waits for no window."""
    batcher = batcher_of(engine, burst_window_s=0.5)  # wide, so a loaded machine's late thread still lands in it
    sizes: list[int] = []
    batcher.on_batch = sizes.append
    jobs = [job(engine, text, max_tokens=3, sampling=LONG)[0] for text in ("a b", "c d", "e f")]

    def arrive() -> None:
        for j in jobs:
            batcher.submit(j)
            time.sleep(0.01)  # a burst's spacing (the HTTP thread's work per request), not a wait for anything
        for j in jobs:
            j.ended.wait(60)

    serve(batcher, arrive)
    assert sizes == [3, 3, 3]


def test_the_token_budget_spreads_prefills_over_steps(engine) -> None:
    """With room for one prompt's tokens per step, two waiting requests join one step apart."""
    batcher = batcher_of(engine, max_num_batched_tokens=4)
    a, _ = job(engine, "a b c", max_tokens=4, sampling=LONG)
    b, _ = job(engine, "d e f", max_tokens=4, sampling=LONG)
    batcher.submit(a)
    batcher.submit(b)
    serve(batcher, lambda: (a.ended.wait(60), b.ended.wait(60)))
    assert batcher.stats.batches == 2  # two admissions; budget 2048: one
    assert len(a.choices[0].token_ids) == len(b.choices[0].token_ids) == 4


def test_close_cuts_running_rows_with_an_abort(engine) -> None:
    batcher = batcher_of(engine)
    running, events = job(engine, "go on", max_tokens=1900, sampling=LONG)

    def driver() -> None:
        batcher.submit(running)
        first_event(events)

    serve(batcher, driver)  # closes as soon as the row runs
    kinds = [kind for kind, _, _ in list(events.queue)]
    assert kinds[-1] == "abort" and running.choices[0].finish_reason == "cancelled"
    assert running.ended.is_set() and batcher.running() == 0


def test_min_tokens_keeps_stop_tokens_out_of_the_first_tokens(engine) -> None:
    """vLLM's min_tokens: EOS and stop_token_ids are not generated before min_tokens tokens."""
    plain, _ = job(engine, "a b", max_tokens=8, sampling=LONG)
    batcher = batcher_of(engine)
    serve(batcher, lambda: (batcher.submit(plain), plain.ended.wait(60)))
    first = plain.choices[0].token_ids[0]
    stopped = Job(prompts=plain.prompts, n=1, max_tokens=8, sampling=GREEDY, emit=lambda e: None,
                  ending=Ending(stop_token_ids=(first,)))
    held = Job(prompts=plain.prompts, n=1, max_tokens=8, sampling=SamplingParams(min_tokens=3),
               emit=lambda e: None, ending=Ending(stop_token_ids=(first,), min_tokens=3))
    batcher = batcher_of(engine)
    serve(batcher, lambda: [(batcher.submit(j), j.ended.wait(60)) for j in (stopped, held)])
    assert stopped.choices[0].token_ids == [first] and stopped.choices[0].finish_reason == "stop"
    assert first not in held.choices[0].token_ids[:3] and len(held.choices[0].token_ids) >= 3


def test_logprobs_are_the_models_own(engine) -> None:
    """Generated and prompt logprobs equal a plain forward pass's log-softmax; alternatives come
    best first, and the chosen greedy token is the best one."""
    j, events = job(engine, "a b c", max_tokens=3, sampling=LONG)
    j.logprobs, j.prompt_logprobs = 2, 1
    batcher = batcher_of(engine)
    serve(batcher, lambda: (batcher.submit(j), j.ended.wait(60)))
    choice = j.choices[0]
    ids = j.prompts[0] + choice.token_ids
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)
    prompt = j.prompt_logprob_results[0]
    assert prompt[0] is None and len(prompt) == len(j.prompts[0])
    for i, entry in enumerate(prompt[1:], start=1):
        assert entry.token_id == ids[i] and entry.logprob == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
        assert len(entry.top) == 1
    assert [lp.token_id for lp in choice.logprobs] == choice.token_ids
    for step, lp in enumerate(choice.logprobs):
        at = len(j.prompts[0]) - 1 + step
        assert lp.logprob == pytest.approx(float(expected[at, lp.token_id]), abs=1e-4)
        assert len(lp.top) == 2 and lp.top[0][0] == lp.token_id and lp.top[0][1] >= lp.top[1][1]
    streamed = [value[2] for kind, _, value in list(events.queue) if kind == "delta"]
    assert [lp for chunk in streamed for lp in chunk] == choice.logprobs


def test_the_smallest_top_p_keeps_the_most_likely_token(engine) -> None:
    """top_p=5e-324 is valid (above 0) but 0 in float32: the row samples its best token, as greedy."""
    greedy, _ = job(engine, "a b", max_tokens=6, sampling=LONG)
    sampled, _ = job(engine, "a b", max_tokens=6, sampling=SamplingParams(temperature=1.0, top_p=5e-324, seed=3, ignore_eos=True))
    batcher = batcher_of(engine)
    serve(batcher, lambda: [(batcher.submit(j), j.ended.wait(60)) for j in (greedy, sampled)])
    assert sampled.choices[0].token_ids == greedy.choices[0].token_ids


def test_batching_follows_what_the_engine_can_do(engine) -> None:
    """auto: continuous (256 rows) where the engine steps rows, dynamic (16) where it cannot;
    continuous asked of an engine that cannot is a ConfigError naming the option."""
    from rm_runner.backends.cpu import CPUBackend
    from rm_runner.config import Batching, ServerConfig
    from rm_runner.engines.local import LocalEngine
    from rm_runner.errors import ConfigError
    from rm_runner.server.batcher import DynamicBatcher
    from rm_runner.server.continuous import batcher_for

    def made(e, **settings):
        return batcher_for(e, ServerConfig(**settings), on_batch=lambda rows: None, on_step=lambda s: None)

    stepping = made(engine)
    assert isinstance(stepping, ContinuousBatcher) and stepping.max_batch_size == 256
    whole = LocalEngine(CPUBackend())  # no model loaded: nothing to step
    fallback = made(whole)
    assert type(fallback) is DynamicBatcher and fallback.max_batch_size == 16
    assert type(made(engine, batching=Batching.dynamic)) is DynamicBatcher
    with pytest.raises(ConfigError, match="server.batching=continuous needs"):
        made(whole, batching=Batching.continuous)
