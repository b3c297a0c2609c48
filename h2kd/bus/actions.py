"""Job commands reachable from both Manager and Job objects, each behind its polkit action.

Reading a job's Result is for its owner, root, and callers polkit grants ...read-other-user without asking (a read
never prompts); everything else about a job is for anyone to read.

Submitting needs ...submit; a job that repairs a guest needs ...fix-guest instead, and one that asks for a priority
more urgent than the default needs ...manage as well, as changing a job's priority does: otherwise any submitter
could put their jobs ahead of everyone's. Cancelling, retrying or starting one's own job needs ...cancel; another
user's job needs ...cancel-other-user. The owner of a job is the uid that submitted it. Retrying or starting a job
that repairs a guest runs the guest's programs as root again, so it needs ...fix-guest as well, as its submission
did.
"""

from __future__ import annotations

from typing import Any

from h2kd.bus.auth import ACTION_READ_OTHER_USER
from h2kd.bus.base import Authorizer
from h2kd.errors import AuthorizationUnavailable, InteractiveAuthorizationRequired, InvalidState, NotAuthorized
from h2kd.model.repair import fixes_guest
from h2kd.model.spec import DEFAULT_PRIORITY

MAX_AUTHORIZATIONS = 3


class JobCommands:
    def __init__(self, manager: Any, authorizer: Authorizer):
        self._manager = manager
        self._auth = authorizer

    async def authorize_submission(self, spec: dict[str, Any]) -> None:
        """The spec as submitted, before validation: a priority that is not a whole number is refused later."""
        await self._auth.check("fix-guest" if fixes_guest(spec) else "submit")
        policy = spec.get("execution_policy")
        priority = policy.get("priority") if isinstance(policy, dict) else None
        if isinstance(priority, int) and not isinstance(priority, bool) and priority < DEFAULT_PRIORITY:
            await self._auth.check("manage", {"priority": str(priority)})

    async def _authorize_for(self, job_id: str, runs_it: bool = False) -> int:
        """Ask polkit for what this job needs; again if, while it answered (which can take an administrator's
        minutes), the job was removed and another submitted under its id: the answer was for the first.
        Returns the caller's uid."""
        for _ in range(MAX_AUTHORIZATIONS):
            job = self._manager.get(job_id)           # NoSuchJob before asking polkit anything
            uid = await self._auth.caller_uid()
            action = "cancel" if uid == job.owner else "cancel-other-user"
            details = {"job_id": job_id, "owner": str(job.owner)}
            await self._auth.check(action, details)
            if runs_it and fixes_guest(job.spec):
                await self._auth.check("fix-guest", details)
            if self._manager.get(job_id) is job:
                return uid
        raise _replaced(job_id)

    async def read_result(self, job_id: str, result_of: Any) -> Any:
        """result_of(job) for the caller, if they may read the job's result (see the module docstring)."""
        for _ in range(MAX_AUTHORIZATIONS):
            job = self._manager.get(job_id)
            if await self._auth.caller_uid() not in (0, job.owner):
                try:
                    await self._auth.check("read-other-user", {"job_id": job_id, "owner": str(job.owner)},
                                           interactive=False)
                except AuthorizationUnavailable:
                    raise           # no answer is not a no: its own words say to try again
                except (NotAuthorized, InteractiveAuthorizationRequired):
                    raise NotAuthorized(f"the result of job {job_id} is for its owner (uid {job.owner}) and "
                                        f"administrators to read (polkit action {ACTION_READ_OTHER_USER})") from None
            if self._manager.get(job_id) is job:
                return result_of(job)
        raise _replaced(job_id)

    async def cancel(self, job_id: str) -> None:
        await self._manager.cancel(job_id, by=await self._authorize_for(job_id))

    async def retry(self, job_id: str) -> None:
        self._manager.retry(job_id, by=await self._authorize_for(job_id, runs_it=True))

    async def start(self, job_id: str) -> None:
        self._manager.start_job(job_id, by=await self._authorize_for(job_id, runs_it=True))

    async def remove(self, job_id: str) -> None:
        await self._authorize_managing(job_id)
        self._manager.remove(job_id)

    async def set_priority(self, job_id: str, priority: int) -> None:
        await self._authorize_managing(job_id)
        self._manager.set_priority(job_id, priority)

    async def _authorize_managing(self, job_id: str) -> None:
        """...manage, asked for this job: InvalidState if, while polkit answered (an administrator's prompt may
        stay open for minutes), it was removed and another submitted under its id, which the administrator was
        not shown."""
        job = self._manager.get(job_id)           # NoSuchJob before asking polkit anything
        await self._auth.check("manage", {"job_id": job_id})
        if self._manager.get(job_id) is not job:
            raise _replaced(job_id)


def _replaced(job_id: str) -> InvalidState:
    return InvalidState(f"job {job_id} was replaced by another job of that id while being authorized; try again")
