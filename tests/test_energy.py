"""Energy meters: RAPL from files shaped like powercap (wrapping, unreadable, absent), NVML from a
stand-in with pynvml's names (counter, and power where the counter is not supported), rbln-smi's
table, and a benchmark whose meter reads a powercap tree that a thread keeps counting up."""

from __future__ import annotations

import sys
import threading
import time
import types
from pathlib import Path

import pytest

from rm_runner.benchmark import energy
from rm_runner.benchmark.energy import EnergyUnavailable, NvmlMeter, integrate, rapl, rbln_smi, smi_power


def powercap(root: Path, packages: dict[int, int], wrap: int = 262143328850) -> Path:
    for index, microjoules in packages.items():
        domain = root / f"intel-rapl:{index}"
        domain.mkdir(parents=True)
        (domain / "name").write_text(f"package-{index}\n")
        (domain / "energy_uj").write_text(f"{microjoules}\n")
        (domain / "max_energy_range_uj").write_text(f"{wrap}\n")
        core = domain / f"intel-rapl:{index}:0"  # a subdomain: inside the package's figure already
        core.mkdir()
        (core / "name").write_text("core\n")
        (core / "energy_uj").write_text("0\n")
    return root


def test_rapl_sums_the_packages_and_unwraps(tmp_path: Path) -> None:
    root = powercap(tmp_path, {0: 1_000_000, 1: 262143328850 - 500_000})
    meter = rapl(root)
    assert meter.source == f"RAPL package-0, package-1 ({root})"
    meter.start()
    (root / "intel-rapl:0" / "energy_uj").write_text("3500000\n")  # +2.5 J
    (root / "intel-rapl:1" / "energy_uj").write_text("1500000\n")  # wrapped: +0.5 J + 1.5 J
    assert meter.stop() == pytest.approx(4.5)


def test_rapl_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(EnergyUnavailable, match="does not exist"):
        rapl(tmp_path / "none")
    with pytest.raises(EnergyUnavailable, match="no RAPL package domain"):
        rapl(tmp_path)
    root = powercap(tmp_path / "p", {0: 0})
    (root / "intel-rapl:0" / "energy_uj").unlink()
    (root / "intel-rapl:0" / "energy_uj").mkdir()  # unreadable as a file, even for root
    with pytest.raises(EnergyUnavailable, match=r"energy_uj is not readable .*CVE-2020-8694"):
        rapl(root)


def fake_nvml(monkeypatch: pytest.MonkeyPatch, counter: bool) -> dict:
    """pynvml's names as nvidia-ml-py has them; energy in mJ, power in mW."""
    state = {"mj": 10_000, "calls": [], "shutdown": False}
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def total_energy(handle):
        if not counter:
            raise NVMLError("Not Supported")
        return state["mj"]

    module.NVMLError = NVMLError
    module.nvmlInit = lambda: state["calls"].append("init")
    module.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"
    module.nvmlDeviceGetTotalEnergyConsumption = total_energy
    module.nvmlDeviceGetPowerUsage = lambda handle: 150_000  # 150 W
    module.nvmlShutdown = lambda: state.update(shutdown=True)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return state


def test_nvml_reads_the_energy_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    state = fake_nvml(monkeypatch, counter=True)
    meter = NvmlMeter([0, 1])
    assert meter.source == "NVML total energy, GPU 0, 1"
    meter.start()
    state["mj"] += 2_500  # each GPU +2.5 J
    assert meter.stop() == pytest.approx(5.0)
    meter.close()
    assert state["shutdown"]


def test_nvml_without_the_counter_integrates_sampled_power(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml(monkeypatch, counter=False)
    meter = NvmlMeter([0], interval_s=0.01)
    assert meter.source.startswith("NVML power sampled")
    began = time.perf_counter()
    meter.start()
    time.sleep(0.2)  # a window to integrate over
    joules = meter.stop()
    assert joules == pytest.approx(150 * (time.perf_counter() - began), rel=0.05)


def test_without_pynvml_the_reason_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(EnergyUnavailable, match="pip install nvidia-ml-py"):
        NvmlMeter([0])


SMI = """+-----+-----------+---------+---------------+------+---------+------+---------------------+-------+
| NPU |    Name   | Device  |   PCI BUS ID  | Temp |  Power  | Perf |  Memory(used/total) |  Util |
+-----+-----------+---------+---------------+------+---------+------+---------------------+-------+
| 0   | RBLN-CA12 | rbln0   |  0000:51:00.0 |  38C |  43.9W  | P2   |   2.4GB / 15.7GiB   |  98.7 |
| 1   | RBLN-CA12 | rbln1   |  0000:d8:00.0 |  25C |   6.1W  | P14  |    0.0B / 15.7GiB   |   0.0 |
+-----+-----------+---------+---------------+------+---------+------+---------------------+-------+"""


def test_rbln_smi_power_by_its_header() -> None:
    assert smi_power(SMI, [0]) == pytest.approx(43.9) and smi_power(SMI, [0, 1]) == pytest.approx(50.0)
    with pytest.raises(EnergyUnavailable, match="no power for NPU 2"):
        smi_power(SMI, [2])
    with pytest.raises(EnergyUnavailable, match="rbln-smi is not installed"):
        rbln_smi([0], lambda: None)
    assert rbln_smi([1], lambda: SMI).source == "rbln-smi power sampled every 0.5 s, NPU 1"
    assert integrate([(0.0, 10.0), (1.0, 30.0), (3.0, 30.0)]) == pytest.approx(80.0)


def test_a_benchmark_records_the_meters_energy_net_of_idle(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A powercap tree whose package counts 1 J every 10 ms (~100 W) while the run goes."""
    root = powercap(tmp_path / "powercap", {0: 0})
    monkeypatch.setattr(energy, "POWERCAP", root)
    done = threading.Event()

    def count() -> None:
        total, counter = 0, root / "intel-rapl:0" / "energy_uj"
        while not done.wait(0.01):
            total += 1_000_000
            fresh = counter.with_name("energy_uj.new")
            fresh.write_text(f"{total}\n")
            fresh.replace(counter)  # whole, as sysfs answers a read: never the empty file a rewrite passes through

    counter = threading.Thread(target=count)
    counter.start()
    try:
        run = tiny("pipeline=benchmark", "benchmark.repetitions=2", "generation.max_new_tokens=8",
                   "generation.ignore_eos=true", "benchmark.energy.idle_s=0.3", "pipeline.steps.benchmark.print_table=false")
    finally:
        done.set()
        counter.join()
    bench = run.read_json("metrics.json")["benchmark"]
    total = bench["energy"]
    assert total["source"] == f"RAPL package-0 ({root})" and 50 < total["idle_w"] < 150
    passes = [r["energy"] for r in bench["repetitions"]]
    assert total["joules"] == pytest.approx(sum(p["joules"] for p in passes), abs=1e-2)
    for rep, pas in zip(bench["repetitions"], passes):
        assert pas["output_tokens"] == 8 * rep["completed"] and pas["seconds"] == pytest.approx(rep["duration_s"], abs=1e-3)
        assert pas["net_joules"] == pytest.approx(pas["joules"] - total["idle_w"] * pas["seconds"], abs=1e-2)
        if pas["net_joules"] > 0:
            assert pas["joules_per_output_token"] == pytest.approx(pas["net_joules"] / pas["output_tokens"], rel=1e-3)
    assert "energy.output_tokens_per_joule" in bench["summary"] or any(p["net_joules"] <= 0 for p in passes)


def test_without_a_meter_the_run_says_why(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(energy, "POWERCAP", tmp_path / "absent")
    run = tiny("pipeline=benchmark", "benchmark.repetitions=1", "generation.max_new_tokens=4")
    bench = run.read_json("metrics.json")["benchmark"]
    assert bench["energy"] is None and "does not exist (a VM or a CPU without powercap)" in bench["energy_unavailable"]
    assert all("energy" not in r for r in bench["repetitions"])
