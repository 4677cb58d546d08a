"""The transformers hook and device controller, driven by unchanged Hugging Face code."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedModel

import rm_runner
from rm_runner.backends.cpu import CPUBackend
from rm_runner.backends.rbln import RBLNBackend
from rm_runner.hooks.proxy import ModelProxy
from rm_runner.models.tiny_random import TinyRandom


class RecordingCPU(CPUBackend):
    """The real CPU backend, noting the lifecycle calls the controller makes."""

    def __init__(self, calls: list[str], tag: str, **options) -> None:
        super().__init__(**options)
        self.calls, self.tag = calls, tag

    def initialize(self) -> None:
        self.calls.append(f"{self.tag}.initialize")
        super().initialize()

    def prepare_model(self, model, model_config):
        self.calls.append(f"{self.tag}.prepare_model")
        return super().prepare_model(model, model_config)

    def cleanup(self) -> None:
        self.calls.append(f"{self.tag}.cleanup")
        super().cleanup()


@pytest.fixture(scope="module")
def tiny_dir():
    return str(TinyRandom().resolve())


@pytest.fixture(autouse=True)
def always_deactivate():
    yield
    rm_runner.deactivate()


def encode(tiny_dir: str):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    return tokenizer(["the capital of France is", "water"], return_tensors="pt", padding=True, padding_side="left")


def test_hook_proxies_generates_switches_and_restores(tiny_dir: str) -> None:
    original_auto = AutoModelForCausalLM.__dict__.get("from_pretrained")
    original_base = PreTrainedModel.__dict__["from_pretrained"]
    threads = torch.get_num_threads()
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    inputs = encode(tiny_dir)
    expected = plain.generate(**inputs, max_new_tokens=6, do_sample=False)

    calls: list[str] = []
    rm_runner.activate(RecordingCPU(calls, "a"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)  # unchanged user code
    assert isinstance(model, ModelProxy) and model.backend.tag == "a"
    assert model.config.vocab_size == plain.config.vocab_size  # attributes fall through
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected)
    logits = model(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(logits, plain(**inputs).logits, rtol=1e-4, atol=1e-4)  # oneDNN vs MKL rounding

    rm_runner.switch_device(RecordingCPU(calls, "b", num_threads=1))
    assert calls == ["a.initialize", "a.prepare_model", "a.cleanup", "b.initialize", "b.prepare_model"]
    assert model.backend.tag == "b" and torch.get_num_threads() == 1
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected)

    direct = LlamaForCausalLM.from_pretrained(tiny_dir)  # a model class, not the Auto class
    assert isinstance(direct, ModelProxy)

    packed = model.model.layers[0].mlp.down_proj
    assert type(packed).__name__ == "PackedLinear"
    assert set(model.state_dict()) == set(plain.state_dict())  # packing keeps the user's weights visible

    rm_runner.deactivate()
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear  # unpacked on cleanup
    assert AutoModelForCausalLM.__dict__.get("from_pretrained") is original_auto
    assert PreTrainedModel.__dict__["from_pretrained"] is original_base
    assert not isinstance(AutoModelForCausalLM.from_pretrained(tiny_dir), ModelProxy)
    torch.set_num_threads(threads)


def test_activate_by_name_and_as_context_manager(tiny_dir: str) -> None:
    with rm_runner.activate(device="cpu") as backend:
        assert backend.name == "cpu"
        assert isinstance(AutoModelForCausalLM.from_pretrained(tiny_dir), ModelProxy)
    assert not isinstance(AutoModelForCausalLM.from_pretrained(tiny_dir), ModelProxy)


@pytest.mark.skipif(bool(RBLNBackend.is_available()), reason="an RBLN NPU is present")
def test_unavailable_device_fails_before_touching_the_active_one(tiny_dir: str) -> None:
    rm_runner.activate(device="cpu")
    with pytest.raises(rm_runner.errors.DeviceUnavailableError, match="device=rbln is not available"):
        rm_runner.switch_device("rbln")
    assert rm_runner.hooks.api.active_backend().name == "cpu"


def test_a_dtype_switch_leaves_the_callers_weights_as_they_were(tiny_dir: str) -> None:
    inputs = encode(tiny_dir)
    rm_runner.activate(device="cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)  # float32
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    # nothing to convert: the caller's model itself, no copy
    assert object.__getattribute__(model, "_prepared") is object.__getattribute__(model, "_model")

    model.use_dtype("bfloat16")
    rm_runner.switch_device("cpu")
    assert object.__getattribute__(model, "_prepared").dtype == torch.bfloat16  # runs in bfloat16 ...
    model.generate(**inputs, max_new_tokens=6, do_sample=False)
    after = dict(model.named_parameters())  # ... while the caller's model stays float32, bit for bit
    assert after.keys() == before.keys()
    for name, p in after.items():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name

    model.use_dtype("float32")  # and back: nothing was lost on the way
    rm_runner.switch_device("cpu")
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected)
