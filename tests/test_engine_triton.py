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

from tests.conftest import Server, ask, local_answer, served_like_local

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


def rows_end_on_the_server(server: Server, log: Path, limit: int = 120) -> None:
    """Three streamed requests for up to ``limit`` tokens whose row ends early, by EOS, a stop
    string, and a client that leaves: the server ran only a few decoding steps for each, not
    ``limit`` (its log counts the steps of every stream), and says whether the client ended it."""
    def next_record(seen: int) -> tuple[int, int, int, int]:
        record = wait_for(lambda: stream_records(log)[seen:])[0]
        assert record[1:3] == (1, limit), record  # one row, max_new_tokens as asked
        return record

    seen = len(stream_records(log))
    ask(server, max_tokens=limit, stream=True)  # the answer ends at EOS after a few tokens
    steps, _, _, by_client = next_record(seen)
    assert steps < 30 and by_client == 0, (steps, by_client)  # the server ended it at EOS itself

    ask(server, max_tokens=limit, stream=True, stop=["Paris"], extra_body={"ignore_eos": True})
    steps, _, _, by_client = next_record(seen + 1)
    assert steps < limit // 3 and by_client == 1, (steps, by_client)  # on the client's word

    leave_after_first_chunk(server, max_tokens=limit)
    steps, _, _, by_client = next_record(seen + 2)
    assert steps < limit // 3 and by_client == 1, (steps, by_client)


def stream_records(log: Path) -> list[tuple[int, int, int, int]]:
    """(decoding steps, rows, max_new_tokens, rows ended by the client) of each stream the
    server ran, in order, from its log."""
    import re

    pattern = r"stream [0-9a-f]{32}: (\d+) decoding steps for (\d+) rows \(max_new_tokens (\d+)\), (\d+) ended"
    return [tuple(int(g) for g in m.groups()) for m in re.finditer(pattern, log.read_text())]


def leave_after_first_chunk(server: Server, max_tokens: int) -> None:
    """A streamed request (EOS ignored) whose client goes away after the first piece of text."""
    import openai

    from tests.conftest import QUESTION

    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()


def wait_for(probe, timeout_s: float = 120):
    """``probe()``'s first truthy answer, polled until ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while (found := probe()) is None or not found:
        assert time.monotonic() < deadline, f"not within {timeout_s} s"
        time.sleep(0.1)
    return found
