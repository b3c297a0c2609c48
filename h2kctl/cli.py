"""h2kctl's command line: the argparse definition (the one source of --help, the man page and the
shell completions), one function per command, and the top-level handler that turns every error
into one line and an exit code."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pwd
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

from h2kd import __version__
from h2kctl import schema
from h2kctl.bus import JOB_IFACE, Client, Withheld, shown, text_problem, to_vardict
from h2kctl.errors import EXIT_CODE_HELP, CtlError, ExitCode, JobHeld, job_arguments
from h2kctl.follow import (TERMINAL, CtrlC, ProgressView, detach_hint, exit_code_for, final_message, follow_job,
                           patiently, progress_stream, stream_is_tty, watch_all, written_paths)
from h2kctl.render import (TerminalSafe, age, glyph, human_bytes, human_duration, local_time, nested, page, percent,
                           single_line, table, timestamp, user_name)
from h2kctl.spec import load_job_file, spec_from_args

PROG = "h2kctl"
STATES = ["created", "validated", "queued", "assigned", "running", "progressing", "completed", "failed",
          "cancelled", "retrying"]
OPERATIONS = ["convert", "inspect", "validate"]
# A guest repair in place (offline_fix) is submitted with a job file; its jobs are listed like any other.
LISTED_OPERATIONS = [*OPERATIONS, "offline_fix"]
COMPRESSION_TYPES = ["zlib", "zstd"]

DESCRIPTION = ("Control h2kd, the daemon that converts VMware, Hyper-V and VirtualBox disk images to KVM "
               "formats. h2kctl talks to h2kd over D-Bus (org.hyper2kvm.h2kd1 on the system bus). Text from h2kd "
               "(messages, paths, what a disk image or a guest holds) is printed with its control characters as "
               "escapes such as \\x1b: it may come from other users and never drives the terminal. --json keeps "
               "it exact, in JSON's own escapes.")

CTRL_C_HELP = ("Ctrl-C while jobs are waited for (submit --wait, retry --wait, start --wait, wait) or a job is "
               "watched detaches: the jobs go on, h2kctl says how to cancel them and ends by SIGINT (exit status "
               "130), so a script running it stops instead of going on as if they had completed; with --json it "
               "first prints the jobs as they are then. Ctrl-C during inspect cancels its job, whose report "
               "nobody would read, and ends the same way. Ctrl-C ends watch without a job (all jobs) with "
               "status 0.")


def exit_status_epilog() -> str:
    lines = ["exit status:"] + [f"  {int(code)}  {text}" for code, text in EXIT_CODE_HELP]
    return "\n".join(lines) + "\n\n" + CTRL_C_HELP + "\n\nSee h2kctl(1) for the --json output of each command."


# ---------------------------------------------------------------------------------------------- parser

def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not within {low}..{high}")
        return value
    parse.__name__ = f"number {low}..{high}"
    return parse


def _compression(text: str) -> str:
    if text not in ("", *COMPRESSION_TYPES):
        raise argparse.ArgumentTypeError(f"invalid compression type {text!r} (choose from zlib, zstd)")
    return text


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before and after the command; after it they only override when given."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    bus = parser.add_argument_group("bus and output options")
    # The last of --system and --address given wins, as with systemctl's --system and --user.
    bus.add_argument("--system", dest="address", action="store_const", const=None, default=argparse.SUPPRESS,
                     help="talk to h2kd on the system bus (the default; DBUS_SYSTEM_BUS_ADDRESS is honoured)")
    bus.add_argument("--address", metavar="ADDRESS", default=d(None),
                     help="talk to h2kd on the bus at this D-Bus address (e.g. unix:path=/run/x/bus)")
    bus.add_argument("--no-ask-password", dest="ask_password", action="store_false", default=d(True),
                     help="never ask for a password: do not allow interactive polkit authorization")
    bus.add_argument("--no-pager", dest="pager", action="store_false", default=d(True),
                     help="do not pipe long output into a pager (also passed to journalctl by logs)")
    bus.add_argument("-q", "--quiet", action="store_true", default=d(False),
                     help="print less: no progress, no legends, only ids where an id is the answer")


def _json_option(parser: argparse.ArgumentParser, suppress: bool = True) -> None:
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="print the answer as JSON (see JSON OUTPUT in h2kctl(1))")


def _wait_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--wait", action="store_true",
                        help=f"follow the job {what} until it ends, with a progress bar on a terminal")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=exit_status_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _global_options(parser, suppress=False)
    _json_option(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True

    def command(name: str, help_text: str, json_output: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common],
                                  epilog="Exit status and JSON output: see h2kctl --help and h2kctl(1).")
        if json_output:
            _json_option(sub)
        sub.set_defaults(has_json_output=json_output)
        return sub

    p = command("submit", "submit a job (a conversion by default) from flags or a job file, and say the state h2kd "
                "gave it: a job that failed h2kd's checks (e.g. its output exists) is stored as failed, said with "
                "h2kd's reason and exit status 3", json_output=True)
    p.add_argument("source", metavar="SOURCE", nargs="?", help="the source disk image (VMDK, VHD, VHDX, VDI, "
                   "qcow2, raw or OVA); it must be readable by the calling user")
    p.add_argument("--file", metavar="JOBFILE", help="read the whole job spec from a JSON file (or YAML, when "
                   "PyYAML is installed; - reads stdin) instead of flags; a repair of a guest in place "
                   "(operation offline_fix) is submitted this way")
    # No default here: given with --file, even as "convert", it is refused like the other spec flags.
    p.add_argument("--operation", choices=OPERATIONS, help="what to do (default: convert)")
    p.add_argument("-o", "--output", metavar="PATH", help="where to write the converted image: under one of h2kd's "
                   "output roots, in a directory the caller may write (without it, a directory of the job's "
                   "own in the first output root)")
    p.add_argument("--format", choices=["qcow2", "raw"], help="output format (default: qcow2)")
    p.add_argument("--compress", metavar="TYPE", nargs="?", const="", type=_compression,
                   help="compress the qcow2 output, with TYPE zlib or zstd (default: h2kd's choice); "
                        "write --compress=TYPE when SOURCE follows")
    p.add_argument("--no-sync", dest="sync", action="store_false",
                   help="do not sync the output to disk before the job completes (faster; the output still "
                        "appears only when complete, but as after a qemu-img convert by hand, a power loss soon "
                        "after may lose it or leave it truncated)")
    p.add_argument("--domain-xml", action="store_true",
                   help="also write a libvirt domain (BASE.xml) next to the converted disks: the VM's CPUs, memory, "
                        "firmware, NICs and boot disk, for virsh define")
    p.add_argument("--verify", action="store_true",
                   help="compare each converted disk with its source before it gets its name (reads both "
                        "again); a difference fails the attempt (retried as --retries says) and leaves no output")
    p.add_argument("--source-format", metavar="FORMAT", help="the source's format (default: probed)")
    p.add_argument("--compare-with", metavar="PATH", help="validate: compare the image's contents with PATH")
    p.add_argument("--priority", type=_int_range(1, 10), metavar="N", help="1 (most urgent) .. 10; default 5; "
                   "1..4 need the right to manage the queue")
    p.add_argument("--retries", type=_int_range(0, 5), metavar="N", help="retry a failed attempt up to N times "
                   "(0..5; default 0)")
    p.add_argument("--timeout", type=_int_range(60, 86400), metavar="SECONDS",
                   help="stop an attempt after this long (60..86400; default 3600)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing output file")
    p.add_argument("--id", metavar="ID", help="the job id (default: generated); resubmitting the id of a job of "
                   "yours with the same spec returns that job, and h2kctl says so with its state (exit status as "
                   "for a job waited for)")
    p.add_argument("--ticket", metavar="TICKET", help="a ticket reference recorded with the job")
    p.add_argument("--tag", metavar="TAG", action="append", help="a tag recorded with the job (repeatable)")
    p.add_argument("--no-queue", dest="queue", action="store_false",
                   help="store the job without queueing it; start it later with h2kctl start (not with --wait)")
    _wait_option(p, "after submitting it")

    p = command("list", "list jobs: id, operation, state, progress, owner and age", json_output=True)
    p.add_argument("--state", metavar="STATE", action="append",
                   help=f"only jobs in this state (repeatable or comma-separated: {', '.join(STATES)})")
    p.add_argument("--operation", choices=LISTED_OPERATIONS, help="only jobs of this operation")
    p.add_argument("--owner", metavar="USER", help="only jobs submitted by this user (name or uid)")
    p.add_argument("--limit", metavar="N", type=_int_range(0, 2**31), default=0,
                   help="list at most N jobs, the first N in submission order (0: all)")

    p = command("status", "show everything about a job: state, progress, history and result", json_output=True)
    p.add_argument("job", metavar="JOB", help="the job id")

    p = command("show", "show a job's D-Bus properties as Name=Value lines (machine-readable)", json_output=True)
    p.add_argument("job", metavar="JOB", help="the job id")
    p.add_argument("-p", "--property", metavar="NAME", action="append",
                   help="show only this property (repeatable or comma-separated)")
    p.add_argument("--value", action="store_true", help="print only the values, without Name=")

    p = command("watch", "show live progress of one job (until it ends) or of all jobs (until Ctrl-C)")
    p.add_argument("job", metavar="JOB", nargs="?", help="the job id (default: all jobs)")

    p = command("wait", "wait until jobs end: those named, or every job queued or running now (held jobs, "
                "submitted with --no-queue, are not waited for); one line per job as it is seen to end, in the order "
                "they end (16 are followed at once, the others in their turn)",
                json_output=True)
    p.add_argument("jobs", metavar="JOB", nargs="*", help="job ids (default: every job queued or running now)")

    p = command("cancel", "cancel queued or running jobs (the unit is stopped, partial output removed) and wait "
                "until each has ended, as systemctl stop does; a job that ended otherwise (e.g. completed "
                "before the cancel reached it) is said, with exit status 1; Ctrl-C stops only the waiting")
    p.add_argument("jobs", metavar="JOB", nargs="+", help="job ids")
    p.add_argument("--no-block", action="store_true",
                   help="only ask for the cancel: do not wait until the jobs have ended")

    p = command("retry", "queue failed or cancelled jobs again, each as a new attempt; a job that cannot be is said, "
                         "and the others are queued all the same (exit status: the first failure's)",
                json_output=True)
    p.add_argument("jobs", metavar="JOB", nargs="+", help="job ids")
    _wait_option(p, "after queueing it")

    p = command("remove", "forget finished jobs (their D-Bus objects disappear)")
    p.add_argument("jobs", metavar="JOB", nargs="+", help="job ids")

    p = command("start", "queue jobs that were submitted with --no-queue; a job that cannot be is said, and the "
                         "others are queued all the same (exit status: the first failure's)", json_output=True)
    p.add_argument("jobs", metavar="JOB", nargs="+", help="job ids")
    _wait_option(p, "after queueing it")

    p = command("logs", "show a job's journal (journalctl H2K_JOB_ID=JOB _UID=0, from its creation on: not the lines "
                        "of an earlier job of that id; with -f or -n, the last lines of that id), for those who may "
                        "read the system "
                        "journal (root, group systemd-journal); events shows any user a job's history. A job h2kd "
                        "no longer knows (removed, or dropped by retention), or while h2kd cannot be reached: said on "
                        "stderr, and its journal is shown all the same. The exit status is journalctl's")
    p.add_argument("job", metavar="JOB", help="the job id")
    p.add_argument("-f", "--follow", action="store_true", help="follow the journal (journalctl -f)")
    p.add_argument("-n", "--lines", metavar="N", type=_int_range(0, 2**31), help="show only the last N entries")

    p = command("events", "show a job's event log (state changes, progress, messages, result)", json_output=True)
    p.add_argument("job", metavar="JOB", help="the job id")
    p.add_argument("--since", metavar="SEQ", type=_int_range(0, 2**63 - 1), default=0,
                   help="only events after this sequence number (0: all)")

    p = command("queue", "show queue statistics, or change the queue (pause, resume, priority, max-parallel)",
                json_output=True)
    actions = p.add_subparsers(dest="queue_command", metavar="ACTION", title="actions")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text, parents=[common])
        _json_option(sub)
        return sub

    action("stats", "show queue statistics (the default)")
    action("pause", "stop starting queued jobs; running jobs go on")
    action("resume", "start queued jobs again")
    q = action("priority", "change the priority of a queued job")
    q.add_argument("job", metavar="JOB", help="the job id")
    q.add_argument("priority", metavar="N", type=_int_range(1, 10), help="1 (most urgent) .. 10")
    q = action("max-parallel", "set how many jobs h2kd's own units may run at once (external workers keep the "
                                            "max_jobs they registered with)")
    q.add_argument("max_parallel", metavar="N", type=_int_range(1, 256), help="1..256")

    command("workers", "list workers: the builtin one and registered external workers", json_output=True)
    command("health", "show h2kd's health (exit status 1 when degraded)", json_output=True)

    p = command("inspect", "report on a disk image or OVA: submits an inspect job, waits, prints the report",
                json_output=True)
    p.add_argument("source", metavar="FILE", help="the disk image or OVA; it must be readable by the calling user")
    p.add_argument("--source-format", metavar="FORMAT", help="the image's format (default: probed)")
    p.add_argument("--priority", type=_int_range(1, 10), metavar="N", help="1 (most urgent) .. 10; default 5; "
                   "1..4 need the right to manage the queue")
    p.add_argument("--timeout", type=_int_range(60, 86400), metavar="SECONDS",
                   help="stop the inspection after this long (60..86400)")
    return parser


def normalize_argv(argv: list[str]) -> list[str]:
    """A bare --compress (no TYPE) before SOURCE would swallow SOURCE as its value; spell it --compress=."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            out.extend(argv[i:])
            break
        if arg == "--compress" and (i + 1 >= len(argv) or argv[i + 1] not in COMPRESSION_TYPES):
            out.append("--compress=")
        else:
            out.append(arg)
    return out


# ---------------------------------------------------------------------------------------------- output

class Output:
    """Where results go; --json and -q decide the shape."""

    def __init__(self, args: argparse.Namespace):
        self.json = bool(getattr(args, "json", False))
        self.quiet = bool(args.quiet)
        self.pager = bool(args.pager)

    def emit_json(self, value: Any) -> None:
        sys.stdout.write(schema.dumps(value))

    def line(self, text: str) -> None:
        if not self.quiet and not self.json:    # with --json, stdout holds the JSON alone
            print(text, flush=True)     # when it happens, also into a pipe (`h2kctl wait | tee log`)


def _split_multi(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


UID_MAX = 2**32 - 1   # uid_t is 32 bits; h2kd's Owner is a u


def _uid_of(user: str) -> int:
    # isdigit() alone also takes "²", which int() refuses
    if user.isascii() and user.isdigit():
        if int(user) > UID_MAX:
            raise CtlError(f"--owner: {user} is out of range (a uid is 0..{UID_MAX})", ExitCode.USAGE)
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise CtlError(f"--owner: no such user: {user}", ExitCode.USAGE) from None


# ---------------------------------------------------------------------------------------------- commands

async def _wait_and_report(client: Client, job_id: str, path: str, out: Output) -> int:
    """Follow a job to its end (or Ctrl-C), print its outcome, return the exit code for it. What is printed is
    what following it gave: the job may be removed as soon as it has ended."""
    stream, tty = progress_stream(out.json, out.quiet)
    view = ProgressView(stream, tty)
    props = await follow_job(client, job_id, view, path)
    if props is None:
        print(detach_hint(job_id), file=sys.stderr)
        if out.json:
            out.emit_json(schema.job(await client.read_job(path), path))
        return ExitCode.INTERRUPTED
    if out.json:
        out.emit_json(schema.job(props, path))
    elif props["State"] == "completed":
        out.line(final_message(props))
    code = exit_code_for(props["State"])
    if code != ExitCode.SUCCESS:
        raise CtlError(_error_line(props), code)
    return code


def _error_line(props: dict[str, Any]) -> str:
    """'job X failed: CODE: message' on one line (a worker's message may have more lines)."""
    message = _first_line(final_message(props), mark_more=False)
    return message[0].lower() + message[1:]


# The flags that shape the spec submit builds, and what each applies to (None: any operation).
_SPEC_FLAGS = [("--format", "format", "convert"), ("--compress", "compress", "convert"),
               ("--no-sync", "sync", "convert"), ("--verify", "verify", "convert"),
               ("--domain-xml", "domain_xml", "convert"), ("-o/--output", "output", "convert"),
               ("--overwrite", "overwrite", "convert"), ("--compare-with", "compare_with", "validate"),
               ("--source-format", "source_format", None), ("--priority", "priority", None),
               ("--retries", "retries", None), ("--timeout", "timeout", None), ("--id", "id", None),
               ("--ticket", "ticket", None), ("--tag", "tag", None), ("--operation", "operation", None)]


def _given_spec_flags(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """The spec-shaping flags given on the command line, each with the operation it applies to."""
    unset = {"sync": True, "verify": False, "domain_xml": False, "overwrite": False}
    return [(flag, applies) for flag, name, applies in _SPEC_FLAGS
            if getattr(args, name, unset.get(name)) != unset.get(name)]


def _submit_spec(args: argparse.Namespace) -> dict[str, Any]:
    if args.wait and not args.queue:
        # Said before anything is sent: a held job does not start, so --wait would store one and then fail.
        raise CtlError("--wait and --no-queue conflict: a job stored without queueing does not start; submit it "
                       "with --no-queue, then: h2kctl start --wait ID", ExitCode.USAGE)
    given = _given_spec_flags(args)
    if args.file:
        if args.source:
            raise CtlError("give either SOURCE or --file, not both", ExitCode.USAGE)
        if given:
            raise CtlError(f"{', '.join(flag for flag, _ in given)}: not with --file; the job file holds the whole "
                           "spec", ExitCode.USAGE)
        return load_job_file(args.file)
    operation = args.operation or "convert"
    for flag, applies in given:
        if applies is not None and applies != operation:
            raise CtlError(f"{flag} applies to --operation {applies} only, not {operation}", ExitCode.USAGE)
    if args.source:
        return spec_from_args(args, operation)
    raise CtlError("submit needs a SOURCE image or --file JOBFILE", ExitCode.USAGE)


async def _created_at(client: Client, job_id: Any) -> int | None:
    """When the job of this id was created, None if there is none: a submission naming an id may be answered
    with the job submitted before under it (same spec), which is then not new."""
    if not isinstance(job_id, str) or not job_id:
        return None
    try:
        return await client.get_property(await client.get_job_path(job_id), JOB_IFACE, "CreatedAt")
    except CtlError as e:
        if e.code != ExitCode.NO_SUCH_JOB:
            raise
        return None


async def cmd_submit(client: Client, args: argparse.Namespace, out: Output) -> int:
    before = await _created_at(client, args.request.get("job_id"))
    job_id, path = await client.submit(args.request, args.queue)
    if args.wait:
        if out.quiet and not out.json:
            print(job_id, flush=True)       # `id=$(h2kctl submit -q --wait ...)` has it, whatever the job's end
        elif not out.json:
            print(f"Job {job_id} was already submitted with this spec." if before is not None
                  else f"Submitted job {job_id}.", flush=True)
        return await _wait_and_report(client, job_id, path, out)
    # Said as h2kd has it: a job that failed its checks is stored as failed, and a resubmission may find a job
    # in any state.
    props = await client.read_job(path)
    state = props["State"]
    existed = before is not None and props.get("CreatedAt") == before
    if out.json:
        out.emit_json(schema.job(props, path))
    elif out.quiet:
        print(job_id)
    code = exit_code_for(state)
    if code != ExitCode.SUCCESS:
        line = _error_line(props)
        if existed:
            line = f"job {job_id} was already submitted with this spec, and" + line[len(f"job {job_id}"):]
        raise CtlError(line, code)
    if not out.json and not out.quiet:
        start = f"; start it with: h2kctl start {job_arguments(job_id)}" if state == "validated" else ""
        if existed:
            print(f"Job {job_id} was already submitted with this spec ({state}{start}); it was not submitted "
                  "again.")
        else:
            print(f"Submitted job {job_id} ({'stored' if state == 'validated' else state}{start}).")
    return ExitCode.SUCCESS


def _list_filters(args: argparse.Namespace) -> dict[str, Any]:
    filters: dict[str, Any] = {}
    states = _split_multi(args.state)
    for state in states:
        if state not in STATES:
            raise CtlError(f"unknown state {state!r} (states: {', '.join(STATES)})", ExitCode.USAGE)
    if states:
        filters["state"] = states
    if args.operation:
        filters["operation"] = args.operation
    if args.owner:
        filters["owner"] = _uid_of(args.owner)
    if args.limit:
        filters["limit"] = args.limit
    return filters


async def cmd_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    (entries,) = await client.manager("ListJobs", "a{sv}", [to_vardict(args.request, "the list filters")])
    if out.json:
        out.emit_json([schema.list_entry(tuple(e)) for e in entries])
        return ExitCode.SUCCESS
    if out.quiet:
        for e in entries:
            print(e[0])
        return ExitCode.SUCCESS
    rows = [[e[0], e[1], e[2], percent(e[3], e[3] >= 0), user_name(e[4]), age(e[6])] for e in entries]
    buffer = io.StringIO()
    table(["ID", "OPERATION", "STATE", "PROGRESS", "OWNER", "AGE"], rows, buffer)
    buffer.write(f"\n{len(rows)} job{'s' if len(rows) != 1 else ''} listed.\n")
    page(buffer.getvalue(), out.pager)
    return ExitCode.SUCCESS


async def _events(client: Client, path: str, since: int) -> list[Any]:
    """Every event after `since`: GetEvents answers a page at a time."""
    events: list[Any] = []
    while True:
        (page,) = await client.call(path, JOB_IFACE, "GetEvents", "t", [since])
        if not page:
            return events
        events += page
        since = page[-1][0]


async def _history(client: Client, path: str) -> list[dict[str, Any]]:
    history = []
    for seq, usec, kind, data in await _events(client, path, 0):
        if kind == "state":
            parsed = schema.event((seq, usec, kind, data))["data"]
            history.append(schema.history_entry(seq, usec, parsed if isinstance(parsed, dict) else {}))
    return history


async def cmd_status(client: Client, args: argparse.Namespace, out: Output) -> int:
    path = await client.get_job_path(args.job)
    props = await client.read_job(path)
    history = await _history(client, path)
    job = schema.job(props, path, history)
    if out.json:
        out.emit_json(job)
        return ExitCode.SUCCESS
    b = io.StringIO()
    # As systemctl status marks units: a cancelled job is stopped (○), not failed (×).
    dot = glyph({"completed": "✓", "failed": "×", "cancelled": "○"}.get(job["state"], "●"))
    # The files written, from the Result (for those who may read it), say more than Output: given no output path or
    # a directory, Output is that directory.
    output = ", ".join(written_paths(props.get("Result"))) or job["output"]
    target = f" {glyph('→')} {output}" if output else ""
    b.write(f"{dot} {job['id']} - {job['operation']} {job['source']}{target}\n")

    def field(name: str, value: Any) -> None:
        if value not in (None, ""):
            b.write(f"{name:>12}: " + str(value).rstrip().replace("\n", "\n" + " " * 14) + "\n")

    since = props.get("FinishedAt") or props.get("StartedAt") or props.get("CreatedAt")
    field("State", f"{job['state']}{' (' + job['phase'] + ')' if job['phase'] else ''}"
                   f"{' since ' + timestamp(since) + '; ' + age(since) + ' ago' if local_time(since) else ''}")
    if job["wait_reason"]:
        field("Waiting", job["wait_reason"])
    if job["progress"] is not None or job["bytes_done"]:
        text = percent(job["progress"] or 0.0, job["progress"] is not None)
        if job["bytes_total"]:
            text += f" ({human_bytes(job['bytes_done'])} of {human_bytes(job['bytes_total'])})"
        if job["rate"]:
            text += f", {human_bytes(job['rate'])}/s"
        if local_time(job["expected_end_usec"] or 0) and job["state"] not in ("completed", "failed", "cancelled"):
            text += f", ends {timestamp(job['expected_end_usec'])}"
        field("Progress", text)
    field("Owner", f"{job['owner_name']} ({job['owner']})")
    field("Priority", job["priority"])
    field("Attempt", job["attempt"] or None)
    field("Unit", job["unit"])
    field("Worker", job["worker"])
    field("Source", job["source"])
    field("Output", output)
    field("Created", timestamp(props.get("CreatedAt", 0)))
    if props.get("StartedAt"):
        field("Started", timestamp(props["StartedAt"]))
    if props.get("FinishedAt"):
        field("Finished", timestamp(props["FinishedAt"]))
        if props.get("StartedAt"):
            field("Took", human_duration((props["FinishedAt"] - props["StartedAt"]) / 1e6))
    if job["error"]:
        field("Error", ": ".join(p for p in (job["error"]["code"], job["error"]["message"]) if p))
    if history:
        b.write("\nHistory:\n")
        for h in history:
            reason = f"  {h['reason']}" if h["reason"] else ""
            b.write(f"  {timestamp(h['time_usec'])}  {h['state']:<11}{reason}\n")
    if job["result"]:
        b.write("\nResult:\n")
        nested(job["result"], b, 1)
    elif isinstance(props.get("Result"), Withheld):
        b.write(f"\nResult: {props['Result'].reason}\n")
    page(b.getvalue(), out.pager)
    return ExitCode.SUCCESS


def _show_value(value: Any) -> str:
    """A property value on one line, as systemctl show prints it (newlines escaped)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return " ".join(_show_value(v) for v in value).strip()
    return str(value).replace("\\", "\\\\").replace("\n", "\\n")


def _first_line(text: str, mark_more: bool = True) -> str:
    """The first line of `text`, marked (…) if more follow and `mark_more`."""
    lines = text.strip().splitlines()
    if not lines:
        return ""
    return lines[0].rstrip() + (f" {glyph('…')}" if mark_more and len(lines) > 1 else "")


async def cmd_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    props = await client.job_properties(args.job)
    wanted = _split_multi(args.property)
    withheld = {name: value for name, value in props.items() if isinstance(value, Withheld)}
    refused = next((name for name in wanted if name in withheld), None)
    if refused:
        raise CtlError(f"not authorized to read {refused}: {withheld[refused].reason}", ExitCode.NOT_AUTHORIZED)
    props = {name: value for name, value in props.items() if name not in withheld}
    if wanted:
        unknown = [w for w in wanted if w not in props]
        if unknown:
            raise CtlError(f"a job has no property {unknown[0]!r} (properties: {', '.join(sorted(props))})",
                           ExitCode.USAGE)
        props = {name: props[name] for name in wanted}
    else:
        props = dict(sorted(props.items()))
    if out.json:
        out.emit_json({k: list(v) if isinstance(v, tuple) else v for k, v in props.items()})
        return ExitCode.SUCCESS
    text = "".join((f"{_show_value(v)}\n" if args.value else f"{k}={_show_value(v)}\n") for k, v in props.items())
    page(text, out.pager)
    return ExitCode.SUCCESS


# What `wait` with no job named waits for: every job on its way to an end (held jobs are not).
_UNDER_WAY = [state for state in STATES if state not in TERMINAL and state != "validated"]


def _cancel_hint(remaining: list[str], waited: int) -> str:
    """How many of the jobs waited for may still run, and how to cancel them (by id, up to ten of them)."""
    text = f"{len(remaining)} of {waited} jobs may still run"
    if len(remaining) > 10:
        return text + "; h2kctl list shows them"
    return text + f"; cancel {'it' if len(remaining) == 1 else 'them'} with: h2kctl cancel {job_arguments(*remaining)}"


# Jobs `wait` follows at once, each with its two match rules and up to three calls in flight (the system bus
# allows a connection 512 rules and 128 pending calls). The others wait their turn, and meanwhile a look at the
# jobs still under way (one ListJobs) every LOOKOUT_SECONDS finds those of them that ended: each is reported
# then, not when its turn comes, so that the failure of a job named late in a long list shows at once.
FOLLOWED_AT_ONCE = 16
LOOKOUT_SECONDS = 2.0


async def cmd_wait(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.jobs:
        job_ids = list(dict.fromkeys(args.jobs))
    else:
        (entries,) = await client.manager("ListJobs", "a{sv}", [to_vardict({"state": _UNDER_WAY})])
        job_ids = [entry[0] for entry in entries]
    ended: dict[str, tuple[str, dict[str, Any]]] = {}
    gone: set[str] = set()
    held: set[str] = set()      # stored with --no-queue: they would never end
    not_taken = list(job_ids)   # not yet followed, in the order named
    early: list[asyncio.Task[None]] = []    # those the lookout found ended before their turn
    turns_early = asyncio.Semaphore(FOLLOWED_AT_ONCE)
    failures: list[Exception] = []          # of an early report: it ends the wait, as a follower's failure does

    async def wait_for(job_id: str, ctrl_c: asyncio.Event) -> None:
        try:
            path = await patiently(client, lambda: client.get_job_path(job_id), f"waiting for job {job_id}", ctrl_c)
            props = path and await follow_job(client, job_id, ProgressView(None, False), path, ctrl_c)
        except JobHeld as e:
            _say(e)
            held.add(job_id)
            return
        except CtlError as e:  # no such job, or removed before it was seen to end: the others are still waited for
            if e.code != ExitCode.NO_SUCH_JOB:
                raise
            _say(e)
            gone.add(job_id)
            return
        if props:
            ended[job_id] = (path, props)
            if not out.json and not out.quiet:    # as each job ends, whatever the order they were named in
                out.line(_first_line(final_message(props)))

    async def follower(ctrl_c: asyncio.Event) -> None:
        while not_taken and not ctrl_c.is_set():
            await wait_for(not_taken.pop(0), ctrl_c)

    async def lookout(ctrl_c: asyncio.Event) -> None:
        while not_taken and not ctrl_c.is_set():
            await asyncio.sleep(LOOKOUT_SECONDS)
            try:
                (entries,) = await client.manager("ListJobs", "a{sv}", [to_vardict({"state": _UNDER_WAY})])
            except CtlError:
                continue    # h2kd away a moment: the followers wait for it, and say so if it stays away
            under_way = {entry[0] for entry in entries}
            over = [j for j in not_taken if j not in under_way]     # ended (or gone, or held): said at once
            not_taken[:] = [j for j in not_taken if j in under_way]
            early.extend(asyncio.create_task(reported_early(job_id, ctrl_c)) for job_id in over)

    async def reported_early(job_id: str, ctrl_c: asyncio.Event) -> None:
        async with turns_early:
            if ctrl_c.is_set():
                return
            try:
                await wait_for(job_id, ctrl_c)
            except Exception as e:
                failures.append(e)
                for each in waits:
                    each.cancel()
                raise

    with CtrlC() as ctrl_c:
        waits = [asyncio.create_task(follower(ctrl_c.event)) for _ in range(min(FOLLOWED_AT_ONCE, len(job_ids)))]
        # The lookout is not waited for: once every job is taken it has nothing left to do, and may be asleep.
        looking = [asyncio.create_task(lookout(ctrl_c.event))] if len(job_ids) > FOLLOWED_AT_ONCE else []
        try:
            try:
                await asyncio.gather(*waits)    # a failure other than a job gone ends the wait for all
            except asyncio.CancelledError:
                if not failures:
                    raise
                raise failures[0] from None
            for each in looking:
                each.cancel()
            await asyncio.gather(*early)
        finally:
            for each in [*waits, *looking, *early]:
                each.cancel()
            await asyncio.gather(*waits, *looking, *early, return_exceptions=True)
        interrupted = ctrl_c.event.is_set()
    # Past the Ctrl-C handler: a second Ctrl-C ends what is left at once, the reads below included.
    if interrupted:     # the jobs go on
        remaining = [job_id for job_id in job_ids if job_id not in ended and job_id not in gone | held]
        if remaining:
            print(f"{PROG}: stopped waiting; {_cancel_hint(remaining, len(job_ids))}", file=sys.stderr)
            if out.json:    # every job named, as it is now, as submit --wait --json does for its one job
                out.emit_json(await _jobs_as_they_are(client, job_ids, ended))
            return ExitCode.INTERRUPTED
    if out.json:
        out.emit_json([schema.job(props, path) for path, props in (ended[j] for j in job_ids if j in ended)])
    states = {props["State"] for _, props in ended.values()}
    for state, code in (("failed", ExitCode.JOB_FAILED), ("cancelled", ExitCode.JOB_CANCELLED)):
        if state in states:
            return code
    return ExitCode.NO_SUCH_JOB if gone else ExitCode.USAGE if held else ExitCode.SUCCESS


async def _jobs_as_they_are(client: Client, job_ids: list[str],
                             ended: dict[str, tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The JSON of each job that still exists: as it ended, or as h2kd has it now."""
    jobs = []
    for job_id in job_ids:
        if job_id in ended:
            path, props = ended[job_id]
        else:
            try:
                path = await client.get_job_path(job_id)
                props = await client.read_job(path)
            except CtlError as e:
                if e.code != ExitCode.NO_SUCH_JOB:
                    raise
                continue
        jobs.append(schema.job(props, path))
    return jobs


async def cmd_watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.job:
        stream = sys.stdout
        view = ProgressView(None if out.quiet else stream, stream_is_tty(stream))
        props = await follow_job(client, args.job, view)
        if props is None:
            print(detach_hint(args.job), file=sys.stderr)
            return ExitCode.INTERRUPTED
        out.line(final_message(props))
        return exit_code_for(props["State"])
    await watch_all(client, sys.stdout, stream_is_tty(sys.stdout), out.quiet)
    return ExitCode.SUCCESS


async def _job_action(client: Client, job_id: str, member: str, verb: str) -> None:
    """Cancel, retry or start one job; polkit's action depends on whether the caller owns the job."""
    props = await client.job_properties(job_id, explicit=())
    action = "cancel" if props.get("Owner") == os.getuid() else "cancel-other-user"
    await client.manager(member, "s", [job_id], action=action, what=f"{verb} job {job_id}")


def _say(error: CtlError) -> None:
    """The one line an error gets: "h2kctl: <message>", after what was printed so far."""
    sys.stdout.flush()
    print(f"{PROG}: {error.message}", file=sys.stderr)


async def _each_job(job_ids: list[str], act: Callable[[str], Awaitable[None]]) -> int:
    """Do `act` for every job, going on past a failure (as systemctl stop A B C does): each failure is said on
    its own line, and the exit status is that of the first."""
    first_failure: ExitCode | None = None
    for job_id in job_ids:
        try:
            await act(job_id)
        except CtlError as e:
            _say(e)
            first_failure = first_failure or e.code
    return first_failure or ExitCode.SUCCESS


async def cmd_cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Like systemctl stop: every cancel is asked for first, then each job is waited for until it has ended
    (its unit stopped), so that what comes next (retry, remove, reading the output directory) finds it so."""
    requested: list[str] = []

    async def request(job_id: str) -> None:
        await _job_action(client, job_id, "CancelJob", "cancel")
        requested.append(job_id)
        if args.no_block:
            out.line(f"Cancel requested for job {job_id}.")

    code = await _each_job(args.jobs, request)
    if args.no_block:
        return code
    for index, job_id in enumerate(requested):
        try:
            props = await follow_job(client, job_id, ProgressView(None, False))
        except CtlError as e:
            if e.code == ExitCode.UNREACHABLE:   # already waited for as long as h2kd may be away
                raise
            _say(e)
            code = code or e.code
            continue
        if props is None:   # Ctrl-C: only the waiting stops
            print(f"{PROG}: stopped waiting; cancel was requested for {', '.join(requested[index:])}, which may "
                  f"still be stopping", file=sys.stderr)
            return ExitCode.INTERRUPTED
        if props["State"] == "cancelled":
            out.line(f"Cancelled job {job_id}.")
        else:
            _say(CtlError(f"job {job_id} was not cancelled: it {props['State']} before the cancel reached it"))
            code = code or ExitCode.FAILURE
    return code


async def cmd_retry(client: Client, args: argparse.Namespace, out: Output) -> int:
    return await _requeue(client, args, out, "RetryJob", "retry", "Queued job {} again.")


async def cmd_start(client: Client, args: argparse.Namespace, out: Output) -> int:
    return await _requeue(client, args, out, "StartJob", "start", "Queued job {}.")


async def _requeue(client: Client, args: argparse.Namespace, out: Output, member: str, verb: str,
                   message: str) -> int:
    """retry or start: each job queued in turn, going on past one that cannot be (as cancel does). One JOB: with
    --wait, followed as submit --wait follows; --json, its object. Several: with --wait, waited for as `wait`
    does; --json, an array of the objects of those queued."""
    job_ids = list(dict.fromkeys(args.jobs))
    queued: list[str] = []

    async def requeue(job_id: str) -> None:
        await _job_action(client, job_id, member, verb)
        queued.append(job_id)
        if not args.wait and not out.json:
            out.line(message.format(job_id))
    code = await _each_job(job_ids, requeue)
    if len(job_ids) == 1:
        if not queued:
            return code     # said on stderr; --json prints nothing, as for any failed command
        if args.wait:
            return await _wait_and_report(client, job_ids[0], await client.get_job_path(job_ids[0]), out)
        if out.json:
            path = await client.get_job_path(job_ids[0])
            out.emit_json(schema.job(await client.read_job(path), path))
        return code
    if args.wait and queued:
        args.jobs = queued
        return await cmd_wait(client, args, out) or code
    if out.json:
        paths = [(job_id, await client.get_job_path(job_id)) for job_id in queued]
        out.emit_json([schema.job(await client.read_job(path), path) for _, path in paths])
    return code


async def cmd_remove(client: Client, args: argparse.Namespace, out: Output) -> int:
    async def remove(job_id: str) -> None:
        await client.manager("RemoveJob", "s", [job_id], action="manage", what=f"remove job {job_id}")
        out.line(f"Removed job {job_id}.")
    return await _each_job(args.jobs, remove)


# Where journald keeps this machine's entries (persistent, then volatile): the system's hold the jobs' lines.
JOURNAL_DIRECTORIES = ("/var/log/journal", "/run/log/journal")


def reads_system_journal() -> bool:
    """Whether this user can read the system journal's files (True if there seem to be none: journalctl says)."""
    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        return True
    found = readable = False
    for directory in (Path(root) / machine for root in JOURNAL_DIRECTORIES if machine):
        try:
            if not directory.is_dir():
                continue
            found = True
            readable = readable or any(os.access(f, os.R_OK) for f in directory.glob("system*.journal"))
        except OSError:     # a journal directory this user may not even look into (/var/log/journal 2750)
            found = True
    return readable or not found


async def cmd_logs(client: Client, args: argparse.Namespace, out: Output) -> int:
    try:
        path = await client.get_job_path(args.job)
        if not args.follow and args.lines is None:     # see journalctl_command
            # Ids are free again once a job is removed: the lines of an earlier job of this id are not this one's.
            args.created_at = await client.get_property(path, JOB_IFACE, "CreatedAt")
    except CtlError as e:
        if e.code not in (ExitCode.NO_SUCH_JOB, ExitCode.UNREACHABLE):
            raise
        return logs_without_the_job(args, e)
    _check_journal_readable(args.job, known=True)
    return ExitCode.SUCCESS


def logs_without_the_job(args: argparse.Namespace, error: CtlError) -> int:
    """Say that h2kd could not confirm the job, then let journalctl show its lines all the same: the journal keeps
    them after h2kd has dropped the job (removed, retention) and while h2kd is away."""
    _check_journal_readable(args.job, known=False)
    if error.code == ExitCode.NO_SUCH_JOB:
        why = f"h2kd does not know job {args.job} (removed, or never submitted); showing its journal all the same"
    else:
        why = f"{error.message}; showing the journal of job {args.job} all the same"
    sys.stdout.flush()
    print(f"{PROG}: {why}", file=sys.stderr, flush=True)
    return ExitCode.SUCCESS


def _check_journal_readable(job_id: str, known: bool) -> None:
    if os.geteuid() != 0 and not reads_system_journal():
        # journalctl would show nothing but its hint and exit 1: say why, and what this user can read instead.
        instead = f"; h2kctl events {job_arguments(job_id)} shows the job's history" if known else ""
        raise CtlError(f"the lines of job {job_id} are in the system journal, which this user may not read (root "
                       f"and group systemd-journal may, on many systems adm and wheel too){instead}")


def journalctl_command(args: argparse.Namespace) -> list[str]:
    # Only lines root wrote (h2kd, the job's unit): any user may send the journal a line with H2K_JOB_ID=.
    command = ["journalctl", f"H2K_JOB_ID={args.job}", "_UID=0"]
    if getattr(args, "created_at", 0):
        # Read only without -f or -n: journalctl (252) would show the first lines after --since, not the last.
        command.append(f"--since=@{args.created_at // 1_000_000}")
    if args.follow:
        command.append("-f")
    if args.lines is not None:
        command += ["-n", str(args.lines)]
    if not args.pager:
        command.append("--no-pager")
    if args.quiet:
        command.append("-q")
    return command


def _event_summary(kind: str, data: Any) -> str:
    if not isinstance(data, dict):
        return str(data)
    if kind == "state":
        entry = schema.history_entry(0, 0, data)
        text = f"{entry['from']} {glyph('→')} {entry['state']}" if entry["from"] else entry["state"]
        return text + (f": {entry['reason']}" if entry["reason"] else "")
    if kind == "progress":
        fraction = data.get("progress")
        text = f"{fraction * 100:.1f}%" if isinstance(fraction, (int, float)) else ""
        return " ".join(p for p in (text, str(data.get("phase") or "")) if p)
    if kind == "log":
        return str(data.get("message", ""))
    if kind == "result":
        error = data.get("error") or {}
        detail = ": ".join(str(p) for p in (error.get("code"), error.get("message")) if p)
        return str(data.get("status", "")) + (f" ({detail})" if detail else "")
    return json.dumps(data)


async def cmd_events(client: Client, args: argparse.Namespace, out: Output) -> int:
    path = await client.get_job_path(args.job)
    parsed = [schema.event(tuple(e)) for e in await _events(client, path, args.since)]
    if out.json:
        out.emit_json(parsed)
        return ExitCode.SUCCESS
    rows = [[str(e["seq"]), timestamp(e["time_usec"]), e["kind"], _first_line(_event_summary(e["kind"], e["data"]))]
            for e in parsed]
    buffer = io.StringIO()
    table(["SEQ", "TIME", "KIND", "EVENT"], rows, buffer, legend=not out.quiet)
    page(buffer.getvalue(), out.pager)
    return ExitCode.SUCCESS


async def cmd_queue(client: Client, args: argparse.Namespace, out: Output) -> int:
    action = args.queue_command or "stats"
    if action == "pause":
        await client.manager("PauseQueue", action="manage", what="pause the queue")
        out.line("Queue paused; running jobs go on.")
    elif action == "resume":
        await client.manager("ResumeQueue", action="manage", what="resume the queue")
        out.line("Queue resumed.")
    elif action == "priority":
        await client.manager("SetJobPriority", "su", [args.job, args.priority], action="manage",
                             what=f"change the priority of job {args.job}")
        out.line(f"Job {args.job} now has priority {args.priority}.")
    elif action == "max-parallel":
        await client.manager("SetMaxParallelJobs", "u", [args.max_parallel], action="manage",
                             what="change the number of parallel jobs")
        out.line(f"Up to {args.max_parallel} job{'s' if args.max_parallel != 1 else ''} may now run at once in h2kd's units.")
    if action != "stats" and not out.json:
        return ExitCode.SUCCESS
    (stats,) = await client.manager("GetQueueStats")
    q = schema.queue(stats)
    if out.json:
        out.emit_json(q)
        return ExitCode.SUCCESS
    print(f"Queued: {q['queued']}")
    print(f"Running: {q['running']}")
    print(f"Paused: {'yes' if q['paused'] else 'no'}")
    print(f"Max parallel jobs: {q['max_parallel_jobs']}")
    if q["by_priority"]:
        print("By priority: " + " ".join(f"{i}:{n}" for i, n in enumerate(q["by_priority"], 1)))
    if q["waiting"]:
        print("Waiting:")
        for job_id, why in q["waiting"].items():
            print(f"  {job_id}: {single_line(why)}")
    return ExitCode.SUCCESS


async def cmd_workers(client: Client, args: argparse.Namespace, out: Output) -> int:
    workers = [schema.worker(props, path) for path, props in sorted((await client.workers()).items())]
    if out.json:
        out.emit_json(workers)
        return ExitCode.SUCCESS
    rows = []
    for w in workers:
        caps = w["capabilities"] if isinstance(w["capabilities"], dict) else {}
        listed = caps.get("operations", [])     # an external worker says what it likes: show only names
        ops = ",".join(op for op in listed if isinstance(op, str)) if isinstance(listed, list) else ""
        ops = ops or "-"
        jobs = f"{w['active_jobs']}/{w['max_jobs'] or '-'}"
        heartbeat = age(w["last_heartbeat_usec"] or 0) + (" ago" if w["last_heartbeat_usec"] else "")
        rows.append([w["id"], w["name"], w["kind"], w["state"], jobs, heartbeat, ops])
    table(["ID", "NAME", "KIND", "STATE", "JOBS", "HEARTBEAT", "OPERATIONS"], rows, sys.stdout,
          legend=not out.quiet)
    return ExitCode.SUCCESS


async def cmd_health(client: Client, args: argparse.Namespace, out: Output) -> int:
    (values,) = await client.manager("GetHealth")
    health = schema.health(values)
    if out.json:
        out.emit_json(health)
    else:
        for key, value in health.items():
            label = key.replace("_", " ").capitalize()
            if key == "uptime_seconds":
                value = human_duration(float(value))
                label = "Uptime"
            print(f"{label}: {_show_value(value)}")
    return ExitCode.SUCCESS if health.get("status", "ok") == "ok" else ExitCode.FAILURE


async def cmd_inspect(client: Client, args: argparse.Namespace, out: Output) -> int:
    job_id, path = await client.submit(args.request, True)
    # `h2kctl inspect FILE > report.txt`: the report alone goes to the file; progress only to a terminal.
    stream, tty = progress_stream(out.json or not stream_is_tty(sys.stdout), out.quiet)
    props = await follow_job(client, job_id, ProgressView(stream, tty))
    if props is None:
        # The job exists only to print its report here, so Ctrl-C cancels it (as importctl cancels its transfer).
        try:
            await _job_action(client, job_id, "CancelJob", "cancel")
            # Asked, not done: the job may still complete before the cancel reaches it.
            print(f"Cancel requested for inspect job {job_id}.", file=sys.stderr)
        except CtlError as e:
            print(f"Could not cancel inspect job {job_id}: {e.message.rstrip('.')}. " + detach_hint(job_id)
                  + f"; its report: h2kctl status {job_arguments(job_id)}", file=sys.stderr)
        if out.json:    # the job as it is now, its report still empty, as submit --wait --json does
            out.emit_json(schema.inspect(schema.job(await client.read_job(path), path)))
        return ExitCode.INTERRUPTED
    job = schema.job(props, path)
    result = schema.inspect(job)
    if out.json:
        out.emit_json(result)
    elif props["State"] == "completed":
        b = io.StringIO()
        b.write(f"Report on {props.get('Source') or args.source} (job {job_id}):\n")
        nested(result["report"], b, 1)
        page(b.getvalue(), out.pager)
    code = exit_code_for(props["State"])
    if code != ExitCode.SUCCESS:
        raise CtlError(_error_line(props), code)
    return code


COMMANDS: dict[str, Callable[[Client, argparse.Namespace, Output], Awaitable[int]]] = {
    "submit": cmd_submit, "list": cmd_list, "status": cmd_status, "show": cmd_show, "watch": cmd_watch,
    "wait": cmd_wait,
    "cancel": cmd_cancel, "retry": cmd_retry, "remove": cmd_remove, "start": cmd_start, "logs": cmd_logs,
    "events": cmd_events, "queue": cmd_queue, "workers": cmd_workers, "health": cmd_health,
    "inspect": cmd_inspect,
}


# What a command sends that h2kctl reads or checks itself (a job file, flags), as args.request. Built before
# connecting, so that bad input is said as such (exit 2) whether or not h2kd is reachable.
REQUESTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "submit": _submit_spec, "inspect": lambda args: spec_from_args(args, "inspect"), "list": _list_filters,
}


def argument_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """Each argument of the command given by its dest, as the user knows it: its long flag or its metavar."""
    parsers = [parser]
    for dest in ("command", "queue_command"):
        chosen = getattr(args, dest, None)
        subparsers = parsers[-1]._subparsers
        if chosen and subparsers is not None:
            parsers.append(subparsers._group_actions[0].choices[chosen])
    names = {}
    for each in parsers:
        for action in each._actions:
            names[action.dest] = (action.option_strings[-1] if action.option_strings
                                  else action.metavar or action.dest.upper())
    return names


# Arguments read here and never sent: any file name the system takes will do.
_LOCAL_ARGUMENTS = {"file"}


def check_arguments(args: argparse.Namespace, names: dict[str, str]) -> None:
    """Every text argument goes over D-Bus, which carries only UTF-8 strings without NUL: one that is not (a
    file name in another encoding) is bad input, said before anything is sent."""
    for dest, value in vars(args).items():
        if dest in _LOCAL_ARGUMENTS:
            continue
        for text in value if isinstance(value, list) else [value]:
            problem = text_problem(text) if isinstance(text, str) else None
            if problem:
                raise CtlError(f"{names.get(dest, dest)} \"{shown(text)}\" {problem}; h2kd takes only UTF-8 text",
                               ExitCode.USAGE)


async def run(args: argparse.Namespace) -> int:
    out = Output(args)
    check_arguments(args, args.argument_names)
    if args.command in REQUESTS:
        args.request = REQUESTS[args.command](args)
    try:
        async with Client(args.address, ask_password=args.ask_password) as client:
            return await COMMANDS[args.command](client, args, out)
    except CtlError as e:
        # No bus to reach h2kd on: logs only asks h2kd whether it knows the job, and the journal is there anyway.
        if args.command != "logs" or e.code != ExitCode.UNREACHABLE:
            raise
        return logs_without_the_job(args, e)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else argv))
    if getattr(args, "json", False) and not args.has_json_output:   # given before the command
        parser.error(f"{args.command} has no JSON output")
    args.argument_names = argument_names(parser, args)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = TerminalSafe(sys.stdout), TerminalSafe(sys.stderr)
    try:
        code = _run_and_report(args)
    finally:
        sys.stdout, sys.stderr = streams
    if code == ExitCode.INTERRUPTED and argv is None:
        _end_by_sigint()
    return int(code)


def _run_and_report(args: argparse.Namespace) -> int:
    """Run the command; every way it can end is an exit code and at most one line on stderr."""
    try:
        code = asyncio.run(run(args))
        if args.command == "logs":
            command = journalctl_command(args)
            if shutil.which(command[0]) is None:
                raise CtlError("journalctl is not installed")
            sys.stdout.flush()
            os.execvp(command[0], command)
    except CtlError as e:
        _say(e)
        return e.code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        code = ExitCode.INTERRUPTED
    except BrokenPipeError:
        # Output went to a pipe that closed (e.g. `h2kctl list | head`); that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.SUCCESS
    except Exception as e:  # the promise: one line, never a traceback
        print(f"{PROG}: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        if os.environ.get("H2KCTL_DEBUG"):
            raise
        return ExitCode.FAILURE
    return code


def _end_by_sigint() -> None:
    """End the program as Ctrl-C would have, once h2kctl has said what it left running: a shell running h2kctl
    in a loop or a script stops only when its child died of SIGINT; an exit status, even 130, lets it go on."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
