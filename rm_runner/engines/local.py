"""The in-process engine: the backend runs in this process, prompts go in as padded batches."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from rm_runner.backends.base import Backend, OnStep
from rm_runner.config import GenerationConfig, ModelConfig, check_options
from rm_runner.engines.base import Engine, Executor
from rm_runner.engines.openai_client import OpenAIClient, Passthrough
from rm_runner.engines.options import LocalOptions
from rm_runner.errors import ConfigError, RunnerError
from rm_runner.requests import Completion, GenerationRequest, Request, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)


class LocalEngine(Engine):
    """Renders and batches requests itself and hands each batch to an executor backend.

    The executor is the device's backend, in this process, or the OpenAI client where the device
    is a server (``Backend.endpoint``); a served engine keeps all of this and makes a client of
    the server it started its executor.
    """

    name = "local"
    options_class: type = LocalOptions  # engine.*: its schema in the ConfigStore, checked here too

    def __init__(self, backend: Backend, **options: Any) -> None:
        self.options = check_options(self.options_class, options, section="engine")
        self.backend = backend
        endpoint = backend.endpoint()
        # The device runs requests in this process, or it is a server reached through the OpenAI client.
        self.executor: Executor = OpenAIClient(endpoint) if endpoint is not None else backend
        self.batch_size = self.options.batch_size
        self.model: Any = None
        self.tokenizer: Any = None
        self.eos_ids: set[int] = set()
        self.max_model_len = 0
        self.max_model_len_option = "model.max_model_len"  # what sets max_model_len, for errors
        self._started = False

    def describe(self) -> dict[str, Any]:
        backend = self.backend.describe()
        if isinstance(self.executor, OpenAIClient) and self.executor.dialect is not None:
            backend["server"] = self.executor.describe()  # what the server was found to take
        return {"name": self.name, "batch_size": self.batch_size, "backend": backend}

    def start(self) -> None:
        self.backend.initialize()
        self._started = True

    def load_model(self, path: Path, config: ModelConfig) -> None:
        from transformers import AutoTokenizer, GenerationConfig as HFGenerationConfig

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=config.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = self.executor.prepare_model(path, config)
        try:
            eos = HFGenerationConfig.from_pretrained(str(path)).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer knows
            eos = None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.max_model_len, self.max_model_len_option = self.backend.max_model_len(config)

    def health(self) -> bool:
        return self._started and self.model is not None

    def stop(self) -> None:
        if self._started:
            self.model = None
            self.backend.cleanup()
            self._started = False

    def render(self, request: Request) -> list[int]:
        """Token ids of one request, through the chat template when it has one."""
        return render(self.tokenizer, request)

    def infer(self, requests: list[Request], generation: GenerationConfig) -> list[Completion]:
        if not self.health():
            raise RunnerError(f"engine={self.name}: infer() before start() and load_model()")
        encoded = [self.render(r) for r in requests]
        self.check_lengths(requests, encoded, generation)
        sampling = SamplingParams.from_generation(generation)
        limits = [r.max_new_tokens or generation.max_new_tokens for r in requests]
        completions: list[Completion] = []
        # Counted in tokens, a decoding step at a time where the model runs here: one batch is
        # often the whole workload, and a bar in requests would jump from 0 to N at its end.
        with tqdm(total=sum(limits), desc="generate", unit="tok", dynamic_ncols=True) as bar:
            for start in range(0, len(requests), self.batch_size):
                end = start + self.batch_size
                batch = self._run_batch(requests[start:end], self.request(encoded[start:end], limits[start:end],
                                                                          sampling), bar)
                completions.extend(batch)
                bar.total -= sum(limits[start:end]) - sum(c.output_tokens for c in batch)  # rows that ended early
                bar.n = sum(c.output_tokens for c in completions)
                bar.set_postfix_str(f"{len(completions)}/{len(requests)} requests", refresh=True)
        return completions

    def _counts_steps(self) -> bool:
        """The model runs in this process and calls the step callback every step, so counting
        tokens as they are made costs a callback and changes nothing else (a server's client
        would have to switch to streamed requests for it)."""
        return self.executor is self.backend and self.streams()

    def check_lengths(self, requests: list[Request], encoded: list[list[int]], generation: GenerationConfig) -> None:
        """Every request's prompt and new tokens fit the model's length, or a ConfigError naming what sets it."""
        for request, ids in zip(requests, encoded):
            wanted = request.max_new_tokens or generation.max_new_tokens
            if len(ids) + wanted > self.max_model_len:
                raise ConfigError(
                    f"request {request.id}: {len(ids)} prompt tokens + {wanted} new tokens "
                    f"(generation.max_new_tokens or the workload's own length) exceed "
                    f"{self.max_model_len_option}={self.max_model_len}"
                )

    def openai_endpoint(self) -> tuple[str, str, str] | None:
        """(base URL, model, API key) when requests reach the model through an OpenAI-compatible
        server (a vLLM engine, a remote device), so a benchmark can load that server directly."""
        if isinstance(self.executor, OpenAIClient) and self.model is not None:
            return self.executor.openai_endpoint(self.model)
        return None

    def score(self, prompts: list[list[int]], top: int = 1) -> list[list[Optional[TokenLogprob]]]:
        """Through a running batch's prefill (raw logits, float32), where the model runs here."""
        from rm_runner.backends.running_batch import NewRow, RowSampling

        batch = self.running_batch()
        if batch is None:
            return super().score(prompts, top)
        tokens = batch.prefill([NewRow(i, list(p), RowSampling(prompt_logprobs=top)) for i, p in enumerate(prompts)])
        batch.release(set(range(len(prompts))))
        return [t.prompt_logprobs or [None] for t in tokens]

    def check_sampling(self, sampling: SamplingParams) -> None:
        """A server reached through the OpenAI client may not take vLLM's settings (it was asked)."""
        if isinstance(self.executor, OpenAIClient) and self.model is not None:
            self.executor.check(self.model, sampling)

    def passthrough(self) -> Any:
        """To the server, where the device or engine is one that takes vLLM's extensions (and so its logprobs)."""
        client = self.executor
        if isinstance(client, OpenAIClient) and client.dialect is not None and client.dialect.extensions and self.model:
            return Passthrough(client.endpoint, self.model.served_name)
        return None

    def running_batch(self) -> Any:
        """The backend's, where the model runs in this process and the backend can step it."""
        if not self.health() or self.executor is not self.backend:
            return None
        return self.backend.running_batch(self.model)

    def streams(self) -> bool:
        """True when ``generate_steps`` delivers tokens as they are made (the executor says so)."""
        return self.executor.streams(self.model)

    def generate_steps(self, request: GenerationRequest, on_step: OnStep) -> None:
        """Generate ``request``, handing each decoding step's new token per row to ``on_step``.

        ``on_step`` answers which rows are finished; generation ends when all are. This is the
        streaming form of ``infer``: where the executor streams (``executor.streams(model)``: it
        calls ``on_step`` every step) tokens arrive as they are made and finished rows (EOS, a
        stop string, a client that left) end early; elsewhere the finished output is replayed
        step by step through the same callback.
        """
        if not self.health():
            raise RunnerError(f"engine={self.name}: generate_steps() before start() and load_model()")
        if self.streams():
            self.executor.generate(self.model, request, on_step)
            return
        rows = self.executor.generate(self.model, request)
        pad = request.pad_token_id
        for step in range(max((len(r) for r in rows), default=0)):
            if all(on_step([r[step] if step < len(r) else pad for r in rows])):
                return

    def _run_batch(self, batch: list[Request], request: GenerationRequest, bar: Any) -> list[Completion]:
        counter = _TokenCounter(request, bar) if self._counts_steps() else None
        began = time.perf_counter()
        rows = self.executor.generate(self.model, request, counter)
        latency = time.perf_counter() - began
        ends = set(request.end_ids)
        results = []
        for asked, prompt_ids, new in zip(batch, request.prompts, rows):
            results.append(
                Completion(
                    id=asked.id,
                    prompt=asked.asked(),
                    text=self.tokenizer.decode(new, skip_special_tokens=True),
                    token_ids=new,
                    prompt_tokens=len(prompt_ids),
                    output_tokens=len(new),
                    finish_reason="stop" if new and new[-1] in ends else "length",
                    latency_s=round(latency, 6),
                )
            )
        return results


class _TokenCounter:
    """A progress bar's view of one batch: each step, the rows still running (not past their
    own limit, no end id yet) each made one token; a row is finished once it is past both."""

    def __init__(self, request: GenerationRequest, bar: Any) -> None:
        self.left, self.ends, self.bar = list(request.max_new_tokens), set(request.end_ids), bar
        self.min_tokens, self.made = request.sampling.min_tokens, [0] * len(self.left)

    def __call__(self, tokens: list[int]) -> list[bool]:
        running = 0
        for row, token in enumerate(tokens):
            if self.left[row] > 0:
                running += 1
                self.made[row] += 1
                ended = token in self.ends and self.made[row] > self.min_tokens
                self.left[row] = 0 if ended else self.left[row] - 1
        self.bar.update(running)
        return [left == 0 for left in self.left]


def render(tokenizer: Any, request: Request) -> list[int]:
    """Token ids of one request with ``tokenizer``, through the chat template when it has one."""
    if request.prompt_ids is not None:
        return list(request.prompt_ids)
    conversation = request.conversation()
    if conversation is None:
        return tokenizer(request.prompt or "")["input_ids"]
    if not tokenizer.chat_template:
        raise ConfigError(
            f"request {request.id}: the model has no chat template; set workload.chat_template=false "
            "to send raw prompts"
        )
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
