"""The guest OS runtime: CPL3 programs, faults, the clock, the timer, bench.elf."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from harness import GuestProcess, assert_tick_rate, run_pyvmm

pytestmark = pytest.mark.kvm

# Small sizes: the point here is correctness; benchmarks/ measures speed.
SMALL = (
    "n_alu=2000000 n_stream=2 stream_mib=8 n_chase=200000 chase_mib=4 n_crc32=4 "
    "crc32_kib=256 n_syscall=200 n_timer=2000000"
)


def bench_lines(console: str) -> dict[str, dict]:
    records = [json.loads(line) for line in console.splitlines() if line.startswith('{"bench"')]
    return {r["bench"]: r for r in records}


def test_bench_results_match_the_native_program(kernels):
    run = "run=alu,stream,chase,crc32,syscall,timer"
    status, out, err = run_pyvmm(
        [
            "boot",
            str(kernels / "bench.elf"),
            "--cmdline",
            f"console=ttyS0 {run} {SMALL}",
            "--timeout",
            "120",
        ],
        timeout=180,
    )
    assert status == 0, err
    guest = bench_lines(out)
    native_run = subprocess.run(
        [str(kernels / "bench-native"), run, *SMALL.split()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    native = bench_lines(native_run.stdout)
    assert guest["done"] == {"bench": "done"}
    for name in ("alu", "stream", "chase", "crc32", "syscall", "timer"):
        assert guest[name]["result"] == native[name]["result"], name
        assert guest[name]["work"] == native[name]["work"] and guest[name]["cycles"] > 0
    assert guest["timer"]["ticks"] > 0  # the timer phase really took interrupts


@pytest.mark.parametrize(("action", "cpl"), [("user-fault", 3), ("page-fault", 0)])
def test_faults_give_a_crash_report_and_nonzero_exit(kernels, action, cpl):
    status, out, _ = run_pyvmm(
        ["boot", str(kernels / "probe.elf"), "--cmdline", f"probe={action}", "--timeout", "20"]
    )
    assert status == 3
    crash = re.search(r"CRASH vector=14 .* cr2=0x0000100000000000 .* cpl=(\d)", out)
    assert crash and int(crash[1]) == cpl, out


def test_user_program_exit_code(kernels):
    status, _, _ = run_pyvmm(
        ["boot", str(kernels / "probe.elf"), "--cmdline", "probe=user-exit:42", "--timeout", "20"]
    )
    assert status == 42


CLOCK_STEPS = 20  # probe=clock's readings are 100 ms apart


def test_clock_is_monotonic_and_matches_host_time(kernels):
    """probe=clock prints readings 100 ms apart by the guest's clock (a busy wait at
    CPL3, then the clock system call). On a loaded host the vCPU thread waits for a
    CPU for tens (at load 25, hundreds) of milliseconds at a time, so a wait often
    ends late and a line reaches this process late: neither says anything about the
    clock. What does: the readings only increase, none is taken before it was due
    (the wait's clock, at CPL3, and the system call's agree), and the guest's clock
    runs at the host's rate (``clock_rate_error``)."""
    readings, t0 = clock_readings(kernels)
    guest_ns = [ns for _, ns in readings]
    assert guest_ns == sorted(guest_ns) and len(set(guest_ns)) == len(guest_ns)
    # never before it was due: late by any amount on a loaded host, early never
    assert all(ns >= t0 + i * 100_000_000 for i, ns in enumerate(guest_ns))
    assert clock_rate_error(readings) == pytest.approx(0, abs=0.05)


@pytest.fixture
def host_tsc_khz() -> int:
    """The TSC frequency pyvmm tells its guests (KVM_GET_TSC_KHZ)."""
    from pyvmm.kvm import Kvm

    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        return vcpu.tsc_khz()


def test_clock_check_sees_a_wrong_tsc_frequency(kernels, host_tsc_khz):
    """The clock check can fail: told a TSC frequency 10% low, the guest's clock runs
    11% fast. (Its timer, calibrated against that clock, still ticks at the right rate
    by it: the timer check is against the guest's clock, this one against the host's.)"""
    readings, _ = clock_readings(kernels, f"tsc_khz={host_tsc_khz * 9 // 10}")
    assert clock_rate_error(readings) == pytest.approx(1 / 0.9 - 1, abs=0.05)


def clock_readings(kernels, extra: str = "") -> tuple[list[tuple[float, int]], int]:
    """probe=clock's readings, (host monotonic seconds when the line arrived, guest ns),
    and the guest ns the first was due at."""
    cmdline = f"probe=clock steps={CLOCK_STEPS} {extra}".strip()
    with GuestProcess(
        ["boot", str(kernels / "probe.elf"), "--cmdline", cmdline, "--timeout", "30"]
    ) as guest:
        assert guest.wait() == 0
        lines = list(re.finditer(rb"probe: clock_ns=(\d+)\n", guest.raw_stdout))
        assert len(lines) == CLOCK_STEPS + 1, guest.stdout
        t0 = re.search(rb"probe: clock_t0=(\d+)\n", guest.raw_stdout)
        assert t0, guest.stdout
        return [(guest.arrived_at(m.end() - 1), int(m[1])) for m in lines], int(t0[1])


def clock_rate_error(readings: list[tuple[float, int]]) -> float:
    """(guest clock rate / host clock rate) - 1 from (host seconds when seen, guest ns)
    pairs. host - guest is a constant plus each line's delay (>= 0) if the rates
    agree, so its lower envelope gives the rate: the least delayed of the first
    quarter and of the last quarter of the readings (at least half the span apart)."""
    offsets = [(host - ns / 1e9, ns / 1e9) for host, ns in readings]
    quarter = max(1, len(offsets) // 4)
    early, late = min(offsets[:quarter]), min(offsets[-quarter:])
    return (early[0] - late[0]) / (late[1] - early[1])


@pytest.mark.parametrize("hz", [50, 100, 250])
def test_timer_rate_is_as_configured(kernels, hz):
    """Ticks over 1 s by the guest's clock. pyvmm runs at real-time priority
    (``harness.set_realtime``: the guest halts between ticks), so that a tick is not
    lost to the host's run queue."""
    command = ["boot", str(kernels / "probe.elf"), "--cmdline", f"probe=timer hz={hz}"]
    status, out, err = run_pyvmm([*command, "--timeout", "20"], realtime=True)
    assert status == 0, err
    m = re.search(r"probe: ticks=(\d+) hz=(\d+) elapsed_ns=(\d+)", out)
    assert m, out
    assert int(m[2]) == hz
    assert_tick_rate(int(m[1]), hz, int(m[3]) / 1e9)


def test_user_mode_driver_takes_device_interrupts(kernels):
    status, out, err = run_pyvmm(
        ["boot", str(kernels / "probe.elf"), "--cmdline", "probe=user-echo-irq", "--timeout", "20"],
        stdin=b"user irq\n",
    )
    assert status == 0, err
    assert re.search(r'probe: echo="user irq"', out), out
