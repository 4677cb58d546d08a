"""pipeline=parity on the tiny random model: the same prompts on a reference and a target, compared."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rm_runner.errors import ConfigError, RunnerError
from rm_runner.pipeline.parity import Side, compare
from rm_runner.rundir import RunDir
from tests.conftest import cli

SHORT = ("pipeline=parity", "generation.max_new_tokens=16")


def hook_state() -> tuple:
    """The active backend and the patched classes' own ``from_pretrained``: parity must leave them as found."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from rm_runner.hooks.api import active_backend

    return active_backend(), AutoModelForCausalLM.__dict__.get("from_pretrained"), \
        PreTrainedModel.__dict__.get("from_pretrained")


def test_same_device_and_dtype_match_exactly(tiny) -> None:
    before = hook_state()
    rd = tiny(*SHORT)
    assert rd.read_json("status.json")["status"] == "ok"
    records = rd.read_jsonl("parity.jsonl")
    assert len(records) == 4
    for r in records:
        assert r["match"] and r["first_divergence"] is None
        assert r["reference_tokens"] == r["target_tokens"] and 0 < len(r["target_tokens"]) <= 16
        assert r["max_logprob_diff"] is not None and r["max_logprob_diff"] < 1e-4
    summary = rd.read_json("metrics.json")["parity"]
    assert summary["reference"] == {"device": "cpu", "dtype": "float32"}
    assert summary["target"] == {"device": "cpu", "dtype": "float32"}
    assert (summary["prompts"], summary["matched"], summary["match_fraction"], summary["passed"]) == (4, 4, 1.0, True)
    assert summary["max_logprob_diff"] < 1e-4 and summary["max_logprob_diff_threshold"] is None
    assert hook_state() == before and before[0] is None

    # The reference side is what a plain generate run of the same model gives.
    plain = tiny("generation.max_new_tokens=16")
    assert [r["reference_tokens"] for r in records] == [g["token_ids"] for g in plain.read_jsonl("generations.jsonl")]


def test_bfloat16_target_differs_and_a_logprob_threshold_fails_it(tiny, tmp_path: Path) -> None:
    before = hook_state()
    loose = tiny(*SHORT, "model.dtype=bfloat16", "parity.min_match_fraction=0")
    summary = loose.read_json("metrics.json")["parity"]
    assert summary["passed"] and summary["target"] == {"device": "cpu", "dtype": "bfloat16"}
    # bfloat16 weights really were used: float32 against itself stays under 1e-4 (test above).
    assert summary["max_logprob_diff"] > 1e-3
    records = loose.read_jsonl("parity.jsonl")
    diverged = [r for r in records if not r["match"]]
    for r in diverged:
        i = r["first_divergence"]
        assert r["reference_tokens"][:i] == r["target_tokens"][:i]
        assert r["reference_tokens"][i] != r["target_tokens"][i]
    assert summary["matched"] == sum(r["reference_tokens"] == r["target_tokens"] for r in records)

    with pytest.raises(RunnerError, match=r"parity failed: .*parity.max_logprob_diff=1e-06"):
        tiny(*SHORT, "model.dtype=bfloat16", "parity.min_match_fraction=0", "parity.max_logprob_diff=1e-6")
    strict = RunDir(tmp_path / "run1")
    status = strict.read_json("status.json")
    assert status["status"] == "failed" and status["error"] == "RunnerError"
    assert "parity.max_logprob_diff=1e-06" in status["reason"]
    assert len(strict.read_jsonl("parity.jsonl")) == 4  # the evidence stays on disk
    failed = strict.read_json("metrics.json")["parity"]
    assert failed["passed"] is False and failed["max_logprob_diff_threshold"] == 1e-6
    assert hook_state() == before  # deactivated after a failure too


def test_cli_prints_the_verdict_and_exits_1_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = cli(*SHORT, "model=tiny-random", "model.dtype=bfloat16", "parity.max_logprob_diff=1e-6",
                 f"hydra.run.dir={out}")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "parity: cpu/float32 (reference) vs cpu/bfloat16 (target)" in result.stdout
    assert "FAILED:" in result.stdout and "limit 1e-06" in result.stdout
    assert "Traceback" not in result.stderr and "parity failed:" in result.stderr
    assert RunDir(out).read_json("status.json")["status"] == "failed"
    assert (out / "parity.jsonl").exists()


def test_an_unknown_reference_device_is_named_before_loading(tiny) -> None:
    with pytest.raises(ConfigError, match=r"^parity.reference_device=tpu is not a registered backend; "
                                          r"registered: auto, .*cpu"):
        tiny(*SHORT, "parity.reference_device=tpu")


@pytest.mark.parametrize(("override", "message"), [
    ("parity.max_logprob_diff=-0.1", "parity.max_logprob_diff must be >= 0 or null, got -0.1"),
    ("parity.min_match_fraction=1.5", "parity.min_match_fraction must be in [0, 1], got 1.5"),
])
def test_parity_thresholds_out_of_range_are_named(tiny, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny(*SHORT, override)


def test_cli_unavailable_target_fails_before_loading(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "gpu"
    result = cli(*SHORT, "model=tiny-random", "device=gpu", f"hydra.run.dir={out}")
    assert result.returncode == 1
    assert "device=gpu is not available here" in result.stderr and "Fix:" in result.stderr
    status = RunDir(out).read_json("status.json")
    assert status["status"] == "failed" and status["error"] == "DeviceUnavailableError"
    assert not (out / "parity.jsonl").exists()


def test_logprobs_are_compared_only_before_the_divergence() -> None:
    same = compare("a", Side([1, 2, 3], [-0.1, -0.2, -0.3]), Side([1, 2, 3], [-0.1, -0.25, -0.3]))
    assert same["match"] and same["first_divergence"] is None and same["max_logprob_diff"] == pytest.approx(0.05)
    # After token 1 the two continue from different text: the -9 is not compared.
    split = compare("b", Side([1, 2, 3], [-0.1, -0.2, -0.3]), Side([1, 5, 3], [-0.15, -9.0, -0.3]))
    assert not split["match"] and split["first_divergence"] == 1 and split["max_logprob_diff"] == pytest.approx(0.05)
    shorter = compare("c", Side([1, 2], None), Side([1, 2, 7], [-0.1, -0.2, -0.3]))
    assert shorter["first_divergence"] == 2 and shorter["max_logprob_diff"] is None
    first = compare("d", Side([4], [-1.0]), Side([5], [-1.1]))
    assert first["first_divergence"] == 0 and first["max_logprob_diff"] is None
