"""The service devices of a node: a vsock device per partition (its own channel to
the host), an optional disk, and host TCP ports forwarded to guest vsock ports.

Partition N's instance talks through ``vsockN`` (guest CID 3 + N); ``blk0`` is one
disk that moves between instances; forwarded ports start on ``vsock0``.
"""

from __future__ import annotations

from .errors import UsageError
from .machine import Machine
from .record import Record

FIRST_GUEST_CID = 3


class Forward(Record, frozen=True):
    host: str
    port: int
    guest_port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}={self.guest_port}"


def parse_forward(text: str) -> Forward:
    """'127.0.0.1:8080=80', '8080=80' (loopback) or '[::1]:8080=80'."""
    left, eq, guest = text.rpartition("=")
    host, colon, port = left.rpartition(":")
    host = host.strip("[]") if colon else "127.0.0.1"
    port = port if colon else left
    if not eq or not port.isdigit() or not guest.isdigit() or not host:
        raise UsageError(f"--forward {text!r}: expected [HOST:]PORT=GUEST_PORT")
    if not (0 <= int(port) < 65536 and 0 < int(guest) < 2**32):
        raise UsageError(f"--forward {text!r}: port out of range")
    return Forward(host, int(port), int(guest))


class ServiceDevices:
    """What ``add_service_devices`` installed, for the maintenance protocol to move."""

    def __init__(self) -> None:
        self.vsocks: list[object] = []  # VirtioVsock backends, by partition
        self.disk: str | None = None  # "blk0" when there is a disk
        self.listeners: list[object] = []  # HostListeners, on vsock0 at first

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()  # type: ignore[attr-defined]


def add_service_devices(
    machine: Machine, disk: str | None = None, forwards: tuple[Forward, ...] = ()
) -> ServiceDevices:
    from .devices.virtio import VirtioBlk, VirtioVsock

    devices = ServiceDevices()
    for partition in machine.memory.partitions:
        vsock = VirtioVsock(FIRST_GUEST_CID + partition.index)
        machine.attach_virtio(f"vsock{partition.index}", vsock)
        devices.vsocks.append(vsock)
    if disk is not None:
        try:
            backend = VirtioBlk(disk)
        except OSError as exc:
            raise UsageError(f"--disk {disk}: {exc.strerror or exc}") from None
        machine.attach_virtio("blk0", backend)
        devices.disk = "blk0"
    for forward in forwards:
        try:
            listener = devices.vsocks[0].forward(forward.host, forward.port, forward.guest_port)  # type: ignore[attr-defined]
        except OSError as exc:
            devices.close()
            raise UsageError(f"--forward {forward}: {exc.strerror or exc}") from None
        devices.listeners.append(listener)
    return devices
