"""bench.elf on a Machine in this process, plain or under the microvisor in one of its
modes, with the vCPU thread's CPU time read at each workload's ends.

bench.elf with mark=1 prints a line just before and just after each timed part. The
console callback runs on the vCPU thread, synchronously in the exit that writes the
line, so time.thread_time_ns() there is the vCPU thread's CPU time (guest time
included) at that point. CPU time over wall time between the two lines is the share
of the workload the thread was on a CPU; the rest it waited for other processes.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time

import harness
from bench_runs import BenchRun
from common import KERNELS

from pyvmm.machine import Machine, RunResult
from pyvmm.microvisor import Microvisor, OsInstance

MiB = 1 << 20
MODES = ("plain", "devirtualized", "virtualized", "virtualized+idle")
# Both instances busy: "virtualized+busy[@<ms>ms][/<isolation>]", the second instance
# computing at CPL3 (probe.elf compute), with that slice and isolation mode.
BUSY = re.compile(r"^virtualized\+busy(?:@(\d+(?:\.\d+)?)ms)?(?:/([a-z-]+))?$")


def microvisor_options(mode: str) -> dict[str, object]:
    """Microvisor keyword arguments a mode asks for (slice, isolation)."""
    found = BUSY.match(mode)
    if found is None:
        return {}
    options: dict[str, object] = {}
    if found[1]:
        options["slice_s"] = float(found[1]) / 1000
    if found[2]:
        options["isolation"] = found[2]
    return options


class Capture:
    """Both consoles' output; when bench.elf finished waiting; CPU share per workload."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.waited_at: float | None = None
        self.on_cpu: dict[str, float] = {}
        self._marks: dict[str, tuple[int, int]] = {}
        self._line_start = 0

    def __call__(self, data: bytes) -> None:
        cpu, wall = time.thread_time_ns(), time.monotonic_ns()
        self.data += data
        if b"\n" not in data:
            return
        end = self.data.rfind(b"\n")
        for raw in bytes(self.data[self._line_start : end]).split(b"\n"):
            self._line(raw.decode(errors="replace"), cpu, wall)
        self._line_start = end + 1

    def _line(self, line: str, cpu: int, wall: int) -> None:
        line = line.split("] ", 1)[-1] if line.startswith("[") else line
        if not line.startswith('{"bench"'):
            return
        try:
            record = json.loads(line)
        except ValueError:
            return
        kind = record["bench"]
        if kind == "waited" and self.waited_at is None:
            self.waited_at = wall / 1e9
        elif kind == "mark":
            self._marks[record["name"]] = (cpu, wall)
        elif kind == "end" and record["name"] in self._marks:
            cpu0, wall0 = self._marks.pop(record["name"])
            if wall > wall0:
                self.on_cpu[record["name"]] = min(1.0, (cpu - cpu0) / (wall - wall0))

    def bench_lines(self) -> dict[str, dict]:
        lines = {}
        for line in self.data.decode(errors="replace").splitlines():
            line = line.split("] ", 1)[-1] if line.startswith("[") else line
            if line.startswith('{"bench"'):
                record = json.loads(line)
                lines[record["bench"]] = record
        return lines


def _end_when_retired(machine: Machine, instance: OsInstance) -> None:
    """The idle instance never exits: end the node once the benchmark instance has."""

    def watch() -> None:
        while instance.live:
            time.sleep(0.01)
        machine.call_on_vcpu(lambda: machine.stop(RunResult("stopped", 0)))

    threading.Thread(target=watch, daemon=True).start()


def _cycle_then_devirtualize(mv: Microvisor, transition: dict[str, float]) -> None:
    """A real round trip through virtualized mode: a second instance is booted, runs
    beside the first for a moment (world switches), is stopped, and the node
    devirtualizes. The benchmark instance is spinning in wait_ms meanwhile."""
    mv.start(str(KERNELS / "probe.elf"), "console=ttyS1 probe=idle", name="b")
    time.sleep(0.2)
    mv.stop("b")
    mv.devirtualize()
    transition["devirtualized_at"] = time.monotonic()
    transition["switches"] = mv.switches


def bench_run(mode: str, cmdline: str) -> BenchRun:
    """bench.elf once in ``mode`` (its command line should have mark=1, and wait_ms
    for devirtualized), with the peak huge-page MiB of this process (where the guest
    RAM lives) and each workload's CPU share."""
    console = Capture()
    transition: dict[str, float] = {}
    with harness.PeakBacking(os.getpid(), interval_s=0.2) as backing:
        if mode == "plain":
            with Machine(256 * MiB, console=console) as m:
                m.boot(str(KERNELS / "bench.elf"), cmdline)
                result = m.run(600)
                backing.sample()  # before the guest RAM is unmapped
        else:
            with Machine(256 * MiB, partitions=2, console=console, console2=console) as m:
                mv = Microvisor(m, **microvisor_options(mode))  # type: ignore[arg-type]
                bench = mv.boot(str(KERNELS / "bench.elf"), cmdline)
                mv.virtualize()  # before the first instruction
                driver = None
                if mode == "virtualized+idle":
                    mv.start(str(KERNELS / "probe.elf"), "console=ttyS1 probe=idle", name="b")
                    _end_when_retired(m, bench)
                elif BUSY.match(mode):
                    busy = "console=ttyS1 probe=compute mib=8"
                    mv.start(str(KERNELS / "probe.elf"), busy, name="b")
                    _end_when_retired(m, bench)
                elif mode == "devirtualized":
                    driver = threading.Thread(
                        target=_cycle_then_devirtualize, args=(mv, transition)
                    )
                    driver.start()
                result = mv.run(600)
                backing.sample()
                if driver:
                    driver.join(30)
                result = bench.result or result
    if result.reason != "exit" or result.status != 0:
        sys.exit(f"bench.elf failed in mode {mode}: {result.message}\n{console.data.decode()}")
    if mode == "devirtualized":
        done = transition.get("devirtualized_at")
        if done is None or console.waited_at is None or done >= console.waited_at:
            sys.exit(
                "devirtualized: the node had not devirtualized before the workloads "
                f"started ({transition}, waited at {console.waited_at}); raise --wait-ms"
            )
        if not transition["switches"]:
            sys.exit("devirtualized: no world switch happened while virtualized")
    return BenchRun(console.bench_lines(), backing.huge_mib(), console.on_cpu)
