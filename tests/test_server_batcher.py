"""The dynamic batcher on a real engine (the tiny random model on the CPU backend, in-process)."""

from __future__ import annotations

import queue
import threading

import pytest

from rm_runner.backends.hf_generate import generate_kwargs
from rm_runner.requests import GenerationRequest, Request, SamplingParams
from rm_runner.server.batcher import DynamicBatcher, Job, QueueFull, ShuttingDown
from rm_runner.server.choice import Choice, Ending

GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def engine():
    from rm_runner.backends.cpu import CPUBackend
    from rm_runner.config import ModelConfig
    from rm_runner.engines.local import LocalEngine
    from rm_runner.models.tiny_random import TinyRandom

    engine = LocalEngine(CPUBackend())
    engine.start()
    engine.load_model(TinyRandom().resolve(), ModelConfig(name="tiny-random", source=None))
    yield engine
    engine.stop()


def job(engine, prompt: str, max_tokens: int = 6, sampling: SamplingParams = GREEDY, n: int = 1,
        stop: list[str] | None = None) -> tuple[Job, "queue.Queue"]:
    events: queue.Queue = queue.Queue()
    ids = engine.render(Request(id="t", prompt=prompt, chat_template=False))
    return Job(prompts=[ids], n=n, max_tokens=max_tokens, sampling=sampling, ending=Ending(stop=tuple(stop or ())),
               emit=events.put), events


def drain(batcher: DynamicBatcher, jobs: list[Job]) -> None:
    """Run the batcher in this (the model's) thread until every job has ended."""
    def close_when_done() -> None:
        for j in jobs:
            j.ended.wait()
        batcher.close()

    closer = threading.Thread(target=close_when_done)
    closer.start()
    batcher.run()
    closer.join()


def collect(events: queue.Queue) -> tuple[dict[int, str], dict[int, str]]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    while True:
        kind, index, value = events.get(timeout=60)
        if kind == "delta":
            texts[index] = texts.get(index, "") + value[0]
            if value[3] is not None:  # the row's last token carries its finish reason
                finish[index] = value[3]
        elif kind == "finish":
            finish[index] = value
        elif kind == "done":
            return texts, finish
        else:
            raise AssertionError(value)


def test_waiting_jobs_share_one_batch_and_match_offline(engine) -> None:
    from rm_runner.config import GenerationConfig

    batcher = DynamicBatcher(engine, max_batch_size=8, max_wait_s=0.0, max_queue=8)
    jobs = [job(engine, p, max_tokens=m) for p, m in (("a b c", 6), ("d e", 3), ("f", 5))]
    for j, _ in jobs:
        batcher.submit(j)  # all waiting before the worker starts: one batch
    drain(batcher, [j for j, _ in jobs])
    results = [collect(events) for _, events in jobs]
    assert batcher.stats.batches == 1 and batcher.stats.rows == 3
    offline = engine.infer([Request(id=str(i), prompt=p, chat_template=False) for i, p in enumerate(["a b c", "d e", "f"])],
                           GenerationConfig(max_new_tokens=6, ignore_eos=True))
    for (j, _), (texts, finish), done in zip(jobs, results, offline):
        assert len(j.choices[0].token_ids) == j.max_tokens  # each row stops at its own max_tokens
        assert j.choices[0].token_ids == done.token_ids[: j.max_tokens]
        assert finish == {0: "length"} and texts[0] == j.choices[0].text


def test_different_sampling_runs_in_separate_batches(engine) -> None:
    batcher = DynamicBatcher(engine, max_batch_size=8, max_wait_s=0.0, max_queue=8)
    sampled = SamplingParams(temperature=0.8, seed=3)
    jobs = [job(engine, "a b"), job(engine, "c d", sampling=sampled), job(engine, "e f")]
    for j, _ in jobs:
        batcher.submit(j)
    drain(batcher, [j for j, _ in jobs])
    [collect(events) for _, events in jobs]
    assert batcher.stats.batches == 2 and batcher.stats.rows == 3


def test_full_queue_and_shutdown_refuse_new_jobs(engine) -> None:
    batcher = DynamicBatcher(engine, max_batch_size=8, max_wait_s=0.0, max_queue=1)
    first, events = job(engine, "a")
    batcher.submit(first)
    with pytest.raises(QueueFull, match="max_queue=1"):
        batcher.submit(job(engine, "b")[0])
    drain(batcher, [first])
    assert collect(events)[1] == {0: "length"}
    with pytest.raises(ShuttingDown):
        batcher.submit(job(engine, "c")[0])


def test_choice_holds_back_text_that_may_start_a_stop_string(engine) -> None:
    tok = engine.tokenizer
    ids = tok("one two three four", add_special_tokens=False)["input_ids"]
    choice = Choice(tok, engine.eos_ids, max_tokens=10, ending=Ending(stop=("three",)))
    sent = [choice.add(i) for i in ids]
    assert "".join(sent) == tok.decode(ids[:2], skip_special_tokens=True) + " "
    assert choice.finish_reason == "stop" and choice.text.endswith("two ")
    eos = Choice(tok, engine.eos_ids, max_tokens=10)
    eos.add(ids[0])
    eos.add(next(iter(engine.eos_ids)))
    assert eos.finish_reason == "stop" and len(eos.token_ids) == 2


def test_penalties_and_min_p_reach_generate_and_part_batches(engine) -> None:
    """repetition_penalty and min_p are generate() keywords for the whole batch: rows that differ
    in them run apart, and they change what is generated."""
    penalised = SamplingParams(repetition_penalty=1.5)
    top_only = SamplingParams(temperature=1.0, seed=5, min_p=1.0)  # keeps the most likely token alone
    def kwargs(sampling: SamplingParams) -> dict:
        return generate_kwargs(GenerationRequest.of([[1]], 4, sampling))

    assert kwargs(penalised)["repetition_penalty"] == 1.5
    assert kwargs(top_only)["min_p"] == 1.0
    assert kwargs(SamplingParams(min_tokens=3))["min_new_tokens"] == 3
    assert not {"repetition_penalty", "min_p", "min_new_tokens"} & set(kwargs(GREEDY))
    batcher = DynamicBatcher(engine, max_batch_size=8, max_wait_s=0.0, max_queue=8)
    jobs = [job(engine, "one two one two", max_tokens=16, sampling=s) for s in (GREEDY, penalised, top_only, GREEDY)]
    for j, _ in jobs:
        batcher.submit(j)
    drain(batcher, [j for j, _ in jobs])
    [collect(events) for _, events in jobs]
    assert batcher.stats.batches == 3  # the two greedy jobs together, the others alone
    greedy, penalty, min_p, again = (j.choices[0].token_ids for j, _ in jobs)
    assert greedy == again == min_p and penalty != greedy


def test_close_cuts_running_and_waiting_jobs_with_an_abort(engine) -> None:
    batcher = DynamicBatcher(engine, max_batch_size=1, max_wait_s=0.0, max_queue=8)
    long = SamplingParams(ignore_eos=True)
    running, running_events = job(engine, "go on", max_tokens=1900, sampling=long)
    waiting, waiting_events = job(engine, "later", max_tokens=4)
    batcher.submit(running)
    batcher.submit(waiting)

    def close_once_running() -> None:
        kind, _, _ = running_events.get(timeout=60)  # its first delta: the batch runs
        assert kind == "delta"
        batcher.close()

    closer = threading.Thread(target=close_once_running)
    closer.start()
    batcher.run()  # returns once closed
    closer.join()
    events = []
    while not running_events.empty():
        events.append(running_events.get())
    assert events[-1][0] == "abort" and "shut down" in events[-1][2]
    assert len(running.choices[0].token_ids) < 1900 and running.choices[0].finish_reason == "cancelled"
    assert waiting_events.get(timeout=5)[0] == "abort" and waiting.ended.is_set()


def test_a_streamed_token_without_text_still_gets_its_chunk(engine) -> None:
    """As vLLM streams: every token is a chunk, text or not (a skipped special token here), so a
    client's time to first token is the first token's, not the first text's."""
    from rm_runner.server.batcher import deliver

    j, events = job(engine, "a b", max_tokens=4)
    j.ending = Ending(ignore_eos=True)
    choice = Choice(engine.tokenizer, engine.eos_ids, j.max_tokens, j.ending)
    special = next(iter(engine.eos_ids))  # EOS, ignored: skipped by the decode, so it adds no text
    deliver(j, 0, choice, special, now=0.0)
    assert events.get_nowait() == ("delta", 0, ("", [special], None, None))
