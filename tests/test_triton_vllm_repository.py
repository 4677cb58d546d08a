"""Triton's vLLM backend (GPU hosts): the generated model repository and request mapping.

No tritonserver with the vLLM backend is installed here; what can run without it is tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rm_runner.backends.cpu import CPUBackend
from rm_runner.backends.gpu import GPUBackend
from rm_runner.config import Dtype, ModelConfig
from rm_runner.engines.triton_vllm import engine_args, sampling_parameters, vllm_backend_installed, write_model_repository
from rm_runner.engines.vllm_devices import CPUVLLM, GPUVLLM, VLLMServerSettings
from rm_runner.requests import GenerationRequest, SamplingParams
from tests.conftest import cli


def test_device_settings_become_vllm_engine_arguments(tmp_path: Path) -> None:
    config = ModelConfig(name="m", source=None, dtype=Dtype.bfloat16, max_model_len=4096)
    gpu = GPUVLLM().settings(GPUBackend(tensor_parallel_size=2, gpu_memory_utilization=0.85), tmp_path, config)
    assert engine_args(gpu, 4096) == {"model": str(tmp_path), "disable_log_requests": True, "max_model_len": 4096,
                                      "dtype": "bfloat16", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.85}
    cpu = CPUVLLM().settings(CPUBackend(), tmp_path, ModelConfig(name="m", source=None))
    assert engine_args(cpu, 2048)["enforce_eager"] is True and engine_args(cpu, 2048)["dtype"] == "float32"


def test_model_repository_layout(tmp_path: Path) -> None:
    root = write_model_repository(tmp_path / "repo", "rm_runner", VLLMServerSettings(model="/models/llama",
                                  args=["--max-num-seqs", "8"]), 8192)
    assert 'backend: "vllm"' in (root / "rm_runner" / "config.pbtxt").read_text()
    model_json = json.loads((root / "rm_runner" / "1" / "model.json").read_text())
    assert model_json == {"model": "/models/llama", "disable_log_requests": True, "max_model_len": 8192,
                          "max_num_seqs": 8}


def test_requests_map_to_sampling_parameters_in_vllms_names() -> None:
    greedy = GenerationRequest.of([[1, 2], [3]], [32, 5], SamplingParams(ignore_eos=True, seed=7))
    assert sampling_parameters(greedy, 0) == {"max_tokens": 32, "ignore_eos": True}  # greedy draws nothing: no seed
    assert sampling_parameters(greedy, 1) == {"max_tokens": 5, "ignore_eos": True}
    sampled = GenerationRequest.of([[1]], 8, SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=3))
    assert sampling_parameters(sampled, 0) == {"max_tokens": 8, "seed": 3, "temperature": 0.7, "top_p": 0.9,
                                               "top_k": 40}


@pytest.mark.skipif(vllm_backend_installed() is not None, reason="tritonserver with the vLLM backend is installed")
def test_asking_for_the_vllm_backend_without_it_names_what_is_missing(tmp_path: Path) -> None:
    proc = cli("engine=triton", "engine.server=vllm", "model=tiny-random", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    assert "engine.server=vllm needs a tritonserver binary with its vLLM backend" in proc.stderr


def test_a_request_reaches_both_triton_servers_whole() -> None:
    """Every sampling field (repetition_penalty, min_p, min_tokens too) and each row's own length
    reach the model on either Triton server, instead of being dropped by a fixed list of parameters."""
    from rm_runner.engines.triton import TritonClient
    from rm_runner.engines.triton_server import requests_of

    sampling = SamplingParams(temperature=0.7, top_p=0.9, seed=3, repetition_penalty=1.3, min_p=0.05, min_tokens=4)
    sent = GenerationRequest.of([[5, 6, 7], [8]], [8, 3], sampling, eos_ids=[2], pad_token_id=0)
    (rows, received), = requests_of(**TritonClient._arrays(sent), pad_token_id=0)
    assert rows == [0, 1] and received == sent  # the padding undone, the JSON read back
    plain = GenerationRequest.of([[5]], 8, SamplingParams(ignore_eos=True), pad_token_id=0)
    (_, received), = requests_of(**TritonClient._arrays(plain), pad_token_id=0)
    assert received == plain and received.end_ids == ()
    assert sampling_parameters(sent, 1) == {"max_tokens": 3, "seed": 3, "temperature": 0.7, "top_p": 0.9,
                                            "repetition_penalty": 1.3, "min_tokens": 4, "min_p": 0.05}


def test_triton_requests_have_their_own_timeout() -> None:
    from rm_runner.engines.triton import TritonEngine
    from rm_runner.errors import ConfigError

    assert TritonEngine(CPUBackend(), request_timeout_s=42).request_timeout_s == 42
    with pytest.raises(ConfigError, match="engine.request_timeout_s must be > 0"):
        TritonEngine(CPUBackend(), request_timeout_s=0)
