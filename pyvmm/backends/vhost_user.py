"""The vhost-user protocol (QEMU's docs/interop/vhost-user.rst), the subset pyvmm's
virtio-vsock and virtio-blk back-ends need, both sides of it.

A message is a 12-byte header (request, flags, payload size; native byte order,
little-endian here) and its payload; file descriptors travel as SCM_RIGHTS with the
message. ``FrontEnd`` is the VMM's side: it owns guest RAM and the eventfds and
configures the back-end. ``BackEnd`` is the device process's side: it checks every
value the front-end sends (a back-end trusts no more than a device does), maps the
memory table and translates ring addresses, which are the *front-end's virtual
addresses*, not guest-physical ones.

Every wait has a time-out (``VhostUserTimeout``), so a hung back-end cannot stall a
vCPU thread that asks it something from an MMIO handler. A malformed message ends
the connection (``ProtocolError``): the spec gives no way to resynchronise a byte
stream. A well-formed request with bad values is refused: with REPLY_ACK the
front-end gets a non-zero ack and a ``RequestRefused``, and the back-end goes on.
"""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
import struct
import time
from enum import IntEnum

from ..record import Record


class Request(IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18


VERSION = 0x1  # flags bits 0-1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
F_PROTOCOL_FEATURES = 1 << 30  # a virtio feature bit reserved by vhost-user
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8  # SET_VRING_KICK/CALL/ERR: no fd (polling)
MAX_REGIONS = 8
MAX_FDS = 8
MAX_QUEUE_SIZE = 32768
HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_HEADER = struct.Struct("<II")
MEM_REGION = struct.Struct("<QQQQ")
MAX_PAYLOAD = MEM_HEADER.size + MAX_REGIONS * MEM_REGION.size
DEFAULT_TIMEOUT_S = 1.0

# payload size each request must carry (SET_MEM_TABLE: checked against nregions)
PAYLOAD_SIZE = {
    Request.GET_FEATURES: 0,
    Request.SET_FEATURES: U64.size,
    Request.SET_OWNER: 0,
    Request.RESET_OWNER: 0,
    Request.SET_VRING_NUM: VRING_STATE.size,
    Request.SET_VRING_ADDR: VRING_ADDR.size,
    Request.SET_VRING_BASE: VRING_STATE.size,
    Request.GET_VRING_BASE: VRING_STATE.size,
    Request.SET_VRING_KICK: U64.size,
    Request.SET_VRING_CALL: U64.size,
    Request.SET_VRING_ERR: U64.size,
    Request.GET_PROTOCOL_FEATURES: 0,
    Request.SET_PROTOCOL_FEATURES: U64.size,
    Request.GET_QUEUE_NUM: 0,
    Request.SET_VRING_ENABLE: VRING_STATE.size,
}
GETS = (
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM,
)


class VhostUserError(Exception):
    """A vhost-user exchange failed."""


class ProtocolError(VhostUserError):
    """A malformed message, or the peer went away: the connection is unusable."""


class VhostUserTimeout(VhostUserError):
    """The peer did not answer within the time-out."""


class RequestRefused(VhostUserError):
    """The back-end refused a well-formed request (a non-zero REPLY_ACK)."""


class Message(Record):
    request: int
    flags: int
    payload: bytes
    fds: list[int]

    def close_fds(self) -> None:
        close_all(self.fds)
        self.fds = []


class MemoryRegion(Record, frozen=True):
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int  # where the front-end mapped it
    mmap_offset: int  # of the region in the fd


class VringAddr(Record, frozen=True):
    index: int
    flags: int
    desc: int  # front-end virtual addresses
    used: int
    avail: int
    log: int = 0


# ---- framing ----


def send_frame(sock: socket.socket, data: bytes, fds: list[int] = (), what: str = "") -> None:
    """Send ``data`` whole, ``fds`` (SCM_RIGHTS) with its first byte. The one place
    both vhost-user and the back-ends' control channel (``channel``) send."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        sent = sock.sendmsg([data], ancillary)
        if sent < len(data):
            sock.sendall(data[sent:])
    except OSError as exc:
        raise ProtocolError(f"cannot send {what}: {exc}") from exc


def send_message(
    sock: socket.socket, request: int, flags: int, payload: bytes = b"", fds: list[int] = ()
) -> None:
    data = HEADER.pack(request, flags | VERSION, len(payload)) + payload
    send_frame(sock, data, fds, f"vhost-user request {request}")


def _wait_readable(sock: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([sock], [], [], left)[0]:
        raise VhostUserTimeout("vhost-user: no message within the time-out")


def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        _wait_readable(sock, deadline)
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ProtocolError("vhost-user: connection closed in the middle of a message")
        data += chunk
    return data


def recv_head(
    sock: socket.socket, size: int, deadline: float, max_fds: int = MAX_FDS
) -> tuple[bytes, list[int]]:
    """The first ``size`` bytes of a message and the fds that came with them (the
    caller closes the fds if the rest turns out malformed). ProtocolError if the
    peer closed the connection or sent more than ``max_fds`` fds."""
    _wait_readable(sock, deadline)
    fd_space = socket.CMSG_SPACE(max_fds * array.array("i").itemsize)
    try:
        head, ancillary, msg_flags, _ = sock.recvmsg(size, fd_space)
    except OSError as exc:
        raise ProtocolError(f"receive failed: {exc}") from exc
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds_here = array.array("i")
            fds_here.frombytes(data[: len(data) - len(data) % fds_here.itemsize])
            fds += list(fds_here)
    try:
        if not head:
            raise ProtocolError("connection closed")
        if msg_flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"more than {max_fds} fds with one message")
        return head + recv_exact(sock, size - len(head), deadline), fds
    except VhostUserError:
        close_all(fds)
        raise


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def recv_message(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT_S) -> Message:
    """One message with the fds that came with it; ProtocolError if it is malformed
    (then the fds are closed) or the peer closed the connection."""
    deadline = time.monotonic() + timeout
    try:
        head, fds = recv_head(sock, HEADER.size, deadline)
    except ProtocolError as exc:
        raise ProtocolError(f"vhost-user: {exc}") from None
    try:
        request, flags, size = HEADER.unpack(head)
        if flags & 0x3 != VERSION:
            raise ProtocolError(f"vhost-user: version {flags & 3} (only {VERSION} is spoken)")
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"vhost-user: payload of {size} bytes (at most {MAX_PAYLOAD})")
        payload = recv_exact(sock, size, deadline) if size else b""
    except VhostUserError:
        close_all(fds)
        raise
    return Message(request, flags, payload, fds)


# ---- payloads ----


def pack_mem_table(regions: list[MemoryRegion]) -> bytes:
    out = MEM_HEADER.pack(len(regions), 0)
    for r in regions:
        out += MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
    return out


def unpack_mem_table(payload: bytes) -> list[MemoryRegion]:
    if len(payload) < MEM_HEADER.size:
        raise ValueError("memory table shorter than its header")
    count, _ = MEM_HEADER.unpack_from(payload)
    if not 1 <= count <= MAX_REGIONS:
        raise ValueError(f"{count} memory regions (1 to {MAX_REGIONS})")
    if len(payload) < MEM_HEADER.size + count * MEM_REGION.size:
        raise ValueError(f"memory table too short for {count} regions")
    return [
        MemoryRegion(*MEM_REGION.unpack_from(payload, MEM_HEADER.size + i * MEM_REGION.size))
        for i in range(count)
    ]


# ---- the front-end (VMM) ----


class FrontEnd:
    """The VMM's side of one back-end connection. Not thread-safe: one caller at a
    time (the device's lock)."""

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.sock = sock
        self.timeout = timeout
        self.reply_ack = False  # PROTOCOL_F_REPLY_ACK negotiated

    def _call(self, request: Request, payload: bytes = b"", fds: list[int] = ()) -> bytes:
        """Send; wait for the reply of a GET, or the ack when REPLY_ACK is on."""
        want_ack = self.reply_ack and request not in GETS
        send_message(self.sock, request, FLAG_NEED_REPLY if want_ack else 0, payload, list(fds))
        if request not in GETS and not want_ack:
            return b""
        reply = recv_message(self.sock, self.timeout)
        reply.close_fds()  # none are expected
        if reply.request != request or not reply.flags & FLAG_REPLY:
            raise ProtocolError(
                f"vhost-user: {request.name}: got request {reply.request} flags "
                f"{reply.flags:#x} instead of its reply"
            )
        if want_ack:
            if len(reply.payload) != U64.size:
                raise ProtocolError(
                    f"vhost-user: {request.name}: ack of {len(reply.payload)} bytes"
                )
            if status := U64.unpack(reply.payload)[0]:
                raise RequestRefused(f"vhost-user: the back-end refused {request.name} ({status})")
        return reply.payload

    def _u64(self, request: Request) -> int:
        payload = self._call(request)
        if len(payload) != U64.size:
            raise ProtocolError(f"vhost-user: {request.name}: reply of {len(payload)} bytes")
        return U64.unpack(payload)[0]

    def set_owner(self) -> None:
        self._call(Request.SET_OWNER)

    def get_features(self) -> int:
        return self._u64(Request.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self._call(Request.SET_FEATURES, U64.pack(features))

    def get_protocol_features(self) -> int:
        return self._u64(Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self._call(Request.SET_PROTOCOL_FEATURES, U64.pack(features))
        self.reply_ack = bool(features & PROTOCOL_F_REPLY_ACK)

    def negotiate(self, wanted: int, wanted_protocol: int = PROTOCOL_F_REPLY_ACK) -> int:
        """SET_OWNER, then the features both sides have (protocol features, with
        REPLY_ACK, if the back-end offers F_PROTOCOL_FEATURES); returns them."""
        self.set_owner()
        offered = self.get_features()
        features = offered & (wanted | F_PROTOCOL_FEATURES)
        if features & F_PROTOCOL_FEATURES:
            self.set_protocol_features(self.get_protocol_features() & wanted_protocol)
        self.set_features(features)
        return features

    def set_mem_table(self, regions: list[MemoryRegion], fds: list[int]) -> None:
        if len(regions) != len(fds):
            raise ValueError("one fd per memory region")
        self._call(Request.SET_MEM_TABLE, pack_mem_table(regions), fds)

    def set_vring_num(self, index: int, num: int) -> None:
        self._call(Request.SET_VRING_NUM, VRING_STATE.pack(index, num))

    def set_vring_addr(self, addr: VringAddr) -> None:
        payload = VRING_ADDR.pack(
            addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log
        )
        self._call(Request.SET_VRING_ADDR, payload)

    def set_vring_base(self, index: int, base: int) -> None:
        self._call(Request.SET_VRING_BASE, VRING_STATE.pack(index, base))

    def get_vring_base(self, index: int) -> int:
        """Stops the ring; returns the next available index the back-end would take."""
        payload = self._call(Request.GET_VRING_BASE, VRING_STATE.pack(index, 0))
        if len(payload) != VRING_STATE.size:
            raise ProtocolError(f"vhost-user: GET_VRING_BASE: reply of {len(payload)} bytes")
        got_index, base = VRING_STATE.unpack(payload)
        if got_index != index:
            raise ProtocolError(
                f"vhost-user: GET_VRING_BASE of ring {index} answered for {got_index}"
            )
        return base

    def _vring_fd(self, request: Request, index: int, fd: int | None) -> None:
        if fd is None:
            self._call(request, U64.pack(index | VRING_NOFD))
        else:
            self._call(request, U64.pack(index), [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._call(Request.SET_VRING_ENABLE, VRING_STATE.pack(index, int(enable)))


# ---- the back-end (device process) ----


class Vring(Record):
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0  # next available index to take
    kick: int = -1
    call: int = -1
    err: int = -1  # the back-end signals it when the guest broke the ring
    enabled: bool = False
    started: bool = False


class _Mapping(Record):
    region: MemoryRegion
    map: mmap.mmap


def _accepted(payload: bytes, offered: int, what: str) -> int:
    """The features a SET_FEATURES or SET_PROTOCOL_FEATURES message chooses: only
    bits that were offered."""
    (features,) = U64.unpack(payload)
    if features & ~offered:
        raise ValueError(f"{what} {features & ~offered:#x} were not offered")
    return features


class BackEnd:
    """The device process's side of one connection: the protocol's state, checked.

    ``features`` are the device's virtio features (F_PROTOCOL_FEATURES is added).
    ``serve_one`` handles one message; the device's data path reads the rings
    through ``translate`` once a ring is started (``vrings[i].started``)."""

    def __init__(
        self,
        sock: socket.socket,
        features: int,
        queues: int,
        protocol_features: int = PROTOCOL_F_REPLY_ACK,
    ) -> None:
        self.sock = sock
        self.offered = features | F_PROTOCOL_FEATURES
        self.offered_protocol = protocol_features
        self.features = 0
        self.protocol_features = 0
        self.owned = False
        self.vrings = [Vring() for _ in range(queues)]
        self.memory: list[_Mapping] = []
        self.refused = 0  # requests refused for bad values
        self.last_refusal = ""  # why (the protocol carries no reason)

    # -- memory --

    def translate(self, uaddr: int, length: int) -> memoryview:
        """The bytes at front-end virtual address [uaddr, uaddr + length), within
        one region of the memory table; ValueError otherwise."""
        return self._window("userspace_addr", uaddr, length, "address")

    def gpa(self, gpa: int, length: int) -> memoryview:
        """The bytes at guest-physical [gpa, gpa + length) (descriptors carry GPAs)."""
        return self._window("guest_phys_addr", gpa, length, "guest-physical")

    def _window(self, base: str, addr: int, length: int, what: str) -> memoryview:
        """[addr, addr + length) within one region, ``base`` the region's field that
        gives its start in that address space; ValueError otherwise."""
        for m in self.memory:
            start = addr - getattr(m.region, base)
            if length >= 0 and start >= 0 and start + length <= m.region.memory_size:
                return memoryview(m.map)[start : start + length]
        raise ValueError(f"{what} {addr:#x}+{length:#x} is in no memory region")

    def _unmap(self) -> None:
        for m in self.memory:
            try:
                m.map.close()
            except BufferError:
                pass  # a view is still exported; the mapping goes with the process
        self.memory = []

    def _set_mem_table(self, msg: Message) -> None:
        regions = unpack_mem_table(msg.payload)
        if len(msg.fds) != len(regions):
            raise ValueError(f"{len(regions)} regions came with {len(msg.fds)} fds")
        page = mmap.PAGESIZE
        for r in regions:
            if not r.memory_size or r.mmap_offset % page or r.memory_size % page:
                raise ValueError(f"region {r} is empty or not page-aligned")
            if max(r.guest_phys_addr, r.userspace_addr) + r.memory_size > 1 << 64:
                raise ValueError(f"region {r} wraps around")
        maps = []
        try:
            for r, fd in zip(regions, msg.fds, strict=True):
                maps.append(
                    _Mapping(r, mmap.mmap(fd, r.memory_size, mmap.MAP_SHARED, offset=r.mmap_offset))
                )
        except (OSError, ValueError) as exc:
            for m in maps:
                m.map.close()
            raise ValueError(f"cannot map the memory table: {exc}") from exc
        self._unmap()
        self.memory = maps

    # -- rings --

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise ValueError(f"ring {index} does not exist ({len(self.vrings)} rings)")
        return self.vrings[index]

    def _set_vring_addr(self, payload: bytes) -> None:
        addr = VringAddr(*VRING_ADDR.unpack(payload))
        ring = self._vring(addr.index)
        if not ring.num:
            raise ValueError(f"ring {addr.index}: SET_VRING_ADDR before SET_VRING_NUM")
        # every part of the ring must lie in the memory table (and be aligned)
        for name, where, size, align in (
            ("descriptor table", addr.desc, 16 * ring.num, 16),
            ("available ring", addr.avail, 6 + 2 * ring.num, 2),
            ("used ring", addr.used, 6 + 8 * ring.num, 4),
        ):
            if where % align:
                raise ValueError(f"ring {addr.index}: {name} at {where:#x} is not {align}-aligned")
            self.translate(where, size)
        ring.addr = addr

    def _set_vring_fd(self, msg: Message, attr: str) -> None:
        (value,) = U64.unpack(msg.payload)
        ring = self._vring(value & VRING_INDEX_MASK)
        nofd = bool(value & VRING_NOFD)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD) or len(msg.fds) != (0 if nofd else 1):
            raise ValueError(f"{Request(msg.request).name}: {value:#x} with {len(msg.fds)} fds")
        old = getattr(ring, attr)
        if old >= 0:
            os.close(old)
        setattr(ring, attr, -1 if nofd else msg.fds.pop())
        if attr == "kick":
            # The ring starts on its kick; without F_PROTOCOL_FEATURES it is enabled
            # at once, with it SET_VRING_ENABLE decides.
            ring.started = ring.addr is not None
            if not self.features & F_PROTOCOL_FEATURES:
                ring.enabled = True

    def _handle(self, msg: Message) -> bytes | None:
        """The reply payload of a GET, or None; ValueError if the values are bad."""
        request = msg.request
        if request not in PAYLOAD_SIZE and request != Request.SET_MEM_TABLE:
            raise ValueError(f"request {request} is not supported")
        if request in PAYLOAD_SIZE and len(msg.payload) != PAYLOAD_SIZE[request]:
            raise ValueError(f"{Request(request).name} with {len(msg.payload)} payload bytes")
        if (
            request not in (Request.SET_OWNER, Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES)
            and not self.owned
        ):
            raise ValueError(f"{Request(request).name} before SET_OWNER")
        if (
            request
            not in (
                Request.SET_MEM_TABLE,
                Request.SET_VRING_KICK,
                Request.SET_VRING_CALL,
                Request.SET_VRING_ERR,
            )
            and msg.fds
        ):
            raise ValueError(f"{Request(request).name} takes no fds")
        match request:
            case Request.SET_OWNER:
                self.owned = True
            case Request.RESET_OWNER:
                self.reset()
            case Request.GET_FEATURES:
                return U64.pack(self.offered)
            case Request.SET_FEATURES:
                self.features = _accepted(msg.payload, self.offered, "features")
            case Request.GET_PROTOCOL_FEATURES:
                return U64.pack(self.offered_protocol)
            case Request.SET_PROTOCOL_FEATURES:
                self.protocol_features = _accepted(
                    msg.payload, self.offered_protocol, "protocol features"
                )
            case Request.GET_QUEUE_NUM:
                return U64.pack(len(self.vrings))
            case Request.SET_MEM_TABLE:
                self._set_mem_table(msg)
            case Request.SET_VRING_NUM:
                index, num = VRING_STATE.unpack(msg.payload)
                if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
                    raise ValueError(
                        f"ring {index}: size {num} (a power of two to {MAX_QUEUE_SIZE})"
                    )
                ring = self._vring(index)
                if ring.started:
                    raise ValueError(f"ring {index} is running")
                ring.num, ring.addr = num, None
            case Request.SET_VRING_ADDR:
                self._set_vring_addr(msg.payload)
            case Request.SET_VRING_BASE:
                index, base = VRING_STATE.unpack(msg.payload)
                ring = self._vring(index)
                if ring.started or base > 0xFFFF:
                    raise ValueError(f"ring {index}: base {base} (running, or above 65535)")
                ring.base = base
            case Request.GET_VRING_BASE:
                index, _ = VRING_STATE.unpack(msg.payload)
                ring = self._vring(index)
                ring.started = ring.enabled = False  # the standard way to stop a ring
                for attr in ("kick", "call", "err"):
                    if getattr(ring, attr) >= 0:
                        os.close(getattr(ring, attr))
                        setattr(ring, attr, -1)
                return VRING_STATE.pack(index, ring.base)
            case Request.SET_VRING_KICK:
                self._set_vring_fd(msg, "kick")
            case Request.SET_VRING_CALL:
                self._set_vring_fd(msg, "call")
            case Request.SET_VRING_ERR:
                self._set_vring_fd(msg, "err")
            case Request.SET_VRING_ENABLE:
                index, enable = VRING_STATE.unpack(msg.payload)
                if not self.features & F_PROTOCOL_FEATURES or enable > 1:
                    raise ValueError(f"SET_VRING_ENABLE {enable} without protocol features")
                self._vring(index).enabled = bool(enable)
        return None

    def serve_one(self, timeout: float | None = None) -> None:
        """Handle the next message. Bad values: refused (non-zero ack with REPLY_ACK,
        else ProtocolError); a malformed message: ProtocolError."""
        msg = recv_message(self.sock, DEFAULT_TIMEOUT_S if timeout is None else timeout)
        try:
            try:
                reply = self._handle(msg)
                status = 0
            except (ValueError, struct.error) as exc:
                reply, status, refused = None, 1, exc
                self.refused += 1
                self.last_refusal = str(exc)
            if msg.request in GETS and msg.request in PAYLOAD_SIZE:
                if status:
                    raise ProtocolError(f"vhost-user: {refused}")  # a GET has no ack to refuse
                send_message(self.sock, msg.request, FLAG_REPLY, reply or b"")
            elif msg.flags & FLAG_NEED_REPLY and self.protocol_features & PROTOCOL_F_REPLY_ACK:
                send_message(self.sock, msg.request, FLAG_REPLY, U64.pack(status))
            elif status:
                raise ProtocolError(f"vhost-user: {refused}")
        finally:
            msg.close_fds()  # the ones not taken over

    def reset(self) -> None:
        """Forget everything (RESET_OWNER, or the connection closed)."""
        for ring in self.vrings:
            for fd in (ring.kick, ring.call, ring.err):
                if fd >= 0:
                    os.close(fd)
        self.vrings = [Vring() for _ in self.vrings]
        self._unmap()
        self.features = self.protocol_features = 0
        self.owned = False
