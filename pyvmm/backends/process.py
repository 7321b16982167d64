"""The VMM's side of a back-end process: ``BackendProcess``, one per device type,
serving the front-ends (``front.VhostUserDevice``) of every partition.

It starts ``python -m pyvmm.backends.<type> --control PATH --parent PID [args]`` from
one long-lived thread (``PR_SET_PDEATHSIG`` fires when the *thread* that forked the
child ends), connects to its control socket and watches it through a pidfd, so a
death is noticed at once. ``request(op, fds, timeout)`` sends one control message
(``channel``) and waits for its reply; every request has a time-out (1 s by
default), and a back-end that misses one is killed, since its late reply would put
the stream out of step.

A death (or a kill after a time-out) puts every front-end it served in NEEDS_RESET
(``backend_died``), then ONE new process is started, every front-end is added to it
again (``connect``) and ``restored`` re-sends what the VMM knows of the device type's
state (the disk's lease holder). A driver that resets the device goes on with the new
process. After ``MAX_RESTARTS`` the front-ends stay failed: something keeps killing it.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time

from ..devices.virtio._log import ERROR, WARNING, log
from . import channel
from . import vhost_user as vu

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .front import VhostUserDevice

START_TIMEOUT_S = 10.0  # interpreter start-up and imports, on a loaded machine
MAX_RESTARTS = 5  # then the front-ends stay failed: something keeps killing it
REQUEST_TIMEOUT_S = vu.DEFAULT_TIMEOUT_S

# (command, done, [Popen or the exception]) for the spawner thread; a plain thread and
# queue rather than concurrent.futures, which costs the VMM ~1.2 MiB (it imports logging)
_spawns: queue.SimpleQueue | None = None
_spawner_lock = threading.Lock()


def _spawn(command: list[str]) -> subprocess.Popen:
    """Start a back-end from one long-lived thread: PR_SET_PDEATHSIG fires when the
    *thread* that forked the child ends, and a restart runs on a watcher thread that
    ends right after it."""
    global _spawns
    with _spawner_lock:
        if _spawns is None:
            _spawns = queue.SimpleQueue()
            threading.Thread(
                target=_spawner, args=(_spawns,), name="backend-spawner", daemon=True
            ).start()
    done, result = threading.Event(), []
    _spawns.put((command, done, result))
    done.wait()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _spawner(spawns: queue.SimpleQueue) -> None:
    while True:
        command, done, result = spawns.get()
        try:
            result.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
        except BaseException as exc:  # handed to the caller
            result.append(exc)
        done.set()


def _private_dir() -> str:
    """A new directory only this user can enter, for a back-end's control socket
    (tempfile.mkdtemp's job, without the ~1 MiB tempfile and shutil cost the VMM)."""
    base = os.environ.get("TMPDIR") or "/tmp"
    while True:
        path = os.path.join(base, f"pyvmm-backend-{os.urandom(6).hex()}")
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def _remove_dir(path: str) -> None:
    """Remove a back-end's socket directory (the socket, if it is still there)."""
    try:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
    except OSError:
        pass


class BackendError(Exception):
    """A back-end process could not be started or reached, or refused a request."""


class Child:
    """One OS process of a back-end: started, connected to, watched."""

    def __init__(self, module: str, args: list[str], name: str, on_death) -> None:
        self.name = name
        self._dir = _private_dir()
        path = os.path.join(self._dir, f"{name}.sock")
        command = [sys.executable, "-m", module, "--control", path, "--parent", str(os.getpid())]
        self.proc = _spawn([*command, *args])
        self.pid = self.proc.pid
        self.exit_status: int | None = None
        self.died_at: float | None = None  # monotonic time the death was noticed
        self._on_death = on_death
        self._closing = False
        try:
            self.sock = self._connect(path)
            self._pidfd = os.pidfd_open(self.pid)
        except BaseException:
            self.close()
            raise
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._watcher = threading.Thread(target=self._watch, name=f"{name}-watch", daemon=True)
        self._watcher.start()

    def _connect(self, path: str) -> socket.socket:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise BackendError(f"{self.name}: back-end exited with {self.proc.returncode}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            if time.monotonic() > deadline:
                raise BackendError(f"{self.name}: back-end not listening after {START_TIMEOUT_S} s")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self.exit_status is None

    def _watch(self) -> None:
        ready = select.select([self._pidfd, self._wake], [], [])[0]
        if self._pidfd not in ready:
            return  # closing
        self.exit_status = self.proc.wait()
        self.died_at = time.monotonic()
        if not self._closing:
            status = self.exit_status
            self._on_death(self, f"back-end process {self.pid} exited with status {status}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def wait_dead(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if getattr(self, "sock", None) is not None:
            self.sock.close()
        self.kill()
        self.proc.wait(5)
        if hasattr(self, "_wake"):
            os.eventfd_write(self._wake, 1)
            if threading.current_thread() is not self._watcher:
                self._watcher.join(2)
            os.close(self._wake)
        if hasattr(self, "_pidfd"):
            os.close(self._pidfd)
        _remove_dir(self._dir)


class BackendProcess:
    """The back-end process of one device type, restarted when it dies."""

    def __init__(self, module: str, args: list[str], name: str) -> None:
        self.module, self.args, self.name = module, args, name
        self.fronts: list[VhostUserDevice] = []
        self.restarts = 0
        self.error = ""  # why the back-end is unusable, while it is
        self.last_death = ""  # how the last process ended, if one did
        self._closed = False
        self._request_lock = threading.Lock()  # one request and its reply at a time
        self._restart_lock = threading.Lock()  # one restart at a time
        self._next_id = 0
        self.child = Child(module, args, name, self._died)

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def alive(self) -> bool:
        return self.child.alive

    def request(
        self, op: str, fds: list[int] = (), timeout: float = REQUEST_TIMEOUT_S, **fields: object
    ) -> dict[str, object]:
        """Send a control request; its reply's fields. BackendError if it is refused,
        the process is dead, or no reply came within ``timeout`` (then it is killed)."""
        deadline = time.monotonic() + timeout
        if not self._request_lock.acquire(timeout=timeout):
            raise BackendError(f"{self.name}: {op}: another request holds the channel")
        try:
            child = self.child
            if not child.alive:
                raise BackendError(f"{self.name}: {op}: the back-end process is dead")
            self._next_id += 1
            ident = self._next_id
            try:
                channel.send(child.sock, {"op": op, "id": ident, **fields}, list(fds))
                reply, got = channel.receive(child.sock, max(0.0, deadline - time.monotonic()))
                vu.close_all(got)
            except (vu.VhostUserError, channel.Malformed) as exc:
                self.fail(f"{op}: {exc}")
                raise BackendError(f"{self.name}: {op}: {exc}") from None
            if reply.get("id") != ident:
                self.fail(f"{op}: reply {reply.get('id')} to request {ident}")
                raise BackendError(f"{self.name}: {op}: reply out of step")
        finally:
            self._request_lock.release()
        if not reply.get("ok"):
            raise BackendError(f"{self.name}: {op}: {reply.get('error')}")
        return reply

    def fail(self, reason: str) -> None:
        """The process is unusable (a time-out, a reply out of step): kill it; its
        death restarts it."""
        child = self.child
        if child.alive:
            log(ERROR, "%s: %s: killing back-end process %d", self.name, reason, child.pid)
            self.error = reason
            child.kill()

    def attach(self, front: VhostUserDevice) -> None:
        front.connect()
        self.fronts.append(front)

    def detach(self, front: VhostUserDevice) -> None:
        """A front-end is closed; the process goes with the last one."""
        if front in self.fronts:
            self.fronts.remove(front)
        if not self.fronts:
            self.close()
        elif self.alive:
            try:
                self.request("remove", name=front.name)
            except BackendError as exc:
                log(WARNING, "%s: %s", front.name, exc)

    def status(self, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, object]:
        """The back-end's own account: per front-end, rings, calls, errors."""
        return self.request("status", timeout=timeout)

    def describe(self) -> dict[str, object]:
        child = self.child
        return {
            "pid": child.pid,
            "alive": child.alive and not self.error,
            "exit_status": child.exit_status,
            "error": self.error or None,
            "restarts": self.restarts,
            "last_death": self.last_death or None,
        }

    def restored(self) -> None:
        """After a restart, once every front-end is added again: re-send the device
        type's state the VMM knows. Subclasses extend it."""

    def _died(self, child: Child, reason: str) -> None:
        """On the watcher thread: every front-end goes NEEDS_RESET; then one new
        process, with every front-end added again."""
        with self._restart_lock:
            if child is not self.child or self._closed:
                return
            log(ERROR, "%s: %s", self.name, reason)
            self.error = self.last_death = reason
            for front in list(self.fronts):
                front.backend_died(reason)
            if self.restarts >= MAX_RESTARTS:
                log(ERROR, "%s: %d restarts: the back-end stays down", self.name, self.restarts)
                return
            try:
                new = Child(self.module, self.args, self.name, self._died)  # ~0.5 s
            except (BackendError, OSError) as exc:
                log(ERROR, "%s: restart failed: %s", self.name, exc)
                return
            if self._closed:
                new.close()
                return
            self.child = new
            child.close()
            try:
                for front in list(self.fronts):
                    front.connect()
                self.restored()
            except BackendError as exc:
                log(ERROR, "%s: restart: %s", self.name, exc)
                return
            # counted once it serves again: ``restarts`` going up means "restored"
            self.restarts += 1
            self.error = ""
            for front in list(self.fronts):
                front.backend_restored()
            log(WARNING, "%s: back-end restarted (pid %d)", self.name, new.pid)

    def close(self) -> None:
        self._closed = True
        self.child.close()
