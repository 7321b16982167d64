"""Interrupt routing while virtualized: a device's interrupt reaches only its owner.

Each instance's IOAPIC, PIC and LAPIC state is switched with it, so a line change
must only reach KVM while the line's owner is on the vCPU:

- An assertion for the owner on the vCPU is injected at once (KVM_IRQ_LINE, in the
  irqchip when the call returns). For a switched-out owner it is held and replayed
  when the owner is switched in: never lost, never sent to another instance, and
  at most once (edges coalesce, as an IOAPIC's would).
- Replay re-checks ownership: a line that changed owner since it was held (``move``
  resets the device) is dropped, not delivered to its former owner.
- A deassertion for the owner on the vCPU goes to KVM at once. For a switched-out
  owner it cancels a held assertion and lowers the pin in the owner's saved IOAPIC,
  so the restore (which re-asserts the pins saved high) does not revive it.

Every line counts what became of its assertions (``line_counts``).

A line whose eventfd a back-end process writes (``IrqfdLine.external``) reaches KVM
through its irqfd devirtualized, without the VMM. While virtualized the router takes
it off KVM (``unbind``: when that returns, KVM has injected every event written
before, into the irqchip loaded then, the devirtualized owner's) and a ``CallPoller``
thread reads the eventfd: each read is one routed assertion of the line, counted
with the number of calls it gathered (in ``raised`` and the router's counts). At
``detach`` the line leaves the poller under the router's lock (no read after that)
and goes back to KVM (``bind``), which injects a call counted meanwhile into the
survivor's irqchip: no call is lost or delivered twice across the switch.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from ..cpu_state import IOAPIC
from ..lines import IrqfdLine, IrqLine
from .instance import OsInstance

LINE_COUNTERS = ("injected", "held", "replayed", "dropped")
log = logging.getLogger("pyvmm.microvisor")


class IrqRouter:
    def __init__(self, wake: Callable[[OsInstance], None]) -> None:
        self._wake = wake  # asks the scheduler to run an instance that has an interrupt
        self.lock = threading.RLock()  # held across a world switch
        self._lines: dict[int, IrqLine | IrqfdLine] = {}
        self._owner: dict[int, OsInstance] = {}
        self.current: OsInstance | None = None
        # Per GSI, while virtualized: assertions injected straight away, held for a
        # switched-out owner, replayed at its switch-in, dropped (no owner, or the
        # owner changed before the replay).
        self.counts: dict[int, dict[str, int]] = {}
        self.routed_calls: dict[int, int] = {}  # per GSI: back-end calls polled and routed
        self._poller: CallPoller | None = None

    def attach(self, lines: list[IrqLine | IrqfdLine]) -> None:
        """Route these lines through the microvisor (entering virtualized mode). Call
        it with ``lock`` held until the owners are set: polled calls wait for it."""
        for line in lines:
            self._lines[line.gsi] = line
            self.counts.setdefault(line.gsi, dict.fromkeys(LINE_COUNTERS, 0))
            line.deliver = lambda level, line=line: self._changed(line, level)
        external = [line for line in lines if getattr(line, "external", False)]
        if external:
            self._poller = CallPoller(self)
            for line in external:
                line.unbind()  # type: ignore[union-attr]
                self._poller.add(line)  # type: ignore[arg-type]

    def detach(self) -> CallPoller | None:
        """Give every line back its direct path (devirtualizing); called with ``lock``
        held. Returns the poller, to ``close`` once the lock is released."""
        poller, self._poller = self._poller, None
        for line in self._lines.values():
            line.deliver = line.to_kvm
            if poller is not None and poller.remove(line):
                line.bind()  # type: ignore[union-attr]
        self._lines.clear()
        self._owner.clear()
        return poller

    def routed_call(self, line: IrqfdLine, calls: int) -> None:
        """``calls`` calls of a back-end process, read at once from the line's eventfd
        (poller thread, ``lock`` held): one assertion, counted ``calls`` times."""
        line.raised += calls
        self.routed_calls[line.gsi] = self.routed_calls.get(line.gsi, 0) + calls
        self._changed(line, True, calls)

    def set_owner(self, line: IrqLine | IrqfdLine, owner: OsInstance | None) -> None:
        with self.lock:
            previous = self._owner.get(line.gsi)
            if previous is not None and previous is not owner and line.gsi in previous.held:
                previous.held.discard(line.gsi)  # the device was reset for its new owner
                self.counts[line.gsi]["dropped"] += 1
            if owner is None:
                self._owner.pop(line.gsi, None)
            else:
                self._owner[line.gsi] = owner

    def line_counts(self, gsi: int) -> dict[str, int]:
        """What the router did with a line's assertions while virtualized (zeros for
        a line it never routed)."""
        with self.lock:
            return dict(self.counts.get(gsi, dict.fromkeys(LINE_COUNTERS, 0)))

    def _changed(self, line: IrqLine | IrqfdLine, level: bool, times: int = 1) -> None:
        with self.lock:
            owner = self._owner.get(line.gsi)
            counts = self.counts[line.gsi]
            if owner is None:
                if level:
                    counts["dropped"] += times  # nobody owns the device: it goes nowhere
                return
            if owner is self.current:
                line.inject(level)
                if level:
                    counts["injected"] += times
                return
            if not level:
                owner.held.discard(line.gsi)
                _lower_saved_pin(owner, line.gsi)
                return
            owner.held.add(line.gsi)
            counts["held"] += times
        self._wake(owner)

    def switched_in(self, instance: OsInstance) -> None:
        """Replay what was held for ``instance``; called with ``lock`` held."""
        self.current = instance
        for gsi in sorted(instance.held):
            line = self._lines.get(gsi)
            if line is None:
                continue
            if self._owner.get(gsi) is not instance:
                self.counts[gsi]["dropped"] += 1
                continue
            self.counts[gsi]["replayed"] += 1
            line.inject(True)
            if not line.level:  # a pulse that is over: deliver its edge all the same
                line.inject(False)
        instance.held.clear()


def _lower_saved_pin(instance: OsInstance, gsi: int) -> None:
    """The line went low while ``instance`` was switched out: its saved IOAPIC must
    not re-assert the pin at the restore."""
    chips = instance.cpu.irqchips
    if len(chips) > IOAPIC:
        chips[IOAPIC].chip.ioapic.irr &= ~(1 << gsi)


class CallPoller:
    """Reads the call eventfds of back-end processes while virtualized, on its own
    thread, and routes each read (``IrqRouter.routed_call``). Reads happen only under
    the router's lock and only for lines still added, so ``remove`` (lock held) is
    final. The thread ends at ``close``."""

    def __init__(self, router: IrqRouter) -> None:
        self._router = router
        self._lines: dict[int, IrqfdLine] = {}  # eventfd → line
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._thread = threading.Thread(target=self._loop, name="irq-calls", daemon=True)
        self._thread.start()

    def add(self, line: IrqfdLine) -> None:
        self._lines[line.fd] = line
        self._epoll.register(line.fd, select.EPOLLIN)  # level: a count already there shows

    def remove(self, line: IrqLine | IrqfdLine) -> bool:
        """Stop reading ``line``'s eventfd (router lock held); False if it was not read."""
        fd = getattr(line, "fd", -1)
        if self._lines.pop(fd, None) is None:
            return False
        self._epoll.unregister(fd)
        return True

    def _loop(self) -> None:
        router = self._router
        while True:
            for fd, _ in self._epoll.poll():
                if fd == self._wake:
                    return
                with router.lock:
                    line = self._lines.get(fd)
                    if line is None:
                        continue  # removed meanwhile: KVM has it again
                    try:
                        calls = os.eventfd_read(fd)
                    except BlockingIOError:
                        continue
                    try:
                        router.routed_call(line, calls)
                    except OSError:  # the injection failed: the VM is going away
                        log.exception("irq line %d: a back-end's call was not injected", line.gsi)

    def close(self) -> None:
        """End the thread (not with the router's lock held: it may be waiting for it)."""
        os.eventfd_write(self._wake, 1)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._epoll.close()
            os.close(self._wake)
