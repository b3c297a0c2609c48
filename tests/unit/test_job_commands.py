"""Which polkit actions a job command asks for (h2kd.bus.actions), checked without a bus."""

from __future__ import annotations

import asyncio

import pytest

from h2kd.bus.actions import JobCommands
from h2kd.errors import AuthorizationUnavailable, InteractiveAuthorizationRequired, InvalidState, NotAuthorized
from h2kd.model.job import Job


class RecordingAuthorizer:
    """Says yes to everything, or raises `answer` (polkit's no, or no answer at all)."""

    def __init__(self, uid: int, answer: Exception | None = None):
        self.uid = uid
        self.answer = answer
        self.asked: list[str] = []
        self.prompting: list[bool] = []

    async def caller_uid(self) -> int:
        return self.uid

    async def check(self, action: str, details: dict[str, str] | None = None, interactive: bool = True) -> None:
        self.asked.append(action)
        self.prompting.append(interactive)
        if self.answer is not None:
            raise self.answer


class OneJob:
    def __init__(self, job: Job):
        self.job = job
        self.done: list[str] = []
        self.by: list[int | None] = []     # who each command was done for

    def get(self, job_id: str) -> Job:
        return self.job

    async def cancel(self, job_id: str, by: int | None = None) -> None:
        self.done.append("cancel")
        self.by.append(by)

    def retry(self, job_id: str, by: int | None = None) -> None:
        self.done.append("retry")
        self.by.append(by)

    def start_job(self, job_id: str, by: int | None = None) -> None:
        self.done.append("start")
        self.by.append(by)

    def remove(self, job_id: str) -> None:
        self.done.append("remove")

    def set_priority(self, job_id: str, priority: int) -> None:
        self.done.append(f"priority {priority}")


def _asked(spec: dict, command: str, caller: int = 1000) -> list[str]:
    job = Job(id="j1", spec=spec, operation=spec["operation"], owner=1000)
    auth, manager = RecordingAuthorizer(caller), OneJob(job)
    asyncio.run(getattr(JobCommands(manager, auth), command)("j1"))   # type: ignore[arg-type]
    assert manager.done == [command]
    assert manager.by == [caller], "the manager is not told who asked (the job's history names them)"
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

    async def check(self, action: str, details: dict[str, str] | None = None, interactive: bool = True) -> None:
        await super().check(action, details, interactive)
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


@pytest.mark.parametrize("command, arguments, done", [("remove", (), "remove"),
                                                      ("set_priority", (1,), "priority 1")])
def test_a_job_replaced_while_an_administrator_is_asked_is_not_the_one_managed(command: str, arguments: tuple,
                                                                               done: str) -> None:
    """The prompt named job j1 of uid 1000; a job of uid 1001 submitted under that id meanwhile is not removed or
    put first on that answer."""
    first = Job(id="j1", spec=CONVERT, operation="convert", owner=1000)
    second = Job(id="j1", spec=CONVERT, operation="convert", owner=1001)
    manager = OneJob(first)
    auth = ReplacedWhileAsking(0, manager, [second])
    with pytest.raises(InvalidState, match="replaced by another job"):
        asyncio.run(getattr(JobCommands(manager, auth), command)("j1", *arguments))   # type: ignore[arg-type]
    assert auth.asked == ["manage"] and manager.done == []
    asyncio.run(getattr(JobCommands(manager, auth), command)("j1", *arguments))   # type: ignore[arg-type]
    assert manager.done == [done]


def _read(job: Job, auth: RecordingAuthorizer, manager: OneJob | None = None) -> str:
    manager = manager or OneJob(job)
    return asyncio.run(JobCommands(manager, auth).read_result("j1", lambda j: f"result of uid {j.owner}"))  # type: ignore[arg-type]


def test_a_result_is_its_owners_and_roots_without_asking_polkit() -> None:
    job = Job(id="j1", spec=CONVERT, operation="convert", owner=1000)
    for caller in (1000, 0):
        auth = RecordingAuthorizer(caller, NotAuthorized("no"))
        assert _read(job, auth) == "result of uid 1000" and auth.asked == []


def test_another_users_result_needs_read_other_user_and_never_prompts() -> None:
    job = Job(id="j1", spec=CONVERT, operation="convert", owner=1000)
    allowed = RecordingAuthorizer(1001)
    assert _read(job, allowed) == "result of uid 1000"
    assert allowed.asked == ["read-other-user"] and allowed.prompting == [False]
    for no in (NotAuthorized("Not authorized to read"), InteractiveAuthorizationRequired("a password")):
        with pytest.raises(NotAuthorized, match=r"the result of job j1 is for its owner \(uid 1000\) and admin"):
            _read(job, RecordingAuthorizer(1001, no))
    # No answer is not a no: polkit's own words (try again) go to the caller.
    with pytest.raises(AuthorizationUnavailable, match="authorization service unavailable"):
        _read(job, RecordingAuthorizer(1001, AuthorizationUnavailable("Not authorized to read: authorization "
                                                                          "service unavailable")))


def test_a_result_asked_for_while_its_job_is_replaced_is_that_of_the_job_now() -> None:
    """polkit allowed the caller another user's result; meanwhile the job was removed and the caller submitted
    one of the same id: the answer is the new job's (theirs), not the one polkit was asked about."""
    theirs = Job(id="j1", spec=CONVERT, operation="convert", owner=1000)
    mine = Job(id="j1", spec=CONVERT, operation="convert", owner=1001)
    manager = OneJob(theirs)
    auth = ReplacedWhileAsking(1001, manager, [mine])
    assert _read(theirs, auth, manager) == "result of uid 1001" and auth.asked == ["read-other-user"]
    others = [Job(id="j1", spec=CONVERT, operation="convert", owner=2000 + n) for n in range(5)]
    manager = OneJob(others[0])
    with pytest.raises(InvalidState, match="replaced by another job"):
        _read(others[0], ReplacedWhileAsking(1001, manager, others[1:]), manager)
