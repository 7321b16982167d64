"""Every user error is one clear line on stderr and a distinct non-zero status."""

from __future__ import annotations

import pytest
from elf_builder import ElfSpec, LoadSegment, simple_kernel
from harness import run_pyvmm
from typer.testing import CliRunner

from pyvmm import cli
from pyvmm.errors import EX_DATAERR, EX_NOPERM, EX_SOFTWARE, EX_TIMEOUT, EX_UNAVAILABLE

MiB = 1 << 20


def error_line(stderr: str) -> str:
    first = stderr.splitlines()[0]
    assert first.startswith("pyvmm: error: "), stderr
    assert "Traceback" not in stderr
    return first


@pytest.fixture
def write_kernel(tmp_path):
    def write(data: bytes, name: str = "kernel.elf") -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)

    return write


def test_missing_kvm_device(kernels):
    status, _, err = run_pyvmm(
        ["boot", str(kernels / "hello.elf")], env={"PYVMM_KVM_DEVICE": "/nonexistent/kvm"}
    )
    assert status == EX_UNAVAILABLE
    assert "/nonexistent/kvm not found" in error_line(err)


def test_kvm_permission_denied(monkeypatch, kernels):
    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("pyvmm.kvm.os.open", deny)
    result = CliRunner().invoke(cli.app, ["boot", str(kernels / "hello.elf")])
    assert result.exit_code == EX_NOPERM
    assert "permission denied opening /dev/kvm" in result.stderr


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"this is not an ELF file at all", "not an ELF file"),
        (b"\x7fELF\x02\x01\x01" + b"\xff" * 40, "malformed ELF"),
        (ElfSpec(segments=[LoadSegment(0x200000, b"\xf4")]).build(), "no PVH entry point"),
        (simple_kernel(size=0x1000, bss=64 * MiB), "kernel needs 64.0 MiB but partition 0"),
    ],
)
def test_bad_kernel_images(write_kernel, data, message):
    status, _, err = run_pyvmm(["boot", write_kernel(data), "--mem", "32M"])
    assert status == EX_DATAERR
    assert message in error_line(err)


def test_missing_kernel_file(tmp_path):
    status, _, err = run_pyvmm(["boot", str(tmp_path / "absent.elf")])
    assert status in (EX_DATAERR, EX_UNAVAILABLE)
    assert "absent.elf" in error_line(err)


@pytest.mark.kvm
def test_triple_fault_reports_registers(kernels):
    status, _, err = run_pyvmm(
        ["boot", str(kernels / "probe.elf"), "--cmdline", "probe=triple-fault", "--timeout", "20"]
    )
    assert status == EX_SOFTWARE
    assert "triple fault" in error_line(err)
    assert "rip=" in err and "cr3=" in err


@pytest.mark.kvm
@pytest.mark.parametrize("action", ["spin", "halt"])
def test_timeout_stops_a_guest_that_never_exits(kernels, action):
    status, _, err = run_pyvmm(
        ["boot", str(kernels / "probe.elf"), "--cmdline", f"probe={action}", "--timeout", "1.5"]
    )
    assert status == EX_TIMEOUT
    assert "time-out" in error_line(err)


@pytest.mark.kvm
def test_kvm_internal_error_is_reported(kernels):
    status, _, err = run_pyvmm(
        ["boot", str(kernels / "probe.elf"), "--cmdline", "probe=unemulatable", "--timeout", "20"]
    )
    assert status == EX_SOFTWARE
    assert "KVM internal error" in error_line(err)


@pytest.mark.parametrize(
    "args",
    [
        ["boot", "x.elf", "--mem", "lots"],
        ["boot", "x.elf", "--timeout", "-1"],
        ["upgrade", "x.sock", "--to", "x.elf", "--timeout", "acquire"],
        ["upgrade", "x.sock", "--to", "x.elf", "--timeout", "acquire=soon"],
    ],
)
def test_bad_options(args):
    status, _, err = run_pyvmm(args)
    assert status == 2
    assert "Traceback" not in err


def test_help_lists_boot():
    status, out, _ = run_pyvmm(["--help"])
    assert status == 0 and "boot" in out
