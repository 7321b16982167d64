"""The VMM's side of the virtio-vsock back-end process (``vsock``): ``VsockProcess``,
the node's one vsock process, ``ProcessVsock``, the proxy of one partition's
front-end, and ``RemoteListener``, a host listener whose connections that process
serves. The rest of the VMM uses them as it uses ``VirtioVsock`` and
``HostListener`` (``forward``, ``address``, ``guest_port``, ``device``, ``attach``,
``detach``, ``close``), whichever back-end serves the node.

What the VMM keeps: each listener's socket. It binds and listens itself and gives the
back-end a copy, so the port stays bound whatever happens to the back-end, and a
client that arrives while no process accepts (a restart, a hand-off) waits in the
kernel's listen queue instead of being refused. It also keeps where each listener
is attached, so a new process gets every listener again, attached where it was
(``VsockProcess.restored``).

What a death costs: the streams the dead process carried (their TCP sockets were
its) and the connections parked in its listeners are lost: their clients see the
connection reset. The back-end writes how many it holds into a counters page the
VMM maps, every ``COUNTERS_PERIOD_S``; at a death the VMM adds them up
(``lost_connections``, per front-end and for the node, in ``status``). Connections
still in the listen queue are not lost: the next process takes them.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading

from ..devices.virtio._log import WARNING, log
from ..devices.virtio.forward import count_listener, listening_socket
from ..devices.virtio.vsock import QUEUE_SIZE, VIRTIO_ID_VSOCK
from ..memory import GuestMemory
from . import vhost_user as vu
from .front import VhostUserDevice
from .process import BackendError, BackendProcess
from .vsock import COUNTER, COUNTERS, COUNTERS_SIZE, MAX_PARTITIONS


class VsockProcess(BackendProcess):
    """The node's vsock back-end process, and what the VMM keeps of its state."""

    def __init__(self, name: str = "vsock") -> None:
        self.listeners: list[RemoteListener] = []  # open ones, in the order made
        self.lost_parked = 0  # parked connections lost with dead processes
        self._counters_fd = os.memfd_create("pyvmm-vsock-counters", os.MFD_CLOEXEC)
        os.ftruncate(self._counters_fd, COUNTERS_SIZE)
        self._counters = mmap.mmap(self._counters_fd, COUNTERS_SIZE)
        self._listeners_lock = threading.Lock()
        try:
            super().__init__("pyvmm.backends.vsock", [], name)
        except BaseException:
            self._counters.close()
            os.close(self._counters_fd)
            raise
        try:
            self.request("counters", [self._counters_fd])
        except BackendError:
            self.close()
            raise

    def listeners_of(self, device: ProcessVsock) -> list[RemoteListener]:
        with self._listeners_lock:
            return [listener for listener in self.listeners if listener.device is device]

    def held(self, partition: int) -> int:
        """The streams partition's front-end held at the back-end's last count."""
        if not 0 <= partition < MAX_PARTITIONS or self._counters.closed:
            return 0
        return COUNTER.unpack_from(self._counters, COUNTERS.size + partition * COUNTER.size)[0]

    def _died(self, child: object, reason: str) -> None:  # type: ignore[override]
        if child is self.child and not self._closed:
            self.lost_parked += COUNTERS.unpack_from(self._counters)[1]
        super()._died(child, reason)  # type: ignore[arg-type]

    def restored(self) -> None:
        """A new process: a fresh counters page, then every listener again, from the
        socket the VMM kept, attached where it was."""
        self._counters[:] = bytes(COUNTERS_SIZE)
        self.request("counters", [self._counters_fd])
        with self._listeners_lock:
            listeners = list(self.listeners)
        for listener in listeners:
            listener.restore()

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "lost_parked": self.lost_parked}

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        for listener in list(self.listeners):
            listener.close()
        self._counters.close()
        os.close(self._counters_fd)


class ProcessVsock(VhostUserDevice):
    """virtio-vsock of one partition, served by the node's ``VsockProcess``."""

    device_id = VIRTIO_ID_VSOCK
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(
        self,
        process: VsockProcess,
        memory: GuestMemory,
        window: tuple[int, int],
        guest_cid: int,
        name: str = "vsock",
        partition: int = 0,
        timeout: float = vu.DEFAULT_TIMEOUT_S,
        **model: float,
    ) -> None:
        """``model``: buf_alloc, connect_timeout, max_connections of the device model."""
        if not 3 <= guest_cid < 0xFFFF_FFFF:
            raise ValueError(f"guest CID {guest_cid} is reserved or out of range")
        self.guest_cid = guest_cid
        self.lost_connections = 0  # streams lost with dead back-end processes
        args = {"guest_cid": guest_cid, **model}
        super().__init__(process, memory, window, name, partition, args, timeout)
        self.vsock_process = process

    def config(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    def forward(
        self, host_addr: str, host_port: int, guest_port: int, retry_refused: float = 0.0
    ) -> RemoteListener:
        """Listen on a host TCP port and forward each connection to ``guest_port``."""
        listener = RemoteListener(
            self.vsock_process, host_addr, host_port, guest_port, retry_refused
        )
        try:
            listener.attach(self)
        except BaseException:
            listener.close()
            raise
        return listener

    # --- the back-end's account of this front-end --------------------------------------

    def counts(self) -> dict[str, object]:
        """connections, refused, dropped, redriven, packets per ring (the back-end's)."""
        reply = self.process.request("status")
        return reply["vsock"].get(self.name, {})  # type: ignore[union-attr]

    @property
    def connections(self) -> int:
        return int(self.counts().get("connections", 0))  # type: ignore[arg-type]

    @property
    def refused(self) -> int:
        return int(self.counts().get("refused", 0))  # type: ignore[arg-type]

    @property
    def dropped(self) -> int:
        return int(self.counts().get("dropped", 0))  # type: ignore[arg-type]

    def describe(self) -> dict[str, object]:
        """The process's state, streams lost with dead ones, and the live process's
        account of this front-end: connections, parked, packets and calls per ring."""
        described = {**super().describe(), "lost_connections": self.lost_connections}
        if self.error or not self.process.alive:
            return described
        try:
            status = self.process.status()
        except BackendError:
            return described  # dead or hung meanwhile: ``error`` says so next time
        counts = status["vsock"].get(self.name, {})  # type: ignore[union-attr]
        rings = status["devices"].get(self.name, {}).get("rings", [])  # type: ignore[union-attr]
        listeners = status["listeners"].values()  # type: ignore[union-attr]
        described.update(
            connections=counts.get("connections"),
            parked=sum(n["parked"] for n in listeners if n["device"] == self.name),
            packets=counts.get("packets"),
            calls=[ring["calls"] for ring in rings],
        )
        return described

    # --- transport interface ---------------------------------------------------------

    def _streams(self, op: str, wait: float, **fields: object) -> bool:
        """Tell the back-end what becomes of the streams before the rings stop."""
        if self.error or not self.process.alive:
            return True  # a dead process's streams are gone already
        try:
            self.process.request(op, timeout=wait, device=self.name, **fields)
        except BackendError as exc:
            log(WARNING, "%s: %s", self.name, exc)
            return False
        return True

    def reset(self) -> None:
        """The driver reset the device: its streams are reset, connections it never
        answered wait in their listeners."""
        self._streams("reset", vu.DEFAULT_TIMEOUT_S)
        # the rings stop as VhostUserDevice.reset stops them, but not through
        # self.quiesce, which would hand the streams and listeners back
        if not VhostUserDevice.quiesce(self, vu.DEFAULT_TIMEOUT_S):
            log(WARNING, "%s: the back-end did not stop its rings on reset", self.name)

    def quiesce(self, timeout: float) -> bool:
        """The guest is gone: listeners detached, every stream back to its listener
        (``VirtioVsock.quiesce``, in the back-end), then the rings stopped."""
        for listener in self.vsock_process.listeners_of(self):
            listener.detach(self)
        handed = self._streams("quiesce", max(timeout, 0.001) + 0.5, within=timeout)
        return super().quiesce(timeout) and handed

    def close(self) -> None:
        for listener in self.vsock_process.listeners_of(self):
            listener.detach(self)
        super().close()

    def backend_died(self, reason: str) -> None:
        lost = self.vsock_process.held(self.partition)
        if lost:
            self.lost_connections += lost
            log(WARNING, "%s: %d connection(s) lost with the back-end process", self.name, lost)
        super().backend_died(reason)


class RemoteListener:
    """A host TCP port forwarded to ``guest_port`` by the vsock back-end process."""

    def __init__(
        self,
        process: VsockProcess,
        host_addr: str,
        host_port: int,
        guest_port: int,
        retry_refused: float = 0.0,
    ) -> None:
        self.process = process
        self.guest_port = guest_port
        self.retry_refused = retry_refused
        self.sock = listening_socket(host_addr, host_port)
        self.device: ProcessVsock | None = None
        self.ident = 0  # the back-end's name for it, in process ``_child``
        self._child: object | None = None
        self._lock = threading.Lock()  # serialises attach/detach/restore
        self._closed = False
        try:
            self._forward()
        except BaseException:
            self.sock.close()
            raise
        with process._listeners_lock:
            process.listeners.append(self)
        count_listener(+1)

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def _forward(self) -> None:
        reply = self.process.request(
            "forward",
            [self.sock.fileno()],
            guest_port=self.guest_port,
            retry_refused=self.retry_refused,
        )
        self.ident = int(reply["listener"])  # type: ignore[arg-type]
        self._child = self.process.child

    def _request(self, op: str, **fields: object) -> None:
        """An op on this listener in the back-end. Skipped while a new process has not
        been given it yet (``restore`` will, with the device as it then is)."""
        if self._child is self.process.child:
            self.process.request(op, listener=self.ident, **fields)

    def attach(self, device: ProcessVsock) -> None:
        """Forward to ``device`` from now on (from wherever it was). If the back-end
        is dead, the attachment is kept and made by the next process."""
        if device.vsock_process is not self.process:
            raise ValueError(f"{device.name} is served by another back-end process")
        with self._lock:
            if self._closed:
                raise ValueError("the listener is closed")
            previous, self.device = self.device, device
            try:
                self._request("attach", device=device.name)
            except BackendError:
                if self.process.alive and not self.process.error:
                    self.device = previous  # refused by a live process: nothing moved
                    raise
                log(WARNING, "listener %s: attached when the back-end is back", self.address)

    def detach(self, device: ProcessVsock | None = None) -> None:
        """Stop forwarding (only from ``device``, if given); connections that arrive
        from now on wait."""
        with self._lock:
            if self.device is None or device not in (None, self.device):
                return
            self.device = None  # a dead process forwards nothing; its successor is told
            try:
                self._request("detach")
            except BackendError as exc:
                log(WARNING, "listener %s: %s", self.address, exc)

    def restore(self) -> None:
        """In a new back-end process: forwarded again, attached where it was."""
        with self._lock:
            if self._closed:
                return
            self._forward()
            if self.device is not None:
                self.process.request("attach", listener=self.ident, device=self.device.name)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.device = None
            if self.process.alive and not self.process._closed:
                try:
                    self._request("close")
                except BackendError as exc:
                    log(WARNING, "listener %s: %s", self.address, exc)
            with self.process._listeners_lock:
                if self in self.process.listeners:
                    self.process.listeners.remove(self)
            count_listener(-1)
            self.sock.close()

    def status(self) -> dict[str, object]:
        """The back-end's account: address, guest_port, device, parked."""
        listeners = self.process.request("status")["listeners"]
        return listeners.get(str(self.ident), {})  # type: ignore[union-attr]
