"""Model sources and the model cache: wheel extraction, concurrent and interrupted builds."""

from __future__ import annotations

import multiprocessing as mp
import zipfile
from pathlib import Path

import pytest
from filelock import FileLock

from rm_runner.errors import ModelNotFoundError
from rm_runner.models.cache import cached
from rm_runner.models.packaged import PackagedGGUF
from rm_runner.models.pretrained import Pretrained


def test_gguf_is_read_out_of_a_cached_wheel(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RM_RUNNER_CACHE", str(tmp_path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "rm_runner_no_such_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("rm_runner_no_such_pkg/model.gguf", b"GGUF" + bytes(range(256)) * 10)
    source = PackagedGGUF("rm-runner-no-such-pkg", "1.0", "model.gguf")
    path = source.gguf_path()
    assert path.read_bytes() == b"GGUF" + bytes(range(256)) * 10
    assert path.is_relative_to(tmp_path / "gguf")
    with pytest.raises(ModelNotFoundError, match="'rm_runner_no_such_pkg/other.gguf' is not in"):
        PackagedGGUF("rm-runner-no-such-pkg", "1.0", "other.gguf").gguf_path()


def _wait_for_cache(path: str, queue) -> None:
    def build(tmp: Path) -> None:
        raise AssertionError("built again although another process had built it")

    queue.put(str(cached(Path(path), build)))


def test_a_build_in_progress_elsewhere_is_waited_for_not_repeated(tmp_path: Path) -> None:
    target = tmp_path / "model"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with FileLock(str(target) + ".lock"):  # "another process" is converting right now
        waiter = ctx.Process(target=_wait_for_cache, args=(str(target), queue))
        waiter.start()
        target.mkdir()  # ... and finishes while the waiter is blocked on the lock
    waiter.join(60)
    assert waiter.exitcode == 0 and queue.get(timeout=5) == str(target)


def test_an_interrupted_build_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def interrupted(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached(target, interrupted)
    assert not target.exists() and not list(tmp_path.glob("model.tmp-*"))
    (tmp_path / "model.tmp-99999").mkdir()  # left by a process that was killed outright
    built = cached(target, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (built / "config.json").is_file() and not list(tmp_path.glob("model.tmp-*"))


def test_local_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        Pretrained(str(tmp_path)).check()


def test_hub_id_missing_offline_says_how_to_get_it(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE=1 forbids downloading.*hf download"):
        Pretrained("meta-llama/Meta-Llama-3-8B-Instruct").resolve()


@pytest.mark.parametrize("name", ["gpt2", "distilgpt2", "openai-community/gpt2"])
def test_a_hub_id_without_an_organisation_is_a_hub_id(name: str, monkeypatch, tmp_path: Path) -> None:
    """``gpt2`` is a root model on the hub, not a folder: offline and uncached, say so and name
    the variable and the cache, not "model directory 'gpt2' does not exist"."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    with pytest.raises(ModelNotFoundError) as raised:
        Pretrained(name).resolve()
    message = str(raised.value)
    assert f"hub id {name!r} is not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message and "HF_HUB_CACHE" in message and "does not exist" not in message


def test_an_existing_folder_named_like_a_hub_id_is_local(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    with pytest.raises(ModelNotFoundError, match="'gpt2' has no config.json"):
        Pretrained("gpt2").check()
    with pytest.raises(ModelNotFoundError, match="nor is it a hub id"):
        Pretrained("not a/valid/id").check()
