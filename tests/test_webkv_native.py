"""build/webkv-native, the host-native anchor of the webkv benchmarks: webkv's own
sources as a Linux process (TCP sockets for vsock, a file for virtio-blk). It must
behave as the guest does, so the service tests of test_webkv.py run against it
unchanged, and its log must be the guest's: one recovers what the other wrote."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time

import pytest
from conftest import KERNELS, ROOT
from harness import GuestProcess
from test_webkv import (  # the same assertions and disk fixture, against the native build
    WebKv,
    disk,
    free_port,
    test_100_concurrent_keepalive_clients,
    test_curl_put_get_delete_status,
    test_half_closed_and_abandoned_connections_do_not_block_others,
    test_malformed_requests_get_errors_and_the_server_stays_sane,
)

__all__ = [
    "disk",
    "test_100_concurrent_keepalive_clients",
    "test_curl_put_get_delete_status",
    "test_half_closed_and_abandoned_connections_do_not_block_others",
    "test_malformed_requests_get_errors_and_the_server_stays_sane",
]
NATIVE = KERNELS / "webkv-native"


class WebKvNative(WebKv):
    """WebKv's interface (port, request, stop) over build/webkv-native."""

    def __init__(self, disk, name: str = "test") -> None:  # not WebKv's: no pyvmm here
        if not NATIVE.exists():
            make = ["make", "-C", str(ROOT / "guest_kernels")]
            subprocess.run(make, check=True, capture_output=True)
        self.port = free_port()
        args = [f"disk={disk}", f"forward=127.0.0.1:{self.port}=80", f"name={name}"]
        self.guest = GuestProcess(args, program=[str(NATIVE)])
        self.guest.expect(r"webkv: ready", timeout=10)


@pytest.fixture
def webkv(disk):
    service = WebKvNative(disk)
    yield service
    service.stop()


def test_acknowledged_writes_survive_a_kill_under_load(disk):
    """SIGKILL while 8 clients write: every acknowledged PUT and DELETE is in the
    log the next start recovers (group commit acknowledges only after fdatasync).
    The request in flight at the kill may or may not have made it."""
    first = WebKvNative(disk)
    acked: dict[str, bytes | None] = {}  # each key is one client's: last acknowledged value
    in_flight: dict[str, bytes | None] = {}
    stop = threading.Event()

    def client(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", first.port, timeout=10)
        n = 0
        while not stop.is_set():
            key, value = f"c{index}-{n % 40}", f"{index}:{n}".encode()
            n += 1
            new = None if n % 7 == 0 else value
            try:
                if new is None:
                    conn.request("DELETE", f"/kv/{key}")
                else:
                    conn.request("PUT", f"/kv/{key}", body=value)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                in_flight[key] = new  # killed mid-request: not acknowledged
                return
            assert status in (200, 201, 204, 404), status
            acked[key] = new

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        first.guest.kill()
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        first.stop()
    assert len(acked) >= 50, "too few writes to mean anything"
    second = WebKvNative(disk)
    try:
        recovered = second.guest.expect(r"webkv: recovered records=(\d+) keys=(\d+)")
        assert int(recovered[1]) > 0
        for key, value in acked.items():
            status, body = second.request("GET", f"/kv/{key}")
            found = body if status == 200 else None
            allowed = [value] + ([in_flight[key]] if key in in_flight else [])
            assert found in allowed, (key, status, body, allowed)
    finally:
        second.stop()


def test_status_and_restart_keep_the_index(disk):
    first = WebKvNative(disk, name="native-a")
    try:
        for i in range(50):
            assert first.request("PUT", f"/kv/key{i}", f"value{i}".encode())[0] in (200, 201, 204)
        assert first.request("DELETE", "/kv/key7")[0] == 204
    finally:
        first.stop()
    second = WebKvNative(disk, name="native-b")
    try:
        info = json.loads(second.request("GET", "/status")[1])
        assert (info["keys"], info["instance"], info["disk"]) == (49, "native-b", "ok")
        assert second.request("GET", "/kv/key49") == (200, b"value49")
        assert second.request("GET", "/kv/key7")[0] == 404
    finally:
        second.stop()


def test_bad_arguments_and_missing_disk_are_reported(tmp_path):
    bad = subprocess.run(
        [str(NATIVE), "forward=nonsense"], capture_output=True, text=True, timeout=10
    )
    assert bad.returncode == 2 and "forward=" in bad.stderr
    service = GuestProcess([f"forward=127.0.0.1:{free_port()}=80"], program=[str(NATIVE)])
    try:
        service.expect(r"webkv: error=no-disk", timeout=10)
    finally:
        service.kill()


@pytest.mark.kvm
def test_the_guest_recovers_what_the_native_build_wrote(disk):
    """Same sources, same on-disk format: webkv-v1.elf under pyvmm reads the log."""
    native = WebKvNative(disk)
    try:
        for i in range(20):
            native.request("PUT", f"/kv/n{i}", f"native-{i}".encode())
    finally:
        native.stop()
    guest = WebKv(KERNELS, disk)
    try:
        assert guest.request("GET", "/kv/n19") == (200, b"native-19")
        assert json.loads(guest.request("GET", "/status")[1])["keys"] == 20
    finally:
        guest.stop()
