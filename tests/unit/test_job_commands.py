"""Which polkit actions a job command asks for (h2kd.bus.actions), checked without a bus."""

from __future__ import annotations

import asyncio

import pytest

from h2kd.bus.actions import JobCommands
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
