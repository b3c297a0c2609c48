"""Job states of the Worker Job Protocol and the one table of transitions between them."""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    CREATED = "created"
    VALIDATED = "validated"
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    PROGRESSING = "progressing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRYING = "retrying"

    def __str__(self) -> str:  # so f-strings and D-Bus get "queued", not "JobState.QUEUED"
        return self.value


S = JobState

# Every allowed move. Anything absent is refused with InvalidTransition.
# Differences from the original protocol: validation failures may go to FAILED from
# CREATED/VALIDATED; a claimed job whose worker is lost goes back to QUEUED; a finished
# (failed/cancelled) job may be retried by hand through RETRYING.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.CREATED: frozenset({S.VALIDATED, S.FAILED, S.CANCELLED}),
    S.VALIDATED: frozenset({S.QUEUED, S.FAILED, S.CANCELLED}),
    S.QUEUED: frozenset({S.ASSIGNED, S.CANCELLED, S.FAILED}),
    S.ASSIGNED: frozenset({S.RUNNING, S.QUEUED, S.FAILED, S.CANCELLED, S.RETRYING}),
    S.RUNNING: frozenset({S.PROGRESSING, S.COMPLETED, S.FAILED, S.CANCELLED, S.RETRYING, S.QUEUED}),
    S.PROGRESSING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.RETRYING, S.QUEUED}),
    S.RETRYING: frozenset({S.QUEUED, S.FAILED, S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset({S.RETRYING}),
    S.CANCELLED: frozenset({S.RETRYING}),
}

TERMINAL: frozenset[JobState] = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})
# States in which a unit or an external worker may be doing work for the job.
ACTIVE: frozenset[JobState] = frozenset({S.ASSIGNED, S.RUNNING, S.PROGRESSING})
# States from which Cancel() is accepted.
CANCELABLE: frozenset[JobState] = frozenset(
    {S.CREATED, S.VALIDATED, S.QUEUED, S.ASSIGNED, S.RUNNING, S.PROGRESSING, S.RETRYING}
)


class InvalidTransition(Exception):
    def __init__(self, old: JobState, new: JobState):
        super().__init__(f"a job cannot go from {old.value} to {new.value}")
        self.old = old
        self.new = new


def check_transition(old: JobState, new: JobState) -> None:
    """Raise InvalidTransition unless the table allows old -> new."""
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(old, new)
