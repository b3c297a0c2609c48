"""BusService: exports the job manager on D-Bus and keeps the bus in step with it (a JobListener).

    bus = await connect_bus(config.bus_address)          # h2kd.bus.connection
    service = BusService(bus, manager, authority, config)
    await service.export()          # manager object, every known job and worker, caller tracking
    manager.add_listener(service)
    await bus.request_name(BUS_NAME)
    ...
    service.close()                 # on shutdown: stops timers, removes handlers

What it sends:
- /org/hyper2kvm/h2kd1 is also the org.freedesktop.DBus.ObjectManager: GetManagedObjects is
  answered from the job records, each job's part of the reply kept marshalled until the job's
  announced properties change (h2kd.bus.premarshal), so a call with 10,000 jobs only joins bytes;
  InterfacesAdded/InterfacesRemoved are sent from that path (not from the object's). A job's explicit
  properties (Spec, Result) are left out of both, and of its Properties.GetAll (answered here too); its
  Result is given only to those h2kd.bus.actions lets read it, and PropertiesChanged only names it.
- ListJobs is answered the same way, from each job's row kept marshalled until the row's values change.
- Job PropertiesChanged and Job.Progress are coalesced per job to one per
  config.property_coalesce_seconds; urgent changes (state changes, final updates) flush at once.
  PropertiesChanged lists only the properties whose values differ from those last announced.
  Job.Progress carries -1 as progress while the total is unknown (as ListJobs does).
- StateChanged on every transition, Completed(success, message) on reaching a final state,
  LogMessage for "log" events; Manager.JobNew/JobRemoved around exports.
- A worker whose registering connection leaves the bus is reported to the manager (bus_name_lost).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.constants import ErrorType
from dbus_fast.signature import Variant

from h2kd import JOB_PATH_PREFIX, MANAGER_PATH
from h2kd.bus.actions import JobCommands
from h2kd.bus.base import Authorizer
from h2kd.bus.call import remember_call
from h2kd.bus.connection import adopt
from h2kd.bus.job_iface import (EXPLICIT_PROPERTIES, JOB_INTERFACE, PRIVATE_PROPERTIES, PROGRESS_FIELDS,
                                LISTED_INDEX, PROPERTIES_OF_FIELD, JobInterface, job_vardict, listed_only,
                                listed_values, listed_vardict, plain_value, reported_progress, result_text)
from h2kd.bus.manager_iface import (LIST_ROW_SIGNATURE, MANAGER_INTERFACE, MANAGER_PROPERTIES, ManagerInterface,
                                    list_row, listed_jobs)
from h2kd.bus.paths import job_path, worker_path
from h2kd.bus.errors import to_dbus_error
from h2kd.bus.premarshal import REPLY_SIGNATURE, ReplyTooLarge, array_reply, object_entry, struct_bytes
from h2kd.bus.worker_iface import WORKER_INTERFACE, WorkerInterface, worker_vardict
from h2kd.errors import NoSuchJob
from h2kd.manager.ports import Event, WorkerInfo
from h2kd.model.job import Job
from h2kd.model.states import TERMINAL, JobState

log = logging.getLogger("h2kd.bus")

OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PROPERTIES = "org.freedesktop.DBus.Properties"
DBUS_DAEMON = "org.freedesktop.DBus"
JOB_TREE_PATH = JOB_PATH_PREFIX.rstrip("/")     # the node whose children are the jobs
NAME_OWNER_CHANGED_RULE = ("type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                           "member='NameOwnerChanged',path='/org/freedesktop/DBus'")
# Manager properties that change rarely and matter at once; the counters are coalesced.
_URGENT_MANAGER_PROPERTIES = {"Paused", "MaxParallelJobs"}


@dataclass
class _Pending:
    """Changes of one object waiting for the next coalesced PropertiesChanged (jobs: on the shared tick;
    the manager object: on its own timer, timer and last_sent)."""
    properties: set[str] = field(default_factory=set)
    progress: bool = False
    timer: asyncio.TimerHandle | None = None
    last_sent: float = float("-inf")   # time.monotonic() of the last flush


@dataclass(eq=False)
class _ExportedJob:
    __slots__ = ("path", "job", "pending", "values", "entry", "row", "row_key", "result_key")
    path: str
    job: Job
    pending: _Pending | None            # made at the first change to send
    values: tuple | None                # GetAll's properties as last announced (listed_values); None when stale
    entry: bytes | None                 # their GetManagedObjects entry, marshalled; None when stale
    row: bytes | None                   # the job's ListJobs row, marshalled, for the values in row_key
    row_key: tuple | None
    result_key: int | None              # hash of the Result as last announced (not cached: up to 64 KiB)

    def announced(self) -> dict[str, Variant]:
        """The properties as last announced (read from the job if nothing is cached)."""
        if self.values is None:
            self.values = listed_values(self.job)
            self.entry = None
        return listed_vardict(self.values)

    def announced_entry(self) -> bytes:
        """announced() as this object's entry of a GetManagedObjects reply (h2kd.bus.premarshal)."""
        if self.entry is None:
            self.entry = object_entry(self.path, {JOB_INTERFACE: self.announced()})
        return self.entry

    def marshalled_row(self) -> bytes:
        """The job's ListJobs row (h2kd.bus.premarshal), as the job is now."""
        job = self.job
        key = (job.state, job.progress, job.progress_known, job.priority)   # a row's only changing values
        if self.row is None or key != self.row_key:
            self.row, self.row_key = struct_bytes(LIST_ROW_SIGNATURE, list_row(job)), key
        return self.row

    def has_unannounced_changes(self) -> bool:
        return self.pending is not None and bool(self.pending.properties)


class BusService:
    def __init__(self, bus: Any, manager: Any, authority: Any, config: Any):
        self._bus = bus
        self._manager = manager
        self._interval = float(getattr(config, "property_coalesce_seconds", 0.1))
        self._due_jobs: set[str] = set()               # jobs with coalesced changes for the next tick
        self._tick: asyncio.TimerHandle | None = None
        self._authorizer = Authorizer(authority)
        self._commands = JobCommands(manager, self._authorizer)
        self._jobs: dict[str, _ExportedJob] = {}
        self._job_paths: dict[str, _ExportedJob] = {}   # object path -> the same records
        # Introspect answers kept: at "a job" (the same for all) and at JOB_TREE_PATH (while no job comes or goes)
        self._introspected: dict[str, str] = {}
        self._job_iface = JobInterface(self._job_at, manager, self._commands)   # serves every job path
        self._workers: dict[str, tuple[str, WorkerInterface, dict[str, Variant]]] = {}
        self._manager_iface: ManagerInterface | None = None
        self._manager_pending = _Pending()
        self._handlers: list[Any] = []
        self._replies: set[asyncio.Task] = set()       # answers being worked out (a reference keeps each alive)

    # ------------------------------------------------------------------ setup

    async def export(self) -> None:
        """Export the manager and every job and worker the manager already knows; watch callers."""
        self._bus = adopt(self._bus)
        for handler in (remember_call, self._answer_object_manager, self._answer_introspect, self._answer_list_jobs,
                        self._answer_job_get_all, self._answer_job_result, self._watch_name_owners):
            self._bus.add_message_handler(handler)
            self._handlers.append(handler)
        self._manager_iface = ManagerInterface(self._manager, self._authorizer, self._commands)
        self._bus.export(MANAGER_PATH, self._manager_iface)
        for job in self._manager.jobs:
            self._export_job(job)
        for worker in self._manager.workers:
            self._export_worker(worker)
        await self._add_match(NAME_OWNER_CHANGED_RULE)

    def close(self) -> None:
        _cancel(self._manager_pending)
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for handler in self._handlers:
            try:
                self._bus.remove_message_handler(handler)
            except Exception:
                pass
        self._handlers.clear()
        for task in self._replies:
            task.cancel()

    async def _add_match(self, rule: str) -> None:
        reply = await self._bus.call(Message(destination=DBUS_DAEMON, path="/org/freedesktop/DBus",
                                             interface=DBUS_DAEMON, member="AddMatch", signature="s",
                                             body=[rule]))
        if reply.message_type == MessageType.ERROR:
            log.warning("cannot watch bus names (%s): lost workers are found by missed heartbeats only",
                        reply.error_name)

    # ------------------------------------------------------------------ message handlers

    def _answer_object_manager(self, msg: Message) -> Message | None:
        """GetManagedObjects, answered from our records instead of dbus-fast's per-property walk."""
        if (msg.message_type != MessageType.METHOD_CALL or msg.member != "GetManagedObjects"
                or msg.interface not in (None, OBJECT_MANAGER)):
            return None
        if msg.signature != "":
            # dbus-fast's own handler would answer it, whatever its arguments, with the walk described below.
            return Message.new_error(msg, ErrorType.INVALID_ARGS.value,
                                     f"GetManagedObjects takes no arguments (given {msg.signature!r})")
        if msg.path == MANAGER_PATH:
            return self._send_managed_objects(msg)
        # Any other path (an ancestor of our tree, the job or worker tree, one object) is no ObjectManager:
        # answered here, since dbus-fast's own walk of 10,000 objects would hold the event loop for a second
        # or more per call, for anyone who asks.
        return Message.new_error(msg, ErrorType.UNKNOWN_METHOD.value,
                                 f"no object manager at {msg.path}; use {MANAGER_PATH}")

    def _answer_introspect(self, msg: Message) -> Message | None:
        """Introspect at any path but the manager's: dbus-fast's answer without the ObjectManager interface it lists
        at every object it exports. Only MANAGER_PATH is one, and a client that believes introspection (a D-Bus
        browser, GDBusObjectManagerClient) would call GetManagedObjects at each job and worker."""
        if (msg.message_type != MessageType.METHOD_CALL or msg.member != "Introspect" or msg.path == MANAGER_PATH
                or msg.interface not in (None, INTROSPECTABLE) or msg.signature != ""):
            return None
        # Anyone may ask, and dbus-fast walks every exported path to answer (with 10,000 jobs, ~80 ms for the job
        # tree): a job's answer is the same for every job, and the tree's is kept until a job comes or goes.
        kept_as = "a job" if msg.path in self._job_paths else msg.path if msg.path == JOB_TREE_PATH else None
        if kept_as is None:
            xml = self._introspection(msg.path)
        elif (xml := self._introspected.get(kept_as)) is None:
            xml = self._introspected[kept_as] = self._introspection(msg.path)
        return Message.new_method_return(msg, "s", [xml])

    def _introspection(self, path: str) -> str:
        node = self._bus._introspect_export_path(path)    # dbus-fast's own answer, as a tree
        node.interfaces = [i for i in node.interfaces if i.name != OBJECT_MANAGER]
        return node.tostring()

    def _job_properties_call(self, msg: Message, member: str, signature: str) -> _ExportedJob | None:
        """The job a Properties.<member> call on the Job interface is for; None for any other message, or for a
        path with no job (dbus-fast then says there is no such object)."""
        if (msg.message_type != MessageType.METHOD_CALL or msg.member != member or msg.interface != PROPERTIES
                or msg.signature != signature or msg.body[0] != JOB_INTERFACE):
            return None
        return self._job_paths.get(msg.path or "")

    def _answer_job_get_all(self, msg: Message) -> Message | bool | None:
        """A job's Properties.GetAll, without its explicit properties (dbus-fast's own answer has them all)."""
        exported = self._job_properties_call(msg, "GetAll", "s")
        if exported is None:
            return None
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return True
        return Message.new_method_return(msg, "a{sv}", [job_vardict(exported.job)])

    def _answer_job_result(self, msg: Message) -> bool | None:
        """A job's Properties.Get of Result, answered once the caller is found to be allowed it (dbus-fast's own
        answer would give it to anyone)."""
        exported = self._job_properties_call(msg, "Get", "ss")
        if exported is None or msg.body[1] not in PRIVATE_PROPERTIES:
            return None
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return True     # nobody to tell: no polkit check for it
        task = asyncio.get_running_loop().create_task(self._send_result(msg, exported.job.id))  # sees the caller
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)
        return True

    async def _send_result(self, call: Message, job_id: str) -> None:
        try:
            text = await self._commands.read_result(job_id, result_text)
            reply = Message.new_method_return(call, "v", [Variant("s", text)])
        except Exception as exc:
            error = to_dbus_error(exc, "Get")
            reply = Message.new_error(call, error.type, error.text)
        self._send(reply)

    def _watch_name_owners(self, msg: Message) -> bool:
        if (msg.message_type == MessageType.SIGNAL and msg.member == "NameOwnerChanged"
                and msg.sender == DBUS_DAEMON and len(msg.body) == 3):
            name, _old, new = msg.body
            if name.startswith(":") and not new and any(w.bus_name == name for w in self._manager.workers):
                try:
                    self._manager.bus_name_lost(name)
                except Exception:
                    log.exception("handling the loss of %s failed", name)
        return False

    def _answer_list_jobs(self, msg: Message) -> Message | bool | None:
        """ListJobs, answered from each job's marshalled row (as ManagerInterface.ListJobs would answer)."""
        if (msg.message_type != MessageType.METHOD_CALL or msg.member != "ListJobs" or msg.path != MANAGER_PATH
                or msg.interface not in (None, MANAGER_INTERFACE) or msg.signature != "a{sv}"):
            return None
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return True
        try:
            jobs = listed_jobs(self._manager, msg.body[0])
        except Exception as exc:
            error = to_dbus_error(exc, "ListJobs")
            return Message.new_error(msg, error.type, error.text)
        return self._send_array(msg, "a" + LIST_ROW_SIGNATURE, (self._marshalled_row(job) for job in jobs),
                                lambda: [list_row(job) for job in jobs])

    def _marshalled_row(self, job: Job) -> bytes:
        exported = self._jobs.get(job.id)
        if exported is not None:
            return exported.marshalled_row()
        return struct_bytes(LIST_ROW_SIGNATURE, list_row(job))

    def _send_managed_objects(self, call: Message) -> Message | bool:
        return self._send_array(call, REPLY_SIGNATURE, self._managed_object_entries(), self.managed_objects)

    def _send_array(self, call: Message, signature: str, elements: Any, value: Callable[[], Any]) -> Message | bool:
        """Answer `call` with the array of marshalled `elements` joined, queued as bytes; True tells dbus-fast
        the call is answered. Should the connection not take bytes, a Message of value() for dbus-fast to
        marshal."""
        if call.flags & MessageFlag.NO_REPLY_EXPECTED:
            return True
        try:
            reply = Message.new_method_return(call, signature, [])
            reply.serial = self._bus.next_serial()
            data = array_reply(reply, elements)
            sent = self._bus.send_marshalled(data)
        except ReplyTooLarge as exc:   # the bus would drop the connection sending it
            log.error("cannot answer %s: %s", call.member, exc)
            return Message.new_error(call, ErrorType.LIMITS_EXCEEDED.value, str(exc))
        except RuntimeError as exc:   # dbus-fast's writer or its marshalling of a message is not as expected
            log.warning("%s marshalled by dbus-fast instead: %s", call.member, exc)
            return Message.new_method_return(call, signature, [value()])
        except Exception as exc:
            error = to_dbus_error(exc, call.member or "")
            return Message.new_error(call, error.type, error.text)
        sent.add_done_callback(_consume)
        return True

    def _managed_object_entries(self) -> Any:
        """The entries of managed_objects(), marshalled, in the same order."""
        for exported in self._jobs.values():
            if exported.has_unannounced_changes():
                # Current values (as Properties.GetAll gives), leaving the cache as last announced.
                yield object_entry(exported.path, {JOB_INTERFACE: job_vardict(exported.job)})
            else:
                yield exported.announced_entry()
        for path, interface, _announced in self._workers.values():
            yield object_entry(path, {WORKER_INTERFACE: worker_vardict(interface.worker)})

    def managed_objects(self) -> dict[str, dict[str, dict[str, Variant]]]:
        """GetManagedObjects' answer as values (the reply sent is made by _managed_object_entries)."""
        objects: dict[str, dict[str, dict[str, Variant]]] = {}
        for exported in self._jobs.values():
            if exported.has_unannounced_changes():
                # Changes not yet announced: current values, leaving the cache as last announced.
                objects[exported.path] = {JOB_INTERFACE: job_vardict(exported.job)}
            else:
                objects[exported.path] = {JOB_INTERFACE: exported.announced()}
        for path, interface, _announced in self._workers.values():
            # Current values, as Properties.GetAll: heartbeats are not announced, and workers are few.
            objects[path] = {WORKER_INTERFACE: worker_vardict(interface.worker)}
        return objects

    # ------------------------------------------------------------------ sending

    def _signal(self, path: str, interface: str, member: str, signature: str, body: list[Any]) -> None:
        self._send(Message.new_signal(path, interface, member, signature, body))

    def _send(self, message: Message) -> None:
        try:
            future = self._bus.send(message)
        except Exception as exc:  # disconnected: nothing to tell anyone
            log.debug("cannot send %s.%s: %s", message.interface, message.member, exc)
            return
        if future is not None:
            future.add_done_callback(_consume)

    def _properties_changed(self, path: str, interface: str, values: dict[str, Variant]) -> None:
        """PropertiesChanged of `values`; a job's PRIVATE_PROPERTIES only by name, in the invalidated list."""
        private = PRIVATE_PROPERTIES if interface == JOB_INTERFACE else frozenset()
        named = sorted(name for name in values if name in private)
        given = {name: value for name, value in values.items() if name not in private}
        if given or named:
            self._signal(path, PROPERTIES, "PropertiesChanged", "sa{sv}as", [interface, given, named])

    # ------------------------------------------------------------------ jobs

    def _job_at(self, path: str) -> Job:
        exported = self._job_paths.get(path)
        if exported is None:
            raise NoSuchJob(f"no job at {path}")
        return exported.job

    def _export_job(self, job: Job) -> _ExportedJob:
        exported = self._jobs.get(job.id)
        if exported is not None:
            return exported
        exported = _ExportedJob(job_path(job.id), job, None, None, None, None, None, None)
        self._bus.export_shared(exported.path, self._job_iface)
        self._jobs[job.id] = exported
        self._job_paths[exported.path] = exported
        self._introspected.pop(JOB_TREE_PATH, None)
        return exported

    def job_added(self, job: Job) -> None:
        try:
            exported = self._export_job(job)
            exported.values = None          # announced() below makes it from the job as it is now
            exported.result_key = hash(result_text(job))
            self._signal(MANAGER_PATH, OBJECT_MANAGER, "InterfacesAdded", "oa{sa{sv}}",
                         [exported.path, {JOB_INTERFACE: exported.announced()}])
            self._signal(MANAGER_PATH, MANAGER_INTERFACE, "JobNew", "so", [job.id, exported.path])
        except Exception:
            log.exception("exporting job %s failed", job.id)

    def job_changed(self, job: Job, changed: set[str], urgent: bool) -> None:
        exported = self._jobs.get(job.id)
        if exported is None:
            return
        pending = exported.pending
        if pending is None:
            pending = exported.pending = _Pending()
        for name in changed:
            pending.properties.update(PROPERTIES_OF_FIELD.get(name, ()))
        if changed & PROGRESS_FIELDS:
            pending.progress = True
        if not pending.properties and not pending.progress:
            return
        if urgent:
            self._flush_job(job.id)
        else:
            self._flush_later(job.id)

    def _flush_later(self, job_id: str) -> None:
        """Coalesced changes of all jobs go out together, `interval` after the first of them: with fifty jobs
        progressing that is one write to the bus per tick instead of one per progress report."""
        self._due_jobs.add(job_id)
        if self._tick is not None:
            return
        try:
            self._tick = asyncio.get_running_loop().call_later(self._interval, self._flush_due)
        except RuntimeError:  # no loop (tests of the core without a bus): send now
            self._flush_due()

    def _flush_due(self) -> None:
        self._tick = None
        due, self._due_jobs = self._due_jobs, set()
        for job_id in due:
            self._flush_job(job_id)

    def _flush_job(self, job_id: str) -> None:
        exported = self._jobs.get(job_id)
        if exported is None:
            return
        pending = exported.pending
        if pending is None:
            return
        job = exported.job
        names, pending.properties = pending.properties, set()
        try:
            self._properties_changed(exported.path, JOB_INTERFACE, self._changed_values(exported, sorted(names)))
            if pending.progress:
                pending.progress = False
                progress = reported_progress(job)
                self._signal(exported.path, JOB_INTERFACE, "Progress", "dtts",
                             [progress, int(job.bytes_done), int(job.bytes_total), job.phase])
        except Exception:
            log.exception("sending changes of job %s failed", job_id)

    @staticmethod
    def _changed_values(exported: _ExportedJob, names: list[str]) -> dict[str, Variant]:
        """Of the named properties, those whose value differs from the last announced (all without a cache);
        the cache then holds the new values. The explicit ones are not cached (a Result may be 64 KiB: kept
        once, on the job), the Result is compared by its hash."""
        values = job_vardict(exported.job, names)
        if "Result" in values:
            key = hash(values["Result"].value)
            if key == exported.result_key:
                del values["Result"]
            exported.result_key = key
        cached = exported.values
        if cached is None:
            return values
        changed = {name: value for name, value in values.items()
                   if name in EXPLICIT_PROPERTIES or cached[LISTED_INDEX[name]] != plain_value(value)}
        listed = listed_only(changed)
        if listed:
            updated = list(cached)
            for name, value in listed.items():
                updated[LISTED_INDEX[name]] = plain_value(value)
            exported.values = tuple(updated)
            exported.entry = None
        return changed

    def job_event(self, job: Job, event: Event) -> None:
        exported = self._jobs.get(job.id)
        if exported is None:
            return
        try:
            data = event.data or {}
            if event.kind == "state":
                state = str(data.get("new_state") or job.state)
                reason = str(data.get("reason") or "")
                self._signal(exported.path, JOB_INTERFACE, "StateChanged", "ss", [state, reason])
                if state in {s.value for s in TERMINAL}:
                    success = state == JobState.COMPLETED.value
                    message = reason
                    if state == JobState.FAILED.value and job.error_message:
                        message = job.error_message
                    self._signal(exported.path, JOB_INTERFACE, "Completed", "bs", [success, message])
            elif event.kind == "log":
                self._signal(exported.path, JOB_INTERFACE, "LogMessage", "s", [str(data.get("message", ""))])
        except Exception:
            log.exception("sending an event of job %s failed", job.id)

    def job_removed(self, job: Job) -> None:
        exported = self._jobs.pop(job.id, None)
        if exported is None:
            return
        self._job_paths.pop(exported.path, None)
        self._introspected.pop(JOB_TREE_PATH, None)
        if exported.pending is not None:
            _cancel(exported.pending)
        try:
            result = job.state.value if job.state in TERMINAL else "removed"
            self._signal(MANAGER_PATH, MANAGER_INTERFACE, "JobRemoved", "sos", [job.id, exported.path, result])
            self._signal(MANAGER_PATH, OBJECT_MANAGER, "InterfacesRemoved", "oas", [exported.path, [JOB_INTERFACE]])
            self._bus.unexport_shared(exported.path, self._job_iface)
        except Exception:
            log.exception("unexporting job %s failed", job.id)

    # ------------------------------------------------------------------ workers

    def _export_worker(self, worker: WorkerInfo) -> str:
        path = worker_path(worker.id)
        if worker.id not in self._workers:
            interface = WorkerInterface(worker, self._manager, self._authorizer)
            self._bus.export(path, interface)
            self._workers[worker.id] = (path, interface, worker_vardict(worker))
        return path

    def worker_added(self, worker: WorkerInfo) -> None:
        try:
            known = worker.id in self._workers
            path = self._export_worker(worker)
            if known:  # re-added (e.g. the builtin worker at start): just refresh
                self.worker_changed(worker)
                return
            self._signal(MANAGER_PATH, OBJECT_MANAGER, "InterfacesAdded", "oa{sa{sv}}",
                         [path, {WORKER_INTERFACE: self._workers[worker.id][2]}])
        except Exception:
            log.exception("exporting worker %s failed", worker.id)

    def worker_changed(self, worker: WorkerInfo) -> None:
        entry = self._workers.get(worker.id)
        if entry is None:
            return
        path, interface, before = entry
        interface.worker = worker
        now = worker_vardict(worker)
        changed = {k: v for k, v in now.items()
                   if before.get(k) != v and k not in WorkerInterface.UNANNOUNCED_PROPERTIES}
        self._workers[worker.id] = (path, interface, now)
        self._properties_changed(path, WORKER_INTERFACE, changed)

    def worker_removed(self, worker: WorkerInfo) -> None:
        entry = self._workers.pop(worker.id, None)
        if entry is None:
            return
        try:
            self._signal(MANAGER_PATH, OBJECT_MANAGER, "InterfacesRemoved", "oas", [entry[0], [WORKER_INTERFACE]])
            self._bus.unexport(entry[0])
        except Exception:
            log.exception("unexporting worker %s failed", worker.id)

    # ------------------------------------------------------------------ manager

    def manager_changed(self, changed: set[str]) -> None:
        names = {n for n in changed if n in MANAGER_PROPERTIES}
        if not names:
            return
        self._manager_pending.properties |= names
        if names & _URGENT_MANAGER_PROPERTIES:
            self._flush_manager()
        else:
            self._schedule(self._manager_pending, self._flush_manager)

    def _flush_manager(self) -> None:
        pending = self._manager_pending
        _cancel(pending)
        pending.last_sent = time.monotonic()
        names, pending.properties = pending.properties, set()
        values = {n: Variant(MANAGER_PROPERTIES[n][0], MANAGER_PROPERTIES[n][1](self._manager)) for n in sorted(names)}
        self._properties_changed(MANAGER_PATH, MANAGER_INTERFACE, values)

    # ------------------------------------------------------------------ coalescing

    def _schedule(self, pending: _Pending, flush: Any) -> None:
        """Flush now if the last flush is old enough, else once the interval has passed (one timer)."""
        if pending.timer is not None:
            return
        wait = pending.last_sent + self._interval - time.monotonic()
        if wait <= 0:
            flush()
            return
        try:
            pending.timer = asyncio.get_running_loop().call_later(wait, flush)
        except RuntimeError:  # no loop (tests of the core without a bus): send now
            flush()


def _cancel(pending: _Pending) -> None:
    if pending.timer is not None:
        pending.timer.cancel()
        pending.timer = None


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
