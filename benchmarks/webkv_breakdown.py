"""Where a webkv request's time goes under pyvmm (thread back-ends), and the same
figures for several source trees side by side (before/after a change).

Each run is a child process that builds a node in itself (webkv-v1.elf, a disk on
tmpfs, the vsock forward; what `pyvmm boot --disk --forward` builds), runs wrk GET
against it and reads, over the timed window only:

- each thread's on-CPU time (/proc/self/task/TID/schedstat, ns) and, for the vCPU
  thread, its guest time (/proc .../stat: time in KVM_RUN with the guest at CPL3;
  the emulated CPL0 work shows as system time) and the Python time its exits took
  (thread CPU time around each exit handler, by exit kind and device register);
- interrupts sent per device (the transport's count), queue notifications (kicks)
  the vsock device received, and packets each way (used-ring indexes, sampled);
- with ``--load kvload`` the load is examples/kvload.py's 8 closed-loop clients
  (latency-bound: what the p99 goal is about) instead of wrk GET's 16 connections;
- with ``--syscalls`` (wrk only), a second window under `perf trace -s`: syscalls per request
  of each thread (host TCP, epoll, eventfd) and the time each took (perf's own
  figure, wall time inside the call). perf slows the traced threads, so these
  times are upper bounds and the window's throughput is not the run's.

Only the benchmark's child instruments the node (wrappers around exit handlers and
the device's ``notify``), so the product code carries no counters for it. A tree
older than this file works as well: ``--trees base=/path/to/checkout,new=.`` runs each
tree's pyvmm and guest kernels, alternated round by round by the harness, with the
paired ratios of every metric (each tree over the first); ``new=.?poll_us=50`` adds
words to webkv's command line, ``proc=.@process`` serves the devices from back-end
processes (``--device-backends process``): their CPU time counts as one figure per
process (``vsock``, ``blk``), interrupts and kicks are the back-ends' own counts, and
the VMM's exits are measured as before.

    python benchmarks/webkv_breakdown.py [--trees NAME=PATH,...] [--seconds 3]
        [--connections 16] [--load wrk|kvload] [--rounds 5] [--syscalls] [--pin]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness
from common import ROOT, report

HERE = Path(__file__).resolve().parent
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
# virtio-mmio registers whose exits are counted by name (the rest: "other")
REGISTERS = {0x050: "queue_notify", 0x060: "interrupt_status", 0x064: "interrupt_ack"}


# ---- the child: one node, one timed window ----


def thread_cpu(tid: int) -> dict[str, float]:
    """On-CPU ns (schedstat), and user, system and guest seconds (stat) of a thread."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            on_cpu_ns = int(f.read().split()[0])
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return {"on_cpu_ns": 0, "user_s": 0.0, "system_s": 0.0, "guest_s": 0.0}
    return {
        "on_cpu_ns": on_cpu_ns,
        "user_s": int(fields[11]) * TICK_S,
        "system_s": int(fields[12]) * TICK_S,
        "guest_s": int(fields[40]) * TICK_S,
    }


class UsedSampler:
    """Packets each way: the vsock rx and tx used indexes as guest RAM holds them
    (whoever serves the rings; 16 bits, so sampled often enough not to wrap), summed
    up from a thread that wakes 20 times a second."""

    def __init__(self, memory, queues) -> None:
        self.memory = memory
        self.queues = queues
        self.last = [self._used_idx(q) for q in queues]
        self.total = [0] * len(queues)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _used_idx(self, queue) -> int:
        return int.from_bytes(self.memory.read(queue.device_addr + 2, 2), "little")

    def sample(self) -> list[int]:
        for i, q in enumerate(self.queues):
            now = self._used_idx(q)
            self.total[i] += (now - self.last[i]) & 0xFFFF
            self.last[i] = now
        return list(self.total)

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class ExitMeter:
    """Counts the vCPU's exits by kind (MMIO ones by device register) and the thread
    CPU time their Python handlers took. Installed by wrapping the handler table."""

    def __init__(self, machine, windows: dict[int, str]) -> None:
        from ioctl import numbers as n

        self.counts: dict[str, int] = {}
        self.cpu_ns: dict[str, int] = {}
        run = machine.vcpu.kvm_run
        handlers = machine._handlers
        clock = time.thread_time_ns

        def wrap(kind: int, name: str):
            inner = handlers[kind]

            def handler() -> None:
                if kind == n.KVM_EXIT_MMIO:
                    addr = run.mmio.phys_addr
                    device = windows.get(addr & ~0xFFF, "mmio")
                    key = f"{device}.{REGISTERS.get(addr & 0xFFF, 'other')}"
                    key += ".w" if run.mmio.is_write else ".r"
                else:
                    key = name
                start = clock()
                inner()
                self.cpu_ns[key] = self.cpu_ns.get(key, 0) + clock() - start
                self.counts[key] = self.counts.get(key, 0) + 1

            handlers[kind] = handler

        wrap(n.KVM_EXIT_IO, "pio")
        wrap(n.KVM_EXIT_MMIO, "mmio")

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return {k: (self.counts[k], self.cpu_ns.get(k, 0)) for k in list(self.counts)}


def count_notifies(backend) -> dict[int, int]:
    """Wrap the device's ``notify`` (an instance attribute shadows the method) to
    count queue notifications by queue."""
    counts: dict[int, int] = {}
    inner = backend.notify

    def notify(queue: int) -> None:
        counts[queue] = counts.get(queue, 0) + 1
        inner(queue)

    backend.notify = notify
    return counts


def perf_trace(pid: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        ["perf", "trace", "-s", "-p", str(pid), "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def parse_perf_summary(text: str) -> dict[int, dict[str, list[float]]]:
    """`perf trace -s` output: by thread id, each syscall's [count, total ms]."""
    out: dict[int, dict[str, list[float]]] = {}
    current: dict[str, list[float]] | None = None
    for line in text.splitlines():
        head = re.match(r"\s*\S.*\((\d+)\), \d+ events", line)
        if head:
            current = out.setdefault(int(head[1]), {})
            continue
        row = re.match(r"\s+([a-z_0-9]+)\s+(\d+)\s+\d+\s+([\d.]+)", line)
        if row and current is not None:
            count, ms = current.setdefault(row[1], [0, 0.0])
            current[row[1]] = [count + int(row[2]), ms + float(row[3])]
    return out


def put_key(port: int, path: str, value: bytes) -> None:
    """The key wrk GETs (as benchmarks/webkv.py's PUT run leaves it)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("PUT", path, value)
        status = connection.getresponse().status
    finally:
        connection.close()
    if status not in (200, 201, 204):
        raise SystemExit(f"PUT {path}: HTTP {status}")


def kvload_window(port: int, seconds: float, snap) -> tuple[dict, dict, dict]:
    """examples/kvload.py's 8 closed-loop clients (latency-bound, unlike wrk's 16
    pipelining connections): the requests that ended inside the timed window."""
    from kvload import KvLoad

    load = KvLoad(port, 8).start()
    load.wait_started()
    time.sleep(0.5)
    before = snap()
    time.sleep(seconds)
    after = snap()
    load.stop()
    inside = sorted(
        (x.end - x.start) * 1000 for x in load.samples if before["wall"] <= x.end <= after["wall"]
    )
    result = {
        "requests": len(inside),
        "requests_per_s": round(len(inside) / (after["wall"] - before["wall"]), 1),
        "p50_ms": round(harness.quantile(inside, 0.5), 3),
        "p99_ms": round(harness.quantile(inside, 0.99), 3),
        "failures": len(load.failures),
    }
    return result, before, after


def process_cpu_ns(pid: int) -> int:
    """On-CPU ns of every thread of another process (schedstat)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def child(
    tree: Path,
    seconds: float,
    connections: int,
    syscalls: bool,
    load: str,
    cmdline: str,
    backends: str = "thread",
) -> dict:
    sys.path.insert(0, str(tree))
    sys.path.insert(0, str(ROOT / "examples"))
    from webkv import free_port, wait_for_port, wrk

    from pyvmm.machine import Machine, RunResult
    from pyvmm.node import add_service_devices, parse_forward

    kernel = tree / "guest_kernels" / "build" / "webkv-v1.elf"
    console = bytearray()
    with (
        tempfile.TemporaryDirectory(dir="/dev/shm") as tmp,
        Machine(256 << 20, console=console.extend) as machine,
    ):
        disk = Path(tmp) / "kv.img"
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        port = free_port()
        services = add_service_devices(
            machine, str(disk), (parse_forward(f"127.0.0.1:{port}=80"),), backends
        )
        vsock = services.vsocks[0]
        blk = services.disks[0]
        windows = {base: name.rstrip("0123456789") for name, (base, _) in machine.virtio.items()}
        in_process = backends == "process"
        # A thread back-end that owns its queues' ioeventfds (kick_fds) is kicked by
        # KVM directly: nothing in this process sees those kicks to count them.
        kicks_seen = not in_process and not hasattr(type(vsock), "kick_fds")
        notifies = count_notifies(vsock) if kicks_seen else {}
        meter = ExitMeter(machine, windows)
        vsock_transport = machine.devices["vsock0"].device
        blk_transport = machine.devices["blk0"].device
        machine.boot(str(kernel), f"console=ttyS0 {cmdline}".strip())
        vcpu = threading.Thread(target=machine.run, args=(600,), daemon=True)
        vcpu.start()
        sampler = None
        try:
            wait_for_port(port)
            put_key(port, "/kv/bench1", b"value-1")
            sampler = UsedSampler(machine.memory, vsock_transport.queues[:2])
            wrk(port, "/kv/bench1", 1, connections, None)  # warm-up
            poller = machine._notify_poller
            tids = {
                "vcpu": vcpu.native_id,
                "notify": poller._thread.native_id if poller else None,
            }
            pids = {}
            if in_process:  # the back-end processes' threads, as one figure each
                pids = {"vsock": vsock.describe()["pid"], "blk": blk.describe()["pid"]}
            else:
                tids["vsock"] = vsock._thread.native_id
                tids["blk"] = blk._thread.native_id if blk._thread else None

            def device_counts() -> tuple[dict, dict | None]:
                """Interrupts per device and kicks per vsock queue (None: not seen here)."""
                if not in_process:
                    interrupts = {
                        "vsock": vsock_transport.interrupts,
                        "blk": blk_transport.interrupts,
                    }
                    return interrupts, dict(notifies) if kicks_seen else None
                rings = vsock.process.status()["devices"]["vsock0"]["rings"]
                blk_rings = blk.process.status()["devices"]["blk0"]["rings"]
                interrupts = {
                    "vsock": sum(r["calls"] for r in rings),
                    "blk": sum(r["calls"] for r in blk_rings),
                }
                return interrupts, {i: r["kicks"] for i, r in enumerate(rings)}

            def snap() -> dict:
                interrupts, kicks = device_counts()
                threads = {k: thread_cpu(t) for k, t in tids.items() if t}
                for name, pid in pids.items():  # the same shape as a thread's
                    threads[name] = {"on_cpu_ns": process_cpu_ns(pid)}
                return {
                    "threads": threads,
                    "process_cpu_s": sum(os.times()[:2]),
                    "interrupts": interrupts,
                    "notifies": kicks,
                    "exits": meter.snapshot(),
                    "packets": sampler.sample(),
                    "wall": time.monotonic(),
                }

            if load == "kvload":
                result, before, after = kvload_window(port, seconds, snap)
            else:
                before = snap()
                result = wrk(port, "/kv/bench1", seconds, connections, None)
                after = snap()
            traced = None
            if syscalls and load == "wrk":
                tracer = perf_trace(os.getpid(), seconds)
                time.sleep(0.5)  # perf attaches to every thread
                traced_run = wrk(port, "/kv/bench1", seconds - 0.5 or 1, connections, None)
                _, err = tracer.communicate(timeout=seconds + 60)
                traced = {
                    "requests": traced_run["requests"],
                    "by_thread": {
                        name: parse_perf_summary(err).get(tid, {})
                        for name, tid in tids.items()
                        if tid
                    },
                }
        finally:
            if sampler is not None:
                sampler.close()
            machine.stop(RunResult("stopped", 0, "benchmark over"))
            vcpu.join(10)
            services.close()
    return {"wrk": result, "before": before, "after": after, "syscalls": traced}


# ---- the parent: figures per request, trees side by side ----


def per_request(raw: dict) -> dict[str, float]:
    """A child's window as figures per request (µs, counts), and the throughput."""
    requests = raw["wrk"]["requests"]
    before, after = raw["before"], raw["after"]
    wall = after["wall"] - before["wall"]
    out: dict[str, float] = {"requests_per_s": raw["wrk"]["requests_per_s"]}
    out.update({k: raw["wrk"][k] for k in ("p50_ms", "p99_ms")})
    out["failed_requests"] = raw["wrk"].get("failures", raw["wrk"].get("non_2xx", 0))

    def per(value: float, scale: float = 1.0) -> float:
        return round(value * scale / requests, 3) if requests else 0.0

    for name, cpu in after["threads"].items():
        was = before["threads"][name]
        out[f"{name}_cpu_us"] = per(cpu["on_cpu_ns"] - was["on_cpu_ns"], 1e-3)
        if name == "vcpu":
            out["vcpu_guest_us"] = per(cpu["guest_s"] - was["guest_s"], 1e6)
        if "system_s" in cpu:  # a thread of this process (stat: 10 ms ticks)
            out[f"{name}_system_us"] = per(cpu["system_s"] - was["system_s"], 1e6)
    out["process_cpu_us"] = per(after["process_cpu_s"] - before["process_cpu_s"], 1e6)
    out["process_cpu_share"] = round((after["process_cpu_s"] - before["process_cpu_s"]) / wall, 3)
    for device in ("vsock", "blk"):
        out[f"{device}_interrupts"] = per(
            after["interrupts"][device] - before["interrupts"][device]
        )
    for queue, label in ((0, "rx"), (1, "tx")) if after["notifies"] is not None else ():
        out[f"vsock_kicks_{label}"] = per(
            after["notifies"].get(str(queue), after["notifies"].get(queue, 0))
            - before["notifies"].get(str(queue), before["notifies"].get(queue, 0))
        )
    rx, tx = (a - b for a, b in zip(after["packets"], before["packets"], strict=True))
    out["packets_to_guest"] = per(rx)
    out["packets_from_guest"] = per(tx)
    packets = rx + tx
    if packets:
        vsock_ns = after["threads"]["vsock"]["on_cpu_ns"] - before["threads"]["vsock"]["on_cpu_ns"]
        out["vsock_us_per_packet"] = round(vsock_ns / 1e3 / packets, 3)
    exits_n = exits_ns = 0
    for key, (count, ns) in after["exits"].items():
        was_n, was_ns = before["exits"].get(key, (0, 0))
        out[f"exit_{key}"] = per(count - was_n)
        out[f"exit_{key}_us"] = per(ns - was_ns, 1e-3)
        exits_n += count - was_n
        exits_ns += ns - was_ns
    out["exits"] = per(exits_n)
    out["exit_python_us"] = per(exits_ns, 1e-3)
    if "vcpu_cpu_us" in out:
        # KVM_RUN: the vCPU thread's time outside the exit handlers' Python (guest CPL3,
        # emulated CPL0, KVM's own work); guest_us is the CPL3 part where accounted.
        out["vcpu_kvm_run_us"] = round(out["vcpu_cpu_us"] - out["exit_python_us"], 3)
    traced = raw.get("syscalls")
    if traced and traced["requests"]:
        n = traced["requests"]
        for name, calls in traced["by_thread"].items():
            for call, (count, ms) in calls.items():
                out[f"syscalls_{name}_{call}"] = round(count / n, 3)
                out[f"syscalls_{name}_{call}_us_each"] = round(ms * 1e3 / count, 2)
            out[f"syscalls_{name}"] = round(sum(c for c, _ in calls.values()) / n, 3)
    return out


def detail(runs: list[dict[str, float]]) -> dict[str, float]:
    """The median of every figure over a tree's runs (0 where a run lacks it)."""
    keys = sorted({k for run in runs for k in run})
    return {k: round(harness.quantile([run.get(k, 0.0) for run in runs], 0.5), 3) for k in keys}


def run_child(
    tree: Path, cmdline: str, backends: str, args: argparse.Namespace, pinning: harness.Pinning
) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, str(HERE / "webkv_breakdown.py"), "--child", str(tree)]
    command += ["--cmdline", cmdline, "--backends", backends]
    command += ["--seconds", str(args.seconds), "--connections", str(args.connections)]
    command += ["--load", args.load]
    if args.syscalls:
        command.append("--syscalls")
    done = subprocess.run(
        command,
        env=env,
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=args.seconds * 3 + 120,
        preexec_fn=(lambda: os.sched_setaffinity(0, pinning.measured))
        if pinning.measured
        else None,
    )
    if done.returncode:
        raise SystemExit(f"breakdown child for {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


# The metrics the harness pairs (never 0); every other figure goes to "detail".
CORE = (
    "requests_per_s",
    "p99_ms",
    "process_cpu_us",
    "vcpu_cpu_us",
    "exit_python_us",
    "vcpu_kvm_run_us",
    "vsock_cpu_us",
    "vsock_us_per_packet",
    "vsock_interrupts",
    "exits",
    "packets_to_guest",
    "packets_from_guest",
)
SHOWN = (
    "requests_per_s",
    "process_cpu_us",
    "vcpu_cpu_us",
    "vcpu_guest_us",
    "exit_python_us",
    "vsock_cpu_us",
    "notify_cpu_us",
    "vsock_us_per_packet",
    "vsock_interrupts",
    "p99_ms",
    "vsock_kicks_tx",
    "vsock_kicks_rx",
    "exits",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cmdline", default="", help=argparse.SUPPRESS)
    parser.add_argument("--backends", default="thread", help=argparse.SUPPRESS)
    parser.add_argument(
        "--trees",
        default=f"this={ROOT}",
        help="NAME=PATH[?WORD&WORD][@process],... (the words go on webkv's command line; "
        "@process: device back-ends in processes; the first is the baseline of the ratios)",
    )
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--load", choices=("wrk", "kvload"), default="wrk")
    parser.add_argument("--syscalls", action="store_true", help="a perf trace window too")
    parser.add_argument("--aa", default=None, help="A/A: this tree against itself")
    harness.add_arguments(parser, harness.Plan(min_rounds=5, max_rounds=5, time_cap_s=900))
    args = parser.parse_args()
    if args.child:
        raw = child(
            args.child,
            args.seconds,
            args.connections,
            args.syscalls,
            args.load,
            args.cmdline,
            args.backends,
        )
        print(json.dumps(raw))
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    if args.syscalls and shutil.which("perf") is None:
        sys.exit("--syscalls needs perf (apt-get install linux-perf)")
    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    conditions = harness.Conditions.pinned(args)
    raws: dict[str, list[dict[str, float]]] = {name: [] for name in trees}

    def runner(name: str):
        def once() -> dict[str, float]:
            spec, _, backends = trees[name].partition("@")
            path, _, words = spec.partition("?")
            cmdline = words.replace("&", " ")
            raw = run_child(
                Path(path).resolve(), cmdline, backends or "thread", args, conditions.pinning
            )
            figures = per_request(raw)
            raws[name].append(figures)
            return {k: figures[k] for k in CORE if k in figures}

        return once

    configs = {name: runner(name) for name in trees}
    first = next(iter(trees))
    rounds, baseline = harness.compare(args, configs, first, "webkv_breakdown")
    out = rounds.to_json()
    result = {
        "benchmark": "webkv_breakdown",
        "seconds": args.seconds,
        "connections": args.connections,
        "load": args.load,
        "trees": trees,
        **out,
        "detail": {name: detail(figures) for name, figures in raws.items()},
        **conditions.to_json(),
    }
    line = f"webkv_breakdown ({args.load}, per request, median): " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {m[k]:g}" for k in SHOWN if k in m)
        for name, m in result["detail"].items()
    )
    for name, r in out["ratios"].items():
        line += f"; {name}/{baseline}: " + ", ".join(
            f"{k} {r[k]['ratio']:.3f} [{r[k]['ci95'][0]:.3f}, {r[k]['ci95'][1]:.3f}]"
            for k in SHOWN
            if k in r and "ci95" in r[k]
        )
    line += (
        f"; load {result['machine_before'].get('loadavg')} -> "
        f"{result['machine_after'].get('loadavg')}"
    )
    report(result, line)


if __name__ == "__main__":
    main()
