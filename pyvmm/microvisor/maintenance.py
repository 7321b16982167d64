"""Online upgrade: the maintenance protocol of DESIGN.md §6 as a state machine.

Phases, each with a time-out: preflight → virtualize → boot → ready → release →
move → acquire ‖ retire → devirtualize. B answering ``serving`` to ``acquire`` is the
commit point (‖). Every step has a compensating action, and every path ends in the
invariant of ``health.invariant_problems`` (one instance serving, with the listeners
and the disk lease; devirtualized unless ``virtualized_reason`` says why; no agent or
listener left open), which the report and ``status``'s ``last_upgrade`` carry.

Before the commit, any failure (an error, a time-out, an exception of any kind) rolls
back to A. The compensations run in this order, each guarded (one failing does not
stop the others; the report lists it):

    step done                        compensation
    boot: B started                  stop B (first: before the commit B serves no one,
                                     and stopped it can touch nothing)
    move: disk lease to B            lease back to A (B is fenced once grant returns)
    release: A paused                resume A
    release: A asked to release      A acquires again, on a fresh agent connection (the
                                     old one may be dead or out of step after a
                                     time-out); "error releasing" is retried until A
                                     has finished releasing, then it serves again
    release: listeners detached      listeners attached to A (waiting clients and
    move: listeners attached to B    the connections handed back are replayed to A)
    virtualize                       devirtualize (A alone again)

After the commit the new instance serves, and nothing rolls back: a failure rolls
forward. ``retire`` (stop A) and ``devirtualize`` are retried; if they still fail, the
node stays virtualized on purpose, ``virtualized_reason`` says why, A (if it could not
be stopped) is paused and ``Microvisor.retire_pending`` names it, and
``pyvmm ctl NODE devirtualize`` finishes the job. An agent of B that dies after
``serving`` changes nothing: its connection is closed like any other.

``force`` (``pyvmm upgrade --force``): an A that hangs in its release (time-out, or
its agent connection gone) is fenced instead of rolled back to: paused at once, the
disk lease moved to B (A can write no more), its connections handed to B when it is
stopped. The report says ``forced``. A release that A *refuses* still rolls back.

Nothing acknowledged is lost: A flushes its log before it reports ``released``, and
B recovers that log before it reports ``serving``; after a rollback A recovers it
again when it re-acquires.

The instances' maintenance agents (agent.py) are reached through a host listener on
the instance's own vsock device, like any other client: no hypervisor interface.

Injected faults (``inject``, for tests and demos), by phase:
  boot       boot-fails: B's image does not parse
  ready      crash-after-ready: B is stopped as a crash would (host)
  release    release-refused: A's agent refuses (guest fault, armed just before)
             release-timeout: A's agent never answers the release (guest fault
               release-hang; the release time-out expires, A serves on)
             release-closed: A begins releasing and closes its agent connection
  acquire    never-serving: B's agent never answers acquire (guest, fault= at boot)
             phase-timeout: an acquire time-out too short for anyone (host)
             crash-during-acquire: B triple-faults when asked to acquire (guest)
             disk-eio: every I/O of B's disk front-end fails during acquire (host)
  (commit)   agent-dies-after-serving: B answers serving, then closes its agent
             connection (guest)
  retire     retire-fails: stopping A raises inside the VMM, once (retried)
  devirtualize  devirtualize-fails: devirtualize raises inside the VMM on every try
             of this upgrade (left virtualized with a reason)
A guest fault fires once; each prints ``webkv: fault=<name>`` on its console.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from ..errors import PyvmmError
from ..node import ServiceDevices
from .agent import Agent
from .health import invariant_problems
from .instance import OsInstance
from .microvisor import VIRTUALIZED, Microvisor, MicrovisorError
from .preflight import upgrade_problems

PHASES = (
    "preflight",
    "virtualize",
    "boot",
    "ready",
    "release",
    "move",
    "acquire",
    "retire",
    "devirtualize",
)
DEFAULT_TIMEOUTS = {"boot": 10.0, "ready": 20.0, "release": 10.0, "acquire": 20.0}
STANDBY_SLICE_S = 0.002
FAULTS = (
    "boot-fails",
    "crash-after-ready",
    "never-serving",
    "release-refused",
    "phase-timeout",
    "release-timeout",
    "release-closed",
    "crash-during-acquire",
    "disk-eio",
    "agent-dies-after-serving",
    "retire-fails",
    "devirtualize-fails",
)
# Guest faults: armed in A's agent before the release, or on B's command line.
A_FAULTS = {
    "release-refused": "release-refused",
    "release-timeout": "release-hang",
    "release-closed": "release-close",
}
B_FAULTS = {
    "never-serving": "never-serving",
    "crash-during-acquire": "crash-on-acquire",
    "agent-dies-after-serving": "agent-close",
}
COMMIT = "acquire"  # B's "serving" to it is the commit point
AFTER_COMMIT = ("retire", "devirtualize")
ATTEMPTS = 3  # tries of a step after the commit
RETRY_PAUSE_S = 0.1


class UpgradeFailed(Exception):
    def __init__(self, phase: str, reason: str) -> None:
        super().__init__(f"{phase}: {reason}")
        self.phase = phase
        self.reason = reason


class Upgrade:
    """One online upgrade of the running instance to ``kernel``."""

    _running = threading.Lock()

    def __init__(
        self,
        microvisor: Microvisor,
        services: ServiceDevices,
        kernel: str,
        cmdline: str = "",
        timeouts: dict[str, float] | None = None,
        inject: str | None = None,
        progress: Callable[[str, str, float], None] | None = None,
        force: bool = False,
    ) -> None:
        if inject is not None and inject not in FAULTS:
            raise PyvmmError(f"unknown fault {inject!r}; one of {', '.join(FAULTS)}")
        self.mv = microvisor
        self.services = services
        self.kernel = kernel
        self.cmdline = cmdline
        self.timeouts = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
        if inject == "phase-timeout":
            # Zero: even an answer within the socket's 1 ms granularity comes too late.
            self.timeouts["acquire"] = 0.0
        self.inject = inject
        self.progress = progress or (lambda phase, state, seconds: None)
        self.phases: list[dict[str, object]] = []
        self.phase: str | None = None
        self.versions: dict[str, str] = {}
        self._fired = False  # a host fault that fires once has fired
        # Forced failover: an old instance that hangs in its release (time-out, agent
        # gone) is fenced and the upgrade goes on, instead of rolling back to it.
        self.force = force
        self.forced: str | None = None  # why A was fenced
        self.trace: list[tuple[float, str, str]] = []  # Microvisor.trace while running

    # --- driver ------------------------------------------------------------------

    def run(self) -> dict[str, object]:
        with self.mv.gate.hold("upgrade"):  # one mutating operation at a time
            return self._run_once()

    def _run_once(self) -> dict[str, object]:
        if not Upgrade._running.acquire(blocking=False):
            raise PyvmmError("an upgrade is already running on this node")
        self.started = time.monotonic()
        self._note("running", None, None, None)
        self.mv.trace = self.trace = []
        consoles = list(self.mv.machine.consoles.values())
        for console in consoles:  # the guests' own words, on the host's clock
            console.on_line = self._console_line
        try:
            result = self._run()
        except BaseException as exc:  # not expected: _run keeps its own failures
            self._note("failed", self.phase, f"{type(exc).__name__}: {exc}", None)
            raise
        finally:
            self.mv.trace = None
            for console in consoles:
                console.on_line = None
            Upgrade._running.release()
        result["total_s"] = round(time.monotonic() - self.started, 4)
        # The hand-off step by step, with the world switches and held interrupts:
        # [ms since the start, event, detail] (benchmarks/downtime.py --timeline).
        result["trace"] = [
            [round((t - self.started) * 1000, 3), what, detail] for t, what, detail in self.trace
        ]
        # CLOCK_MONOTONIC is host-wide: clients on this host can place the phases
        # on their own time line (each phase's "start" is relative to this).
        result["monotonic_start"] = self.started
        result["phases"] = self.phases
        self._note(str(result["outcome"]), result.get("failed_phase"), result.get("reason"), result)
        return result

    def _note(self, outcome: str, phase: object, reason: object, report: object) -> None:
        """``status``'s ``last_upgrade``: how it ended, or how far it is."""
        self.mv.last_upgrade = {
            "outcome": outcome,
            "phase": phase,
            "reason": reason,
            "kernel": self.kernel,
            "report": report,
        }

    def _run(self) -> dict[str, object]:
        self.a = next((i for i in self.mv.live()), None)
        self.b: OsInstance | None = None
        self.agents: dict[str, Agent] = {}
        self.disk_moved = self.listeners_moved = self.a_paused = self.release_asked = False
        self.virtualized_here = False
        self.trouble: list[str] = []  # compensations or late steps that failed
        try:
            try:
                for phase in PHASES[: PHASES.index(COMMIT) + 1]:
                    self._phase(phase, getattr(self, f"_{phase}"))
            except UpgradeFailed as failure:
                self._roll_back()
                result: dict[str, object] = {
                    "ok": False,
                    "outcome": "rolled_back",
                    "rolled_back": True,
                    "failed_phase": failure.phase,
                    "reason": failure.reason,
                    "before": self.versions.get("a"),
                    "after": self.versions.get("a"),
                }
            else:
                result = self._roll_forward()
        finally:
            self._close_agents()
            self._clear_host_faults()
        result["invariant"] = problems = invariant_problems(self.mv, self.services)
        if self.trouble:
            result["trouble"] = self.trouble
        # A preflight refusal changed nothing: what was wrong before is not its doing.
        ours = result.get("failed_phase") != "preflight"
        if result["outcome"] == "rolled_back" and (self.trouble or (problems and ours)):
            result["outcome"] = "failed"  # the rollback did not bring A back whole
        return result

    def _roll_forward(self) -> dict[str, object]:
        """After the commit: B serves. What is left is retried, or reported."""
        assert self.b is not None
        left = None
        for phase in AFTER_COMMIT:
            if not self._phase_retried(phase):
                left = phase
                break
        result: dict[str, object] = {
            "ok": True,
            "outcome": "upgraded",
            "before": self.versions.get("a"),
            "after": self.versions.get("b"),
            "instance": self.b.name,
        }
        if self.forced is not None:
            result["forced"] = self.forced
        if left is not None:
            reason = self.trouble[-1]
            if self.a is not None and self.a.live:
                self.mv.retire_pending = self.a.name
                try:
                    self.mv.pause(self.a.name)  # released and fenced: it must not run
                except Exception as exc:
                    self.trouble.append(f"pause {self.a.name}: {exc}")
            self.mv.virtualized_reason = (
                f"upgrade to {self.versions.get('b')} committed but {left} failed "
                f"({reason}); `pyvmm ctl NODE devirtualize` finishes it"
            )
            result.update(outcome="rolled_forward", failed_phase=left, reason=reason)
        return result

    def _phase(self, name: str, step: Callable[[], None]) -> None:
        self.phase = name
        if self.mv.last_upgrade is not None:
            self.mv.last_upgrade["phase"] = name
        self.progress(name, "start", 0.0)
        started = time.monotonic()
        try:
            step()
        except UpgradeFailed:
            self._record(name, started, "failed")
            raise
        except Exception as exc:  # whatever it is, the state machine decides what next
            self._record(name, started, "failed")
            reason = str(exc) or type(exc).__name__
            if not isinstance(exc, MicrovisorError | PyvmmError | OSError):
                reason = f"{type(exc).__name__}: {reason}"
            raise UpgradeFailed(name, reason) from None
        self._record(name, started, "done")

    def _phase_retried(self, name: str) -> bool:
        """A step after the commit: tried ATTEMPTS times; False if it never succeeded."""
        for attempt in range(ATTEMPTS):
            try:
                self._phase(name, getattr(self, f"_{name}"))
                return True
            except UpgradeFailed as failure:
                self.trouble.append(f"{name} (try {attempt + 1}): {failure.reason}")
                time.sleep(RETRY_PAUSE_S)
        return False

    def _record(self, name: str, started: float, state: str) -> None:
        seconds = time.monotonic() - started
        self.phases.append(
            {
                "phase": name,
                "state": state,
                "start": round(started - self.started, 4),
                "seconds": round(seconds, 4),
            }
        )
        self.progress(name, state, seconds)

    # --- phases before the commit --------------------------------------------------------

    def _preflight(self) -> None:
        problems, spare, _ = upgrade_problems(self.mv, self.services, self.kernel)
        if problems:
            raise UpgradeFailed("preflight", problems[0])
        self.spare = spare
        self.agents["a"] = Agent(self.services, self.a.partition.index, 5.0)
        self.versions["a"] = self._version(self.agents["a"], 5.0)

    def _virtualize(self) -> None:
        if self.mv.mode != VIRTUALIZED:
            self.mv.virtualize()
            self.virtualized_here = True

    def _boot(self) -> None:
        name = "b" if self.a.name != "b" else "a"
        kernel = self.kernel
        if self.inject == "boot-fails":
            kernel = os.devnull  # an image that does not parse: start must refuse it
        console = f"console=ttyS{self.spare.index}"
        fault = f" fault={B_FAULTS[self.inject]}" if self.inject in B_FAULTS else ""
        cmdline = f"{console} role=standby name={name}{fault} {self.cmdline}".strip()
        # The name of a retired instance can be reused.
        self.b = self.mv.start(kernel, cmdline, name=name)
        # Until it serves, B is background work: short turns, so A's clients wait at
        # most one of them whenever B preempts a busy A.
        self.b.slice_s = STANDBY_SLICE_S

    def _ready(self) -> None:
        deadline = time.monotonic() + self.timeouts["ready"]
        while True:
            self._check_alive(self.b, "ready")
            agent = None
            try:
                agent = Agent(self.services, self.b.partition.index, 1.0)
                self.versions["b"] = self._version(agent, 1.0, self._b_alive)
                self.agents["b"] = agent
                break
            except (OSError, ConnectionError, UpgradeFailed):
                if agent is not None:
                    agent.close()  # each failed poll's connection and listener go
                if time.monotonic() > deadline:
                    raise UpgradeFailed("ready", "the new instance never reported ready") from None
                time.sleep(0.05)
        # B is ready and has nothing to do until it acquires: A keeps the vCPU alone
        # from here, so its release and the clients it still serves are not sliced
        # with B (B's interrupts are held meanwhile).
        self.mv.focus(self.a.name)
        self._event("vCPU to A alone")
        if self.inject == "crash-after-ready":
            self.mv.stop(self.b.name)  # as if it had crashed: it is gone, the service is not

    def _release(self) -> None:
        self._check_alive(self.b, "release")
        if self.inject in A_FAULTS:
            self._arm_fault(self.agents["a"], A_FAULTS[self.inject], "release")
        for listener in self.services.listeners:
            listener.detach()  # new connections wait in the listen queue from here on
        self.listeners_moved = True
        self.release_asked = True
        self._event("listeners detached; release asked")
        try:
            reply = self.agents["a"].ask("release", self.timeouts["release"], self._a_alive)
        except (TimeoutError, ConnectionError) as exc:
            if not self.force or not self._a_alive():
                raise
            self._fence_a(str(exc))
            return
        if reply.startswith("refused"):
            why = reply.partition(" ")[2] or "no reason given"
            raise UpgradeFailed("release", f"the old instance refused to release: {why}")
        if reply != "released":
            raise UpgradeFailed("release", f"the old instance answered {reply!r}")
        self._event("A released")
        # A has nothing to do until a rollback: B gets the vCPU alone, so its acquire
        # does not wait for A's slices. Posted, not waited for: the vCPU thread
        # switches to B while the lease and the listeners move (the acquire sent to
        # B is held for it until then).
        self.mv.focus(self.b.name, wait=False)
        self.a_paused = True
        self._event("vCPU to B alone (posted)")

    def _fence_a(self, why: str) -> None:
        """--force: A hangs in its release. It is paused at once (it runs no more), and
        the disk lease moving to B next fences its writes; its client connections go
        to B when it is stopped (retire), with the requests it took and never answered.
        Its acknowledged writes are on the disk: it flushes before it answers."""
        self.forced = f"the old instance did not release ({why}); it was fenced"
        self.mv.focus(self.b.name)
        self.a_paused = True

    def _move(self) -> None:
        self._check_alive(self.b, "move")
        self.services.give_disk(self.b.partition.index)
        self.disk_moved = True
        self._event("disk lease moved")
        vsock = self.services.vsocks[self.b.partition.index]
        for listener in self.services.listeners:
            # Waiting connections are offered to B now; B holds them in its backlog
            # and takes them the moment it serves, so the handshakes overlap acquire.
            listener.attach(vsock)
        self._event("listeners attached; acquire asked")

    def _acquire(self) -> None:
        if self.inject == "disk-eio":
            self.services.disks[self.b.partition.index].fail_io = True
        timeout = self.timeouts["acquire"]
        started = time.monotonic()
        try:
            reply = self.agents["b"].ask("acquire", max(timeout, 0.001), self._b_alive)
        except TimeoutError:
            raise UpgradeFailed("acquire", "the new instance never reported serving") from None
        if time.monotonic() - started > timeout:  # an answer after the deadline is none
            raise UpgradeFailed("acquire", "the new instance never reported serving in time")
        if not reply.startswith("serving"):
            raise UpgradeFailed("acquire", f"the new instance answered {reply!r}")
        self._event("B serving")
        self.b.slice_s = None  # committed: B is the node's service now

    # --- phases after the commit: retried, never rolled back --------------------------

    def _retire(self) -> None:
        if "a" in self.agents:
            self.agents.pop("a").close()
        if self.inject == "retire-fails" and not self._fired:
            self._fired = True
            self.mv.fail_next("stop")  # raises inside the VMM once: the retry succeeds
        if self.a.live:
            self.mv.stop(self.a.name)

    def _devirtualize(self) -> None:
        if self.inject == "devirtualize-fails":
            self.mv.fail_next("devirtualize")  # every try of this upgrade fails
        if self.mv.mode == VIRTUALIZED:
            self.mv.devirtualize()

    # --- rollback ------------------------------------------------------------------------

    def _roll_back(self) -> None:
        """Before the commit: the service goes back to A (see the table above)."""
        if self.a is None:
            return  # refused before anything was done
        self.progress("rollback", "start", 0.0)
        started = time.monotonic()
        a_vsock = self.services.vsocks[self.a.partition.index]
        steps: list[tuple[str, bool, Callable[[], None]]] = [
            ("stop B", self.b is not None and self.b.live, lambda: self.mv.stop(self.b.name)),
            (
                "disk lease back to A",
                self.disk_moved,
                lambda: self.services.give_disk(self.a.partition.index),
            ),
            ("resume A", self.a_paused, lambda: self.mv.resume(self.a.name)),
            ("A acquires again", self.release_asked, self._a_acquires_again),
            (
                "listeners back to A",
                self.listeners_moved,
                lambda: [listener.attach(a_vsock) for listener in self.services.listeners],
            ),
            ("devirtualize", True, self._devirtualize_if_virtualized),
        ]
        failed = False
        for what, needed, compensate in steps:
            if not needed:
                continue
            try:
                compensate()
            except Exception as exc:
                failed = True
                self.trouble.append(f"rollback: {what}: {type(exc).__name__}: {exc}")
        self._record("rollback", started, "failed" if failed else "done")

    def _a_acquires_again(self) -> None:
        """A serves again. Its first agent connection may be dead or out of step (a
        release time-out), so a fresh one asks; A still busy releasing says so, and is
        asked again until it has let go and can take the service back."""
        old = self.agents.pop("a", None)
        if old is not None:
            old.close()
        timeout = DEFAULT_TIMEOUTS["acquire"]  # the full one, even after a time-out
        deadline = time.monotonic() + timeout
        agent = self.agents["a"] = Agent(self.services, self.a.partition.index, 5.0)
        while True:
            reply = agent.ask("acquire", max(0.1, deadline - time.monotonic()), self._a_alive)
            if reply.startswith("serving"):
                return
            if reply != "error releasing" or time.monotonic() > deadline:
                raise PyvmmError(f"the old instance answered {reply!r} to acquire")
            time.sleep(0.02)

    def _devirtualize_if_virtualized(self) -> None:
        """Back to A alone, devirtualized; but instances someone else started before
        this upgrade (it was refused at preflight) are left as they were."""
        if self.mv.mode == VIRTUALIZED and (self.virtualized_here or len(self.mv.live()) == 1):
            self.mv.devirtualize()

    # --- helpers ---------------------------------------------------------------------

    def _event(self, what: str, detail: str = "") -> None:
        self.trace.append((time.monotonic(), what, detail))

    def _console_line(self, line: bytes) -> None:
        self._event("console", line[:160].decode(errors="replace"))

    def _close_agents(self) -> None:
        for agent in self.agents.values():
            agent.close()
        self.agents.clear()

    def _clear_host_faults(self) -> None:
        if self.b is not None and self.inject == "disk-eio":
            self.services.disks[self.b.partition.index].fail_io = False
        self.mv.fail_next("stop", 0)
        self.mv.fail_next("devirtualize", 0)

    def _a_alive(self) -> bool:
        return self.a is not None and self.a.live

    def _b_alive(self) -> bool:
        return self.b is not None and self.b.live

    def _check_alive(self, instance: OsInstance | None, phase: str) -> None:
        if instance is None or not instance.live:
            raise UpgradeFailed(phase, "the new instance is gone (crashed or powered off)")

    def _arm_fault(self, agent: Agent, fault: str, phase: str) -> None:
        reply = agent.ask(f"fault {fault}", self.timeouts[phase])
        if reply != f"ok fault={fault}":
            raise UpgradeFailed(phase, f"cannot inject {fault}: the agent answered {reply!r}")

    @staticmethod
    def _version(agent: Agent, timeout: float, alive: Callable[[], bool] | None = None) -> str:
        reply = agent.ask("ready?", timeout, alive)
        if not reply.startswith("ready "):
            raise UpgradeFailed("ready", f"unexpected agent reply {reply!r}")
        return reply.split()[1]
