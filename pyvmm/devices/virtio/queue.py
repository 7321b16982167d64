"""Split virtqueues (virtio 1.x §2.7), device side.

Nothing read from the rings is trusted. Ring addresses are validated once when the
driver makes the queue ready; every descriptor is read once (so a guest rewriting it
concurrently cannot change what was checked) and bounds-checked against guest RAM
before a window onto it is handed out.

Errors come in two kinds. ``ChainError``: one chain is malformed but the ring itself
is sound, so the head can be returned with length 0 and the queue goes on.
``RingError``: the ring is unusable (an avail index running ahead by more than the
queue size, a head index out of range): the device must stop and set NEEDS_RESET.

Memory ordering: the guest runs on other CPUs. On x86 (TSO) loads are not reordered
with loads and stores not with stores, and CPython performs memoryview accesses in
program order, so reading avail.idx before the entries it covers, and writing a used
entry before used.idx, need no barrier. A store followed by a load of another
location can be reordered, so the one place that needs it (used.idx, then
avail.flags) takes a full fence.
"""

from __future__ import annotations

import struct
import threading

from ...errors import MemoryAccessError
from ...memory import GuestMemory
from ._log import DEBUG, WARNING, log

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768  # the split-ring limit
MAX_CHAIN_BYTES = 64 << 20  # larger than any sane request; bounds host work per chain
DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_LOGGED_ERRORS = 20  # per queue, so a hostile guest cannot flood the log

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier: taking a lock executes a locked read-modify-write."""
    with _fence_lock:
        pass


class ChainError(Exception):
    """A malformed descriptor chain: drop the request, keep the queue."""

    def __init__(self, head: int, message: str) -> None:
        super().__init__(message)
        self.head = head


class RingError(Exception):
    """The ring itself is broken: the device needs a reset."""


class Chain:
    """A descriptor chain as windows onto guest RAM (no copies): the device reads
    ``readable`` and writes ``writable``, both in chain order."""

    __slots__ = ("generation", "head", "readable", "readable_len", "writable", "writable_len")

    def __init__(self, head: int, generation: int = 0) -> None:
        self.head = head
        self.generation = generation  # the queue's generation when it was taken
        self.readable: list[memoryview] = []
        self.writable: list[memoryview] = []
        self.readable_len = 0
        self.writable_len = 0


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor table, driver area, device area) for a queue size."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


class Virtqueue:
    """One split virtqueue. The transport writes the configuration fields; the
    backend calls ``pop``/``push`` (under its own lock, from one thread at a time)."""

    def __init__(self, memory: GuestMemory, index: int, max_size: int) -> None:
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.indirect = False  # VIRTIO_F_INDIRECT_DESC negotiated
        # The guest-physical range the device may touch: the owner's partition, so
        # one instance cannot aim a device at another instance's memory.
        self.dma_base = 0
        self.dma_end = memory.size
        self.errors = 0
        # Bumped whenever the rings go away (reset, QueueReady=0) or are set up anew,
        # so a chain taken before cannot be completed into the next driver's ring.
        self.generation = 0
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.generation += 1
            self.size = self.max_size
            self.desc_addr = 0
            self.driver_addr = 0
            self.device_addr = 0
            self.ready = False
            self._last_avail = 0
            self._used_idx = 0
            self._desc: memoryview | None = None
            self._avail: memoryview | None = None
            self._used: memoryview | None = None
            self._used_idx_word: memoryview | None = None

    # --- configuration (transport) ---------------------------------------------------

    def check_config(self) -> str | None:
        """Why the current configuration cannot be made ready, or None."""
        size = self.size
        if size <= 0 or size > self.max_size or size & (size - 1):
            return f"queue size {size} is not a power of two in [1, {self.max_size}]"
        desc, avail, used = ring_sizes(size)
        areas = (
            ("descriptor table", self.desc_addr, desc, 16),
            ("driver area", self.driver_addr, avail, 2),
            ("device area", self.device_addr, used, 4),
        )
        for name, addr, length, align in areas:
            if addr % align:
                return f"{name} at {addr:#x} is not {align}-byte aligned"
            try:
                self._check(addr, length)
            except MemoryAccessError as exc:
                return f"{name}: {exc}"
        return None

    def enable(self) -> str | None:
        """Make the queue ready; returns an error message instead if it cannot be."""
        error = self.check_config()
        if error is not None:
            return error
        desc, avail, used = ring_sizes(self.size)
        with self._lock:
            self._desc = self.memory.view(self.desc_addr, desc)
            self._avail = self.memory.view(self.driver_addr, avail)
            self._used = self.memory.view(self.device_addr, used)
            # used.idx as a u16 element: one 16-bit store. struct.pack_into clears the
            # bytes before writing them, and a polling driver can read that 0.
            self._used_idx_word = self._used[:4].cast("H")
            self._last_avail = 0
            self._used_idx = 0
            self.generation += 1
            self.ready = True
        return None

    def start_at(self, next_avail: int, used_idx: int) -> None:
        """Continue a ring another device instance served (a vhost-user back-end told
        SET_VRING_BASE): the next available entry to take and used.idx as it stands."""
        with self._lock:
            self._last_avail = next_avail & 0xFFFF
            self._used_idx = used_idx & 0xFFFF

    @property
    def next_avail(self) -> int:
        """The next available entry the device would take (GET_VRING_BASE)."""
        return self._last_avail

    def disable(self) -> None:
        with self._lock:
            self.generation += 1
            self.ready = False
            self._desc = self._avail = self._used = self._used_idx_word = None

    # --- device side -----------------------------------------------------------------

    def pop(self) -> Chain | None:
        """The next available chain, or None. Raises ChainError or RingError."""
        with self._lock:
            avail = self._avail
            if avail is None:
                return None
            avail_idx = _U16.unpack_from(avail, 2)[0]
            pending = (avail_idx - self._last_avail) & 0xFFFF
            if pending == 0:
                return None
            if pending > self.size:
                raise RingError(
                    f"queue {self.index}: avail index {avail_idx} is {pending} entries ahead "
                    f"of {self._last_avail}, more than the queue size {self.size}"
                )
            slot = self._last_avail % self.size
            head = _U16.unpack_from(avail, 4 + 2 * slot)[0]
            self._last_avail = (self._last_avail + 1) & 0xFFFF
            if head >= self.size:
                raise RingError(f"queue {self.index}: head index {head} >= size {self.size}")
            return self._walk(head, self.generation)

    def push(self, head: int, length: int, generation: int | None = None) -> None:
        """Return a chain to the driver; ``length`` is the number of bytes written.
        With the chain's ``generation``, a chain from rings since torn down is dropped."""
        with self._lock:
            used = self._used
            if used is None or generation not in (None, self.generation):
                return  # queue disabled or reset meanwhile: the driver no longer wants it
            slot = self._used_idx % self.size
            _USED_ELEM.pack_into(used, 4 + 8 * slot, head, length)
            self._used_idx = (self._used_idx + 1) & 0xFFFF
            self._used_idx_word[1] = self._used_idx  # after the entry (TSO keeps the order)

    def wants_interrupt(self) -> bool:
        """Whether the driver asked to be interrupted (VIRTQ_AVAIL_F_NO_INTERRUPT clear)."""
        full_fence()  # our used.idx store must be visible before we read the flag
        avail = self._avail
        if avail is None:
            return False
        return not _U16.unpack_from(avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def notifications(self, on: bool) -> bool:
        """Ask the driver to notify (kick) when it adds buffers, or not to
        (VIRTQ_USED_F_NO_NOTIFY, a hint: a device polling the ring meanwhile saves the
        driver its kicks). Turning them back on returns whether buffers were added
        since the last ``pop``: those may have come without a kick."""
        with self._lock:
            word = self._used_idx_word  # used.flags is its first u16
            if word is None:
                return False
            word[0] = 0 if on else VIRTQ_USED_F_NO_NOTIFY
            if not on:
                return False
            full_fence()  # the flag visible before we read avail.idx (the driver: the reverse)
            return _U16.unpack_from(self._avail, 2)[0] != self._last_avail

    def note_error(self, message: str) -> None:
        self.errors += 1
        level = WARNING if self.errors <= _LOGGED_ERRORS else DEBUG
        log(level, "virtqueue %d: %s", self.index, message)

    # --- chain walking ---------------------------------------------------------------

    def _walk(self, head: int, generation: int) -> Chain:
        first = _DESC.unpack_from(self._desc, DESC_SIZE * head)
        addr, length, flags, _ = first
        if flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT):
            return self._walk_chain(head, generation, first)
        # The usual chain, one descriptor: the same checks as the loop's, without it.
        if length > MAX_CHAIN_BYTES:
            raise ChainError(head, f"chain from {head} exceeds {MAX_CHAIN_BYTES} bytes")
        window = self._window(head, addr, length)
        chain = Chain(head, generation)
        if flags & VIRTQ_DESC_F_WRITE:
            chain.writable.append(window)
            chain.writable_len = length
        else:
            chain.readable.append(window)
            chain.readable_len = length
        return chain

    def _walk_chain(self, head: int, generation: int, desc: tuple[int, int, int, int]) -> Chain:
        """A chain of several descriptors, or an indirect one; ``desc`` is the head's
        descriptor as read (each is read once)."""
        chain = Chain(head, generation)
        table = self._desc
        assert table is not None
        table_len = self.size
        in_indirect = False
        budget = self.max_size  # descriptors in the whole chain, indirect ones included
        total = 0
        while True:
            budget -= 1
            if budget < 0:
                raise ChainError(head, f"chain from {head} is longer than {self.max_size}")
            addr, length, flags, nxt = desc
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError(head, "indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if in_indirect or flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(head, "nested or chained indirect descriptor")
                if length == 0 or length % DESC_SIZE:
                    raise ChainError(head, f"indirect table length {length} is not n x 16")
                table = self._window(head, addr, length)
                table_len = length // DESC_SIZE
                in_indirect = True
                desc = _DESC.unpack_from(table, 0)
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                raise ChainError(head, f"chain from {head} exceeds {MAX_CHAIN_BYTES} bytes")
            window = self._window(head, addr, length)
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.append(window)
                chain.writable_len += length
            elif chain.writable:
                raise ChainError(head, "readable descriptor after a writable one")
            else:
                chain.readable.append(window)
                chain.readable_len += length
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= table_len:
                raise ChainError(head, f"next index {nxt} out of range {table_len}")
            desc = _DESC.unpack_from(table, DESC_SIZE * nxt)

    def _check(self, addr: int, length: int) -> None:
        if addr < self.dma_base or addr + length > self.dma_end:
            raise MemoryAccessError(
                f"guest-physical range {addr:#x}+{length:#x} is outside the device's "
                f"DMA window [{self.dma_base:#x}, {self.dma_end:#x})"
            )
        self.memory.check(addr, length)

    def _window(self, head: int, addr: int, length: int) -> memoryview:
        if addr < self.dma_base or addr + length > self.dma_end:
            raise ChainError(
                head,
                f"guest-physical range {addr:#x}+{length:#x} is outside the device's "
                f"DMA window [{self.dma_base:#x}, {self.dma_end:#x})",
            )
        try:
            return self.memory.view(addr, length)  # which checks it against guest RAM
        except (MemoryAccessError, ValueError) as exc:
            raise ChainError(head, str(exc)) from None


# --- helpers over lists of windows -----------------------------------------------------


def gather(views: list[memoryview], length: int, offset: int = 0) -> bytes:
    """Copy up to ``length`` bytes starting ``offset`` bytes into the windows."""
    out = bytearray()
    for view in views:
        if offset >= len(view):
            offset -= len(view)
            continue
        take = view[offset : offset + length - len(out)]
        out += take
        offset = 0
        if len(out) >= length:
            break
    return bytes(out)


def scatter(views: list[memoryview], data: bytes | bytearray | memoryview, offset: int = 0) -> int:
    """Copy ``data`` into the windows from ``offset``; returns the bytes written."""
    src = memoryview(data)
    done = 0
    for view in views:
        if offset >= len(view):
            offset -= len(view)
            continue
        n = min(len(view) - offset, len(src) - done)
        view[offset : offset + n] = src[done : done + n]
        done += n
        offset = 0
        if done >= len(src):
            break
    return done


def slice_views(views: list[memoryview], start: int, end: int) -> list[memoryview]:
    """The windows covering bytes [start, end) of the concatenation (still no copy)."""
    out = []
    pos = 0
    for view in views:
        lo, hi = max(start - pos, 0), min(end - pos, len(view))
        if lo < hi:
            out.append(view[lo:hi])
        pos += len(view)
        if pos >= end:
            break
    return out
