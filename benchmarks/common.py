"""Helpers shared by the benchmarks: where things are, reporting (statistics are in
harness.py)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from pyvmm import reference

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "guest_kernels" / "build"


def pyvmm_command() -> list[str]:
    """The installed `pyvmm` script beside this interpreter, as a user runs it."""
    script = Path(sys.executable).parent / "pyvmm"
    if script.exists():
        return [str(script)]
    found = shutil.which("pyvmm")
    return [found] if found else [sys.executable, "-m", "pyvmm"]


def qemu_microvm_command(kernel: Path, cmdline: str, mem: str = "256M") -> list[str]:
    if shutil.which("qemu-system-x86_64") is None:
        sys.exit("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return reference.qemu_microvm_command(str(kernel), cmdline, mem)


def report(result: dict, line: str) -> None:
    """JSON on stdout (one object), then the one-line human summary on stderr."""
    print(json.dumps(result, indent=2))
    print(line, file=sys.stderr)
