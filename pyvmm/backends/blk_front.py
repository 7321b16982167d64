"""The VMM's side of the virtio-blk back-end process (``blk``): ``BlkProcess``, the
one process of a disk, which also stands for its write lease (``holder``, ``grant``,
as ``devices.virtio.blk.WriteLease`` does in-process), and ``ProcessBlk``, the proxy
of one partition's front-end."""

from __future__ import annotations

import os

from ..devices.virtio._log import WARNING, log
from ..devices.virtio.blk import QUEUE_SIZE, SECTOR, VIRTIO_ID_BLOCK, blk_config
from ..memory import GuestMemory
from . import vhost_user as vu
from .front import VhostUserDevice
from .process import BackendError, BackendProcess

LEASE_DEATH_WAIT_S = 1.0  # a lease move that failed: how long to wait for the old process's end


class BlkProcess(BackendProcess):
    """The back-end process of one disk image."""

    def __init__(
        self, path: str, read_only: bool = False, name: str = "blk", journal: str | None = None
    ) -> None:
        """``journal``: a file the process records every write and flush in."""
        if not os.path.isfile(path):
            raise BackendError(f"{path}: not a file")
        self.path = path
        self.capacity = os.stat(path).st_size // SECTOR
        self.holder: ProcessBlk | None = None  # the front-end that may write
        args = ["--disk", path, *["--read-only"] * read_only]
        args += ["--journal", journal] if journal else []
        super().__init__("pyvmm.backends.blk", args, name)

    def grant(self, front: ProcessBlk | None) -> None:
        """Move the write lease to ``front`` (None: nobody writes); returns once the
        previous holder can write no more. If the process cannot answer, it is killed:
        once it is dead its writes are over, and its successor is given the lease."""
        self.holder = front
        try:
            self.request("lease", holder=None if front is None else front.name)
        except BackendError as exc:
            child = self.child
            self.fail(str(exc))
            if not child.wait_dead(LEASE_DEATH_WAIT_S):
                raise
            log(WARNING, "%s: lease moved by the back-end's death: %s", self.name, exc)

    def restored(self) -> None:
        if self.holder is not None:
            self.grant(self.holder)


class ProcessBlk(VhostUserDevice):
    """virtio-blk of one partition, served by the disk's ``BlkProcess``."""

    device_id = VIRTIO_ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)

    def __init__(
        self,
        process: BlkProcess,
        memory: GuestMemory,
        window: tuple[int, int],
        name: str = "blk",
        partition: int = 0,
        timeout: float = vu.DEFAULT_TIMEOUT_S,
    ) -> None:
        self.capacity = process.capacity
        self._fail_io = False
        super().__init__(process, memory, window, name, partition, timeout=timeout)

    def config(self) -> bytes:
        return blk_config(self.capacity, self.queue_sizes[0])

    @property
    def fail_io(self) -> bool:
        """Fault injection (the upgrade's disk-eio), as ``VirtioBlk.fail_io``: every
        I/O of this front-end fails while set. Setting it asks the process."""
        return self._fail_io

    @fail_io.setter
    def fail_io(self, on: bool) -> None:
        self.process.request("fault", fail_io={self.name: on})
        self._fail_io = on
