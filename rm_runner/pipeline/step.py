"""What a pipeline step is: checked before anything slow, then run."""

from __future__ import annotations

from rm_runner.pipeline.context import RunContext


class Step:
    """A step of ``pipeline.steps``. The runner calls every step's ``check`` before the engine
    starts and the model loads, so input only a step can judge (an eval task name) fails in
    seconds, not after minutes of loading; then it calls the steps in order."""

    def check(self, ctx: RunContext) -> None:
        """Raise a ConfigError naming the field and the fix; the default has nothing to check."""

    def __call__(self, ctx: RunContext) -> None:
        raise NotImplementedError
