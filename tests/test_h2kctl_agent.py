"""The polkit password prompt of h2kctl, for real: an unprivileged user on a terminal types an
administrator's password into pkttyagent, and polkitd authorizes the call (or does not).

Everything here is the machine's real polkit: polkitd (on a private stack of this module's own),
pkttyagent started by h2kctl, the setuid polkit-agent-helper-1 and PAM (/usr/lib/pam.d/polkit-1 ->
pam_unix). Nothing of the machine's accounts changes: the module creates two users and removes them,

  - the caller, not in group h2k, so each change it asks for needs an administrator (auth_admin);
  - an administrator for polkit only, named by this module's own rule (polkit.addAdminRule), with a
    password set here. Without that rule polkit would ask for root's password (Debian's
    50-default.rules names group sudo, which is empty here, and polkit then falls back to root).

polkit-agent-helper-1 is setuid and clears its environment, so it always reports the result of PAM
to polkitd on the default system bus address, /run/dbus/system_bus_socket: in production that is
where polkitd is. Here h2kctl runs in a private mount namespace whose /run/dbus holds a link to the
private bus; the machine's /run/dbus is untouched.

Two things these tests found: without a login session (there is no logind here) polkit never asks an
agent registered with --fallback, so h2kctl registers pkttyagent as a fallback only inside a session;
and pkttyagent flushes what was typed before it turned echo off, so the tests type, as a person does,
only once the terminal has stopped echoing.
"""

from __future__ import annotations

import os
import pty
import pwd
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from images import disk_difference
from runas import USERNS_STAGING, as_user

from h2kd.sandbox.stack import Stack, default_polkit_rules, new_base_dir

H2KCTL = str(Path(sys.executable).parent / "h2kctl")
BUS_NAME = "org.hyper2kvm.h2kd1"
MANAGER = "/org/hyper2kvm/h2kd1"
MANAGER_IFACE = "org.hyper2kvm.h2kd1.Manager"
JOB_IFACE = "org.hyper2kvm.h2kd1.Job"
DEFAULT_BUS_DIR = Path("/run/dbus")   # where polkit-agent-helper-1 looks for the system bus
PASSWORD_PROMPT = re.compile(r"Authenticating as: (\S+)\r?\n.*Password: ", re.S)
NOT_AUTHORIZED_TO_PAUSE = ("h2kctl: not authorized to pause the queue "
                           "(polkit action org.hyper2kvm.h2kd1.manage)")
MiB = 1024 * 1024

# Named to sort before the machine's 50-default.rules (polkitd still reads /usr/share/polkit-1/rules.d):
# the first admin rule that answers decides who the administrators are.
ADMIN_RULE_FILE = "10-h2k-test-admin.rules"
ADMIN_RULE = """// Test only: {admin} is the administrator polkit asks for.
polkit.addAdminRule(function(action, subject) {{
    return ["unix-user:{admin}"];
}});
"""


@dataclass(frozen=True)
class Accounts:
    caller: str
    admin: str
    password: str


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    suffix = uuid.uuid4().hex[:6]
    made = Accounts(caller=f"h2ktc{suffix}", admin=f"h2kta{suffix}", password=secrets.token_urlsafe(12))
    created: list[str] = []
    try:
        for name in (made.caller, made.admin):
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
            created.append(name)
        subprocess.run(["chpasswd"], input=f"{made.admin}:{made.password}\n", text=True, check=True)
        yield made
    finally:
        for name in created:
            subprocess.run(["userdel", name], check=False)
        try:
            USERNS_STAGING.rmdir()
        except OSError:
            pass


@pytest.fixture(scope="module")
def astack(accounts: Accounts) -> Iterator[Stack]:
    """A stack of our own: its polkitd has our actions, our example rules and the test's admin rule."""
    base = new_base_dir("h2k-agent-")
    rules = base / "test-rules"
    rules.mkdir()
    admin_rule = rules / ADMIN_RULE_FILE
    admin_rule.write_text(ADMIN_RULE.format(admin=accounts.admin))
    stack = Stack(base, polkit_rules=[*default_polkit_rules(), admin_rule])
    try:
        stack.start()
        yield stack
    finally:
        try:
            stack.stop()
        finally:
            if not os.environ.get("H2K_KEEP_STACK"):
                shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def bus_dir(astack: Stack) -> Path:
    """What /run/dbus is in h2kctl's mount namespace: just the system bus socket, ours."""
    assert DEFAULT_BUS_DIR.is_dir(), f"{DEFAULT_BUS_DIR} is missing: polkit-agent-helper-1 could not reach polkitd"
    d = astack.base_dir / "run-dbus"
    d.mkdir(mode=0o755, exist_ok=True)
    link = d / "system_bus_socket"
    if not link.is_symlink():
        link.symlink_to(astack.socket_path)
    return d


@pytest.fixture(scope="module")
def caller_output_dir(astack: Stack, accounts: Accounts) -> Path:
    """An output directory the caller may write to (h2kd creates outputs only where the caller could)."""
    d = astack.output_dir / accounts.caller
    d.mkdir(exist_ok=True)
    entry = pwd.getpwnam(accounts.caller)
    os.chown(d, entry.pw_uid, entry.pw_gid)
    return d


@pytest.fixture
def env(astack: Stack) -> dict[str, str]:
    values = {**os.environ, **astack.env(), "LC_ALL": "C.UTF-8", "COLUMNS": "100"}
    values.pop("DBUS_SESSION_BUS_ADDRESS", None)
    return values


@pytest.fixture
def queue_running(env: dict[str, str]) -> Iterator[None]:
    root_h2kctl(env, "queue", "resume")
    assert queue_paused(env) is False
    yield
    root_h2kctl(env, "queue", "resume")


# ------------------------------------------------------------------------------------------ helpers

def root_h2kctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([H2KCTL, *args], env=env, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result
    return result


def busctl_property(env: dict[str, str], path: str, interface: str, name: str) -> str:
    out = subprocess.run(["busctl", "--system", "get-property", BUS_NAME, path, interface, name],
                         env=env, capture_output=True, text=True, timeout=30, check=True).stdout
    return out.strip()


def queue_paused(env: dict[str, str]) -> bool:
    value = busctl_property(env, MANAGER, MANAGER_IFACE, "Paused")
    assert value in ("b true", "b false"), value
    return value == "b true"


def caller_argv(accounts: Accounts, bus_dir: Path, *args: str) -> list[str]:
    """h2kctl run as the caller, in a mount namespace where the default system bus is the private one."""
    script = 'mount --bind "$1" /run/dbus && shift && exec "$@"'
    return [shutil.which("unshare") or "unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
            str(bus_dir), *as_user(accounts.caller, [H2KCTL, *args])]


def converse(argv: list[str], env: dict[str, str], password: str | None, timeout: float = 90,
             think: float = 0.0) -> tuple[int, str]:
    """Run argv on a new pseudo-terminal (its controlling terminal) and type `password` and Enter as a
    person would: once the password prompt is shown and the terminal has stopped echoing (pkttyagent
    flushes anything typed before that), `think` seconds later. Return (exit status, everything shown)."""
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    output = b""
    answered = False
    prompted_at: float | None = None
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                output += b"\n[killed: no exit within the timeout]"
                break
            if password is not None and not answered:
                if prompted_at is None and PASSWORD_PROMPT.search(output.decode(errors="replace")) \
                        and not echoing(fd):
                    prompted_at = time.monotonic()
                if prompted_at is not None and time.monotonic() >= prompted_at + think:
                    os.write(fd, password.encode() + b"\n")
                    answered = True
            ready, _, _ = select.select([fd], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:   # EIO: the last process on the terminal has gone
                break
            if not chunk:
                break
            output += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def echoing(fd: int) -> bool:
    """Whether the terminal echoes what is typed (read on the master side: the terminal's own settings)."""
    try:
        return bool(termios.tcgetattr(fd)[3] & termios.ECHO)
    except termios.error:
        return True


def plain(text: str) -> str:
    """Terminal output without colour sequences and carriage returns."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text).replace("\r", "")


def processes_of(user: str) -> list[str]:
    """The processes whose real uid is the user's (pid and command), to check nothing outlives h2kctl."""
    uid = pwd.getpwnam(user).pw_uid
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        uid_line = next((line for line in status.splitlines() if line.startswith("Uid:")), "")
        if uid_line.split()[1:2] == [str(uid)]:
            found.append(f"{entry.name} {cmdline}")
    return found


def wait_until_no_processes_of(user: str, timeout: float = 5.0) -> list[str]:
    """processes_of(user), once they are gone or after `timeout` (an agent may take a moment to exit)."""
    deadline = time.monotonic() + timeout
    while (left := processes_of(user)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def assert_prompted(output: str, action: str, admin: str) -> None:
    text = plain(output)
    assert f"==== AUTHENTICATING FOR {action} ====" in text, output
    assert f"Authenticating as: {admin}\nPassword: " in text, output


# ------------------------------------------------------------------------------------------ tests

def test_admin_password_typed_at_the_prompt_authorizes_the_call(env, accounts, bus_dir, queue_running):
    code, output = converse(caller_argv(accounts, bus_dir, "queue", "pause"), env, accounts.password)
    text = plain(output)
    assert code == 0, output
    assert_prompted(output, "org.hyper2kvm.h2kd1.manage", accounts.admin)
    assert "==== AUTHENTICATION COMPLETE ====" in text, output
    assert text.rstrip().endswith("Queue paused; running jobs go on."), output
    assert accounts.password not in output, "the password was echoed"
    assert queue_paused(env) is True
    assert wait_until_no_processes_of(accounts.caller) == [], "pkttyagent (or h2kctl) outlived the call"


def test_wrong_password_ends_with_not_authorized_and_exit_5(env, accounts, bus_dir, queue_running):
    wrong = accounts.password + "x"
    code, output = converse(caller_argv(accounts, bus_dir, "queue", "pause"), env, wrong)
    text = plain(output)
    assert_prompted(output, "org.hyper2kvm.h2kd1.manage", accounts.admin)
    assert "==== AUTHENTICATION FAILED ====" in text, output
    assert code == 5, output
    assert text.strip().splitlines()[-1] == NOT_AUTHORIZED_TO_PAUSE, output
    assert "Traceback" not in text
    assert queue_paused(env) is False
    assert wait_until_no_processes_of(accounts.caller) == [], "pkttyagent (or h2kctl) outlived the call"


def test_no_ask_password_on_a_terminal_does_not_prompt(env, accounts, bus_dir, queue_running):
    code, output = converse(caller_argv(accounts, bus_dir, "--no-ask-password", "queue", "pause"), env,
                            accounts.password, timeout=60)
    text = plain(output)
    assert code == 5, output
    assert "AUTHENTICATING" not in text and "Password:" not in text, output
    assert text.strip().splitlines() == [NOT_AUTHORIZED_TO_PAUSE], output
    assert queue_paused(env) is False


def test_submit_and_wait_after_the_password_prompt(env, accounts, bus_dir, caller_output_dir, queue_running):
    images = Path(tempfile.mkdtemp(prefix="h2k-agent-images-"))
    try:
        images.chmod(0o755)
        raw = images / "disk.raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "8M"], check=True)
        with open(raw, "r+b") as f:
            f.write(os.urandom(MiB))
        source = images / "disk.vmdk"
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", str(raw), str(source)], check=True)
        source.chmod(0o644)
        job_id = f"agent-{uuid.uuid4().hex[:8]}"
        output_path = caller_output_dir / f"{job_id}.qcow2"

        code, output = converse(caller_argv(accounts, bus_dir, "submit", "--wait", str(source), "-o",
                                            str(output_path), "--id", job_id), env, accounts.password)
        assert code == 0, output
        assert_prompted(output, "org.hyper2kvm.h2kd1.submit", accounts.admin)
        assert "==== AUTHENTICATION COMPLETE ====" in plain(output), output
        assert accounts.password not in output

        (job_path,) = re.findall(r'"(/[^"]+)"', subprocess.run(
            ["busctl", "--system", "call", BUS_NAME, MANAGER, MANAGER_IFACE, "GetJob", "s", job_id],
            env=env, capture_output=True, text=True, timeout=30, check=True).stdout)
        assert busctl_property(env, job_path, JOB_IFACE, "State") == 's "completed"'
        assert busctl_property(env, job_path, JOB_IFACE, "Owner") == f"u {pwd.getpwnam(accounts.caller).pw_uid}"
        assert output_path.is_file()
        assert not (difference := disk_difference(source, output_path, "vmdk", "qcow2")), difference
        assert wait_until_no_processes_of(accounts.caller) == [], "pkttyagent (or h2kctl) outlived the call"
    finally:
        shutil.rmtree(images, ignore_errors=True)


def test_request_refused_after_the_password_says_why(env, accounts, bus_dir, astack, queue_running):
    """polkit says yes, then h2kd refuses the request itself (an output directory the caller may not
    write to): exit 5 with h2kd's reason, not a polkit message that would send the user to the wrong fix."""
    source = Path(tempfile.mkdtemp(prefix="h2k-agent-images-"))
    try:
        source.chmod(0o755)
        image = source / "disk.vmdk"
        subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(image), "8M"], check=True)
        image.chmod(0o644)
        output_path = astack.output_dir / f"agent-{uuid.uuid4().hex[:8]}.qcow2"   # root's directory
        code, output = converse(caller_argv(accounts, bus_dir, "submit", str(image), "-o", str(output_path)),
                                env, accounts.password)
        text = plain(output)
        assert_prompted(output, "org.hyper2kvm.h2kd1.submit", accounts.admin)
        assert "==== AUTHENTICATION COMPLETE ====" in text, output
        assert code == 5, output
        last = text.strip().splitlines()[-1]
        # h2kd's own reason, not "not authorized to submit jobs": polkit allowed that; the directory is the cause.
        assert last.startswith("h2kctl: permission denied: ") and "not authorized" not in last, output
        assert "not writable" in last and str(output_path.parent) in last and "polkit action" not in last, output
        assert not output_path.exists()
    finally:
        shutil.rmtree(source, ignore_errors=True)


SLOW_TYPIST_POLKIT_TIMEOUT = 3    # seconds h2kd waits for polkit's answer in this test (25 by default)


def test_password_typed_after_the_daemon_polkit_timeout_still_authorizes(env, accounts, bus_dir, astack,
                                                                         queue_running):
    astack.restart_daemon({"H2KD_POLKIT_TIMEOUT_SECONDS": str(SLOW_TYPIST_POLKIT_TIMEOUT)})
    try:
        code, output = converse(caller_argv(accounts, bus_dir, "queue", "pause"), env, accounts.password,
                                think=SLOW_TYPIST_POLKIT_TIMEOUT + 2)
        assert_prompted(output, "org.hyper2kvm.h2kd1.manage", accounts.admin)
        assert code == 0, output
        assert queue_paused(env) is True
    finally:
        astack.restart_daemon({})
        assert wait_until_no_processes_of(accounts.caller) == [], "pkttyagent (or h2kctl) outlived the call"
