"""SystemdRunner: runs each job attempt as a transient systemd unit and follows it over D-Bus.

It starts units with Manager.StartTransientUnit, watches their PropertiesChanged / UnitRemoved /
JobRemoved signals (after Manager.Subscribe), passes StatusText changes on as unit_status and, once a
unit is over, reports exactly one unit_finished per attempt with systemd's Result and exit status, the
worker's result file and (for a failure) the tail of the unit's journal. Before reporting, it removes any
temporary output the worker recorded (h2kd.operations.tempfiles) and left behind because it was killed
outright. Units are systemd's: if h2kd goes away they keep running, and reattach() picks them up again.
The directories of a forgotten job's attempts are removed on a thread of their own, one after the other: pruning
a thousand jobs must not hold the event loop. An attempt that needs a directory whose removal is still pending
(a new job that took the id of a removed one) waits for that removal before it writes there.

A unit stopped because the system (or the user manager) is going down was interrupted, not cancelled: the
runner tells the manager when a shutdown begins (a job for shutdown.target appears; system_stopping), and
reports such an end with interrupted=True. So does a reattach that finds an attempt stopped in an earlier
boot (the boot id recorded in its spec file differs from this one), or by a manager that has since been replaced
by a new one (the manager instance recorded differs; a daemon-reexec keeps it): h2kd was not there to see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from h2kd.access import acting_groups, output_owner
from h2kd.config import SLICE_WEIGHT, Config
from h2kd.errors import H2kError
from h2kd.manager.ports import RunnerEvents, StartDeferred, StartUnanswered, StartWithdrawn, UnitOutcome
from h2kd.model.job import Job
from h2kd.model.repair import fixes_guest
from h2kd.operations.tempfiles import COMMIT_NAME, HELD_NAME, RECORD_NAME, release_held, remove_recorded, undo_commit
from h2kd.runner import bytecode, placement
from h2kd.runner import unit as units
from h2kd.worker.main import MAX_RESULT_BYTES

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"
# An attempt's spec once the attempt is settled without its unit (see _withdraw_spec).
WITHDRAWN_SPEC_NAME = "spec.withdrawn"

_GONE_ERRORS = {"org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.DBus.Error.UnknownObject"}
_FINAL_STATES = {"inactive", "failed"}
# What _apply() reads of a unit; systemd sends some forty properties with each change.
_READ_PROPERTIES = ("ActiveState", "ControlGroup", "SubState", "Result", "ExecMainCode", "ExecMainStatus",
                    "ExecMainStartTimestampMonotonic", "ExecMainExitTimestampMonotonic", "ExecMainStartTimestamp",
                    "ExecMainPID", "StatusText")
# systemd invalidates (rather than sends) some properties with every change of a unit, a StatusText update
# included; only these decide whether an attempt is over, so only they are worth a query.
_STATE_PROPERTIES = frozenset({"ActiveState", "SubState", "Result", "ExecMainCode", "ExecMainStatus",
                               "LoadState", "Job"})
LOG_TAIL_LINES = 15
LOG_TAIL_READ_SECONDS = 10      # a journalctl that takes longer is ended: the outcome goes on without its lines
# Calls in flight on the one connection: a burst of pipelined calls can overrun dbus-fast's writer.
MAX_CALLS_IN_FLIGHT = 16
# A worker's status lines are short; anything longer is cut before it reaches the job's progress and events.
MAX_STATUS_TEXT = 4096
RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
SHUTDOWN_TARGET = "shutdown.target"     # pulled in by poweroff, reboot, halt, kexec, and a user manager's exit
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
CALL_TIMEOUT_SECONDS = 60
CHECK_RETRY_SECONDS = 5.0       # a unit whose check failed is checked again after this
# close() waits this long at most for the removal of forgotten jobs' directories: h2kd must stop well within its
# unit's TimeoutStopSec (30 s), if need be leaving a directory behind.
CLOSE_WAITS_FOR_REMOVALS_SECONDS = 10
# A result file is read up to this size: the builtin worker keeps its results within MAX_RESULT_BYTES, and the
# slack covers a worker of another version that writes them a little differently. A larger file (a worker that
# keeps no limit, a damaged file) is not read, let alone parsed on the event loop and kept with the job for good.
MAX_RESULT_FILE_BYTES = MAX_RESULT_BYTES + 4096
# systemd's (or the bus's) refusals of a unit that pass: the same start may well succeed later.
_PASSING_ERRORS = frozenset({"org.freedesktop.DBus.Error.NoMemory", "org.freedesktop.DBus.Error.LimitsExceeded",
                             "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner",
                             "org.freedesktop.DBus.Error.Disconnected", "org.freedesktop.DBus.Error.NoReply",
                             "org.freedesktop.DBus.Error.Timeout", "org.freedesktop.DBus.Error.TimedOut"})
# Errors the bus gives when a call's answer did not come back (the answer timed out, systemd left the bus before
# answering): systemd may have carried the call out all the same.
_UNANSWERED_ERRORS = frozenset({"org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.Timeout",
                                "org.freedesktop.DBus.Error.TimedOut", "org.freedesktop.DBus.Error.Disconnected"})
# Writing an attempt's files: a full or over-quota disk (the store's, which holds runs/) passes too.
_PASSING_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM})
# Images a killed repair left root's wait for their loop device to go (a lazily unmounted file system holds it
# until its last user lets go): they are tried again this often, for as long as h2kd runs, and at its next start.
HELD_RETRY_SECONDS = 10.0
HELD_DIR_NAME = "held"         # runs/held/UNIT@TIME: the records of attempts whose job was removed
_HELD_SEPARATOR = "@"


class SystemdError(H2kError):
    """systemd refused a request (error_name: its D-Bus error), or could not be reached (error_name "")."""

    def __init__(self, message: str, error_name: str = ""):
        super().__init__(message)
        self.error_name = error_name


class SystemdUnanswered(SystemdError):
    """A request went out but no answer came back: systemd may have carried it out or not."""


@dataclass(eq=False)     # one per attempt: compared and hashed by identity
class _Followed:
    """What we know of one attempt's unit, from signals and queries."""

    unit: str
    job_id: str
    attempt: int
    path: str
    run_dir: Path
    job_created_at: int = 0             # tells this job from an earlier one that had the same id
    active_state: str = ""
    sub_state: str = ""
    result: str = ""
    exec_main_code: int = 0
    exec_main_status: int = 0
    exec_main_started: bool = False
    started_at: int = 0                 # ExecMainStartTimestamp: when the worker started (µs since the epoch)
    started_monotonic: int = 0          # ExecMainStartTimestampMonotonic and ExecMainExitTimestampMonotonic (µs)
    exited_monotonic: int = 0
    status_text: str = ""
    control_group: str = ""
    seen: bool = False                  # we have seen the unit loaded at least once
    stop_requested: bool = False
    settled: bool = False
    checking: bool = False
    check_again: bool = False
    tasks: set[asyncio.Task] = field(default_factory=set)


class SystemdRunner:
    """The Runner of manager.ports, on a systemd manager reached over D-Bus."""

    def __init__(self, config: Config, events: RunnerEvents):
        self._config = config
        self._events = events
        self._bus: MessageBus | None = None
        self._followed: dict[str, _Followed] = {}       # by unit name
        self._by_path: dict[str, _Followed] = {}        # by unit object path
        self._settling: set[_Followed] = set()          # no longer followed, their outcome not yet reported
        self._calls = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)
        self._journal_reads = asyncio.Semaphore(4)
        self._capabilities: dict[str, Any] | None = None
        self._notify_socket_dir: str | None = None
        self._cgroup_root = ""
        self._slice_ready = False
        self._reconnects = 0
        self._closing = False
        self._reconnect_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._compile_task: asyncio.Task | None = None
        # systemd's unique name on a bus (None on its private socket, where only systemd can send):
        # signals from anyone else are not systemd's news, whatever path and contents they claim.
        self._systemd_owner: str | None = None
        self._system_stopping = False
        self._boot_id = _read_boot_id()
        self._manager_instance = ""         # of the manager reached now (_learn_manager); "" while unknown
        # One thread: removals happen in the order they were asked for, and a burst of them takes one core's
        # worth of disk work, not every thread of the default executor.
        self._remover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="h2kd-remove")
        self._removals: dict[Path, asyncio.Future[Path | None]] = {}   # by directory: its latest removal not done
        self._held: set[Path] = set()        # records of images still to give back (HELD_NAME files)
        self._held_task: asyncio.Task | None = None
        self._held_scanned = False
        self._held_dir = self._config.runs_dir / HELD_DIR_NAME    # records of forgotten jobs' attempts
        self._cpu_slots = placement.cpu_slots()
        self._cpus: dict[str, int] = {}      # by unit: the CPU its attempt's conversion was given (_give_cpu)

    # ------------------------------------------------------------------ connection

    @property
    def reachable(self) -> bool:
        return self._bus is not None and self._bus.connected

    @property
    def reconnects(self) -> int:
        """How often the connection to systemd was lost and made again."""
        return self._reconnects

    async def connect(self) -> None:
        """Connect to the systemd manager's bus, subscribe to its signals, set up our slice. A runner that is
        closing stays unconnected."""
        self._manager_instance = ""     # until learnt: an attempt started meanwhile records none, and is not judged by it
        address = self._config.systemd_bus_address
        bus = MessageBus(bus_address=address) if address else MessageBus(bus_type=BusType.SYSTEM)
        await bus.connect()
        bus.add_message_handler(self._on_message)
        self._bus = bus
        try:
            for rule in (
                f"type='signal',sender='{SYSTEMD}',interface='{PROPS_IFACE}',member='PropertiesChanged',"
                f"path_namespace='{SYSTEMD_PATH}/unit'",
                f"type='signal',sender='{SYSTEMD}',interface='{MANAGER_IFACE}',member='UnitRemoved'",
                f"type='signal',sender='{SYSTEMD}',interface='{MANAGER_IFACE}',member='JobRemoved'",
                f"type='signal',sender='{SYSTEMD}',interface='{MANAGER_IFACE}',member='JobNew'",
                f"type='signal',sender='{DBUS}',interface='{DBUS}',member='NameOwnerChanged',arg0='{SYSTEMD}'",
            ):
                await self._call(DBUS, "/org/freedesktop/DBus", DBUS, "AddMatch", "s", [rule])
            await self._learn_systemd_owner()
            await self._manager_call("Subscribe", "", [])
            await self._learn_manager()
            self._set_system_stopping(await self._manager_property("SystemState") == "stopping")
            await self._ensure_slice()
        except Exception:
            bus.disconnect()
            self._bus = None
            raise
        if self._closing:
            # close() began while this connect waited for systemd: no check, no start from here on.
            bus.disconnect()
            self._bus = None
            return
        self._watch_task = asyncio.create_task(self._watch_connection(bus))
        if self._compile_task is None:     # once per runner: workers start faster with their .pyc at hand
            self._compile_task = asyncio.create_task(asyncio.to_thread(bytecode.compile_worker_modules))
        if not self._held_scanned:         # images left root's by units killed before or while h2kd was down
            # Read after HELD_RETRY_SECONDS, once the manager has reattached the units still running.
            self._held_scanned = True
            for record in [*self._config.runs_dir.glob(f"*/{HELD_NAME}"), *self._held_dir.glob("*")]:
                self._give_back_later(record)
        # Anything we followed on an earlier connection may have ended while we were cut off.
        for followed in list(self._followed.values()):
            self._schedule_check(followed)
        try:
            self._events.runner_connected()
        except Exception:
            log.exception("runner_connected handler failed")

    def keep_connecting(self) -> None:
        """Connect in the background, trying again and again (after a first connect() failed)."""
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.create_task(self._reconnect())

    async def close(self) -> None:
        """Disconnect, once the directories of forgotten jobs are removed (or CLOSE_WAITS_FOR_REMOVALS_SECONDS
        have passed). Units keep running; a new runner can reattach() to them."""
        self._closing = True
        if self._removals:
            # Their jobs are gone from the store: a directory left now would never be removed.
            await asyncio.wait(set(self._removals.values()), timeout=CLOSE_WAITS_FOR_REMOVALS_SECONDS)
        # The executor's thread is joined when the process exits: removals still queued would hold h2kd's stop past
        # that wait. They are dropped (their directories left), and none is taken from now on.
        self._remover.shutdown(wait=False, cancel_futures=True)
        tasks = [t for t in (self._reconnect_task, self._watch_task, self._compile_task, self._held_task)
                 if t is not None]
        for followed in (*self._followed.values(), *self._settling):
            tasks.extend(followed.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bus, self._bus = self._bus, None
        if bus is not None:
            bus.disconnect()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(bus.wait_for_disconnect()), 2)

    async def _watch_connection(self, bus: MessageBus) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(bus.wait_for_disconnect())
        if self._closing or bus is not self._bus:
            return
        log.warning("lost the connection to systemd; reconnecting")
        self._reconnect_task = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        attempt = 0
        while not self._closing:
            await asyncio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
            if self._closing:
                return
            attempt += 1
            try:
                await self.connect()
                self._reconnects += 1
                log.info("reconnected to systemd")
                return
            except Exception as exc:
                log.debug("reconnecting to systemd failed: %s", exc)

    async def _call(self, destination: str, path: str, interface: str, member: str, signature: str,
                    body: list[Any]) -> Message:
        bus = self._bus
        if bus is None or not bus.connected:
            raise SystemdError("systemd is not reachable")
        async with self._calls:
            try:
                reply = await asyncio.wait_for(bus.call(Message(
                    destination=destination, path=path, interface=interface, member=member,
                    signature=signature, body=body)), CALL_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                raise SystemdUnanswered(f"systemd did not answer {member} within {CALL_TIMEOUT_SECONDS} s") from None
            except Exception as exc:   # the connection broke under the call (dbus-fast raises various types)
                raise SystemdUnanswered(f"calling {member} on systemd failed: {exc}") from exc
        if reply is None:
            raise SystemdError(f"no reply from systemd to {member}")
        return reply

    async def _manager_call(self, member: str, signature: str, body: list[Any]) -> list[Any]:
        reply = await self._call(SYSTEMD, SYSTEMD_PATH, MANAGER_IFACE, member, signature, body)
        if reply.message_type == MessageType.ERROR:
            raise SystemdError(f"systemd refused {member}: {reply.error_name}: {_error_text(reply)}",
                               reply.error_name or "")
        return list(reply.body)

    async def _manager_property(self, name: str) -> Any:
        reply = await self._call(SYSTEMD, SYSTEMD_PATH, PROPS_IFACE, "Get", "ss", [MANAGER_IFACE, name])
        return None if reply.message_type == MessageType.ERROR else reply.body[0].value

    async def _learn_manager(self) -> None:
        """Where the manager's notify socket lives (a user manager's XDG_RUNTIME_DIR; None for the
        system manager), the cgroup its units live under, and which instance of the manager it is."""
        # When its userspace started, which a daemon-reexec carries over and a new manager does not (nor, on
        # systemd 256 and later, a soft-reboot: its count is part of the instance).
        started = await self._manager_property("UserspaceTimestamp")
        soft_reboots = await self._manager_property("SoftRebootsCount")
        self._manager_instance = (f"{started}" + (f"/{soft_reboots}" if soft_reboots is not None else "")
                                  if started else "")
        self._notify_socket_dir = None
        for item in await self._manager_property("Environment") or []:
            if item.startswith("XDG_RUNTIME_DIR="):
                self._notify_socket_dir = item.split("=", 1)[1]
        self._cgroup_root = (await self._manager_property("ControlGroup") or "").rstrip("/")

    async def _ensure_slice(self) -> None:
        """Make sure our slice exists: create it as a transient slice, with the configured weights (or
        SLICE_WEIGHT). If it already exists (its unit file, or a previous h2kd), set only the weights
        configured, for this boot: the slice's own, or an administrator's, stay otherwise."""
        configured = [(name, Variant("t", value)) for name, value in
                      (("CPUWeight", self._config.cpu_weight), ("IOWeight", self._config.io_weight))
                      if value is not None]
        weights = dict(configured)
        props = [("Description", Variant("s", "h2kd disk conversions")),
                 *((name, weights.get(name, Variant("t", SLICE_WEIGHT))) for name in ("CPUWeight", "IOWeight"))]
        try:
            await self._manager_call("StartTransientUnit", "ssa(sv)a(sa(sv))",
                                     [self._config.slice, "fail", props, []])
        except SystemdError as exc:
            if "UnitExists" not in str(exc):
                raise
            if configured:
                await self._manager_call("SetUnitProperties", "sba(sv)", [self._config.slice, True, configured])
        self._slice_ready = True

    # ------------------------------------------------------------------ Runner

    async def start(self, job: Job, attempt: int) -> str:
        try:
            return await self._start(job, attempt)
        except SystemdError as exc:
            if not exc.error_name or exc.error_name in _PASSING_ERRORS:   # "" : systemd not reachable
                raise StartDeferred(str(exc)) from exc
            raise
        except OSError as exc:
            if exc.errno in _PASSING_ERRNOS:
                raise StartDeferred(f"cannot write the attempt's files: {exc}") from exc
            raise

    async def _start(self, job: Job, attempt: int) -> str:
        unit = units.unit_name(job.id, attempt)
        # Given before the first await: attempts started at once (the first batch after h2kd starts) see each
        # other's CPUs.
        cpu = self._give_cpu(unit, job)
        try:
            return await self._start_unit(job, attempt, unit, cpu)
        finally:
            if unit not in self._followed:
                self._cpus.pop(unit, None)

    def _give_cpu(self, unit: str, job: Job) -> int | None:
        """The CPU the attempt's conversions and comparisons are to be kept on (h2kd.runner.placement); None for
        an inspection (a few quick reads) and with pin_conversions off."""
        if not self._config.pin_conversions or job.operation == "inspect":
            return None
        cpu = placement.choose_cpu(self._cpu_slots, self._cpus.values())
        if cpu is not None:
            self._cpus[unit] = cpu
        return cpu

    async def _start_unit(self, job: Job, attempt: int, unit: str, cpu: int | None) -> str:
        run_dir = units.run_dir(self._config, unit)
        await self._removed(run_dir)
        if await asyncio.to_thread(_left_by_another_job, run_dir, job):
            # An earlier job with the same id (removed, and its id chosen again) left its attempt's files here,
            # their removal dropped (h2kd stopped meanwhile): its result must not pass for this attempt's, nor
            # its notes of temporary files and of a commit be undone on this attempt's end.
            self._remove_later(run_dir)
            await self._removed(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path, result_path = run_dir / "spec.json", run_dir / "result.json"
        uid, gid = output_owner(job.owner, self._config.output_group)
        # spec_checked: job.spec is the spec as h2kd.model.spec checked and completed it at submission, so
        # the worker need not load the spec models again to check it (a good part of its start-up time).
        _write_json_atomically(spec_path, {"job_id": job.id, "job_created_at": job.created_at, "attempt": attempt,
                                           "spec": job.spec,
                                           "spec_checked": True, "boot_id": self._boot_id,
                                           "manager_instance": self._manager_instance,
                                           "output_roots": [str(r) for r in self._config.output_roots],
                                           "source_roots": [str(r) for r in self._config.source_roots],
                                           "owner": {"uid": uid, "gid": gid, "mode": self._config.output_mode,
                                                     # the job's own output directory: the group enters it only
                                                     # when it is output_group, not whatever group the user has
                                                     "directory_mode": 0o750 if self._config.output_group else 0o700,
                                                     # looked up here: the unit may not reach a network NSS
                                                     "groups": (acting_groups(job.owner, job.owner_groups)
                                                                if job.owner else [])},
                                           "source_identity": job.source_identity,
                                           "cpu": cpu})
        policy = job.spec.get("execution_policy") or {}
        props = units.build_properties(
            self._config, job_id=job.id, attempt=attempt, operation=job.operation, spec_path=spec_path,
            result_path=result_path, output_path=job.output, source_path=job.source,
            timeout_seconds=int(policy.get("timeout_seconds") or units.DEFAULT_TIMEOUT_SECONDS),
            notify_socket_dir=self._notify_socket_dir,
            fixes_guest=fixes_guest(job.spec), owner=job.owner)
        if not self._slice_ready:
            await self._ensure_slice()
        if job.cancel_requested:
            # Cancelled while the files and the slice were made: a unit started now would be stopped at once,
            # having perhaps begun the work (a raw image's repair changes it in place).
            self._remove_later(run_dir)
            raise StartWithdrawn(f"job {job.id} was cancelled before its unit {unit} started")
        followed = self._follow(unit, job.id, attempt, job.created_at)
        try:
            await self._manager_call("StartTransientUnit", "ssa(sv)a(sa(sv))", [unit, "fail", props, []])
        except SystemdUnanswered as exc:
            # Perhaps started, perhaps not: followed all the same, its check (now, and at each reconnect)
            # finds it running, or settles it as never started.
            self._schedule_check(followed)
            raise StartUnanswered(unit, str(exc)) from exc
        except SystemdError as exc:
            if "UnitExists" in str(exc):
                # This attempt's unit already runs (started before a restart): follow it, never start twice.
                self._schedule_check(followed)
                return unit
            if exc.error_name in _UNANSWERED_ERRORS:
                # Not a refusal: taken as one, the job would start again under a new unit while this one converts.
                self._schedule_check(followed)
                raise StartUnanswered(unit, str(exc)) from exc
            self._drop(followed)
            raise
        except Exception:
            self._drop(followed)
            raise
        self._schedule_check(followed)
        return unit

    async def stop(self, unit: str) -> None:
        followed = self._followed.get(unit)
        if followed is not None:
            followed.stop_requested = True
        try:
            await self._manager_call("StopUnit", "ss", [unit, "replace"])
        except SystemdError as exc:
            if not any(name in str(exc) for name in _GONE_ERRORS):
                raise
        if followed is not None:
            self._schedule_check(followed)

    async def reattach(self, job: Job) -> str:
        attempt = job.attempt
        unit = job.unit or units.unit_name(job.id, attempt)
        run_dir = units.run_dir(self._config, unit)
        await self._removed(run_dir)
        cpu = (await asyncio.to_thread(_read_json, run_dir / "spec.json") or {}).get("cpu")
        followed = self._followed.get(unit) or self._follow(unit, job.id, attempt, job.created_at)
        if type(cpu) is int and unit not in self._cpus:     # given before h2kd restarted: counted again
            self._cpus[unit] = cpu
        self._schedule_check(followed)
        return unit

    def forget(self, job: Job) -> None:
        """Remove the directories of the job's attempts (not of one still followed: its end is still to be read),
        in the background."""
        for attempt in range(1, job.attempt + 1):
            unit = units.unit_name(job.id, attempt)
            if unit not in self._followed:
                self._remove_later(units.run_dir(self._config, unit))

    async def keep_only(self, jobs: Iterable[Job], unreadable_ids: Iterable[str] = ()) -> None:
        known = {units.unit_name(job.id, attempt) for job in jobs for attempt in range(1, job.attempt + 1)}
        unreadable = {f"{units.UNIT_PREFIX}{units.systemd_escape(job_id)}-" for job_id in unreadable_ids}
        try:
            names = await asyncio.to_thread(os.listdir, self._config.runs_dir)
        except FileNotFoundError:
            return
        for name in names:
            # An escaped id holds no "-": the prefix up to the attempt's number is one job's alone.
            if name.rsplit("-", 1)[0] + "-" in unreadable:
                continue
            if name.startswith(units.UNIT_PREFIX) and name not in known:
                log.info("removing %s: it belongs to no job h2kd has (its removal was cut short)", name)
                self._remove_later(self._config.runs_dir / name)

    def _remove_later(self, directory: Path) -> None:
        if self._closing:
            log.warning("not removing %s: h2kd is stopping", directory)
            return
        removal = asyncio.get_running_loop().run_in_executor(self._remover, _remove_directory, directory,
                                                              self._held_dir)
        self._removals[directory] = removal
        removal.add_done_callback(functools.partial(self._removal_done, directory))

    def _removal_done(self, directory: Path, removal: asyncio.Future[Path | None]) -> None:
        if self._removals.get(directory) is removal:
            del self._removals[directory]
        error = None if removal.cancelled() else removal.exception()
        if error is not None:
            log.warning("could not remove %s: %s", directory, error)
        elif not removal.cancelled() and removal.result() is not None:
            self._give_back_later(removal.result())

    # ------------------------------------------------------------------ images a repair left root's

    async def _give_back(self, record: Path, unit: str) -> None:
        """Give back the images in `record` (release_held) that nothing holds any more; the others are tried
        again later. On the remover's thread, so that it never runs beside the removal of its directory."""
        try:
            given = await asyncio.get_running_loop().run_in_executor(self._remover, release_held, str(record))
        except Exception:
            log.exception("giving back the images held by unit %s failed", unit)
            given = []
        for path in given:
            log.info("gave %s back to its owner, left root's by unit %s", path, unit)
        if record.exists():
            self._give_back_later(record)
        else:
            self._held.discard(record)

    def _give_back_later(self, record: Path) -> None:
        self._held.add(record)
        if not self._closing and (self._held_task is None or self._held_task.done()):
            self._held_task = asyncio.create_task(self._give_back_held())

    async def _give_back_held(self) -> None:
        while self._held and not self._closing:
            await asyncio.sleep(HELD_RETRY_SECONDS)
            for record in sorted(self._held):
                unit = _unit_of_record(record)
                if record.name == HELD_NAME and unit in self._followed:
                    # Its unit runs (h2kd restarted during a repair): the worker may be adding to the record as
                    # it is read and written back here. Its end gives back what it holds (_remove_leftovers).
                    continue
                self._held.discard(record)
                await self._give_back(record, unit)

    async def _removed(self, directory: Path) -> None:
        """Return once no removal of `directory` is pending: its files are then of whoever writes them next."""
        removal = self._removals.get(directory)
        if removal is not None:
            # asyncio.wait, not await: a start cancelled meanwhile must not cancel the removal.
            await asyncio.wait({removal})

    def capabilities(self) -> dict[str, Any]:
        if self._capabilities is None:
            self.refresh()
        assert self._capabilities is not None
        return dict(self._capabilities)

    def refresh(self) -> dict[str, Any]:
        """Detect again what this host offers to workers."""
        free: dict[str, int] = {}
        for root in self._config.output_roots:
            with contextlib.suppress(OSError):
                free[str(root)] = shutil.disk_usage(_existing_ancestor(root)).free
        qemu_img = shutil.which("qemu-img")
        self._capabilities = {
            "qemu_img": qemu_img is not None,
            **device_capabilities(),
            "lvm": shutil.which("lvm") is not None,
            "mount": shutil.which("mount") is not None,
            "free_bytes": free,
        }
        return dict(self._capabilities)

    # ------------------------------------------------------------------ following

    def _follow(self, unit: str, job_id: str, attempt: int, job_created_at: int) -> _Followed:
        followed = _Followed(unit, job_id, attempt, units.unit_object_path(unit), units.run_dir(self._config, unit),
                             job_created_at, control_group=units.control_group(self._cgroup_root,
                                                                                self._config.slice, unit))
        self._followed[unit] = followed
        self._by_path[followed.path] = followed
        return followed

    def _drop(self, followed: _Followed) -> None:
        """Follow no more a unit that never started: the refusal is its attempt's end. systemd announces the
        removal of a unit it refused before it answers, and the check that signal scheduled would end the
        attempt a second time."""
        followed.settled = True
        for task in followed.tasks:
            task.cancel()
        self._unfollow(followed)

    def _unfollow(self, followed: _Followed) -> None:
        if self._followed.get(followed.unit) is followed:
            del self._followed[followed.unit]
            self._cpus.pop(followed.unit, None)
        if self._by_path.get(followed.path) is followed:
            del self._by_path[followed.path]

    async def _learn_systemd_owner(self) -> None:
        self._systemd_owner = None
        if not (self._bus and self._bus.unique_name):
            return                      # systemd's private socket: a connection to systemd alone
        reply = await self._call(DBUS, "/org/freedesktop/DBus", DBUS, "GetNameOwner", "s", [SYSTEMD])
        if reply.message_type == MessageType.METHOD_RETURN:
            self._systemd_owner = reply.body[0]
        else:
            self._systemd_owner = ""    # on a bus but not (yet) owned: nobody's signals count until it is

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "NameOwnerChanged" and msg.sender == DBUS and msg.body and msg.body[0] == SYSTEMD:
            self._systemd_owner = msg.body[2]     # systemd re-executed or restarted: its new name
            return
        if self._systemd_owner is not None and msg.sender != self._systemd_owner:
            return
        try:
            if msg.member == "PropertiesChanged" and msg.interface == PROPS_IFACE:
                followed = self._by_path.get(msg.path)
                if followed is not None:
                    interface, changed, invalidated = msg.body
                    self._apply(followed, {k: changed[k].value for k in _READ_PROPERTIES if k in changed})
                    if followed.active_state in _FINAL_STATES or not _STATE_PROPERTIES.isdisjoint(invalidated):
                        self._schedule_check(followed)
            elif msg.member == "UnitRemoved" and msg.interface == MANAGER_IFACE:
                if msg.body[0] == self._config.slice:
                    self._slice_ready = False   # collected: recreate it, weights and all, before the next start
                followed = self._followed.get(msg.body[0])
                if followed is not None:
                    self._schedule_check(followed)
            elif msg.member == "JobRemoved" and msg.interface == MANAGER_IFACE:
                if msg.body[2] == SHUTDOWN_TARGET and msg.body[3] != "done":
                    self._set_system_stopping(False)    # the shutdown was called off
                followed = self._followed.get(msg.body[2])
                if followed is not None:
                    self._schedule_check(followed)
            elif msg.member == "JobNew" and msg.interface == MANAGER_IFACE and msg.body[2] == SHUTDOWN_TARGET:
                self._set_system_stopping(True)
        except Exception:
            log.exception("handling a systemd signal failed")

    def _set_system_stopping(self, stopping: bool) -> None:
        if stopping == self._system_stopping:
            return
        self._system_stopping = stopping
        log.info("the system is shutting down: no job starts until h2kd runs again" if stopping
                 else "the shutdown was called off")
        try:
            self._events.system_stopping(stopping)
        except Exception:
            log.exception("system_stopping handler failed")

    def _interrupted(self, followed: _Followed, worker_result: dict[str, Any] | None,
                     spec_file: dict[str, Any]) -> bool:
        """Whether the attempt was stopped by the system going down: it ended by a stop (or was killed
        outright) that h2kd did not ask for, while a shutdown was under way, in an earlier boot, or under a
        manager that is no longer the one running."""
        if followed.stop_requested or (worker_result is not None and worker_result.get("status") != "cancelled"):
            return False
        if self._system_stopping:
            return True
        started_in = spec_file.get("boot_id")
        if started_in and self._boot_id and started_in != self._boot_id:
            return True
        return _other_manager(spec_file.get("manager_instance"), self._manager_instance)

    def _apply(self, followed: _Followed, values: dict[str, Any]) -> None:
        """Take in property values of the unit (from a signal or a query)."""
        if followed.settled:
            return
        if "ActiveState" in values:
            followed.active_state = values["ActiveState"]
            if values["ActiveState"] in ("active", "reloading", "deactivating"):
                followed.exec_main_started = True
        if values.get("ControlGroup"):
            followed.control_group = values["ControlGroup"]
        if "SubState" in values:
            followed.sub_state = values["SubState"]
        if "Result" in values:
            followed.result = values["Result"]
        if "ExecMainCode" in values:
            followed.exec_main_code = int(values["ExecMainCode"])
        if "ExecMainStatus" in values:
            followed.exec_main_status = int(values["ExecMainStatus"])
        if values.get("ExecMainStartTimestampMonotonic") or values.get("ExecMainPID"):
            followed.exec_main_started = True
        if values.get("ExecMainStartTimestampMonotonic"):
            followed.started_monotonic = int(values["ExecMainStartTimestampMonotonic"])
        if values.get("ExecMainExitTimestampMonotonic"):
            followed.exited_monotonic = int(values["ExecMainExitTimestampMonotonic"])
        if values.get("ExecMainStartTimestamp"):
            followed.started_at = int(values["ExecMainStartTimestamp"])
        text = str(values.get("StatusText") or "")[:MAX_STATUS_TEXT]
        if text and text != followed.status_text:
            followed.status_text = text
            try:
                self._events.unit_status(followed.job_id, followed.attempt, text, followed.started_at)
            except Exception:
                log.exception("unit_status handler failed")

    def _schedule_check(self, followed: _Followed) -> None:
        if followed.settled:
            return
        if followed.checking:
            followed.check_again = True
            return
        followed.checking = True
        task = asyncio.get_running_loop().create_task(self._check(followed))
        followed.tasks.add(task)
        task.add_done_callback(followed.tasks.discard)

    async def _check(self, followed: _Followed) -> None:
        """Query the unit; settle the attempt if the unit is over (or gone)."""
        try:
            while True:
                followed.check_again = False
                state = await self._query(followed)
                if state == "over":
                    await self._settle(followed, gone=False)
                    return
                if state == "gone":
                    await self._settle(followed, gone=True)
                    return
                if not followed.check_again:
                    return
        except SystemdError as exc:
            # Tried again on reconnect, on the unit's next signal, and in any case a little later: after its last
            # signal a unit sends no other, and its job would hold its slot for ever.
            log.warning("checking unit %s failed: %s; checking again in %g s", followed.unit, exc,
                        CHECK_RETRY_SECONDS)
            self._check_later(followed)
        except Exception:
            log.exception("checking unit %s failed", followed.unit)
        finally:
            followed.checking = False

    def _check_later(self, followed: _Followed) -> None:
        async def later() -> None:
            await asyncio.sleep(CHECK_RETRY_SECONDS)
            if not self._closing:
                self._schedule_check(followed)
        task = asyncio.get_running_loop().create_task(later())
        followed.tasks.add(task)
        task.add_done_callback(followed.tasks.discard)

    async def _query(self, followed: _Followed) -> str:
        """"running", "over" (inactive/failed with no job pending) or "gone" (not loaded)."""
        reply = await self._call(SYSTEMD, SYSTEMD_PATH, MANAGER_IFACE, "GetUnit", "s", [followed.unit])
        if reply.message_type == MessageType.ERROR:
            if reply.error_name in _GONE_ERRORS:
                return "gone"
            raise SystemdError(f"GetUnit {followed.unit}: {reply.error_name}: {_error_text(reply)}")
        path = reply.body[0]
        values: dict[str, Any] = {}
        for interface in (UNIT_IFACE, SERVICE_IFACE):
            reply = await self._call(SYSTEMD, path, PROPS_IFACE, "GetAll", "s", [interface])
            if reply.message_type == MessageType.ERROR:
                if reply.error_name in _GONE_ERRORS:
                    return "gone"
                raise SystemdError(f"GetAll {followed.unit}: {reply.error_name}: {_error_text(reply)}")
            values.update({k: v.value for k, v in reply.body[0].items()})
        # Asking for a unit by path loads it: a collected unit comes back as an empty "not-found" one.
        if values.get("LoadState") == "not-found":
            return "gone"
        if followed.check_again:
            # Signals came while the two sets were read (the unit may have ended, and been collected, between
            # them): they are newer than what was read first, so they are kept, and the unit is asked again.
            return "running"
        self._apply(followed, values)
        followed.seen = True
        job_id = values.get("Job", (0, "/"))[0]
        if followed.active_state in _FINAL_STATES and not job_id:
            return "over"
        return "running"

    async def _settle(self, followed: _Followed, gone: bool) -> None:
        """Report the end of the attempt, once."""
        if followed.settled:
            return
        followed.settled = True
        self._unfollow(followed)
        self._settling.add(followed)     # its task (reading the journal, say) is still ended by close()
        try:
            await self._report_outcome(followed, gone)
        except Exception:
            # Reported all the same (once: _report_outcome reports last): an attempt whose end is never reported
            # leaves its job running for ever, holding its slot.
            log.exception("reading how unit %s ended failed; its attempt is reported as ended unrecorded",
                          followed.unit)
            self._report_finished(followed, UnitOutcome(
                unit=followed.unit, result="unknown", exit_status=0, worker_result=None, log_tail=[],
                stopped_by_request=followed.stop_requested, interrupted=False))
        finally:
            self._settling.discard(followed)

    async def _report_outcome(self, followed: _Followed, gone: bool) -> None:
        spec_file = _read_json(followed.run_dir / "spec.json") or {}
        if not _files_are_of(followed, spec_file):
            # h2kd stopped between recording the attempt and starting its unit, and the directory is an earlier
            # job's of the same id: this attempt never started, whatever that job's result says.
            outcome = UnitOutcome(unit=followed.unit, result="not-started", exit_status=0, worker_result=None,
                                  log_tail=[], stopped_by_request=followed.stop_requested, interrupted=False)
            self._report_finished(followed, outcome)
            return
        # A withdrawn spec: the attempt was settled as ended unrecorded, and a result written since is a late
        # unit's, whose worker found nothing to run.
        withdrawn = (followed.run_dir / WITHDRAWN_SPEC_NAME).exists()
        worker_result = None if withdrawn else _read_result(followed.run_dir / "result.json")
        ended_at = 0            # now: h2kd saw the unit end
        started_at = followed.started_at
        ran_usec = 0
        # Collected before its final state reached us, or never seen (reattach after it was collected): what we
        # saw is stale or nothing, so the files are all there is to go by, also for when the attempt ran.
        if (gone and followed.active_state not in _FINAL_STATES) or not (followed.seen or followed.active_state):
            result, status = _outcome_from_files(followed.run_dir, worker_result)
            if result == "unknown":
                # Settled without its unit: a start that h2kd sent just before it died may still reach systemd
                # after this look. Without its spec such a unit's worker does nothing, while the job's next
                # attempt runs under a unit of its own. Renamed, not removed: should h2kd stop again before the
                # outcome is stored, the next look must still find that the attempt was made ("unknown", which
                # counts), not that it never started (which does not, and would run the job again and again).
                _withdraw_spec(followed.run_dir)
            if worker_result is not None:
                ended_at = _written_at(followed.run_dir / "result.json")
                # The spec file is written just before the unit is started: the worker started about then.
                started_at = started_at or _written_at(followed.run_dir / "spec.json")
        else:
            result, status = followed.result or "success", followed.exec_main_status
            if result == "success" and not followed.exec_main_started and worker_result is None:
                result = "not-started"
            if 0 < followed.started_monotonic <= followed.exited_monotonic:
                ran_usec = followed.exited_monotonic - followed.started_monotonic
        await self._remove_leftovers(followed, worker_result)
        succeeded = result == "success" and (worker_result or {}).get("status") == "completed"
        # The log tail only explains failures; reading the journal for a success would delay every job.
        log_tail = [] if succeeded else await self._log_tail(followed)
        outcome = UnitOutcome(unit=followed.unit, result=result, exit_status=status, worker_result=worker_result,
                              log_tail=log_tail, stopped_by_request=followed.stop_requested,
                              interrupted=not succeeded and self._interrupted(followed, worker_result, spec_file),
                              ended_at=ended_at, started_at=started_at, ran_usec=ran_usec)
        self._report_finished(followed, outcome)

    def _report_finished(self, followed: _Followed, outcome: UnitOutcome) -> None:
        try:
            self._events.unit_finished(followed.job_id, followed.attempt, outcome)
        except Exception:
            log.exception("unit_finished handler failed")

    async def _remove_leftovers(self, followed: _Followed, worker_result: dict[str, Any] | None) -> None:
        """Remove the temporary outputs a worker recorded but could not remove itself (it was killed
        outright: SIGKILL, OOM), and give back the images it had made root's for a repair. The unit is over,
        so nothing writes them any more."""
        held = followed.run_dir / HELD_NAME
        if held.exists():
            await self._give_back(held, followed.unit)
        record = followed.run_dir / RECORD_NAME
        if not record.exists():
            return
        outputs = _field(worker_result, "outputs", dict)
        keep = {str(d.get("path")) for d in _field(outputs, "disks", list) if isinstance(d, dict)}
        keep.add(str(outputs.get("domain_xml")))
        roots = [str(r) for r in self._config.output_roots]
        commit = followed.run_dir / COMMIT_NAME
        if commit.exists() and _field(worker_result, "status", str) != "completed":
            # Killed while its outputs got their names: the files they replaced are put back before the
            # temporary names (which they have until then) are removed.
            try:
                undone = await asyncio.to_thread(undo_commit, str(commit), roots)
            except Exception:
                log.exception("undoing the commit of unit %s failed", followed.unit)
                return
            for path in undone:
                log.info("%s is back as it was before unit %s, which was killed while giving its outputs their "
                         "names", path, followed.unit)
        try:
            # And in the attempt's own directory, where a dry run's unpacked copy goes when the image's own may
            # not be written (h2kd.operations.offline_fix): a disk's size, kept until the job is removed otherwise.
            # The job directory only if the attempt did not complete: its outputs may have been moved out already.
            completed = _field(worker_result, "status", str) == "completed"
            removed = await asyncio.to_thread(remove_recorded, str(record), [*roots, str(followed.run_dir)], keep,
                                              None if completed else followed.job_id)
        except Exception:
            log.exception("removing the temporary files of unit %s failed", followed.unit)
            return
        for path in removed:
            log.info("removed %s, left behind by unit %s", path, followed.unit)

    async def _log_tail(self, followed: _Followed) -> list[str]:
        """The last lines the unit logged, from the journal (empty if there is no journal)."""
        journalctl = shutil.which("journalctl")
        if journalctl is None:
            return []
        # Only what the unit itself logged: h2kd's own entries carry H2K_JOB_ID too. Under the system
        # manager journald knows the unit; a user manager's units are found by their cgroup; and the
        # worker's own entries name their job and attempt wherever it runs.
        # _UID=0 (journald's, not the sender's word): any user may log entries with these fields.
        argv = [journalctl, "--no-pager", "-q", "-o", "cat", "-n", str(LOG_TAIL_LINES),
                f"_SYSTEMD_UNIT={followed.unit}", "+",
                f"H2K_JOB_ID={followed.job_id}", f"H2K_ATTEMPT={followed.attempt}", "SYSLOG_IDENTIFIER=h2k-worker",
                "_UID=0"]
        if followed.control_group:
            argv += ["+", f"_SYSTEMD_CGROUP={followed.control_group}"]
        lines: list[str] = []
        async with self._journal_reads:
            # The unit's last lines may reach journald after it ends, the later the busier the machine: read
            # again while the worker's closing line ("h2k-worker: failed: ..." and the like) is missing.
            for delay in (0.0, 0.2, 0.5, 1.0):
                await asyncio.sleep(delay)
                proc = None
                try:
                    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                                stderr=asyncio.subprocess.DEVNULL)
                    out, _ = await asyncio.wait_for(proc.communicate(), LOG_TAIL_READ_SECONDS)
                except (OSError, asyncio.TimeoutError):
                    break
                finally:
                    # A read that hangs, or that h2kd's stop interrupts, must not leave journalctl behind. One stuck
                    # where SIGKILL cannot end it (a journal on a hung disk) is not waited for either.
                    if proc is not None and proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(proc.wait(), LOG_TAIL_READ_SECONDS)
                lines = out.decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
                if any(line.startswith(_WORKER_CLOSING_LINES) for line in lines[-3:]):
                    break
        return lines


# How the worker's last line begins (h2kd.worker.main): once it is in the journal, so is the rest.
_WORKER_CLOSING_LINES = ("h2k-worker: failed: ", "h2k-worker: completed", "h2k-worker: cancelled")


def _files_are_of(followed: _Followed, spec_file: dict[str, Any]) -> bool:
    """Whether the attempt's directory (its spec file, as read) holds this job's files (or none), not an
    earlier same-named job's. Files written before jobs were told apart (no job_created_at) are this job's."""
    written_for = spec_file.get("job_created_at")
    return not (written_for and followed.job_created_at and written_for != followed.job_created_at)


def _outcome_from_files(run_dir: Path, worker_result: dict[str, Any] | None) -> tuple[str, int]:
    """systemd's Result and exit status as far as the attempt's files tell, when systemd no longer
    knows the unit: systemd's own, from units.UNIT_ENDED_NAME, where systemd ended the unit itself
    (_unit_ended); else the worker's exit code follows from its result's status (0 completed, 1 or 2
    failed, 143 cancelled); without a result file the unit ended unrecorded ("unknown"), and without
    even a spec file (spec.json, or the WITHDRAWN_SPEC_NAME it became) it was never started
    ("not-started"). Once the spec is withdrawn, what a late unit wrote since is not the attempt's."""
    withdrawn = (run_dir / WITHDRAWN_SPEC_NAME).exists()
    ended = None if withdrawn else _unit_ended(run_dir)
    if ended is not None:
        return ended
    if worker_result is None:
        started = withdrawn or (run_dir / "spec.json").exists()
        return ("unknown", 0) if started else ("not-started", 0)
    status = worker_result.get("status")
    if status == "completed":
        return "success", 0
    if status == "cancelled":
        return "exit-code", 143
    return "exit-code", 1 if _field(worker_result, "error", dict).get("retryable", True) else 2


# systemd's results for a unit it ended itself (or whose process the kernel killed), which a worker's result file
# cannot tell: it says "cancelled" for any stop.
_SYSTEMD_ENDINGS = {"timeout", "oom-kill", "signal", "core-dump", "watchdog", "resources"}


def _unit_ended(run_dir: Path) -> tuple[str, int] | None:
    """systemd's Result and exit status from the attempt's units.UNIT_ENDED_NAME file, when they are one of
    _SYSTEMD_ENDINGS; None otherwise (the worker's result tells the rest better)."""
    try:
        words = (run_dir / units.UNIT_ENDED_NAME).read_text(errors="replace").split()
    except OSError:
        return None
    if not words or words[0] not in _SYSTEMD_ENDINGS:
        return None
    status = words[2] if len(words) > 2 else ""
    if status.isdigit():
        return words[0], int(status)
    try:
        return words[0], int(signal.Signals["SIG" + status])     # EXIT_STATUS names a signal: KILL, SEGV...
    except KeyError:
        return words[0], 0


def _field(data: dict[str, Any] | None, name: str, kind: type) -> Any:
    """data[name] if it is of that kind, else an empty one: a result file may come from a worker of another
    version, or be damaged (the manager reads it the same way)."""
    value = (data or {}).get(name)
    return value if isinstance(value, kind) else kind()


def _left_by_another_job(run_dir: Path, job: Job) -> bool:
    """Whether an attempt's directory holds files of another job than `job` (or of none that can be told)."""
    try:
        if not any(run_dir.iterdir()):
            return False
        written = json.loads((run_dir / "spec.json").read_text())
        return not isinstance(written, dict) or (written.get("job_id"), written.get("job_created_at")) != \
            (job.id, job.created_at)
    except FileNotFoundError:
        return run_dir.exists()
    except (OSError, ValueError):
        return True


def _withdraw_spec(run_dir: Path) -> None:
    """Rename an attempt's spec so that no worker finds it, keeping the record that the attempt was made."""
    try:
        os.replace(run_dir / "spec.json", run_dir / WITHDRAWN_SPEC_NAME)
    except FileNotFoundError:
        pass
    except OSError as e:    # its unit, started late, would run the attempt once more: said, not hidden
        log.warning("could not withdraw the spec in %s: %s", run_dir, e)


def _remove_directory(directory: Path, held_dir: Path) -> Path | None:
    """Remove an attempt's directory and everything in it, if it is there (on the remover's thread). A record of
    images still to give back (HELD_NAME) is moved into held_dir first, where it outlives the directory and no
    later attempt under the same unit name shares it; where it went, if there was one."""
    record, kept = directory / HELD_NAME, None
    if record.exists():
        held_dir.mkdir(mode=0o700, exist_ok=True)
        kept = held_dir / f"{directory.name}{_HELD_SEPARATOR}{time.time_ns()}"
        os.replace(record, kept)
    shutil.rmtree(directory, ignore_errors=True)
    return kept


def _unit_of_record(record: Path) -> str:
    """The unit whose images a record lists (runs/UNIT/held-images, or runs/held/UNIT@TIME)."""
    return record.name.rpartition(_HELD_SEPARATOR)[0] if record.name != HELD_NAME else record.parent.name


def _read_boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


def _error_text(reply: Message) -> str:
    return str(reply.body[0]) if reply.body else ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _other_manager(started_under: Any, now: str) -> bool:
    """Whether two manager instances ("USERSPACE_TIMESTAMP[/SOFT_REBOOTS]") are known and differ. The count of
    soft-reboots is compared only when both have it: a systemd upgraded to one that counts them (re-executed, the
    same manager) adds it."""
    if not (isinstance(started_under, str) and started_under and now):
        return False
    (then_started, _, then_count), (now_started, _, now_count) = started_under.partition("/"), now.partition("/")
    return then_started != now_started or bool(then_count and now_count and then_count != now_count)


def _written_at(path: Path) -> int:
    """When the file was written (µs since the epoch), 0 if it cannot be told: for a result file, when its worker
    ended, which may be long before h2kd, away meanwhile, reads it."""
    try:
        return os.stat(path).st_mtime_ns // 1000
    except OSError:
        return 0


def _read_result(path: Path) -> dict[str, Any] | None:
    """The worker's result file, as _read_json reads it, but never more than MAX_RESULT_FILE_BYTES of it: a larger
    one is a result h2kd cannot make sense of, and the attempt failed (the same stand-in the manager makes for
    a result it cannot understand)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RESULT_FILE_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_RESULT_FILE_BYTES:
        log.warning("the result file %s is larger than %d bytes; it is not read", path, MAX_RESULT_FILE_BYTES)
        return {"status": "failed",
                "error": {"code": "INTERNAL", "retryable": False, "phase": "run",
                          "message": f"h2kd could not understand the attempt's result file: it is larger than "
                                     f"{MAX_RESULT_FILE_BYTES} bytes"}}
    try:
        result = json.loads(data)
    except ValueError:
        return None
    return _valid_text(result) if isinstance(result, dict) else None


def _valid_text(value: Any) -> Any:
    """value with every string made valid Unicode without NUL. A worker reads a guest's files with
    surrogateescape, so what it found (a Latin-1 os-release, a file name) can hold lone surrogates, which neither
    the store nor D-Bus can take: the bytes they stand for are decoded again, each that is not UTF-8 becoming
    U+FFFD. A NUL (a guest program's last words) would make every message carrying the string unsendable, the
    job's properties and GetManagedObjects for all: it becomes "\\x00"."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            try:
                raw = value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:      # a surrogate no undecodable byte stands for
                raw = value.encode("utf-8", "surrogatepass")
            value = raw.decode("utf-8", "replace")
        return value.replace("\0", "\\x00")
    if isinstance(value, dict):
        return {_valid_text(k): _valid_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_valid_text(item) for item in value]
    return value


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


# h2kd.service has PrivateDevices=yes: h2kd's own /dev has no loop, nbd or device-mapper nodes, while the job
# units, which get those devices, see the host's. /sys is the same in both, and shows which drivers the kernel
# has. The nodes count too, for an h2kd run without that sandbox.
_DEVICE_SIGNS = {
    "loop": ("sys/class/misc/loop-control", "dev/loop-control"),
    "nbd": ("sys/block/nbd0", "sys/module/nbd", "dev/nbd0"),
    "dm": ("sys/class/misc/device-mapper", "dev/mapper/control"),
}


def device_capabilities(root: Path = Path("/")) -> dict[str, bool]:
    """Which block device drivers the job units can use, as seen from `root` (the host's / but in tests)."""
    found = {name: any((root / sign).exists() for sign in signs) for name, signs in _DEVICE_SIGNS.items()}
    found["dm"] = found["dm"] and shutil.which("dmsetup") is not None
    return found


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
