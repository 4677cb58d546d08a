"""Why a config does not compose, as one line that names the key and what it may be instead.

Hydra raises typed errors while composing (``hydra.errors``), with OmegaConf's as their cause,
and those carry what a message needs: the full key, the node the key was looked up in (so its
valid keys), the group and its options. This reads them, never the text of the message, so a
typo gets a did-you-mean the way argparse and vLLM's CLI give one.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Iterator, Optional

from rm_runner.errors import ConfigError


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean PREFIX+X?)`` for the closest of ``choices``, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def explain(exc: BaseException) -> str:
    """One line for anything composing, validating or checking a config raised."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

    from rm_runner.config import SCHEMA_SUFFIX

    for error in _chain(exc):
        if isinstance(error, ConfigError):
            return str(error)
        if isinstance(error, MissingConfigException) and error.options is not None:
            group, _, option = (error.missing_cfg_file or "").rpartition("/")
            options = [o for o in error.options if not o.endswith(SCHEMA_SUFFIX)]
            return (f"{group}={option}: no such option{did_you_mean(option, options)}; "
                    f"available options in '{group}': {', '.join(options)}")
        if isinstance(error, OverrideParseException):
            return f"{error.override}: not an override Hydra can parse ({error.message})"
        if isinstance(error, OmegaConfBaseException) and getattr(error, "full_key", None):
            key, full_key = str(error.key), str(error.full_key)
            if isinstance(error, (ConfigKeyError, ConfigAttributeError)):
                valid = [k for k in _keys(getattr(error, "parent_node", None)) if not k.startswith("_")]
                if valid:
                    prefix = full_key[: -len(key)] if full_key.endswith(key) else ""
                    return f"{full_key}: no such key{did_you_mean(key, valid, prefix)}; valid keys: {', '.join(valid)}"
            if isinstance(error, MissingMandatoryValue):
                return f"{full_key} is required: set it on the command line ({full_key}=...)"
            # OmegaConf's own words otherwise (its msg's first line: a ValidationError lists an enum's values)
            return f"{full_key}: {_first_line(getattr(error, 'msg', None) or error)}"
    return _first_line(exc)


def check_overrides(overrides: list[str], config_dir: Optional[str] = None, multirun: bool = False) -> Optional[str]:
    """None if the run these command-line overrides make composes (every job of a ``-m``
    sweep), else why not: what ``python -m rm_runner`` checks before Hydra starts the run."""
    from pathlib import Path

    from hydra import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from rm_runner.config import composing

    job: list[str] = overrides
    try:
        with composing(Path(config_dir) if config_dir else None) as search:
            jobs = [overrides]
            if multirun:  # each job as Hydra's basic sweeper makes them
                parsed = OverridesParser.create().parse_overrides(overrides)
                jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
            for job in jobs:
                compose(config_name="config", overrides=[*search, *job])
    except Exception as exc:  # composition failed: the overrides' (or the config's) fault
        added = _added_default(job)
        if added is not None:  # it names the override itself
            return added
        return f"[{' '.join(job)}] {explain(exc)}" if multirun else explain(exc)
    return None


def _added_default(overrides: list[str]) -> Optional[str]:
    """Why ``+group=option`` fails for a group the root defaults list already has (``recipe:
    null``, as lightning-hydra-template's ``experiment: null``): choose it without the ``+``."""
    from importlib import resources

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # explain() says what does not parse
        return None
    root = OmegaConf.load(str(resources.files("rm_runner.conf") / "config.yaml"))
    listed = {str(k): v for entry in root.defaults if OmegaConf.is_dict(entry) for k, v in entry.items()}
    for override in parsed:
        group = override.key_or_group
        if override.is_add() and override.package is None and group in listed:
            value, default = override.get_value_element_as_str(), listed[group]
            return (f"+{group}={value}: '{group}' is in the defaults list already "
                    f"({group}: {'null' if default is None else default}); "
                    f"choose it without the +: {group}={value}")
    return None


def _keys(node: Any) -> list[str]:
    from omegaconf import DictConfig

    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    error: Optional[BaseException] = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _first_line(exc: BaseException | str) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
