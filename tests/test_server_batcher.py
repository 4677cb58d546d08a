"""The dynamic batcher on a real engine (the tiny random model on the CPU backend, in-process)."""

from __future__ import annotations

import queue
import threading

import pytest

from rm_runner.requests import Request
from rm_runner.server.batcher import DynamicBatcher, Job, QueueFull, Sampling, ShuttingDown
from rm_runner.server.choice import Choice

GREEDY = Sampling(False, None, None, None, None, False)


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


def job(engine, prompt: str, max_tokens: int = 6, sampling: Sampling = GREEDY, n: int = 1,
        stop: list[str] | None = None) -> tuple[Job, "queue.Queue"]:
    events: queue.Queue = queue.Queue()
    ids = engine.render(Request(id="t", prompt=prompt, chat_template=False))
    return Job(prompts=[ids], n=n, max_tokens=max_tokens, sampling=sampling, stop=stop or [], emit=events.put), events


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
            texts[index] = texts.get(index, "") + value
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
    sampled = Sampling(True, 0.8, 1.0, None, 3, False)
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
    choice = Choice(tok, engine.eos_ids, max_tokens=10, stop=["three"])
    sent = [choice.add(i) for i in ids]
    assert "".join(sent) == tok.decode(ids[:2], skip_special_tokens=True) + " "
    assert choice.finish_reason == "stop" and choice.text.endswith("two ")
    eos = Choice(tok, engine.eos_ids, max_tokens=10, stop=[])
    eos.add(ids[0])
    eos.add(next(iter(engine.eos_ids)))
    assert eos.finish_reason == "stop" and len(eos.token_ids) == 2
