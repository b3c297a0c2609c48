"""org.hyper2kvm.h2kd1.Manager at /org/hyper2kvm/h2kd1: each method authorizes, then makes one JobManager call."""

import os
from typing import Any

from dbus_fast.service import dbus_method, dbus_signal

from h2kd import MANAGER_INTERFACE, __version__
from h2kd.access import check_source_fd
from h2kd.bus.actions import JobCommands
from h2kd.bus.base import ApiInterface, Authorizer, add_read_properties
from h2kd.bus.call import close_fds, current_caller
from h2kd.bus.errors import bus_errors
from h2kd.bus.job_iface import reported_progress
from h2kd.bus.paths import job_path, worker_path
from h2kd.bus.variants import json_object_from_dbus, options_from_dbus, spec_from_dbus, to_vardict
from h2kd.errors import InvalidArgument


MANAGER_PROPERTIES: dict[str, tuple[str, Any]] = {
    "Version": ("s", lambda m: __version__),
    "JobsQueued": ("u", lambda m: int(m.jobs_queued)),
    "JobsRunning": ("u", lambda m: int(m.jobs_running)),
    "MaxParallelJobs": ("u", lambda m: int(m.max_parallel)),
    "Paused": ("b", lambda m: bool(m.paused)),
}

QUEUE_STATS_TYPES = {"queued": "u", "running": "u", "paused": "b", "max_parallel_jobs": "u",
                     "by_priority": "au", "waiting": "a{ss}"}
HEALTH_TYPES = {"status": "s", "version": "s", "uptime_seconds": "d", "jobs_active": "u", "jobs_queued": "u",
                "workers": "u", "workers_stale": "u", "store_ok": "b", "jobs_unreadable": "u",
                "systemd_reachable": "b"}

_SUBMIT_OPTIONS = {"queue": bool}
_LIST_FILTER = {"state": (str, list), "operation": str, "owner": int, "limit": int, "offset": int}
_WORKER_LIMITS = {"max_jobs": int}


LIST_ROW_SIGNATURE = "(sssduuto)"


def listed_jobs(manager: Any, filter: dict[str, Any]) -> list[Any]:
    """The jobs ListJobs(filter) answers with, in order. Raises InvalidArgument for a bad filter."""
    wanted = options_from_dbus(filter, _LIST_FILTER)
    states = wanted.get("state")
    if isinstance(states, str):
        states = [states] if states else None
    elif states is not None and not all(isinstance(s, str) for s in states):
        raise InvalidArgument("option 'state' must be a string or an array of strings")
    for key in ("limit", "offset", "owner"):
        if wanted.get(key, 0) < 0:
            raise InvalidArgument(f"option {key!r} must not be negative")
    return manager.list_jobs(states=states or None, operation=wanted.get("operation") or None,
                             owner=wanted.get("owner"), limit=wanted.get("limit", 0),
                             offset=wanted.get("offset", 0))


def list_row(job: Any) -> list[Any]:
    """The job's row in ListJobs, of LIST_ROW_SIGNATURE (progress -1 while unknown)."""
    return [job.id, job.operation, job.state.value, reported_progress(job), job.owner, job.priority,
            job.created_at, job_path(job.id)]


class ManagerInterface(ApiInterface):
    OUT_ARG_NAMES = {
        "SubmitJob": ("job_id", "job_path"),
        "SubmitJobWithImage": ("job_id", "job_path"),
        "GetJob": ("job_path",),
        "ListJobs": ("jobs",),
        "GetQueueStats": ("stats",),
        "GetHealth": ("health",),
        "RegisterWorker": ("worker_id", "worker_path"),
    }
    SIGNAL_ARG_NAMES = {"JobNew": ("job_id", "job_path"), "JobRemoved": ("job_id", "job_path", "result")}

    def __init__(self, manager: Any, authorizer: Authorizer, commands: JobCommands):
        super().__init__(MANAGER_INTERFACE)
        self.manager = manager
        self._auth = authorizer
        self._commands = commands

    @dbus_method()
    @bus_errors
    async def SubmitJob(self, spec: "a{sv}", options: "a{sv}") -> "so":
        opts = options_from_dbus(options, _SUBMIT_OPTIONS)
        plain = spec_from_dbus(spec)
        await self._commands.authorize_submission(plain)
        owner = await self._auth.caller_uid()
        job, _created = await self.manager.submit_grouped(plain, owner=owner, queue=opts.get("queue", True),
                                                             owner_groups=await self._auth.caller_groups())
        return [job.id, job_path(job.id)]

    @dbus_method()
    @bus_errors
    async def SubmitJobWithImage(self, image: "h", spec: "a{sv}", options: "a{sv}") -> "so":
        passed = current_caller().passed_fds
        try:
            # Without descriptors attached, "image" is just the number the caller wrote: one of h2kd's own.
            if image not in passed:
                raise InvalidArgument("no file descriptor came with the call; pass the image's descriptor")
            proof = check_source_fd(image)
            path = os.readlink(f"/proc/self/fd/{image}")
        finally:
            close_fds(passed)
        opts = options_from_dbus(options, _SUBMIT_OPTIONS)
        plain = spec_from_dbus(spec)
        image_spec = plain.setdefault("image", {})
        if isinstance(image_spec, dict) and not image_spec.get("path"):
            image_spec["path"] = path          # the file the descriptor names; HostChecks compares the two
        await self._commands.authorize_submission(plain)
        owner = await self._auth.caller_uid()
        job, _created = await self.manager.submit_grouped(plain, owner=owner, queue=opts.get("queue", True),
                                                             source_proof=proof,
                                                             owner_groups=await self._auth.caller_groups())
        return [job.id, job_path(job.id)]

    @dbus_method()
    @bus_errors
    def GetJob(self, job_id: "s") -> "o":
        return job_path(self.manager.get(job_id).id)

    @dbus_method()
    @bus_errors
    def ListJobs(self, filter: "a{sv}") -> "a(sssduuto)":
        # BusService answers ListJobs itself, from marshalled rows (h2kd.bus.premarshal); this declares it
        # for introspection and serves it where that handler is not installed.
        return [list_row(job) for job in listed_jobs(self.manager, filter)]

    @dbus_method()
    @bus_errors
    async def CancelJob(self, job_id: "s"):
        await self._commands.cancel(job_id)

    @dbus_method()
    @bus_errors
    async def RetryJob(self, job_id: "s"):
        await self._commands.retry(job_id)

    @dbus_method()
    @bus_errors
    async def StartJob(self, job_id: "s"):
        await self._commands.start(job_id)

    @dbus_method()
    @bus_errors
    async def RemoveJob(self, job_id: "s"):
        await self._commands.remove(job_id)

    @dbus_method()
    @bus_errors
    async def SetJobPriority(self, job_id: "s", priority: "u"):
        await self._commands.set_priority(job_id, priority)

    @dbus_method()
    @bus_errors
    def GetQueueStats(self) -> "a{sv}":
        return to_vardict(self.manager.queue_stats(), QUEUE_STATS_TYPES)

    @dbus_method()
    @bus_errors
    async def PauseQueue(self):
        await self._auth.check("manage")
        self.manager.pause()

    @dbus_method()
    @bus_errors
    async def ResumeQueue(self):
        await self._auth.check("manage")
        self.manager.resume()

    @dbus_method()
    @bus_errors
    async def SetMaxParallelJobs(self, max_parallel_jobs: "u"):
        await self._auth.check("manage")
        self.manager.set_max_parallel(max_parallel_jobs)

    @dbus_method()
    @bus_errors
    def GetHealth(self) -> "a{sv}":
        return to_vardict(self.manager.health(), HEALTH_TYPES)

    @dbus_method()
    @bus_errors
    async def RegisterWorker(self, name: "s", capabilities: "s", limits: "a{sv}") -> "so":
        wanted = options_from_dbus(limits, _WORKER_LIMITS)
        # Parsed once polkit said yes: anyone may call, and 32 MiB of JSON holds the event loop for seconds.
        await self._auth.check("register-worker")
        caps = json_object_from_dbus(capabilities, "capabilities")
        owner = await self._auth.caller_uid()
        sender = current_caller().sender
        worker = self.manager.register_worker(name, caps, wanted.get("max_jobs", 0), owner, sender)
        # The caller may have left while polkit answered: its NameOwnerChanged came before there was a worker
        # to lose, and no other would come.
        if not await self._auth.caller_connected():
            self.manager.bus_name_lost(sender)
        return [worker.id, worker_path(worker.id)]

    # Signals are declared here for introspection; h2kd.bus.service sends them.
    @dbus_signal()
    def JobNew(self) -> "so":
        raise NotImplementedError

    @dbus_signal()
    def JobRemoved(self) -> "sos":
        raise NotImplementedError


add_read_properties(ManagerInterface, MANAGER_PROPERTIES, "manager")
