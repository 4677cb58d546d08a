"""The GPU backend's PyTorch CUDA path; skipped cleanly where no CUDA device is visible (but for
the generate() defaults, which need no GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rm_runner.backends.gpu import GPUBackend
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
