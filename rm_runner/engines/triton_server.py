"""The Triton Inference Server side of ``engine=triton``: run by rm_runner in the PyTriton venv.

``python -m rm_runner.engines.triton_server SPEC.json`` builds the selected device's backend
in this process, prepares the model on it, and binds it as a Triton model with dynamic
batching (PyTriton bundles the tritonserver binary). Requests carry a ``GenerationRequest``: a
left-padded batch of token ids, and per row its max_new_tokens, its sampling settings (JSON) and
the EOS ids; the answer is each row's new tokens (-1 pads them). A second,
decoupled model (``<name>_stream``) answers the same request with one response per decoding
step, each holding every row's new token (Triton's streaming, over gRPC). SIGINT stops it.

A stream's rows end on the server as soon as they end for its client: at the EOS ids the request
names (unless it ignores EOS), and where the client says so through a third model, ``<name>_stop``
(``stream_id`` + ``rows``; -1 = all), for a stop string or a client that left. PyTriton 0.7 does
not hand Triton's request cancellation to the model, so closing the gRPC stream alone would not.

Every ``generate()`` runs on one thread (``ModelThread``), whichever Triton model asked: PyTorch
on the CPU keeps a thread pool per calling thread, and two of them cost a third of the speed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import sysconfig
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

log = logging.getLogger("rm_runner.triton_server")

ALL_ROWS = -1  # in a stop request: every row of the stream


def requests_of(input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: np.ndarray, sampling: np.ndarray,
                eos_ids: np.ndarray, pad_token_id: int) -> list[tuple[list[int], Any]]:
    """The rows of a (dynamically merged) Triton batch as ``GenerationRequest``s, rows of equal
    settings together: (row numbers, request) each. The inverse of ``TritonClient._arrays``."""
    from rm_runner.requests import GenerationRequest, SamplingParams

    groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for row in range(len(input_ids)):
        eos = tuple(sorted({int(t) for t in eos_ids[row] if t >= 0}))
        groups.setdefault((_text(sampling[row, 0]), eos), []).append(row)
    out = []
    for (settings, eos), rows in groups.items():
        prompts = [input_ids[r][attention_mask[r].astype(bool)].tolist() for r in rows]
        out.append((rows, GenerationRequest.of(prompts, [int(max_new_tokens[r, 0]) for r in rows],
                                               SamplingParams(**json.loads(settings)), eos, pad_token_id)))
    return out


class StreamStops:
    """Rows of streams that their clients ended (``<model>_stop`` writes, a running stream's
    criteria read every step). A stop for a stream not running yet is kept for when it starts
    (the last ``remember`` of them: it may also come just after its stream ended)."""

    def __init__(self, remember: int = 256) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, set[int]] = {}
        self._early: OrderedDict[str, set[int]] = OrderedDict()
        self._remember = remember

    def start(self, stream: str) -> None:
        with self._lock:
            self._running[stream] = self._early.pop(stream, set())

    def stop(self, stream: str, rows: Iterable[int]) -> bool:
        """Record ``rows`` (``ALL_ROWS``: all) as ended; True when the stream is running."""
        with self._lock:
            if stream in self._running:
                self._running[stream].update(rows)
                return True
            self._early.setdefault(stream, set()).update(rows)
            self._early.move_to_end(stream)
            while len(self._early) > self._remember:
                self._early.popitem(last=False)
            return False

    def stopped(self, stream: str, rows: int) -> list[bool]:
        with self._lock:
            ended = self._running.get(stream, set())
            return [ALL_ROWS in ended or row in ended for row in range(rows)]

    def end(self, stream: str) -> None:
        with self._lock:
            self._running.pop(stream, None)


class ModelThread:
    """Runs callables one at a time on a thread of its own; callers wait for their result."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="rm-runner-model", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, answer = self.jobs.get()
            try:
                answer.put((True, fn()))
            except BaseException as exc:  # handed to the caller
                answer.put((False, exc))

    def run(self, fn: Callable[[], Any]) -> Any:
        answer: queue.Queue = queue.Queue(maxsize=1)
        self.jobs.put((fn, answer))
        ok, value = answer.get()
        if not ok:
            raise value
        return value


def make_infer(backend: Any, model: Any, pad_token_id: int, thread: ModelThread):
    from pytriton.decorators import batch

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        # Requests merged by the dynamic batcher may differ in settings: one generate() per kind.
        outputs: list[list[int]] = [[] for _ in range(len(inputs["input_ids"]))]
        for rows, request in requests_of(**inputs, pad_token_id=pad_token_id):
            for row, tokens in zip(rows, thread.run(lambda: backend.generate(model, request))):
                outputs[row] = tokens
        width = max((len(o) for o in outputs), default=0)
        return {"new_tokens": np.array([o + [-1] * (width - len(o)) for o in outputs], dtype=np.int64)}

    return infer


def make_stream_infer(backend: Any, model: Any, pad_token_id: int, thread: ModelThread, stops: StreamStops):
    """The decoupled model: one response per decoding step, ``tokens`` = each row's new token.

    A row ends at its request's EOS ids or once ``stops`` says its client ended it; generation
    ends when every row has, and the log says after how many steps.
    """
    from pytriton.decorators import batch

    @batch
    def infer(stream_id: np.ndarray, **inputs: np.ndarray):
        (_, request), *more = requests_of(**inputs, pad_token_id=pad_token_id)
        if more:
            raise ValueError("a stream's rows share one sampling setting (one client request)")
        stream = _text(stream_id[0, 0])
        rows = len(request.prompts)
        steps: queue.Queue = queue.Queue()
        ran = [0]

        def on_step(tokens: list[int]) -> list[bool]:
            ran[0] += 1
            steps.put(np.array(tokens, dtype=np.int64))
            return stops.stopped(stream, rows)

        def generate() -> None:
            try:
                backend.generate(model, request, on_step)
            finally:
                by_client = sum(stops.stopped(stream, rows))
                stops.end(stream)
                log.info("stream %s: %d decoding steps for %d rows (max_new_tokens %d), %d ended by the client",
                         stream, ran[0], rows, max(request.max_new_tokens), by_client)

        stops.start(stream)
        threading.Thread(target=lambda: _report(thread, generate, steps), daemon=True).start()
        ended = False
        try:
            while True:
                step = steps.get()
                if step is None or isinstance(step, BaseException):
                    ended = True
                    if step is None:
                        return
                    raise step
                yield {"tokens": step[:, None]}
        finally:
            if not ended:  # PyTriton stopped reading (a response failed): nobody wants the rest
                stops.stop(stream, [ALL_ROWS])

    return infer


def make_stop_infer(stops: StreamStops):
    """The ``<model>_stop`` model: end rows (``ALL_ROWS``: all) of a running stream."""
    from pytriton.decorators import batch

    @batch
    def infer(stream_id: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        running = [stops.stop(_text(stream), [int(r) for r in ended]) for stream, ended in zip(stream_id[:, 0], rows)]
        return {"running": np.array(running, dtype=np.bool_)[:, None]}

    return infer


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _report(thread: ModelThread, fn: Callable[[], None], steps: queue.Queue) -> None:
    """Run ``fn`` on the model thread; a failure reaches the stream as its last item."""
    try:
        thread.run(fn)
    except BaseException as exc:
        steps.put(exc)
    finally:
        steps.put(None)


def main(spec_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    # Triton's Python-backend stub must load this interpreter's libpython, not the system's.
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)

    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig
    from transformers import AutoTokenizer

    from rm_runner.config import ModelConfig as RunModelConfig

    backend = instantiate(spec["device"])
    thread = ModelThread()
    thread.run(backend.initialize)
    model_config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunModelConfig), spec["model_config"]))
    model = thread.run(lambda: backend.prepare_model(Path(spec["model_path"]), model_config))
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    host = spec["host"]
    config = TritonConfig(http_address=host, http_port=spec["http_port"], grpc_address=host,
                          grpc_port=spec["grpc_port"], metrics_address=host, metrics_port=spec["metrics_port"],
                          exit_on_error=True, exit_timeout_secs=5)
    inputs = [Tensor(name="input_ids", dtype=np.int64, shape=(-1,)),
              Tensor(name="attention_mask", dtype=np.int64, shape=(-1,)),
              Tensor(name="max_new_tokens", dtype=np.int64, shape=(1,)),
              Tensor(name="sampling", dtype=bytes, shape=(1,)),
              Tensor(name="eos_ids", dtype=np.int64, shape=(-1,))]
    with Triton(config=config) as triton:
        # The streaming models first: the engine waits for the main model's readiness, and its
        # client streams only where <name>_stream is ready by then.
        if backend.streams(model):
            stops = StreamStops()
            stream_inputs = [*inputs, Tensor(name="stream_id", dtype=bytes, shape=(1,))]
            triton.bind(model_name=f"{spec['model_name']}_stop", infer_func=make_stop_infer(stops),
                        inputs=[Tensor(name="stream_id", dtype=bytes, shape=(1,)),
                                Tensor(name="rows", dtype=np.int64, shape=(-1,))],
                        outputs=[Tensor(name="running", dtype=np.bool_, shape=(1,))],
                        config=ModelConfig(max_batch_size=spec["max_batch_size"]), strict=True)
            triton.bind(model_name=f"{spec['model_name']}_stream",
                        infer_func=make_stream_infer(backend, model, pad, thread, stops), inputs=stream_inputs,
                        outputs=[Tensor(name="tokens", dtype=np.int64, shape=(1,))],
                        config=ModelConfig(max_batch_size=spec["max_batch_size"], decoupled=True), strict=True)
        triton.bind(model_name=spec["model_name"], infer_func=make_infer(backend, model, pad, thread), inputs=inputs,
                    outputs=[Tensor(name="new_tokens", dtype=np.int64, shape=(-1,))],
                    config=ModelConfig(max_batch_size=spec["max_batch_size"],
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=spec["max_queue_delay_us"])),
                    strict=True)
        log.info("serving %s on %s:%d (device %s)", spec["model_name"], host, spec["http_port"], backend.name)
        triton.serve()


if __name__ == "__main__":
    main(sys.argv[1])
