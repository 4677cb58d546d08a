"""The runner on the tiny random model: run directory contents, determinism, batching, replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rm_runner.replay import main as replay_main
from rm_runner.rundir import RunDir, atomic_write_text
from tests.conftest import REPO, SHARED_W16


def ids(run_dir: RunDir) -> list[list[int]]:
    return [r["token_ids"] for r in run_dir.read_jsonl("generations.jsonl")]


def test_run_directory_is_complete(tiny) -> None:
    rd = tiny("generation.max_new_tokens=8")
    files = {p.name for p in rd.path.iterdir()}
    assert {"config.yaml", "overrides.json", "environment.json", "generations.jsonl", "metrics.json",
            "status.json"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    status = rd.read_json("status.json")
    assert status["status"] == "ok" and status["reason"] is None
    config = yaml.safe_load((rd.path / "config.yaml").read_text())
    assert config["model"]["name"] == "tiny-random" and config["generation"]["max_new_tokens"] == 8
    assert "${" not in (rd.path / "config.yaml").read_text()
    assert rd.read_json("overrides.json") == ["generation.max_new_tokens=8"]
    env = rd.read_json("environment.json")
    assert env["packages"]["torch"].startswith("2.") and env["cpu"]["logical_cores"] >= 1
    assert "openai" in env["packages"]  # declared by the remote backend (a test dependency), not listed here
    assert " cores " in env["devices"]["cpu"][0] and set(env["devices"]) >= {"cpu", "gpu", "rbln"}
    if (REPO / ".git").exists():
        assert len(env["git"]["commit"]) == 40 and isinstance(env["git"]["dirty"], bool)
    records = rd.read_jsonl("generations.jsonl")
    assert len(records) == 4
    for r in records:
        assert set(r) >= {"id", "prompt", "text", "token_ids", "prompt_tokens", "output_tokens", "latency_s",
                          "finish_reason"}
        assert r["output_tokens"] == len(r["token_ids"]) <= 8 and r["prompt_tokens"] > 0 and r["latency_s"] > 0
    metrics = rd.read_json("metrics.json")
    assert metrics["output_tokens"] == sum(r["output_tokens"] for r in records)
    assert metrics["load_time_s"] >= 0 and metrics["generate_time_s"] > 0 and metrics["output_tokens_per_s"] > 0


def test_two_runs_give_identical_greedy_token_ids(tiny) -> None:
    assert ids(tiny("generation.max_new_tokens=16")) == ids(tiny("generation.max_new_tokens=16"))


def test_left_padded_batch_matches_one_prompt_at_a_time(tiny) -> None:
    overrides = ("workload=jsonl", f"workload.path={SHARED_W16}", "workload.limit=6", "generation.max_new_tokens=12",
                 "generation.ignore_eos=true", "workload.chat_template=false")
    batched = tiny(*overrides, "engine.batch_size=6")
    single = tiny(*overrides, "engine.batch_size=1")
    lengths = {r["prompt_tokens"] for r in batched.read_jsonl("generations.jsonl")}
    assert len(lengths) > 1  # the batch really needed padding
    assert ids(batched) == ids(single)


def test_onednn_packed_linear_gives_the_same_tokens(tiny) -> None:
    overrides = ("workload=jsonl", f"workload.path={SHARED_W16}", "workload.limit=8", "generation.max_new_tokens=16",
                 "generation.ignore_eos=true")
    assert ids(tiny(*overrides, "device.onednn_linear=true")) == ids(tiny(*overrides, "device.onednn_linear=false"))


def test_ignore_eos_generates_exactly_max_new_tokens(tiny) -> None:
    rd = tiny("generation.max_new_tokens=10", "generation.ignore_eos=true")
    assert {r["output_tokens"] for r in rd.read_jsonl("generations.jsonl")} == {10}


def test_sampling_is_seeded(tiny) -> None:
    sample = ("generation.do_sample=true", "generation.temperature=1.5", "generation.max_new_tokens=16",
              "generation.ignore_eos=true")
    first, again = ids(tiny(*sample, "generation.seed=1")), ids(tiny(*sample, "generation.seed=1"))
    other = ids(tiny(*sample, "generation.seed=2"))
    assert first == again and first != other


def test_chat_and_jsonl_workloads(tiny, tmp_path: Path) -> None:
    chat = tiny("workload=chat", "generation.max_new_tokens=4").read_jsonl("generations.jsonl")
    assert [r["id"] for r in chat] == ["chat-0", "chat-1"] and chat[1]["prompt"][-1]["content"] == "Another one?"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "the capital"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    records = tiny("workload=jsonl", f"workload.path={prompts}", "generation.max_new_tokens=4").read_jsonl(
        "generations.jsonl")
    assert [r["id"] for r in records] == ["a", "1"]


def test_chat_template_changes_the_prompt(tiny) -> None:
    with_template = tiny("generation.max_new_tokens=2").read_jsonl("generations.jsonl")
    raw = tiny("generation.max_new_tokens=2", "workload.chat_template=false").read_jsonl("generations.jsonl")
    # the template adds the role markers around every prompt
    assert all(a["prompt_tokens"] > b["prompt_tokens"] for a, b in zip(with_template, raw))


def test_replay_reports_identical_then_detects_a_change(tiny, capsys) -> None:
    rd = tiny("generation.max_new_tokens=8")
    assert replay_main([str(rd.path)]) == 0
    assert "replay identical: 4/4" in capsys.readouterr().out
    records = rd.read_jsonl("generations.jsonl")
    records[2]["token_ids"][0] += 1
    rd.write_jsonl("generations.jsonl", records)
    assert replay_main([str(rd.path)]) == 1
    out = capsys.readouterr().out
    assert "request 2: token ids differ from position 0" in out and "3/4" in out


def test_replay_of_a_non_run_directory_fails(tmp_path: Path, capsys) -> None:
    assert replay_main([str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_failure_after_a_step_keeps_finished_results(tiny, tmp_path: Path, monkeypatch) -> None:
    from rm_runner.pipeline import generate

    def broken_print(*args, **kwargs):
        raise RuntimeError("stdout closed")

    monkeypatch.setattr(generate, "print", broken_print, raising=False)
    with pytest.raises(RuntimeError, match="stdout closed"):
        tiny("generation.max_new_tokens=4")
    rd = RunDir(tmp_path / "run0")
    assert rd.read_json("status.json")["reason"] == "RuntimeError: stdout closed"
    assert len(rd.read_jsonl("generations.jsonl")) == 4  # written before the failure, kept


def test_atomic_write_keeps_old_content_on_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    def crash(src, dst):
        raise OSError("no space left on device")

    monkeypatch.setattr("rm_runner.rundir.os.replace", crash)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_environment_keeps_settings_but_never_credentials(tiny, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_other_secret")
    monkeypatch.setenv("VLLM_API_KEY", "sk-secret")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    rd = tiny("generation.max_new_tokens=2")
    assert rd.read_json("environment.json")["env"]["OMP_NUM_THREADS"] == "2"
    everything = "".join(p.read_text(errors="replace") for p in rd.path.rglob("*") if p.is_file())
    assert "secret" not in everything


def test_token_id_requests_run_and_print(tiny, capsys) -> None:
    """Synthetic requests are token ids with no text: printing them ended the run failed."""
    rd = tiny("workload.synthetic.num_prompts=2", "workload.synthetic.input_tokens=5",
              "workload.synthetic.output_tokens=3", "generation.ignore_eos=true")
    assert rd.read_json("status.json")["status"] == "ok"
    records = rd.read_jsonl("generations.jsonl")
    synthetic = [r for r in records if r["id"].startswith("synthetic-")]
    assert [len(r["prompt"]) for r in synthetic] == [5, 5]  # the ids the request asked, as asked
    assert all(isinstance(t, int) for r in synthetic for t in r["prompt"])
    assert "[synthetic-1] <5 token ids>\n    -> " in capsys.readouterr().out


def test_limit_counts_synthetic_prompts_too(tiny) -> None:
    rd = tiny("workload.prompts=[]", "workload.synthetic.num_prompts=5", "workload.limit=2",
              "generation.max_new_tokens=2")
    assert [r["id"] for r in rd.read_jsonl("generations.jsonl")] == ["synthetic-0", "synthetic-1"]
    mixed = tiny("workload.synthetic.num_prompts=3", "workload.limit=5", "generation.max_new_tokens=2")
    assert [r["id"] for r in mixed.read_jsonl("generations.jsonl")] == ["0", "1", "2", "3", "synthetic-0"]


def test_progress_counts_tokens_a_step_at_a_time(tiny, monkeypatch) -> None:
    """One batch holds the whole workload: the bar must move during it, in tokens, and end at the
    tokens really made (rows that stop on EOS end early)."""
    import tqdm.auto

    from rm_runner.engines import local

    updates: list[int] = []
    bars: list = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

        def update(self, n=1):
            updates.append(n)
            return super().update(n)

    monkeypatch.setattr(local, "tqdm", Recording)
    rd = tiny("generation.max_new_tokens=6", "generation.ignore_eos=true", "engine.batch_size=16")
    records = rd.read_jsonl("generations.jsonl")
    assert len(records) == 4 and updates == [4] * 6  # every step, each of the 4 rows one token
    assert bars[0].unit == "tok" and bars[0].n == bars[0].total == sum(r["output_tokens"] for r in records)
