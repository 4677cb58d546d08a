"""``python -m rm_runner.replay RUN_DIR``: run a saved run again from its own resolved config.

The new run goes to ``RUN_DIR/replays/<timestamp>``; the command reports whether the token
ids match the original's request by request and exits 0 only when every one does.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from rm_runner.errors import RunnerError
from rm_runner.rundir import CONFIG, GENERATIONS, LOG, RunDir, read_status


def compare(original: list[dict], replayed: list[dict]) -> list[str]:
    """One line per request whose token ids differ (empty when identical)."""
    differences = []
    by_id = {r["id"]: r for r in replayed}
    for record in original:
        other = by_id.get(record["id"])
        if other is None:
            differences.append(f"request {record['id']}: missing from the replay")
            continue
        a, b = record["token_ids"], other["token_ids"]
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            differences.append(f"request {record['id']}: token ids differ from position {first}")
    return differences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rm-runner-replay", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by rm_runner")
    args = parser.parse_args(argv)
    source = args.run_dir
    if not (source / CONFIG).is_file():
        print(f"rm-runner-replay: error: {source / CONFIG} not found; is {source} a run directory?", file=sys.stderr)
        return 2
    status = read_status(source) or {}
    if status.get("status") != "ok":
        print(f"rm-runner-replay: note: the saved run is {status.get('status', 'of unknown status')}"
              f"{' (' + status['reason'] + ')' if status.get('reason') else ''}; only what it finished can be compared",
              file=sys.stderr)
    if not (source / GENERATIONS).is_file():
        print(f"rm-runner-replay: error: {source} has no {GENERATIONS} to compare against", file=sys.stderr)
        return 2
    target = source / "replays" / time.strftime("%Y-%m-%d_%H-%M-%S")
    target.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(target / LOG)],
    )
    from rm_runner.runner import run

    try:
        replayed = run(OmegaConf.load(source / CONFIG), target, [f"replay of {source}"])
    except RunnerError:
        return 1
    differences = compare(RunDir(source).read_jsonl(GENERATIONS), replayed.read_jsonl(GENERATIONS))
    for line in differences:
        print(line)
    total = len(RunDir(source).read_jsonl(GENERATIONS))
    verdict = "identical" if not differences else "DIFFERENT"
    print(f"replay {verdict}: {total - len(differences)}/{total} requests with the same token ids ({target})")
    return 0 if not differences else 1


if __name__ == "__main__":
    sys.exit(main())
