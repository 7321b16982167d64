"""What memory isolation costs the world switch (issue 14), by isolation mode, in
alternated rounds: ``none`` (every partition mapped, as before isolation) against
``symmetric`` (each instance sees only its own partition, the default) and
``protect-first`` (the old instance sees everything, the new one only its own).

- switch: two spinning instances on 1 ms slices; the world-switch latency (save,
  slot change, restore) and the slot change by itself, per mode; and the first slot
  update of each node (made at boot, the first after the irqchip exists).
- refault: the guest's compute rate after a switch-in. probe.elf's sweep action
  touches every 4 KiB page of 32 MiB again and again beside a spinning instance
  (default 10 ms slices) and reports its steady sweep and the extra time of the two
  sweeps around each switch-out: what faulting its pages in again costs.
"""

from __future__ import annotations

import re
import threading
import time

import harness
from common import KERNELS

from pyvmm.machine import Machine, RunResult
from pyvmm.microvisor import Microvisor

MiB = 1 << 20
ISOLATION = ("none", "symmetric", "protect-first")
PROBE = str(KERNELS / "probe.elf")


def _two_instances(mv: Microvisor, machine: Machine, second: str, until) -> None:
    def drive() -> None:
        mv.virtualize()
        mv.start(PROBE, f"console=ttyS1 {second}", name="b")
        until()
        if len(mv.live()) > 1:
            mv.stop("b")  # ending the run retires only the instance on the vCPU
        machine.call_on_vcpu(lambda: machine.stop(RunResult("stopped", 0)))

    thread = threading.Thread(target=drive)
    thread.start()
    mv.run(120)
    thread.join()


def switch_once(isolation: str, seconds: float) -> dict[str, list[float]]:
    """World switches between two spinning instances on 1 ms slices, µs."""
    with Machine(256 * MiB, partitions=2, console=lambda b: None, console2=lambda b: None) as m:
        mv = Microvisor(m, slice_s=0.001, isolation=isolation)
        mv.boot(PROBE, "console=ttyS0 probe=spin")
        _two_instances(mv, m, "probe=spin", lambda: time.sleep(seconds))
        first = mv.slots.first_update_s
        return {
            "switch_us": [x * 1e6 for x in mv.switch_latency],
            "slot_change_us": [x * 1e6 for x in mv.slots.change_latency],
            "first_update_us": [] if first is None else [first * 1e6],
        }


def refault_once(isolation: str, slice_s: float | None = None) -> dict[str, float]:
    """probe.elf's sweep beside a spinning instance: extra µs per switch-in."""
    out = bytearray()
    with Machine(256 * MiB, partitions=2, console=out.extend, console2=lambda b: None) as m:
        mv = Microvisor(m, isolation=isolation, **({"slice_s": slice_s} if slice_s else {}))
        a = mv.boot(PROBE, "console=ttyS0 probe=sweep mib=32 gaps=40")

        def until() -> None:
            deadline = time.monotonic() + 60
            while a.live and time.monotonic() < deadline:
                time.sleep(0.01)

        _two_instances(mv, m, "probe=spin", until)
        khz = m.tsc_khz
    found = re.search(r"steady_cycles=(\d+) around_switch_cycles=(\d+)", out.decode())
    if found is None:
        raise RuntimeError(f"sweep did not report: {out.decode()[-500:]!r}")
    steady, around = (int(x) * 1000 / khz for x in found.groups())
    return {"steady_sweep_us": steady, "extra_per_switch_in_us": around - 2 * steady}


def measure(rounds: int, seconds: float) -> dict[str, object]:
    switch: dict[str, dict[str, list[float]]] = {
        mode: {"switch_us": [], "slot_change_us": [], "first_update_us": []} for mode in ISOLATION
    }
    refault: dict[str, dict[str, list[float]]] = {
        mode: {"steady_sweep_us": [], "extra_per_switch_in_us": []} for mode in ISOLATION[:2]
    }
    for index in range(rounds):
        order = ISOLATION if index % 2 == 0 else ISOLATION[::-1]  # alternate: drift cancels
        for mode in order:
            for key, values in switch_once(mode, seconds).items():
                switch[mode][key] += values
            if mode in refault:
                for key, value in refault_once(mode).items():
                    refault[mode][key].append(value)
    return {
        "rounds": rounds,
        "switch": {
            mode: {k: harness.median_ci(v, 1) for k, v in d.items() if v}
            for mode, d in switch.items()
        },
        "refault": {
            mode: {k: harness.median_ci(v, 1) for k, v in d.items()} for mode, d in refault.items()
        },
    }


def summary(result: dict[str, object] | None) -> str:
    """A clause for a benchmark's one-line summary."""
    if not result:
        return ""
    switch, refault = result["switch"], result["refault"]  # type: ignore[index]
    parts = []
    for mode in ISOLATION:
        s = switch[mode]
        text = f"{mode} switch p50 {s['switch_us']['median']:.0f} p99 {s['switch_us']['p99']:.0f}"
        if "slot_change_us" in s:
            text += f" (slots p50 {s['slot_change_us']['median']:.0f})"
        parts.append(text)
    first = switch["symmetric"].get("first_update_us", {}).get("median")
    extra = {m: refault[m]["extra_per_switch_in_us"]["median"] for m in refault}
    return (
        "; isolation: "
        + ", ".join(parts)
        + f" us; first slot update {first:.0f} us; refault after switch-in "
        + ", ".join(f"{m} {v:+.0f} us" for m, v in extra.items())
    )
