"""The interface every device backend implements; the registry (``registry.py``) finds them.

A backend turns a model reference into something that runs on its device. Engines hand it a
``GenerationRequest`` (``generate``); code written against ``transformers`` (the hook) hands it
Hugging Face-form inputs and keywords (``execute``), so it does not change from one device to another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from rm_runner.config import check_options

if TYPE_CHECKING:
    from rm_runner.requests import GenerationRequest

OnStep = Callable[[list[int]], list[bool]]


def tool_output(tool: str, *args: str) -> str | None:
    """What a vendor's command-line tool prints (``nvidia-smi``, ``rbln-smi``); None when it is not
    installed or does not answer within 30 s (a wedged driver must not hang a run or the doctor)."""
    import shutil
    import subprocess

    path = shutil.which(tool)
    if path is None:
        return None
    try:
        return subprocess.run([path, *args], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; when not, which check failed and what fixes it."""

    ok: bool
    reason: str = ""
    fix: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def describe(self) -> str:
        if self.ok:
            return "available"
        return f"{self.reason}. Fix: {self.fix}" if self.fix else self.reason

    def unavailable(self, device: str) -> str:
        """The one-line error of a run on ``device`` when it is not available."""
        return f"device={device} is not available here: {self.describe()}"


@dataclass(frozen=True)
class OpenAIEndpoint:
    """Where an OpenAI-compatible server listens and how it is talked to: a device that is such a
    server (``Backend.endpoint``), or the server an engine started. Engines' OpenAI client
    (``engines/openai_client.py``) takes it; ``section`` is where these are set, for errors."""

    base_url: str
    model: Optional[str] = None  # the served model name; None: the first one the server lists
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (never the key)
    timeout_s: float = 120.0
    max_concurrency: int = 8
    openai_extensions: Any = "auto"  # vLLM's request fields: "auto" (ask the server), True or False
    token_prompts: Any = "auto"  # prompts as token ids: "auto", True or False (text)
    section: str = "device"


@dataclass
class BackendOptions:
    """Options common to every backend; each backend extends this with its own."""

    # The interpreter (a venv's bin/python) that jobs on this device run in, for SDKs whose
    # pins conflict with the rest; the run re-executes itself with it. null: this one.
    python: Optional[str] = None


class Backend(ABC):
    """One device kind. Registered under the entry-point group ``rm_runner.backends``."""

    name: ClassVar[str]
    # RBLN NPU 400 > GPU 300 > CPU 100 > Remote 0: `device=auto` takes the highest available. A plugin
    # must set it (the registry refuses one without it: registry.py says why there is no default).
    priority: ClassVar[int]
    options_class: ClassVar[type] = BackendOptions
    # The distributions this backend runs on; the doctor shows their installed versions.
    packages: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def hardware(cls) -> list[str]:
        """The devices of this kind present here, one line each, from the vendor's own tools
        (never an import of the SDK): what the doctor lists. [] when none is found."""
        return []

    def __init__(self, **options: Any) -> None:
        self.options = check_options(self.options_class, options, section="device")
        # Filled by `device=auto`: every candidate considered and why it was or was not chosen.
        self.selection: list[dict[str, Any]] = []

    @classmethod
    @abstractmethod
    def is_available(cls) -> Availability:
        """Cheap check with no model loaded; must not raise."""

    def availability(self) -> Availability:
        """``is_available`` for this instance's options (a mode may need more than the class does)."""
        return self.is_available()

    @abstractmethod
    def initialize(self) -> None:
        """Claim the device (threads, memory, runtime) before any model is prepared."""

    @abstractmethod
    def prepare_model(self, model: Any, model_config: Any) -> Any:
        """Return a handle that ``execute`` runs: from a local model directory or a loaded model."""

    @abstractmethod
    def execute(self, model: Any, inputs: dict[str, Any], method: str = "generate", **kwargs: Any) -> Any:
        """Run Hugging Face-form inputs (input_ids, attention_mask) through the model.

        ``method="generate"`` returns what ``generate()`` returns (token ids / GenerateOutput);
        ``method="forward"`` returns the forward pass's output (logits).
        """

    def generate(self, model: Any, request: "GenerationRequest", on_step: Optional[OnStep] = None) -> list[list[int]]:
        """Each row's new tokens for ``request`` (the engines' one call); see ``GenerationRequest``
        for where rows end. ``on_step`` (only where ``streams``) is called after every decoding
        step with each row's new token and answers which rows are finished.

        By default through ``execute``: transformers' ``generate()``, which is where the request
        becomes its keywords and a padded batch (``hf_generate``)."""
        from rm_runner.backends import hf_generate

        return hf_generate.generate(self.execute, model, request, on_step)

    def streams(self, model: Any) -> bool:
        """True when ``generate`` takes ``on_step`` and calls it after every decoding step, so
        served tokens reach clients as they are made."""
        return False

    def endpoint(self) -> Optional[OpenAIEndpoint]:
        """Where the device is reached, for a device that is an OpenAI-compatible server (engines
        then talk to it through their client instead of preparing a model here); None for the rest."""
        return None

    def running_batch(self, model: Any) -> Any:
        """A ``running_batch.RunningBatch`` over ``model`` (continuous batching), or None where the
        device runs whole ``generate()`` batches only (compiled batch shapes, a server)."""
        return None

    def max_model_len(self, model_config: Any) -> tuple[int, str]:
        """The longest prompt + output the prepared model takes, and the option that sets it:
        ``model.max_model_len``, unless the device fixed a shorter length when it compiled the
        model (an RBLN NPU's max_seq_len), so requests are refused by length before they reach it."""
        return model_config.max_model_len, "model.max_model_len"

    def device_memory(self) -> dict[str, float] | None:
        """Peak device memory in GiB where the device reports it (GPU), else None."""
        return None

    def energy_meter(self, model_config: Any) -> Any:
        """The device's own energy meter (``benchmark.energy.Meter``) for the devices running
        ``model_config``; raises ``EnergyUnavailable`` saying what is missing."""
        from rm_runner.benchmark.energy import EnergyUnavailable

        raise EnergyUnavailable(f"device={self.name} has no energy meter rm_runner reads")

    @abstractmethod
    def cleanup(self) -> None:
        """Release the device; safe to call twice."""

    def target_config(self) -> dict[str, Any]:
        """A `_target_` config that rebuilds this backend in another process (a server's)."""
        from omegaconf import OmegaConf

        options = OmegaConf.to_container(OmegaConf.structured(self.options), enum_to_str=True)
        return {"_target_": f"{type(self).__module__}.{type(self).__qualname__}", **options}

    def describe(self) -> dict[str, Any]:
        """What the run directory records about this backend."""
        described: dict[str, Any] = {"name": self.name, "options": asdict(self.options)}
        if self.selection:
            described["selection"] = self.selection
        return described
