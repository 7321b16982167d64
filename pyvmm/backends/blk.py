"""The virtio-blk back-end process (vhost-user): ``python -m pyvmm.backends.blk
--socket PATH --disk FILE [--fenced] [--parent PID]``.

The VMM starts one per disk front-end and connects to PATH. The request queue is
served by the in-process device model itself (``devices.virtio.blk.VirtioBlk``: its
request parsing, I/O, write lease and worker thread, unchanged) over a ``Virtqueue``
whose "guest memory" is the vhost-user memory table: every descriptor is checked as
in the VMM, and DMA can reach only the regions the VMM sent (its instance's
partition), by construction. Kicks arrive on the kick eventfd (an ioeventfd KVM
signals) and completions leave through the call eventfd (an irqfd KVM injects): the
VMM process is not on the data path.

GET_VRING_BASE stops the ring: the request in progress is finished (bounded by
``STOP_TIMEOUT_S``) before the base is answered, so the VMM may reuse the rings.
A ring the guest breaks (``RingError``) stops being served; the guest's requests
then stay unanswered until it resets the device (the VMM sees no error channel yet).
The process dies with the VMM (PR_SET_PDEATHSIG) and serves exactly one connection.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import select
import signal
import socket
import sys
import time

from ..devices.virtio._log import ERROR, log
from ..devices.virtio.backend import VIRTIO_F_INDIRECT_DESC
from ..devices.virtio.blk import QUEUE_SIZE, VirtioBlk, WriteLease
from ..devices.virtio.queue import Virtqueue
from ..errors import MemoryAccessError
from . import vhost_user as vu

STOP_TIMEOUT_S = 0.8  # below the front-end's 1 s time-out: the answer still arrives
ACCEPT_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


class TableMemory:
    """The memory table as the ``GuestMemory`` a ``Virtqueue`` checks against:
    guest-physical addresses, only inside a region."""

    def __init__(self, backend: vu.BackEnd) -> None:
        self.backend = backend
        self.size = max(m.region.guest_phys_addr + m.region.memory_size for m in backend.memory)

    def check(self, gpa: int, length: int) -> None:
        try:
            self.backend.gpa(gpa, length)
        except ValueError as exc:
            raise MemoryAccessError(str(exc)) from None

    def view(self, gpa: int, length: int) -> memoryview:
        return self.backend.gpa(gpa, length)

    def to_gpa(self, uaddr: int) -> int:
        """A front-end virtual address (as SET_VRING_ADDR carries) → guest-physical."""
        for m in self.backend.memory:
            r = m.region
            if r.userspace_addr <= uaddr < r.userspace_addr + r.memory_size:
                return uaddr - r.userspace_addr + r.guest_phys_addr
        raise ValueError(f"ring address {uaddr:#x} is in no memory region")


class RingTransport:
    """What ``VirtioBlk`` asks of its transport, over one vhost-user ring."""

    def __init__(self, queue: Virtqueue, call_fd: int) -> None:
        self.queues = [queue]
        self.call_fd = call_fd
        self.broken = ""

    def used(self, queue: int) -> None:
        if self.call_fd >= 0 and self.queues[queue].wants_interrupt():
            os.eventfd_write(self.call_fd, 1)

    def config_changed(self) -> None:
        pass

    def device_error(self, message: str) -> None:
        log(ERROR, "virtio-blk back-end: ring stopped: %s", message)
        self.broken = message


class BlkBackEnd(vu.BackEnd):
    """The protocol state plus the device: starts the ring when it is started and
    enabled, stops it on GET_VRING_BASE."""

    def __init__(self, sock: socket.socket, blk: VirtioBlk) -> None:
        super().__init__(sock, blk.features, queues=1)
        self.blk = blk
        self.ring: RingTransport | None = None

    def _handle(self, msg: vu.Message) -> bytes | None:
        if msg.request == vu.Request.SET_MEM_TABLE and self.ring is not None:
            raise ValueError("SET_MEM_TABLE while the ring is running")
        if msg.request == vu.Request.GET_VRING_BASE:
            self.stop_ring()
        return super()._handle(msg)

    def stop_ring(self) -> None:
        ring = self.ring
        if ring is None:
            return
        if not self.blk.quiesce(STOP_TIMEOUT_S):
            log(ERROR, "virtio-blk back-end: a request outlived the ring's stop")
        queue = ring.queues[0]
        self.vrings[0].base = queue.next_avail
        queue.disable()
        self.ring = None

    def sync(self) -> None:
        """Start or stop serving after a message changed the ring's state."""
        vring = self.vrings[0]
        wanted = vring.started and vring.enabled and vring.addr is not None
        if self.ring is not None and not wanted:
            self.stop_ring()
        elif self.ring is None and wanted:
            self._start(vring)

    def _start(self, vring: vu.Vring) -> None:
        memory = TableMemory(self)
        queue = Virtqueue(memory, 0, QUEUE_SIZE)  # type: ignore[arg-type]
        assert vring.addr is not None
        try:
            queue.size = vring.num
            queue.desc_addr = memory.to_gpa(vring.addr.desc)
            queue.driver_addr = memory.to_gpa(vring.addr.avail)
            queue.device_addr = memory.to_gpa(vring.addr.used)
        except ValueError as exc:
            log(ERROR, "virtio-blk back-end: %s", exc)
            return
        queue.indirect = bool(self.features & VIRTIO_F_INDIRECT_DESC)
        error = queue.enable()
        if error is not None:
            log(ERROR, "virtio-blk back-end: ring refused: %s", error)
            return
        used_idx = int.from_bytes(memory.view(queue.device_addr + 2, 2), "little")
        queue.start_at(vring.base, used_idx)
        self.ring = RingTransport(queue, vring.call)
        self.blk.activate(self.ring)  # type: ignore[arg-type]


def serve(sock: socket.socket, blk: VirtioBlk) -> None:
    """Serve one front-end until it closes the connection."""
    backend = BlkBackEnd(sock, blk)
    try:
        while True:
            kick = backend.vrings[0].kick if backend.ring is not None else -1
            ready = select.select([sock] + ([kick] if kick >= 0 else []), [], [])[0]
            if kick in ready:
                try:
                    os.eventfd_read(kick)
                except BlockingIOError:
                    pass
                blk.notify(0)
            if sock in ready:
                backend.serve_one()
                backend.sync()
    except vu.ProtocolError as exc:
        log(logging.INFO, "virtio-blk back-end: connection ended: %s", exc)
    finally:
        backend.stop_ring()
        blk.close()


def die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent and os.getppid() != parent:
        sys.exit("pyvmm blk back-end: the VMM is already gone")


def accept_one(path: str) -> socket.socket:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        if os.path.exists(path):
            os.unlink(path)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(ACCEPT_TIMEOUT_S)
        conn, _ = listener.accept()
    os.unlink(path)
    conn.settimeout(None)
    return conn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyvmm.backends.blk")
    parser.add_argument("--socket", required=True, help="the Unix socket to serve on")
    parser.add_argument("--disk", required=True, help="the disk image")
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument(
        "--fenced", action="store_true", help="not the write-lease holder: writes fail"
    )
    parser.add_argument("--parent", type=int, default=0, help="die when this process does")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    lease = WriteLease()
    blk = VirtioBlk(args.disk, read_only=args.read_only, lease=lease)
    lease.grant(None if args.fenced else blk)
    started = time.monotonic()
    try:
        conn = accept_one(args.socket)
    except TimeoutError:
        sys.exit(f"pyvmm blk back-end: no VMM connected within {time.monotonic() - started:.0f} s")
    serve(conn, blk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
