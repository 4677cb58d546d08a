"""Checks before a sweep goes out through another launcher, so a bad setting fails in seconds
with its key named instead of hanging: a Ray cluster address that does not answer."""

from __future__ import annotations

import socket
import sys
from typing import Any
from urllib.parse import urlsplit

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rm_runner.errors import ConfigError

CONNECT_TIMEOUT_S = 10.0


class LauncherCheck(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        address = OmegaConf.select(config, "hydra.launcher.ray.init.address")
        if address and address not in ("auto", "local"):
            try:
                check_ray_address(str(address))
            except ConfigError as exc:  # Hydra turns a callback's exceptions into warnings: exit here
                print(f"error: {exc}", file=sys.stderr, flush=True)
                sys.exit(1)


def check_ray_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to the cluster's head within ``timeout_s``, or a ConfigError naming the key."""
    parsed = urlsplit(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ConfigError(f"hydra.launcher.ray.init.address={address}: expected host:port or ray://host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(
            f"hydra.launcher.ray.init.address={address} did not answer within {timeout_s:.0f} s ({exc}); "
            "start the cluster (ray start --head) or fix the address (RAY_ADDRESS)"
        ) from None
