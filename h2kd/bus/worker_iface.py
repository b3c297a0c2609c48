"""org.hyper2kvm.h2kd1.Worker: one object per worker. Only the connection that registered a worker drives it."""

import json
from typing import Any

from dbus_fast.service import dbus_method
from dbus_fast.signature import Variant

from h2kd import BUS_NAME
from h2kd.bus.base import ApiInterface, Authorizer, add_read_properties
from h2kd.bus.call import current_caller
from h2kd.bus.errors import bus_errors
from h2kd.bus.variants import json_object_from_dbus, options_from_dbus
from h2kd.errors import InvalidArgument, NotAuthorized
from h2kd.manager.ports import WorkerInfo

WORKER_INTERFACE = BUS_NAME + ".Worker"

WORKER_PROPERTIES: dict[str, tuple[str, Any]] = {
    "Id": ("s", lambda w: w.id),
    "Name": ("s", lambda w: w.name),
    "Kind": ("s", lambda w: w.kind),
    "State": ("s", lambda w: w.state),
    "Capabilities": ("s", lambda w: json.dumps(w.capabilities, sort_keys=True)),
    "MaxJobs": ("u", lambda w: int(w.max_jobs)),
    "ActiveJobs": ("u", lambda w: int(w.active_jobs)),
    "LastHeartbeat": ("t", lambda w: int(w.last_heartbeat)),
    "Owner": ("u", lambda w: int(w.owner)),
}

_PROGRESS_KEYS = {"progress": float, "bytes_done": int, "bytes_total": int, "phase": str, "message": str,
                  "attempt": int}
_RESULT_KEYS = {"success": bool, "outputs": str, "error_code": str, "error_message": str,
                "bytes_read": int, "bytes_written": int, "attempt": int}


def worker_vardict(worker: WorkerInfo) -> dict[str, Variant]:
    return {name: Variant(sig, value_of(worker)) for name, (sig, value_of) in WORKER_PROPERTIES.items()}


class WorkerInterface(ApiInterface):
    OUT_ARG_NAMES = {"ClaimJob": ("found", "job_id", "spec")}
    UNANNOUNCED_PROPERTIES = frozenset({"LastHeartbeat"})

    def __init__(self, worker: WorkerInfo, manager: Any, authorizer: Authorizer):
        super().__init__(WORKER_INTERFACE)
        self.worker = worker
        self._manager = manager
        self._auth = authorizer

    def _from_owner(self) -> str:
        """The worker's id, if the caller is the connection that registered it; else AccessDenied."""
        if not self.worker.bus_name or current_caller().sender != self.worker.bus_name:
            raise NotAuthorized(f"only the connection that registered worker {self.worker.id} may drive it")
        return self.worker.id

    @dbus_method()
    @bus_errors
    def Heartbeat(self):
        self._manager.heartbeat(self._from_owner())

    @dbus_method()
    @bus_errors
    def ClaimJob(self) -> "bss":
        job = self._manager.claim(self._from_owner())
        if job is None:
            return [False, "", ""]
        return [True, job.id, job.spec_text]

    @dbus_method()
    @bus_errors
    def ReportProgress(self, job_id: "s", progress: "a{sv}"):
        worker_id = self._from_owner()
        values = options_from_dbus(progress, _PROGRESS_KEYS)
        fraction = values.get("progress")
        self._manager.report_progress(worker_id, job_id, fraction, values.get("bytes_done", 0),
                                      values.get("bytes_total", 0), values.get("phase", ""),
                                      values.get("message", ""), values.get("attempt"))

    @dbus_method()
    @bus_errors
    def ReportResult(self, job_id: "s", result: "a{sv}"):
        worker_id = self._from_owner()
        values = options_from_dbus(result, _RESULT_KEYS)
        if "success" not in values:
            raise InvalidArgument("result needs 'success' (b)")
        outputs = json_object_from_dbus(values.get("outputs", ""), "'outputs'")
        self._manager.report_result(worker_id, job_id, values["success"], outputs,
                                    values.get("error_code", ""), values.get("error_message", ""),
                                    values.get("bytes_read", 0), values.get("bytes_written", 0),
                                    values.get("attempt"))

    @dbus_method()
    @bus_errors
    def Unregister(self):
        self._manager.unregister_worker(self._from_owner())

    @dbus_method()
    @bus_errors
    async def Refresh(self):
        await self._auth.check("manage", {"worker_id": self.worker.id})
        await self._manager.refresh_worker(self.worker.id)


add_read_properties(WorkerInterface, WORKER_PROPERTIES, "worker")
