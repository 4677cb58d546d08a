"""What the CPU path keeps in memory: once the linear layers are packed, nothing of the checkpoint
file stays mapped (its pages would stay resident beside the packed copies)."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")


def mapped(path: Path) -> bool:
    return any(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_a_packed_model_keeps_no_mapping_of_its_checkpoint(tmp_path: Path) -> None:
    import torch

    from rm_runner.backends.cpu import CPUBackend
    from rm_runner.config import ModelConfig
    from rm_runner.models.tiny_random import TinyRandom

    folder = shutil.copytree(TinyRandom().resolve(), tmp_path / "model")  # a path no other test maps
    weights = next(folder.glob("*.safetensors"))
    config = ModelConfig(name="tiny-random", source=None, dtype="float32")
    plain = CPUBackend(onednn_linear=False).prepare_model(folder, config)
    assert mapped(weights)  # transformers maps the checkpoint; its tensors are views of it
    packed = CPUBackend().prepare_model(folder, config)
    del plain
    gc.collect()
    assert not mapped(weights)
    ids = torch.tensor([[1, 5, 9, 2]])
    reference = CPUBackend(onednn_linear=False).prepare_model(shutil.copytree(folder, tmp_path / "again"), config)
    with torch.inference_mode():
        assert torch.equal(packed.generate(input_ids=ids, max_new_tokens=6, do_sample=False),
                           reference.generate(input_ids=ids, max_new_tokens=6, do_sample=False))


def test_a_callers_model_keeps_its_own_tensors() -> None:
    from rm_runner.backends.cpu import CPUBackend
    from rm_runner.config import ModelConfig
    from rm_runner.models.tiny_random import TinyRandom
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(TinyRandom().resolve()))
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    backend = CPUBackend()
    backend.prepare_model(model, ModelConfig(name="tiny-random", source=None, dtype="float32"))
    backend.cleanup()
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == before

