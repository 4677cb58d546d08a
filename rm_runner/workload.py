"""Turn the workload section into requests: inline prompts, inline conversations, a JSONL file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rm_runner.errors import ConfigError
from rm_runner.requests import Request


def load_requests(workload: Any) -> list[Request]:
    """All requests of the workload, in order, checked before any model loads."""
    chat = bool(workload.chat_template)
    requests = [Request(id=str(i), prompt=p, chat_template=chat) for i, p in enumerate(workload.prompts)]
    for i, conversation in enumerate(workload.conversations):
        messages = [dict(m) for m in conversation]
        _check_messages(messages, f"workload.conversations[{i}]")
        requests.append(Request(id=f"chat-{i}", messages=messages))
    if workload.path:
        requests.extend(_read_jsonl(Path(workload.path).expanduser(), chat))
    if workload.limit is not None:
        requests = requests[: workload.limit]
    if not requests:
        raise ConfigError(
            "workload has no prompts: set workload.prompts, workload.conversations or workload.path"
        )
    return requests


def _read_jsonl(path: Path, chat: bool) -> list[Request]:
    if not path.is_file():
        raise ConfigError(f"workload.path: file {str(path)!r} does not exist")
    requests = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"workload.path {path}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected an object with 'prompt' or 'messages'")
        rid = str(item.get("id", lineno - 1))
        if isinstance(item.get("messages"), list):
            _check_messages(item["messages"], where)
            requests.append(Request(id=rid, messages=item["messages"]))
        elif isinstance(item.get("prompt"), str):
            requests.append(Request(id=rid, prompt=item["prompt"], chat_template=chat))
        else:
            raise ConfigError(f"{where}: expected a string 'prompt' or a list 'messages'")
    return requests


def _check_messages(messages: list[Any], where: str) -> None:
    for message in messages:
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ConfigError(f"{where}: each message needs 'role' and 'content', got {message!r}")
