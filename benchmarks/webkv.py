"""webkv throughput and latency under pyvmm (`pyvmm boot --forward`) side by side
with webkv-native (the same webkv sources as a host process, guest_kernels/README.md),
with the same clients on the same disk: wrk (GET and PUT) and examples/kvload.py
(8 keep-alive clients writing and reading back: p50, p99, max, and the longest
request in windows the length of an upgrade, ``--window-ms``), and the server's CPU
time per wrk request (all its processes' threads, from /proc: robust where the
machine is shared, unlike wall-clock figures). Server ``pyvmm-process`` is pyvmm with
its disk served by a back-end process (``--device-backends process``); its CPU time
includes the back-end's. Every configuration
(server x disk place: tmpfs, the real disk) runs once per round, alternated by the
harness (benchmarks/harness.py); ``pyvmm_over_native`` gives the paired ratios.

    python benchmarks/webkv.py [--seconds 3] [--kvload-seconds 4] [--connections 16]
        [--servers pyvmm,pyvmm-process,native] [--places tmpfs,disk] [--rounds 10] [--pin]
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import harness
from common import KERNELS, ROOT, pyvmm_command, report

sys.path.insert(0, str(ROOT / "examples"))
from kvload import KvLoad, summarize, window_stalls

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
    requests = int(re.search(r"(\d+) requests in", out)[1])
    latency = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        latency[f"p{pct}_ms"] = round(float(m[1]) * UNITS[m[2]], 3)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests_per_s": rps,
        "requests": requests,
        **latency,
        "non_2xx": int(errors[1]) if errors else 0,
        "socket_errors": socket_errors[1] if socket_errors else None,
    }


def server_command(
    server: str, disk: Path, port: int, timeout_s: float, extra: tuple[str, ...] = ()
) -> list[str]:
    """webkv-v1 under pyvmm (``extra``: more of pyvmm's options), or webkv-native: same
    sources, disk and port mapping."""
    if server == "native":
        return [str(KERNELS / "webkv-native"), f"disk={disk}", f"forward=127.0.0.1:{port}=80"]
    backends = ["--device-backends", "process" if server == "pyvmm-process" else "thread"]
    return [
        *pyvmm_command(),
        "boot",
        str(KERNELS / "webkv-v1.elf"),
        "--disk",
        str(disk),
        "--forward",
        f"127.0.0.1:{port}=80",
        "--timeout",
        str(timeout_s),
        *backends,
        *extra,
    ]


def kvload(
    port: int, seconds: float, window_s: float, pinning: harness.Pinning | None = None
) -> dict:
    """examples/kvload.py's 8 clients for ``seconds``: latency and windowed stalls."""
    if pinning:
        pinning.apply_load()  # the client processes inherit this
    load = KvLoad(port, 8).start()
    if pinning:
        pinning.apply_measured()
    load.wait_started()
    time.sleep(seconds)
    load.stop()
    windows = window_stalls(load.samples, window_s)
    return {
        **summarize(load.samples),
        "window_stall_median_ms": round(harness.quantile(windows, 0.5), 3) if windows else 0.0,
        "window_stall_max_ms": round(max(windows, default=0.0), 3),
        "failures": len(load.failures),
    }


class Server:
    """A running webkv: its port, process and disk image."""

    def __init__(self, port: int, process: subprocess.Popen, disk: Path) -> None:
        self.port, self.process, self.disk = port, process, disk

    def kill(self) -> None:
        """SIGKILL: the disk image is then what a fresh start would recover."""
        self.process.kill()
        self.process.wait()

    def cpu_s(self) -> float:
        """CPU time the server process and its children (back-end processes) have
        used, all their threads, from /proc: unlike wall-clock figures it does not
        grow while other processes hold the CPUs."""
        return sum(_process_cpu_s(p) for p in harness.process_tree(self.process.pid))


def _process_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def serving(
    server: str, disk_dir: str | None, timeout_s: float = 600, armed: bool = False
) -> Iterator[Server]:
    """webkv (``server``: pyvmm or native) on a fresh 64 MiB disk in ``disk_dir``,
    up and answering; kills it afterwards. ``armed``: pyvmm with a control socket
    (a spare partition, the microvisor), as a node ready for upgrades runs."""
    with tempfile.TemporaryDirectory(dir=disk_dir) as tmp:
        disk = Path(tmp) / "kv.img"
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        port = free_port()
        extra = ("--control", str(Path(tmp) / "node.sock")) if armed else ()
        command = server_command(server, disk, port, timeout_s, extra)
        node = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(port)
            yield Server(port, node, disk)
        finally:
            node.kill()
            node.wait()


def run(
    disk_dir: str,
    seconds: float,
    connections: int,
    put_script: str,
    pinning: harness.Pinning | None = None,
    server: str = "pyvmm",
    kvload_seconds: float = 0.0,
    window_s: float = 0.2,
) -> dict:
    with serving(server, disk_dir, seconds * 4 + kvload_seconds + 60) as node:
        result = {}
        for op, path, script in (("put", "/", put_script), ("get", "/kv/bench1", None)):
            cpu = node.cpu_s()
            result[op] = wrk(node.port, path, seconds, connections, script, pinning)
            done = result[op]["requests"]
            result[op]["server_cpu_us_per_request"] = (
                round((node.cpu_s() - cpu) * 1e6 / done, 2) if done else 0.0
            )
        if kvload_seconds:
            result["kv"] = kvload(node.port, kvload_seconds, window_s, pinning)
    return result


def metrics(result: dict) -> dict[str, float]:
    """One run's figures for the harness: throughput and latency of PUT and GET
    (wrk), and of kvload's clients if they ran."""
    out = {
        f"{op}_{key}": result[op][key]
        for op in ("put", "get")
        for key in ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request")
    }
    if "kv" in result:
        kv = result["kv"]
        out.update(
            {
                f"kv_{key}": kv[key]
                for key in ("p50_ms", "p99_ms", "max_ms", "window_stall_median_ms")
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3, help="per wrk run")
    parser.add_argument("--kvload-seconds", type=float, default=4, help="0: no kvload run")
    parser.add_argument("--window-ms", type=float, default=200, help="an upgrade's length")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--servers", default="pyvmm,native")
    parser.add_argument("--places", default="tmpfs,disk")
    parser.add_argument("--aa", default=None, help="A/A: this configuration against itself")
    harness.add_arguments(parser, harness.Plan(min_rounds=10, max_rounds=10, time_cap_s=600))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    if not (KERNELS / "webkv-native").exists():
        sys.exit("build/webkv-native is missing (make -C guest_kernels)")
    conditions = harness.Conditions.pinned(args)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(PUT_SCRIPT)
        put_script = f.name
    known_places = {"tmpfs": "/dev/shm", "disk": str(Path(__file__).resolve().parent)}
    places = {name: known_places[name] for name in args.places.split(",")}
    servers = args.servers.split(",")
    names = [f"{server}-{place}" for place in places for server in servers]
    errors: dict[str, list] = {name: [] for name in names}

    def runner(name: str, server: str, place: str):
        def once() -> dict[str, float]:
            result = run(
                place,
                args.seconds,
                args.connections,
                put_script,
                conditions.pinning,
                server,
                args.kvload_seconds,
                args.window_ms / 1000,
            )
            for op in ("put", "get"):
                if result[op]["non_2xx"] or result[op]["socket_errors"]:
                    errors[name].append(result[op])
            if result.get("kv", {}).get("failures"):
                errors[name].append(result["kv"])
            return metrics(result)

        return once

    configs = {
        f"{server}-{name}": runner(f"{server}-{name}", server, place)
        for name, place in places.items()
        for server in servers
    }
    baseline = names[-1] if "native" not in servers else f"native-{next(iter(places))}"
    try:
        rounds, baseline = harness.compare(args, configs, baseline, "webkv")
    finally:
        os.unlink(put_script)
    out = rounds.to_json()
    # pyvmm against native on the same disk, paired by round
    versus = {}
    for place in places:
        anchor = rounds.samples.get(f"native-{place}")
        for server in servers:
            mine = rounds.samples.get(f"{server}-{place}")
            key = place if server == "pyvmm" else f"{server} {place}"
            if server != "native" and mine and anchor:
                versus[key] = {m: harness.paired_ratio(v, anchor[m]) for m, v in mine.items()}
    result = {
        "benchmark": "webkv",
        "seconds": args.seconds,
        "kvload_seconds": args.kvload_seconds,
        "window_ms": args.window_ms,
        "connections": args.connections,
        **out,
        "pyvmm_over_native": versus,
        "errors": {name: e for name, e in errors.items() if e},
        **conditions.to_json(),
    }
    medians = out["configs"]
    shown = (
        "get_requests_per_s",
        "get_server_cpu_us_per_request",
        "put_server_cpu_us_per_request",
        "kv_p50_ms",
        "kv_p99_ms",
        "kv_max_ms",
        "kv_window_stall_median_ms",
    )
    report(
        result,
        f"webkv: {out['method']['rounds']} rounds of {args.seconds:g} s wrk"
        + (f" + {args.kvload_seconds:g} s kvload" if args.kvload_seconds else "")
        + "; "
        + "; ".join(
            f"{name} GET {m['get_requests_per_s']['median']:.0f} req/s "
            f"p99 {m['get_p99_ms']['median']} ms, PUT {m['put_requests_per_s']['median']:.0f} "
            f"req/s p99 {m['put_p99_ms']['median']} ms"
            + (
                f", kvload p50 {m['kv_p50_ms']['median']} p99 {m['kv_p99_ms']['median']} "
                f"max {m['kv_max_ms']['median']} ms"
                if "kv_p50_ms" in m
                else ""
            )
            for name, m in medians.items()
        )
        + "; "
        + "; ".join(
            f"pyvmm/native {place}: "
            + ", ".join(f"{k} {r[k]['ratio']:.2f}" for k in shown if k in r)
            for place, r in versus.items()
        ),
    )


if __name__ == "__main__":
    main()
