"""webkv throughput and latency with wrk through `pyvmm boot --forward`, for GET and
PUT, with the disk on tmpfs and on the real disk, alternated in rounds by the
harness (benchmarks/harness.py); ratios are to tmpfs.

    python benchmarks/webkv.py [--seconds 3] [--connections 16] [--rounds 10] [--pin]
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

import harness
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


def wrk(
    port: int,
    path: str,
    seconds: float,
    connections: int,
    script: str | None,
    pinning: harness.Pinning | None = None,
) -> dict:
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
        preexec_fn=pinning.load_preexec() if pinning else None,
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


def run(
    disk_dir: str,
    seconds: float,
    connections: int,
    put_script: str,
    pinning: harness.Pinning | None = None,
) -> dict:
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
            put = wrk(port, "/", seconds, connections, put_script, pinning)
            get = wrk(port, "/kv/bench1", seconds, connections, None, pinning)
        finally:
            node.kill()
            node.wait()
    return {"put": put, "get": get}


def metrics(result: dict) -> dict[str, float]:
    """One run's figures for the harness: throughput and latency of PUT and GET."""
    return {
        f"{op}_{key}": result[op][key]
        for op in ("put", "get")
        for key in ("requests_per_s", "p50_ms", "p99_ms")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--aa", default=None, help="A/A: this configuration against itself")
    harness.add_arguments(parser, harness.Plan(min_rounds=10, max_rounds=10, time_cap_s=300))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    pinning = harness.Pinning.split(args.pin)
    pinning.apply_measured()
    state_before = harness.machine_state()
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(PUT_SCRIPT)
        put_script = f.name
    places = {"tmpfs": "/dev/shm", "disk": str(Path(__file__).resolve().parent)}
    errors: dict[str, list] = {name: [] for name in places}

    def runner(name: str, place: str):
        def once() -> dict[str, float]:
            result = run(place, args.seconds, args.connections, put_script, pinning)
            for op in ("put", "get"):
                if result[op]["non_2xx"] or result[op]["socket_errors"]:
                    errors[name].append(result[op])
            return metrics(result)

        return once

    configs = {name: runner(name, place) for name, place in places.items()}
    baseline = "tmpfs"
    if args.aa:
        configs, baseline = harness.aa_configs(configs, args.aa), args.aa
    try:
        rounds = harness.run_rounds(
            configs, baseline, harness.plan_from(args), progress=harness.stderr_progress("webkv")
        )
    finally:
        os.unlink(put_script)
    out = rounds.to_json()
    result = {
        "benchmark": "webkv",
        "seconds": args.seconds,
        "connections": args.connections,
        **out,
        "errors": {name: e for name, e in errors.items() if e},
        "pinning": pinning.to_json(),
        "machine_before": state_before,
        "machine_after": harness.machine_state(),
    }
    medians = out["configs"]
    report(
        result,
        f"webkv: {out['method']['rounds']} rounds of {args.seconds:g} s; "
        + "; ".join(
            f"{name} GET {m['get_requests_per_s']['median']:.0f} req/s "
            f"p99 {m['get_p99_ms']['median']} ms, PUT {m['put_requests_per_s']['median']:.0f} "
            f"req/s p99 {m['put_p99_ms']['median']} ms"
            for name, m in medians.items()
        )
        + "; "
        + "; ".join(
            f"{name}/{baseline} GET {harness.ci_text(r['get_requests_per_s'])}, "
            f"PUT {harness.ci_text(r['put_requests_per_s'])}"
            for name, r in out["ratios"].items()
        ),
    )


if __name__ == "__main__":
    main()
