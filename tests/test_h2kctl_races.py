"""h2kctl where timing decides: a job removed between two calls, a snapshot answered after a newer signal.

h2kd cannot be made to lose such races on demand, so here a stand-in owns its name on a private bus and
answers as each test says; h2kctl runs as the installed command, as a user runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest
from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from busclient import open_bus, read_until

H2KCTL = str(Path(sys.executable).parent / "h2kctl")
BUS_NAME = "org.hyper2kvm.h2kd1"
JOB_PATH_PREFIX = "/org/hyper2kvm/h2kd1/job/"
JOB_IFACE = "org.hyper2kvm.h2kd1.Job"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
MiB = 1024 * 1024

Answer = Callable[["FakeH2kd", Message], bool]


def job_props(job_id: str, state: str, progress: float) -> dict[str, Variant]:
    done = int(progress * 100) * MiB
    return {"Id": Variant("s", job_id), "Operation": Variant("s", "convert"), "State": Variant("s", state),
            "Phase": Variant("s", "converting"), "Progress": Variant("d", progress),
            "ProgressKnown": Variant("b", True),
            "BytesDone": Variant("t", done), "BytesTotal": Variant("t", 100 * MiB), "Rate": Variant("t", 0),
            "Error": Variant("(ss)", ["", ""]), "Attempt": Variant("u", 1),
            "Output": Variant("s", f"/var/lib/h2kd/output/{job_id}.qcow2")}


class FakeH2kd:
    """Owns h2kd's name on its own bus and answers each method call with `answer(fake, call)` (True once it
    has replied), or else a Job's Spec and Result with "{}", in a thread of its own; AddMatch and the like go
    to the bus itself."""

    def __init__(self, address: str, answer: Answer):
        self.address = address
        self.answer = answer
        self.calls: list[tuple[str, str]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.bus: MessageBus | None = None

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._connect(), self.loop).result(30)

    async def _connect(self) -> None:
        self.bus = await MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM,
                                    negotiate_unix_fd=True).connect()
        self.bus.add_message_handler(self._on_message)
        await self.bus.request_name(BUS_NAME)

    def _on_message(self, message: Message) -> bool:
        if message.message_type != MessageType.METHOD_CALL:
            return False
        for fd in message.unix_fds:
            os.close(fd)
        self.calls.append((message.member, message.body[0] if message.body else ""))
        if self.answer(self, message):
            return True
        if message.member == "Get" and message.body[:1] == [JOB_IFACE] and message.body[1] in ("Spec", "Result"):
            self.reply(message, "v", [Variant("s", "{}")])   # read one by one, as from h2kd: GetAll has neither
            return True
        self.error(message, "org.freedesktop.DBus.Error.UnknownMethod", f"{message.member} is not faked here")
        return True

    def reply(self, call: Message, signature: str, body: list, after: float = 0.0) -> None:
        self.later(after, Message.new_method_return(call, signature, body))

    def error(self, call: Message, name: str, text: str) -> None:
        self.later(0.0, Message.new_error(call, name, text))

    def object_gone(self, call: Message) -> None:
        """Answer as dbus-fast does at a path where nothing is exported (any more)."""
        self.error(call, "org.freedesktop.DBus.Error.UnknownObject", f"no interfaces at path: {call.path}")

    def properties_changed(self, path: str, values: dict[str, Variant], after: float = 0.0) -> None:
        self.later(after, Message.new_signal(path, PROPS_IFACE, "PropertiesChanged", "sa{sv}as",
                                             [JOB_IFACE, values, []]))

    def later(self, delay: float, message: Message) -> None:
        assert self.bus is not None
        self.loop.call_later(delay, self.bus.send, message)

    def stop(self) -> None:
        if self.bus is not None:
            self.loop.call_soon_threadsafe(self.bus.disconnect)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[str]:
    """A system-type bus of our own that lets anyone own any name; its address."""
    with open_bus(tmp_path) as address:
        yield address


@pytest.fixture
def fake_h2kd(private_bus: str) -> Iterator[Callable[[Answer], FakeH2kd]]:
    started: list[FakeH2kd] = []

    def start(answer: Answer) -> FakeH2kd:
        fake = FakeH2kd(private_bus, answer)
        fake.start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


def h2kctl(address: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LC_ALL": "C.UTF-8", "COLUMNS": "100"}
    return subprocess.run([H2KCTL, "--address", address, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def is_call(message: Message, member: str) -> bool:
    return message.member == member


def test_wait_goes_on_past_a_job_whose_object_is_gone(fake_h2kd, private_bus):
    """GetJob still found the job, but its object was removed before GetAll reached it: that job is said to be
    gone, and the others are still waited for, as when the removal is seen by its signal."""
    def answer(fake: FakeH2kd, call: Message) -> bool:
        if is_call(call, "GetJob"):
            fake.reply(call, "o", [JOB_PATH_PREFIX + call.body[0]])
        elif is_call(call, "GetAll") and call.path.endswith("/gone"):
            fake.object_gone(call)
        elif is_call(call, "GetAll"):
            fake.reply(call, "a{sv}", [job_props("done", "completed", 1.0)])
        else:
            return False
        return True

    fake_h2kd(answer)
    result = h2kctl(private_bus, "wait", "gone", "done")
    assert result.returncode == 7, result
    assert result.stdout.startswith("Job done completed"), result
    assert result.stderr.strip() == "h2kctl: job gone was removed while being followed", result


def test_submit_wait_json_reports_a_job_removed_right_after_it_ended(fake_h2kd, private_bus, tmp_path):
    """A job may be removed (by an administrator, or by retention) once it has ended: what h2kctl followed
    is printed all the same."""
    source = tmp_path / "disk.vmdk"
    source.write_bytes(b"\0" * 4096)
    looked_up: list[str] = []

    def answer(fake: FakeH2kd, call: Message) -> bool:
        if is_call(call, "SubmitJobWithImage"):
            fake.reply(call, "so", ["quick", JOB_PATH_PREFIX + "quick"])
        elif is_call(call, "GetJob") and not looked_up:
            looked_up.append(call.body[0])
            fake.reply(call, "o", [JOB_PATH_PREFIX + call.body[0]])
        elif is_call(call, "GetJob"):   # removed since
            fake.error(call, "org.hyper2kvm.h2kd1.Error.NoSuchJob", f"no such job: {call.body[0]}")
        elif is_call(call, "GetAll"):
            fake.reply(call, "a{sv}", [job_props("quick", "completed", 1.0)])
        else:
            return False
        return True

    fake_h2kd(answer)
    result = h2kctl(private_bus, "submit", "--wait", "--json", str(source), "--no-ask-password")
    assert result.returncode == 0, result
    job = json.loads(result.stdout)
    assert job["id"] == "quick" and job["state"] == "completed" and job["path"] == JOB_PATH_PREFIX + "quick"


def test_wait_reports_a_job_that_ended_and_was_removed_at_once(fake_h2kd, private_bus):
    """The job's end and its removal reach h2kctl together (retention, or an administrator quick with
    `h2kctl remove`): the wait reports how it ended, not that it was removed."""
    path = JOB_PATH_PREFIX + "quick"
    ended: list[bool] = []

    def answer(fake: FakeH2kd, call: Message) -> bool:
        if is_call(call, "GetJob"):
            fake.reply(call, "o", [path])
        elif is_call(call, "GetAll") and not ended:
            ended.append(True)
            fake.reply(call, "a{sv}", [job_props("quick", "progressing", 0.5)])
            fake.properties_changed(path, {"State": Variant("s", "completed"), "Progress": Variant("d", 1.0)},
                                    after=0.3)
            fake.later(0.3, Message.new_signal("/org/hyper2kvm/h2kd1", "org.freedesktop.DBus.ObjectManager",
                                               "InterfacesRemoved", "oas", [path, [JOB_IFACE]]))
        elif call.path == path:     # gone: its object answers nothing any more
            fake.object_gone(call)
        else:
            return False
        return True

    fake_h2kd(answer)
    result = h2kctl(private_bus, "wait", "quick")
    assert result.returncode == 0, result
    assert result.stdout.startswith("Job quick completed"), result
    assert "removed" not in result.stderr, result


def test_a_job_removed_after_its_lookup_is_named_by_its_id(fake_h2kd, private_bus):
    """The message names the job as the user did, not by the escaped label of its object path."""
    def answer(fake: FakeH2kd, call: Message) -> bool:
        if is_call(call, "GetJob"):
            fake.reply(call, "o", [JOB_PATH_PREFIX + "_31st_2dbatch_2dvm"])   # "1st-batch-vm", escaped
        elif is_call(call, "GetAll"):
            fake.object_gone(call)
        else:
            return False
        return True

    fake_h2kd(answer)
    result = h2kctl(private_bus, "status", "1st-batch-vm")
    assert result.returncode == 7, result
    assert result.stderr.strip() == "h2kctl: job 1st-batch-vm no longer exists", result


def test_progress_never_shows_a_snapshot_older_than_a_signal(fake_h2kd, private_bus):
    """The answer to a re-read was made before a change h2kd has signalled since (both reach h2kctl while the
    call is in flight): the signalled, newer values stay; the progress shown never goes back."""
    reads: list[str] = []

    def answer(fake: FakeH2kd, call: Message) -> bool:
        if is_call(call, "GetJob"):
            fake.reply(call, "o", [JOB_PATH_PREFIX + call.body[0]])
        elif is_call(call, "GetAll"):
            reads.append(call.path)
            if len(reads) == 1:
                fake.reply(call, "a{sv}", [job_props("slow", "progressing", 0.1)])
            elif len(reads) == 2:
                newer = job_props("slow", "progressing", 0.6)
                fake.properties_changed(call.path, {k: newer[k] for k in ("Progress", "BytesDone")})
                fake.reply(call, "a{sv}", [job_props("slow", "progressing", 0.3)], after=0.3)
            else:
                fake.reply(call, "a{sv}", [job_props("slow", "completed", 1.0)])
        else:
            return False
        return True

    fake_h2kd(answer)
    result = h2kctl(private_bus, "watch", "slow")
    assert result.returncode == 0, result
    shown = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("Job slow: ")]
    assert shown == ["progressing (converting) 10% (10.0 MiB/100.0 MiB)",
                     "progressing (converting) 60% (60.0 MiB/100.0 MiB)"], result.stdout
    assert result.stdout.splitlines()[-1].startswith("Job slow completed"), result.stdout


class StoppingJob:
    """A running job whose unit takes `stop_seconds` to stop once cancelled, and then ends `outcome`
    (h2kd cancels it, or it completed before the stop reached it)."""

    def __init__(self, job_id: str, outcome: str, stop_seconds: float = 1.0):
        self.job_id, self.outcome, self.stop_seconds = job_id, outcome, stop_seconds
        self.path = JOB_PATH_PREFIX + job_id
        self.state = "progressing"

    def answer(self, fake: FakeH2kd, call: Message) -> bool:
        if is_call(call, "GetJob"):
            fake.reply(call, "o", [self.path])
        elif is_call(call, "GetAll"):
            props = job_props(self.job_id, self.state, 0.5)
            props["Owner"] = Variant("u", os.getuid())
            fake.reply(call, "a{sv}", [props])
        elif is_call(call, "CancelJob"):
            fake.reply(call, "", [])
            fake.loop.call_later(self.stop_seconds, self.end, fake)
        else:
            return False
        return True

    def end(self, fake: FakeH2kd) -> None:
        self.state = self.outcome
        fake.later(0.0, Message.new_signal(self.path, JOB_IFACE, "StateChanged", "ss", [self.outcome, ""]))


def test_cancel_returns_once_the_job_has_ended_not_when_asked(fake_h2kd, private_bus):
    """As systemctl stop: "Cancelled" is said once it is so, and a retry or a look at the output may follow."""
    job = StoppingJob("stopping", "cancelled")
    fake_h2kd(job.answer)
    result = h2kctl(private_bus, "cancel", "stopping", "--no-ask-password")
    assert (result.returncode, result.stdout, result.stderr) == (0, "Cancelled job stopping.\n", "")
    assert job.state == "cancelled"


def test_cancel_says_when_the_job_ended_otherwise(fake_h2kd, private_bus):
    job = StoppingJob("finishing", "completed", stop_seconds=0.2)
    fake_h2kd(job.answer)
    result = h2kctl(private_bus, "cancel", "finishing", "--no-ask-password")
    assert (result.returncode, result.stdout) == (1, ""), result
    assert result.stderr == ("h2kctl: job finishing was not cancelled: it completed before the cancel reached it\n")


def test_cancel_no_block_only_asks(fake_h2kd, private_bus):
    job = StoppingJob("asked", "cancelled", stop_seconds=30)
    fake_h2kd(job.answer)
    result = h2kctl(private_bus, "cancel", "--no-block", "asked", "--no-ask-password", timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (0, "Cancel requested for job asked.\n", "")
    assert job.state == "progressing"


def test_on_a_terminal_only_changes_may_wait_for_a_password(fake_h2kd, private_bus):
    """A call allowed to wait for a password waits up to 5 minutes: a read, which never prompts, must not be one
    (`h2kctl status` against an h2kd that does not answer would hang that long)."""
    import pty

    job = StoppingJob("asked", "cancelled", stop_seconds=60)
    flags: dict[str, bool] = {}

    def answer(fake: FakeH2kd, call: Message) -> bool:
        flags[call.member] = bool(call.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        return job.answer(fake, call)

    fake_h2kd(answer)
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run([H2KCTL, "--address", private_bus, "cancel", "--no-block", "asked"], stdin=terminal,
                                capture_output=True, text=True, timeout=30, env={**os.environ, "LC_ALL": "C.UTF-8"})
    finally:
        os.close(terminal)
        os.close(controller)
    assert result.returncode == 0, result
    assert flags == {"GetJob": False, "GetAll": False, "CancelJob": True}, flags


@pytest.mark.parametrize("columns", [100, 30])
def test_watch_fits_the_terminal_it_draws_on(fake_h2kd, private_bus, columns):
    """30 active jobs on a 12-line terminal: the block redrawn in place is at most 11 lines, none wider than
    the terminal (the cursor cannot go back above the top of the screen, so a taller block, or one with a line
    that wraps, would leave a copy of its top at every redraw); the running jobs are among those shown, and
    the others are counted."""
    import fcntl
    import pty
    import select
    import signal
    import struct
    import termios
    import time

    ids = [f"job{n:02d}" for n in range(30)]
    running = set(ids[25:])   # listed last: they must still be shown first

    def props(job_id: str) -> dict[str, Variant]:
        return job_props(job_id, "progressing" if job_id in running else "queued", 0.5 if job_id in running else 0.0)

    def answer(fake: FakeH2kd, call: Message) -> bool:
        if is_call(call, "ListJobs"):
            rows = [[job_id, "convert", props(job_id)["State"].value, props(job_id)["Progress"].value, 0, 5, 0,
                     JOB_PATH_PREFIX + job_id] for job_id in ids]
            fake.reply(call, "a(sssduuto)", [rows])
        elif is_call(call, "GetAll"):
            fake.reply(call, "a{sv}", [props(call.path.rsplit("/", 1)[1])])
        else:
            return False
        return True

    fake_h2kd(answer)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 12, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    watcher = subprocess.Popen([H2KCTL, "--address", private_bus, "watch"], stdin=terminal, stdout=terminal,
                               stderr=terminal, env={**env, "LC_ALL": "C.UTF-8", "TERM": "xterm"})
    os.close(terminal)
    drawn = b""
    try:
        deadline = time.monotonic() + 30
        while drawn.count(b"\x1b[J") < 3 and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                drawn += os.read(controller, 65536)
        watcher.send_signal(signal.SIGINT)
        watcher.wait(30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        os.close(controller)
    text = drawn.decode("utf-8", "replace")
    blocks = text.split("\x1b[J")[1:-1]    # each complete drawing, between one clearing and the next
    assert blocks, text
    for block in blocks:
        lines = block.replace("\r", "").split("\n")
        assert len(lines) - 1 <= 11, block
        assert all(len(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line)) < columns for line in lines), block
        assert all(f"{job_id}" in block for job_id in running), block
        assert "... and 20 more active jobs (h2kctl list)"[:columns - 1] in block, block


def test_a_bar_on_stderr_fits_the_terminal_stderr_is(fake_h2kd, private_bus):
    """`start --wait --json` with its JSON going to a file draws its bar on stderr, a 30-column terminal: the
    bar is as wide as that terminal allows, not as wide as stdout (not a terminal) would leave it."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    reads: list[str] = []

    def answer(fake: FakeH2kd, call: Message) -> bool:
        if is_call(call, "GetJob"):
            fake.reply(call, "o", [JOB_PATH_PREFIX + call.body[0]])
        elif is_call(call, "StartJob"):
            fake.reply(call, "", [])
        elif is_call(call, "GetAll") and not reads:
            reads.append(call.path)
            fake.reply(call, "a{sv}", [job_props("held", "progressing", 0.5)])
            done = job_props("held", "completed", 1.0)
            fake.properties_changed(call.path, {k: done[k] for k in ("State", "Progress", "BytesDone")}, after=1.5)
        elif is_call(call, "GetAll"):
            fake.reply(call, "a{sv}", [job_props("held", "completed", 1.0)])
        else:
            return False
        return True

    fake_h2kd(answer)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 30, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    starter = subprocess.Popen([H2KCTL, "--address", private_bus, "start", "--wait", "--json", "held"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal,
                               env={**env, "LC_ALL": "C.UTF-8", "TERM": "xterm"})
    os.close(terminal)
    drawn = b""
    try:
        deadline = time.monotonic() + 30
        while starter.poll() is None and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.2)[0]:
                try:
                    drawn += os.read(controller, 65536)
                except OSError:
                    break
        stdout, _ = starter.communicate(timeout=30)
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
        os.close(controller)
    assert starter.returncode == 0, drawn
    assert json.loads(stdout)["state"] == "completed", stdout
    bars = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line) for line in drawn.decode().split("\r")]
    bars = [bar for bar in bars if bar.strip()]
    assert bars and all(0 < len(bar) < 30 for bar in bars), (bars, drawn)


def _interrupted_once_following(address: str, args: list[str], followed: threading.Event,
                                tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """h2kctl ARGS, sent SIGINT (as Ctrl-C sends it) once `followed` is set."""
    import signal
    import time
    env = {**os.environ, "LC_ALL": "C.UTF-8", "COLUMNS": "100"}
    proc = subprocess.Popen([H2KCTL, "--address", address, *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert followed.wait(20), "h2kctl never read the jobs"
        time.sleep(0.5)     # past the read, into the waiting
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _inspect_job_submitted(fake: FakeH2kd, call: Message) -> bool:
    """A stand-in h2kd's answers to GetJob (any id is known) and to inspect's submission (job "looking")."""
    if is_call(call, "GetJob"):
        fake.reply(call, "o", [JOB_PATH_PREFIX + call.body[0]])
    elif is_call(call, "SubmitJobWithImage"):
        fake.reply(call, "so", ["looking", JOB_PATH_PREFIX + "looking"])
    else:
        return False
    return True


def test_ctrl_c_with_json_prints_the_jobs_as_they_are(fake_h2kd, private_bus, tmp_path):
    """Like `submit --wait --json`, `wait --json` and `inspect --json` interrupted by Ctrl-C print what they
    followed as it is then (a script keeps a record of what it left running), and end by SIGINT."""
    import signal
    source = tmp_path / "disk.vmdk"
    source.write_bytes(b"\0" * 512)
    read: set[str] = set()
    followed = threading.Event()

    def answer(fake: FakeH2kd, call: Message) -> bool:
        if _inspect_job_submitted(fake, call):
            pass
        elif is_call(call, "GetAll"):
            job_id = call.path.rsplit("/", 1)[1]
            fake.reply(call, "a{sv}", [job_props(job_id, "completed" if job_id == "done" else "progressing",
                                                 1.0 if job_id == "done" else 0.4)])
            read.add(job_id)
            if read >= {"done", "going"} or "looking" in read:
                followed.set()
        else:
            return False
        return True

    fake_h2kd(answer)
    waited = _interrupted_once_following(private_bus, ["wait", "--json", "done", "going"], followed, tmp_path)
    assert waited.returncode == -signal.SIGINT, waited
    assert [(job["id"], job["state"]) for job in json.loads(waited.stdout)] == [("done", "completed"),
                                                                                ("going", "progressing")], waited
    assert "stopped waiting" in waited.stderr and "Traceback" not in waited.stderr, waited

    followed.clear()
    inspected = _interrupted_once_following(private_bus, ["inspect", "--json", str(source)], followed, tmp_path)
    assert inspected.returncode == -signal.SIGINT, inspected
    shown = json.loads(inspected.stdout)
    assert (shown["job"]["id"], shown["job"]["state"]) == ("looking", "progressing"), inspected
    assert "Detached" in inspected.stderr and "Traceback" not in inspected.stderr, inspected


def signal_to(destination: str, path: str, interface: str, member: str, signature: str, body: list) -> Message:
    """A signal for one connection alone, as any client of the bus may send one."""
    return Message(message_type=MessageType.SIGNAL, destination=destination, path=path, interface=interface,
                   member=member, signature=signature, body=body)


def test_h2kds_signals_are_checked_and_its_last_word_decides(fake_h2kd, private_bus):
    """Signals from h2kd itself that do not carry what their interface declares are ignored, without a
    traceback; a StateChanged saying the job failed, while the re-read that follows finds it queued again (it was
    retried meanwhile), does not end the wait: the job is followed on, to its real end."""
    path = JOB_PATH_PREFIX + "again"
    reads: dict[str, int] = {}

    def answer(fake: FakeH2kd, call: Message) -> bool:
        if is_call(call, "GetJob"):
            fake.reply(call, "o", [path])
        elif is_call(call, "GetAll"):
            reads[call.sender] = seen = reads.get(call.sender, 0) + 1
            state = "progressing" if seen == 1 else "queued" if seen < 4 else "completed"
            fake.reply(call, "a{sv}", [job_props("again", state, 1.0 if state == "completed" else 0.0)])
            if seen == 1:
                for signature, body in (("", []), ("s", ["running"]), ("i", [3])):
                    fake.later(0.2, signal_to(call.sender, path, JOB_IFACE, "StateChanged", signature, body))
                for signature, body in (("", []), ("s", [JOB_IFACE]), ("sa{sv}", [JOB_IFACE, {}])):
                    fake.later(0.2, signal_to(call.sender, path, PROPS_IFACE, "PropertiesChanged", signature, body))
                fake.later(0.2, signal_to(call.sender, "/org/hyper2kvm/h2kd1", "org.freedesktop.DBus.ObjectManager",
                                          "InterfacesRemoved", "", []))
                fake.later(0.4, signal_to(call.sender, path, JOB_IFACE, "StateChanged", "ss",
                                          ["failed", "attempt 1 failed"]))
        else:
            return False
        return True

    fake_h2kd(answer)
    for command in ("wait", "watch"):
        result = h2kctl(private_bus, command, "again")
        assert (result.returncode, result.stderr) == (0, ""), result
        ends = [line for line in result.stdout.splitlines() if line.startswith("Job again ")]
        assert ends and ends[0].startswith("Job again completed") and len(ends) == 1, result.stdout


def test_watch_of_all_jobs_ignores_what_h2kd_sends_malformed(fake_h2kd, private_bus):
    import signal
    import time

    path = JOB_PATH_PREFIX + "listed"
    objects = ("/org/hyper2kvm/h2kd1", "org.freedesktop.DBus.ObjectManager")

    def answer(fake: FakeH2kd, call: Message) -> bool:
        if is_call(call, "ListJobs"):
            fake.reply(call, "a(sssduuto)", [[["listed", "convert", "progressing", 0.5, 0, 5, 0, path]]])
            for signature, body in (("", []), ("s", [JOB_IFACE]), ("sa{sv}", [JOB_IFACE, {}])):
                fake.later(0.5, signal_to(call.sender, path, PROPS_IFACE, "PropertiesChanged", signature, body))
            for member, signature, body in (("InterfacesAdded", "", []), ("InterfacesAdded", "o", [path]),
                                            ("InterfacesRemoved", "o", [path]), ("InterfacesRemoved", "", [])):
                fake.later(0.5, signal_to(call.sender, *objects, member, signature, body))
        elif is_call(call, "GetAll"):
            fake.reply(call, "a{sv}", [job_props("listed", "progressing", 0.5)])
        else:
            return False
        return True

    fake_h2kd(answer)
    watcher = subprocess.Popen([H2KCTL, "--address", private_bus, "watch"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "LC_ALL": "C.UTF-8", "COLUMNS": "100"})
    try:
        time.sleep(2.0)
        assert watcher.poll() is None, watcher.communicate()
        watcher.send_signal(signal.SIGINT)
        stdout, stderr = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert (watcher.returncode, stderr) == (0, ""), (stdout, stderr)
    assert "Job listed: progressing (converting) 50%" in stdout, stdout


def test_following_a_job_while_h2kd_is_not_there_says_it_tries_again(fake_h2kd, private_bus):
    """`wait JOB` and `watch JOB` with no h2kd on the bus: they say at once that they keep trying (for up to two
    minutes: h2kd may be restarting), once, and go on when it comes."""
    env = {**os.environ, "LC_ALL": "C.UTF-8", "COLUMNS": "100"}
    followers = [subprocess.Popen([H2KCTL, "--address", private_bus, command, "late"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for command in ("wait", "watch")]
    try:
        said = [read_until(follower, "\n", timeout=15, stream="stderr") for follower in followers]
        for line in said:
            assert re.fullmatch(r"h2kctl: h2kd is not reachable on .*\(org\.hyper2kvm\.h2kd1: .*\); trying again "
                                r"for up to 2min \(Ctrl-C to stop\)\n", line), line

        def answer(fake: FakeH2kd, call: Message) -> bool:
            if is_call(call, "GetJob"):
                fake.reply(call, "o", [JOB_PATH_PREFIX + "late"])
            elif is_call(call, "GetAll"):
                fake.reply(call, "a{sv}", [job_props("late", "completed", 1.0)])
            else:
                return False
            return True

        fake_h2kd(answer)
        outcomes = [follower.communicate(timeout=30) for follower in followers]
    finally:
        for follower in followers:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
    for follower, line, (stdout, stderr) in zip(followers, said, outcomes):
        assert follower.returncode == 0 and stderr == "", (follower.args, line, stdout, stderr)
        assert stdout.startswith("Job late completed"), (follower.args, stdout)


def _suggested(text: str, after: str) -> list[str]:
    """The h2kctl command a message suggests after `after`, as a shell splits it when it is copied."""
    import shlex
    line = text.split(after, 1)[1].splitlines()[0].split(";")[0].rstrip(".)")
    words = shlex.split(line)
    assert words[0] == "h2kctl", text
    return words[1:]


def test_suggested_commands_work_for_a_job_id_that_begins_with_a_dash(fake_h2kd, private_bus, tmp_path):
    """Job ids that begin with "-" (h2kd took them before it refused them; its store may still hold some): every
    command h2kctl suggests for one puts it after --, so that copied as it is, it acts on the job instead of
    failing on an unknown option."""
    import signal
    from h2kctl.cli import build_parser, normalize_argv

    source = tmp_path / "disk.vmdk"
    source.write_bytes(b"\0" * 512)
    followed = threading.Event()
    submitted: list[str] = []

    def answer(fake: FakeH2kd, call: Message) -> bool:
        if is_call(call, "GetJob") and call.body[0] == "-held" and not submitted:
            fake.error(call, "org.hyper2kvm.h2kd1.Error.NoSuchJob", "no job with id '-held'")
        elif is_call(call, "GetJob"):
            fake.reply(call, "o", [JOB_PATH_PREFIX + call.body[0].lstrip("-")])
        elif is_call(call, "SubmitJobWithImage"):
            submitted.append("-held")
            fake.reply(call, "so", ["-held", JOB_PATH_PREFIX + "held"])
        elif is_call(call, "GetAll"):
            job_id = "-" + call.path.rsplit("/", 1)[1]
            fake.reply(call, "a{sv}", [job_props(job_id, "validated" if job_id == "-held" else "progressing", 0.4)])
            if job_id == "-running":
                followed.set()
        else:
            return False
        return True

    fake_h2kd(answer)
    parser = build_parser()

    def parsed(words: list[str]) -> list[str]:
        args = parser.parse_args(normalize_argv(words))
        return args.jobs if hasattr(args, "jobs") else [args.job]

    stored = h2kctl(private_bus, "submit", "--no-queue", "--id=-held", str(source))
    assert stored.returncode == 0, stored
    assert parsed(_suggested(stored.stdout, "start it with: ")) == ["-held"], stored.stdout

    held = h2kctl(private_bus, "wait", "--", "-held")
    assert held.returncode == 2, held
    assert parsed(_suggested(held.stderr, "start it with: ")) == ["-held"], held.stderr

    for command in ("watch", "wait"):
        followed.clear()
        stopped = _interrupted_once_following(private_bus, [command, "--", "-running"], followed, tmp_path)
        assert stopped.returncode == -signal.SIGINT, stopped
        words = _suggested(stopped.stderr, "ancel it with: ")
        assert words[0] == "cancel" and parsed(words) == ["-running"], stopped.stderr


def _fake_journalctl(tmp_path: Path) -> dict[str, str]:
    """An environment in which journalctl says how it was run, and exits with status 3."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    journalctl = bin_dir / "journalctl"
    journalctl.write_text('#!/bin/sh\necho "journalctl $*"\nexit 3\n')
    journalctl.chmod(0o755)
    return {**os.environ, "LC_ALL": "C.UTF-8", "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_logs_show_the_journal_of_a_job_h2kd_no_longer_knows_or_while_it_is_away(fake_h2kd, private_bus, tmp_path):
    """The journal keeps a job's lines after h2kd has forgotten the job (removed, retention) and while h2kd is not
    running: logs says so on one line, then shows them, with journalctl's exit status."""
    env = _fake_journalctl(tmp_path)

    def logs(address: str, job_id: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([H2KCTL, "--address", address, "logs", "--no-pager", "--", job_id], env=env,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    nothing = f"unix:path={tmp_path}/no-bus"
    for address in (private_bus, nothing):     # nobody owns h2kd's name; no bus at all
        away = logs(address, "-away")
        assert (away.returncode, away.stdout) == (3, "journalctl H2K_JOB_ID=-away _UID=0 --no-pager\n"), away
        assert len(away.stderr.splitlines()) == 1, away.stderr
        assert away.stderr.startswith("h2kctl: ") and "showing the journal of job -away" in away.stderr, away.stderr

    def answer(fake: FakeH2kd, call: Message) -> bool:
        if is_call(call, "GetJob") and call.body[0] == "known":
            fake.reply(call, "o", [JOB_PATH_PREFIX + "known"])
        elif is_call(call, "Get") and call.body[1] == "CreatedAt":
            fake.reply(call, "v", [Variant("t", 1715076672_123456)])
        elif is_call(call, "GetJob"):
            fake.error(call, "org.hyper2kvm.h2kd1.Error.NoSuchJob", f"no job with id {call.body[0]!r}")
        else:
            return False
        return True

    fake_h2kd(answer)
    gone = logs(private_bus, "gone")
    assert (gone.returncode, gone.stdout) == (3, "journalctl H2K_JOB_ID=gone _UID=0 --no-pager\n"), gone
    assert gone.stderr == ("h2kctl: h2kd does not know job gone (removed, or never submitted); showing its journal "
                           "all the same\n"), gone.stderr
    known = logs(private_bus, "known")
    # From the job's creation on: an earlier job of that id (removed since) is another job.
    assert (known.returncode, known.stdout, known.stderr) == (
        3, "journalctl H2K_JOB_ID=known _UID=0 --since=@1715076672 --no-pager\n", ""), known
    # Not with -n or -f: journalctl would show the first lines after --since, not the last.
    last = subprocess.run([H2KCTL, "--address", private_bus, "logs", "--no-pager", "-n", "3", "known"], env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert (last.returncode, last.stdout) == (3, "journalctl H2K_JOB_ID=known _UID=0 -n 3 --no-pager\n"), last


def test_status_of_a_job_whose_times_are_at_h2kds_cap(fake_h2kd, private_bus):
    """h2kd caps its times at 2**63-1 microseconds (an expected end when the rate is next to nothing): status
    shows such a time as not known, as it shows 0, instead of failing."""
    capped = 2**63 - 1

    def answer(fake: FakeH2kd, call: Message) -> bool:
        if is_call(call, "GetJob"):
            fake.reply(call, "o", [JOB_PATH_PREFIX + "slow"])
        elif is_call(call, "GetAll"):
            props = job_props("slow", "progressing", 0.5)
            props.update({"Rate": Variant("t", 1), "ExpectedEndTime": Variant("t", capped),
                          "CreatedAt": Variant("t", 1715076672 * 10**6), "StartedAt": Variant("t", capped)})
            fake.reply(call, "a{sv}", [props])
        elif is_call(call, "GetEvents"):
            fake.reply(call, "a(ttss)", [[]])
        else:
            return False
        return True

    fake_h2kd(answer)
    result = h2kctl(private_bus, "status", "--no-pager", "slow")
    assert (result.returncode, result.stderr) == (0, ""), result
    fields = dict(re.findall(r"^\s*(\w+): (.*)$", result.stdout, re.M))
    assert fields["State"] == "progressing (converting)", result.stdout
    assert fields["Started"] == "n/a", result.stdout
    assert fields["Progress"] == "50% (50.0 MiB of 100.0 MiB), 1 B/s", result.stdout
    assert fields["Created"].startswith(("Mon 2024-05-06 ", "Tue 2024-05-07 ")), result.stdout


def test_ctrl_c_during_inspect_says_the_cancel_was_requested(fake_h2kd, private_bus, tmp_path):
    """The job may still complete once CancelJob has answered: h2kctl says that it asked, not that it is done."""
    import signal
    source = tmp_path / "disk.vmdk"
    source.write_bytes(b"\0" * 512)
    followed = threading.Event()
    cancelled: list[str] = []

    def answer(fake: FakeH2kd, call: Message) -> bool:
        if _inspect_job_submitted(fake, call):
            pass
        elif is_call(call, "GetAll"):
            fake.reply(call, "a{sv}", [job_props("looking", "progressing", 0.4)])
            followed.set()
        elif is_call(call, "CancelJob"):
            cancelled.append(call.body[0])
            fake.reply(call, "", [])
        else:
            return False
        return True

    fake_h2kd(answer)
    inspected = _interrupted_once_following(private_bus, ["inspect", "--no-ask-password", str(source)], followed,
                                            tmp_path)
    assert inspected.returncode == -signal.SIGINT, inspected
    assert cancelled == ["looking"]
    assert inspected.stderr.splitlines()[-1] == "Cancel requested for inspect job looking.", inspected.stderr
    assert "Cancelled" not in inspected.stderr, inspected.stderr


def test_a_wait_reason_cannot_add_lines_to_the_queue_shown(fake_h2kd, private_bus):
    """A wait reason quotes a submitter's capability requirement: its line breaks are shown escaped, not as lines
    of the listing."""
    forged = "no worker offers site=x\nPaused: yes\n  vm-42: queue is paused"

    def answer(fake: FakeH2kd, call: Message) -> bool:
        if not is_call(call, "GetQueueStats"):
            return False
        fake.reply(call, "a{sv}", [{
            "queued": Variant("u", 1), "running": Variant("u", 0), "paused": Variant("b", False),
            "max_parallel_jobs": Variant("u", 2), "by_priority": Variant("au", [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]),
            "waiting": Variant("a{ss}", {"vm-7": forged})}])
        return True
    fake_h2kd(answer)
    shown = h2kctl(private_bus, "queue")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines.count("Paused: no") == 1 and "Paused: yes" not in lines, lines
    assert lines[-1].startswith("  vm-7: no worker offers site=x\\nPaused: yes\\n  vm-42"), lines
