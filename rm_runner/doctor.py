"""``rm-runner-doctor`` (``python -m rm_runner.doctor``): what this machine can run, and what fixes the rest.

Devices present (each backend's ``hardware()``: CUDA GPUs from ``nvidia-smi``, RBLN NPUs from
``rbln-smi``, the CPU with its vector extensions), the packages each backend and engine
declares with the versions installed in each environment they use, and a device x engine matrix: runnable, or why not and the command
that fixes it. Every verdict comes from the backends' and engines' own checks (the same ones a
run makes before loading anything), so the doctor and a failing run never disagree.

An engine's environment is its ``engine.python`` (from overrides, as in a run),
else this interpreter, else the venv the README makes for it (``.venv-<engine>``); a device's
is its ``device.python``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from rm_runner import pyenv
from rm_runner.environment import devices_present

# What the API itself needs, in every environment that may serve it.
API_PACKAGES = ("fastapi", "uvicorn", "pydantic", "prometheus-client")
# The config groups whose every option the doctor composes.
GROUPS = ("device", "engine")


def _options(group: str, overrides: list[str], names: Optional[set[str]] = None) -> dict[str, Any]:
    """Each option of a config group (those in ``names``) as a run would compose it (with ``overrides``).

    An override of the group's own keys goes to the options that have that key
    (``device.base_url`` is the remote device's alone); one that no option has goes to all, for
    Hydra's own "Could not override" error. The other doctor group's overrides stay out.
    """
    from hydra import compose

    from rm_runner.config import composing

    def field(override: str) -> str:
        return override.lstrip("+~").split("=", 1)[0][len(group) + 1:].split(".")[0]

    own = [o for o in overrides if o.lstrip("+~").startswith(f"{group}.")]
    shared = [o for o in overrides if not o.lstrip("+~").startswith(tuple(f"{g}." for g in GROUPS))]
    stems = [path.stem for path in sorted((Path(__file__).parent / "conf" / group).glob("*.yaml"))
             if names is None or path.stem in names]
    with composing():
        plain = {stem: compose(config_name="config", overrides=[f"{group}={stem}", *shared])[group]
                 for stem in stems}
        takers = {o: [stem for stem, node in plain.items() if field(o) in node] or stems for o in own}
        found = {}
        for stem, node in plain.items():
            mine = [o for o in own if stem in takers[o]]
            found[stem] = compose(config_name="config", overrides=[f"{group}={stem}", *shared, *mine])[group] \
                if mine else node
        return found


def device_availability(backend: Any) -> Any:
    """The backend's own check with its options, run in the device's environment
    (``device.python``) when it has one: a run checks there too, after re-executing itself."""
    from rm_runner.backends.base import Availability

    python = backend.options.python
    if not python:
        return backend.availability()
    path = pyenv.resolve(python)
    if not pyenv.exists(path):
        return Availability(False, f"device.python={python} does not exist",
                            "create that venv and install the device's packages in it, or set device.python=null")
    options = {k: getattr(v, "value", v) for k, v in vars(backend.options).items() if k != "python"}
    code = ("import json, sys; from rm_runner.backends.registry import backend_classes as b; "
            "a = b()[sys.argv[1]](**json.loads(sys.argv[2])).availability(); "
            "print(json.dumps({'ok': a.ok, 'reason': a.reason, 'fix': a.fix}))")
    result = pyenv.run_json(path, code, backend.name, json.dumps(options))
    if "error" in result:
        return Availability(False, f"device.python={python} cannot run rm_runner's check: {result['error']}",
                            f"{path} -m pip install rm-runner")
    return Availability(result["ok"], result["reason"], result["fix"])


def engine_python(name: str, configured: Optional[str], engine_cls: Any, backend_cls: Any) -> str:
    """The interpreter to judge an engine by: configured, else this one if it works, else .venv-<name>."""
    if configured:
        return pyenv.resolve(configured)
    conventional = Path.cwd() / f".venv-{name}" / "bin" / "python"
    if engine_cls.check_environment(sys.executable, backend_cls) or not pyenv.exists(str(conventional)):
        return sys.executable
    return str(conventional)


def diagnose(overrides: list[str]) -> dict[str, Any]:
    from hydra.utils import get_class

    from rm_runner.backends.registry import backend_classes
    from rm_runner.runner import build

    backends = backend_classes()
    devices = _options("device", overrides, set(backends))  # device=auto/plugin choose among these
    engines = {name: {"class": get_class(node._target_), "python": node.get("python")}
               for name, node in _options("engine", overrides).items()}
    report: dict[str, Any] = {"python": sys.executable, "devices_present": devices_present(backends),
                              "environments": {}, "matrix": []}
    for device, backend_cls in backends.items():
        backend = build("device", devices[device]) if device in devices else backend_cls()
        availability = device_availability(backend)
        for engine, spec in engines.items():
            python = engine_python(engine, spec["python"], spec["class"], backend_cls)
            if not availability:
                verdict, reason, fix = False, availability.reason, availability.fix
            else:
                check = spec["class"].check_environment(python, backend_cls)
                verdict, reason, fix = check.ok, check.reason, check.fix
            row = {"device": device, "engine": engine, "runnable": verdict, "python": python}
            if not verdict:
                row.update(reason=reason, fix=fix)
            report["matrix"].append(row)
            needed = {*spec["class"].packages, *backend_cls.packages, *API_PACKAGES}
            report["environments"].setdefault(python, set()).update(needed)
    for python, dists in list(report["environments"].items()):
        probed = pyenv.probe(python, (), tuple(sorted(dists)))
        report["environments"][python] = probed.get("versions", {"error": probed.get("error")})
    return report


def render(report: dict[str, Any]) -> str:
    lines = ["devices present:"]
    for device, found in report["devices_present"].items():
        lines += [f"  {device:<8}{line}" for line in found] or [f"  {device:<8}none found (see the matrix below)"]
    lines += ["", "environments (installed versions; - = not installed):"]
    for python, versions in report["environments"].items():
        if "error" in versions:
            lines.append(f"  {python}: {versions['error']}")
            continue
        shown = ", ".join(f"{d} {v or '-'}" for d, v in sorted(versions.items()))
        lines.append(f"  {python}\n      {shown}")
    engines = list(dict.fromkeys(r["engine"] for r in report["matrix"]))
    devices = list(dict.fromkeys(r["device"] for r in report["matrix"]))
    width = max(len(e) for e in engines) + 2
    lines += ["", "device x engine (yes = runnable here):", "  " + "device".ljust(8) + "".join(e.ljust(width) for e in engines)]
    cell = {(r["device"], r["engine"]): r for r in report["matrix"]}
    for device in devices:
        lines.append("  " + device.ljust(8) + "".join(("yes" if cell[(device, e)]["runnable"] else "no").ljust(width)
                                                      for e in engines))
    problems = [r for r in report["matrix"] if not r["runnable"]]
    if problems:
        lines += ["", "why not, and the fix:"]
        seen = set()
        for r in problems:
            key = (r["reason"], r["fix"])
            where = f"{r['device']} x {r['engine']}"
            if key in seen:
                lines.append(f"  {where}: as above")
                continue
            seen.add(key)
            lines.append(f"  {where}: {r['reason']}" + (f"\n      fix: {r['fix']}" if r["fix"] else ""))
    runnable = [r for r in report["matrix"] if r["runnable"] and r["python"] != report["python"]]
    if runnable:
        lines += ["", "runnable from another environment:"]
        lines += [f"  {r['device']} x {r['engine']}: {r['python']} -m rm_runner device={r['device']} "
                  f"engine={r['engine']} engine.python={r['python']}" for r in runnable]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="rm-runner-doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. engine.python=PATH (as for a run)")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException

    from rm_runner.errors import ConfigError
    from rm_runner.composition import explain

    try:
        report = diagnose(args.overrides)
    except (HydraException, ConfigError) as exc:  # an override that does not compose or validate: say which
        print(f"error: {explain(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
