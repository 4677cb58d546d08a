"""Test-only stand-in for optimum.rbln: records calls, "compiles" by copying, runs on the CPU."""

import json
import os
import shutil
from pathlib import Path


def _record(**call) -> None:
    log = os.environ.get("RBLN_STANDIN_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps(call, default=str) + "\n")


class _Compiled:
    def __init__(self, source: str, options: dict) -> None:
        self.source, self.options = source, options

    def save_pretrained(self, out: str) -> None:
        shutil.copytree(self.source, out, dirs_exist_ok=True)
        Path(out, "model.rbln").write_bytes(b"stand-in artifact")
        Path(out, "rbln_config.json").write_text(json.dumps(self.options))
        _record(call="save_pretrained", out=out)


class RBLNAutoModelForCausalLM:
    @classmethod
    def from_pretrained(cls, model_id, export=None, **kwargs):
        _record(call="from_pretrained", model_id=str(model_id), export=export, kwargs=kwargs)
        if export:
            return _Compiled(str(model_id), kwargs)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_id)
