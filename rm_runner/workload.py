"""Turn the workload section into requests: inline prompts, inline conversations, a JSONL file,
a ShareGPT file, and seeded synthetic prompts (made once the model's tokenizer is loaded)."""

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
    if workload.sharegpt_path:
        requests.extend(_read_sharegpt(Path(workload.sharegpt_path).expanduser()))
    if not requests and not workload.synthetic.num_prompts:
        raise ConfigError(
            "workload has no prompts: set workload.prompts, workload.conversations, workload.path, "
            "workload.sharegpt_path or workload.synthetic.num_prompts"
        )
    return requests


def synthesize(tokenizer: Any, synthetic: Any) -> list[Request]:
    """``num_prompts`` prompts of random ordinary token ids, lengths drawn from seeded normals.

    Ids are sent as they are (no decode/re-encode round trip), so input lengths are exact in
    the model's own tokens; output lengths become each request's ``max_new_tokens``.
    """
    import random

    rng = random.Random(synthetic.seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]

    def length(mean: int, stddev: float) -> int:
        return max(1, round(rng.gauss(mean, stddev))) if stddev else mean

    requests = []
    for i in range(synthetic.num_prompts):
        n_in = length(synthetic.input_tokens, synthetic.input_tokens_stddev)
        n_out = length(synthetic.output_tokens, synthetic.output_tokens_stddev)
        requests.append(Request(id=f"synthetic-{i}", prompt_ids=[rng.choice(vocab) for _ in range(n_in)],
                                max_new_tokens=n_out))
    return requests


def with_tokenizer(requests: list[Request], tokenizer: Any, workload: Any) -> list[Request]:
    """What needs the model's tokenizer: ShareGPT output lengths, then the synthetic prompts;
    ``workload.limit`` then keeps the first requests of them all (synthetic ones included)."""
    for request in requests:
        if request.reference_output and request.max_new_tokens is None:
            request.max_new_tokens = max(1, len(tokenizer(request.reference_output, add_special_tokens=False)["input_ids"]))
    if workload.synthetic.num_prompts:
        requests = requests + synthesize(tokenizer, workload.synthetic)
    return requests if workload.limit is None else requests[: workload.limit]


def _read_sharegpt(path: Path) -> list[Request]:
    """ShareGPT JSON: each conversation's first human turn is the prompt (chat-templated); the
    reply after it sets the output length, in the model's tokens (as vLLM's bench does)."""
    if not path.is_file():
        raise ConfigError(f"workload.sharegpt_path: file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"workload.sharegpt_path {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise ConfigError(f"workload.sharegpt_path {path}: expected a list of conversations")
    requests = []
    for i, item in enumerate(data):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list):
            raise ConfigError(f"workload.sharegpt_path {path}: entry {i} has no 'conversations' list")
        human = next((k for k, t in enumerate(turns) if isinstance(t, dict) and t.get("from") in ("human", "user")), None)
        if human is None:
            continue  # nothing to ask
        question = turns[human].get("value")
        after = turns[human + 1] if human + 1 < len(turns) else {}
        reply = after.get("value") if isinstance(after, dict) else None
        if not isinstance(question, str) or not isinstance(after, dict) or not isinstance(reply, (str, type(None))):
            raise ConfigError(f"workload.sharegpt_path {path}: entry {i}: every turn needs a string 'value'")
        requests.append(Request(id=str(item.get("id", i)), messages=[{"role": "user", "content": question}],
                                reference_output=reply or None))
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
        timestamp = item.get("timestamp")
        if timestamp is not None and (isinstance(timestamp, bool) or not isinstance(timestamp, (int, float))
                                      or not 0 <= timestamp < float("inf")):
            raise ConfigError(f"{where}: 'timestamp' must be seconds from the start (a number >= 0), got {timestamp!r}")
        if isinstance(item.get("messages"), list):
            _check_messages(item["messages"], where)
            requests.append(Request(id=rid, messages=item["messages"], timestamp=timestamp))
        elif isinstance(item.get("prompt"), str):
            requests.append(Request(id=rid, prompt=item["prompt"], chat_template=chat, timestamp=timestamp))
        else:
            raise ConfigError(f"{where}: expected a string 'prompt' or a list 'messages'")
    return requests


def _check_messages(messages: list[Any], where: str) -> None:
    for message in messages:
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ConfigError(f"{where}: each message needs 'role' and 'content', got {message!r}")
