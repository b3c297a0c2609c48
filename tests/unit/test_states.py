"""The job state machine: every move the table allows is accepted, and moves it does not list are refused."""

from __future__ import annotations

import itertools

import pytest

from h2kd.model.job import Job
from h2kd.model.states import ACTIVE, CANCELABLE, TERMINAL, TRANSITIONS, InvalidTransition, JobState, check_transition

S = JobState
ALLOWED = [(old, new) for old, targets in TRANSITIONS.items() for new in targets]
FORBIDDEN = [(old, new) for old, new in itertools.product(S, S) if new not in TRANSITIONS[old]]


def test_every_state_has_a_row_in_the_table():
    assert set(TRANSITIONS) == set(S)


@pytest.mark.parametrize(("old", "new"), ALLOWED, ids=[f"{o.value}->{n.value}" for o, n in ALLOWED])
def test_allowed_transition_is_accepted(old, new):
    job = Job(id="j", spec={}, operation="convert", owner=0, state=old)
    assert job.move_to(new) is old
    assert job.state is new


@pytest.mark.parametrize(("old", "new"), FORBIDDEN, ids=[f"{o.value}->{n.value}" for o, n in FORBIDDEN])
def test_forbidden_transition_is_refused(old, new):
    job = Job(id="j", spec={}, operation="convert", owner=0, state=old)
    with pytest.raises(InvalidTransition) as info:
        job.move_to(new)
    assert job.state is old
    assert info.value.old is old and info.value.new is new
    assert str(info.value) == f"a job cannot go from {old.value} to {new.value}"


@pytest.mark.parametrize("new", list(S))
def test_completed_is_final(new):
    with pytest.raises(InvalidTransition):
        check_transition(S.COMPLETED, new)


@pytest.mark.parametrize(("old", "new"), [
    (S.QUEUED, S.COMPLETED), (S.CREATED, S.RUNNING), (S.CREATED, S.QUEUED), (S.VALIDATED, S.RUNNING),
    (S.QUEUED, S.PROGRESSING), (S.FAILED, S.QUEUED), (S.CANCELLED, S.RUNNING), (S.PROGRESSING, S.RUNNING),
    (S.RETRYING, S.RUNNING), (S.FAILED, S.COMPLETED), (S.QUEUED, S.QUEUED),
])
def test_sample_of_forbidden_moves(old, new):
    with pytest.raises(InvalidTransition):
        check_transition(old, new)


@pytest.mark.parametrize("old", [S.CREATED, S.VALIDATED])
def test_validation_failure_can_reach_failed(old):
    check_transition(old, S.FAILED)


def test_a_job_walks_the_happy_path_and_a_retry():
    job = Job(id="j", spec={}, operation="convert", owner=0)
    for new in (S.VALIDATED, S.QUEUED, S.ASSIGNED, S.RUNNING, S.PROGRESSING, S.RETRYING, S.QUEUED,
                S.ASSIGNED, S.RUNNING, S.COMPLETED):
        job.move_to(new)
    assert job.state is S.COMPLETED and not job.cancelable


def test_state_groups():
    assert TERMINAL == {S.COMPLETED, S.FAILED, S.CANCELLED}
    assert not TERMINAL & CANCELABLE
    assert ACTIVE <= CANCELABLE
    assert str(S.QUEUED) == "queued" and f"{S.RUNNING}" == "running"
