"""Where an upgrade's longest client stall goes (``downtime.py --timeline``).

The node's upgrade report carries a trace (maintenance.Upgrade): the hand-off's steps
(listeners detached and release asked, A released, A paused, disk lease moved,
listeners attached and acquire asked, B serving) and, from the microvisor, every world
switch (with its memory-slot change) and every interrupt held for a switched-out
instance, all on the host's CLOCK_MONOTONIC, the clock of the clients' samples. For the
longest request of an upgrade this gives: the phases it overlapped, who had the vCPU
for how long while it waited (old instance A, new instance B, world switches), and the
hand-off steps inside it, each as milliseconds after the request was sent.
"""

from __future__ import annotations


def breakdown(sample, report: dict) -> dict:
    """``sample``: a kvload Sample; ``report``: the upgrade's report (with ``trace``)."""
    base = report["monotonic_start"]
    start, end = sample.start, sample.end
    new = report.get("instance")  # B's name (absent after a rollback)

    def at(ms: float) -> float:
        return base + ms / 1000

    def rel(t: float) -> float:
        return round((t - start) * 1000, 3)

    phases = {}
    for phase in report["phases"]:
        p_start = at(phase["start"] * 1000)
        p_end = p_start + phase["seconds"]
        overlap = min(end, p_end) - max(start, p_start)
        if overlap > 0:
            phases[phase["phase"]] = round(overlap * 1000, 3)
    trace = [(at(ms), what, detail) for ms, what, detail in report.get("trace", [])]
    # Who had the vCPU: the target of the last switch before each moment; before the
    # upgrade's first switch, the old instance.
    owner = "A"
    on_cpu = {"A": 0.0, "B": 0.0, "switching": 0.0}
    cursor = start
    switches = held = 0
    steps = []
    for t, what, detail in trace:
        if what == "switch":
            took_us = float(detail.split()[2].removesuffix("us"))
            to = "B" if detail.split()[1] == new else "A"
            if t - took_us / 1e6 >= end:
                continue  # after the request: it says nothing about who ran during it
            if t > start:
                switches += 1
                switch_start = max(cursor, t - took_us / 1e6)
                on_cpu[owner] += max(0.0, min(end, switch_start) - cursor)
                on_cpu["switching"] += min(end, t) - switch_start
                cursor = min(end, t)
            owner = to
        elif start <= t <= end:
            if what == "held-irq":
                held += 1
            else:
                steps.append([rel(t), what if what != "console" else f"console {detail}"])
    on_cpu[owner] += max(0.0, end - max(cursor, start))
    return {
        "handoff": handoff(report),
        "ms": round(sample.ms, 3),
        "method": sample.method,
        "sent_ms_after_upgrade_start": round((start - base) * 1000, 3),
        "phases_ms": phases,
        "vcpu_ms": {k: round(v * 1000, 3) for k, v in on_cpu.items()},
        "world_switches": switches,
        "held_interrupts": held,
        "steps_ms_after_sent": steps,
    }


def handoff(report: dict) -> dict:
    """The hand-off on its own, whoever waited in it: each step in ms after the
    release was asked, and the world switches and held interrupts in between."""
    trace = report.get("trace", [])
    asked = next((ms for ms, what, _ in trace if what.startswith("listeners detached")), None)
    if asked is None:
        return {}
    steps, switches, held, slots_ms, switch_ms, last = [], 0, 0, 0.0, 0.0, asked
    for ms, what, detail in trace:
        if ms < asked:
            continue
        if what == "switch":
            switches += 1
            words = detail.split()
            switch_ms += float(words[2].removesuffix("us")) / 1000
            slots_ms += float(words[4].removesuffix("us)")) / 1000
        elif what == "held-irq":
            held += 1
        elif what == "console":
            steps.append([round(ms - asked, 3), f"console {detail}"])
        else:
            steps.append([round(ms - asked, 3), what])
            last = ms
    return {
        "steps_ms": steps,
        "total_ms": round(last - asked, 3),
        "world_switches": switches,
        "switch_ms": round(switch_ms, 3),
        "slot_change_ms": round(slots_ms, 3),
        "held_interrupts": held,
    }


def summary_line(index: int, entry: dict) -> str:
    vcpu = entry["vcpu_ms"]
    steps = ", ".join(f"{what} +{ms:.1f}" for ms, what in entry["steps_ms_after_sent"])
    phases = " ".join(f"{k} {v:.1f}" for k, v in entry["phases_ms"].items())
    hand = entry["handoff"]
    hand_steps = ", ".join(f"{what} +{ms:.1f}" for ms, what in hand.get("steps_ms", [])[1:])
    return (
        f"upgrade {index + 1}: hand-off {hand.get('total_ms', 0):.1f} ms ({hand_steps}; "
        f"{hand.get('world_switches')} switches {hand.get('switch_ms')} ms); "
        f"longest {entry['method']} {entry['ms']:.1f} ms sent at "
        f"+{entry['sent_ms_after_upgrade_start']:.0f} ms; phases [{phases}]; vCPU A "
        f"{vcpu['A']:.1f} B {vcpu['B']:.1f} switching {vcpu['switching']:.1f} ms "
        f"({entry['world_switches']} switches, {entry['held_interrupts']} held irqs); {steps}"
    )


def slow_by_phase(samples, timelines: list[list[dict]], threshold_ms: float) -> dict[str, int]:
    """The requests during upgrades slower than ``threshold_ms`` (the run's p99 outside
    the upgrades), counted by the phase they were sent in: what makes the p99 during
    upgrades. ``timelines``: each upgrade's phases on the samples' clock."""
    counts: dict[str, int] = {}
    for timeline in timelines:
        for sample in samples:
            if sample.ms <= threshold_ms:
                continue
            if not (timeline[0]["start"] <= sample.end and sample.start <= timeline[-1]["end"]):
                continue
            phase = next(
                (p["phase"] for p in timeline if p["start"] <= sample.start <= p["end"]),
                "before",
            )
            counts[phase] = counts.get(phase, 0) + 1
    return counts
