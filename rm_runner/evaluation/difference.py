"""Is a score lower on this device or dtype, or within error? Read from ``eval.json`` records.

A task score is a mean over documents and lm-eval gives its standard error. The difference of
two runs' scores has a standard error of ``sqrt(se_a² + se_b²)`` (the two taken as independent
samples, which is conservative for runs over the same documents); a difference of at most twice
that is **within error**, a larger one is **higher/lower by N stderr** (N = |difference| / its
stderr), with whether that is better or worse for the metric (``higher_is_better``, as lm-eval
says per metric: accuracy higher, perplexity lower). The sweep summary and ``rm-runner-compare``
both judge with this one rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

RULE = ("within error when |difference| <= 2 × its stderr, sqrt(se_a² + se_b²) from lm-eval's per-task stderr; "
        "otherwise higher/lower by N stderr, better or worse as lm-eval's higher_is_better says")
WITHIN = 2.0  # stderr of the difference


@dataclass(frozen=True)
class Score:
    """One task metric of one run: ``metric`` as lm-eval names it with its filter (``acc,none``)."""

    task: str
    metric: str
    value: float
    stderr: Optional[float] = None
    samples: Optional[int] = None
    higher_is_better: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return self.task, self.metric

    def text(self) -> str:
        spread = f" ± {self.stderr:.3g}" if self.stderr is not None else ""
        count = f" (n={self.samples})" if self.samples is not None else ""
        return f"{self.value:.4g}{spread}{count}"


@dataclass(frozen=True)
class Difference:
    """``other - reference`` and what it means."""

    difference: float
    stderr: Optional[float]
    verdict: str

    def text(self) -> str:
        return f"{self.difference:+.4g} {self.verdict}"


def scores_of(record: dict[str, Any]) -> list[Score]:
    """The scores of one ``eval.json`` (``pipeline.eval.scores``' shape), task by task."""
    out = []
    for task, entry in (record.get("tasks") or {}).items():
        for metric, m in (entry.get("metrics") or {}).items():
            if not isinstance(m.get("value"), (int, float)):
                continue
            stderr = m.get("stderr")
            out.append(Score(task, metric, float(m["value"]),
                             float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
                             entry.get("samples"), bool(m.get("higher_is_better", True))))
    return out


def difference(reference: Score, other: Score) -> Difference:
    """The module rule."""
    d = other.value - reference.value
    if abs(d) < 1e-12:
        return Difference(0.0, _combined(reference, other), "same")
    direction = "higher" if d > 0 else "lower"
    judged = "better" if (d > 0) == other.higher_is_better else "worse"
    se = _combined(reference, other)
    if se is None:
        return Difference(d, None, f"{direction}, {judged} (no stderr to judge by)")
    if se == 0:
        return Difference(d, 0.0, f"{direction}, {judged} (stderr 0 on both sides)")
    n = abs(d) / se
    if n <= WITHIN:
        return Difference(d, se, f"within error ({n:.1f} stderr)")
    return Difference(d, se, f"{direction} by {n:.1f} stderr ({judged})")


def _combined(a: Score, b: Score) -> Optional[float]:
    if a.stderr is None or b.stderr is None:
        return None
    return math.hypot(a.stderr, b.stderr)
