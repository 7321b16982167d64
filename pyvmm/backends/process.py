"""The VMM's side of device back-ends in their own processes (vhost-user).

``BackendProcess`` starts a back-end (``python -m pyvmm.backends.<device>``), connects
to its socket and watches it through a pidfd: a death is noticed at once (well within
1 s) and reported to the device. ``ProcessBlk`` is a ``VirtioBackend`` for the
virtio-mmio transport that configures the back-end instead of serving the queue:

- guest RAM goes over once, as the memfd of the device's DMA window (its instance's
  partition), so the back-end can reach nothing else;
- on DRIVER_OK each ready queue is sent as SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE;
  the kick fd is the queue's ioeventfd (the machine registers ``kick_fds`` with KVM)
  and the call fd is the device's irqfd, so the VMM is not on the data path;
- QueueReady=0, reset and quiesce send GET_VRING_BASE, which stops the ring once
  the request in progress is finished;
- every exchange has the protocol's time-out (1 s), and a back-end that fails one,
  or dies, puts the device in NEEDS_RESET: a hung or dead back-end cannot stall the
  vCPU for longer than one time-out. A dead one is replaced by a new process at
  once (up to ``MAX_RESTARTS``); the driver's next reset and set-up use it.

InterruptStatus: the VMM never sees the back-end's calls, so the transport reports
the used-buffer bit always (``interrupts_bypass_vmm``), as Firecracker's vhost-user
devices do; the driver then checks its used rings on every interrupt of the line.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..devices.virtio._log import ERROR, WARNING, log
from ..devices.virtio.backend import VirtioBackend
from ..devices.virtio.blk import QUEUE_SIZE, SECTOR, VIRTIO_ID_BLOCK, blk_config
from ..memory import GuestMemory
from . import vhost_user as vu

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..devices.virtio.mmio import VirtioMmioTransport

START_TIMEOUT_S = 10.0  # interpreter start-up and imports, on a loaded machine
MAX_RESTARTS = 5  # then the device stays failed: something keeps killing it


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _spawn(command: list[str]) -> subprocess.Popen:
    """Start a back-end from one long-lived thread: PR_SET_PDEATHSIG fires when the
    *thread* that forked the child ends, and a restart runs on a watcher thread that
    ends right after it."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backend-spawner")
    return _spawner.submit(subprocess.Popen, command, stdin=subprocess.DEVNULL).result()


class BackendError(Exception):
    """A back-end process could not be started or reached."""


class BackendProcess:
    """One back-end process: started, connected to, watched; killed on ``close``."""

    def __init__(self, module: str, args: list[str], name: str) -> None:
        self.name = name
        self._dir = tempfile.mkdtemp(prefix="pyvmm-backend-")
        path = os.path.join(self._dir, f"{name}.sock")
        command = [sys.executable, "-m", module, "--socket", path, "--parent", str(os.getpid())]
        self.proc = _spawn([*command, *args])
        self.pid = self.proc.pid
        self.exit_status: int | None = None
        self.died_at: float | None = None  # monotonic time the death was noticed
        self.on_death: Callable[[str], None] | None = None
        self._closing = False
        try:
            self.sock = self._connect(path)
            self._pidfd = os.pidfd_open(self.pid)
        except BaseException:
            self.close()
            raise
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._watcher = threading.Thread(target=self._watch, name=f"{name}-watch", daemon=True)
        self._watcher.start()

    def _connect(self, path: str) -> socket.socket:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise BackendError(f"{self.name}: back-end exited with {self.proc.returncode}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            if time.monotonic() > deadline:
                raise BackendError(f"{self.name}: back-end not listening after {START_TIMEOUT_S} s")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self.exit_status is None

    def _watch(self) -> None:
        ready = select.select([self._pidfd, self._wake], [], [])[0]
        if self._pidfd not in ready:
            return  # closing
        self.exit_status = self.proc.wait()
        self.died_at = time.monotonic()
        if not self._closing:
            reason = f"back-end process {self.pid} exited with status {self.exit_status}"
            log(ERROR, "%s: %s", self.name, reason)
            if self.on_death is not None:
                self.on_death(reason)

    def describe(self) -> dict[str, object]:
        return {"pid": self.pid, "alive": self.alive, "exit_status": self.exit_status}

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if getattr(self, "sock", None) is not None:
            self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        if hasattr(self, "_wake"):
            os.eventfd_write(self._wake, 1)
            if threading.current_thread() is not self._watcher:
                self._watcher.join(2)
            os.close(self._wake)
        if hasattr(self, "_pidfd"):
            os.close(self._pidfd)
        shutil.rmtree(self._dir, ignore_errors=True)


class ProcessBlk(VirtioBackend):
    """virtio-blk served by ``pyvmm.backends.blk`` in its own process."""

    device_id = VIRTIO_ID_BLOCK
    interrupts_bypass_vmm = True  # see the module's docstring: InterruptStatus

    def __init__(
        self,
        memory: GuestMemory,
        window: tuple[int, int],
        path: str,
        name: str = "blk",
        fenced: bool = False,
        read_only: bool = False,
        timeout: float = vu.DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__()
        if memory.fd < 0:
            raise ValueError(f"{name}: guest RAM is not a memfd (Machine(shared_memory=True))")
        base, size = window
        memory.check(base, size)
        self.name = name
        self.path = path
        self.capacity = os.stat(path).st_size // SECTOR
        self.queue_sizes = (QUEUE_SIZE,)
        self.kick_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.queue_sizes]
        self.error = ""  # why the back-end is unusable, once it is
        self._host = memory.host_address
        self._running: set[int] = set()
        self.restarts = 0
        self.last_death = ""  # how the last back-end process ended, if one did
        self._args = ["--disk", path, *(["--fenced"] * fenced), *(["--read-only"] * read_only)]
        self._region = vu.MemoryRegion(base, size, self._host + base, base)
        self._memfd = memory.fd
        self._timeout = timeout
        self._closed = False
        self.process, self.front, self.features = self._spawn()

    def _spawn(self) -> tuple[BackendProcess, vu.FrontEnd, int]:
        """A back-end process, connected, owned, with the features and memory table."""
        process = BackendProcess("pyvmm.backends.blk", self._args, self.name)
        try:
            front = vu.FrontEnd(process.sock, self._timeout)
            front.set_owner()
            offered = front.get_features()
            self._protocol = bool(offered & vu.F_PROTOCOL_FEATURES)
            if self._protocol:
                front.set_protocol_features(front.get_protocol_features() & vu.PROTOCOL_F_REPLY_ACK)
            front.set_mem_table([self._region], [self._memfd])
        except vu.VhostUserError as exc:
            process.close()
            raise BackendError(f"{self.name}: {exc}") from exc
        process.on_death = self._died
        return process, front, offered & ~vu.F_PROTOCOL_FEATURES

    def config(self) -> bytes:
        return blk_config(self.capacity, self.queue_sizes[0])

    def describe(self) -> dict[str, object]:
        return {
            **self.process.describe(),
            "error": self.error or None,
            "restarts": self.restarts,
            "last_death": self.last_death or None,
        }

    # --- transport interface ---------------------------------------------------------

    def activate(self, transport: VirtioMmioTransport) -> None:
        fd = getattr(transport.interrupt, "fd", -1)
        with self._lock:
            self.transport = transport
            if fd < 0:
                self._lost("the interrupt line has no eventfd to give the back-end")
                return
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
        front.set_vring_kick(index, self.kick_fds[index])
        if self._protocol:
            front.set_vring_enable(index, True)
        self._running.add(index)

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
                if self.error:
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
            log(WARNING, "%s: the back-end did not stop its ring on reset", self.name)

    def close(self) -> None:
        self._closed = True
        self.transport = None
        if hasattr(self, "process"):
            self.process.close()
        for fd in self.kick_fds:
            os.close(fd)
        self.kick_fds = []

    # --- failures --------------------------------------------------------------------

    def _lost(self, reason: str) -> None:
        """The back-end is unusable: NEEDS_RESET for the driver. It is killed (a late
        reply would put the byte stream out of step), and so replaced (``_died``)."""
        if not self.error:
            self.error = reason
            log(ERROR, "%s: %s", self.name, reason)
        self.process.proc.kill()
        transport = self.transport
        if transport is not None:
            transport.device_error(f"back-end: {reason}")

    def _died(self, reason: str) -> None:
        """On the watcher thread: tell the driver, then start a new back-end. The
        driver must reset the device to use it (webkv treats NEEDS_RESET as fatal);
        a driver that re-initialises gets a working disk again."""
        self.error = self.last_death = reason
        transport = self.transport
        if transport is not None:
            transport.device_error(reason)
        if self._closed or self.restarts >= MAX_RESTARTS:
            return
        try:
            process, front, features = self._spawn()  # without the lock: takes ~0.5 s
        except (BackendError, OSError) as exc:
            log(ERROR, "%s: restart failed: %s", self.name, exc)
            return
        with self._lock:
            if self._closed:
                process.close()
                return
            old = self.process
            self.process, self.front, self.features = process, front, features
            self._running.clear()  # the dead one's rings are gone with it
            self.restarts += 1
            self.error = ""
        old.close()
        log(WARNING, "%s: back-end restarted (pid %d)", self.name, process.pid)
