"""An OS instance: a partition, the devices it owns and its saved vCPU state."""

from __future__ import annotations

import hashlib

from ..cpu_state import CpuState
from ..devices.bus import MmioBus, PortIoBus
from ..machine import RunResult
from ..memory import Partition
from .isolation import RefusalLog

RUNNING = "running"
RETIRED = "retired"
# Command-line words the node sets itself (its console, an upgrade's role and name, an
# injected fault); the other words are the operator's choice.
NODE_WORDS = ("console", "role", "name", "fault")


def service_cmdline(cmdline: str) -> str:
    """The operator's words of a command line, in order, single-spaced: what an upgrade's
    ``cmdline`` asks for, and what ``status`` compares it with."""
    return " ".join(w for w in cmdline.split() if w.partition("=")[0] not in NODE_WORDS)


def kernel_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class OsInstance:
    def __init__(self, name: str, partition: Partition, cpu: CpuState) -> None:
        self.name = name
        self.partition = partition
        self.cpu = cpu
        self.devices: set[str] = set()
        self.status = RUNNING
        self.result: RunResult | None = None  # how it ended, once retired
        # Its view of the hardware while virtualized: only what it owns.
        self.pio = PortIoBus()
        self.mmio = MmioBus()
        # Interrupt lines (by GSI) asserted while it was switched out.
        self.held: set[int] = set()
        self.paused = False  # not scheduled at all; its interrupts are held meanwhile
        # Its time slice when another instance has work (None: the microvisor's).
        self.slice_s: float | None = None
        self.halted = False  # halted with nothing pending, as of its last switch-out
        self.wake_at: float | None = None  # when its own timer fires, if halted
        self.slices = 0
        self.refused = 0  # accesses to devices it does not own
        self.refused_memory = 0  # accesses to guest RAM outside its partition
        self.quiesce_s: float | None = None  # how long its devices took to quiesce
        self.refusals = RefusalLog(name)  # the log lines of both, rate-limited
        # What it runs: set by record_image when it is booted.
        self.kernel: str | None = None
        self.kernel_sha256: str | None = None
        self.cmdline = ""

    def record_image(self, kernel: str, cmdline: str) -> None:
        """Remember the kernel (by content hash: a path says nothing about what was in
        it) and the command line it was booted with, for ``status``."""
        self.kernel = kernel
        self.cmdline = cmdline
        try:
            self.kernel_sha256 = kernel_sha256(kernel)
        except OSError:
            self.kernel_sha256 = None  # gone since it was loaded: unknown, not wrong

    @property
    def live(self) -> bool:
        return self.status == RUNNING

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "partition": self.partition.index,
            "base": self.partition.base,
            "size": self.partition.size,
            "devices": sorted(self.devices),
            "status": self.status,
            "paused": self.paused,
            "slices": self.slices,
            "refused_accesses": self.refused,
            "refused_memory_accesses": self.refused_memory,
            "quiesce_s": self.quiesce_s,
            "result": None if self.result is None else self.result.reason,
            "kernel": self.kernel,
            "kernel_sha256": self.kernel_sha256,
            "cmdline": self.cmdline,
            "service_cmdline": service_cmdline(self.cmdline),
        }
