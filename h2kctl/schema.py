"""The stable --json output of h2kctl: one function per shape, and the documentation of each shape.

Times are integers, microseconds since the Unix epoch, as on the bus (null when not yet known);
uids are integers and user names strings. Keys are only ever added, never renamed or removed.
"""

from __future__ import annotations

import json
from typing import Any

from h2kctl.render import user_name


def _usec(value: int) -> int | None:
    return int(value) or None


def _json_object(text: str) -> Any:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return text
    return value


def job(props: dict[str, Any], path: str = "", history: list[dict] | None = None) -> dict[str, Any]:
    """A job as `status --json`, `submit --json` and `inspect --json` (under "job") print it."""
    code, message = props.get("Error", ("", "")) or ("", "")
    result = props.get("Result", "")
    result = _json_object(result) if isinstance(result, str) else None    # not a str: withheld from the caller
    out = {
        "id": props["Id"],
        "path": path,
        "operation": props["Operation"],
        "state": props["State"],
        "phase": props.get("Phase", ""),
        "progress": props["Progress"] if props.get("ProgressKnown") else None,
        "bytes_done": props.get("BytesDone", 0),
        "bytes_total": props.get("BytesTotal", 0),
        "rate": props.get("Rate", 0),
        "expected_end_usec": _usec(props.get("ExpectedEndTime", 0)),
        "created_at_usec": _usec(props.get("CreatedAt", 0)),
        "started_at_usec": _usec(props.get("StartedAt", 0)),
        "finished_at_usec": _usec(props.get("FinishedAt", 0)),
        "priority": props.get("Priority", 0),
        "owner": props.get("Owner", 0),
        "owner_name": user_name(props.get("Owner", 0)),
        "attempt": props.get("Attempt", 0),
        "unit": props.get("Unit", ""),
        "worker": props.get("Worker", ""),
        "source": props.get("Source", ""),
        "output": props.get("Output", ""),
        "wait_reason": props.get("WaitReason", ""),
        "cancelable": props.get("Cancelable", False),
        "error": {"code": code, "message": message} if code or message else None,
        "spec": _json_object(props.get("Spec", "")),
        "result": result if result else None,
    }
    if history is not None:
        out["history"] = history
    return out


def history_entry(seq: int, usec: int, data: dict[str, Any]) -> dict[str, Any]:
    return {"seq": seq, "time_usec": usec, "state": data.get("new_state", ""),
            "from": data.get("old_state") or None, "reason": data.get("reason", "")}


def list_entry(entry: tuple) -> dict[str, Any]:
    job_id, operation, state, progress, owner, priority, created_at, path = entry
    return {"id": job_id, "operation": operation, "state": state,
            "progress": progress if progress >= 0 else None, "owner": owner, "owner_name": user_name(owner),
            "priority": priority, "created_at_usec": _usec(created_at), "path": path}


def event(entry: tuple) -> dict[str, Any]:
    seq, usec, kind, data = entry
    return {"seq": seq, "time_usec": usec, "kind": kind, "data": _json_object(data)}


def queue(stats: dict[str, Any]) -> dict[str, Any]:
    return {"queued": stats.get("queued", 0), "running": stats.get("running", 0),
            "paused": stats.get("paused", False), "max_parallel_jobs": stats.get("max_parallel_jobs", 0),
            "by_priority": list(stats.get("by_priority", [])), "waiting": dict(stats.get("waiting", {}))}


def worker(props: dict[str, Any], path: str) -> dict[str, Any]:
    return {"id": props["Id"], "name": props.get("Name", ""), "kind": props.get("Kind", ""),
            "state": props.get("State", ""), "capabilities": _json_object(props.get("Capabilities", "")),
            "max_jobs": props.get("MaxJobs", 0), "active_jobs": props.get("ActiveJobs", 0),
            "last_heartbeat_usec": _usec(props.get("LastHeartbeat", 0)), "owner": props.get("Owner", 0),
            "path": path}


def health(values: dict[str, Any]) -> dict[str, Any]:
    return dict(values)


def inspect(job_json: dict[str, Any]) -> dict[str, Any]:
    result = job_json.get("result") or {}
    outputs = result.get("outputs") or {}
    return {"job": job_json, "report": outputs.get("report", outputs) if isinstance(outputs, dict) else outputs}


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False) + "\n"


# The documentation of the shapes above, for --help and the man page (one source).
DOC: list[tuple[str, str]] = [
    ("list", "An array of objects {id, operation, state, progress (0..1 or null when unknown), owner (uid), "
             "owner_name, priority (1..10), created_at_usec, path (D-Bus object path)}, in submission order."),
    ("status, submit, retry, start",
     "One job object: {id, path, operation, state, phase, progress (0..1 or null), bytes_done, bytes_total, "
     "rate (bytes/s), expected_end_usec, created_at_usec, started_at_usec, finished_at_usec (null until "
     "known), priority, owner, owner_name, attempt, unit, worker, source, output (the output path given; "
     "for a conversion given none, the directory it writes into, as D-Bus Output), wait_reason, cancelable, "
     "error (null or {code, message}), spec (the job spec object), result (null or the job result object; "
     "null also for another user's job, whose result is for its owner and administrators to read)}. "
     "status adds history: an array of {seq, time_usec, state, from, reason}. submit prints the job once "
     "it is submitted, retry and start once it is queued, or each, with --wait, once it has ended. retry and "
     "start given several JOBs print an array of the objects of those queued (with --wait: as wait does)."),
    ("wait", "An array of job objects, as status prints them (without history), in the order the jobs were "
             "named (or listed)."),
    ("show", "An object of every D-Bus property of the job, named and typed as on the bus "
             "(e.g. \"State\": \"queued\", \"Error\": [code, message]); Result is left out of another user's "
             "job, unless the caller may read it."),
    ("events", "An array of {seq, time_usec, kind (state|progress|log|result), data (object)}."),
    ("queue", "{queued, running, paused, max_parallel_jobs, by_priority (ten counts of queued jobs, priority 1 "
              "first), waiting (object: job id -> why it waits)}."),
    ("workers", "An array of {id, name, kind (builtin|external), state (idle|busy|stale), capabilities (object), "
                "max_jobs, active_jobs, last_heartbeat_usec, owner, path}."),
    ("health", "{status (ok|degraded), version, uptime_seconds, jobs_active, jobs_queued, workers, "
               "workers_stale, store_ok, jobs_unreadable, systemd_reachable}, as GetHealth returns it."),
    ("inspect", "{job (the job object as status prints it), report (the inspection report object)}."),
]
