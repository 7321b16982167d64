"""The virtio-vsock back-end process: ``python -m pyvmm.backends.vsock --control PATH
[--parent PID]``, one for the node, serving the vsock front-end of every partition
(``host``) and owning the host side of every stream: the listeners, the
forwarded TCP connections, the connections parked between two guests.

Each front-end is the in-process device model itself (``devices.virtio.vsock``, its
epoll thread, flow control and hand-back unchanged) over the vhost-user rings
(rx, tx, event). Only what stopping a ring means differs (``RingVsock``):
GET_VRING_BASE acts on the packets the guest already put on the tx ring (a reply
reaches its client) and then stops touching the rings; the streams stay, so a
driver that sets its queues up again goes on with them. What happens to the
streams is the VMM's to say, by control op, before it stops the rings: ``reset``
(the driver reset the device: streams reset, unanswered connections kept) or
``quiesce`` (the guest is gone: every stream back to its listener, the unanswered
request re-driven, as ``VirtioVsock.quiesce``).

Listeners: the VMM binds and listens, keeps the socket, and sends a copy of it
(``forward``); this process accepts on the copy. So a listener outlives this
process: clients arriving while it is restarted wait in the kernel's listen queue,
and the VMM forwards the same socket to the next process. Control ops (all reply
``{"ok": true, ...}`` or an error):

- ``forward`` {guest_port, retry_refused} + the listening socket → {listener: ID,
  address: [host, port]};
- ``attach`` {listener, device} (a front-end's name; moves it there from wherever it
  was, unanswered connections with it); ``detach`` {listener, [device]} (only from
  that device, if given); ``close`` {listener} (waiting connections are closed);
- ``reset`` {device}; ``quiesce`` {device, within (seconds)} → {idle};
- ``status`` (generic) adds {listeners: {ID: {address, guest_port, device,
  parked, replay_bytes and reply_bytes: [per parked connection]}}, vsock: {name:
  {connections,
  refused, dropped, redriven, packets: [rx, tx, event], queue_errors: [rx, tx,
  event], unanswered: [bytes per stream], answered: streams the guest has sent
  data on, pending_replies: control packets waiting for rx buffers, streams:
  [{state, rx_cnt, fwd_cnt}]}}}.

A counters page (``counters`` {} + a memfd of ``COUNTERS_SIZE`` bytes) gets, every
``COUNTERS_PERIOD_S``, the streams each front-end holds and the connections parked
in listeners, so that the VMM can say how many connections a death of this process
took with it (it cannot ask a dead process).
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import sys
import threading

from ..devices.virtio.forward import HostListener
from ..devices.virtio.queue import Chain, Virtqueue
from ..devices.virtio.vsock import VirtioVsock
from ..devices.virtio.vsock_conn import ESTABLISHED
from .host import DeviceType, control_op, run

COUNTERS_PERIOD_S = 0.1
COUNTERS = struct.Struct("<QQ")  # generation, connections parked in listeners
COUNTER = struct.Struct("<Q")  # then one per partition: streams its front-end holds
MAX_PARTITIONS = 62
COUNTERS_SIZE = COUNTERS.size + MAX_PARTITIONS * COUNTER.size
_MODEL_ARGS = {"guest_cid", "buf_alloc", "connect_timeout", "max_connections"}


class RingVsock(VirtioVsock):
    """The device model over vhost-user rings (see the module's docstring): the
    host's ``quiesce`` (GET_VRING_BASE) stops the rings; ``hand_back`` is the
    device's own quiesce. The rings' kick fds are in the device's own epoll
    (``owns_kicks``): a guest's kick wakes the device's thread directly, not the
    host's loop and then the device's thread."""

    owns_kicks = True

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.packets = [0, 0, 0]  # chains taken, per ring
        self._rings: object | None = None  # the last transport activated
        self._past_errors = [0, 0, 0]  # malformed chains on the rings of earlier ones
        self._kick_fds: dict[int, int] = {}  # kick fd → ring, while the rings run
        self._kicks: list[int] = [0, 0, 0]

    def activate(self, transport: object) -> None:  # type: ignore[override]
        self._past_errors = self.queue_errors()
        self._rings = transport
        self._stop_kicks()
        self._kicks = getattr(transport, "kicks", self._kicks)
        kick_fds = {fd: ring for ring, fd in enumerate(getattr(transport, "kick_fds", ()))}
        kick_fds.pop(-1, None)
        self._kick_fds = kick_fds
        for fd in kick_fds:
            self._epoll.register(fd, select.EPOLLIN)
        super().activate(transport)  # type: ignore[arg-type]

    def _stop_kicks(self) -> None:
        """Before the host closes them."""
        kick_fds, self._kick_fds = self._kick_fds, {}
        for fd in kick_fds:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # closed already

    def _pass(self, events: list[tuple[int, int]]) -> None:
        kick_fds = self._kick_fds
        if kick_fds:
            for fd, _ in events:
                ring = kick_fds.get(fd)
                if ring is not None:
                    try:
                        os.eventfd_read(fd)
                        self._kicks[ring] += 1
                    except BlockingIOError:
                        pass
        super()._pass(events)  # the pass takes every ring's work, kicked or not

    def queue_errors(self) -> list[int]:
        """Malformed chains dropped, per ring, over every session."""
        queues = getattr(self._rings, "queues", [])
        live = [queue.errors for queue in queues] or [0, 0, 0]
        return [past + now for past, now in zip(self._past_errors, live, strict=True)]

    def pop(self, queue: Virtqueue) -> Chain | None:
        chain = super().pop(queue)
        if chain is not None:
            self.packets[queue.index] += 1
        return chain

    def quiesce(self, timeout: float) -> bool:
        """Stop the rings: what the guest put on the tx ring is acted on, then
        nothing touches the rings or guest RAM until the next ``activate``."""
        self._resetting = True
        if not self._lock.acquire(timeout=timeout):
            self._resetting = False
            return False
        try:
            if self.transport is not None:
                self._process_tx(self.transport)
            self.transport = None
            self._stop_kicks()
        finally:
            self._resetting = False
            self._lock.release()
        return True

    def hand_back(self, timeout: float) -> bool:
        return VirtioVsock.quiesce(self, timeout)

    def answered(self) -> int:
        """Streams established on which the guest has sent data (answered)."""
        with self._lock:
            return sum(c.state == ESTABLISHED and c.rx_cnt > 0 for c in self._conns.values())

    def streams(self) -> list[dict[str, object]]:
        """Per stream: its state and byte counts guest → host (received, forwarded)."""
        with self._lock:
            return [
                {"state": c.state, "rx_cnt": c.rx_cnt, "fwd_cnt": c.fwd_cnt}
                for c in self._conns.values()
            ]

    def unanswered(self) -> list[int]:
        """Per stream, the bytes the guest consumed and has not answered yet (what a
        quiesce would re-drive)."""
        with self._lock:
            return [len(conn.unanswered) for conn in self._conns.values()]


def _int(request: dict[str, object], key: str, default: int | None = None) -> int:
    value = request.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key}: an integer, not {value!r}")
    return value


def _number(request: dict[str, object], key: str, default: float) -> float:
    value = request.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1e6:
        raise ValueError(f"{key}: a number of seconds, not {value!r}")
    return float(value)


class VsockType(DeviceType):
    name = "vsock"

    def __init__(self, args: object) -> None:
        super().__init__(args)  # type: ignore[arg-type]
        self.listeners: dict[int, HostListener] = {}
        self._next_id = 1
        self._partitions: dict[str, int] = {}
        self._counters: mmap.mmap | None = None
        self._generation = 0
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None

    def create(self, name: str, partition: int, args: dict[str, object]) -> RingVsock:
        unknown = set(args) - _MODEL_ARGS
        if unknown:
            raise ValueError(f"vsock: unknown front-end args {sorted(unknown)}")
        if not 0 <= partition < MAX_PARTITIONS:
            raise ValueError(f"vsock: partition {partition} (0 to {MAX_PARTITIONS - 1})")
        kw = {key: _int(args, key) for key in ("buf_alloc", "max_connections") if key in args}
        if "connect_timeout" in args:
            kw["connect_timeout"] = _number(args, "connect_timeout", 30.0)  # type: ignore[assignment]
        if "buf_alloc" in kw and not 4096 <= kw["buf_alloc"] <= 1 << 30:
            raise ValueError(f"vsock: buf_alloc {kw['buf_alloc']}")
        model = RingVsock(_int(args, "guest_cid"), **kw)
        self._partitions[name] = partition
        return model

    def removed(self, name: str, model: RingVsock) -> None:  # type: ignore[override]
        for listener in self.listeners.values():
            listener.detach(model)  # its waiting connections stay with the listener
        self._partitions.pop(name, None)
        model.close()

    def _model(self, request: dict[str, object], key: str = "device") -> RingVsock:
        name = request.get(key)
        model = self.models.get(name) if isinstance(name, str) else None
        if model is None:
            raise ValueError(f"no vsock front-end {name!r}")
        return model  # type: ignore[return-value]

    def _listener(self, request: dict[str, object]) -> tuple[int, HostListener]:
        ident = _int(request, "listener")
        listener = self.listeners.get(ident)
        if listener is None:
            raise ValueError(f"no listener {ident}")
        return ident, listener

    # --- listeners -------------------------------------------------------------------

    @control_op("forward")
    def op_forward(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        guest_port = _int(request, "guest_port")
        if not 0 < guest_port < 2**32:
            raise ValueError(f"guest_port {guest_port}")
        retry = _number(request, "retry_refused", 0.0)
        if len(fds) != 1:
            raise ValueError(f"forward: one fd (the listening socket), not {len(fds)}")
        sock = _listening_socket(fds)
        listener = HostListener("", 0, guest_port, retry_refused=retry, sock=sock)
        ident, self._next_id = self._next_id, self._next_id + 1
        self.listeners[ident] = listener
        return {"listener": ident, "address": list(listener.address)}

    @control_op("attach")
    def op_attach(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        _, listener = self._listener(request)
        listener.attach(self._model(request))
        return {}

    @control_op("detach")
    def op_detach(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        _, listener = self._listener(request)
        listener.detach(self._model(request) if request.get("device") is not None else None)
        return {}

    @control_op("close")
    def op_close(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        ident, listener = self._listener(request)
        del self.listeners[ident]
        listener.close()
        return {}

    # --- the streams of a front-end ------------------------------------------------------

    @control_op("reset")
    def op_reset(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        self._model(request).reset()
        return {}

    @control_op("quiesce")
    def op_quiesce(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        model = self._model(request)
        return {"idle": model.hand_back(_number(request, "within", 1.0))}

    # --- what the VMM sees -------------------------------------------------------------

    @control_op("counters")
    def op_counters(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        if len(fds) != 1 or self._counters is not None:
            raise ValueError("counters: one fd (a memfd), once")
        try:
            self._counters = mmap.mmap(fds[0], COUNTERS_SIZE)
        except (OSError, ValueError) as exc:
            raise ValueError(f"counters: cannot map the fd: {exc}") from None
        self._writer = threading.Thread(target=self._write_counters, daemon=True)
        self._writer.start()
        return {"size": COUNTERS_SIZE}

    def _write_counters(self) -> None:
        while not self._stop.wait(COUNTERS_PERIOD_S):
            self.snapshot()

    def snapshot(self) -> None:
        """The counters page as of now (see the module's docstring)."""
        page = self._counters
        if page is None:
            return
        parked = sum(len(listener.pending) for listener in list(self.listeners.values()))
        per_partition = [0] * MAX_PARTITIONS
        for name, model in list(self.models.items()):
            partition = self._partitions.get(name)
            if partition is not None:
                per_partition[partition] += model.connections  # type: ignore[attr-defined]
        self._generation += 1
        page[COUNTERS.size :] = b"".join(COUNTER.pack(n) for n in per_partition)
        page[: COUNTERS.size] = COUNTERS.pack(self._generation, parked)

    def status(self) -> dict[str, object]:
        names = {id(model): name for name, model in self.models.items()}
        listeners = {
            str(ident): {
                "address": list(listener.address),
                "guest_port": listener.guest_port,
                "device": names.get(id(listener.device)),
                "parked": len(listener.pending),
                "replay_bytes": [len(parked.replay) for parked in list(listener.pending)],
                "reply_bytes": [len(parked.reply) for parked in list(listener.pending)],
            }
            for ident, listener in self.listeners.items()
        }
        devices = {
            name: {
                "connections": model.connections,  # type: ignore[attr-defined]
                "refused": model.refused,  # type: ignore[attr-defined]
                "dropped": model.dropped,  # type: ignore[attr-defined]
                "redriven": model.redriven,  # type: ignore[attr-defined]
                "packets": list(model.packets),  # type: ignore[attr-defined]
                "queue_errors": model.queue_errors(),  # type: ignore[attr-defined]
                "unanswered": model.unanswered(),  # type: ignore[attr-defined]
                "answered": model.answered(),  # type: ignore[attr-defined]
                "pending_replies": len(model._control),  # type: ignore[attr-defined]
                "streams": model.streams(),  # type: ignore[attr-defined]
            }
            for name, model in self.models.items()
        }
        return {"listeners": listeners, "vsock": devices}

    def close(self) -> None:
        self._stop.set()
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()


def _listening_socket(fds: list[int]) -> socket.socket:
    """The fd as a socket object (which takes it over), if it is a listening TCP one."""
    try:
        sock = socket.socket(fileno=fds[0])
    except OSError as exc:
        raise ValueError(f"forward: the fd is not a socket: {exc}") from None
    fds[0] = -1
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise ValueError("forward: the fd is not a TCP socket")
    if not listening:
        sock.close()
        raise ValueError("forward: the socket is not listening")
    return sock


if __name__ == "__main__":
    sys.exit(run(VsockType))
