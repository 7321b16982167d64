"""Interrupt lines into the in-kernel irqchip, and queue notifications out of it.

``IrqLine`` (level, KVM_IRQ_LINE) serves the UARTs; ``IrqfdLine`` (one edge per
event, through an irqfd) serves virtio devices, so a device interrupt costs no vCPU
exit and no ioctl. Both share one shape for the microvisor: ``deliver(level)`` is
the path a change takes, ``to_kvm`` the direct one, and the microvisor swaps
``deliver`` while virtualized. The microvisor injects with ``inject``, which has
reached the irqchip when it returns: KVM injects an irqfd signal into an IOAPIC pin
later, from a work queue, and by then a world switch may have put another
instance's irqchip in place, which would swallow it. ``NotifyPoller`` turns
ioeventfd-signalled queue notifications into calls on a device, on its own thread.
Each line counts its assertions (``raised``), devirtualized or not.

An ``IrqfdLine`` whose eventfd a back-end process writes itself (``external``) is
never triggered by the VMM's device: its interrupts reach KVM without the VMM. The
microvisor takes such a line off its irqfd while virtualized (``unbind``) and polls
the eventfd instead, so each call still reaches only the device's owner; ``bind``
gives it back to KVM.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable

from .kvm import Vm


class IrqLine:
    """A level-triggered line: only changes go further."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi
        self.level = False
        self.raised = 0  # rising edges
        self.deliver: Callable[[bool], None] = self.to_kvm

    def __call__(self, level: bool) -> None:
        if level != self.level:
            self.level = level
            self.raised += level
            self.deliver(level)

    def to_kvm(self, level: bool) -> None:
        self._vm.irq_line(self.gsi, int(level))

    inject = to_kvm  # KVM_IRQ_LINE is synchronous

    def close(self) -> None:
        pass


class IrqfdLine:
    """An edge per ``trigger()``, written to an eventfd that KVM injects (irqfd)."""

    level = False  # a pulse leaves the line low

    def __init__(self, vm: Vm, gsi: int) -> None:
        self.gsi = gsi
        self._vm = vm
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vm.irqfd(self.fd, gsi)
        self.raised = 0  # triggers (not atomic: a statistic, racing triggers may share one)
        self.deliver: Callable[[bool], None] = self.to_kvm
        # A back-end process writes ``fd`` itself (vhost-user call fd): set when the
        # device is attached, before the fd is handed out.
        self.external = False

    def trigger(self) -> None:
        self.raised += 1
        self.deliver(True)

    def to_kvm(self, level: bool) -> None:
        if level:
            os.eventfd_write(self.fd, 1)

    def inject(self, level: bool) -> None:
        """The edge, in the irqchip before this returns (two ioctls)."""
        if level:
            self._vm.irq_line(self.gsi, 1)
            self._vm.irq_line(self.gsi, 0)

    def unbind(self) -> None:
        """Take the eventfd off KVM. When this returns, every event written before it
        has reached the irqchip (KVM flushes its injection work), and every later one
        stays in the eventfd's counter for whoever reads it."""
        self._vm.irqfd(self.fd, self.gsi, deassign=True)

    def bind(self) -> None:
        """Give the eventfd back to KVM; an event already counted in it is injected
        at once (KVM polls the eventfd when it is assigned)."""
        self._vm.irqfd(self.fd, self.gsi)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self._vm.irqfd(self.fd, self.gsi, deassign=True)
            except OSError:
                pass  # the VM is already gone
            os.close(self.fd)
            self.fd = -1


class NotifyPoller:
    """Waits on ioeventfds and calls ``notify(queue)`` on their device, off the vCPU."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._targets: dict[int, tuple[Callable[[int], None], int]] = {}
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="virtio-notify", daemon=True)
        self._thread.start()

    def add(self, vm: Vm, address: int, queue: int, notify: Callable[[int], None]) -> None:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vm.ioeventfd(fd, address, 4, datamatch=queue)
        self._targets[fd] = (notify, queue)
        self._epoll.register(fd, select.EPOLLIN)

    def _loop(self) -> None:
        while not self._closed:
            try:
                events = self._epoll.poll()
            except OSError:
                return
            for fd, _ in events:
                if fd == self._wake:
                    return
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                notify, queue = self._targets[fd]
                notify(queue)

    def close(self) -> None:
        self._closed = True
        os.eventfd_write(self._wake, 1)
        self._thread.join(2)
        for fd in self._targets:
            os.close(fd)
        self._targets.clear()
        self._epoll.close()
        os.close(self._wake)
