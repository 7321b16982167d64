"""The checks an online upgrade starts with, also on their own (the ``preflight``
control op, Ansible's check mode): they read the node and the kernel file and change
nothing.

``upgrade_problems`` is what ``Upgrade`` itself checks before it touches anything: one
running instance holding the disk, a spare partition with its own vsock and disk
front-end, and a kernel that parses, has a PVH entry and fits that partition.
``preflight`` adds what an operator's tool needs to decide: whether the node is
devirtualized and idle, and whether the serving instance already runs that kernel
(by content hash) with that command line, which makes the upgrade a no-op.
"""

from __future__ import annotations

import hashlib
import os

from ..boot.image_cache import parse_kernel_cached
from ..boot.layout import place
from ..errors import PyvmmError
from ..machine import read_kernel_file
from ..memory import Partition
from ..node import ServiceDevices
from .instance import service_cmdline
from .microvisor import DEVIRTUALIZED, Microvisor, MicrovisorError


class KernelCheck:
    """A kernel file read once: its bytes' hash and whether it fits ``partition``."""

    def __init__(self, kernel: str, partition: Partition) -> None:
        self.sha256: str | None = None
        self.problem: str | None = None
        try:
            data = read_kernel_file(kernel, partition.size)
            self.sha256 = hashlib.sha256(data).hexdigest()
            place(parse_kernel_cached(data, os.path.basename(kernel)), partition)
        except PyvmmError as exc:
            self.problem = str(exc)


def upgrade_problems(
    mv: Microvisor, services: ServiceDevices | None, kernel: str
) -> tuple[list[str], Partition | None, KernelCheck | None]:
    """What stops an upgrade to ``kernel`` from starting, as sentences ([] if nothing),
    the spare partition it would boot into, and the kernel's check."""
    problems: list[str] = []
    live = mv.live()
    if not live:
        problems.append("no running instance")
    elif len(live) > 1:
        problems.append("another instance is already running")
    if services is None:
        problems.append("this node has no service devices to hand over")
    elif live and services.disk_writer() != live[0].partition.index:
        problems.append("the running instance owns no disk to hand over")
    try:
        spare = mv._spare_partition()
    except MicrovisorError as exc:
        problems.append(str(exc))
        return problems, None, None
    if services is not None and (
        len(services.vsocks) <= spare.index or len(services.disks) <= spare.index
    ):
        problems.append(f"partition {spare.index} has no vsock or disk")
    check = KernelCheck(kernel, spare)
    if check.problem:
        problems.append(check.problem)
    return problems, spare, check


def preflight(
    mv: Microvisor,
    services: ServiceDevices | None,
    kernel: str,
    cmdline: str = "",
) -> dict[str, object]:
    """Could an upgrade to ``kernel`` with ``cmdline`` start now, and would it change
    anything? Changes nothing."""
    problems, spare, check = upgrade_problems(mv, services, kernel)
    running = mv.gate.holder  # the mutating operation under way, if any
    if running is not None:
        problems.insert(0, f"the node is busy: {running} is running")
    elif mv.mode != DEVIRTUALIZED:
        problems.insert(0, "the node is virtualized: maintenance is under way")
    live = mv.live()
    serving = live[0] if len(live) == 1 else None
    sha256 = check.sha256 if check is not None else None
    wanted = service_cmdline(cmdline)
    return {
        "ready": not problems,
        "problems": problems,
        "kernel": kernel,
        "kernel_sha256": sha256,
        "cmdline": wanted,
        "spare_partition": None if spare is None else spare.index,
        "serving": None if serving is None else serving.name,
        "up_to_date": serving is not None
        and sha256 is not None
        and serving.kernel_sha256 == sha256
        and service_cmdline(serving.cmdline) == wanted,
    }
