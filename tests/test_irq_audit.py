"""The interrupt audit's own arithmetic (tests/irq_audit.py), without KVM: a raise
made by another process is taken by the router's read that consumed its write."""

from irq_audit import Audit, Raise

US = 1000  # TSC ticks per µs at the 1 GHz these tests use
T0 = 10_000 * US


def at(us: float) -> int:
    return T0 + int(us * US)


def audit_of(reads: list[tuple[float, float, int]]) -> Audit:
    """Line 5, owned by ``a``, raised three times by another process: the first read at
    once, the other two late (the router's lock was held across a world switch)."""
    audit = Audit(tsc_khz=1_000_000)
    audit.raises = [Raise(5, "a", at(b), at(b) + 5 * US) for b in (-3256, -2409, -98)]
    audit.reads[5] = [(at(s), at(e), calls) for s, e, calls in reads]
    return audit


RUNS = {"a": [(at(t), 5) for t in (-1188, -34, 0)]}


def test_two_reads_close_together_each_take_their_own_raise() -> None:
    # Seen in CI: the read 4 µs after the third raise began took the second raise's
    # write; the third's was taken by the next read. Three raises, three runs.
    audit = audit_of([(-3217, -3210, 1), (-94, -90, 1), (-39, -35, 1)])
    assert audit.violations(RUNS, {5}) == []


def test_a_run_more_than_the_reads_delivered_is_a_violation() -> None:
    # One read took both late writes (one routed assertion), yet the guest ran twice.
    audit = audit_of([(-3217, -3210, 1), (-94, -90, 2)])
    problems = audit.violations(RUNS, {5})
    assert len(problems) == 1 and "without a raise" in problems[0]
