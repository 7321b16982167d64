"""16550A UART: enough for polling and interrupt-driven drivers (Linux 8250 included),
with the TI 16750's 64-byte FIFO mode (FCR bit 5, set while DLAB is on; IIR bit 5
says it is on), which lets a driver send 64 bytes per LSR check instead of 16: every
register access is a VM exit.

Transmission is instantaneous, so THR is always empty. Received bytes queue on
the host side without limit in the model, and the feeding thread is held back
(``feed`` blocks) while more than ``RX_HIGH_WATER`` bytes wait, so input is never
dropped. The interrupt output is a level: the machine turns level changes into
IRQ line changes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from .bus import Device

COM1 = 0x3F8
COM2 = 0x2F8
COM1_IRQ = 4
COM2_IRQ = 3
UART_PORTS = 8
RX_HIGH_WATER = 4096

# Register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0
IIR_64BYTE_FIFO = 0x20

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_64BYTE = 0x20

LCR_DLAB = 0x80
MCR_LOOP = 0x10
MCR_OUT2 = 0x08

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80


class Uart16550(Device):
    def __init__(
        self,
        output: Callable[[bytes], None],
        irq: Callable[[bool], None] = lambda level: None,
    ) -> None:
        self._output = output
        self._irq = irq
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._rx: deque[int] = deque()
        self._ier = 0
        self._lcr = 0x03
        self._mcr = MCR_OUT2
        self._scr = 0
        self._dll = 0x0C
        self._dlm = 0
        self._fifo = False
        self._fifo64 = False  # 16750 mode: only changed by an FCR write with DLAB on
        self._thr_pending = False  # THRE interrupt latched until IIR read or THR write
        self._irq_level = False
        self.closed = False

    # --- host side -------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Queue input for the guest; blocks while the guest is far behind."""
        with self._room:
            for byte in data:
                while len(self._rx) >= RX_HIGH_WATER and not self.closed:
                    self._room.wait(0.1)
                if self.closed:
                    return
                self._rx.append(byte)
                self._update_irq()

    def close(self) -> None:
        with self._room:
            self.closed = True
            self._room.notify_all()

    # --- guest side ------------------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            value = self._read(offset & 7)
        data[0] = value
        if len(data) > 1:
            data[1:] = b"\0" * (len(data) - 1)

    def write(self, offset: int, data: memoryview) -> None:
        tx = None
        with self._lock:
            tx = self._write(offset & 7, data[0])
        if tx is not None:
            self._output(tx)

    def _read(self, reg: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if reg == RBR_THR_DLL:
            if dlab:
                return self._dll
            value = self._rx.popleft() if self._rx else 0
            if len(self._rx) < RX_HIGH_WATER:
                self._room.notify_all()
            self._update_irq()
            return value
        if reg == IER_DLM:
            return self._dlm if dlab else self._ier
        if reg == IIR_FCR:
            iir = self._interrupt_id()
            if iir == IIR_THRI:
                self._thr_pending = False  # reading IIR clears a THRE interrupt
                self._update_irq()
            if not self._fifo:
                return iir
            return iir | IIR_FIFO_ENABLED | (IIR_64BYTE_FIFO if self._fifo64 else 0)
        if reg == LCR:
            return self._lcr
        if reg == MCR:
            return self._mcr
        if reg == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if reg == MSR:
            return self._modem_status()
        return self._scr

    def _write(self, reg: int, value: int) -> bytes | None:
        dlab = self._lcr & LCR_DLAB
        if reg == RBR_THR_DLL:
            if dlab:
                self._dll = value
                return None
            self._thr_pending = True  # sent at once, so THR is empty again
            if self._mcr & MCR_LOOP:
                self._rx.append(value)
                self._update_irq()
                return None
            self._update_irq()
            return bytes((value,))
        if reg == IER_DLM:
            if dlab:
                self._dlm = value
            else:
                enabling_thri = value & IER_THRI and not self._ier & IER_THRI
                self._ier = value & 0x0F
                if enabling_thri:
                    self._thr_pending = True
                self._update_irq()
        elif reg == IIR_FCR:
            self._fifo = bool(value & FCR_ENABLE_FIFO)
            if dlab:
                self._fifo64 = bool(value & FCR_64BYTE)
            if value & FCR_CLEAR_RCVR:
                self._rx.clear()
                self._room.notify_all()
            self._update_irq()
        elif reg == LCR:
            self._lcr = value
        elif reg == MCR:
            self._mcr = value & 0x1F
        elif reg == SCR:
            self._scr = value
        return None

    def _modem_status(self) -> int:
        if self._mcr & MCR_LOOP:
            # Loopback wires DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
            m = self._mcr
            return (
                (MSR_DSR if m & 0x01 else 0)
                | (MSR_CTS if m & 0x02 else 0)
                | (MSR_RI if m & 0x04 else 0)
                | (MSR_DCD if m & 0x08 else 0)
            )
        return MSR_DCD | MSR_DSR | MSR_CTS

    def _interrupt_id(self) -> int:
        if self._ier & IER_RDI and self._rx:
            return IIR_RDI
        if self._ier & IER_THRI and self._thr_pending:
            return IIR_THRI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._interrupt_id() != IIR_NO_INT
        if level != self._irq_level:
            self._irq_level = level
            self._irq(level)
