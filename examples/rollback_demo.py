"""An online upgrade that fails and rolls back, under load: the service stays on v1,
devirtualized, and no acknowledged write is lost (checked on the disk image after the
node is killed, as online_upgrade.py does).

    .venv/bin/python examples/rollback_demo.py [--inject crash-after-ready] [--json]
        [--timeout PHASE=SECONDS ...]

Faults: boot-fails (the new kernel does not parse), crash-after-ready (the host stops
the new instance once it is ready), never-serving (the new webkv never answers acquire:
the acquire time-out rolls back, 20 s unless --timeout acquire=2), release-refused (the
old webkv refuses the release and serves on), phase-timeout (a host-side time-out too
short for anyone), and the rest of docs/maintenance.md's table (release-timeout,
release-closed, crash-during-acquire, disk-eio; the faults after the commit roll
forward instead). The webkv faults are the guests' own doing: each prints
`webkv: fault=<name>` on its console when it fires.
"""

from __future__ import annotations

import argparse
import json
import sys

from online_upgrade import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inject", default="crash-after-ready")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--timeout", action="append", default=[], metavar="PHASE=SECONDS", help="a phase time-out"
    )
    args = parser.parse_args()
    extra = ("--inject", args.inject, *(w for t in args.timeout for w in ("--timeout", t)))
    result = run("webkv-v2.elf", extra, args.clients, settle=1.0)
    report = {k: v for k, v in result.items() if not k.startswith("_")}
    up = report["upgrade"]
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"injected {args.inject}: rolled back at {up.get('failed_phase')} "
            f"({up.get('reason')}); service still {up['after']}"
        )
        print(
            f"failed requests: {report['failed_requests']}   lost writes: "
            f"{report['lost_writes']} of {report['writes_checked']} checked on disk after "
            f"SIGKILL   longest stall: "
            f"{report['max_stall_ms']:.1f} ms during the upgrade and rollback"
        )
    clean = report["failed_requests"] == 0 and report["lost_writes"] == 0
    sys.exit(0 if clean and up.get("rolled_back") and up["after"] == "v1" else 1)


if __name__ == "__main__":
    main()
