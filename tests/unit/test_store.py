"""JobStore on a real SQLite file: jobs, history and events come back as written, pruning keeps what it must,
and a process killed with SIGKILL in the middle of writing loses nothing it had committed."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from h2kd.errors import AlreadyExists, NoSuchJob, StoreFailed
from h2kd.model.job import Job
from h2kd.model.states import JobState
from h2kd.store import JobStore

S = JobState
REPO = Path(__file__).resolve().parents[2]
SECOND = 1_000_000


def new_job(job_id: str, **fields) -> Job:
    spec = {"job_id": job_id, "operation": "convert", "image": {"path": f"/src/{job_id}.vmdk"}}
    return Job(id=job_id, spec=spec, operation="convert", owner=1000, **fields)


@pytest.fixture
def store(tmp_path: Path):
    s = JobStore(tmp_path / "state" / "h2kd.sqlite")
    yield s
    s.close()


def move(store: JobStore, job: Job, new: JobState, reason: str = ""):
    old = job.move_to(new)
    return store.record_transition(job, old, new, reason or f"to {new.value}")


def test_every_job_field_survives_a_reopen(tmp_path):
    path = tmp_path / "h2kd.sqlite"
    job = Job(
        id="vm-1.disk_0", spec={"job_id": "vm-1.disk_0", "operation": "convert", "nested": {"list": [1, "ü", None]}},
        operation="convert", owner=4242, priority=2, state=S.PROGRESSING, queue_seq=77, attempt=3,
        phase="converting", progress=0.625, progress_known=True, bytes_done=5 * 2**40, bytes_total=8 * 2**40,
        rate=123_456_789, expected_end=1_900_000_000 * SECOND, created_at=1_700_000_000 * SECOND + 1,
        started_at=1_700_000_001 * SECOND, finished_at=1_700_000_002 * SECOND, unit="h2k-job-vm\\x2d1-3.service",
        worker="builtin", wait_reason="waiting for a free slot (2 of 2 running)", not_before=1_700_000_003 * SECOND,
        result={"status": "failed", "error": {"code": "TOOL_FAILED", "message": "line 1\nline 2"}},
        error_code="TOOL_FAILED", error_message="qemu-img: boom\n(exit 1)", source_identity="2049:1234",
        attempts_not_counted=1, attempts_counted_before=2, cancel_requested=True, owner_groups=(4242, 27, 100),
        cancelled_by=4242, taken_until=1_715_000_300_000_000)
    # Every field differs from its default, so a column the store forgot would show.
    defaults = Job(id="x", spec={}, operation="", owner=0)
    for f in dataclasses.fields(Job):
        assert getattr(job, f.name) != getattr(defaults, f.name), f.name
    with JobStore(path) as s:
        s.insert_job(job, "submitted")
    with JobStore(path) as s:
        (loaded,) = s.load_jobs()
    assert dataclasses.asdict(loaded) == dataclasses.asdict(job)
    assert loaded.state is S.PROGRESSING and loaded.progress_known is True


def test_log_tails_kept_in_error_messages_by_an_earlier_h2kd_move_to_the_result_once(tmp_path):
    """An earlier h2kd appended a failed unit's last log lines to the job's error message, which every user reads;
    they go to the result's log_tail (its owner's and administrators') when the store is opened."""
    path = tmp_path / "h2kd.sqlite"
    head = "its content matches no disk image"
    legacy = head + "\nlast log lines:\nh2k-worker: job old attempt 1\nh2k-worker: failed: INVALID_IMAGE"
    error = {"code": "INVALID_IMAGE", "message": legacy, "phase": "inspect"}
    job = new_job("old", state=S.FAILED, error_code="INVALID_IMAGE", error_message=legacy,
                  result={"status": "failed", "error": dict(error)})
    other = new_job("other", state=S.FAILED, error_code="X", error_message="last log lines: a word, not the marker")
    # Failed once, then went on: its message loses the lines, and its result, not a failure, gets none.
    went_on = new_job("went_on", state=S.COMPLETED, error_code="UNIT_FAILED", error_message=legacy,
                      result={"status": "completed", "outputs": {}})
    with JobStore(path) as s:
        s.insert_job(job, "submitted")
        s.insert_job(other, "submitted")
        s.insert_job(went_on, "submitted")
        s.append_event("old", "result", {"status": "failed", "error": dict(error)})
    with sqlite3.connect(path) as db:     # as written by that earlier h2kd, which had no such setting
        db.execute("DELETE FROM settings WHERE name = 'log_tails_in_results'")
    for _ in range(2):
        with JobStore(path) as s:
            loaded = {j.id: j for j in s.load_jobs()}
            events = s.events("old")
        assert loaded["old"].error_message == head
        assert loaded["old"].result == {"status": "failed", "error": {**error, "message": head},
                                        "log_tail": ["h2k-worker: job old attempt 1",
                                                     "h2k-worker: failed: INVALID_IMAGE"]}
        assert events[-1].kind == "result" and events[-1].data["error"]["message"] == head
        assert loaded["other"].error_message == other.error_message and loaded["other"].result == {}
        assert loaded["went_on"].error_message == head
        assert loaded["went_on"].result == {"status": "completed", "outputs": {}}


def test_insert_writes_history_and_first_event(store):
    job = new_job("a")
    event = store.insert_job(job, "submitted by uid 1000")
    assert (event.job_id, event.seq, event.kind) == ("a", 1, "state")
    assert store.events("a") == [event]
    (entry,) = store.history("a")
    assert entry["old_state"] == "" and entry["new_state"] == "created"
    assert entry["reason"] == "submitted by uid 1000" and entry["time"] == event.time


def test_duplicate_insert_is_refused_and_changes_nothing(store):
    store.insert_job(new_job("a"), "first")
    with pytest.raises(AlreadyExists):
        store.insert_job(new_job("a", priority=1), "second")
    assert [j.priority for j in store.load_jobs()] == [5]
    assert len(store.history("a")) == 1 and len(store.events("a")) == 1


def test_save_job_updates_every_field(store, tmp_path):
    job = new_job("a")
    store.insert_job(job, "submitted")
    job.phase, job.progress, job.bytes_done, job.wait_reason = "copying", 0.5, 1024, "x"
    job.result = {"status": "completed", "outputs": {"disks": ["/out/a.qcow2"]}}
    store.save_job(job)
    (loaded,) = store.load_jobs()
    assert dataclasses.asdict(loaded) == dataclasses.asdict(job)
    with pytest.raises(NoSuchJob):
        store.save_job(new_job("never-inserted"))


def test_transitions_history_and_events_in_order(store):
    job = new_job("a")
    store.insert_job(job, "submitted")
    path = [S.VALIDATED, S.QUEUED, S.ASSIGNED, S.RUNNING, S.PROGRESSING, S.COMPLETED]
    events = [move(store, job, new) for new in path]
    assert [e.seq for e in events] == [2, 3, 4, 5, 6, 7]
    assert events[-1].data == {"old_state": "progressing", "new_state": "completed", "reason": "to completed"}
    history = store.history("a")
    assert [(h["old_state"], h["new_state"]) for h in history] == [
        ("", "created"), ("created", "validated"), ("validated", "queued"), ("queued", "assigned"),
        ("assigned", "running"), ("running", "progressing"), ("progressing", "completed")]
    assert [h["time"] for h in history] == sorted(h["time"] for h in history)
    assert store.load_jobs()[0].state is S.COMPLETED


def test_transition_must_match_the_job(store):
    job = new_job("a")
    store.insert_job(job, "submitted")
    with pytest.raises(ValueError):
        store.record_transition(job, S.CREATED, S.VALIDATED, "job was not moved")
    assert len(store.history("a")) == 1


def test_events_since_and_limit_and_reopen(tmp_path):
    path = tmp_path / "h2kd.sqlite"
    with JobStore(path) as s:
        s.insert_job(new_job("a"), "submitted")
        s.insert_job(new_job("b"), "submitted")
        for i in range(5):
            s.append_event("a", "progress", {"fraction": i / 4})
        s.append_event("b", "log", {"message": "hello"})
        assert [e.seq for e in s.events("a")] == [1, 2, 3, 4, 5, 6]
        assert [e.seq for e in s.events("a", since=4)] == [5, 6]
        assert [e.seq for e in s.events("a", since=1, limit=2)] == [2, 3]
        # GetEvents takes any unsigned 64-bit "since"; SQLite's integers end at 2**63 - 1.
        assert s.events("a", since=2**64 - 1) == [] and s.events("a", since=2**63) == []
        assert s.events("a", since=6) == []
        assert [(e.seq, e.kind, e.data) for e in s.events("b")][1] == (2, "log", {"message": "hello"})
        with pytest.raises(NoSuchJob):
            s.append_event("nope", "log", {})
    with JobStore(path) as s:   # numbering goes on after a restart
        assert s.append_event("a", "log", {"message": "again"}).seq == 7
        assert s.events("a", since=6)[0].data == {"message": "again"}
        assert s.events("unknown") == [] and s.history("unknown") == []


def test_an_event_is_listed_only_once_committed_so_its_number_is_never_given_to_another(tmp_path):
    """Progress events wait up to a second in the open batch; a kill -9 then loses them, and the next event
    stored gets the number the lost one had. A client that had read that number would skip the new event:
    so none is listed before it is committed."""
    path = tmp_path / "h2kd.sqlite"
    writer = textwrap.dedent("""
        import asyncio, json, os, signal, sys
        from h2kd.model.job import Job
        from h2kd.store import JobStore

        async def main():
            store = JobStore(sys.argv[1])
            store.insert_job(Job(id="a", spec={"job_id": "a"}, operation="convert", owner=0), "submitted")
            with store.deferred(within=60):
                store.append_event("a", "progress", {"fraction": 0.05})
            print(json.dumps([e.seq for e in store.events("a")]), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """)
    child = subprocess.run([sys.executable, "-c", writer, str(path)], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout.split() == ["[1]"]      # a client asking then was told of event 1 only
    with JobStore(path) as s:
        assert [e.seq for e in s.events("a")] == [1]
        event = s.append_event("a", "state", {"new_state": "completed"})
        assert event.seq == 2 and [e.seq for e in s.events("a", since=1)] == [2]

    async def committed_later() -> None:
        with JobStore(path) as s:
            with s.deferred(within=60):
                s.append_event("a", "progress", {"fraction": 0.10})
            assert [e.seq for e in s.events("a", since=2)] == []
            await s.committed()
            assert [e.seq for e in s.events("a", since=2)] == [3]
    asyncio.run(committed_later())


def test_delete_removes_all_rows(store):
    for name in ("a", "b"):
        store.insert_job(new_job(name), "submitted")
        store.append_event(name, "log", {"message": name})
    store.delete_job("a")
    assert [j.id for j in store.load_jobs()] == ["b"]
    assert store.events("a") == [] and store.history("a") == []
    assert len(store.events("b")) == 2
    # The id can be used again, with a fresh event log.
    assert store.insert_job(new_job("a"), "again").seq == 1


def test_load_jobs_in_created_order(store):
    names = ["m", "c", "x", "a", "k"]
    for name in names:
        store.insert_job(new_job(name), "submitted")
    assert [j.id for j in store.load_jobs()] == names


def finished_job(store: JobStore, job_id: str, state: JobState, finished_at: int, owner: int = 1000) -> None:
    job = new_job(job_id, created_at=finished_at - SECOND)
    job.owner = owner
    store.insert_job(job, "submitted")
    if state is S.COMPLETED:
        for new in (S.VALIDATED, S.QUEUED, S.ASSIGNED, S.RUNNING):
            move(store, job, new)
    job.finished_at = finished_at
    move(store, job, state)


def test_prune_by_age_spares_unfinished_jobs(store):
    now = 1_800_000_000 * SECOND
    day = 86400 * SECOND
    finished_job(store, "old-done", S.COMPLETED, now - 40 * day)
    finished_job(store, "old-failed", S.FAILED, now - 31 * day)
    finished_job(store, "old-cancelled", S.CANCELLED, now - 35 * day)
    finished_job(store, "recent-done", S.COMPLETED, now - 1 * day)
    unfinished = {}
    for name, state in [("queued", S.QUEUED), ("running", S.RUNNING), ("created", S.CREATED),
                        ("retrying", S.RETRYING), ("validated", S.VALIDATED)]:
        job = new_job(name, created_at=now - 365 * day)
        store.insert_job(job, "submitted")
        for new in {S.QUEUED: [S.VALIDATED, S.QUEUED], S.RUNNING: [S.VALIDATED, S.QUEUED, S.ASSIGNED, S.RUNNING],
                    S.CREATED: [], S.RETRYING: [S.VALIDATED, S.QUEUED, S.ASSIGNED, S.RETRYING],
                    S.VALIDATED: [S.VALIDATED]}[state]:
            move(store, job, new)
        unfinished[name] = state
    removed = store.prune(30 * 86400, None, now)
    assert removed == ["old-done", "old-cancelled", "old-failed"]   # oldest first
    left = {j.id: j.state for j in store.load_jobs()}
    assert left == {"recent-done": S.COMPLETED, **unfinished}
    assert store.history("old-done") == [] and store.events("old-failed") == []
    assert store.prune(30 * 86400, None, now) == []


def test_prune_by_count_keeps_the_newest_finished_and_every_unfinished(store):
    now = 1_800_000_000 * SECOND
    for i in range(6):
        finished_job(store, f"done-{i}", S.COMPLETED, now - (10 - i) * SECOND)
    for i in range(4):
        job = new_job(f"queued-{i}", created_at=now - 1000 * SECOND)
        store.insert_job(job, "submitted")
        move(store, job, S.VALIDATED)
        move(store, job, S.QUEUED)
    removed = store.prune(None, 2, now)
    assert removed == ["done-0", "done-1", "done-2", "done-3"]
    assert sorted(j.id for j in store.load_jobs()) == ["done-4", "done-5"] + [f"queued-{i}" for i in range(4)]
    assert store.prune(None, 0, now) == ["done-4", "done-5"]
    assert len(store.load_jobs()) == 4
    assert store.prune(0, 0, now) == []   # only unfinished jobs are left: nothing to do


def test_prune_age_and_count_together(store):
    now = 1_800_000_000 * SECOND
    for i in range(5):
        finished_job(store, f"d{i}", S.FAILED, now - (5 - i) * 60 * SECOND)   # 5, 4, 3, 2, 1 minutes ago
    # The age limit takes d0 and d1 (older than 3.5 minutes); the count limit then takes d2 (2 may stay).
    assert store.prune(3.5 * 60, 2, now) == ["d0", "d1", "d2"]
    assert store.prune(3.5 * 60, 2, now) == []


def test_prune_by_count_takes_from_whoever_has_the_most_first(store):
    """One user's flood of failed jobs must not push everyone else's records out of the store."""
    now = 1_800_000_000 * SECOND
    for i in range(3):      # alice's and bob's jobs are the oldest
        finished_job(store, f"alice-{i}", S.COMPLETED, now - (100 - i) * SECOND, owner=1001)
        finished_job(store, f"bob-{i}", S.COMPLETED, now - (90 - i) * SECOND, owner=1002)
    for i in range(20):
        finished_job(store, f"flood-{i}", S.FAILED, now - (50 - i) * SECOND, owner=1003)
    removed = store.prune(None, 10, now)
    assert removed == [f"flood-{i}" for i in range(16)]
    kept = sorted(j.id for j in store.load_jobs())
    assert kept == sorted([f"alice-{i}" for i in range(3)] + [f"bob-{i}" for i in range(3)] +
                          [f"flood-{i}" for i in range(16, 20)])
    # Once the flood is down to their level, the oldest of those with the most go, in turn.
    assert store.prune(None, 7, now) == ["alice-0", "bob-0", "flood-16"]


def test_queue_order_and_seq_survive_reopen(tmp_path):
    path = tmp_path / "h2kd.sqlite"
    submitted = [("p5-a", 5), ("p1-a", 1), ("p5-b", 5), ("p9", 9), ("p1-b", 1)]
    with JobStore(path) as s:
        for name, priority in submitted:
            job = new_job(name, priority=priority)
            s.insert_job(job, "submitted")
            move(s, job, S.VALIDATED)
            job.queue_seq = s.next_queue_seq()
            move(s, job, S.QUEUED)
        last = s.next_queue_seq()
    with JobStore(path) as s:
        jobs = [j for j in s.load_jobs() if j.state is S.QUEUED]
        order = [j.id for j in sorted(jobs, key=lambda j: (j.priority, j.queue_seq))]
        assert order == ["p1-a", "p1-b", "p5-a", "p5-b", "p9"]
        # Numbering goes on after the stored jobs (the unused `last` may be handed out again: no job has it).
        assert s.next_queue_seq() == last
        assert s.check()



def test_a_record_that_cannot_be_read_is_left_alone_and_the_others_load(tmp_path, caplog):
    """A damaged row, or one with a state a newer h2kd wrote, costs that job only: h2kd still starts with the
    others, and says which one it could not read."""
    path = tmp_path / "h2kd.sqlite"
    with JobStore(path) as s:
        for job_id in ("good-1", "bad-json", "bad-state", "good-2"):
            s.insert_job(new_job(job_id), "submitted")
    db = sqlite3.connect(path)
    db.execute("UPDATE jobs SET spec = '{not json' WHERE id = 'bad-json'")
    db.execute("UPDATE jobs SET state = 'paused-by-a-newer-h2kd' WHERE id = 'bad-state'")
    db.commit()
    db.close()
    with JobStore(path) as s:
        assert [j.id for j in s.load_jobs()] == ["good-1", "good-2"]
        with pytest.raises(AlreadyExists):      # still there, not replaced by a job of the same id
            s.insert_job(new_job("bad-json"), "submitted")
    logged = caplog.text
    assert "'bad-json'" in logged and "'bad-state'" in logged and "cannot be read" in logged


def test_check_fails_for_a_store_whose_file_is_gone(tmp_path):
    """The check reads the file on a connection of its own: a store file removed (or renamed) meanwhile fails
    it, rather than being made again, empty, where it was."""
    path = tmp_path / "h2kd.sqlite"
    with JobStore(path) as s:
        s.insert_job(new_job("j1"), "submitted")
        assert s.check()
        moved = tmp_path / "moved.sqlite"
        path.rename(moved)
        assert not s.check()
        assert not path.exists()
        moved.rename(path)

def test_refuses_a_store_from_a_newer_h2kd(tmp_path):
    path = tmp_path / "h2kd.sqlite"
    JobStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreFailed, match="schema version 99"):
        JobStore(path)


def test_check_detects_a_damaged_file(tmp_path):
    path = tmp_path / "h2kd.sqlite"
    with JobStore(path) as s:
        for i in range(300):
            s.insert_job(new_job(f"j{i}", result={"pad": "x" * 500}), "submitted")
        assert s.check()
    with open(path, "r+b") as f:   # scribble over the middle of the file, past the first pages
        f.seek(4096 * 3)
        f.write(os.urandom(4096 * 20))
    try:
        s = JobStore(path)
    except StoreFailed as e:
        assert "cannot be opened" in str(e)
        return   # refusing to open is also a way of noticing
    try:
        assert not s.check()
    finally:
        s.close()


# ---------------------------------------------------------------- kill -9

CHILD = textwrap.dedent("""
    import sys
    from h2kd.model.job import Job
    from h2kd.model.states import JobState
    from h2kd.store import JobStore

    store = JobStore(sys.argv[1])
    prefix = sys.argv[2]
    i = 0
    while True:
        job = Job(id=f"{prefix}-{i}", spec={"job_id": f"{prefix}-{i}", "n": i}, operation="convert", owner=0)
        store.insert_job(job, "submitted")
        print("inserted", job.id, flush=True)
        for new in (JobState.VALIDATED, JobState.QUEUED):
            if new is JobState.QUEUED:
                job.queue_seq = store.next_queue_seq()
            old = job.move_to(new)
            store.record_transition(job, old, new, "moving on")
        store.append_event(job.id, "log", {"message": "queued"})
        print("queued", job.id, job.queue_seq, flush=True)
        i += 1
""")


def run_and_kill(path: Path, prefix: str, after_lines: int) -> list[list[str]]:
    """Start a writer, SIGKILL it once it has reported `after_lines` commits (plus a little random time)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), prefix], stdout=subprocess.PIPE, text=True,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout is not None
    lines = []
    try:
        while len(lines) < after_lines:
            line = child.stdout.readline()
            assert line, "the writer died before it was killed"
            lines.append(line.split())
        time.sleep(int.from_bytes(os.urandom(1), "little") / 255 * 0.05)   # land somewhere inside a write
    finally:
        child.send_signal(signal.SIGKILL)
    # With PYTHONUNBUFFERED set, print writes each word separately, so the kill can cut the last line short.
    lines += [line.split() for line in child.stdout.read().splitlines(keepends=True) if line.endswith("\n")]
    child.wait()
    assert child.returncode == -signal.SIGKILL
    return lines


def test_kill_9_loses_nothing_committed(tmp_path):
    path = tmp_path / "h2kd.sqlite"
    inserted: dict[str, None] = {}
    queued: dict[str, int] = {}
    for round_ in range(3):
        for words in run_and_kill(path, f"r{round_}", after_lines=60 + 40 * round_):
            if words[0] == "inserted":
                inserted[words[1]] = None
            elif words[0] == "queued":
                queued[words[1]] = int(words[2])
        with JobStore(path) as s:
            assert s.check()
            jobs = {j.id: j for j in s.load_jobs()}
            # Everything the writer saw committed is there; at most the one insert in flight is extra.
            assert set(inserted) <= set(jobs)
            assert len(set(jobs) - set(inserted)) <= round_ + 1
            for job_id in queued:
                assert jobs[job_id].state is JobState.QUEUED and jobs[job_id].queue_seq == queued[job_id]
            for job in jobs.values():
                # Each change was all-or-nothing: the row's state is always the last history entry, and
                # every history entry has its "state" event, numbered without gaps.
                history = s.history(job.id)
                events = s.events(job.id)
                assert history and history[-1]["new_state"] == job.state.value
                assert [e.seq for e in events] == list(range(1, len(events) + 1))
                state_events = [e.data["new_state"] for e in events if e.kind == "state"]
                assert state_events == [h["new_state"] for h in history]
            # Queue numbers handed out after a restart come after all of them.
            assert s.next_queue_seq() > max(j.queue_seq for j in jobs.values())
    assert len(queued) >= 150


def test_the_wal_is_copied_back_into_the_database_in_the_background(tmp_path: Path):
    path = tmp_path / "state" / "h2kd.sqlite"
    with JobStore(path) as store:
        empty = path.stat().st_size
        for i in range(300):
            store.insert_job(new_job(f"wal-{i}"), "submitted")
        wal = Path(str(path) + "-wal")
        assert wal.stat().st_size > 0
        deadline = time.monotonic() + 10
        while path.stat().st_size <= empty and time.monotonic() < deadline:
            time.sleep(0.05)
        # Copied back by the store's own thread, the daemon's connection never checkpointing itself.
        assert path.stat().st_size > empty
        reader = sqlite3.connect(str(path))
        try:
            assert reader.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 300
        finally:
            reader.close()


# ---------------------------------------------------------------- durability: the WAL's fdatasync

class RecordingSync:
    """Stands in for os.fdatasync: records which file was synced, and can hold a sync until released."""

    def __init__(self) -> None:
        self.synced: list[str] = []
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()
        self.delay = 0.0
        self.real = os.fdatasync

    def __call__(self, fd: int) -> None:
        self.started.set()
        self.hold.wait(10)
        time.sleep(self.delay)
        self.synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        self.real(fd)


@pytest.fixture
def syncs(monkeypatch) -> RecordingSync:
    recording = RecordingSync()
    monkeypatch.setattr(os, "fdatasync", recording)
    return recording


def test_a_write_outside_a_batch_is_synced_to_disk_before_it_returns(store, syncs):
    store.insert_job(new_job("a"), "submitted")
    assert syncs.synced and syncs.synced[-1] == str(store.path) + "-wal"
    with sqlite3.connect(store.path) as other:        # committed, visible to any reader
        assert other.execute("SELECT COUNT(*) FROM jobs WHERE id = 'a'").fetchone() == (1,)


def test_a_group_commit_answers_only_after_the_sync_and_the_loop_keeps_running_meanwhile(store, syncs):
    async def scenario() -> None:
        syncs.delay = 0.02                           # the disk is slow (conversions are writing to it) ...
        for i in range(3):
            store.insert_job(new_job(f"slow-{i}"), "submitted")
        syncs.delay = 0.0
        syncs.synced.clear()
        syncs.started.clear()
        syncs.hold.clear()                           # ... and the next sync takes as long as the test likes
        with store.deferred():
            store.insert_job(new_job("g1"), "submitted")
        first = store.committed()
        await asyncio.get_running_loop().run_in_executor(None, syncs.started.wait, 5)
        ticks = 0
        for _ in range(5):                           # the loop is free while the sync runs
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 5 and not first.done(), "answered before the job was on disk"
        # Nothing new to commit, but what was committed is not on disk yet: not "committed" either.
        already = store.committed()
        await asyncio.sleep(0.01)
        assert not already.done(), "answered while the writes before it were still being synced"
        with store.deferred():                       # arrives during the sync: waits for the next one
            store.insert_job(new_job("g2"), "submitted")
        second = store.committed()
        syncs.hold.set()
        await asyncio.wait_for(first, 5)
        await asyncio.wait_for(already, 5)
        await asyncio.wait_for(second, 5)
        assert len(syncs.synced) == 2 and set(syncs.synced) == {str(store.path) + "-wal"}
    asyncio.run(scenario())
    reopened = JobStore(store.path)
    try:
        assert {j.id for j in reopened.load_jobs()} == {"slow-0", "slow-1", "slow-2", "g1", "g2"}
    finally:
        reopened.close()


def test_a_failed_sync_fails_the_waiters_and_marks_the_store_unhealthy(store, monkeypatch):
    def broken_disk(fd: int) -> None:
        raise OSError(5, "Input/output error")

    async def scenario() -> None:
        monkeypatch.setattr(os, "fdatasync", broken_disk)
        with store.deferred():
            store.insert_job(new_job("e1"), "submitted")
        with pytest.raises(StoreFailed, match="could not be written to disk"):
            await asyncio.wait_for(store.committed(), 5)
    asyncio.run(scenario())
    assert not store.check()


def test_after_a_failed_sync_the_store_says_so_once_and_takes_no_more_changes(tmp_path, monkeypatch):
    lost: list[str] = []
    store = JobStore(tmp_path / "h2kd.sqlite", on_sync_lost=lambda: lost.append("lost"))
    store.insert_job(new_job("before"), "submitted")
    real = os.fdatasync

    def broken_disk(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken_disk)
    with pytest.raises(StoreFailed, match="known only once h2kd has restarted"):
        store.insert_job(new_job("unsure"), "submitted")
    assert lost == ["lost"]
    monkeypatch.setattr(os, "fdatasync", real)          # the disk answers again: the store still refuses
    with pytest.raises(StoreFailed, match="takes no change .* h2kd must restart"):
        store.insert_job(new_job("after"), "submitted")
    with pytest.raises(StoreFailed, match="takes no change"):
        store.set_setting("x", 1)
    assert lost == ["lost"]
    store.close()                                          # closes without a word, as h2kd does when it ends
    with JobStore(tmp_path / "h2kd.sqlite") as reread:   # the restart reads what the file holds
        assert {j.id for j in reread.load_jobs()} <= {"before", "unsure"}
        assert "before" in {j.id for j in reread.load_jobs()}


def test_writes_waiting_for_a_sync_that_fails_are_refused_not_committed(tmp_path, monkeypatch, syncs):
    lost: list[str] = []
    store = JobStore(tmp_path / "h2kd.sqlite", on_sync_lost=lambda: lost.append("lost"))

    def broken_disk(fd: int) -> None:
        raise OSError(5, "Input/output error")

    async def scenario() -> None:
        syncs.delay = 0.02                           # a slow disk: group commits sync on a thread
        for i in range(3):
            store.insert_job(new_job(f"slow-{i}"), "submitted")
        syncs.delay = 0.0
        syncs.started.clear()
        syncs.hold.clear()
        with store.deferred():
            store.insert_job(new_job("in-the-failing-sync"), "submitted")
        first = store.committed()
        await asyncio.get_running_loop().run_in_executor(None, syncs.started.wait, 5)
        with store.deferred():                       # joins the next batch while the sync is held
            store.insert_job(new_job("waiting"), "submitted")
        second = store.committed()
        working = syncs.real
        syncs.real = broken_disk
        syncs.hold.set()
        with pytest.raises(StoreFailed, match="known only once"):
            await asyncio.wait_for(first, 5)
        with pytest.raises(StoreFailed, match="takes no change"):
            await asyncio.wait_for(second, 5)
        syncs.real = working
    asyncio.run(scenario())
    assert lost == ["lost"]
    store.close()
    with JobStore(tmp_path / "h2kd.sqlite") as reread:
        assert "waiting" not in {j.id for j in reread.load_jobs()}


@pytest.mark.parametrize("column, default, later", [("attempts_not_counted", 0, 2), ("cancelled_by", -1, 1000)])
def test_a_store_written_before_a_column_existed_gets_it_with_its_default(tmp_path, column, default, later):
    import sqlite3

    path = tmp_path / "h2kd.sqlite"
    with JobStore(path) as s:
        s.insert_job(new_job("old"), "submitted")
    with sqlite3.connect(path) as db:    # as a build before the column wrote it
        db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    with JobStore(path) as s:
        (loaded,) = s.load_jobs()
        assert loaded.id == "old" and getattr(loaded, column) == default
        setattr(loaded, column, later)
        s.save_job(loaded)
    with JobStore(path) as s:
        assert getattr(s.load_jobs()[0], column) == later


def test_a_job_stored_before_its_groups_were_recorded_has_them_unknown(tmp_path):
    """Not "no groups": h2kd then acts with those of the user database, as the build that stored it did."""
    import sqlite3

    path = tmp_path / "h2kd.sqlite"
    with JobStore(path) as s:
        s.insert_job(dataclasses.replace(new_job("old"), owner_groups=(1000, 27)), "submitted")
        s.insert_job(dataclasses.replace(new_job("none"), owner_groups=()), "submitted")
        assert [j.owner_groups for j in s.load_jobs()] == [(1000, 27), ()]
    with sqlite3.connect(path) as db:    # as a build before owner_groups wrote it
        db.execute("ALTER TABLE jobs DROP COLUMN owner_groups")
    with JobStore(path) as s:
        assert [j.owner_groups for j in s.load_jobs()] == [None, None]


def test_a_damaged_store_is_refused_with_the_reason_not_a_raw_sqlite_error(tmp_path):
    """A file that is no database, and one whose jobs' pages are damaged: opening or reading it says which file
    and what SQLite found (StoreFailed, which h2kd turns into one clear line), not a bare sqlite3 exception."""
    not_a_database = tmp_path / "garbage.sqlite"
    not_a_database.write_bytes(b"this is no SQLite file" * 500)
    with pytest.raises(StoreFailed, match=rf"{not_a_database} cannot be opened \(file is not a database\)"):
        JobStore(not_a_database)

    damaged = tmp_path / "damaged.sqlite"
    with JobStore(damaged) as s:
        for n in range(300):
            s.insert_job(new_job(f"job-{n}", error_message="x" * 200), "submitted")
    with sqlite3.connect(damaged) as db:
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'jobs'").fetchone()
    with open(damaged, "r+b") as f:         # the jobs table's root page, overwritten with noise
        f.seek((root - 1) * page_size)
        f.write(os.urandom(page_size))
    with pytest.raises(StoreFailed, match=rf"{damaged} cannot be (opened|read) \(.*malformed.*\)"):
        s = JobStore(damaged)
        try:
            s.load_jobs()
        finally:
            s.close()


class _CommitFails:
    """The store's connection, but for a COMMIT that fails as SQLite's does when the disk refuses the WAL."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._db, name)


def test_a_batch_the_disk_refuses_fails_its_waiters_and_caller_with_store_failed(tmp_path):
    """Deferred writes whose commit fails: rolled back, and the waiters and the committer (h2kd's stop, which
    goes on past a StoreFailed) get StoreFailed saying so, not SQLite's bare error."""
    s = JobStore(tmp_path / "h2kd.sqlite")

    async def scenario() -> None:
        real = s._db
        with s.deferred():
            s.insert_job(new_job("lost"), "submitted")
        waiter = s.committed()
        s._db = _CommitFails(real)
        try:
            with pytest.raises(StoreFailed, match="cannot be written \\(disk I/O error\\); nothing was changed"):
                s.commit()
        finally:
            s._db = real
        with pytest.raises(StoreFailed):
            await waiter

    asyncio.run(scenario())
    assert [job.id for job in s.load_jobs()] == []
    s.close()


def test_a_damaged_file_that_still_opens_is_told_once_as_damage_and_a_lost_sync_or_a_gone_file_is_not(tmp_path):
    """SQLite's check finds the header's count of free pages wrong (the file opens and loads): the store says
    so, with what the check found, for h2kd to stop rather than be restarted onto it again and again. A file
    removed meanwhile is no damage of the file."""
    path = tmp_path / "h2kd.sqlite"
    told: list[str] = []
    with JobStore(path) as s:
        s.insert_job(new_job("j1"), "submitted")
    with open(path, "r+b") as f:
        f.seek(36)                              # the header's count of free pages
        f.write((7).to_bytes(4, "big"))
    with JobStore(path, on_damage=told.append) as s:
        assert [job.id for job in s.load_jobs()] == ["j1"]
        assert not s.check() and not s.check()
        assert len(told) == 1 and "freelist" in told[0], told

    told.clear()
    sound = tmp_path / "sound.sqlite"
    with JobStore(sound, on_damage=told.append) as s:
        s.insert_job(new_job("j1"), "submitted")
        assert s.check()
        sound.rename(tmp_path / "moved.sqlite")
        assert not s.check()
        (tmp_path / "moved.sqlite").rename(sound)
    assert told == []
