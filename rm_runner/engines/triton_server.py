"""The Triton Inference Server side of ``engine=triton``: run by rm_runner in the PyTriton venv.

``python -m rm_runner.engines.triton_server SPEC.json`` builds the selected device's backend
in this process, prepares the model on it, and binds it as a Triton model with dynamic
batching (PyTriton bundles the tritonserver binary). Requests carry a left-padded batch of
token ids and the generation parameters; the answer is ``generate()``'s sequences. A second,
decoupled model (``<name>_stream``) answers the same request with one response per decoding
step, each holding every row's new token (Triton's streaming, over gRPC). SIGINT stops it.

A stream's rows end on the server as soon as they end for its client: at the EOS ids the request
names (``eos_token_ids``), and where the client says so through a third model, ``<name>_stop``
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

PARAMS = (("max_new_tokens", np.int64), ("do_sample", np.bool_), ("temperature", np.float32),
          ("top_p", np.float32), ("top_k", np.int64), ("seed", np.int64), ("ignore_eos", np.bool_),
          ("repetition_penalty", np.float32), ("min_p", np.float32), ("min_new_tokens", np.int64))
ALL_ROWS = -1  # in a stop request: every row of the stream


def hf_kwargs(values: dict[str, Any], pad_token_id: int) -> dict[str, Any]:
    """One request's parameters as ``generate()`` keywords (the inverse of the client's encoding)."""
    kwargs: dict[str, Any] = {"max_new_tokens": int(values["max_new_tokens"]), "do_sample": bool(values["do_sample"]),
                              "pad_token_id": pad_token_id, "seed": int(values["seed"])}
    if kwargs["do_sample"]:
        kwargs.update(temperature=float(values["temperature"]), top_p=float(values["top_p"]),
                      top_k=int(values["top_k"]) or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if values["ignore_eos"]:
        kwargs["eos_token_id"] = None
    # Sent as their no-op values when not asked for (1.0, 0.0, 0); generate() gets them only when asked.
    if float(values["repetition_penalty"]) != 1.0:
        kwargs["repetition_penalty"] = float(values["repetition_penalty"])
    if kwargs["do_sample"] and float(values["min_p"]) > 0:
        kwargs["min_p"] = float(values["min_p"])
    if int(values["min_new_tokens"]) > 0:
        kwargs["min_new_tokens"] = int(values["min_new_tokens"])
    return kwargs


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
    import torch
    from pytriton.decorators import batch

    @batch
    def infer(input_ids: np.ndarray, attention_mask: np.ndarray, **params: np.ndarray) -> dict[str, np.ndarray]:
        # Requests merged by the dynamic batcher may differ in parameters: one generate() per kind.
        keys = [tuple(params[name][row, 0].item() for name, _ in PARAMS) for row in range(len(input_ids))]
        outputs: list[list[int] | None] = [None] * len(input_ids)
        for key in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            kwargs = hf_kwargs(dict(zip((name for name, _ in PARAMS), key)), pad_token_id)
            inputs = {"input_ids": torch.from_numpy(input_ids[rows]), "attention_mask": torch.from_numpy(attention_mask[rows])}
            sequences = thread.run(lambda: backend.execute(model, inputs, **kwargs))
            for row, seq in zip(rows, getattr(sequences, "sequences", sequences).cpu().tolist()):
                outputs[row] = seq
        width = max(len(o) for o in outputs)
        return {"sequences": np.array([o + [pad_token_id] * (width - len(o)) for o in outputs], dtype=np.int64)}

    return infer


def make_stream_infer(backend: Any, model: Any, pad_token_id: int, thread: ModelThread, stops: StreamStops):
    """The decoupled model: one response per decoding step, ``tokens`` = each row's new token.

    A row ends at one of its ``eos_token_ids`` (-1 pads them) or once ``stops`` says its client
    ended it; generation ends when every row has, and the log says after how many steps.
    """
    import torch
    from pytriton.decorators import batch
    from transformers import StoppingCriteria, StoppingCriteriaList

    @batch
    def infer(input_ids: np.ndarray, attention_mask: np.ndarray, stream_id: np.ndarray, eos_token_ids: np.ndarray,
              **params: np.ndarray):
        kwargs = hf_kwargs({name: params[name][0, 0].item() for name, _ in PARAMS}, pad_token_id)
        eos = sorted({int(t) for t in eos_token_ids[0] if t >= 0})
        kwargs["eos_token_id"] = eos or None  # the client's EOS ids, none when it ignores EOS
        inputs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
        stream = _text(stream_id[0, 0])
        rows = len(input_ids)
        steps: queue.Queue = queue.Queue()
        ran = [0]

        class Step(StoppingCriteria):
            def __call__(self, ids: Any, scores: Any, **kw: Any) -> Any:
                ran[0] += 1
                steps.put(ids[:, -1].cpu().numpy().astype(np.int64))
                return torch.tensor(stops.stopped(stream, rows), dtype=torch.bool, device=ids.device)

        def generate() -> None:
            try:
                backend.execute(model, inputs, stopping_criteria=StoppingCriteriaList([Step()]), **kwargs)
            finally:
                by_client = sum(stops.stopped(stream, rows))
                stops.end(stream)
                log.info("stream %s: %d decoding steps for %d rows (max_new_tokens %d), %d ended by the client",
                         stream, ran[0], rows, kwargs["max_new_tokens"], by_client)

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
              *(Tensor(name=name, dtype=dtype, shape=(1,)) for name, dtype in PARAMS)]
    with Triton(config=config) as triton:
        # The streaming models first: the engine waits for the main model's readiness, and its
        # client streams only where <name>_stream is ready by then.
        if backend.streams(model):
            stops = StreamStops()
            stream_inputs = [*inputs, Tensor(name="stream_id", dtype=bytes, shape=(1,)),
                             Tensor(name="eos_token_ids", dtype=np.int64, shape=(-1,))]
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
                    outputs=[Tensor(name="sequences", dtype=np.int64, shape=(-1,))],
                    config=ModelConfig(max_batch_size=spec["max_batch_size"],
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=spec["max_queue_delay_us"])),
                    strict=True)
        log.info("serving %s on %s:%d (device %s)", spec["model_name"], host, spec["http_port"], backend.name)
        triton.serve()


if __name__ == "__main__":
    main(sys.argv[1])
