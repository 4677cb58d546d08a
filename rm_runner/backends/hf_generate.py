"""A ``GenerationRequest`` through transformers' ``generate()``: the one place that request
becomes ``generate()`` keywords and a left-padded batch.

Backends whose models are transformers (PyTorch on the CPU or GPU) or optimum-rbln models (which
take the same call) run requests through this (``Backend.generate``), in this process or inside a
server that rm_runner starts (Triton, TorchServe).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from rm_runner.requests import GenerationRequest

OnStep = Callable[[list[int]], list[bool]]


def generate_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """The request's settings as ``generate()`` keywords (``seed`` is the backend's: it seeds torch).

    Only what the request asks for beyond the no-op values is set (greedy unsets the sampling
    flags, or ``generate()`` warns that they are ignored), so backends that take a fixed set of
    keywords see the usual ones. ``eos_token_id`` is the request's own: None ignores EOS.
    """
    s = request.sampling
    kwargs: dict[str, Any] = {"max_new_tokens": max(request.max_new_tokens), "pad_token_id": request.pad_token_id,
                              "seed": s.seed, "eos_token_id": list(request.end_ids) or None}
    if s.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
        if s.min_p:
            kwargs["min_p"] = s.min_p
    if s.repetition_penalty != 1:
        kwargs["repetition_penalty"] = s.repetition_penalty
    if s.min_tokens:
        kwargs["min_new_tokens"] = s.min_tokens
    return kwargs


def padded(request: GenerationRequest) -> dict[str, Any]:
    """The prompts left-padded to one width: ``input_ids`` and ``attention_mask``."""
    import torch

    width = max((len(p) for p in request.prompts), default=0)
    ids = torch.full((len(request.prompts), width), request.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(request.prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def generate(execute: Callable[..., Any], model: Any, request: GenerationRequest,
             on_step: Optional[OnStep] = None) -> list[list[int]]:
    """Each row's new tokens from ``execute(model, inputs, **generate keywords)`` (a backend's).

    With ``on_step`` it is called after every decoding step with each row's new token and
    answers which rows are finished (Hugging Face stopping criteria); a row's tokens stop at the
    step it was finished. ``generate()`` ends rows at the request's end ids itself either way
    (keeping them out of the first ``min_tokens``), and hands ``on_step`` the pad id for a row
    after it ended.
    """
    inputs = padded(request)
    kwargs = generate_kwargs(request)
    finished_at: list[Optional[int]] = [None] * len(request.prompts)
    if on_step is not None:
        steps = [0]

        def watched(tokens: list[int]) -> list[bool]:
            steps[0] += 1
            done = on_step(tokens)
            for row, is_done in enumerate(done):
                if is_done and finished_at[row] is None:
                    finished_at[row] = steps[0]
            return done

        kwargs["stopping_criteria"] = step_criteria(watched)
    output = execute(model, inputs, **kwargs)
    sequences = getattr(output, "sequences", output)
    width = inputs["input_ids"].shape[1]
    rows = [row[width:] for row in sequences.tolist()]
    return [request.ended(i, row[: finished_at[i] or len(row)]) for i, row in enumerate(rows)]


def step_criteria(on_step: OnStep) -> Any:
    """Hugging Face stopping criteria that report every step's tokens and stop rows on request."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StepCallback(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            done = on_step(input_ids[:, -1].tolist())
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StepCallback()])


# The generate() keywords a GenerationRequest can say (the hook's model.generate() on an engine
# that is not transformers, such as in-process vLLM); any other is refused by name.
_TAKEN = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p", "seed",
          "repetition_penalty", "eos_token_id", "pad_token_id"}


def request_of_call(inputs: dict[str, Any], kwargs: dict[str, Any], where: str) -> GenerationRequest:
    """A ``generate(**inputs, **kwargs)`` call (left-padded rows) as a ``GenerationRequest``: what
    transformers code (the hook) asks of a backend that runs requests, not ``generate()``."""
    import torch

    from rm_runner.errors import RunnerError
    from rm_runner.requests import SamplingParams

    unknown = set(kwargs) - _TAKEN
    if unknown:
        raise RunnerError(f"{where} does not support generate() arguments: {', '.join(sorted(unknown))}")
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    prompts = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
    eos = kwargs.get("eos_token_id", ())
    sample = bool(kwargs.get("do_sample"))
    sampling = SamplingParams(
        temperature=(kwargs.get("temperature") or 1.0) if sample else 0.0, top_p=kwargs.get("top_p") or 1.0,
        top_k=kwargs.get("top_k") or 0, min_p=kwargs.get("min_p") or 0.0, seed=kwargs.get("seed"),
        repetition_penalty=kwargs.get("repetition_penalty") or 1.0, min_tokens=kwargs.get("min_new_tokens") or 0,
        ignore_eos="eos_token_id" in kwargs and eos is None)  # generate(eos_token_id=None): do not stop at EOS
    eos = [] if eos is None else eos if isinstance(eos, (list, tuple)) else [eos]
    return GenerationRequest.of(prompts, kwargs.get("max_new_tokens") or 20, sampling, eos,
                                kwargs.get("pad_token_id"))


def as_sequences(inputs: dict[str, Any], rows: list[list[int]], pad_token_id: int) -> Any:
    """``generate()``-shaped sequences: the padded prompts, then each row's new tokens, right-padded."""
    import torch

    input_ids = inputs["input_ids"]
    width = max((len(tokens) for tokens in rows), default=0)
    tail = torch.full((len(rows), width), pad_token_id, dtype=input_ids.dtype)
    for i, tokens in enumerate(rows):
        tail[i, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return torch.cat([input_ids.cpu(), tail], dim=1)
