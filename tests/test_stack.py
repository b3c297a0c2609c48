"""The private stack and h2k-sandbox: every part really runs, answers, obeys our policies, and goes away cleanly."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import pytest

from h2kd import BUS_NAME, MANAGER_PATH
from h2kd.sandbox.cgroup import pid1_cgroup
from h2kd.sandbox.stack import Stack, new_base_dir
from runas import user_in_group

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[1]
SANDBOX = [sys.executable, "-m", "h2kd.sandbox.cli"]


@pytest.fixture(scope="module")
def bare_stack() -> Iterator[Stack]:
    """Everything but h2kd: the parts the daemon depends on, checked on their own."""
    base = new_base_dir("h2k-bare-")
    stack = Stack(base, start_daemon=False)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.fixture
def bare_env(bare_stack: Stack) -> dict[str, str]:
    env = {**os.environ, **bare_stack.env()}
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    return env


def run(argv: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload]


def as_user(user: str, argv: list[str]) -> list[str]:
    """argv run as `user` with that user's groups (setpriv execs: no session, no PAM)."""
    return ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups", "--", *argv]


# ---------------------------------------------------------------------------------------------
# the parts


def test_private_bus_is_a_system_bus_with_polkit(bare_env: dict[str, str], bare_stack: Stack) -> None:
    names = run(["busctl", "--system", "list", "--no-legend", "--acquired"], bare_env)
    assert names.returncode == 0, names.stderr
    assert "org.freedesktop.PolicyKit1" in names.stdout
    # The machine's own bus (if any) is not what we talk to: our socket is in the base directory.
    assert bare_env["DBUS_SYSTEM_BUS_ADDRESS"] == f"unix:path={bare_stack.base_dir}/system_bus_socket"
    owner = run(["busctl", "--system", "status", "org.freedesktop.PolicyKit1"], bare_env)
    assert "UID=" in owner.stdout and f"UID={pwd.getpwnam('polkitd').pw_uid}" in owner.stdout


def test_polkitd_answers_with_our_actions(bare_env: dict[str, str]) -> None:
    nobody = subprocess.Popen(as_user("nobody", ["sleep", "30"]))
    try:
        time.sleep(0.2)
        root_check = run(["pkcheck", "--action-id", "org.hyper2kvm.h2kd1.submit", "--process", str(os.getpid())], bare_env)
        assert root_check.returncode == 0, root_check.stderr
        # Our policy says auth_admin for callers without a session: nobody must authenticate (2).
        nobody_check = run(["pkcheck", "--action-id", "org.hyper2kvm.h2kd1.submit", "--process", str(nobody.pid)], bare_env)
        assert nobody_check.returncode == 2, nobody_check.stderr
        unknown = run(["pkcheck", "--action-id", "org.hyper2kvm.h2kd1.no-such-action", "--process", str(os.getpid())], bare_env)
        assert unknown.returncode != 0 and "not registered" in unknown.stderr
    finally:
        nobody.kill()
        nobody.wait()


@pytest.fixture
def h2k_member() -> Iterator[str]:
    """A real user in group h2k, removed afterwards (and the group too if this fixture made it)."""
    with user_in_group("h2kstack-") as name:
        yield name


def test_polkitd_applies_the_example_rules(bare_env: dict[str, str], h2k_member: str) -> None:
    member = subprocess.Popen(as_user(h2k_member, ["sleep", "30"]))
    try:
        time.sleep(0.2)
        submit = run(["pkcheck", "--action-id", "org.hyper2kvm.h2kd1.submit", "--process", str(member.pid)], bare_env)
        assert submit.returncode == 0, submit.stderr
        manage = run(["pkcheck", "--action-id", "org.hyper2kvm.h2kd1.manage", "--process", str(member.pid)], bare_env)
        assert manage.returncode == 2, manage.stderr
    finally:
        member.kill()
        member.wait()


def test_systemd_manager_runs_units(bare_stack: Stack) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(bare_stack.runtime_dir),
           "DBUS_SESSION_BUS_ADDRESS": bare_stack.systemd_bus_address}
    version = run(["busctl", f"--address={bare_stack.systemd_bus_address}", "get-property",
                   "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                   "org.freedesktop.systemd1.Manager", "Version"], env)
    assert version.returncode == 0 and version.stdout.startswith('s "'), version.stderr
    unit = run(["systemd-run", "--user", "--wait", "--quiet", "--", "sh", "-c", "exit 3"], env)
    assert unit.returncode == 3, unit.stderr
    # The manager is in a cgroup of its own, never in the root cgroup.
    manager_cgroup = Path(f"/proc/{bare_stack.manager_pid}/cgroup").read_text()
    assert ":name=systemd:/\n" not in manager_cgroup


def test_a_manager_starts_and_stops_on_a_host_whose_pid1_is_systemd(tmp_path: Path, monkeypatch) -> None:
    """There PID 1 sits in /init.scope, not in /: the check compares with where it was before the manager
    started. It used to insist on / and fail every start, leaving the manager it had started running."""
    from h2kd.sandbox import cgroup, systemd

    as_on_a_systemd_host = {key: "/init.scope" for key in pid1_cgroup()}
    monkeypatch.setattr(cgroup, "pid1_cgroup", lambda: dict(as_on_a_systemd_host))
    monkeypatch.setattr(systemd, "pid1_cgroup", lambda: dict(as_on_a_systemd_host))
    handle = systemd.start_user_manager(tmp_path / "runtime", tmp_path / "manager.log")
    try:
        assert handle.alive
    finally:
        handle.stop()
    assert not handle.alive


STARTS_A_MANAGER_AND_WAITS = """
import sys, time
from pathlib import Path
from h2kd.sandbox.systemd import start_user_manager
handle = start_user_manager(Path(sys.argv[1]) / "runtime", Path(sys.argv[1]) / "manager.log")
print(handle.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def _registered(pid: int) -> dict | None:
    from h2kd.sandbox.systemd import REGISTRY_DIR
    try:
        return json.loads((REGISTRY_DIR / str(pid)).read_text())
    except FileNotFoundError:
        return None


def test_a_manager_ends_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A test run killed outright (CI cut at its time limit) must not leave its systemd manager running, and
    the next start removes the cgroup that was made for it."""
    from h2kd.sandbox import systemd

    owner = subprocess.Popen([sys.executable, "-c", STARTS_A_MANAGER_AND_WAITS, str(tmp_path / "first")],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        manager_pid = int(owner.stdout.readline())
        entry = _registered(manager_pid)
        assert entry and entry["kind"] == "user-manager"
        manager_cgroup = systemd.OwnCgroup(entry["cgroup"], [Path(d) for d in entry["cgroup_dirs"]])
        assert manager_cgroup.contains(manager_pid)
    finally:
        owner.kill()
        owner.wait()
    assert _gone(manager_pid, 30), "the manager outlived the process that started it"

    handle = systemd.start_user_manager(tmp_path / "second" / "runtime", tmp_path / "second" / "manager.log")
    try:
        assert handle.alive
        assert _registered(manager_pid) is None
        assert not any(d.exists() for d in manager_cgroup.dirs)
    finally:
        handle.stop()


def test_a_manager_that_outlived_its_owner_is_stopped_at_the_next_start(tmp_path: Path) -> None:
    from h2kd.sandbox import systemd

    abandoned = systemd.start_user_manager(tmp_path / "first" / "runtime", tmp_path / "first" / "manager.log")
    try:
        # As a manager left by an owner that died before managers had a parent-death signal.
        dead_owner = subprocess.Popen(["true"])
        dead_owner.wait()
        entry = _registered(abandoned.pid)
        assert entry
        (systemd.REGISTRY_DIR / str(abandoned.pid)).write_text(json.dumps({**entry, "owner": dead_owner.pid}))

        handle = systemd.start_user_manager(tmp_path / "second" / "runtime", tmp_path / "second" / "manager.log")
        try:
            assert handle.alive
            assert not abandoned.alive
            assert not any(d.exists() for d in abandoned.cgroup.dirs)
            assert _registered(abandoned.pid) is None
        finally:
            handle.stop()
    finally:
        abandoned.stop()


def test_journald_takes_messages() -> None:
    from systemd import journal

    assert Path("/run/systemd/journal/socket").is_socket()
    marker = uuid.uuid4().hex
    journal.send("stack test message", H2K_STACK_TEST=marker)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = subprocess.run(["journalctl", "--no-pager", "-o", "json", f"H2K_STACK_TEST={marker}"],
                               capture_output=True, text=True)
        if found.stdout.strip():
            assert json.loads(found.stdout.splitlines()[0])["MESSAGE"] == "stack test message"
            return
        time.sleep(0.1)
    pytest.fail("the message sent to journald never showed up in journalctl")


# ---------------------------------------------------------------------------------------------
# the bus policy (dbus/org.hyper2kvm.h2kd1.conf) as the private bus enforces it

STAND_IN = r"""
import asyncio, sys
from dbus_fast import Message, MessageType, RequestNameReply
from dbus_fast.aio import MessageBus

async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    def answer(msg):
        if msg.message_type == MessageType.METHOD_CALL:
            bus.send(Message.new_method_return(msg, "s", ["reached " + msg.interface + "." + msg.member]))
            return True
    bus.add_message_handler(answer)
    reply = await bus.request_name(sys.argv[2])
    print(reply == RequestNameReply.PRIMARY_OWNER, flush=True)
    await bus.wait_for_disconnect()

asyncio.run(main())
"""


def interface_methods() -> list[tuple[str, str]]:
    found = []
    for name in ("Manager", "Job", "Worker"):
        tree = ET.parse(REPO / "dbus" / f"{BUS_NAME}.{name}.xml")
        for iface in tree.getroot().iter("interface"):
            found += [(iface.get("name"), m.get("name")) for m in iface.iter("method")]
    return found


@pytest.fixture(scope="module")
def stand_in(bare_stack: Stack) -> Iterator[None]:
    """A root process owning org.hyper2kvm.h2kd1 that answers every call that reaches it."""
    proc = subprocess.Popen([sys.executable, "-c", STAND_IN, bare_stack.bus_address, BUS_NAME],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "True"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def call(env: dict[str, str], interface: str, member: str, *args: str, user: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    argv = ["busctl", "--system", "call", BUS_NAME, MANAGER_PATH, interface, member, *args]
    return run(as_user(user, argv) if user else argv, env)


def test_unprivileged_callers_reach_every_listed_method(bare_env: dict[str, str], stand_in: None) -> None:
    allowed = interface_methods() + [
        ("org.freedesktop.DBus.Introspectable", "Introspect"), ("org.freedesktop.DBus.Peer", "Ping"),
        ("org.freedesktop.DBus.Properties", "Get"), ("org.freedesktop.DBus.Properties", "GetAll"),
        ("org.freedesktop.DBus.ObjectManager", "GetManagedObjects")]
    assert len(allowed) > 20
    for interface, member in allowed:
        result = call(bare_env, interface, member, user="nobody")
        assert result.returncode == 0 and f"reached {interface}.{member}" in result.stdout, \
            (interface, member, result.stderr)


def test_unprivileged_callers_are_refused_everything_else(bare_env: dict[str, str], stand_in: None) -> None:
    refused = [("org.freedesktop.DBus.Properties", "Set"), ("org.hyper2kvm.h2kd1.Manager", "Shutdown"),
               ("org.hyper2kvm.h2kd1.Job", "SetState"), ("org.example.Other", "Anything")]
    for interface, member in refused:
        result = call(bare_env, interface, member, user="nobody")
        assert result.returncode != 0 and "Access denied" in result.stderr, (interface, member, result)
    # root is not restricted by the bus (polkit and h2kd decide).
    as_root = call(bare_env, "org.freedesktop.DBus.Properties", "Set")
    assert as_root.returncode == 0 and "reached org.freedesktop.DBus.Properties.Set" in as_root.stdout


def test_only_root_may_own_the_name(bare_env: dict[str, str]) -> None:
    result = run(as_user("nobody", ["busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                    "org.freedesktop.DBus", "RequestName", "su", BUS_NAME, "0"]), bare_env)
    assert result.returncode != 0 and "Access denied" in result.stderr, result


# ---------------------------------------------------------------------------------------------
# h2k-sandbox


def _our_processes(base: str) -> list[int]:
    """Processes whose command line or environment mention the stack's base directory."""
    found = []
    needle = base.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# Run inside the sandbox: records the base directory, the names on the bus and the cgroups that
# hold the stack's processes (found by the base directory in their environment), then exits 7 or,
# with "wait", becomes a long sleep.
PROBE = r"""
import json, os, pathlib, subprocess, sys
base = os.environ["H2K_SANDBOX_BASE"]
names = subprocess.run(["busctl", "--system", "list", "--no-legend", "--acquired"],
                       capture_output=True, text=True).stdout
cgroups = set()
for tree in (pathlib.Path("/sys/fs/cgroup/systemd"), pathlib.Path("/sys/fs/cgroup/unified")):
    for procs in tree.glob("h2k*/**/cgroup.procs"):
        for pid in procs.read_text().split():
            try:
                env = pathlib.Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if base.encode() in env and int(pid) != os.getpid():
                cgroups.add(str(procs.parent))
tmp = sys.argv[1] + ".tmp"
pathlib.Path(tmp).write_text(json.dumps({"base": base, "names": names, "cgroups": sorted(cgroups)}))
os.rename(tmp, sys.argv[1])
if sys.argv[2:] == ["wait"]:
    os.execvp("sleep", ["sleep", "60"])
sys.exit(7)
"""


def assert_nothing_left(seen: dict[str, object]) -> None:
    base = str(seen["base"])
    assert seen["cgroups"], "found no cgroup of the stack's systemd manager while it ran"
    assert not Path(base).exists()
    assert _our_processes(base) == []
    assert [c for c in seen["cgroups"] if Path(str(c)).exists()] == []  # type: ignore[union-attr]


@pytest.mark.parametrize("daemon", [False, True], ids=["no-daemon", "with-daemon"])
def test_sandbox_run_returns_the_command_status_and_leaves_nothing(tmp_path: Path, daemon: bool) -> None:
    pid1_before = pid1_cgroup()
    marker_dir_existed = Path("/run/systemd/system").exists()
    seen = tmp_path / "seen"
    flags = [] if daemon else ["--no-daemon"]
    result = subprocess.run([*SANDBOX, "run", *flags, "--", sys.executable, "-c", PROBE, str(seen)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 7, result.stderr
    probe = json.loads(seen.read_text())
    assert "org.freedesktop.PolicyKit1" in probe["names"]
    assert (BUS_NAME in probe["names"]) == daemon
    assert_nothing_left(probe)
    assert pid1_cgroup() == pid1_before
    if not marker_dir_existed:
        assert not Path("/run/systemd/system").exists()


def test_sandbox_state_dir_keeps_the_jobs_and_their_outputs(tmp_path: Path) -> None:
    """A second run on the same --state-dir finds the first run's output where its job says it is, and a job
    stored for later still writes where it was told to."""
    state = tmp_path / "kept"
    source = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(source), "16M"], check=True)
    ctl = f"{sys.executable} -m h2kctl"
    first = (f'set -e; {ctl} -q submit --wait {source} -o "$H2K_SANDBOX_OUTPUT_DIR/now.qcow2"; '
             f'{ctl} -q submit --no-queue {source} -o "$H2K_SANDBOX_OUTPUT_DIR/later.qcow2" > {tmp_path}/id')
    result = subprocess.run([*SANDBOX, "run", "--state-dir", str(state), "--", "bash", "-c", first],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    job_id = (tmp_path / "id").read_text().strip()
    second = (f'set -e; test -f "$H2K_SANDBOX_OUTPUT_DIR/now.qcow2"; {ctl} -q start {job_id}; '
              f'{ctl} -q wait {job_id}; test -f "$H2K_SANDBOX_OUTPUT_DIR/later.qcow2"')
    result = subprocess.run([*SANDBOX, "run", "--state-dir", str(state), "--", "bash", "-c", second],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (state / "output").iterdir()) == ["later.qcow2", "now.qcow2"]


def test_sandbox_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    proc = subprocess.Popen([*SANDBOX, "run", "--no-daemon", "--", sys.executable, "-c", PROBE, str(seen), "wait"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not seen.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert_nothing_left(json.loads(seen.read_text()))


def test_sandbox_reports_a_missing_command() -> None:
    result = subprocess.run([*SANDBOX, "run", "--no-daemon", "--", "/nonexistent/program"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 127
    assert "cannot run /nonexistent/program" in result.stderr


def test_sandbox_refuses_to_run_unprivileged() -> None:
    result = subprocess.run(as_user("nobody", [*SANDBOX, "run", "--", "true"]), capture_output=True, text=True,
                            timeout=60, cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 125
    assert "must run as root" in result.stderr


# ---------------------------------------------------------------------------------------------
# h2kd in the shared stack


def test_daemon_serves_on_the_private_bus(stack: Stack, stack_env: dict[str, str]) -> None:
    version = run(["busctl", "--system", "get-property", BUS_NAME, MANAGER_PATH,
                   "org.hyper2kvm.h2kd1.Manager", "Version"], stack_env)
    assert version.returncode == 0, version.stderr + "\n" + stack.daemon_log.read_text()[-2000:]
    assert version.stdout.startswith('s "')


def test_daemon_can_be_killed_and_restarted(stack: Stack, stack_env: dict[str, str]) -> None:
    first = stack.daemon_pid
    assert first is not None
    assert stack.kill_daemon(signal.SIGKILL) == -signal.SIGKILL
    gone = run(["busctl", "--system", "status", BUS_NAME], stack_env)
    assert gone.returncode != 0
    stack.restart_daemon()
    assert stack.daemon_pid not in (None, first)
    back = run(["busctl", "--system", "status", BUS_NAME], stack_env)
    assert back.returncode == 0 and f"PID={stack.daemon_pid}" in back.stdout


# ---------------------------------------------------------------------------------------------
# the suite's guard (tests/conftest.py): a run that moved PID 1 fails, whatever its tests said

GUARDED_CONFTEST = """
import importlib.util, pathlib
spec = importlib.util.spec_from_file_location("h2k_conftest", {conftest!r})
ours = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ours)
ours.PID1_CGROUP = pathlib.Path({fake!r})
pytest_sessionstart = ours.pytest_sessionstart
pytest_sessionfinish = ours.pytest_sessionfinish
"""


@pytest.mark.parametrize("moved", [False, True])
def test_run_fails_if_pid1_cgroup_changes(tmp_path: Path, moved: bool) -> None:
    fake = tmp_path / "pid1-cgroup"
    fake.write_text("9:name=systemd:/\n0::/\n")
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(GUARDED_CONFTEST.format(conftest=str(REPO / "tests" / "conftest.py"),
                                                               fake=str(fake)))
    new = "9:name=systemd:/init.scope\n0::/init.scope\n" if moved else "9:name=systemd:/\n0::/\n"
    (suite / "test_x.py").write_text(f"import pathlib\ndef test_x():\n    pathlib.Path({str(fake)!r}).write_text({new!r})\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(suite),
                             "-c", "/dev/null", str(suite)], capture_output=True, text=True, timeout=120, cwd=suite)
    assert "1 passed" in result.stdout
    if moved:
        assert result.returncode == 1, result.stdout
        assert "PID 1 CGROUP CHANGED" in result.stdout and "/init.scope" in result.stdout
    else:
        assert result.returncode == 0, result.stdout
