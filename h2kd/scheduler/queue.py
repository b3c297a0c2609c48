"""Scheduler: which queued job runs next, and on which worker.

Ten priority levels (1 most urgent). Within a level the owners (submitting users) take turns: next is the job of the
owner with the fewest jobs running (or ahead of it in the queue), among those the owner whose last turn was longest
ago, then first come first served (by queue_seq); one owner's own jobs keep their order. So one user's batch of
hundreds does not hold back another user's single job for its whole length. A job that no worker can run, or that
waits out a retry backoff, is skipped rather than blocking the jobs behind it, and every waiting job has a reason a
person can read. Knows nothing of job states or storage: the manager feeds it.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

from h2kd.manager.ports import WorkerInfo

PRIORITY_LEVELS = 10
BUILTIN_KIND = "builtin"
STALE = "stale"
MAX_REASON = 256   # a wait reason names every missing requirement: a job's may be long, the replies listing them not


# ---------------------------------------------------------------- capability matching

class _Missing(NamedTuple):
    need: str          # what the job needs, as a noun phrase: "nbd", "the vhdx format"
    detail: str = ""   # what this worker has instead, if that helps


def _number(value: Any) -> float | None:
    """A capability's amount; a mapping (e.g. free bytes per output root) counts as its largest entry."""
    if isinstance(value, dict):
        numbers = [v for v in value.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return max(numbers) if numbers else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


_AMOUNT_NAMES = {"free_bytes": "free space", "memory_mb": "memory", "cpus": "CPUs"}


def _amount(key: str, value: float) -> str:
    if key.endswith("_bytes"):
        for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if value >= size:
                return f"{value / size:.1f} {unit}"
        return f"{value:g} bytes"
    if key.endswith("_mb"):
        return f"{value:g} MB"
    return f"{value:g}"


def _missing(worker: WorkerInfo, operation: str, requirements: dict[str, Any]) -> _Missing | None:
    caps = worker.capabilities or {}
    operations = caps.get("operations")
    if operations is not None and operation not in operations:
        return _Missing(f"the {operation} operation")
    for key, wanted in requirements.items():
        if wanted is None or wanted is False:
            continue                                  # not needed
        if key.startswith("min_"):
            name = key[4:]
            what = _AMOUNT_NAMES.get(name, name.replace("_", " "))
            need = f"{_amount(key, wanted)} of {what}"
            have = _number(caps.get(name))
            if have is None:
                return _Missing(need, f"it does not advertise {name}")
            if have < wanted:
                return _Missing(need, f"it has {_amount(key, have)}")
            continue
        if key not in caps:
            return _Missing(_need(key, wanted), "" if wanted is True else f"it does not advertise {key}")
        offered = caps[key]
        if wanted is True:
            if offered is not True:
                return _Missing(key)
        elif isinstance(wanted, list):
            offered_list = offered if isinstance(offered, list) else [offered]
            absent = [w for w in wanted if w not in offered_list]
            if absent:
                return _Missing(_need(key, absent))
        elif isinstance(offered, list):
            if wanted not in offered:
                return _Missing(_need(key, wanted))
        elif offered != wanted:
            return _Missing(_need(key, wanted), f"it has {key}={_show(offered)}")
    return None


def _need(key: str, wanted: Any) -> str:
    if wanted is True:
        return key
    if isinstance(wanted, list):
        if key == "formats":
            names = [str(w) for w in wanted]
            return f"the {names[0]} format" if len(names) == 1 else "the formats " + ", ".join(names)
        return f"{key} " + ", ".join(_show(w) for w in wanted)
    return f"{key}={_show(wanted)}"


def _show(value: Any) -> str:
    return _cut(str(value).lower() if isinstance(value, bool) else str(value), 64)


def _cut(text: str, length: int) -> str:
    return text if len(text) <= length else text[:length - 3] + "..."


def worker_can_run(worker: WorkerInfo, operation: str, requirements: dict[str, Any]) -> str | None:
    """None when the worker can run such a job, else why not (e.g. "does not offer nbd").

    A requirement is met when the worker's capabilities say so: a flag (nbd, loop, lvm, dm, qemu_img...) must be
    true, every listed value (formats) offered, a min_<name> amount at most the worker's <name> (min_free_bytes
    against free_bytes, min_memory_mb against memory_mb), any other value equal. A requirement the worker does
    not advertise at all is not met. A worker listing "operations" runs only those. Stale workers run nothing.
    """
    if worker.state == STALE:
        return "is stale (it missed its heartbeats)"
    missing = _missing(worker, operation, requirements)
    if missing is None:
        return None
    return f"does not offer {missing.need}" + (f" ({missing.detail})" if missing.detail else "")


# ---------------------------------------------------------------- the queue

@dataclass
class _Entry:
    job_id: str
    priority: int
    queue_seq: int
    operation: str
    requirements: dict[str, Any]
    not_before: int = 0
    owner: int = 0
    since: int = 0      # usec: when it joined the queue (or, queued before h2kd started, when h2kd loaded it)
    needs: str = ""     # operation and requirements as one string: jobs with equal needs share match results

    def __post_init__(self) -> None:
        self.needs = self.operation + "\0" + repr(sorted(self.requirements.items()))

    @property
    def key(self) -> tuple[int, str]:
        return (self.queue_seq, self.job_id)


@dataclass
class _Context:
    """What the last pick() saw, kept so that wait_reasons() can explain the jobs it did not start."""

    running: int
    workers: list[WorkerInfo]
    free: dict[str, int]            # worker id -> slots still free after the pick (a large number when unbounded)
    now: int
    memo: dict[tuple[str, str], _Missing | None] = field(default_factory=dict)
    claimers: list[WorkerInfo] = field(default_factory=list)   # external workers, which claim jobs themselves
    builtin_away: str | None = None                            # why this host's own worker runs nothing now
    reasons: dict[str, str] = field(default_factory=dict)      # needs -> why such a job waits


_UNBOUNDED = 1 << 30


def _check_priority(priority: int) -> None:
    if isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= PRIORITY_LEVELS:
        raise ValueError(f"priority must be a whole number from 1 to {PRIORITY_LEVELS}, not {priority!r}")


def _clock(usec: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(usec / 1_000_000))


class Scheduler:
    def __init__(self, max_parallel: int):
        self.max_parallel = max_parallel
        self._paused = False
        self._entries: dict[str, _Entry] = {}
        # Per level, per owner, the (queue_seq, job_id) keys in FIFO order.
        self._levels: list[dict[int, list[tuple[int, str]]]] = [{} for _ in range(PRIORITY_LEVELS)]
        self._running_by_owner: dict[int, int] = {}   # as of the last pick or claim
        self._turn = 0                                 # counts the jobs taken from the queue
        self._last_turn: dict[int, int] = {}           # owner -> the count when a job of theirs was last taken
        self._context: _Context | None = None

    # ---------------------------------------------------------------- settings

    @property
    def max_parallel(self) -> int:
        return self._max_parallel

    @max_parallel.setter
    def max_parallel(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"the number of parallel jobs must be a whole number of at least 0, not {n!r}")
        self._max_parallel = n

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    # ---------------------------------------------------------------- contents

    def add(self, job_id: str, priority: int, queue_seq: int, operation: str, requirements: dict[str, Any],
            not_before_usec: int = 0, owner: int = 0, since_usec: int = 0) -> None:
        """Queue a job (since_usec: now, for oldest_since). Raises ValueError if it is already queued or the priority
        is not 1..10."""
        _check_priority(priority)
        if job_id in self._entries:
            raise ValueError(f"job {job_id} is already queued")
        entry = _Entry(job_id, priority, queue_seq, operation, dict(requirements or {}), not_before_usec, owner,
                       since_usec)
        self._entries[job_id] = entry
        self._link(entry)

    def _link(self, entry: _Entry) -> None:
        bisect.insort(self._levels[entry.priority - 1].setdefault(entry.owner, []), entry.key)

    def remove(self, job_id: str) -> bool:
        """Take a job out of the queue; False if it was not queued."""
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return False
        self._unlink(entry)
        return True

    def _unlink(self, entry: _Entry) -> None:
        level = self._levels[entry.priority - 1]
        keys = level[entry.owner]
        del keys[bisect.bisect_left(keys, entry.key)]
        if not keys:
            del level[entry.owner]

    def set_priority(self, job_id: str, priority: int) -> None:
        """Move a queued job to another level; among that level's jobs it keeps its place by queue_seq."""
        _check_priority(priority)
        entry = self._entries.get(job_id)
        if entry is None:
            raise KeyError(f"job {job_id} is not queued")
        self._unlink(entry)
        entry.priority = priority
        self._link(entry)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def counts_by_priority(self) -> list[int]:
        """How many jobs wait at each level, priority 1 first."""
        return [sum(map(len, level.values())) for level in self._levels]

    def _in_order(self, takes: Callable[[_Entry], bool] | None = None) -> Iterator[_Entry]:
        """The queued jobs in the order they get their turn: by level; within one, owners in turn (see above).

        takes: whether a job can go now (a worker fits it, its backoff is over), asked as its turn comes; one
        that cannot is passed over without using its owner's turn, and only the jobs taken are yielded. So a
        user's jobs that no worker runs do not put their other jobs behind everyone else's."""
        load = dict(self._running_by_owner)     # jobs each owner has running, then also ahead in this order
        last = dict(self._last_turn)
        turn = self._turn
        for level in self._levels:
            # (load, last turn, key of its next job, owner, index of that job): the lowest goes next.
            turns = [(load.get(owner, 0), last.get(owner, 0), keys[0], owner, 0) for owner, keys in level.items()]
            heapq.heapify(turns)
            while turns:
                taken, previous, key, owner, index = turns[0]
                entry = self._entries[key[1]]
                if takes is None or takes(entry):
                    yield entry
                    turn += 1
                    taken, previous = taken + 1, turn
                    load[owner], last[owner] = taken, previous
                keys = level[owner]
                if index + 1 < len(keys):
                    heapq.heapreplace(turns, (taken, previous, keys[index + 1], owner, index + 1))
                else:
                    heapq.heappop(turns)

    def _taken(self, job_id: str) -> None:
        """A job leaves the queue to run: its owner has one more running and has had a turn."""
        owner = self._entries[job_id].owner
        self._running_by_owner[owner] = self._running_by_owner.get(owner, 0) + 1
        self._turn += 1
        self._last_turn[owner] = self._turn
        self.remove(job_id)

    def oldest_since(self) -> int:
        """When (usec) the job that has been queued longest joined the queue; 0 with none queued."""
        return min((entry.since for entry in self._entries.values()), default=0)

    def ordered(self) -> list[str]:
        """Queued job ids, most urgent first: by priority, then owners in turn, then first come first served."""
        return [entry.job_id for entry in self._in_order()]

    # ---------------------------------------------------------------- choosing

    def pick(self, running: int, workers: list[WorkerInfo], now_usec: int,
             running_by_owner: dict[int, int] | None = None,
             builtin_away: str | None = None) -> list[tuple[str, WorkerInfo]]:
        """The queued jobs to start now on builtin workers, most urgent first, each with its worker.

        Respects the pause, MaxParallelJobs (given `running` jobs, of the builtin workers), each worker's free
        slots and retry backoff. A job no worker can run is passed over. External workers among `workers` are
        not given jobs (they claim them), but the wait reasons count them. running_by_owner: how many jobs each
        owner has running on any worker, for their turns. builtin_away: why this host's own worker, left out of
        `workers`, runs nothing now (systemd away), for the reasons of the jobs no other worker takes. The chosen
        jobs leave the queue; a caller that cannot start one must add() it again.
        """
        self._running_by_owner = dict(running_by_owner or {})
        live = [w for w in workers if w.state != STALE]
        usable = [w for w in live if w.kind == BUILTIN_KIND]
        free = {w.id: _free_slots(w) for w in live}
        context = _Context(running, usable, free, now_usec, claimers=[w for w in live if w.kind != BUILTIN_KIND],
                           builtin_away=builtin_away)
        self._context = context
        chosen: list[tuple[str, WorkerInfo]] = []
        if self._paused:
            return chosen
        def room_left() -> bool:
            return running + len(chosen) < self._max_parallel and any(n > 0 for n in free.values())

        def runs_now(entry: _Entry) -> bool:
            return entry.not_before <= now_usec and self._first_with_room(entry, context) is not None

        for entry in self._in_order(runs_now) if room_left() else ():
            worker = self._first_with_room(entry, context)
            assert worker is not None
            free[worker.id] -= 1
            chosen.append((entry.job_id, worker))
            if not room_left():
                break
        for job_id, _ in chosen:
            self._taken(job_id)
        context.running = running + len(chosen)
        return chosen

    def _first_with_room(self, entry: _Entry, context: _Context) -> WorkerInfo | None:
        for worker in context.workers:
            if context.free[worker.id] > 0 and self._fits(worker, entry, context) is None:
                return worker
        return None

    @staticmethod
    def _fits(worker: WorkerInfo, entry: _Entry, context: _Context) -> _Missing | None:
        # Many jobs share the same needs: remember the answer for the worker within one pass.
        memo_key = (worker.id, entry.needs)
        if memo_key not in context.memo:
            context.memo[memo_key] = _missing(worker, entry.operation, entry.requirements)
        return context.memo[memo_key]

    def claim_for(self, worker: WorkerInfo, now_usec: int,
                  running_by_owner: dict[int, int] | None = None) -> str | None:
        """The most urgent queued job this (external) worker can run now, taken out of the queue; None if none."""
        self._running_by_owner = dict(running_by_owner or {})
        if self._paused or worker.state == STALE:
            return None
        if worker.max_jobs > 0 and worker.active_jobs >= worker.max_jobs:
            return None
        memo: dict[tuple[str, str], _Missing | None] = {}
        context = _Context(0, [worker], {}, now_usec, memo)
        found = next((entry.job_id for entry in self._in_order(
            lambda entry: entry.not_before <= now_usec and self._fits(worker, entry, context) is None)), None)
        if found is not None:
            self._taken(found)
        return found

    # ---------------------------------------------------------------- explaining

    def wait_reasons(self, limit: int | None = None) -> dict[str, str]:
        """Why each queued job is not running, as of the last pick(); each reason at most MAX_REASON characters.
        limit: only the first `limit` jobs, most urgent first; without it, every job in no particular order (jobs
        of the same needs share one reason, so ten thousand cost little more than one)."""
        entries = self._entries.values() if limit is None else itertools.islice(self._in_order(), limit)
        return {entry.job_id: self._reason(entry) for entry in entries}

    def _reason(self, entry: _Entry) -> str:
        if self._paused:
            return "queue is paused"
        context = self._context
        if context is None:
            return "waiting to be scheduled"
        if entry.not_before > context.now:
            return f"retry backoff until {_clock(entry.not_before)}"
        reason = context.reasons.get(entry.needs)
        if reason is None:
            reason = context.reasons[entry.needs] = _cut(self._reason_for_needs(entry, context), MAX_REASON)
        return reason

    def _reason_for_needs(self, entry: _Entry, context: _Context) -> str:
        workers = context.workers + context.claimers
        if not workers:
            return f"no worker is available ({context.builtin_away})" if context.builtin_away else \
                "no worker is available"
        misses = [self._fits(w, entry, context) for w in workers]
        if all(miss is not None for miss in misses):
            if context.builtin_away:    # what the others lack says little while this host's worker is away
                return f"this host's worker is unavailable ({context.builtin_away}), and no other offers what " \
                       "it needs"
            return _no_worker_reason([m for m in misses if m is not None])
        able = [w for w, miss in zip(context.workers, misses) if miss is None]
        claimers = [w for w, miss in zip(context.claimers, misses[len(context.workers):]) if miss is None]
        with_room = [w for w in claimers if context.free[w.id] > 0]
        named = f"worker {with_room[0].name or with_room[0].id}" if len(with_room) == 1 else None
        if not able:    # only external workers can run it: one of them must claim it
            if with_room:
                return f"waiting for {named or 'one of the workers that can run it'} to claim it"
            if len(claimers) == 1:
                w = claimers[0]
                return f"waiting for a free slot on worker {w.name or w.id} ({w.active_jobs} of {w.max_jobs} busy)"
            return "waiting for a free slot on a worker that can run it"
        also = f" or for {named or 'a worker that can run it'} to claim it" if with_room else ""
        if context.running >= self._max_parallel:
            return f"waiting for a free slot ({context.running} of {self._max_parallel} running){also}"
        if all(context.free[w.id] <= 0 for w in able):
            if len(able) == 1:
                w = able[0]
                busy = w.max_jobs - context.free[w.id]
                return f"waiting for a free slot on worker {w.name or w.id} ({busy} of {w.max_jobs} busy){also}"
            return f"waiting for a free slot on a worker that can run it{also}"
        return "waiting for the next scheduling pass"


def _free_slots(worker: WorkerInfo) -> int:
    return worker.max_jobs - worker.active_jobs if worker.max_jobs > 0 else _UNBOUNDED


def _no_worker_reason(misses: list[_Missing]) -> str:
    needs = list(dict.fromkeys(m.need for m in misses))
    if len(needs) == 1:
        details = list(dict.fromkeys(m.detail for m in misses if m.detail))
        return f"no worker offers {needs[0]}" + (f" ({details[0]})" if len(details) == 1 else "")
    return "no worker offers everything it needs (" + "; ".join(needs) + ")"
