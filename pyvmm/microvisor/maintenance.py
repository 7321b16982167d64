"""Online upgrade: the maintenance protocol of DESIGN.md §6 as a state machine.

Phases, each with a time-out: preflight → virtualize → boot → ready → release →
move → acquire → retire → devirtualize. A failure before ``retire`` rolls back: the
service goes back to the old instance A, the new instance B is stopped, and the
node is devirtualized with A. Nothing acknowledged is lost: A flushes its log before
it reports ``released``, and B recovers that log before it reports ``serving``.

The instances' maintenance agents speak a line protocol on vsock port 7000
(``ready?`` / ``release`` / ``acquire``), reached through a host listener on the
instance's own vsock device, like any other client: no hypervisor interface.

Injected faults (``inject``, for tests and demos) make the guests misbehave, except
``phase-timeout``, a time-out too short for anyone. ``boot-fails`` gives B an image
that does not parse, ``crash-after-ready`` stops B as a crash would, ``never-serving``
boots B with ``fault=never-serving`` (its agent never answers ``acquire``), and
``release-refused`` arms A's agent with ``fault release-refused`` just before the
release (A refuses it and serves on; the fault fires once).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from ..errors import PyvmmError
from ..node import ServiceDevices
from .agent import Agent
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
FAULTS = ("boot-fails", "crash-after-ready", "never-serving", "release-refused", "phase-timeout")


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

    # --- driver ------------------------------------------------------------------

    def run(self) -> dict[str, object]:
        with self.mv.gate.hold("upgrade"):  # one mutating operation at a time
            return self._run_once()

    def _run_once(self) -> dict[str, object]:
        if not Upgrade._running.acquire(blocking=False):
            raise PyvmmError("an upgrade is already running on this node")
        self.started = time.monotonic()
        self._note("running", None, None, None)
        try:
            result = self._run()
        except BaseException as exc:
            self._note("failed", self.phase, f"{type(exc).__name__}: {exc}", None)
            raise
        finally:
            Upgrade._running.release()
        result["total_s"] = round(time.monotonic() - self.started, 4)
        # CLOCK_MONOTONIC is host-wide: clients on this host can place the phases
        # on their own time line (each phase's "start" is relative to this).
        result["monotonic_start"] = self.started
        result["phases"] = self.phases
        if result["ok"]:
            self._note("upgraded", None, None, result)
        else:
            self._note("rolled_back", result["failed_phase"], result["reason"], result)
        return result

    def _note(self, outcome: str, phase: str | None, reason: str | None, report: object) -> None:
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
        self.b = None
        self.agents: dict[str, Agent] = {}
        self.disk_moved = self.listeners_moved = self.a_paused = False
        try:
            for phase in PHASES:
                self._phase(phase, getattr(self, f"_{phase}"))
            return {
                "ok": True,
                "before": self.versions.get("a"),
                "after": self.versions.get("b"),
                "instance": self.b.name,
            }
        except UpgradeFailed as failure:
            self._rollback(failure)
            return {
                "ok": False,
                "rolled_back": True,
                "failed_phase": failure.phase,
                "reason": failure.reason,
                "before": self.versions.get("a"),
                "after": self.versions.get("a"),
            }
        finally:
            for agent in self.agents.values():
                agent.close()

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
        except (MicrovisorError, PyvmmError, OSError, TimeoutError, ConnectionError) as exc:
            self._record(name, started, "failed")
            raise UpgradeFailed(name, str(exc) or type(exc).__name__) from None
        self._record(name, started, "done")

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

    # --- phases ------------------------------------------------------------------------

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

    def _boot(self) -> None:
        name = "b" if self.a.name != "b" else "a"
        kernel = self.kernel
        if self.inject == "boot-fails":
            kernel = os.devnull  # an image that does not parse: start must refuse it
        console = f"console=ttyS{self.spare.index}"
        fault = " fault=never-serving" if self.inject == "never-serving" else ""
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
            try:
                agent = Agent(self.services, self.b.partition.index, 1.0)
                self.versions["b"] = self._version(agent, 1.0)
                self.agents["b"] = agent
                break
            except (OSError, ConnectionError, UpgradeFailed):
                if time.monotonic() > deadline:
                    raise UpgradeFailed("ready", "the new instance never reported ready") from None
                time.sleep(0.05)
        if self.inject == "crash-after-ready":
            self.mv.stop(self.b.name)  # as if it had crashed: it is gone, the service is not

    def _release(self) -> None:
        self._check_alive(self.b, "release")
        if self.inject == "release-refused":
            self._arm_fault(self.agents["a"], "release-refused", "release")
        for listener in self.services.listeners:
            listener.detach()  # new connections wait in the listen queue from here on
        self.listeners_moved = True
        reply = self.agents["a"].ask("release", self.timeouts["release"])
        if reply.startswith("refused"):
            why = reply.partition(" ")[2] or "no reason given"
            raise UpgradeFailed("release", f"the old instance refused to release: {why}")
        if reply != "released":
            raise UpgradeFailed("release", f"the old instance answered {reply!r}")
        # A has nothing to do until a rollback: keep it off the vCPU, so B's acquire
        # does not wait for A's slices.
        self.mv.pause(self.a.name)
        self.a_paused = True

    def _move(self) -> None:
        self._check_alive(self.b, "move")
        self.services.give_disk(self.b.partition.index)
        self.disk_moved = True
        vsock = self.services.vsocks[self.b.partition.index]
        for listener in self.services.listeners:
            # Waiting connections are offered to B now; B holds them in its backlog
            # and takes them the moment it serves, so the handshakes overlap acquire.
            listener.attach(vsock)

    def _acquire(self) -> None:
        timeout = self.timeouts["acquire"]
        started = time.monotonic()
        try:
            reply = self.agents["b"].ask("acquire", max(timeout, 0.001))
        except TimeoutError:
            raise UpgradeFailed("acquire", "the new instance never reported serving") from None
        if time.monotonic() - started > timeout:  # an answer after the deadline is none
            raise UpgradeFailed("acquire", "the new instance never reported serving in time")
        if not reply.startswith("serving"):
            raise UpgradeFailed("acquire", f"the new instance answered {reply!r}")
        self.b.slice_s = None

    def _retire(self) -> None:
        self.agents.pop("a").close()
        self.mv.stop(self.a.name)

    def _devirtualize(self) -> None:
        self.mv.devirtualize()

    # --- rollback ------------------------------------------------------------------------

    def _rollback(self, failure: UpgradeFailed) -> None:
        self.progress("rollback", "start", 0.0)
        started = time.monotonic()
        if self.a_paused:
            self.mv.resume(self.a.name)
        if self.b is not None and self.b.live:
            self.mv.stop(self.b.name)
        if self.disk_moved:
            self.services.give_disk(self.a.partition.index)
        if self.listeners_moved:
            # The full time-out even when the failure was a (possibly injected) time-out.
            reply = self.agents["a"].ask("acquire", DEFAULT_TIMEOUTS["acquire"])
            if not reply.startswith("serving"):
                raise PyvmmError(f"rollback: the old instance answered {reply!r} to acquire")
            vsock = self.services.vsocks[self.a.partition.index]
            for listener in self.services.listeners:
                listener.attach(vsock)
        if self.mv.mode == VIRTUALIZED:
            self.mv.devirtualize()
        self._record("rollback", started, "done")

    # --- helpers ---------------------------------------------------------------------

    def _check_alive(self, instance: OsInstance | None, phase: str) -> None:
        if instance is None or not instance.live:
            raise UpgradeFailed(phase, "the new instance is gone (crashed or powered off)")

    def _arm_fault(self, agent: Agent, fault: str, phase: str) -> None:
        reply = agent.ask(f"fault {fault}", self.timeouts[phase])
        if reply != f"ok fault={fault}":
            raise UpgradeFailed(phase, f"cannot inject {fault}: the agent answered {reply!r}")

    @staticmethod
    def _version(agent: Agent, timeout: float) -> str:
        reply = agent.ask("ready?", timeout)
        if not reply.startswith("ready "):
            raise UpgradeFailed("ready", f"unexpected agent reply {reply!r}")
        return reply.split()[1]
