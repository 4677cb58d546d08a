"""TorchServe handler for ``engine=torchserve``: runs inside TorchServe's Python worker.

It rebuilds the selected device's backend from ``spec.json`` (packed into the .mar by
rm_runner), prepares the model on it, and answers each request, a JSON body holding a
``GenerationRequest`` (``request``), with each row's new tokens.
A request with ``"stream": true`` is answered step by step instead: one intermediate response
(TorchServe's streaming, HTTP chunks) per decoding step with every row's new token, one JSON
line each, then a final ``{"done": true}``.

A streamed row ends on the server as soon as it ends for its client: at the EOS ids the request
names (unless it ignores EOS), and when the client marks it stopped (a stop string, a client that
left) in the stop directory it shares with this handler (``StopFiles``): TorchServe tells a busy
worker nothing, not even that the client closed the connection.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


class StopFiles:
    """Which rows of a stream its client has ended: an empty file ``STREAM.ROW`` (``STREAM.all``)
    each, in a directory the engine's client and the handler share (both run on this host).

    The client writes them; the handler reads them every step and removes a stream's files when
    it ends (and, one worker serving one stream at a time, any other stream's left behind).
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _check(stream: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{32}", stream):
            raise ValueError(f"stream id {stream!r}: expected 32 hex digits")
        return stream

    def stop(self, stream: str, rows: Optional[list[int]] = None) -> None:
        """Mark ``rows`` (None: every row) of ``stream`` as ended."""
        for row in ["all"] if rows is None else [int(r) for r in rows]:
            (self.directory / f"{self._check(stream)}.{row}").touch()

    def stopped(self, stream: str, rows: int) -> list[bool]:
        prefix = self._check(stream) + "."
        ended = {name[len(prefix):] for name in os.listdir(self.directory) if name.startswith(prefix)}
        return ["all" in ended or str(row) in ended for row in range(rows)]

    def clear(self, stream: str, others: bool = False) -> None:
        """Remove ``stream``'s files, or (``others``) every other stream's."""
        prefix = self._check(stream) + "."
        for name in os.listdir(self.directory):
            if name.startswith(prefix) != others:
                (self.directory / name).unlink(missing_ok=True)


class RMRunnerHandler:
    def __init__(self) -> None:
        self.initialized = False
        self.backend: Any = None
        self.model: Any = None
        self.stops: Optional[StopFiles] = None

    def initialize(self, context: Any) -> None:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        from rm_runner.config import ModelConfig

        spec = json.loads((Path(context.system_properties["model_dir"]) / "spec.json").read_text())
        self.backend = instantiate(spec["device"])
        self.backend.initialize()
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), spec["model_config"]))
        self.model = self.backend.prepare_model(Path(spec["model_path"]), config)
        self.stops = StopFiles(spec["stop_dir"]) if spec.get("stop_dir") else None
        self.initialized = True
        log.info("rm_runner handler ready: %s on %s", spec["model_path"], self.backend.name)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        from rm_runner.requests import GenerationRequest

        answers = []
        for item in data:
            body = item.get("body") or item.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            request = GenerationRequest.from_json(body["request"])
            if body.get("stream"):
                answers.append(self._stream(request, body, context))
                continue
            answers.append({"new_tokens": self.backend.generate(self.model, request)})
        return answers

    def _stream(self, request: Any, body: dict[str, Any], context: Any) -> dict[str, Any]:
        """Generate a step at a time, each step's tokens sent to the client as an intermediate
        response: rows end at the request's EOS ids (unless it ignores EOS) or when the client
        stops them; the log says after how many steps."""
        from ts.protocol.otf_message_handler import send_intermediate_predict_response

        stream = body.get("stream_id")
        stops = self.stops if stream else None
        if stops is not None:
            stops.clear(stream, others=True)  # what earlier streams left: a stop that came after their end
        rows = len(request.prompts)
        ran = [0]

        def on_step(tokens: list[int]) -> list[bool]:
            ran[0] += 1
            line = json.dumps({"tokens": tokens}) + "\n"
            send_intermediate_predict_response([line], context.request_ids, "step", 200, context)
            return stops.stopped(stream, rows) if stops is not None else [False] * rows

        try:
            self.backend.generate(self.model, request, on_step)
        finally:
            by_client = sum(stops.stopped(stream, rows)) if stops is not None else 0
            if stops is not None:
                stops.clear(stream)
            log.info("stream %s: %d decoding steps for %d rows (max_new_tokens %s), %d ended by the client",
                     stream, ran[0], rows, max(request.max_new_tokens), by_client)
        return {"done": True}


_service = RMRunnerHandler()


def handle(data: Any, context: Any) -> Any:
    """TorchServe's module-level entry point."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
