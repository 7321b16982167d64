"""Interrupt routing while virtualized: a device's interrupt reaches only its owner.

Each instance's IOAPIC, PIC and LAPIC state is switched with it, so an asserted line
must only reach KVM while its owner is on the vCPU. An assertion for a switched-out
owner is held and replayed when the owner is switched in: never lost, never sent to
the other instance, and at most once (edges are coalesced, as an IOAPIC would).
Deassertions go to KVM at once; the owner's pins are masked in the other instance.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..lines import IrqfdLine, IrqLine
from .instance import OsInstance


class IrqRouter:
    def __init__(self, wake: Callable[[OsInstance], None]) -> None:
        self._wake = wake  # asks the scheduler to run an instance that has an interrupt
        self.lock = threading.RLock()  # held across a world switch
        self._lines: dict[int, IrqLine | IrqfdLine] = {}
        self._owner: dict[int, OsInstance] = {}
        self.current: OsInstance | None = None

    def attach(self, lines: list[IrqLine | IrqfdLine]) -> None:
        """Route these lines through the microvisor (entering virtualized mode)."""
        for line in lines:
            self._lines[line.gsi] = line
            line.deliver = lambda level, line=line: self._changed(line, level)

    def detach(self) -> None:
        """Give every line back its direct path (devirtualizing)."""
        for line in self._lines.values():
            line.deliver = line.to_kvm
        self._lines.clear()
        self._owner.clear()

    def set_owner(self, line: IrqLine | IrqfdLine, owner: OsInstance | None) -> None:
        with self.lock:
            if owner is None:
                self._owner.pop(line.gsi, None)
            else:
                self._owner[line.gsi] = owner
            for instance in {*self._owner.values()}:
                if instance is not owner:
                    instance.held.discard(line.gsi)

    def _changed(self, line: IrqLine | IrqfdLine, level: bool) -> None:
        with self.lock:
            owner = self._owner.get(line.gsi)
            if not level or owner is self.current:
                line.inject(level)
                if level and owner is not None:
                    owner.injected.add(line.gsi)
                return
            if owner is None:
                return  # nobody owns the device: the interrupt goes nowhere
            owner.held.add(line.gsi)
        self._wake(owner)

    def switched_in(self, instance: OsInstance) -> None:
        """Replay what was held for ``instance``; called with ``lock`` held."""
        self.current = instance
        instance.injected.clear()
        for gsi in sorted(instance.held):
            line = self._lines.get(gsi)
            if line is None:
                continue
            line.inject(True)
            if not line.level:  # a pulse that is over: deliver its edge all the same
                line.inject(False)
        instance.held.clear()
