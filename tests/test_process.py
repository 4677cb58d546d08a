"""Server processes: readiness, start failures with the log's tail, ports, and no orphans."""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from rm_runner.engines.process import EngineError, ServerProcess, claim_port, free_port, http_ok
from tests.conftest import cli

# A server with a worker child, like vLLM's API server and engine core.
SERVER = textwrap.dedent("""
    import http.server, subprocess, sys
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("worker", worker.pid, flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
""")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_ready_then_stopped_with_its_workers(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess("toy", [sys.executable, "-c", SERVER, str(port)], tmp_path / "toy.log")
    server.start()
    try:
        assert server.wait_ready(http_ok(f"http://127.0.0.1:{port}/"), timeout_s=60) >= 0
        worker = int((tmp_path / "toy.log").read_text().split()[1])
        assert not gone(worker)
    finally:
        server.stop()
    assert wait_gone([server.pid, worker])
    server.stop()  # twice is fine


def test_exit_during_start_quotes_the_log(tmp_path: Path) -> None:
    server = ServerProcess("toy", [sys.executable, "-c", "print('bad flag --foo'); raise SystemExit(3)"],
                           tmp_path / "toy.log")
    server.start()
    with pytest.raises(EngineError, match=r"toy server exited with code 3 during start-up(.|\n)*bad flag --foo"):
        server.wait_ready(http_ok(f"http://127.0.0.1:{free_port()}/"), timeout_s=60)


def test_not_ready_by_the_deadline_names_the_setting(tmp_path: Path) -> None:
    server = ServerProcess("toy", [sys.executable, "-c", "import time; print('loading'); time.sleep(600)"],
                           tmp_path / "toy.log")
    server.start()
    try:
        with pytest.raises(EngineError, match=r"not ready after 1 s \(engine.startup_timeout_s\)"):
            server.wait_ready(lambda: False, timeout_s=1)
    finally:
        server.stop()


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EngineError, match=rf"engine.port={port} on 127.0.0.1 is in use.*engine.port=null"):
            claim_port("127.0.0.1", port)
    assert claim_port("127.0.0.1", None) > 0


def test_server_dies_with_its_parent_when_the_parent_is_killed(tmp_path: Path) -> None:
    port = free_port()
    parent = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from rm_runner.engines.process import ServerProcess, http_ok
        s = ServerProcess("toy", [sys.executable, "-c", {SERVER!r}, "{port}"], Path({str(tmp_path / 'toy.log')!r}))
        s.start()
        s.wait_ready(http_ok("http://127.0.0.1:{port}/"), timeout_s=60)
        print(s.pid, flush=True)
        import time; time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    server_pid = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)  # no cleanup code runs in the parent
    proc.wait()
    assert wait_gone([server_pid])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this Python has vllm")
def test_engine_vllm_without_vllm_in_its_python(tmp_path: Path) -> None:
    proc = cli("engine=vllm", f"engine.python={sys.executable}", "model=tiny-random", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1 and f"engine.python={sys.executable} has no vllm" in proc.stderr


def test_engine_port_in_use_fails_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("engine=vllm", f"engine.port={port}", "model=tiny-random", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1 and f"engine.port={port} on 127.0.0.1 is in use" in proc.stderr
    assert not (tmp_path / "vllm-server.log").exists()
