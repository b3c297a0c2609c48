"""h2k-worker: the program each job attempt runs inside its systemd unit.

    h2k-worker --spec SPEC.json --result RESULT.json

SPEC.json = {"job_id", "attempt", "spec": <job spec JSON>, "output_roots": [...], "source_roots": [...]} (h2kd
adds "owner": {"uid", "gid", "mode", "directory_mode", "groups"}, the submitter, whose rights qemu-img runs with;
"source_identity"; "cpu", a CPU number, counted round over the worker's own CPUs, that qemu-img's convert and
compare are kept on (h2kd.runner.placement; null: none); and "spec_checked": true when the spec is the one h2kd
checked and stored, which the worker then takes as it is instead of checking it again; "boot_id" and
"manager_instance", the boot and the systemd manager the attempt started under, are h2kd's own). Before creating
a temporary output the worker records its path in "temp-files" next to SPEC.json (h2kd.operations.tempfiles).
The worker tells systemd READY=1, reports progress as STATUS= lines (h2kd.worker.report format; StatusReporter
says how often), runs the operation, writes RESULT.json atomically and exits 0 (completed), 1 (failed, worth
retrying), 2 (failed for good: bad input) or 143 (stopped by SIGTERM: qemu-img stopped, partial output removed,
result "cancelled"). Human-readable lines go to stdout/stderr, i.e. the journal. Outside systemd (no
NOTIFY_SOCKET) the notifications are simply not sent.

Environment: H2K_WORKER_NAME names the worker in the result (default "builtin"); H2K_RATE_LIMIT limits
qemu-img's I/O in bytes per second (see h2kd.operations.convert).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from h2kd.operations.tempfiles import RECORD_NAME, remove_recorded
from h2kd.observability.wire import one_line, send_datagram, send_journal
from h2kd.worker.report import ProgressReport, format_status

EXIT_OK, EXIT_RETRY, EXIT_PERMANENT, EXIT_CANCELLED = 0, 1, 2, 143
# Progress goes to systemd (which sends two PropertiesChanged to h2kd for each STATUS=) when it moved by
# STATUS_STEP since the last report, when the phase or message changes, or after STATUS_QUIET seconds;
# never more often than every STATUS_MIN_GAP seconds. A short job's bar moves smoothly; fifty long ones
# report about once a second each.
STATUS_MIN_GAP = 0.1
STATUS_QUIET = 1.0
STATUS_STEP = 0.05



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
            send_journal({"MESSAGE": text, "PRIORITY": "3" if error else "6",
                          "SYSLOG_IDENTIFIER": "h2k-worker", **_JOURNAL_FIELDS})
            return
        except OSError:
            pass
    print(one_line(text), file=sys.stderr if error else sys.stdout, flush=True)


def _notify(message: str) -> None:
    """sd_notify(): a datagram to $NOTIFY_SOCKET; nothing outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    try:
        send_datagram(address, message.encode())
    except OSError:
        pass


def _later(delay: float, call: Callable[[], None]) -> None:
    timer = threading.Timer(delay, call)
    timer.daemon = True
    timer.start()


class StatusReporter:
    """Progress to STATUS= lines, throttled (STATUS_*); flush() sends the latest one if it was held back.

    A report held back goes out by itself once it may (`later`: a timer thread), not only with the next one:
    the last before a long quiet step (a guest's initramfs rebuilt, an output's check and fsync) would
    otherwise stand unsent, and the job's progress show the step before for minutes."""

    def __init__(self, send: Callable[[str], None] = _notify, clock: Callable[[], float] = time.monotonic,
                 later: Callable[[float, Callable[[], None]], None] = _later):
        self.send = send
        self.clock = clock
        self.later = later
        self._lock = threading.Lock()       # reports come from the operation's threads, held ones from the timer's
        self._timer_armed = False
        self.last_sent_at = -STATUS_QUIET
        self.last_sent: str | None = None
        self.last_sent_kind: tuple[str, str] | None = None     # (phase, message) of the last report sent
        self.last_sent_fraction = 0.0
        self.pending: str | None = None
        self.pending_fraction = 0.0
        self.pending_kind: tuple[str, str] | None = None
        self.last_logged: tuple[str, int] | None = None

    def __call__(self, phase: str, done: int, total: int, message: str = "") -> None:
        fraction = done / total if total > 0 else None
        text = format_status(ProgressReport(phase, fraction, done, total if total > 0 else 0, message))
        with self._lock:
            self.pending, self.pending_fraction, self.pending_kind = text, fraction or 0.0, (phase, message)
            since = self.clock() - self.last_sent_at
            if since >= STATUS_MIN_GAP and (
                    since >= STATUS_QUIET or self.pending_kind != self.last_sent_kind
                    or abs(self.pending_fraction - self.last_sent_fraction) >= STATUS_STEP):
                self._flush()
            elif not self._timer_armed:
                # Due when a report of its kind may go: a new phase or message after the minimum gap, more of
                # the same once quiet for STATUS_QUIET.
                due = STATUS_MIN_GAP if self.pending_kind != self.last_sent_kind else STATUS_QUIET
                self._timer_armed = True
                self.later(max(due - since, 0.0), self._held_report_due)
        decile = int((fraction or 0) * 10)
        if self.last_logged != (phase, decile):
            self.last_logged = (phase, decile)
            say(text)

    def _held_report_due(self) -> None:
        with self._lock:
            self._timer_armed = False
            self._flush()

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if self.pending is not None and self.pending != self.last_sent:
            self.send("STATUS=" + self.pending)
            self.last_sent = self.pending
            self.last_sent_at = self.clock()
            self.last_sent_fraction, self.last_sent_kind = self.pending_fraction, self.pending_kind
        self.pending = None


def temp_record_path(spec_path: str) -> str:
    """Where the worker records its temporary outputs before creating them: "temp-files" next to the spec,
    i.e. in the attempt's run directory, where the runner looks when it settles the attempt."""
    return os.path.join(os.path.dirname(os.path.abspath(spec_path)), RECORD_NAME)


# The largest result file the worker writes. h2kd keeps the result with the job for good and loads it again at
# every start, so a result must not grow without bound; 1 MiB holds the report of a VM with ordinary names and as
# many disks as h2kd.operations.inspect takes (MAX_VM_DISKS, about what VMware allows a VM). h2kd.runner.systemd
# reads a result file up to this (and a little).
MAX_RESULT_BYTES = 1024 * 1024
# Of an error's message in a result too large, this much is kept.
REPLACED_MESSAGE_CHARS = 1024


def _result_text(result: dict[str, Any]) -> str:
    """The result file's content (ASCII: its length is its size in bytes)."""
    return json.dumps(result, indent=1) + "\n"


def _output_paths(outputs: dict[str, Any]) -> dict[str, Any]:
    """Where the outputs are (each disk's path and format, the domain XML's path), without their reports."""
    kept: dict[str, Any] = {}
    if isinstance(outputs.get("disks"), list):
        kept["disks"] = [{key: disk[key] for key in ("path", "format") if isinstance(disk.get(key), str)}
                         for disk in outputs["disks"] if isinstance(disk, dict) and isinstance(disk.get("path"), str)]
    if "domain_xml" in outputs:
        kept["domain_xml"] = outputs["domain_xml"] if isinstance(outputs["domain_xml"], str) else None
    return kept


def _within_limit(result: dict[str, Any]) -> dict[str, Any]:
    """The result to write: as it is while its file stays within MAX_RESULT_BYTES, else the same outcome (a
    completed attempt stays completed: its outputs are in place) with only where the outputs are, the error's
    message cut short, and outputs["left_out"] saying what was left out and why. Should even the outputs' paths be
    too many, they go to the journal."""
    size = len(_result_text(result))
    if size <= MAX_RESULT_BYTES:
        return result
    paths = _output_paths(result.get("outputs") or {})
    listed = [d["path"] for d in paths.get("disks", [])] + ([paths["domain_xml"]] if paths.get("domain_xml") else [])
    error = result.get("error")
    if isinstance(error, dict):
        error = {**error, "message": str(error.get("message"))[:REPLACED_MESSAGE_CHARS]}

    def trimmed(outputs: dict[str, Any], kept: str) -> dict[str, Any]:
        note = f"the result was {size} bytes, more than the limit of {MAX_RESULT_BYTES} bytes: {kept}"
        return {**result, "error": error, "outputs": {**outputs, "left_out": note}}

    kept = "only where the outputs are is kept" if listed else "the outputs' report is left out"
    replaced = trimmed(paths, kept)
    if len(_result_text(replaced)) > MAX_RESULT_BYTES:    # even the outputs' paths are too many
        kept = f"the {len(listed)} outputs are listed in the journal"
        replaced = trimmed({}, kept)
    say(f"h2k-worker: the result is {size} bytes, more than the limit of {MAX_RESULT_BYTES}: {kept}", error=True)
    for path in listed:
        say(f"h2k-worker: output {path}")
    return replaced


def _write_result(path: str, result: dict[str, Any]) -> None:
    """Write the result file atomically and durably (see _within_limit for its size)."""
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    text = _result_text(result)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    # The name too: after a power cut, a completed attempt whose result is missing would run again, and find
    # its own outputs in the way.
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


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


_SPEC_SECTIONS = ("image", "parameters", "execution_policy", "capability_requirements", "artifacts", "audit")


def _is_checked_spec(raw: Any) -> bool:
    """A spec in the form h2kd stores after checking it (every section present, with the fields the worker
    reads): such a spec is taken as it is, which spares the worker loading the spec models."""
    return (isinstance(raw, dict) and isinstance(raw.get("job_id"), str) and isinstance(raw.get("operation"), str)
            and all(isinstance(raw.get(section), dict) for section in _SPEC_SECTIONS)
            and isinstance(raw["image"].get("path"), str)
            and type(raw["execution_policy"].get("timeout_seconds")) is int
            and raw["execution_policy"]["timeout_seconds"] > 0)


def _validated_spec(raw: Any, checked: bool = False) -> dict[str, Any]:
    """The job spec with defaults filled in, checked by h2kd.model.spec; OperationError if it is bad.

    checked: the envelope says h2kd wrote the spec as it stored it (h2kd.model.spec already checked it).
    """
    if checked and _is_checked_spec(raw):
        return raw
    if sys.flags.no_site:     # started with -S (see h2kd.runner.unit.worker_argv): the models need pydantic
        import site
        site.main()
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


def _ensure_same_source(path: str, identity: str, owner_uid: int) -> None:
    """The file at `path` must be the one h2kd checked for the submitter (no swap since submission).
    A job of a user other than root without a checked source is refused: nothing proves they may read it."""
    from h2kd.operations.qemuimg import OperationError

    if not identity:
        if owner_uid:
            raise OperationError("PERMISSION_DENIED", f"the source {path} was not checked for its submitter "
                                 f"(uid {owner_uid}); it is not read", "start")
        return
    from h2kd.operations import inspect
    inspect.expect_source(path, identity)


def _run_operation(spec: dict[str, Any], output_roots: list[str], progress: StatusReporter,
                   on_process: Callable[[Any], None], owner: dict[str, int] | None = None,
                   temp_record: str | None = None, on_commit: Callable[[], None] | None = None,
                   source_roots: list[str] | None = None) -> dict[str, Any]:
    # Each operation's modules are imported only when it runs: start-up time is part of every job.
    from h2kd.operations.qemuimg import OperationError

    operation = spec["operation"]
    reader_uid = (owner or {}).get("uid") or None
    if reader_uid:
        # qemu-img gets the submitter's rights, in a guest repair too: what needs root's there (the loop device,
        # the mounts, the guest's own programs) reaches the disk through the worker's descriptor, not qemu-img.
        from h2kd.operations import qemuimg
        given = (owner or {}).get("groups")
        if given is not None:
            from h2kd.access import give_groups
            groups = [int(g) for g in given]
            give_groups(reader_uid, groups)     # the checks of the files a source names act with these too
        else:   # an envelope written without them (the worker run by hand): look them up here
            from h2kd.access import caller_groups
            groups = caller_groups(reader_uid)
        if not groups:
            # Checked at submission, but the user may have gone, or lost their groups, while the job waited: a
            # stand-in group ("nogroup") could read what the submitter cannot.
            raise OperationError("PERMISSION_DENIED", f"uid {reader_uid} has no group h2kd may act with (no entry in "
                                 "the user database, or none of the groups its process had at submission): files "
                                 "are read and written only with a submitter's own user and groups", "start")
        qemuimg.run_as(reader_uid, groups[0], groups)
    if operation == "inspect":
        from h2kd.operations import inspect
        return inspect.run_inspect(spec, progress, reader_uid)
    if operation == "convert":
        from h2kd.operations import convert
        repair = None
        if spec["parameters"].get("offline_fix"):
            # The boot disk is repaired before it gets its name: never a converted but unrepaired output.
            from h2kd.operations import offline_fix
            repair = offline_fix.boot_disk_repair(spec["parameters"])
        return convert.run_convert(spec, output_roots, progress, on_process, owner, temp_record, repair, on_commit)
    if operation == "offline_fix":
        from h2kd.operations import offline_fix
        return offline_fix.run_offline_fix_job(spec, output_roots, progress, owner, temp_record,
                                               on_commit or (lambda: None))
    if operation == "validate":
        from h2kd.operations import validate
        return validate.run_validate(spec, progress, reader_uid, source_roots or ["/"])
    raise OperationError("UNSUPPORTED", f"this worker does not run {operation!r} jobs", "start")


USAGE = "usage: h2k-worker --spec SPEC.json --result RESULT.json\n\nRun one h2kd job attempt."


class _Arguments:
    def __init__(self, spec: str, result: str):
        self.spec = spec
        self.result = result


def _usage_error(message: str) -> None:
    print(f"{USAGE}\nh2k-worker: {message}", file=sys.stderr)
    sys.exit(EXIT_PERMANENT)


def _arguments(argv: list[str]) -> _Arguments:
    """--spec and --result (also as --spec=...); argparse would cost more start-up time than all of this."""
    values: dict[str, str] = {}
    words = iter(argv)
    for word in words:
        if word in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        name, equals, value = word.partition("=")
        if name not in ("--spec", "--result"):
            _usage_error(f"unexpected argument {word!r}")
        values[name[2:]] = value if equals else next(words, "")
    missing = [f"--{n}" for n in ("spec", "result") if not values.get(n)]
    if missing:
        _usage_error(f"{' and '.join(missing)} must be given")
    return _Arguments(values["spec"], values["result"])


def main(argv: list[str] | None = None) -> int:
    """Run one attempt; the exit code. Run as the program (argv None), it ends the process itself once the
    result is written (see _end)."""
    args = _arguments(sys.argv[1:] if argv is None else argv)

    from h2kd.operations.qemuimg import OperationError

    started = time.monotonic()
    reporter = StatusReporter()
    child: list[Any] = [None]
    stopping: list[str] = []
    # Set once the outputs start to get their names, and while the result is written: a stop asked for then
    # (a late cancel, the time limit) finds the attempt as good as ended. Stopping it there would report it
    # cancelled or failed with its outputs already in place, and a retry would find them in its way.
    past_stopping: list[bool] = [False]

    def stop(reason: str) -> None:
        if stopping:
            return        # already stopping: let the clean-up finish
        stopping.append(reason)
        if past_stopping[0]:
            say(f"h2k-worker: asked to stop ({reason}) with the outputs already in place: the attempt ends as it is")
            return
        proc = child[0]
        if proc is not None and proc.poll() is None:
            try:
                proc.terminate()
            except ProcessLookupError:
                pass
        raise Stopped(reason)

    def committing() -> None:
        past_stopping[0] = True

    # An operation's clean-up that a stop must not cut short (a guest's file systems unmounted, its loop device
    # detached) holds these signals while it runs (offline_fix.commands.uninterrupted): stop() runs after it.
    signal.signal(signal.SIGTERM, lambda *_: stop("cancelled"))
    signal.signal(signal.SIGINT, lambda *_: stop("cancelled"))
    signal.signal(signal.SIGALRM, lambda *_: stop("timeout"))

    result: dict[str, Any] = {"status": "failed", "outputs": {}, "error": None,
                              "metrics": {"execution_seconds": 0.0, "bytes_read": 0, "bytes_written": 0},
                              "worker": os.environ.get("H2K_WORKER_NAME", "builtin"), "attempt": 0}
    exit_code = EXIT_PERMANENT
    roots: list[str] = []
    try:
        try:
            _notify("READY=1")
            envelope = _read_envelope(args.spec)
            result["attempt"] = int(envelope.get("attempt") or 0)
            _JOURNAL_FIELDS.update(H2K_JOB_ID=str(envelope.get("job_id", "")), H2K_ATTEMPT=str(result["attempt"]))
            spec = _validated_spec(envelope.get("spec"), envelope.get("spec_checked") is True)
            roots = [str(r) for r in envelope.get("output_roots") or []]
            _ensure_same_source(spec["image"]["path"], envelope.get("source_identity") or "",
                                int((envelope.get("owner") or {}).get("uid") or 0))
            say(f"h2k-worker: job {envelope.get('job_id')} attempt {result['attempt']}: {spec['operation']} "
                  f"{spec['image']['path']}")
            if type(envelope.get("cpu")) is int:
                from h2kd.operations import qemuimg
                qemuimg.keep_convert_and_compare_on(envelope["cpu"])
            signal.alarm(int(spec["execution_policy"]["timeout_seconds"]))
            outputs = _run_operation(spec, roots, reporter, lambda proc: child.__setitem__(0, proc),
                                     envelope.get("owner"), temp_record_path(args.spec), committing,
                                     [str(r) for r in envelope.get("source_roots") or ["/"]])
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
            import traceback
            traceback.print_exc()
            result["error"] = {"phase": "run", "code": "INTERNAL", "message": f"internal error: {e!r}",
                               "retryable": True}
            exit_code = EXIT_RETRY
    except Stopped as e:
        past_stopping[0] = True
        if e.reason == "timeout":
            result["error"] = {"phase": "run", "code": "TIMEOUT", "message": "the job ran past its time limit; "
                               "the partial output was removed", "retryable": True}
            exit_code = EXIT_RETRY
        else:
            result.update(status="cancelled", error=None, outputs={})
            exit_code = EXIT_CANCELLED
    past_stopping[0] = True
    signal.alarm(0)
    result["metrics"]["execution_seconds"] = round(time.monotonic() - started, 6)
    reporter.flush()
    result = _within_limit(result)
    if result["error"]:
        say(f"h2k-worker: failed: {result['error']['code']}: {result['error']['message']}", error=True)
    else:
        say(f"h2k-worker: {result['status']}")
    _write_result(args.result, result)
    if result["status"] == "completed":
        # The files the outputs replaced, kept under a temporary name until now (see convert._commit).
        remove_recorded(temp_record_path(args.spec), roots)
    if argv is None:
        _end(exit_code)
    return exit_code


def _end(exit_code: int) -> None:
    """Exit at once, without the interpreter's own clean-up (tearing down modules and objects), which would
    only add to every job's time: the result is written and synced, the outputs are committed or removed,
    and what may still run is of no use any more (after SIGTERM, a flush of a removed file or a source check;
    systemd ends any child left in the unit)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(exit_code)


if __name__ == "__main__":
    sys.exit(main())
