"""Per-instance views of the node's buses: an instance reaches only what it owns.

A miss on an instance's MMIO view is one of three things: a device window of another
instance (refused), guest RAM outside the instance's partition, which KVM reports as
MMIO because that partition's memory slot is not mapped while the instance runs
(refused, see ``isolation``), or open bus. Refused reads give all-ones and refused
writes are dropped, as on an open bus; both are counted per instance and logged at
most ten lines a second per instance (``RefusalLog``).
"""

from __future__ import annotations

from ..devices.bus import Bus
from ..machine import Attachment, Machine
from .instance import OsInstance

# Devices every instance has a view of and none owns: the debug-exit port is each
# instance's own "power switch" (a write to it retires that instance only).
PER_INSTANCE = frozenset({"debug-exit"})


def partition_devices(machine: Machine, partition: int) -> list[str]:
    """The devices that belong to one partition's instance: its console (COMn+1) and
    the virtio devices attached for that partition alone."""
    own = [n for n in machine.virtio if machine.devices[n].partition == partition]
    return [f"com{partition + 1}", *own]


def build_views(
    instance: OsInstance,
    attachments: dict[str, Attachment],
    node_pio: Bus,
    node_mmio: Bus,
    ram_size: int = 0,
) -> None:
    """(Re)build an instance's bus views from the devices it owns. ``ram_size``: guest
    RAM is [0, ram_size); a miss there is an access outside the instance's partition."""
    instance.pio = _RefusingBus(instance, node_pio)
    instance.mmio = _RefusingBus(instance, node_mmio, ram_size)
    for attachment in attachments.values():
        if attachment.name in PER_INSTANCE or attachment.name in instance.devices:
            for base, size in attachment.ports:
                instance.pio.register(base, size, attachment.device)
            for base, size in attachment.mmio:
                instance.mmio.register(base, size, attachment.device)


class _RefusingBus(Bus):
    """A bus view whose misses on another instance's device or RAM are refused."""

    def __init__(self, instance: OsInstance, node_bus: Bus, ram_size: int = 0) -> None:
        super().__init__(f"{node_bus.name} of {instance.name}", node_bus.granule_shift)
        self._instance = instance
        self._node_bus = node_bus
        self._ram_size = ram_size

    def missed(self, address: int, data: memoryview, is_write: bool) -> None:
        instance = self._instance
        if address < self._ram_size:
            instance.refused_memory += 1
            instance.refusals.refused(
                "refused %s of guest RAM at %#x: outside its partition",
                "write" if is_write else "read",
                address,
            )
        elif self._node_bus.find(address) is not None:
            instance.refused += 1
            instance.refusals.refused(
                "refused %s of %#x: the device belongs to another instance",
                "write" if is_write else "read",
                address,
            )
        super().missed(address, data, is_write)
