"""Memory isolation while virtualized: the running instance's partition is the only
guest RAM that KVM maps.

Guest RAM has one KVM memory slot per partition (``GuestMemory.slots``). At every
world switch the outgoing instance's slot is deleted and the incoming instance's
created, so a guest access outside its own partition finds no memory: KVM reports
it as MMIO, and the instance's bus view (``ownership``) refuses it, a read with
all-ones, a write dropped, counted and logged at a limited rate. An access KVM cannot
turn into MMIO (an instruction fetch, a page-table walk) ends in an internal error,
which retires the intruder only. The other partition is never touched either way.

Devirtualized, only the survivor's slot exists and slots never change: nothing of
this is on the hot path.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from ..kvm import Vm
from ..memory import GuestMemory, Partition

log = logging.getLogger("pyvmm.microvisor")

# Which partitions are mapped while an instance runs.
SYMMETRIC = "symmetric"  # only its own: neither instance can reach the other
PROTECT_FIRST = "protect-first"  # the instance trusted at virtualize() sees every partition
NONE = "none"  # every partition always mapped: no isolation (a baseline for measurements)
ISOLATION_MODES = (SYMMETRIC, PROTECT_FIRST, NONE)


class PartitionSlots:
    """Which partitions' KVM memory slots are mapped, changed to what an instance may
    reach. The node's machine creates every partition's slot at start-up."""

    def __init__(self, vm: Vm, memory: GuestMemory, mode: str = SYMMETRIC) -> None:
        if mode not in ISOLATION_MODES:
            raise ValueError(f"isolation mode {mode!r}: expected one of {ISOLATION_MODES}")
        self._vm = vm
        self._memory = memory
        self.mode = mode
        self.mapped: set[int] = {p.index for p in memory.partitions}
        self.trusted: Partition | None = None  # PROTECT_FIRST: the instance left alone
        self.updates = 0  # slot creations and deletions
        self.first_update_s: float | None = None  # the very first change (see decisions.md)
        self.change_latency: deque[float] = deque(maxlen=10_000)  # per world switch

    def wanted(self, running: Partition, live: list[Partition]) -> set[int]:
        """The partitions mapped while ``running`` is on the vCPU."""
        if self.mode == NONE:
            return {p.index for p in self._memory.partitions}
        if self.mode == PROTECT_FIRST and running == self.trusted:
            return {p.index for p in live} | {running.index}
        return {running.index}

    def alone(self, survivor: Partition) -> None:
        """Map what the survivor of a devirtualize keeps: its own partition (every
        partition in mode none); slots then stay as they are."""
        self.map_only(self.wanted(survivor, [survivor]))

    def enter(self, running: Partition, live: list[Partition]) -> None:
        """Map exactly what ``running`` may reach; vCPU thread, vCPU outside KVM_RUN."""
        self.map_only(self.wanted(running, live))

    def map_only(self, keep: set[int]) -> None:
        if keep == self.mapped:
            return
        started = time.perf_counter()
        # Deletions first: at no moment may the incoming instance reach the other's RAM.
        for index in sorted(self.mapped - keep):
            slot = self._memory.partition_slot(self._memory.partitions[index])
            self._vm.delete_memory_region(slot.slot)
            self.mapped.discard(index)
            self._count(started)
        for index in sorted(keep - self.mapped):
            slot = self._memory.partition_slot(self._memory.partitions[index])
            self._vm.set_user_memory_region(slot.slot, slot.gpa, slot.size, slot.host_address)
            self.mapped.add(index)
            self._count(started)
        self.change_latency.append(time.perf_counter() - started)

    def _count(self, started: float) -> None:
        if self.updates == 0:
            self.first_update_s = time.perf_counter() - started
        self.updates += 1


class RefusalLog:
    """At most ``per_second`` log lines a second for one instance's refused accesses;
    the rest are counted and reported as one "K suppressed" line when the next second
    begins (or at ``flush``), so a guest cannot flood the log."""

    def __init__(
        self,
        name: str,
        per_second: int = 10,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self.name = name
        self.per_second = per_second
        self._clock = clock
        self._log = logger
        self._window = -1.0
        self._logged = 0
        self.suppressed = 0  # in the current window, not yet reported

    def refused(self, message: str, *args: object) -> None:
        now = self._clock()
        if now - self._window >= 1.0:
            self.flush()
            self._window, self._logged = now, 0
        if self._logged < self.per_second:
            self._logged += 1
            self._log.warning("%s: " + message, self.name, *args)
        else:
            self.suppressed += 1

    def flush(self) -> None:
        if self.suppressed:
            self._log.warning("%s: %d more refused accesses suppressed", self.name, self.suppressed)
            self.suppressed = 0
