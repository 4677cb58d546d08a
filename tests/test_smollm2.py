"""The packaged real model, driven as a user drives it: the CLI, then a replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rm_runner.replay import main as replay_main
from tests.conftest import cli

pytestmark = pytest.mark.slow


def test_default_job_answers_paris_and_replays_identically(tmp_path: Path, capsys) -> None:
    proc = cli("generation.max_new_tokens=24", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "What is the capital of France?" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    france = next(r for r in records if "France" in r["prompt"])
    assert "Paris" in france["text"]
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "ok"
    assert replay_main([str(tmp_path)]) == 0  # a second run of the same config: same token ids
    assert "replay identical: 4/4" in capsys.readouterr().out


def test_bfloat16_runs_and_differs_in_precision_only(tmp_path: Path) -> None:
    proc = cli("model.dtype=bfloat16", "generation.max_new_tokens=8", "workload.limit=1",
               f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert "Paris" in record["text"]


def test_packed_and_plain_linear_agree_on_the_real_model(tmp_path: Path) -> None:
    runs = {}
    for packed in ("true", "false"):
        proc = cli(f"device.onednn_linear={packed}", "generation.max_new_tokens=32", "generation.ignore_eos=true",
                   "pipeline.steps.generate.print_outputs=false", f"hydra.run.dir={tmp_path}/{packed}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[packed] = [json.loads(line)["token_ids"] for line in (tmp_path / packed / "generations.jsonl").open()]
    assert runs["true"] == runs["false"]
