"""Authorization and file access as real unprivileged users see it.

Users are created for these tests (h2kt-alice and h2kt-carol in group h2k, h2kt-bob outside it)
and removed afterwards. polkit answers come from a real polkitd on the private stack, with our
actions and the example rules file (group h2k may submit and cancel its own jobs); a polkitd that
hangs is played by python-dbusmock on a bus of its own. File checks run as those users too.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from images import disk_difference
from h2kd import BUS_NAME, JOB_PATH_PREFIX, MANAGER_PATH
from h2kd.access import (caller_groups, check_image_writable, check_output_allowed, check_source_fd,
                         check_source_readable)
from h2kd.bus.auth import (
    ACTION_CANCEL,
    ACTION_CANCEL_OTHER_USER,
    ACTION_FIX_GUEST,
    ACTION_MANAGE,
    ACTION_READ_OTHER_USER,
    ACTION_REGISTER_WORKER,
    ACTION_SUBMIT,
    Authority,
)
from h2kd.errors import AlreadyExists, InteractiveAuthorizationRequired, InvalidArgument, NotAuthorized

GROUP = "h2k"
ALICE, CAROL, BOB = "h2kt-alice", "h2kt-carol", "h2kt-bob"
MANAGER_IFACE = BUS_NAME + ".Manager"
JOB_IFACE = BUS_NAME + ".Job"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
INTERACTIVE_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
ALL_ACTIONS = (ACTION_SUBMIT, ACTION_CANCEL, ACTION_CANCEL_OTHER_USER, ACTION_MANAGE, ACTION_REGISTER_WORKER,
               ACTION_FIX_GUEST, ACTION_READ_OTHER_USER)


# ---- users, directories, processes -------------------------------------------------------------

def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, pwd.struct_passwd]]:
    """alice and carol in group h2k, bob not; removed (with their homes) at the end."""
    created_group = _run("getent", "group", GROUP, check=False).returncode != 0
    if created_group:
        _run("groupadd", GROUP)
    memberships = {ALICE: ["-G", GROUP], CAROL: ["-G", GROUP], BOB: []}
    try:
        for name, groups in memberships.items():
            _run("userdel", "-r", name, check=False)  # left over from an interrupted run
            _run("useradd", "--create-home", "--shell", "/usr/sbin/nologin", *groups, name)
        yield {name: pwd.getpwnam(name) for name in memberships}
    finally:
        for name in memberships:
            _run("userdel", "-r", name, check=False)
        if created_group:
            _run("groupdel", GROUP, check=False)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A scratch directory every user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="h2kt-auth-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _owned_by(path: Path, user: pwd.struct_passwd, mode: int) -> Path:
    os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(mode)
    return path


def _image(path: Path, mode: int = 0o644, user: pwd.struct_passwd | None = None) -> Path:
    path.write_bytes(os.urandom(64 * 1024))
    path.chmod(mode)
    if user is not None:
        _owned_by(path, user, mode)
    return path


async def _call(bus: MessageBus, destination: str, path: str, interface: str, member: str,
                signature: str = "", body: list | None = None) -> Message:
    return await bus.call(Message(destination=destination, path=path, interface=interface, member=member,
                                  signature=signature, body=body or []))


async def _unique_name_of(address: str, pid: int, timeout: float = 10.0) -> str:
    """The unique bus name of the connection that process `pid` opened on the bus at `address`."""
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            names = (await _call(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                 "ListNames")).body[0]
            for name in (n for n in names if n.startswith(":")):
                reply = await _call(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                    "GetConnectionUnixProcessID", "s", [name])
                if reply.message_type == MessageType.METHOD_RETURN and reply.body[0] == pid:
                    return name
            await asyncio.sleep(0.05)
    finally:
        bus.disconnect()
    raise AssertionError(f"process {pid} did not connect to {address}")


@contextlib.contextmanager
def bus_peer(user: pwd.struct_passwd, address: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A process of `user` (with the user's groups) that stays connected to the bus; yields its
    unique name, the subject polkit will be asked about."""
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--",
         "gdbus", "monitor", "--system", "--dest", "org.freedesktop.DBus"],
        env={"PATH": os.environ["PATH"], "DBUS_SYSTEM_BUS_ADDRESS": address},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield asyncio.run(_unique_name_of(address, proc.pid)), proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=10)


async def _outcome(authority: Authority, sender: str, action: str, interactive: bool) -> str:
    try:
        await authority.check(sender, action, interactive)
    except InteractiveAuthorizationRequired:
        return "interactive-required"
    except NotAuthorized:
        return "denied"
    return "allowed"


def _gid(group: str) -> int:
    return grp.getgrnam(group).gr_gid


def _stack_address(stack) -> str:
    return stack.env()["DBUS_SYSTEM_BUS_ADDRESS"]


# ---- the policy, asked through Authority of a real polkitd ------------------------------------

@pytest.mark.stack
def test_caller_identity_is_read_from_the_bus(stack, users):
    alice = users[ALICE]
    address = _stack_address(stack)
    with bus_peer(alice, address) as (name, proc):
        async def main() -> None:
            bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
            authority = Authority(bus, timeout=5)
            credentials = await authority.caller_credentials(name)
            assert await authority.caller_uid(name) == alice.pw_uid
            assert await authority.caller_pid(name) == proc.pid
            assert set(credentials.gids) >= {alice.pw_gid, _gid(GROUP)}
            assert await authority.caller_uid(bus.unique_name) == 0
            bus.disconnect()
        asyncio.run(main())


@pytest.mark.stack
def test_policy_for_group_members_outsiders_and_root(stack, users):
    """Group h2k may submit without a password, and anyone may cancel, retry or start their own jobs;
    everything else needs an administrator: without the interactive flag polkit asks for interaction
    (a challenge); with it, and no authentication agent, polkit says no."""
    address = _stack_address(stack)
    with bus_peer(users[ALICE], address) as (alice, _), bus_peer(users[BOB], address) as (bob, _):
        async def main() -> dict[tuple[str, str, bool], str]:
            bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
            authority = Authority(bus, timeout=10)
            callers = {"alice": alice, "bob": bob, "root": bus.unique_name}
            keys = [(who, action, interactive) for who in callers for action in ALL_ACTIONS
                    for interactive in (False, True)]
            # All at once: each check is its own coroutine and none waits for another.
            outcomes = await asyncio.gather(*(_outcome(authority, callers[w], a, i) for w, a, i in keys))
            bus.disconnect()
            return dict(zip(keys, outcomes))
        outcomes = asyncio.run(main())

    def expected(who: str, action: str, interactive: bool) -> str:
        if who == "root" or action == ACTION_CANCEL or (who == "alice" and action == ACTION_SUBMIT):
            return "allowed"
        return "denied" if interactive else "interactive-required"
    wrong = {key: got for key, got in outcomes.items() if got != expected(*key)}
    assert not wrong, f"unexpected polkit outcomes: {wrong}"


@pytest.mark.stack
def test_job_control_depends_on_who_owns_the_job(stack, users):
    address = _stack_address(stack)
    alice_uid, carol_uid = users[ALICE].pw_uid, users[CAROL].pw_uid
    with bus_peer(users[ALICE], address) as (alice, _):
        async def main() -> None:
            bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
            authority = Authority(bus, timeout=10)
            await authority.check_job_control(alice, alice_uid, allow_interactive=False)
            with pytest.raises(InteractiveAuthorizationRequired, match="another user's job"):
                await authority.check_job_control(alice, carol_uid, allow_interactive=False)
            with pytest.raises(NotAuthorized, match="Not authorized to cancel, retry or start another user's job"):
                await authority.check_job_control(alice, carol_uid, allow_interactive=True)
            await authority.check_job_control(bus.unique_name, carol_uid, allow_interactive=False)
            bus.disconnect()
        asyncio.run(main())


@pytest.mark.stack
def test_credentials_are_forgotten_when_the_caller_leaves(stack, users):
    address = _stack_address(stack)
    with bus_peer(users[BOB], address) as (bob, proc):
        async def main() -> None:
            bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
            authority = Authority(bus, timeout=5)
            assert await authority.caller_uid(bob) == users[BOB].pw_uid
            assert bob in authority.cached_names()
            proc.terminate()
            deadline = time.monotonic() + 5
            while bob in authority.cached_names() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert bob not in authority.cached_names()
            # A name that is gone cannot be authorized (unique names are never reused).
            with pytest.raises(NotAuthorized, match="cannot identify the caller"):
                await authority.check(bob, ACTION_SUBMIT, False)
            await authority.close()
            bus.disconnect()
        asyncio.run(main())


# ---- polkit missing or hanging (python-dbusmock on a bus of its own) ---------------------------

MOCK_IFACE = "org.freedesktop.DBus.Mock"
POLKIT = ("org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority")


@pytest.fixture
def mock_system_bus(shared_dir: Path) -> Iterator[str]:
    """A private system-type bus, open to every user, with nothing on it yet."""
    socket_path = shared_dir / "mock_system_bus"
    config = shared_dir / "mock_system_bus.conf"
    config.write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket_path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
""")
    daemon = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline(), "dbus-daemon did not start"
        socket_path.chmod(0o666)
        yield f"unix:path={socket_path}"
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


@pytest.fixture
def mock_polkit(mock_system_bus: str) -> Iterator[str]:
    """python-dbusmock's polkitd template serving org.freedesktop.PolicyKit1 on mock_system_bus."""
    proc = subprocess.Popen([sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"],
                            env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": mock_system_bus},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async def wait_for_polkit() -> None:
            bus = await MessageBus(bus_address=mock_system_bus, bus_type=BusType.SYSTEM).connect()
            try:
                for _ in range(200):
                    reply = await _call(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                        "org.freedesktop.DBus", "NameHasOwner", "s", [POLKIT[0]])
                    if reply.body[0]:
                        return
                    assert proc.poll() is None, "dbusmock exited"
                    await asyncio.sleep(0.05)
                raise AssertionError("dbusmock's polkitd did not appear")
            finally:
                bus.disconnect()
        asyncio.run(wait_for_polkit())
        yield mock_system_bus
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _control_mock(bus: MessageBus, member: str, signature: str = "", body: list | None = None) -> list:
    reply = await _call(bus, POLKIT[0], POLKIT[1], MOCK_IFACE, member, signature, body)
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    return reply.body


async def _hang_submit_allow_cancel(bus: MessageBus) -> None:
    """The mock never answers checks of ...submit, allows ...cancel and refuses the rest."""
    await _control_mock(bus, "SimulateHangActions", "as", [[ACTION_SUBMIT]])
    await _control_mock(bus, "SetAllowed", "as", [[ACTION_CANCEL]])
    await _control_mock(bus, "AddMethod", "sssss",
                        ["org.freedesktop.PolicyKit1.Authority", "CancelCheckAuthorization", "s", "", ""])


def test_missing_polkit_denies_at_once(mock_system_bus, users):
    with bus_peer(users[ALICE], mock_system_bus) as (alice, _):
        async def main() -> None:
            bus = await MessageBus(bus_address=mock_system_bus, bus_type=BusType.SYSTEM).connect()
            authority = Authority(bus, timeout=10)
            started = time.monotonic()
            with pytest.raises(NotAuthorized, match="authorization service unavailable"):
                await authority.check(alice, ACTION_SUBMIT, False)
            assert time.monotonic() - started < 5, "an absent polkit must not cost the timeout"
            await authority.check(bus.unique_name, ACTION_SUBMIT, False)  # root needs no polkit
            bus.disconnect()
        asyncio.run(main())


def test_a_caller_that_left_the_bus_is_known_gone(mock_system_bus):
    """What RegisterWorker asks once polkit has answered: a worker agent that disconnected meanwhile is not
    kept as a worker for ever (its NameOwnerChanged came before there was a worker to lose)."""
    async def main() -> None:
        bus = await MessageBus(bus_address=mock_system_bus, bus_type=BusType.SYSTEM).connect()
        staying = await MessageBus(bus_address=mock_system_bus, bus_type=BusType.SYSTEM).connect()
        leaving = await MessageBus(bus_address=mock_system_bus, bus_type=BusType.SYSTEM).connect()
        authority = Authority(bus, timeout=10)
        gone = leaving.unique_name
        assert await authority.connected(gone)
        leaving.disconnect()
        await leaving.wait_for_disconnect()
        for _ in range(100):
            if not await authority.connected(gone):
                break
            await asyncio.sleep(0.05)
        assert not await authority.connected(gone)
        assert await authority.connected(staying.unique_name)
        staying.disconnect()
        bus.disconnect()
    asyncio.run(main())


def test_hung_polkit_denies_within_the_timeout_while_other_checks_are_served(mock_polkit, users):
    timeout = 5.0   # long enough for the other checks to be served first on a loaded machine
    with bus_peer(users[ALICE], mock_polkit) as (alice, _), bus_peer(users[BOB], mock_polkit) as (bob, _):
        async def main() -> None:
            bus = await MessageBus(bus_address=mock_polkit, bus_type=BusType.SYSTEM).connect()
            await _hang_submit_allow_cancel(bus)
            authority = Authority(bus, timeout=timeout)
            started = time.monotonic()
            hung = asyncio.ensure_future(authority.check(alice, ACTION_SUBMIT, False))
            await asyncio.sleep(0.2)
            # While alice's check hangs, other callers' checks are answered as usual.
            await authority.check(bob, ACTION_CANCEL, False)
            # h2kd's words, then the action's id, for programs and for an administrator's polkit rule
            refusal = r"Not authorized to manage the conversion queue \(polkit action org\.hyper2kvm\.h2kd1\.manage\)$"
            with pytest.raises(NotAuthorized, match=refusal):
                await authority.check(bob, ACTION_MANAGE, True)
            await authority.check(bus.unique_name, ACTION_SUBMIT, False)
            assert not hung.done(), "the hung check ended before the others were served"
            assert time.monotonic() - started < timeout
            with pytest.raises(NotAuthorized, match="authorization service unavailable"):
                await hung
            elapsed = time.monotonic() - started
            assert timeout <= elapsed < timeout + 3.0
            # The abandoned check is cancelled at polkit, with the id it was started with.
            calls: list = []
            for _ in range(100):
                (calls,) = await _control_mock(bus, "GetMethodCalls", "s", ["CancelCheckAuthorization"])
                if calls:
                    break
                await asyncio.sleep(0.05)
            assert len(calls) == 1 and calls[0][1][0].value.startswith("h2kd-")
            bus.disconnect()
        asyncio.run(main())


def test_one_users_flood_of_checks_waits_its_turn_and_leaves_room_for_the_others(mock_polkit, users):
    """A user may have only so many checks at polkit at once, and only so many more waiting for a turn: the
    rest are refused at once. Another user's checks are answered meanwhile."""
    timeout = 4.0
    with bus_peer(users[ALICE], mock_polkit) as (alice, _), bus_peer(users[BOB], mock_polkit) as (bob, _):
        async def main() -> None:
            bus = await MessageBus(bus_address=mock_polkit, bus_type=BusType.SYSTEM).connect()
            await _hang_submit_allow_cancel(bus)
            authority = Authority(bus, timeout=timeout, per_user=2, waiting_per_user=3, in_flight=3)
            flood = [asyncio.ensure_future(authority.check(alice, ACTION_SUBMIT, False)) for _ in range(5)]
            await asyncio.sleep(0.3)
            started = time.monotonic()
            with pytest.raises(NotAuthorized, match=r"has 5 authorization checks under way; try again"):
                await authority.check(alice, ACTION_SUBMIT, False)
            await authority.check(bob, ACTION_CANCEL, False)
            assert time.monotonic() - started < 2.0
            (asked,) = await _control_mock(bus, "GetMethodCalls", "s", ["CheckAuthorization"])
            assert [call[1][1].value for call in asked].count(ACTION_SUBMIT) == 2   # the other three wait their turn
            assert not any(check.done() for check in flood)
            results = await asyncio.gather(*flood, return_exceptions=True)
            assert all(isinstance(r, NotAuthorized) and "authorization service unavailable" in str(r)
                       for r in results), results
            bus.disconnect()
        asyncio.run(main())


# ---- through h2kd, as the users call it --------------------------------------------------------

def _spec(job_id: str, image: Path) -> str:
    return (f"{{'job_id': <'{job_id}'>, 'operation': <'inspect'>, "
            f"'image': <{{'path': <'{image}'>}}>}}")


# queue=false keeps a job "validated" until StartJob, so no runner can finish it under the test.
HOLD = "{'queue': <false>}"


def _gdbus(stack, user: str | None, path: str, method: str, *args: str,
           interactive: bool = False) -> subprocess.CompletedProcess[str]:
    argv = ["gdbus", "call", "--system", "--dest", BUS_NAME, "--object-path", path, "--method", method,
            *(["--interactive"] if interactive else []), "--", *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, env={**os.environ, **stack.env()}, capture_output=True, text=True, timeout=60)


def _error_name(result: subprocess.CompletedProcess[str]) -> str | None:
    if result.returncode == 0:
        return None
    found = re.search(r"GDBus\.Error:([\w.]+):", result.stderr)
    return found.group(1) if found else f"(no D-Bus error) {result.stderr.strip()}"


def _job_property(stack, job_path: str, name: str) -> str:
    result = _gdbus(stack, None, job_path, "org.freedesktop.DBus.Properties.Get", JOB_IFACE, name)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _state_reasons(stack, job_path: str) -> list[str]:
    """The reasons of the job's state changes, from GetEvents, oldest first."""
    result = subprocess.run(["busctl", "--system", "--json=short", "call", BUS_NAME, job_path, JOB_IFACE, "GetEvents",
                             "t", "0"], env={**os.environ, **stack.env()}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (events,) = json.loads(result.stdout)["data"]
    return [json.loads(data)["reason"] for _seq, _time, kind, data in events if kind == "state"]


def _job_path(stack, job_id: str) -> str | None:
    result = _gdbus(stack, None, MANAGER_PATH, MANAGER_IFACE + ".GetJob", job_id)
    if result.returncode != 0:
        assert _error_name(result) == BUS_NAME + ".Error.NoSuchJob", result.stderr
        return None
    found = re.search(r"objectpath '([^']+)'", result.stdout)
    assert found and found.group(1).startswith(JOB_PATH_PREFIX), result.stdout
    return found.group(1)


@pytest.fixture
def submitted(stack) -> Iterator[list[str]]:
    """Ids of the jobs a test submitted; removed afterwards so the shared stack holds none of them."""
    job_ids: list[str] = []
    yield job_ids
    for job_id in job_ids:
        _gdbus(stack, None, MANAGER_PATH, MANAGER_IFACE + ".CancelJob", job_id)  # held jobs end first
        removed = _gdbus(stack, None, MANAGER_PATH, MANAGER_IFACE + ".RemoveJob", job_id)
        assert _error_name(removed) in (None, BUS_NAME + ".Error.NoSuchJob"), removed.stderr


def _submit(stack, submitted: list[str], user: str | None, image: Path,
            interactive: bool = False) -> tuple[str, subprocess.CompletedProcess[str]]:
    job_id = f"h2kt-{uuid.uuid4().hex[:12]}"
    submitted.append(job_id)
    return job_id, _gdbus(stack, user, MANAGER_PATH, MANAGER_IFACE + ".SubmitJob", _spec(job_id, image), HOLD,
                          interactive=interactive)


@pytest.fixture
def readable_image(shared_dir: Path) -> Path:
    return _image(shared_dir / "disk.img", 0o644)


@pytest.mark.stack
def test_outsider_cannot_submit_and_nothing_is_queued(stack, users, readable_image, submitted):
    for interactive, expected in ((False, INTERACTIVE_REQUIRED), (True, ACCESS_DENIED)):
        job_id, result = _submit(stack, submitted, BOB, readable_image, interactive=interactive)
        assert _error_name(result) == expected, result.stderr
        assert _job_path(stack, job_id) is None
    listed = _gdbus(stack, None, MANAGER_PATH, MANAGER_IFACE + ".ListJobs",
                    f"{{'owner': <uint32 {users[BOB].pw_uid}>}}")
    assert listed.returncode == 0, listed.stderr
    assert "h2kt-" not in listed.stdout


@pytest.mark.stack
def test_member_submits_and_cancels_own_job(stack, users, readable_image, submitted):
    job_id, result = _submit(stack, submitted, ALICE, readable_image)
    assert result.returncode == 0, result.stderr
    job_path = _job_path(stack, job_id)
    assert job_path is not None
    assert _job_property(stack, job_path, "Owner") == f"(<uint32 {users[ALICE].pw_uid}>,)"
    cancel = _gdbus(stack, ALICE, MANAGER_PATH, MANAGER_IFACE + ".CancelJob", job_id)
    assert cancel.returncode == 0, cancel.stderr
    assert _job_property(stack, job_path, "State") == "(<'cancelled'>,)"


@pytest.mark.stack
def test_a_member_holds_at_most_max_jobs_per_user_unfinished_jobs(stack, users, readable_image, submitted):
    """One member of the submitting group cannot make root's daemon keep jobs without bound (held jobs never
    end on their own): beyond the limit, QueueFull says why, and nothing is created. Root is not limited."""
    before = dict(stack.daemon_env)
    stack.restart_daemon({**before, "H2KD_MAX_JOBS_PER_USER": "2"})
    try:
        held = []
        for _ in range(2):
            job_id, result = _submit(stack, submitted, ALICE, readable_image)
            assert result.returncode == 0, result.stderr
            held.append(job_id)
        job_id, result = _submit(stack, submitted, ALICE, readable_image)
        assert _error_name(result) == BUS_NAME + ".Error.QueueFull", result.stderr
        assert "already has 2 unfinished jobs" in result.stderr and "max_jobs_per_user" in result.stderr
        assert _job_path(stack, job_id) is None
        for _ in range(3):
            _, result = _submit(stack, submitted, None, readable_image)
            assert result.returncode == 0, result.stderr
        cancel = _gdbus(stack, ALICE, MANAGER_PATH, MANAGER_IFACE + ".CancelJob", held[0])
        assert cancel.returncode == 0, cancel.stderr
        job_id, result = _submit(stack, submitted, ALICE, readable_image)
        assert result.returncode == 0, result.stderr
    finally:
        stack.restart_daemon(before)


@pytest.mark.stack
def test_a_priority_above_the_default_needs_an_administrator(stack, users, readable_image, submitted):
    """A member may submit at the default priority or below it; putting a job ahead of everyone's needs the
    right to manage the queue, as SetJobPriority does. Root may."""
    def submit(user: str | None, priority: int,
               interactive: bool = False) -> tuple[str, subprocess.CompletedProcess[str]]:
        job_id = f"h2kt-{uuid.uuid4().hex[:12]}"
        submitted.append(job_id)
        spec = _spec(job_id, readable_image)[:-1] + f", 'execution_policy': <{{'priority': <uint32 {priority}>}}>}}"
        return job_id, _gdbus(stack, user, MANAGER_PATH, MANAGER_IFACE + ".SubmitJob", spec, HOLD,
                              interactive=interactive)

    for priority, interactive, expected in ((1, False, INTERACTIVE_REQUIRED), (4, True, ACCESS_DENIED)):
        job_id, result = submit(ALICE, priority, interactive)
        assert _error_name(result) == expected, result.stderr
        assert "manage the conversion queue" in result.stderr or not interactive, result.stderr
        assert _job_path(stack, job_id) is None
    for user, priority in ((ALICE, 5), (ALICE, 10), (None, 1)):
        job_id, result = submit(user, priority)
        assert result.returncode == 0, result.stderr
        assert _job_property(stack, _job_path(stack, job_id), "Priority") == f"(<uint32 {priority}>,)"


@pytest.mark.stack
def test_detecting_this_hosts_capabilities_again_needs_an_administrator(stack, users):
    """Worker.Refresh makes root probe the host (free space, devices): like the queue's settings, it is for those
    who manage h2kd. A user, in the group or not, is refused, naming the action; root may."""
    builtin = MANAGER_PATH + "/worker/builtin"
    for user in (BOB, ALICE):
        result = _gdbus(stack, user, builtin, BUS_NAME + ".Worker.Refresh")
        assert _error_name(result) == INTERACTIVE_REQUIRED, result.stderr
        # Willing to authenticate, with no agent to ask them: refused.
        refused = _gdbus(stack, user, builtin, BUS_NAME + ".Worker.Refresh", interactive=True)
        assert _error_name(refused) == ACCESS_DENIED, refused.stderr
        assert "org.hyper2kvm.h2kd1.manage" in refused.stderr, refused.stderr
    allowed = _gdbus(stack, None, builtin, BUS_NAME + ".Worker.Refresh")
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.stack
def test_registering_a_worker_needs_an_administrator_before_its_capabilities_are_read(stack, users):
    """Anyone may call RegisterWorker; its capabilities (up to the bus's 32 MiB of JSON, seconds of parsing) are
    read only for a caller polkit lets register one: others are refused, whatever they sent."""
    for user in (BOB, ALICE):
        for capabilities in ("'{}'", "'[not json'"):
            refused = _gdbus(stack, user, MANAGER_PATH, BUS_NAME + ".Manager.RegisterWorker", "'agent'",
                             capabilities, "@a{sv} {}")
            assert _error_name(refused) == INTERACTIVE_REQUIRED, refused.stderr
    garbled = _gdbus(stack, None, MANAGER_PATH, BUS_NAME + ".Manager.RegisterWorker", "'agent'", "'[not json'",
                     "@a{sv} {}")
    assert _error_name(garbled) == BUS_NAME + ".Error.InvalidArgument", garbled.stderr


@pytest.mark.stack
def test_member_cannot_cancel_another_users_job_but_root_can(stack, users, readable_image, submitted):
    job_id, result = _submit(stack, submitted, CAROL, readable_image)
    assert result.returncode == 0, result.stderr
    job_path = _job_path(stack, job_id)
    assert job_path is not None
    by_manager = _gdbus(stack, ALICE, MANAGER_PATH, MANAGER_IFACE + ".CancelJob", job_id)
    assert _error_name(by_manager) == INTERACTIVE_REQUIRED, by_manager.stderr
    by_job = _gdbus(stack, ALICE, job_path, JOB_IFACE + ".Cancel", interactive=True)
    assert _error_name(by_job) == ACCESS_DENIED, by_job.stderr
    assert _job_property(stack, job_path, "State") == "(<'validated'>,)"
    by_root = _gdbus(stack, None, MANAGER_PATH, MANAGER_IFACE + ".CancelJob", job_id)
    assert by_root.returncode == 0, by_root.stderr
    assert _job_property(stack, job_path, "State") == "(<'cancelled'>,)"
    # The job's history says who cancelled it: the refused calls left no trace.
    assert _state_reasons(stack, job_path) == [f"submitted by uid {users[CAROL].pw_uid}",
                                               "spec and host checks passed", "cancelled by uid 0 before it ran"]
    own_id, result = _submit(stack, submitted, CAROL, readable_image)
    assert result.returncode == 0, result.stderr
    own_path = _job_path(stack, own_id)
    by_owner = _gdbus(stack, CAROL, own_path, JOB_IFACE + ".Cancel")
    assert by_owner.returncode == 0, by_owner.stderr
    assert _state_reasons(stack, own_path)[-1] == f"cancelled by uid {users[CAROL].pw_uid} before it ran"


@pytest.mark.stack
def test_member_cannot_submit_an_image_they_cannot_read(stack, users, shared_dir, submitted):
    """Refused at the call with AccessDenied: nothing is stored, so nothing can ever run."""
    secret = _image(shared_dir / "secret.img", 0o600)
    link = shared_dir / "link.img"
    link.symlink_to(secret)
    for source, why in ((secret, "not readable by uid"), (link, "symbolic link")):
        job_id, result = _submit(stack, submitted, ALICE, source)
        assert _error_name(result) == ACCESS_DENIED, result.stderr
        assert why in result.stderr, result.stderr
        assert _job_path(stack, job_id) is None


@pytest.mark.stack
def test_repairing_a_guest_needs_an_administrator_even_for_the_group(stack, users, readable_image, submitted):
    """A guest repair runs the guest's own programs as root, so it is not part of what group h2k may do:
    offline_fix, and convert with offline_fix (in any spelling validation would take for true)."""
    fix = f"{{'operation': <'offline_fix'>, 'image': <{{'path': <'{readable_image}'>}}>}}"
    convert_and_fix = (f"{{'operation': <'convert'>, 'image': <{{'path': <'{readable_image}'>}}>, "
                       "'parameters': <{'offline_fix': <'yes'>}>}")
    for spec in (fix, convert_and_fix):
        for interactive, expected in ((False, INTERACTIVE_REQUIRED), (True, ACCESS_DENIED)):
            job_id = f"h2kt-{uuid.uuid4().hex[:12]}"
            submitted.append(job_id)
            with_id = spec.replace("{'operation'", f"{{'job_id': <'{job_id}'>, 'operation'", 1)
            result = _gdbus(stack, ALICE, MANAGER_PATH, MANAGER_IFACE + ".SubmitJob", with_id, HOLD,
                            interactive=interactive)
            assert _error_name(result) == expected, result.stderr
            assert "repair a guest operating system" in result.stderr or interactive is False, result.stderr
            assert _job_path(stack, job_id) is None
    # The same convert without the repair is hers to submit.
    job_id, result = _submit(stack, submitted, ALICE, readable_image)
    assert result.returncode == 0, result.stderr


@pytest.mark.stack
def test_a_retry_checks_the_submitters_rights_again(stack, users, shared_dir, submitted):
    """A job that failed its checks (its directory did not exist yet) is not a way around them: after the
    directory is made a symlink to root's files, RetryJob is refused and the job stays failed."""
    (shared_dir / "alice").mkdir()
    alices = _owned_by(shared_dir / "alice", users[ALICE], 0o755)
    (shared_dir / "root-only").mkdir(mode=0o755)
    _image(shared_dir / "root-only" / "disk.img", 0o600)
    job_id, result = _submit(stack, submitted, ALICE, alices / "d" / "disk.img")
    assert result.returncode == 0, result.stderr
    job_path = _job_path(stack, job_id)
    assert job_path is not None
    assert _job_property(stack, job_path, "State") == "(<'failed'>,)"
    subprocess.run(["runuser", "-u", ALICE, "--", "ln", "-s", str(shared_dir / "root-only"), str(alices / "d")],
                   check=True)
    retried = _gdbus(stack, ALICE, MANAGER_PATH, MANAGER_IFACE + ".RetryJob", job_id)
    assert _error_name(retried) == ACCESS_DENIED, retried.stderr
    assert "not readable by uid" in retried.stderr, retried.stderr
    assert _job_property(stack, job_path, "State") == "(<'failed'>,)"
    # Made readable, the same retry goes through.
    (shared_dir / "root-only" / "disk.img").chmod(0o644)
    retried = _gdbus(stack, ALICE, MANAGER_PATH, MANAGER_IFACE + ".RetryJob", job_id)
    assert retried.returncode == 0, retried.stderr
    deadline = time.monotonic() + 60
    while (state := _job_property(stack, job_path, "State")) not in ("(<'completed'>,)", "(<'failed'>,)"):
        assert time.monotonic() < deadline, f"the retried job did not end: {state}"
        time.sleep(0.2)
    # It ran: the worker read the file (random bytes, so no disk image), which the first check never let it.
    assert "INVALID_IMAGE" in _job_property(stack, job_path, "Error")
    # The history says who asked for the retry.
    uid = users[ALICE].pw_uid
    reasons = _state_reasons(stack, job_path)
    assert f"retry requested by uid {uid}" in reasons and f"queued again by request of uid {uid}" in reasons, reasons


@pytest.mark.stack
def test_a_group_the_callers_process_dropped_is_not_given_back(stack, users, shared_dir, submitted):
    """h2kd acts with the groups of the caller's connection, as the kernel does for the caller's own process.
    alice is in group h2k in the user database; a process of hers that dropped the group cannot read a file
    through it, so neither can h2kd for her. A process that kept it submits, and its job reads the file."""
    image = _image(shared_dir / "group-only.img", 0o640)
    os.chown(image, 0, _gid(GROUP))
    alice = users[ALICE]

    def submit(groups: str, options: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        job_id = f"h2kt-{uuid.uuid4().hex[:12]}"
        submitted.append(job_id)
        argv = ["setpriv", f"--reuid={alice.pw_uid}", f"--regid={alice.pw_gid}", groups, "--",
                "gdbus", "call", "--system", "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
                "--method", MANAGER_IFACE + ".SubmitJob", "--", _spec(job_id, image), options]
        return job_id, subprocess.run(argv, env={**os.environ, **stack.env()}, capture_output=True, text=True,
                                      timeout=60)

    job_id, dropped = submit("--clear-groups", HOLD)
    assert _error_name(dropped) == ACCESS_DENIED, dropped.stderr
    assert "not readable by uid" in dropped.stderr, dropped.stderr
    assert _job_path(stack, job_id) is None

    job_id, kept = submit("--init-groups", "{}")
    assert kept.returncode == 0, kept.stderr
    job_path = _job_path(stack, job_id)
    assert job_path is not None
    deadline = time.monotonic() + 60
    while (state := _job_property(stack, job_path, "State")) not in ("(<'completed'>,)", "(<'failed'>,)"):
        assert time.monotonic() < deadline, f"the job did not end: {state}"
        time.sleep(0.2)
    # It read the file (random bytes, so no disk image), which it could only through the group.
    assert "INVALID_IMAGE" in _job_property(stack, job_path, "Error")

    # Taken out of the group in the user database after submitting, she loses it for her held job too.
    job_id, held = submit("--init-groups", HOLD)
    assert held.returncode == 0, held.stderr
    _run("gpasswd", "--delete", ALICE, GROUP)
    try:
        started = _gdbus(stack, None, MANAGER_PATH, MANAGER_IFACE + ".StartJob", job_id)
        assert _error_name(started) == ACCESS_DENIED, started.stderr
        assert "not readable by uid" in started.stderr, started.stderr
        assert _job_property(stack, _job_path(stack, job_id), "State") == "(<'validated'>,)"
    finally:
        _run("gpasswd", "--add", ALICE, GROUP)


def test_a_caller_with_no_group_of_their_own_is_refused_not_given_nogroup(stack, users, shared_dir, submitted):
    """alice's process runs with a group that is none of hers in the user database, and kept no other: h2kd
    has no group of hers to act with. It must refuse her, not act with "nogroup", through which she would read
    a file of that group (as NFS's squashed files are) that her own process cannot."""
    image = _image(shared_dir / "nogroup-only.img", 0o640)
    os.chown(image, 0, 65534)
    alice = users[ALICE]
    stranger_gid = 65533
    job_id = f"h2kt-{uuid.uuid4().hex[:12]}"
    submitted.append(job_id)
    argv = ["setpriv", f"--reuid={alice.pw_uid}", f"--regid={stranger_gid}", "--clear-groups", "--",
            "gdbus", "call", "--system", "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
            "--method", MANAGER_IFACE + ".SubmitJob", "--", _spec(job_id, image), HOLD]
    refused = subprocess.run(argv, env={**os.environ, **stack.env()}, capture_output=True, text=True, timeout=60)
    assert _error_name(refused) == ACCESS_DENIED, refused.stderr
    assert f"uid {alice.pw_uid} has no group h2kd may act with" in refused.stderr, refused.stderr
    assert _job_path(stack, job_id) is None


@pytest.fixture
def carols_corner(stack, users) -> Iterator[tuple[Path, Path]]:
    """A private directory of carol's (0700) with her image, and an output directory only she may write."""
    carol = users[CAROL]
    home = Path(tempfile.mkdtemp(prefix="h2kt-carol-", dir="/tmp"))
    outputs = stack.output_dir / home.name
    outputs.mkdir()
    for path in (home, outputs):
        _owned_by(path, carol, 0o700)
    raw = home / "disk.raw"
    raw.write_bytes(os.urandom(1024 * 1024) + bytes(3 * 1024 * 1024))
    image = home / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    _owned_by(image, carol, 0o600)
    try:
        yield image, outputs
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(outputs, ignore_errors=True)


@pytest.mark.stack
def test_member_converts_a_private_image_and_owns_the_output(stack, users, carols_corner):
    """h2kctl opens the image with carol's rights and passes the descriptor (SubmitJobWithImage); the
    output is created in her directory, owned by her, not readable by others."""
    from runas import as_user

    image, outputs = carols_corner
    output = outputs / "disk-kvm.qcow2"
    h2kctl = str(Path(sys.executable).with_name("h2kctl"))
    result = subprocess.run(as_user(CAROL, [h2kctl, "submit", str(image), "-o", str(output), "--wait", "--json"]),
                            env={**os.environ, **stack.env()}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    st = output.stat()
    assert (st.st_uid, st.st_gid) == (users[CAROL].pw_uid, users[CAROL].pw_gid)
    assert st.st_mode & 0o777 == 0o640
    assert not (difference := disk_difference(image, output)), difference
    assert sorted(p.name for p in outputs.iterdir()) == ["disk-kvm.qcow2"]


def _submit_with_fd(stack, fd: int, spec: dict) -> Message:
    from dbus_fast import Variant

    async def go() -> Message:
        bus = await MessageBus(bus_address=_stack_address(stack), negotiate_unix_fd=True).connect()
        try:
            return await bus.call(Message(
                destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE, member="SubmitJobWithImage",
                signature="ha{sv}a{sv}", body=[0, spec, {"queue": Variant("b", False)}], unix_fds=[fd]))
        finally:
            bus.disconnect()
    return asyncio.run(go())


@pytest.mark.stack
def test_a_descriptor_number_without_a_descriptor_touches_nothing_of_h2kds(stack, readable_image, submitted):
    """An "h" argument sent with no descriptor attached is a bare number, which would name one of h2kd's own
    descriptors (its store, its bus connections): refused, and h2kd goes on working."""
    from dbus_fast import Variant

    async def go() -> list[Message]:
        bus = await MessageBus(bus_address=_stack_address(stack), negotiate_unix_fd=False).connect()
        try:
            return [await bus.call(Message(
                destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE, member="SubmitJobWithImage",
                signature="ha{sv}a{sv}", body=[n, {}, {"queue": Variant("b", False)}])) for n in range(3, 40)]
        finally:
            bus.disconnect()
    for reply in asyncio.run(go()):
        assert reply.message_type == MessageType.ERROR, reply.body
        assert reply.error_name == BUS_NAME + ".Error.InvalidArgument", (reply.error_name, reply.body)
        assert "no file descriptor came with the call" in reply.body[0]
    # Its store and its connections are intact: a submission is stored and can be read back.
    job_id, result = _submit(stack, submitted, None, readable_image)
    assert result.returncode == 0, result.stderr
    assert _job_path(stack, job_id) is not None


@pytest.mark.stack
def test_descriptors_sent_with_calls_that_never_reach_the_method_are_closed(stack):
    """Any local user may attach descriptors (16 a message) to a call. Those that come with a call dbus-fast
    does not hand to SubmitJobWithImage (another path, another signature, another method) are closed at once:
    kept, a few hundred messages would use up h2kd's descriptors, and with them its store and its checks."""
    daemon = stack.daemon_pid
    assert daemon is not None
    calls = [(MANAGER_PATH, "SubmitJobWithImage", "s", ["not a descriptor"]),
             (MANAGER_PATH + "/nowhere", "SubmitJobWithImage", "ha{sv}a{sv}", [0, {}, {}]),
             (MANAGER_PATH, "GetJob", "s", ["no-such-job"])]
    attached = [os.open(os.devnull, os.O_RDONLY) for _ in range(4)]

    async def go() -> list[Message]:
        bus = await MessageBus(bus_address=_stack_address(stack), negotiate_unix_fd=True).connect()
        try:
            replies = []
            for _ in range(10):
                for path, member, signature, body in calls:
                    replies.append(await bus.call(Message(
                        destination=BUS_NAME, path=path, interface=MANAGER_IFACE, member=member,
                        signature=signature, body=body, unix_fds=attached)))
            return replies
        finally:
            bus.disconnect()

    before = len(os.listdir(f"/proc/{daemon}/fd"))
    try:
        replies = asyncio.run(go())
    finally:
        for fd in attached:
            os.close(fd)
    # They reached h2kd (the bus let them through) and were refused there.
    assert {r.error_name for r in replies} <= {"org.freedesktop.DBus.Error.UnknownMethod",
                                                "org.freedesktop.DBus.Error.UnknownObject",
                                                BUS_NAME + ".Error.NoSuchJob"}, {r.error_name for r in replies}
    # 120 descriptors came; at most a few are h2kd's own new ones (a connection, a checkpoint).
    assert len(os.listdir(f"/proc/{daemon}/fd")) - before < 10


@pytest.mark.stack
def test_a_descriptor_must_be_the_file_the_spec_names(stack, shared_dir, submitted):
    from dbus_fast import Variant

    one, other = _image(shared_dir / "one.img"), _image(shared_dir / "other.img")
    job_id = f"h2kt-{uuid.uuid4().hex[:12]}"
    submitted.append(job_id)
    fd = os.open(one, os.O_RDONLY)
    try:
        named_other = _submit_with_fd(stack, fd, {
            "job_id": Variant("s", job_id), "operation": Variant("s", "inspect"),
            "image": Variant("a{sv}", {"path": Variant("s", str(other))})})
        unnamed = _submit_with_fd(stack, fd, {"job_id": Variant("s", job_id), "operation": Variant("s", "inspect")})
    finally:
        os.close(fd)
    assert named_other.message_type == MessageType.ERROR and named_other.error_name == ACCESS_DENIED
    assert "not this file" in named_other.body[0]
    assert unnamed.message_type == MessageType.METHOD_RETURN, unnamed.body
    job_path = _job_path(stack, job_id)
    assert _job_property(stack, job_path, "Source") == f"(<'{one}'>,)"


@pytest.mark.stack
def test_a_source_replaced_after_submission_is_refused(stack, shared_dir, submitted):
    """The file checked at submission is the file converted: a held job whose source was swapped is refused when
    it is started (and stays held); one swapped after it was queued fails in its unit."""
    checked = _image(shared_dir / "checked.img")
    job_id = f"h2kt-{uuid.uuid4().hex[:12]}"
    submitted.append(job_id)
    result = _gdbus(stack, None, MANAGER_PATH, MANAGER_IFACE + ".SubmitJob", _spec(job_id, checked), HOLD)
    assert result.returncode == 0, result.stderr
    swapped = _image(shared_dir / "swapped.img")
    original = shared_dir / "original.img"
    os.link(checked, original)
    os.replace(swapped, checked)
    started = _gdbus(stack, None, MANAGER_PATH, MANAGER_IFACE + ".StartJob", job_id)
    assert started.returncode != 0 and "InvalidArgument" in started.stderr, started.stderr
    assert "was replaced after the job was submitted" in started.stderr, started.stderr
    job_path = _job_path(stack, job_id)
    assert _job_property(stack, job_path, "State") == "(<'validated'>,)"
    # Put back, the job starts; swapped once it is queued (held back by a paused queue), its unit refuses it.
    os.replace(original, checked)
    assert _gdbus(stack, None, MANAGER_PATH, MANAGER_IFACE + ".PauseQueue").returncode == 0
    try:
        started = _gdbus(stack, None, MANAGER_PATH, MANAGER_IFACE + ".StartJob", job_id)
        assert started.returncode == 0, started.stderr
        os.replace(_image(shared_dir / "swapped-again.img"), checked)
    finally:
        _gdbus(stack, None, MANAGER_PATH, MANAGER_IFACE + ".ResumeQueue")
    deadline = time.monotonic() + 60
    while _job_property(stack, job_path, "State") not in ("(<'failed'>,)", "(<'completed'>,)"):
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.2)
    assert _job_property(stack, job_path, "State") == "(<'failed'>,)"
    error = _job_property(stack, job_path, "Error")
    assert "SOURCE_CHANGED" in error and "replaced after the job was submitted" in error, error


@pytest.mark.stack
def test_a_jobs_result_is_for_its_owner_root_and_administrators(stack, users, shared_dir, submitted):
    """What a job found (here the facts of an image only its owner may read) is not for every local user: the
    others get AccessDenied for its Result, and still see the rest of the job."""
    private = shared_dir / "alice-only"
    private.mkdir(mode=0o700)
    _owned_by(private, users[ALICE], 0o700)
    image = private / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "3G"], check=True)
    _owned_by(image, users[ALICE], 0o600)
    job_id, result = _submit(stack, submitted, ALICE, image)
    assert result.returncode == 0, result.stderr
    started = _gdbus(stack, ALICE, MANAGER_PATH, MANAGER_IFACE + ".StartJob", job_id)
    assert started.returncode == 0, started.stderr
    job_path = _job_path(stack, job_id)
    deadline = time.monotonic() + 60
    while _job_property(stack, job_path, "State") != "(<'completed'>,)":
        assert time.monotonic() < deadline, _job_property(stack, job_path, "Error")
        time.sleep(0.2)

    def result_as(user: str | None) -> subprocess.CompletedProcess[str]:
        return _gdbus(stack, user, job_path, "org.freedesktop.DBus.Properties.Get", JOB_IFACE, "Result")
    for user in (ALICE, None):
        read = result_as(user)
        assert read.returncode == 0, read.stderr
        assert "3221225472" in read.stdout and "disk.qcow2" in read.stdout, read.stdout   # the report
    for user in (CAROL, BOB):
        refused = result_as(user)
        assert _error_name(refused) == ACCESS_DENIED, refused.stderr
        assert (f"the result of job {job_id} is for its owner (uid {users[ALICE].pw_uid}) and administrators to "
                "read (polkit action org.hyper2kvm.h2kd1.read-other-user)") in refused.stderr, refused.stderr
        assert "3221225472" not in refused.stdout + refused.stderr
        state = _gdbus(stack, user, job_path, "org.freedesktop.DBus.Properties.Get", JOB_IFACE, "State")
        assert state.stdout.strip() == "(<'completed'>,)", state.stderr


@pytest.mark.stack
def test_a_result_is_read_by_whom_polkit_lets_read_other_users_results(stack, users, shared_dir, submitted):
    """A site's rules may let some users read every result: read-other-user itself, or manage, which implies
    it. h2kd asks polkit without a prompt."""
    image = _image(shared_dir / "shared.img")
    job_id, result = _submit(stack, submitted, ALICE, image)
    assert result.returncode == 0, result.stderr
    job_path = _job_path(stack, job_id)
    rules = stack.polkit_rules_dir / "60-h2kt-readers.rules"

    def read_as(user: str, allowed: bool) -> subprocess.CompletedProcess[str]:
        """Get of the Result as `user`, asked again until polkitd has taken the rules file's coming or going
        (it notices by itself) and gives the answer `allowed`, or 20 s have passed."""
        deadline = time.monotonic() + 20
        while True:
            read = _gdbus(stack, user, job_path, "org.freedesktop.DBus.Properties.Get", JOB_IFACE, "Result")
            if (read.returncode == 0) == allowed or time.monotonic() > deadline:
                return read
            time.sleep(0.3)
    try:
        rules.write_text('polkit.addRule(function(action, subject) {\n'
                         f'  if ((subject.user == "{CAROL}" && action.id == "{ACTION_MANAGE}") ||\n'
                         f'      (subject.user == "{BOB}" && action.id == "{ACTION_READ_OTHER_USER}"))\n'
                         '    return polkit.Result.YES;\n});\n')
        rules.chmod(0o644)
        for user in (CAROL, BOB):
            read = read_as(user, allowed=True)
            assert read.returncode == 0, (user, read.stderr)
            assert read.stdout.strip() == "(<'{}'>,)", read.stdout    # held: no result yet, and it may say so
    finally:
        rules.unlink(missing_ok=True)
        # Gone again before the next test, which shares this polkitd.
        assert _error_name(read_as(CAROL, allowed=False)) == ACCESS_DENIED


@pytest.mark.stack
def test_bus_policy_refuses_unlisted_methods_to_users(stack, users):
    result = _gdbus(stack, BOB, MANAGER_PATH, "org.freedesktop.DBus.Properties.Set",
                    MANAGER_IFACE, "MaxParallelJobs", "<uint32 64>")
    assert _error_name(result) == ACCESS_DENIED, result.stderr
    assert "rejected" in result.stderr.lower()  # refused by the bus, before h2kd saw it


# ---- file access, checked as the caller --------------------------------------------------------

def test_caller_groups_lists_primary_then_supplementary(users):
    alice = users[ALICE]
    groups = caller_groups(alice.pw_uid)
    assert groups[0] == alice.pw_gid
    assert _gid(GROUP) in groups
    assert _gid(GROUP) not in caller_groups(users[BOB].pw_uid)
    assert caller_groups(4_000_000_000) == []


def test_root_only_image_and_symlinks_to_it_are_refused(users, shared_dir):
    alice = users[ALICE]
    gids = caller_groups(alice.pw_uid)
    secret = _image(shared_dir / "secret.img", 0o600)
    link = shared_dir / "alice-link.img"
    link.symlink_to(secret)
    with pytest.raises(NotAuthorized, match=f"permission denied: {secret} is not readable by uid {alice.pw_uid}"):
        check_source_readable(str(secret), alice.pw_uid, gids, ["/"])
    with pytest.raises(NotAuthorized, match="symbolic link"):
        check_source_readable(str(link), alice.pw_uid, gids, ["/"])
    # root itself may read it
    assert check_source_readable(str(secret), 0, [0], ["/"])[0] == secret


def test_readable_images_pass_as_owner_or_through_a_group(users, shared_dir):
    alice, bob = users[ALICE], users[BOB]
    own = _image(shared_dir / "own.img", 0o600, alice)
    assert check_source_readable(str(own), alice.pw_uid, caller_groups(alice.pw_uid), [shared_dir])[0] == own
    shared = _image(shared_dir / "group.img", 0o640)
    os.chown(shared, 0, _gid(GROUP))
    assert check_source_readable(str(shared), alice.pw_uid, caller_groups(alice.pw_uid), [shared_dir])[0] == shared
    with pytest.raises(NotAuthorized, match="not readable by uid"):
        check_source_readable(str(shared), bob.pw_uid, caller_groups(bob.pw_uid), [shared_dir])


def test_directories_on_the_way_must_be_searchable_by_the_caller(users, shared_dir):
    alice = users[ALICE]
    private = shared_dir / "private"
    private.mkdir(mode=0o700)
    inside = _image(private / "disk.img", 0o644)
    with pytest.raises(NotAuthorized, match="not readable"):
        check_source_readable(str(inside), alice.pw_uid, caller_groups(alice.pw_uid), ["/"])


def test_paths_leaving_the_allowed_roots_are_refused(users, shared_dir):
    alice = users[ALICE]
    gids = caller_groups(alice.pw_uid)
    root = shared_dir / "images"
    root.mkdir(mode=0o755)
    outside = shared_dir / "elsewhere"
    outside.mkdir(mode=0o755)
    _image(outside / "disk.img", 0o644, alice)
    (root / "escape").symlink_to(outside)  # a directory symlink inside the root pointing out of it
    with pytest.raises(NotAuthorized, match="outside the allowed source directories"):
        check_source_readable(str(root / "escape" / "disk.img"), alice.pw_uid, gids, [root])
    with pytest.raises(NotAuthorized, match="outside the allowed source directories"):
        check_source_readable(str(outside / "disk.img"), alice.pw_uid, gids, [root])
    (root / "inner").mkdir(mode=0o755)
    inner = _image(root / "inner" / "disk.img", 0o644)
    (root / "to-inner").symlink_to(root / "inner")  # symlinked directories that stay inside are fine
    assert check_source_readable(str(root / "to-inner" / "disk.img"), alice.pw_uid, gids, [root])[0] == inner


def test_a_source_reached_through_another_mount_namespace_is_refused(users, shared_dir):
    # alice's process sees a filesystem of its own mounted on an empty directory below the allowed root; through
    # /proc/PID/root the kernel names her file by its path there, which lies below the root here too.
    alice = users[ALICE]
    root = shared_dir / "images"
    (root / "inner").mkdir(parents=True, mode=0o755)
    script = (f"mount -t tmpfs -o mode=0755 h2kt-private {root / 'inner'} && head -c 65536 /dev/urandom > "
              f"{root / 'inner' / 'disk.img'} && chmod 0644 {root / 'inner' / 'disk.img'} && echo mounted && "
              f"exec setpriv --reuid {alice.pw_uid} --regid {alice.pw_gid} --init-groups sleep 60")
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "mounted\n"
        deadline = time.monotonic() + 10
        while f"Uid:\t{alice.pw_uid}\t" not in Path(f"/proc/{holder.pid}/status").read_text():
            assert time.monotonic() < deadline, "the namespace's process never became alice's"
            time.sleep(0.02)
        through = f"/proc/{holder.pid}/root{root / 'inner' / 'disk.img'}"
        assert not (root / "inner" / "disk.img").exists()    # not here: only in her namespace
        with pytest.raises(NotAuthorized, match="not reachable from h2kd's root"):
            check_source_readable(through, alice.pw_uid, caller_groups(alice.pw_uid), [root])
    finally:
        holder.kill()
        holder.wait()


def test_sources_must_be_existing_regular_files(users, shared_dir):
    alice = users[ALICE]
    gids = caller_groups(alice.pw_uid)
    fifo = shared_dir / "fifo"
    os.mkfifo(fifo, 0o666)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        check_source_readable(str(fifo), alice.pw_uid, gids, ["/"])
    with pytest.raises(InvalidArgument, match="not a regular file"):
        check_source_readable(str(shared_dir), alice.pw_uid, gids, ["/"])
    with pytest.raises(InvalidArgument, match="no such file"):
        check_source_readable(str(shared_dir / "missing.img"), alice.pw_uid, gids, ["/"])
    with pytest.raises(InvalidArgument, match="absolute"):
        check_source_readable("relative.img", alice.pw_uid, gids, ["/"])


def test_outputs_only_below_output_roots_in_directories_the_caller_can_write(users, shared_dir):
    alice, bob = users[ALICE], users[BOB]
    gids = caller_groups(alice.pw_uid)
    roots = [shared_dir / "out"]
    roots[0].mkdir(mode=0o755)  # root's, not writable by alice
    (roots[0] / "alice").mkdir()
    mine = _owned_by(roots[0] / "alice", alice, 0o700)
    (shared_dir / "alice-elsewhere").mkdir()
    elsewhere = _owned_by(shared_dir / "alice-elsewhere", alice, 0o700)

    assert check_output_allowed(str(mine / "disk.qcow2"), alice.pw_uid, gids, roots) == mine / "disk.qcow2"
    with pytest.raises(NotAuthorized, match=f"permission denied: {roots[0]} is not writable by uid {alice.pw_uid}"):
        check_output_allowed(str(roots[0] / "disk.qcow2"), alice.pw_uid, gids, roots)
    with pytest.raises(NotAuthorized, match="not writable"):
        check_output_allowed(str(mine / "disk.qcow2"), bob.pw_uid, caller_groups(bob.pw_uid), roots)
    with pytest.raises(NotAuthorized, match="outputs may only be written below"):
        check_output_allowed(str(elsewhere / "disk.qcow2"), alice.pw_uid, gids, roots)
    (mine / "out-link").symlink_to(elsewhere)
    with pytest.raises(NotAuthorized, match="outputs may only be written below"):
        check_output_allowed(str(mine / "out-link" / "disk.qcow2"), alice.pw_uid, gids, roots)
    (mine / "taken.qcow2").write_bytes(b"")
    with pytest.raises(AlreadyExists, match="never overwritten"):
        check_output_allowed(str(mine / "taken.qcow2"), alice.pw_uid, gids, roots)
    (mine / "dangling").symlink_to(shared_dir / "nothing-here")
    with pytest.raises(AlreadyExists):
        check_output_allowed(str(mine / "dangling"), alice.pw_uid, gids, roots)
    with pytest.raises(InvalidArgument, match="not an existing directory"):
        check_output_allowed(str(mine / "no-such-dir" / "disk.qcow2"), alice.pw_uid, gids, roots)
    # An existing directory is where the outputs go; it must be writable by the caller like any other.
    assert check_output_allowed(str(mine), alice.pw_uid, gids, roots) == mine
    with pytest.raises(NotAuthorized, match="not writable"):
        check_output_allowed(str(mine), bob.pw_uid, caller_groups(bob.pw_uid), roots)


def test_overwrite_replaces_only_the_callers_own_regular_file(users, shared_dir):
    alice, bob = users[ALICE], users[BOB]
    roots = [shared_dir / "out"]
    roots[0].mkdir(mode=0o1777)   # a shared, sticky output directory: anyone may create, not replace
    os.chmod(roots[0], 0o1777)
    (roots[0] / "alice.qcow2").write_bytes(b"alice's")
    (roots[0] / "bob.qcow2").write_bytes(b"bob's")
    alices = _owned_by(roots[0] / "alice.qcow2", alice, 0o644)
    bobs = _owned_by(roots[0] / "bob.qcow2", bob, 0o666)
    gids = caller_groups(alice.pw_uid)
    assert check_output_allowed(str(alices), alice.pw_uid, gids, roots, overwrite=True) == alices
    with pytest.raises(NotAuthorized, match=f"belongs to uid {bob.pw_uid}"):
        check_output_allowed(str(bobs), alice.pw_uid, gids, roots, overwrite=True)
    with pytest.raises(AlreadyExists, match="never overwritten"):
        check_output_allowed(str(alices), alice.pw_uid, gids, roots)
    (roots[0] / "link.qcow2").symlink_to(alices)
    with pytest.raises(AlreadyExists, match="not a regular file"):
        check_output_allowed(str(roots[0] / "link.qcow2"), alice.pw_uid, gids, roots, overwrite=True)
    assert check_output_allowed(str(bobs), 0, [], roots, overwrite=True) == bobs   # root replaces anything


def test_an_image_repaired_in_place_must_be_writable_by_the_caller(users, shared_dir):
    alice = users[ALICE]
    gids = caller_groups(alice.pw_uid)
    hers = _image(shared_dir / "hers.img", 0o600, alice)
    readable = _image(shared_dir / "readable.img", 0o644)
    content = readable.read_bytes()
    for image in (hers, readable):
        check_source_readable(str(image), alice.pw_uid, gids, ["/"])
    check_image_writable(hers, os.stat(hers).st_dev, os.stat(hers).st_ino, alice.pw_uid, gids)
    with pytest.raises(NotAuthorized, match="not writable by uid"):
        check_image_writable(readable, os.stat(readable).st_dev, os.stat(readable).st_ino, alice.pw_uid, gids)
    assert readable.read_bytes() == content   # root's check itself changes nothing
    check_image_writable(readable, os.stat(readable).st_dev, os.stat(readable).st_ino, 0, [])


def test_source_descriptors_must_be_readable_regular_files(shared_dir):
    image = _image(shared_dir / "fd.img")
    fd = os.open(image, os.O_RDONLY)
    try:
        assert check_source_fd(fd).st_ino == image.stat().st_ino
    finally:
        os.close(fd)
    fd = os.open(image, os.O_WRONLY)
    try:
        with pytest.raises(InvalidArgument, match="not open for reading"):
            check_source_fd(fd)
    finally:
        os.close(fd)
    fd = os.open(shared_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(InvalidArgument, match="regular file"):
            check_source_fd(fd)
    finally:
        os.close(fd)
    with pytest.raises(InvalidArgument, match="unusable"):
        check_source_fd(_closed_fd())


def _closed_fd() -> int:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    return fd


def test_a_descriptor_does_not_stand_in_for_a_path_the_caller_cannot_read(users, shared_dir):
    """The worker's qemu-img reads the image by its path with the caller's rights: a descriptor of an image
    the caller cannot reach by path is refused at submission, with the reason, not later in the worker."""
    from h2kd.config import Config
    from h2kd.manager.validation import HostChecks
    from h2kd.model.job import Job

    alice = users[ALICE]
    (shared_dir / "locked").mkdir(mode=0o700)
    image = _image(shared_dir / "locked" / "disk.img", 0o644)
    checks = HostChecks(Config(output_roots=[shared_dir], source_roots=[Path("/")]))
    job = Job(id="fd1", spec={"operation": "inspect", "image": {"path": str(image)}}, operation="inspect",
              owner=alice.pw_uid)
    with pytest.raises(NotAuthorized, match="not readable by uid"):
        checks(job, source_proof=os.stat(image))
    (shared_dir / "locked").chmod(0o755)
    assert checks(job, source_proof=os.stat(image)) is None
    assert job.source_identity == f"{image.stat().st_dev}:{image.stat().st_ino}"


def test_what_lies_behind_a_closed_directory_gets_one_answer(users, shared_dir):
    """h2kd looks at sources as root, but the caller learns no more than they could find out themselves:
    behind a directory closed to them, a file, a directory, a FIFO, a symlink and nothing at all are
    refused alike, whether given as a path or with a descriptor of a file of their own."""
    from h2kd.config import Config
    from h2kd.manager.validation import HostChecks
    from h2kd.model.job import Job

    alice = users[ALICE]
    gids = caller_groups(alice.pw_uid)
    closed = shared_dir / "closed"
    closed.mkdir(mode=0o700)
    _image(closed / "disk.img", 0o644)
    (closed / "subdir").mkdir()
    os.mkfifo(closed / "fifo", 0o666)
    (closed / "link").symlink_to(closed / "disk.img")
    own = _image(shared_dir / "own.img", 0o600, alice)
    checks = HostChecks(Config(output_roots=[shared_dir], source_roots=[Path("/")]))
    answers = set()
    for name in ("disk.img", "subdir", "fifo", "link", "missing", "missing/deeper"):
        given = closed / name
        with pytest.raises(NotAuthorized) as raised:
            check_source_readable(str(given), alice.pw_uid, gids, ["/"])
        answers.add(str(raised.value).replace(str(given), "PATH"))
        job = Job(id=f"probe-{len(answers)}", spec={"operation": "inspect", "image": {"path": str(given)}},
                  operation="inspect", owner=alice.pw_uid)
        with pytest.raises(NotAuthorized) as raised:
            checks(job, source_proof=os.stat(own))
        answers.add(str(raised.value).replace(str(given), "PATH"))
    assert answers == {f"permission denied: PATH is not readable by uid {alice.pw_uid}"}
    # Where the caller can look, they are told what is there, as before.
    closed.chmod(0o755)
    with pytest.raises(InvalidArgument, match="no such file"):
        check_source_readable(str(closed / "missing"), alice.pw_uid, gids, ["/"])
    with pytest.raises(InvalidArgument, match="not a regular file"):
        check_source_readable(str(closed / "subdir"), alice.pw_uid, gids, ["/"])
    with pytest.raises(NotAuthorized, match="symbolic link"):
        check_source_readable(str(closed / "link"), alice.pw_uid, gids, ["/"])
    assert check_source_readable(str(closed / "disk.img"), alice.pw_uid, gids, ["/"])[0] == closed / "disk.img"


def test_an_output_behind_a_closed_directory_gets_one_answer(users, shared_dir):
    """Whether an output path names an existing directory, a file or nothing cannot be learnt through h2kd
    where the caller cannot look."""
    alice = users[ALICE]
    gids = caller_groups(alice.pw_uid)
    roots = [shared_dir]
    closed = shared_dir / "closed-out"
    closed.mkdir(mode=0o700)
    (closed / "subdir").mkdir()
    (closed / "file.qcow2").write_bytes(b"")
    answers = set()
    for name in ("subdir", "file.qcow2", "missing.qcow2", "subdir/new.qcow2", "missing/new.qcow2"):
        given = closed / name
        with pytest.raises(NotAuthorized) as raised:
            check_output_allowed(str(given), alice.pw_uid, gids, roots)
        answers.add(str(raised.value).replace(str(given.parent), "DIR"))
    assert answers == {f"permission denied: DIR is not writable by uid {alice.pw_uid}"}
