"""org.hyper2kvm.h2kd1.Job: an object per job, reading the manager's live Job record.

One JobInterface instance is exported at every job's path (h2kd.bus.connection.H2kMessageBus.export_shared):
it finds the job of each call from the path the call was sent to, so 10,000 jobs cost 10,000 table entries
rather than 10,000 interface objects. Introspection is the same at every path.
"""

import json
from typing import Any, Callable

from dbus_fast.service import dbus_method, dbus_signal
from dbus_fast.signature import Variant

from h2kd import BUS_NAME
from h2kd.bus.actions import JobCommands
from h2kd.bus.base import ApiInterface, add_read_properties
from h2kd.bus.call import current_caller
from h2kd.bus.errors import bus_errors
from h2kd.model.job import Job

# GetEvents' page: a reply of at most ~1 MB, whatever a job's log holds; clients ask again from the last seq.
MAX_EVENTS_PER_CALL = 1000

JOB_INTERFACE = BUS_NAME + ".Job"


def result_text(job: Job) -> str:
    return json.dumps(job.result, sort_keys=True) if job.result else "{}"


# D-Bus property -> (signature, value from the Job record). The one place these are defined.
JOB_PROPERTIES: dict[str, tuple[str, Any]] = {
    "Id": ("s", lambda j: j.id),
    "Operation": ("s", lambda j: j.operation),
    "State": ("s", lambda j: str(j.state)),
    "Phase": ("s", lambda j: j.phase),
    "Progress": ("d", lambda j: float(j.progress)),
    "ProgressKnown": ("b", lambda j: bool(j.progress_known)),
    "BytesDone": ("t", lambda j: int(j.bytes_done)),
    "BytesTotal": ("t", lambda j: int(j.bytes_total)),
    "Rate": ("t", lambda j: int(j.rate)),
    "ExpectedEndTime": ("t", lambda j: int(j.expected_end)),
    "CreatedAt": ("t", lambda j: int(j.created_at)),
    "StartedAt": ("t", lambda j: int(j.started_at)),
    "FinishedAt": ("t", lambda j: int(j.finished_at)),
    "Priority": ("u", lambda j: int(j.priority)),
    "Owner": ("u", lambda j: int(j.owner)),
    "Attempt": ("u", lambda j: int(j.attempt)),
    "Unit": ("s", lambda j: j.unit),
    "Worker": ("s", lambda j: j.worker),
    "Source": ("s", lambda j: j.source),
    "Output": ("s", lambda j: j.output_place),
    "WaitReason": ("s", lambda j: j.wait_reason),
    "Spec": ("s", lambda j: j.spec_text),
    "Result": ("s", result_text),
    "Error": ("(ss)", lambda j: [j.error_code, j.error_message]),
    "Cancelable": ("b", lambda j: bool(j.cancelable)),
}

# Job attribute names (as JobListener.job_changed reports them) -> the properties they feed.
PROPERTIES_OF_FIELD: dict[str, tuple[str, ...]] = {
    "state": ("State", "Cancelable"),
    "phase": ("Phase",),
    "progress": ("Progress",),
    "progress_known": ("ProgressKnown",),
    "bytes_done": ("BytesDone",),
    "bytes_total": ("BytesTotal",),
    "rate": ("Rate",),
    "expected_end": ("ExpectedEndTime",),
    "started_at": ("StartedAt",),
    "finished_at": ("FinishedAt",),
    "priority": ("Priority",),
    "attempt": ("Attempt",),
    "unit": ("Unit",),
    "worker": ("Worker",),
    "wait_reason": ("WaitReason",),
    "spec": ("Spec", "Source", "Output", "Operation"),
    "result": ("Result", "Output"),
    "error_code": ("Error",),
    "error_message": ("Error",),
    "cancelable": ("Cancelable",),
    "owner": ("Owner",),
}
PROGRESS_FIELDS = frozenset({"progress", "progress_known", "bytes_done", "bytes_total", "phase"})

# Read with Properties.Get only, as sd-bus does for its "explicit" properties: left out of GetAll,
# GetManagedObjects and InterfacesAdded (a change of one is still told by PropertiesChanged).
# They are large (a spec is ~420 bytes of JSON, a result up to 64 KiB): with 10,000 jobs the Spec alone was
# a third of GetManagedObjects' 13 MB, which dbus-daemon relays 2 KiB per turn of its loop; listings need neither.
EXPLICIT_PROPERTIES = frozenset({"Spec", "Result"})
# What a job's worker found (a VM's facts, a repaired guest's changes) comes from files other users may not read:
# the Result is read only through h2kd.bus.actions.JobCommands.read_result, and a change of it is announced by
# name, without its value.
PRIVATE_PROPERTIES = frozenset({"Result"})
LISTED_PROPERTIES = tuple(name for name in JOB_PROPERTIES if name not in EXPLICIT_PROPERTIES)


def listed_only(values: dict[str, Variant]) -> dict[str, Variant]:
    """Of a job's property values, those GetAll and GetManagedObjects give."""
    return {name: value for name, value in values.items() if name not in EXPLICIT_PROPERTIES}


def reported_progress(job: Job) -> float:
    """The job's progress as ListJobs and the Progress signal give it: -1 while the total is unknown."""
    return float(job.progress) if job.progress_known else -1.0


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


_LISTED_GETTERS = tuple(JOB_PROPERTIES[name][1] for name in LISTED_PROPERTIES)
LISTED_INDEX = {name: index for index, name in enumerate(LISTED_PROPERTIES)}


def listed_values(job: Job) -> tuple:
    """The job's LISTED_PROPERTIES as one tuple of plain values (a struct as a tuple), in that order.

    A tuple of strings and numbers is no work for Python's cyclic collector (it stops tracking it), where a
    dict of 23 Variants per job was 25 objects it walked at every collection: with 10,000 jobs, pauses of
    tens of milliseconds in the middle of a burst of submissions."""
    return tuple(_plain(value_of(job)) for value_of in _LISTED_GETTERS)


def plain_value(variant: Variant) -> Any:
    """A property's Variant as listed_values gives its value."""
    return _plain(variant.value)


def listed_vardict(values: tuple) -> dict[str, Variant]:
    """listed_values() as a{sv}."""
    return {name: Variant(JOB_PROPERTIES[name][0], value, False) for name, value in zip(LISTED_PROPERTIES, values)}


def job_vardict(job: Job, names: Any = None) -> dict[str, Variant]:
    """The job's properties as a{sv}: the given names, or all that GetAll gives (not EXPLICIT_PROPERTIES)."""
    selected = {n: JOB_PROPERTIES[n] for n in (LISTED_PROPERTIES if names is None else names)}
    # Not verified against the signature: JOB_PROPERTIES converts every value to its type (tests/test_bus.py
    # reads them all back), and the check cost a third of this function, which runs with every submission.
    return {name: Variant(sig, value_of(job), False) for name, (sig, value_of) in selected.items()}


class JobInterface(ApiInterface):
    EXPLICIT_PROPERTIES = EXPLICIT_PROPERTIES
    INVALIDATED_PROPERTIES = PRIVATE_PROPERTIES
    OUT_ARG_NAMES = {"GetEvents": ("events",)}
    SIGNAL_ARG_NAMES = {
        "StateChanged": ("state", "reason"),
        "Progress": ("progress", "bytes_done", "bytes_total", "phase"),
        "LogMessage": ("message",),
        "Completed": ("success", "message"),
    }

    def __init__(self, job_at: Callable[[str], Job], manager: Any, commands: JobCommands):
        """job_at: the job exported at an object path (raises NoSuchJob for none)."""
        super().__init__(JOB_INTERFACE)
        self._job_at = job_at
        self._manager = manager
        self._commands = commands

    @property
    def job(self) -> Job:
        """The job whose path the call being served was sent to."""
        return self._job_at(current_caller().path)

    @dbus_method()
    @bus_errors
    async def Cancel(self):
        await self._commands.cancel(self.job.id)

    @dbus_method()
    @bus_errors
    async def Retry(self):
        await self._commands.retry(self.job.id)

    @dbus_method()
    @bus_errors
    def GetEvents(self, since: "t") -> "a(ttss)":
        return [[e.seq, e.time, e.kind, json.dumps(e.data, sort_keys=True)]
                for e in self._manager.events(self.job.id, since, limit=MAX_EVENTS_PER_CALL)]

    # Signals are declared here for introspection; h2kd.bus.service sends them with the object's path.
    @dbus_signal()
    def StateChanged(self) -> "ss":
        raise NotImplementedError

    @dbus_signal(name="Progress")   # the Python name differs: the Progress property owns that one
    def ProgressSignal(self) -> "dtts":
        raise NotImplementedError

    @dbus_signal()
    def LogMessage(self) -> "s":
        raise NotImplementedError

    @dbus_signal()
    def Completed(self) -> "bs":
        raise NotImplementedError


add_read_properties(JobInterface, JOB_PROPERTIES, "job")
