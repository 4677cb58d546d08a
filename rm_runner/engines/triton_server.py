"""The Triton Inference Server side of ``engine=triton``: run by rm_runner in the PyTriton venv.

``python -m rm_runner.engines.triton_server SPEC.json`` builds the selected device's backend
in this process, prepares the model on it, and binds it as a Triton model with dynamic
batching (PyTriton bundles the tritonserver binary). Requests carry a left-padded batch of
token ids and the generation parameters; the answer is ``generate()``'s sequences. SIGINT stops it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("rm_runner.triton_server")

PARAMS = (("max_new_tokens", np.int64), ("do_sample", np.bool_), ("temperature", np.float32),
          ("top_p", np.float32), ("top_k", np.int64), ("seed", np.int64), ("ignore_eos", np.bool_))


def hf_kwargs(values: dict[str, Any], pad_token_id: int) -> dict[str, Any]:
    """One request's parameters as ``generate()`` keywords (the inverse of the client's encoding)."""
    kwargs: dict[str, Any] = {"max_new_tokens": int(values["max_new_tokens"]), "do_sample": bool(values["do_sample"]),
                              "pad_token_id": pad_token_id, "seed": int(values["seed"])}
    if kwargs["do_sample"]:
        kwargs.update(temperature=float(values["temperature"]), top_p=float(values["top_p"]),
                      top_k=int(values["top_k"]) or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if values["ignore_eos"]:
        kwargs["eos_token_id"] = None
    return kwargs


def make_infer(backend: Any, model: Any, pad_token_id: int):
    import torch
    from pytriton.decorators import batch

    @batch
    def infer(input_ids: np.ndarray, attention_mask: np.ndarray, **params: np.ndarray) -> dict[str, np.ndarray]:
        # Requests merged by the dynamic batcher may differ in parameters: one generate() per kind.
        keys = [tuple(params[name][row, 0].item() for name, _ in PARAMS) for row in range(len(input_ids))]
        outputs: list[list[int] | None] = [None] * len(input_ids)
        for key in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            kwargs = hf_kwargs(dict(zip((name for name, _ in PARAMS), key)), pad_token_id)
            inputs = {"input_ids": torch.from_numpy(input_ids[rows]), "attention_mask": torch.from_numpy(attention_mask[rows])}
            sequences = backend.execute(model, inputs, **kwargs)
            for row, seq in zip(rows, getattr(sequences, "sequences", sequences).cpu().tolist()):
                outputs[row] = seq
        width = max(len(o) for o in outputs)
        return {"sequences": np.array([o + [pad_token_id] * (width - len(o)) for o in outputs], dtype=np.int64)}

    return infer


def main(spec_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    # Triton's Python-backend stub must load this interpreter's libpython, not the system's.
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)

    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig
    from transformers import AutoTokenizer

    from rm_runner.config import ModelConfig as RunModelConfig

    backend = instantiate(spec["device"])
    backend.initialize()
    model_config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunModelConfig), spec["model_config"]))
    model = backend.prepare_model(Path(spec["model_path"]), model_config)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    host = spec["host"]
    config = TritonConfig(http_address=host, http_port=spec["http_port"], grpc_address=host,
                          grpc_port=spec["grpc_port"], metrics_address=host, metrics_port=spec["metrics_port"],
                          exit_on_error=True, exit_timeout_secs=5)
    inputs = [Tensor(name="input_ids", dtype=np.int64, shape=(-1,)),
              Tensor(name="attention_mask", dtype=np.int64, shape=(-1,)),
              *(Tensor(name=name, dtype=dtype, shape=(1,)) for name, dtype in PARAMS)]
    with Triton(config=config) as triton:
        triton.bind(model_name=spec["model_name"], infer_func=make_infer(backend, model, pad), inputs=inputs,
                    outputs=[Tensor(name="sequences", dtype=np.int64, shape=(-1,))],
                    config=ModelConfig(max_batch_size=spec["max_batch_size"],
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=spec["max_queue_delay_us"])),
                    strict=True)
        log.info("serving %s on %s:%d (device %s)", spec["model_name"], host, spec["http_port"], backend.name)
        triton.serve()


if __name__ == "__main__":
    main(sys.argv[1])
