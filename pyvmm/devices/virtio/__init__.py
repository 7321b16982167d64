"""virtio 1.x devices on the virtio-mmio transport (version 2, split virtqueues).

- ``mmio.VirtioMmioTransport``: the register window, feature negotiation, status,
  queues, interrupts. One per device.
- ``backend.VirtioBackend``: what a device model implements (see its docstring for
  the threading contract).
- ``blk.VirtioBlk``: a disk backed by a host file.
- ``vsock.VirtioVsock`` with ``forward.HostListener``: host TCP ports forwarded to
  guest vsock ports, detachable from one device and attachable to another.

Names are importable from this package; modules load on first use so that the boot
path pays only for the devices it creates.
"""

from __future__ import annotations

_EXPORTS = {
    "VirtioMmioTransport": "mmio",
    "InterruptLine": "mmio",
    "MMIO_WINDOW": "mmio",
    "VirtioBackend": "backend",
    "VirtioBlk": "blk",
    "VirtioVsock": "vsock",
    "HostListener": "forward",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
