"""engine=triton for real: PyTriton's tritonserver started with the CPU backend inside, answering
over tritonclient, bound to 127.0.0.1 only, and stopped.

Runs where nvidia-pytriton is installed (CI's .venv-triton); skipped elsewhere with the reason.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import psutil
import pytest

from tests.conftest import (Server, ask, local_answer, rows_end_on_the_server, served_like_local,
                            staggered_like_offline, stream_records)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pytriton") is None,
                                reason="nvidia-pytriton is not installed in this Python (CI runs it in .venv-triton)")


def test_triton_answers_like_the_local_engine_and_binds_loopback_only(tmp_path: Path) -> None:
    served_like_local(tmp_path, "triton")
    assert "Started HTTPService" in (tmp_path / "triton" / "triton-server.log").read_text()


def test_sigterm_to_the_run_stops_the_server_and_records_it(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import SHARED_W16

    run = subprocess.Popen([sys.executable, "-m", "rm_runner", "engine=triton", "model=tiny-random", "workload=jsonl",
                            f"workload.path={SHARED_W16}", "engine.batch_size=1", "generation.max_new_tokens=1500",
                            "generation.ignore_eos=true", f"hydra.run.dir={tmp_path}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "rm_runner.log"
    deadline = time.monotonic() + 300
    while not (log.exists() and "generating" in log.read_text()):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before generating"
        time.sleep(0.1)
    family = psutil.Process(run.pid).children(recursive=True)
    assert any("tritonserver" in " ".join(p.cmdline()) for p in family)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) != 0
    assert "interrupted (signal SIGTERM)" in json.loads((tmp_path / "status.json").read_text())["reason"]
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left behind: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    """One ``pipeline=serve engine=triton`` (SmolLM2, float32) for the API tests of this module;
    stopped at the end, where it must exit 0."""
    server = Server(tmp_path_factory.mktemp("serve"), "engine=triton", "model.dtype=float32")
    try:
        yield server
    finally:
        code, _, err = server.stop()
    assert code == 0, err[-2000:]


def test_the_api_streams_through_tritons_decoupled_model(tmp_path: Path, api: Server) -> None:
    """pipeline=serve engine=triton: streamed requests follow the decoupled <model>_stream step by step."""
    expected = local_answer(tmp_path)
    log = api.run_dir / "triton-server.log"
    before = len(stream_records(log))
    chunks, whole = ask(api, stream=True), ask(api)
    assert len(chunks) > 3 and "".join(chunks) == expected == whole.choices[0].message.content
    # both went through <model>_stream (the client streams only where it was ready in time)
    assert len(stream_records(log)) == before + 2


def test_a_streamed_row_that_ends_ends_on_the_server(api: Server) -> None:
    """EOS, a stop string, a client that left: Triton stops generating for the row then."""
    rows_end_on_the_server(api, api.run_dir / "triton-server.log")


def test_staggered_greedy_streams_equal_the_offline_batch(api: Server, tmp_path: Path) -> None:
    """Requests that arrive while others stream (batched by the triton server as they come) get
    the offline batch's token ids."""
    staggered_like_offline(api, tmp_path)
