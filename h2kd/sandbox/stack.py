"""The private stack: a system-type bus, journald, polkitd, a systemd manager and h2kd, started and stopped as one.

Everything lives under one base directory (sockets, generated configuration, logs in BASE/logs/),
so a stack touches nothing of the machine's except what it must: journald's sockets in /run when no
journald runs yet, and /run/systemd/system while the systemd manager runs (see
h2kd/sandbox/systemd.py and cgroup.py). Only processes this object started are ever signalled.

    with Stack(Path("/tmp/h2k-x")) as stack:
        subprocess.run(["busctl", "--system", "tree", "org.hyper2kvm.h2kd1"],
                       env={**os.environ, **stack.env()})

The base directory must be reachable by user polkitd (and by the unprivileged users some tests
run as), so it is made 0755 and should not sit below a 0700 directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping
from xml.sax.saxutils import escape

from h2kd import BUS_NAME

DBUS_DAEMON = "dbus-daemon"
BUSCTL = "busctl"
UNSHARE = "unshare"
POLKITD = "/usr/lib/polkit-1/polkitd"
SYSTEM_BUS_POLICY_DIR = Path("/usr/share/dbus-1/system.d")
SYSTEM_POLKIT_ACTIONS = Path("/usr/share/polkit-1/actions")
HOST_POLKIT_RULES = Path("/etc/polkit-1/rules.d")
POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLICY_FILE = BUS_NAME + ".conf"

# Where our own files are: the source tree when running from a checkout, else the installed copies.
SOURCE_TREE = Path(__file__).resolve().parents[2]
INSTALLED_POLICY = SYSTEM_BUS_POLICY_DIR / POLICY_FILE
INSTALLED_EXAMPLES = Path("/usr/share/doc/h2kd/examples")

DAEMON_READY_TIMEOUT = 15.0
COMPONENT_READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class StackError(RuntimeError):
    """The stack could not be started; the message says which part and shows its log."""


def required_programs() -> dict[str, str | None]:
    """Each program the stack runs, with where it was found (None: missing)."""
    found: dict[str, str | None] = {}
    for name in (DBUS_DAEMON, BUSCTL, UNSHARE, "mount"):
        found[name] = shutil.which(name)
    for path in (POLKITD, "/lib/systemd/systemd", "/lib/systemd/systemd-journald"):
        found[path] = path if os.access(path, os.X_OK) else None
    return found


def missing_programs() -> list[str]:
    return [name for name, where in required_programs().items() if where is None]


def bus_policy_file() -> Path:
    """Our bus policy: the source tree's when running from a checkout, else the installed one."""
    candidate = SOURCE_TREE / "dbus" / POLICY_FILE
    if candidate.exists():
        return candidate
    if INSTALLED_POLICY.exists():
        return INSTALLED_POLICY
    raise StackError(f"cannot find {POLICY_FILE} in {candidate.parent} nor {INSTALLED_POLICY.parent}")


def polkit_source_dir() -> Path | None:
    """polkit/ of the source tree, if we run from a checkout."""
    candidate = SOURCE_TREE / "polkit"
    return candidate if candidate.is_dir() else None


def default_polkit_rules() -> list[Path]:
    """Rules the private polkitd applies: our *.rules and the example rules (*.rules.example)."""
    source = polkit_source_dir() or INSTALLED_EXAMPLES
    if not source.is_dir():
        return []
    return sorted([*source.glob("*.rules"), *source.glob("*.rules.example")])


def name_has_owner(address: str, name: str) -> bool:
    """Whether `name` is owned on the bus at `address` (False while the bus does not answer)."""
    try:
        out = subprocess.run(
            [BUSCTL, f"--address={address}", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
             "org.freedesktop.DBus", "NameHasOwner", "s", name],
            capture_output=True, text=True, timeout=5,
        )
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and out.stdout.strip() == "b true"


def new_base_dir(prefix: str = "h2k-stack-") -> Path:
    """A fresh base directory in /tmp (not below a 0700 directory such as pytest's), mode 0755."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    return base


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    return f"--- last lines of {path} ---\n" + "\n".join(tail)


def stop_process(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT,
                 sig: int = signal.SIGTERM) -> int | None:
    """Signal one process we started, then SIGKILL it if it is still there after `timeout`."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(sig)
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def bus_config(socket_path: Path, policy: Path, system_policies: Iterable[Path]) -> str:
    """A dbus-daemon configuration like the system bus's: same type, auth and default policy, our socket."""
    includes = "\n".join(f"  <include>{escape(str(p))}</include>" for p in system_policies)
    return f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={escape(str(socket_path))}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
{includes}
  <include>{escape(str(policy))}</include>
</busconfig>
"""


class Stack:
    """A private system bus with journald, polkitd, a systemd manager and h2kd; see the module docstring."""

    def __init__(self, base_dir: Path, state_dir: Path | None = None, start_daemon: bool = True,
                 daemon_env: Mapping[str, str] | None = None,
                 polkit_rules: Iterable[Path] | None = None, output_dir: Path | None = None) -> None:
        """output_dir: h2kd's output root (default: `output` in base_dir, which goes with it)."""
        self.base_dir = Path(base_dir).absolute()
        self.state_dir = Path(state_dir).absolute() if state_dir else self.base_dir / "state"
        self.output_dir = Path(output_dir).absolute() if output_dir else self.base_dir / "output"
        self.start_daemon_on_start = start_daemon
        self.daemon_env = dict(daemon_env or {})
        self.polkit_rules = list(polkit_rules) if polkit_rules is not None else default_polkit_rules()
        self.logs_dir = self.base_dir / "logs"
        self.socket_path = self.base_dir / "system_bus_socket"
        self.runtime_dir = self.base_dir / "runtime"
        self.polkit_actions_dir = self.base_dir / "polkit" / "actions"
        self.polkit_rules_dir = self.base_dir / "polkit" / "rules.d"
        self.metrics_port = free_loopback_port()
        self._stoppers: list[tuple[str, Callable[[], None]]] = []
        self._bus_proc: subprocess.Popen[bytes] | None = None
        self._polkit_proc: subprocess.Popen[bytes] | None = None
        self._daemon_proc: subprocess.Popen[bytes] | None = None
        self._manager: Any = None
        self._journald: Any = None
        self._started = False

    # ---- what clients need ----
    @property
    def bus_address(self) -> str:
        return f"unix:path={self.socket_path}"

    @property
    def systemd_bus_address(self) -> str:
        if self._manager is None:
            raise StackError("the systemd manager is not running")
        return self._manager.bus_address

    @property
    def manager_pid(self) -> int:
        """The pid of the systemd manager that runs the job units."""
        if self._manager is None:
            raise StackError("the systemd manager is not running")
        return self._manager.pid

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def daemon_log(self) -> Path:
        return self.logs_dir / "h2kd.log"

    @property
    def daemon_pid(self) -> int | None:
        proc = self._daemon_proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def env(self) -> dict[str, str]:
        """Variables for a client of the stack (merge them into os.environ)."""
        values = {
            "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address,
            "H2K_SANDBOX_BASE": str(self.base_dir),
            "H2K_SANDBOX_OUTPUT_DIR": str(self.output_dir),
            "H2K_SANDBOX_STATE_DIR": str(self.state_dir),
            "H2K_SANDBOX_METRICS_URL": self.metrics_url,
            "H2K_SANDBOX_LOGS": str(self.logs_dir),
        }
        if self._manager is not None:
            values["H2K_SANDBOX_SYSTEMD_BUS_ADDRESS"] = self._manager.bus_address
            values["H2K_SANDBOX_XDG_RUNTIME_DIR"] = str(self.runtime_dir)
        return values

    # ---- life cycle ----
    def __enter__(self) -> "Stack":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Boot every part in order; if one fails, stop what was started and raise StackError."""
        if self._started:
            return
        if os.geteuid() != 0:
            raise StackError("the private stack needs root (it starts polkitd, journald and systemd)")
        missing = missing_programs()
        if missing:
            raise StackError("missing programs: " + ", ".join(missing))
        self._started = True
        try:
            self._prepare_dirs()
            self._start_bus()
            self._start_journald()
            self._start_polkitd()
            self._start_manager()
            if self.start_daemon_on_start:
                self.start_daemon()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop everything in reverse order. Errors of one part do not keep the others running."""
        errors: list[str] = []
        if self._daemon_proc is not None:
            self.stop_daemon()
        while self._stoppers:
            name, stopper = self._stoppers.pop()
            try:
                stopper()
            except Exception as exc:  # keep going: the remaining parts must still be stopped
                errors.append(f"{name}: {exc}")
        self._started = False
        if errors:
            raise StackError("stopping the stack: " + "; ".join(errors))

    # ---- h2kd ----
    def daemon_environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DBUS_", "H2KD_"))}
        env.update({
            "H2KD_CONFIG": str(self.base_dir / "h2kd.conf"),   # absent: the host's config stays out
            "H2KD_STATE_DIR": str(self.state_dir),
            "H2KD_BUS_ADDRESS": self.bus_address,
            "H2KD_SYSTEMD_BUS_ADDRESS": self.systemd_bus_address,
            "H2KD_OUTPUT_ROOTS": str(self.output_dir),
            "H2KD_METRICS_PORT": str(self.metrics_port),
            "H2KD_WORKER_COMMAND": f"{sys.executable} -m h2kd.worker",
            "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address,
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.daemon_env)
        return env

    def start_daemon(self, timeout: float = DAEMON_READY_TIMEOUT) -> None:
        """Start h2kd and wait until it owns its bus name; on failure show its log."""
        if self.daemon_pid is not None:
            raise StackError(f"h2kd is already running (pid {self.daemon_pid})")
        self._daemon_proc = None
        log = self._open_log("h2kd")
        try:
            self._daemon_proc = self._spawn([sys.executable, "-m", "h2kd.daemon"],
                                            self.daemon_environment(), log, cwd=self.base_dir)
        finally:
            log.close()
        self._wait_for_name(BUS_NAME, self._daemon_proc, self.daemon_log, "h2kd", timeout)

    def stop_daemon(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM h2kd (SIGKILL after `timeout`) and wait until its name is gone from the bus."""
        proc, self._daemon_proc = self._daemon_proc, None
        if proc is None:
            return None
        code = stop_process(proc, timeout)
        self._wait_name_gone(BUS_NAME)
        return code

    def kill_daemon(self, sig: int = signal.SIGKILL) -> int | None:
        """Send `sig` to h2kd and wait for it to exit (a crash, for recovery tests)."""
        proc, self._daemon_proc = self._daemon_proc, None
        if proc is None:
            raise StackError("h2kd is not running")
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            code = proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        self._wait_name_gone(BUS_NAME)
        return code

    def restart_daemon(self, daemon_env: Mapping[str, str] | None = None) -> None:
        """Stop h2kd if it runs and start a fresh one on the same state (optionally with extra env)."""
        if self._daemon_proc is not None:
            self.stop_daemon()
        if daemon_env is not None:
            self.daemon_env = dict(daemon_env)
        self.start_daemon()

    # ---- the parts ----
    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)   # polkitd (and test users) must reach the bus socket
        self.logs_dir.mkdir(exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.output_dir.chmod(0o755)
        self.runtime_dir.mkdir(exist_ok=True)
        self.runtime_dir.chmod(0o700)

    def _start_bus(self) -> None:
        system_policies = sorted(p for p in SYSTEM_BUS_POLICY_DIR.glob("*.conf") if p.name != POLICY_FILE)
        config = self.base_dir / "bus.conf"
        config.write_text(bus_config(self.socket_path, bus_policy_file(), system_policies))
        if self.socket_path.exists():
            self.socket_path.unlink()
        log = self._open_log("dbus-daemon")
        try:
            proc = self._spawn([DBUS_DAEMON, f"--config-file={config}", "--nofork", "--nopidfile"], None, log)
        finally:
            log.close()
        self._bus_proc = proc
        self._stoppers.append(("dbus-daemon", lambda: stop_process(proc)))
        self._wait_until(lambda: name_has_owner(self.bus_address, "org.freedesktop.DBus"),
                         proc, self.logs_dir / "dbus-daemon.log", "dbus-daemon")
        self.socket_path.chmod(0o666)

    def _start_journald(self) -> None:
        from h2kd.sandbox.systemd import start_journald
        handle = start_journald(log_path=self.logs_dir / "journald.log")
        if handle is not None:
            self._journald = handle
            self._stoppers.append(("journald", handle.stop))

    def _start_polkitd(self) -> None:
        self._install_polkit_files()
        script = ('mount --bind "$1" /usr/share/polkit-1/actions && '
                  'mount --bind "$2" /etc/polkit-1/rules.d && exec "$3" --no-debug')
        argv = [UNSHARE, "--mount", "--propagation", "private", "/bin/sh", "-c", script, "h2k-polkitd",
                str(self.polkit_actions_dir), str(self.polkit_rules_dir), POLKITD]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address}
        log = self._open_log("polkitd")
        try:
            proc = self._spawn(argv, env, log)
        finally:
            log.close()
        self._polkit_proc = proc
        self._stoppers.append(("polkitd", lambda: stop_process(proc)))
        self._wait_for_name(POLKIT_NAME, proc, self.logs_dir / "polkitd.log", "polkitd",
                            COMPONENT_READY_TIMEOUT)

    def restart_polkitd(self) -> None:
        """Stop polkitd and start it again, as `systemctl restart polkit` would on a host."""
        if self._polkit_proc is not None:
            stop_process(self._polkit_proc)
        self._stoppers = [(name, stop) for name, stop in self._stoppers if name != "polkitd"]
        self._start_polkitd()

    def _install_polkit_files(self) -> None:
        """Actions: the machine's plus ours (ours win); rules: only the ones given. Readable by polkitd."""
        for d in (self.polkit_actions_dir.parent, self.polkit_actions_dir, self.polkit_rules_dir):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        actions = {p.name: p for p in sorted(SYSTEM_POLKIT_ACTIONS.glob("*.policy"))}
        source = polkit_source_dir()
        if source is not None:
            actions.update({p.name: p for p in sorted(source.glob("*.policy"))})
        for old in self.polkit_actions_dir.iterdir():
            old.unlink()
        for name, path in actions.items():
            shutil.copyfile(path, self.polkit_actions_dir / name)
            (self.polkit_actions_dir / name).chmod(0o644)
        for old in self.polkit_rules_dir.iterdir():
            old.unlink()
        for rule in self.polkit_rules:
            name = rule.name.removesuffix(".example")
            shutil.copyfile(rule, self.polkit_rules_dir / name)
            (self.polkit_rules_dir / name).chmod(0o644)

    def _start_manager(self) -> None:
        from h2kd.sandbox.systemd import start_user_manager
        # The units inherit the manager's environment: keep it to what systemd.py sets (PATH, HOME, LANG).
        handle = start_user_manager(self.runtime_dir, self.logs_dir / "systemd.log", {})
        self._manager = handle

        def stop_manager() -> None:
            self._manager = None
            handle.stop()
        self._stoppers.append(("systemd", stop_manager))

    # ---- helpers ----
    def _open_log(self, name: str) -> IO[bytes]:
        log = open(self.logs_dir / f"{name}.log", "ab")
        log.write(f"--- {name} starting at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
        log.flush()
        return log

    @staticmethod
    def _spawn(argv: list[str], env: Mapping[str, str] | None, log: IO[bytes],
               cwd: Path | None = None) -> subprocess.Popen[bytes]:
        # Own session: a Ctrl-C at the terminal reaches the command run inside the stack, not the
        # stack's parts, which are stopped in order afterwards. PDEATHSIG: if whoever started the
        # stack dies without stopping it, the parts do not outlive it.
        return subprocess.Popen(["setpriv", "--pdeathsig", "TERM", "--", *argv],
                                env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)

    def _wait_until(self, ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path,
                    name: str, timeout: float = COMPONENT_READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise StackError(f"{name} exited with status {proc.returncode} while starting\n{log_tail(log)}")
            if time.monotonic() > deadline:
                raise StackError(f"{name} was not ready after {timeout:.0f} s\n{log_tail(log)}")
            time.sleep(0.05)

    def _wait_for_name(self, name: str, proc: subprocess.Popen[bytes], log: Path, what: str,
                       timeout: float) -> None:
        self._wait_until(lambda: name_has_owner(self.bus_address, name), proc, log,
                         f"{what} (waiting for {name} on the bus)", timeout)

    def _wait_name_gone(self, name: str, timeout: float = 5.0) -> None:
        if self._bus_proc is None or self._bus_proc.poll() is not None:
            return
        deadline = time.monotonic() + timeout
        while name_has_owner(self.bus_address, name) and time.monotonic() < deadline:
            time.sleep(0.05)
