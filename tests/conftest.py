"""Shared fixtures. Every test runs offline; the model cache is shared across the session
(``$RM_RUNNER_CACHE`` when set, as in CI, else the user's default) so SmolLM2 converts once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose
from omegaconf import DictConfig

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_W16 = REPO.parent / "shared" / "workloads" / "w16.jsonl"


def installed(module: str) -> bool:
    """``module`` can be imported here; False also when a parent package is missing (a dotted name
    under an absent namespace raises instead of answering None)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def accelerator_here() -> bool:
    """A GPU or an RBLN NPU on this host: tests that expect neither skip there."""
    from rm_runner.backends.gpu import GPUBackend
    from rm_runner.backends.rbln import RBLNBackend

    # is_available() asks torch, hardware() the vendor's tools: a CPU-only torch on a GPU host counts too
    return any(bool(cls.is_available()) or cls.hardware() for cls in (GPUBackend, RBLNBackend))


NO_ACCELERATOR = pytest.mark.skipif(accelerator_here(), reason="this host has a GPU or an RBLN NPU")


def compose_run(*overrides: str) -> DictConfig:
    """The config ``python -m rm_runner OVERRIDES`` would run, composed in-process."""
    from rm_runner.config import composing

    with composing():
        return compose(config_name="config", overrides=list(overrides))


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        python: str = sys.executable, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``python -m rm_runner ARGS`` as a user would."""
    return subprocess.run(
        [python, "-m", "rm_runner", *args], cwd=cwd, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture()
def tiny(tmp_path: Path):
    """Run the tiny random model in-process into a fresh run directory; returns the RunDir."""
    from rm_runner.runner import run

    counter = iter(range(1000))

    def _run(*overrides: str):
        cfg = compose_run("model=tiny-random", *overrides)
        return run(cfg, tmp_path / f"run{next(counter)}", list(overrides))

    return _run


def run_watching_sockets(tmp_path: Path, name: str, *overrides: str) -> tuple[set, list]:
    """Run ``python -m rm_runner OVERRIDES`` into tmp_path/name; while it generates, note the
    addresses its server processes listen on. Returns (loopback-normalised addresses, processes)."""
    import ipaddress
    import time

    import psutil

    run = subprocess.Popen([sys.executable, "-m", "rm_runner", *overrides, f"hydra.run.dir={tmp_path / name}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / name / "rm_runner.log"
    listening: set[str] = set()
    family: list[psutil.Process] = []
    deadline = time.monotonic() + 300
    while run.poll() is None and time.monotonic() < deadline:
        if log.exists() and "generating" in log.read_text():  # the server is up and serving
            family = psutil.Process(run.pid).children(recursive=True)
            for proc in family:
                try:
                    listening |= {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == "LISTEN"}
                except psutil.NoSuchProcess:
                    pass
            break
        time.sleep(0.1)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    addresses = {ipaddress.ip_address(ip) for ip in listening}
    return {getattr(a, "ipv4_mapped", None) or a for a in addresses}, family  # Java/gRPC listen as ::ffff:127.0.0.1


def token_ids(run_dir: Path) -> list[list[int]]:
    """Every request's generated token ids, from a run directory's generations.jsonl."""
    import json

    return [json.loads(line)["token_ids"] for line in (run_dir / "generations.jsonl").read_text().splitlines()]


class Server:
    """``python -m rm_runner pipeline=serve ...`` as a user starts it, ready once /health says so."""

    def __init__(self, run_dir: Path, *overrides: str, env: dict[str, str] | None = None,
                 python: str = sys.executable) -> None:
        self.run_dir = run_dir
        # Output goes to files beside the run directory, never to pipes nobody reads while it runs:
        # a full pipe (~64 KB of access log) would block the server inside its logging.
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = (run_dir.parent / f"{run_dir.name}.{s}" for s in ("stdout", "stderr"))
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [python, "-m", "rm_runner", "pipeline=serve", "server.port=0", *overrides, f"hydra.run.dir={run_dir}"],
                env={**os.environ, **(env or {})}, stdout=out, stderr=err, text=True,
            )
        self.url = self._wait_ready(timeout_s=300)
        self.base = self.url.removesuffix("/v1")

    def _wait_ready(self, timeout_s: float) -> str:
        import json
        import time

        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.err_path.read_text(errors="replace")
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{err[-3000:]}")
            info = self.run_dir / "server.json"
            if info.exists():
                url = json.loads(info.read_text())["url"]
                try:
                    if httpx.get(url.removesuffix("/v1") + "/health", timeout=5).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        self.proc.kill()
        raise AssertionError(f"the server was not ready within {timeout_s} s")

    def stop(self, timeout_s: float = 60) -> tuple[int, str, str]:
        """SIGTERM, as a process manager stops it; returns (exit code, stdout, stderr)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=timeout_s)
        return (self.proc.returncode, self.out_path.read_text(errors="replace"),
                self.err_path.read_text(errors="replace"))


QUESTION = "What is the capital of France?"


def local_answer(tmp_path: Path, max_new_tokens: int = 16) -> str:
    """The local engine's greedy float32 answer to QUESTION (chat template): what every engine must match."""
    import json

    run = cli("model.dtype=float32", f"generation.max_new_tokens={max_new_tokens}", "pipeline.steps.generate.print_outputs=false",
              f"workload.prompts=['{QUESTION}']", f"hydra.run.dir={tmp_path}/local")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((tmp_path / "local" / "generations.jsonl").read_text().splitlines()[0])["text"]


def ask(server: Server, max_tokens: int = 16, stream: bool = False, **extra) -> object:
    """QUESTION to a started API server with the official openai client: the answer, or for
    ``stream=True`` the list of content chunks as they arrived."""
    import openai

    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=max_tokens, temperature=0, stream=stream, **extra)
    if not stream:
        return answer
    return [c.choices[0].delta.content for c in answer if c.choices and c.choices[0].delta.content]


def served_like_local(tmp_path: Path, engine: str) -> dict:
    """``engine`` serves the workload with the local engine's token ids, every address on loopback,
    and leaves no process behind; returns the engine's record from metrics.json."""
    import ipaddress
    import json

    import psutil

    common = ("model.dtype=float32", "generation.max_new_tokens=24", "pipeline.steps.generate.print_outputs=false")
    local = cli(*common, f"hydra.run.dir={tmp_path}/local")
    assert local.returncode == 0, local.stderr[-3000:]
    addresses, family = run_watching_sockets(tmp_path, engine, *common, f"engine={engine}")
    assert token_ids(tmp_path / engine) == token_ids(tmp_path / "local")
    assert addresses == {ipaddress.ip_address("127.0.0.1")}  # every listening address is loopback
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left behind: {[p.pid for p in alive]}"
    record = json.loads((tmp_path / engine / "metrics.json").read_text())["engine"]
    assert record["name"] == engine and record["ready_s"] > 0
    return record


def staggered_like_offline(server: Server, tmp_path: Path, model: str = "smollm2-135m") -> None:
    """Streamed greedy requests to ``server`` (SmolLM2, float32), each sent once the one before it
    streams, get the offline batch's token ids (the local engine, one batch), token for token."""
    import json
    import threading

    import openai

    offline = cli("model.dtype=float32", "generation.max_new_tokens=24", "generation.ignore_eos=true",
                  "engine.batch_size=16", "pipeline.steps.generate.print_outputs=false", f"hydra.run.dir={tmp_path}/offline")
    assert offline.returncode == 0, offline.stderr[-3000:]
    asked = [[{"role": "user", "content": json.loads(line)["prompt"]}]  # the workload's prompts, chat-templated
             for line in (tmp_path / "offline" / "generations.jsonl").read_text().splitlines()]
    assert len(asked) > 2
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)
    got: dict[int, list[int]] = {}
    started = [threading.Event() for _ in asked]

    def one(i: int) -> None:
        try:
            stream = client.chat.completions.create(
                model=model, messages=asked[i], max_tokens=24, temperature=0, stream=True,
                extra_body={"ignore_eos": True, "return_token_ids": True})
            ids: list[int] = []
            for chunk in stream:
                for choice in chunk.choices:
                    ids.extend(getattr(choice, "token_ids", None) or [])
                    started[i].set()
            got[i] = ids
        finally:
            started[i].set()

    threads = []
    for i in range(len(asked)):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
        started[i].wait(120)  # the next one arrives once this one streams
    for t in threads:
        t.join(300)
    assert [got.get(i) for i in range(len(asked))] == token_ids(tmp_path / "offline")


def rows_end_on_the_server(server: Server, log: Path, limit: int = 120) -> None:
    """Three streamed requests for up to ``limit`` tokens whose row ends early, by EOS, a stop
    string, and a client that leaves: the server ran only a few decoding steps for each, not
    ``limit`` (its log counts the steps of every stream), and says whether the client ended it."""
    def ours() -> list[tuple[int, int, int, int]]:
        # The streams asked for ``limit`` tokens: an earlier request's line may reach the log late.
        return [r for r in stream_records(log) if r[2] == limit]

    def next_record(seen: int) -> tuple[int, int, int, int]:
        record = wait_for(lambda: ours()[seen:])[0]
        assert record[1] == 1, record  # one row
        return record

    seen = len(ours())
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
