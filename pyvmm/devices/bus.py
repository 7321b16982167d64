"""Port-I/O and MMIO buses: address → (device, offset) dispatch."""

from __future__ import annotations


class Device:
    """The one interface of every device: a window on a bus, accessed by offset.
    ``data`` is the access itself, 1, 2, 4 or 8 bytes."""

    def read(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` with the value read at ``offset``."""
        raise NotImplementedError

    def write(self, offset: int, data: memoryview) -> None:
        """Accept the bytes in ``data`` written at ``offset``."""
        raise NotImplementedError

    def quiesce(self, timeout: float) -> bool:
        """The OS instance using this device is gone; its memory is about to be wiped
        or given to another OS. Stop everything done for it: True once the device
        writes no guest memory any more, False if work it cannot abandon was still
        running after ``timeout`` seconds (call again to wait again). A device that
        never writes guest memory has nothing to do."""
        return True


class Bus:
    """Dispatch by address. Windows are registered at ``1 << granule_shift`` granularity,
    so lookup is one dict probe: per port for port I/O, per 4 KiB page for MMIO."""

    def __init__(self, name: str, granule_shift: int) -> None:
        self.name = name
        self.granule_shift = granule_shift
        self._granules: dict[int, tuple[Device, int]] = {}
        self.unhandled = 0  # accesses that hit no device

    def register(self, base: int, size: int, device: Device) -> None:
        granule = 1 << self.granule_shift
        if base % granule or size % granule or size <= 0:
            raise ValueError(f"{self.name} window {base:#x}+{size:#x} is not {granule}-aligned")
        keys = range(base >> self.granule_shift, (base + size) >> self.granule_shift)
        taken = [k << self.granule_shift for k in keys if k in self._granules]
        if taken:
            raise ValueError(f"{self.name} window {base:#x}+{size:#x} overlaps {taken[0]:#x}")
        for key in keys:
            self._granules[key] = (device, base)

    def unregister(self, base: int) -> None:
        for key, (_, window_base) in list(self._granules.items()):
            if window_base == base:
                del self._granules[key]

    def missed(self, address: int, data: memoryview, is_write: bool) -> None:
        """An access that hit no device: an open bus reads as all-ones, writes vanish."""
        self.unhandled += 1
        if not is_write:
            data[:] = b"\xff" * len(data)

    def find(self, address: int) -> tuple[Device, int] | None:
        """(device, window base) for an address, or None."""
        return self._granules.get(address >> self.granule_shift)

    def read(self, address: int, data: memoryview) -> None:
        found = self._granules.get(address >> self.granule_shift)
        if found is None:
            self.missed(address, data, False)
            return
        device, base = found
        device.read(address - base, data)

    def write(self, address: int, data: memoryview) -> None:
        found = self._granules.get(address >> self.granule_shift)
        if found is None:
            self.missed(address, data, True)
            return
        device, base = found
        device.write(address - base, data)


class PortIoBus(Bus):
    def __init__(self) -> None:
        super().__init__("port I/O", 0)


class MmioBus(Bus):
    def __init__(self) -> None:
        super().__init__("MMIO", 12)
