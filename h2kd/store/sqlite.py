"""JobStore: jobs, their state history and their event logs, kept durably in one SQLite file.

Every call that changes something is one transaction, on disk before it returns, so a crash, kill -9 or power
loss at any moment leaves either all of a change or none of it. A job's row, its history and its
"state" event are written together, so the stored state always matches the last history entry.
The store is owned by one process (the daemon); sequence counters are cached in memory after the first read.

Group commit: calls made inside `with store.deferred():` are written (each atomically, as a savepoint) into
one open transaction that is committed once, at the end of the event loop's turn; `store.committed()` gives
a future that resolves when the writes made so far are on disk (or fails with the commit's error, in which
case all of them were rolled back). Many submissions arriving together thus cost one fsync, and their
callers are answered only after it. A call made outside deferred() while writes are pending commits them
together with its own change before it returns, so it keeps the commit-before-return guarantee.

Durability is ours, not SQLite's: a COMMIT writes the transaction into the WAL (synchronous=NORMAL), then the
store fdatasyncs the WAL (_WalFile). A call outside deferred() does so before it returns, as synchronous=FULL
would. So does a group commit while the disk is quick; while its syncs are slow (conversions are writing to
it), a group commit syncs on a thread, so the event loop goes on serving the bus while the disk works, and
committed() resolves only once that sync is done. One group commit is in flight at a time: writes made while
it syncs join the next batch, committed and synced together when it ends.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from h2kd.errors import AlreadyExists, NoSuchJob, StoreFailed
from h2kd.manager.ports import Event
from h2kd.model.job import Job, now_usec
from h2kd.model.states import TERMINAL, JobState

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_INT64_MAX = 2**63 - 1

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE jobs (
    ord INTEGER PRIMARY KEY,            -- insertion order: the order jobs were created in
    id TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    operation TEXT NOT NULL,
    owner INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    queue_seq INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    phase TEXT NOT NULL,
    progress REAL NOT NULL,
    progress_known INTEGER NOT NULL,
    bytes_done INTEGER NOT NULL,
    bytes_total INTEGER NOT NULL,
    rate INTEGER NOT NULL,
    expected_end INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    unit TEXT NOT NULL,
    worker TEXT NOT NULL,
    wait_reason TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    result TEXT NOT NULL,
    error_code TEXT NOT NULL,
    error_message TEXT NOT NULL,
    source_identity TEXT NOT NULL,
    attempts_not_counted INTEGER NOT NULL DEFAULT 0,  -- DEFAULT: an earlier build's inserts leave it out
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts_counted_before INTEGER NOT NULL DEFAULT 0,
    cancelled_by INTEGER NOT NULL DEFAULT -1,
    owner_groups TEXT NOT NULL DEFAULT 'null',         -- JSON: a list of gids, or null when not known
    taken_until INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE history (
    n INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    time INTEGER NOT NULL,
    old_state TEXT NOT NULL,            -- '' for the first entry
    new_state TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX history_job ON history (job_id, n);
CREATE TABLE events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,               -- 1, 2, 3... per job
    time INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""

# What h2kd before the log_tail of a job's result put between a failed job's error message and its unit's last
# log lines (see JobStore._move_log_tails).
LEGACY_LOG_TAIL = "\nlast log lines:\n"
_LOG_TAILS_MOVED = "INSERT INTO settings (name, value) VALUES ('log_tails_in_results', '1')"
_SETTINGS_TABLE = "CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)"


def _damaged(error: sqlite3.DatabaseError) -> bool:
    """Whether SQLite's error says the file itself is damaged (a malformed page, not a database at all)."""
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _cut_tail(error: Any) -> bool:
    """Cut an error object's message (a job result's "error") at LEGACY_LOG_TAIL; whether there was one."""
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or LEGACY_LOG_TAIL not in error["message"]:
        return False
    error["message"] = error["message"].split(LEGACY_LOG_TAIL, 1)[0]
    return True


# Job attributes in column order (every Job field has a column of the same name).
_COLUMNS = ("id", "spec", "operation", "owner", "priority", "state", "queue_seq", "attempt", "phase", "progress",
            "progress_known", "bytes_done", "bytes_total", "rate", "expected_end", "created_at", "started_at",
            "finished_at", "unit", "worker", "wait_reason", "not_before", "result", "error_code", "error_message",
            "source_identity", "attempts_not_counted", "cancel_requested", "attempts_counted_before", "owner_groups",
            "cancelled_by", "taken_until")
_INSERT_JOB = f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
_UPDATE_JOB = f"UPDATE jobs SET {', '.join(c + ' = ?' for c in _COLUMNS[1:])} WHERE id = ?"
# What a transition can change: every column but those fixed at submission (spec above all: no re-encoding).
_FIXED = ("id", "spec", "operation", "owner", "created_at", "owner_groups")
_CHANGING = tuple(c for c in _COLUMNS if c not in _FIXED)
_UPDATE_CHANGING = f"UPDATE jobs SET {', '.join(c + ' = ?' for c in _CHANGING)} WHERE id = ?"
_SELECT_JOBS = f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY ord"
_INSERT_HISTORY = "INSERT INTO history (job_id, time, old_state, new_state, reason) VALUES (?, ?, ?, ?, ?)"
_INSERT_EVENT = "INSERT INTO events (job_id, seq, time, kind, data) VALUES (?, ?, ?, ?, ?)"
_TERMINAL_VALUES = tuple(sorted(s.value for s in TERMINAL))


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _oldest_of_the_most(finished: list[tuple[str, int, int]], excess: int) -> list[str]:
    """`excess` ids of (id, owner, time) rows in time order: each time the oldest job of the owner who has the
    most left (of two with as many, the one whose oldest is older); returned oldest first."""
    if excess <= 0:
        return []
    by_owner: dict[int, deque[tuple[str, int, int]]] = {}
    for row in finished:
        by_owner.setdefault(row[1], deque()).append(row)
    heap = [(-len(rows), rows[0][2], owner) for owner, rows in by_owner.items()]
    heapq.heapify(heap)
    chosen: list[tuple[str, int, int]] = []
    while len(chosen) < excess and heap:
        _, _, owner = heapq.heappop(heap)
        rows = by_owner[owner]
        chosen.append(rows.popleft())
        if rows:
            heapq.heappush(heap, (-len(rows), rows[0][2], owner))
    return [job_id for job_id, _, _ in sorted(chosen, key=lambda row: row[2])]


def _job_values(job: Job) -> list[Any]:
    return [job.id, job.spec_text, job.operation, job.owner, job.priority, job.state.value, job.queue_seq,
            job.attempt, job.phase, float(job.progress), int(job.progress_known), job.bytes_done, job.bytes_total,
            job.rate, job.expected_end, job.created_at, job.started_at, job.finished_at, job.unit, job.worker,
            job.wait_reason, job.not_before, _json(job.result), job.error_code, job.error_message,
            job.source_identity, job.attempts_not_counted, int(job.cancel_requested), job.attempts_counted_before,
            _json(None if job.owner_groups is None else list(job.owner_groups)), job.cancelled_by, job.taken_until]


def _changing_values(job: Job) -> tuple[Any, ...]:
    """The _CHANGING columns of the job, then its id (for _UPDATE_CHANGING)."""
    return (job.priority, job.state.value, job.queue_seq, job.attempt, job.phase, float(job.progress),
            int(job.progress_known), job.bytes_done, job.bytes_total, job.rate, job.expected_end, job.started_at,
            job.finished_at, job.unit, job.worker, job.wait_reason, job.not_before, _json(job.result),
            job.error_code, job.error_message, job.source_identity, job.attempts_not_counted,
            int(job.cancel_requested), job.attempts_counted_before, job.cancelled_by, job.taken_until, job.id)


def _job_from_row(row: tuple[Any, ...]) -> Job:
    values = dict(zip(_COLUMNS, row))
    values["spec"] = json.loads(values["spec"])
    values["result"] = json.loads(values["result"])
    values["state"] = JobState(values["state"])
    values["progress_known"] = bool(values["progress_known"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    groups = json.loads(values["owner_groups"])
    values["owner_groups"] = None if groups is None else tuple(int(g) for g in groups)
    return Job(**values)


class StoreUnusable(StoreFailed):
    """A store no restart of h2kd can use as it is: written by another version, or lost. An administrator must act."""


class JobStore:
    def __init__(self, path: Path, on_sync_lost: Callable[[], None] | None = None,
                 on_damage: Callable[[str], None] | None = None):
        """`on_sync_lost` is called (once) when a committed write could not be synced to disk: from then on
        nobody knows what the file holds, and only reading it afresh (a restart) tells. `on_damage` is called
        (once, from the thread that ran check()) with what SQLite's check found when the file itself is damaged,
        which no restart mends."""
        self.path = Path(path)
        self._on_sync_lost = on_sync_lost
        self._on_damage = on_damage
        self._damage_told = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly, one per changing call.
        if not self.path.exists():
            # Root's alone from its creation, whatever the umask; SQLite gives its -wal and -shm files the same mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            self._open()
        except sqlite3.DatabaseError as e:      # not a database, a damaged page, no room for the WAL
            self._db.close()
            raise StoreFailed(f"the job store {self.path} cannot be opened ({e})") from e
        except StoreFailed:
            self._db.close()
            raise

    def _open(self) -> None:
        self._lock = threading.RLock()   # the daemon is single-threaded; this only guards helper threads
        self._in_batch = False            # a transaction holding deferred writes is open
        self._deferring = 0               # depth of deferred() blocks being run
        self._batch_waiters: list[asyncio.Future[None]] = []
        self._commit_handle: asyncio.Handle | None = None   # the commit of the open batch, when scheduled
        self._commit_due = 0.0
        self._sync_failed = False
        self._commit_when_synced = False
        self._in_sync: list[asyncio.Future[None]] | None = None     # the waiters of the sync on a thread, if any
        (mode,) = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
        # In WAL mode a COMMIT only writes the WAL; _WalFile makes it durable (see the module's docstring).
        self._wal = _WalFile(self.path) if mode == "wal" else None
        self._db.execute("PRAGMA synchronous=NORMAL" if self._wal else "PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        # The WAL is copied back into the database by a thread of its own (_Checkpointer), not by whichever
        # commit happens to cross SQLite's threshold: such a commit held the event loop 10-20 ms.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointer = _Checkpointer(self.path)
        self.unreadable_job_ids: list[str] = []     # of the rows load_jobs() could not read
        self._create_or_check_schema()
        self._add_missing_columns()
        self._move_log_tails()
        self._last_event_seq: dict[str, int] = {}
        # Per job, the first event of the open batch: not committed, so a kill -9 would lose it, and the event
        # then stored in its place would get its number. events() lists none of them until they are committed.
        self._first_uncommitted: dict[str, int] = {}
        (max_seq,) = self._db.execute("SELECT COALESCE(MAX(queue_seq), 0) FROM jobs").fetchone()
        self._next_queue_seq = max_seq + 1
        self._checkpointer.start()

    def _create_or_check_schema(self) -> None:
        with self._transaction():
            exists = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
            if not exists:
                # One statement at a time: executescript() would commit on its own.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                self._db.execute(_SETTINGS_TABLE)
                self._db.execute(_LOG_TAILS_MOVED)     # a new store has none to move
                return
            row = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        if row[0] != SCHEMA_VERSION:
            raise StoreUnusable(f"the job store {self.path} was written by another version of h2kd (schema "
                                f"version {row[0]}; this one reads version {SCHEMA_VERSION}): start the version that "
                                "wrote it, or move the file aside to start with no jobs")

    def _add_missing_columns(self) -> None:
        """Additions made within schema version 1 (stores written by earlier builds get them here)."""
        self._db.execute(_SETTINGS_TABLE)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "source_identity" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN source_identity TEXT NOT NULL DEFAULT ''")
        if "attempts_not_counted" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN attempts_not_counted INTEGER NOT NULL DEFAULT 0")
        if "cancel_requested" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0")
        if "attempts_counted_before" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN attempts_counted_before INTEGER NOT NULL DEFAULT 0")
        if "owner_groups" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN owner_groups TEXT NOT NULL DEFAULT 'null'")
        if "cancelled_by" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN cancelled_by INTEGER NOT NULL DEFAULT -1")
        if "taken_until" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN taken_until INTEGER NOT NULL DEFAULT 0")

    def _move_log_tails(self) -> None:
        """Once, for a store written before a failed unit's last log lines went with the job's result (log_tail):
        they were appended to its error message, which every user may read, as LEGACY_LOG_TAIL + lines. They are
        moved, from the job's error and result and from its "result" events, into the result."""
        if self._db.execute("SELECT 1 FROM settings WHERE name = 'log_tails_in_results'").fetchone():
            return
        with self._transaction() as db:
            rows = db.execute("SELECT id, error_message, result FROM jobs WHERE instr(error_message, ?) > 0",
                              (LEGACY_LOG_TAIL,)).fetchall()
            for job_id, message, result_text in rows:
                head, tail = message.split(LEGACY_LOG_TAIL, 1)
                try:
                    result = json.loads(result_text) if result_text else {}
                except ValueError:
                    result = None       # left as it is: reading the job says what is wrong with it
                if isinstance(result, dict):
                    _cut_tail(result.get("error"))
                    if result.get("status") == "failed":    # a job that failed once and went on keeps no lines
                        result["log_tail"] = tail.splitlines()
                    result_text = _json(result)
                db.execute("UPDATE jobs SET error_message = ?, result = ? WHERE id = ?", (head, result_text, job_id))
            events = db.execute("SELECT job_id, seq, data FROM events WHERE kind = 'result' AND instr(data, ?) > 0",
                                (json.dumps(LEGACY_LOG_TAIL)[1:-1],)).fetchall()
            for job_id, seq, data in events:
                try:
                    value = json.loads(data)
                except ValueError:      # a damaged event stays as it is: the daemon must still start
                    continue
                if isinstance(value, dict) and _cut_tail(value.get("error")):
                    db.execute("UPDATE events SET data = ? WHERE job_id = ? AND seq = ?", (_json(value), job_id, seq))
            db.execute(_LOG_TAILS_MOVED)

    def _failure(self, error: sqlite3.Error) -> StoreFailed:
        return StoreFailed(f"the job store {self.path} cannot be written ({error}); nothing was changed")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            with self._transaction_or_batch() as db:
                yield db
        except sqlite3.IntegrityError:
            raise       # a constraint the caller turns into its own answer (AlreadyExists)
        except sqlite3.DatabaseError as e:     # no room, I/O errors, and a damaged page ("malformed")
            raise self._failure(e) from e

    @contextmanager
    def _transaction_or_batch(self) -> Iterator[sqlite3.Connection]:
        if self._sync_failed:
            raise self._refusal()
        with self._lock:
            if not self._in_batch and not self._deferring:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                self._sync()
                self._checkpointer.written.set()
                return
            if not self._in_batch:
                self._db.execute("BEGIN IMMEDIATE")
                self._in_batch = True
            # Inside the open batch: this call's writes are all or nothing through a savepoint.
            self._db.execute("SAVEPOINT change")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK TO change")
                self._db.execute("RELEASE change")
                raise
            self._db.execute("RELEASE change")
            if not self._deferring:
                self.commit()

    # ---------------------------------------------------------------- group commit

    @contextmanager
    def deferred(self, within: float = 0.0) -> Iterator[None]:
        """Writes in this block join the open batch, committed at the end of the loop's turn (see committed()),
        or up to `within` seconds later for writes nobody waits for (progress events): they then share
        a commit with whatever comes next."""
        with self._lock:
            self._deferring += 1
            try:
                yield
            finally:
                self._deferring -= 1
        if self._in_batch:
            self._schedule_commit(within)

    def committed(self) -> asyncio.Future[None]:
        """A future resolved once every write made so far is committed and on disk (at once if none is
        pending)."""
        future = asyncio.get_running_loop().create_future()
        if not self._in_batch and self._in_sync is not None:
            # Committed, but their sync still runs: a caller answered now (a resubmission finding its job) could
            # lose what it was told is kept.
            self._in_sync.append(future)
        elif not self._in_batch:
            future.set_result(None)
        else:
            self._batch_waiters.append(future)
            self._schedule_commit()
        return future

    def _schedule_commit(self, within: float = 0.0) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to come back: commit now
            self.commit()
            return
        due = loop.time() + within
        if self._commit_handle is not None:
            if self._commit_due <= due:
                return
            self._commit_handle.cancel()
        self._commit_due = due
        self._commit_handle = (loop.call_soon(self._commit_from_loop) if within <= 0
                               else loop.call_later(within, self._commit_from_loop))

    def _commit_from_loop(self) -> None:
        self._commit_handle = None
        if self._wal is not None and self._wal.syncing:
            # One group commit at a time: what arrives meanwhile grows the open batch, committed (and synced)
            # as one when this sync ends. Committing it now would write the same pages to the WAL twice.
            self._commit_when_synced = True
            return
        if self._wal is None or not self._wal.slow:
            # A quick disk is synced at once: handing the sync to a thread and back costs more than it takes.
            try:
                self.commit()
            except Exception:
                pass  # the waiters got the error
            return
        try:
            waiters = self._commit_batch()
        except Exception:
            return  # the waiters got the error
        if waiters is not None:
            self._in_sync = waiters
            self._wal.sync_in_background(lambda error: self._synced(waiters, error))

    def _synced(self, waiters: list[asyncio.Future[None]], error: OSError | None) -> None:
        self._in_sync = None
        _settle(waiters, self._sync_error(error))
        if self._commit_when_synced:
            self._commit_when_synced = False
            if self._in_batch:
                self._schedule_commit()

    def commit(self) -> None:
        """Commit the pending deferred writes now, to disk (a no-op without any). On failure they are all
        rolled back, the waiters fail with the error and it is raised."""
        waiters = self._commit_batch()
        if waiters is None:
            return
        try:
            self._sync()
        except StoreFailed as e:
            _settle(waiters, e)
            raise
        _settle(waiters, None)

    def _sync(self) -> None:
        if self._wal is not None:
            try:
                self._wal.sync()
            except OSError as e:
                raise self._sync_error(e) from e

    def _refusal(self) -> StoreFailed:
        # After a failed fdatasync the kernel may have dropped the pages it could not write: a later commit
        # would build on a file whose content nobody knows.
        return StoreFailed(f"the job store {self.path} takes no change since a write to it could not reach "
                           f"the disk; nothing was changed; h2kd must restart to read it afresh")

    def _sync_error(self, error: OSError | None) -> StoreFailed | None:
        if error is None:
            return None
        first = not self._sync_failed
        self._sync_failed = True
        if first and self._on_sync_lost is not None:
            self._on_sync_lost()
        # The COMMIT itself succeeded: the change may or may not be in the file when h2kd reads it again.
        return StoreFailed(f"the job store {self.path} could not be written to disk ({error}); whether this "
                           f"change was kept is known only once h2kd has restarted and read the store again")

    def _commit_batch(self) -> list[asyncio.Future[None]] | None:
        """COMMIT the open batch (into the WAL: not yet durable) and hand back its waiters; None when there
        was nothing to commit."""
        with self._lock:
            if not self._in_batch or self._deferring:
                return None
            waiters, self._batch_waiters = self._batch_waiters, []
            self._in_batch = False
            if self._commit_handle is not None:
                self._commit_handle.cancel()
                self._commit_handle = None
            try:
                if self._sync_failed:   # writes that joined the batch before the failure was known
                    raise self._refusal()
                self._db.execute("COMMIT")
            except BaseException as e:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                # Sequence numbers cached from rolled-back writes are no longer true.
                self._last_event_seq.clear()
                self._first_uncommitted.clear()
                failure = self._failure(e) if isinstance(e, sqlite3.DatabaseError) else e
                _settle(waiters, failure)
                if failure is e:
                    raise
                raise failure from e
            self._first_uncommitted.clear()
        self._checkpointer.written.set()
        return waiters

    # ---------------------------------------------------------------- jobs

    def insert_job(self, job: Job, reason: str) -> Event:
        """Store a new job with its first history entry and first ("state") event. Raises AlreadyExists."""
        return self.insert_settled_job(job, [("", job.state.value, reason)])[0]

    def insert_settled_job(self, job: Job, steps: Sequence[tuple[str, str, str]]) -> list[Event]:
        """Store a new job that already went through `steps` in memory: (old state, new state, reason) each,
        the first from "" (its creation). Its row in its present state, a history entry and a "state"
        event per step, in one write. Raises AlreadyExists."""
        now = now_usec()
        events = [Event(job.id, seq, now, "state", {"old_state": old, "new_state": new, "reason": reason})
                  for seq, (old, new, reason) in enumerate(steps, start=1)]
        try:
            with self._transaction() as db:
                db.execute(_INSERT_JOB, _job_values(job))
                db.executemany(_INSERT_HISTORY, [(job.id, now, *step) for step in steps])
                db.executemany(_INSERT_EVENT, [(job.id, e.seq, now, "state", _json(e.data)) for e in events])
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"a job with id {job.id!r} is already stored") from None
        self._last_event_seq[job.id] = len(events)
        return events

    def save_job(self, job: Job) -> None:
        """Write every field of the job. Raises NoSuchJob if it was never inserted."""
        with self._transaction() as db:
            self._update(db, job)

    def _update(self, db: sqlite3.Connection, job: Job) -> None:
        values = _job_values(job)
        if db.execute(_UPDATE_JOB, values[1:] + values[:1]).rowcount != 1:
            raise NoSuchJob(f"job {job.id} is not in the store")

    def record_transition(self, job: Job, old: JobState, new: JobState, reason: str) -> Event:
        """Save the job (already in state `new`), its history entry and its "state" event, all at once."""
        if job.state != new:
            raise ValueError(f"job {job.id} is {job.state.value}, not {new.value}: move it before recording")
        now = now_usec()
        data = {"old_state": old.value, "new_state": new.value, "reason": reason}
        with self._transaction() as db:
            if db.execute(_UPDATE_CHANGING, _changing_values(job)).rowcount != 1:
                raise NoSuchJob(f"job {job.id} is not in the store")
            db.execute(_INSERT_HISTORY, (job.id, now, old.value, new.value, reason))
            seq = self._append(db, job.id, now, "state", data)
        self._last_event_seq[job.id] = seq
        return Event(job.id, seq, now, "state", data)

    def load_jobs(self) -> list[Job]:
        """Every stored job, in the order they were created. A row that cannot be read (damaged, or written by a
        newer h2kd with a state this one does not know) is left in the store as it is and named in the log: one
        bad record must not keep h2kd, and every other job, from starting. Their ids are in unreadable_job_ids."""
        jobs = []
        self.unreadable_job_ids = []
        with self._lock:
            try:
                rows = self._db.execute(_SELECT_JOBS).fetchall()
            except sqlite3.DatabaseError as e:
                raise StoreFailed(f"the job store {self.path} cannot be read ({e})") from e
        for row in rows:
            try:
                jobs.append(_job_from_row(row))
            except (ValueError, TypeError, KeyError) as e:
                log.error("job %r in the store %s cannot be read (%s): it is left there as it is, and not loaded",
                          row[0], self.path, e)
                self.unreadable_job_ids.append(str(row[0]))
        return jobs

    def delete_job(self, job_id: str) -> None:
        """Forget a job: its row, history and events."""
        with self._transaction() as db:
            self._delete(db, [job_id])
        self._last_event_seq.pop(job_id, None)

    @staticmethod
    def _delete(db: sqlite3.Connection, job_ids: list[str]) -> None:
        rows = [(i,) for i in job_ids]
        db.executemany("DELETE FROM events WHERE job_id = ?", rows)
        db.executemany("DELETE FROM history WHERE job_id = ?", rows)
        db.executemany("DELETE FROM jobs WHERE id = ?", rows)

    def prune(self, max_age_seconds: float | None, max_count: int | None, now: int | None = None) -> list[str]:
        """Remove finished (completed, failed, cancelled) jobs older than max_age_seconds, and then, beyond
        max_count finished jobs, the oldest of whoever has the most: one user's flood of jobs displaces
        their own records first, not everyone's. None disables a limit; `now` is usec since the epoch.
        Unfinished jobs are never touched. Returns the removed ids, oldest first."""
        now = now_usec() if now is None else now
        with self._transaction() as db:
            finished = db.execute(
                f"SELECT id, owner, CASE WHEN finished_at > 0 THEN finished_at ELSE created_at END AS t FROM jobs "
                f"WHERE state IN ({', '.join('?' for _ in _TERMINAL_VALUES)}) ORDER BY t, ord",
                _TERMINAL_VALUES).fetchall()
            keep_from = 0
            if max_age_seconds is not None:
                limit = now - int(max_age_seconds * 1_000_000)
                while keep_from < len(finished) and finished[keep_from][2] < limit:
                    keep_from += 1
            doomed = [job_id for job_id, _, _ in finished[:keep_from]]
            if max_count is not None:
                doomed += _oldest_of_the_most(finished[keep_from:], len(finished) - keep_from - max(max_count, 0))
            self._delete(db, doomed)
        for job_id in doomed:
            self._last_event_seq.pop(job_id, None)
        return doomed

    def next_queue_seq(self) -> int:
        """A number larger than any queue_seq stored so far: gives FIFO order that survives restarts."""
        with self._lock:
            seq = self._next_queue_seq
            self._next_queue_seq += 1
            return seq

    # ---------------------------------------------------------------- history and events

    def append_event(self, job_id: str, kind: str, data: dict[str, Any]) -> Event:
        """Add an event (kind: state, progress, log, result) to a job's log; its seq follows the last one."""
        now = now_usec()
        with self._transaction() as db:
            seq = self._append(db, job_id, now, kind, data)
        self._last_event_seq[job_id] = seq
        return Event(job_id, seq, now, kind, dict(data))

    def _append(self, db: sqlite3.Connection, job_id: str, now: int, kind: str, data: dict[str, Any]) -> int:
        last = self._last_event_seq.get(job_id)
        if last is None:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise NoSuchJob(f"job {job_id} is not in the store")
            (last,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)).fetchone()
        db.execute(_INSERT_EVENT, (job_id, last + 1, now, kind, _json(data)))
        if self._in_batch:
            self._first_uncommitted.setdefault(job_id, last + 1)
        return last + 1

    def events(self, job_id: str, since: int = 0, limit: int | None = None) -> list[Event]:
        """The job's committed events with seq > since, oldest first (at most `limit` of them). One still in the
        open batch (a progress event, for up to a second) is left out: a number once listed is never given to
        another event, even after a kill -9."""
        # SQLite's integers are 64-bit signed; a caller's "since" may be any unsigned 64-bit number.
        params: tuple[Any, ...] = (job_id, min(since, _INT64_MAX),
                                   self._first_uncommitted.get(job_id, _INT64_MAX))
        sql = "SELECT seq, time, kind, data FROM events WHERE job_id = ? AND seq > ? AND seq < ? ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params += (max(limit, 0),)
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [Event(job_id, seq, t, kind, json.loads(data)) for seq, t, kind, data in rows]

    def count_transitions(self, job_id: str, new_state: str, from_states: Sequence[str] = ()) -> int:
        """How many times the job's history says it went into `new_state` (from one of `from_states`, if given)."""
        sql = "SELECT COUNT(*) FROM history WHERE job_id = ? AND new_state = ?"
        params: tuple[Any, ...] = (job_id, new_state)
        if from_states:
            sql += f" AND old_state IN ({', '.join('?' for _ in from_states)})"
            params += tuple(from_states)
        with self._lock:
            (count,) = self._db.execute(sql, params).fetchone()
        return count

    def history(self, job_id: str) -> list[dict[str, Any]]:
        """The job's state changes, oldest first: {time, old_state, new_state, reason} ('' old_state at first)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT time, old_state, new_state, reason FROM history WHERE job_id = ? ORDER BY n",
                (job_id,)).fetchall()
        return [{"time": t, "old_state": old, "new_state": new, "reason": reason} for t, old, new, reason in rows]

    # ---------------------------------------------------------------- settings

    def get_setting(self, name: str, default: Any = None) -> Any:
        """A daemon setting changed at run time (e.g. the queue paused), kept across restarts."""
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_setting(self, name: str, value: Any) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO settings (name, value) VALUES (?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (name, _json(value)))

    # ---------------------------------------------------------------- housekeeping

    def check(self) -> bool:
        """Whether SQLite finds the file sound (PRAGMA quick_check), it can still be read, and no write failed
        to reach the disk (after a failed fdatasync nobody knows what the disk holds).

        It reads the whole file (seconds for a large store out of the page cache), through a connection of its own,
        so it may run on another thread while the store goes on being used."""
        if self._sync_failed:
            return False
        try:
            # mode=rw: a store file removed or renamed is a failed check, not a new empty database made here
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None,
                                 timeout=30)
            try:
                found = [row[0] for row in db.execute("PRAGMA quick_check").fetchmany(3)]
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            found = [str(e)] if _damaged(e) else []
            if not found:
                return False
        if found == ["ok"]:
            return True
        if self._on_damage is not None and not self._damage_told:
            self._damage_told = True
            self._on_damage("; ".join(found))
        return False

    def close(self) -> None:
        self._checkpointer.stop()
        with self._lock:
            try:
                self.commit()
            except StoreFailed:
                if not self._sync_failed:   # after a failed sync, the pending writes were refused (and said so)
                    raise
            finally:
                self._db.close()   # the last connection to close checkpoints what is left
                if self._wal is not None:
                    self._wal.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _settle(waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for waiter in waiters:
        if not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


class _WalFile:
    """The store's write-ahead log, made durable with fdatasync: at once, or on a thread for group commits."""

    SLOW_SECONDS = 0.003   # syncs taking longer than this (on average) are worth moving off the event loop

    def __init__(self, db_path: Path):
        self._path = str(db_path) + "-wal"
        self._fd = -1
        self.syncing = False     # a sync_in_background() has not called back yet
        self._typical = 0.0      # moving average of how long a sync takes, in seconds

    @property
    def slow(self) -> bool:
        return self._typical > self.SLOW_SECONDS

    def _timed_sync(self, fd: int) -> None:
        started = time.monotonic()
        try:
            os.fdatasync(fd)
        finally:
            self._typical = 0.7 * self._typical + 0.3 * (time.monotonic() - started)

    def _descriptor(self) -> int:
        if self._fd >= 0 and os.fstat(self._fd).st_nlink > 0:
            return self._fd
        if self._fd >= 0:       # SQLite removed the WAL (it does when the last connection closes)
            os.close(self._fd)
            self._fd = -1
        self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        # A new WAL file must also be found after a crash: its directory entry goes to disk once.
        directory = os.open(os.path.dirname(self._path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return self._fd

    def sync(self) -> None:
        """Everything written to the WAL so far is on disk when this returns. Raises OSError."""
        self._timed_sync(self._descriptor())

    def sync_in_background(self, done: Callable[[OSError | None], None]) -> None:
        """From the event loop, one at a time: call done(None), or done(the error), in the loop once everything
        written to the WAL so far is on disk."""
        try:
            fd = self._descriptor()
        except OSError as e:
            done(e)
            return
        self.syncing = True
        running = asyncio.get_running_loop().run_in_executor(None, self._timed_sync, fd)
        running.add_done_callback(lambda future: self._finished(future, done))

    def _finished(self, future: asyncio.Future[None], done: Callable[[OSError | None], None]) -> None:
        self.syncing = False
        error = None if future.cancelled() else future.exception()
        done(error if error is None or isinstance(error, OSError) else OSError(str(error)))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Checkpointer(threading.Thread):
    """Copies the WAL back into the database file in the background (PASSIVE: never waits for, nor blocks,
    the writer), at most once a second and only after something was written."""

    INTERVAL = 1.0

    def __init__(self, path: Path):
        super().__init__(name="h2kd-store-checkpoint", daemon=True)
        self._path = path
        self.written = threading.Event()
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            db = sqlite3.connect(str(self._path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return
        try:
            while not self._stopping.is_set():
                self.written.wait()
                self.written.clear()
                if self._stopping.is_set():
                    break
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    pass   # disk full, busy: the next write tries again; the WAL keeps everything meanwhile
                self._stopping.wait(self.INTERVAL)
        finally:
            db.close()

    def stop(self) -> None:
        self._stopping.set()
        self.written.set()
        if self.is_alive():
            self.join(timeout=10)
