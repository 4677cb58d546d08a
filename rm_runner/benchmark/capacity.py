"""The highest request rate a server sustains within a latency SLO: a bounded search.

The bounds come from two passes, as guidellm's sweep starts: one request at a time (if the SLO
fails even then, nothing more is tried: capacity 0) and many at once (the saturated throughput
no arrival rate can exceed for long). Then Poisson probes: first at the saturated throughput
(met there: the SLO does not bind, capacity is that), then midway between the two; where that
fails, at the synchronous throughput itself, halving below it until a rate meets the SLO. Then
bisection of the bracket between the highest rate that met the SLO and the lowest that did not,
until it is narrower than ``tolerance`` (relative) or ``max_probes`` probes are spent. Low rates
are the slow probes (a pass of N requests at r req/s lasts N/r s), so the search only goes down
to them when the rates above have failed. A probe at a hopeless rate ends early, exactly: as
soon as more requests have missed the SLO than the attainment target allows, it cannot pass
(``misses_allowed``). Every probe is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

SYNCHRONOUS = 16  # requests in the one-at-a-time pass (the workload's first)


@dataclass
class Probe:
    rate: float  # Poisson arrivals, req/s
    met: bool  # the pass's SLO attainment reached the target


@dataclass
class Capacity:
    """The answer: ``capacity`` (req/s) and its bracket (the highest rate that met the SLO, the
    lowest that did not; ``None`` where the search never saw one)."""

    capacity: float
    met_rate: Optional[float]
    unmet_rate: Optional[float]
    synchronous_rate: float
    saturated_rate: Optional[float]
    probes: list[Probe]
    reason: str

    def summary(self) -> dict[str, Any]:
        return {"capacity_rps": round(self.capacity, 4), "bracket": [_round(self.met_rate), _round(self.unmet_rate)],
                "synchronous_rps": round(self.synchronous_rate, 4), "saturated_rps": _round(self.saturated_rate),
                "probes": len(self.probes), "reason": self.reason}


def misses_allowed(requests: int, attainment: float) -> int:
    """How many of ``requests`` may miss the SLO with the attainment still reached."""
    return requests - math.ceil(attainment * requests - 1e-9)


def search(synchronous: tuple[float, bool], saturated: Callable[[], float], probe: Callable[[float], Probe],
           tolerance: float = 0.1, max_probes: int = 8) -> Capacity:
    """``synchronous``: its throughput (req/s) and whether it met the SLO; ``saturated`` measures
    the all-at-once throughput; ``probe(rate)`` runs one Poisson pass."""
    sync_rate, sync_met = synchronous
    if not sync_met:
        return Capacity(0.0, None, sync_rate, sync_rate, None, [],
                        "the SLO is missed even one request at a time: no rate meets it")
    top = saturated()
    probes: list[Probe] = []
    met: Optional[float] = None
    unmet: Optional[float] = None

    def run(rate: float) -> Probe:
        nonlocal met, unmet
        result = probe(rate)
        probes.append(result)
        if result.met:
            met = rate if met is None else max(met, rate)
        else:
            unmet = rate if unmet is None else min(unmet, rate)
        return result

    if run(top).met:
        return Capacity(top, top, None, sync_rate, top, probes,
                        "met at the saturated throughput: the SLO does not bind below what the server can do")
    floor = sync_rate if sync_rate < top else top / 2  # below what failed
    if not run((floor + top) / 2).met and len(probes) < max_probes and not run(floor).met:
        while len(probes) < max_probes and met is None:  # queueing alone breaks it: halve until it holds
            run(unmet / 2)
    if met is None:
        return Capacity(0.0, None, unmet, sync_rate, top, probes,
                        f"no probed rate met the SLO (lowest tried {unmet:.4g} req/s)")
    while len(probes) < max_probes and (unmet - met) / met > tolerance:
        run((met + unmet) / 2)
    width = (unmet - met) / met
    why = (f"bracket within {tolerance:.0%}" if width <= tolerance
           else f"{max_probes} probes spent; the bracket is {width:.0%} wide")
    return Capacity(met, met, unmet, sync_rate, top, probes, why)


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)
