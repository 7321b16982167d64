"""What the VMM and its back-end processes import, from ``python -X importtime`` of
the real entry points. Every module stays in the process's memory for its life
(benchmarks/memory.py: Rss - RssShmem of the VMM and each back-end), so the back-ends
import no KVM, microvisor, numpy or CLI code, and none of the standard modules whose
cost was measured and avoided (docs/decisions.md, "VMM memory")."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In no back-end process: what it has no use for.
FOREIGN = ("numpy", "elftools", "typer", "click", "rich", "pydantic", "ioctl")
FOREIGN_PYVMM = ("pyvmm.microvisor", "pyvmm.machine", "pyvmm.kvm", "pyvmm.boot", "pyvmm.cli")
# Avoided on purpose, each 0.5-1.4 MiB per process (logging comes with a first message).
# (argparse's add_argument imports shutil, for its help formatter: kept.)
AVOIDED = ("logging", "dataclasses", "typing", "concurrent", "tempfile")


def imported(args: list[str]) -> set[str]:
    """The modules ``python -X importtime ARGS`` imported (whatever its exit status)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=60
    )
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "pyvmm" in names or "site" in names, done.stderr[-2000:]
    return names


def offending(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    packages = tuple(f"{p}." for p in prefixes)
    return sorted(n for n in names if n in prefixes or n.startswith(packages))


@pytest.mark.parametrize("device_type", ["blk", "vsock"])
def test_backend_processes_import_nothing_heavy(device_type, tmp_path):
    """The back-end as the VMM starts it, up to waiting for the VMM (none comes)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    control = ["--control", str(tmp_path / "c.sock"), "--accept-timeout", "0.2"]
    args = ["--disk", str(disk)] if device_type == "blk" else []
    names = imported(["-m", f"pyvmm.backends.{device_type}", *control, *args])
    assert "pyvmm.backends.host" in names
    assert offending(names, FOREIGN + FOREIGN_PYVMM) == []
    assert offending(names, AVOIDED) == []


@pytest.mark.kvm
@pytest.mark.parametrize("backends", ["thread", "process"])
def test_boot_with_service_devices_imports_nothing_heavy(kernels, tmp_path, backends):
    """`pyvmm boot` with a disk and a forwarded port takes the launcher's fast path:
    through typer it carried typer, click, rich and pydantic (VMM 45 against 26 MiB)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    command = [str(kernels / "hello.elf"), "--disk", str(disk), "--forward", "127.0.0.1:0=80"]
    names = imported(
        ["-m", "pyvmm", "boot", *command, "--timeout", "20", "--device-backends", backends]
    )
    assert "pyvmm.machine" in names and "pyvmm.node" in names
    assert ("pyvmm.backends.process" in names) == (backends == "process")
    assert offending(names, ("typer", "click", "rich", "pydantic", "numpy", "pyvmm.cli")) == []
    assert offending(names, AVOIDED) == []
