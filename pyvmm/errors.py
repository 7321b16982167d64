"""The errors pyvmm reports to its user. Each carries the process exit status the
CLI uses for it (sysexits.h values, so scripts can tell the kinds apart)."""

from __future__ import annotations

EX_DATAERR = 65  # the kernel image is malformed or does not fit
EX_UNAVAILABLE = 69  # /dev/kvm or a KVM feature is missing
EX_SOFTWARE = 70  # the guest crashed: triple fault, KVM internal error
EX_NOPERM = 77  # /dev/kvm exists but cannot be opened
EX_TIMEOUT = 124  # as timeout(1)


class PyvmmError(Exception):
    """An error with a one-line message meant for the user."""

    exit_status = 1


class UsageError(PyvmmError):
    """A command-line option is malformed or names something unusable."""

    exit_status = 2


class BootError(PyvmmError):
    """The kernel image cannot be booted (malformed ELF, no PVH note, too large...)."""

    exit_status = EX_DATAERR


class MemoryAccessError(PyvmmError):
    """A guest-physical access falls outside guest RAM or outside its partition."""


class HostUnsupported(PyvmmError):
    """/dev/kvm is missing or lacks a capability pyvmm needs."""

    exit_status = EX_UNAVAILABLE


class HostPermissionDenied(PyvmmError):
    exit_status = EX_NOPERM
