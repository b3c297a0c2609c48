"""JobManager: the core. Takes submissions, keeps jobs in the store, feeds the scheduler, drives runners and workers.

It knows nothing of D-Bus: the bus layer calls these methods and listens through JobListener.
CONTRACT (implemented in this file):

    m = JobManager(config, store, runner)         # runner may be None: jobs then wait ("no runner")
    m.attach_runner(runner)                       # the runner's events go to m (RunnerEvents)
    m.add_listener(listener)
    m.load()                                      # jobs from the store, no notifications
    await m.start(); await m.stop()               # start: reconcile in-flight jobs, schedule
    # queries (sync, raise NoSuchJob)
    m.get(job_id) -> Job;  m.jobs -> list[Job] in submission order
    m.list_jobs(states=None, operation=None, owner=None, limit=0, offset=0) -> list[Job]
    m.events(job_id, since=0) -> list[Event];  m.history(job_id) -> list[dict]
    m.queue_stats() -> dict;  m.health() -> dict
    m.paused, m.max_parallel, m.jobs_queued, m.jobs_running
    m.workers -> list[WorkerInfo];  m.get_worker(worker_id) -> WorkerInfo
    # commands (raise InvalidSpec, AlreadyExists, QueueFull, InvalidState, NoSuchJob, InvalidArgument)
    m.submit(spec, owner, queue=True, source_proof=None) -> tuple[Job, bool]   # bool: newly created
    await m.submit_grouped(spec, owner, queue=True, source_proof=None)          # same; commits shared with the
                                                  # other submissions of the loop's turn (group commit)
    await m.cancel(job_id)   # queued: cancelled at once; running: unit stopped, cancelled when gone
    m.retry(job_id); m.start_job(job_id); m.remove(job_id)
    m.set_priority(job_id, priority); m.pause(); m.resume(); m.set_max_parallel(n)
    # external workers (raise NoSuchWorker, InvalidState)
    m.register_worker(name, capabilities: dict, max_jobs: int, owner: int, bus_name: str) -> WorkerInfo
    m.heartbeat(worker_id); m.claim(worker_id) -> Job | None
    m.report_progress(worker_id, job_id, progress: float|None, bytes_done, bytes_total, phase, message, attempt=None)
    m.report_result(worker_id, job_id, success, outputs: dict, error_code, error_message, bytes_read, bytes_written,
                    attempt=None)
    m.unregister_worker(worker_id); await m.refresh_worker(worker_id)
    m.bus_name_lost(bus_name)   # a worker's connection vanished: treat its worker as stale
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections import Counter, deque
from typing import Any, Callable, Iterable, Iterator

from h2kd import __version__
from h2kd.config import MAX_PARALLEL_JOBS, Config
from h2kd.errors import (AlreadyExists, H2kError, InvalidArgument, InvalidSpec, InvalidState, NoSuchJob, NoSuchWorker,
                         StoreFailed)
from h2kd.manager.limits import UnfinishedJobs
from h2kd.manager.ports import (Event, JobListener, Runner, StartDeferred, StartUnanswered, StartWithdrawn, UnitOutcome,
                                WorkerInfo)
from h2kd.model.job import Job, now_usec
from h2kd.model.result import NON_RETRYABLE, ErrorCode
from h2kd.model.spec import MAX_SPEC_BYTES, parse_spec, same_spec, spec_to_json
from h2kd.model.states import ACTIVE, TERMINAL, JobState
from h2kd.scheduler import Scheduler
from h2kd.store import JobStore
from h2kd.worker.report import parse_status

log = logging.getLogger("h2kd.manager")

S = JobState
BUILTIN = "builtin"
OPERATIONS = ["inspect", "convert", "validate", "offline_fix"]
RATE_WINDOW_USEC = 10_000_000
PRUNE_INTERVAL_SECONDS = 3600
HOST_REFRESH_SECONDS = 30.0     # how often the builtin worker's capabilities (free space above all) are detected again
MAX_WAITING_LISTED = 1000     # queue_stats() says why the first this many queued jobs wait (its reply stays small)
# Each retry adds to a job's history and event log, kept as long as the job: a cancel-and-retry loop must not
# grow them without end. Retries h2kd makes itself are few (retry_count <= 5).
MAX_RETRIES = 100
# Attempts that end through no fault of the job (never started, stopped by a shutdown) are not counted against
# its retries, up to this many: a unit that can never start, or a job whose conversion brings the host down,
# must not go round for ever on its own. A retry asked for by hand (at most MAX_RETRIES) allows as many again.
MAX_ATTEMPTS_NOT_COUNTED = 10
# Finished jobs beyond the retention count are pruned at once (not at the next hourly pass) when they exceed it
# by this many or this share: a flood of submissions that fail their checks must not pile up in memory.
PRUNE_SLACK_JOBS = 1000
PRUNE_SLACK_SHARE = 0.1
STORE_CHECK_INTERVAL = 10.0
# A transition the store could not take (its disk full) is tried again this much later: the job waits in the
# state the store has, and the queue goes on once there is room.
STORE_RETRY_SECONDS = 5.0
LOG_TAIL_LINE_CHARS = 1024      # of each of a failed unit's last lines, in its Result (journald allows 48 KiB)
STOP_RETRY_SECONDS = 10.0       # a cancelled job's unit that systemd did not stop is asked again after this
# An external worker whose connection closed can never come back (unique bus names are not reused): it is shown
# as stale this long, then forgotten, so that a worker agent restarting again and again leaves no trail.
GONE_WORKER_KEEP_SECONDS = 600.0
MAX_CAPABILITIES_BYTES = 64 * 1024   # an external worker's capabilities, as JSON
MAX_PHASE, MAX_MESSAGE = 64, 1024    # of an external worker's progress report (cut beyond)
MAX_RESULT_BYTES = 64 * 1024         # an external worker's outputs, as JSON: kept with the job for good
MAX_ERROR_MESSAGE = 4096             # of a worker's failure message (cut beyond)
UINT32_MAX = 2**32 - 1                # what a property of type u can carry
# Byte counts, rates and times: what both a property of type t and the store's INTEGER columns can carry.
COUNT_MAX = 2**63 - 1
PROGRESS_EVENT_PERCENT = 5      # a job's event log records its progress in steps of this many percent
PROGRESS_COMMIT_SECONDS = 1.0   # progress events reach the disk within this (a crash may lose that much of them)
# Host-level checks of a parsed spec for a given owner; returns an error message or None.
HostValidator = Callable[[Job, "os.stat_result | None"], "str | None"]


class JobManager:
    def __init__(self, config: Config, store: JobStore, runner: Runner | None = None,
                 host_validator: HostValidator | None = None):
        self._config = config
        self._store = store
        self._runner = runner
        self._host_validator = host_validator
        self._jobs: dict[str, Job] = {}
        self._active: set[str] = set()   # ids of jobs in an ACTIVE state (kept by _transition and load)
        self._unfinished = UnfinishedJobs(config.max_queued_jobs, config.max_jobs_per_user)
        self._system_stopping = False   # a shutdown is under way: no attempt starts (see system_stopping)
        self._scheduling = False        # from the end of start()'s recovery until stop(): attempts may start
        self._scheduler = Scheduler(config.max_parallel_jobs)
        self._listeners: list[JobListener] = []
        self._workers: dict[str, WorkerInfo] = {}
        self._starting: set[str] = set()      # jobs whose StartTransientUnit call has not returned yet
        # The latest status a unit reported while its start call had not returned: applied once it has (the
        # runner passes on only a status that changed, so a worker quiet for minutes after it would show none).
        self._status_while_starting: dict[str, str] = {}
        self._samples: dict[str, deque[tuple[int, int]]] = {}
        self._status_messages: dict[str, str] = {}   # job id -> the message of its last progress report
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._later_handles: set[asyncio.TimerHandle] = set()   # tries again after the store refused a change
        self._deadlines: dict[str, asyncio.TimerHandle] = {}    # job id: the end of its external attempt's time
        self._holding: dict[str, str] = {}      # job id -> the worker whose slot its attempt takes
        # (job id, its created_at, attempt) -> the external worker it was taken from (a cancel, a timeout), whose
        # slot it keeps until the worker is told (see _hold_until_told), and the timer that frees the slot at the
        # latest. created_at: a job removed and submitted again under its id is another job.
        self._taken: dict[tuple[str, int, int], tuple[str, asyncio.TimerHandle | None]] = {}
        self._held_back: set[str] = set()       # retrying jobs waiting for such a slot to be freed
        self._detecting: asyncio.Future[Any] | None = None     # the builtin worker's host detection under way
        # job id -> what its checks found, for a created job whose failure the store refused (see _fail_checks):
        # an identical resubmission is told that problem, not that it was taken.
        self._failure_unrecorded: dict[str, str] = {}
        self._stored_transitions = 0            # how many transitions the store took (see _all_or_nothing)
        self._schedule_retry_pending = False
        self._tasks: set[asyncio.Task] = set()
        self._soon_pending: set[Callable[[], None]] = set()   # see _soon
        self._manager_props: dict[str, Any] = {}
        self._started_at = time.monotonic()
        self._periodic: list[asyncio.Task] = []
        self._store_ok = True
        self._store_checked_at = float("-inf")
        self._unreadable_job_ids: list[str] = []     # rows of the store load() could not read
        self._store_check: asyncio.Future[bool] | None = None     # the store's check under way, if any
        self._worker_seq = 0

    # ---------------------------------------------------------------- lifecycle

    def add_listener(self, listener: JobListener) -> None:
        self._listeners.append(listener)

    def attach_runner(self, runner: Runner) -> None:
        """The runner needs the manager for its events, so it may be attached after construction."""
        self._runner = runner

    def load(self) -> None:
        """Read every job from the store, silently: listeners export what they find in .jobs themselves."""
        if not self._jobs:
            for job in self._store.load_jobs():
                self._jobs[job.id] = job
                self._unfinished.track(job)
                if job.state in ACTIVE:
                    self._active.add(job.id)
            if self._store.get_setting("paused", False):
                self._scheduler.pause()
            self._scheduler.max_parallel = self._store.get_setting("max_parallel_jobs", self._scheduler.max_parallel)
            # An agent from before a restart, registering again, must not be given the id another worker had.
            self._worker_seq = self._store.get_setting("last_worker_number", 0)
            self._unreadable_job_ids = list(self._store.unreadable_job_ids)

    async def start(self) -> None:
        """Reconcile what was in flight when h2kd last stopped, and begin scheduling."""
        self.load()
        builtin = WorkerInfo(id=BUILTIN, name=socket.gethostname(), kind="builtin",
                             capabilities=self._builtin_capabilities(), last_heartbeat=now_usec(),
                             alive_at=time.monotonic())
        self._workers[BUILTIN] = builtin
        self._notify("worker_added", builtin)
        if self._runner is not None:
            await self._runner.keep_only(list(self._jobs.values()), self._unreadable_job_ids)
        # Nothing starts before every job is back: a slot freed while a job is recovered (a unit found ended) would
        # go to the most urgent of the jobs recovered so far, not of all of them.
        for job in list(self._jobs.values()):
            await self._recover_or_later(job)
        self._scheduling = True
        # Not by age yet: a machine may boot with its clock far ahead until NTP sets it, and every finished job
        # would look old. The hourly pass prunes by age, by then on a clock set right.
        self._prune_now(by_age=False)   # a store that cannot be written now must not keep h2kd from starting
        self._periodic.append(asyncio.create_task(self._every(PRUNE_INTERVAL_SECONDS, self.prune)))
        self._periodic.append(asyncio.create_task(self._every(HOST_REFRESH_SECONDS, self._refresh_host)))
        self._periodic.append(asyncio.create_task(
            self._every(max(self._config.heartbeat_timeout_seconds / 3, 0.2), self._check_heartbeats)))
        self._manager_changed()
        self._kick()

    async def stop(self) -> None:
        """Stop scheduling; running units are systemd's and go on (re-attached at the next start)."""
        # The runner closes after this and may still report units that end meanwhile: the slots they free
        # must not start the next queued job while h2kd stops (`systemctl stop h2kd` for maintenance).
        self._scheduling = False
        for task in self._periodic:
            task.cancel()
        for timer in [*self._timers.values(), *self._later_handles, *self._deadlines.values(),
                      *(timer for _, timer in self._taken.values() if timer is not None)]:
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._periodic, *self._tasks, return_exceptions=True)

    async def _recover_or_later(self, job: Job, since: tuple[JobState, int] | None = None) -> None:
        """_recover(job); if the store cannot take what that changes, h2kd starts all the same and tries again.
        since: the (state, attempt) the job had when h2kd started; a later try acts only if nothing (a cancel, a
        retry) moved the job meanwhile, beyond what the refused try stored (validated, not yet queued)."""
        origin = since or (job.state, job.attempt)
        if since is not None:
            moved = (job.state, job.attempt) != since and (job.state, job.attempt) != (S.VALIDATED, since[1])
            if self._jobs.get(job.id) is not job or moved:
                return
        try:
            with self._all_or_nothing(job):
                if origin[0] == S.CREATED and job.state == S.VALIDATED:     # validated before; queued now
                    self._enqueue(job, "queued")
                else:
                    await self._recover(job)
        except StoreFailed as e:
            log.warning("could not take up job %s again: %s; trying again in %.0f s", job.id, e, STORE_RETRY_SECONDS)
            self._later(STORE_RETRY_SECONDS, lambda: self._spawn(self._recover_or_later(job, origin)))

    async def _recover(self, job: Job) -> None:
        if job.state == S.CREATED and job.error_message:     # its checks failed; the store refused to record it
            self._fail_checks(job, job.error_message)
        elif job.state == S.CREATED:  # stored by an earlier build, which validated after storing: not checked yet
            try:
                problem = self._host_validator(job, None) if self._host_validator else None
            except H2kError as e:
                problem = str(e)
            self._validate_and_queue(job, True, problem)
        elif job.state == S.QUEUED:
            self._requeue_in_memory(job)
        elif job.state == S.RETRYING:
            self._arm_requeue(job)
        elif job.state in ACTIVE:
            if job.worker != BUILTIN:
                # External workers are known for the life of one h2kd and register again after it restarted: the
                # claim is gone through no fault of the job's, so the attempt is not counted. The agent may still
                # be converting, and learns it lost the job from its next call (NoSuchWorker), at the latest a
                # heartbeat timeout from now: the next attempt waits until then, not to write the same outputs.
                job.taken_until = now_usec() + int(self._config.heartbeat_timeout_seconds * 1_000_000)
                self._requeue_or_fail(job, ErrorCode.WORKER_LOST, "its worker was lost when h2kd restarted",
                                      attempt_spent=False, wait_seconds=self._config.heartbeat_timeout_seconds)
            elif self._runner is None:
                self._requeue_or_fail(job, ErrorCode.WORKER_LOST, "no runner to re-attach to")
            else:
                self._take_slot(job, self._workers[BUILTIN])
                unit = await self._runner.reattach(job)
                if unit and job.unit != unit:
                    # Stopped before the unit's name was stored (between assigning and the first report, or a
                    # start systemd never answered): a Cancel must know which unit to stop.
                    job.unit = unit
                    with contextlib.suppress(StoreFailed):     # saved again with the unit's first report
                        self._store.save_job(job)
                if job.cancel_requested:
                    # Cancelled while h2kd was going down: it is stopped now (or once systemd is reachable), and
                    # ends cancelled.
                    await self._stop_cancelled(job)

    async def _every(self, seconds: float, fn: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                called = fn()
                if asyncio.iscoroutine(called):
                    await called
            except Exception:
                log.exception("periodic task %s failed", getattr(fn, "__name__", fn))

    # ---------------------------------------------------------------- queries

    @property
    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NoSuchJob(f"no job with id {job_id!r}") from None

    def list_jobs(self, states: Iterable[str] | None = None, operation: str | None = None,
                  owner: int | None = None, limit: int = 0, offset: int = 0) -> list[Job]:
        wanted = set(states) if states else None
        if wanted:
            unknown = wanted - {s.value for s in JobState}
            if unknown:
                raise InvalidArgument(f"unknown state {sorted(unknown)[0]!r}")
        selected = [
            job for job in self._jobs.values()
            if (wanted is None or job.state.value in wanted)
            and (not operation or job.operation == operation)
            and (owner is None or job.owner == owner)
        ]
        selected = selected[offset:]
        return selected[:limit] if limit else selected

    def events(self, job_id: str, since: int = 0, limit: int | None = None) -> list[Event]:
        self.get(job_id)
        return self._store.events(job_id, since, limit)

    def history(self, job_id: str) -> list[dict]:
        self.get(job_id)
        return self._store.history(job_id)

    @property
    def paused(self) -> bool:
        return self._scheduler.paused

    @property
    def max_parallel(self) -> int:
        return self._scheduler.max_parallel

    @property
    def jobs_queued(self) -> int:
        return len(self._scheduler)

    @property
    def jobs_running(self) -> int:
        return len(self._active)

    def oldest_queued_since(self) -> int:
        """When (usec) the job that has waited in the queue longest joined it; 0 with none queued."""
        return self._scheduler.oldest_since()

    @property
    def workers(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    def get_worker(self, worker_id: str) -> WorkerInfo:
        try:
            return self._workers[worker_id]
        except KeyError:
            raise NoSuchWorker(f"no worker with id {worker_id!r}") from None

    def queue_stats(self) -> dict[str, Any]:
        return {
            "queued": self.jobs_queued,
            "running": self.jobs_running,
            "paused": self.paused,
            "max_parallel_jobs": self.max_parallel,
            "by_priority": self._scheduler.counts_by_priority(),
            "waiting": self._scheduler.wait_reasons(limit=MAX_WAITING_LISTED),
        }

    def health(self) -> dict[str, Any]:
        self._check_store_if_due()
        reachable = self._runner is not None and self._runner.reachable
        stale = sum(1 for w in self._workers.values() if w.state == "stale")
        # A row that could not be read at start is a job h2kd cannot show, run or remove. Not store_ok, whose
        # failing the watchdog answers by having h2kd restarted: the row would still be there after it.
        return {
            "status": "ok" if self._store_ok and reachable and not self._unreadable_job_ids else "degraded",
            "version": __version__,
            "uptime_seconds": time.monotonic() - self._started_at,
            "jobs_active": self.jobs_running,
            "jobs_queued": self.jobs_queued,
            "workers": len(self._workers),
            "workers_stale": stale,
            "store_ok": self._store_ok,
            "jobs_unreadable": len(self._unreadable_job_ids),
            "systemd_reachable": reachable,
        }

    def _check_store_if_due(self) -> None:
        """Start the store's check when it is due, off the event loop: it reads the whole file, seconds when a
        conversion has pushed it out of the page cache, and calls, progress and the watchdog would wait meanwhile.
        Until it answers, health gives the last check's answer."""
        if self._store_check is not None or time.monotonic() - self._store_checked_at <= STORE_CHECK_INTERVAL:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:    # no loop to hand the answer back to (a caller without one): check here
            self._store_ok, self._store_checked_at = self._store.check(), time.monotonic()
            return
        self._store_check = loop.run_in_executor(None, self._store.check)
        self._store_check.add_done_callback(self._store_checked)

    def _store_checked(self, check: asyncio.Future[bool]) -> None:
        self._store_check = None
        self._store_checked_at = time.monotonic()
        self._store_ok = not check.cancelled() and check.exception() is None and bool(check.result())

    # ---------------------------------------------------------------- submission

    def submit(self, spec: dict[str, Any], owner: int, queue: bool = True,
               source_proof: os.stat_result | None = None,
               owner_groups: Iterable[int] | None = None) -> tuple[Job, bool]:
        """source_proof: fstat of a descriptor of the source the caller opened itself (its proof of access).
        owner_groups: the groups of the caller's connection (Job.owner_groups), None when not known.

        A submission whose checks fail gives a failed job; if the store cannot record that failure, the caller
        gets InvalidSpec with the problem instead (see _add_failing), and so does an identical submission until
        the failure is recorded."""
        job, created, problem = self._submit(spec, owner, queue, source_proof, owner_groups)
        if problem and job.state == S.CREATED:
            raise _failure_not_recorded(problem, kept=job)
        return job, created

    async def submit_grouped(self, spec: dict[str, Any], owner: int, queue: bool = True,
                             source_proof: os.stat_result | None = None,
                             owner_groups: Iterable[int] | None = None) -> tuple[Job, bool]:
        """submit(), returning once the job is committed; the submissions of one loop turn share one commit.

        If that commit fails, the jobs it held are forgotten again (JobRemoved) and the error is raised (for a
        job that failed its checks, InvalidSpec with the problem)."""
        with self._store.deferred():
            job, created, problem = self._submit(spec, owner, queue, source_proof, owner_groups)
        try:
            await self._store.committed()
        except BaseException as e:
            if created:
                self._undo_submission(job)
                if problem and isinstance(e, StoreFailed):
                    raise _failure_not_recorded(problem) from e
            raise
        if problem and job.state == S.CREATED:
            raise _failure_not_recorded(problem, kept=job)
        return job, created

    def _undo_submission(self, job: Job) -> None:
        if self._jobs.get(job.id) is not job:
            return
        self._scheduler.remove(job.id)
        self._cancel_timer(job.id)
        del self._jobs[job.id]
        self._failure_unrecorded.pop(job.id, None)
        self._active.discard(job.id)
        self._unfinished.forget(job)
        self._notify("job_removed", job)
        self._manager_changed()

    def _submit(self, spec: dict[str, Any], owner: int, queue: bool, source_proof: os.stat_result | None,
                owner_groups: Iterable[int] | None = None) -> tuple[Job, bool, str | None]:
        """(the job, whether it is new, what its checks found wrong: None if they passed, or, for a job submitted
        before, unless its failure is still waiting for the store)."""
        parsed = spec_to_json(parse_spec(spec))
        existing = self._jobs.get(parsed["job_id"])
        if existing is not None:
            if existing.owner != owner:
                # An id is everyone's, but its job is its owner's: another user's identical spec must not be
                # answered with a job they would then take as their own (its outputs, its cancel).
                raise AlreadyExists(f"a job with id {parsed['job_id']!r} was submitted by another user")
            if existing.spec == parsed or same_spec(existing.spec, parsed):
                # A job whose failure the store has yet to take is going to fail: told so, as the first caller was.
                return existing, False, self._failure_unrecorded.get(existing.id)
            raise AlreadyExists(f"a job with id {parsed['job_id']!r} exists with a different spec")
        self._unfinished.check_room_for(owner)
        job = Job(id=parsed["job_id"], spec=parsed, operation=parsed["operation"], owner=owner,
                  priority=parsed["execution_policy"]["priority"],
                  owner_groups=None if owner_groups is None else tuple(owner_groups))
        size = len(job.spec_text.encode())
        if size > MAX_SPEC_BYTES:
            raise InvalidSpec("", f"the spec is {size} bytes long as JSON; at most {MAX_SPEC_BYTES} are taken")
        problem = self._host_validator(job, source_proof) if self._host_validator else None  # NotAuthorized: nothing stored
        if problem:
            self._add_failing(job, owner, problem)
        else:
            self._add_accepted(job, owner, queue)
        return job, True, problem

    def _add_accepted(self, job: Job, owner: int, queue: bool) -> None:
        """A job that passed its checks, taken to where its submission leaves it (validated, or queued) before
        it is stored and announced: one write, and listeners first hear of it in that state. The steps that
        led there are in its history; they are not sent as events, which would reach clients after the job
        object and show it going back a state."""
        steps = [("", job.state.value, f"submitted by uid {owner}")]
        steps.append((job.move_to(S.VALIDATED).value, S.VALIDATED.value, "spec and host checks passed"))
        if queue:
            job.queue_seq = self._store.next_queue_seq()
            steps.append((job.move_to(S.QUEUED).value, S.QUEUED.value, "queued"))
        self._store.insert_settled_job(job, steps)
        self._jobs[job.id] = job
        self._unfinished.track(job)
        if queue:
            self._requeue_in_memory(job)
            self._kick()
        self._notify("job_added", job)
        self._manager_changed()

    def _add_failing(self, job: Job, owner: int, problem: str) -> None:
        """A job whose checks found `problem`: stored and announced as created, then failed, so that it is seen
        submitted and then failing. A refused first write keeps nothing (InvalidSpec with the problem); after a
        refused second one the job stays created, as stored, until the store takes its failure."""
        # Stored with it: if h2kd stops before the store takes the failure, the restart records that failure
        # (the submitter was told the job failed its checks), rather than checking the job again.
        job.error_message = problem
        try:
            self._store.insert_job(job, f"submitted by uid {owner}")
        except StoreFailed as e:
            raise _failure_not_recorded(problem) from e
        self._jobs[job.id] = job
        self._unfinished.track(job)
        self._notify("job_added", job)
        self._fail_checks(job, problem)

    def _fail_checks(self, job: Job, problem: str) -> None:
        """Record that the created job failed its checks; tried again later while the store refuses it, until it
        is stored or the job went another way meanwhile (cancelled, or its submission undone)."""
        if self._jobs.get(job.id) is not job or job.state != S.CREATED:
            return
        try:
            with self._all_or_nothing(job):
                self._fail(job, ErrorCode.VALIDATION_FAILED, problem, phase="validation")
        except StoreFailed as e:
            self._failure_unrecorded[job.id] = problem
            log.warning("could not record that job %s failed its checks: %s; trying again in %.0f s", job.id, e,
                        STORE_RETRY_SECONDS)
            self._later(STORE_RETRY_SECONDS, lambda: self._fail_checks(job, problem))

    def _validate_and_queue(self, job: Job, queue: bool, problem: str | None) -> None:
        if problem:
            self._fail(job, ErrorCode.VALIDATION_FAILED, problem, phase="validation")
            return
        if job.state == S.CREATED:
            self._transition(job, S.VALIDATED, "spec and host checks passed")
        if queue:
            self._enqueue(job, "queued")

    def _enqueue(self, job: Job, reason: str) -> None:
        job.queue_seq = self._store.next_queue_seq()
        job.wait_reason = ""
        self._transition(job, S.QUEUED, reason)
        self._requeue_in_memory(job)
        self._kick()

    def _prune_if_over(self) -> None:
        """Prune soon if finished jobs exceed the retention count by more than the slack."""
        finished = len(self._jobs) - len(self._unfinished)
        keep = self._config.retention_max_count
        if finished > keep + max(PRUNE_SLACK_JOBS, int(keep * PRUNE_SLACK_SHARE)):
            self._soon(self._prune_now)

    def _prune_now(self, by_age: bool = True) -> None:
        try:
            self.prune(by_age)
        except H2kError as e:   # the store failed: the hourly pass tries again
            log.warning("could not prune finished jobs: %s", e)

    @staticmethod
    def _requirements(job: Job) -> dict[str, Any]:
        return dict(job.spec.get("capability_requirements") or {})

    # ---------------------------------------------------------------- commands

    async def cancel(self, job_id: str, by: int | None = None) -> None:
        """Cancel the job; `by`: the uid that asked (said in its history and the journal)."""
        job = self.get(job_id)
        if not job.cancelable:
            raise InvalidState(f"job {job_id} is {job.state.value} and cannot be cancelled")
        who = _by_uid(by)
        if job.state in (S.CREATED, S.VALIDATED, S.QUEUED, S.RETRYING):
            with self._all_or_nothing(job):     # a cancel the store cannot take leaves the job as it was
                job.cancelled_by = -1 if by is None else by
                self._finish(job, S.CANCELLED, f"cancelled{who} before it ran")
            self._scheduler.remove(job.id)
            return
        if job.worker != BUILTIN:
            with self._all_or_nothing(job):
                job.cancelled_by = -1 if by is None else by
                self._release_worker(job, taken=True)
                self._finish(job, S.CANCELLED, f"cancelled{who}; worker {job.worker} was told by its next call")
            return
        # A second request (maybe by another user) leaves the first asker recorded, unless none was known.
        if not job.cancel_requested or (job.cancelled_by < 0 and by is not None):
            with self._all_or_nothing(job):
                job.cancel_requested = True
                if job.cancelled_by < 0 and by is not None:
                    job.cancelled_by = by
                self._store.save_job(job)   # stored before the reply: a restart meanwhile still stops the unit
            # Once per request that changed something: a caller repeating Cancel while the unit stops would
            # otherwise add an event each time, to the store, for good.
            with contextlib.suppress(StoreFailed):
                self._append_event(job, "log", {"message": f"cancel requested{who}; stopping the unit"})
        # The request is stored: if systemd does not take the stop now, it is asked again, and the caller is not
        # told the cancel failed when it will be carried out. Without a unit yet, _start_attempt sees the request
        # once StartTransientUnit returns.
        await self._stop_cancelled(job)

    def retry(self, job_id: str, by: int | None = None) -> None:
        job = self.get(job_id)
        if job.state not in (S.FAILED, S.CANCELLED):
            raise InvalidState(f"job {job_id} is {job.state.value}; only failed or cancelled jobs can be retried")
        # The files may have changed since the submission, or were never checked (it failed its checks):
        # the submitter's rights are checked again, by path (a descriptor passed at submission proves
        # nothing now). NotAuthorized goes to the caller; the job stays as it was.
        problem = self._host_validator(job, None) if self._host_validator else None
        if problem:
            raise InvalidArgument(f"job {job_id} cannot be retried: {problem}")
        retried = self._store.count_transitions(job.id, S.RETRYING.value, from_states=(S.FAILED.value,
                                                                                     S.CANCELLED.value))
        if retried >= MAX_RETRIES:
            raise InvalidState(f"job {job_id} was retried {retried} times already; submit it again as a new job")
        self._unfinished.check_room_for(job.owner)
        try:
            with self._all_or_nothing(job):
                # A run of attempts asked for anew has its retries, and its attempts not counted, anew.
                job.attempts_counted_before, job.attempts_not_counted = job.attempt, 0
                job.cancelled_by = -1
                self._reset_progress(job)
                job.error_code = job.error_message = ""
                # A run of attempts asked for anew is timed anew: its StartedAt (and its duration) is not that
                # of the run that failed, maybe days before.
                job.started_at = job.finished_at = 0
                held = self._hold_for_taken_attempt(job)
                self._transition(job, S.RETRYING, f"retry requested{_by_uid(by)}")
                if held is None:
                    job.taken_until = 0
                    self._enqueue(job, f"queued again by request{_of_uid(by)}")
                else:
                    self._held_back.add(job.id)
                    self._arm_requeue(job, held)
        except StoreFailed:
            if job.state != S.RETRYING:
                raise
            self._arm_requeue(job)      # retrying (stored), not yet queued: the timer queues it once it can

    def start_job(self, job_id: str, by: int | None = None) -> None:
        job = self.get(job_id)
        if job.state != S.VALIDATED:
            raise InvalidState(f"job {job_id} is {job.state.value}; only jobs held with queue=false can be started")
        # Held since its submission, maybe for days: its files and the submitter's rights are checked again,
        # as for a retry, and its source must still be the file checked then. NotAuthorized goes to the caller;
        # the job stays held.
        checked = job.source_identity
        try:
            problem = self._host_validator(job, None) if self._host_validator else None
        finally:
            # The checks record the file they found; the job keeps the one checked at submission.
            found, job.source_identity = job.source_identity, checked
        if not problem and checked and found != checked:
            problem = f"its source {job.source} was replaced after the job was submitted; submit it again"
        if problem:
            raise InvalidArgument(f"job {job_id} cannot be started: {problem}")
        with self._all_or_nothing(job):
            self._enqueue(job, f"queued by request{_of_uid(by)}")

    def remove(self, job_id: str) -> None:
        job = self.get(job_id)
        if job.state not in TERMINAL:
            raise InvalidState(f"job {job_id} is {job.state.value}; cancel it before removing it")
        self._forget(job)

    def set_priority(self, job_id: str, priority: int) -> None:
        job = self.get(job_id)
        if not 1 <= priority <= 10:
            raise InvalidArgument(f"priority must be between 1 and 10, not {priority}")
        if job.state not in (S.QUEUED, S.VALIDATED, S.RETRYING, S.CREATED):
            raise InvalidState(f"job {job_id} is {job.state.value}; only waiting jobs can change priority")
        with self._all_or_nothing(job):     # refused: neither memory nor the queue moves, as the store did not
            job.priority = priority
            self._store.save_job(job)
        if job.state == S.QUEUED:
            self._scheduler.set_priority(job.id, priority)
        with contextlib.suppress(StoreFailed):     # the change is stored; only its line in the job's log is missing
            self._append_event(job, "log", {"message": f"priority set to {priority}"})
        self._notify_changed(job, {"priority"}, urgent=True)
        self._kick()

    def pause(self) -> None:
        self._store.set_setting("paused", True)
        self._scheduler.pause()
        self._manager_changed()
        self._kick()    # the queued jobs now wait because of the pause, and say so

    def resume(self) -> None:
        self._store.set_setting("paused", False)
        self._scheduler.resume()
        self._manager_changed()
        self._kick()

    def set_max_parallel(self, n: int) -> None:
        if not 1 <= n <= MAX_PARALLEL_JOBS:
            raise InvalidArgument(f"MaxParallelJobs must be between 1 and {MAX_PARALLEL_JOBS}, not {n}")
        self._store.set_setting("max_parallel_jobs", n)
        self._scheduler.max_parallel = n
        self._manager_changed()
        self._kick()

    def prune(self, by_age: bool = True) -> list[str]:
        removed = self._store.prune(self._config.retention_max_age_days * 86400 if by_age else None,
                                    self._config.retention_max_count, now_usec())
        for job_id in removed:
            job = self._jobs.pop(job_id, None)
            self._failure_unrecorded.pop(job_id, None)
            if job is not None:
                # Finished in the store; in memory too, unless the write of a later change failed.
                self._forget_files(job)
                self._unfinished.forget(job)
                self._scheduler.remove(job_id)
                self._active.discard(job_id)
                self._notify("job_removed", job)
        return removed

    def _forget(self, job: Job) -> None:
        self._store.delete_job(job.id)
        del self._jobs[job.id]
        self._failure_unrecorded.pop(job.id, None)
        self._forget_files(job)
        self._unfinished.forget(job)
        self._drop_progress_state(job.id)
        self._notify("job_removed", job)
        self._manager_changed()

    # ---------------------------------------------------------------- scheduling

    def _kick(self) -> None:
        """Schedule one pass of the scheduler soon; many changes in one loop turn cost one pass."""
        self._soon(self._schedule)

    def _soon(self, callback: Callable[[], None]) -> None:
        """Call `callback` at the loop's next turn, once however often it is asked for until then (nothing
        without a running loop)."""
        if callback in self._soon_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._soon_pending.add(callback)
        loop.call_soon(self._run_soon, callback)

    def _run_soon(self, callback: Callable[[], None]) -> None:
        self._soon_pending.discard(callback)
        callback()

    def _schedule(self) -> None:
        builtin = self._workers.get(BUILTIN)
        if builtin is None or self._system_stopping or not self._scheduling:
            return
        running = sum(1 for job_id in self._active if self._jobs[job_id].worker == BUILTIN)
        # Without systemd every start would fail: the jobs wait in the queue until runner_connected(). External
        # workers claim their jobs themselves; they are given for the wait reasons.
        reachable = self._runner is not None and self._runner.reachable
        workers = ([builtin] if reachable else []) + [w for w in self._workers.values() if w.kind == "external"]
        picked = self._scheduler.pick(running, workers, now_usec(), self._running_by_owner(),
                                      builtin_away=None if reachable else "systemd's manager does not answer")
        for index, (job_id, worker) in enumerate(picked):
            job = self._jobs[job_id]
            self._scheduler.remove(job_id)
            try:
                with self._all_or_nothing(job):
                    self._assign(job, worker)
            except Exception as e:
                # Still queued, as stored: this job and the ones picked after it go back to the queue, whatever
                # the failure (a store that refused, or an error of h2kd's own): taken out of the queue, they
                # would wait for no start until h2kd restarts.
                for later_id, _ in picked[index:]:
                    self._requeue_in_memory(self._jobs[later_id])
                if isinstance(e, StoreFailed):
                    log.warning("could not start job %s: %s; trying again in %.0f s", job_id, e, STORE_RETRY_SECONDS)
                else:
                    log.exception("could not start job %s; trying again in %.0f s", job_id, STORE_RETRY_SECONDS)
                if not self._schedule_retry_pending:
                    self._schedule_retry_pending = True
                    self._later(STORE_RETRY_SECONDS, self._retry_schedule)
                break
            self._spawn(self._start_attempt(job, job.attempt))
        self._refresh_wait_reasons()
        self._manager_changed()

    def _refresh_wait_reasons(self) -> None:
        for job_id, reason in self._scheduler.wait_reasons().items():     # every queued job
            job = self._jobs[job_id]
            if job.wait_reason != reason:
                job.wait_reason = reason
                self._notify_changed(job, {"wait_reason"}, urgent=False)

    def _assign(self, job: Job, worker: WorkerInfo) -> None:
        job.attempt += 1
        job.worker = worker.id
        job.unit = ""
        job.wait_reason = ""
        job.cancel_requested = False
        job.cancelled_by = -1
        self._reset_progress(job)
        self._transition(job, S.ASSIGNED, f"attempt {job.attempt} assigned to worker {worker.id}")
        self._take_slot(job, worker)

    def _retry_schedule(self) -> None:
        self._schedule_retry_pending = False
        self._kick()

    def _requeue_in_memory(self, job: Job) -> None:
        """Put a queued job back in the scheduler's queue (it was taken out for a start that did not happen)."""
        self._scheduler.add(job.id, job.priority, job.queue_seq, job.operation, self._requirements(job),
                            owner=job.owner, since_usec=now_usec())

    def _running_by_owner(self) -> dict[int, int]:
        return Counter(self._jobs[job_id].owner for job_id in self._active)

    def _later(self, seconds: float, callback: Callable[[], None]) -> None:
        """Call `callback` in `seconds` (after the store refused a change), unless h2kd stops first."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        def run() -> None:
            self._later_handles.discard(handle)
            callback()
        handle = loop.call_later(seconds, run)
        self._later_handles.add(handle)

    @contextlib.contextmanager
    def _all_or_nothing(self, job: Job) -> Iterator[None]:
        """A change of `job` that the store may refuse (StoreFailed: its disk full; or a value it cannot take).
        Refused before any of its transitions was stored, the job, its worker slot, its place in the queue and its
        retry timer are put back as they were, so that memory tells what the store does; the error goes on to the
        caller."""
        fields, holder = dict(job.__dict__), self._holding.get(job.id)
        queued, armed, stored = job.id in self._scheduler, job.id in self._timers, self._stored_transitions
        taken = set(self._taken)
        try:
            yield
        except Exception:
            if self._stored_transitions == stored:
                job.__dict__.update(fields)
                self._track_state(job)
                for key in set(self._taken) - taken:
                    self._release_taken(key)
                if holder is not None and job.id not in self._holding and holder in self._workers:
                    self._take_slot(job, self._workers[holder])
                if queued and job.id not in self._scheduler:
                    self._requeue_in_memory(job)
                if armed and job.id not in self._timers:
                    self._arm_requeue(job)
            raise

    async def _start_attempt(self, job: Job, attempt: int) -> None:
        assert self._runner is not None
        if job.cancel_requested:
            # Cancelled between its assignment and now: a unit started only to be stopped could still begin the
            # work (a raw image's repair changes it in place).
            self._start_refused(job.id, attempt, "cancelled")
            return
        self._starting.add(job.id)
        unanswered: StartUnanswered | None = None
        try:
            unit = await self._runner.start(job, attempt)
        except StartUnanswered as e:
            unanswered = e
        except StartWithdrawn:
            self._start_refused(job.id, attempt, "cancelled")
            return
        except StartDeferred as e:  # not now, for a reason that passes: tried again later, not counted
            log.warning("starting a unit for job %s failed for now: %s", job.id, e)
            self._start_refused(job.id, attempt, str(e), passing=True)
            return
        except Exception as e:  # systemd refused the unit: the attempt fails like a failed unit
            log.warning("starting a unit for job %s failed: %s", job.id, e)
            self._start_refused(job.id, attempt, str(e))
            return
        finally:
            self._starting.discard(job.id)
            early_status = self._status_while_starting.pop(job.id, None)
        if unanswered is not None:
            # The job stays assigned; the runner's reports on the unit say whether it runs, the first of them
            # perhaps already in (it records the job running).
            log.warning("no answer from systemd to the start of job %s's unit: %s", job.id, unanswered)
            if job.attempt == attempt:
                job.unit = unanswered.unit       # a cancel stops it by name
                if early_status is not None:
                    self.unit_status(job.id, attempt, early_status)
                await self._stop_cancelled(job)
            return
        if job.attempt != attempt or job.state != S.ASSIGNED:
            return
        job.unit = unit
        job.started_at = job.started_at or now_usec()
        try:
            with self._all_or_nothing(job):
                self._transition(job, S.RUNNING, f"unit {unit} started")
        except StoreFailed as e:    # its reports (progress, its end) record it running later
            log.warning("could not record job %s running: %s", job.id, e)
            job.unit = unit
        if early_status is not None:
            self.unit_status(job.id, attempt, early_status)
        await self._stop_cancelled(job)

    def _start_refused(self, job_id: str, attempt: int, why: str, passing: bool = False) -> None:
        """systemd refused the attempt's unit: the attempt fails like a failed unit (or, cancelled meanwhile,
        the job ends cancelled); passing: for a reason that passes (StartDeferred), without using up the job's
        retries. Tried again later if the store cannot take it."""
        job = self._jobs.get(job_id)
        if job is None or job.attempt != attempt or job.state != S.ASSIGNED:
            return
        try:
            with self._all_or_nothing(job):
                if job.cancel_requested:
                    self._release_worker(job)
                    self._finish(job, S.CANCELLED,
                                 f"cancelled{_by_uid(job.cancelled_by)} before its unit could start")
                elif self._system_stopping:   # refused for the shutdown that began meanwhile: not the job's fault
                    self._requeue_or_fail(job, ErrorCode.WORKER_LOST, "the system began shutting down as its "
                                          "unit was started", attempt_spent=False)
                else:
                    # passing: not the job's doing (systemd out of reach or of memory, no room for the attempt's
                    # files); tried again after the backoff without using up its retries, MAX_ATTEMPTS_NOT_COUNTED
                    # times at most.
                    self._attempt_failed(job, ErrorCode.UNIT_FAILED, f"systemd refused the unit: {why}", "start",
                                         True, attempt_spent=not passing)
        except StoreFailed as e:
            log.warning("could not record that job %s's unit was refused: %s; trying again in %.0f s", job_id, e,
                        STORE_RETRY_SECONDS)
            self._later(STORE_RETRY_SECONDS, lambda: self._start_refused(job_id, attempt, why, passing))

    async def _stop_cancelled(self, job: Job) -> None:
        """Stop the unit of an attempt whose cancel was asked for; if systemd does not take the stop now, it is
        asked again in STOP_RETRY_SECONDS (and by the runner_connected() that follows a lost connection)."""
        if not (job.cancel_requested and job.unit and job.state in ACTIVE and self._runner is not None):
            return
        try:
            await self._runner.stop(job.unit)
        except (H2kError, asyncio.TimeoutError) as e:
            log.warning("could not stop unit %s of cancelled job %s yet: %s; asking again in %.0f s", job.unit,
                        job.id, e, STOP_RETRY_SECONDS)
            attempt = job.attempt

            def again() -> None:
                if self._jobs.get(job.id) is job and job.attempt == attempt:
                    self._spawn(self._stop_cancelled(job))
            self._later(STOP_RETRY_SECONDS, again)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- runner events

    def unit_status(self, job_id: str, attempt: int, status_text: str, started_at: int = 0) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.attempt != attempt or job.state not in ACTIVE:
            return
        if job.state == S.ASSIGNED:
            if job.id in self._starting and job.worker == BUILTIN:  # the start call's return records it running
                self._status_while_starting[job.id] = status_text
                return
            if job.worker != BUILTIN:
                return
            self._found_running(job, started_at)
        report = parse_status(status_text)
        if report is None:
            self._append_event(job, "log", {"message": status_text})
            return
        fraction = None if report.fraction is None else report.fraction
        self._apply_progress(job, report.phase, fraction, report.bytes_done, report.bytes_total, report.message)

    def system_stopping(self, stopping: bool) -> None:
        """While the system shuts down, nothing starts: systemd would refuse the unit, and the job fail for it.
        The jobs it stops come back to the queue (outcome.interrupted) and start when h2kd runs again."""
        self._system_stopping = stopping
        if not stopping:
            self._kick()

    def runner_connected(self) -> None:
        for job in self._jobs.values():
            if job.cancel_requested and job.state in ACTIVE and job.worker == BUILTIN:
                self._spawn(self._stop_cancelled(job))
        self._kick()

    def unit_finished(self, job_id: str, attempt: int, outcome: UnitOutcome) -> None:
        self._end_attempt(job_id, attempt, outcome, result_understood=False)

    def _end_attempt(self, job_id: str, attempt: int, outcome: UnitOutcome, result_understood: bool) -> None:
        """unit_finished(); result_understood: the worker's result is h2kd's own stand-in for one it could not
        make sense of."""
        job = self._jobs.get(job_id)
        if job is None or job.attempt != attempt or job.state not in ACTIVE or job.worker != BUILTIN:
            return
        job.unit = job.unit or outcome.unit
        try:
            with self._all_or_nothing(job):
                self._settle_attempt(job, outcome, job.cancel_requested)
                self._release_worker(job)
        except StoreFailed as e:
            if job.state in ACTIVE:     # not recorded: the end of the attempt is recorded later
                log.warning("could not record the end of job %s's attempt %d: %s; trying again in %.0f s",
                            job_id, attempt, e, STORE_RETRY_SECONDS)
                self._later(STORE_RETRY_SECONDS,
                            lambda: self._end_attempt(job_id, attempt, outcome, result_understood))
                return
            log.warning("recorded the end of job %s's attempt %d, but not all of it: %s", job_id, attempt, e)
            self._release_worker(job)
        except Exception as e:
            if outcome.worker_result is None or result_understood:
                raise
            # A result file h2kd cannot make sense of (a worker of another version, a damaged file) must not
            # leave the job running for ever, holding its slot: the attempt failed.
            log.exception("the result of job %s's attempt %d cannot be understood", job_id, attempt)
            stand_in = {"status": "failed",
                        "error": {"code": ErrorCode.INTERNAL.value, "retryable": False, "phase": "run",
                                  "message": f"h2kd could not understand the attempt's result file: {e}"}}
            self._end_attempt(job_id, attempt, dataclasses.replace(outcome, worker_result=stand_in), True)

    def _settle_attempt(self, job: Job, outcome: UnitOutcome, wanted_cancel: bool) -> None:
        """Record how the attempt ended: completed, cancelled, back to the queue, or failed."""
        result = outcome.worker_result if isinstance(outcome.worker_result, dict) else {}
        if job.state == S.ASSIGNED and outcome.started_at and job.id not in self._starting:
            # It ran (and ended) while h2kd was away, which had not recorded it running: it did, from then.
            self._found_running(job, outcome.started_at)
        if result.get("status") == "completed":
            # Whatever systemd says of the unit ("timeout": its time ran out while the outputs got their names,
            # which the worker finishes whatever comes; "signal": killed after writing its result), the outputs
            # are in place and the result says so (the runner undoes a commit only without it): the job is done.
            self._complete(job, result, outcome.ended_at)
        elif wanted_cancel:
            self._finish(job, S.CANCELLED, f"cancelled{_by_uid(job.cancelled_by)}; the unit has stopped", result,
                         outcome.ended_at)
        elif outcome.interrupted:
            self._requeue_or_fail(job, ErrorCode.WORKER_LOST, f"unit {outcome.unit} was stopped by the system "
                                  "shutting down", attempt_spent=False)
        elif (outcome.result == "timeout" and not _ran_past_its_timeout(job, outcome)) or (
                outcome.result not in ("timeout", "oom-kill")
                and (result.get("status") == "cancelled" or (outcome.result == "success" and not result))):
            # ("timeout" before the job's time was up: systemd's stop timeout, after an administrator's
            # systemctl stop the worker did not end within; not the job's own timeout, to be retried.)
            # (systemd stops a unit one of whose processes the kernel killed for memory, and the worker, told to
            # stop, says "cancelled": nobody cancelled that one.)
            self._finish(job, S.CANCELLED, f"unit {outcome.unit} was stopped outside h2kd", result, outcome.ended_at)
        elif outcome.result == "not-started":
            self._requeue_or_fail(job, ErrorCode.WORKER_LOST, "its unit never started", attempt_spent=False)
        elif outcome.result == "unknown" and job.state == S.ASSIGNED:
            # h2kd stopped while starting the unit, and systemd knows of no such unit: it never ran.
            self._requeue_or_fail(job, ErrorCode.WORKER_LOST, "h2kd stopped while starting its unit, which "
                                  "left no trace", attempt_spent=False)
        else:
            error = result.get("error") if isinstance(result.get("error"), dict) else {}
            if outcome.result == "timeout":
                code, retryable = ErrorCode.TIMEOUT, True
                message = f"the job ran longer than its timeout of {job.spec['execution_policy']['timeout_seconds']} s"
            elif outcome.result == "oom-kill":
                code, retryable = ErrorCode.UNIT_FAILED, True
                message = (f"the kernel killed a process of unit {outcome.unit} for lack of memory (systemd then "
                           "stopped the unit); the host, or the slice's MemoryMax, had too little memory free")
            elif error:
                code = ErrorCode.parse(_text(error.get("code")) or None)
                retryable = error.get("retryable")
                if not isinstance(retryable, bool):
                    retryable = code not in NON_RETRYABLE
                message = _text(error.get("message"))
                if len(message) > MAX_ERROR_MESSAGE:
                    # A message can quote what the submitter wrote (a descriptor's extent name): cut as an external
                    # worker's is, before it reaches the store, the history and every client's signals.
                    message = message[:MAX_ERROR_MESSAGE]
                    result = {**result, "error": {**error, "message": message}}
                if not message.strip():
                    message = (f"the worker gave no message; unit {outcome.unit} ended with {outcome.result} "
                               f"(status {outcome.exit_status})")
            else:
                code, retryable = ErrorCode.UNIT_FAILED, True
                message = f"unit {outcome.unit} ended with {outcome.result} (status {outcome.exit_status})"
            # "resources" without a worker's result: systemd could not set the worker up (short of memory or of
            # tasks, a cgroup it could not make). The machine's passing trouble, not the job's: not counted.
            spent = not (outcome.result == "resources" and not result)
            if outcome.log_tail:
                # In the Result, which is for the job's owner and administrators (h2kd.bus.actions), not in the
                # Error, which is everyone's: the lines may tell what a guest or an image holds.
                result = {**result, "log_tail": [line[:LOG_TAIL_LINE_CHARS] for line in outcome.log_tail[-10:]]}
            self._attempt_failed(job, code, message, _text(error.get("phase")) or job.phase or "run", retryable, result,
                                 attempt_spent=spent, ended_at=outcome.ended_at)

    # ---------------------------------------------------------------- progress

    def _apply_progress(self, job: Job, phase: str, fraction: float | None, done: int, total: int,
                        message: str = "") -> None:
        done, total = min(done, COUNT_MAX), min(total, COUNT_MAX)
        changed: set[str] = set()
        step_reached = percent_reached = False
        if job.state == S.RUNNING:
            self._transition(job, S.PROGRESSING, "progress reported")
        if phase and phase != job.phase:
            job.phase = phase
            changed.add("phase")
        if fraction is not None:
            fraction = min(max(fraction, 0.0), 1.0)
            if fraction > job.progress:  # never backwards within an attempt
                before = int(job.progress * 100)
                job.progress = fraction
                changed.add("progress")
                percent_reached = int(fraction * 100) != before
                step_reached = int(fraction * 100) // PROGRESS_EVENT_PERCENT != before // PROGRESS_EVENT_PERCENT
            if not job.progress_known:
                job.progress_known = True
                changed.add("progress_known")
        if total and total != job.bytes_total:
            job.bytes_total = total
            changed.add("bytes_total")
        if done > job.bytes_done:
            job.bytes_done = done
            changed.add("bytes_done")
            self._update_rate(job)
            changed |= {"rate", "expected_end"}
        if percent_reached:
            # Nobody waits for these on disk: they share a commit with the next ones. The job's row gets the
            # progress at every percent, so that h2kd restarted shows the job from there (less than a percent
            # back until its unit reports again), not from 0 nor from the last event's step.
            with self._store.deferred(within=PROGRESS_COMMIT_SECONDS):
                if step_reached:
                    self._append_event(job, "progress", {"progress": round(job.progress, 4), "phase": job.phase,
                                                          "bytes_done": done, "bytes_total": total})
                self._store.save_job(job)
        if message and self._status_messages.get(job.id) != message:
            # A worker repeats its message in every report ("disk 1 of 2"): it is news only when it changes.
            self._status_messages[job.id] = message
            self._notify_event(job, Event(job.id, 0, now_usec(), "log", {"message": message}))
        if changed:
            self._notify_changed(job, changed, urgent="phase" in changed)

    def _forget_files(self, job: Job) -> None:
        if self._runner is not None:
            try:
                self._runner.forget(job)
            except OSError as e:    # what is left takes some room, nothing else
                log.warning("could not remove the files of job %s's attempts: %s", job.id, e)

    def _drop_progress_state(self, job_id: str) -> None:
        self._samples.pop(job_id, None)
        self._status_messages.pop(job_id, None)

    def _update_rate(self, job: Job) -> None:
        # The monotonic clock: the wall clock stepped back (NTP, date -s) would freeze the rate for as long, and
        # stepped ahead would show a speed near nothing.
        now = time.monotonic_ns() // 1000
        samples = self._samples.setdefault(job.id, deque())
        samples.append((now, job.bytes_done))
        while len(samples) > 2 and now - samples[0][0] > RATE_WINDOW_USEC:
            samples.popleft()
        (t0, b0), (t1, b1) = samples[0], samples[-1]
        if t1 > t0 and b1 > b0:
            job.rate = min(int((b1 - b0) * 1_000_000 / (t1 - t0)), COUNT_MAX)
            if job.bytes_total and job.rate:
                # Past the total (a worker's count can be off), the end is now, not in the past.
                left = max(job.bytes_total - job.bytes_done, 0)
                job.expected_end = min(now_usec() + int(left * 1_000_000 / job.rate), COUNT_MAX)

    def _reset_progress(self, job: Job) -> None:
        job.phase = ""
        job.progress = 0.0
        job.progress_known = False
        job.bytes_done = job.bytes_total = job.rate = job.expected_end = 0
        self._drop_progress_state(job.id)

    # ---------------------------------------------------------------- endings

    def _found_running(self, job: Job, started_at: int = 0) -> None:
        """h2kd stopped between starting the unit and recording the job running: the unit's own reports
        (progress, its end) are the news that it runs, or ran. started_at: when its worker started, as systemd
        (or the attempt's files) tell; not when h2kd, back, learns of it."""
        if not job.started_at:
            now = now_usec()
            job.started_at = min(max(started_at, job.created_at), now) if started_at else now
        self._transition(job, S.RUNNING, "its unit was found running after h2kd restarted")

    def _complete(self, job: Job, result: dict[str, Any], ended_at: int = 0) -> None:
        if job.state == S.ASSIGNED:
            self._found_running(job)
        job.progress = 1.0
        job.progress_known = True
        if job.bytes_total:
            job.bytes_done = job.bytes_total
        self._finish(job, S.COMPLETED, "completed", result, ended_at)

    def _attempt_failed(self, job: Job, code: ErrorCode, message: str, phase: str, retryable: bool,
                        result: dict[str, Any] | None = None, attempt_spent: bool = True, ended_at: int = 0) -> None:
        """attempt_spent=False: the attempt failed through no fault of the job; it is not counted against its
        retries (MAX_ATTEMPTS_NOT_COUNTED such attempts at most), and waits a backoff of its own. ended_at: as
        for _finish."""
        if job.worker:
            self._release_worker(job)
        # Attempts not counted wait a backoff of their own, growing with their number.
        waited = _attempts_counted(job) if _counts(job, attempt_spent) else job.attempts_not_counted
        retries = job.spec["execution_policy"]["retry_count"]
        counted = _attempts_counted(job)
        if retryable and counted <= retries:
            delay = min(self._config.retry_backoff_base_seconds * 2 ** (waited - 1),
                        self._config.retry_backoff_max_seconds)
            # Until the next attempt ends, the Result tells how this one failed (with its unit's last lines).
            job.result = self._attempt_result(job, S.FAILED, _failed(result, code, message, phase))
            self._wait_to_retry(job, code, message, delay, f"attempt {job.attempt} failed",
                                f"attempt {job.attempt} failed ({code.value}); retry in {delay:g} s")
            return
        self._fail(job, code, message, phase, result, ended_at)

    def _wait_to_retry(self, job: Job, code: ErrorCode, message: str, delay: float, why: str, reason: str) -> None:
        """RETRYING for `delay` seconds, the attempt's error kept as the job's Error meanwhile; why: what the wait
        reason says before when the next attempt starts; reason: the transition's."""
        job.error_code, job.error_message = code.value, message
        job.not_before = now_usec() + int(delay * 1_000_000)
        # The attempt that ended is over: its progress (97%, say) would be shown through hours in the queue, and
        # its speed would promise an end that never comes.
        self._reset_progress(job)
        starts = time.strftime('%H:%M:%S', time.localtime(job.not_before / 1_000_000))
        job.wait_reason = f"{why}; the next starts at {starts}"
        self._transition(job, S.RETRYING, reason)
        self._arm_requeue(job, delay)

    def _fail(self, job: Job, code: ErrorCode, message: str, phase: str,
              result: dict[str, Any] | None = None, ended_at: int = 0) -> None:
        job.error_code, job.error_message = code.value, message
        self._finish(job, S.FAILED, f"{code.value}: {message.splitlines()[0] if message else ''}",
                     _failed(result, code, message, phase), ended_at)

    @staticmethod
    def _attempt_result(job: Job, state: JobState, result: dict[str, Any] | None) -> dict[str, Any]:
        """The job's result (JobResult) after an attempt ended in `state`, from what the attempt gave."""
        result = dict(result or {})
        result.setdefault("status", state.value)
        result.setdefault("outputs", {})
        result.setdefault("metrics", {})
        result.setdefault("error", None)
        result["worker"] = job.worker
        result["attempt"] = job.attempt
        if state == S.CANCELLED:
            result["status"] = "cancelled"
        return result

    def _finish(self, job: Job, state: JobState, reason: str, result: dict[str, Any] | None = None,
                ended_at: int = 0) -> None:
        """ended_at: when the attempt's worker ended, if known; h2kd may learn of it only later (it was away)."""
        job.result = result = self._attempt_result(job, state, result)
        job.wait_reason = ""        # an ended job waits for nothing
        if state != S.FAILED:       # an earlier attempt's failure is not how the job ended
            job.error_code = job.error_message = ""
        now = now_usec()
        job.finished_at = min(max(ended_at, job.started_at), now) if ended_at else now
        job.not_before = 0
        self._transition(job, state, reason)
        self._cancel_timer(job.id)
        self._held_back.discard(job.id)
        self._end_deadline(job.id)
        try:
            self._append_event(job, "result", {"status": result["status"], "error": result.get("error")})
        except StoreFailed as e:    # the state is stored (with its own event): only this summary is missing
            log.warning("could not log the result of job %s: %s", job.id, e)
        self._drop_progress_state(job.id)

    def _requeue_or_fail(self, job: Job, code: ErrorCode, why: str, attempt_spent: bool = True,
                         wait_seconds: float = 0) -> None:
        """A job lost its worker: back to the queue while it has retries left (always, when the attempt never
        began), else failed with `code`. wait_seconds: it waits that long first (retrying, with `code` and `why`
        as its Error), as for a worker that may still be running it."""
        self._release_worker(job)
        if not _counts(job, attempt_spent) or _attempts_counted(job) <= job.spec["execution_policy"]["retry_count"]:
            job.worker = ""
            if wait_seconds > 0:
                self._wait_to_retry(job, code, why, wait_seconds, f"{why}; it may still be running the job until "
                                    "it learns so", f"{why}; the next attempt waits {wait_seconds:g} s")
                return
            self._reset_progress(job)
            self._transition(job, S.QUEUED, f"back in the queue: {why}")
            self._requeue_in_memory(job)
            self._kick()
        else:
            self._fail(job, code, why, "run")

    def _arm_requeue(self, job: Job, delay: float | None = None) -> None:
        """Queue the retrying job again at its not_before (or in `delay` seconds)."""
        if delay is None:
            # not_before is a wall-clock time, stored: a clock set back since (it was ahead as the attempt failed)
            # must not hold the job for that long after a restart. No wait is longer than the longest backoff, or
            # than the wait for an external worker to learn it lost the job (_requeue_or_fail).
            longest = max(self._config.retry_backoff_max_seconds, self._config.heartbeat_timeout_seconds)
            delay = min(max(job.not_before - now_usec(), 0) / 1_000_000, longest)
        self._cancel_timer(job.id)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timers[job.id] = loop.call_later(delay, self._requeue_after_backoff, job.id)

    def _requeue_after_backoff(self, job_id: str) -> None:
        self._cancel_timer(job_id)
        self._held_back.discard(job_id)
        job = self._jobs.get(job_id)
        if job is not None and job.state == S.RETRYING:
            try:
                with self._all_or_nothing(job):
                    held = self._hold_for_taken_attempt(job)
                    if held is not None:
                        self._store.save_job(job)
                        self._notify_changed(job, {"wait_reason"}, urgent=False)
                        self._held_back.add(job.id)
                        self._arm_requeue(job, held)
                        return
                    job.not_before = job.taken_until = 0
                    self._enqueue(job, f"queued for attempt {job.attempt + 1}")
            except StoreFailed as e:
                log.warning("could not queue job %s again: %s; trying again in %.0f s", job_id, e,
                            STORE_RETRY_SECONDS)
                self._arm_requeue(job, STORE_RETRY_SECONDS)

    def _taken_holds(self, job: Job) -> list[tuple[str, asyncio.TimerHandle | None]]:
        """(worker id, timer) of each attempt of this job taken from an external worker that may still run it."""
        return [(worker_id, timer) for (job_id, created_at, _), (worker_id, timer) in self._taken.items()
                if job_id == job.id and created_at == job.created_at]

    def _hold_for_taken_attempt(self, job: Job) -> float | None:
        """Hold the retrying job back while an attempt of it taken from an external worker (cancelled, timed out)
        may still run there, writing its outputs, until the worker is told: its not_before and wait_reason say
        so, and the seconds it waits at most are returned (None if nothing is held). It is queued as soon as
        that worker's slot is freed (_release_taken), at the latest when its timer ends (_hold_until_told);
        after a restart, which forgot both, when its stored taken_until has passed."""
        holds, now = self._taken_holds(job), now_usec()
        if holds:
            try:
                loop_time = asyncio.get_running_loop().time()
            except RuntimeError:    # no loop (a test driving the manager directly): no timer either
                loop_time = 0.0
            left = max(max(timer.when() - loop_time, 0) if timer is not None
                       else self._config.heartbeat_timeout_seconds for _, timer in holds)
            worker = f"worker {holds[0][0]}"
        elif job.taken_until > now:
            # Capped as _arm_requeue caps a wait: a clock set back since must not hold the job for longer.
            left = min((job.taken_until - now) / 1_000_000, self._config.heartbeat_timeout_seconds)
            worker = f"worker {job.worker}" if job.worker else "the external worker that had it"
        else:
            return None
        job.not_before = now + int(left * 1_000_000)
        starts = time.strftime('%H:%M:%S', time.localtime(job.not_before / 1_000_000))
        job.wait_reason = (f"{worker} may still be running an attempt taken from it until it learns so; the next "
                           f"attempt starts then, at {starts} at the latest")
        return left

    def _cancel_timer(self, job_id: str) -> None:
        timer = self._timers.pop(job_id, None)
        if timer is not None:
            timer.cancel()

    # ---------------------------------------------------------------- workers

    def _builtin_capabilities(self) -> dict[str, Any]:
        caps = dict(self._runner.capabilities()) if self._runner is not None else {}
        caps.setdefault("operations", OPERATIONS)
        return caps

    async def refresh_worker(self, worker_id: str) -> None:
        worker = self.get_worker(worker_id)
        if worker.kind != "builtin":
            raise InvalidState("only the builtin worker detects its capabilities; external workers re-register")
        await self._refresh_host()

    async def _refresh_host(self) -> None:
        """The builtin worker's capabilities detected again: free space comes and goes, and a job that asks for
        more than there was must start once there is enough, without anyone calling Refresh. Detected off the
        event loop: an output root on a file server that hangs must not stop h2kd answering."""
        worker = self._workers.get(BUILTIN)
        refresh = getattr(self._runner, "refresh", None)
        if worker is None or refresh is None:
            return
        # One detection at a time, which every caller meanwhile waits for: each one hung on a file server would
        # hold a thread of the executor that starting units and the store's checks need too.
        if self._detecting is None or self._detecting.done():
            self._detecting = asyncio.get_running_loop().run_in_executor(None, refresh)
        await asyncio.shield(self._detecting)
        capabilities = self._builtin_capabilities()
        if capabilities != worker.capabilities:
            worker.capabilities = capabilities
            self._notify("worker_changed", worker)
            self._kick()

    def register_worker(self, name: str, capabilities: dict[str, Any], max_jobs: int, owner: int,
                        bus_name: str) -> WorkerInfo:
        if not name or len(name) > 128:
            raise InvalidArgument("a worker name of 1 to 128 characters is required")
        if not isinstance(capabilities, dict):
            raise InvalidArgument("capabilities must be a JSON object")
        # The scheduler matches every job against it: a number there failed each match, everyone's claims too,
        # and a text would match by its substrings. What the list holds beside names matches nothing.
        operations = capabilities.get("operations")       # None: every operation, as when it is not there
        if operations is not None and not isinstance(operations, list):
            raise InvalidArgument('capabilities: "operations" must be a list of operation names')
        if len(json.dumps(capabilities).encode()) > MAX_CAPABILITIES_BYTES:
            raise InvalidArgument(f"capabilities must be at most {MAX_CAPABILITIES_BYTES} bytes of JSON")
        if not 0 <= max_jobs <= UINT32_MAX:
            raise InvalidArgument(f"max_jobs must be 0 (no limit) to {UINT32_MAX}")
        self._store.set_setting("last_worker_number", self._worker_seq + 1)
        self._worker_seq += 1
        worker = WorkerInfo(id=f"w{self._worker_seq}", name=name, kind="external", capabilities=capabilities,
                            max_jobs=max_jobs, owner=owner, bus_name=bus_name, last_heartbeat=now_usec(),
                            alive_at=time.monotonic())
        self._workers[worker.id] = worker
        self._notify("worker_added", worker)
        self._kick()    # the jobs it can run wait for it now: their reasons say so
        return worker

    def heartbeat(self, worker_id: str) -> None:
        worker = self._external(worker_id)
        _beat(worker)
        if worker.state == "stale":
            worker.state = "idle"
            self._worker_load_changed(worker)

    def claim(self, worker_id: str) -> Job | None:
        worker = self._external(worker_id)
        _beat(worker)
        if worker.max_jobs and worker.active_jobs >= worker.max_jobs:
            return None
        job_id = self._scheduler.claim_for(worker, now_usec(), self._running_by_owner())
        if job_id is None:
            return None
        job = self._jobs[job_id]
        try:
            with self._all_or_nothing(job):
                self._assign(job, worker)
        except StoreFailed:
            self._requeue_in_memory(job)    # claim_for took it out of the queue
            raise
        self._time_external_attempt(job, worker)
        return job

    def _time_external_attempt(self, job: Job, worker: WorkerInfo) -> None:
        """execution_policy.timeout_seconds for an attempt another host runs: a builtin attempt's unit and worker
        keep it themselves, an external worker that beats but hangs would hold the job (and its owner's turn)
        for ever. One deadline per job: a later claim replaces it, the job's end cancels it."""
        timeout, attempt = job.spec["execution_policy"]["timeout_seconds"], job.attempt

        def expired() -> None:
            self._deadlines.pop(job.id, None)
            if not (self._jobs.get(job.id) is job and job.attempt == attempt and job.worker == worker.id
                    and job.state in ACTIVE):
                return
            try:
                with self._all_or_nothing(job):
                    self._release_worker(job, taken=True)
                    self._attempt_failed(job, ErrorCode.TIMEOUT, f"worker {worker.id} did not finish the job "
                                         f"within its timeout of {timeout} s", job.phase or "run", retryable=True)
            except StoreFailed as e:
                log.warning("could not end the timed-out attempt of job %s: %s; trying again in %.0f s", job.id, e,
                            STORE_RETRY_SECONDS)
                self._arm_deadline(job.id, STORE_RETRY_SECONDS, expired)
        self._arm_deadline(job.id, timeout, expired)

    def _arm_deadline(self, job_id: str, seconds: float, expired: Callable[[], None]) -> None:
        self._end_deadline(job_id)
        try:
            self._deadlines[job_id] = asyncio.get_running_loop().call_later(seconds, expired)
        except RuntimeError:    # no loop (a test driving the manager directly)
            pass

    def _end_deadline(self, job_id: str) -> None:
        deadline = self._deadlines.pop(job_id, None)
        if deadline is not None:
            deadline.cancel()

    def report_progress(self, worker_id: str, job_id: str, progress: float | None, bytes_done: int,
                        bytes_total: int, phase: str, message: str, attempt: int | None = None) -> None:
        worker = self._external(worker_id)
        _beat(worker)
        job = self._claimed(worker, job_id, attempt)
        if not (0 <= bytes_done <= COUNT_MAX and 0 <= bytes_total <= COUNT_MAX):
            raise InvalidArgument(f"bytes_done and bytes_total must be 0 to {COUNT_MAX}")
        if bytes_done > (total := bytes_total or job.bytes_total) > 0:     # 0: the total is not known
            raise InvalidArgument(f"bytes_done ({bytes_done}) is more than bytes_total ({total})")
        if progress is not None and not 0.0 <= progress <= 1.0:     # NaN fails this too
            raise InvalidArgument(f"progress must be a fraction from 0 to 1, not {progress}")
        if job.state == S.ASSIGNED:
            job.started_at = job.started_at or now_usec()
            self._transition(job, S.RUNNING, f"worker {worker.id} started it")
        self._apply_progress(job, phase[:MAX_PHASE], progress, bytes_done, bytes_total, message[:MAX_MESSAGE])

    def report_result(self, worker_id: str, job_id: str, success: bool, outputs: dict[str, Any],
                      error_code: str, error_message: str, bytes_read: int, bytes_written: int,
                      attempt: int | None = None) -> None:
        worker = self._external(worker_id)
        _beat(worker)
        job = self._claimed(worker, job_id, attempt)
        try:
            code = ErrorCode(error_code or "INTERNAL")
        except ValueError:
            raise InvalidArgument(f"unknown error code {error_code!r}") from None
        if (not isinstance(outputs, dict)
                or len(json.dumps(outputs, ensure_ascii=False, separators=(",", ":")).encode()) > MAX_RESULT_BYTES):
            raise InvalidArgument(f"outputs must be a JSON object of at most {MAX_RESULT_BYTES} bytes")
        if not (0 <= bytes_read <= COUNT_MAX and 0 <= bytes_written <= COUNT_MAX):
            raise InvalidArgument(f"bytes_read and bytes_written must be 0 to {COUNT_MAX}")
        error_message = error_message[:MAX_ERROR_MESSAGE]
        if job.state == S.ASSIGNED:
            job.started_at = job.started_at or now_usec()
            self._transition(job, S.RUNNING, f"worker {worker.id} started it")
        # Refused by the store, the report changes nothing: the worker may send it again.
        with self._all_or_nothing(job):
            elapsed = (now_usec() - (job.started_at or now_usec())) / 1_000_000
            result = {"outputs": outputs, "metrics": {"execution_seconds": elapsed, "bytes_read": bytes_read,
                                                      "bytes_written": bytes_written}}
            if success:
                self._release_worker(job)
                self._complete(job, {**result, "status": "completed"})
                return
            self._attempt_failed(job, code, error_message if error_message.strip() else "the worker reported a failure",
                                 job.phase or "run",
                                 code not in NON_RETRYABLE, result)

    def unregister_worker(self, worker_id: str) -> None:
        worker = self._external(worker_id)
        self._lose_worker(worker, "it unregistered")
        del self._workers[worker_id]
        self._notify("worker_removed", worker)
        self._kick()

    def bus_name_lost(self, bus_name: str) -> None:
        for worker in list(self._workers.values()):
            if worker.kind == "external" and worker.bus_name == bus_name:
                if worker.state != "stale":
                    worker.state = "stale"
                    self._lose_worker(worker, "its connection to the bus closed")
                    self._notify("worker_changed", worker)
                    self._kick()    # the jobs that waited for it to claim them wait for another now
                try:
                    asyncio.get_running_loop().call_later(GONE_WORKER_KEEP_SECONDS, self._forget_worker, worker)
                except RuntimeError:    # no loop (a test driving the manager directly): forget it now
                    self._forget_worker(worker)

    def _forget_worker(self, worker: WorkerInfo) -> None:
        if self._workers.get(worker.id) is worker:
            del self._workers[worker.id]
            self._notify("worker_removed", worker)
            self._kick()

    def _check_heartbeats(self) -> None:
        builtin = self._workers.get(BUILTIN)
        if builtin is not None and self._runner is not None and self._runner.reachable:
            # This host beats while h2kd's loop turns and systemd answers: when either stops, the beat ages.
            _beat(builtin)
        limit = time.monotonic() - self._config.heartbeat_timeout_seconds
        for worker in list(self._workers.values()):
            if worker.kind == "external" and worker.state != "stale" and worker.alive_at < limit:
                worker.state = "stale"
                self._lose_worker(worker, "it missed its heartbeats")
                self._notify("worker_changed", worker)
                self._kick()

    def _lose_worker(self, worker: WorkerInfo, why: str) -> None:
        for key in [k for k, (holder, _) in self._taken.items() if holder == worker.id]:
            self._release_taken(key)
        for job in list(self._jobs.values()):
            if job.worker == worker.id and job.state in ACTIVE:
                self._lose_job(job.id, job.attempt, worker.id, why)

    def _lose_job(self, job_id: str, attempt: int, worker_id: str, why: str, again: bool = False) -> None:
        """again: a later try, after the store refused one; not if the worker came back meanwhile."""
        job, worker = self._jobs.get(job_id), self._workers.get(worker_id)
        if (job is None or job.attempt != attempt or job.worker != worker_id or job.state not in ACTIVE
                or (again and worker is not None and worker.state != "stale")):
            return
        try:
            with self._all_or_nothing(job):
                self._requeue_or_fail(job, ErrorCode.WORKER_LOST, f"worker {worker_id} was lost: {why}")
        except StoreFailed as e:
            log.warning("could not take job %s from lost worker %s: %s; trying again in %.0f s", job_id,
                        worker_id, e, STORE_RETRY_SECONDS)
            self._later(STORE_RETRY_SECONDS, lambda: self._lose_job(job_id, attempt, worker_id, why, again=True))
            return
        with contextlib.suppress(StoreFailed):
            self._append_event(job, "log", {"message": f"worker {worker_id} lost: {why}"})

    def _external(self, worker_id: str) -> WorkerInfo:
        worker = self.get_worker(worker_id)
        if worker.kind != "external":
            raise InvalidState("the builtin worker is driven by h2kd itself")
        return worker

    def _claimed(self, worker: WorkerInfo, job_id: str, attempt: int | None) -> Job:
        """The job as this worker's current attempt; `attempt`, if the report names one, must be that attempt:
        a worker that went stale and claimed the job again may still hear from its run of the earlier one."""
        try:
            job = self.get(job_id)
            if job.worker != worker.id or job.state not in ACTIVE:
                raise InvalidState(f"job {job_id} is not claimed by worker {worker.id} (it is {job.state.value})")
            if attempt is not None and attempt != job.attempt:
                raise InvalidState(f"attempt {attempt} of job {job_id} is over; it is on attempt {job.attempt}")
        except (NoSuchJob, InvalidState):
            # It is told now that the job (removed since, maybe) was taken from it: the slot it kept is free.
            for key in [k for k, (holder, _) in self._taken.items() if k[0] == job_id and holder == worker.id]:
                self._release_taken(key)
            raise
        return job

    def _take_slot(self, job: Job, worker: WorkerInfo) -> None:
        if job.id not in self._holding:
            self._holding[job.id] = worker.id
            worker.active_jobs += 1
            self._worker_load_changed(worker)

    def _release_worker(self, job: Job, taken: bool = False) -> None:
        """Free the slot the job's attempt takes on its worker; once, however often it is called. taken: the
        attempt is taken from the worker (a cancel, a timeout), which may go on running it until it is told."""
        worker = self._workers.get(self._holding.pop(job.id, ""))
        if worker is None:
            return
        if taken and worker.kind == "external":
            self._hold_until_told(job, worker)
        else:
            self._free_slot(worker)

    def _free_slot(self, worker: WorkerInfo) -> None:
        if worker.active_jobs > 0:
            worker.active_jobs -= 1
            self._worker_load_changed(worker)

    def _hold_until_told(self, job: Job, worker: WorkerInfo) -> None:
        """An external worker learns that an attempt was taken from it only by its next report on the job (or
        from the job's State), and runs it until then: the slot stays taken meanwhile, so that it cannot claim
        more than its max_jobs; freed by that report (see _claimed) or after heartbeat_timeout_seconds, the time
        within which a worker that follows the job's State has stopped it."""
        key = (job.id, job.created_at, job.attempt)
        if key in self._taken:      # not expected: one attempt is taken once; its timer must not free another's
            self._release_taken(key)
        # Stored with the job's next transition: after a restart, which forgets the timer below, the job still
        # does not run elsewhere before then (_hold_for_taken_attempt).
        job.taken_until = now_usec() + int(self._config.heartbeat_timeout_seconds * 1_000_000)
        try:
            timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
                self._config.heartbeat_timeout_seconds, self._release_taken, key)
        except RuntimeError:    # no loop (a test driving the manager directly)
            timer = None
        self._taken[key] = (worker.id, timer)

    def _release_taken(self, key: tuple[str, int, int]) -> None:
        """The worker an attempt was taken from knows it now (or is gone, or had time enough): its slot is free."""
        worker_id, timer = self._taken.pop(key, ("", None))
        if timer is not None:
            timer.cancel()
        worker = self._workers.get(worker_id)
        if worker is not None:
            self._free_slot(worker)
        job = self._jobs.get(key[0])
        if job is None or job.created_at != key[1] or self._taken_holds(job):
            return
        # The worker knows (or had time enough): a retry, or one after a restart, need not wait for it any more.
        job.taken_until = 0
        with contextlib.suppress(StoreFailed):
            self._store.save_job(job)
        if job.id in self._held_back:
            self._requeue_after_backoff(job.id)     # it waited for that worker to learn: it is queued now

    def _worker_load_changed(self, worker: WorkerInfo) -> None:
        """Announce a worker's ActiveJobs (and State, busy or idle, unless it is stale: only a heartbeat brings a
        stale worker back)."""
        if worker.state != "stale":
            worker.state = "busy" if worker.active_jobs else "idle"
        self._notify("worker_changed", worker)
        if worker.kind == "external":
            self._kick()    # the wait reasons of the jobs it may claim

    # ---------------------------------------------------------------- plumbing

    def _transition(self, job: Job, new: JobState, reason: str) -> None:
        old = job.move_to(new)
        self._track_state(job)
        try:
            event = self._store.record_transition(job, old, new, reason)
        except Exception:
            # Not stored, so not made: the job stays in the state the store has (which a restart would find). Also
            # for a value the store cannot take, so that a fallback (_end_attempt's stand-in result) can follow.
            job.state = old
            self._track_state(job)
            raise
        self._stored_transitions += 1
        if old == S.CREATED:    # its failure recorded, or it went another way (cancelled): nothing waits any more
            self._failure_unrecorded.pop(job.id, None)
        self._notify_changed(job, {"state", "cancelable"} | _STATE_FIELDS, urgent=True)
        self._notify_event(job, event)
        if new in TERMINAL or (old in ACTIVE and new not in ACTIVE):
            self._kick()    # a slot is free: a job waiting for one need not wait for some other change
        if new in TERMINAL:
            self._prune_if_over()
        self._manager_changed()

    def _track_state(self, job: Job) -> None:
        if job.state in ACTIVE:
            self._active.add(job.id)
        else:
            self._active.discard(job.id)
        self._unfinished.track(job)

    def _append_event(self, job: Job, kind: str, data: dict[str, Any]) -> None:
        self._notify_event(job, self._store.append_event(job.id, kind, data))

    def _notify_changed(self, job: Job, changed: set[str], urgent: bool) -> None:
        for listener in self._listeners:
            _safely(listener.job_changed, job, changed, urgent)

    def _notify_event(self, job: Job, event: Event) -> None:
        for listener in self._listeners:
            _safely(listener.job_event, job, event)

    def _notify(self, method: str, obj: Any) -> None:
        for listener in self._listeners:
            _safely(getattr(listener, method), obj)

    def _manager_changed(self) -> None:
        props = {"JobsQueued": self.jobs_queued, "JobsRunning": self.jobs_running,
                 "Paused": self.paused, "MaxParallelJobs": self.max_parallel}
        changed = {k for k, v in props.items() if self._manager_props.get(k) != v}
        if changed:
            self._manager_props = props
            for listener in self._listeners:
                _safely(listener.manager_changed, changed)


def _ran_past_its_timeout(job: Job, outcome: UnitOutcome) -> bool:
    """Whether a unit that ended with systemd's "timeout" ran as long as its job's timeout_seconds: systemd's
    RuntimeMaxSec (a little longer) ended it. Sooner, the timeout was that of a stop. By the monotonic clock, as
    systemd counts, when it told the worker's start and end; else by the wall clock from this attempt's start when
    systemd told it (job.started_at is the first attempt's); unknown: assumed."""
    limit = job.spec["execution_policy"]["timeout_seconds"] * 1_000_000
    if outcome.ran_usec:
        return outcome.ran_usec >= limit
    started = outcome.started_at or job.started_at
    if not started:
        return True
    return (outcome.ended_at or now_usec()) - started >= limit


def _by_uid(uid: int | None) -> str:
    """" by uid N" for a request's reason, or "" when who asked is not known (None or -1)."""
    return f" by uid {uid}" if uid is not None and uid >= 0 else ""


def _of_uid(uid: int | None) -> str:
    return f" of uid {uid}" if uid is not None and uid >= 0 else ""


def _attempts_counted(job: Job) -> int:
    """The job's attempts that count against its retry_count: those since the last retry asked for by hand, but
    the ones that ended through no fault of the job."""
    return job.attempt - job.attempts_not_counted - job.attempts_counted_before


def _counts(job: Job, attempt_spent: bool) -> bool:
    """Whether the attempt that just ended counts against the job's retries: it does if the job spent it, or once
    MAX_ATTEMPTS_NOT_COUNTED attempts since the last retry asked for by hand went uncounted. One that does not
    is added to job.attempts_not_counted."""
    if attempt_spent or job.attempts_not_counted >= MAX_ATTEMPTS_NOT_COUNTED:
        return True
    job.attempts_not_counted += 1
    return False


def _failed(result: dict[str, Any] | None, code: ErrorCode, message: str, phase: str) -> dict[str, Any]:
    """An attempt's result (as its worker gave it, if at all) marked failed with this error."""
    return {**(result or {}), "status": "failed",
            "error": {"phase": phase, "code": code.value, "message": message, "retryable": code not in NON_RETRYABLE}}


# Fields that may change together with a state transition.
_STATE_FIELDS = {"attempt", "worker", "unit", "started_at", "finished_at", "result", "error_code",
                 "error_message", "phase", "progress", "progress_known", "bytes_done", "bytes_total",
                 "rate", "expected_end", "wait_reason"}


def _failure_not_recorded(problem: str, kept: Job | None = None) -> InvalidSpec:
    """What the caller of a submission whose checks failed is told when the store could not record the failed job
    (`kept`: the job, if it is stored, as created): the problem with its spec, as the job would have said."""
    if kept is None:
        return InvalidSpec("", f"{problem} (nothing was kept: the job store cannot be written)")
    return InvalidSpec("", f"{problem} (job {kept.id} stays created until the job store can record that it failed)")


def _text(value: Any) -> str:
    """A field of a worker's result that should be a string; "" when it is anything else."""
    return value if isinstance(value, str) else ""


def _beat(worker: WorkerInfo) -> None:
    """A sign of life from `worker`: when it is shown (LastHeartbeat) and when it counts (alive_at)."""
    worker.last_heartbeat, worker.alive_at = now_usec(), time.monotonic()


def _safely(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("listener %s failed", getattr(fn, "__qualname__", fn))
