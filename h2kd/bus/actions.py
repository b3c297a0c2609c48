"""Job commands reachable from both Manager and Job objects, each behind its polkit action.

Cancelling, retrying or starting one's own job needs ...cancel; another user's job needs
...cancel-other-user. The owner of a job is the uid that submitted it. Retrying or starting a job that
repairs a guest runs the guest's programs as root again, so it needs ...fix-guest as well, as its
submission did.
"""

from __future__ import annotations

from typing import Any

from h2kd.bus.base import Authorizer
from h2kd.errors import InvalidState
from h2kd.model.repair import fixes_guest

MAX_AUTHORIZATIONS = 3


class JobCommands:
    def __init__(self, manager: Any, authorizer: Authorizer):
        self._manager = manager
        self._auth = authorizer

    async def _authorize_for(self, job_id: str, runs_it: bool = False) -> None:
        """Ask polkit for what this job needs; again if, while it answered (which can take an administrator's
        minutes), the job was removed and another submitted under its id: the answer was for the first."""
        for _ in range(MAX_AUTHORIZATIONS):
            job = self._manager.get(job_id)           # NoSuchJob before asking polkit anything
            uid = await self._auth.caller_uid()
            action = "cancel" if uid == job.owner else "cancel-other-user"
            details = {"job_id": job_id, "owner": str(job.owner)}
            await self._auth.check(action, details)
            if runs_it and fixes_guest(job.spec):
                await self._auth.check("fix-guest", details)
            if self._manager.get(job_id) is job:
                return
        raise InvalidState(f"job {job_id} was replaced by another job of that id while being authorized; "
                           "try again")

    async def cancel(self, job_id: str) -> None:
        await self._authorize_for(job_id)
        await self._manager.cancel(job_id)

    async def retry(self, job_id: str) -> None:
        await self._authorize_for(job_id, runs_it=True)
        self._manager.retry(job_id)

    async def start(self, job_id: str) -> None:
        await self._authorize_for(job_id, runs_it=True)
        self._manager.start_job(job_id)
