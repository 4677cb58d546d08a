"""The HTML reports: self-contained (tables, inline PNGs, config, environment; nothing fetched),
for a run however it ended and for a sweep, and rendered offline by headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rm_runner.errors import ConfigError
from rm_runner.sweep.summary import write_summary
from tests.test_eval_summary import eval_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def self_contained(text: str) -> None:
    assert not re.search(r"<(script|link)\b", text) and not re.search(r"""(src|href)=["']?(https?:)?//""", text)


def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    eval_job(root / "0_device=cpu", ["device=cpu"], "cpu", "float32", {"acc": (0.60, 0.02)})
    eval_job(root / "1_device=gpu", ["device=gpu"], "gpu", "float32", {"acc": (0.50, 0.02)})
    (root / "multirun.yaml").write_text("hydra:\n  sweeper:\n    params:\n      device: cpu,gpu\n")
    (root / "0_device=cpu" / "environment.json").write_text('{"python": "3.11.7"}')
    write_summary(root)
    return root / "summary.html"


def test_a_sweep_report_holds_its_tables_plots_and_config(tmp_path: Path) -> None:
    text = sweep(tmp_path).read_text()
    self_contained(text)
    assert "<th>verdict</th>" in text and "<td>lower by 3.5 stderr (worse)</td>" in text
    assert text.count('src="data:image/png;base64,') == 1 and "device: cpu,gpu" in text and "3.11.7" in text


def test_a_run_report_is_written_however_the_run_ends(tiny) -> None:
    run = tiny("pipeline=benchmark", "benchmark.repetitions=1", "generation.max_new_tokens=4",
               "pipeline.steps.benchmark.print_table=false")
    text = (run.path / "report.html").read_text()
    self_contained(text)
    assert "<p>status: ok</p>" in text and "<td>output_throughput</td>" in text and "tiny-random" in text
    with pytest.raises(ConfigError):
        tiny("pipeline=benchmark", "benchmark.load.profile=poisson")
    failed = sorted(run.path.parent.iterdir())[-1]
    text = (failed / "report.html").read_text()
    assert '<p class="bad">status: failed: benchmark.load.profile=poisson does not apply' in text


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium here: apt-get install chromium (CI does)")
def test_chromium_renders_the_sweep_report_offline(tmp_path: Path) -> None:
    report = sweep(tmp_path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]

    def chromium(*args: str, profile: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CHROMIUM, *flags, f"--user-data-dir={tmp_path / profile}", *args, report.as_uri()],
                              capture_output=True, text=True, timeout=120)

    dom = chromium("--dump-dom", profile="dom").stdout
    assert len(re.findall(r"<table\b", dom)) == 1 and len(re.findall(r"<img\b", dom)) == 1
    shot = tmp_path / "summary.png"
    chromium("--window-size=1200,1600", f"--screenshot={shot}", profile="shot")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
