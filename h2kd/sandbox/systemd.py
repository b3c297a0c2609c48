"""Start and stop a private systemd user manager and, if none runs, a journald, each in its own cgroup.

The user manager (`/lib/systemd/systemd --user`, run as root) is a real systemd that runs h2kd's
transient units in tests and in the demo stack. It needs `/run/systemd/system/` to exist; several of
our sandboxes may run at once, so a small registry under /run/h2k-sandbox/ records which of them are
alive, and the directory is removed only by the last one, and only if one of ours created it. A manager
dies with the process that started it; what a sandbox killed outright leaves (a manager that outlived it,
its journald, their cgroups) is stopped and removed by the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from h2kd.sandbox.cgroup import OwnCgroup, assert_pid1_untouched, pid1_cgroup, spawn_in_own_cgroup

SYSTEMD_BINARY = Path("/lib/systemd/systemd")
JOURNALD_BINARY = Path("/lib/systemd/systemd-journald")
SYSTEM_MARKER_DIR = Path("/run/systemd/system")
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
REGISTRY_DIR = Path("/run/h2k-sandbox")
_CREATED_SYSTEM_DIR = "created-run-systemd-system"


class SandboxStartError(RuntimeError):
    """A manager or journald did not come up; whatever was started has been stopped again."""


# ---------------------------------------------------------------------------------------------
# Registry of our live sandboxes: one JSON file per process we started, named by its pid.


@contextlib.contextmanager
def _registry_locked() -> Iterator[None]:
    REGISTRY_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(REGISTRY_DIR / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _register(pid: int, entry: dict) -> None:
    (REGISTRY_DIR / str(pid)).write_text(json.dumps(entry))


def _unregister(pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        (REGISTRY_DIR / str(pid)).unlink()


def _live_entries() -> dict[int, dict]:
    """Registered processes still alive; entries of dead ones that nobody will stop are dropped, with the
    cgroups made for them."""
    live: dict[int, dict] = {}
    for path in REGISTRY_DIR.iterdir():
        if not path.name.isdigit():
            continue
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        pid = int(path.name)
        if _alive(pid):
            live[pid] = entry
        elif not _alive(int(entry.get("owner", 0))):
            _remove_cgroup(entry)
            path.unlink(missing_ok=True)
    return live


def _end_abandoned_managers() -> None:
    """Called with the registry locked before a start: stop the managers of ours whose owner died without
    stopping them (a test run killed outright). A manager dies with its owner (its parent-death signal);
    this ends one that outlived it, or that was started before it had one."""
    for pid, entry in _live_entries().items():
        if entry.get("kind") == "user-manager" and not _alive(int(entry.get("owner", 0))):
            _end_registered(pid, entry)


def _ensure_system_marker_dir() -> bool:
    """Create /run/systemd/system/ if absent (the user manager refuses to start without it).
    Returns whether this call created it."""
    if SYSTEM_MARKER_DIR.is_dir():
        return False
    SYSTEM_MARKER_DIR.mkdir(mode=0o755, parents=True)
    (REGISTRY_DIR / _CREATED_SYSTEM_DIR).write_text(str(os.getpid()))
    return True


def _release_shared_state() -> None:
    """Called with the registry locked after one of our managers went away: if no manager of ours
    is left, remove /run/systemd/system/ if one of ours created it, and stop journalds that other
    sandboxes left running for us."""
    live = _live_entries()
    if any(e.get("kind") == "user-manager" for e in live.values()):
        return
    marker = REGISTRY_DIR / _CREATED_SYSTEM_DIR
    if marker.exists():
        with contextlib.suppress(OSError):
            SYSTEM_MARKER_DIR.rmdir()
        marker.unlink(missing_ok=True)
    for pid, entry in live.items():
        # A journald left for the others (or whose owner died without stopping it) is ours to end now.
        if entry.get("kind") == "journald" and (entry.get("orphaned") or not _alive(int(entry.get("owner", 0)))):
            _end_registered(pid, entry)


def _end_registered(pid: int, entry: dict) -> None:
    """Stop a registered process nobody will stop, remove its cgroup and its entry. It is signalled only while it
    is still in the cgroup we made for it: the pid of one that died may have been given to another process since."""
    if _cgroup_of(entry).contains(pid):
        _stop_pid(pid, None)
    _remove_cgroup(entry)
    _unregister(pid)


def _cgroup_of(entry: dict) -> OwnCgroup:
    return OwnCgroup(entry["cgroup"], [Path(d) for d in entry["cgroup_dirs"]])


def _remove_cgroup(entry: dict) -> None:
    with contextlib.suppress(Exception):
        _cgroup_of(entry).remove()


def _stop_pid(pid: int, proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """SIGTERM, wait, then SIGKILL a process we started."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    _wait_gone(pid, proc, timeout)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, proc, timeout)


def _wait_gone(pid: int, proc: subprocess.Popen | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return True
        elif not _alive(pid):
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------------
# The user manager


@dataclass
class ManagerHandle:
    """A running `systemd --user` of ours. bus_address reaches org.freedesktop.systemd1."""

    pid: int
    runtime_dir: Path
    log_path: Path
    cgroup: OwnCgroup
    created_system_dir: bool
    process: subprocess.Popen = field(repr=False)
    stopped: bool = False
    # PID 1's cgroups before the manager started: they must be the same after (on a host whose PID 1 is
    # systemd, that is /init.scope, not /).
    pid1_before: dict[str, str] = field(default_factory=pid1_cgroup, repr=False)

    @property
    def bus_address(self) -> str:
        return f"unix:path={self.runtime_dir / 'bus'}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def systemctl_env(self) -> dict[str, str]:
        """Environment for `systemctl --user` / `busctl --user` / `journalctl` against this manager."""
        env = dict(os.environ)
        env["XDG_RUNTIME_DIR"] = str(self.runtime_dir)
        env["DBUS_SESSION_BUS_ADDRESS"] = self.bus_address
        return env

    def stop(self, timeout: float = 15.0) -> None:
        """`systemctl --user exit`, wait, SIGKILL if still alive, remove our cgroup; idempotent."""
        if self.stopped:
            return
        self.stopped = True
        if self.alive:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run(["systemctl", "--user", "exit"], env=self.systemctl_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
            if not _wait_gone(self.pid, self.process, timeout):
                self.process.kill()
                self.process.wait()
        try:
            self.cgroup.remove()
        finally:
            with _registry_locked():
                _unregister(self.pid)
                _release_shared_state()
        assert_pid1_untouched(self.pid1_before)


def _bus_has_systemd(bus_socket: Path) -> bool:
    if not bus_socket.exists():
        return False
    try:
        out = subprocess.run(
            ["busctl", f"--address=unix:path={bus_socket}", "call", "org.freedesktop.DBus",
             "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameHasOwner", "s", "org.freedesktop.systemd1"],
            capture_output=True, text=True, timeout=5,
        )
    except (subprocess.TimeoutExpired, OSError):
        return False
    return out.returncode == 0 and out.stdout.strip() == "b true"


def start_user_manager(runtime_dir: Path, log_path: Path, env: Mapping[str, str] | None = None,
                       timeout: float = 30.0) -> ManagerHandle:
    """Start `/lib/systemd/systemd --user` as root in a cgroup of its own, wait until it owns
    org.freedesktop.systemd1 on $XDG_RUNTIME_DIR/bus (its own dbus.socket binds it), return a handle.

    runtime_dir becomes XDG_RUNTIME_DIR (created 0700). log_path receives the manager's output.
    env: variables added to the manager's environment (which its units inherit) on top of PATH,
    HOME, LANG from ours; XDG_RUNTIME_DIR and DBUS_SESSION_BUS_ADDRESS are always set by us.
    Raises SandboxStartError (after cleaning up) if it does not come up within timeout seconds.
    """
    runtime_dir = Path(runtime_dir)
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(runtime_dir, 0o700)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    manager_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    manager_env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    manager_env.setdefault("HOME", "/root")
    manager_env.update(env or {})
    manager_env["XDG_RUNTIME_DIR"] = str(runtime_dir)
    manager_env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={runtime_dir / 'bus'}"
    pid1_before = pid1_cgroup()

    with _registry_locked():
        _end_abandoned_managers()
        created = _ensure_system_marker_dir()
        with open(log_path, "ab") as log:
            try:
                # SIGTERM makes a user manager start exit.target: it stops its units and exits.
                proc, group = spawn_in_own_cgroup(["setpriv", "--pdeathsig", "TERM", "--",
                                                   str(SYSTEMD_BINARY), "--user"], prefix="h2k-systemd",
                                                  env=manager_env, stdout=log, stderr=subprocess.STDOUT)
            except Exception:
                _release_shared_state()
                raise
        _register(proc.pid, {"kind": "user-manager", "owner": os.getpid(), "runtime_dir": str(runtime_dir),
                             "cgroup": group.name, "cgroup_dirs": [str(d) for d in group.dirs]})
    handle = ManagerHandle(proc.pid, runtime_dir, log_path, group, created, proc, pid1_before=pid1_before)

    # Whatever ends the start early (Ctrl-C, a test's time limit, PID 1 found moved) stops what was started:
    # the handle is not yet the caller's to stop.
    try:
        deadline = time.monotonic() + timeout
        while not _bus_has_systemd(runtime_dir / "bus"):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = "exited" if proc.poll() is not None else f"not on its bus after {timeout:.0f}s"
                raise SandboxStartError(f"systemd --user {why}; see {log_path}")
            time.sleep(0.1)
        assert_pid1_untouched(pid1_before)
    except BaseException:
        with contextlib.suppress(Exception):
            handle.stop()
        raise
    return handle


# ---------------------------------------------------------------------------------------------
# journald


def journal_socket_live(path: Path = JOURNAL_SOCKET) -> bool:
    """Whether a journald answers on its native socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


@dataclass
class JournaldHandle:
    """A systemd-journald we started."""

    pid: int
    log_path: Path
    cgroup: OwnCgroup
    process: subprocess.Popen = field(repr=False)
    stopped: bool = False
    pid1_before: dict[str, str] = field(default_factory=pid1_cgroup, repr=False)    # as for ManagerHandle

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop our journald; idempotent. If another sandbox of ours (another process) still runs a
        manager, it may be logging to this journald: leave it to the last one of them to stop."""
        if self.stopped:
            return
        self.stopped = True
        with _registry_locked():
            others = [e for e in _live_entries().values()
                      if e.get("kind") == "user-manager" and e.get("owner") != os.getpid()]
            if others and self.alive:
                entry = json.loads((REGISTRY_DIR / str(self.pid)).read_text())
                entry["orphaned"] = True
                _register(self.pid, entry)
                return
            _stop_pid(self.pid, self.process, timeout)
            try:
                self.cgroup.remove()
            finally:
                _unregister(self.pid)
        assert_pid1_untouched(self.pid1_before)


def start_journald(log_path: Path, env: Mapping[str, str] | None = None,
                   timeout: float = 15.0) -> JournaldHandle | None:
    """Return None if a journald already answers on /run/systemd/journal/socket (use that one);
    else start /lib/systemd/systemd-journald in a cgroup of its own, wait for its socket, return it.

    Its journal is volatile (/run/log/journal). log_path receives journald's own output.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid1_before = pid1_cgroup()
    with _registry_locked():
        # A journald that only abandoned sandboxes used is stopped, not taken over: a fresh one is started.
        _end_abandoned_managers()
        _release_shared_state()
        if journal_socket_live():
            return None
        journald_env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG")}
        journald_env.update(env or {})
        with open(log_path, "ab") as log:
            proc, group = spawn_in_own_cgroup([str(JOURNALD_BINARY)], prefix="h2k-journald",
                                              env=journald_env, stdout=log, stderr=subprocess.STDOUT)
        _register(proc.pid, {"kind": "journald", "owner": os.getpid(),
                             "cgroup": group.name, "cgroup_dirs": [str(d) for d in group.dirs]})
        handle = JournaldHandle(proc.pid, log_path, group, proc, pid1_before=pid1_before)
        # As for the manager: whatever ends the start early stops the journald started.
        try:
            deadline = time.monotonic() + timeout
            while not journal_socket_live():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SandboxStartError(f"systemd-journald did not open {JOURNAL_SOCKET}; see {log_path}")
                time.sleep(0.05)
        except BaseException:
            _stop_pid(proc.pid, proc)
            group.remove()
            _unregister(proc.pid)
            handle.stopped = True
            raise
    try:
        assert_pid1_untouched(pid1_before)
    except BaseException:
        with contextlib.suppress(Exception):
            handle.stop()
        raise
    return handle
