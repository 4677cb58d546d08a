"""The RBLN backend against the real optimum-rbln 0.12, beside the test-only ``rebel`` (tests/stand_ins).

optimum-rbln is the real package: its config validation, its compile path down to
``rebel.compile_from_torch``, its runtime wrappers and its ``generate()``. Only the compiler module
is a stand-in, and its runtime refuses any shape the graph was not compiled for, as the NPU does;
so a batch that is not cut to the compiled sizes fails here as on a card. Needs optimum-rbln,
which the ``.venv-rbln`` CI venv has (see the README); elsewhere these tests skip.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rm_runner.backends.rbln import RBLNBackend
from rm_runner.errors import ConfigError, RunnerError
from rm_runner.models.tiny_random import TinyRandom
from tests.conftest import cli, installed

STAND_INS = Path(__file__).parent / "stand_ins"

pytestmark = [
    pytest.mark.skipif(not installed("optimum.rbln"),
                       reason="needs the real optimum-rbln 0.12: the .venv-rbln CI venv (see the README)"),
    # the stand-in compiler has no package metadata, which optimum-rbln's import checks for
    pytest.mark.filterwarnings("ignore:optimum-rbln requires rebel-compiler:ImportWarning"),
]

PROMPTS = ["the capital of France is", "water is hot and", "he said the", "one two three", "a big house",
           "the river of", "my mother and father"]


class Calls:
    """The stand-in's call log from a point on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size if path.exists() else 0

    def __call__(self, name: str | None = None) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as fh:
            fh.seek(self.start)
            records = [json.loads(line) for line in fh.read().splitlines()]
        return [r for r in records if name is None or r["call"] == name]


@pytest.fixture(scope="module")
def sdk(tmp_path_factory):
    """optimum-rbln imported beside the stand-in ``rebel``; yields the call log's path."""
    log = tmp_path_factory.mktemp("rbln") / "sdk-calls.jsonl"
    saved = {k: os.environ.get(k) for k in ("RBLN_STANDIN_LOG",)}
    os.environ["RBLN_STANDIN_LOG"] = str(log)
    sys.path.insert(0, str(STAND_INS))
    import optimum.rbln  # noqa: F401  (imports rebel: the stand-in)
    import rebel

    assert Path(rebel.__file__).is_relative_to(STAND_INS)
    yield log
    sys.path.remove(str(STAND_INS))
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def tiny() -> Path:
    return TinyRandom().resolve()


def model_config(dtype: str = "float32", max_model_len: int = 2048) -> SimpleNamespace:
    return SimpleNamespace(name="tiny-random", dtype=dtype, max_model_len=max_model_len, trust_remote_code=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rbln-cache")


def prepared(cache: Path, **options) -> tuple[RBLNBackend, object]:
    backend = RBLNBackend(mode="optimum", cache_dir=str(cache), **options)
    backend.initialize()
    return backend, backend.prepare_model(tiny(), model_config())


@pytest.fixture(scope="module")
def batch1(sdk, cache):
    return prepared(cache, batch_size=1)


@pytest.fixture(scope="module")
def batch4(sdk, cache):
    return prepared(cache, batch_size=4)


def left_padded(prompts: list[str]) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny()))
    return dict(tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt"))


def cpu_tokens(inputs: dict, max_new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny()), dtype=torch.float32)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=3)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


GREEDY = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 3, "temperature": None, "top_p": None,
          "top_k": None}


def test_every_option_reaches_the_compiler(sdk, cache) -> None:
    calls = Calls(sdk)
    backend = RBLNBackend(mode="optimum", cache_dir=str(cache), batch_size=2, max_seq_len=512,
                          kvcache_block_size=512, prefill_chunk_size=64, attn_impl="eager", npu="RBLN-CA25",
                          extra={"decoder_batch_sizes": [2, 1]})
    folder = backend.compiled_dir(tiny(), model_config(dtype="bfloat16"))
    compiles = calls("compile_from_torch")
    assert [c["npu"] for c in compiles] == ["RBLN-CA25"] * 3 and {c["num_devices"] for c in compiles} == {None}
    shapes = [{name: (shape, dtype) for name, shape, dtype in c["input_info"]} for c in compiles]
    assert [s["input_ids"][0] for s in shapes] == [[1, 64], [2, 1], [1, 1]]  # prefill chunk, then each decoder
    assert all(s["past_key_values_0"] == ([2, 1, 512, 32], "bfloat16") for s in shapes)  # blocks, kv heads, block, dim
    compiled = json.loads((folder / "rbln_config.json").read_text())
    assert {k: compiled[k] for k in ("batch_size", "decoder_batch_sizes", "max_seq_len", "kvcache_block_size",
                                     "prefill_chunk_size", "attn_impl", "dtype")} == {
        "batch_size": 2, "decoder_batch_sizes": [2, 1], "max_seq_len": 512, "kvcache_block_size": 512,
        "prefill_chunk_size": 64, "attn_impl": "eager", "dtype": "bfloat16"}
    assert backend.report["cache"] == "miss" and backend.report["npu"] == "RBLN-CA25"
    again = RBLNBackend(mode="optimum", cache_dir=str(cache), batch_size=2, max_seq_len=512,
                        kvcache_block_size=512, prefill_chunk_size=64, attn_impl="eager", npu="RBLN-CA25",
                        extra={"decoder_batch_sizes": [2, 1]})
    assert again.compiled_dir(tiny(), model_config(dtype="bfloat16")) == folder
    assert again.report["cache"] == "hit" and len(calls("compile_from_torch")) == 3
    assert again.compiled_dir(folder, model_config()) == folder and again.report["cache"] == "precompiled"


def test_flash_attention_over_two_npus(sdk, cache, monkeypatch) -> None:
    monkeypatch.setenv("RBLN_STANDIN_NPUS", "2")
    calls = Calls(sdk)
    backend, model = prepared(cache, num_devices=2, attn_impl="flash_attn", max_seq_len=2048,
                              kvcache_partition_len=1024, kvcache_block_size=1024, extra={"kvcache_num_blocks": 3})
    compiles = calls("compile_from_torch")
    assert {c["num_devices"] for c in compiles} == {2}
    assert all(["past_key_values_1", [3, 1, 1024, 32], "float32"] in c["input_info"] for c in compiles)
    assert {tuple(r["device"]) for r in calls("Runtime")} == {(0, 1)}  # 0..n-1, optimum-rbln's own default
    inputs = left_padded(PROMPTS[:1])
    out = backend.execute(model, inputs, **GREEDY)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == cpu_tokens(inputs, 6)


def test_an_invalid_combination_fails_before_compiling(sdk, cache) -> None:
    calls = Calls(sdk)
    backend = RBLNBackend(mode="optimum", cache_dir=str(cache), kvcache_block_size=1024)  # eager: must be 2048
    with pytest.raises(ConfigError) as refused:
        backend.compiled_dir(tiny(), model_config())
    assert str(refused.value).startswith(
        "device=rbln: optimum-rbln refused the compile options (device.kvcache_block_size=1024, "
        "device.max_seq_len (null: model.max_model_len=2048)): When using 'eager attention', the "
        "`kvcache_block_size` (1024)  must always be set equal to the `max_seq_len` 2048.")
    assert calls("compile_from_torch") == []
    assert not [p for p in cache.iterdir() if p.is_dir() and "tmp" in p.name]


def test_the_compiled_shapes_are_enforced(batch1) -> None:
    """Why rm_runner cuts batches: the SDK and the runtime refuse what was not compiled."""
    import torch

    _, model = batch1
    with pytest.raises(ValueError, match=r"Input's batch\(2\) exceeds compiled batch_size\(1\)"):
        model.generate(**left_padded(PROMPTS[:2]), **GREEDY)
    with pytest.raises(RuntimeError, match=r"decoder_batch_1 input input_ids is \[2, 1\] .*compiled for \[1, 1\]"):
        model.decoders[1].runtime(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.int32),
                                  torch.zeros(2, 1, dtype=torch.int16))


@pytest.mark.parametrize(("fixture", "rows"), [("batch1", 4), ("batch4", 7)])
def test_batches_are_cut_and_padded_and_give_the_cpus_tokens(request, sdk, fixture, rows) -> None:
    """4 prompts on a model compiled for batch 1; 7 on one compiled for 4 (a last batch of 3)."""
    backend, model = request.getfixturevalue(fixture)
    calls = Calls(sdk)
    inputs = left_padded(PROMPTS[:rows])
    out = backend.execute(model, inputs, **GREEDY)
    assert out.shape[0] == rows
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == cpu_tokens(inputs, 6)
    compiled = model.rbln_config.batch_size
    assert {r["shapes"][0][0] for r in calls("Runtime.run") if r["model"].startswith("decoder")} == {compiled}


def test_one_row_with_scores_on_a_batch_of_four(batch4) -> None:
    """parity asks one prompt at a time, with scores: padded to the compiled batch, the padding dropped."""
    backend, model = batch4
    inputs = left_padded(PROMPTS[:1])
    out = backend.execute(model, inputs, **GREEDY, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 1 and {s.shape[0] for s in out.scores} == {1}
    assert out.sequences[:, inputs["input_ids"].shape[1]:].tolist() == cpu_tokens(inputs, 6)


def test_stopping_criteria_see_only_real_rows(batch4) -> None:
    from transformers import StoppingCriteria, StoppingCriteriaList

    seen = []

    class Watch(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            seen.append(input_ids.shape[0])
            import torch

            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    backend, model = batch4
    backend.execute(model, left_padded(PROMPTS[:3]), **GREEDY, stopping_criteria=StoppingCriteriaList([Watch()]))
    assert seen and set(seen) == {3}
    with pytest.raises(RunnerError, match="at most device.batch_size=4 rows per generate"):
        backend.execute(model, left_padded(PROMPTS), **GREEDY, stopping_criteria=StoppingCriteriaList([Watch()]))


def test_a_prompt_longer_than_the_compiled_length_is_named(sdk, cache) -> None:
    backend, model = prepared(cache, max_seq_len=256, kvcache_block_size=256)
    inputs = left_padded([" ".join(["the"] * 252)])  # 252 + 6 new > 256
    with pytest.raises(ConfigError, match=r"compiled max_seq_len=256 \(device.max_seq_len"):
        backend.execute(model, inputs, **GREEDY)


def test_npus_that_are_not_there_are_named(sdk, cache) -> None:
    backend = RBLNBackend(mode="optimum", cache_dir=str(cache), device=[5])
    with pytest.raises(RunnerError, match=r"did not load onto the NPU \(device.device=\[5\]\).*NPU \[5\] not found"):
        backend.prepare_model(tiny(), model_config())


def test_the_cli_compiles_through_the_sdk_and_matches_the_cpu(tmp_path: Path, tiny) -> None:
    """python -m rm_runner device=rbln model=tiny-random, as a user runs it: defaults (batch 1, 4 prompts)."""
    env = {"PYTHONPATH": f"{STAND_INS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RBLN_STANDIN_LOG": str(tmp_path / "calls.jsonl"), "RM_RUNNER_CACHE": str(tmp_path / "cache")}
    proc = cli("device=rbln", "model=tiny-random", "generation.max_new_tokens=4", f"hydra.run.dir={tmp_path}/rbln",
               env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpu = tiny("device=cpu", "generation.max_new_tokens=4").path

    def tokens(run: Path) -> list[list[int]]:
        return [json.loads(line)["token_ids"] for line in (run / "generations.jsonl").read_text().splitlines()]

    assert len(tokens(tmp_path / "rbln")) == 4 and tokens(tmp_path / "rbln") == tokens(cpu)
    calls = Calls.__new__(Calls)
    calls.path, calls.start = tmp_path / "calls.jsonl", 0
    assert calls("device_count") and calls("get_npu_name") and len(calls("compile_from_torch")) == 2
    backend = json.loads((tmp_path / "rbln" / "metrics.json").read_text())["engine"]["backend"]
    assert backend["cache"] == "miss" and backend["compiled"]["batch_size"] == 1 and backend["npu"] == "RBLN-CA25"


FAKE_SERVER = '''\
import json, os, sys
if sys.argv[1] == "-c":  # rm_runner's module probe (pyenv): answer that this venv has what is asked
    modules, dists = json.loads(sys.argv[3])
    print(json.dumps({"python": "3.11", "modules": {m: True for m in modules}, "versions": {d: None for d in dists}}))
    sys.exit(0)
with open(os.environ["FAKE_SERVER_RECORD"], "w") as fh:
    json.dump({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items() if k.startswith("RBLN")}}, fh)
sys.exit(3)
'''


def test_engine_vllm_hands_the_compiled_folder_and_vllm_rbln_flags_to_the_server(tmp_path: Path) -> None:
    """engine=vllm device=rbln without a card: the parent compiles, then starts the server interpreter
    with the compiled folder, the compiled shapes as vLLM flags and RBLN_VISIBLE_DEVICES; a stand-in
    for that interpreter records what it was given and exits, as a server that cannot start."""
    server = tmp_path / "server-python"
    server.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    server.chmod(0o755)
    env = {"PYTHONPATH": f"{STAND_INS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "RBLN_STANDIN_NPUS": "2",
           "RM_RUNNER_CACHE": str(tmp_path / "cache"), "FAKE_SERVER_RECORD": str(tmp_path / "server.json")}
    proc = cli("engine=vllm", f"engine.python={server}", "device=rbln", "device.batch_size=2", "device.device=[1]",
               "model=tiny-random", "model.max_model_len=512", f"hydra.run.dir={tmp_path}/run", env=env)
    assert proc.returncode == 1
    assert "exited with code 3" in json.loads((tmp_path / "run" / "status.json").read_text())["reason"]
    given = json.loads((tmp_path / "server.json").read_text())
    argv = given["argv"]
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    folder = Path(argv[argv.index("--model") + 1])
    assert (folder / "rbln_config.json").is_file() and folder.is_relative_to(tmp_path / "cache" / "rbln")
    flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i] in ("--max-num-seqs", "--max-model-len",
                                                                                 "--block-size")}
    assert flags == {"--max-num-seqs": "2", "--max-model-len": "512", "--block-size": "512"}
    assert given["env"]["RBLN_VISIBLE_DEVICES"] == "1" and "RBLN_DEVICES" not in given["env"]


def test_the_engine_and_the_api_hold_requests_to_the_compiled_length(sdk, cache) -> None:
    """A model compiled for max_seq_len=256 while model.max_model_len is 2048: the engine refuses a
    longer request before the NPU, naming device.max_seq_len, and says 256 to the API in front."""
    from rm_runner.engines.local import LocalEngine
    from rm_runner.requests import Request

    engine = LocalEngine(RBLNBackend(mode="optimum", cache_dir=str(cache), max_seq_len=256, kvcache_block_size=256))
    engine.start()
    engine.load_model(tiny(), model_config(max_model_len=2048))
    try:
        assert engine.max_model_len == 256
        long = Request(id="long", prompt=" ".join(["the"] * 252), chat_template=False)
        with pytest.raises(ConfigError, match=r"request long: .* exceed the compiled max_seq_len \(device.max_seq_len\)=256"):
            engine.check_lengths([long], [engine.render(long)], SimpleNamespace(max_new_tokens=6))
    finally:
        engine.stop()
