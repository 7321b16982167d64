"""The KVM ABI: ioctl request numbers, the ctypes structures of <linux/kvm.h> and
errno → exception. Nothing here knows about machines, devices or policy."""

from . import numbers, structs
from .encoding import _IO, _IOC, _IOR, _IOW, _IOWR
from .errors import (
    KvmBusy,
    KvmError,
    KvmInvalidArgument,
    KvmPermissionDenied,
    KvmUnavailable,
    kvm_error,
)

__all__ = [
    "_IO",
    "_IOC",
    "_IOR",
    "_IOW",
    "_IOWR",
    "KvmBusy",
    "KvmError",
    "KvmInvalidArgument",
    "KvmPermissionDenied",
    "KvmUnavailable",
    "kvm_error",
    "numbers",
    "structs",
]
