"""Step: are the run's device and dtype giving the same answers as a reference? Greedy, token by token.

The model is loaded once through the transformers hook on the reference device, then moved to
the run's device with the device controller's ``switch_device`` (what a user of the hook does),
so both sides start from the same weights and the same rendered token ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import OmegaConf

import rm_runner
from rm_runner.backends.registry import check_registered
from rm_runner.config import Dtype, ParityConfig
from rm_runner.engines.local import render
from rm_runner.errors import RunnerError
from rm_runner.pipeline.context import RunContext
from rm_runner.pipeline.step import Step
from rm_runner.workload import with_tokenizer

log = logging.getLogger(__name__)

PARITY = "parity.jsonl"


@dataclass
class Side:
    """One device's greedy answer to one prompt: chosen token ids and, where given, their log-probs."""

    tokens: list[int]
    logprobs: Optional[list[float]]


class Parity(Step):
    """Reference first, then the run's device; no LoadModel step before it, as it loads the model itself."""

    def check(self, ctx: RunContext) -> None:
        check_registered(ctx.cfg.parity.reference_device, "parity.reference_device", allow_auto=True)

    def __call__(self, ctx: RunContext) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        parity: ParityConfig = OmegaConf.to_object(ctx.cfg.parity)
        path = ctx.model_source.resolve()
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=ctx.model.trust_remote_code)
        ctx.requests = with_tokenizer(ctx.requests, tokenizer, ctx.cfg.workload)
        prompts = [render(tokenizer, request) for request in ctx.requests]
        # A request may carry its own output length (synthetic / ShareGPT workloads).
        limits = [r.max_new_tokens or ctx.generation.max_new_tokens for r in ctx.requests]
        kwargs: dict[str, Any] = {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None,  # greedy, without warnings
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        }
        if ctx.generation.ignore_eos:
            kwargs["eos_token_id"] = None
        target = ctx.device
        try:
            reference = rm_runner.activate(parity.reference_device).backend
            log.info("parity: reference %s (%s), %d prompts", reference.name, parity.reference_dtype.value,
                     len(prompts))
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=_torch_dtype(parity.reference_dtype), trust_remote_code=ctx.model.trust_remote_code
            )
            expected = _generate_all(model, prompts, limits, kwargs)
            model.use_dtype(ctx.model.dtype)  # the switch re-prepares the model in the run's dtype
            rm_runner.switch_device(target)
            log.info("parity: target %s (%s)", target.name, ctx.model.dtype.value)
            got = _generate_all(model, prompts, limits, kwargs)
        finally:
            rm_runner.deactivate()

        records = [
            compare(request.id, ref, tgt, tokenizer) for request, ref, tgt in zip(ctx.requests, expected, got)
        ]
        ctx.run_dir.write_jsonl(PARITY, records)
        summary = {
            "reference": {"device": reference.name, "dtype": parity.reference_dtype.value},
            "target": {"device": target.name, "dtype": ctx.model.dtype.value},
            **summarize(records, parity),
        }
        ctx.metrics["parity"] = summary
        _report(records, summary)
        if not summary["passed"]:
            raise RunnerError(
                f"parity failed: {summary['matched']}/{summary['prompts']} prompts match "
                f"(match_fraction {summary['match_fraction']:.3f}, "
                f"parity.min_match_fraction={parity.min_match_fraction}), "
                f"max_logprob_diff {_fmt(summary['max_logprob_diff'])} "
                f"(parity.max_logprob_diff={parity.max_logprob_diff}); see {ctx.run_dir.path / PARITY}"
            )


def _torch_dtype(dtype: Dtype) -> Any:
    import torch

    return "auto" if dtype == Dtype.auto else getattr(torch, dtype.value)


def _generate_all(model: Any, prompts: list[list[int]], limits: list[int], kwargs: dict[str, Any]) -> list[Side]:
    """Each prompt alone (no padding to differ between devices), asking for scores to get log-probs.

    A backend that refuses ``output_scores`` (vLLM mode takes only sampling arguments) is asked
    again without, once; any other error comes back on that retry.
    """
    scores: dict[str, Any] = {"output_scores": True, "return_dict_in_generate": True}
    sides = []
    for prompt, limit in zip(prompts, limits):
        try:
            sides.append(_generate(model, prompt, limit, {**kwargs, **scores}))
        except RunnerError as exc:
            if not scores:
                raise
            log.info("parity: %s; comparing token ids only", exc)
            scores = {}
            sides.append(_generate(model, prompt, limit, kwargs))
    return sides


def _generate(model: Any, prompt: list[int], max_new_tokens: int, kwargs: dict[str, Any]) -> Side:
    """Greedy tokens after ``prompt``; each chosen token's log-prob when the output has scores."""
    import torch

    input_ids = torch.tensor([prompt])
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            max_new_tokens=max_new_tokens, **kwargs)
    sequences = getattr(output, "sequences", output)
    tokens = sequences[0, len(prompt):].tolist()
    scores = getattr(output, "scores", None)
    if not scores:
        return Side(tokens, None)
    steps = torch.stack([s[0] for s in scores]).float().log_softmax(dim=-1)
    chosen = torch.tensor(tokens[: len(steps)], device=steps.device)
    return Side(tokens, steps[torch.arange(len(chosen), device=steps.device), chosen].tolist())


def compare(request_id: str, reference: Side, target: Side, tokenizer: Any = None) -> dict[str, Any]:
    """One prompt's record. Log-probs are compared only where both sides chose the same tokens so far:
    after a divergence the two continue from different text and their log-probs mean different things."""
    ref, tgt = reference.tokens, target.tokens
    common = next((i for i, (a, b) in enumerate(zip(ref, tgt)) if a != b), min(len(ref), len(tgt)))
    diff = None
    if reference.logprobs is not None and target.logprobs is not None:
        pairs = list(zip(reference.logprobs[:common], target.logprobs[:common]))
        diff = max((abs(a - b) for a, b in pairs), default=None)
    record: dict[str, Any] = {
        "id": request_id,
        "match": ref == tgt,
        "first_divergence": None if ref == tgt else common,
        "max_logprob_diff": diff,
        "reference_tokens": ref,
        "target_tokens": tgt,
    }
    if tokenizer is not None:
        record["reference_text"] = tokenizer.decode(ref, skip_special_tokens=True)
        record["target_text"] = tokenizer.decode(tgt, skip_special_tokens=True)
    return record


def summarize(records: list[dict[str, Any]], parity: ParityConfig) -> dict[str, Any]:
    """The verdict: enough prompts match, and no compared log-prob moved more than the threshold."""
    matched = sum(r["match"] for r in records)
    fraction = matched / len(records) if records else 0.0
    diffs = [r["max_logprob_diff"] for r in records if r["max_logprob_diff"] is not None]
    worst = max(diffs, default=None)
    passed = fraction >= parity.min_match_fraction
    if parity.max_logprob_diff is not None:
        if worst is None:
            log.warning("parity.max_logprob_diff=%s not checked: the backends gave no log-probs to compare",
                        parity.max_logprob_diff)
        else:
            passed = passed and worst <= parity.max_logprob_diff
    return {
        "prompts": len(records),
        "matched": matched,
        "match_fraction": round(fraction, 6),
        "max_logprob_diff": worst,
        "min_match_fraction": parity.min_match_fraction,
        "max_logprob_diff_threshold": parity.max_logprob_diff,
        "passed": passed,
    }


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _report(records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    for r in records:
        verdict = "match" if r["match"] else f"DIVERGES at token {r['first_divergence']}"
        log.info("parity %s: %s (%d/%d tokens, max logprob diff %s)", r["id"], verdict,
                 len(r["reference_tokens"]), len(r["target_tokens"]), _fmt(r["max_logprob_diff"]))
    ref, tgt = summary["reference"], summary["target"]
    print(f"parity: {ref['device']}/{ref['dtype']} (reference) vs {tgt['device']}/{tgt['dtype']} (target)")
    print(f"  {'id':<12} {'match':<6} {'diverges':>8} {'tokens':>9} {'max |dlogp|':>11}")
    for r in records:
        tokens = f"{len(r['reference_tokens'])}/{len(r['target_tokens'])}"
        diverges = "-" if r["first_divergence"] is None else str(r["first_divergence"])
        print(f"  {str(r['id']):<12} {'yes' if r['match'] else 'NO':<6} {diverges:>8} {tokens:>9} "
              f"{_fmt(r['max_logprob_diff']):>11}")
    print(f"  {'PASSED' if summary['passed'] else 'FAILED'}: {summary['matched']}/{summary['prompts']} match "
          f"(need {summary['min_match_fraction']:.0%}), max logprob diff {_fmt(summary['max_logprob_diff'])}"
          + (f" (limit {summary['max_logprob_diff_threshold']})" if summary["max_logprob_diff_threshold"] is not None
             else ""), flush=True)
