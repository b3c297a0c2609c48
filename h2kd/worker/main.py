"""h2k-worker: the program each job attempt runs inside its systemd unit.

    h2k-worker --spec SPEC.json --result RESULT.json

SPEC.json = {"job_id", "attempt", "spec": <job spec JSON>, "output_roots": [...]}. The worker tells systemd
READY=1, reports progress as STATUS= lines (h2kd.worker.report format, at most 10 a second, the last one
always sent), runs the operation, writes RESULT.json atomically and exits 0 (completed), 1 (failed, worth
retrying), 2 (failed for good: bad input) or 143 (stopped by SIGTERM: qemu-img stopped, partial output
removed, result "cancelled"). Human-readable lines go to stdout/stderr, i.e. the journal.
Outside systemd (no NOTIFY_SOCKET) the notifications are simply not sent.

Environment: H2K_WORKER_NAME names the worker in the result (default "builtin"); H2K_RATE_LIMIT limits
qemu-img's I/O in bytes per second (see h2kd.operations.convert).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from typing import Any, Callable

from h2kd.worker.report import ProgressReport, format_status

EXIT_OK, EXIT_RETRY, EXIT_PERMANENT, EXIT_CANCELLED = 0, 1, 2, 143
STATUS_INTERVAL = 0.1


class Stopped(BaseException):
    """SIGTERM (cancelled) or the job's time limit (timed out). A BaseException so no handler swallows it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# Set once the spec is read: every line the worker logs carries the job's fields, so
# `journalctl H2K_JOB_ID=<id>` finds it even where the manager's LogExtraFields do not reach journald.
_JOURNAL_FIELDS: dict[str, str] = {}


def say(text: str, error: bool = False) -> None:
    """One human line to the journal (with the job's fields) when stdout is the journal, else to stdout/stderr."""
    if os.environ.get("JOURNAL_STREAM") and _JOURNAL_FIELDS:
        try:
            from systemd import journal
            journal.send(text, PRIORITY=3 if error else 6, SYSLOG_IDENTIFIER="h2k-worker", **_JOURNAL_FIELDS)
            return
        except (ImportError, OSError):
            pass
    print(text, file=sys.stderr if error else sys.stdout, flush=True)


def _notify(message: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd import daemon
        daemon.notify(message)
    except (ImportError, OSError):
        pass


class StatusReporter:
    """Progress to STATUS= lines, throttled; flush() sends the latest one if it was held back."""

    def __init__(self, send: Callable[[str], None] = _notify, interval: float = STATUS_INTERVAL):
        self.send = send
        self.interval = interval
        self.last_sent_at = 0.0
        self.last_sent: str | None = None
        self.pending: str | None = None
        self.last_logged: tuple[str, int] | None = None

    def __call__(self, phase: str, done: int, total: int, message: str = "") -> None:
        fraction = done / total if total > 0 else None
        text = format_status(ProgressReport(phase, fraction, done, total if total > 0 else 0, message))
        self.pending = text
        if time.monotonic() - self.last_sent_at >= self.interval:
            self.flush()
        decile = int((fraction or 0) * 10)
        if self.last_logged != (phase, decile):
            self.last_logged = (phase, decile)
            say(text)

    def flush(self) -> None:
        if self.pending is not None and self.pending != self.last_sent:
            self.send("STATUS=" + self.pending)
            self.last_sent = self.pending
            self.last_sent_at = time.monotonic()
        self.pending = None


def _write_result(path: str, result: dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _read_envelope(path: str) -> dict[str, Any]:
    from h2kd.operations.qemuimg import OperationError

    try:
        with open(path, encoding="utf-8") as f:
            envelope = json.load(f)
    except (OSError, ValueError) as e:
        raise OperationError("VALIDATION_FAILED", f"the spec file {path} cannot be read: {e}", "start") from None
    if not isinstance(envelope, dict):
        raise OperationError("VALIDATION_FAILED", f"the spec file {path} must hold an object", "start")
    return envelope


def _validated_spec(raw: Any) -> dict[str, Any]:
    """The job spec with defaults filled in, checked by h2kd.model.spec; OperationError if it is bad."""
    from h2kd.errors import InvalidSpec
    from h2kd.model.spec import parse_spec, spec_to_json
    from h2kd.operations.qemuimg import OperationError

    if not isinstance(raw, dict):
        raise OperationError("VALIDATION_FAILED", "the job spec must be an object", "start")
    try:
        spec = spec_to_json(parse_spec(raw))
    except InvalidSpec as e:
        raise OperationError("VALIDATION_FAILED", f"the job spec is invalid: {e}", "start") from None
    return spec


def _ensure_same_source(path: str, identity: str) -> None:
    """The file at `path` must be the one h2kd checked for the submitter (no swap since submission)."""
    from h2kd.operations.qemuimg import OperationError

    if not identity:
        return
    try:
        st = os.lstat(path)
    except OSError as e:
        raise OperationError("SOURCE_CHANGED", f"the source {path} cannot be found any more: {e.strerror}",
                             "start") from None
    if f"{st.st_dev}:{st.st_ino}" != identity:
        raise OperationError("SOURCE_CHANGED", f"the source {path} was replaced after the job was submitted; "
                             "submit it again", "start")


def _run_operation(spec: dict[str, Any], output_roots: list[str], progress: StatusReporter,
                   on_process: Callable[[Any], None], owner: dict[str, int] | None = None) -> dict[str, Any]:
    from h2kd.operations import convert, inspect, offline_fix, validate
    from h2kd.operations.qemuimg import OperationError

    operation = spec["operation"]
    if operation == "inspect":
        return inspect.run_inspect(spec, progress)
    if operation == "convert":
        outputs = convert.run_convert(spec, output_roots, progress, on_process, owner)
        if spec["parameters"].get("offline_fix"):
            outputs = offline_fix.fix_converted_disks(outputs, spec["parameters"], progress)
        return outputs
    if operation == "offline_fix":
        return offline_fix.run_offline_fix_job(spec, output_roots, progress)
    if operation == "validate":
        return validate.run_validate(spec, progress)
    raise OperationError("UNSUPPORTED", f"this worker does not run {operation!r} jobs", "start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="h2k-worker", description="Run one h2kd job attempt.")
    parser.add_argument("--spec", required=True, help="the attempt's SPEC.json")
    parser.add_argument("--result", required=True, help="where to write RESULT.json")
    args = parser.parse_args(argv)

    from h2kd.operations.qemuimg import OperationError

    started = time.monotonic()
    reporter = StatusReporter()
    child: list[Any] = [None]
    stopping: list[str] = []

    def stop(reason: str) -> None:
        if stopping:
            return        # already stopping: let the clean-up finish
        stopping.append(reason)
        proc = child[0]
        if proc is not None and proc.poll() is None:
            try:
                proc.terminate()
            except ProcessLookupError:
                pass
        raise Stopped(reason)

    signal.signal(signal.SIGTERM, lambda *_: stop("cancelled"))
    signal.signal(signal.SIGINT, lambda *_: stop("cancelled"))
    signal.signal(signal.SIGALRM, lambda *_: stop("timeout"))

    result: dict[str, Any] = {"status": "failed", "outputs": {}, "error": None,
                              "metrics": {"execution_seconds": 0.0, "bytes_read": 0, "bytes_written": 0},
                              "worker": os.environ.get("H2K_WORKER_NAME", "builtin"), "attempt": 0}
    exit_code = EXIT_PERMANENT
    try:
        try:
            _notify("READY=1")
            envelope = _read_envelope(args.spec)
            result["attempt"] = int(envelope.get("attempt") or 0)
            _JOURNAL_FIELDS.update(H2K_JOB_ID=str(envelope.get("job_id", "")), H2K_ATTEMPT=str(result["attempt"]))
            spec = _validated_spec(envelope.get("spec"))
            roots = [str(r) for r in envelope.get("output_roots") or []]
            _ensure_same_source(spec["image"]["path"], envelope.get("source_identity") or "")
            say(f"h2k-worker: job {envelope.get('job_id')} attempt {result['attempt']}: {spec['operation']} "
                  f"{spec['image']['path']}")
            signal.alarm(int(spec["execution_policy"]["timeout_seconds"]))
            outputs = _run_operation(spec, roots, reporter, lambda proc: child.__setitem__(0, proc),
                                     envelope.get("owner"))
            signal.alarm(0)
            result["metrics"]["bytes_read"] = int(outputs.pop("bytes_read", 0))
            result["metrics"]["bytes_written"] = int(outputs.pop("bytes_written", 0))
            result.update(status="completed", outputs=outputs)
            exit_code = EXIT_OK
        except OperationError as e:
            result["error"] = {"phase": e.phase or "run", "code": e.code, "message": e.message,
                               "retryable": e.retryable}
            result["outputs"] = e.outputs
            exit_code = EXIT_RETRY if e.retryable else EXIT_PERMANENT
        except (OSError, ValueError) as e:
            code = "NO_SPACE" if getattr(e, "errno", None) == 28 else \
                "PERMISSION_DENIED" if isinstance(e, PermissionError) else "INTERNAL"
            result["error"] = {"phase": "run", "code": code, "message": str(e),
                               "retryable": code not in ("VALIDATION_FAILED", "PERMISSION_DENIED")}
            exit_code = EXIT_PERMANENT if not result["error"]["retryable"] else EXIT_RETRY
        except Exception as e:  # a bug: say so plainly, and let a retry try again
            traceback.print_exc()
            result["error"] = {"phase": "run", "code": "INTERNAL", "message": f"internal error: {e!r}",
                               "retryable": True}
            exit_code = EXIT_RETRY
    except Stopped as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if e.reason == "timeout":
            result["error"] = {"phase": "run", "code": "TIMEOUT", "message": "the job ran past its time limit; "
                               "the partial output was removed", "retryable": True}
            exit_code = EXIT_RETRY
        else:
            result.update(status="cancelled", error=None, outputs={})
            exit_code = EXIT_CANCELLED
    signal.alarm(0)
    result["metrics"]["execution_seconds"] = round(time.monotonic() - started, 6)
    reporter.flush()
    if result["error"]:
        say(f"h2k-worker: failed: {result['error']['code']}: {result['error']['message']}", error=True)
    else:
        say(f"h2k-worker: {result['status']}")
    _write_result(args.result, result)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
