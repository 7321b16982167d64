"""Per-instance views of the node's buses: an instance reaches only what it owns."""

from __future__ import annotations

import logging

from ..devices.bus import Bus
from ..machine import Attachment
from .instance import OsInstance

log = logging.getLogger("pyvmm.microvisor")


def build_views(
    instance: OsInstance, attachments: dict[str, Attachment], node_pio: Bus, node_mmio: Bus
) -> None:
    """(Re)build an instance's bus views from the devices it owns."""
    instance.pio = _RefusingBus(instance, node_pio)
    instance.mmio = _RefusingBus(instance, node_mmio)
    for attachment in attachments.values():
        if attachment.per_instance or attachment.name in instance.devices:
            for base, size in attachment.ports:
                instance.pio.register(base, size, attachment.device)
            for base, size in attachment.mmio:
                instance.mmio.register(base, size, attachment.device)


class _RefusingBus(Bus):
    """A bus view whose misses on another instance's device are refused and logged."""

    def __init__(self, instance: OsInstance, node_bus: Bus) -> None:
        super().__init__(f"{node_bus.name} of {instance.name}", node_bus.granule_shift)
        self._instance = instance
        self._node_bus = node_bus

    def missed(self, address: int, data: memoryview, is_write: bool) -> None:
        if self._node_bus.find(address) is not None:
            self._instance.refused += 1
            log.warning(
                "%s: refused %s of %#x: the device belongs to another instance",
                self._instance.name,
                "write" if is_write else "read",
                address,
            )
        super().missed(address, data, is_write)
