"""The host of a back-end process: ONE process per device type serves the front-ends
of every partition (``python -m pyvmm.backends.<type> --control PATH --parent PID
[device args]``), so state shared between them (the disk's write lease, the vsock
listeners) stays inside one process.

How a device type plugs in (see ``blk.py`` for a whole one):

- Subclass ``DeviceType``; set ``name``; add the process's own arguments in
  ``add_arguments`` (they come once, on the command line); implement ``create(name,
  partition, args)`` returning the device model for one front-end: a
  ``devices.virtio.backend.VirtioBackend`` (``activate(transport)``, ``notify(queue)``,
  ``quiesce(timeout)``, ``close()``), the same class the VMM runs in-process.
- Control ops of the type: methods decorated ``@control_op("NAME")`` taking
  ``(self, request: dict, fds: list[int])`` and returning the reply's fields (a dict);
  raise ``ValueError`` to refuse (the reply is ``{"ok": false, "error": str(exc)}``).
  Ops and ``watch`` handlers run on the loop thread: keep them short.
  An fd you keep: set its entry in ``fds`` to -1; the host closes the rest. ``self.models`` maps
  each front-end's name to its model; ``status()`` adds type-wide fields to ``status``.
- Own fds (listening sockets, connections) join the one event loop through
  ``self.host.watch(fd, handler)`` / ``self.host.unwatch(fd)`` (before closing it).
- End with ``if __name__ == "__main__": sys.exit(run(MyType))``.

Generic control ops (``channel`` framing): ``add`` {name, partition, args} with one
fd, the back-end's end of a socketpair on which the host then serves vhost-user for
that front-end; ``remove`` {name}; ``status`` → {"devices": {name: {partition,
active, rings: [{running, calls, kicks}], errors, last_error, refused}}, ...}.

Rings: a front-end's model is activated (``activate`` with a transport whose
``queues`` are the started rings) once *every* ring of the model
(``len(model.queue_sizes)``) is started and enabled; GET_VRING_BASE of any ring
quiesces the model first (a request in progress finishes, bounded by
``rings.STOP_TIMEOUT_S``) and answers with where the ring stopped; the model runs again
when all its rings are started again. The model's ``transport.used(i)`` signals
ring i's call eventfd (counted: ``calls``), and ring i's kick eventfd becomes
``model.notify(i)`` (a model with ``owns_kicks`` reads ``transport.kick_fds`` on its
own thread instead, counting in ``transport.kicks``, and stops reading them when
it is quiesced: a kick then wakes one thread, not two). The memory table holds only
the front-end's partition, so DMA is confined by construction, and every descriptor
is checked by ``Virtqueue``.

One thread runs the event loop (epoll over the control socket, every vhost-user
socket and every started ring's kick fd); models keep their own worker threads. The
process serves one control connection and exits when it closes; it dies with the VMM
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import sys
from collections.abc import Callable

from ..devices.virtio._log import ERROR, INFO, log, log_to_stderr
from ..devices.virtio.backend import VirtioBackend
from . import channel
from . import vhost_user as vu
from .rings import FrontEnd

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import ClassVar  # typing costs the process ~0.5 MiB

ACCEPT_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1
GENERIC_OPS = ("add", "remove", "status")


def control_op(name: str) -> Callable:
    """Mark a ``DeviceType`` method as the handler of control op ``name``."""

    def mark(method: Callable) -> Callable:
        method.control_op = name  # type: ignore[attr-defined]
        return method

    return mark


class DeviceType:
    """One device type's state in its process; subclass it (see the module's docstring)."""

    name = "device"
    ops: ClassVar[dict[str, str]] = {}  # op name → method name, from @control_op

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls.ops = dict(cls.ops)
        for attr, value in vars(cls).items():
            if op := getattr(value, "control_op", None):
                if op in GENERIC_OPS:
                    raise TypeError(f"{cls.__name__}: {op!r} is a generic op")
                cls.ops[op] = attr

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.models: dict[str, VirtioBackend] = {}  # by front-end name (kept by the host)
        self.host: Host | None = None  # set once the loop exists: ``host.watch``

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        pass

    def create(self, name: str, partition: int, args: dict[str, object]) -> VirtioBackend:
        raise NotImplementedError

    def removed(self, name: str, model: VirtioBackend) -> None:
        """A front-end went away (``remove``, or its connection closed)."""
        model.close()

    def status(self) -> dict[str, object]:
        return {}

    def close(self) -> None:
        pass


class Host:
    """The event loop: the control connection, the front-ends, their kicks."""

    def __init__(self, device: DeviceType, control: socket.socket) -> None:
        self.device = device
        device.host = self
        self.control = control
        self.fronts: dict[str, FrontEnd] = {}
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[], None]] = {}
        self.watch(control.fileno(), self._on_control)
        self.running = True

    def watch(self, fd: int, handler: Callable[[], None]) -> None:
        """Call ``handler()`` on the loop thread whenever ``fd`` is readable (call it
        from the loop thread: an op or a handler)."""
        self.epoll.register(fd, select.EPOLLIN)
        self.handlers[fd] = handler

    def unwatch(self, fd: int) -> None:
        """Before closing a watched fd."""
        if self.handlers.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed

    def run(self) -> None:
        try:
            while self.running:
                events = self.epoll.poll()
                # a handler may remove an fd and another add one with its number:
                # an event of this batch is for the handler that was watching then
                watching = dict(self.handlers)
                for fd, _ in events:
                    handler = self.handlers.get(fd)
                    if handler is not None and handler is watching.get(fd):
                        handler()
        finally:
            for name in list(self.fronts):
                self._remove(name)
            self.device.close()
            self.epoll.close()

    # -- front-ends --

    def _kicks(self, front: FrontEnd, watch: bool) -> None:
        if getattr(front.model, "owns_kicks", False):
            return  # its own thread reads them (``RingTransport.kick_fds``): no hop
        for index, vring in enumerate(front.vrings):
            if watch and vring.started and vring.kick >= 0:
                kick = vring.kick
                self.watch(kick, lambda f=front, i=index, k=kick: self._on_kick(f, i, k))
            elif not watch:
                self.unwatch(vring.kick)

    def _on_kick(self, front: FrontEnd, index: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        try:
            front.kick(index)
        except Exception as exc:  # a model's bug ends its front-end, not the process
            log(ERROR, "%s: kick: %r", front.name, exc)
            self._remove(front.name)

    def _on_vhost_user(self, front: FrontEnd) -> None:
        self._kicks(front, watch=False)  # a message may close or replace them
        try:
            front.serve_one()
            front.sync()
        except vu.VhostUserError as exc:
            log(INFO, "%s: connection ended: %s", front.name, exc)
            self._remove(front.name)
            return
        except Exception as exc:  # a model's bug ends its front-end, not the process
            log(ERROR, "%s: %r", front.name, exc)
            self._remove(front.name)
            return
        self._kicks(front, watch=True)

    def _remove(self, name: str) -> None:
        front = self.fronts.pop(name)
        self._kicks(front, watch=False)
        self.unwatch(front.sock.fileno())
        front.close()
        self.device.models.pop(name, None)
        self.device.removed(name, front.model)

    # -- control --

    def _on_control(self) -> None:
        try:
            request, fds = channel.receive(self.control, vu.DEFAULT_TIMEOUT_S)
        except channel.Malformed as exc:
            self._reply({"id": None, "ok": False, "error": str(exc)})
            return
        except vu.VhostUserError as exc:
            log(INFO, "control connection ended: %s", exc)
            self.running = False
            return
        try:
            reply = {"ok": True, **self._dispatch(request, fds)}
        except (ValueError, TypeError, KeyError, OSError) as exc:
            reply = {"ok": False, "error": str(exc) or type(exc).__name__}
        except Exception as exc:  # a bug in an op: say so, serve on
            log(ERROR, "control op %r: %r", request.get("op"), exc)
            reply = {"ok": False, "error": f"internal error: {exc!r}"}
        finally:
            vu.close_all([fd for fd in fds if fd >= 0])
        reply["id"] = request.get("id")
        self._reply(reply)

    def _reply(self, reply: dict[str, object]) -> None:
        try:
            channel.send(self.control, reply)
        except vu.VhostUserError as exc:
            log(INFO, "control connection ended: %s", exc)
            self.running = False

    def _dispatch(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        """The reply's fields. An fd kept is replaced by -1 in ``fds``."""
        op = request.get("op")
        if op == "add":
            return self._add(request, fds)
        if fds and op in GENERIC_OPS:
            raise ValueError(f"op {op!r} takes no fds ({len(fds)} came)")
        if op == "remove":
            name = request.get("name")
            if name not in self.fronts:
                raise ValueError(f"no front-end {name!r}")
            self._remove(name)  # type: ignore[arg-type]
            return {}
        if op == "status":
            fronts = {name: front.status() for name, front in self.fronts.items()}
            return {"pid": os.getpid(), "devices": fronts, **self.device.status()}
        method = self.device.ops.get(op) if isinstance(op, str) else None
        if method is None:
            raise ValueError(f"unknown op {op!r}")
        return getattr(self.device, method)(request, fds)

    def _add(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        name, partition = request.get("name"), request.get("partition")
        args = request.get("args", {})
        if not isinstance(name, str) or not name or name in self.fronts:
            raise ValueError(f"add: name {name!r} (a new front-end's name)")
        if not isinstance(partition, int) or not isinstance(args, dict):
            raise ValueError("add: partition (an integer) and args (an object)")
        if len(fds) != 1:
            raise ValueError(f"add: one fd (a socket), not {len(fds)}")
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError as exc:
            raise ValueError(f"add: the fd is not a socket: {exc}") from None
        fds[0] = -1  # the socket object owns it now
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise ValueError("add: the fd is not a Unix stream socket")
        try:
            model = self.device.create(name, partition, args)
        except BaseException:
            sock.close()
            raise
        front = self.fronts[name] = FrontEnd(sock, name, partition, model)
        self.device.models[name] = model
        self.watch(sock.fileno(), lambda: self._on_vhost_user(front))
        return {}


def die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent and os.getppid() != parent:
        sys.exit("pyvmm back-end: the VMM is already gone")


def accept_one(path: str, timeout: float | None) -> socket.socket:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as listener:
        if os.path.exists(path):
            os.unlink(path)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(timeout)
        conn, _ = listener.accept()
    os.unlink(path)
    conn.settimeout(None)
    return conn


def run(device_type: type[DeviceType], argv: list[str] | None = None) -> int:
    """The process's main: arguments, the control connection, the loop."""
    import argparse  # here: the VMM imports back-end modules for their constants

    parser = argparse.ArgumentParser(prog=f"python -m pyvmm.backends.{device_type.name}")
    parser.add_argument("--control", required=True, help="the Unix socket to accept the VMM on")
    parser.add_argument("--parent", type=int, default=0, help="die when this process does")
    parser.add_argument(
        "--accept-timeout",
        type=float,
        default=ACCEPT_TIMEOUT_S,
        help="seconds to wait for the VMM (0: for ever, a spare process)",
    )
    device_type.add_arguments(parser)
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    log_to_stderr()
    device = device_type(args)
    try:
        conn = accept_one(args.control, args.accept_timeout or None)
    except TimeoutError:
        sys.exit(f"pyvmm {device_type.name} back-end: no VMM connected in {args.accept_timeout} s")
    Host(device, conn).run()
    return 0
