"""Triton's vLLM backend (GPU hosts): the generated model repository and request mapping.

No tritonserver with the vLLM backend is installed here; what can run without it is tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rm_runner.backends.base import VLLMServerSettings
from rm_runner.backends.cpu import CPUBackend
from rm_runner.backends.gpu import GPUBackend
from rm_runner.config import Dtype, ModelConfig
from rm_runner.engines.triton_vllm import engine_args, sampling_parameters, vllm_backend_installed, write_model_repository
from tests.conftest import cli


def test_device_settings_become_vllm_engine_arguments(tmp_path: Path) -> None:
    config = ModelConfig(name="m", source=None, dtype=Dtype.bfloat16, max_model_len=4096)
    gpu = GPUBackend(tensor_parallel_size=2, gpu_memory_utilization=0.85).vllm_server_settings(tmp_path, config)
    assert engine_args(gpu, 4096) == {"model": str(tmp_path), "disable_log_requests": True, "max_model_len": 4096,
                                      "dtype": "bfloat16", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.85}
    cpu = CPUBackend().vllm_server_settings(tmp_path, ModelConfig(name="m", source=None))
    assert engine_args(cpu, 2048)["enforce_eager"] is True and engine_args(cpu, 2048)["dtype"] == "float32"


def test_model_repository_layout(tmp_path: Path) -> None:
    root = write_model_repository(tmp_path / "repo", "rm_runner", VLLMServerSettings(model="/models/llama",
                                  args=["--max-num-seqs", "8"]), 8192)
    assert 'backend: "vllm"' in (root / "rm_runner" / "config.pbtxt").read_text()
    model_json = json.loads((root / "rm_runner" / "1" / "model.json").read_text())
    assert model_json == {"model": "/models/llama", "disable_log_requests": True, "max_model_len": 8192,
                          "max_num_seqs": 8}


def test_generate_keywords_map_to_sampling_parameters() -> None:
    assert sampling_parameters({"max_new_tokens": 32, "do_sample": False, "seed": 0, "eos_token_id": None}) == {
        "max_tokens": 32, "seed": 0, "temperature": 0.0, "ignore_eos": True}
    assert sampling_parameters({"max_new_tokens": 8, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                "top_k": 40, "seed": 3}) == {
        "max_tokens": 8, "seed": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 40}


@pytest.mark.skipif(vllm_backend_installed() is not None, reason="tritonserver with the vLLM backend is installed")
def test_asking_for_the_vllm_backend_without_it_names_what_is_missing(tmp_path: Path) -> None:
    proc = cli("engine=triton", "engine.server=vllm", "model=tiny-random", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    assert "engine.server=vllm needs a tritonserver binary with its vLLM backend" in proc.stderr


def test_vllms_sampling_fields_reach_both_triton_servers() -> None:
    """repetition_penalty, min_p and min_new_tokens (served by the API) reach the model on either
    Triton server instead of being dropped by a fixed list of parameters."""
    import torch

    from rm_runner.engines.triton import TritonClient
    from rm_runner.engines.triton_server import PARAMS, hf_kwargs

    asked = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": None, "seed": 3,
             "repetition_penalty": 1.3, "min_p": 0.05, "min_new_tokens": 4}
    arrays = TritonClient._arrays({"input_ids": torch.tensor([[5, 6, 7]])}, asked)
    received = hf_kwargs({name: arrays[name][0, 0].item() for name, _ in PARAMS}, pad_token_id=0)
    assert received["repetition_penalty"] == pytest.approx(1.3) and received["min_p"] == pytest.approx(0.05)
    assert received["min_new_tokens"] == 4
    plain = {"max_new_tokens": 8, "do_sample": False, "seed": 0}
    arrays = TritonClient._arrays({"input_ids": torch.tensor([[5, 6, 7]])}, plain)
    received = hf_kwargs({name: arrays[name][0, 0].item() for name, _ in PARAMS}, pad_token_id=0)
    assert not {"repetition_penalty", "min_p", "min_new_tokens"} & set(received)  # no-op values stay out
    assert sampling_parameters(asked) == {"max_tokens": 8, "seed": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 0,
                                          "repetition_penalty": 1.3, "min_tokens": 4, "min_p": 0.05}


def test_triton_requests_have_their_own_timeout() -> None:
    from rm_runner.engines.triton import TritonEngine
    from rm_runner.errors import ConfigError

    assert TritonEngine(CPUBackend(), request_timeout_s=42).request_timeout_s == 42
    with pytest.raises(ConfigError, match="engine.request_timeout_s must be > 0"):
        TritonEngine(CPUBackend(), request_timeout_s=0)
