"""TorchServe handler for ``engine=torchserve``: runs inside TorchServe's Python worker.

It rebuilds the selected device's backend from ``spec.json`` (packed into the .mar by
rm_runner), prepares the model on it, and answers each request, a JSON body with a
left-padded batch of token ids and ``generate()`` keywords, with ``generate()``'s sequences.
A request with ``"stream": true`` is answered step by step instead: one intermediate response
(TorchServe's streaming, HTTP chunks) per decoding step with every row's new token, one JSON
line each, then a final ``{"done": true}``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RMRunnerHandler:
    def __init__(self) -> None:
        self.initialized = False
        self.backend: Any = None
        self.model: Any = None

    def initialize(self, context: Any) -> None:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        from rm_runner.config import ModelConfig

        spec = json.loads((Path(context.system_properties["model_dir"]) / "spec.json").read_text())
        self.backend = instantiate(spec["device"])
        self.backend.initialize()
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), spec["model_config"]))
        self.model = self.backend.prepare_model(Path(spec["model_path"]), config)
        self.initialized = True
        log.info("rm_runner handler ready: %s on %s", spec["model_path"], self.backend.name)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        import torch

        answers = []
        for request in data:
            body = request.get("body") or request.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            inputs = {"input_ids": torch.tensor(body["input_ids"]), "attention_mask": torch.tensor(body["attention_mask"])}
            if body.get("stream"):
                self.backend.execute(self.model, inputs, stopping_criteria=_stepper(context), **body["generate"])
                answers.append({"done": True})
                continue
            output = self.backend.execute(self.model, inputs, **body["generate"])
            answers.append({"sequences": getattr(output, "sequences", output).cpu().tolist()})
        return answers


def _stepper(context: Any) -> Any:
    """Stopping criteria that send each step's tokens to the client as an intermediate response."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from ts.protocol.otf_message_handler import send_intermediate_predict_response

    class Step(StoppingCriteria):
        def __call__(self, ids: Any, scores: Any, **kwargs: Any) -> Any:
            line = json.dumps({"tokens": ids[:, -1].tolist()}) + "\n"
            send_intermediate_predict_response([line], context.request_ids, "step", 200, context)
            return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)

    return StoppingCriteriaList([Step()])


_service = RMRunnerHandler()


def handle(data: Any, context: Any) -> Any:
    """TorchServe's module-level entry point."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
