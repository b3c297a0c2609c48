"""Job commands reachable from both Manager and Job objects, each behind its polkit action.

Cancelling, retrying or starting one's own job needs ...cancel; another user's job needs
...cancel-other-user. The owner of a job is the uid that submitted it.
"""

from __future__ import annotations

from typing import Any

from h2kd.bus.base import Authorizer


class JobCommands:
    def __init__(self, manager: Any, authorizer: Authorizer):
        self._manager = manager
        self._auth = authorizer

    async def _authorize_for(self, job_id: str) -> None:
        job = self._manager.get(job_id)           # NoSuchJob before asking polkit anything
        uid = await self._auth.caller_uid()
        action = "cancel" if uid == job.owner else "cancel-other-user"
        await self._auth.check(action, {"job_id": job_id, "owner": str(job.owner)})

    async def cancel(self, job_id: str) -> None:
        await self._authorize_for(job_id)
        await self._manager.cancel(job_id)

    async def retry(self, job_id: str) -> None:
        await self._authorize_for(job_id)
        self._manager.retry(job_id)

    async def start(self, job_id: str) -> None:
        await self._authorize_for(job_id)
        self._manager.start_job(job_id)
