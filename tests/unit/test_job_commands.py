"""Which polkit actions a job command asks for (h2kd.bus.actions), checked without a bus."""

from __future__ import annotations

import asyncio

import pytest

from h2kd.bus.actions import JobCommands
from h2kd.errors import InvalidState
from h2kd.model.job import Job


class RecordingAuthorizer:
    def __init__(self, uid: int):
        self.uid = uid
        self.asked: list[str] = []

    async def caller_uid(self) -> int:
        return self.uid

    async def check(self, action: str, details: dict[str, str] | None = None) -> None:
        self.asked.append(action)


class OneJob:
    def __init__(self, job: Job):
        self.job = job
        self.done: list[str] = []

    def get(self, job_id: str) -> Job:
        return self.job

    async def cancel(self, job_id: str) -> None:
        self.done.append("cancel")

    def retry(self, job_id: str) -> None:
        self.done.append("retry")

    def start_job(self, job_id: str) -> None:
        self.done.append("start")


def _asked(spec: dict, command: str, caller: int = 1000) -> list[str]:
    job = Job(id="j1", spec=spec, operation=spec["operation"], owner=1000)
    auth, manager = RecordingAuthorizer(caller), OneJob(job)
    asyncio.run(getattr(JobCommands(manager, auth), command)("j1"))   # type: ignore[arg-type]
    assert manager.done == [command]
    return auth.asked


CONVERT = {"operation": "convert", "image": {"path": "/srv/a.vmdk"}, "parameters": {}}
FIX = {"operation": "offline_fix", "image": {"path": "/srv/a.qcow2"}, "parameters": {}}
CONVERT_AND_FIX = {"operation": "convert", "image": {"path": "/srv/a.vmdk"}, "parameters": {"offline_fix": True}}


@pytest.mark.parametrize("command", ["retry", "start"])
def test_running_a_guest_repair_again_needs_fix_guest_like_its_submission(command: str) -> None:
    assert _asked(CONVERT, command) == ["cancel"]
    assert _asked(FIX, command) == ["cancel", "fix-guest"]
    assert _asked(CONVERT_AND_FIX, command) == ["cancel", "fix-guest"]
    assert _asked(FIX, command, caller=1001) == ["cancel-other-user", "fix-guest"]


def test_cancelling_a_guest_repair_needs_only_the_cancel_right() -> None:
    assert _asked(FIX, "cancel") == ["cancel"]


class ReplacedWhileAsking(RecordingAuthorizer):
    """While polkit is asked about the job, it is removed and someone else submits one of the same id."""

    def __init__(self, uid: int, manager: OneJob, replacements: list[Job]):
        super().__init__(uid)
        self.manager, self.replacements = manager, replacements

    async def check(self, action: str, details: dict[str, str] | None = None) -> None:
        await super().check(action, details)
        if self.replacements:
            self.manager.job = self.replacements.pop(0)


def test_a_job_replaced_during_authorization_is_authorized_again() -> None:
    mine = Job(id="j1", spec=CONVERT, operation="convert", owner=1000)
    theirs = Job(id="j1", spec=FIX, operation="offline_fix", owner=1001)
    manager = OneJob(mine)
    auth = ReplacedWhileAsking(1000, manager, [theirs])
    asyncio.run(JobCommands(manager, auth).retry("j1"))   # type: ignore[arg-type]
    # The answer for the caller's own job does not stand for the other user's guest repair.
    assert auth.asked == ["cancel", "cancel-other-user", "fix-guest"] and manager.done == ["retry"]


def test_a_job_replaced_at_every_answer_is_not_acted_on() -> None:
    jobs = [Job(id="j1", spec=CONVERT, operation="convert", owner=1000 + n) for n in range(5)]
    manager = OneJob(jobs[0])
    auth = ReplacedWhileAsking(1000, manager, jobs[1:])
    with pytest.raises(InvalidState, match="replaced by another job"):
        asyncio.run(JobCommands(manager, auth).cancel("j1"))   # type: ignore[arg-type]
    assert manager.done == []
