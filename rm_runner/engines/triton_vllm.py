"""Triton with its vLLM backend (GPU hosts, e.g. NVIDIA's tritonserver vllm containers).

Where a ``tritonserver`` binary with the vLLM backend is installed, ``engine=triton`` writes a
model repository for it (``config.pbtxt`` with ``backend: "vllm"`` and ``1/model.json`` holding
vLLM's engine arguments, from the device's vLLM adapter, ``vllm_devices.py``) and starts tritonserver on
it instead of PyTriton. Requests then use the vLLM backend's text protocol (``text_input``,
``sampling_parameters``, ``text_output``), so prompts are decoded and completions re-tokenized.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rm_runner.engines.vllm_devices import VLLMServerSettings
from rm_runner.requests import GenerationRequest
from rm_runner.rundir import atomic_write_text

BACKEND_DIRS = (Path("/opt/tritonserver/backends/vllm"),)

CONFIG_PBTXT = """backend: "vllm"
instance_group [
  {
    count: 1
    kind: KIND_MODEL
  }
]
"""


def vllm_backend_installed() -> Path | None:
    """The tritonserver binary, when it and its vLLM backend are installed here."""
    binary = shutil.which("tritonserver")
    if binary is None:
        return None
    candidates = [Path(binary).resolve().parent.parent / "backends" / "vllm", *BACKEND_DIRS]
    return Path(binary) if any((d / "model.py").is_file() for d in candidates) else None


def engine_args(settings: VLLMServerSettings, max_model_len: int) -> dict[str, Any]:
    """``vllm serve`` flags (``--max-model-len 2048``, ``--enforce-eager``) as model.json's engine arguments."""
    args: dict[str, Any] = {"model": str(settings.model), "disable_log_requests": True, "max_model_len": max_model_len}
    flags = list(settings.args)
    while flags:
        key = flags.pop(0).removeprefix("--").replace("-", "_")
        if flags and not flags[0].startswith("--"):
            value: Any = flags.pop(0)
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    continue
            args[key] = value
        else:
            args[key] = True
    return args


def write_model_repository(root: Path, model_name: str, settings: VLLMServerSettings, max_model_len: int) -> Path:
    model_dir = root / model_name
    atomic_write_text(model_dir / "config.pbtxt", CONFIG_PBTXT)
    atomic_write_text(model_dir / "1" / "model.json", json.dumps(engine_args(settings, max_model_len), indent=2) + "\n")
    return root


def sampling_parameters(request: GenerationRequest, row: int) -> dict[str, Any]:
    """Row ``row``'s settings as the vLLM backend's ``sampling_parameters`` JSON (vLLM's names)."""
    return {"max_tokens": request.max_new_tokens[row], **request.sampling.changed()}


class TritonVLLMClient:
    """The executor for a vLLM-backend model: text in, text out, token ids through the tokenizer."""

    def __init__(self, url: str, model_name: str, timeout_s: float) -> None:
        import tritonclient.http as httpclient

        self.client = httpclient.InferenceServerClient(url=url, network_timeout=timeout_s, connection_timeout=timeout_s)
        self.model_name = model_name
        self.tokenizer: Any = None

    def prepare_model(self, path: Any, config: Any) -> str:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        return self.model_name

    def _complete(self, prompt_ids: list[int], params: dict[str, Any]) -> list[int]:
        import numpy as np
        import tritonclient.http as httpclient

        values = {"text_input": np.array([self.tokenizer.decode(prompt_ids).encode()], dtype=np.object_),
                  "sampling_parameters": np.array([json.dumps(params).encode()], dtype=np.object_),
                  "stream": np.array([False]), "exclude_input_in_output": np.array([True])}
        tensors = []
        for name, array in values.items():
            tensor = httpclient.InferInput(name, [1], "BYTES" if array.dtype == np.object_ else "BOOL")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = self.client.infer(self.model_name, tensors, outputs=[httpclient.InferRequestedOutput("text_output")])
        text = result.as_numpy("text_output")[0].decode()
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, model: str, request: GenerationRequest, on_step: Any = None) -> list[list[int]]:
        return [self._complete(list(ids), sampling_parameters(request, row)) for row, ids in enumerate(request.prompts)]

    def streams(self, model: Any) -> bool:
        return False

    def close(self) -> None:
        self.client.close()
