"""OS transparency of the microvisor: guests that were not written to cooperate run
unchanged through virtualize/devirtualize at random moments and beside a second OS."""

from __future__ import annotations

import json
import random
import re
import threading
import time

import pytest
from harness import assert_tick_rate, realtime

from pyvmm.machine import Machine, RunResult
from pyvmm.microvisor import Microvisor

pytestmark = pytest.mark.kvm
MiB = 1 << 20
BENCH = (
    "run=alu,stream,chase,crc32,timer n_alu=200000000 n_stream=8 stream_mib=16 "
    "n_chase=2000000 chase_mib=8 n_crc32=48 n_timer=200000000 timer_hz=200"
)


class Console:
    def __init__(self) -> None:
        self.data = bytearray()
        self.lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self.lock:
            self.data += data

    def lines(self, label: str = "") -> list[str]:
        with self.lock:
            text = self.data.decode(errors="replace")
        prefix = f"[{label}] " if label else ""
        out = []
        for line in text.splitlines():
            if label and line.startswith(prefix):
                out.append(line[len(prefix) :])
            elif not label and not line.startswith("["):
                out.append(line)
        return out


def bench_results(lines: list[str]) -> dict[str, str]:
    records = [json.loads(x) for x in lines if x.startswith('{"bench"')]
    return {r["bench"]: r.get("result") for r in records if "result" in r}


def plain_run(kernels, cmdline: str) -> tuple[RunResult, Console]:
    console = Console()
    with Machine(256 * MiB, console=console) as m:
        m.boot(str(kernels / "bench.elf"), f"console=ttyS0 {cmdline}")
        return m.run(300), console


def armed(kernels, kernel: str, cmdline: str):
    console = Console()  # both serial ports, as on a terminal: lines of COM2 are labelled
    machine = Machine(512 * MiB, partitions=2, console=console, console2=console)
    mv = Microvisor(machine)
    mv.boot(str(kernels / kernel), f"console=ttyS0 {cmdline}")
    return machine, mv, console


def end_node(machine: Machine) -> None:
    machine.call_on_vcpu(lambda: machine.stop(RunResult("stopped", 0)))


def test_results_identical_through_100_random_transitions(kernels):
    expected_result, expected = plain_run(kernels, BENCH)
    assert expected_result.status == 0
    machine, mv, console = armed(kernels, "bench.elf", BENCH)
    rng = random.Random(7)
    cycles = 0

    def churn() -> None:
        nonlocal cycles
        while cycles < 100 and mv.instances["a"].live:
            mv.virtualize()
            time.sleep(rng.uniform(0, 0.006))
            mv.devirtualize()
            time.sleep(rng.uniform(0, 0.006))
            cycles += 1

    driver = threading.Thread(target=churn)
    driver.start()
    with machine:
        result = mv.run(300)
        driver.join(30)
    assert result.status == 0, console.lines()
    assert cycles == 100  # all transitions happened while the guest was running
    assert bench_results(console.lines()) == bench_results(expected.lines())


def test_clock_and_timer_survive_transitions(kernels):
    """The vCPU thread (this one) and the transitions' thread run at real-time priority
    (``harness.realtime``; the guest halts between ticks), so that on a loaded host a
    tick is not lost to the host's run queue, nor the end of the second late."""
    machine, mv, console = armed(kernels, "probe.elf", "probe=timer hz=100")
    stop = threading.Event()
    transitions = 0

    def churn() -> None:
        nonlocal transitions
        while not stop.is_set():
            try:
                mv.virtualize()
                time.sleep(0.003)
                mv.devirtualize()
            except Exception:
                return  # the guest has exited
            transitions += 1
            time.sleep(0.003)

    with realtime():
        driver = threading.Thread(target=churn)
        driver.start()
        with machine:
            result = mv.run(60)
            stop.set()
            driver.join(10)
    assert result.status == 0
    m = re.search(r"probe: ticks=(\d+) hz=100 elapsed_ns=(\d+)", "\n".join(console.lines()))
    assert m
    ticks, elapsed = int(m[1]), int(m[2]) / 1e9
    assert elapsed == pytest.approx(1.0, rel=0.05)
    assert_tick_rate(ticks, 100, elapsed)
    assert transitions >= 20  # the ticks went through many virtualize/devirtualize

    machine, mv, console = armed(kernels, "probe.elf", "probe=clock")
    driver = threading.Thread(target=lambda: [mv.virtualize(), time.sleep(0.3), mv.devirtualize()])
    driver.start()
    with machine:
        assert mv.run(60).status == 0
        driver.join(10)
    readings = [int(x) for x in re.findall(r"clock_ns=(\d+)", "\n".join(console.lines()))]
    assert len(readings) == 11 and readings == sorted(readings)
    assert len(set(readings)) == 11


def test_two_instances_both_produce_correct_results(kernels):
    _, expected = plain_run(kernels, BENCH)
    machine, mv, console = armed(kernels, "bench.elf", BENCH)

    def second() -> None:
        mv.virtualize()
        mv.start(str(kernels / "bench.elf"), f"console=ttyS1 {BENCH}", name="b")
        deadline = time.monotonic() + 240
        while any(i.live for i in mv.instances.values()) and time.monotonic() < deadline:
            time.sleep(0.05)

    driver = threading.Thread(target=second)
    driver.start()
    with machine:
        result = mv.run(300)
        driver.join(30)
    a, b = mv.instances["a"], mv.instances["b"]
    assert a.result.status == 0 and b.result.status == 0, result
    want = bench_results(expected.lines())
    assert bench_results(console.lines()) == want
    assert bench_results(console.lines("b")) == want
    for label in ("", "b"):  # no instance saw the other's timer interrupts
        timer = next(json.loads(x) for x in console.lines(label) if '"timer"' in x)
        seconds = timer["cycles"] / (machine.tsc_khz * 1000)
        assert 0 < timer["ticks"] <= 200 * seconds * 1.05 + 2, (label, timer, mv.switches)
    assert mv.switches > 10


def test_device_interrupts_go_only_to_their_owner(kernels):
    machine, mv, console = armed(kernels, "probe.elf", "probe=user-echo-irq")

    def script() -> None:
        time.sleep(0.3)
        mv.virtualize()
        mv.start(str(kernels / "probe.elf"), "console=ttyS1 probe=user-echo-irq", name="b")
        time.sleep(0.3)
        machine.com2.feed(b"for b\n")
        machine.com1.feed(b"for a\n")
        deadline = time.monotonic() + 20
        while any(i.live for i in mv.instances.values()) and time.monotonic() < deadline:
            time.sleep(0.02)

    driver = threading.Thread(target=script)
    driver.start()
    with machine:
        mv.run(60)
        driver.join(30)
    assert any('probe: echo="for a"' in x for x in console.lines())
    assert any('probe: echo="for b"' in x for x in console.lines("b"))


def test_after_devirtualize_the_hot_path_is_the_plain_one(kernels):
    workload = "run=alu,portio n_alu=100000000 n_portio=3000"
    plain_result, plain_console = plain_run(kernels, workload)
    machine, mv, console = armed(kernels, "bench.elf", workload)
    node_pio, node_mmio = machine.pio, machine.mmio
    checked: list[bool] = []

    def cycle() -> None:
        for _ in range(5):
            mv.virtualize()
            time.sleep(0.01)
            mv.devirtualize()
        lines = [line for a in machine.devices.values() for line in a.irqs]
        checked.append(
            machine.pio is node_pio
            and machine.mmio is node_mmio
            and all(line.deliver == line.to_kvm for line in lines)
            and mv._alarm._at is None
        )

    driver = threading.Thread(target=cycle)
    driver.start()
    with machine:
        result = mv.run(120)
        driver.join(10)
    assert result.status == 0
    assert checked == [True]
    # Kicks are not exits: the guest made exactly the exits of a plain boot, but for
    # its console bytes (one exit each): the cycle counts it prints vary in length.
    assert result.exits - len(console.data) == plain_result.exits - len(plain_console.data)
