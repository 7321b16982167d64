"""webkv, the HTTP key-value service kernel, through virtio-vsock and virtio-blk,
with real clients: curl and Python sockets on a forwarded host port."""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from harness import GuestProcess
from kvload import KvLoad, longest_stall_ms

pytestmark = pytest.mark.kvm
DISK_SIZE = 16 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebKv:
    def __init__(
        self, kernels, disk, version: str = "v1", backends: str | None = None, *extra: str
    ) -> None:
        """``backends``: --device-backends; None: the default (PYVMM_DEVICE_BACKENDS)."""
        self.port = free_port()
        args = [
            "boot",
            str(kernels / f"webkv-{version}.elf"),
            "--disk",
            str(disk),
            "--forward",
            f"127.0.0.1:{self.port}=80",
            "--mem",
            "256M",
            "--cmdline",
            "console=ttyS0 name=test",
            "--timeout",
            "300",
            *(["--device-backends", backends] if backends else []),
            *extra,
        ]
        self.guest = GuestProcess(args)
        self.guest.expect(r"webkv: ready", timeout=30)

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None):
        conn = self.conn()
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def stop(self) -> None:
        self.guest.kill()


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "kv.img"
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    return path


@pytest.fixture(params=["thread", "process"])
def webkv(kernels, disk, request):
    """The service, with its vsock and disk served by VMM threads, then by back-end
    processes (vhost-user): every service test runs with both."""
    service = WebKv(kernels, disk, backends=request.param)
    yield service
    service.stop()


def curl(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args], text=True, capture_output=True, timeout=30
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_put_get_delete_status(webkv):
    base = f"http://127.0.0.1:{webkv.port}"
    put = curl(webkv.port, "-X", "PUT", "--data-binary", "hello world", f"{base}/kv/greeting")
    assert put.stdout.splitlines()[-1] in ("200", "201", "204"), put
    got = curl(webkv.port, f"{base}/kv/greeting")
    assert got.stdout.rsplit("\n", 1) == ["hello world", "200"]
    status = curl(webkv.port, f"{base}/status")
    body, code = status.stdout.rsplit("\n", 1)
    info = json.loads(body)
    assert code == "200" and info["version"] == "v1" and info["keys"] == 1
    assert info["instance"] == "test"
    deleted = curl(webkv.port, "-X", "DELETE", f"{base}/kv/greeting")
    assert deleted.stdout.splitlines()[-1] in ("200", "204")
    assert curl(webkv.port, f"{base}/kv/greeting").stdout.splitlines()[-1] == "404"
    assert curl(webkv.port, f"{base}/").stdout.splitlines()[-1] == "200"


def test_100_concurrent_keepalive_clients(webkv):
    errors: list[str] = []

    def client(index: int) -> None:
        rng = random.Random(index)
        conn = webkv.conn()
        mine: dict[str, bytes] = {}
        try:
            for step in range(30):
                key = f"c{index}-k{rng.randrange(8)}"
                action = rng.random()
                if action < 0.5:
                    value = f"{index}:{step}:{rng.random()}".encode()
                    conn.request("PUT", f"/kv/{key}", body=value)
                    r = conn.getresponse()
                    r.read()
                    if r.status not in (200, 201, 204):
                        errors.append(f"PUT {key}: {r.status}")
                    mine[key] = value
                elif action < 0.8:
                    conn.request("GET", f"/kv/{key}")
                    r = conn.getresponse()
                    body = r.read()
                    expected = mine.get(key)
                    if expected is None and r.status != 404:
                        errors.append(f"GET {key}: {r.status} for a missing key")
                    if expected is not None and (r.status != 200 or body != expected):
                        errors.append(f"GET {key}: {r.status} {body!r} != {expected!r}")
                else:
                    conn.request("DELETE", f"/kv/{key}")
                    r = conn.getresponse()
                    r.read()
                    if r.status != 204:  # idempotent: 204 whether or not it existed
                        errors.append(f"DELETE {key}: {r.status}")
                    mine.pop(key, None)
        except Exception as exc:
            errors.append(f"client {index}: {exc!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:10]


def raw_exchange(port: int, payload: bytes, half_close: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
                if not half_close and b"\r\n\r\n" in data:
                    break
        except TimeoutError:
            pass
        return data


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /kv/x HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (b"PUT /kv/big HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n", b"413"),
        (b"GET /nothing-here HTTP/1.1\r\nHost: a\r\n\r\n", b"404"),
        (b"POST /kv/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", b"405"),
    ],
)
def test_malformed_requests_get_errors_and_the_server_stays_sane(webkv, payload, status):
    reply = raw_exchange(webkv.port, payload)
    assert reply.split(b" ")[1] == status, reply[:200]
    assert webkv.request("GET", "/status")[0] == 200


def test_half_closed_and_abandoned_connections_do_not_block_others(webkv):
    partial = socket.create_connection(("127.0.0.1", webkv.port), timeout=10)
    partial.sendall(b"PUT /kv/slow HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly part")
    raw_exchange(webkv.port, b"GET /kv/x HTTP/1.1\r\n", half_close=True)
    assert webkv.request("PUT", "/kv/other", b"fine")[0] in (200, 201, 204)
    assert webkv.request("GET", "/kv/other") == (200, b"fine")
    partial.close()


@pytest.mark.parametrize("backends", ["thread", "process"])
def test_state_survives_a_restart(kernels, disk, backends):
    first = WebKv(kernels, disk, backends=backends)
    try:
        for i in range(50):
            assert first.request("PUT", f"/kv/key{i}", f"value{i}".encode())[0] in (200, 201, 204)
        assert first.request("DELETE", "/kv/key7")[0] in (200, 204)
    finally:
        first.stop()  # killed: only what was flushed before each reply may count
    second = WebKv(kernels, disk, backends=backends)
    try:
        assert second.request("GET", "/kv/key0") == (200, b"value0")
        assert second.request("GET", "/kv/key49") == (200, b"value49")
        assert second.request("GET", "/kv/key7")[0] == 404
        assert json.loads(second.request("GET", "/status")[1])["keys"] == 49
    finally:
        second.stop()


def test_torn_tail_record_is_ignored(kernels, disk):
    first = WebKv(kernels, disk)
    try:
        first.request("PUT", "/kv/kept", b"safe-and-sound")
        first.request("PUT", "/kv/torn", b"UNIQUE-TORN-VALUE-0123456789")
    finally:
        first.stop()
    image = bytearray(disk.read_bytes())
    where = image.find(b"UNIQUE-TORN-VALUE-0123456789")
    assert where > 0
    image[where + 10] ^= 0xFF  # the last record no longer matches its checksum
    disk.write_bytes(bytes(image))
    second = WebKv(kernels, disk)
    try:
        assert second.request("GET", "/kv/kept") == (200, b"safe-and-sound")
        assert second.request("GET", "/kv/torn")[0] == 404
        assert second.request("PUT", "/kv/after", b"x")[0] in (200, 201, 204)
        assert second.request("GET", "/kv/after") == (200, b"x")
    finally:
        second.stop()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_v2_adds_prefix_listing(kernels, disk, version):
    service = WebKv(kernels, disk, version)
    try:
        for key in ("apple", "apricot", "banana"):
            service.request("PUT", f"/kv/{key}", b"x")
        status, body = service.request("GET", "/keys?prefix=ap")
        if version == "v1":
            assert status == 404
        else:
            assert (status, body.split()) == (200, [b"apple", b"apricot"])
        assert json.loads(service.request("GET", "/status")[1])["version"] == version
    finally:
        service.stop()


def control_request(path: str, payload: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(json.dumps(payload).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.splitlines()[-1])


def disk_backends(control: str) -> dict:
    backends = control_request(control, {"op": "status"})["result"]["device_backends"]
    return {name: b for name, b in backends.items() if name.startswith("blk")}


def test_a_killed_disk_back_end_is_reported_within_1s_and_restarted(kernels, disk, tmp_path):
    control = str(tmp_path / "node.sock")
    service = WebKv(kernels, disk, "v1", "process", "--control", control)
    try:
        status = control_request(control, {"op": "status"})["result"]
        backends = status["device_backends"]
        assert set(backends) == {"blk0", "blk1", "vsock0", "vsock1"}
        assert all(b["alive"] for b in backends.values())
        # one process serves both partitions' front-ends
        assert backends["blk0"]["pid"] == backends["blk1"]["pid"]

        stop = threading.Event()
        acked: list[int] = []

        def load() -> None:  # PUTs in flight while the back-end dies
            i = 0
            while not stop.is_set():
                try:
                    if service.request("PUT", f"/kv/k{i}", b"v")[0] in (200, 201, 204):
                        acked.append(i)
                except OSError:
                    return
                i += 1

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        while len(acked) < 20:
            threading.Event().wait(0.01)
        os.kill(backends["blk0"]["pid"], signal.SIGKILL)
        killed = time.monotonic()
        while True:
            now = disk_backends(control)
            if all(not b["alive"] or b["restarts"] for b in now.values()):
                break
            if time.monotonic() - killed > 5:
                break
        assert time.monotonic() - killed < 1.0, now  # both front-ends say so
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            now = disk_backends(control)
            if all(b["restarts"] and b["alive"] for b in now.values()):
                break
        for blk in now.values():  # ONE new process serves both again
            assert blk["alive"] and blk["pid"] != backends["blk0"]["pid"], now
            assert blk["restarts"] == 1 and "status -9" in blk["last_death"]
        assert now["blk0"]["pid"] == now["blk1"]["pid"]
        stop.set()
        thread.join(40)  # the guest sets the disk up again: the PUTs go on, none hangs
        assert not thread.is_alive()
        other = now["blk1"]["pid"]
    finally:
        service.stop()
    # the new back-end dies with the VMM (PR_SET_PDEATHSIG)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{other}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{other}")
    # no write acknowledged before the death is lost
    after = WebKv(kernels, disk)
    try:
        missing = [i for i in acked if after.request("GET", f"/kv/k{i}") != (200, b"v")]
    finally:
        after.stop()
    assert not missing and len(acked) >= 20


def test_a_killed_vsock_back_end_is_restarted_and_its_port_never_refuses(kernels, disk, tmp_path):
    """The vsock back-end killed under load: noticed within 1 s, a new process serves
    the listener again from the socket the VMM kept, the streams the dead one carried
    are counted as lost, and the port never refuses a connection meanwhile (clients
    wait in the listen queue)."""
    control = str(tmp_path / "node.sock")
    service = WebKv(kernels, disk, "v1", "process", "--control", control)

    def backends() -> dict:
        return control_request(control, {"op": "status"})["result"]["device_backends"]

    try:
        before = backends()
        pid = before["vsock0"]["pid"]
        assert before["vsock1"]["pid"] == pid  # one process serves every partition
        stop = threading.Event()
        served: list[float] = []
        refused: list[float] = []

        def load() -> None:  # keep-alive clients: their streams live in the back-end
            while not stop.is_set():
                conn = service.conn()
                conn.timeout = 2
                try:
                    while not stop.is_set():
                        conn.request("GET", "/status")
                        response = conn.getresponse()
                        response.read()
                        served.append(time.monotonic())
                except (OSError, http.client.HTTPException):
                    time.sleep(0.01)  # lost with the back-end: a new connection
                finally:
                    conn.close()

        def probe() -> None:  # connects, as a new client would; never refused
            while not stop.is_set():
                try:
                    socket.create_connection(("127.0.0.1", service.port), timeout=2).close()
                except ConnectionRefusedError:
                    refused.append(time.monotonic())
                except OSError:
                    pass
                time.sleep(0.005)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
        threads.append(threading.Thread(target=probe, daemon=True))
        for thread in threads:
            thread.start()
        while len(served) < 100:
            time.sleep(0.01)
        time.sleep(0.3)  # the back-end's counters page has seen the streams
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            vsock0 = backends()["vsock0"]
            if not vsock0["alive"] or vsock0["restarts"] or time.monotonic() - killed > 5:
                break
        assert time.monotonic() - killed < 1.0, vsock0
        deadline = time.monotonic() + 15
        while not (vsock0["restarts"] and vsock0["alive"]) and time.monotonic() < deadline:
            vsock0 = backends()["vsock0"]
        assert vsock0["alive"] and vsock0["pid"] != pid and vsock0["restarts"] == 1
        assert "status -9" in vsock0["last_death"]
        assert vsock0["lost_connections"] >= 1  # the keep-alive streams it carried
        listeners = control_request(control, {"op": "status"})["result"]["service"]["listeners"]
        assert [listener["partition"] for listener in listeners] == [0]
        # new connections are served by the new process once the guest's driver has
        # reset the device (its NEEDS_RESET)
        restarted = time.monotonic()
        deadline = restarted + 20
        while not any(t > restarted for t in served) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(t > restarted for t in served), "nothing served after the restart"
        stop.set()
        for thread in threads:
            thread.join(10)
        assert refused == []
    finally:
        stop.set()
        service.stop()


@pytest.mark.parametrize(
    ("sig", "why"),
    [(signal.SIGKILL, "needs-reset"), (signal.SIGSTOP, "timeout")],
    ids=["killed", "hung"],
)
def test_a_failed_disk_back_end_is_invisible_to_clients(kernels, disk, tmp_path, sig, why):
    """The disk's back-end process dies (SIGKILL: the VMM sets NEEDS_RESET) or hangs
    (SIGSTOP: no request completes; the guest's driver gives up waiting after 5 s, and
    the VMM kills the back-end when it misses the reset's time-out) under kvload's 8
    clients: the guest's driver sets the device up again and replays the requests in
    flight, so no client sees an error, and every acknowledged write is on the disk."""
    control = str(tmp_path / "node.sock")
    service = WebKv(kernels, disk, "v1", "process", "--control", control)
    load = KvLoad(service.port, clients=8)
    try:
        load.start()
        load.wait_started()
        time.sleep(2)  # under load
        pid = control_request(control, {"op": "status"})["result"]["device_backends"]["blk0"]["pid"]
        os.kill(pid, sig)
        reset = service.guest.expect(rf"vblk: device-reset why={why} inflight=(\d+)\n", 20)
        done = service.guest.expect(
            r"vblk: reinitialised tries=(\d+) replayed=(\d+) ms=(\d+)\n", 40
        )
        time.sleep(2)  # and on after it
        load.stop()
        status = json.loads(service.request("GET", "/status")[1])
        assert service.request("PUT", "/kv/after", b"x")[0] == 201
        assert service.request("GET", "/kv/after") == (200, b"x")
        blk0 = control_request(control, {"op": "status"})["result"]["device_backends"]["blk0"]
    finally:
        service.stop()  # SIGKILL: the image is what a fresh boot recovers
    print(
        f"disk back-end {sig.name}: {reset[1]} in flight, set up again after {done[1]} tries"
        f" in {done[3]} ms, {done[2]} replayed; {len(load.samples)} requests, longest"
        f" {longest_stall_ms(load.samples):.0f} ms, {len(load.failures)} failed"
    )
    assert status["disk"] == "ok" and status["disk_resets"] == 1, status
    assert blk0["alive"] and blk0["restarts"] == 1 and "status -9" in blk0["last_death"], blk0
    assert load.failures == []
    assert load.writes > 50 and load.lost_on_disk(str(disk)) == []


@pytest.mark.parametrize("cause", ["ring-error", "killed"])
def test_a_vsock_device_reset_costs_only_the_open_connections(kernels, disk, tmp_path, cause):
    """The vsock device needs a reset under kvload's 8 clients, because its back-end
    process was SIGKILLed (``killed``), or because webkv's vsock-ring-error fault
    published a head index the device must refuse (``ring-error``, a thread back-end:
    the VMM's virtqueue sets NEEDS_RESET). Every stream open at that moment is gone on
    the host's side, so each is reset, and counted; the listeners stay, the driver
    sets the device up again, and new connections are served. A client loses at most
    the one request its connection carried: failures <= the streams open then."""
    agent_port, control = free_port(), str(tmp_path / "node.sock")
    backends = "process" if cause == "killed" else "thread"
    extra = ["--forward", f"127.0.0.1:{agent_port}=7000", "--control", control]
    service = WebKv(kernels, disk, "v1", backends, *extra)
    load = KvLoad(service.port, clients=8)
    try:
        load.start()
        load.wait_started()
        time.sleep(2)
        with socket.create_connection(("127.0.0.1", agent_port), timeout=10) as agent:
            if cause == "killed":
                status = control_request(control, {"op": "status"})["result"]
                os.kill(status["device_backends"]["vsock0"]["pid"], signal.SIGKILL)
            else:
                agent.sendall(b"fault vsock-ring-error\n")
            reset = service.guest.expect(r"vsock: device-reset connections=(\d+)\n", 10)
            done = service.guest.expect(r"vsock: reinitialised tries=(\d+) ms=(\d+)\n", 30)
            try:  # the agent's own stream was one of them
                assert agent.recv(4096) in (b"", b"ok fault=vsock-ring-error\n")
            except ConnectionResetError:
                pass
        time.sleep(2)  # new connections are served
        load.stop()
        status = json.loads(service.request("GET", "/status")[1])
        assert service.request("PUT", "/kv/after", b"x")[0] == 201
    finally:
        service.stop()
    open_streams = int(reset[1])
    print(
        f"vsock device reset ({cause}): {open_streams} streams open (8 clients + the agent),"
        f" set up again after {done[1]} tries in {done[2]} ms; {len(load.samples)} requests,"
        f" {len(load.failures)} failed, {load.reconnects} reconnects,"
        f" longest {longest_stall_ms(load.samples):.0f} ms"
    )
    assert status["vsock_resets"] == 1 and status["streams_lost"] == open_streams, status
    # At most one failure per client whose connection was open, none after: each
    # reconnected and was served.
    assert open_streams <= 9 and len(load.failures) <= min(8, open_streams), load.failures
    assert load.reconnects == len(load.failures)
    assert load.writes > 50 and load.lost_on_disk(str(disk)) == []


def test_a_standby_whose_disk_back_end_died_acquires_at_once(kernels, disk, tmp_path):
    """A standby keeps the disk device it followed the log through set up; when the
    back-end dies meanwhile, the NEEDS_RESET starts the driver's re-initialisation at
    once, so acquire does not wait out the driver's 5 s time-out."""
    agent_port, control = free_port(), str(tmp_path / "node.sock")
    extra = ["--forward", f"127.0.0.1:{agent_port}=7000", "--control", control]
    service = WebKv(kernels, disk, "v1", "process", *extra, "--cmdline", "role=standby")
    try:
        status = control_request(control, {"op": "status"})["result"]
        os.kill(status["device_backends"]["blk0"]["pid"], signal.SIGKILL)
        service.guest.expect(r"vblk: device-reset why=needs-reset inflight=0\n", 10)
        with socket.create_connection(("127.0.0.1", agent_port), timeout=10) as agent:
            began = time.monotonic()
            agent.sendall(b"acquire\n")
            assert agent.makefile().readline() == "serving keys=0\n"
            took = time.monotonic() - began
        service.guest.expect(r"vblk: reinitialised tries=\d+ replayed=\d+ ms=\d+\n", 1)
        assert service.request("PUT", "/kv/k", b"v")[0] == 201
    finally:
        service.stop()
    print(f"acquire took {took:.3f} s")
    assert took < 4.0  # the new back-end's start, not the 5 s time-out


def test_a_disk_back_end_that_stays_dead_ends_in_a_known_state(kernels, disk, tmp_path):
    """The disk's back-end killed more often than the VMM restarts it: the guest's
    driver tries for ~22 s, then gives up with a console line, the write that waited
    is answered 503, and webkv serves on: GETs answered, PUTs refused, /status says
    so."""
    from pyvmm.backends.process import MAX_RESTARTS

    control = str(tmp_path / "node.sock")
    service = WebKv(kernels, disk, "v1", "process", "--control", control)

    def blk0() -> dict:
        return control_request(control, {"op": "status"})["result"]["device_backends"]["blk0"]

    try:
        assert service.request("PUT", "/kv/kept", b"v")[0] == 201
        for restarts in range(MAX_RESTARTS + 1):
            os.kill(blk0()["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 15
            while restarts < MAX_RESTARTS and blk0()["restarts"] <= restarts:
                assert time.monotonic() < deadline, blk0()
                time.sleep(0.05)
        began = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=90)
        conn.request("PUT", "/kv/lost", body=b"v")  # waits for the give-up
        status = conn.getresponse().status
        conn.close()
        waited = time.monotonic() - began
        service.guest.expect(r"vblk: error=reset-failed tries=60 inflight=\d+\n", 5)
        assert status == 503
        assert service.request("GET", "/kv/kept") == (200, b"v")
        assert service.request("PUT", "/kv/again", b"v")[0] == 503
        assert json.loads(service.request("GET", "/status")[1])["disk"] == "error"
    finally:
        service.stop()
    print(f"gave up {waited:.1f} s after the PUT")
