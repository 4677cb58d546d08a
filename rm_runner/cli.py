"""``rm-runner <subcommand>``: the one front door, as torchtune's ``tune`` and vLLM's ``vllm`` are.

Without a subcommand the arguments are a run's Hydra overrides (``rm-runner device=cpu``, as
``python -m rm_runner``); a Hydra override always holds ``=`` or starts with ``-``, so it never
reads as a subcommand. Each subcommand is the module that already does the job, imported only
when it is asked for: ``--help`` imports nothing but this. The old ``rm-runner-<name>`` scripts
still work.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

# name -> (module, its entry point, what it does); "argv": the entry point takes the arguments
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("rm_runner.__main__", "run", "one run, or a sweep with -m: Hydra overrides (the default subcommand)"),
    "serve": ("rm_runner.__main__", "serve", "the OpenAI-compatible API: a run with pipeline=serve"),
    "plan": ("rm_runner.plan", "argv", "what a run or a sweep would do, nothing loaded (as --dry-run)"),
    "doctor": ("rm_runner.doctor", "argv", "which device x engine pairs run here, and what each one lacks"),
    "recipes": ("rm_runner.recipes", "argv", "list the shipped recipes and validate them"),
    "compare": ("rm_runner.compare", "argv", "compare run or sweep directories"),
    "replay": ("rm_runner.replay", "argv", "rerun a saved run and compare its token ids"),
    "summary": ("rm_runner.sweep.summary", "sys.argv", "redraw a sweep directory's summary"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: rm-runner [SUBCOMMAND] [ARGS ...]", "",
             "subcommands (rm-runner SUBCOMMAND --help for each one's arguments):"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, _, what) in SUBCOMMANDS.items()]
    lines += ["", "examples:", "  rm-runner device=cpu model=smollm2-135m",
              "  rm-runner plan -m device=cpu,gpu,rbln pipeline=benchmark",
              "  rm-runner recipes validate", "  rm-runner run --help   (Hydra's help: the config groups and their options)"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["-h"], ["--help"], ["help"]):
        print(usage())
        return
    name = args[0] if args and args[0] in SUBCOMMANDS else "run"
    rest = args[1:] if args and args[0] in SUBCOMMANDS else args
    module_name, entry, _ = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    if entry == "argv":
        sys.exit(module.main(rest))
    if entry == "serve" and any(a.startswith("pipeline=") for a in rest):
        sys.exit("error: rm-runner serve is a run with pipeline=serve; leave pipeline= out, or use rm-runner run")
    # Hydra (the run) and the summary read sys.argv themselves
    sys.argv = [sys.argv[0], *(["pipeline=serve"] if entry == "serve" else []), *rest]
    module.main()


if __name__ == "__main__":
    main()
