"""Booting real guest kernels under KVM, through the CLI and the Python API."""

from __future__ import annotations

import re

import pytest
from harness import GuestProcess, run_pyvmm

from pyvmm.errors import BootError
from pyvmm.machine import Machine

pytestmark = pytest.mark.kvm
MiB = 1 << 20
GREETING = "hello: Hello from hello.elf, a PVH guest kernel"


def parse_hello(console: str) -> dict[str, object]:
    """The machine-readable lines hello.elf prints."""
    facts: dict[str, object] = {"e820": []}
    for line in console.splitlines():
        if m := re.fullmatch(r"hello: e820 addr=(0x\w+) size=(0x\w+) type=(\d+)", line):
            facts["e820"].append((int(m[1], 16), int(m[2], 16), int(m[3])))
        elif m := re.fullmatch(r'hello: cmdline="(.*)"', line):
            facts["cmdline"] = m[1]
        elif m := re.fullmatch(r"hello: (load_base|start_info|ram_bytes|exit)=(\w+).*", line):
            facts[m[1]] = int(m[2], 0)
    return facts


def test_hello_boots_and_exits_zero(kernels):
    with GuestProcess(
        [
            "boot",
            str(kernels / "hello.elf"),
            "--cmdline",
            "console=ttyS0 foo=bar",
            "--mem",
            "128M",
            "--timeout",
            "20",
        ]
    ) as guest:
        guest.expect(re.escape(GREETING))
        guest.expect(r"hello: exit=0")
        assert guest.wait() == 0
    facts = parse_hello(guest.stdout)
    # pyvmm appends the TSC frequency the guest clock needs.
    assert re.fullmatch(r"console=ttyS0 foo=bar tsc_khz=[1-9]\d*", str(facts["cmdline"]))
    assert facts["e820"] == [(0, 128 * MiB, 1)]
    assert facts["ram_bytes"] == 128 * MiB
    assert facts["load_base"] == 0x200000


class Capture:
    def __init__(self) -> None:
        self.data = bytearray()

    def __call__(self, data: bytes) -> None:
        self.data += data

    @property
    def text(self) -> str:
        return self.data.decode()


@pytest.mark.parametrize("partition", [0, 1])
def test_same_kernel_boots_at_two_partition_bases(kernels, partition):
    console = Capture()
    with Machine(512 * MiB, partitions=2, console=console, console2=console) as machine:
        booted = machine.boot(str(kernels / "hello.elf"), "console=ttyS1", partition)
        result = machine.run(timeout=20)
    base = partition * 256 * MiB
    assert result.reason == "exit" and result.status == 0, (result, console.text)
    facts = parse_hello(console.text)
    assert facts["load_base"] == base + 0x200000 == booted.placement.load_base
    assert facts["e820"] == [(base, 256 * MiB, 1)]  # only its own partition
    assert facts["start_info"] == booted.placement.boot_info


def test_elf32_fixed_kernel_boots_in_place_and_is_refused_elsewhere(kernels):
    status, out, err = run_pyvmm(["boot", str(kernels / "hello32.elf"), "--timeout", "20"])
    assert status == 0, err
    assert "hello32: Hello from hello32.elf, a 32-bit PVH guest kernel" in out
    with (
        Machine(512 * MiB, partitions=2) as machine,
        pytest.raises(BootError, match="not relocatable"),
    ):
        machine.boot(str(kernels / "hello32.elf"), "", partition=1)


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_guest_exit_code_becomes_process_status(kernels, code):
    status, out, _ = run_pyvmm(
        ["boot", str(kernels / "probe.elf"), "--cmdline", f"probe=exit:{code}", "--timeout", "20"]
    )
    assert status == code
    assert f"probe: action=exit:{code}" in out


def test_guest_page_fault_prints_crash_report(kernels):
    status, out, _ = run_pyvmm(
        ["boot", str(kernels / "probe.elf"), "--cmdline", "probe=page-fault", "--timeout", "20"]
    )
    assert status == 3
    crash = re.search(r"CRASH vector=(\d+) error=(0x\w+) rip=(0x\w+) cr2=(0x\w+)", out)
    assert crash, out
    assert int(crash[1]) == 14 and int(crash[4], 16) == 0x100000000000


@pytest.mark.parametrize("mode", ["echo", "echo-irq"])
def test_console_input_reaches_the_guest(kernels, mode):
    status, out, err = run_pyvmm(
        ["boot", str(kernels / "probe.elf"), "--cmdline", f"probe={mode}", "--timeout", "20"],
        stdin=b"hello guest\n",
    )
    assert status == 0, err
    echoed = re.search(r'probe: echo="(.*?)"(?: irqs=(\d+))?', out)
    assert echoed and echoed[1] == "hello guest", out
    if mode == "echo-irq":
        assert int(echoed[2]) >= 1
