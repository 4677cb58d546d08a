"""``rm-runner <subcommand>``: one command whose help is instant, whose subcommands are the tools
that already do each job, and whose default is a run."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from rm_runner.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand_and_imports_nothing_heavy() -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "rm_runner.cli", "--help"],
                          capture_output=True, text=True, check=True)
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and
              line.split()[0] in SUBCOMMANDS]
    assert listed == list(SUBCOMMANDS)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "rm_runner" in imported and not {"torch", "hydra", "omegaconf", "transformers"} & imported


def test_the_console_script_is_the_front_door() -> None:
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("rm-runner")}
    assert scripts["rm-runner"] == "rm_runner.cli:main"
    assert {"rm-runner-doctor", "rm-runner-recipes", "rm-runner-compare", "rm-runner-replay"} <= set(scripts)


def test_plan_and_recipes_are_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "-m", "device=cpu,gpu,rbln", "pipeline=benchmark"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(f"| device={d} | {d} | local | benchmark |" in out for d in ("cpu", "gpu", "rbln"))
    with pytest.raises(SystemExit) as exit_:
        main(["recipes", "list"])
    assert exit_.value.code == 0 and "cpu-smoke" in capsys.readouterr().out


def test_without_a_subcommand_it_is_a_run() -> None:
    proc = subprocess.run([sys.executable, "-m", "rm_runner.cli", "device.num_thread=2"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: device.num_thread: no such key")
    serve = subprocess.run([sys.executable, "-m", "rm_runner.cli", "serve", "pipeline=generate"],
                           capture_output=True, text=True)
    assert serve.returncode == 1 and "rm-runner serve is a run with pipeline=serve" in serve.stderr
