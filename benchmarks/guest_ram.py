"""What guest RAM's backing costs the guest: bench.elf's memory-bound workloads
(stream, chase) under pyvmm with each backing of pyvmm/memory.py, in alternating
rounds (benchmarks/harness.py), ratios of TSC cycles to today's anonymous THP memory,
and of the pyvmm process's CPU time (which, unlike wall-clock cycles, does not grow
while other processes hold the shared CPUs; alu is the no-memory control);
optionally webkv GET throughput with wrk (``--webkv-seconds``). Each run reports its
peak huge-page backing (AnonHugePages + ShmemPmdMapped from smaps_rollup).

    python benchmarks/guest_ram.py [--backings anonymous,memfd-thp,memfd-4k]
        [--run alu,stream,chase] [--args n_stream=100] [--webkv-seconds 0] [--rounds 6] [--pin]

memfd-thp gets huge pages only where /sys/kernel/mm/transparent_hugepage/shmem_enabled
allows madvise (``advise``, as .ci/setup configures it); memfd-hugetlb needs reserved
pages (vm.nr_hugepages) and is measured only when enough are free.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
from collections.abc import Callable

import harness
from bench_runs import STREAM_MIB, host_tsc_khz, under_pyvmm
from common import report
from webkv import PUT_SCRIPT, run

from pyvmm import memory

GUEST_MIB = 256  # pyvmm boot's default --mem


def with_backing(backing: str, run_once: Callable[[], dict[str, float]]) -> harness.Runner:
    def once() -> dict[str, float]:
        os.environ["PYVMM_GUEST_RAM"] = backing  # the pyvmm started next inherits it
        try:
            return run_once()
        finally:
            del os.environ["PYVMM_GUEST_RAM"]

    return once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    available = [b for b in memory.BACKINGS if b != memory.MEMFD_HUGETLB]
    if memory.free_huge_pages() >= GUEST_MIB << 20:
        available.append(memory.MEMFD_HUGETLB)
    parser.add_argument("--backings", default=",".join(available))
    parser.add_argument("--run", default="alu,stream,chase", help="alu: a control, no memory")
    parser.add_argument("--args", default="", help="extra bench.elf arguments (n_stream=...)")
    parser.add_argument("--webkv-seconds", type=float, default=0.0)
    harness.add_arguments(parser, harness.Plan(min_rounds=6, max_rounds=12, time_cap_s=600))
    args = parser.parse_args()
    conditions = harness.Conditions.pinned(args)
    khz = host_tsc_khz()
    workloads = args.run.split(",")
    huge_mib: dict[str, list[float]] = {}
    put_script = None
    if args.webkv_seconds:
        if shutil.which("wrk") is None:
            raise SystemExit("wrk is not installed (apt-get install wrk)")
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(PUT_SCRIPT)
            put_script = f.name

    def measure(name: str) -> dict[str, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = under_pyvmm(f"run={args.run} {args.args}".strip(), khz)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        huge_mib.setdefault(name, []).append(done.huge_mib)
        figures = done.cycles(workloads)
        # CPU time of the whole pyvmm process: unlike the guest's TSC cycles it does
        # not grow while other processes hold the CPU (the machine is shared)
        figures["pyvmm_cpu_s"] = (after.ru_utime + after.ru_stime) - (
            before.ru_utime + before.ru_stime
        )
        if put_script:
            web = run("/dev/shm", args.webkv_seconds, 16, put_script, conditions.pinning)
            figures["webkv_get_requests_per_s"] = web["get"]["requests_per_s"]
            figures["webkv_get_p99_ms"] = web["get"]["p99_ms"]
        return figures

    configs = {b: with_backing(b, lambda b=b: measure(b)) for b in args.backings.split(",")}
    baseline = memory.ANONYMOUS if memory.ANONYMOUS in configs else next(iter(configs))
    try:
        rounds = harness.run_rounds(
            configs,
            baseline,
            harness.plan_from(args),
            progress=harness.stderr_progress("guest_ram"),
        )
    finally:
        if put_script:
            os.unlink(put_script)
    out = rounds.to_json()
    result = {
        "benchmark": "guest_ram",
        "tsc_khz": khz,
        **out,
        "backing": {n: harness.backing_summary(v, STREAM_MIB) for n, v in huge_mib.items()},
        "shmem_enabled": memory.shmem_thp_mode(),
        **conditions.to_json(),
    }
    report(
        result,
        f"guest_ram: {out['method']['rounds']} rounds, shmem_enabled={memory.shmem_thp_mode()}; "
        + "; ".join(
            f"{name}/{baseline} "
            + ", ".join(f"{m} {harness.ci_text(r)}" for m, r in per.items())
            + f" (huge MiB {result['backing'][name]['huge_pages_mib_min']})"
            for name, per in out["ratios"].items()
        )
        + f"; {baseline} huge MiB {result['backing'][baseline]['huge_pages_mib_min']}",
    )


if __name__ == "__main__":
    main()
