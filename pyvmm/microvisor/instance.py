"""An OS instance: a partition, the devices it owns and its saved vCPU state."""

from __future__ import annotations

from ..cpu_state import CpuState
from ..devices.bus import MmioBus, PortIoBus
from ..machine import RunResult
from ..memory import Partition

RUNNING = "running"
RETIRED = "retired"


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
        # Lines injected straight into its irqchip during its current turn on the vCPU.
        self.injected: set[int] = set()
        self.paused = False  # not scheduled at all; its interrupts are held meanwhile
        # Its time slice when another instance has work (None: the microvisor's).
        self.slice_s: float | None = None
        self.halted = False  # halted with nothing pending, as of its last switch-out
        self.wake_at: float | None = None  # when its own timer fires, if halted
        self.slices = 0
        self.refused = 0  # accesses to devices it does not own

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
            "result": None if self.result is None else self.result.reason,
        }
