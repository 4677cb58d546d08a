"""engine=triton for real: PyTriton's tritonserver started with the CPU backend inside, answering
over tritonclient, bound to 127.0.0.1 only, and stopped.

Runs where nvidia-pytriton is installed (CI's .venv-triton); skipped elsewhere with the reason.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import cli

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pytriton") is None,
                                reason="nvidia-pytriton is not installed in this Python (CI runs it in .venv-triton)")


def token_ids(run_dir: Path) -> list[list[int]]:
    return [json.loads(line)["token_ids"] for line in (run_dir / "generations.jsonl").read_text().splitlines()]


def test_triton_answers_like_the_local_engine_and_binds_loopback_only(tmp_path: Path) -> None:
    common = ("model.dtype=float32", "generation.max_new_tokens=24", "pipeline.steps.1.print_outputs=false")
    local = cli(*common, f"hydra.run.dir={tmp_path}/local")
    assert local.returncode == 0, local.stderr[-3000:]
    run = subprocess.Popen([sys.executable, "-m", "rm_runner", *common, "engine=triton",
                            f"hydra.run.dir={tmp_path}/triton"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    log = tmp_path / "triton" / "rm_runner.log"
    listening: set[str] = set()
    family: list[psutil.Process] = []
    deadline = time.monotonic() + 300
    while run.poll() is None and time.monotonic() < deadline:  # look at the sockets while it serves
        if log.exists() and "generating" in log.read_text():
            family = psutil.Process(run.pid).children(recursive=True)
            for proc in family:
                try:
                    listening |= {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == "LISTEN"}
                except psutil.NoSuchProcess:
                    pass
            break
        time.sleep(0.1)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert token_ids(tmp_path / "triton") == token_ids(tmp_path / "local")
    addresses = {ipaddress.ip_address(ip) for ip in listening}
    addresses = {getattr(a, "ipv4_mapped", None) or a for a in addresses}  # gRPC listens as ::ffff:127.0.0.1
    assert addresses == {ipaddress.ip_address("127.0.0.1")}  # HTTP, gRPC, metrics: loopback only
    engine = json.loads((tmp_path / "triton" / "metrics.json").read_text())["engine"]
    assert engine["name"] == "triton" and engine["ready_s"] > 0
    assert "Started HTTPService" in (tmp_path / "triton" / "triton-server.log").read_text()
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left behind: {[p.pid for p in alive]}"
