"""JournalLog: writes one structured journal entry per job lifecycle event, each with its catalog MESSAGE_ID.

Entries carry H2K_JOB_ID, H2K_STATE, H2K_OPERATION, H2K_WORKER, H2K_ATTEMPT and H2K_OWNER_UID, the same
fields the worker units get through LogExtraFields, so `journalctl H2K_JOB_ID=<id>` shows a job's whole
story. The MESSAGE_IDs below are explained in systemd/h2kd.catalog (`journalctl -x`).
Progress is journaled only when it crosses a 10% checkpoint, never at every update.
"""

from __future__ import annotations

import errno
import logging
import sys

from systemd import journal

from h2kd.manager.ports import Event, WorkerInfo
from h2kd.model.job import Job
from h2kd.model.result import NON_RETRYABLE, ErrorCode
from h2kd.model.states import ACTIVE, JobState
from h2kd.observability.wire import send_journal

log = logging.getLogger(__name__)

# Fixed for good: dashboards, alerts and the catalog match on them.
MESSAGE_ID_SUBMITTED = "ef9ce53f86a04ec09d10361b97f94f57"
MESSAGE_ID_STARTED = "2527c0f2087d46429a735b9eab4c063f"
MESSAGE_ID_PROGRESS = "b420623cda6e41599b0c7ac11d4a3af8"
MESSAGE_ID_COMPLETED = "f42ac97ac9ea4f9f9fc6fa11fa7841b1"
MESSAGE_ID_FAILED = "a6a4150b8606421cabf259198c4eb2da"
MESSAGE_ID_CANCELLED = "00065c43f8f94bf5bdc7e06e971e463b"
MESSAGE_ID_RETRIED = "3201e0cc18d1419ca4e5b9163af95b93"
MESSAGE_ID_WORKER_LOST = "b1026234777048a49712e6b703c62766"
MESSAGE_ID_REQUEUED = "14fbc8501ccb410d834813a03a75bfbc"

MESSAGE_IDS = {
    "submitted": MESSAGE_ID_SUBMITTED,
    "started": MESSAGE_ID_STARTED,
    "progress": MESSAGE_ID_PROGRESS,
    "completed": MESSAGE_ID_COMPLETED,
    "failed": MESSAGE_ID_FAILED,
    "cancelled": MESSAGE_ID_CANCELLED,
    "retried": MESSAGE_ID_RETRIED,
    "worker-lost": MESSAGE_ID_WORKER_LOST,
    "requeued": MESSAGE_ID_REQUEUED,
}

SYSLOG_IDENTIFIER = "h2kd"
CHECKPOINT_STEP = 10  # percent between progress entries
# journald's catalog substitutes only @NAME@ made of capital letters and "_" (no digits), so every
# H2K_* field is also sent under this prefix for systemd/h2kd.catalog to quote. Filter on H2K_*.
# An absent field shows as its bare name in the catalog text, so each entry always sends those its text quotes.
CATALOG_PREFIX = "HYPERKVM_"
_ACTIVE_STATES = frozenset(state.value for state in ACTIVE)


def _send(message: str, message_id: str, priority: int, **fields: object) -> None:
    """One datagram to journald; without a journal (no socket) it is silently dropped. CODE_* name the
    function that wrote the entry (the one that knows which event it is), not this one."""
    writer = sys._getframe(1)
    values = {"MESSAGE": message, "MESSAGE_ID": message_id, "PRIORITY": str(priority),
              "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER, "CODE_FILE": writer.f_code.co_filename,
              "CODE_LINE": str(writer.f_lineno), "CODE_FUNC": writer.f_code.co_qualname}
    for key, value in fields.items():
        if value is not None and value != "":
            values[key] = text = str(value)
            if key.startswith("H2K_"):
                values[CATALOG_PREFIX + key[4:]] = text
    try:
        send_journal(values)
    except OSError as e:
        if e.errno != errno.EMSGSIZE:
            return  # journald gone or overloaded: a lost log line must never stop the daemon.
        try:  # too big for one datagram: systemd-python passes it in a memfd
            journal.send(**values)
        except OSError:
            pass


def _seconds(start_usec: int, end_usec: int) -> float | None:
    if start_usec and end_usec and end_usec >= start_usec:
        return (end_usec - start_usec) / 1e6
    return None


class JournalLog:
    """A JobListener that journals lifecycle events. Synchronous, never raises, keeps O(jobs in flight) state."""

    def __init__(self) -> None:
        self._checkpoint: dict[str, tuple[int, int]] = {}   # job id -> (attempt, last percent journaled)
        self._worker_state: dict[str, str] = {}

    # -- JobListener ---------------------------------------------------------------------------------

    def job_added(self, job: Job) -> None:
        # A job seen again after a restart (already past "created") is not a new submission.
        if job.state in (JobState.CREATED, JobState.VALIDATED, JobState.QUEUED) and job.attempt == 0:
            self._safely(self._submitted, job)

    def job_changed(self, job: Job, changed: set[str], urgent: bool) -> None:
        if "state" in changed:
            self._safely(self._state_changed, job)
        if "progress" in changed or "bytes_done" in changed:
            self._safely(self._progressed, job)

    def job_event(self, job: Job, event: Event) -> None:
        # State and progress arrive through job_changed; a retry, and an attempt put back in the queue, are told
        # here, where the state left and the reason are known.
        if event.kind != "state":
            return
        new, old = event.data.get("new_state"), str(event.data.get("old_state") or "")
        if new == JobState.RETRYING.value:
            self._safely(self._retrying, job, old)
        elif new == JobState.QUEUED.value and old in _ACTIVE_STATES:
            self._safely(self._requeued, job, str(event.data.get("reason") or "back in the queue"))

    def job_removed(self, job: Job) -> None:
        self._checkpoint.pop(job.id, None)

    def worker_added(self, worker: WorkerInfo) -> None:
        self._worker_state[worker.id] = worker.state

    def worker_changed(self, worker: WorkerInfo) -> None:
        before = self._worker_state.get(worker.id)
        self._worker_state[worker.id] = worker.state
        if worker.state == "stale" and before != "stale":
            self._safely(self._worker_lost, worker)

    def worker_removed(self, worker: WorkerInfo) -> None:
        self._worker_state.pop(worker.id, None)

    def manager_changed(self, changed: set[str]) -> None:
        pass

    # -- entries -------------------------------------------------------------------------------------

    @staticmethod
    def _safely(write, *args) -> None:
        try:
            write(*args)
        except Exception:  # a listener must not raise into the manager
            log.exception("could not journal a job event")

    @staticmethod
    def _job_fields(job: Job) -> dict[str, object]:
        return {
            "H2K_JOB_ID": job.id,
            "H2K_STATE": job.state.value,
            "H2K_OPERATION": job.operation,
            "H2K_WORKER": job.worker,   # "builtin" when h2kd runs the attempt as its own unit
            "H2K_ATTEMPT": job.attempt,
            "H2K_OWNER_UID": job.owner,
            "H2K_UNIT": job.unit,
        }

    def _submitted(self, job: Job) -> None:
        source = job.source or "(no path)"
        _send(f"Job {job.id} submitted: {job.operation} of {source}, priority {job.priority}",
              MESSAGE_ID_SUBMITTED, journal.LOG_INFO, H2K_SOURCE=source, H2K_OUTPUT=job.output_place,
              H2K_PRIORITY=job.priority, **self._job_fields(job))

    def _state_changed(self, job: Job) -> None:
        fields = self._job_fields(job)
        state = job.state
        if state == JobState.RUNNING:
            self._checkpoint[job.id] = (job.attempt, 0)
            where = f" in {job.unit}" if job.unit else (f" on worker {job.worker}" if job.worker else "")
            _send(f"Job {job.id} attempt {job.attempt} started{where}", MESSAGE_ID_STARTED, journal.LOG_INFO, **fields)
        elif state == JobState.COMPLETED:
            self._checkpoint.pop(job.id, None)
            took = _seconds(job.started_at, job.finished_at)
            metrics = (job.result or {}).get("metrics") or {}
            written = metrics.get("bytes_written")
            text = f"Job {job.id} completed: {job.operation} of {job.source or '(no path)'}"
            if took is not None:
                text += f" in {took:.1f} s"
            _send(text, MESSAGE_ID_COMPLETED, journal.LOG_INFO, H2K_DURATION_SECONDS=_fmt(took),
                  H2K_BYTES_WRITTEN=written, H2K_OUTPUT=job.output_place, **fields)
        elif state == JobState.FAILED:
            self._checkpoint.pop(job.id, None)
            code = job.error_code or "INTERNAL"
            message = job.error_message or "no message"
            # A request or an input that cannot work (a path mistyped, an output that exists) is the submitter's
            # to mend and was said to them: no error for `journalctl -p err` and the alerts that watch it.
            priority = journal.LOG_WARNING if ErrorCode.parse(code) in NON_RETRYABLE else journal.LOG_ERR
            _send(f"Job {job.id} failed ({code}): {message}", MESSAGE_ID_FAILED,
                  priority, H2K_ERROR_CODE=code, H2K_ERROR_MESSAGE=message, **fields)
        elif state == JobState.CANCELLED:
            self._checkpoint.pop(job.id, None)
            by = job.cancelled_by if job.cancelled_by >= 0 else None
            _send(f"Job {job.id} cancelled" + (f" by uid {by}" if by is not None else ""), MESSAGE_ID_CANCELLED,
                  journal.LOG_NOTICE, H2K_CANCELLED_BY_UID=by, **fields)
        elif state == JobState.RETRYING:
            self._checkpoint.pop(job.id, None)      # journaled by job_event

    def _retrying(self, job: Job, left: str) -> None:
        if left in (JobState.FAILED.value, JobState.CANCELLED.value):
            # Asked for by hand: an event of its own, which names the failure it retries, if any.
            error = f": {job.error_code}: {job.error_message or 'no message'}" if job.error_code else ""
            _send(f"Job {job.id} queued again by request (it had {left}{error})", MESSAGE_ID_REQUEUED,
                  journal.LOG_NOTICE, H2K_PREVIOUS_STATE=left, H2K_ERROR_CODE=job.error_code or None,
                  H2K_ERROR_MESSAGE=(job.error_message or None) if job.error_code else None, **self._job_fields(job))
            return
        code = job.error_code or "INTERNAL"
        message = job.error_message or "no message"
        _send(f"Job {job.id} will be retried after {code}: {message}", MESSAGE_ID_RETRIED, journal.LOG_WARNING,
              H2K_ERROR_CODE=code, H2K_ERROR_MESSAGE=message, **self._job_fields(job))

    def _requeued(self, job: Job, reason: str) -> None:
        # Its attempt lost its worker or unit (a worker gone stale, a unit that never started, the system
        # shutting down): no error of the job's own, and it is queued again at once, without a back-off.
        _send(f"Job {job.id} attempt {job.attempt} {reason}", MESSAGE_ID_RETRIED, journal.LOG_WARNING,
              H2K_ERROR_CODE="WORKER_LOST", H2K_ERROR_MESSAGE=reason, **self._job_fields(job))

    def _progressed(self, job: Job) -> None:
        if not job.progress_known or job.state not in (JobState.RUNNING, JobState.PROGRESSING):
            return
        attempt, last = self._checkpoint.get(job.id, (job.attempt, 0))
        if attempt != job.attempt:
            last = 0
        percent = int(min(max(job.progress, 0.0), 1.0) * 100 + 1e-9)
        reached = percent - percent % CHECKPOINT_STEP
        if reached <= last:
            return
        self._checkpoint[job.id] = (job.attempt, reached)
        phase = job.phase or "working"
        _send(f"Job {job.id} {phase}: {reached}% ({job.bytes_done}/{job.bytes_total} bytes)",
              MESSAGE_ID_PROGRESS, journal.LOG_INFO, H2K_PROGRESS_PERCENT=reached, H2K_PHASE=phase,
              H2K_BYTES_DONE=job.bytes_done, H2K_BYTES_TOTAL=job.bytes_total, **self._job_fields(job))

    def _worker_lost(self, worker: WorkerInfo) -> None:
        name = worker.name or worker.id
        _send(f"Worker {name} ({worker.id}) was lost and is marked stale; the jobs it held go back to the queue, "
              "or fail if they have no retries left",
              MESSAGE_ID_WORKER_LOST, journal.LOG_WARNING, H2K_WORKER=worker.id, H2K_WORKER_NAME=name,
              H2K_WORKER_KIND=worker.kind, H2K_OWNER_UID=worker.owner, H2K_STATE=worker.state)


def _fmt(seconds: float | None) -> str | None:
    return None if seconds is None else f"{seconds:.3f}"
