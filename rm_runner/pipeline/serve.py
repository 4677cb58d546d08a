"""Step: serve the loaded model over the OpenAI-compatible API until SIGTERM or Ctrl-C.

Readiness is announced in ``server.json`` (address, model, pid) and on stdout once the app has
started; every request is recorded in ``requests.jsonl``; a stop signal ends the run ``ok``
with the serving figures in ``metrics.json`` (see ``rm_runner.server.host``). A serve run in a
directory used before starts both files afresh, so they describe the same run.
"""

from __future__ import annotations

import logging
import os

from omegaconf import OmegaConf

from rm_runner.config import ServerConfig
from rm_runner.pipeline.context import RunContext
from rm_runner.pipeline.step import Step
from rm_runner.rundir import REQUESTS, SERVER

log = logging.getLogger(__name__)


class Serve(Step):
    def __call__(self, ctx: RunContext) -> None:
        from rm_runner.server.host import ApiServer

        settings: ServerConfig = OmegaConf.to_object(ctx.cfg.server)
        # An earlier serve run's records (and address) would otherwise stay beside this run's figures.
        for name in (REQUESTS, SERVER):
            (ctx.run_dir.path / name).unlink(missing_ok=True)

        def ready(server: ApiServer) -> None:
            ctx.run_dir.write_json(SERVER, {"url": server.url, "host": server.host, "port": server.port,
                                            "model": server.name, "pid": os.getpid(),
                                            "api_key_required": server.api_key is not None})
            log.info("serving %s at %s (%s); SIGTERM or Ctrl-C stops", server.name, server.url,
                     f"API key from ${settings.api_key_env}" if server.api_key else "no API key")
            print(f"serving {server.name} at {server.url}", flush=True)

        server = ApiServer(ctx.engine, ctx.model.name, ctx.engine.max_model_len, settings, ctx.generation,
                           on_record=lambda record: ctx.run_dir.append_jsonl(REQUESTS, record), on_ready=ready)
        try:
            server.run()
        finally:
            ctx.metrics["serve"] = server.summary()
        log.info("server stopped: %d requests", ctx.metrics["serve"]["requests"])
