"""The service devices of a node: a vsock device per partition (its own channel to
the host), an optional disk, and host TCP ports forwarded to guest vsock ports.

Partition N's instance talks through ``vsockN`` (guest CID 3 + N) and sees the disk
as ``blkN``: one image with a front-end per partition under a write lease (see
``devices.virtio.blk``), held by partition 0 at first. Handing the disk over moves the
lease, not a device, so a standby instance has its driver set up and can read the
disk before it owns it. Forwarded ports start on ``vsock0``.

With ``backends="process"`` the disk is served by ONE back-end process
(``pyvmm.backends.blk``) for every partition's front-end, each over its own vhost-user
connection mapping only its partition; the write lease lives in that process and
``give_disk`` moves it with a control op (``BlkProcess.grant``). The vsock front-ends
are served likewise by one process (``pyvmm.backends.vsock``), which owns the streams;
the VMM keeps the listening sockets, and the listeners (``RemoteListener``) move by
control op. While the node is virtualized the microvisor routes the back-ends'
interrupts to each device's owner (``microvisor.interrupts``).
"""

from __future__ import annotations

import os

from .backends import DEVICE_BACKENDS, DEVICE_BACKENDS_ENV, default_device_backends
from .errors import UsageError
from .machine import Machine
from .record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from .backends.blk_front import BlkProcess
    from .backends.process import BackendProcess
    from .devices.virtio import HostListener, VirtioBlk, VirtioVsock
    from .devices.virtio.blk import WriteLease
    from .devices.virtio.blk_journal import WriteJournal

    P = TypeVar("P", bound=BackendProcess)

FIRST_GUEST_CID = 3
# Set to a path: the disk's writes and flushes are recorded there (blk_journal.py), so
# a checker can rebuild the image as a power cut at any moment would leave it.
DISK_JOURNAL_ENV = "PYVMM_DISK_JOURNAL"


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
        self.vsocks: list[VirtioVsock] = []  # by partition
        self.disks: list[VirtioBlk] = []  # front-ends of the one disk, by partition
        # which of them may write: a WriteLease, or with process back-ends the
        # BlkProcess, which keeps it inside the back-end (same holder/grant)
        self.lease: WriteLease | BlkProcess | None = None
        self.listeners: list[HostListener] = []  # on vsock0 at first
        self.journal: WriteJournal | None = None
        self.backends = "thread"  # or "process": the disk front-ends' back-ends

    def backend_status(self) -> dict[str, object]:
        """Per front-end served by a back-end process: that process's pid, alive,
        exit status, error, restarts, last death (one process serves them all);
        {} with threads."""
        return {
            front.name: front.describe()  # type: ignore[attr-defined]
            for front in [*self.vsocks, *self.disks]
            if hasattr(front, "describe")
        }

    def backend_calls(self) -> dict[str, int]:
        """Per front-end served by a back-end process: the interrupts (call eventfd
        writes, every ring) as that process counts them; {} with threads. One
        ``status`` request per process; one that cannot answer is left out."""
        from .backends.process import BackendError

        fronts = [f for f in [*self.vsocks, *self.disks] if hasattr(f, "interrupts_bypass_vmm")]
        processes = {id(f.process): f.process for f in fronts}  # type: ignore[attr-defined]
        calls: dict[str, int] = {}
        for process in processes.values():
            if not process.alive:
                continue
            try:
                devices = process.status()["devices"]
            except (BackendError, KeyError):
                continue
            for name, device in devices.items():  # type: ignore[union-attr]
                calls[name] = sum(ring["calls"] for ring in device.get("rings", []))
        return calls

    def disk_writer(self) -> int | None:
        """The partition whose front-end may write the disk."""
        holder = None if self.lease is None else self.lease.holder
        return next((i for i, d in enumerate(self.disks) if d is holder), None)

    def give_disk(self, partition: int) -> None:
        """Move the write lease; returns once the previous writer can write no more."""
        assert self.lease is not None
        self.lease.grant(self.disks[partition])  # type: ignore[arg-type]

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
        if self.journal is not None:
            self.journal.close()


def add_service_devices(
    machine: Machine,
    disk: str | None = None,
    forwards: tuple[Forward, ...] = (),
    backends: str | None = None,
) -> ServiceDevices:
    """``backends``: "thread" or "process"; None takes ``PYVMM_DEVICE_BACKENDS`` or the
    default (``backends.default_device_backends``). Process back-ends need guest RAM
    in a memfd (``Machine(shared_memory=True)``)."""
    from .devices.virtio import VirtioBlk, VirtioVsock
    from .devices.virtio.blk import WriteLease

    backends = backends or default_device_backends()
    if backends not in DEVICE_BACKENDS:
        raise UsageError(
            f"--device-backends (or {DEVICE_BACKENDS_ENV}) {backends!r}: "
            f"one of {', '.join(DEVICE_BACKENDS)}"
        )
    devices = ServiceDevices()
    devices.backends = backends
    if backends == "process":
        _add_process_vsocks(machine, devices)
    for partition in machine.memory.partitions if backends == "thread" else ():
        vsock = VirtioVsock(FIRST_GUEST_CID + partition.index)
        machine.attach_virtio(f"vsock{partition.index}", vsock, partition.index)
        devices.vsocks.append(vsock)
    if disk is not None:
        devices.lease = lease = WriteLease()
        journal = None
        if backends == "process":
            devices.lease = lease = _add_process_disks(machine, disk, devices)  # type: ignore[assignment]
        elif os.environ.get(DISK_JOURNAL_ENV):  # power-cut checks (blk_journal.py)
            from .devices.virtio.blk_journal import WriteJournal

            journal = devices.journal = WriteJournal(os.environ[DISK_JOURNAL_ENV])
        for partition in machine.memory.partitions if backends == "thread" else ():
            try:
                backend = VirtioBlk(disk, lease=lease, journal=journal)
            except OSError as exc:
                raise UsageError(f"--disk {disk}: {exc.strerror or exc}") from None
            machine.attach_virtio(f"blk{partition.index}", backend, partition.index)
            devices.disks.append(backend)
        lease.grant(devices.disks[0])
    for forward in forwards:
        try:
            listener = devices.vsocks[0].forward(forward.host, forward.port, forward.guest_port)
        except OSError as exc:
            devices.close()
            raise UsageError(f"--forward {forward}: {exc.strerror or exc}") from None
        devices.listeners.append(listener)
    return devices


def _add_process_vsocks(machine: Machine, devices: ServiceDevices) -> None:
    """One back-end process for every partition's vsock front-end (each mapping only
    its partition); it owns the host side of the streams, the VMM the listening
    sockets (``backends.vsock_front``)."""
    from .backends.vsock_front import ProcessVsock, VsockProcess

    _start_fronts(
        machine,
        VsockProcess,
        "vsock",
        lambda process, name, window, index: ProcessVsock(
            process, machine.memory, window, FIRST_GUEST_CID + index, name, index
        ),
        devices.vsocks,
        "the vsock back-end process",
    )


def _add_process_disks(machine: Machine, disk: str, devices: ServiceDevices) -> BlkProcess:
    """One back-end process for the disk, a front-end per partition in it, each
    mapping only its partition; the process holds the write lease."""
    from .backends.blk_front import BlkProcess, ProcessBlk

    if not os.path.isfile(disk):
        raise UsageError(f"--disk {disk}: not a file")
    return _start_fronts(
        machine,
        lambda: BlkProcess(disk, journal=os.environ.get(DISK_JOURNAL_ENV) or None),
        "blk",
        lambda process, name, window, index: ProcessBlk(
            process, machine.memory, window, name, index
        ),
        devices.disks,
        f"--disk {disk}",
    )


def _start_fronts(
    machine: Machine,
    start: Callable[[], P],
    kind: str,
    make: Callable[[P, str, tuple[int, int], int], object],
    fronts: list,
    what: str,
) -> P:
    """A back-end process (``start()``) and a front-end per partition on it
    (``make(process, name, window, partition index)``), attached for that partition's
    instance and appended to ``fronts``. If one cannot be made, those made so far and
    the process are closed; the error is the user's (``what``: which option or part)."""
    from .backends.process import BackendError

    try:
        process = start()
    except (BackendError, OSError) as exc:
        raise UsageError(f"{what}: {exc}") from None
    for partition in machine.memory.partitions:
        name = f"{kind}{partition.index}"
        try:
            front = make(process, name, (partition.base, partition.size), partition.index)
        except (BackendError, OSError) as exc:
            for made in fronts:
                made.close()
            process.close()
            raise UsageError(f"{what}: {name}: {exc}") from None
        machine.attach_virtio(name, front, partition.index)
        fronts.append(front)
    return process
