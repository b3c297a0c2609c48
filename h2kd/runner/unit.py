"""What an attempt's transient unit looks like: its name, its run directory and its systemd properties.

Pure functions, no bus: runner.systemd sends what build_properties() returns to StartTransientUnit.
"""

from __future__ import annotations

import errno
import os
import re
import string
import sys
from pathlib import Path

from dbus_fast import Variant

import h2kd
from h2kd.config import Config

UNIT_PREFIX = "h2k-job-"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
# How long a stopping worker gets to clean its partial output before SIGKILL.
STOP_TIMEOUT_SECONDS = 30
DEFAULT_TIMEOUT_SECONDS = 3600
# systemd's groups of system calls no job needs (SystemCallFilter=~...): tracing, kernel modules, clocks, swap,
# reboot, raw I/O ports, and the obsolete and CPU-emulation calls. The worker is root and parses what submitters
# give it. (ProtectKernelLogs= and ProtectControlGroups= are not set: with either, units failed to start, status
# 226/NAMESPACE, under the systemd of the test stack on our machines. Nor ProtectClock=, which would add the RTC to
# the devices allowed; @clock denies setting clocks.)
DENIED_SYSTEM_CALLS = ("@clock", "@cpu-emulation", "@debug", "@module", "@obsolete", "@raw-io", "@reboot", "@swap")


def denied_system_calls(fixes_guest: bool) -> tuple[str, ...]:
    """The groups of system calls a job's unit is denied: a guest repair may load device-mapper targets
    (LVM volume groups activated), so it keeps @module."""
    return tuple(g for g in DENIED_SYSTEM_CALLS if not (fixes_guest and g == "@module"))


# The capabilities a worker that does not repair a guest keeps (CapabilityBoundingSet=, linux/capability.h's
# numbers), those of h2kd.service: read any image and write into callers' directories (DAC_READ_SEARCH,
# DAC_OVERRIDE), hand outputs to their owner (CHOWN, FOWNER), run qemu-img as the submitter (SETUID, SETGID) and
# stop it on a cancel (KILL). None of the rest, which would let code that took over the worker (a qemu-img
# exploited by a crafted image) leave the sandbox: remount it (SYS_ADMIN), write into other processes (SYS_PTRACE).
# A guest repair mounts, chroots and runs the guest's tools: it keeps root's whole set (the guest's tools themselves
# run with a few, see h2kd.operations.offline_fix.confine).
WORKER_CAPABILITIES = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
                       "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7}
WORKER_CAPABILITY_MASK = sum(1 << number for number in WORKER_CAPABILITIES.values())
# Processes and threads a unit may have (qemu-img's I/O threads, a repair's guest tools); a fork bomb in a guest's
# scripts, or many jobs at once, stop there rather than at the host's limit.
TASKS_MAX = 1024
# A guest repair's clean-up (deactivating volume groups, detaching loop devices) may take longer than a convert's.
REPAIR_STOP_TIMEOUT_SECONDS = 120


def runtime_limit(timeout_seconds: int | None) -> int:
    """systemd's limit on a unit's run time (RuntimeMaxSec), in seconds: the job's timeout and a margin.

    The worker ends itself at the job's timeout (counted from its own start, a little after the unit's), and
    reports TIMEOUT with its partial output removed. systemd's limit is the backstop for a worker that does not:
    were it the same, systemd's clock, started first, would always win, and a worker stopped by systemd cannot
    tell a time limit from a cancel, nor finish an attempt whose outputs were already getting their names."""
    timeout = int(timeout_seconds or DEFAULT_TIMEOUT_SECONDS)
    return timeout + min(max(timeout // 10, 5), 60)


# Devices an operation may open (DeviceAllow=, with DevicePolicy=closed). Reading and writing image
# files needs none; offline fixes attach images as loop block devices and map partitions with dm.
_OPERATION_DEVICES: dict[str, list[tuple[str, str]]] = {
    "inspect": [],
    "convert": [],
    "validate": [],
    "offline_fix": [
        ("/dev/loop-control", "rw"),
        ("block-loop", "rwm"),
        ("block-blkext", "rwm"),   # partitions of loop devices (loopNpM) use the blkext major
        ("/dev/mapper/control", "rw"),
        ("block-device-mapper", "rwm"),
    ],
}

_ESCAPE_KEEP = set(string.ascii_letters + string.digits + ":_.")


def systemd_escape(text: str) -> str:
    """Escape text as `systemd-escape` does: "/" becomes "-", other unsafe bytes (and a leading ".")
    become \\xNN."""
    out: list[str] = []
    for index, byte in enumerate(text.encode()):
        char = chr(byte)
        if char == "/":
            out.append("-")
        elif char in _ESCAPE_KEEP and not (index == 0 and char == "."):
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def unit_name(job_id: str, attempt: int) -> str:
    return f"{UNIT_PREFIX}{systemd_escape(job_id)}-{attempt}.service"


def unit_object_path(unit: str) -> str:
    """The D-Bus object path systemd gives a unit (sd_bus_path_encode's label escaping)."""
    label = "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in unit) or "_"
    return UNIT_PATH_PREFIX + label


def control_group(manager_root: str, slice_name: str, unit: str) -> str:
    """The cgroup systemd gives a unit in a slice: "a-b.slice" nests as a.slice/a-b.slice."""
    parts = slice_name.removesuffix(".slice").split("-")
    slices = ["-".join(parts[:i + 1]) + ".slice" for i in range(len(parts))] if slice_name != "-.slice" else []
    return "/".join([manager_root.rstrip("/"), *slices, unit]) if manager_root.strip("/") else "/" + "/".join([*slices, unit])


def run_dir(config: Config, unit: str) -> Path:
    return config.runs_dir / unit


def devices_for(operation: str) -> list[tuple[str, str]]:
    return list(_OPERATION_DEVICES.get(operation, []))


def _under(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def writable_output_dir(config: Config, output_path: str) -> Path | None:
    """The directory, resolved, that the worker must be able to write its output in: the output path itself
    if it is a directory, else the output's directory (for no output path, the first output root). None
    (nothing writable) unless it is there and lies inside an output root: the path is the submitter's, and a
    symlink swapped in since submission must not open /etc to the unit, nor a directory renamed away a whole
    output root (the worker refuses an output directory that is not there)."""
    if not output_path:
        # No path given: the worker makes the job a directory in the first output root (if it is there).
        first = next(iter(config.output_roots), None)
        return first.resolve() if first is not None and first.is_dir() else None
    path = Path(output_path)
    directory = path if path.is_dir() and not path.is_symlink() else path.parent
    return _inside_output_roots(config, directory) if directory.is_dir() else None


def _writable_source_dir(config: Config, source_path: str) -> Path | None:
    """offline_fix edits its image in place: the image's directory, resolved, if inside an output root."""
    return _inside_output_roots(config, Path(source_path).parent)


def _inside_output_roots(config: Config, directory: Path) -> Path | None:
    resolved = directory.resolve()
    return resolved if any(_under(resolved, root) for root in config.output_roots) else None


def worker_environment(config: Config) -> dict[str, str]:
    """The unit's environment: the configured variables, plus a PATH that finds this Python's
    scripts (h2k-worker) and a PYTHONPATH that finds this h2kd, unless configured otherwise."""
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin",
                                   "/sbin", "/bin"])
    env["PYTHONPATH"] = str(Path(h2kd.__file__).resolve().parent.parent)
    env.update(config.worker_environment)
    return env


_PYTHON = re.compile(r"python3?(\.\d+)?")


def worker_argv(config: Config) -> list[str]:
    """The worker's command: the configured one, with Python's -S added when it runs the worker module
    with a Python interpreter (`python -m h2kd.worker`). The worker needs nothing from site-packages (it
    finds h2kd through PYTHONPATH), and `site` with a virtualenv's .pth files costs 20-40 ms of every
    job's start; in the rare case that needs a site package (a spec to check itself), the worker adds
    the site directories then."""
    command = list(config.worker_command)
    if (len(command) >= 3 and _PYTHON.fullmatch(os.path.basename(command[0]))
            and command[1:3] == ["-m", "h2kd.worker"]):
        command.insert(1, "-S")
    return command


def _in_tmp(path: str | Path) -> bool:
    return any(_under(Path(path), Path(tmp)) for tmp in ("/tmp", "/var/tmp"))


# Where a unit's end, as systemd saw it, is written in the attempt's directory: "<SERVICE_RESULT> <EXIT_CODE>
# <EXIT_STATUS>" (systemd.exec(5)), by an ExecStopPost= command. A worker stopped by systemd writes "cancelled"
# whatever the reason (it cannot tell); h2kd, when away as the unit ended, learns the reason from this file: a
# kill for lack of memory, or systemd's own time limit, is no cancel.
UNIT_ENDED_NAME = "unit-ended"


def unit_ended_command(run_directory: Path) -> list[str]:
    """The ExecStopPost= command that writes UNIT_ENDED_NAME (systemd expands no $NAME inside a word)."""
    target = str(run_directory / UNIT_ENDED_NAME)
    return ["/bin/sh", "-c", 'echo "$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS" > "$0"', target]


def build_properties(config: Config, *, job_id: str, attempt: int, operation: str, spec_path: Path,
                     result_path: Path, output_path: str, source_path: str, timeout_seconds: int,
                     notify_socket_dir: str | None = None, fixes_guest: bool = False,
                     owner: int = 0) -> list[tuple[str, Variant]]:
    """StartTransientUnit's property list for one attempt of one job.

    fixes_guest: the attempt repairs a guest's disk (offline_fix, or convert with offline_fix), so it
    gets loop and device-mapper devices; offline_fix edits the image in place, so its directory is writable.
    """
    command = [*worker_argv(config), "--spec", str(spec_path), "--result", str(result_path)]
    env = worker_environment(config)
    output_dir = writable_output_dir(config, output_path) if operation == "convert" else None
    writable = [str(spec_path.parent)] + ([str(output_dir)] if output_dir else [])
    if operation == "offline_fix" and source_path and (image_dir := _writable_source_dir(config, source_path)):
        writable.append(str(image_dir))
    props: list[tuple[str, Variant]] = [
        ("Description", Variant("s", f"h2kd {operation} job {job_id} (attempt {attempt})")),
        ("Slice", Variant("s", config.slice)),
        ("Type", Variant("s", "notify")),
        ("NotifyAccess", Variant("s", "main")),
        ("ExecStart", Variant("a(sasb)", [[command[0], command, False]])),
        # true: its failure changes nothing of how the unit ended
        ("ExecStopPost", Variant("a(sasb)", [["/bin/sh", unit_ended_command(spec_path.parent), True]])),
        ("Environment", Variant("as", [f"{k}={v}" for k, v in sorted(env.items())])),
        ("WorkingDirectory", Variant("s", str(spec_path.parent))),
        # What the unit prints may quote a guest (a file name, a program's last words): a "<0>" at a line's start
        # must not make it an emergency, which journald shows on every terminal.
        ("SyslogLevelPrefix", Variant("b", False)),
        # As h2kd's own entries for the job have them: `journalctl H2K_OWNER_UID=1000` finds the units' lines too.
        ("LogExtraFields", Variant("aay", [f"H2K_JOB_ID={job_id}".encode(), f"H2K_ATTEMPT={attempt}".encode(),
                                            f"H2K_OPERATION={operation}".encode(),
                                            f"H2K_OWNER_UID={owner}".encode()])),
        ("CollectMode", Variant("s", "inactive-or-failed")),
        ("RuntimeMaxUSec", Variant("t", runtime_limit(timeout_seconds) * 1_000_000)),
        # Up to READY the worker has the same budget, not systemd's 90 s: a start that slow (a host under heavy
        # load) is the job running out of its time, not a stop (h2kd tells the two apart by the time taken).
        ("TimeoutStartUSec", Variant("t", runtime_limit(timeout_seconds) * 1_000_000)),
        ("DevicePolicy", Variant("s", "closed")),
        ("DeviceAllow", Variant("a(ss)", [list(d) for d in devices_for("offline_fix" if fixes_guest else operation)])),
        ("ProtectSystem", Variant("s", "strict")),
        ("ReadWritePaths", Variant("as", writable)),
        ("ProtectHome", Variant("s", "read-only")),
        ("PrivateNetwork", Variant("b", True)),
        ("NoNewPrivileges", Variant("b", True)),
        ("RestrictRealtime", Variant("b", True)),
        ("LockPersonality", Variant("b", True)),
        ("SystemCallFilter", Variant("(bas)", [False, list(denied_system_calls(fixes_guest))])),
        ("SystemCallErrorNumber", Variant("i", errno.EPERM)),   # a denied call fails; its caller is not killed
        ("KillMode", Variant("s", "mixed")),
        ("TimeoutStopUSec", Variant("t", (REPAIR_STOP_TIMEOUT_SECONDS if fixes_guest else STOP_TIMEOUT_SECONDS)
                                    * 1_000_000)),
        ("SendSIGKILL", Variant("b", True)),
        ("TasksMax", Variant("t", TASKS_MAX)),
    ]
    if not fixes_guest:
        # A guest repair runs the guest's own programs (an i386 guest's are 32-bit), and its volume groups may
        # need device-mapper targets (dm-thin-pool, dm-raid) loaded as they are activated: it keeps both, and
        # root's capabilities, sockets (netlink, for udev and LVM) and set-id files of its tools.
        props += [("ProtectKernelModules", Variant("b", True)),
                  ("SystemCallArchitectures", Variant("as", ["native"])),
                  ("CapabilityBoundingSet", Variant("t", WORKER_CAPABILITY_MASK)),
                  ("RestrictAddressFamilies", Variant("(bas)", [True, ["AF_UNIX"]])),   # sd_notify, the journal
                  ("RestrictSUIDSGID", Variant("b", True)),
                  # /proc/sys and /sys read-only: root needs no capability to set kernel.core_pattern, which runs a
                  # program as root outside every sandbox. (Said path by path: ProtectKernelTunables= also hides
                  # parts of /proc, and units with it failed to start, 226/NAMESPACE, in the test stack.)
                  ("ReadOnlyPaths", Variant("as", ["/proc/sys", "/sys"]))]
    # PrivateTmp=yes mounts a fresh /tmp and /var/tmp over the real ones. Anything the worker needs
    # below them (its files, the image, the notify socket of a manager whose runtime directory lives
    # there, as in test sandboxes) would vanish, so it is used only when nothing needed is there.
    needed = [spec_path, source_path, output_path, *command[:1], *env.get("PYTHONPATH", "").split(os.pathsep),
              notify_socket_dir or ""]
    if not any(p and _in_tmp(p) for p in needed):
        props.append(("PrivateTmp", Variant("b", True)))
    return props
