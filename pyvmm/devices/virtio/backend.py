"""The interface between the virtio-mmio transport and a device model ("backend").

The transport owns the registers, the queues and the interrupt status; a backend
owns its worker thread and the device-specific work. The calls:

- ``activate(transport)``: the driver set DRIVER_OK. Queues are configured and the
  negotiated features are in ``transport.driver_features``. From the vCPU thread.
- ``notify(queue)``: the driver kicked a queue. From any thread (the vCPU on a
  QueueNotify write, or the machine's ioeventfd poller); must not block.
- ``reset()``: the driver wrote 0 to Status, or the device is being given to another
  instance. Synchronous: when it returns, in-flight work for this device has been
  dropped and the backend no longer touches guest memory or the queues.
- ``stop_queue(queue, timeout)``: the driver wrote QueueReady=0 (the queue is already
  disabled, nothing new is taken from it). Returns once no chain taken from that
  queue is still in use, so the driver may reuse its buffers (virtio 1.x §4.2.3.2:
  it reads QueueReady back for exactly this); False if that took over ``timeout``.
- ``quiesce(timeout)``: the device is taken from its instance (stopped, crashed,
  rolled back) before its partition is wiped or reused. Like ``reset``, but work the
  guest already submitted is finished rather than dropped where it must be (I/O
  into guest RAM cannot be abandoned half-way), host resources are handed on
  (vsock streams go back to their listeners), and the wait is bounded: False means
  work was still running after ``timeout``; it takes nothing new, and a second call
  waits again.
- ``close()``: the node is shutting down; stop the worker thread.

Every backend does its queue work under ``self._lock`` (one chain at a time or one
pass of a loop), which is what ``stop_queue`` and ``quiesce`` wait for.

A backend reports back only through ``transport.used(queue)``,
``transport.config_changed()`` and ``transport.device_error(msg)``; those take only a
leaf lock, so a backend may call them while holding its own lock.
"""

from __future__ import annotations

import threading

from .queue import ChainError, RingError

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only, as Protocol: mmio imports this module
    from typing import Protocol

    from .queue import Chain, Virtqueue

    class Transport(Protocol):
        """What a backend uses of its transport: the virtio-mmio one, or a back-end
        process's vhost-user rings (``backends.rings.RingTransport``)."""

        queues: list[Virtqueue]
        driver_features: int

        def used(self, queue: int) -> None: ...

        def config_changed(self) -> None: ...

        def device_error(self, message: str) -> None: ...


VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_VERSION_1 = 1 << 32


class VirtioBackend:
    device_id = 0
    queue_sizes: tuple[int, ...] = ()  # QueueNumMax of each queue
    features = VIRTIO_F_VERSION_1  # device feature bits offered to the driver

    def __init__(self) -> None:
        self.transport: Transport | None = None
        self._lock = threading.Lock()  # held while chains are taken and used

    def config(self) -> bytes:
        """The device-specific configuration space, read from offset 0x100."""
        return b""

    def write_config(self, offset: int, data: memoryview) -> None:
        """Driver writes to configuration space; read-only by default."""

    def activate(self, transport: Transport) -> None:
        self.transport = transport

    def notify(self, queue: int) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self.transport = None

    def stop_queue(self, queue: int, timeout: float) -> bool:
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()  # the chain in use, if any, is finished
        return True

    def quiesce(self, timeout: float) -> bool:
        self.reset()
        return True

    def close(self) -> None:
        self.reset()

    def pop(self, queue: Virtqueue) -> Chain | None:
        """The next chain of ``queue``; malformed chains are returned to the driver with
        length 0 and skipped, a broken ring puts the device in NEEDS_RESET."""
        transport = self.transport
        while transport is not None:
            try:
                return queue.pop()
            except ChainError as exc:
                queue.note_error(f"dropped request: {exc}")
                queue.push(exc.head, 0)
                transport.used(queue.index)
            except RingError as exc:
                queue.note_error(str(exc))
                self.fail(str(exc))
                return None
        return None

    def fail(self, message: str) -> None:
        """Stop serving the driver until it resets the device."""
        transport = self.transport
        self.transport = None
        if transport is not None:
            transport.device_error(message)
