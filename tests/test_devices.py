"""Device models on their own: buses, the 16550 UART, the debug-exit port."""

from __future__ import annotations

import threading

import pytest

from pyvmm.devices import uart as u
from pyvmm.devices.bus import PortIoBus
from pyvmm.devices.debug_exit import DebugExit


class Recorder:
    def __init__(self) -> None:
        self.output = bytearray()
        self.levels: list[bool] = []

    def out(self, data: bytes) -> None:
        self.output += data

    def irq(self, level: bool) -> None:
        self.levels.append(level)


@pytest.fixture
def uart():
    rec = Recorder()
    return u.Uart16550(rec.out, rec.irq), rec


def rd(dev, offset: int) -> int:
    buf = bytearray(1)
    dev.read(offset, memoryview(buf))
    return buf[0]


def wr(dev, offset: int, value: int) -> None:
    dev.write(offset, memoryview(bytes([value])))


def test_transmit_and_line_status(uart):
    dev, rec = uart
    assert rd(dev, u.LSR) & (u.LSR_THRE | u.LSR_TEMT) == u.LSR_THRE | u.LSR_TEMT
    for ch in b"ok\n":
        wr(dev, u.RBR_THR_DLL, ch)
    assert bytes(rec.output) == b"ok\n"
    assert rd(dev, u.IIR_FCR) == u.IIR_NO_INT


def test_receive_raises_and_clears_the_interrupt(uart):
    dev, rec = uart
    wr(dev, u.IER_DLM, u.IER_RDI)
    dev.feed(b"ab")
    assert rec.levels == [True]
    assert rd(dev, u.LSR) & u.LSR_DR
    assert rd(dev, u.IIR_FCR) & 0x0F == u.IIR_RDI
    assert rd(dev, u.RBR_THR_DLL) == ord("a")
    assert rd(dev, u.RBR_THR_DLL) == ord("b")
    assert not rd(dev, u.LSR) & u.LSR_DR
    assert rec.levels == [True, False]
    assert rd(dev, u.IIR_FCR) == u.IIR_NO_INT


def test_thre_interrupt_latches_until_iir_read(uart):
    dev, rec = uart
    wr(dev, u.IER_DLM, u.IER_THRI)
    assert rec.levels == [True]
    assert rd(dev, u.IIR_FCR) & 0x0F == u.IIR_THRI
    assert rec.levels == [True, False]
    wr(dev, u.RBR_THR_DLL, ord("x"))
    assert rec.levels == [True, False, True]


def test_fifo_bits_divisor_latch_and_scratch(uart):
    dev, _ = uart
    wr(dev, u.IIR_FCR, u.FCR_ENABLE_FIFO)
    assert rd(dev, u.IIR_FCR) & 0xC0 == 0xC0
    wr(dev, u.LCR, u.LCR_DLAB | 3)
    wr(dev, u.RBR_THR_DLL, 1)
    wr(dev, u.IER_DLM, 0)
    assert rd(dev, u.RBR_THR_DLL) == 1
    wr(dev, u.LCR, 3)
    wr(dev, u.SCR, 0x5A)
    assert rd(dev, u.SCR) == 0x5A


def test_64_byte_fifo_mode_is_set_only_with_dlab_as_on_a_16750(uart):
    dev, _ = uart
    wr(dev, u.IIR_FCR, u.FCR_ENABLE_FIFO | u.FCR_64BYTE)  # without DLAB: ignored
    assert rd(dev, u.IIR_FCR) & 0xE0 == 0xC0
    wr(dev, u.LCR, u.LCR_DLAB | 3)
    wr(dev, u.IIR_FCR, u.FCR_ENABLE_FIFO | u.FCR_64BYTE)
    wr(dev, u.LCR, 3)
    wr(dev, u.IIR_FCR, u.FCR_ENABLE_FIFO)  # bit 5 keeps its value without DLAB
    assert rd(dev, u.IIR_FCR) & 0xE0 == 0xE0
    wr(dev, u.IIR_FCR, 0)  # FIFOs off: no FIFO bits at all
    assert rd(dev, u.IIR_FCR) & 0xE0 == 0


def test_loopback_returns_transmitted_bytes(uart):
    dev, rec = uart
    wr(dev, u.MCR, u.MCR_LOOP | 0x0F)
    wr(dev, u.RBR_THR_DLL, 0x42)
    assert rec.output == b""
    assert rd(dev, u.RBR_THR_DLL) == 0x42
    assert rd(dev, u.MSR) == 0xF0


def test_feed_waits_for_the_guest_instead_of_dropping(uart):
    dev, _ = uart
    data = bytes(range(256)) * ((u.RX_HIGH_WATER // 256) + 4)
    feeder = threading.Thread(target=dev.feed, args=(data,))
    feeder.start()
    received = bytearray()
    while len(received) < len(data):
        if rd(dev, u.LSR) & u.LSR_DR:
            received.append(rd(dev, u.RBR_THR_DLL))
    feeder.join(5)
    assert bytes(received) == data


def test_bus_dispatches_by_port_and_reads_all_ones_when_open():
    bus = PortIoBus()
    codes: list[int] = []
    bus.register(0xF4, 4, DebugExit(codes.append))
    bus.write(0xF4, memoryview(b"\x05"))
    assert codes == [5]
    buf = bytearray(2)
    bus.read(0x1234, memoryview(buf))
    assert buf == b"\xff\xff" and bus.unhandled == 1
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(0xF6, 1, DebugExit(codes.append))
