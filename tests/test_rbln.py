"""The RBLN backend without an NPU and without optimum-rbln: option mapping, the compile-cache key,
availability through the SDK's own device calls, the tools, vLLM-RBLN's flags and environment,
and the batch and length rules of a compiled model.

The SDK's compiler module is the test-only ``rebel`` of tests/stand_ins (only the names the real
SDK calls). The real optimum-rbln runs in tests/test_rbln_sdk.py; the test that needs a real NPU
skips with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rm_runner.backends import rbln, rbln_compile_cache
from rm_runner.backends.rbln import CompiledBatches, RBLNBackend, RBLNOptions, smi_rows
from rm_runner.engines.vllm_devices import RBLNVLLM, vllm_device
from rm_runner.errors import ConfigError, RunnerError
from rm_runner.models.tiny_random import TinyRandom

STAND_INS = Path(__file__).parent / "stand_ins"


def model_config(name: str = "tiny-random", dtype: str = "float32", max_model_len: int = 2048) -> SimpleNamespace:
    return SimpleNamespace(name=name, dtype=dtype, max_model_len=max_model_len)


@pytest.fixture()
def rebel(monkeypatch, tmp_path: Path):
    """The stand-in ``rebel``, importable in this process, logging its calls; dropped afterwards.
    The availability checks see optimum-rbln as installed (they only look it up)."""
    monkeypatch.syspath_prepend(str(STAND_INS))
    monkeypatch.setenv("RBLN_STANDIN_LOG", str(tmp_path / "sdk-calls.jsonl"))
    monkeypatch.setattr(rbln, "_installed", lambda module: module in ("rebel", "optimum.rbln"))
    import rebel as module

    yield module
    for name in [m for m in sys.modules if m == "rebel" or m.startswith("rebel.")]:
        del sys.modules[name]


def calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "sdk-calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_option_maps_to_its_rbln_keyword() -> None:
    options = RBLNOptions(batch_size=4, num_devices=2, kvcache_block_size=4096, kvcache_partition_len=16384,
                          prefill_chunk_size=128, attn_impl="flash_attn", npu="RBLN-CA25",
                          extra={"rbln_foo": 1, "bar": 2})
    assert options.compile_options(model_config(max_model_len=8192, dtype="bfloat16")) == {
        "rbln_batch_size": 4, "rbln_max_seq_len": 8192, "rbln_num_devices": 2, "rbln_kvcache_block_size": 4096,
        "rbln_kvcache_partition_len": 16384, "rbln_prefill_chunk_size": 128, "rbln_attn_impl": "flash_attn",
        "rbln_npu": "RBLN-CA25", "rbln_foo": 1, "rbln_bar": 2, "dtype": "bfloat16",
    }
    assert RBLNOptions(max_seq_len=1024).compile_options(model_config()) == {
        "rbln_batch_size": 1, "rbln_max_seq_len": 1024, "dtype": "float32"}


def test_the_compile_dtype_is_the_model_dtype_not_rbln_dtype() -> None:
    """optimum-rbln overwrites rbln_config.dtype with the loaded model's (modeling_base.update_rbln_config):
    the dtype must reach from_pretrained as dtype=, and an rbln_dtype would do nothing."""
    assert not hasattr(RBLNOptions(), "dtype")
    assert RBLNOptions().compile_options(model_config(dtype="bfloat16"))["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="extra.dtype .* model.dtype"):
        RBLNOptions(extra={"dtype": "float16"})


def test_llama3_is_sharded_over_four_npus_and_device_ids_must_match() -> None:
    assert RBLNOptions().compile_options(model_config(name="llama3"))["rbln_num_devices"] == 4
    assert RBLNOptions(num_devices=8).compile_options(model_config(name="llama3"))["rbln_num_devices"] == 8
    assert "rbln_num_devices" not in RBLNOptions().compile_options(model_config())
    assert RBLNOptions(device=[2, 3], num_devices=2).resolved_num_devices("tiny-random") == 2
    with pytest.raises(ConfigError, match=r"device.device lists 2 NPU ids \[0, 1\] but device.num_devices \(null: 1\)"):
        RBLNOptions(device=[0, 1]).resolved_num_devices("tiny-random")
    with pytest.raises(ConfigError, match="device.num_devices_by_model.llama3 is 4"):
        RBLNOptions(device=[0]).resolved_num_devices("llama3")


def test_the_shipped_configs_agree_with_the_options() -> None:
    from tests.conftest import compose_run

    cfg = compose_run("device=rbln", "model=llama3")
    assert cfg.device.num_devices_by_model.llama3 == 4 == RBLNOptions().num_devices_by_model["llama3"]
    options = {k: v for k, v in cfg.device.items() if k != "_target_"}
    assert RBLNOptions(**options).compile_options(cfg.model)["rbln_num_devices"] == 4


def copy_model(tmp_path: Path, name: str = "model") -> Path:
    target = tmp_path / name
    shutil.copytree(TinyRandom().resolve(), target)
    return target


def test_cache_key_covers_contents_options_npu_and_versions(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RM_RUNNER_CACHE", str(tmp_path / "cache"))
    model = copy_model(tmp_path)
    options = {"rbln_batch_size": 1, "dtype": "float32"}

    def key(**changed) -> str:
        return rbln_compile_cache.cache_key(model, changed.get("options", options), changed.get("npu", "RBLN-CA25"))[0]

    base = key()
    assert key() == base
    assert key(options={**options, "rbln_batch_size": 2}) != base
    assert key(options={**options, "dtype": "bfloat16"}) != base
    assert key(npu="RBLN-CR13") != base  # another card family's artifact
    # a fine-tune saved over the same file: same name, same size, other bytes
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert key() != base
    after_weights = key()
    for copied in ("tokenizer.json", "generation_config.json"):  # both are copied into the compiled folder
        (model / copied).write_text((model / copied).read_text().replace("\n", " \n", 1))
        assert key() != after_weights
        after_weights = key()
    monkeypatch.setattr(rbln_compile_cache, "_version", lambda package: f"{package}-9.9")
    assert key() != after_weights


def test_weights_are_hashed_once_per_file_version(tmp_path: Path, monkeypatch) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    read = []
    real = rbln_compile_cache._sha256
    monkeypatch.setattr(rbln_compile_cache, "_sha256", lambda path: read.append(path) or real(path))
    first = rbln_compile_cache.weights_digest(weights, tmp_path / "memo")
    assert rbln_compile_cache.weights_digest(weights, tmp_path / "memo") == first and len(read) == 1
    os.utime(weights, ns=(1, 1))  # rewritten in place: read again
    assert rbln_compile_cache.weights_digest(weights, tmp_path / "memo") == first and len(read) == 2
    blob = tmp_path / "blobs" / ("ab" * 32)  # a Hugging Face cache blob is named by its sha256
    blob.parent.mkdir()
    blob.write_bytes(b"big")
    (tmp_path / "snapshot.safetensors").symlink_to(blob)
    assert rbln_compile_cache.weights_digest(tmp_path / "snapshot.safetensors", tmp_path / "memo") == "ab" * 32
    assert len(read) == 2


def test_compiled_folder_detection(tmp_path: Path) -> None:
    assert not rbln_compile_cache.is_compiled(tmp_path)
    (tmp_path / "rbln_config.json").write_text("{}")
    assert not rbln_compile_cache.is_compiled(tmp_path)
    (tmp_path / "decoder.rbln").write_bytes(b"")
    assert rbln_compile_cache.is_compiled(tmp_path)


def test_availability_uses_the_sdks_own_device_calls(rebel, tmp_path: Path, monkeypatch) -> None:
    assert RBLNBackend._npu_present()
    asked = {c["call"] for c in calls(tmp_path)}
    assert "device_count" in asked and not hasattr(rebel, "__all__")
    with pytest.raises(AttributeError, match="get_npu_count is not mirrored"):
        rebel.get_npu_count()  # what the backend used to call: neither SDK package does
    assert RBLNBackend(device=[0, 1], num_devices=2).availability().describe().startswith(
        "device.device names NPU [1], which rebel.get_npu_name() does not find (1 NPU(s) here)")
    assert "device.num_devices=2 but rebel.device_count() == 1" in RBLNBackend(num_devices=2).availability().reason
    monkeypatch.setenv("RBLN_STANDIN_NPUS", "0")
    assert RBLNBackend._npu_present().describe() == (
        "no RBLN NPU found (rebel.device_count() == 0). Fix: check the NPUs and the driver with `rbln-smi`")
    monkeypatch.setenv("RBLN_STANDIN_DRIVER_ERROR", "rbln0: device is busy")
    assert RBLNBackend._npu_present().reason == "the RBLN driver did not answer: rbln0: device is busy"


def test_missing_packages_are_named(monkeypatch) -> None:
    monkeypatch.setattr(rbln, "_installed", lambda module: False)
    assert "neither optimum-rbln nor vllm-rbln is installed" in RBLNBackend.is_available().reason
    assert "download.pytorch.org/whl/cpu" in RBLNBackend.is_available().fix  # optimum-rbln's +cpu torch pins
    assert "vllm-rbln, which is not installed" in RBLNBackend(mode="vllm").availability().reason
    monkeypatch.setattr(rbln, "_installed", lambda module: module == "optimum.rbln")
    missing = RBLNBackend(mode="optimum").availability()
    assert missing.reason == "the RBLN compiler (python module 'rebel') is not installed"
    assert "pypi.rbln.ai" in missing.fix and "rebel-compiler>=0.12,<0.13" in missing.fix


RBLN_SMI = """\
+-------------------------------------------------------------------------------------------------+
|                                Device Information KMD ver: 3.5.1                                |
+-----+-----------+---------+---------------+------+---------+------+---------------------+-------+
| NPU |    Name   |  Device |   PCI BUS ID  | Temp |  Power  | Perf |  Memory(used/total) |  Util |
+=====+===========+=========+===============+======+=========+======+=====================+=======+
| 0   | RBLN-CA25 | rbln0   |  0000:03:00.0 |  38C |  100.0W |  P14 |    0.0B / 15.7GiB   |   0.0 |
| 1   |           | rbln1   |  0000:04:00.0 |  36C |  100.0W |  P14 |    0.0B / 15.7GiB   |   0.0 |
+-----+-----------+---------+---------------+------+---------+------+---------------------+-------+
"""


def test_hardware_comes_from_rbln_smi_with_grouped_rows(tmp_path: Path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rbln-smi").write_text(f"#!/bin/sh\ncat <<'EOF'\n{RBLN_SMI}EOF\n")
    (bin_dir / "rbln-stat").write_text("#!/bin/sh\necho '| 9 | RBLN-CA02 | rbln9 | 0000:ff:00.0 |'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert RBLNBackend.hardware() == [
        "NPU 0: RBLN-CA25 rbln0 0000:03:00.0 0.0B / 15.7GiB",
        "NPU 1: (in the RSD group above) rbln1 0000:04:00.0 0.0B / 15.7GiB",
    ]
    (bin_dir / "rbln-smi").unlink()  # a driver older than SDK 0.10.4 has only rbln-stat
    assert RBLNBackend.hardware() == ["NPU 9: RBLN-CA02 rbln9 0000:ff:00.0"]
    assert smi_rows("no NPU here") == []


def compiled_folder(tmp_path: Path, **config) -> Path:
    folder = copy_model(tmp_path, "compiled")
    (folder / "rbln_config.json").write_text(json.dumps(
        {"batch_size": 4, "decoder_batch_sizes": [4], "max_seq_len": 1024, "kvcache_block_size": 1024,
         "prefill_chunk_size": 128, "attn_impl": "eager", "dtype": "float32", **config}))
    (folder / "prefill.rbln").write_bytes(b"")
    return folder


def test_vllm_rbln_gets_the_compiled_shapes_and_its_device_variable(tmp_path: Path, monkeypatch) -> None:
    folder = compiled_folder(tmp_path)
    backend = RBLNBackend(batch_size=1, device=[2, 3], num_devices=2)  # the folder, not the options, decides
    settings = RBLNVLLM().settings(backend, folder, model_config())
    assert settings.model == folder
    assert settings.args == ["--max-num-seqs", "4", "--max-model-len", "1024", "--block-size", "1024"]
    assert settings.env == {"RBLN_VISIBLE_DEVICES": "2,3"}  # vllm-rbln 0.12 deprecates RBLN_DEVICES
    assert backend.describe()["cache"] == "precompiled"
    assert vllm_device("rbln").modules == ("vllm", "vllm_rbln")  # the server imports the platform plugin too
    monkeypatch.delenv("RBLN_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(rbln, "_installed", lambda module: module == "vllm_rbln")
    RBLNBackend(mode="vllm", device=[1]).initialize()
    assert os.environ["RBLN_VISIBLE_DEVICES"] == "1" and "RBLN_DEVICES" not in os.environ


def test_engine_vllm_names_the_missing_compiler_in_this_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(rbln, "_installed", lambda module: False)
    with pytest.raises(RunnerError, match="compiles the model in this process .* optimum-rbln is not installed here"):
        RBLNVLLM().settings(RBLNBackend(), copy_model(tmp_path), model_config())


def test_auto_dtype_is_keyed_by_what_the_checkpoint_loads_in(rebel, tmp_path: Path, monkeypatch) -> None:
    compiled = []

    def compile(self, source: Path, out: Path, options: dict) -> None:
        compiled.append(options)
        (out / "rbln_config.json").write_text("{}")
        (out / "prefill.rbln").write_bytes(b"")

    monkeypatch.setattr(RBLNBackend, "_compile", compile)
    model = copy_model(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (model / "config.json").write_text(json.dumps(config))
    backend = RBLNBackend(cache_dir=str(tmp_path / "cache"))
    folder = backend.compiled_dir(model, model_config(dtype="auto"))
    assert compiled[0]["dtype"] == "bfloat16" and backend.report["npu"] == "RBLN-CA25"
    record = json.loads((folder / "rm_runner_cache_key.json").read_text())
    assert record["options"]["dtype"] == "bfloat16" and record["npu"] == "RBLN-CA25"
    assert RBLNBackend(cache_dir=str(tmp_path / "cache")).compiled_dir(model, model_config(dtype="bfloat16")) == folder


def test_device_ids_must_match_a_precompiled_folder(tmp_path: Path) -> None:
    folder = compiled_folder(tmp_path, _compile_cfgs=[{"compiled_model_name": "prefill", "num_devices": 2}])
    with pytest.raises(ConfigError, match=r"device.device lists 1 NPU ids \[0\]; .* was compiled for 2 NPUs"):
        RBLNBackend(mode="optimum", device=[0]).prepare_model(folder, model_config())


def test_batches_are_cut_to_the_compiled_sizes() -> None:
    one = CompiledBatches(SimpleNamespace(batch_size=1, decoder_batch_sizes=[1], max_seq_len=64))
    assert one.chunks(4) == [(0, 1, 1), (1, 2, 1), (2, 3, 1), (3, 4, 1)]
    four = CompiledBatches(SimpleNamespace(batch_size=4, decoder_batch_sizes=[4], max_seq_len=64))
    assert four.chunks(7) == [(0, 4, 4), (4, 7, 4)]  # the short last chunk is padded to 4
    several = CompiledBatches(SimpleNamespace(batch_size=4, decoder_batch_sizes=[4, 2, 1], max_seq_len=64))
    assert several.chunks(7) == [(0, 4, 4), (4, 7, 4)] and several.chunks(2) == [(0, 2, 2)]


def test_prompts_are_held_to_the_compiled_length() -> None:
    import torch

    batches = CompiledBatches(SimpleNamespace(batch_size=1, decoder_batch_sizes=[1], max_seq_len=16))
    inputs = {"input_ids": torch.ones(2, 12, dtype=torch.long), "attention_mask": torch.ones(2, 12)}
    batches.check_lengths(inputs, 4)
    with pytest.raises(ConfigError, match=r"12 tokens \+ 5 new tokens exceeds the compiled max_seq_len=16 "
                                          r"\(device.max_seq_len"):
        batches.check_lengths(inputs, 5)


def test_an_sdk_refusal_names_rm_runners_options() -> None:
    backend = RBLNBackend(kvcache_block_size=1024)
    options = backend.options.compile_options(model_config())
    message = backend._refused(ValueError(
        " When using 'eager attention', the `kvcache_block_size` (1024)  must always be set equal to the "
        "`max_seq_len` 2048."), options)
    assert message.startswith("device=rbln: optimum-rbln refused the compile options (device.kvcache_block_size=1024, "
                              "device.max_seq_len (null: model.max_model_len=2048)): When using 'eager attention'")


def real_rebel() -> bool:
    """The real compiler is importable here, not the test stand-in."""
    import importlib.util

    spec = importlib.util.find_spec("rebel")
    return spec is not None and not Path(spec.origin or "").is_relative_to(STAND_INS)


@pytest.mark.skipif(not real_rebel() or not RBLNBackend.is_available(),
                    reason=f"needs an RBLN NPU and SDK 0.12: {RBLNBackend.is_available().describe()}")
def test_real_npu_generates(tmp_path: Path) -> None:
    from tests.conftest import cli

    proc = cli("device=rbln", "model=tiny-random", "generation.max_new_tokens=8", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_engine_vllm_asks_the_servers_python_for_vllm_rbln_too(tmp_path) -> None:
    """vLLM serves an NPU only through the vllm-rbln platform plugin: an interpreter with vLLM
    but without it would start a server that cannot see the card."""
    import sys

    from rm_runner.backends.rbln import RBLNBackend
    from rm_runner.engines.vllm import VLLMServerEngine

    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text("")
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    found = VLLMServerEngine.check_environment(str(python), RBLNBackend)
    assert not found and "has no vllm_rbln" in found.reason
