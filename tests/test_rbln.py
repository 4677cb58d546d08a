"""The RBLN backend without an NPU: option mapping, compile cache, availability, end to end on stand-ins.

Stand-ins for the SDK (tests/stand_ins) record what rm_runner asks for; the test that needs a
real NPU skips with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rm_runner.backends import rbln_compile_cache
from rm_runner.backends.rbln import RBLNBackend, RBLNOptions
from rm_runner.models.tiny_random import TinyRandom
from tests.conftest import cli

STAND_INS = Path(__file__).parent / "stand_ins"


@pytest.fixture()
def sdk(tmp_path: Path) -> dict[str, str]:
    """Environment for a CLI run that sees the stand-in SDK and logs its calls."""
    return {"PYTHONPATH": f"{STAND_INS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "RBLN_STANDIN_LOG": str(tmp_path / "sdk-calls.jsonl"), "RM_RUNNER_CACHE": str(tmp_path / "cache")}


def calls(env: dict[str, str]) -> list[dict]:
    path = Path(env["RBLN_STANDIN_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_option_maps_to_its_rbln_keyword() -> None:
    options = RBLNOptions(batch_size=4, num_devices=2, kvcache_block_size=4096, kvcache_partition_len=16384,
                          prefill_chunk_size=128, attn_impl="flash_attn", dtype="bfloat16",
                          extra={"rbln_foo": 1, "bar": 2})
    assert options.compile_options(max_model_len=8192) == {
        "rbln_batch_size": 4, "rbln_max_seq_len": 8192, "rbln_num_devices": 2, "rbln_kvcache_block_size": 4096,
        "rbln_kvcache_partition_len": 16384, "rbln_prefill_chunk_size": 128, "rbln_attn_impl": "flash_attn",
        "rbln_dtype": "bfloat16", "rbln_foo": 1, "rbln_bar": 2,
    }
    assert RBLNOptions(max_seq_len=1024).compile_options(8192) == {"rbln_batch_size": 1, "rbln_max_seq_len": 1024}


def test_cache_key_covers_model_options_and_versions(tmp_path: Path, monkeypatch) -> None:
    model = Path(TinyRandom().resolve())
    base, _ = rbln_compile_cache.cache_key(model, {"rbln_batch_size": 1})
    assert rbln_compile_cache.cache_key(model, {"rbln_batch_size": 1})[0] == base
    assert rbln_compile_cache.cache_key(model, {"rbln_batch_size": 2})[0] != base
    assert rbln_compile_cache.cache_key(Path(TinyRandom(seed=1).resolve()), {"rbln_batch_size": 1})[0] != base
    monkeypatch.setattr(rbln_compile_cache, "_version", lambda package: f"{package}-9.9")
    assert rbln_compile_cache.cache_key(model, {"rbln_batch_size": 1})[0] != base


def test_compiled_folder_detection(tmp_path: Path) -> None:
    assert not rbln_compile_cache.is_compiled(tmp_path)
    (tmp_path / "rbln_config.json").write_text("{}")
    assert not rbln_compile_cache.is_compiled(tmp_path)
    (tmp_path / "decoder.rbln").write_bytes(b"")
    assert rbln_compile_cache.is_compiled(tmp_path)


def test_compiles_once_then_hits_the_cache(sdk: dict[str, str], tmp_path: Path) -> None:
    args = ("device=rbln", "device.mode=optimum", "device.batch_size=4", "model=tiny-random", "engine.batch_size=4",
            "generation.max_new_tokens=4")
    first = cli(*args, f"hydra.run.dir={tmp_path}/first", env=sdk)
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli(*args, f"hydra.run.dir={tmp_path}/second", env=sdk)
    assert second.returncode == 0, second.stderr[-3000:]
    reports = [json.loads((tmp_path / run / "metrics.json").read_text())["engine"]["backend"]
               for run in ("first", "second")]
    assert [r["cache"] for r in reports] == ["miss", "hit"]
    assert reports[0]["compile_s"] > 0 and reports[1]["compile_s"] == 0
    assert reports[0]["compiled_dir"] == reports[1]["compiled_dir"]
    exports = [c for c in calls(sdk) if c["call"] == "from_pretrained" and c["export"]]
    assert len(exports) == 1  # compiled once
    assert exports[0]["kwargs"] == {"rbln_create_runtimes": False, "rbln_batch_size": 4, "rbln_max_seq_len": 2048}
    loads = [c for c in calls(sdk) if c["call"] == "from_pretrained" and not c["export"]]
    assert [c["model_id"] for c in loads] == [reports[0]["compiled_dir"]] * 2
    records = [json.loads(line) for line in (tmp_path / "first" / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["output_tokens"] >= 1 for r in records)


def test_a_precompiled_folder_is_used_as_is(sdk: dict[str, str], tmp_path: Path) -> None:
    compiled = tmp_path / "compiled"
    import shutil

    shutil.copytree(TinyRandom().resolve(), compiled)
    (compiled / "rbln_config.json").write_text("{}")
    (compiled / "model.rbln").write_bytes(b"")
    proc = cli("device=rbln", "device.mode=optimum", "model=local", f"model.source.path={compiled}",
               "generation.max_new_tokens=2", f"hydra.run.dir={tmp_path}/run", env=sdk)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["engine"]["backend"]["cache"] == "precompiled"
    assert not [c for c in calls(sdk) if c.get("export")]


@pytest.mark.parametrize(
    ("with_sdk", "npus", "overrides", "message"),
    [
        (False, "1", [], "neither optimum-rbln nor vllm-rbln is installed"),
        (True, "0", [], "no RBLN NPU found (rebel.get_npu_count() == 0)"),
        (True, "1", ["device.mode=vllm"], "device.mode=vllm needs vllm-rbln, which is not installed"),
    ],
)
def test_availability_names_what_is_missing(sdk, tmp_path: Path, with_sdk, npus, overrides, message) -> None:
    run_env = {**sdk, "RBLN_STANDIN_NPUS": npus} if with_sdk else {}
    proc = cli("device=rbln", *overrides, "model=tiny-random", f"hydra.run.dir={tmp_path}/run", env=run_env)
    assert proc.returncode == 1
    assert message in json.loads((tmp_path / "run" / "status.json").read_text())["reason"]


def test_compiler_missing_is_named(tmp_path: Path) -> None:
    only_optimum = tmp_path / "sdk"
    import shutil

    shutil.copytree(STAND_INS / "optimum", only_optimum / "optimum")
    proc = cli("device=rbln", "model=tiny-random", f"hydra.run.dir={tmp_path}/run",
               env={"PYTHONPATH": str(only_optimum)})
    assert proc.returncode == 1
    assert "the RBLN compiler (python module 'rebel') is not installed" in proc.stderr


@pytest.mark.skipif(not RBLNBackend.is_available(), reason=f"needs an RBLN NPU: {RBLNBackend.is_available().describe()}")
def test_real_npu_generates(tmp_path: Path) -> None:
    proc = cli("device=rbln", "generation.max_new_tokens=8", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
