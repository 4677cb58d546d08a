"""Errors a user can act on.

Anything raised as a ``RunnerError`` is printed as one clear line (no traceback) and
exits non-zero; everything else is a bug and keeps its traceback.
"""


class RunnerError(Exception):
    """A failure caused by input or environment, with a message that says how to fix it."""


class ConfigError(RunnerError):
    """The composed config is invalid: names the key and the accepted values."""


class ModelNotFoundError(RunnerError):
    """The model source cannot be found locally (or on the hub when online)."""


class DeviceUnavailableError(RunnerError):
    """The selected device cannot run here: names the failed check and the install command."""


class UnsupportedSampling(ConfigError):
    """A sampling setting the engine cannot honour (a server that does not take vLLM's
    extensions): ``field``, vLLM's name for it (the API's too), and why; a run's ConfigError, the
    API's 400 naming the field."""

    def __init__(self, field: str, why: str, message: str) -> None:
        super().__init__(message)
        self.field, self.why = field, why
