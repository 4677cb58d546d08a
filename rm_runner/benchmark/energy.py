"""Energy of the measured passes, read from the device's own meter; never an estimate.

One interface (``Meter``: ``start``, then ``stop`` gives the joules in between), a source per
device, chosen by the backend (``Backend.energy_meter``):

- CPU: RAPL's package counters under ``/sys/class/powercap`` (``intel-rapl:N/energy_uj``, which
  wraps at ``max_energy_range_uj``), where the kernel lets this user read them;
- NVIDIA GPU: NVML's cumulative energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ
  since the driver loaded); where the GPU does not support it, its power (``nvmlDeviceGetPowerUsage``)
  sampled and integrated;
- RBLN NPU: the Power column of ``rbln-smi``'s device table, sampled and integrated.

Where no meter is readable, ``EnergyUnavailable`` says what is missing, and the run records
``energy: null`` with that reason. The benchmark measures the idle power first
(``benchmark.energy.idle_s``) and reports both the gross joules and the net of idle.
"""

from __future__ import annotations

import re
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Optional

POWERCAP = Path("/sys/class/powercap")


class EnergyUnavailable(Exception):
    """No readable meter for this device; the message says why and what would fix it."""


class Meter(ABC):
    source: str  # what is read, for the record
    idle_w: Optional[float] = None  # the device's idle power, once the benchmark measured it

    @abstractmethod
    def start(self) -> None:
        """Begin a window."""

    @abstractmethod
    def stop(self) -> float:
        """The joules since ``start``."""

    def close(self) -> None:
        """Release the meter (NVML's handle, a sampling thread)."""


class Counter:
    """A cumulative energy counter in joules, and where it wraps (None: it does not)."""

    def __init__(self, read: Callable[[], float], wrap: Optional[float] = None) -> None:
        self.read, self.wrap = read, wrap


class CounterMeter(Meter):
    """The sum of cumulative counters' differences (a package each, a GPU each)."""

    def __init__(self, counters: list[Counter], source: str) -> None:
        self.counters, self.source = counters, source
        self._began: list[float] = []

    def start(self) -> None:
        self._began = [c.read() for c in self.counters]

    def stop(self) -> float:
        total = 0.0
        for counter, began in zip(self.counters, self._began):
            delta = counter.read() - began
            if delta < 0 and counter.wrap:  # wrapped once (RAPL's range lasts minutes at full load)
                delta += counter.wrap
            total += delta
        return total


class SampledMeter(Meter):
    """Power in watts sampled every ``interval_s`` in a thread, integrated (trapezoids)."""

    def __init__(self, power: Callable[[], float], source: str, interval_s: float = 0.1) -> None:
        self.power, self.source, self.interval_s = power, source, interval_s
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._samples = [(time.perf_counter(), self.power())]
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="energy-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._samples.append((time.perf_counter(), self.power()))

    def stop(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._samples.append((time.perf_counter(), self.power()))
        return integrate(self._samples)


def integrate(samples: list[tuple[float, float]]) -> float:
    """Joules from (seconds, watts) samples."""
    return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(samples, samples[1:]))


def rapl(root: Optional[Path] = None) -> Meter:
    """The CPU packages' RAPL counters (``intel-rapl:N``, named ``package-N``) under ``root`` (powercap's)."""
    root = root or POWERCAP
    if not root.is_dir():
        raise EnergyUnavailable(f"no RAPL here: {root} does not exist (a VM or a CPU without powercap)")
    packages = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1
                      and (p / "name").is_file() and (p / "name").read_text().strip().startswith("package"))
    if not packages:
        raise EnergyUnavailable(f"no RAPL package domain under {root}")
    counters = []
    for package in packages:
        energy = package / "energy_uj"
        try:
            energy.read_text()
        except OSError as exc:
            raise EnergyUnavailable(f"{energy} is not readable ({exc.strerror}): since Linux 5.10 only root reads "
                                    "RAPL (CVE-2020-8694); run as root or chmod o+r it") from None
        wrap_file = package / "max_energy_range_uj"
        wrap = int(wrap_file.read_text()) / 1e6 if wrap_file.is_file() else None
        counters.append(Counter(lambda f=energy: int(f.read_text()) / 1e6, wrap))
    names = ", ".join(p.joinpath("name").read_text().strip() for p in packages)
    return CounterMeter(counters, f"RAPL {names} ({root})")


class NvmlMeter(Meter):
    """NVML's energy counter for each GPU index, or its power sampled where the counter is not supported."""

    def __init__(self, indices: list[int], interval_s: float = 0.1) -> None:
        try:
            import pynvml
        except ImportError:
            raise EnergyUnavailable("NVML's Python bindings are not installed: pip install nvidia-ml-py") from None
        self.nvml = pynvml
        try:
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        except pynvml.NVMLError as exc:
            raise EnergyUnavailable(f"NVML did not start: {exc}") from None
        try:
            for handle in handles:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            self.inner: Meter = CounterMeter(
                [Counter(lambda h=h: pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000) for h in handles],
                f"NVML total energy, GPU {', '.join(map(str, indices))}")
        except pynvml.NVMLError:  # older GPUs: no counter, power only
            self.inner = SampledMeter(lambda: sum(pynvml.nvmlDeviceGetPowerUsage(h) for h in handles) / 1000,
                                      f"NVML power sampled every {interval_s} s, GPU {', '.join(map(str, indices))}",
                                      interval_s)
        self.source = self.inner.source

    def start(self) -> None:
        self.inner.start()

    def stop(self) -> float:
        return self.inner.stop()

    def close(self) -> None:
        self.nvml.nvmlShutdown()


def smi_power(table: str, npus: list[int]) -> float:
    """The summed Power (W) of ``npus``' rows in ``rbln-smi``'s device table, found by its header."""
    column: Optional[int] = None
    watts: dict[int, float] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column is None and "Power" in cells and "NPU" in cells:
            column = cells.index("Power")
        elif column is not None and len(cells) > column and cells[0].isdigit():
            found = re.fullmatch(r"([\d.]+)\s*W", cells[column])
            if found:
                watts[int(cells[0])] = float(found.group(1))
    missing = [n for n in npus if n not in watts]
    if missing:
        raise EnergyUnavailable(f"rbln-smi shows no power for NPU {', '.join(map(str, missing))}")
    return sum(watts[n] for n in npus)


def rbln_smi(npus: list[int], read: Callable[[], Optional[str]], interval_s: float = 0.5) -> Meter:
    """``rbln-smi``'s power for ``npus``, sampled (``read`` runs the tool: None when it is missing)."""
    table = read()
    if table is None:
        raise EnergyUnavailable("rbln-smi is not installed or did not answer")
    smi_power(table, npus)  # the columns are there now, or say why not

    def power() -> float:
        return smi_power(read() or "", npus)

    return SampledMeter(power, f"rbln-smi power sampled every {interval_s} s, NPU {', '.join(map(str, npus))}",
                        interval_s)


def summary(source: str, joules: float, seconds: float, idle_w: Optional[float], output_tokens: int,
            requests: int) -> dict[str, Any]:
    """What ``metrics.json`` records for a window: gross and net of idle, per token and per request."""
    net = joules - (idle_w or 0.0) * seconds
    return {"source": source, "joules": round(joules, 6), "seconds": round(seconds, 6),
            "output_tokens": output_tokens, "requests": requests,
            "average_w": round(joules / seconds, 3) if seconds > 0 else None,
            "idle_w": round(idle_w, 6) if idle_w is not None else None, "net_joules": round(net, 6),
            "joules_per_output_token": round(net / output_tokens, 6) if output_tokens else None,
            "joules_per_request": round(net / requests, 6) if requests else None,
            "output_tokens_per_joule": round(output_tokens / net, 6) if net > 0 else None}
