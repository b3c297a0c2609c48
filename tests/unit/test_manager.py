"""JobManager without a bus or systemd: a recording runner stands in for systemd, the store is real SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Callable

import pytest

from h2kd.config import Config
from h2kd.errors import (AlreadyExists, H2kError, InvalidArgument, InvalidSpec, InvalidState, NoSuchJob, QueueFull,
                         StoreFailed)
from h2kd.manager import manager as manager_module
from h2kd.manager.manager import JobManager
from h2kd.model.spec import MAX_SPEC_BYTES
from h2kd.manager.ports import StartDeferred, StartUnanswered, StartWithdrawn, UnitOutcome, WorkerInfo
from h2kd.model.job import Job, now_usec
from h2kd.model.states import JobState
from h2kd.store import JobStore
from h2kd.bus.job_iface import job_vardict
from dbus_fast._private.marshaller import Marshaller


class RecordingRunner:
    """Starts nothing; records what the manager asked so the test can play systemd's answers."""

    reachable = True

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.stopped: list[str] = []
        self.reattached: list[str] = []
        self.forgotten: list[str] = []
        self.kept: list[str] | None = None

    async def start(self, job, attempt):
        self.started.append((job.id, attempt))
        return f"h2k-job-{job.id}-{attempt}.service"

    async def stop(self, unit):
        self.stopped.append(unit)

    def forget(self, job):
        self.forgotten.append(job.id)

    async def keep_only(self, jobs, unreadable_ids=()):
        self.kept = sorted(job.id for job in jobs)
        self.kept_unreadable = sorted(unreadable_ids)

    async def reattach(self, job):
        self.reattached.append(job.id)
        return job.unit or f"h2k-job-{job.id}-{job.attempt}.service"

    def capabilities(self):
        return {"qemu_img": True, "loop": True}


class SlowToStart(RecordingRunner):
    """systemd never answers StartTransientUnit: h2kd goes down while the unit is being started."""

    async def start(self, job, attempt):
        self.started.append((job.id, attempt))
        await asyncio.Event().wait()


class RefusedLater(RecordingRunner):
    """systemd refuses the unit (`refusal`), once the test lets it answer (may_answer)."""

    def __init__(self, refusal: str) -> None:
        super().__init__()
        self.refusal = refusal
        self.may_answer = asyncio.Event()

    async def start(self, job, attempt):
        self.started.append((job.id, attempt))
        await self.may_answer.wait()
        raise RuntimeError(self.refusal)


class Changes:
    def __init__(self) -> None:
        self.states: list[tuple[str, str]] = []
        self.logs: list[str] = []
        self.progress: list[float] = []

    def job_added(self, job):
        self.states.append((job.id, job.state.value))

    def job_changed(self, job, changed, urgent):
        if "state" in changed:
            self.states.append((job.id, job.state.value))
        if "progress" in changed and (not self.progress or self.progress[-1] != job.progress):
            self.progress.append(job.progress)
    def job_event(self, job, event):
        if event.kind == "log":
            self.logs.append(event.data["message"])

    def job_removed(self, job): ...
    def worker_added(self, worker): ...
    def worker_changed(self, worker): ...
    def worker_removed(self, worker): ...
    def manager_changed(self, changed): ...


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.vmdk"
    path.write_bytes(b"KDMV" + bytes(508))
    return path


def make(tmp_path: Path, runner=None, store: JobStore | None = None, checked: bool = True, **overrides):
    """A manager on the store in tmp_path/state (or on `store`), with `runner` (a RecordingRunner by default) and
    the host checks h2kd runs (none if not `checked`); made again on the same tmp_path, it is h2kd restarted."""
    config = Config(**{"state_dir": tmp_path / "state", "output_roots": [tmp_path / "out"],
                       "retry_backoff_base_seconds": 0.01, **overrides})
    (tmp_path / "out").mkdir(exist_ok=True)
    config.state_dir.mkdir(exist_ok=True)
    if runner is None:
        runner = RecordingRunner()
    if store is None:
        store = JobStore(config.store_path)
    from h2kd.manager.validation import HostChecks
    manager = JobManager(config, store, runner, HostChecks(config) if checked else None)
    changes = Changes()
    manager.add_listener(changes)
    return manager, runner, changes, config


def spec(image: Path, out: Path, **extra):
    s = {"operation": "convert", "image": {"path": str(image)}, "artifacts": {"output_path": str(out)}}
    s.update(extra)
    return s


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def until(condition, timeout: float = 10.0) -> None:
    """Wait for something the manager does on a timer; a loaded machine may be late, never early."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the manager did not get there in time"
        await asyncio.sleep(0.02)


def test_a_progress_message_is_logged_when_it_changes_not_with_every_report(tmp_path, image):
    async def go():
        m, runner, changes, _ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await settle()
        for done, label in ((10, "disk 1 of 2"), (20, "disk 1 of 2"), (60, "disk 2 of 2"), (70, "disk 2 of 2")):
            m.unit_status(job.id, 1, f"convert: {done}.00% ({done}/100 bytes) {label}")
        assert changes.logs == ["disk 1 of 2", "disk 2 of 2"]
        assert job.progress == 0.7
        await m.stop()
    asyncio.run(go())


def test_the_event_log_records_progress_in_five_percent_steps(tmp_path, image):
    """A worker reports every percent or more often; the job's event log (h2kctl events, GetEvents) keeps a
    readable trail, each step once and in order, while the Progress property follows every report."""
    async def go():
        m, *_ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await settle()
        for tenth in range(1, 1000, 3):
            m.unit_status(job.id, 1, f"convert: {tenth / 10:.2f}% ({tenth}/1000 bytes)")
        assert job.progress == 0.997

        def steps() -> list[float]:
            return [e.data["progress"] for e in m.events(job.id) if e.kind == "progress"]
        await until(lambda: len(steps()) >= 19)     # listed once committed, within about a second
        assert [int(p * 100) // 5 for p in steps()] == list(range(1, 20))   # 5%, 10%, ... 95%
        await m.stop()
    asyncio.run(go())


def test_submit_runs_and_completes(tmp_path, image):
    async def go():
        m, runner, changes, _ = make(tmp_path)
        await m.start()
        job, created = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        assert created
        await settle()
        assert runner.started == [(job.id, 1)]
        assert job.state.value == "running" and job.unit
        m.unit_status(job.id, 1, "converting: 40.00% (40/100 bytes)")
        m.unit_status(job.id, 1, "converting: 30.00% (30/100 bytes)")  # must not go backwards
        m.unit_status(job.id, 1, "converting: 90.00% (90/100 bytes)")
        assert changes.progress == [0.0, 0.4, 0.9]
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "success", 0, {"status": "completed", "outputs": {"x": 1}}))
        assert job.state.value == "completed" and job.progress == 1.0
        assert [s for i, s in changes.states if i == job.id] == [
            "queued", "assigned", "running", "progressing", "completed"]
        await m.stop()
    asyncio.run(go())


@pytest.mark.parametrize("worker_result", [{"status": "completed", "outputs": {}}, {"status": "cancelled"},
                                           {"status": "failed", "error": {"code": "CONVERSION_FAILED", "message": "x",
                                                                          "retryable": False}}],
                         ids=["completed", "cancelled", "failed"])
def test_an_end_h2kd_learns_of_later_is_recorded_when_it_happened(tmp_path, image, worker_result):
    """The runner found the unit's end from its files (h2kd was away): FinishedAt is when the attempt ended, within
    the job's run, not when h2kd came back; an end it saw happen is recorded as it is seen."""
    async def go():
        m, _, _, _ = make(tmp_path)
        await m.start()
        seen, away = (m.submit(spec(image, tmp_path / f"out/{name}.qcow2"), owner=0)[0] for name in ("seen", "away"))
        await settle()
        for job in (seen, away):
            job.started_at = job.started_at - 60_000_000     # both ran for a minute
        ended = away.started_at + 30_000_000
        m.unit_finished(seen.id, 1, UnitOutcome(seen.unit, "success", 0, dict(worker_result)))
        m.unit_finished(away.id, 1, UnitOutcome(away.unit, "success", 0, dict(worker_result), ended_at=ended))
        assert away.state.value == seen.state.value == worker_result["status"]
        assert away.finished_at == ended
        assert seen.finished_at > seen.started_at + 59_000_000
        await m.stop()
    asyncio.run(go())


def test_validation_failure_is_a_failed_job(tmp_path):
    async def go():
        m, runner, _, _ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(tmp_path / "missing.vmdk", tmp_path / "out/a.qcow2"), owner=0)
        assert job.state.value == "failed" and job.error_code == "VALIDATION_FAILED"
        assert "no such file" in job.error_message
        await settle()
        assert runner.started == []
    asyncio.run(go())


def test_idempotent_and_conflicting_resubmission(tmp_path, image):
    async def go():
        m, *_ = make(tmp_path)
        await m.start()
        s = spec(image, tmp_path / "out/a.qcow2", job_id="vm-1")
        first, _ = m.submit(s, owner=0)
        again, created = m.submit(s, owner=0)
        assert again is first and not created
        with pytest.raises(AlreadyExists):
            m.submit(spec(image, tmp_path / "out/b.qcow2", job_id="vm-1"), owner=0)
        # The same spec from another user is not answered with the first user's job.
        for other in (1000, 1001):
            with pytest.raises(AlreadyExists, match="'vm-1' was submitted by another user"):
                m.submit(s, owner=other)
        assert m.submit(s, owner=0) == (first, False)
        with pytest.raises(InvalidSpec):
            m.submit({"operation": "teleport"}, owner=0)
        with pytest.raises(NoSuchJob):
            m.get("nope")
    asyncio.run(go())


def test_failure_retries_with_backoff_then_fails(tmp_path, image):
    async def go():
        m, runner, changes, _ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 1}), owner=0)
        await settle()
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "exit-code", 1, None, ["qemu-img: first"]))
        assert job.state.value == "retrying"
        # Until the retry ends, the Result tells the owner how the first attempt failed, and why.
        assert job.result["status"] == "failed" and job.result["attempt"] == 1
        assert job.result["log_tail"] == ["qemu-img: first"] and "first" not in job.error_message
        await until(lambda: len(runner.started) == 2)
        assert runner.started == [(job.id, 1), (job.id, 2)]
        m.unit_finished(job.id, 2, UnitOutcome(job.unit, "exit-code", 1, None, ["qemu-img: boom"]))
        assert job.state.value == "failed" and job.error_code == "UNIT_FAILED"
        # The unit's last lines go with the Result (its owner's and administrators'), not the Error (everyone's).
        assert job.result["log_tail"] == ["qemu-img: boom"] and "boom" not in job.error_message
    asyncio.run(go())



def test_a_slot_freed_by_a_failed_attempt_goes_to_the_next_job_at_once(tmp_path, image):
    """An attempt that fails and waits to be retried frees its slot: the next queued job starts then, not when
    the retry's backoff (minutes) is over or some other job ends."""
    async def go():
        m, runner, _, _ = make(tmp_path, max_parallel_jobs=1, retry_backoff_base_seconds=600)
        await m.start()
        first, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 1}), owner=0)
        second, _ = m.submit(spec(image, tmp_path / "out/b.qcow2"), owner=0)
        await settle()
        assert runner.started == [(first.id, 1)] and second.state.value == "queued"
        m.unit_finished(first.id, 1, UnitOutcome(first.unit, "exit-code", 1, None, []))
        assert first.state.value == "retrying"
        await until(lambda: (second.id, 1) in runner.started, timeout=5)
        assert second.state.value in ("assigned", "running")
    asyncio.run(go())


def test_a_retry_waits_no_longer_than_the_longest_backoff_after_the_clock_was_set_back(tmp_path, image,
                                                                                       monkeypatch):
    """The clock a day ahead as the attempt failed, set right before h2kd restarted: the job waited a day."""
    from h2kd.manager import manager as manager_module

    settings = {"retry_backoff_base_seconds": 0.5, "retry_backoff_max_seconds": 1, "heartbeat_timeout_seconds": 1}

    async def failed_while_the_clock_was_ahead():
        (tmp_path / "state").mkdir()
        store = JobStore(tmp_path / "state" / "h2kd.sqlite")
        m, runner, _, _ = make(tmp_path, store=store, **settings)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 2}), owner=0)
        await settle()
        assert runner.started == [(job.id, 1)]
        with monkeypatch.context() as clock:
            clock.setattr(manager_module, "now_usec", lambda: now_usec() + 86_400_000_000)
            m.unit_finished(job.id, 1, UnitOutcome(job.unit, "exit-code", 1, None, []))
        assert job.state.value == "retrying"
        await m.stop()
        store.close()
        return job.id

    async def restarted(job_id):
        m, runner, _, _ = make(tmp_path, **settings)
        await m.start()
        await until(lambda: (job_id, 2) in runner.started, timeout=5)
        await m.stop()

    job_id = asyncio.run(failed_while_the_clock_was_ahead())
    asyncio.run(restarted(job_id))


def test_the_stores_check_runs_off_the_event_loop_and_health_gives_its_answer_once_it_has_one(tmp_path):
    """PRAGMA quick_check reads the whole store, seconds when it is not cached: health (the watchdog asks it on the
    event loop) does not wait for it, and tells the check's answer once there is one."""
    gate = threading.Event()
    checks: list[bool] = []

    class SlowToCheck(JobStore):
        def check(self) -> bool:
            checks.append(threading.current_thread() is threading.main_thread())
            gate.wait(10)
            return False        # as for a damaged file

    async def go():
        (tmp_path / "state").mkdir()
        m, _, _, _ = make(tmp_path, store=SlowToCheck(Config(state_dir=tmp_path / "state").store_path))
        await m.start()
        assert m.health()["store_ok"] is True       # the last answer (none yet: sound), at once
        await until(lambda: checks)
        assert checks == [False], "the check ran on the event loop's thread"
        gate.set()
        await until(lambda: m.health()["status"] == "degraded")
        assert m.health()["store_ok"] is False
    asyncio.run(go())


def test_a_held_job_is_checked_again_when_it_is_started(tmp_path, image):
    """A job held with queue=false may be started days later: its source is checked again then, as for a retry,
    and a problem is told to whoever starts it, the job staying held, rather than found by its unit."""
    async def go():
        m, runner, _, _ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0, queue=False)
        assert job.state.value == "validated"
        image.unlink()
        with pytest.raises(InvalidArgument, match=f"job {job.id} cannot be started: .*no such file"):
            m.start_job(job.id)
        await settle()
        assert job.state.value == "validated" and runner.started == []
    asyncio.run(go())


class StopRefusedOnce(RecordingRunner):
    """systemd does not take the first StopUnit (a time-out, a daemon-reexec under way)."""

    async def stop(self, unit):
        self.stopped.append(unit)
        if len(self.stopped) == 1:
            raise H2kError("systemd refused StopUnit: org.freedesktop.DBus.Error.NoReply: no reply")


def test_a_cancel_whose_stop_systemd_does_not_take_at_once_is_not_reported_failed_and_is_asked_again(
        tmp_path, image, monkeypatch):
    """The cancel is stored before systemd is asked to stop the unit; if the stop does not go through, the caller
    is told the cancel was taken (it will be carried out), and the stop is asked for again."""
    monkeypatch.setattr(manager_module, "STOP_RETRY_SECONDS", 0.1)

    async def go():
        m, runner, _, _ = make(tmp_path, runner=StopRefusedOnce())
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await settle()
        assert job.state.value == "running"
        await m.cancel(job.id)          # no error, though systemd did not take the stop
        assert job.cancel_requested and runner.stopped == [job.unit]
        await until(lambda: len(runner.stopped) == 2)
        assert runner.stopped == [job.unit, job.unit]
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "success", 0, {"status": "cancelled"}))
        assert job.state.value == "cancelled"
        await asyncio.sleep(0.3)
        assert len(runner.stopped) == 2     # not asked again once the job has ended
    asyncio.run(go())


def test_who_cancelled_a_running_job_is_kept_across_a_restart_and_forgotten_by_a_retry(tmp_path, image):
    """The uid that asked for the cancel is stored with the request: the job's history names it when the unit
    stops, even after h2kd restarted in between. A second asker does not replace the first; a retry (by
    another uid) starts with no one recorded."""
    async def go():
        m, runner, _, _ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await settle()
        assert job.state.value == "running"
        await m.cancel(job.id, by=1000)
        await m.cancel(job.id, by=0)
        assert job.cancelled_by == 1000
        await m.stop()
        m, runner, _, _ = make(tmp_path)          # h2kd restarted while the unit stops
        await m.start()
        job = m.get(job.id)
        assert job.cancel_requested and job.cancelled_by == 1000
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "success", 0, {"status": "cancelled"}))
        assert job.state.value == "cancelled"
        reasons = [entry["reason"] for entry in m.history(job.id)]
        assert reasons[-1] == "cancelled by uid 1000; the unit has stopped", reasons
        m.retry(job.id, by=0)
        await settle()
        assert job.cancelled_by == -1
        assert "retry requested by uid 0" in [entry["reason"] for entry in m.history(job.id)]
        await m.stop()
        m, _, _, _ = make(tmp_path)
        m.load()
        assert m.get(job.id).cancelled_by == -1
    asyncio.run(go())


def test_a_unit_stopped_because_the_kernel_killed_a_process_for_memory_fails_and_is_retried(tmp_path, image):
    """systemd stops a unit whose qemu-img the OOM killer took (OOMPolicy=stop), and the worker, told to stop,
    writes "cancelled". Nobody cancelled it: the attempt failed for lack of memory, and is retried as its
    policy allows, not recorded cancelled "outside h2kd"."""
    async def go():
        m, runner, *_ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 1}), owner=0)
        await settle()
        m.unit_status(job.id, 1, "convert: 97.00% (97/100 bytes)")
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "oom-kill", 0, {"status": "cancelled"}))
        assert job.state.value == "retrying", job.state
        assert job.error_code == "UNIT_FAILED" and "for lack of memory" in job.error_message, job.error_message
        # The failed attempt's 97% is not shown through the wait for the next one.
        assert (job.progress, job.progress_known, job.bytes_done, job.phase) == (0.0, False, 0, ""), job
        await until(lambda: (job.id, 2) in runner.started)
        m.unit_finished(job.id, 2, UnitOutcome(job.unit, "oom-kill", 0, {"status": "cancelled"}))
        assert job.state.value == "failed" and "for lack of memory" in job.error_message
        await m.stop()
    asyncio.run(go())


def test_a_completed_attempt_whose_unit_ran_out_of_time_while_committing_is_completed(tmp_path, image):
    """The worker finishes an attempt whose outputs are getting their names, whatever comes (h2kd.worker.main):
    if systemd's time limit falls then, the unit's result says "timeout" but the worker exits 0 with a completed
    result, and the outputs are in place. The job is completed, not failed (a retry would find them in its way)."""
    async def go():
        m, *_ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await settle()
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "timeout", 0, {"status": "completed", "outputs": {}}))
        assert job.state.value == "completed", (job.error_code, job.error_message)
        # Killed outright after its result was written: its outputs are in place (the runner undoes a commit
        # only for an attempt without a completed result).
        killed, _ = m.submit(spec(image, tmp_path / "out/k.qcow2"), owner=0)
        await until(lambda: killed.state.value == "running")
        m.unit_finished(killed.id, 1, UnitOutcome(killed.unit, "signal", 9, {"status": "completed", "outputs": {}}))
        assert killed.state.value == "completed", (killed.error_code, killed.error_message)
        other, _ = m.submit(spec(image, tmp_path / "out/b.qcow2"), owner=0)
        await until(lambda: other.state.value == "running")
        ran_its_time = other.started_at + 3660 * 1_000_000      # RuntimeMaxSec: the job's 3600 s and a margin
        m.unit_finished(other.id, 1, UnitOutcome(other.unit, "timeout", 143, None, ["x" * 5000],
                                                 ended_at=ran_its_time))
        assert other.state.value == "failed" and other.error_code == "TIMEOUT"
        assert other.result["log_tail"] == ["x" * 1024]      # a line of the journal's 48 KiB is cut short
    asyncio.run(go())


def test_a_retry_asked_for_by_hand_gets_the_jobs_automatic_retries_anew(tmp_path, image):
    """retry_count=1: attempts 1 and 2 fail, and the job fails. Retried by hand, attempt 3 fails of a transient
    error and is retried once more by h2kd, as a new submission's would be; attempt 4's failure ends it."""
    failure = {"status": "failed", "error": {"code": "TOOL_FAILED", "message": "qemu-img failed", "retryable": True,
                                             "phase": "convert"}}

    async def go():
        m, runner, _, _ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 1}), owner=0)
        for attempt in (1, 2):
            await until(lambda: (job.id, attempt) in runner.started and job.state.value == "running")
            m.unit_finished(job.id, attempt, UnitOutcome(job.unit, "exit-code", 1, failure))
        assert job.state.value == "failed"
        m.retry(job.id)
        await until(lambda: (job.id, 3) in runner.started and job.state.value == "running")
        m.unit_finished(job.id, 3, UnitOutcome(job.unit, "exit-code", 1, failure))
        assert job.state.value == "retrying"
        await until(lambda: (job.id, 4) in runner.started and job.state.value == "running")
        m.unit_finished(job.id, 4, UnitOutcome(job.unit, "exit-code", 1, failure))
        assert job.state.value == "failed"
        await m.stop()
        m2, *_ = make(tmp_path)
        m2.load()
        assert m2.get(job.id).attempts_counted_before == 2      # kept by the store, for a restart
    asyncio.run(go())

def test_a_job_retried_by_hand_is_timed_from_its_new_start(tmp_path, image):
    """StartedAt to FinishedAt is what h2kctl says the job took and what the duration metric counts: a retry asked
    for after a failure starts it again, rather than counting the failed run and the time in between."""
    async def go():
        m, runner, *_ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await settle()
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "exit-code", 1, None, []))
        assert job.state.value == "failed" and job.started_at and job.finished_at
        failed_at = job.finished_at
        await asyncio.sleep(0.05)
        m.retry(job.id)
        assert job.started_at == 0 and job.finished_at == 0
        await until(lambda: len(runner.started) == 2)
        assert job.started_at > failed_at
        m.unit_finished(job.id, 2, UnitOutcome(job.unit, "success", 0, {"status": "completed", "outputs": {"x": 1}}))
        assert job.state.value == "completed" and job.finished_at >= job.started_at > failed_at
        await m.stop()
    asyncio.run(go())


def test_cancel_waits_for_the_unit(tmp_path, image):
    async def go():
        m, runner, *_ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await settle()
        await m.cancel(job.id)
        assert runner.stopped == [job.unit] and job.state.value == "running"
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "signal", 15, {"status": "cancelled"}, [], True))
        assert job.state.value == "cancelled"
        with pytest.raises(InvalidState):
            await m.cancel(job.id)
    asyncio.run(go())


def test_a_cancel_repeated_while_the_unit_stops_is_recorded_once(tmp_path, image):
    """Every Cancel of a stopping job added an event, kept in the store for good: a caller could grow it at will."""
    async def go():
        m, runner, *_ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await settle()
        for _ in range(50):
            await m.cancel(job.id, by=1000)
        await m.cancel(job.id, by=0)
        asked = [e for e in m.events(job.id) if "cancel requested" in e.data.get("message", "")]
        assert len(asked) == 1
        assert runner.stopped and set(runner.stopped) == {job.unit}     # each request still asks systemd
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "signal", 15, {"status": "cancelled"}, [], True))
        assert job.state.value == "cancelled" and job.cancelled_by == 1000
        await m.stop()
    asyncio.run(go())


@pytest.mark.parametrize("worker_result", [
    {"status": "failed", "error": {"code": "A_CODE_OF_A_LATER_VERSION", "message": "it broke", "phase": "convert"}},
    {"status": "failed", "error": {"code": None, "message": None, "phase": 3, "retryable": "no"}},
    {"status": "failed", "error": "not an object"},
    ["not", "an", "object"],
    "settling it raises",
])
def test_a_result_file_h2kd_does_not_understand_fails_the_job_and_frees_its_slot(tmp_path, image, worker_result):
    """The end of an attempt is recorded whatever its result file holds: the job does not stay running for
    ever, holding a slot the next job waits for (also if recording it fails in a way nobody foresaw)."""
    class RaisingOnRead(dict):
        def get(self, key, default=None):
            if key == "error":
                raise RuntimeError("unforeseen")
            return super().get(key, default)

    if worker_result == "settling it raises":
        worker_result = RaisingOnRead(status="failed")

    async def go():
        m, runner, *_ = make(tmp_path, max_parallel_jobs=1)
        await m.start()
        first, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 0}), owner=0)
        second, _ = m.submit(spec(image, tmp_path / "out/b.qcow2"), owner=0)
        await until(lambda: first.state.value == "running")
        assert second.state.value == "queued"
        m.unit_finished(first.id, 1, UnitOutcome(first.unit, "exit-code", 1, worker_result, ["the last line"]))
        assert first.state.value == "failed"
        assert first.error_code in ("INTERNAL", "UNIT_FAILED") and first.error_message.strip()
        await until(lambda: second.state.value == "running")
        await m.stop()
    asyncio.run(go())


def test_a_result_the_store_cannot_take_fails_the_job_in_memory_and_in_the_store_alike(tmp_path, image):
    """Text that is not Unicode (a lone surrogate) in a result, had it got past the runner: the job does not stay
    completed in memory and running in the store, holding its slot; it fails, the same in both."""
    async def go():
        m, runner, _, config = make(tmp_path, max_parallel_jobs=1)
        await m.start()
        first, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 0}), owner=0)
        second, _ = m.submit(spec(image, tmp_path / "out/b.qcow2"), owner=0)
        await until(lambda: first.state.value == "running")
        m.unit_finished(first.id, 1, UnitOutcome(first.unit, "success", 0,
                                                 {"status": "completed", "outputs": {}, "found": "Debian \udce9"}))
        assert first.state.value == "failed" and first.error_code == "INTERNAL"
        await until(lambda: second.state.value == "running")
        await m.stop()
        return first.id, config.store_path
    job_id, store_path = asyncio.run(go())
    with JobStore(store_path) as store:
        assert {j.id: j.state.value for j in store.load_jobs()}[job_id] == "failed"


def test_a_failure_message_of_the_builtin_worker_is_cut_like_an_external_workers(tmp_path, image):
    """A message can quote what the submitter wrote (an extent name of a crafted descriptor, ~1 MB): it is cut
    before the store, the history and the Error every client is sent get it."""
    async def go():
        m, *_ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 0}), owner=0)
        await until(lambda: job.state.value == "running")
        long = "extent " + "A" * 900_000
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "exit-code", 2, {
            "status": "failed", "error": {"code": "PERMISSION_DENIED", "message": long, "retryable": False}}))
        assert job.state.value == "failed" and job.error_code == "PERMISSION_DENIED"
        assert job.error_message == long[:manager_module.MAX_ERROR_MESSAGE]
        assert job.result["error"]["message"] == job.error_message
        assert max(len(entry["reason"]) for entry in m.history(job.id)) <= 2 * manager_module.MAX_ERROR_MESSAGE
        await m.stop()
    asyncio.run(go())


class MeasuredHost(RecordingRunner):
    """A runner whose host has `free` bytes in `root`, measured by refresh(); which waits for `answered`, if given,
    as for a file server that does not answer."""

    def __init__(self, root: Path, answered: threading.Event | None = None) -> None:
        super().__init__()
        self.root, self.answered, self.free = root, answered, 2**30

    def refresh(self):
        if self.answered is not None:
            self.answered.wait(10)
        return self.capabilities()

    def capabilities(self):
        return {"qemu_img": True, "free_bytes": {str(self.root): self.free}}


def test_a_job_waiting_for_free_space_starts_once_the_host_has_it(tmp_path, image, monkeypatch):
    """The builtin worker's free space is measured again now and then: a job that asks for more than there is
    waits, and starts by itself once space was freed (nobody called Refresh)."""
    monkeypatch.setattr(manager_module, "HOST_REFRESH_SECONDS", 0.1)

    async def go():
        runner = MeasuredHost(tmp_path / "out")
        m, *_ = make(tmp_path, runner=runner)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2",
                               capability_requirements={"min_free_bytes": 10 * 2**30}), owner=0)
        await asyncio.sleep(0.3)
        assert job.state.value == "queued" and "free space" in job.wait_reason
        runner.free = 20 * 2**30
        await until(lambda: job.state.value == "running")
        await m.stop()
    asyncio.run(go())


def test_refresh_detects_the_host_again_while_h2kd_goes_on_answering(tmp_path, image):
    """Worker.Refresh measures the output roots' free space: one on a file server that hangs holds that call
    only, not every other caller (nor the watchdog), and the worker's capabilities change once it is measured."""
    answered = threading.Event()

    async def go():
        runner = MeasuredHost(tmp_path / "out", answered)
        m, *_ = make(tmp_path, runner=runner)
        await m.start()
        runner.free = 5 * 2**30
        refreshing = asyncio.create_task(m.refresh_worker("builtin"))
        await asyncio.sleep(0.3)
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)     # answered meanwhile
        assert not refreshing.done() and m.get(job.id) is job
        answered.set()
        await asyncio.wait_for(refreshing, 10)
        assert m.get_worker("builtin").capabilities["free_bytes"] == {str(tmp_path / "out"): 5 * 2**30}
        with pytest.raises(InvalidState):
            await m.refresh_worker(m.register_worker("agent", {}, 1, 0, ":1.7").id)
        await m.stop()
    asyncio.run(go())


def test_a_job_stored_before_a_field_existed_is_still_the_same_job_when_resubmitted(tmp_path, image):
    """A spec stored by an older h2kd lacks fields added since (here parameters.sync); sending the same spec
    again after the upgrade finds that job instead of failing with AlreadyExists."""
    async def go():
        m, *_, config = make(tmp_path)
        await m.start()
        s = spec(image, tmp_path / "out/a.qcow2", job_id="vm-old")
        m.submit(s, owner=0)
        await m.stop()
        import json
        import sqlite3
        with sqlite3.connect(config.store_path) as db:
            (text,) = db.execute("SELECT spec FROM jobs WHERE id = 'vm-old'").fetchone()
            stored = json.loads(text)
            del stored["parameters"]["sync"]
            db.execute("UPDATE jobs SET spec = ? WHERE id = 'vm-old'", (json.dumps(stored),))
        m2, *_ = make(tmp_path)
        await m2.start()
        again, created = m2.submit(s, owner=0)
        assert again.id == "vm-old" and not created
        with pytest.raises(AlreadyExists):
            m2.submit({**s, "parameters": {"sync": False}}, owner=0)
        await m2.stop()
    asyncio.run(go())


def test_restart_requeues_in_order_and_reattaches(tmp_path, image):
    async def go():
        m, runner, _, config = make(tmp_path, max_parallel_jobs=1)
        await m.start()
        running, _ = m.submit(spec(image, tmp_path / "out/r.qcow2"), owner=0)
        await settle()
        ids = [m.submit(spec(image, tmp_path / f"out/{i}.qcow2", execution_policy={"priority": p}), owner=0)[0].id
               for i, p in enumerate([5, 1, 5])]
        await m.stop()
        m2, runner2, *_ = make(tmp_path, max_parallel_jobs=1)
        await m2.start()
        assert runner2.reattached == [running.id]
        assert runner2.started == []  # the running one is followed again, not started twice
        done = {"status": "completed"}
        m2.unit_finished(running.id, 1, UnitOutcome(running.unit, "success", 0, done))
        for expected in (ids[1], ids[0], ids[2]):
            await settle()
            assert runner2.started[-1] == (expected, 1)
            m2.unit_finished(expected, 1, UnitOutcome(m2.get(expected).unit, "success", 0, done))
        assert all(m2.get(i).state.value == "completed" for i in ids)
    asyncio.run(go())



def test_a_running_jobs_progress_survives_a_restart(tmp_path, image):
    """h2kd restarted (or killed) while a job runs shows it where it was, to the percent, not back at 0 (nor at the
    last 5% step of its events) until its unit reports again: progress never goes backwards for those who watch it
    by more than that, and only for the moment until the unit's status is read again."""
    from h2kd.worker.report import ProgressReport, format_status
    MiB = 1024 * 1024

    async def go():
        m, *_ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await settle()
        assert job.state.value == "running"
        for done in (10, 40, 61, 64.5):
            m.unit_status(job.id, 1, format_status(ProgressReport("convert", done / 100, int(done * MiB), 100 * MiB,
                                                                  "")))
        assert job.progress == pytest.approx(0.645)
        await asyncio.sleep(manager_module.PROGRESS_COMMIT_SECONDS + 0.5)    # the deferred writes reach the disk
        await m.stop()
        m2, *_ = make(tmp_path)
        await m2.start()
        again = m2.get(job.id)
        assert again.state.value == "progressing"
        assert again.progress >= 0.64 and again.progress_known
        assert again.bytes_done >= 64 * MiB and again.bytes_total == 100 * MiB and again.phase == "convert"
        await m2.stop()
    asyncio.run(go())

class StartNeverReturns(RecordingRunner):
    async def start(self, job, attempt):
        self.started.append((job.id, attempt))
        await asyncio.Event().wait()


async def left_assigned(tmp_path: Path, image: Path):
    """A job h2kd assigned and asked systemd to start, stopped before the start call returned."""
    m, *_ = make(tmp_path, runner=StartNeverReturns())
    await m.start()
    job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
    await settle()
    assert job.state.value == "assigned"
    await m.stop()
    return job


def test_a_unit_h2kd_was_starting_when_it_stopped_and_that_never_ran_costs_no_attempt(tmp_path, image):
    """Killed between writing the attempt's files and systemd starting the unit: back, h2kd finds no unit and
    no result. The job goes back to the queue and runs, instead of failing for a run that never was."""
    async def go():
        job = await left_assigned(tmp_path, image)
        m2, runner2, *_ = make(tmp_path)
        await m2.start()
        m2.unit_finished(job.id, 1, UnitOutcome(f"h2k-job-{job.id}-1.service", "unknown", 0, None))
        await settle()
        again = m2.get(job.id)
        assert runner2.started == [(job.id, 2)] and again.state.value == "running"
        entered = [e.data["new_state"] for e in m2.events(job.id) if e.kind == "state"]
        assert entered[3:] == ["assigned", "queued", "assigned", "running"]
        await m2.stop()
    asyncio.run(go())


@pytest.mark.parametrize("reports_progress", [False, True])
def test_a_unit_that_ran_while_h2kd_was_away_completes_its_assigned_job(tmp_path, image, reports_progress):
    """h2kd was killed after starting the unit but before recording the job running. Back, it hears from the
    unit: its progress (it still runs) or its end (it ran to completion meanwhile). The job goes on from
    there, running once and completed once, instead of staying assigned with its progress ignored."""
    async def go():
        job = await left_assigned(tmp_path, image)
        m2, runner2, *_ = make(tmp_path)
        await m2.start()
        assert runner2.reattached == [job.id]
        unit = f"h2k-job-{job.id}-1.service"
        if reports_progress:
            m2.unit_status(job.id, 1, "convert: 50.00% (50/100 bytes)")
            assert m2.get(job.id).state.value == "progressing" and m2.get(job.id).progress == 0.5
        m2.unit_finished(job.id, 1, UnitOutcome(unit, "success", 0, {"status": "completed"}))
        again = m2.get(job.id)
        assert again.state.value == "completed" and again.unit == unit
        entered = [e.data["new_state"] for e in m2.events(job.id) if e.kind == "state"]
        assert entered[3:] == ["assigned", "running"] + ["progressing"] * reports_progress + ["completed"]
        await m2.stop()
    asyncio.run(go())


@pytest.mark.parametrize("ending", ["completed", "failed", "progress"])
def test_a_unit_that_ran_while_h2kd_was_away_keeps_its_own_times(tmp_path, image, ending):
    """The unit of a job h2kd had recorded only as assigned ran while h2kd was away: StartedAt is when systemd
    says its worker started (not 0, not when h2kd came back), and FinishedAt when it ended."""
    async def go():
        job = await left_assigned(tmp_path, image)
        started, ended = job.created_at + 40_000, job.created_at + 90_000
        await asyncio.sleep(0.2)    # h2kd is back well after both
        m2, *_ = make(tmp_path)
        await m2.start()
        unit = f"h2k-job-{job.id}-1.service"
        if ending == "progress":
            m2.unit_status(job.id, 1, "convert: 50.00% (50/100 bytes)", started)
            assert m2.get(job.id).state.value == "progressing"
            assert m2.get(job.id).started_at == started
        else:
            worker_result = ({"status": "completed"} if ending == "completed" else
                             {"status": "failed", "error": {"code": "TOOL_FAILED", "message": "bad", "retryable": False}})
            m2.unit_finished(job.id, 1, UnitOutcome(unit, "success" if ending == "completed" else "exit-code",
                                                    0 if ending == "completed" else 1, worker_result,
                                                    ended_at=ended, started_at=started))
            again = m2.get(job.id)
            assert again.state.value == ending
            assert (again.started_at, again.finished_at) == (started, ended)
            entered = [e.data["new_state"] for e in m2.events(job.id) if e.kind == "state"]
            assert entered[3:] == ["assigned", "running", ending]
        await m2.stop()
    asyncio.run(go())


def test_a_lost_worker_costs_an_attempt(tmp_path, image):
    """A stale external worker's job goes back to the queue while it has retries, then fails WORKER_LOST."""
    async def go():
        m, *_ = make(tmp_path, heartbeat_timeout_seconds=0.05)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 1},
                               capability_requirements={"gpu": True}), owner=0)
        for attempt, expected in ((1, "queued"), (2, "failed")):
            worker = m.register_worker(f"w{attempt}", {"gpu": True}, 1, 0, f":1.{attempt}")
            assert m.claim(worker.id) is job and job.attempt == attempt
            await until(lambda: worker.state == "stale")   # no heartbeat
            await until(lambda: job.state.value == expected)
        assert job.error_code == "WORKER_LOST"
        await m.stop()
    asyncio.run(go())


def test_an_external_worker_that_beats_but_never_finishes_fails_its_attempt_at_the_jobs_timeout(tmp_path, image,
                                                                                              monkeypatch):
    """timeout_seconds holds for a job another host runs too: a worker that keeps beating but hangs does not
    hold the job, and its owner's turn, for ever. Its attempt fails with TIMEOUT at the job's timeout (taken
    here from the timer h2kd arms: a real one is at least 60 s) and is retried; its late report is refused."""
    timers: list[tuple[float, Callable[[], None]]] = []

    async def go():
        m, *_ = make(tmp_path, heartbeat_timeout_seconds=30)
        real_arm = m._arm_deadline
        monkeypatch.setattr(m, "_arm_deadline", lambda job_id, seconds, callback: (
            timers.append((seconds, callback)), real_arm(job_id, seconds, callback)))
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", capability_requirements={"gpu": True},
                               execution_policy={"retry_count": 1, "timeout_seconds": 600}), owner=0)
        worker = m.register_worker("hangs", {"gpu": True}, 1, 0, ":1.9")
        assert m.claim(worker.id) is job
        m.report_progress(worker.id, job.id, 0.5, 500, 1000, "convert", "")
        (timeout, expire), = [t for t in timers if t[0] == 600]
        m.heartbeat(worker.id)
        expire()
        assert job.state.value == "retrying" and job.error_code == "TIMEOUT", (job.state, job.error_code)
        assert f"worker {worker.id} did not finish the job within its timeout of 600 s" in job.error_message
        assert worker.active_jobs == 1          # it may still be running it: until it hears, its slot is taken
        with pytest.raises(InvalidState):
            m.report_result(worker.id, job.id, True, {}, "", "", 0, 0)
        assert worker.active_jobs == 0
        await m.stop()
    asyncio.run(go())


def test_a_job_cancelled_on_an_external_worker_keeps_its_slot_until_the_worker_is_told(tmp_path, image, monkeypatch):
    """An agent learns of a cancel by its next report on the job (or from the job's State): until then it may still
    be converting, so it cannot claim past its max_jobs. The slot is free once it reports, once the heartbeat
    timeout has passed without a report, or once the worker is lost; a cancel the store refuses keeps it held once."""
    async def go():
        (tmp_path / "state").mkdir()
        store = JobStore(tmp_path / "state" / "jobs.db")
        m, *_ = make(tmp_path, store=store, heartbeat_timeout_seconds=1.5)
        await m.start()
        needs = {"capability_requirements": {"gpu": True}}
        jobs = [m.submit(spec(image, tmp_path / f"out/{n}.qcow2", **needs), owner=0)[0] for n in range(4)]
        worker = m.register_worker("agent", {"gpu": True}, 1, 0, ":1.5")
        assert m.claim(worker.id) is jobs[0]

        def refused(*args, **kwargs):
            raise StoreFailed("database or disk is full")
        with monkeypatch.context() as full:
            full.setattr(store, "record_transition", refused)
            with pytest.raises(StoreFailed):
                await m.cancel(jobs[0].id, by=0)
        assert jobs[0].state.value == "assigned" and worker.active_jobs == 1

        await m.cancel(jobs[0].id, by=0)
        assert jobs[0].state.value == "cancelled" and worker.active_jobs == 1
        assert m.claim(worker.id) is None and jobs[1].state.value == "queued"
        with pytest.raises(InvalidState):
            m.report_progress(worker.id, jobs[0].id, 0.5, 1, 2, "convert", "")
        assert worker.active_jobs == 0
        assert m.claim(worker.id) is jobs[1]

        # An agent that stopped on seeing the State, and says nothing: the slot comes back after the heartbeat
        # timeout, while the worker beats on.
        await m.cancel(jobs[1].id, by=0)
        assert worker.active_jobs == 1 and m.claim(worker.id) is None

        async def beat() -> None:
            while True:
                m.heartbeat(worker.id)
                await asyncio.sleep(0.2)
        beating = asyncio.create_task(beat())
        await until(lambda: worker.active_jobs == 0, timeout=5)
        beating.cancel()
        assert worker.state == "idle"
        assert m.claim(worker.id) is jobs[2]

        # A worker lost (unregistered) frees what it held.
        await m.cancel(jobs[2].id, by=0)
        assert worker.active_jobs == 1
        m.unregister_worker(worker.id)
        assert worker.active_jobs == 0
        await m.stop()
    asyncio.run(go())


def test_a_job_taken_from_an_external_worker_is_not_run_elsewhere_until_that_worker_is_told(tmp_path, image):
    """The agent a job was cancelled on (or timed out on) may still be converting, into the job's output, until
    it learns so: a Retry at once, or the timed-out attempt's backoff, leaves the job retrying, unclaimable by
    any worker, until that agent has reported (or the heartbeat timeout has passed), and says why."""
    async def go():
        m, *_ = make(tmp_path, heartbeat_timeout_seconds=1.5)
        await m.start()
        needs = {"capability_requirements": {"gpu": True}}
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 1}, **needs),
                          owner=0)
        first = m.register_worker("first", {"gpu": True}, 1, 0, ":1.5")
        other = m.register_worker("other", {"gpu": True}, 1, 0, ":1.6")
        assert m.claim(first.id) is job

        # Retried at once; held until the first agent's next report on it, then queued at once.
        await m.cancel(job.id, by=0)
        m.retry(job.id, by=0)
        assert job.state.value == "retrying", job.state
        assert job.wait_reason.startswith(f"worker {first.id} may still be running an attempt taken from it")
        assert m.claim(other.id) is None
        with pytest.raises(InvalidState):
            m.report_progress(first.id, job.id, 0.5, 1, 2, "convert", "")
        assert job.state.value == "queued", (job.state, job.wait_reason)
        assert m.claim(other.id) is job

        # Told before the retry (its report refused): nothing to wait for.
        await m.cancel(job.id, by=0)
        with pytest.raises(InvalidState):
            m.report_progress(other.id, job.id, 0.5, 1, 2, "convert", "")
        m.retry(job.id, by=0)
        assert job.state.value == "queued", (job.state, job.wait_reason)
        assert m.claim(first.id) is job

        # An agent that says nothing, and beats on: held until the heartbeat timeout, not for ever.
        async def beat() -> None:
            while True:
                m.heartbeat(first.id)
                m.heartbeat(other.id)
                await asyncio.sleep(0.2)
        beating = asyncio.create_task(beat())
        await m.cancel(job.id, by=0)
        m.retry(job.id, by=0)
        held_at = asyncio.get_running_loop().time()
        assert m.claim(first.id) is None and job.state.value == "retrying"
        await until(lambda: job.state.value == "queued")
        assert asyncio.get_running_loop().time() - held_at >= 1.0
        assert m.claim(first.id) is job

        # Timed out: its backoff (0.01 s) is over long before the agent can be told.
        m._deadlines[job.id]._run()
        assert job.state.value == "retrying" and job.error_code == "TIMEOUT", job.state
        await asyncio.sleep(0.3)
        assert job.state.value == "retrying" and m.claim(other.id) is None
        with pytest.raises(InvalidState):
            m.report_result(first.id, job.id, True, {}, "", "", 0, 0)
        assert m.claim(other.id) is job and job.attempt == 5
        beating.cancel()
        await m.stop()
    asyncio.run(go())


def claimed_by_an_agent(m: JobManager, tmp_path: Path, image: Path) -> tuple[Job, WorkerInfo]:
    """A job only an external worker ("agent", offering a gpu) can run, submitted and claimed by one: (job, worker)."""
    job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", capability_requirements={"gpu": True}), owner=0)
    worker = m.register_worker("agent", {"gpu": True}, 1, 0, ":1.5")
    assert m.claim(worker.id) is job
    return job, worker


def test_speed_and_end_follow_the_work_when_the_wall_clock_is_stepped_back(tmp_path, image, monkeypatch):
    """NTP or `date -s` may step the clock back an hour while a job converts: its Rate is measured on a clock that
    does not step, and its ExpectedEndTime is the stepped clock's now plus what is left at that rate."""
    async def go():
        m, *_ = make(tmp_path)
        await m.start()
        job, worker = claimed_by_an_agent(m, tmp_path, image)
        m.report_progress(worker.id, job.id, 0.1, 100 * 2**20, 1000 * 2**20, "convert", "")
        await asyncio.sleep(0.5)
        hour_ago = manager_module.now_usec() - 3600 * 10**6
        monkeypatch.setattr(manager_module, "now_usec", lambda: hour_ago)
        m.report_progress(worker.id, job.id, 0.2, 200 * 2**20, 1000 * 2**20, "convert", "")
        assert 10 * 2**20 < job.rate <= 200 * 2**20, job.rate      # 100 MiB in 0.5 s or a little more
        left = 800 * 2**20 / job.rate
        assert job.expected_end == pytest.approx(hour_ago + left * 10**6, abs=10**5)
        await m.stop()
    asyncio.run(go())


def test_a_job_taken_from_an_external_worker_still_waits_for_it_after_a_restart(tmp_path, image):
    """h2kd restarted (an upgrade) just after a cancel or a timeout on an external worker forgets the worker, not
    that it may still be converting into the job's output: retried, or past its backoff, the job waits out the
    heartbeat timeout before another worker may claim it."""
    async def go():
        m, *_ = make(tmp_path, heartbeat_timeout_seconds=1.5)
        await m.start()
        needs = {"capability_requirements": {"gpu": True}}
        cancelled, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", **needs), owner=0)
        timed_out, _ = m.submit(spec(image, tmp_path / "out/b.qcow2", execution_policy={"retry_count": 1},
                                     **needs), owner=0)
        first = m.register_worker("first", {"gpu": True}, 2, 0, ":1.5")
        assert {m.claim(first.id).id, m.claim(first.id).id} == {cancelled.id, timed_out.id}
        await m.cancel(cancelled.id, by=0)
        m._deadlines[timed_out.id]._run()
        assert timed_out.state.value == "retrying"
        await m.stop()

        m, *_ = make(tmp_path, heartbeat_timeout_seconds=1.5)
        await m.start()
        restarted_at = asyncio.get_running_loop().time()
        other = m.register_worker("other", {"gpu": True}, 2, 0, ":1.6")
        m.retry(cancelled.id, by=0)
        again = m.get(cancelled.id)
        assert again.state.value == "retrying", again.state
        assert again.wait_reason.startswith("worker w1 may still be running an attempt taken from it"), again
        assert m.claim(other.id) is None and m.get(timed_out.id).state.value == "retrying"
        # Cancelled while it waits, and retried: it waits all the same.
        for job_id in (cancelled.id, timed_out.id):
            await m.cancel(job_id, by=0)
            m.retry(job_id, by=0)
            assert m.get(job_id).state.value == "retrying", m.get(job_id)
        assert m.claim(other.id) is None

        async def beat() -> None:
            while True:
                m.heartbeat(other.id)
                await asyncio.sleep(0.2)
        beating = asyncio.create_task(beat())
        await until(lambda: m.get(cancelled.id).state.value == "queued" and m.get(timed_out.id).state.value
                    == "queued")
        assert asyncio.get_running_loop().time() - restarted_at >= 0.5
        assert {m.claim(other.id).id, m.claim(other.id).id} == {cancelled.id, timed_out.id}
        beating.cancel()
        await m.stop()
    asyncio.run(go())


def test_the_slot_a_removed_job_kept_on_its_worker_is_freed_by_the_workers_report(tmp_path, image):
    """A job cancelled on an external worker, removed and submitted again under its id, cancelled once more: each
    keeps its own slot until the worker reports on the id (which fails, NoSuchJob or InvalidState), and neither
    one's timer frees the other's."""
    async def go():
        m, *_ = make(tmp_path, heartbeat_timeout_seconds=30)
        await m.start()
        needs = {"capability_requirements": {"gpu": True}}
        worker = m.register_worker("agent", {"gpu": True}, 2, 0, ":1.5")
        first, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", job_id="same", **needs), owner=0)
        assert m.claim(worker.id) is first
        await m.cancel(first.id, by=0)
        m.remove(first.id)
        with pytest.raises(NoSuchJob):
            m.report_progress(worker.id, "same", 0.5, 1, 2, "convert", "")
        assert worker.active_jobs == 0

        again, _ = m.submit(spec(image, tmp_path / "out/b.qcow2", job_id="same", **needs), owner=0)
        assert m.claim(worker.id) is again
        await m.cancel(again.id, by=0)
        m.remove(again.id)
        third, _ = m.submit(spec(image, tmp_path / "out/c.qcow2", job_id="same", **needs), owner=0)
        assert m.claim(worker.id) is third
        await m.cancel(third.id, by=0)
        assert worker.active_jobs == 2 and m.claim(worker.id) is None
        with pytest.raises(InvalidState):
            m.report_result(worker.id, "same", True, {}, "", "", 0, 0)
        assert worker.active_jobs == 0
        await m.stop()
    asyncio.run(go())


def test_an_external_attempt_that_times_out_while_the_store_is_full_fails_once_it_is_not(tmp_path, image,
                                                                                       monkeypatch):
    """The store refused the TIMEOUT (its disk full): the job is not left running on the hung worker for
    good; the deadline comes again and the attempt fails then. A job that ends cancels its deadline."""
    timers: list[tuple[float, Callable[[], None]]] = []

    async def go():
        (tmp_path / "state").mkdir()
        store = JobStore(tmp_path / "state" / "jobs.db")
        m, *_ = make(tmp_path, store=store, heartbeat_timeout_seconds=30)
        real_arm = m._arm_deadline
        monkeypatch.setattr(m, "_arm_deadline", lambda job_id, seconds, callback: (
            timers.append((seconds, callback)), real_arm(job_id, seconds, callback)))
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", capability_requirements={"gpu": True},
                               execution_policy={"timeout_seconds": 600}), owner=0)
        worker = m.register_worker("hangs", {"gpu": True}, 1, 0, ":1.9")
        assert m.claim(worker.id) is job
        (_, expire), = timers
        def refused(*args, **kwargs):
            raise StoreFailed("database or disk is full")
        with monkeypatch.context() as full:
            full.setattr(store, "record_transition", refused)
            expire()
        assert job.state.value == "assigned" and worker.active_jobs == 1
        (seconds, again), = timers[1:]
        assert seconds == manager_module.STORE_RETRY_SECONDS
        again()
        assert job.state.value == "failed" and job.error_code == "TIMEOUT", (job.state, job.error_code)
        assert job.id not in m._deadlines
        with pytest.raises(InvalidState):
            m.report_progress(worker.id, job.id, 0.5, 500, 1000, "convert", "")
        assert worker.active_jobs == 0

        other, _ = m.submit(spec(image, tmp_path / "out/b.qcow2", capability_requirements={"gpu": True},
                                 execution_policy={"timeout_seconds": 600}), owner=0)
        assert m.claim(worker.id) is other and other.id in m._deadlines
        m.report_result(worker.id, other.id, True, {}, "", "", 0, 0)
        assert other.id not in m._deadlines     # its timer is gone with the attempt
        await m.stop()
    asyncio.run(go())


def test_a_clock_step_makes_no_external_worker_stale(tmp_path, image, monkeypatch):
    """NTP stepping the clock forward (or a VM resumed) is no missed heartbeat: the worker keeps its job.
    A worker that really stops beating still goes stale."""
    async def go():
        m, *_ = make(tmp_path, heartbeat_timeout_seconds=0.3)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", capability_requirements={"gpu": True}), owner=0)
        worker = m.register_worker("agent", {"gpu": True}, 1, 0, ":1.4")
        assert m.claim(worker.id) is job
        hour_later = now_usec() + 3600 * 1_000_000
        monkeypatch.setattr(manager_module, "now_usec", lambda: hour_later)
        m.heartbeat(worker.id)
        m._check_heartbeats()
        assert worker.state == "busy" and job.state.value == "assigned"
        assert worker.last_heartbeat == hour_later      # shown as the clock says
        await until(lambda: worker.state == "stale")    # no heartbeat for 0.3 s
        await until(lambda: job.state.value == "failed")
        assert job.error_code == "WORKER_LOST"
        await m.stop()
    asyncio.run(go())


def test_a_report_of_an_attempt_that_is_over_changes_nothing(tmp_path, image):
    """A worker went stale, came back and claimed its job again: its run of the earlier attempt, still going,
    reports progress and success. Naming that attempt, the reports are refused; the new attempt's count."""
    async def go():
        m, *_ = make(tmp_path, heartbeat_timeout_seconds=0.05)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 2},
                               capability_requirements={"gpu": True}), owner=0)
        worker = m.register_worker("agent", {"gpu": True}, 1, 0, ":1.3")
        assert m.claim(worker.id) is job and job.attempt == 1
        await until(lambda: job.state.value == "queued")     # no heartbeat: the attempt was lost
        m.heartbeat(worker.id)
        assert m.claim(worker.id) is job and job.attempt == 2
        with pytest.raises(InvalidState, match=rf"attempt 1 of job {job.id} is over; it is on attempt 2"):
            m.report_progress(worker.id, job.id, 0.9, 900, 1000, "convert", "", attempt=1)
        with pytest.raises(InvalidState, match="attempt 1 .* is over"):
            m.report_result(worker.id, job.id, True, {}, "", "", 0, 0, attempt=1)
        assert job.state.value == "assigned" and job.progress == 0
        m.report_progress(worker.id, job.id, 0.5, 500, 1000, "convert", "", attempt=2)
        assert job.state.value == "progressing" and job.progress == 0.5
        m.report_result(worker.id, job.id, True, {"disks": 1}, "", "", 1000, 1000, attempt=2)
        assert job.state.value == "completed" and job.attempt == 2
        await m.stop()
    asyncio.run(go())


def test_an_external_workers_job_does_not_fail_because_h2kd_restarted(tmp_path, image):
    """h2kd restarted under a job an external worker was running: the job is queued again without that attempt
    counting against its retries (none here), and a worker claims and completes it. Not at once: the agent that
    had it may still be converting until its next call tells it (NoSuchWorker), a heartbeat timeout at most."""
    async def go():
        (tmp_path / "state").mkdir()
        store = JobStore(tmp_path / "state" / "h2kd.sqlite")
        m, *_ = make(tmp_path, store=store)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", capability_requirements={"gpu": True}), owner=0)
        worker = m.register_worker("agent", {"gpu": True}, 1, 0, ":1.4")
        assert m.claim(worker.id) is job
        m.report_progress(worker.id, job.id, 0.4, 400, 1000, "convert", "")
        await m.stop()
        store.close()
        m2, *_ = make(tmp_path, heartbeat_timeout_seconds=0.5)
        await m2.start()
        again = m2.get(job.id)
        assert again.state.value == "retrying" and again.error_code == "WORKER_LOST", (again.state, again.error_code)
        assert "may still be running the job" in again.wait_reason
        worker2 = m2.register_worker("agent", {"gpu": True}, 1, 0, ":1.5")
        assert m2.claim(worker2.id) is None
        await until(lambda: again.state.value == "queued", timeout=5)
        assert m2.claim(worker2.id) is again and again.attempt == 2
        m2.report_result(worker2.id, job.id, True, {}, "", "", 0, 0, attempt=2)
        assert again.state.value == "completed" and again.error_code == "", (again.state, again.error_code)
        await m2.stop()
    asyncio.run(go())


def test_a_row_that_cannot_be_read_degrades_health_without_failing_the_watchdog(tmp_path, image):
    """The watchdog has h2kd restarted when store_ok fails; the row would be there again after every restart."""
    from h2kd.observability.health import Watchdog

    async def go():
        (tmp_path / "state").mkdir()
        store = JobStore(tmp_path / "state" / "h2kd.sqlite")
        m, *_ = make(tmp_path, store=store)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0, queue=False)
        await m.stop()
        store.close()
        with contextlib.closing(sqlite3.connect(tmp_path / "state" / "h2kd.sqlite")) as db, db:
            db.execute("UPDATE jobs SET state = 'frozen-by-a-later-h2kd' WHERE id = ?", (job.id,))
        m2, runner, *_ = make(tmp_path)
        await m2.start()
        health = m2.health()
        assert (health["status"], health["jobs_unreadable"], health["store_ok"]) == ("degraded", 1, True), health
        assert Watchdog(m2.health).problem() is None
        assert runner.kept_unreadable == [job.id]
        await m2.stop()
    asyncio.run(go())


def test_the_wait_for_an_external_workers_job_outlasts_a_second_restart(tmp_path, image):
    """Re-armed at the next start, the wait was cut to the longest retry backoff, shorter here than the heartbeat
    timeout: the job could run again while the agent that had it still converted."""
    async def go():
        (tmp_path / "state").mkdir()
        settings = {"heartbeat_timeout_seconds": 1.5, "retry_backoff_max_seconds": 0.05}
        store = JobStore(tmp_path / "state" / "h2kd.sqlite")
        m, *_ = make(tmp_path, store=store, **settings)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", capability_requirements={"gpu": True}), owner=0)
        assert m.claim(m.register_worker("agent", {"gpu": True}, 1, 0, ":1.4").id) is job
        for _ in range(2):
            await m.stop()
            store.close()
            store = JobStore(tmp_path / "state" / "h2kd.sqlite")
            m, *_ = make(tmp_path, store=store, **settings)
            await m.start()
            assert m.get(job.id).state.value == "retrying"
        await asyncio.sleep(0.5)
        assert m.get(job.id).state.value == "retrying"
        await until(lambda: m.get(job.id).state.value == "queued", timeout=5)
        await m.stop()
        store.close()
    asyncio.run(go())


def test_worker_ids_are_not_given_again_after_a_restart(tmp_path):
    """An agent registered before h2kd restarted keeps its old id in mind: an agent registering after the
    restart gets a new one, so that no report, log line or object path can mix the two up."""
    async def go():
        (tmp_path / "state").mkdir()
        store = JobStore(tmp_path / "state" / "h2kd.sqlite")
        m, *_ = make(tmp_path, store=store)
        await m.start()
        before = [m.register_worker("agent", {}, 1, 0, f":1.{n}").id for n in (1, 2)]
        await m.stop()
        store.close()
        m2, *_ = make(tmp_path)
        await m2.start()
        after = m2.register_worker("agent", {}, 1, 0, ":1.3").id
        assert len(set(before)) == 2 and after not in before, (before, after)
        await m2.stop()
    asyncio.run(go())


def test_a_unit_that_ends_while_h2kd_stops_starts_no_other_job(tmp_path, image):
    """h2kd stops its manager, then its runner, which still reports a unit that ended meanwhile: the job it ran
    is completed, and the queued job waits for the next start instead of starting as h2kd goes away."""
    async def go():
        m, runner, *_ = make(tmp_path, max_parallel_jobs=1)
        await m.start()
        first, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await settle()
        second, _ = m.submit(spec(image, tmp_path / "out/b.qcow2"), owner=0)
        await settle()
        assert runner.started == [(first.id, 1)]
        await m.stop()
        m.unit_finished(first.id, 1, UnitOutcome(first.unit, "success", 0, {"status": "completed"}))
        await settle()
        assert first.state.value == "completed"
        assert runner.started == [(first.id, 1)] and second.state.value == "queued"
    asyncio.run(go())


class RoundTripRunner(RecordingRunner):
    """As systemd answers the real runner: a stop takes a bus round trip, and a unit that ended while h2kd was
    away is reported ended by a check that runs after its reattach returned."""

    def __init__(self, ended: set[str]):
        super().__init__()
        self.ended = ended
        self.manager: JobManager | None = None

    async def reattach(self, job):
        unit = await super().reattach(job)
        if job.id in self.ended:
            asyncio.get_running_loop().call_later(0.01, self.manager.unit_finished, job.id, job.attempt,
                                                  UnitOutcome(unit, "success", 0, {"status": "completed"}))
        return unit

    async def stop(self, unit):
        await asyncio.sleep(0.05)
        await super().stop(unit)


def test_the_first_job_started_after_a_restart_is_the_most_urgent_of_all(tmp_path, image):
    """Back after a restart, h2kd stops a unit whose cancel it had stored (a round trip) while another unit is found
    to have ended meanwhile: the slot that frees goes to the most urgent queued job, not to the most urgent of
    those taken up again so far."""
    async def go():
        (tmp_path / "state").mkdir()
        store = JobStore(tmp_path / "state" / "h2kd.sqlite")
        m, *_ = make(tmp_path, store=store, max_parallel_jobs=2)
        await m.start()
        ends, _ = m.submit(spec(image, tmp_path / "out/ends.qcow2"), owner=0)
        usual, _ = m.submit(spec(image, tmp_path / "out/usual.qcow2"), owner=0, queue=False)
        cancelled, _ = m.submit(spec(image, tmp_path / "out/cancelled.qcow2"), owner=0)
        await settle()
        m.start_job(usual.id)
        urgent, _ = m.submit(spec(image, tmp_path / "out/urgent.qcow2", execution_policy={"priority": 1}), owner=0)
        await m.cancel(cancelled.id)    # stored; h2kd stops before the unit has
        assert cancelled.cancel_requested and usual.state.value == urgent.state.value == "queued"
        await m.stop()
        store.close()
        runner = RoundTripRunner(ended={ends.id})
        m2, *_ = make(tmp_path, runner=runner, max_parallel_jobs=2)
        runner.manager = m2
        await m2.start()
        await until(lambda: runner.started)
        assert runner.started[0] == (urgent.id, 1), (runner.started, urgent.id, usual.id)
        await m2.stop()
    asyncio.run(go())


def _unchecked(tmp_path: Path, **overrides) -> tuple[JobManager, Config]:
    """A manager without host checks: the jobs of made-up uids pass them (the limits come before the checks)."""
    m, _, _, config = make(tmp_path, checked=False, **overrides)
    return m, config


def test_one_user_holds_at_most_max_jobs_per_user_unfinished_jobs(tmp_path, image):
    """Jobs held with queue=false never end on their own: without a limit, one member of the submitting group
    could fill a root daemon's memory. Root, other users, and the user once a job of theirs ended, go on."""
    async def go():
        m, _ = _unchecked(tmp_path, max_jobs_per_user=3)
        await m.start()
        held = [m.submit(spec(image, tmp_path / f"out/{n}.qcow2"), owner=1000, queue=False)[0] for n in range(3)]
        with pytest.raises(QueueFull, match=r"uid 1000 already has 3 unfinished jobs.*max_jobs_per_user"):
            m.submit(spec(image, tmp_path / "out/4.qcow2", job_id="one-too-many"), owner=1000, queue=False)
        assert "one-too-many" not in {job.id for job in m.jobs}
        m.submit(spec(image, tmp_path / "out/other.qcow2"), owner=1001, queue=False)
        for n in range(4):
            m.submit(spec(image, tmp_path / f"out/root{n}.qcow2"), owner=0, queue=False)
        await m.cancel(held[0].id)
        m.submit(spec(image, tmp_path / "out/5.qcow2"), owner=1000, queue=False)   # one ended: room for one
        with pytest.raises(QueueFull):   # a retry makes a job unfinished again: it counts as a new one
            m.retry(held[0].id)
        assert held[0].state.value == "cancelled"
        await m.stop()

        again, _ = _unchecked(tmp_path, max_jobs_per_user=3)   # the counts survive a restart
        await again.start()
        with pytest.raises(QueueFull, match="uid 1000"):
            again.submit(spec(image, tmp_path / "out/6.qcow2"), owner=1000, queue=False)
        await again.cancel(held[1].id)
        again.submit(spec(image, tmp_path / "out/6.qcow2"), owner=1000, queue=False)
        await again.stop()
    asyncio.run(go())


def test_held_jobs_count_against_the_limit_of_all_unfinished_jobs(tmp_path, image):
    async def go():
        m, _ = _unchecked(tmp_path, max_queued_jobs=3)
        await m.start()
        m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0, queue=False)
        m.submit(spec(image, tmp_path / "out/b.qcow2"), owner=1000, queue=False)
        m.submit(spec(image, tmp_path / "out/c.qcow2"), owner=0)
        with pytest.raises(QueueFull, match="3 unfinished jobs, its limit"):
            m.submit(spec(image, tmp_path / "out/d.qcow2"), owner=0)
        assert len(m.jobs) == 3
        await m.stop()
    asyncio.run(go())


def test_a_clock_far_ahead_at_start_does_not_prune_every_finished_job(tmp_path, image, monkeypatch):
    """A machine booting with its clock a year ahead (a flat RTC battery, before NTP sets it): h2kd starting then
    keeps its finished jobs; the hourly pass prunes by age, on the clock as it is by then."""
    async def go():
        m, *_ = make(tmp_path, retention_max_age_days=30)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await m.cancel(job.id, by=0)
        await m.stop()
        year_ahead = now_usec() + 365 * 86400 * 10**6
        monkeypatch.setattr(manager_module, "now_usec", lambda: year_ahead)
        m, *_ = make(tmp_path, retention_max_age_days=30)
        await m.start()
        assert m.get(job.id).state.value == "cancelled"
        assert m.prune() == [job.id]        # an hour later, the clock still a year ahead: old it is
        await m.stop()
    asyncio.run(go())


def test_a_flood_of_failing_submissions_is_pruned_without_waiting_for_the_hourly_pass(tmp_path, monkeypatch):
    """Submissions that fail their checks end at once, so no limit on unfinished jobs stops them; once the
    finished jobs pass the retention count by the slack, the oldest of whoever has the most go at once."""
    monkeypatch.setattr(manager_module, "PRUNE_SLACK_JOBS", 3)
    async def go():
        m, _, _, config = make(tmp_path, retention_max_count=5)
        await m.start()
        mine = [m.submit(spec(tmp_path / "missing.vmdk", tmp_path / "out/a.qcow2"), owner=0)[0] for _ in range(8)]
        await settle()
        assert len(m.jobs) == 8 and all(job.state.value == "failed" for job in mine)   # within the slack
        m.submit(spec(tmp_path / "missing.vmdk", tmp_path / "out/a.qcow2"), owner=0)
        await settle()
        assert [job.id for job in m.jobs] == [job.id for job in mine[4:]] + [m.jobs[-1].id]
        assert len(JobStore(config.store_path).load_jobs()) == 5
        await m.stop()
    asyncio.run(go())


def test_a_spec_too_long_as_json_is_refused_and_nothing_is_kept(tmp_path, image):
    """Each field's limit counts characters; the whole spec's, bytes: four-byte characters in every field a spec
    allows would otherwise make each job hold hundreds of kilobytes."""
    async def go():
        m, *_ = make(tmp_path)
        await m.start()
        names = ["\U0001F600" * 64] * 32
        wide = spec(image, tmp_path / "out/a.qcow2", job_id="wide",
                    capability_requirements={f"k{n}": names for n in range(4)})
        with pytest.raises(InvalidSpec, match=rf"bytes long as JSON; at most {MAX_SPEC_BYTES} are taken"):
            m.submit(wide, owner=0)
        assert m.jobs == []
        narrow = spec(image, tmp_path / "out/a.qcow2", job_id="narrow",
                      capability_requirements={f"k{n}": ["x" * 64] * 32 for n in range(4)})
        job, _ = m.submit(narrow, owner=0, queue=False)   # as many characters, one byte each
        assert len(job.spec_text) > 8 * 1024
        await m.stop()
    asyncio.run(go())


def test_queue_stats_say_why_the_most_urgent_thousand_jobs_wait(tmp_path, image):
    async def go():
        m, _ = _unchecked(tmp_path)
        await m.start()
        m.pause()
        for n in range(1005):
            m.submit(spec(image, tmp_path / f"out/{n}.qcow2", job_id=f"q{n:04d}"), owner=0)
        waiting = m.queue_stats()["waiting"]
        assert list(waiting) == [f"q{n:04d}" for n in range(1000)]
        assert set(waiting.values()) == {"queue is paused"}
        await m.stop()
    asyncio.run(go())


def test_a_job_that_ended_while_it_waited_no_longer_says_why_it_waits(tmp_path, image):
    """WaitReason is for jobs that wait: a queued job cancelled (or failing) has none, in memory and once stored."""
    async def go():
        m, _, _, config = make(tmp_path)
        await m.start()
        m.pause()
        job, _ = m.submit(spec(image, tmp_path / "out/w.qcow2"), owner=0)
        await settle()
        assert job.wait_reason == "queue is paused"
        await m.cancel(job.id)
        assert job.state.value == "cancelled" and job.wait_reason == ""
        await m.stop()
        assert [stored.wait_reason for stored in JobStore(config.store_path).load_jobs()] == [""]
    asyncio.run(go())


def test_a_job_retried_max_retries_times_must_be_submitted_again(tmp_path, image, monkeypatch):
    """Each retry grows the job's history and event log, which stay as long as the job: a cancel-and-retry loop
    ends at the limit, with a reason, and the job stays as it was."""
    monkeypatch.setattr(manager_module, "MAX_RETRIES", 3)
    async def go():
        m, _ = _unchecked(tmp_path)
        await m.start()
        m.pause()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=1000)
        for _ in range(3):
            await m.cancel(job.id)
            m.retry(job.id)
        await m.cancel(job.id)
        events = len(m.events(job.id))
        with pytest.raises(InvalidState, match=rf"job {job.id} was retried 3 times already; submit it again"):
            m.retry(job.id)
        assert job.state.value == "cancelled" and len(m.events(job.id)) == events
        await m.stop()
    asyncio.run(go())


def test_a_job_interrupted_by_a_shutdown_waits_for_the_next_start_without_losing_an_attempt(tmp_path, image):
    """A reboot while a batch runs: the interrupted job goes back to the queue (though it had no retries left), and
    nothing starts while the system goes down (systemd would refuse the unit, and the job would fail)."""
    async def go():
        m, runner, changes, _ = make(tmp_path)
        await m.start()
        first, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", job_id="first"), owner=0)
        await settle()
        assert runner.started == [("first", 1)] and first.spec["execution_policy"]["retry_count"] == 0
        m.system_stopping(True)
        second, _ = m.submit(spec(image, tmp_path / "out/b.qcow2", job_id="second"), owner=0)
        m.unit_finished("first", 1, UnitOutcome(first.unit, "exit-code", 143, {"status": "cancelled"},
                                                 interrupted=True))
        await settle()
        assert first.state.value == "queued" and second.state.value == "queued"
        assert runner.started == [("first", 1)]
        assert "stopped by the system shutting down" in m.history("first")[-1]["reason"]
        m.system_stopping(False)    # called off (or h2kd runs again after the reboot)
        await settle()
        assert ("first", 2) in runner.started and first.state.value == "running"
        await m.stop()
    asyncio.run(go())


def test_a_worker_whose_connection_closed_is_shown_stale_then_forgotten(tmp_path, image, monkeypatch):
    """Its bus name never comes back: it stays listed as stale for a while (its job back in the queue), then
    goes, so that a worker agent restarting again and again leaves no trail of dead workers."""
    monkeypatch.setattr(manager_module, "GONE_WORKER_KEEP_SECONDS", 0.2)
    async def go():
        m, *_ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", capability_requirements={"gpu": True},
                               execution_policy={"retry_count": 1}), owner=0)
        worker = m.register_worker("agent", {"gpu": True}, 1, 0, ":1.42")
        assert m.claim(worker.id) is job
        m.bus_name_lost(":1.42")
        assert worker.state == "stale" and job.state.value == "queued"
        assert m.get_worker(worker.id) is worker
        await until(lambda: worker.id not in {w.id for w in m.workers})
        await m.stop()
    asyncio.run(go())


def test_an_external_workers_reports_are_bounded(tmp_path, image):
    async def go():
        m, _, changes, _ = make(tmp_path)
        await m.start()
        with pytest.raises(InvalidArgument, match="capabilities must be at most 65536 bytes"):
            m.register_worker("big", {"formats": ["x" * 1000] * 100}, 1, 0, ":1.7")
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", capability_requirements={"gpu": True}), owner=0)
        worker = m.register_worker("agent", {"gpu": True}, 1, 0, ":1.8")
        assert m.claim(worker.id) is job
        m.report_progress(worker.id, job.id, 0.5, 1, 2, "p" * 500, "m" * 50_000)
        assert job.phase == "p" * 64
        assert changes.logs == ["m" * 1024]   # as the LogMessage signal carries it
        # A fraction outside 0..1, or not a number, and a count past the known total are refused and change
        # nothing: Progress (and the progress bars drawn from it) would jump to the end and stay there.
        for fraction, done, total in ((float("inf"), 1, 2), (float("nan"), 1, 2), (2.0, 1, 2), (-0.1, 1, 2),
                                      (0.6, 5, 2), (0.6, 5, 0)):     # 0: the total told before holds
            with pytest.raises(InvalidArgument, match="progress must be a fraction|is more than bytes_total"):
                m.report_progress(worker.id, job.id, fraction, done, total, "", "")
        assert (job.progress, job.bytes_done, job.bytes_total) == (0.5, 1, 2)
        m.report_progress(worker.id, job.id, 0.6, 5, 8, "", "")     # a new, larger total
        assert (job.progress, job.bytes_done, job.bytes_total) == (0.6, 5, 8)
        # Then a big jump at once: every property still fits its D-Bus type (one that did not would make
        # GetManagedObjects fail for every client).
        await asyncio.sleep(0.01)
        m.report_progress(worker.id, job.id, 0.7, 2**63 - 1, 2**63 - 1, "", "")
        Marshaller("a{sv}", [job_vardict(job)]).marshall()
        assert job.expected_end >= job.started_at
        for done, total in ((-1, 2), (2**63, 2**63), (2**64 - 1, 2**64 - 1)):
            with pytest.raises(InvalidArgument, match="bytes_done and bytes_total"):
                m.report_progress(worker.id, job.id, 0.8, done, total, "", "")
        for limit in (-1, 2**32):
            with pytest.raises(InvalidArgument, match="max_jobs"):
                m.register_worker("odd", {}, limit, 0, ":1.9")
        # A result is kept with the job for good, and sent to every client that reads it.
        with pytest.raises(InvalidArgument, match="outputs must be a JSON object of at most 65536 bytes"):
            m.report_result(worker.id, job.id, True, {"log": "x" * 70_000}, "", "", 1, 1)
        with pytest.raises(InvalidArgument, match="bytes_read and bytes_written"):
            m.report_result(worker.id, job.id, True, {}, "", "", -1, 2**63)
        # Counted as the worker sends it, UTF-8: 60,000 bytes of accented text are within the limit.
        with pytest.raises(InvalidArgument, match="bytes_read and bytes_written"):
            m.report_result(worker.id, job.id, True, {"log": "é" * 30_000}, "", "", -1, 0)
        assert job.state.value == "progressing"
        m.report_result(worker.id, job.id, False, {}, "INVALID_IMAGE", "e" * 100_000, 1, 1)
        assert job.state.value == "failed" and job.error_message == "e" * 4096   # stored, with the counts above
        Marshaller("a{sv}", [job_vardict(job)]).marshall()
        await m.stop()
    asyncio.run(go())


def test_a_failure_reported_with_a_blank_message_says_the_worker_failed(tmp_path, image):
    """A failed job's Error always says something: an external worker's blank message is replaced."""
    async def go():
        m, *_ = make(tmp_path)
        await m.start()
        job, worker = claimed_by_an_agent(m, tmp_path, image)
        m.report_result(worker.id, job.id, False, {}, "INVALID_IMAGE", "  \n ", 0, 0)
        assert job.state.value == "failed" and job.error_message == "the worker reported a failure"
        assert 0 < job.started_at <= job.finished_at      # started when its first report came, a result here
        await m.stop()
    asyncio.run(go())


def test_a_unit_refused_because_a_shutdown_began_meanwhile_does_not_fail_its_job(tmp_path, image):
    """StartTransientUnit was on its way when the shutdown began; systemd refuses it: not the job's fault."""
    async def go():
        runner = RefusedLater("Transaction for h2k-job.service/start is destructive (shutdown.target has "
                              "'start' job queued)")
        m, *_ = make(tmp_path, runner=runner)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await until(lambda: runner.started)
        m.system_stopping(True)
        runner.may_answer.set()
        await until(lambda: job.state.value != "assigned")
        assert job.state.value == "queued" and job.error_code == ""
        await m.stop()
    asyncio.run(go())


class RefusesAtFirst(RecordingRunner):
    """systemd refuses the first `refusals` units for a reason that passes (short of memory, no room for the
    attempt's files), then starts them."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals = refusals

    async def start(self, job, attempt):
        self.started.append((job.id, attempt))
        if len(self.started) <= self.refusals:
            raise StartDeferred("systemd refused StartTransientUnit: org.freedesktop.DBus.Error.NoMemory: no memory")
        return f"h2k-job-{job.id}-{attempt}.service"


def test_units_systemd_refuses_do_not_use_up_the_jobs_retries(tmp_path, image):
    """A job without retries still runs once systemd takes its unit: the refusals were not the job's doing.
    They are tried again after a growing backoff, and only so many times before the job fails."""
    async def go():
        runner = RefusesAtFirst(refusals=3)
        m, *_ = make(tmp_path, runner=runner)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 0}), owner=0)
        await until(lambda: job.state.value == "running")
        assert [attempt for _, attempt in runner.started] == [1, 2, 3, 4]
        m.unit_finished(job.id, 4, UnitOutcome(job.unit, "success", 0, {"status": "completed", "outputs": {}}))
        assert job.state.value == "completed"

        always = RefusesAtFirst(refusals=1000)
        m.attach_runner(always)
        other, _ = m.submit(spec(image, tmp_path / "out/b.qcow2", execution_policy={"retry_count": 0}), owner=0)
        await until(lambda: other.state.value == "failed", timeout=60)
        assert len(always.started) == manager_module.MAX_ATTEMPTS_NOT_COUNTED + 1
        assert other.error_code == "UNIT_FAILED" and "systemd refused the unit" in other.error_message
        await m.stop()
    asyncio.run(go())


def test_a_unit_systemd_refuses_for_good_fails_a_job_without_retries_at_once(tmp_path, image):
    """A refusal that does not pass (a property systemd will not take, whatever it is) is the attempt's end,
    as a failed unit: a job without retries does not wait through ten backoffs to be told so."""
    async def go():
        runner = RefusedLater("org.freedesktop.DBus.Error.InvalidArgs: Invalid property")
        runner.may_answer.set()
        m, *_ = make(tmp_path, runner=runner)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 0}), owner=0)
        await until(lambda: job.state.value == "failed")
        assert runner.started == [(job.id, 1)] and job.error_code == "UNIT_FAILED"
        await m.stop()
    asyncio.run(go())


def test_the_retry_limit_counts_retries_asked_for_not_those_h2kd_makes(tmp_path, image, monkeypatch):
    monkeypatch.setattr(manager_module, "MAX_RETRIES", 2)
    async def go():
        m, runner, _, _ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 2}), owner=0)
        for attempt in (1, 2, 3):    # two retries of h2kd's own, then failed
            await until(lambda: (job.id, attempt) in runner.started and job.state.value == "running")
            m.unit_finished(job.id, attempt, UnitOutcome(job.unit, "exit-code", 1, {"status": "failed", "error": {
                "code": "TOOL_FAILED", "message": "qemu-img failed", "retryable": True, "phase": "convert"}}))
        assert job.state.value == "failed"
        m.pause()
        for _ in range(2):
            m.retry(job.id)
            await m.cancel(job.id)
        with pytest.raises(InvalidState, match="was retried 2 times already"):
            m.retry(job.id)
        await m.stop()
    asyncio.run(go())


def test_an_interrupted_attempt_does_not_use_up_a_retry(tmp_path, image):
    """retry_count=1: a reboot stops attempt 1; attempt 2 fails and is still retried once; attempt 3 fails for
    good. The count of attempts not counted is kept in the store across a restart."""
    async def go():
        m, runner, _, config = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 1}), owner=0)
        await until(lambda: job.state.value == "running")
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "exit-code", 143, {"status": "cancelled"},
                                               interrupted=True))
        await m.stop()
        assert JobStore(config.store_path).load_jobs()[0].attempts_not_counted == 1

        again, *_ = make(tmp_path, runner=runner)
        await again.start()
        job = again.get(job.id)
        failure = {"status": "failed", "error": {"code": "TOOL_FAILED", "message": "qemu-img failed",
                                                 "retryable": True, "phase": "convert"}}
        for attempt, after in ((2, "retrying"), (3, "failed")):
            await until(lambda: job.attempt == attempt and job.state.value == "running")
            again.unit_finished(job.id, attempt, UnitOutcome(job.unit, "exit-code", 1, failure))
            assert job.state.value == after
        await again.stop()
    asyncio.run(go())


def test_attempts_not_counted_are_not_counted_for_ever(tmp_path, image):
    """A unit that can never start (its slice masked, say) must not send its job round for ever: after
    MAX_ATTEMPTS_NOT_COUNTED such attempts, they count like any other."""
    async def go():
        m, runner, _, _ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)   # retry_count 0
        for attempt in range(1, manager_module.MAX_ATTEMPTS_NOT_COUNTED + 2):
            await until(lambda: job.attempt == attempt and job.state.value == "running")
            m.unit_finished(job.id, attempt, UnitOutcome(job.unit, "not-started"))
        assert job.state.value == "failed" and job.error_code == "WORKER_LOST"
        assert job.attempts_not_counted == manager_module.MAX_ATTEMPTS_NOT_COUNTED
        await m.stop()
    asyncio.run(go())


def test_a_unit_systemd_could_not_set_up_for_want_of_resources_does_not_use_up_a_retry(tmp_path, image):
    """Result "resources" with no result from the worker: systemd could not make the process (no memory, no
    task left). A job without retries is tried again after a backoff; a worker's own failure still counts."""
    async def go():
        m, runner, _, _ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)   # retry_count 0
        await until(lambda: job.state.value == "running")
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "resources", 0))
        assert job.state.value == "retrying" and job.attempts_not_counted == 1
        assert "resources" in job.error_message
        await until(lambda: job.attempt == 2 and job.state.value == "running")
        m.unit_finished(job.id, 2, UnitOutcome(job.unit, "resources", 1, {"status": "failed", "error": {
            "code": "TOOL_FAILED", "message": "qemu-img failed", "retryable": True, "phase": "convert"}}))
        assert job.state.value == "failed" and job.error_code == "TOOL_FAILED"
        await m.stop()
    asyncio.run(go())


def test_a_retry_by_hand_gives_the_job_its_attempts_not_counted_anew(tmp_path, image):
    """A job failed because its units never started: once the administrator has mended that and asks for a
    retry, a unit that does not start is again not counted, and its backoff starts from the first step."""
    async def go():
        m, runner, _, _ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)   # retry_count 0
        last = manager_module.MAX_ATTEMPTS_NOT_COUNTED + 1
        for attempt in range(1, last + 1):
            await until(lambda: job.attempt == attempt and job.state.value == "running")
            m.unit_finished(job.id, attempt, UnitOutcome(job.unit, "not-started"))
        assert job.state.value == "failed"
        m.retry(job.id)
        await until(lambda: job.attempt == last + 1 and job.state.value == "running")
        m.unit_finished(job.id, last + 1, UnitOutcome(job.unit, "not-started"))
        assert job.state.value != "failed" and job.attempts_not_counted == 1
        await m.stop()
    asyncio.run(go())


def test_a_retry_by_hand_starts_the_backoff_of_passing_refusals_anew(tmp_path, image, monkeypatch):
    """Refusals that pass wait a growing backoff; those before a retry asked for by hand do not lengthen it."""
    async def go():
        runner = RefusesAtFirst(refusals=3)
        m, _, _, config = make(tmp_path, runner=runner, retry_backoff_base_seconds=0.001)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 0}), owner=0)
        await until(lambda: job.state.value == "running")
        assert len(runner.started) == 4
        m.unit_finished(job.id, 4, UnitOutcome(job.unit, "exit-code", 1, {"status": "failed", "error": {
            "code": "TOOL_FAILED", "message": "qemu-img failed", "retryable": True, "phase": "convert"}}))
        assert job.state.value == "failed"
        runner.refusals = 1000
        monkeypatch.setattr(config, "retry_backoff_base_seconds", 100.0)
        m.retry(job.id)
        await until(lambda: job.state.value == "retrying")
        waits = (job.not_before - now_usec()) / 1e6
        assert 90 < waits <= 100, f"the first refusal after the retry waits {waits:.0f} s, not the first step"
        await m.stop()
    asyncio.run(go())


@contextlib.contextmanager
def small_file_system(path: Path, size: str = "2m"):
    """A tmpfs of `size` at `path`, for a store whose disk fills up for real."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "h2k-unit-store", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Take every free block of the file system (unbuffered: nothing is left to fail at close)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def fill_until_the_store_refuses(m, image, tmp_path):
    """With the file system full, writes that fit in the store's write-ahead log still go in, and a refused write
    leaves the room it took in the log to the next one: with the log held (hold_the_log), write until one is
    refused, then the smallest writes there are until one of them is too, so that any next write is refused."""
    path = tmp_path / "state" / "h2kd.sqlite"
    hold_the_log(path)
    with pytest.raises(StoreFailed):
        for n in range(10_000):
            m.submit(spec(image, tmp_path / f"out/x{n}.qcow2", job_id=f"filler-{n:05}",
                          audit={"ticket": "x" * 200}), owner=0, queue=False)
    with JobStore(path) as store:
        take_the_logs_last_pages(store)


def take_the_logs_last_pages(store: JobStore) -> None:
    """Write one page of the store's write-ahead log at a time until the store refuses it. Each write changes the
    row: SQLite writes nothing for a row set to what it holds."""
    with pytest.raises(StoreFailed):
        for n in range(10_000):
            store.set_setting("filler", n)


_log_holders: list[sqlite3.Connection] = []


def hold_the_log(store_path: Path) -> None:
    """Keep a read transaction open on the store until the test ends. Otherwise a checkpoint that copies the whole
    write-ahead log into the database lets SQLite start the log over, and what the log had taken on the full
    file system is room again: the store would take writes again now and then, with no room made."""
    reader = sqlite3.connect(store_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM jobs").fetchone()
    _log_holders.append(reader)


@pytest.fixture(autouse=True)
def _release_the_log():
    yield
    while _log_holders:
        _log_holders.pop().close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small file system")
def test_a_full_store_holds_jobs_as_stored_and_the_queue_goes_on_once_there_is_room(tmp_path, image, monkeypatch):
    """The store's disk fills up (outputs often share it): the end of a running job and the start of the next
    cannot be recorded. Both stay as the store has them, and once there is room again the ended job is
    recorded completed and the next one starts, without a restart of h2kd."""
    monkeypatch.setattr(manager_module, "STORE_RETRY_SECONDS", 0.2)

    async def go():
        with small_file_system(tmp_path / "state") as state:
            m, runner, _, config = make(tmp_path, max_parallel_jobs=1)
            await m.start()
            first, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
            second, _ = m.submit(spec(image, tmp_path / "out/b.qcow2"), owner=0)
            await settle()
            assert first.state.value == "running" and second.state.value == "queued"
            filler = fill(state)
            fill_until_the_store_refuses(m, image, tmp_path)
            m.unit_finished(first.id, 1, UnitOutcome(first.unit, "success", 0, {"status": "completed", "outputs": {}}))
            await asyncio.sleep(0.5)
            assert first.state.value == "running", "an end the store did not take was announced"
            assert second.state.value == "queued" and runner.started == [(first.id, 1)]
            assert m.jobs_running == 1 and m.jobs_queued == 1

            filler.unlink()
            await until(lambda: first.state.value == "completed" and second.state.value == "running")
            assert runner.started == [(first.id, 1), (second.id, 1)]
            await m.stop()
            stored = {job.id: job.state.value for job in JobStore(config.store_path).load_jobs()}
            assert stored[first.id] == "completed" and stored[second.id] == "running"
    asyncio.run(go())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small file system")
def test_a_priority_change_the_full_store_refuses_changes_nothing(tmp_path, image):
    """Refused by a full store, a new priority is not taken in memory either: the queue's order, the job's
    priority and what a restart finds agree; once there is room the same change goes through."""
    async def go():
        with small_file_system(tmp_path / "state") as state:
            m, runner, _, config = make(tmp_path, max_parallel_jobs=1)
            await m.start()
            m.pause()
            early, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
            late, _ = m.submit(spec(image, tmp_path / "out/b.qcow2"), owner=0)
            filler = fill(state)
            fill_until_the_store_refuses(m, image, tmp_path)
            # The last room left is taken by writes of the very kind to be refused (a priority change of the
            # other job, which stays ahead): a smaller write refused before leaves room for one now and then.
            with pytest.raises(StoreFailed):
                for n in range(1_000):
                    m.set_priority(early.id, 3 + n % 2)
            with pytest.raises(StoreFailed):
                m.set_priority(late.id, 1)
            assert late.priority == 5
            filler.unlink()
            m.resume()
            await until(lambda: runner.started)
            assert runner.started == [(early.id, 1)], "the refused priority moved the job in the queue"
            m.set_priority(late.id, 2)
            assert late.priority == 2
            await m.stop()
            stored = {job.id: job.priority for job in JobStore(config.store_path).load_jobs()}
            assert stored[late.id] == 2
    asyncio.run(go())


class FillsTheDiskOnceAJobIsAdded(Changes):
    """The store's disk fills up (a conversion writing its output to it, say) between a submission's first write and
    the next: once told of a new job, this takes every free block and then what room the store's write-ahead log
    had left, through a connection of its own."""

    def __init__(self, state: Path, store: JobStore) -> None:
        super().__init__()
        self._state, self._store = state, store
        self.filler: Path | None = None

    def job_added(self, job):
        super().job_added(job)
        if self.filler is None:
            self.filler = fill(self._state)
            hold_the_log(self._store.path)      # as fill_until_the_store_refuses does
            with pytest.raises(StoreFailed):
                for n in range(10_000):
                    self._store.set_setting(f"filler-{n:05}", "x" * 200)
            take_the_logs_last_pages(self._store)


async def started_filling_the_disk_once_a_job_is_added(tmp_path: Path, state: Path):
    """A started manager on the store in `state` (a small file system), whose disk fills as soon as a job is
    added; (the manager, its Changes, its Config, the FillsTheDiskOnceAJobIsAdded: unlink its filler to free it)."""
    m, _, changes, config = make(tmp_path)
    await m.start()
    disk = FillsTheDiskOnceAJobIsAdded(state, JobStore(config.store_path))
    m.add_listener(disk)
    return m, changes, config, disk


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small file system")
def test_a_submission_that_fails_its_checks_as_the_disk_fills_is_failed_once_there_is_room(tmp_path, monkeypatch):
    """The job is stored (created) but its failure is refused: the caller is told what is wrong with the spec (and so
    is whoever submits the same spec again meanwhile), and the job, created as the store has it, is recorded failed
    once there is room, without a restart of h2kd; the same spec then gets the failed job."""
    monkeypatch.setattr(manager_module, "STORE_RETRY_SECONDS", 0.2)

    async def go():
        with small_file_system(tmp_path / "state") as state:
            m, changes, config, disk = await started_filling_the_disk_once_a_job_is_added(tmp_path, state)
            missing = tmp_path / "missing.vmdk"
            failing = spec(missing, tmp_path / "out/a.qcow2", job_id="late")
            told = re.escape(f"no such file: {missing} (job late stays created until the job store can record that "
                             "it failed)")
            with pytest.raises(InvalidSpec, match=f"^{told}$"):
                m.submit(failing, owner=0)
            job = m.get("late")
            await asyncio.sleep(0.5)
            assert job.state.value == "created" and job.error_code == ""
            with pytest.raises(InvalidSpec, match=f"^{told}$"):
                m.submit(failing, owner=0)

            disk.filler.unlink()
            await until(lambda: job.state.value == "failed")
            assert m.submit(failing, owner=0) == (job, False)
            assert job.error_code == "VALIDATION_FAILED" and job.error_message == f"no such file: {missing}"
            assert [s for i, s in changes.states if i == "late"] == ["created", "failed"]
            assert m.jobs_queued == 0 and not m.list_jobs(states=["created"])
            await m.stop()
            stored = JobStore(config.store_path)
            assert [j.state.value for j in stored.load_jobs() if j.id == "late"] == ["failed"]
            assert [(h["old_state"], h["new_state"]) for h in stored.history("late")] == [("", "created"),
                                                                                         ("created", "failed")]
    asyncio.run(go())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small file system")
def test_a_submission_told_it_failed_its_checks_is_not_run_after_a_restart(tmp_path, monkeypatch):
    """h2kd restarts before the store takes the failure of a submission whose checks failed (and that the caller
    was told so). Meanwhile the problem went away: the job is still recorded failed, with its problem, not run."""
    monkeypatch.setattr(manager_module, "STORE_RETRY_SECONDS", 60)

    async def go():
        with small_file_system(tmp_path / "state") as state:
            m, _, _, disk = await started_filling_the_disk_once_a_job_is_added(tmp_path, state)
            missing = tmp_path / "missing.vmdk"
            with pytest.raises(InvalidSpec, match="stays created until the job store can record that it failed"):
                m.submit(spec(missing, tmp_path / "out/a.qcow2", job_id="told"), owner=0)
            await m.stop()

            missing.write_bytes(b"")                 # the problem is gone, and so is the full disk
            disk.filler.unlink()
            again, runner, _, _ = make(tmp_path)
            await again.start()
            job = again.get("told")
            await until(lambda: job.state.value == "failed")
            assert job.error_code == "VALIDATION_FAILED" and job.error_message == f"no such file: {missing}"
            await settle()
            assert runner.started == [] and again.jobs_queued == 0
            await again.stop()
    asyncio.run(go())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small file system")
def test_a_submission_that_fails_its_checks_on_a_full_store_is_told_its_problem_and_leaves_nothing(tmp_path, image):
    """Nothing of it can be stored: the caller is told what is wrong with the spec (not only that the disk is full),
    by submit() and by the grouped submission of the bus alike, and no job is left behind."""
    async def go():
        with small_file_system(tmp_path / "state") as state:
            m, _, _, config = make(tmp_path)
            await m.start()
            filler = fill(state)
            fill_until_the_store_refuses(m, image, tmp_path)
            missing = tmp_path / "missing.vmdk"
            refused = spec(missing, tmp_path / "out/a.qcow2", job_id="refused")
            nothing_kept = re.escape(f"no such file: {missing} (nothing was kept: the job store cannot be written)")
            with pytest.raises(InvalidSpec, match=nothing_kept):
                m.submit(refused, owner=0)
            with pytest.raises(InvalidSpec, match=nothing_kept):
                await m.submit_grouped(refused, owner=0)
            with pytest.raises(NoSuchJob):
                m.get("refused")

            filler.unlink()
            job, created = await m.submit_grouped(refused, owner=0)
            assert created and job.state.value == "failed" and job.error_code == "VALIDATION_FAILED"
            await m.stop()
            assert [j.state.value for j in JobStore(config.store_path).load_jobs() if j.id == "refused"] == ["failed"]
    asyncio.run(go())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small file system")
def test_a_job_found_created_at_start_is_checked_again_and_failed_once_the_store_takes_it(tmp_path, image,
                                                                                          monkeypatch):
    """h2kd stopped between storing a submission and recording the outcome of its checks (or while the store
    refused it). At the next start it is checked again; its source is gone now, and the store is full: h2kd
    starts all the same, and the job is failed, with the reason, once there is room."""
    monkeypatch.setattr(manager_module, "STORE_RETRY_SECONDS", 0.2)

    async def go():
        with small_file_system(tmp_path / "state") as state:
            m, _, _, config = make(tmp_path)
            await m.start()
            source = tmp_path / "gone.vmdk"
            source.write_bytes(image.read_bytes())
            job, _ = m.submit(spec(source, tmp_path / "out/a.qcow2", job_id="left"), owner=0, queue=False)
            await m.stop()
            with JobStore(config.store_path) as store:      # as if h2kd had stopped before recording its checks
                stored = store.load_jobs()[0]
                stored.state = JobState.CREATED
                store.save_job(stored)
            source.unlink()

            again, runner, *_ = make(tmp_path)
            again.load()        # the stored jobs first: the jobs that fill the store come after them
            filler = fill(state)
            fill_until_the_store_refuses(again, image, tmp_path)
            await again.start()
            left = again.get("left")
            assert left.state.value == "created" and runner.started == []
            filler.unlink()
            await until(lambda: left.state.value == "failed")
            assert left.error_code == "VALIDATION_FAILED" and left.error_message == f"no such file: {source}"
            assert runner.started == []
            await again.stop()
    asyncio.run(go())


def test_jobs_wait_in_the_queue_while_systemd_is_not_reachable_and_start_when_it_is(tmp_path, image):
    """Starting a unit without systemd can only fail: the jobs are not failed for it, they wait."""
    async def go():
        m, runner, _, _ = make(tmp_path)
        runner.reachable = False
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await asyncio.sleep(0.2)
        assert job.state.value == "queued" and runner.started == []
        runner.reachable = True
        m.runner_connected()
        await until(lambda: job.state.value == "running")
        assert runner.started == [(job.id, 1)]
        await m.stop()
    asyncio.run(go())


def test_a_cancel_asked_for_while_the_unit_was_starting_survives_a_restart(tmp_path, image):
    """Cancel is answered once it is stored. h2kd stopped while the unit was being started (StartTransientUnit
    not answered yet): the h2kd that starts next stops the unit it finds, and the job ends cancelled, not
    completed."""
    async def go():
        runner = SlowToStart()
        m, *_ = make(tmp_path, runner=runner)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await until(lambda: runner.started)
        assert job.state.value == "assigned"
        await m.cancel(job.id)
        await m.stop()

        after = RecordingRunner()
        again, *_ = make(tmp_path, runner=after)
        await again.start()
        unit = f"h2k-job-{job.id}-1.service"
        assert after.reattached == [job.id] and after.stopped == [unit]
        again.unit_finished(job.id, 1, UnitOutcome(unit, "success", 0, {"status": "cancelled", "outputs": {}},
                                                   stopped_by_request=True))
        assert again.get(job.id).state.value == "cancelled"
        await again.stop()
    asyncio.run(go())


def test_a_unit_started_before_a_restart_can_be_cancelled_after_it(tmp_path, image):
    """h2kd stopped while the unit was being started, before its name was stored. The h2kd that starts next
    finds the unit running; a Cancel then stops it (and keeps doing so after another restart)."""
    async def go():
        runner = SlowToStart()
        m, *_ = make(tmp_path, runner=runner)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await until(lambda: runner.started)
        await m.stop()

        unit = f"h2k-job-{job.id}-1.service"
        after = RecordingRunner()
        again, *_ = make(tmp_path, runner=after)
        await again.start()
        again.unit_status(job.id, 1, "phase=convert progress=0.1")
        assert again.get(job.id).state.value == "running"
        await again.cancel(job.id)
        assert after.stopped == [unit]
        await again.stop()

        last = RecordingRunner()
        third, *_ = make(tmp_path, runner=last)
        await third.start()
        assert last.stopped == [unit]          # the stored cancel, with the stored unit
        third.unit_finished(job.id, 1, UnitOutcome(unit, "success", 0, {"status": "cancelled", "outputs": {}},
                                                   stopped_by_request=True))
        assert third.get(job.id).state.value == "cancelled"
        await third.stop()
    asyncio.run(go())


def test_a_start_systemd_did_not_answer_leaves_the_job_assigned_until_the_unit_is_heard_of(tmp_path, image):
    """No answer to StartTransientUnit is not a refusal: the job is not failed for it. The unit's reports say
    what became of it: it runs (and completes), or it never started (the job goes back to the queue)."""
    class Unanswered(RecordingRunner):
        async def start(self, job, attempt):
            self.started.append((job.id, attempt))
            raise StartUnanswered(f"h2k-job-{job.id}-{attempt}.service", "systemd did not answer")

    async def go():
        m, _, _, _ = make(tmp_path)
        runner = Unanswered()
        m.attach_runner(runner)
        await m.start()
        ran, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        lost, _ = m.submit(spec(image, tmp_path / "out/b.qcow2"), owner=0)
        await until(lambda: len(runner.started) == 2)
        await settle()
        assert ran.state.value == "assigned" and lost.state.value == "assigned"
        m.unit_status(ran.id, 1, "convert: 50.00% (1/2 bytes)")
        assert ran.state.value == "progressing"
        m.unit_finished(ran.id, 1, UnitOutcome(ran.unit, "success", 0, {"status": "completed", "outputs": {}}))
        assert ran.state.value == "completed" and ran.unit == f"h2k-job-{ran.id}-1.service"
        m.unit_finished(lost.id, 1, UnitOutcome(lost.unit, "unknown", 0, None))
        assert lost.state.value in ("queued", "assigned") and lost.attempts_not_counted == 1
        await m.stop()
    asyncio.run(go())


def test_removing_or_pruning_a_job_has_the_runner_remove_its_attempts_files(tmp_path, image):
    async def go():
        m, runner, _, _ = make(tmp_path, retention_max_count=1)
        await m.start()
        jobs = [m.submit(spec(image, tmp_path / f"out/{n}.qcow2"), owner=0, queue=False)[0] for n in range(3)]
        for job in jobs:
            await m.cancel(job.id)
        m.remove(jobs[0].id)
        assert runner.forgotten == [jobs[0].id]
        m.prune()
        assert runner.forgotten == [jobs[0].id, jobs[1].id]
        await m.stop()
    asyncio.run(go())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small file system")
def test_an_external_workers_calls_the_full_store_refuses_change_nothing(tmp_path, image):
    """A claim or a result the store cannot take leaves the job as it was (queued; claimed), the worker's
    slot taken once, and the same call succeeds once there is room."""
    async def go():
        with small_file_system(tmp_path / "state") as state:
            m, _, _, _ = make(tmp_path)
            await m.start()
            needs = {"capability_requirements": {"gpu": True}}
            first, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", **needs), owner=0)
            second, _ = m.submit(spec(image, tmp_path / "out/b.qcow2", **needs), owner=0)
            worker = m.register_worker("agent", {"gpu": True}, 1, 0, ":1.5")
            assert m.claim(worker.id) is first and worker.active_jobs == 1
            filler = fill(state)
            fill_until_the_store_refuses(m, image, tmp_path)
            with pytest.raises(StoreFailed):
                m.report_result(worker.id, first.id, True, {}, "", "", 1, 1)
            assert first.state.value == "assigned" and worker.active_jobs == 1
            filler.unlink()
            m.report_result(worker.id, first.id, True, {}, "", "", 1, 1)
            assert first.state.value == "completed" and worker.active_jobs == 0

            filler = fill(state)
            fill_until_the_store_refuses(m, image, tmp_path)
            with pytest.raises(StoreFailed):
                m.claim(worker.id)
            assert second.state.value == "queued" and worker.active_jobs == 0
            filler.unlink()
            assert m.claim(worker.id) is second and worker.active_jobs == 1
            await m.stop()
    asyncio.run(go())


def test_a_cancel_while_the_unit_starts_ends_the_job_cancelled_when_systemd_refuses_the_unit(tmp_path, image):
    async def go():
        m, _, _, _ = make(tmp_path)
        runner = RefusedLater("Unit h2k-job-x.service failed to load")
        m.attach_runner(runner)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 3}), owner=0)
        await until(lambda: runner.started)
        await m.cancel(job.id)
        runner.may_answer.set()
        await until(lambda: job.state.value in ("cancelled", "retrying", "queued", "failed"))
        assert job.state.value == "cancelled" and runner.started == [(job.id, 1)]
        await m.stop()
    asyncio.run(go())


def test_h2kd_starts_while_systemd_is_unreachable_and_stops_a_cancelled_unit_once_it_is(tmp_path, image):
    """A cancel stored for a running attempt, then h2kd restarts while systemd cannot be reached: it starts all
    the same, and stops the unit when the runner connects."""
    class Unreachable(RecordingRunner):
        reachable = False

        async def stop(self, unit):
            if not self.reachable:
                raise H2kError("systemd is not reachable")
            self.stopped.append(unit)

    async def go():
        m, runner, *_ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await until(lambda: job.state.value == "running")
        runner.stopped.clear()
        await m.cancel(job.id)
        await m.stop()

        later = Unreachable()
        again, *_ = make(tmp_path, runner=later)
        await again.start()
        assert later.stopped == [] and again.get(job.id).state.value == "running"
        later.reachable = True
        again.runner_connected()
        await until(lambda: later.stopped == [job.unit])
        await again.stop()
    asyncio.run(go())


class RefusingStore(JobStore):
    """A real store that refuses (as a full disk does) every transition into the states in `refused`."""

    refused: set[str] = set()

    def record_transition(self, job, old, new, reason):
        if new.value in self.refused:
            raise StoreFailed(f"the job store {self.path} cannot be written (database or disk is full)")
        return super().record_transition(job, old, new, reason)


def test_a_job_taken_up_at_start_that_the_store_validated_but_could_not_queue_is_queued_later(tmp_path, image,
                                                                                             monkeypatch):
    """h2kd stopped between storing a job and checking it; at the next start the store takes 'validated' but
    refuses 'queued': h2kd starts all the same, and the job is queued at a later try, not left validated."""
    monkeypatch.setattr(manager_module, "STORE_RETRY_SECONDS", 0.2)

    async def go():
        m, _, _, config = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0, queue=False)
        await m.stop()
        with JobStore(config.store_path) as store:      # as if h2kd had stopped before checking it
            stored = store.load_jobs()[0]
            stored.state = JobState.CREATED
            store.save_job(stored)

        refusing = RefusingStore(config.store_path)
        refusing.refused = {"queued"}
        again, runner, *_ = make(tmp_path, store=refusing)
        await again.start()
        assert again.get(job.id).state.value == "validated" and runner.started == []
        refusing.refused = set()
        await until(lambda: again.get(job.id).state.value == "running")
        assert runner.started == [(job.id, 1)]
        await again.stop()
    asyncio.run(go())


def test_a_grouped_submission_whose_failure_the_store_refuses_is_told_its_problem_and_failed_later(tmp_path,
                                                                                                  monkeypatch):
    """The bus's grouped submission: the job is committed (created) but not its failure. The caller is told what is
    wrong with the spec once the job is committed, and the job is failed at a later try."""
    monkeypatch.setattr(manager_module, "STORE_RETRY_SECONDS", 0.2)

    async def go():
        refusing = RefusingStore(tmp_path / "state" / "h2kd.sqlite")
        refusing.refused = {"failed"}
        m, _, changes, config = make(tmp_path, store=refusing)
        await m.start()
        missing = tmp_path / "missing.vmdk"
        with pytest.raises(InvalidSpec, match=re.escape(f"no such file: {missing} (job held stays created until the "
                                                        "job store can record that it failed)")):
            await m.submit_grouped(spec(missing, tmp_path / "out/a.qcow2", job_id="held"), owner=0)
        job = m.get("held")
        assert job.state.value == "created"
        assert [j.state.value for j in JobStore(config.store_path).load_jobs()] == ["created"]
        refusing.refused = set()
        await until(lambda: job.state.value == "failed")
        assert job.error_code == "VALIDATION_FAILED" and [s for i, s in changes.states if i == "held"] == [
            "created", "failed"]
        assert [j.state.value for j in JobStore(config.store_path).load_jobs()] == ["failed"]
        await m.stop()
    asyncio.run(go())


async def a_failure_waiting_for_the_store(tmp_path: Path, job_id: str):
    """A started manager whose store refuses to record failures, and a submission whose checks failed: its job is
    kept created. The manager, the store (its `refused` can be emptied), the spec and what the submission was told."""
    refusing = RefusingStore(tmp_path / "state" / "h2kd.sqlite")
    refusing.refused = {"failed"}
    m, *_ = make(tmp_path, store=refusing)
    await m.start()
    failing = spec(tmp_path / "missing.vmdk", tmp_path / "out/a.qcow2", job_id=job_id)
    with pytest.raises(InvalidSpec) as told:
        m.submit(failing, owner=0)
    return m, refusing, failing, told.value


def test_an_identical_resubmission_is_told_the_problem_until_the_store_records_the_failure(tmp_path, monkeypatch):
    """The first submission was told what is wrong with its spec, its job created but not yet failed: the same spec
    submitted again is told the same, by submit() and the grouped submission alike, and not that it was taken.
    Once the failure is recorded, it gets the failed job, as for any failed job submitted again."""
    monkeypatch.setattr(manager_module, "STORE_RETRY_SECONDS", 0.2)

    async def go():
        m, refusing, failing, first = await a_failure_waiting_for_the_store(tmp_path, "again")
        told = re.escape(str(first))
        with pytest.raises(InvalidSpec, match=f"^{told}$"):
            m.submit(failing, owner=0)
        with pytest.raises(InvalidSpec, match=f"^{told}$"):
            await m.submit_grouped(failing, owner=0)
        job = m.get("again")
        assert job.state.value == "created" and [j.id for j in m.jobs] == ["again"]

        refusing.refused = set()
        await until(lambda: job.state.value == "failed")
        assert m.submit(failing, owner=0) == (job, False)
        assert await m.submit_grouped(failing, owner=0) == (job, False)
        assert job.error_code == "VALIDATION_FAILED" and job.error_message == f"no such file: {tmp_path}/missing.vmdk"
        await m.stop()
    asyncio.run(go())


def test_a_job_cancelled_while_its_failure_waits_for_the_store_is_resubmitted_as_any_cancelled_job(tmp_path,
                                                                                                  monkeypatch):
    """Cancelled before the store took its failure, the job is not going to fail any more: the same spec submitted
    again gets the cancelled job, and nothing is kept of the failure that waited."""
    monkeypatch.setattr(manager_module, "STORE_RETRY_SECONDS", 0.2)

    async def go():
        m, refusing, failing, _ = await a_failure_waiting_for_the_store(tmp_path, "dropped")
        await m.cancel("dropped")
        job = m.get("dropped")
        assert m.submit(failing, owner=0) == (job, False) and job.state.value == "cancelled"
        assert m._failure_unrecorded == {}
        refusing.refused = set()
        await asyncio.sleep(0.5)
        assert job.state.value == "cancelled"
        m.remove("dropped")
        assert m._failure_unrecorded == {}
        await m.stop()
    asyncio.run(go())


def test_a_grouped_submission_whose_commit_fails_leaves_no_failure_waiting(tmp_path, monkeypatch):
    """The commit of the batch that held the job fails after the store refused its failure: the job is forgotten,
    and so is the failure it waited to record; the same spec submitted again is a new job."""
    monkeypatch.setattr(manager_module, "STORE_RETRY_SECONDS", 0.2)

    class CommitRefusedOnce:
        """The store's connection, refusing the next COMMIT as SQLite does on a full disk."""

        def __init__(self, db: sqlite3.Connection) -> None:
            self._db, self.refuse = db, True

        def execute(self, sql, *args):
            if sql == "COMMIT" and self.refuse:
                self.refuse = False
                raise sqlite3.OperationalError("database or disk is full")
            return self._db.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._db, name)

    async def go():
        store = RefusingStore(tmp_path / "state" / "h2kd.sqlite")
        store.refused = {"failed"}
        m, *_ = make(tmp_path, store=store)
        await m.start()
        store._db = CommitRefusedOnce(store._db)
        missing = tmp_path / "missing.vmdk"
        failing = spec(missing, tmp_path / "out/a.qcow2", job_id="undone")
        with pytest.raises(InvalidSpec, match=re.escape("(nothing was kept: the job store cannot be written)")):
            await m.submit_grouped(failing, owner=0)
        assert m._failure_unrecorded == {}
        with pytest.raises(NoSuchJob):
            m.get("undone")
        store.refused = set()
        job, created = await m.submit_grouped(failing, owner=0)
        assert created and job.state.value == "failed" and m._failure_unrecorded == {}
        await m.stop()
    asyncio.run(go())




def test_users_take_turns_at_the_free_slots(tmp_path, image):
    """One user's batch, queued first, does not keep another user's jobs waiting until it has all run: with
    one slot, the second user's jobs start in turn with the first's."""
    async def go():
        m, runner, _, _ = make(tmp_path, checked=False, max_parallel_jobs=1)
        await m.start()
        for n in range(4):
            m.submit(spec(image, tmp_path / f"out/a{n}.qcow2", job_id=f"alice-{n}"), owner=1000)
        for n in range(2):
            m.submit(spec(image, tmp_path / f"out/b{n}.qcow2", job_id=f"bob-{n}"), owner=1001)
        await settle()
        for _ in range(5):
            running = m.get(runner.started[-1][0])
            m.unit_finished(running.id, 1, UnitOutcome(running.unit, "success", 0, {"status": "completed",
                                                                                     "outputs": {}}))
            await settle()
            assert running.state.value == "completed"
        assert [job_id for job_id, _ in runner.started] == ["alice-0", "bob-0", "alice-1", "bob-1", "alice-2",
                                                            "alice-3"]
        await m.stop()
    asyncio.run(go())


def test_a_job_that_completes_on_a_retry_shows_no_error_and_while_it_waits_shows_no_speed(tmp_path, image):
    """The failed attempt's error is the job's while it waits to be retried (with when the next attempt starts,
    not a speed or an end the dead attempt promised); the job that then completes has no error at all."""
    async def go():
        m, runner, _, config = make(tmp_path, retry_backoff_base_seconds=0.5)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 1}), owner=0)
        await settle()
        for done in (10, 40):
            m.unit_status(job.id, 1, f"converting: {done}.00% ({done}/100 bytes)")
            await asyncio.sleep(0.05)
        assert job.rate > 0 and job.expected_end > 0
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "exit-code", 1, None, ["qemu-img: first"]))
        assert job.state.value == "retrying" and job.error_code == "UNIT_FAILED"
        assert job.rate == 0 and job.expected_end == 0
        assert re.fullmatch(r"attempt 1 failed; the next starts at \d\d:\d\d:\d\d", job.wait_reason)
        await until(lambda: len(runner.started) == 2)
        assert job.wait_reason == ""
        m.unit_finished(job.id, 2, UnitOutcome(job.unit, "success", 0, {"status": "completed", "outputs": {}}))
        assert job.state.value == "completed"
        assert (job.error_code, job.error_message) == ("", "")
        assert job_vardict(job)["Error"].value == ["", ""]
        await m.stop()
        [stored] = JobStore(config.store_path).load_jobs()
        assert (stored.error_code, stored.error_message) == ("", "")
    asyncio.run(go())


def test_a_job_cancelled_while_it_waits_to_be_retried_ends_without_the_attempts_error(tmp_path, image):
    async def go():
        m, _, _, _ = make(tmp_path, retry_backoff_base_seconds=600)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 1}), owner=0)
        await settle()
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "exit-code", 1, None, []))
        assert job.state.value == "retrying" and job.error_code
        await m.cancel(job.id)
        assert job.state.value == "cancelled" and (job.error_code, job.wait_reason) == ("", "")
        await m.stop()
    asyncio.run(go())


def test_pausing_the_queue_tells_each_queued_job_that_it_waits_for_the_pause(tmp_path, image):
    async def go():
        m, _, _, _ = make(tmp_path, max_parallel_jobs=1)
        await m.start()
        m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        waiting, _ = m.submit(spec(image, tmp_path / "out/b.qcow2"), owner=0)
        await settle()
        assert waiting.state.value == "queued" and waiting.wait_reason != "queue is paused"
        m.pause()
        await settle()
        assert waiting.wait_reason == "queue is paused"
        await m.stop()
    asyncio.run(go())


class WorkerChanges(Changes):
    def __init__(self) -> None:
        super().__init__()
        self.active_jobs: list[int] = []

    def worker_changed(self, worker):
        if worker.kind == "builtin" and (not self.active_jobs or self.active_jobs[-1] != worker.active_jobs):
            self.active_jobs.append(worker.active_jobs)


def test_every_job_a_worker_takes_or_ends_is_announced_not_only_its_first_and_last(tmp_path, image):
    async def go():
        m, runner, _, _ = make(tmp_path, max_parallel_jobs=3)
        changes = WorkerChanges()
        m.add_listener(changes)
        await m.start()
        jobs = [m.submit(spec(image, tmp_path / f"out/{n}.qcow2"), owner=0)[0] for n in range(3)]
        await until(lambda: len(runner.started) == 3)
        for job in jobs:
            m.unit_finished(job.id, 1, UnitOutcome(job.unit, "success", 0, {"status": "completed", "outputs": {}}))
        await settle()
        assert changes.active_jobs == [1, 2, 3, 2, 1, 0]
        await m.stop()
    asyncio.run(go())


def test_this_hosts_worker_beats_while_h2kd_runs_and_systemd_answers(tmp_path):
    """One h2kd, its systemd going away and coming back: the worker of this host beats while systemd answers,
    not while it is away, and again once it is back (its last heartbeat tells a monitor how long it was gone)."""
    async def go():
        runner = RecordingRunner()
        m, _, _, _ = make(tmp_path, runner=runner, heartbeat_timeout_seconds=0.3)
        await m.start()

        async def beats_within_half_a_second() -> bool:
            before = m.get_worker("builtin").last_heartbeat
            await asyncio.sleep(0.5)
            return m.get_worker("builtin").last_heartbeat > before
        assert await beats_within_half_a_second(), "no beat while systemd answered"
        runner.reachable = False
        assert not await beats_within_half_a_second(), "it beat while systemd was away"
        runner.reachable = True
        m.runner_connected()
        assert await beats_within_half_a_second(), "no beat once systemd was back"
        await m.stop()
    asyncio.run(go())


def test_at_start_the_runner_keeps_the_files_of_every_stored_job_and_only_theirs(tmp_path, image):
    async def go():
        m, _, _, _ = make(tmp_path)
        await m.start()
        ids = sorted(m.submit(spec(image, tmp_path / f"out/{n}.qcow2"), owner=0)[0].id for n in range(2))
        await m.stop()
        again, runner, _, _ = make(tmp_path)
        await again.start()
        assert runner.kept == ids
        await again.stop()
    asyncio.run(go())


class FailingOnceStore(JobStore):
    """A real store whose first transition into 'assigned' fails with an error that is not StoreFailed (as a
    damaged record, or a fault of h2kd's own, would)."""

    failures = 0

    def record_transition(self, job, old, new, reason):
        if new.value == "assigned" and not self.failures:
            self.failures += 1
            raise sqlite3.IntegrityError("UNIQUE constraint failed: events.job_id, events.seq")
        return super().record_transition(job, old, new, reason)


def test_jobs_picked_for_a_start_that_fails_unexpectedly_stay_queued_and_start_later(tmp_path, image, monkeypatch):
    """The scheduler took two jobs from the queue and the first one's assignment failed with an error other
    than StoreFailed: both go back to the queue and start at a later try, rather than waiting for a restart."""
    monkeypatch.setattr(manager_module, "STORE_RETRY_SECONDS", 0.2)

    async def go():
        failing = FailingOnceStore(tmp_path / "state" / "h2kd.sqlite")
        m, runner, _, _ = make(tmp_path, store=failing, max_parallel_jobs=2)
        await m.start()
        m.pause()
        first, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        second, _ = m.submit(spec(image, tmp_path / "out/b.qcow2"), owner=0)
        m.resume()
        await until(lambda: sorted(runner.started) == sorted([(first.id, 1), (second.id, 1)]))
        assert failing.failures == 1
        await m.stop()
    asyncio.run(go())


class AnswersLater(RecordingRunner):
    """systemd starts the unit at once, but its answer to StartTransientUnit comes when the test lets it (or,
    `lost`, never: the bus says it got none)."""

    def __init__(self, lost: bool = False) -> None:
        super().__init__()
        self.may_answer = asyncio.Event()
        self.lost = lost

    async def start(self, job, attempt):
        self.started.append((job.id, attempt))
        await self.may_answer.wait()
        if self.lost:
            raise StartUnanswered(f"h2k-job-{job.id}-{attempt}.service", "NoReply")
        return f"h2k-job-{job.id}-{attempt}.service"


@pytest.mark.parametrize("answer_lost", [False, True], ids=["answered", "answer lost"])
def test_a_status_the_unit_reported_before_its_start_was_answered_is_shown_once_it_runs(tmp_path, image,
                                                                                     answer_lost):
    """The worker's first report can arrive before systemd's answer to the start (a busy manager). The runner
    passes on a status only when it changes, and the worker may then be quiet for minutes (loading a large
    source): the job must show that first report once it is recorded running, not nothing until the next."""
    async def go():
        runner = AnswersLater(lost=answer_lost)
        m, *_ = make(tmp_path, runner=runner)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await until(lambda: runner.started)
        m.unit_status(job.id, 1, "inspect: 12.00% (12/100 bytes) reading the source")
        assert job.state.value == "assigned" and job.phase == ""
        runner.may_answer.set()
        await until(lambda: job.state.value == "progressing")
        assert (job.phase, job.progress) == ("inspect", pytest.approx(0.12)), (job.phase, job.progress)
        await m.stop()
    asyncio.run(go())


class CancelOnAssignment:
    """A client that cancels a job the moment it is assigned, before its unit is started."""

    def __init__(self, manager) -> None:
        self.manager = manager
        self.asked: list[asyncio.Task] = []

    def job_changed(self, job, changed, urgent):
        if "state" in changed and job.state.value == "assigned":
            self.asked.append(asyncio.ensure_future(self.manager.cancel(job.id, by=1000)))

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_a_job_cancelled_between_its_assignment_and_its_start_never_gets_a_unit(tmp_path, image):
    async def go():
        m, runner, *_ = make(tmp_path)
        await m.start()
        canceller = CancelOnAssignment(m)
        m.add_listener(canceller)
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await until(lambda: job.state.value == "cancelled")
        await asyncio.gather(*canceller.asked)
        assert runner.started == [] and runner.stopped == []
        reasons = [entry["reason"] for entry in m.history(job.id)]
        assert reasons[-1] == "cancelled by uid 1000 before its unit could start", reasons
        await m.stop()
    asyncio.run(go())


class WithdrawsOnCancel(RecordingRunner):
    """Keeps the Runner port's promise: a cancel that comes while the start is prepared withdraws it."""

    def __init__(self) -> None:
        super().__init__()
        self.preparing = asyncio.Event()

    async def start(self, job, attempt):
        self.preparing.set()
        while not job.cancel_requested:
            await asyncio.sleep(0.01)
        raise StartWithdrawn(f"job {job.id} was cancelled before its unit started")


def test_a_job_cancelled_while_its_unit_is_prepared_ends_cancelled_without_one(tmp_path, image):
    async def go():
        runner = WithdrawsOnCancel()
        m, *_ = make(tmp_path, runner=runner)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2"), owner=0)
        await asyncio.wait_for(runner.preparing.wait(), 10)
        await asyncio.wait_for(m.cancel(job.id, by=1000), 10)
        await until(lambda: job.state.value == "cancelled")
        assert runner.stopped == []
        reasons = [entry["reason"] for entry in m.history(job.id)]
        assert reasons[-1] == "cancelled by uid 1000 before its unit could start", reasons
        assert job.error_code == "" and m.jobs_running == 0
        await m.stop()
    asyncio.run(go())


def test_an_administrators_stop_that_overran_its_stop_timeout_is_not_taken_for_the_jobs_timeout(tmp_path, image):
    """systemctl stop of a job's unit whose worker did not end within TimeoutStopSec: systemd says "timeout", as
    it does when RuntimeMaxSec ends a unit. Long before the job's time was up, it was the stop: the job ends
    cancelled outside h2kd, as after a stop the worker obeyed, and is not retried as a timed-out one would be."""
    async def go():
        m, runner, *_ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy={"retry_count": 2}), owner=0)
        await until(lambda: job.state.value == "running")
        stopped_at = job.started_at + 40 * 1_000_000          # 10 s into the job, and 30 s of stop timeout
        m.unit_finished(job.id, 1, UnitOutcome(job.unit, "timeout", 0, None, ended_at=stopped_at))
        assert job.state.value == "cancelled", (job.state, job.error_code, job.error_message)
        assert "stopped outside h2kd" in m.history(job.id)[-1]["reason"]
        await settle()
        assert runner.started == [(job.id, 1)]
        # A later attempt is timed from its own start, as systemd tells it: StartedAt stays the first attempt's.
        again, _ = m.submit(spec(image, tmp_path / "out/b.qcow2", execution_policy={"retry_count": 2}), owner=0)
        await until(lambda: again.state.value == "running")
        failure = {"status": "failed", "error": {"code": "TOOL_FAILED", "message": "qemu-img failed",
                                                 "retryable": True}}
        m.unit_finished(again.id, 1, UnitOutcome(again.unit, "exit-code", 1, failure))
        await until(lambda: again.state.value == "running" and again.attempt == 2)
        job = again
        unit_start = job.started_at + 7200 * 1_000_000        # hours after the first attempt began
        m.unit_finished(job.id, 2, UnitOutcome(job.unit, "timeout", 0, None, ended_at=unit_start + 40 * 1_000_000,
                                               started_at=unit_start))
        assert job.state.value == "cancelled", (job.state, job.error_code, job.error_message)
        await m.stop()
    asyncio.run(go())


def test_a_timeout_is_told_from_a_stop_by_the_time_the_worker_ran_not_by_the_wall_clock(tmp_path, image):
    """The wall clock set back while a hung worker ran into its time limit made the job's timeout look like an
    administrator's stop (cancelled, its retries never used); set forward, a stop looked like a timeout."""
    async def go():
        m, runner, *_ = make(tmp_path)
        await m.start()
        policy = {"retry_count": 2, "timeout_seconds": 600}
        timed_out, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", execution_policy=policy), owner=0)
        stopped, _ = m.submit(spec(image, tmp_path / "out/b.qcow2", execution_policy=policy), owner=0)
        await until(lambda: timed_out.state.value == "running" and stopped.state.value == "running")
        start = now_usec()
        # By the wall clock 5 s (set back an hour meanwhile); by systemd's own, 601 s.
        m.unit_finished(timed_out.id, 1, UnitOutcome(timed_out.unit, "timeout", 0, None, started_at=start,
                                                     ended_at=start + 5_000_000, ran_usec=601_000_000))
        assert timed_out.state.value == "retrying" and timed_out.error_code == "TIMEOUT", timed_out.error_message
        # By the wall clock two hours (set forward); by systemd's, 40 s: a stop that overran its stop timeout.
        m.unit_finished(stopped.id, 1, UnitOutcome(stopped.unit, "timeout", 0, None, started_at=start,
                                                   ended_at=start + 7_200_000_000, ran_usec=40_000_000))
        assert stopped.state.value == "cancelled", (stopped.state, stopped.error_code)
        await m.stop()
    asyncio.run(go())


def test_a_jobs_wait_reason_follows_the_external_workers_that_can_run_it(tmp_path, image):
    """A job only an external worker can run says it waits for that worker as soon as it registers, and what
    it lacks again once the worker has left."""
    async def go():
        m, *_ = make(tmp_path)
        await m.start()
        job, _ = m.submit(spec(image, tmp_path / "out/a.qcow2", capability_requirements={"gpu": True}), owner=0)
        await until(lambda: job.wait_reason == "no worker offers gpu")
        worker = m.register_worker("render-farm", {"gpu": True}, 1, 0, ":1.8")
        await until(lambda: job.wait_reason == "waiting for worker render-farm to claim it")
        m.unregister_worker(worker.id)
        await until(lambda: job.wait_reason == "no worker offers gpu")
        # An agent that just leaves the bus (it exited, or crashed) is no longer waited for either.
        agent = m.register_worker("render-farm", {"gpu": True}, 1, 0, ":1.9")
        await until(lambda: job.wait_reason == "waiting for worker render-farm to claim it")
        m.bus_name_lost(":1.9")
        assert agent.state == "stale"
        await until(lambda: job.wait_reason == "no worker offers gpu")
        await m.stop()
    asyncio.run(go())
