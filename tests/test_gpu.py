"""The GPU backend. Its PyTorch CUDA runs skip cleanly where no CUDA device is visible; what needs
no GPU is tested everywhere: the generate() defaults, the GPU vLLM is shown (the server's
environment, this process's before vLLM starts), and the mode the run records."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from rm_runner.backends.gpu import GPUBackend
from rm_runner.config import Dtype, ModelConfig
from rm_runner.engines.vllm_devices import GPUVLLM
from rm_runner.errors import ConfigError
from tests.conftest import cli, token_ids

needs_gpu = pytest.mark.skipif(not GPUBackend.is_available(),
                               reason=f"needs a CUDA GPU: {GPUBackend.is_available().describe()}")


def test_static_cache_default_stays_out_of_a_call_that_brings_its_own_cache() -> None:
    static, dynamic = GPUBackend(static_cache=True), GPUBackend(static_cache=False)
    assert static.generate_defaults(None, {}, {"max_new_tokens": 4}) == {"cache_implementation": "static"}
    assert dynamic.generate_defaults(None, {}, {"max_new_tokens": 4}) == {}
    # transformers refuses a cache object beside cache_implementation: a hooked caller's own cache wins
    for own in ({"past_key_values": object()}, {"cache": object()}, {"use_cache": False},
                {"cache_implementation": "offloaded"}):
        assert static.generate_defaults(None, {}, own) == {}


MODEL = ModelConfig(name="m", source=None, dtype=Dtype.bfloat16)


def test_vllm_server_runs_on_the_chosen_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,GPU-6f2a")  # device_id counts within it, as cuda:N does

    def env(**options) -> dict[str, str]:
        return GPUVLLM().settings(GPUBackend(**options), "/models/m", MODEL).env

    assert env() == {"CUDA_VISIBLE_DEVICES": "3"}
    assert env(device_id=1) == {"CUDA_VISIBLE_DEVICES": "5"}
    assert env(device_id=1, tensor_parallel_size=2) == {"CUDA_VISIBLE_DEVICES": "5,GPU-6f2a"}
    with pytest.raises(ConfigError, match=r"device.device_id=2 with device.tensor_parallel_size=2 needs CUDA "
                                          r"devices 2..3, but 3 are visible .*set device.device_id between 0 and 1"):
        env(device_id=2, tensor_parallel_size=2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # unset: every GPU torch counts
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert env(device_id=1) == {"CUDA_VISIBLE_DEVICES": "1"}


def test_in_process_vllm_is_shown_only_the_chosen_gpu_until_cleanup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    backend = GPUBackend(mode="vllm", device_id=1)
    backend.initialize()  # before vLLM (its engine and workers read the variable when they start)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert backend.describe()["cuda_visible_devices"] == "5"
    backend.cleanup()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"  # a later backend counts device_id as the user did
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    backend = GPUBackend(mode="vllm", device_id=1)
    backend.initialize()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    backend.cleanup()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_in_process_vllm_refuses_another_gpu_once_cuda_is_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ConfigError, match=r"device.device_id=1 cannot reach in-process vLLM: CUDA is already "
                                          r"initialised in this process .* CUDA_VISIBLE_DEVICES=5 and "
                                          r"device.device_id=0"):
        GPUBackend(mode="vllm", device_id=1).initialize()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
    backend = GPUBackend(mode="vllm", device_id=0)  # its first GPU is the process's first: nothing to move
    backend.initialize()
    backend.cleanup()


def test_the_run_records_which_mode_auto_resolved_to(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec

    def vllm_installed(installed: bool) -> None:
        def found(name: str, *args):
            return (object() if installed else None) if name == "vllm" else find_spec(name, *args)

        monkeypatch.setattr(importlib.util, "find_spec", found)

    vllm_installed(False)
    described = GPUBackend().describe()
    assert described["mode"] == "pytorch" and described["options"]["mode"] == "auto"
    vllm_installed(True)
    assert GPUBackend().describe()["mode"] == "vllm"
    assert GPUBackend(mode="pytorch").describe()["mode"] == "pytorch"


@needs_gpu
@pytest.mark.parametrize("static_cache", ["true", "false"])
def test_gpu_float32_greedy_matches_cpu(tmp_path: Path, static_cache: str) -> None:
    common = ("model=tiny-random", "model.dtype=float32", "generation.max_new_tokens=12")
    cpu = cli(*common, f"hydra.run.dir={tmp_path}/cpu")
    gpu = cli(*common, "device=gpu", "device.mode=pytorch", f"device.static_cache={static_cache}",
              f"hydra.run.dir={tmp_path}/gpu")
    assert cpu.returncode == 0 and gpu.returncode == 0, gpu.stderr[-3000:]
    assert token_ids(tmp_path / "gpu") == token_ids(tmp_path / "cpu")


@needs_gpu
def test_gpu_bfloat16_with_compiled_static_cache_runs_batched(tmp_path: Path) -> None:
    proc = cli("device=gpu", "device.mode=pytorch", "model=tiny-random", "model.dtype=bfloat16",
               "generation.max_new_tokens=16", "generation.ignore_eos=true", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [r["output_tokens"] for r in records] == [16] * 4


@needs_gpu
def test_hook_switches_a_model_between_cpu_and_gpu() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rm_runner
    from rm_runner.models.tiny_random import TinyRandom

    path = str(TinyRandom().resolve())
    inputs = AutoTokenizer.from_pretrained(path)(["the capital of France is"], return_tensors="pt")
    try:
        rm_runner.activate("cpu")
        model = AutoModelForCausalLM.from_pretrained(path)
        on_cpu = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        rm_runner.switch_device("gpu", mode="pytorch", static_cache=False)
        on_gpu = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)
    finally:
        rm_runner.deactivate()
