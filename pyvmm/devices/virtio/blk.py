"""virtio-blk backed by a host file (virtio 1.x §5.2).

Threading: one worker thread per device, started on the first DRIVER_OK. A kick
(``notify``) only sets an Event; the worker pops and serves requests one at a time,
each under the device lock, so ``reset``, ``quiesce`` and QueueReady=0 wait for at
most the request in progress and afterwards nothing touches guest memory. Data moves
between the file and guest RAM with preadv/pwritev straight into the descriptor
windows (no copies), so a request in progress cannot be abandoned: the wait for it
is bounded (``quiesce`` says whether it ended), and a request that outlives it takes
no other after it and is not completed into rings set up since (queue generation).

Every request either completes with a status byte (OK, IOERR for I/O errors and
requests outside the disk, UNSUPP for unknown types) or, when it has nowhere to put a
status byte, is returned to the driver with length 0 and logged.

Shared disks: several devices (one per OS instance) can front one image file under a
``WriteLease``, like a cluster's shared disk with fencing. Every front-end may read;
only the lease holder may write, and a write by any other fails with IOERR. Moving
the lease waits for a write in progress, so after ``grant`` returns the old holder
can change nothing.
"""

from __future__ import annotations

import os
import struct
import threading

from ._log import ERROR, WARNING, log
from .backend import VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VirtioBackend
from .queue import Chain, gather, scatter, slice_views

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .blk_journal import WriteJournal
    from .mmio import VirtioMmioTransport

VIRTIO_ID_BLOCK = 2
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR = 512
ID_BYTES = 20
QUEUE_SIZE = 256
_HEADER = struct.Struct("<IIQ")
_IOV_MAX = 1024
RESET_TIMEOUT_S = 5.0  # how long a driver's reset waits for the request in progress


def blk_features(read_only: bool) -> int:
    """The feature bits a disk offers (the in-process device and the back-end process)."""
    return (
        VIRTIO_F_VERSION_1
        | VIRTIO_F_INDIRECT_DESC
        | VIRTIO_BLK_F_FLUSH
        | VIRTIO_BLK_F_SEG_MAX
        | (VIRTIO_BLK_F_RO if read_only else 0)
    )


def blk_config(capacity: int, queue_size: int) -> bytes:
    """The configuration space: capacity, size_max (not offered), seg_max (two
    descriptors are header and status)."""
    return struct.pack("<QII", capacity, 0, queue_size - 2) + bytes(16)


class WriteLease:
    """Which front-end of a shared image may write it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held by a write in progress
        self.holder: VirtioBlk | None = None

    def grant(self, device: VirtioBlk | None) -> None:
        with self.lock:
            self.holder = device


class VirtioBlk(VirtioBackend):
    device_id = VIRTIO_ID_BLOCK

    def __init__(
        self,
        path: str,
        read_only: bool = False,
        serial: str | None = None,
        queue_size: int = QUEUE_SIZE,
        lease: WriteLease | None = None,
        journal: WriteJournal | None = None,
    ) -> None:
        super().__init__()
        self.journal = journal  # records writes and flushes (power-cut checks)
        self.path = path
        self.read_only = read_only
        self.lease = lease
        self._fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        self.capacity = os.fstat(self._fd).st_size // SECTOR  # a partial last sector is unused
        name = serial if serial is not None else os.path.basename(path)
        self.serial = name.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
        self.queue_sizes = (queue_size,)
        self.features = blk_features(read_only)
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._resetting = False  # a reset waits for the lock: take no new request
        # Fault injection (tests): every read, write and flush fails with IOERR.
        self.fail_io = False
        self.requests = 0

    def config(self) -> bytes:
        return blk_config(self.capacity, self.queue_sizes[0])

    # --- transport interface ---------------------------------------------------------

    def activate(self, transport: VirtioMmioTransport) -> None:
        with self._lock:
            self.transport = transport
            self._resetting = False  # a quiesce that timed out is over
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="virtio-blk", daemon=True)
            self._thread.start()
        self._kick.set()  # serve anything queued before DRIVER_OK

    def notify(self, queue: int) -> None:
        self._kick.set()

    def reset(self) -> None:
        if not self.quiesce(RESET_TIMEOUT_S):
            log(
                WARNING,
                "virtio-blk %s: a request outlived a reset by %.0f s",
                self.path,
                RESET_TIMEOUT_S,
            )

    def quiesce(self, timeout: float) -> bool:
        # Locks are not fair: without the flag a busy worker could retake the lock
        # for request after request while we wait. It stays set if the wait times
        # out, so the worker takes nothing after the request in progress.
        self._resetting = True
        if not self._lock.acquire(timeout=timeout):
            return False
        try:
            self.transport = None
            self._resetting = False
        finally:
            self._lock.release()
        return True

    def close(self) -> None:
        self.reset()
        self._closed = True
        self._kick.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # --- worker ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            self._kick.wait()
            self._kick.clear()
            try:
                self._serve()
            except Exception as exc:  # a bug must not kill the worker silently
                log(ERROR, "virtio-blk: worker error: %r", exc)
                with self._lock:
                    self.fail(f"internal error: {exc!r}")

    def _serve(self) -> None:
        served = 0
        while True:
            with self._lock:
                transport = self.transport
                if transport is None or self._resetting:
                    return
                queue = transport.queues[0]
                chain = self.pop(queue)
                if chain is None:
                    if served % 16:
                        transport.used(0)
                    return
                queue.push(chain.head, self._handle(chain), chain.generation)
                served += 1
                if served % 16 == 0:
                    transport.used(0)  # let the driver start on completions early

    def _handle(self, chain: Chain) -> int:
        """Serve one request; returns the used length. The status byte is the last
        writable byte, so that is the whole writable part whatever the outcome."""
        self.requests += 1
        if chain.writable_len < 1:
            self.transport.queues[0].note_error("blk request without a status byte")
            return 0
        data_len = chain.writable_len - 1
        status_view = slice_views(chain.writable, data_len, data_len + 1)[0]
        header = gather(chain.readable, _HEADER.size)
        if len(header) < _HEADER.size:
            status_view[0] = VIRTIO_BLK_S_IOERR
            return chain.writable_len
        kind, _, sector = _HEADER.unpack(header)
        if kind == VIRTIO_BLK_T_IN:
            views = slice_views(chain.writable, 0, data_len)
            status = self._transfer(sector, data_len, views, write=False)
        elif kind == VIRTIO_BLK_T_OUT:
            views = slice_views(chain.readable, _HEADER.size, chain.readable_len)
            length = chain.readable_len - _HEADER.size
            status = self._transfer(sector, length, views, write=True)
        elif kind == VIRTIO_BLK_T_FLUSH:
            status = self._flush()
        elif kind == VIRTIO_BLK_T_GET_ID:
            scatter(slice_views(chain.writable, 0, data_len), self.serial)
            status = VIRTIO_BLK_S_OK
        else:
            status = VIRTIO_BLK_S_UNSUPP
        status_view[0] = status
        return chain.writable_len

    def _transfer(self, sector: int, length: int, views: list[memoryview], write: bool) -> int:
        if length % SECTOR or sector + length // SECTOR > self.capacity or self.fail_io:
            return VIRTIO_BLK_S_IOERR
        if write and self.read_only:
            return VIRTIO_BLK_S_IOERR
        if write and self.lease is not None:
            with self.lease.lock:
                if self.lease.holder is not self:
                    return VIRTIO_BLK_S_IOERR  # fenced: another instance owns the disk
                return self._io(sector, views, write)
        return self._io(sector, views, write)

    def _io(self, sector: int, views: list[memoryview], write: bool) -> int:
        offset = sector * SECTOR
        io = os.pwritev if write else os.preadv
        recorded = b"".join(views) if write and self.journal is not None else None
        try:
            while views:
                done = io(self._fd, views[:_IOV_MAX], offset)
                if done <= 0:
                    return VIRTIO_BLK_S_IOERR  # the file shrank under us
                offset += done
                views = _advance(views, done)
        except OSError as exc:
            log(ERROR, "virtio-blk %s: I/O error at sector %d: %s", self.path, sector, exc)
            return VIRTIO_BLK_S_IOERR
        if recorded is not None:
            self.journal.write(sector * SECTOR, recorded)
        return VIRTIO_BLK_S_OK

    def _flush(self) -> int:
        if self.fail_io:
            return VIRTIO_BLK_S_IOERR
        covers = None if self.journal is None else self.journal.flush_issued()
        try:
            os.fsync(self._fd)
        except OSError as exc:
            log(ERROR, "virtio-blk %s: flush failed: %s", self.path, exc)
            return VIRTIO_BLK_S_IOERR
        if covers is not None:
            self.journal.flushed(covers)
        return VIRTIO_BLK_S_OK


def _advance(views: list[memoryview], done: int) -> list[memoryview]:
    """The windows left after ``done`` bytes were transferred (partial I/O)."""
    index = 0
    while index < len(views) and done >= len(views[index]):
        done -= len(views[index])
        index += 1
    rest = views[index:]
    if rest and done:
        rest[0] = rest[0][done:]
    return rest
