"""Triton Inference Server as an engine, through PyTriton (no Docker): the device's backend runs
inside the server process as a Triton model with dynamic batching; requests go over Triton's
HTTP protocol with the official ``tritonclient``.

PyTriton pins numpy<2, so the server (and this engine's client) live in their own venv:
``engine.python`` names it. Every address binds ``engine.host`` (127.0.0.1); the server is
stopped with SIGINT, which is what tritonserver expects.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from rm_runner import pyenv
from rm_runner.backends.base import Availability, Backend, OnStep
from rm_runner.backends.hf_generate import padded
from rm_runner.backends.server_steps import follow_server_steps
from rm_runner.config import ModelConfig
from rm_runner.engines.options import TritonOptions
from rm_runner.engines.served import ServedEngine
from rm_runner.engines.process import EngineError, ServerProcess, claim_port, http_ok
from rm_runner.engines.triton_vllm import TritonVLLMClient, vllm_backend_installed, write_model_repository
from rm_runner.engines.vllm_devices import server_settings
from rm_runner.requests import GenerationRequest
from rm_runner.rundir import atomic_write_text

log = logging.getLogger(__name__)


class TritonClient:
    """The executor: one Triton request per ``GenerationRequest``, each row's new tokens back; a
    request that is followed step by step goes to the decoupled ``<model>_stream`` over gRPC, and
    each row the caller finishes (a stop string, a client that left) is ended on the server too,
    through ``<model>_stop`` (see ``triton_server``)."""

    def __init__(self, url: str, model_name: str, timeout_s: float, grpc_url: str | None = None) -> None:
        import tritonclient.http as httpclient

        self.client = httpclient.InferenceServerClient(url=url, network_timeout=timeout_s, connection_timeout=timeout_s)
        self.model_name = model_name
        self.timeout_s = timeout_s
        stream_model = f"{model_name}_stream"
        self.grpc_url = grpc_url if grpc_url and self.client.is_model_ready(stream_model) else None

    def prepare_model(self, path: Any, config: Any) -> str:
        return self.model_name

    def streams(self, model: Any) -> bool:
        return self.grpc_url is not None

    def close(self) -> None:
        """Close the keep-alive connection; tritonserver waits for open connections before it exits."""
        self.client.close()

    @staticmethod
    def _arrays(request: GenerationRequest) -> dict[str, Any]:
        """The request as the Triton model's tensors: the prompts left-padded with their mask (a
        batch's one shape), and per row its ``max_new_tokens``, its sampling (JSON) and the EOS
        ids (-1 pads them; one column where there are none)."""
        import numpy as np

        inputs = padded(request)
        rows = len(request.prompts)
        sampling = json.dumps(asdict(request.sampling), sort_keys=True).encode()
        return {"input_ids": inputs["input_ids"].numpy().astype(np.int64),
                "attention_mask": inputs["attention_mask"].numpy().astype(np.int64),
                "max_new_tokens": np.array(request.max_new_tokens, dtype=np.int64)[:, None],
                "sampling": np.full((rows, 1), sampling, dtype=np.object_),
                "eos_ids": np.tile(np.array(list(request.eos_ids) or [-1], dtype=np.int64), (rows, 1))}

    def generate(self, model: str, request: GenerationRequest, on_step: Optional[OnStep] = None) -> list[list[int]]:
        import numpy as np
        import tritonclient.http as httpclient

        arrays = self._arrays(request)
        if on_step is not None and self.grpc_url is not None:
            return self._stream(request, arrays, on_step)
        tensors = []
        for name, array in arrays.items():
            datatype = {np.dtype(np.int64): "INT64", np.dtype(np.object_): "BYTES"}[array.dtype]
            tensor = httpclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = self.client.infer(self.model_name, tensors, outputs=[httpclient.InferRequestedOutput("new_tokens")])
        return [[t for t in row if t >= 0] for row in result.as_numpy("new_tokens").tolist()]

    def _stream(self, request: GenerationRequest, arrays: dict[str, Any], on_step: OnStep) -> list[list[int]]:
        """Follow the decoupled model's responses, one per step, until ``on_step`` finishes every
        row; the server ends the rows it finishes too (``follow_server_steps``)."""
        import numpy as np
        from pytriton.client import DecoupledModelClient

        stream, rows = uuid.uuid4().hex, len(request.prompts)
        arrays = {**arrays, "stream_id": np.full((rows, 1), stream.encode(), dtype=np.object_)}
        with DecoupledModelClient(self.grpc_url, f"{self.model_name}_stream", inference_timeout_s=self.timeout_s) as client:
            responses = client.infer_batch(**arrays)
            try:
                return follow_server_steps((r["tokens"][:, 0].tolist() for r in responses), rows, on_step,
                                           request.end_ids, request.pad_token_id,
                                           lambda ended: self.stop_rows(stream, ended))
            finally:  # frees the client, whose close waits for the stream's end: the rows we stopped bring it
                responses.close()

    def stop_rows(self, stream: str, rows: list[int]) -> None:
        """Have the server end ``rows`` of ``stream`` (``<model>_stop``); a failure is logged, not
        raised (the stream then runs to its end, as it would have without us)."""
        import numpy as np
        import tritonclient.http as httpclient

        stream_id = httpclient.InferInput("stream_id", [1, 1], "BYTES")
        stream_id.set_data_from_numpy(np.array([[stream.encode()]], dtype=np.object_))
        ended = httpclient.InferInput("rows", [1, len(rows)], "INT64")
        ended.set_data_from_numpy(np.array([rows], dtype=np.int64))
        try:
            self.client.infer(f"{self.model_name}_stop", [stream_id, ended])
        except Exception as exc:  # noqa: BLE001 - the stream goes on; say why
            log.warning("could not stop rows %s of Triton stream %s: %s", rows, stream, exc)


INSTALL = ("python3 -m venv .venv-triton && .venv-triton/bin/pip install torch==2.13.0 'rm-runner[triton]' "
           "(PyTriton pins numpy<2); then run .venv-triton/bin/python -m rm_runner engine=triton")


class TritonEngine(ServedEngine):
    name = "triton"
    packages = ("nvidia-pytriton", "tritonclient", "numpy")

    @classmethod
    def check_environment(cls, python: str, backend_cls: type) -> Availability:
        if vllm_backend_installed():
            return Availability(True)  # tritonserver with its vLLM backend (engine.server=auto picks it)
        if not pyenv.exists(python):
            return Availability(False, f"engine.python={python} does not exist", INSTALL)
        missing = pyenv.has_modules(python, "pytriton", "tritonclient")
        if missing:
            return Availability(False, f"engine.python={python} lacks {' and '.join(missing)} "
                                       "(nvidia-pytriton, tritonclient)", INSTALL)
        return Availability(True)

    options_class: type = TritonOptions

    def __init__(self, backend: Backend, **options: Any) -> None:
        super().__init__(backend, **options)
        o = self.options
        self.request_timeout_s = o.request_timeout_s
        self.server_kind = o.server.value  # auto is settled at start
        self.ports = {"http_port": o.http_port, "grpc_port": o.grpc_port, "metrics_port": o.metrics_port}
        self.model_name, self.max_batch_size, self.max_queue_delay_us = o.model_name, o.max_batch_size, o.max_queue_delay_us

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "server": self.server_kind, **self.ports, "max_batch_size": self.max_batch_size}

    def start(self) -> None:
        for key, port in self.ports.items():
            self.ports[key] = claim_port(self.host, port, key=f"engine.{key}")
        if self.server_kind == "auto":
            self.server_kind = "vllm" if vllm_backend_installed() else "pytriton"
        if self.server_kind == "vllm":
            if vllm_backend_installed() is None:
                raise EngineError("engine.server=vllm needs a tritonserver binary with its vLLM backend "
                                  "(e.g. NVIDIA's tritonserver vllm container); none found on PATH")
            self._started = True
            return
        found = self.check_environment(self.python, type(self.backend))
        if not found:
            raise EngineError(found.describe())
        if self.python != sys.executable:
            raise EngineError("engine=triton's client runs in the same venv as its server: "
                              f"run rm_runner with {self.python} -m rm_runner")
        self._started = True

    def _start_vllm_backend(self, path: Path, config: ModelConfig, log_dir: Path) -> TritonVLLMClient:
        settings = server_settings(self.backend, path, config, "engine=triton engine.server=vllm")
        repository = write_model_repository(log_dir / "triton-model-repository", self.model_name, settings,
                                            config.max_model_len)
        h, p = self.host, self.ports
        self.server = ServerProcess(
            "triton", [str(vllm_backend_installed()), f"--model-repository={repository}",
                       f"--http-address={h}", f"--http-port={p['http_port']}", f"--grpc-address={h}",
                       f"--grpc-port={p['grpc_port']}", f"--metrics-address={h}", f"--metrics-port={p['metrics_port']}"],
            log_dir / "triton-server.log", env=settings.env, stop_signal=signal.SIGINT)
        self.server.start()
        url = f"{h}:{p['http_port']}"
        self.ready_s = round(self.server.wait_ready(http_ok(f"http://{url}/v2/models/{self.model_name}/ready"),
                                                    self.startup_timeout_s), 3)
        return TritonVLLMClient(url, self.model_name, timeout_s=self.request_timeout_s)

    def load_model(self, path: Path, config: ModelConfig) -> None:
        log_dir = self.log_dir or Path.cwd()
        if self.server_kind == "vllm":
            self.executor = self._start_vllm_backend(path, config, log_dir)
            super().load_model(path, config)
            return
        spec = {
            **self.model_spec(path, config), "model_name": self.model_name, "host": self.host, **self.ports,
            "max_batch_size": self.max_batch_size, "max_queue_delay_us": self.max_queue_delay_us,
        }
        spec_path = log_dir / "triton-spec.json"
        atomic_write_text(spec_path, json.dumps(spec, indent=2) + "\n")
        self.server = ServerProcess("triton", [self.python, "-m", "rm_runner.engines.triton_server", str(spec_path)],
                                    log_dir / "triton-server.log", stop_signal=signal.SIGINT)
        self.server.start()
        url = f"{self.host}:{self.ports['http_port']}"
        ready = http_ok(f"http://{url}/v2/models/{self.model_name}/ready")
        self.ready_s = round(self.server.wait_ready(ready, self.startup_timeout_s), 3)
        self.executor = TritonClient(url, self.model_name, timeout_s=self.request_timeout_s,
                                     grpc_url=f"grpc://{self.host}:{self.ports['grpc_port']}")
        super().load_model(path, config)
