"""The VMM's proxy of one front-end served by a shared back-end process: a
``VirtioBackend`` for the virtio-mmio transport that configures the back-end over
vhost-user instead of serving the queues. A device type's proxy (``ProcessBlk``)
subclasses it and adds its configuration space.

- ``connect`` (at construction and after every restart): a socketpair, its other end
  given to the process with the control op ``add``; then SET_OWNER, features, and
  guest RAM as the memory table: only the front-end's partition (its DMA window), so
  the back-end can reach nothing else;
- on DRIVER_OK each ready queue is sent as SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE;
  the kick fd is the queue's ioeventfd (the machine registers ``kick_fds`` with KVM)
  and the call fd is the device's irqfd, so the VMM is not on the data path;
- QueueReady=0, reset and quiesce send GET_VRING_BASE, which stops the rings once
  the request in progress is finished;
- every exchange has the protocol's time-out (1 s): a hung back-end costs the vCPU
  one time-out, is killed, and the death path (``BackendProcess``) puts every
  front-end of the process in NEEDS_RESET and starts a new one.

InterruptStatus: the VMM never sees the back-end's calls, so the transport reports
the used-buffer bit always (``interrupts_bypass_vmm``), as Firecracker's vhost-user
devices do; the driver then checks its used rings on every interrupt of the line.
"""

from __future__ import annotations

import os
import socket

from ..devices.virtio._log import ERROR, WARNING, log
from ..devices.virtio.backend import VirtioBackend
from ..memory import GuestMemory
from . import vhost_user as vu
from .process import BackendError, BackendProcess

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..devices.virtio.mmio import VirtioMmioTransport


class VhostUserDevice(VirtioBackend):
    """One front-end of ``process``; ``queue_sizes`` and ``device_id`` from the subclass."""

    interrupts_bypass_vmm = True  # see the module's docstring: InterruptStatus

    def __init__(
        self,
        process: BackendProcess,
        memory: GuestMemory,
        window: tuple[int, int],
        name: str,
        partition: int = 0,
        args: dict[str, object] | None = None,
        timeout: float = vu.DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__()
        if memory.fd < 0:
            raise ValueError(f"{name}: guest RAM is not a memfd (Machine(shared_memory=True))")
        base, size = window
        memory.check(base, size)
        self.process = process
        self.name = name
        self.partition = partition
        self.args = args or {}
        self.kick_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.queue_sizes]
        # every ring's SET_VRING_ERR: the back-end signals it when the guest broke a
        # ring and it stopped serving (``check_error``)
        self.err_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.error = ""  # why the back-end is unusable, while it is
        self.front: vu.FrontEnd | None = None
        self.features = 0
        self._host = memory.host_address
        self._region = vu.MemoryRegion(base, size, self._host + base, base)
        self._memfd = memory.fd
        self._timeout = timeout
        self._protocol = False
        self._running: set[int] = set()
        self._closed = False
        try:
            process.attach(self)
        except BaseException:
            for fd in self.kick_fds:
                os.close(fd)
            raise

    def connect(self) -> None:
        """Add this front-end to the (new) process and set the connection up. After a
        restart ``error`` stays until ``backend_restored``."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process.request(
                "add", [theirs.fileno()], name=self.name, partition=self.partition, args=self.args
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        front = vu.FrontEnd(ours, self._timeout)
        try:
            front.set_owner()
            offered = front.get_features()
            protocol = bool(offered & vu.F_PROTOCOL_FEATURES)
            if protocol:
                front.set_protocol_features(front.get_protocol_features() & vu.PROTOCOL_F_REPLY_ACK)
            front.set_mem_table([self._region], [self._memfd])
        except vu.VhostUserError as exc:
            ours.close()
            self.process.fail(f"{self.name}: {exc}")
            raise BackendError(f"{self.name}: {exc}") from exc
        with self._lock:
            old, self.front = self.front, front
            self._protocol = protocol
            self.features = offered & ~vu.F_PROTOCOL_FEATURES
            self._running.clear()  # a new process: no ring of ours runs there
        if old is not None:
            old.sock.close()

    def describe(self) -> dict[str, object]:
        """The process's state, as this front-end sees it."""
        return {**self.process.describe(), "error": self.error or self.process.error or None}

    # --- transport interface ---------------------------------------------------------

    def activate(self, transport: VirtioMmioTransport) -> None:
        fd = getattr(transport.interrupt, "fd", -1)
        with self._lock:
            self.transport = transport
            if fd < 0:
                self._lost("the interrupt line has no eventfd to give the back-end")
                return
            if self.error or self.front is None:
                transport.device_error(f"back-end: {self.error}")
                return
            try:
                os.eventfd_read(self.err_fd)  # an error of an earlier session
            except BlockingIOError:
                pass
            try:
                features = transport.driver_features
                self.front.set_features(features | (vu.F_PROTOCOL_FEATURES * self._protocol))
                for queue in transport.queues:
                    if queue.ready:
                        self._start_ring(queue.index, queue.size, queue, fd)
            except vu.VhostUserError as exc:
                self._lost(str(exc))

    def _start_ring(self, index: int, size: int, queue: object, call_fd: int) -> None:
        host = self._host
        front = self.front
        assert front is not None
        front.set_vring_num(index, size)
        addr = vu.VringAddr(
            index,
            0,
            desc=host + queue.desc_addr,  # type: ignore[attr-defined]
            used=host + queue.device_addr,  # type: ignore[attr-defined]
            avail=host + queue.driver_addr,  # type: ignore[attr-defined]
        )
        front.set_vring_addr(addr)
        front.set_vring_base(index, 0)
        front.set_vring_call(index, call_fd)
        front.set_vring_err(index, self.err_fd)
        front.set_vring_kick(index, self.kick_fds[index])
        if self._protocol:
            front.set_vring_enable(index, True)
        self._running.add(index)

    def check_error(self) -> None:
        """Whether the back-end stopped serving this session (the guest broke a ring):
        then the driver is told NEEDS_RESET. The transport asks when the driver reads
        Status or InterruptStatus; the back-end interrupts when it stops."""
        try:
            os.eventfd_read(self.err_fd)
        except (BlockingIOError, OSError):
            return
        transport = self.transport
        if transport is not None:
            transport.device_error("back-end: the driver broke a ring (see its status)")

    def notify(self, queue: int) -> None:
        """A QueueNotify that reached the VMM (not through the ioeventfd): pass it on."""
        if 0 <= queue < len(self.kick_fds):
            os.eventfd_write(self.kick_fds[queue], 1)

    def _stop_rings(self, rings: list[int], timeout: float) -> bool:
        """GET_VRING_BASE: when it answers, the back-end no longer touches the ring."""
        if not self._lock.acquire(timeout=timeout):
            return False
        try:
            for index in rings:
                if index not in self._running:
                    continue
                self._running.discard(index)
                if self.error or self.front is None:
                    continue  # dead: nothing of it touches guest RAM any more
                try:
                    self.front.get_vring_base(index)
                except vu.VhostUserError as exc:
                    self._lost(str(exc))
                    return False
            return True
        finally:
            self._lock.release()

    def stop_queue(self, queue: int, timeout: float) -> bool:
        return self._stop_rings([queue], timeout)

    def quiesce(self, timeout: float) -> bool:
        idle = self._stop_rings(list(range(len(self.queue_sizes))), timeout)
        self.transport = None
        return idle

    def reset(self) -> None:
        if not self.quiesce(vu.DEFAULT_TIMEOUT_S):
            log(WARNING, "%s: the back-end did not stop its rings on reset", self.name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.transport = None
        self.process.detach(self)
        if self.front is not None:
            self.front.sock.close()
        for fd in self.kick_fds:
            os.close(fd)
        self.kick_fds = []
        os.close(self.err_fd)
        self.err_fd = -1

    # --- failures --------------------------------------------------------------------

    def _lost(self, reason: str) -> None:
        """The back-end is unusable: NEEDS_RESET for the driver; the process is killed
        (a late reply would put the byte stream out of step), and so replaced."""
        if not self.error:
            self.error = reason
            log(ERROR, "%s: %s", self.name, reason)
        self.process.fail(f"{self.name}: {reason}")
        transport = self.transport
        if transport is not None:
            transport.device_error(f"back-end: {reason}")

    def backend_restored(self) -> None:
        """The new process serves this front-end, with the device type's state re-sent:
        the driver's next reset and set-up use it."""
        self.error = ""

    def backend_died(self, reason: str) -> None:
        """The process died (on its watcher thread): tell the driver. A new process
        follows (``connect``); the driver must reset the device to use it."""
        self.error = reason
        transport = self.transport
        if transport is not None:
            transport.device_error(reason)
