"""One front-end served in a back-end process (``host``): its vhost-user connection
(``FrontEnd``, the protocol's state from ``vhost_user.BackEnd``), its rings as
``Virtqueue``s over the memory table (``TableMemory``: only its partition, so DMA
is confined by construction, and every descriptor checked), and the transport its
device model runs on (``RingTransport``: calls counted per ring).

The model is activated once *every* ring is started and enabled; GET_VRING_BASE or
RESET_OWNER quiesces it first (the request in progress finishes, bounded by
``STOP_TIMEOUT_S``) and records where each ring stopped.
"""

from __future__ import annotations

import os
import socket
import threading

from ..devices.virtio._log import ERROR, log
from ..devices.virtio.backend import VIRTIO_F_INDIRECT_DESC, VirtioBackend
from ..devices.virtio.queue import Virtqueue
from ..errors import MemoryAccessError
from . import vhost_user as vu

STOP_TIMEOUT_S = 0.8  # below the front-end's 1 s time-out: the answer still arrives


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
    """What a device model asks of its transport, over vhost-user rings."""

    def __init__(
        self,
        queues: list[Virtqueue],
        call_fds: list[int],
        calls: list[int],
        kick_fds: list[int] | None = None,
        kicks: list[int] | None = None,
        err_fds: list[int] | None = None,
    ) -> None:
        self.queues = queues
        self.call_fds = call_fds
        self.calls = calls  # per ring, kept by the front-end across sessions
        # for a model that reads its kicks itself (``owns_kicks``): the fds, and the
        # front-end's counts to add to
        self.kick_fds = kick_fds or []
        self.kicks = kicks if kicks is not None else [0] * len(queues)
        self.err_fds = err_fds or []
        self.errors = 0
        self.last_error = ""
        self._lock = threading.Lock()  # a call never races the fd's close
        self._stopped = False

    def used(self, queue: int) -> None:
        with self._lock:
            if self._stopped or self.call_fds[queue] < 0:
                return
            if self.queues[queue].wants_interrupt():
                os.eventfd_write(self.call_fds[queue], 1)
                self.calls[queue] += 1

    def config_changed(self) -> None:
        pass  # no config changes reach a driver from a back-end process

    def device_error(self, message: str) -> None:
        """The model stopped serving (the guest broke a ring): the front-end learns it
        from the rings' error eventfd (SET_VRING_ERR), and an interrupt makes the
        driver look (it reads InterruptStatus from the VMM, which then checks)."""
        log(ERROR, "back-end: ring stopped: %s", message)
        self.errors += 1
        self.last_error = message
        with self._lock:
            if self._stopped:
                return
            for fds in (self.err_fds, self.call_fds):
                fd = next((fd for fd in fds if fd >= 0), -1)
                if fd >= 0:
                    os.eventfd_write(fd, 1)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True


class FrontEnd(vu.BackEnd):
    """One front-end's vhost-user connection and its device model."""

    def __init__(self, sock: socket.socket, name: str, partition: int, model: VirtioBackend):
        super().__init__(sock, model.features, queues=len(model.queue_sizes))
        self.name = name
        self.partition = partition
        self.model = model
        self.transport: RingTransport | None = None
        self.calls = [0] * len(self.vrings)
        self.kicks = [0] * len(self.vrings)
        self.errors = 0
        self.last_error = ""

    def _handle(self, msg: vu.Message) -> bytes | None:
        if msg.request == vu.Request.SET_MEM_TABLE and self.transport is not None:
            raise ValueError("SET_MEM_TABLE while the rings are running")
        if msg.request in (vu.Request.GET_VRING_BASE, vu.Request.RESET_OWNER):
            self.stop()
        return super()._handle(msg)

    def stop(self) -> None:
        """Quiesce the model; record where each ring stopped."""
        transport = self.transport
        if transport is None:
            return
        if not self.model.quiesce(STOP_TIMEOUT_S):
            log(ERROR, "%s: a request outlived the rings' stop", self.name)
        transport.stop()
        self.errors += transport.errors
        self.last_error = transport.last_error or self.last_error
        for vring, queue in zip(self.vrings, transport.queues, strict=True):
            vring.base = queue.next_avail
            queue.disable()
        self.transport = None

    def sync(self) -> None:
        """Start the model once every ring runs; stop it when one no longer does."""
        wanted = all(v.started and v.enabled and v.addr is not None for v in self.vrings)
        if self.transport is not None and not wanted:
            self.stop()
        elif self.transport is None and wanted:
            self._start()

    def _start(self) -> None:
        memory = TableMemory(self)
        queues = []
        for index, vring in enumerate(self.vrings):
            queue = Virtqueue(memory, index, vring.num)  # type: ignore[arg-type]
            assert vring.addr is not None
            try:
                queue.size = vring.num
                queue.desc_addr = memory.to_gpa(vring.addr.desc)
                queue.driver_addr = memory.to_gpa(vring.addr.avail)
                queue.device_addr = memory.to_gpa(vring.addr.used)
            except ValueError as exc:
                self._note_error(str(exc))
                return
            queue.indirect = bool(self.features & VIRTIO_F_INDIRECT_DESC)
            if error := queue.enable():
                self._note_error(f"ring {index} refused: {error}")
                return
            used_idx = int.from_bytes(memory.view(queue.device_addr + 2, 2), "little")
            queue.start_at(vring.base, used_idx)
            queues.append(queue)
        calls = [v.call for v in self.vrings]
        kicks = [v.kick for v in self.vrings]
        errs = [v.err for v in self.vrings]
        self.transport = RingTransport(queues, calls, self.calls, kicks, self.kicks, errs)
        self.model.activate(self.transport)  # type: ignore[arg-type]

    def _note_error(self, message: str) -> None:
        log(ERROR, "%s: %s", self.name, message)
        self.errors += 1
        self.last_error = message

    def kick(self, index: int) -> None:
        self.kicks[index] += 1
        if self.transport is not None:
            self.model.notify(index)

    def status(self) -> dict[str, object]:
        transport = self.transport
        running = transport is not None
        return {
            "partition": self.partition,
            "active": running,
            "rings": [
                {"running": running and v.started, "calls": c, "kicks": k}
                for v, c, k in zip(self.vrings, self.calls, self.kicks, strict=True)
            ],
            "errors": self.errors + (transport.errors if transport else 0),
            "last_error": (transport.last_error if transport else "") or self.last_error or None,
            "refused": self.refused,
        }

    def close(self) -> None:
        self.stop()
        self.reset()
        self.sock.close()
