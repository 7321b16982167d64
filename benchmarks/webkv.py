"""webkv throughput and latency with wrk through `pyvmm boot --forward`, for GET and
PUT, with the disk on tmpfs and on the real disk.

    python benchmarks/webkv.py [--seconds 5] [--connections 16]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import KERNELS, pyvmm_command, report

PUT_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("PUT", "/kv/bench" .. (counter % 1000), nil, "value-" .. counter)
end
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /status HTTP/1.1\r\nHost: b\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("webkv did not come up")


def wrk(port: int, path: str, seconds: float, connections: int, script: str | None) -> dict:
    command = [
        "wrk",
        "-t",
        "1",
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--latency",
    ]
    if script:
        command += ["-s", script]
    done = subprocess.run(
        [*command, f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    out = done.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    latency = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        latency[f"p{pct}_ms"] = round(float(m[1]) * UNITS[m[2]], 3)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests_per_s": rps,
        **latency,
        "non_2xx": int(errors[1]) if errors else 0,
        "socket_errors": socket_errors[1] if socket_errors else None,
    }


def run(disk_dir: str, seconds: float, connections: int, put_script: str) -> dict:
    with tempfile.TemporaryDirectory(dir=disk_dir) as tmp:
        disk = Path(tmp) / "kv.img"
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        port = free_port()
        command = [
            *pyvmm_command(),
            "boot",
            str(KERNELS / "webkv-v1.elf"),
            "--disk",
            str(disk),
            "--forward",
            f"127.0.0.1:{port}=80",
            "--timeout",
            str(seconds * 4 + 60),
        ]
        node = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(port)
            put = wrk(port, "/", seconds, connections, put_script)
            get = wrk(port, "/kv/bench1", seconds, connections, None)
        finally:
            node.kill()
            node.wait()
    return {"put": put, "get": get}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(PUT_SCRIPT)
        put_script = f.name
    try:
        places = {"tmpfs": "/dev/shm", "disk": str(Path(__file__).resolve().parent)}
        results = {
            name: run(d, args.seconds, args.connections, put_script) for name, d in places.items()
        }
    finally:
        os.unlink(put_script)
    result = {
        "benchmark": "webkv",
        "seconds": args.seconds,
        "connections": args.connections,
        **results,
    }
    report(
        result,
        "webkv: "
        + "; ".join(
            f"{name} GET {r['get']['requests_per_s']:.0f} req/s p50 {r['get']['p50_ms']} ms "
            f"p99 {r['get']['p99_ms']} ms, PUT {r['put']['requests_per_s']:.0f} req/s "
            f"p50 {r['put']['p50_ms']} ms p99 {r['put']['p99_ms']} ms"
            for name, r in results.items()
        ),
    )


if __name__ == "__main__":
    main()
