"""Following jobs as they run: progress bars on a terminal, plain lines elsewhere, Ctrl-C detaches.

Job state comes from the bus: PropertiesChanged and the Job signals for one job, ObjectManager
InterfacesAdded/InterfacesRemoved for all of them, with a periodic re-read (ListJobs, then the
properties of the jobs that moved) so that a missed signal never leaves the display stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any, Awaitable, Callable, TextIO, TypeVar

from dbus_fast import Message, unpack_variants

from h2kd import BUS_NAME, MANAGER_PATH
from h2kctl.bus import JOB_EXPLICIT_PROPERTIES, JOB_IFACE, OBJECT_MANAGER_IFACE, PROPS_IFACE, Client
from h2kctl.errors import CtlError, ExitCode, JobHeld, job_arguments
from h2kctl.render import clock, control, human_bytes, human_duration, local_time, single_line

TERMINAL = {"completed", "failed", "cancelled"}
UNDER_WAY = {"assigned", "running", "progressing"}   # shown first when not every job fits the terminal
RESYNC_SECONDS = 1.0          # re-read one followed job at least this often
RESYNC_ALL_SECONDS = 3.0      # re-read all jobs (watch) at least this often
READ_AT_ONCE = 16             # property reads in flight during a re-read
REDRAW_SECONDS = 0.1          # redraw a terminal at most ten times a second
RECONNECT_SECONDS = 120.0     # how long h2kd may stay unreachable (a restart) while jobs are followed
RETRY_FIRST_SECONDS = 0.5     # the first pause before asking an unreachable h2kd again; doubled each time
RETRY_MAX_SECONDS = 5.0

T = TypeVar("T")


def detach_hint(job_id: str) -> str:
    return f"Detached; the job goes on. Cancel it with: h2kctl cancel {job_arguments(job_id)}"


def exit_code_for(state: str) -> ExitCode:
    return {"failed": ExitCode.JOB_FAILED, "cancelled": ExitCode.JOB_CANCELLED}.get(state, ExitCode.SUCCESS)


def final_message(props: dict[str, Any]) -> str:
    """'Job X completed in 5 s: /out/vm.qcow2', 'Job X failed: CODE: message', one line (the paths and the
    message are others' words: a worker's, a guest's)."""
    return single_line(_ending(props))


def _ending(props: dict[str, Any]) -> str:
    job_id, state = props["Id"], props["State"]
    if state == "completed":
        took = ""
        if props.get("StartedAt") and props.get("FinishedAt"):
            took = f" in {human_duration((props['FinishedAt'] - props['StartedAt']) / 1e6)}"
        written = written_paths(props.get("Result"))
        output = f": {', '.join(written)}" if written else (f": {props['Output']}" if props.get("Output") else "")
        return f"Job {job_id} completed{took}{output}"
    code, message = props.get("Error") or ("", "")
    message = (message.strip().splitlines() or [""])[0]   # the rest, if any: see status or logs
    detail = ": " + ": ".join(p for p in (code, message) if p) if code or message else ""
    return f"Job {job_id} {state}{detail}"


def written_paths(result_text: Any) -> list[str]:
    """The files a completed convert wrote (its Output may name only their directory), from its Result."""
    if not isinstance(result_text, str):    # withheld from the caller: another user's job
        return []
    try:
        outputs = json.loads(result_text or "{}").get("outputs") or {}
    except (ValueError, AttributeError):
        return []
    if not isinstance(outputs, dict):
        return []
    disks = [d.get("path") for d in outputs.get("disks") or [] if isinstance(d, dict) and d.get("path")]
    return [str(p) for p in disks + ([outputs["domain_xml"]] if outputs.get("domain_xml") else [])]


def _eta_seconds(props: dict[str, Any]) -> float | None:
    if props.get("ExpectedEndTime"):
        if local_time(props["ExpectedEndTime"]) is None:   # so far ahead that no date holds it: not known
            return None
        return max(0.0, props["ExpectedEndTime"] / 1e6 - time.time())
    rate, done, total = props.get("Rate", 0), props.get("BytesDone", 0), props.get("BytesTotal", 0)
    if rate and total > done:
        return (total - done) / rate
    return None


def activity(props: dict[str, Any]) -> str:
    """What the job is doing, e.g. 'queued', 'progressing (converting)'."""
    state, phase = props.get("State", ""), props.get("Phase", "")
    if state in TERMINAL or not phase:
        return state
    return f"{state} ({phase})"


def bar_line(props: dict[str, Any], width: int, label: bool = False) -> str:
    """One terminal line: [label] activity [#####.....] 45% 1.2 GiB/2.0 GiB 150.0 MiB/s ETA 0:05."""
    known = props.get("ProgressKnown", False)
    fraction = min(max(props.get("Progress", 0.0), 0.0), 1.0)
    done, total, rate = props.get("BytesDone", 0), props.get("BytesTotal", 0), props.get("Rate", 0)
    parts = []
    if known:
        parts.append(f"{fraction * 100:5.1f}%")
    if total:
        parts.append(f"{human_bytes(done)}/{human_bytes(total)}")
    elif done:
        parts.append(human_bytes(done))
    if rate:
        parts.append(f"{human_bytes(rate)}/s")
    eta = _eta_seconds(props) if known and props.get("State") not in TERMINAL else None
    if eta is not None:
        parts.append(f"ETA {clock(eta)}")
    # Escaped before it is measured: the stream's escaping would otherwise lengthen the line past the terminal.
    head = single_line((props.get("Id", "") + " " if label else "") + activity(props))
    tail = " ".join(parts)
    room = width - len(head) - len(tail) - 4
    if known and room >= 10:
        cells = min(room, 40)
        filled = int(round(fraction * cells))
        line = f"{head} [{'#' * filled}{'.' * (cells - filled)}] {tail}"
    else:
        line = f"{head} {tail}".rstrip()
    return line[: max(width - 1, 1)]


def terminal_size(stream: TextIO) -> os.terminal_size:
    """The size of the terminal `stream` writes to (stdout may be redirected while the bar goes to stderr);
    $COLUMNS and $LINES first, as shutil has it, and 80x24 if neither tells."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        size = os.terminal_size((0, 0))
    columns = _positive_env("COLUMNS") or size.columns or 80
    lines = _positive_env("LINES") or size.lines or 24
    return os.terminal_size((columns, lines))


def _positive_env(name: str) -> int:
    try:
        return max(int(os.environ.get(name, "0")), 0)
    except ValueError:
        return 0


# States in which a job has yet to start an attempt: its progress starts over.
NOT_STARTED = {"created", "validated", "queued", "retrying"}


class SteadyProgress:
    """One job's progress as shown: never lower than before within one attempt. h2kd, back from a restart,
    serves the progress it saved at the last whole percent, behind what it had signalled. A new attempt (a retry)
    or a return to the queue (a job interrupted by a reboot) starts over."""

    def __init__(self) -> None:
        self._attempt: tuple[Any, Any] | None = None
        self._progress = 0.0
        self._done = 0

    def __call__(self, props: dict[str, Any]) -> dict[str, Any]:
        attempt = (props.get("Id"), props.get("Attempt"))
        if attempt != self._attempt or props.get("State") in NOT_STARTED:
            self._attempt, self._progress, self._done = attempt, 0.0, 0
        shown = dict(props)
        if props.get("ProgressKnown"):
            self._progress = max(self._progress, float(props.get("Progress", 0.0)))
            shown["Progress"] = self._progress
        if "BytesDone" in props:
            self._done = max(self._done, int(props["BytesDone"]))
            shown["BytesDone"] = self._done
        return shown


class ProgressView:
    """Progress of one job on `stream`: a bar redrawn in place on a terminal, or plain lines
    (one per state or phase change and per 10% step) when the stream is not a terminal."""

    def __init__(self, stream: TextIO | None, tty: bool, label: bool = False):
        self.stream = stream
        self.tty = tty
        self.label = label
        self._drawn = False
        self._last_draw = 0.0
        self._last_key: tuple = ()
        self._last_step = -1
        self._steady = SteadyProgress()

    def update(self, props: dict[str, Any], force: bool = False) -> None:
        if self.stream is None:
            return
        props = self._steady(props)
        if self.tty:
            now = time.monotonic()
            if force or now - self._last_draw >= REDRAW_SECONDS:
                self._last_draw = now
                width = terminal_size(self.stream).columns
                control(self.stream, "\r\x1b[K")
                self.stream.write(bar_line(props, width, self.label))
                self.stream.flush()
                self._drawn = True
            return
        state, phase = props.get("State", ""), props.get("Phase", "")
        key = (state, phase)
        step = int(props.get("Progress", 0.0) * 10) if props.get("ProgressKnown") else -1
        if key != self._last_key or step > self._last_step:
            if key != self._last_key:
                self._last_step = step
            self._last_key = key
            self._last_step = max(self._last_step, step)
            if state not in TERMINAL:
                self.stream.write(self._plain(props) + "\n")
                self.stream.flush()

    def _plain(self, props: dict[str, Any]) -> str:
        text = f"Job {props.get('Id', '')}: {activity(props)}"
        if props.get("ProgressKnown"):
            text += f" {props.get('Progress', 0.0) * 100:.0f}%"
            if props.get("BytesTotal"):
                text += f" ({human_bytes(props.get('BytesDone', 0))}/{human_bytes(props['BytesTotal'])})"
        return text

    def clear(self) -> None:
        if self.stream is not None and self.tty and self._drawn:
            control(self.stream, "\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def message(self, text: str) -> None:
        self.clear()
        if self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()


class CtrlC:
    """Turns SIGINT into an event while following, so Ctrl-C detaches instead of raising (one for all the jobs
    followed at once: a second handler would replace the first)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __enter__(self) -> "CtrlC":
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self.event.set)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)


# What each signal h2kctl acts on carries, as h2kd's interfaces declare it (dbus/*.xml). Only h2kd's own signals
# reach the handlers (Client.on_message), but one of another signature is still no message to act on.
SIGNATURES = {
    (PROPS_IFACE, "PropertiesChanged"): "sa{sv}as",
    (JOB_IFACE, "StateChanged"): "ss",
    (OBJECT_MANAGER_IFACE, "InterfacesAdded"): "oa{sa{sv}}",
    (OBJECT_MANAGER_IFACE, "InterfacesRemoved"): "oas",
}


def well_formed(message: Message) -> bool:
    return SIGNATURES.get((message.interface or "", message.member or "")) == message.signature


class Interrupted(Exception):
    """Ctrl-C was pressed while a call was in flight; the call was abandoned."""


async def unless_interrupted(call: Awaitable[T], interrupt: asyncio.Event | None) -> T:
    """The answer to `call`, or Interrupted as soon as `interrupt` is set, the call abandoned: an h2kd that does
    not answer would otherwise hold Ctrl-C up for as long as a call may take (CALL_TIMEOUT)."""
    if interrupt is None:
        return await call
    answer = asyncio.ensure_future(call)
    pressed = asyncio.ensure_future(interrupt.wait())
    try:
        await asyncio.wait([answer, pressed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        pressed.cancel()
        if not answer.done():
            answer.cancel()
    if answer.done() and not answer.cancelled():
        return answer.result()
    raise Interrupted


async def _wait_any(events: list[asyncio.Event], timeout: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def patiently(client: Client, call: Callable[[], Awaitable[T]], doing: str,
                    interrupt: asyncio.Event | None = None) -> T | None:
    """call(), asked again while h2kd cannot be reached, pausing longer each time, for up to RECONNECT_SECONDS:
    jobs outlive a restart of h2kd, and so does waiting for them. None if `interrupt` is set meanwhile, even
    while a call is in flight. `doing` says what h2kctl was doing, for the error once h2kd stays away too long.
    If h2kd has not answered once in this run, h2kctl says on stderr that it is trying again: a wait for a job
    of an h2kd that is not running would otherwise show nothing for two minutes."""
    delay, gave_up_at = RETRY_FIRST_SECONDS, None
    while True:
        try:
            return await unless_interrupted(call(), interrupt)
        except Interrupted:
            return None
        except CtlError as e:
            # With the bus connection itself gone, no answer can come on it.
            if e.code != ExitCode.UNREACHABLE or not client.connected:
                raise
            now = time.monotonic()
            gave_up_at = gave_up_at or now + RECONNECT_SECONDS
            if now >= gave_up_at:
                went = "come back" if client.answered else "answer"
                raise CtlError(f"h2kd did not {went} within {RECONNECT_SECONDS:.0f} s while {doing}: "
                               f"{e.message}", ExitCode.UNREACHABLE) from None
            if not client.answered and not client.told_unreachable:
                client.told_unreachable = True
                sys.stdout.flush()
                print(f"h2kctl: {e.message}; trying again for up to {human_duration(RECONNECT_SECONDS)} "
                      f"(Ctrl-C to stop)", file=sys.stderr, flush=True)
        pause = min(delay, max(gave_up_at - now, 0.0))
        if interrupt is None:
            await asyncio.sleep(pause)
        else:
            await _wait_any([interrupt], pause)
            if interrupt.is_set():
                return None
        delay = min(delay * 2, RETRY_MAX_SECONDS)


async def follow_job(client: Client, job_id: str, view: ProgressView, path: str | None = None,
                     interrupt: asyncio.Event | None = None) -> dict[str, Any] | None:
    """Follow one job (at `path`, if known) until it ends; return its final properties, or None when the user
    pressed Ctrl-C (the job is left running; the caller says how to cancel it). h2kd may restart meanwhile.
    `interrupt`: the Ctrl-C event of a caller following several jobs at once (CtrlC), else one of its own."""
    doing = f"waiting for job {job_id}"
    changed = asyncio.Event()
    removed = asyncio.Event()
    props: dict[str, Any] = {}
    # Properties a signal set while a read was in flight: the read's answer may be older than the signal.
    fresh: set[str] = set()

    def on_signal(message: Message) -> None:
        if not well_formed(message):
            return
        if message.path == path:
            if message.interface == PROPS_IFACE and message.member == "PropertiesChanged":
                if message.body[0] == JOB_IFACE:
                    values = unpack_variants(message.body[1])
                    props.update(values)
                    fresh.update(values)
            elif message.interface == JOB_IFACE and message.member == "StateChanged":
                props["State"] = message.body[0]
                fresh.add("State")
            changed.set()
        elif (message.path == MANAGER_PATH and message.interface == OBJECT_MANAGER_IFACE
              and message.member == "InterfacesRemoved" and message.body[0] == path):
            removed.set()

    async def read_all(interrupt: asyncio.Event, final: bool = False) -> bool:
        """Read the properties again (keeping what signals said meanwhile), Spec and Result too if `final`
        (GetAll leaves them out); False on Ctrl-C."""
        assert path is not None
        fresh.clear()
        explicit = JOB_EXPLICIT_PROPERTIES if final else ()
        try:
            snapshot = await patiently(client, lambda: client.read_job(path, explicit), doing, interrupt)
        except CtlError as e:
            if e.code == ExitCode.NO_SUCH_JOB and final:
                return True     # removed as soon as it ended (retention, an administrator): its end is known
            if e.code == ExitCode.NO_SUCH_JOB:
                raise CtlError(f"job {job_id} was removed while being followed", ExitCode.NO_SUCH_JOB) from None
            raise
        if snapshot is None:
            return False
        props.update({name: value for name, value in snapshot.items() if name not in fresh})
        return True

    with contextlib.ExitStack() as scope:
        # Ctrl-C is caught from the first call on: h2kd may not answer even the lookup.
        ctrl_c = interrupt or scope.enter_context(CtrlC()).event
        path = path or await patiently(client, lambda: client.get_job_path(job_id), doing, ctrl_c)
        if path is None:
            return None
        rules = [f"type='signal',sender='{BUS_NAME}',path='{path}'",
                 f"type='signal',sender='{BUS_NAME}',path='{MANAGER_PATH}',interface='{OBJECT_MANAGER_IFACE}',"
                 f"member='InterfacesRemoved'"]
        async with client.signals(rules, on_signal):
            read = await read_all(ctrl_c)   # after subscribing, so nothing is missed
            if read and props.get("State") == "validated":
                view.clear()
                raise JobHeld(job_id)
            last_read = time.monotonic()
            while read:
                if props.get("State") in TERMINAL:
                    # The final values: read them once more, so Result and Error are complete.
                    if not await read_all(ctrl_c, final=True):
                        break
                    last_read = time.monotonic()
                    if props.get("State") in TERMINAL:
                        view.update(props, force=True)
                        view.clear()
                        return props
                    # h2kd has it under way again (retried since): what it says now, not the signal, decides.
                view.update(props)
                await _wait_any([changed, ctrl_c, removed], RESYNC_SECONDS)
                if ctrl_c.is_set():
                    break
                if removed.is_set() and props.get("State") not in TERMINAL:    # an ended job is reported
                    view.clear()
                    raise CtlError(f"job {job_id} was removed while being followed", ExitCode.NO_SUCH_JOB)
                changed.clear()
                if time.monotonic() - last_read >= RESYNC_SECONDS:
                    read = await read_all(ctrl_c)
                    last_read = time.monotonic()
            view.clear()
            return None


def _listed_progress(props: dict[str, Any]) -> float:
    """A job's progress as ListJobs gives it: -1 while unknown."""
    return float(props.get("Progress", 0.0)) if props.get("ProgressKnown") else -1.0


async def _read_jobs(client: Client, paths: list[str], jobs: dict[str, dict[str, Any]],
                     fresh: dict[str, set[str]]) -> None:
    """Read these jobs' properties into `jobs`, READ_AT_ONCE calls in flight; a job removed meanwhile is
    dropped. While a job is read, the signal handler notes in fresh[path] the properties it set: those are
    newer than the answer, which does not overwrite them."""
    window = asyncio.Semaphore(READ_AT_ONCE)

    async def read(path: str) -> None:
        async with window:
            fresh[path] = set()
            try:
                snapshot = await client.read_job(path, explicit=())
            except CtlError as e:
                if e.code == ExitCode.UNREACHABLE:
                    raise
                jobs.pop(path, None)
                return
            finally:
                newer = fresh.pop(path, set())
            jobs[path] = {**snapshot, **{name: jobs[path][name] for name in newer if name in jobs.get(path, {})}}
    await asyncio.gather(*(read(p) for p in paths))


async def _read_results(client: Client, paths: list[str], jobs: dict[str, dict[str, Any]]) -> None:
    """The Result of each of the caller's own completed jobs of `paths` not known yet, READ_AT_ONCE at a time, for
    its final message (the files it wrote). Another user's job is not read (it would cost a polkit check each),
    and one gone or unreadable meanwhile is announced without it."""
    window = asyncio.Semaphore(READ_AT_ONCE)
    uid = os.getuid()

    async def read(path: str, props: dict[str, Any]) -> None:
        async with window:
            with contextlib.suppress(CtlError):
                value = await client.get_job_property(path, "Result")
                if jobs.get(path) is props:     # not removed, nor seen anew, meanwhile
                    props["Result"] = value
    await asyncio.gather(*(read(p, jobs[p]) for p in paths
                           if jobs[p].get("State") == "completed" and "Result" not in jobs[p]
                           and (uid == 0 or jobs[p].get("Owner") == uid)))


async def watch_all(client: Client, stream: TextIO, tty: bool, quiet: bool = False) -> None:
    """Show every job's progress until Ctrl-C: a block of bars on a terminal, plain lines otherwise; `quiet`:
    only a line for each job as it ends."""
    tty = tty and not quiet
    jobs: dict[str, dict[str, Any]] = {}
    views: dict[str, ProgressView] = {}
    steady: dict[str, SteadyProgress] = {}     # by path: the bars drawn on a terminal
    changed = asyncio.Event()
    announced: set[str] = set()
    fresh: dict[str, set[str]] = {}   # by path: what signals set while that job is read (see _read_jobs)

    def on_signal(message: Message) -> None:
        if not well_formed(message):
            return
        path = message.path or ""
        if message.interface == PROPS_IFACE and message.member == "PropertiesChanged" and path in jobs:
            if message.body[0] == JOB_IFACE:
                values = unpack_variants(message.body[1])
                for name in message.body[2]:    # named without a value (the Result): read when needed
                    jobs[path].pop(name, None)
                jobs[path].update(values)
                if path in fresh:
                    fresh[path].update(values)
                changed.set()
        elif path == MANAGER_PATH and message.interface == OBJECT_MANAGER_IFACE:
            object_path = message.body[0]
            if message.member == "InterfacesAdded" and JOB_IFACE in message.body[1]:
                jobs[object_path] = unpack_variants(message.body[1][JOB_IFACE])
                changed.set()
            elif message.member == "InterfacesRemoved" and object_path in jobs:
                jobs.pop(object_path, None)
                changed.set()

    async def resync(first: bool) -> None:
        """Bring `jobs` in line with ListJobs, whose rows are small: a job is read in full (Properties.GetAll,
        a few at a time) when it is new to us or its state or progress moved; a job no longer listed is
        dropped. At the first look a finished job is not news and is not read. Whatever signals were
        missed, the display is right after this. (GetManagedObjects would bring every job in full: 13 MB
        with 10,000 jobs, every few seconds.)"""
        (rows,) = await client.manager("ListJobs", "a{sv}", [{}])
        listed: set[str] = set()
        to_read = []
        for job_id, _operation, state, progress, _owner, _priority, _created_at, path in rows:
            listed.add(path)
            known = jobs.get(path)
            if known is None and first and state in TERMINAL:
                jobs[path] = {"Id": job_id, "State": state}     # never shown: only remembered as not news
            elif known is None or known.get("State") != state or _listed_progress(known) != progress:
                to_read.append(path)
        for path in [p for p in jobs if p not in listed]:
            del jobs[path]
        await _read_jobs(client, to_read, jobs, fresh)

    # Ctrl-C is caught before the first look, which may wait on an h2kd that does not answer: it ends the watch
    # the same way (status 0) whenever it comes, and at once even while a call is in flight.
    with CtrlC() as interrupt, contextlib.suppress(Interrupted):
        rule = f"type='signal',sender='{BUS_NAME}',path_namespace='{MANAGER_PATH}'"
        async with client.signals([rule], on_signal):
            await unless_interrupted(resync(first=True), interrupt.event)
            # Jobs already finished when watching starts are not news.
            announced.update(p for p, props in jobs.items() if props.get("State") in TERMINAL)
            block = 0
            last_resync = time.monotonic()
            unreachable_since: float | None = None
            if not tty and not quiet:
                stream.write("Watching all jobs; press Ctrl-C to stop.\n")
                stream.flush()
            while not interrupt.event.is_set():
                width, height = terminal_size(stream)
                finished_now = [p for p, props in jobs.items()
                                if props.get("State") in TERMINAL and p not in announced]
                await unless_interrupted(_read_results(client, finished_now, jobs), interrupt.event)
                # Removed (or replaced by a new job of that id) while the results were read: not finished news now.
                finished_now = [p for p in finished_now if jobs.get(p, {}).get("State") in TERMINAL]
                active = [p for p, props in jobs.items() if props.get("State") not in TERMINAL]
                for p in announced.intersection(active):    # retried (or submitted again under its id): new news
                    announced.discard(p)
                    views.pop(p, None)
                if tty:
                    control(stream, ("\x1b[F" * block if block else "\r") + "\x1b[J")
                    out = ""
                    for p in finished_now:
                        out += final_message(jobs[p]) + "\n"
                    for p in [p for p in steady if p not in jobs]:
                        del steady[p]
                    lines = [bar_line(steady.setdefault(p, SteadyProgress())(jobs[p]), width, label=True)
                             for p in _most_advanced(active, jobs, height - 1)]
                    if len(lines) < len(active):
                        lines.append(f"... and {len(active) - len(lines)} more active jobs (h2kctl list)"[:width - 1])
                    lines = lines or ["No active jobs."]
                    out += "\n".join(lines) + "\n"
                    block = len(lines)
                    stream.write(out)
                else:
                    for p in active if not quiet else ():
                        views.setdefault(p, ProgressView(stream, False)).update(jobs[p])
                    for p in finished_now:
                        stream.write(final_message(jobs[p]) + "\n")
                announced.update(finished_now)
                stream.flush()
                await _wait_any([changed, interrupt.event], RESYNC_ALL_SECONDS)
                changed.clear()
                if time.monotonic() - last_resync >= RESYNC_ALL_SECONDS:
                    try:
                        await unless_interrupted(resync(first=False), interrupt.event)
                        unreachable_since = None
                    except CtlError as e:
                        # h2kd restarting: the jobs go on, and the next re-read shows where they are.
                        if e.code != ExitCode.UNREACHABLE or not client.connected:
                            raise
                        unreachable_since = unreachable_since or time.monotonic()
                        if time.monotonic() - unreachable_since >= RECONNECT_SECONDS:
                            raise CtlError(f"h2kd did not come back within {RECONNECT_SECONDS:.0f} s while "
                                           f"watching jobs: {e.message}", ExitCode.UNREACHABLE) from None
                    last_resync = time.monotonic()
                await asyncio.sleep(REDRAW_SECONDS if tty else 0)


def _most_advanced(active: list[str], jobs: dict[str, dict[str, Any]], rows: int) -> list[str]:
    """The jobs whose bars fit in `rows` terminal lines, one kept for the count of the others: running ones
    first. A block taller than the terminal could not be redrawn in place (the cursor stops at its top)."""
    if len(active) <= rows:
        return active
    running = [p for p in active if jobs[p].get("State") in UNDER_WAY]
    waiting = [p for p in active if jobs[p].get("State") not in UNDER_WAY]
    return (running + waiting)[:max(rows - 1, 0)]


def stream_is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_stream(answer_only: bool, quiet: bool) -> tuple[TextIO | None, bool]:
    """Where progress goes: stdout; when stdout is to hold the answer alone (--json, a report written to a file)
    only stderr and only on a terminal; nowhere with -q."""
    if quiet:
        return None, False
    if answer_only:
        return (sys.stderr, True) if stream_is_tty(sys.stderr) else (None, False)
    return sys.stdout, stream_is_tty(sys.stdout)
