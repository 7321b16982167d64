"""The virtio-mmio transport, version 2 ("modern", virtio 1.x §4.2).

One transport is one 4 KiB MMIO window with one device behind it. Register accesses
come from the vCPU thread through the MMIO bus; ``notify`` may come from any thread
(the machine's ioeventfd poller for QueueNotify, so a kick costs no vCPU exit);
backends raise interrupts from their worker threads.

Wiring (machine side)::

    transport = VirtioMmioTransport(memory, VirtioBlk("disk.img"), irq)
    mmio_bus.register(base, MMIO_WINDOW, transport)

``irq.trigger()`` should write the eventfd of an irqfd on the device's GSI; it is
called once per event (edge), with the cause in InterruptStatus. Kicks either reach
the bus as QueueNotify writes, or the machine registers one ioeventfd per queue at
``base + QUEUE_NOTIFY`` (4 bytes, datamatch = queue index) and its poller thread
calls ``transport.notify(index)``.

Locks: ``_lock`` serialises register state (vCPU side) and is held while the backend
is activated or reset. ``_irq_lock`` guards InterruptStatus and NEEDS_RESET and is a
leaf: backends take it (through ``used``/``device_error``) while holding their own lock.
"""

from __future__ import annotations

import struct
import threading

from ...memory import GuestMemory
from ..bus import Device
from ._log import DEBUG, ERROR, WARNING, log
from .backend import VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VirtioBackend
from .queue import Virtqueue

MMIO_WINDOW = 0x1000
MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x4D565950  # "PYVM"

MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

INT_USED_BUFFER = 0x1
INT_CONFIG_CHANGE = 0x2

QUEUE_STOP_TIMEOUT_S = 5.0  # how long QueueReady=0 waits for a chain in use

_U32 = struct.Struct("<I")
# QueueDesc/Driver/Device Low/High: (attribute, shift)
_ADDRESS_REGS = {
    QUEUE_DESC_LOW: ("desc_addr", 0),
    QUEUE_DESC_HIGH: ("desc_addr", 32),
    QUEUE_DRIVER_LOW: ("driver_addr", 0),
    QUEUE_DRIVER_HIGH: ("driver_addr", 32),
    QUEUE_DEVICE_LOW: ("device_addr", 0),
    QUEUE_DEVICE_HIGH: ("device_addr", 32),
}


class InterruptLine:
    """The device's interrupt output (any object with ``trigger()``). The machine
    wires it to an irqfd: each trigger is one edge, sent for every new event."""

    def trigger(self) -> None:
        raise NotImplementedError


class VirtioMmioTransport(Device):
    def __init__(
        self,
        memory: GuestMemory,
        backend: VirtioBackend,
        interrupt: InterruptLine,
        name: str = "virtio",
    ) -> None:
        if not backend.features & VIRTIO_F_VERSION_1:
            raise ValueError(f"{name}: a modern device must offer VIRTIO_F_VERSION_1")
        self.memory = memory
        self.backend = backend
        self.interrupt = interrupt
        self.name = name
        self.device_features = backend.features
        self.queues = [Virtqueue(memory, i, n) for i, n in enumerate(backend.queue_sizes)]
        self._lock = threading.Lock()
        self._irq_lock = threading.Lock()
        self.config_generation = 0
        self.interrupts = 0  # triggers sent, for tests and statistics
        self._bypass = bool(getattr(backend, "interrupts_bypass_vmm", False))
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.driver_features = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._queue_sel = 0
        self._active = False
        with self._irq_lock:
            self.interrupt_status = 0
            self.needs_reset = False

    # --- backend side (any thread) ---------------------------------------------------

    def used(self, queue: int) -> None:
        """Buffers were returned on ``queue``: interrupt unless the driver opted out."""
        if not self.queues[queue].wants_interrupt():
            return
        with self._irq_lock:
            self.interrupt_status |= INT_USED_BUFFER
            self.interrupts += 1
        self.interrupt.trigger()

    def config_changed(self) -> None:
        with self._irq_lock:
            self.config_generation += 1
            if not self.status & STATUS_DRIVER_OK:
                return
            self.interrupt_status |= INT_CONFIG_CHANGE
            self.interrupts += 1
        self.interrupt.trigger()

    def device_error(self, message: str) -> None:
        """Set DEVICE_NEEDS_RESET and tell the driver (a config-change interrupt)."""
        log(ERROR, "%s: device error, needs reset: %s", self.name, message)
        self._active = False
        with self._irq_lock:
            if self.needs_reset:
                return
            self.needs_reset = True
            if not self.status & STATUS_DRIVER_OK:
                return
            self.interrupt_status |= INT_CONFIG_CHANGE
            self.interrupts += 1
        self.interrupt.trigger()

    def notify(self, queue: int) -> None:
        """The driver kicked ``queue``. Callable from any thread; never blocks."""
        if self._active and 0 <= queue < len(self.queues):
            self.backend.notify(queue)

    def reset(self) -> None:
        """Device reset, as if the driver wrote 0 to Status (also used on hand-off)."""
        with self._lock:
            self._reset()

    def quiesce(self, timeout: float) -> bool:
        """The device's instance is gone (stopped, crashed, rolled back): stop its
        queues and its back-end before its partition is wiped or reused. True when
        nothing of the old driver's session touches guest memory any more; False if
        work already submitted was still running after ``timeout`` (see
        ``VirtioBackend.quiesce``). Afterwards the device is as after a reset."""
        with self._lock:
            self._active = False
            idle = self.backend.quiesce(timeout)
            for queue in self.queues:
                queue.reset()
            self._reset_registers()
        return idle

    def set_dma_window(self, base: int, size: int) -> None:
        """Confine the device to guest-physical [base, base + size), e.g. its owner's
        partition. Resets the device: rings set up under the old window may lie outside."""
        self.memory.check(base, size)
        with self._lock:
            self._reset()
            for queue in self.queues:
                queue.dma_base, queue.dma_end = base, base + size

    def close(self) -> None:
        with self._lock:
            self._active = False
            self.backend.close()

    # --- guest side (bus) ------------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        if offset >= CONFIG:
            config = self.backend.config()
            chunk = config[offset - CONFIG : offset - CONFIG + len(data)]
            data[:] = chunk + b"\0" * (len(data) - len(chunk))
            return
        if len(data) != 4:
            data[:] = b"\0" * len(data)  # registers are 32-bit only (§4.2.2.2)
            return
        with self._lock:
            value = self._read(offset)
        _U32.pack_into(data, 0, value & 0xFFFF_FFFF)

    def write(self, offset: int, data: memoryview) -> None:
        if offset >= CONFIG:
            self.backend.write_config(offset - CONFIG, data)
            return
        if len(data) != 4:
            log(DEBUG, "%s: ignored %d-byte write at %#x", self.name, len(data), offset)
            return
        value = _U32.unpack_from(data)[0]
        if offset == QUEUE_NOTIFY:
            self.notify(value)
            return
        with self._lock:
            self._write(offset, value)

    def _read(self, offset: int) -> int:
        queue = self._selected()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.backend.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            sel = self._device_features_sel
            return self.device_features >> (32 * sel) if sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return queue.max_size if queue is not None else 0
        if offset == QUEUE_READY:
            return int(queue is not None and queue.ready)
        if offset == INTERRUPT_STATUS:
            # A back-end in another process interrupts through the irqfd and the VMM
            # never sees it: report the used-buffer bit always (as Firecracker does),
            # and ask it whether it stopped serving (it interrupts when it does).
            if self._bypass:
                self.backend.check_error()
            return self.interrupt_status | (INT_USED_BUFFER if self._bypass else 0)
        if offset == STATUS:
            if self._bypass:
                self.backend.check_error()
            return self.status | (STATUS_NEEDS_RESET if self.needs_reset else 0)
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions
        if offset == CONFIG_GENERATION:
            return self.config_generation
        if offset in _ADDRESS_REGS and queue is not None:
            attr, shift = _ADDRESS_REGS[offset]
            return getattr(queue, attr) >> shift
        if offset == QUEUE_NUM and queue is not None:
            return queue.size
        return 0

    def _write(self, offset: int, value: int) -> None:
        if offset == STATUS:
            self._write_status(value)
        elif offset == INTERRUPT_ACK:
            with self._irq_lock:
                self.interrupt_status &= ~value
        elif offset == DEVICE_FEATURES_SEL:
            self._device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self._driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == QUEUE_SEL:
            self._queue_sel = value
        elif offset == QUEUE_NUM or offset in _ADDRESS_REGS:
            self._write_queue_config(offset, value)
        elif offset == QUEUE_READY:
            self._write_queue_ready(value)
        else:
            log(DEBUG, "%s: ignored write of %#x at %#x", self.name, value, offset)

    def _selected(self) -> Virtqueue | None:
        sel = self._queue_sel
        return self.queues[sel] if sel < len(self.queues) else None

    def _write_driver_features(self, value: int) -> None:
        sel = self._driver_features_sel
        if self.status & STATUS_FEATURES_OK or sel >= 2:
            return  # features are frozen once accepted
        mask = 0xFFFF_FFFF << (32 * sel)
        self.driver_features = (self.driver_features & ~mask) | (value << (32 * sel))

    def _write_queue_config(self, offset: int, value: int) -> None:
        queue = self._selected()
        if queue is None or queue.ready:
            log(WARNING, "%s: queue config write while ready or absent", self.name)
            return
        if offset == QUEUE_NUM:
            queue.size = value
            return
        attr, shift = _ADDRESS_REGS[offset]
        old = getattr(queue, attr)
        setattr(queue, attr, (old & ~(0xFFFF_FFFF << shift)) | (value << shift))

    def _write_queue_ready(self, value: int) -> None:
        queue = self._selected()
        if queue is None:
            return
        if not value:
            queue.disable()
            # The driver will reuse the buffers once it reads QueueReady back as 0, so
            # a chain the back-end already took must be finished first.
            if not self.backend.stop_queue(queue.index, QUEUE_STOP_TIMEOUT_S):
                log(WARNING, "%s: queue %d still in use after QueueReady=0", self.name, queue.index)
            return
        if queue.ready:
            return
        error = queue.enable()
        if error is not None:
            self.device_error(f"queue {queue.index}: {error}")

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        # Bits are only ever added (§2.1.2); a write that clears one changes nothing else.
        added = value & ~self.status
        self.status |= added & ~STATUS_NEEDS_RESET
        if added & STATUS_FEATURES_OK and not self._accept_features():
            self.status &= ~STATUS_FEATURES_OK
        if added & STATUS_FAILED:
            self._deactivate()
        elif added & STATUS_DRIVER_OK:
            if not self.status & STATUS_FEATURES_OK:
                self.device_error("DRIVER_OK without FEATURES_OK")
            elif not self.needs_reset:
                self._active = True  # first: a device error during activation clears it
                self.backend.activate(self)

    def _accept_features(self) -> bool:
        wanted = self.driver_features
        if wanted & ~self.device_features or not wanted & VIRTIO_F_VERSION_1:
            log(
                WARNING,
                "%s: refused driver features %#x (offered %#x)",
                self.name,
                wanted,
                self.device_features,
            )
            return False
        for queue in self.queues:
            queue.indirect = bool(wanted & VIRTIO_F_INDIRECT_DESC)
        return True

    def _deactivate(self) -> None:
        self._active = False
        self.backend.reset()

    def _reset(self) -> None:
        self._deactivate()
        for queue in self.queues:
            queue.reset()
        self._reset_registers()
