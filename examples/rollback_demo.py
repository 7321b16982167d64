"""An online upgrade that fails and rolls back, under load: the service stays on v1,
devirtualized, and no acknowledged write is lost.

    .venv/bin/python examples/rollback_demo.py [--inject crash-after-ready] [--json]

Faults: boot-fails, crash-after-ready, never-serving, release-refused, phase-timeout.
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
    args = parser.parse_args()
    result = run("webkv-v2.elf", ("--inject", args.inject), args.clients, settle=1.0)
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
            f"{report['lost_writes']} of {report['acknowledged_writes']}   longest stall: "
            f"{report['max_stall_ms']:.1f} ms"
        )
    clean = report["failed_requests"] == 0 and report["lost_writes"] == 0
    sys.exit(0 if clean and up.get("rolled_back") and up["after"] == "v1" else 1)


if __name__ == "__main__":
    main()
