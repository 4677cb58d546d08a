"""A Hugging Face hub id or a local model directory, as ``from_pretrained`` takes them."""

from __future__ import annotations

import os
import re
from pathlib import Path

from rm_runner.errors import ModelNotFoundError

# A repo id as the hub spells them: ``org/name``, or a bare ``name`` for the old root models (``gpt2``).
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class Pretrained:
    def __init__(self, path: str, revision: str | None = None) -> None:
        self.path = str(path)
        self.revision = revision

    def __repr__(self) -> str:
        return f"Pretrained({self.path!r})"

    def _is_local(self) -> bool:
        """A path that looks like one, or names something that exists; every other name that is
        spelled like a repo id (``gpt2`` as well as ``org/name``) is a hub id, as for from_pretrained."""
        return self.path.startswith(("/", ".", "~")) or os.path.exists(self.path) or not HUB_ID.match(self.path)

    def check(self) -> None:
        """Fail with one line naming the path before any weights are read."""
        if self._is_local():
            local = Path(self.path).expanduser()
            if not local.is_dir():
                hub = "" if HUB_ID.match(self.path) or self.path.startswith(("/", ".", "~")) else (
                    " (nor is it a hub id: those are `name` or `org/name`)")
                raise ModelNotFoundError(f"model.source.path: model directory {str(local)!r} does not exist{hub}")
            if not (local / "config.json").is_file():
                raise ModelNotFoundError(
                    f"model.source.path: {str(local)!r} has no config.json; expected a directory "
                    "written by save_pretrained()"
                )

    def resolve(self) -> Path:
        """A local directory with the model's files (the hub cache snapshot for a hub id)."""
        self.check()
        if self._is_local():
            return Path(self.path).expanduser().resolve()
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        try:
            return Path(snapshot_download(self.path, revision=self.revision, local_files_only=offline))
        except LocalEntryNotFoundError:
            raise ModelNotFoundError(
                f"model.source.path: hub id {self.path!r} is not in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}, set by HF_HUB_CACHE or HF_HOME) and "
                f"{'HF_HUB_OFFLINE=1 forbids downloading' if offline else 'the hub cannot be reached'}; "
                f"run `hf download {self.path}` where the hub is reachable (then copy the cache here), "
                "or set model.source.path to a local directory"
            ) from None
        except Exception as exc:  # gated repos, bad ids, network: the hub's own words
            raise ModelNotFoundError(f"model.source.path: {self.path!r} could not be fetched: {exc}") from None
