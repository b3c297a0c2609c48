"""What the manager needs from the outside world, as protocols: who listens to jobs, and who runs them.

The bus layer and observability implement JobListener; runner.systemd implements Runner.
The manager depends only on these, so it can be tested without a bus or a systemd.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from h2kd.model.job import Job


@dataclass
class Event:
    """One entry of a job's event log. kind: state | progress | log | result."""

    job_id: str
    seq: int
    time: int          # usec since epoch
    kind: str
    data: dict[str, Any]


@dataclass
class WorkerInfo:
    id: str
    name: str
    kind: str                              # "builtin" | "external"
    capabilities: dict[str, Any]           # e.g. {"operations": [...], "formats": [...], "qemu_img": true, "loop": true}
    max_jobs: int = 0                      # 0: no limit of its own (MaxParallelJobs bounds the builtin's units)
    state: str = "idle"                    # idle | busy | stale
    active_jobs: int = 0
    last_heartbeat: int = 0                # usec since the epoch, as shown
    alive_at: float = 0.0                  # time.monotonic() then: staleness is judged by it, not by a clock an
                                           # NTP step or a resumed VM moves
    owner: int = 0
    bus_name: str = ""                     # unique name of the registering connection (external)


class JobListener(Protocol):
    """Told of every change, synchronously, after it is stored. Must not raise or block."""

    # A new job, in the state its submission leaves it (validated or queued; created, when the submission
    # is refused and fails it right away), or a stored job at start-up; job_event then tells the state
    # events that led there.
    def job_added(self, job: Job) -> None: ...
    # changed: names of changed Job attributes (e.g. {"state", "phase", "progress"}); urgent: a state
    # change or final update that must go out now rather than be coalesced.
    def job_changed(self, job: Job, changed: set[str], urgent: bool) -> None: ...
    def job_event(self, job: Job, event: Event) -> None: ...
    def job_removed(self, job: Job) -> None: ...
    def worker_added(self, worker: WorkerInfo) -> None: ...
    def worker_changed(self, worker: WorkerInfo) -> None: ...
    def worker_removed(self, worker: WorkerInfo) -> None: ...
    def manager_changed(self, changed: set[str]) -> None: ...   # JobsQueued, JobsRunning, Paused, MaxParallelJobs


class StartDeferred(Exception):
    """Runner.start did not start the unit, for a reason that passes and is no fault of the job: systemd is
    not reachable or short of memory, no room for the attempt's files. The attempt is tried again later
    without using up the job's retries."""


class StartWithdrawn(Exception):
    """Runner.start found the job's cancel requested (job.cancel_requested) once the attempt's files and slice
    were ready, and started no unit: the start is not wanted any more."""


class StartUnanswered(Exception):
    """Runner.start sent the start but got no answer (a timeout, a broken connection): the unit may run or
    not. The runner goes on following it and reports what became of it (unit_status, unit_finished)."""

    def __init__(self, unit: str, message: str):
        super().__init__(message)
        self.unit = unit


@dataclass
class UnitOutcome:
    """How an attempt's unit ended, as the runner saw it."""

    unit: str
    result: str                      # systemd's Result: success, exit-code, signal, timeout, core-dump, ...
    exit_status: int = 0             # ExecMainStatus
    worker_result: dict[str, Any] | None = None   # the worker's result file (JobResult JSON), if it wrote one
    log_tail: list[str] = field(default_factory=list)
    stopped_by_request: bool = False  # h2kd stopped it (Runner.stop); an administrator's systemctl stop is not
    interrupted: bool = False         # stopped by the system going down (shutdown, reboot), not by anyone's wish
    ended_at: int = 0                 # when it ended (µs since the epoch), if h2kd was not there to see it; 0: now
    started_at: int = 0               # when its worker started (µs since the epoch), if known; 0: not known
    ran_usec: int = 0                 # how long its worker ran, by the monotonic clock (systemd's), if known


class RunnerEvents(Protocol):
    """Implemented by the manager; the runner calls these from the event loop."""

    def unit_status(self, job_id: str, attempt: int, status_text: str, started_at: int = 0) -> None:
        """The unit's status line changed; started_at: when its worker started (µs since the epoch), 0 if not
        known."""
        ...
    def unit_finished(self, job_id: str, attempt: int, outcome: UnitOutcome) -> None: ...
    def system_stopping(self, stopping: bool) -> None:
        """The system began shutting down (no unit may start now), or called the shutdown off."""
        ...

    def runner_connected(self) -> None:
        """systemd is reachable (again): units can be started."""
        ...


class Runner(Protocol):
    """Runs attempts as transient systemd units (runner.systemd.SystemdRunner)."""

    @property
    def reachable(self) -> bool: ...
    async def start(self, job: Job, attempt: int) -> str:
        """Write the attempt's spec, start its unit, follow it; return the unit name. A cancel requested while
        the start is prepared (job.cancel_requested) withdraws it: StartWithdrawn, and no unit."""
        ...
    async def stop(self, unit: str) -> None:
        """Ask systemd to stop the unit; unit_finished follows when it is really gone."""
        ...
    async def reattach(self, job: Job) -> str:
        """After a restart: follow the attempt's unit again if it still runs, else report unit_finished;
        return the unit's name (job.unit, or the name its start would have given it)."""
        ...
    def forget(self, job: Job) -> None:
        """The job is gone from h2kd (removed, or pruned): remove what its attempts left (their directories), off
        the event loop; an attempt of a later job with the same id starts only once they are gone."""
        ...
    async def keep_only(self, jobs: Iterable[Job], unreadable_ids: Iterable[str] = ()) -> None:
        """At start: remove, off the event loop, the attempt directories that belong to none of these jobs'
        attempts (what a removal cut short by h2kd's stop or death left), nor to any attempt of a job whose
        stored row could not be read (unreadable_ids)."""
        ...
    def capabilities(self) -> dict[str, Any]:
        """What this host can do (qemu_img, loop, nbd, dm, lvm, free_bytes per output root...)."""
        ...
