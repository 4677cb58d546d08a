"""Test-only ``rebel.compile_context``: what optimum-rbln 0.12 uses of it (``modeling_decoderonly``).

A compile context names the tensors that stay at one address across the graphs compiled with it
(the KV caches): on the device every graph of the context reads and writes the same memory, and
the stand-in runtime shares them the same way.
"""

from __future__ import annotations

import uuid
from typing import Any


class CompileContext:
    def __init__(self, use_weight_sharing: bool = False) -> None:
        self.use_weight_sharing = use_weight_sharing
        self.id = uuid.uuid4().hex
        self.static_names: list[str] = []

    def mark_static_address(self, tensor: Any, name: str) -> None:
        if name not in self.static_names:
            self.static_names.append(name)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"test rebel: CompileContext.{name} is not mirrored")
