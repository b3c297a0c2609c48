"""UnfinishedJobs: the jobs not yet ended, counted per owner, and the limits on them (max_queued_jobs in all,
max_jobs_per_user for any one user but root).

Jobs held with queue=false count too: each is kept in memory until it ends, and never ends on its own, so
without a limit one member of the submitting group could grow a root daemon without bound.
"""

from __future__ import annotations

from h2kd.errors import QueueFull
from h2kd.model.job import Job
from h2kd.model.states import TERMINAL


class UnfinishedJobs:
    def __init__(self, max_total: int, max_per_user: int):
        self._max_total = max_total
        self._max_per_user = max_per_user
        self._by_owner: dict[int, set[str]] = {}    # owner uid -> ids of its jobs in any state but TERMINAL

    def __len__(self) -> int:
        return sum(map(len, self._by_owner.values()))

    def track(self, job: Job) -> None:
        """Count the job (after any change of its state) while it is unfinished."""
        if job.state in TERMINAL:
            self.forget(job)
        else:
            self._by_owner.setdefault(job.owner, set()).add(job.id)

    def forget(self, job: Job) -> None:
        ids = self._by_owner.get(job.owner)
        if ids is not None:
            ids.discard(job.id)
            if not ids:
                del self._by_owner[job.owner]

    def check_room_for(self, owner: int) -> None:
        """Raise QueueFull if one more unfinished job of `owner` would pass a limit."""
        total = len(self)
        if total >= self._max_total:
            raise QueueFull(f"h2kd already holds {total} unfinished jobs, its limit (max_queued_jobs); "
                            f"wait for some to finish, or cancel some")
        mine = len(self._by_owner.get(owner, ()))
        if owner != 0 and mine >= self._max_per_user:
            raise QueueFull(f"uid {owner} already has {mine} unfinished jobs, the limit for one user "
                            f"(max_jobs_per_user); wait for some to finish, or cancel some")
