"""Shared fixtures. Tests that need the host's /dev/kvm (or gcc, QEMU) skip when it is
missing, except under PYVMM_REQUIRE_KVM=1 (CI), where a missing piece fails them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "guest_kernels" / "build"
REQUIRE = os.environ.get("PYVMM_REQUIRE_KVM") == "1"

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "examples"))  # the webkv load generator (kvload)


def missing(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"{reason} (PYVMM_REQUIRE_KVM=1: failing instead of skipping)")
    pytest.skip(reason)


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


@pytest.fixture(autouse=True)
def _requirements(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kvm") and not kvm_usable():
        missing("/dev/kvm is not available")
    if request.node.get_closest_marker("qemu") and not shutil.which("qemu-system-x86_64"):
        missing("qemu-system-x86_64 is not installed")


@pytest.fixture(scope="session")
def kernels() -> Path:
    """The guest kernels, built once by the project's own build step if needed."""
    if not (KERNELS / "hello.elf").exists():
        if not shutil.which("make") or not shutil.which("gcc"):
            missing("make and gcc are needed to build guest_kernels/")
        subprocess.run(["make", "-C", str(ROOT / "guest_kernels")], check=True, capture_output=True)
    return KERNELS
