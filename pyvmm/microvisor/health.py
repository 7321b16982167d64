"""The node's status as one documented dict (docs/status.md), the leak counters in
it, and the invariant every maintenance operation must end in.

``status`` carries ``schema``: fields are only ever added under one schema number;
renaming or removing a field, or changing its meaning, bumps it. Every field is
listed in docs/status.md; whoever adds one documents it there in the same change.

The invariant (DESIGN.md §6.7), checked after every upgrade, successful or not:
exactly one instance serving; every service listener attached to its vsock; the
disk's write lease held by it; the node devirtualized unless it was left virtualized
on purpose (``virtualized_reason`` says why); and no leaked agents or listeners.
Threads and fds are counted here too, but only a comparison of two quiescent
moments can tell a leak from a client that happens to be connected, so that is left
to whoever holds both (tests, soak benchmarks).
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter

from ..devices.virtio.forward import HostListener, open_listeners
from ..node import ServiceDevices
from .agent import open_agents
from .instance import OsInstance
from .microvisor import DEVIRTUALIZED, Microvisor

SCHEMA = 2
_DEFAULT_THREAD_NAME = re.compile(r"^Thread-\d+(?: \((?P<target>.*)\))?$")


def node_status(mv: Microvisor, services: ServiceDevices | None = None) -> dict[str, object]:
    """Everything ``pyvmm ctl status`` shows. Safe to call from any thread at any time,
    also while instances start and stop."""
    status: dict[str, object] = {"schema": SCHEMA}
    status.update(mv.status())
    status["virtualized_reason"] = mv.virtualized_reason
    status["service"] = service_status(mv, services)
    status["device_backends"] = {} if services is None else services.backend_status()
    calls = {} if services is None else services.backend_calls()
    for line in status["irq_lines"].values():  # type: ignore[attr-defined]
        line["backend_calls"] = calls.get(line["device"])
    status["last_upgrade"] = mv.last_upgrade
    status["resources"] = resources(services)
    status["invariant"] = invariant_problems(mv, services)
    return status


def service_status(mv: Microvisor, services: ServiceDevices | None) -> dict[str, object]:
    if services is None:
        return {"listeners": [], "disk_writer": None, "serving": None}
    serving = serving_instance(mv, services)
    return {
        "listeners": [
            {
                "address": _address(listener),
                "guest_port": listener.guest_port,
                "partition": _partition_of(services, listener.device),
            }
            for listener in list(services.listeners)
        ],
        "disk_writer": services.disk_writer(),
        "serving": None if serving is None else serving.name,
    }


def serving_instance(mv: Microvisor, services: ServiceDevices) -> OsInstance | None:
    """The live instance the service listeners are attached to (None: detached, or
    attached to a partition with no live instance)."""
    partitions = {_partition_of(services, listener.device) for listener in services.listeners}
    if len(partitions) != 1 or None in partitions:
        return None
    (index,) = partitions
    live = [i for i in list(mv.instances.values()) if i.live]
    return next((i for i in live if i.partition.index == index), None)


def invariant_problems(mv: Microvisor, services: ServiceDevices | None) -> list[str]:
    """What is wrong with the node's shape, as sentences; [] when the invariant holds.
    Meaningful at quiescence (no maintenance operation running)."""
    problems: list[str] = []
    live = [i for i in list(mv.instances.values()) if i.live]
    if not live:
        return ["no instance is running"]
    if mv.mode != DEVIRTUALIZED and mv.virtualized_reason is None:
        problems.append("the node is virtualized and nothing says why")
    if services is None:
        if len(live) != 1 and mv.virtualized_reason is None:
            problems.append(f"{len(live)} instances are running")
        return problems
    serving = serving_instance(mv, services) if services.listeners else None
    if services.listeners and serving is None:
        problems.append("the service listeners are not attached to one running instance")
    if serving is None and len(live) == 1:
        serving = live[0]
    if serving is not None:
        if services.lease is not None and services.disk_writer() != serving.partition.index:
            problems.append(
                f"the disk's write lease is with partition {services.disk_writer()}, "
                f"not with the serving instance {serving.name!r}"
            )
        others = [i for i in live if i is not serving]
        if others and mv.virtualized_reason is None:
            names = ", ".join(repr(i.name) for i in others)
            problems.append(f"{names} running besides the serving instance {serving.name!r}")
        if any(not i.paused for i in others) and mv.mode != DEVIRTUALIZED:
            problems.append("an instance that does not serve is still scheduled")
    if open_agents():
        problems.append(f"{open_agents()} maintenance agent connection(s) left open")
    extra = open_listeners() - len(services.listeners)
    if extra > 0:
        problems.append(f"{extra} host listener(s) open besides the service's")
    return problems


def resources(services: ServiceDevices | None = None) -> dict[str, object]:
    """Leak counters. ``fds`` excludes connected sockets (clients of the service or
    of the control socket come and go); listening sockets, eventfds, files, the KVM
    fds count."""
    threads = Counter(thread_kind(t.name) for t in threading.enumerate())
    kinds, clients = _fd_kinds()
    return {
        "agents": open_agents(),
        "listeners": open_listeners(),
        "threads": dict(sorted(threads.items())),
        "fds": sum(kinds.values()),
        "fd_kinds": dict(sorted(kinds.items())),
        "client_sockets": clients,
    }


def thread_kind(name: str) -> str:
    """A thread's name without a counter Python adds ("Thread-7 (_serve)" → "_serve")."""
    match = _DEFAULT_THREAD_NAME.match(name)
    if match is None:
        return name
    return match["target"] or "Thread"


def _address(listener: HostListener) -> str | None:
    try:
        host, port = listener.address
    except OSError:
        return None  # closed (the node is shutting down)
    return f"{host}:{port}"


def _partition_of(services: ServiceDevices, device: object) -> int | None:
    return next((i for i, v in enumerate(services.vsocks) if v is device), None)


def _fd_kinds() -> tuple[Counter[str], int]:
    targets: dict[int, str] = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            targets[int(entry)] = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:
            continue  # closed meanwhile (e.g. the directory listing itself)
    connected = _connected_socket_inodes()
    kinds: Counter[str] = Counter()
    clients = 0
    for target in targets.values():
        if target.startswith("socket:["):
            if target[8:-1] in connected:
                clients += 1
                continue
            kinds["socket"] += 1
        elif target.startswith("anon_inode:"):
            kinds[target[len("anon_inode:") :].strip("[]")] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
        elif target.startswith("/dev/"):
            kinds[target] += 1
        else:
            kinds["file"] += 1
    return kinds, clients


def _connected_socket_inodes() -> set[str]:
    """Inodes of connected stream sockets (TCP not listening, Unix connected)."""
    inodes: set[str] = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] != "0A":  # 0A: LISTEN
                        inodes.add(fields[9])
        except OSError:
            continue
    try:
        with open("/proc/self/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) > 6 and fields[5] == "03":  # SS_CONNECTED
                    inodes.add(fields[6])
    except OSError:
        pass
    return inodes
