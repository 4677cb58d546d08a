"""``python -m rm_runner.recipes list|validate``: what each recipe asks, and whether it still composes.

A recipe (``conf/recipe/NAME.yaml``, run as ``python -m rm_runner recipe=NAME``) keeps an experiment
in git, so it must say what question it answers and it must keep composing as the code moves
on. ``list`` shows the question; ``validate`` composes every recipe exactly as the runner would
(and every job of a sweep recipe), checks it against the structured configs and checks each
``_target_`` section against the class it names, without loading a model or importing torch,
so it is cheap enough for CI.

The question of a recipe is its comment block at the top (the leading ``#`` lines, blank lines
allowed, ``# @package`` dropped), joined into one text: what follows ``Question:`` up to
``Run:`` is the question; the rest of the line holding ``Run:`` is the command; any comment
lines after that line are notes.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import shlex
import shutil
import sys
import textwrap
from dataclasses import asdict, dataclass, field, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from rm_runner.composition import explain
from rm_runner.config import check_options, composing, validated
from rm_runner.errors import ConfigError

GROUP = "recipe"
# Keys Hydra's instantiate() reads itself; they are not arguments of the target.
_HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}


@dataclass
class Recipe:
    """One recipe file and what its header comment says."""

    name: str
    path: str
    question: Optional[str]
    run: Optional[str]
    notes: Optional[str]
    package_global: bool
    sweep: dict[str, str] = field(default_factory=dict)  # hydra.sweeper.params as written
    jobs: int = 1
    shadowed: list[str] = field(default_factory=list)  # same name later in the search path: never loaded

    def command(self, config_dir: Optional[Path]) -> str:
        """The ``Run:`` text when the recipe gives one, else the command that runs it."""
        if self.run:
            return self.run
        extra = f" --config-dir {shlex.quote(str(config_dir))}" if config_dir else ""
        return f"python -m rm_runner{extra}{' -m' if self.sweep else ''} recipe={self.name}"


def parse_header(text: str) -> tuple[Optional[str], Optional[str], Optional[str], bool]:
    """(question, run command, notes, has ``# @package _global_``) from a recipe's top comments."""
    comments: list[str] = []
    package_global = False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        body = stripped.lstrip("#").strip()
        if body.startswith("@package"):
            package_global = package_global or body.split()[1:2] == ["_global_"]
            continue
        comments.append(body)
    question = run = notes = None
    start = next((i for i, body in enumerate(comments) if "Question:" in body), None)
    if start is not None:
        block = [comments[start].split("Question:", 1)[1], *comments[start + 1:]]
        run_at = next((j for j, body in enumerate(block) if "Run:" in body), None)
        if run_at is not None:
            before, after = block[run_at].split("Run:", 1)
            run = _join([after])
            notes = _join(block[run_at + 1:])
            block = [*block[:run_at], before]
        question = _join(block)
    return question, run, notes, package_global


def _join(lines: list[str]) -> Optional[str]:
    return " ".join(" ".join(lines).split()) or None


def sweep_jobs(params: dict[str, Any]) -> list[list[str]]:
    """Every job's overrides for ``hydra.sweeper.params``, expanded as Hydra's basic sweeper does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lists: list[list[str]] = []
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    for override in overrides:
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise ConfigError(f"{key}={params[key]}: the basic sweeper takes lists and choice(), "
                                  "not ranges or intervals")
            lists.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            lists.append([f"{key}={override.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*lists)]


def _search_dirs(config_dir: Optional[Path]) -> list[Path]:
    """The recipe folders in Hydra's search order: the shipped ones first, then ``--config-dir``'s."""
    dirs = [Path(str(resources.files("rm_runner.conf") / GROUP))]
    if config_dir is not None:
        dirs.append(config_dir / GROUP)
    return dirs


def discover(config_dir: Optional[Path] = None) -> dict[str, Recipe]:
    """Every recipe by name; a name found twice is the one Hydra would load (the first)."""
    found: dict[str, Recipe] = {}
    for folder in _search_dirs(config_dir):
        for path in sorted(folder.glob("*.yaml")):
            if path.stem in found:
                found[path.stem].shadowed.append(str(path))
                continue
            text = path.read_text(encoding="utf-8")
            question, run, notes, package_global = parse_header(text)
            recipe = Recipe(path.stem, str(path), question, run, notes, package_global)
            try:
                params = OmegaConf.select(OmegaConf.create(text), "hydra.sweeper.params") or {}
                recipe.sweep = {str(k): str(v) for k, v in params.items()}
                recipe.jobs = len(sweep_jobs(recipe.sweep)) if recipe.sweep else 1
            except Exception:  # unreadable YAML or sweep: `validate` reports it, `list` still lists it
                recipe.jobs = 0
            found[path.stem] = recipe
    return found


# ---------------------------------------------------------------------------------------- validate

def _targets(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every ``_target_`` section of a plain container, with its dotted path."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from _targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{path}[{i}]")


def _locate(section: str, target: str) -> Any:
    """The object a dotted ``_target_`` names (as Hydra resolves it), or a ConfigError saying
    which part is missing; a module that exists but fails to import keeps its own error."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            raise ConfigError(f"{section}._target_: importing {module_name} failed: {exc}") from None
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise ConfigError(f"{section}._target_: {target} not found ({'.'.join(parts[:i])} "
                                  f"has no {'.'.join(parts[i:])})")
            obj = getattr(obj, attr)
        return obj
    raise ConfigError(f"{section}._target_: {target} not found (no module {parts[0]})")


def check_target(section: str, node: dict[str, Any]) -> None:
    """Import the target and check the section's keys against it, as instantiating would, but
    without calling it: a backend's options against its ``options_class``, anything else
    against its signature (values that are ``_target_`` sections themselves are checked on
    their own)."""
    target = node["_target_"]
    obj = _locate(section, target)
    kwargs = {k: v for k, v in node.items() if k not in _HYDRA_KEYS}
    options_class = getattr(obj, "options_class", None)
    if inspect.isclass(obj) and is_dataclass(options_class):
        check_options(options_class, kwargs, section)  # type: ignore[arg-type]
        return
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return  # a builtin without a signature: nothing to check against
    try:
        signature.bind_partial(*node.get("_args_", []), **kwargs)
    except TypeError as exc:
        unknown = [k for k in kwargs if k not in signature.parameters]
        params = [p for p in signature.parameters if p != "self"]
        if unknown:
            raise ConfigError(f"{section}.{unknown[0]}: unknown option for {target}; "
                              f"valid options are: {', '.join(params)}") from None
        raise ConfigError(f"{section}: {exc}") from None


def _compose(name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose

    return compose(config_name="config", overrides=[f"{GROUP}={name}", *overrides], return_hydra_config=True)


def check_job(cfg: DictConfig) -> None:
    """What the runner does before loading anything: validate, then check every `_target_`."""
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} in the recipe resolves as in a run
    with open_dict(cfg):
        del cfg["hydra"]
    merged = validated(cfg)
    for section, node in _targets(OmegaConf.to_container(merged, resolve=True)):
        check_target(section, node)


def validate_recipe(recipe: Recipe, search_overrides: list[str]) -> Optional[str]:
    """None when the recipe and, for a sweep, every job of it compose and check; else the error."""
    if not recipe.package_global:
        return "the first line must be '# @package _global_' (a recipe sets keys at the root)"
    if not recipe.question:
        return "no '# Question:' comment at the top: say what question this recipe answers"
    try:
        cfg = _compose(recipe.name, search_overrides)
        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        jobs = sweep_jobs({str(k): str(v) for k, v in params.items()}) if params else []
        check_job(cfg)
    except Exception as exc:  # anything composition raises is the recipe's fault: report it
        return explain(exc)
    failures = []
    for job in jobs:
        try:
            check_job(_compose(recipe.name, [*search_overrides, *job]))
        except Exception as exc:
            failures.append(f"[{' '.join(job)}] {explain(exc)}")
    if failures:
        extra = len(failures) - 1
        return failures[0] + (f" (and {extra} more failing job{'s' if extra > 1 else ''})" if extra else "")
    return None


def validate(names: list[str], config_dir: Optional[Path]) -> dict[str, Optional[str]]:
    """Each named recipe (all when none) → None if valid, else the error."""
    recipes = discover(config_dir)
    results: dict[str, Optional[str]] = {}
    with composing(config_dir) as search:
        for name in names or list(recipes):
            if name not in recipes:
                results[name] = f"no such recipe; available: {', '.join(recipes) or 'none'}"
            else:
                results[name] = validate_recipe(recipes[name], search)
    return results


# ---------------------------------------------------------------------------------------- CLI

def _sweep_text(recipe: Recipe) -> str:
    jobs = f"{recipe.jobs} jobs" if recipe.jobs else "unreadable: see validate"
    return " ".join(f"{k}={v}" for k, v in recipe.sweep.items()) + f" ({jobs})"


def _print_table(recipes: list[Recipe], config_dir: Optional[Path]) -> None:
    width = max(shutil.get_terminal_size((120, 20)).columns, 80)
    name_w = max([4, *(len(r.name) for r in recipes)]) + 2
    text_w = max(width - name_w, 40)
    print(f"{'NAME':<{name_w}}QUESTION")
    for r in recipes:
        lines = textwrap.wrap(r.question or "(no '# Question:' comment)", text_w)
        if r.notes:
            lines += textwrap.wrap(f"note: {r.notes}", text_w)
        if r.sweep:
            lines += textwrap.wrap(f"sweep: {_sweep_text(r)}", text_w)
        for path in r.shadowed:
            lines += textwrap.wrap(f"note: {path} has the same name and is never loaded ({r.path} is)", text_w)
        lines.append(f"run: {r.command(config_dir)}")
        print(f"{r.name:<{name_w}}{lines[0]}")
        for line in lines[1:]:
            print(" " * name_w + line)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="rm-runner-recipes", description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", type=Path, default=None,
                        help="also take recipes from DIR/recipe/*.yaml, as `python -m rm_runner --config-dir DIR`")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every recipe with the question it answers")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    checking = commands.add_parser("validate", help="compose and check recipes (all when no name); exit 1 on any error")
    checking.add_argument("names", nargs="*", metavar="NAME")
    args = parser.parse_args(argv)
    if args.config_dir is not None and not args.config_dir.is_dir():
        parser.error(f"--config-dir {args.config_dir} is not a directory")

    if args.command == "list":
        recipes = list(discover(args.config_dir).values())
        if args.json:
            print(json.dumps([{**asdict(r), "run": r.command(args.config_dir)} for r in recipes], indent=2))
        else:
            _print_table(recipes, args.config_dir)
        return 0

    results = validate(args.names, args.config_dir)
    recipes = discover(args.config_dir)
    for name, error in results.items():
        jobs = recipes[name].jobs if name in recipes and recipes[name].sweep else 0
        print(f"FAILED  {name}: {error}" if error else f"ok      {name}" + (f" ({jobs} sweep jobs)" if jobs else ""))
    failed = sum(error is not None for error in results.values())
    print(f"{len(results) - failed} ok, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
