"""The live record of one job: its spec, where it stands, and its progress. Mutated only by the manager."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

from h2kd.model.states import CANCELABLE, TERMINAL, JobState, check_transition


def now_usec() -> int:
    return time.time_ns() // 1000


@dataclass
class Job:
    # Where a job given no output path writes: a directory named after it in this one, h2kd's first output root
    # (set from its settings when it starts; the attempts it runs get the same roots). "": not known.
    default_output_root: ClassVar[str] = ""

    id: str
    spec: dict[str, Any]            # the validated JobSpec, as JSON-able dict (JobSpec.model_dump(mode="json"))
    operation: str
    owner: int                      # uid of the submitter
    priority: int = 5
    state: JobState = JobState.CREATED
    queue_seq: int = 0              # FIFO order within a priority level; survives restarts
    attempt: int = 0                # 0 before the first attempt starts
    phase: str = ""
    progress: float = 0.0
    progress_known: bool = False
    bytes_done: int = 0
    bytes_total: int = 0
    rate: int = 0                   # bytes/s
    expected_end: int = 0           # usec since epoch, 0 unknown
    created_at: int = field(default_factory=now_usec)
    started_at: int = 0
    finished_at: int = 0
    unit: str = ""
    worker: str = ""
    wait_reason: str = ""
    not_before: int = 0             # usec; a retrying job is not started before this (backoff)
    result: dict[str, Any] = field(default_factory=dict)   # JobResult as JSON-able dict
    error_code: str = ""
    error_message: str = ""
    source_identity: str = ""      # "dev:ino" of the source checked at submission; the worker refuses another file
    # Attempts since the last retry asked for by hand (for a job stored by an earlier h2kd and not retried since,
    # since its submission) that ended through no fault of the job (its unit never started; a shutdown stopped
    # it): they are numbered like the others but do not count against execution_policy.retry_count.
    attempts_not_counted: int = 0
    # Attempts made before the last retry asked for by hand (a job stored by an earlier h2kd: those of them that
    # counted, with attempts_not_counted kept): such a retry starts a run of attempts with its retries anew.
    attempts_counted_before: int = 0
    # A cancel was asked for while the attempt ran (or was starting): kept, so that a restart still stops it.
    cancel_requested: bool = False
    # Who asked for the cancel that ended (or is ending) the job, for its history and the journal: a uid, or -1 (not
    # cancelled through h2kd, or not known). Cleared by a retry.
    cancelled_by: int = -1
    # The groups the submitter's connection had (the bus's UnixGroupIDs): h2kd acts with no group beyond them
    # (h2kd.access.acting_groups). None: not known (a job stored by an earlier h2kd, or made without a bus).
    owner_groups: tuple[int, ...] | None = None
    # usec: an attempt of the job was taken from an external worker (cancelled, timed out, lost to a restart of
    # h2kd), which may go on running it, writing its outputs, until it learns so; no attempt starts before this.
    taken_until: int = 0

    @cached_property
    def spec_text(self) -> str:
        """The spec as JSON text, made once (a spec never changes after submission): stored and exported as is."""
        return json.dumps(self.spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @property
    def source(self) -> str:
        return str(self.spec.get("image", {}).get("path", ""))

    @property
    def output(self) -> str:
        """The output path as submitted ("" for none)."""
        return str((self.spec.get("artifacts") or {}).get("output_path") or "")

    @property
    def output_place(self) -> str:
        """Where the job writes: its output path; else the directory it wrote into (from its result), or, while it
        may still write, the one it will write into ("DIR/"). "" for a job that writes nothing, that ended
        without writing (a failed or cancelled attempt leaves no directory), or when that is not known."""
        if self.output:
            return self.output
        written = written_directory(self.result)
        if written or self.operation != "convert" or not self.default_output_root or self.state in TERMINAL:
            return written
        return f"{self.default_output_root.rstrip('/')}/{self.id}/"

    @property
    def cancelable(self) -> bool:
        return self.state in CANCELABLE

    def move_to(self, new: JobState) -> JobState:
        """Change state if the transition table allows it; returns the old state."""
        old = self.state
        check_transition(old, new)
        self.state = new
        return old


def written_directory(result: dict[str, Any] | None) -> str:
    """The directory a job's result says its first disk was written into, as "DIR/"; "" if none."""
    outputs = (result or {}).get("outputs")
    disks = outputs.get("disks") if isinstance(outputs, dict) else None
    first = disks[0].get("path") if isinstance(disks, list) and disks and isinstance(disks[0], dict) else None
    return os.path.dirname(first) + "/" if isinstance(first, str) and os.path.isabs(first) else ""
