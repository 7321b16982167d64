"""errno → exception for failed KVM ioctls."""

from __future__ import annotations

import errno
import os


class KvmError(OSError):
    """A KVM ioctl failed. ``request`` names the ioctl that failed."""

    def __init__(self, err: int, request: str) -> None:
        super().__init__(err, f"{request}: {os.strerror(err)}")
        self.request = request


class KvmUnavailable(KvmError):
    """/dev/kvm is missing, or the host lacks a capability pyvmm needs."""


class KvmPermissionDenied(KvmError):
    """/dev/kvm exists but this user may not open it."""


class KvmBusy(KvmError):
    """A resource is in use (EBUSY/EEXIST), e.g. an overlapping memory slot."""


class KvmInvalidArgument(KvmError):
    """KVM rejected an argument (EINVAL/EFAULT/E2BIG)."""


_BY_ERRNO: dict[int, type[KvmError]] = {
    errno.ENOENT: KvmUnavailable,
    errno.ENODEV: KvmUnavailable,
    errno.ENXIO: KvmUnavailable,
    errno.EACCES: KvmPermissionDenied,
    errno.EPERM: KvmPermissionDenied,
    errno.EBUSY: KvmBusy,
    errno.EEXIST: KvmBusy,
    errno.EINVAL: KvmInvalidArgument,
    errno.EFAULT: KvmInvalidArgument,
    errno.E2BIG: KvmInvalidArgument,
}


def kvm_error(err: int, request: str) -> KvmError:
    """The exception for a failed ioctl, picked by errno."""
    return _BY_ERRNO.get(err, KvmError)(err, request)
