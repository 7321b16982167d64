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
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..cpu_state import IOAPIC
from ..lines import IrqfdLine, IrqLine
from .instance import OsInstance

LINE_COUNTERS = ("injected", "held", "replayed", "dropped")


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

    def attach(self, lines: list[IrqLine | IrqfdLine]) -> None:
        """Route these lines through the microvisor (entering virtualized mode)."""
        for line in lines:
            self._lines[line.gsi] = line
            self.counts.setdefault(line.gsi, dict.fromkeys(LINE_COUNTERS, 0))
            line.deliver = lambda level, line=line: self._changed(line, level)

    def detach(self) -> None:
        """Give every line back its direct path (devirtualizing)."""
        for line in self._lines.values():
            line.deliver = line.to_kvm
        self._lines.clear()
        self._owner.clear()

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

    def _changed(self, line: IrqLine | IrqfdLine, level: bool) -> None:
        with self.lock:
            owner = self._owner.get(line.gsi)
            counts = self.counts[line.gsi]
            if owner is None:
                if level:
                    counts["dropped"] += 1  # nobody owns the device: it goes nowhere
                return
            if owner is self.current:
                line.inject(level)
                if level:
                    counts["injected"] += 1
                return
            if not level:
                owner.held.discard(line.gsi)
                _lower_saved_pin(owner, line.gsi)
                return
            owner.held.add(line.gsi)
            counts["held"] += 1
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
