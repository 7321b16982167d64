"""Microvisor costs: world-switch latency, kick latency, and the CPU overhead of
bench.elf's CPL3 workloads in four modes, measured side by side in one run.

    python benchmarks/microvisor.py [--rounds 3] [--switch-seconds 2]

Modes: plain (no microvisor), devirtualized (microvisor armed: two partitions and a
control path, never used), virtualized (one instance, trapped), virtualized+idle
(a second instance that sleeps waiting for an interrupt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

from common import KERNELS, report, summary

from pyvmm.machine import Machine, RunResult
from pyvmm.microvisor import Microvisor, OsInstance

MiB = 1 << 20
WORKLOADS = ("alu", "stream", "chase", "crc32")


class Capture:
    def __init__(self) -> None:
        self.data = bytearray()

    def __call__(self, data: bytes) -> None:
        self.data += data

    def bench_lines(self) -> dict[str, dict]:
        lines = {}
        for line in self.data.decode(errors="replace").splitlines():
            line = line.split("] ", 1)[-1] if line.startswith("[") else line
            if line.startswith('{"bench"'):
                record = json.loads(line)
                lines[record["bench"]] = record
        return lines


def world_switch(seconds: float) -> dict:
    """Two spinning instances alternating on 1 ms slices."""
    with Machine(256 * MiB, partitions=2, console=lambda b: None, console2=lambda b: None) as m:
        mv = Microvisor(m, slice_s=0.001)
        mv.boot(str(KERNELS / "probe.elf"), "console=ttyS0 probe=spin")

        def drive() -> None:
            mv.virtualize()
            mv.start(str(KERNELS / "probe.elf"), "console=ttyS1 probe=spin", name="b")
            time.sleep(seconds)
            m.call_on_vcpu(lambda: m.stop(RunResult("stopped", 0)))

        thread = threading.Thread(target=drive)
        thread.start()
        mv.run(seconds + 30)
        thread.join()
        samples = [x * 1e6 for x in mv.switch_latency]
    return {"switches": len(samples), "latency_us": summary(samples)}


def kick_latency(count: int) -> dict:
    """From kick() on another thread to the vCPU thread running the posted call."""
    with Machine(64 * MiB, console=lambda b: None) as m:
        m.boot(str(KERNELS / "probe.elf"), "console=ttyS0 probe=spin")
        samples: list[float] = []

        def drive() -> None:
            time.sleep(0.2)
            for _ in range(count):
                arrived = threading.Event()
                started = time.perf_counter()

                def mark(started: float = started, arrived: threading.Event = arrived) -> None:
                    samples.append((time.perf_counter() - started) * 1e6)
                    arrived.set()

                m.call_on_vcpu(mark)
                arrived.wait(5)
                time.sleep(0.002)
            m.call_on_vcpu(lambda: m.stop(RunResult("stopped", 0)))

        thread = threading.Thread(target=drive)
        thread.start()
        m.run(60)
        thread.join()
    return {"kicks": len(samples), "latency_us": summary(samples)}


def _end_when_retired(machine: Machine, instance: OsInstance) -> None:
    """The idle instance never exits: end the node once the benchmark instance has."""

    def watch() -> None:
        while instance.live:
            time.sleep(0.01)
        machine.call_on_vcpu(lambda: machine.stop(RunResult("stopped", 0)))

    threading.Thread(target=watch, daemon=True).start()


def bench_run(mode: str, cmdline: str) -> dict[str, dict]:
    """bench.elf once in ``mode``; returns its JSON lines by workload."""
    console = Capture()
    if mode == "plain":
        with Machine(256 * MiB, console=console) as m:
            m.boot(str(KERNELS / "bench.elf"), cmdline)
            result = m.run(600)
    else:
        with Machine(256 * MiB, partitions=2, console=console, console2=console) as m:
            mv = Microvisor(m)
            bench = mv.boot(str(KERNELS / "bench.elf"), cmdline)
            if mode != "devirtualized":
                mv.virtualize()  # before the first instruction: the whole run is trapped
                if mode == "virtualized+idle":
                    mv.start(str(KERNELS / "probe.elf"), "console=ttyS1 probe=idle", name="b")
                    _end_when_retired(m, bench)
            result = mv.run(600)
            result = bench.result or result
    if result.reason != "exit" or result.status != 0:
        sys.exit(f"bench.elf failed in mode {mode}: {result.message}\n{console.data.decode()}")
    return console.bench_lines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switch-seconds", type=float, default=2.0)
    parser.add_argument("--kicks", type=int, default=300)
    args = parser.parse_args()

    switch = world_switch(args.switch_seconds)
    kick = kick_latency(args.kicks)
    if args.rounds == 0:  # latency only
        report({"world_switch": switch, "kick": kick}, "microvisor: latencies only")
        return
    modes = ("plain", "devirtualized", "virtualized", "virtualized+idle")
    cmdline = f"console=ttyS0 run={','.join(WORKLOADS)}"
    cycles: dict[str, dict[str, list[int]]] = {m: {w: [] for w in WORKLOADS} for m in modes}
    results: dict[str, set[str]] = {w: set() for w in WORKLOADS}
    for _ in range(args.rounds):
        for mode in modes:  # alternating, so drift hits every mode alike
            lines = bench_run(mode, cmdline)
            for w in WORKLOADS:
                cycles[mode][w].append(lines[w]["cycles"])
                results[w].add(lines[w]["result"])
    overhead = {}
    for mode in modes[1:]:
        per = {
            w: statistics.median(cycles[mode][w]) / statistics.median(cycles["plain"][w]) - 1
            for w in WORKLOADS
        }
        overhead[mode] = {w: round(v * 100, 2) for w, v in per.items()}
        overhead[mode]["mean"] = round(statistics.mean(per.values()) * 100, 2)
    result = {
        "benchmark": "microvisor",
        "world_switch": switch,
        "kick": kick,
        "cpu_overhead_percent": overhead,
        "results_consistent": all(len(v) == 1 for v in results.values()),
        "rounds": args.rounds,
    }
    report(
        result,
        f"microvisor: world switch p50 {switch['latency_us']['median']:.0f} us "
        f"p99 {switch['latency_us']['p99']:.0f} us; kick p50 "
        f"{kick['latency_us']['median']:.0f} us; CPU overhead devirtualized "
        f"{overhead['devirtualized']['mean']:+.2f}%, virtualized "
        f"{overhead['virtualized']['mean']:+.2f}%, with idle second instance "
        f"{overhead['virtualized+idle']['mean']:+.2f}%",
    )


if __name__ == "__main__":
    main()
