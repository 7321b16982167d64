"""Linux ioctl request encoding (asm-generic/ioctl.h), computed rather than hard-coded."""

from __future__ import annotations

import ctypes

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _size(arg: type[ctypes._CData] | int) -> int:
    return arg if isinstance(arg, int) else ctypes.sizeof(arg)


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, arg: type[ctypes._CData] | int) -> int:
    return _IOC(_IOC_READ, type_, nr, _size(arg))


def _IOW(type_: int, nr: int, arg: type[ctypes._CData] | int) -> int:
    return _IOC(_IOC_WRITE, type_, nr, _size(arg))


def _IOWR(type_: int, nr: int, arg: type[ctypes._CData] | int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(arg))
