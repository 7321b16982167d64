"""The guest OS runtime: CPL3 programs, faults, the clock, the timer, bench.elf."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from harness import GuestProcess, run_pyvmm

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


def test_clock_is_monotonic_and_matches_host_time(kernels):
    readings: list[tuple[float, int]] = []
    with GuestProcess(
        ["boot", str(kernels / "probe.elf"), "--cmdline", "probe=clock", "--timeout", "30"]
    ) as guest:
        for index in range(11):
            # Wait for the (index+1)-th reading and note when it arrived.
            match = guest.expect(r"(?:probe: clock_ns=\d+\n){%d}" % (index + 1), timeout=10)  # noqa: UP031
            last = re.findall(r"probe: clock_ns=(\d+)", match[0])[-1]
            readings.append((time.monotonic(), int(last)))
        assert guest.wait() == 0
    guest_ns = [ns for _, ns in readings]
    assert guest_ns == sorted(guest_ns) and len(set(guest_ns)) == len(guest_ns)
    guest_span = (guest_ns[-1] - guest_ns[0]) / 1e9
    host_span = readings[-1][0] - readings[0][0]
    assert guest_span == pytest.approx(1.0, rel=0.02)  # 10 steps of 100 ms by its clock
    assert host_span == pytest.approx(guest_span, rel=0.15)


@pytest.mark.parametrize("hz", [50, 100, 250])
def test_timer_rate_is_as_configured(kernels, hz):
    status, out, err = run_pyvmm(
        ["boot", str(kernels / "probe.elf"), "--cmdline", f"probe=timer hz={hz}", "--timeout", "20"]
    )
    assert status == 0, err
    m = re.search(r"probe: ticks=(\d+) hz=(\d+) elapsed_ns=(\d+)", out)
    assert m, out
    ticks, elapsed = int(m[1]), int(m[3]) / 1e9
    assert int(m[2]) == hz
    assert ticks == pytest.approx(hz * elapsed, rel=0.05, abs=2)


def test_user_mode_driver_takes_device_interrupts(kernels):
    status, out, err = run_pyvmm(
        ["boot", str(kernels / "probe.elf"), "--cmdline", "probe=user-echo-irq", "--timeout", "20"],
        stdin=b"user irq\n",
    )
    assert status == 0, err
    assert re.search(r'probe: echo="user irq"', out), out
