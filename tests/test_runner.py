"""SystemdRunner against a real systemd user manager (and journald) started through h2kd.sandbox.systemd.

The workers are small Python scripts written here; they speak the worker contract (READY=1, STATUS=,
result file, exit codes, SIGTERM -> 143). The runner's events go to a recording double.
"""

from __future__ import annotations

import asyncio
import errno
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import pytest

import h2kd
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from images import disk_difference
from h2kd.config import Config
from h2kd.manager.ports import StartUnanswered, StartWithdrawn, UnitOutcome
from h2kd.model.job import Job
from h2kd.runner import SystemdRunner
from h2kd.runner import systemd as systemd_runner
from h2kd.runner.unit import runtime_limit, unit_name
from h2kd.sandbox.cgroup import pid1_cgroup
from h2kd.sandbox.systemd import ManagerHandle, journal_socket_live, start_journald, start_user_manager

WORKER_SCRIPT = r'''
import json, os, signal, sys, time
from pathlib import Path
from systemd import daemon

mode = sys.argv[1]
spec_path = Path(sys.argv[sys.argv.index("--spec") + 1])
result_path = Path(sys.argv[sys.argv.index("--result") + 1])
spec = json.loads(spec_path.read_text())
run_dir = spec_path.parent
with open(run_dir / "starts", "a") as f:
    f.write(f"{os.getpid()}\n")

def result(status, error=None):
    data = {"status": status, "outputs": {}, "metrics": {"execution_seconds": 0.1, "bytes_read": 0,
            "bytes_written": 0}, "error": error, "worker": "test", "attempt": spec["attempt"]}
    tmp = result_path.with_name("result.json.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, result_path)

def on_term(signum, frame):
    print("stopping on SIGTERM", flush=True)
    result("cancelled", {"phase": "run", "code": "CANCELLED", "message": "stopped", "retryable": False})
    sys.exit(143)

signal.signal(signal.SIGTERM, on_term)
daemon.notify("READY=1")
if mode == "progress":
    for i in range(8):
        daemon.notify(f"STATUS=convert: {i * 12.5:.2f}% ({i}/8 bytes) step {i}")
        time.sleep(0.12)
    result("completed")
elif mode == "fail":
    for i in range(20):
        print(f"worker line {i}")
    print("fatal: the disk exploded", file=sys.stderr)
    sys.exit(3)
elif mode == "wait":
    daemon.notify("STATUS=waiting for go")
    deadline = time.monotonic() + 120
    while not (run_dir / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    daemon.notify("STATUS=convert: 100.00% (8/8 bytes) done")
    time.sleep(0.2)
    result("completed")
elif mode == "quick":
    result("completed")
elif mode == "latin-1":
    # What a guest's Latin-1 file read with surrogateescape gives, written as json.dumps writes it ("\\udce9").
    result_path.write_text(json.dumps({"status": "completed", "outputs": {}, "attempt": spec["attempt"],
                                       "found": {"os": b"Debian \xe9".decode("utf-8", "surrogateescape")}}))
elif mode == "guest-words":
    # A repair's failure quoting a guest program: a line that looks like a priority, a NUL and a byte not UTF-8.
    print("<0>the guest says: all hands", flush=True)
    result_path.write_text(json.dumps({"status": "failed", "attempt": spec["attempt"], "outputs": {},
                                       "error": {"phase": "offline_fix", "code": "TOOL_FAILED", "retryable": False,
                                                 "message": "update-initramfs failed: a\0b "
                                                            + b"\xff".decode("utf-8", "surrogateescape")}}))
    sys.exit(2)
elif mode == "odd-failure":
    # A worker of another version: its error a bare message, its outputs a list, a temporary files record left.
    (run_dir / "temp-files").touch()
    result_path.write_text(json.dumps({"status": "failed", "error": "qemu-img: write failed",
                                       "outputs": ["/nowhere"], "attempt": spec["attempt"]}))
    sys.exit(1)
elif mode == "killed-mid-commit":
    # Outputs A (replacing a file), C (new) and B (replacing a file) get their names, as a conversion gives them;
    # the worker is killed outright (the OOM killer, say) as it is about to rename B: before its result.
    from h2kd.operations import convert
    from h2kd.operations.tempfiles import TempFiles

    class KilledAtTheThird(TempFiles):
        noted = 0
        def note_commit(self, temp, destination, aside):
            super().note_commit(temp, destination, aside)
            KilledAtTheThird.noted += 1
            if KilledAtTheThird.noted == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    out_dir = Path(spec["spec"]["artifacts"]["output_path"]).parent
    temps = KilledAtTheThird(str(run_dir / "temp-files"))
    pairs = []
    for name in ("a.qcow2", "c.qcow2", "b.qcow2"):
        temp = temps.create(str(out_dir / name))
        Path(temp).write_bytes(b"new " + name.encode())
        pairs.append((temp, str(out_dir / name)))
    convert._commit(pairs, temps, overwrite=True, durable=False)
    result("completed")
elif mode == "exists-mid-commit":
    # Two outputs: the first gets its name, the second's was taken meanwhile (OUTPUT_EXISTS); the worker undoes
    # the first itself. Then, before h2kd settles the unit, someone makes a file of their own at the first name,
    # which ext4 gives the inode number just freed.
    from h2kd.operations import convert
    from h2kd.operations.qemuimg import OperationError
    from h2kd.operations.tempfiles import TempFiles

    out_dir = Path(spec["spec"]["artifacts"]["output_path"]).parent
    temps = TempFiles(str(run_dir / "temp-files"))
    pairs = []
    for name in ("first.qcow2", "second.qcow2"):
        temp = temps.create(str(out_dir / name))
        Path(temp).write_bytes(b"new " + name.encode())
        pairs.append((temp, str(out_dir / name)))
    (out_dir / "second.qcow2").write_bytes(b"taken meanwhile")
    try:
        convert._commit(pairs, temps, overwrite=False, durable=False)
    except OperationError:
        for temp, _ in pairs:
            Path(temp).unlink(missing_ok=True)
        (out_dir / "first.qcow2").write_bytes(b"someone else's file")
        sys.exit(1)
    result("completed")
elif mode == "fail-leaving-a-temporary":
    from h2kd.operations.tempfiles import TempFiles
    TempFiles(str(run_dir / "temp-files")).create(spec["spec"]["artifacts"]["output_path"])
    sys.exit(1)
elif mode == "leave":
    # A conversion caught mid-way: a temporary output recorded and partly written, then killed outright.
    from h2kd.operations.tempfiles import TempFiles
    temps = TempFiles(str(run_dir / "temp-files"))
    partial = temps.create(spec["spec"]["artifacts"]["output_path"])
    with open(partial, "wb") as f:
        f.write(b"partial output" * 1000)
    # And in its working directory, the attempt's own, as a dry run's unpacked copy of an image it may not write
    # beside.
    with open(temps.create(os.path.join(os.getcwd(), "image.raw")), "wb") as f:
        f.write(b"unpacked image")
    decoys = run_dir / "decoys"
    if decoys.exists():            # paths that must never be removed, recorded as a damaged record could
        with open(run_dir / "temp-files", "a") as f:
            f.write(decoys.read_text())
    daemon.notify("STATUS=left " + partial)
    time.sleep(120)
'''


class RecordingEvents:
    """The RunnerEvents double: records every call."""

    def __init__(self) -> None:
        self.statuses: list[tuple[str, int, str]] = []
        self.started_at: dict[str, int] = {}        # by job: when its unit's worker started, as last reported
        self.finished: list[tuple[str, int, UnitOutcome]] = []
        self.stopping: list[bool] = []
        self.connected = 0

    def unit_status(self, job_id: str, attempt: int, status_text: str, started_at: int = 0) -> None:
        self.statuses.append((job_id, attempt, status_text))
        self.started_at[job_id] = started_at

    def unit_finished(self, job_id: str, attempt: int, outcome: UnitOutcome) -> None:
        self.finished.append((job_id, attempt, outcome))

    def system_stopping(self, stopping: bool) -> None:
        self.stopping.append(stopping)

    def runner_connected(self) -> None:
        self.connected += 1

    def statuses_of(self, job_id: str) -> list[str]:
        return [text for jid, _, text in self.statuses if jid == job_id]

    def outcomes_of(self, job_id: str) -> list[UnitOutcome]:
        return [outcome for jid, _, outcome in self.finished if jid == job_id]

    async def wait_finished(self, job_id: str, timeout: float = 30.0) -> UnitOutcome:
        await wait_for(lambda: self.outcomes_of(job_id), timeout, what=f"unit_finished for {job_id}")
        return self.outcomes_of(job_id)[0]

    async def wait_status(self, job_id: str, text: str, timeout: float = 20.0) -> None:
        await wait_for(lambda: text in self.statuses_of(job_id), timeout, what=f"status {text!r} of {job_id}")


class Sandbox:
    def __init__(self, base: Path, manager: ManagerHandle, journald_reachable: bool):
        self.base = base
        self.manager = manager
        self.journald_reachable = journald_reachable
        self.script = base / "worker.py"
        self.script.write_text(WORKER_SCRIPT)

    def config(self, mode: str, **overrides: Any) -> Config:
        state = self.base / "state"
        values: dict[str, Any] = dict(
            state_dir=state, output_roots=[state / "output"], systemd_bus_address=self.manager.bus_address,
            worker_command=[sys.executable, str(self.script), mode], cpu_weight=40, io_weight=60)
        values.update(overrides)
        return Config(**values)

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemctl", "--user", *args], env=self.manager.systemctl_env(),
                              capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    pid1_before = pid1_cgroup()
    # Not below /tmp, so that the units get PrivateTmp= like in production.
    base = Path(tempfile.mkdtemp(prefix="h2k-runner-test-", dir="/run"))
    base.chmod(0o755)
    journald = start_journald(base / "journald.log")
    manager = start_user_manager(base / "runtime", base / "systemd.log", {})
    try:
        yield Sandbox(base, manager, journal_socket_live())
    finally:
        manager.stop()
        if journald is not None:
            journald.stop()
        shutil.rmtree(base, ignore_errors=True)
        assert pid1_cgroup() == pid1_before
        assert not manager.cgroup.dirs[0].exists()


_job_seq = 0


def make_job(operation: str = "convert", timeout: int = 120, output: str | None = None) -> Job:
    global _job_seq
    _job_seq += 1
    job_id = f"t{os.getpid()}-{_job_seq}-{time.monotonic_ns() % 100000}"
    spec = {"job_id": job_id, "operation": operation, "image": {"path": "/dev/null", "format": None, "checksum": None},
            "parameters": {}, "execution_policy": {"priority": 5, "retry_count": 0, "timeout_seconds": timeout,
                                                   "idempotent": True},
            "capability_requirements": {}, "artifacts": {"output_path": output, "keep_intermediates": False,
                                                         "overwrite": False},
            "audit": {"requested_by": "test", "ticket": "", "tags": []}}
    return Job(id=job_id, spec=spec, operation=operation, owner=0, attempt=1)


async def connected(config: Config, events: RecordingEvents) -> SystemdRunner:
    runner = SystemdRunner(config, events)
    await runner.connect()
    assert runner.reachable
    return runner


@contextlib.asynccontextmanager
async def runner_for(config: Config, events: RecordingEvents) -> AsyncIterator[SystemdRunner]:
    """A connected runner reporting to `events`, closed at the end of the block."""
    runner = await connected(config, events)
    try:
        yield runner
    finally:
        await runner.close()


async def run_unfollowed_until_collected(sandbox: "Sandbox", config: Config, job: Job) -> str:
    """Start the job's first attempt, let go of it (as h2kd stopping would), and wait until the unit has
    written its result and systemd has collected it; the unit's name."""
    first = await connected(config, RecordingEvents())
    unit = await first.start(job, 1)
    await first.close()
    await wait_for(lambda: (config.runs_dir / unit / "result.json").exists(), what="the worker's result")
    for _ in range(100):
        if await unit_properties(sandbox.manager.bus_address, unit) is None:
            return unit
        await asyncio.sleep(0.05)
    raise AssertionError("the finished unit was not collected")


async def start_waiting(runner: SystemdRunner, events: RecordingEvents, job: Job) -> str:
    """Start the job's first attempt with the "wait" worker; its unit, once the worker waits for its go file."""
    before = time.time_ns() // 1000
    unit = await runner.start(job, 1)
    await events.wait_status(job.id, "waiting for go")
    assert before <= events.started_at[job.id] <= time.time_ns() // 1000, (before, events.started_at)
    return unit


async def left_running(config: Config, job: Job) -> tuple[str, RecordingEvents]:
    """The job's first attempt started by a runner that then goes away (h2kd stopping), its unit still running
    (the "wait" worker); the unit and what that runner heard."""
    events = RecordingEvents()
    first = await connected(config, events)
    unit = await start_waiting(first, events, job)
    await first.close()
    return unit, events


async def unit_properties(address: str, unit: str) -> dict[str, Any] | None:
    """Every property of the unit (Unit and Service interfaces), or None if it is not loaded."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await bus.call(Message(destination="org.freedesktop.systemd1", path="/org/freedesktop/systemd1",
                                       interface="org.freedesktop.systemd1.Manager", member="GetUnit",
                                       signature="s", body=[unit]))
        if reply.message_type == MessageType.ERROR:
            return None
        path = reply.body[0]
        values: dict[str, Any] = {}
        for interface in ("org.freedesktop.systemd1.Unit", "org.freedesktop.systemd1.Service",
                          "org.freedesktop.systemd1.Slice"):
            reply = await bus.call(Message(destination="org.freedesktop.systemd1", path=path,
                                           interface="org.freedesktop.DBus.Properties", member="GetAll",
                                           signature="s", body=[interface]))
            if reply.message_type != MessageType.ERROR:
                values.update({k: v.value for k, v in reply.body[0].items()})
        return values
    finally:
        bus.disconnect()


async def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def manager_instance(sandbox: Sandbox) -> str:
    """The sandbox's systemd manager as busctl reads it: its UserspaceTimestamp, and "/" and its SoftRebootsCount
    where systemd has that property (256 and later)."""
    values = []
    for name in ("UserspaceTimestamp", "SoftRebootsCount"):
        got = subprocess.run(["busctl", "--user", "get-property", "org.freedesktop.systemd1",
                              "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager", name],
                             env=sandbox.manager.systemctl_env(), capture_output=True, text=True, timeout=30)
        if got.returncode == 0:
            values.append(got.stdout.split()[1])
    assert values, "the manager has no UserspaceTimestamp"
    return "/".join(values)


def starts(config: Config, unit: str) -> int:
    path = config.runs_dir / unit / "starts"
    return len(path.read_text().split()) if path.exists() else 0


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("then, now, other", [
    ("1795822599101201", "1795822599101201", False),
    ("1795822599101201", "1795822600601543", True),       # a new manager: its userspace started later
    ("1795822599101201", "1795822599101201/0", False),    # re-executed into a systemd that counts soft-reboots
    ("1795822599101201/0", "1795822599101201/1", True),   # a soft-reboot since
    ("", "1795822599101201", False), ("1795822599101201", "", False),   # not known: not judged by it
])
def test_an_attempt_is_under_another_manager_only_when_both_instances_are_known_and_differ(then, now, other) -> None:
    assert systemd_runner._other_manager(then, now) is other


@pytest.mark.parametrize("job_id", ["plain", "a/b-c.d é", ".hidden", "x y\\z", "ok_1:2"])
def test_unit_names_escape_job_ids_like_systemd_escape(job_id: str) -> None:
    escaped = subprocess.run(["systemd-escape", "--", job_id], capture_output=True, text=True, check=True).stdout.strip()
    assert unit_name(job_id, 3) == f"h2k-job-{escaped}-3.service"



def test_block_devices_are_found_from_sys_where_h2kd_has_no_device_nodes(tmp_path: Path, monkeypatch) -> None:
    """Under h2kd.service's PrivateDevices=yes, h2kd's /dev lacks loop-control, nbd0 and mapper/control; the
    job units get them, and /sys shows the drivers."""
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/sbin/{name}")
    assert systemd_runner.device_capabilities(tmp_path) == {"loop": False, "nbd": False, "dm": False}
    for sign in ("sys/class/misc/loop-control", "sys/block/nbd0", "sys/class/misc/device-mapper"):
        (tmp_path / sign).mkdir(parents=True)
    (tmp_path / "dev").mkdir()
    assert systemd_runner.device_capabilities(tmp_path) == {"loop": True, "nbd": True, "dm": True}
    # nbd loaded with nbds_max=0 has no nbd0 yet (devices are added over netlink).
    (tmp_path / "sys/block/nbd0").rmdir()
    (tmp_path / "sys/module/nbd").mkdir(parents=True)
    assert systemd_runner.device_capabilities(tmp_path)["nbd"] is True
    # device-mapper is usable only with dmsetup.
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert systemd_runner.device_capabilities(tmp_path)["dm"] is False


def test_the_builtin_worker_reports_what_sys_shows(monkeypatch) -> None:
    monkeypatch.setattr(systemd_runner, "device_capabilities",
                        lambda root=Path("/"): {"loop": True, "nbd": True, "dm": False})
    caps = SystemdRunner(Config(output_roots=[Path("/nonexistent/output")]), None).refresh()  # type: ignore[arg-type]
    assert (caps["loop"], caps["nbd"], caps["dm"]) == (True, True, False)
    assert set(caps) == {"qemu_img", "loop", "nbd", "dm", "lvm", "mount", "free_bytes"}


def test_unit_runs_with_the_properties_it_was_given(sandbox: Sandbox) -> None:
    async def scenario() -> None:
        events = RecordingEvents()
        config = sandbox.config("wait")
        output = config.output_roots[0] / "vm" / "disk.qcow2"
        output.parent.mkdir(parents=True)
        convert = make_job("convert", timeout=300, output=str(output))
        offline = make_job("offline_fix", timeout=600)
        async with runner_for(config, events) as runner:
            convert_unit = await runner.start(convert, 1)
            offline_unit = await runner.start(offline, 1)
            assert convert_unit == unit_name(convert.id, 1) == f"h2k-job-{convert.id.replace('-', chr(92) + 'x2d')}-1.service"
            await events.wait_status(convert.id, "waiting for go")
            await events.wait_status(offline.id, "waiting for go")
            props = await unit_properties(sandbox.manager.bus_address, convert_unit)
            assert props is not None
            assert props["ActiveState"] == "active"
            assert props["Slice"] == config.slice
            assert props["Type"] == "notify" and props["NotifyAccess"] == "main"
            assert props["DevicePolicy"] == "closed"
            assert props["DeviceAllow"] == []
            assert sorted(props["LogExtraFields"]) == sorted(
                [f"H2K_JOB_ID={convert.id}".encode(), b"H2K_ATTEMPT=1", b"H2K_OPERATION=convert",
                 f"H2K_OWNER_UID={convert.owner}".encode()])
            assert props["RuntimeMaxUSec"] == 330 * 1_000_000    # the job's 300 s and a tenth: the worker ends itself first
            assert props["TimeoutStartUSec"] == 330 * 1_000_000  # not systemd's 90 s to READY
            assert props["CollectMode"] == "inactive-or-failed"
            assert props["ProtectSystem"] == "strict" and props["ProtectHome"] == "read-only"
            assert props["PrivateNetwork"] is True and props["NoNewPrivileges"] is True
            assert props["ProtectKernelModules"] is True
            assert props["RestrictRealtime"] is True and props["LockPersonality"] is True
            assert props["SystemCallArchitectures"] == ["native"]
            allow_listed, calls = props["SystemCallFilter"]
            assert allow_listed is False and {"ptrace", "init_module", "reboot", "swapon", "settimeofday"} <= set(calls)
            # A private /tmp would hide what the unit needs from there (this checkout, when it lives in /tmp).
            source_in_tmp = Path(h2kd.__file__).resolve().is_relative_to("/tmp")
            assert props["PrivateTmp"] is (not source_in_tmp and not str(config.runs_dir).startswith("/tmp"))
            assert props["KillMode"] == "mixed" and props["SendSIGKILL"] is True
            assert props["TimeoutStopUSec"] == 30 * 1_000_000
            assert props["TasksMax"] == 1024 and props["RestrictSUIDSGID"] is True
            assert sorted(props["ReadOnlyPaths"]) == ["/proc/sys", "/sys"]
            assert tuple(props["RestrictAddressFamilies"]) == (True, ["AF_UNIX"])
            # What the worker really runs with, read from its process: only the capabilities it needs (those
            # of h2kd.service), and /proc/sys read-only.
            worker_pid = props["MainPID"]
            status = Path(f"/proc/{worker_pid}/status").read_text()
            bounding = int(re.search(r"^CapBnd:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
            assert bounding == sum(1 << n for n in (0, 1, 2, 3, 5, 6, 7)), hex(bounding)  # CHOWN..FOWNER, KILL, SETGID/UID
            mounts = Path(f"/proc/{worker_pid}/mountinfo").read_text().splitlines()
            assert any(line.split()[4] == "/proc/sys" and "ro" in line.split()[5].split(",") for line in mounts)
            assert sorted(props["ReadWritePaths"]) == sorted([str(config.runs_dir / convert_unit), str(output.parent)])
            exec_start = props["ExecStart"][0]
            assert exec_start[1] == [*config.worker_command, "--spec", str(config.runs_dir / convert_unit / "spec.json"),
                                     "--result", str(config.runs_dir / convert_unit / "result.json")]
            spec_file = json.loads((config.runs_dir / convert_unit / "spec.json").read_text())
            assert spec_file == {"job_id": convert.id, "job_created_at": convert.created_at, "attempt": 1, "spec": convert.spec, "spec_checked": True,
                                 "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                                 "manager_instance": manager_instance(sandbox),
                                 "output_roots": [str(config.output_roots[0])],
                                 "source_roots": [str(root) for root in config.source_roots],
                                 "owner": {"uid": convert.owner, "gid": 0, "mode": 0o640, "directory_mode": 0o700,
                                           "groups": []},
                                 "source_identity": convert.source_identity,
                                 # the runner's first attempt: the last CPU (h2kd.runner.placement)
                                 "cpu": os.cpu_count() - 1}
            # The second, the CPU before it (the same one on a machine of one CPU).
            assert json.loads((config.runs_dir / offline_unit / "spec.json").read_text())["cpu"] == \
                max(os.cpu_count() - 2, 0)

            offline_props = await unit_properties(sandbox.manager.bus_address, offline_unit)
            assert offline_props is not None
            allowed = {device for device, _ in offline_props["DeviceAllow"]}
            assert {"/dev/loop-control", "block-loop", "block-device-mapper"} <= allowed
            assert "block-nbd" not in allowed     # the repair attaches loop devices only
            assert offline_props["TimeoutStopUSec"] == 120 * 1_000_000   # deactivating volume groups takes time
            assert offline_props["TasksMax"] == 1024
            assert offline_props["RuntimeMaxUSec"] == 660 * 1_000_000
            # A guest repair runs the guest's (maybe 32-bit) programs and may load device-mapper targets.
            assert offline_props["ProtectKernelModules"] is False
            assert offline_props["SystemCallArchitectures"] == []
            assert "init_module" not in offline_props["SystemCallFilter"][1]
            assert {"ptrace", "reboot"} <= set(offline_props["SystemCallFilter"][1])
            assert offline_props["SystemCallErrorNumber"] == errno.EPERM == props["SystemCallErrorNumber"]

            slice_props = await unit_properties(sandbox.manager.bus_address, config.slice)
            assert slice_props is not None
            assert slice_props["CPUWeight"] == 40 and slice_props["IOWeight"] == 60

            caps = runner.capabilities()
            assert caps["qemu_img"] == (shutil.which("qemu-img") is not None)
            assert caps["loop"] == any(map(os.path.exists, ("/sys/class/misc/loop-control", "/dev/loop-control")))
            assert caps["nbd"] == any(map(os.path.exists, ("/sys/block/nbd0", "/sys/module/nbd", "/dev/nbd0")))
            assert caps["free_bytes"][str(config.output_roots[0])] > 0
            for job, unit in ((convert, convert_unit), (offline, offline_unit)):
                (config.runs_dir / unit / "go").touch()
                outcome = await events.wait_finished(job.id)
                assert (outcome.result, outcome.exit_status) == ("success", 0)
                assert outcome.worker_result is not None and outcome.worker_result["status"] == "completed"

    asyncio.run(scenario())


def test_the_slice_keeps_its_own_or_an_administrators_weights_unless_h2kd_is_given_some(sandbox: Sandbox) -> None:
    async def weights(slice_name: str) -> tuple[int, int]:
        props = await unit_properties(sandbox.manager.bus_address, slice_name)
        assert props is not None, f"{slice_name} is gone"
        return props["CPUWeight"], props["IOWeight"]

    async def scenario() -> None:
        events = RecordingEvents()
        config = sandbox.config("wait", slice="h2k-weighed.slice", cpu_weight=None, io_weight=None)
        async with runner_for(config, events):   # a missing slice is made with h2k.slice's weights
            assert await weights(config.slice) == (50, 50)
        changed = sandbox.systemctl("set-property", "--runtime", config.slice, "CPUWeight=70")
        assert changed.returncode == 0, changed.stderr
        async with runner_for(config, events):
            assert await weights(config.slice) == (70, 50)
        async with runner_for(sandbox.config("wait", slice=config.slice, cpu_weight=None, io_weight=20), events):
            assert await weights(config.slice) == (70, 20)

    asyncio.run(scenario())


def test_status_updates_arrive_in_order_and_success_is_reported(sandbox: Sandbox) -> None:
    async def scenario() -> None:
        events = RecordingEvents()
        job = make_job()
        async with runner_for(sandbox.config("progress"), events) as runner:
            unit = await runner.start(job, 1)
            outcome = await events.wait_finished(job.id)
        expected = [f"convert: {i * 12.5:.2f}% ({i}/8 bytes) step {i}" for i in range(8)]
        assert events.statuses_of(job.id) == expected
        assert outcome.unit == unit
        assert (outcome.result, outcome.exit_status, outcome.stopped_by_request) == ("success", 0, False)
        assert outcome.worker_result is not None and outcome.worker_result["status"] == "completed"
        assert len(events.finished) == 1

    asyncio.run(scenario())


def test_failing_worker_reports_exit_code_and_log_tail(sandbox: Sandbox) -> None:
    async def scenario() -> None:
        events = RecordingEvents()
        job = make_job()
        async with runner_for(sandbox.config("fail"), events) as runner:
            await runner.start(job, 1)
            outcome = await events.wait_finished(job.id)
            await asyncio.sleep(0.5)
        assert (outcome.result, outcome.exit_status) == ("exit-code", 3)
        assert outcome.worker_result is None
        assert len(events.outcomes_of(job.id)) == 1
        if not sandbox.journald_reachable:
            pytest.skip("no journald reachable: the log tail cannot be checked")
        assert len(outcome.log_tail) == 15
        assert "fatal: the disk exploded" in outcome.log_tail
        assert "worker line 19" in outcome.log_tail
        assert "worker line 0" not in outcome.log_tail

    asyncio.run(scenario())


def hanging_journalctl(tmp_path: Path, monkeypatch) -> Path:
    """A journalctl first on PATH that never answers (as one reading a journal on a hung disk); the file it
    writes its pid to once it runs."""
    bin_dir, pid_file = tmp_path / "bin", tmp_path / "journalctl.pid"
    bin_dir.mkdir()
    hanging = bin_dir / "journalctl"
    hanging.write_text(f"#!/bin/sh\necho $$ > {pid_file}.part && mv {pid_file}.part {pid_file}\nexec sleep 120\n")
    hanging.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return pid_file


def still_running(pid: int, parent: int) -> bool:
    """Whether our child `pid` is still there (running, or not yet reaped) as the child of `parent`; ended now if
    it is. A pid whose process was reaped may be another's since: that one is neither counted nor killed."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if int(stat[1]) != parent:
        return False
    os.kill(pid, signal.SIGKILL)
    return True


async def started_pid(pid_file: Path) -> int:
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the runner never read the failed unit's journal"
        await asyncio.sleep(0.05)
    return int(pid_file.read_text())


def test_a_journal_read_that_hangs_is_ended_when_the_runner_stops(sandbox: Sandbox, tmp_path: Path,
                                                                  monkeypatch) -> None:
    """The log tail of a failed unit comes from journalctl; one that never answers must not outlive h2kd's stop."""
    pid_file = hanging_journalctl(tmp_path, monkeypatch)

    async def scenario() -> None:
        events = RecordingEvents()
        async with runner_for(sandbox.config("fail"), events) as runner:
            await runner.start(make_job(), 1)
            pid = await started_pid(pid_file)
        assert not still_running(pid, os.getpid()), "journalctl was left running (or unreaped) after the runner stopped"

    asyncio.run(scenario())


def test_a_journal_read_that_hangs_is_given_up_and_the_outcome_reported(sandbox: Sandbox, tmp_path: Path,
                                                                        monkeypatch) -> None:
    pid_file = hanging_journalctl(tmp_path, monkeypatch)
    monkeypatch.setattr(systemd_runner, "LOG_TAIL_READ_SECONDS", 0.5)

    async def scenario() -> None:
        events = RecordingEvents()
        job = make_job()
        async with runner_for(sandbox.config("fail"), events) as runner:
            await runner.start(job, 1)
            pid = await started_pid(pid_file)
            outcome = await events.wait_finished(job.id)
            assert (outcome.result, outcome.exit_status, outcome.log_tail) == ("exit-code", 3, [])
            assert not still_running(pid, os.getpid()), "journalctl was left running after its read was given up"

    asyncio.run(scenario())


def test_stop_ends_the_unit_and_says_it_was_requested(sandbox: Sandbox) -> None:
    async def scenario() -> None:
        events = RecordingEvents()
        job = make_job()
        async with runner_for(sandbox.config("wait"), events) as runner:
            unit = await start_waiting(runner, events, job)
            await runner.stop(unit)
            outcome = await events.wait_finished(job.id)
        assert outcome.stopped_by_request is True
        # The worker exits 143 after SIGTERM; systemd counts that as a failed exit, not a clean stop.
        assert (outcome.result, outcome.exit_status) == ("exit-code", 143)
        if sandbox.journald_reachable:
            assert outcome.log_tail[-1:] == ["stopping on SIGTERM"]
        assert outcome.worker_result is not None and outcome.worker_result["status"] == "cancelled"
        assert await unit_properties(sandbox.manager.bus_address, unit) is None

    asyncio.run(scenario())


def test_a_unit_that_ends_while_it_is_being_checked_is_reported_as_it_ended(sandbox: Sandbox) -> None:
    """A check reads the unit's two property sets one after the other. When the unit dies (and is collected)
    between the two, the signals telling its end arrive meanwhile: they, not the check's older values, say how
    it ended."""
    async def scenario() -> None:
        events = RecordingEvents()
        job = make_job()
        async with runner_for(sandbox.config("wait"), events) as runner:
            unit = await start_waiting(runner, events, job)
            real_call = runner._call
            armed = True

            async def call_with_the_unit_dying_midway(destination, path, interface, member, signature, body):
                nonlocal armed
                if armed and member == "GetAll" and body == [systemd_runner.SERVICE_IFACE]:
                    armed = False
                    killed = await asyncio.to_thread(sandbox.systemctl, "kill", "--signal=KILL", unit)
                    assert killed.returncode == 0, killed.stderr
                    await wait_for(lambda: sandbox.systemctl("show", "-P", "LoadState", unit).stdout.strip()
                                   == "not-found", what=f"{unit} collected")
                    await asyncio.sleep(0.2)        # its last signals read
                return await real_call(destination, path, interface, member, signature, body)

            runner._call = call_with_the_unit_dying_midway
            await runner.reattach(job)              # a check, as after a restart
            outcome = await events.wait_finished(job.id)
        assert (outcome.result, outcome.exit_status) == ("signal", signal.SIGKILL)
        assert len(events.outcomes_of(job.id)) == 1

    asyncio.run(scenario())


def test_signals_claiming_to_be_systemds_from_anyone_else_are_ignored(sandbox: Sandbox) -> None:
    """Anyone on the bus may send h2kd's systemd connection a PropertiesChanged for a job's unit (its path is
    public): a forged status or end is not taken for systemd's."""
    from dbus_fast import Variant
    from h2kd.runner.unit import unit_object_path

    async def scenario() -> None:
        events = RecordingEvents()
        job = make_job()
        async with runner_for(sandbox.config("wait"), events) as runner:
            unit = await start_waiting(runner, events, job)
            forger = await MessageBus(bus_address=sandbox.manager.bus_address).connect()
            try:
                changed = {"StatusText": Variant("s", "convert: 100.00% (1/1 bytes) forged"),
                           "ActiveState": Variant("s", "failed"), "Result": Variant("s", "timeout")}
                # Sent to the runner's connection itself: such a signal passes every match rule. (Its unique
                # name is public on a real bus; here the runner is in this process, so it is read off it.)
                await forger.send(Message(message_type=MessageType.SIGNAL, destination=runner._bus.unique_name,
                                          path=unit_object_path(unit), interface="org.freedesktop.DBus.Properties",
                                          member="PropertiesChanged", signature="sa{sv}as",
                                          body=["org.freedesktop.systemd1.Unit", changed, []]))
                await asyncio.sleep(1.0)
            finally:
                forger.disconnect()
            assert not any("forged" in s for s in events.statuses_of(job.id)), events.statuses_of(job.id)
            assert events.outcomes_of(job.id) == [], "a forged end was taken for the unit's"
            await runner.stop(unit)
            outcome = await events.wait_finished(job.id)
        assert outcome.stopped_by_request is True and outcome.result != "timeout"

    asyncio.run(scenario())


def test_administrator_stop_is_reported_faithfully_not_as_ours(sandbox: Sandbox) -> None:
    async def scenario() -> None:
        events = RecordingEvents()
        job = make_job()
        async with runner_for(sandbox.config("wait"), events) as runner:
            unit = await start_waiting(runner, events, job)
            stopped = await asyncio.to_thread(sandbox.systemctl, "stop", unit)
            assert stopped.returncode == 0, stopped.stderr
            outcome = await events.wait_finished(job.id)
        assert outcome.stopped_by_request is False
        assert (outcome.result, outcome.exit_status) == ("exit-code", 143)
        assert outcome.worker_result is not None and outcome.worker_result["status"] == "cancelled"

    asyncio.run(scenario())


def test_runtime_max_hit_is_a_timeout(sandbox: Sandbox) -> None:
    async def scenario() -> None:
        events = RecordingEvents()
        job = make_job(timeout=1)
        async with runner_for(sandbox.config("wait"), events) as runner:
            began = time.monotonic()
            await runner.start(job, 1)
            outcome = await events.wait_finished(job.id, timeout=20)
            took = time.monotonic() - began
        assert (outcome.result, outcome.exit_status) == ("timeout", 143)
        assert outcome.stopped_by_request is False
        # How long the worker ran, by systemd's monotonic clock: what tells the job's timeout from a stop.
        assert runtime_limit(1) * 1_000_000 <= outcome.ran_usec <= took * 1_000_000, (outcome.ran_usec, took)

    asyncio.run(scenario())


def test_a_new_runner_reattaches_to_a_running_unit_without_starting_it_again(sandbox: Sandbox) -> None:
    async def scenario() -> None:
        config = sandbox.config("wait")
        job = make_job()
        unit, first_events = await left_running(config, job)
        job.unit = unit
        events = RecordingEvents()
        async with runner_for(config, events) as second:
            await second.reattach(job)
            await asyncio.sleep(0.3)
            assert events.finished == []
            (config.runs_dir / unit / "go").touch()
            outcome = await events.wait_finished(job.id)
            await asyncio.sleep(0.3)
        assert "convert: 100.00% (8/8 bytes) done" in events.statuses_of(job.id)
        assert (outcome.result, outcome.exit_status) == ("success", 0)
        assert outcome.worker_result is not None and outcome.worker_result["status"] == "completed"
        assert len(events.finished) == 1 and first_events.finished == []
        assert starts(config, unit) == 1

    asyncio.run(scenario())


def test_reattach_after_the_unit_finished_settles_from_the_result_file(sandbox: Sandbox) -> None:
    async def scenario() -> None:
        config = sandbox.config("quick")
        job = make_job()
        before = time.time_ns() // 1000
        unit = await run_unfollowed_until_collected(sandbox, config, job)

        job.unit = unit
        events = RecordingEvents()
        never = make_job()          # an attempt that never got as far as a unit
        never.unit = unit_name(never.id, 1)
        async with runner_for(config, events) as second:
            await second.reattach(job)
            await second.reattach(never)
            outcome = await events.wait_finished(job.id)
            lost = await events.wait_finished(never.id)
        assert (outcome.result, outcome.exit_status) == ("success", 0)
        assert outcome.worker_result == json.loads((config.runs_dir / unit / "result.json").read_text())
        # Collected while no runner followed it: when it started and ended is read from the attempt's files.
        # (File times come from the kernel's coarse clock: a few milliseconds behind.)
        assert before - 10_000 <= outcome.started_at <= outcome.ended_at, (before, outcome)
        assert starts(config, unit) == 1
        assert lost.result == "not-started" and lost.worker_result is None

    asyncio.run(scenario())


def test_an_attempt_whose_result_file_h2kd_cannot_make_sense_of_still_ends(sandbox: Sandbox) -> None:
    """Read after a restart, a result file of unexpected shape (a worker of another version, a damaged file)
    still ends the attempt, as a failure: the job neither hangs nor holds its slot."""
    async def scenario() -> None:
        config = sandbox.config("odd-failure")
        job = make_job()
        unit = await run_unfollowed_until_collected(sandbox, config, job)
        job.unit = unit
        events = RecordingEvents()
        async with runner_for(config, events) as second:
            await second.reattach(job)
            outcome = await events.wait_finished(job.id)
        assert (outcome.result, outcome.exit_status) == ("exit-code", 1)
        assert outcome.worker_result is not None and outcome.worker_result["error"] == "qemu-img: write failed"

    asyncio.run(scenario())


def test_a_guest_quoted_in_a_failure_can_neither_break_the_bus_nor_set_a_journal_priority(sandbox: Sandbox) -> None:
    """A NUL in the error message made the job's properties, and everyone's GetManagedObjects, unsendable; a line
    starting "<0>" became an emergency, which journald shows on every terminal."""
    async def scenario() -> None:
        events = RecordingEvents()
        job = make_job()
        async with runner_for(sandbox.config("guest-words"), events) as runner:
            await runner.start(job, 1)
            outcome = await events.wait_finished(job.id)
        assert outcome.worker_result is not None
        assert outcome.worker_result["error"]["message"] == "update-initramfs failed: a\\x00b \ufffd"
        if not sandbox.journald_reachable:
            pytest.skip("no journald reachable: the unit's lines cannot be checked")
        assert "<0>the guest says: all hands" in outcome.log_tail

    asyncio.run(scenario())


def test_text_of_a_result_that_is_not_unicode_reaches_h2kd_as_replacement_characters(sandbox: Sandbox) -> None:
    """A result holding bytes that are not UTF-8 (lone surrogates) could be neither stored nor sent on the bus."""
    async def scenario() -> None:
        events = RecordingEvents()
        job = make_job()
        async with runner_for(sandbox.config("latin-1"), events) as runner:
            await runner.start(job, 1)
            outcome = await events.wait_finished(job.id)
        assert outcome.result == "success"
        assert outcome.worker_result is not None and outcome.worker_result["found"] == {"os": "Debian \ufffd"}
        json.dumps(outcome.worker_result, ensure_ascii=False).encode("utf-8")   # valid Unicode throughout

    asyncio.run(scenario())


def test_an_attempt_is_reported_ended_once_whatever_fails_while_its_end_is_read(sandbox: Sandbox,
                                                                                 monkeypatch) -> None:
    async def broken(self, followed, worker_result):
        raise OSError(errno.EIO, "Input/output error")

    async def scenario() -> None:
        events = RecordingEvents()
        job = make_job()
        async with runner_for(sandbox.config("quick"), events) as runner:
            monkeypatch.setattr(SystemdRunner, "_remove_leftovers", broken)
            await runner.start(job, 1)
            outcome = await events.wait_finished(job.id)
            await asyncio.sleep(0.3)
        assert (outcome.result, outcome.worker_result) == ("unknown", None)
        assert len(events.outcomes_of(job.id)) == 1

    asyncio.run(scenario())


def test_a_connection_made_while_the_runner_closes_starts_nothing(sandbox: Sandbox) -> None:
    """h2kd is stopping (close() waits for a directory's removal) when its reconnect to systemd succeeds: the
    runner stays closed, so the manager is not told to start queued jobs during the shutdown."""
    async def scenario() -> None:
        events = RecordingEvents()
        runner = await connected(sandbox.config("wait"), events)
        removal = asyncio.get_running_loop().create_future()
        runner._removals[Path("/nonexistent/removal")] = removal      # a removal still under way
        closing = asyncio.create_task(runner.close())
        await asyncio.sleep(0.1)
        await runner.connect()                  # the reconnect, done just now
        assert events.connected == 1 and not runner.reachable
        removal.set_result(None)
        await closing
        assert not runner.reachable

    asyncio.run(scenario())


def test_an_earlier_jobs_files_under_the_same_id_never_settle_a_new_attempt(sandbox: Sandbox) -> None:
    """A job id can be chosen again once its job is removed. If h2kd stops after recording the new job's first
    attempt but before starting its unit, the attempt's directory still holds the earlier job's files: the
    new attempt never started, whatever the earlier result says. Started, it does not find that result."""
    async def scenario() -> None:
        config = sandbox.config("quick")
        earlier = make_job()
        unit = await run_unfollowed_until_collected(sandbox, config, earlier)
        assert json.loads((config.runs_dir / unit / "result.json").read_text())["status"] == "completed"

        again = dataclasses.replace(earlier, created_at=earlier.created_at + 1, unit=unit)
        events = RecordingEvents()
        async with runner_for(config, events) as second:
            await second.reattach(again)
            outcome = await events.wait_finished(again.id)
        assert outcome.result == "not-started" and outcome.worker_result is None
        assert starts(config, unit) == 1

        events = RecordingEvents()
        async with runner_for(sandbox.config("wait"), events) as third:
            assert await start_waiting(third, events, again) == unit
            # The worker waits for its go file, so no result of its own yet: the earlier one went at the start.
            assert not (config.runs_dir / unit / "result.json").exists()
            (config.runs_dir / unit / "go").touch()
            outcome = await events.wait_finished(again.id)
        assert outcome.result == "success" and outcome.worker_result["status"] == "completed", outcome

    asyncio.run(scenario())


def test_a_unit_systemd_ended_at_its_time_limit_while_h2kd_was_away_is_a_timeout_not_a_cancel(
        sandbox: Sandbox) -> None:
    """A worker stopped by systemd says "cancelled" whatever the reason. Its unit ended by systemd's own time limit
    (or for lack of memory) while h2kd was away: the attempt's files still tell how, and the outcome is systemd's
    "timeout" (which the manager retries), not a stop by someone (which it would not)."""
    async def scenario() -> None:
        config = sandbox.config("wait")
        job = make_job(timeout=1)        # systemd's limit: the job's 1 s and a margin of 5
        unit, _ = await left_running(config, job)
        ended = config.runs_dir / unit / "unit-ended"
        await wait_for(ended.exists, timeout=30, what="the unit's end recorded")
        assert ended.read_text().split()[0] == "timeout"
        for _ in range(100):
            if await unit_properties(sandbox.manager.bus_address, unit) is None:
                break
            await asyncio.sleep(0.05)
        job.unit = unit
        events = RecordingEvents()
        async with runner_for(config, events) as second:
            await second.reattach(job)
            outcome = await events.wait_finished(job.id)
        assert outcome.result == "timeout", outcome
        assert outcome.worker_result is not None and outcome.worker_result["status"] == "cancelled"

    asyncio.run(scenario())


def test_how_systemd_ended_a_unit_is_read_from_its_files_but_not_once_the_attempt_was_withdrawn(
        tmp_path: Path) -> None:
    """EXIT_STATUS names a signal for a unit killed by one (the live path gives its number); a late unit's end,
    after the attempt was settled without its unit, is not the attempt's (a "resources" there would make it
    uncounted)."""
    (tmp_path / "spec.json").write_text("{}")
    ended = tmp_path / "unit-ended"
    ended.write_text("signal killed KILL\n")
    assert systemd_runner._outcome_from_files(tmp_path, {"status": "cancelled"}) == ("signal", 9)
    ended.write_text("oom-kill killed TERM\n")
    assert systemd_runner._outcome_from_files(tmp_path, {"status": "cancelled"}) == ("oom-kill", 15)
    ended.write_text("exit-code exited 143\n")        # the worker's own result tells that one better
    assert systemd_runner._outcome_from_files(tmp_path, {"status": "cancelled"}) == ("exit-code", 143)
    os.replace(tmp_path / "spec.json", tmp_path / systemd_runner.WITHDRAWN_SPEC_NAME)
    ended.write_text("resources exited 0\n")
    assert systemd_runner._outcome_from_files(tmp_path, None) == ("unknown", 0)


def test_an_attempt_settled_without_its_unit_cannot_be_run_by_a_start_that_comes_late(sandbox: Sandbox,
                                                                                      tmp_path: Path) -> None:
    """h2kd wrote an attempt's spec and sent StartTransientUnit, then died; back, it finds no such unit and settles
    the attempt as ended unrecorded (its job then gets another attempt). A start still on its way to systemd may
    yet create the unit: its worker must find nothing to run, or two workers would convert for one job."""
    async def scenario() -> None:
        config = sandbox.config("quick")
        job = make_job(output=str(tmp_path / "late.qcow2"))
        source = tmp_path / "disk.raw"
        source.write_bytes(b"\1" * 1024 * 1024)
        job.spec["image"].update(path=str(source), format="raw")
        unit = unit_name(job.id, 1)
        run_dir = config.runs_dir / unit
        run_dir.mkdir(parents=True)
        (run_dir / "spec.json").write_text(json.dumps({"job_id": job.id, "job_created_at": job.created_at,
                                                       "attempt": 1, "spec": job.spec,
                                                       "output_roots": [str(tmp_path)]}))
        events = RecordingEvents()
        async with runner_for(config, events) as runner:
            await runner.reattach(job)
            outcome = await events.wait_finished(job.id)
        assert outcome.result == "unknown", outcome
        # The late unit's worker, as systemd would run it:
        late = subprocess.run([sys.executable, "-m", "h2kd.worker", "--spec", str(run_dir / "spec.json"),
                               "--result", str(run_dir / "result.json")], cwd=Path(h2kd.__file__).parents[1],
                              capture_output=True, text=True, timeout=60)
        assert late.returncode != 0 and not (tmp_path / "late.qcow2").exists(), late
        # h2kd stopped again before that outcome was stored: the next look still finds the attempt made (it
        # counts against the job's retries), not one that never started (which would not, and run it again).
        events = RecordingEvents()
        async with runner_for(config, events) as runner:
            await runner.reattach(job)
            outcome = await events.wait_finished(job.id)
        assert outcome.result == "unknown", outcome

    asyncio.run(scenario())


def test_a_forgotten_jobs_attempt_directories_are_removed_but_not_a_running_ones(sandbox: Sandbox) -> None:
    """h2kd keeps an attempt's files (spec, result, temporary-file record) until its job is removed or pruned;
    then they go, so the state directory does not grow with every job ever run."""
    async def scenario() -> None:
        config = sandbox.config("wait")
        events = RecordingEvents()
        done, running = make_job(), make_job()
        async with runner_for(config, events) as runner:
            first = await start_waiting(runner, events, done)
            (config.runs_dir / first / "go").touch()
            await events.wait_finished(done.id)
            done.attempt = 2                          # a retry ran as well
            second = await runner.start(done, 2)
            await events.wait_status(done.id, "waiting for go")
            (config.runs_dir / second / "go").touch()
            await wait_for(lambda: len(events.outcomes_of(done.id)) == 2, what="the retry's end")
            busy = await start_waiting(runner, events, running)
            assert all((config.runs_dir / u).is_dir() for u in (first, second, busy))
            runner.forget(done)
            runner.forget(running)
            await wait_for(lambda: not (config.runs_dir / first).exists() and not (config.runs_dir / second).exists(),
                           what="the removal of the forgotten job's directories")
            assert (config.runs_dir / busy).is_dir()      # still followed: its result is still to come
            (config.runs_dir / busy / "go").touch()
            assert (await events.wait_finished(running.id)).result == "success"

    asyncio.run(scenario())


def test_a_start_that_may_succeed_later_is_told_apart_from_a_refusal(sandbox: Sandbox, monkeypatch) -> None:
    """No room for the attempt's files, or systemd out of reach, is StartDeferred (the manager tries again
    without using up the job's retries); systemd refusing the unit itself is not."""
    from h2kd.manager.ports import StartDeferred

    async def scenario() -> None:
        config = sandbox.config("wait")
        async with runner_for(config, RecordingEvents()) as runner:
            def full(path, data):
                raise OSError(errno.ENOSPC, "No space left on device")
            with monkeypatch.context() as patched:
                patched.setattr(systemd_runner, "_write_json_atomically", full)
                with pytest.raises(StartDeferred, match="No space left"):
                    await runner.start(make_job(), 1)
            with monkeypatch.context() as patched:
                patched.setattr(systemd_runner.units, "build_properties",
                                lambda *a, **k: [("NoSuchPropertyOfSystemd", Variant("s", "x"))])
                with pytest.raises(systemd_runner.SystemdError) as refused:
                    await runner.start(make_job(), 1)
                assert not isinstance(refused.value, StartDeferred)
                assert refused.value.error_name.startswith("org.freedesktop"), refused.value
        unreachable = SystemdRunner(config, RecordingEvents())
        with pytest.raises(StartDeferred, match="not reachable"):
            await unreachable.start(make_job(), 1)

    asyncio.run(scenario())


def test_a_start_cancelled_while_its_files_are_made_starts_no_unit(sandbox: Sandbox, monkeypatch) -> None:
    """The cancel comes while the runner prepares the attempt (its directory, the slice): no unit is started,
    not even one stopped at once, and the attempt's files go."""

    async def scenario() -> None:
        events = RecordingEvents()
        config = sandbox.config("wait")
        job = make_job()
        unit = unit_name(job.id, 1)
        real_check = systemd_runner._left_by_another_job

        def cancelled_meanwhile(run_dir, checked_job):
            checked_job.cancel_requested = True     # as the manager records a cancel that came now
            return real_check(run_dir, checked_job)

        async with runner_for(config, events) as runner:
            with monkeypatch.context() as patched:
                patched.setattr(systemd_runner, "_left_by_another_job", cancelled_meanwhile)
                with pytest.raises(StartWithdrawn):
                    await runner.start(job, 1)
            assert await unit_properties(sandbox.manager.bus_address, unit) is None
            for _ in range(100):
                if not (config.runs_dir / unit).exists():
                    break
                await asyncio.sleep(0.05)
            assert not (config.runs_dir / unit).exists()
            later = make_job()
            await runner.start(later, 1)
            await runner.stop(unit_name(later.id, 1))
            await events.wait_finished(later.id)
        assert events.outcomes_of(job.id) == []

    asyncio.run(scenario())


def test_a_refused_start_reports_no_end_for_its_unit(sandbox: Sandbox, monkeypatch) -> None:
    """systemd announces the removal of a transient unit it refused before it answers the start: that signal
    must not end the attempt a second time (the refusal already ended it), now or when the runner closes."""

    async def scenario() -> None:
        events = RecordingEvents()
        async with runner_for(sandbox.config("wait"), events) as runner:
            refused = []
            with monkeypatch.context() as patched:
                patched.setattr(systemd_runner.units, "build_properties",
                                lambda *a, **k: [("NoSuchPropertyOfSystemd", Variant("s", "x"))])
                for _ in range(5):
                    job = make_job()
                    with pytest.raises(systemd_runner.SystemdError):
                        await runner.start(job, 1)
                    refused.append(job.id)
            started = make_job()
            await runner.start(started, 1)          # a later start still works, and its signals are read
            await runner.stop(unit_name(started.id, 1))
            await events.wait_finished(started.id)
            await asyncio.sleep(0.5)
        assert [events.outcomes_of(job_id) for job_id in refused] == [[]] * len(refused)

    asyncio.run(scenario())


def held_image(directory: Path, record: Path) -> tuple[Path, str]:
    """An image of uid 64101's that a repair made root's (0600) and noted in `record`, bound to a loop device
    as a lazily unmounted file system keeps it; (the image, the loop device)."""
    from h2kd.operations.tempfiles import inode_generation, note_held

    image = directory / f"disk-{uuid.uuid4().hex[:8]}.raw"
    image.write_bytes(bytes(1 << 20))
    os.chown(image, 64101, 64102)
    image.chmod(0o640)
    record.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(image, os.O_RDONLY)
    try:
        note_held(str(record), str(image), os.fstat(fd), inode_generation(fd))
    finally:
        os.close(fd)
    os.chown(image, 0, 0)
    image.chmod(0o600)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True)
    return image, loop.stdout.strip()


def owner_and_mode(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, st.st_mode & 0o777


@pytest.mark.skipif(shutil.which("losetup") is None, reason="losetup is not installed")
def test_images_a_killed_repair_left_roots_are_given_back_once_their_loop_device_is_gone(
        sandbox: Sandbox, monkeypatch) -> None:
    """A guest repair killed outright leaves the image it made root's. Its owner gets it back once no loop
    device holds it, whenever that is: after the unit's end, after the job was removed, after h2kd restarted."""
    monkeypatch.setattr(systemd_runner, "HELD_RETRY_SECONDS", 0.2)

    async def scenario() -> None:
        config = sandbox.config("wait")
        events = RecordingEvents()
        job = make_job()
        images_dir = sandbox.base / f"images-{job.id}"
        images_dir.mkdir()
        loops = []
        try:
            async with runner_for(config, events) as runner:
                unit = await start_waiting(runner, events, job)
                record = config.runs_dir / unit / "held-images"
                image, loop = held_image(images_dir, record)
                loops.append(loop)
                (config.runs_dir / unit / "go").touch()
                await events.wait_finished(job.id)
                await asyncio.sleep(0.5)
                assert owner_and_mode(image) == (0, 0, 0o600)     # still bound: not the owner's yet
                runner.forget(job)
                held = config.runs_dir / "held"
                await wait_for(lambda: not (config.runs_dir / unit).exists(), what="the removal of the job's files")
                assert [p.name.startswith(unit + "@") for p in held.iterdir()] == [True]    # its record kept aside
                subprocess.run(["losetup", "--detach", loop], check=True)
                await wait_for(lambda: owner_and_mode(image) == (64101, 64102, 0o640), what="the image given back")
                await wait_for(lambda: not any(held.iterdir()), what="the record's removal")

            # Left root's while h2kd was down (by a unit that is over): given back when it starts again.
            gone_unit = unit_name(f"{job.id}-gone", 1)
            image, loop = held_image(images_dir, config.runs_dir / gone_unit / "held-images")
            subprocess.run(["losetup", "--detach", loop], check=True)
            async with runner_for(config, RecordingEvents()):
                await wait_for(lambda: owner_and_mode(image) == (64101, 64102, 0o640), what="the image given back")
        finally:
            for loop in loops:
                subprocess.run(["losetup", "--detach", loop], capture_output=True)
            shutil.rmtree(images_dir, ignore_errors=True)

    asyncio.run(scenario())


@pytest.mark.skipif(shutil.which("losetup") is None, reason="losetup is not installed")
def test_a_running_units_record_of_held_images_is_left_to_its_end(sandbox: Sandbox, monkeypatch) -> None:
    """h2kd restarted while a repair runs: the record in the unit's directory is the live worker's, which may be
    adding to it. It is not read and written back meanwhile, nor its images given back; the unit's end does."""
    monkeypatch.setattr(systemd_runner, "HELD_RETRY_SECONDS", 0.2)

    async def scenario() -> None:
        config = sandbox.config("wait")
        job = make_job()
        unit, _ = await left_running(config, job)
        images_dir = sandbox.base / f"images-{job.id}"
        images_dir.mkdir()
        try:
            image, loop = held_image(images_dir, config.runs_dir / unit / "held-images")
            subprocess.run(["losetup", "--detach", loop], check=True)
            job.unit = unit
            events = RecordingEvents()
            async with runner_for(config, events) as second:
                await second.reattach(job)
                await asyncio.sleep(1.0)
                assert owner_and_mode(image) == (0, 0, 0o600)
                (config.runs_dir / unit / "go").touch()
                await events.wait_finished(job.id)
                await wait_for(lambda: owner_and_mode(image) == (64101, 64102, 0o640), what="the image given back")
        finally:
            shutil.rmtree(images_dir, ignore_errors=True)

    asyncio.run(scenario())


def removals_held_until(gate: threading.Event, monkeypatch) -> None:
    """The runner's removals of directories wait for `gate` (on the remover's thread)."""
    remove = systemd_runner._remove_directory

    def held(directory: Path, held_dir: Path) -> Path | None:
        assert gate.wait(30), "the test never let the removal go on"
        return remove(directory, held_dir)
    monkeypatch.setattr(systemd_runner, "_remove_directory", held)


def test_forgetting_a_thousand_jobs_leaves_the_event_loop_free_while_their_directories_go(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    """Pruning removes the attempts' directories of every job it prunes. That happens on a thread of its own: here
    the removals cannot even begin until the test lets them, and forget() returns all the same, the event loop
    goes on, and once let go every directory goes."""
    gate = threading.Event()
    removals_held_until(gate, monkeypatch)
    config = Config(state_dir=tmp_path / "state", output_roots=[tmp_path / "output"])

    async def scenario() -> None:
        runner = SystemdRunner(config, RecordingEvents())
        jobs = [make_job() for _ in range(1000)]
        for job in jobs:
            job.attempt = 2
            for attempt in (1, 2):
                directory = config.runs_dir / unit_name(job.id, attempt)
                directory.mkdir(parents=True)
                (directory / "spec.json").write_text("{}")
        loop = asyncio.get_running_loop()
        began = loop.time()
        for job in jobs:
            runner.forget(job)
        await asyncio.sleep(0.1)        # the loop turns while every removal waits
        assert loop.time() - began < 5, "forget() waited for the removals"
        assert len(list(config.runs_dir.iterdir())) == 2000
        gate.set()
        await wait_for(lambda: not any(config.runs_dir.iterdir()), what="the removal of every directory")
        await runner.close()

    asyncio.run(scenario())


def test_at_start_attempt_directories_of_no_job_h2kd_has_are_removed(tmp_path: Path) -> None:
    """A removal cut short (h2kd stopped, or was killed, with removals still queued) leaves directories that hold
    spec and result files of jobs no longer in the store: the next start removes them, and only them."""
    config = Config(state_dir=tmp_path / "state", output_roots=[tmp_path / "output"])

    async def scenario() -> None:
        runner = SystemdRunner(config, RecordingEvents())
        kept, gone = make_job(), make_job()
        kept.attempt, gone.attempt = 2, 1
        directories = {unit_name(kept.id, 1), unit_name(kept.id, 2), unit_name(gone.id, 1)}
        for name in directories:
            (config.runs_dir / name).mkdir(parents=True)
            (config.runs_dir / name / "spec.json").write_text("{}")
        (config.runs_dir / "held").mkdir()     # not an attempt's: left alone
        await runner.keep_only([kept])
        await wait_for(lambda: not (config.runs_dir / unit_name(gone.id, 1)).exists(),
                       what="the removal of the directory of no job")
        assert sorted(p.name for p in config.runs_dir.iterdir()) == sorted(
            [unit_name(kept.id, 1), unit_name(kept.id, 2), "held"])
        await runner.close()

    asyncio.run(scenario())


def test_a_stop_waits_for_removals_only_so_long_and_leaves_the_rest(tmp_path: Path, monkeypatch) -> None:
    """close() gives the removals still pending CLOSE_WAITS_FOR_REMOVALS_SECONDS. Those not begun by then are
    dropped, their directories left: the process's exit joins the remover's thread, and would otherwise go on
    removing past the stop's limit."""
    gate = threading.Event()
    removals_held_until(gate, monkeypatch)
    monkeypatch.setattr(systemd_runner, "CLOSE_WAITS_FOR_REMOVALS_SECONDS", 0.2)
    config = Config(state_dir=tmp_path / "state", output_roots=[tmp_path / "output"])

    async def scenario() -> None:
        runner = SystemdRunner(config, RecordingEvents())
        jobs = [make_job() for _ in range(3)]
        directories = [config.runs_dir / unit_name(job.id, 1) for job in jobs]
        for job, directory in zip(jobs, directories):
            job.attempt = 1
            directory.mkdir(parents=True)
            runner.forget(job)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await runner.close()
        assert loop.time() - began < 5
        gate.set()                      # the removal under way (the first) ends; the two queued never begin
        await wait_for(lambda: not directories[0].exists(), what="the removal under way")
        await asyncio.sleep(0.5)
        assert [d.exists() for d in directories] == [False, True, True]
        runner.forget(jobs[1])          # after the stop: nothing is taken any more
        await asyncio.sleep(0.2)
        assert directories[1].exists()

    asyncio.run(scenario())


def test_a_new_job_with_a_removed_jobs_id_starts_once_the_removal_of_the_earlier_files_is_done(
        sandbox: Sandbox, monkeypatch) -> None:
    """A job is removed and its id chosen again at once: the new job's first attempt has the same unit, so the same
    directory, as the earlier job's. Its start waits for the removal still under way, which thus neither takes the
    new attempt's files nor leaves it the earlier ones."""
    async def scenario() -> None:
        config = sandbox.config("quick")
        earlier = make_job()
        unit = await run_unfollowed_until_collected(sandbox, config, earlier)
        gate = threading.Event()
        removals_held_until(gate, monkeypatch)
        again = dataclasses.replace(earlier, created_at=earlier.created_at + 1)
        events = RecordingEvents()
        async with runner_for(config, events) as runner:
            runner.forget(earlier)
            starting = asyncio.create_task(runner.start(again, 1))
            await asyncio.sleep(0.3)
            assert not starting.done() and starts(config, unit) == 1    # the earlier files, still there
            gate.set()
            assert await starting == unit
            outcome = await events.wait_finished(again.id)
        assert outcome.result == "success" and outcome.worker_result["status"] == "completed", outcome
        assert starts(config, unit) == 1                  # the earlier job's went with its directory
        spec_file = json.loads((config.runs_dir / unit / "spec.json").read_text())
        assert spec_file["job_created_at"] == again.created_at

    asyncio.run(scenario())


def test_units_stopped_by_a_shutdown_are_interrupted_not_cancelled(sandbox: Sandbox) -> None:
    """A shutdown (here of a manager of our own: a target pulling in shutdown.target, started as
    `systemctl reboot` starts reboot.target) stops the job's unit: the runner says the shutdown began before
    the unit ends, and reports the end as interrupted. An administrator's stop is not
    (test_administrator_stop_is_reported_faithfully_not_as_ours)."""
    runtime = sandbox.base / "going-down"
    manager = start_user_manager(runtime, sandbox.base / "going-down.log", {})
    try:
        env = manager.systemctl_env()
        units_dir = runtime / "systemd" / "user"
        units_dir.mkdir(parents=True, exist_ok=True)
        (units_dir / "h2k-going-down.target").write_text(
            "[Unit]\nDefaultDependencies=no\nRequires=shutdown.target\nAfter=shutdown.target\n")
        # The user manager's bus is one of its units, stopped with the rest: here it stays up, as the system
        # bus outlives a shutting-down system's services.
        for unit in ("dbus.service", "dbus.socket", "session.slice", "app.slice"):
            drop_in = units_dir / f"{unit}.d" / "h2k-test.conf"
            drop_in.parent.mkdir(parents=True)
            drop_in.write_text("[Unit]\nDefaultDependencies=no\n")
        reloaded = subprocess.run(["systemctl", "--user", "daemon-reload"], env=env, capture_output=True,
                                  text=True, timeout=30)
        assert reloaded.returncode == 0, reloaded.stderr

        async def scenario() -> None:
            events = RecordingEvents()
            config = sandbox.config("wait", systemd_bus_address=manager.bus_address)
            async with runner_for(config, events) as runner:
                job = make_job()
                await start_waiting(runner, events, job)
                assert events.stopping == []
                going = await asyncio.to_thread(
                    subprocess.run, ["systemctl", "--user", "--no-block", "--job-mode=replace-irreversibly",
                                     "start", "h2k-going-down.target"], env=env, capture_output=True, text=True,
                    timeout=30)
                assert going.returncode == 0, going.stderr
                outcome = await events.wait_finished(job.id)
                assert events.stopping == [True]
            assert outcome.interrupted and not outcome.stopped_by_request
            assert outcome.worker_result is not None and outcome.worker_result["status"] == "cancelled"

        asyncio.run(scenario())
    finally:
        manager.stop()


def test_an_attempt_stopped_in_an_earlier_boot_is_interrupted_when_reattached(sandbox: Sandbox) -> None:
    """h2kd was stopped before its units at a reboot: when it starts again, an attempt whose unit was stopped
    in the boot before was interrupted by the shutdown. One stopped in this boot was an administrator's stop."""
    async def scenario() -> None:
        config = sandbox.config("wait")
        first_events = RecordingEvents()
        first = await connected(config, first_events)
        earlier, this_boot = make_job(), make_job()
        for job in (earlier, this_boot):
            job.unit = await start_waiting(first, first_events, job)
        await first.close()
        for job in (earlier, this_boot):
            stopped = await asyncio.to_thread(sandbox.systemctl, "stop", job.unit)
            assert stopped.returncode == 0, stopped.stderr
        # No reboot here: the spec file says, as it would after one, that the attempt began in another boot.
        spec_file = config.runs_dir / earlier.unit / "spec.json"
        spec_file.write_text(json.dumps({**json.loads(spec_file.read_text()), "boot_id": uuid.uuid4().hex}))
        events = RecordingEvents()
        async with runner_for(config, events) as second:
            for job in (earlier, this_boot):
                await second.reattach(job)
            interrupted = await events.wait_finished(earlier.id)
            cancelled = await events.wait_finished(this_boot.id)
        assert interrupted.interrupted and interrupted.worker_result["status"] == "cancelled"
        assert not cancelled.interrupted and cancelled.worker_result["status"] == "cancelled"

    asyncio.run(scenario())


def test_an_attempt_whose_manager_went_away_is_interrupted_but_not_one_across_a_reexec(sandbox: Sandbox) -> None:
    """The whole stack goes down together (h2k-sandbox's teardown; a user manager's end): h2kd is gone before
    it hears how its units ended. The next runner, on a new manager in the same boot, takes the attempt as
    interrupted, not as an administrator's stop. A daemon-reexec in between is no new manager."""
    runtime = sandbox.base / "replaced"
    manager = start_user_manager(runtime, sandbox.base / "replaced.log", {})
    try:
        config = sandbox.config("wait", systemd_bus_address=manager.bus_address,
                                state_dir=sandbox.base / "replaced-state")

        async def leave_running() -> Job:
            job = make_job()
            job.unit, _ = await left_running(config, job)
            return job

        across_reexec = asyncio.run(leave_running())
        reexec = subprocess.run(["systemctl", "--user", "daemon-reexec"], env=manager.systemctl_env(),
                                capture_output=True, text=True, timeout=30)
        assert reexec.returncode == 0, reexec.stderr

        async def reattach_across_reexec() -> None:
            events = RecordingEvents()
            async with runner_for(config, events) as runner:
                await runner.reattach(across_reexec)
                # An administrator's stop under the same manager, re-executed: a cancel, not an interruption.
                stopped = await asyncio.to_thread(subprocess.run, ["systemctl", "--user", "stop", across_reexec.unit],
                                                  env=manager.systemctl_env(), capture_output=True, text=True,
                                                  timeout=30)
                assert stopped.returncode == 0, stopped.stderr
                outcome = await events.wait_finished(across_reexec.id)
            assert not outcome.interrupted and not outcome.stopped_by_request, outcome
            assert outcome.worker_result is not None and outcome.worker_result["status"] == "cancelled"

        asyncio.run(reattach_across_reexec())
        cut_off = asyncio.run(leave_running())
        manager.stop()
        manager = start_user_manager(runtime, sandbox.base / "replaced.log", {})

        async def reattach_under_a_new_manager() -> None:
            events = RecordingEvents()
            async with runner_for(config, events) as runner:
                await runner.reattach(cut_off)
                outcome = await events.wait_finished(cut_off.id)
            assert outcome.interrupted and not outcome.stopped_by_request, outcome
            assert outcome.worker_result is not None and outcome.worker_result["status"] == "cancelled"

        asyncio.run(reattach_under_a_new_manager())
    finally:
        manager.stop()


def test_a_worker_killed_while_its_outputs_get_their_names_leaves_the_files_as_they_were(sandbox: Sandbox) -> None:
    """Killed outright after some outputs replaced earlier files and before its result: the attempt failed, so
    the files replaced are back, the output that was new is gone, and no temporary name is left."""
    async def scenario() -> None:
        config = sandbox.config("killed-mid-commit")
        out_dir = config.output_roots[0] / "mid-commit"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "a.qcow2").write_bytes(b"old a.qcow2")
        (out_dir / "b.qcow2").write_bytes(b"old b.qcow2")
        job = make_job(output=str(out_dir / "a.qcow2"))
        events = RecordingEvents()
        async with runner_for(config, events) as runner:
            await runner.start(job, 1)
            outcome = await events.wait_finished(job.id)
        assert outcome.worker_result is None and outcome.result == "signal", outcome
        assert sorted(p.name for p in out_dir.iterdir()) == ["a.qcow2", "b.qcow2"]
        assert (out_dir / "a.qcow2").read_bytes() == b"old a.qcow2"
        assert (out_dir / "b.qcow2").read_bytes() == b"old b.qcow2"

    asyncio.run(scenario())


def test_a_commit_the_worker_undid_itself_is_not_undone_again_over_a_file_made_since(sandbox: Sandbox) -> None:
    """The worker put its outputs' names back itself (one was taken meanwhile); a file someone made at one of
    them before the attempt was settled, even with the inode number the worker's file had, stays."""
    async def scenario() -> None:
        config = sandbox.config("exists-mid-commit")
        out_dir = config.output_roots[0] / "undone-commit"
        out_dir.mkdir(parents=True, exist_ok=True)
        job = make_job(output=str(out_dir / "first.qcow2"))
        events = RecordingEvents()
        async with runner_for(config, events) as runner:
            await runner.start(job, 1)
            outcome = await events.wait_finished(job.id)
        assert outcome.result == "exit-code", outcome
        assert sorted(p.name for p in out_dir.iterdir()) == ["first.qcow2", "second.qcow2"]
        assert (out_dir / "first.qcow2").read_bytes() == b"someone else's file"
        assert (out_dir / "second.qcow2").read_bytes() == b"taken meanwhile"

    asyncio.run(scenario())


def test_a_job_with_an_earlier_jobs_id_never_undoes_what_the_earlier_one_left_behind(sandbox: Sandbox) -> None:
    """The earlier job's attempt directory stayed (its removal dropped as h2kd stopped), with its notes of a
    commit: a new job with the same id whose attempt fails does not take them for its own, and the earlier
    job's output stays where it is."""
    async def scenario() -> None:
        out_dir = config_quick.output_roots[0] / "same-id"
        out_dir.mkdir(parents=True, exist_ok=True)
        earlier_output = out_dir / "earlier.qcow2"
        earlier = make_job(output=str(earlier_output))
        unit = await run_unfollowed_until_collected(sandbox, config_quick, earlier)
        earlier_output.write_bytes(b"the earlier job's output")
        made = earlier_output.stat()
        run_dir = config_quick.runs_dir / unit
        (run_dir / "commit").write_text(json.dumps({"destination": str(earlier_output), "device": made.st_dev,
                                                    "inode": made.st_ino, "aside": None}) + "\n")
        again = dataclasses.replace(earlier, created_at=earlier.created_at + 1,
                                    spec={**earlier.spec, "artifacts": {**earlier.spec["artifacts"],
                                                                       "output_path": str(out_dir / "new.qcow2")}})
        events = RecordingEvents()
        async with runner_for(sandbox.config("fail-leaving-a-temporary"), events) as runner:
            await runner.start(again, 1)
            outcome = await events.wait_finished(again.id)
        assert outcome.result == "exit-code" and outcome.worker_result is None, outcome
        assert earlier_output.read_bytes() == b"the earlier job's output"
        assert sorted(p.name for p in out_dir.iterdir()) == ["earlier.qcow2"]   # the new temporary went

    config_quick = sandbox.config("quick")
    asyncio.run(scenario())


@pytest.mark.parametrize("while_away", [False, True], ids=["followed", "reattached"])
def test_temporary_output_of_a_killed_worker_is_removed_when_the_attempt_settles(sandbox: Sandbox,
                                                                                  while_away: bool) -> None:
    """A worker killed with SIGKILL cannot clean up; the runner removes what it recorded, and only that:
    never a symlink (nor what it points to), a directory, a file outside the output roots or without the
    temporary prefix."""
    async def scenario() -> None:
        config = sandbox.config("leave")
        out_dir = config.output_roots[0] / f"left-{while_away}"
        out_dir.mkdir(parents=True, exist_ok=True)
        outside_dir = sandbox.base / f"outside-{while_away}"
        outside_dir.mkdir(exist_ok=True)
        job = make_job(output=str(out_dir / "disk.qcow2"))
        unit = unit_name(job.id, 1)
        outside = outside_dir / ".h2k-tmp-000000000000-outside.qcow2"
        target = outside_dir / "precious.qcow2"
        link = out_dir / ".h2k-tmp-111111111111-link.qcow2"
        directory = out_dir / ".h2k-tmp-222222222222-dir.qcow2"
        unprefixed = out_dir / "finished.qcow2"
        through_link = out_dir / "linked" / ".h2k-tmp-333333333333-x.qcow2"
        for path in (outside, target, unprefixed):
            path.write_bytes(b"keep me")
        link.symlink_to(target)
        directory.mkdir()
        (out_dir / "linked").symlink_to(outside_dir)
        (outside_dir / through_link.name).write_bytes(b"keep me")
        run_dir = config.runs_dir / unit
        run_dir.mkdir(parents=True)
        decoys = [outside, link, directory, unprefixed, through_link]
        (run_dir / "decoys").write_text("".join(f"{p}\n" for p in decoys))

        events = RecordingEvents()
        runner = await connected(config, events)
        try:
            await runner.start(job, 1)
            await wait_for(lambda: any(t.startswith("left ") for t in events.statuses_of(job.id)),
                           what="the worker to write its partial output")
            partial = Path(next(t for t in events.statuses_of(job.id) if t.startswith("left "))[5:])
            assert partial.parent == out_dir and partial.exists()
            assert [p for p in run_dir.iterdir() if p.name.startswith(".h2k-tmp-")]
            if while_away:
                await runner.close()          # h2kd is gone while the unit is killed
            killed = await asyncio.to_thread(sandbox.systemctl, "kill", "--signal=KILL", unit)
            assert killed.returncode == 0, killed.stderr
            if while_away:
                for _ in range(200):
                    if (await unit_properties(sandbox.manager.bus_address, unit) or {}).get("ActiveState") \
                            in (None, "inactive", "failed"):
                        break
                    await asyncio.sleep(0.05)
                assert partial.exists()       # nobody has settled the attempt yet
                job.unit = unit
                runner = await connected(config, events)
                await runner.reattach(job)
            outcome = await events.wait_finished(job.id)
        finally:
            await runner.close()
        assert outcome.worker_result is None and outcome.result in ("signal", "unknown")
        assert not partial.exists()
        assert not [p for p in run_dir.iterdir() if p.name.startswith(".h2k-tmp-")]
        assert sorted(p.name for p in out_dir.iterdir()) == sorted(
            [link.name, directory.name, unprefixed.name, "linked"])
        assert link.is_symlink() and directory.is_dir()
        for path in (outside, target, unprefixed, outside_dir / through_link.name):
            assert path.read_bytes() == b"keep me", path

    asyncio.run(scenario())


def test_fifty_concurrent_units_each_finish_once(sandbox: Sandbox) -> None:
    async def scenario() -> None:
        events = RecordingEvents()
        jobs = [make_job() for _ in range(50)]
        async with runner_for(sandbox.config("quick"), events) as runner:
            await asyncio.gather(*(runner.start(job, 1) for job in jobs))
            await wait_for(lambda: len(events.finished) >= 50, timeout=120, what="fifty units")
            await asyncio.sleep(0.5)
            assert runner.reachable
        assert sorted(jid for jid, _, _ in events.finished) == sorted(job.id for job in jobs)
        assert all(outcome.result == "success" and outcome.worker_result for _, _, outcome in events.finished)

    asyncio.run(scenario())


def test_a_runner_that_cannot_reach_systemd_at_first_keeps_trying_and_says_when_it_can(sandbox: Sandbox,
                                                                                        tmp_path: Path) -> None:
    """h2kd started while systemd's bus was not there yet: the runner goes on trying, and once it connects it
    tells the manager, whose queued jobs then start."""
    async def scenario() -> None:
        real = sandbox.manager.bus_address.removeprefix("unix:path=").split(",")[0]
        later = tmp_path / "bus"             # where systemd's bus will be, not there yet
        config = sandbox.config("quick", systemd_bus_address=f"unix:path={later}")
        events = RecordingEvents()
        runner = SystemdRunner(config, events)
        try:
            with pytest.raises(Exception):
                await runner.connect()
            assert not runner.reachable and events.connected == 0
            runner.keep_connecting()
            await asyncio.sleep(1.5)
            assert not runner.reachable and events.connected == 0
            later.symlink_to(real)
            await wait_for(lambda: runner.reachable and events.connected == 1, timeout=20,
                           what="the runner to connect")
            job = make_job()
            await runner.start(job, 1)
            assert (await events.wait_finished(job.id)).result == "success"
        finally:
            await runner.close()

    asyncio.run(scenario())


def test_a_start_systemd_does_not_answer_in_time_is_followed_and_reported(sandbox: Sandbox, monkeypatch) -> None:
    """StartTransientUnit timed out (systemd busy, here stopped with SIGSTOP): systemd may still carry it out.
    The runner says it does not know (StartUnanswered), keeps following the unit and reports how it ended,
    instead of taking it as a refusal while the unit converts unwatched."""
    monkeypatch.setattr(systemd_runner, "CALL_TIMEOUT_SECONDS", 2)

    @contextlib.contextmanager
    def systemd_stopped() -> Iterator[None]:
        os.kill(sandbox.manager.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(sandbox.manager.pid, signal.SIGCONT)
    start_unanswered_then_followed_to_its_end(sandbox, systemd_stopped)


def start_unanswered_then_followed_to_its_end(sandbox: Sandbox, around_start: Callable[[], Any]) -> None:
    """runner.start() of a job, inside around_start(), must say it does not know (StartUnanswered); the unit it
    named is then followed to its end, reported once, and was started once."""
    async def scenario() -> None:
        config = sandbox.config("quick")
        events = RecordingEvents()
        job = make_job()
        async with runner_for(config, events) as runner:
            with around_start():
                with pytest.raises(StartUnanswered) as unanswered:
                    await runner.start(job, 1)
            outcome = await events.wait_finished(job.id)
        assert outcome.result == "success" and outcome.worker_result["status"] == "completed", outcome
        assert unanswered.value.unit == outcome.unit
        assert starts(config, outcome.unit) == 1

    asyncio.run(scenario())


def test_a_start_whose_answer_the_bus_lost_is_followed_not_taken_for_a_refusal(sandbox: Sandbox,
                                                                              monkeypatch) -> None:
    """systemd started the unit, but the bus answered StartTransientUnit with NoReply (systemd re-executed, or
    the answer timed out in the bus): the runner must not take that for a refusal, after which the job would
    start again under a new unit while this one converts unwatched."""
    real_call = SystemdRunner._manager_call

    async def answer_lost(self, member, signature, body):
        reply = await real_call(self, member, signature, body)
        if member == "StartTransientUnit" and body[0].startswith("h2k-job-"):
            raise systemd_runner.SystemdError("systemd refused StartTransientUnit: org.freedesktop.DBus.Error."
                                              "NoReply: no reply", "org.freedesktop.DBus.Error.NoReply")
        return reply

    monkeypatch.setattr(SystemdRunner, "_manager_call", answer_lost)
    start_unanswered_then_followed_to_its_end(sandbox, contextlib.nullcontext)


def test_an_end_whose_check_systemd_did_not_answer_is_checked_again(sandbox: Sandbox, monkeypatch) -> None:
    """The unit ended, but systemd answered none of the checks its last signals set off (busy, a call timed out)
    while the bus connection stayed up. No signal follows a unit's last one: the runner checks it again by
    itself, and the attempt's end is reported, instead of its job running for ever."""
    monkeypatch.setattr(systemd_runner, "CHECK_RETRY_SECONDS", 0.5)
    unanswered = {"on": False, "calls": 0}
    real_query = SystemdRunner._query

    async def query(self, followed):
        if unanswered["on"]:
            unanswered["calls"] += 1
            raise systemd_runner.SystemdError(f"GetUnit {followed.unit}: timed out")
        return await real_query(self, followed)

    monkeypatch.setattr(SystemdRunner, "_query", query)

    async def scenario() -> None:
        config = sandbox.config("wait")
        events = RecordingEvents()
        job = make_job()
        async with runner_for(config, events) as runner:
            unit = await start_waiting(runner, events, job)
            unanswered["on"] = True
            (config.runs_dir / unit / "go").touch()
            for _ in range(200):
                props = await unit_properties(sandbox.manager.bus_address, unit)
                if props is None or props.get("ActiveState") in ("inactive", "failed"):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            assert unanswered["calls"] >= 1 and not events.outcomes_of(job.id)
            unanswered["on"] = False
            outcome = await events.wait_finished(job.id, timeout=15)
        assert (outcome.result, outcome.exit_status) == ("success", 0)

    asyncio.run(scenario())


def test_runner_reconnects_when_the_bus_restarts_and_keeps_following(sandbox: Sandbox) -> None:
    async def scenario() -> None:
        config = sandbox.config("wait")
        events = RecordingEvents()
        job = make_job()
        async with runner_for(config, events) as runner:
            unit = await start_waiting(runner, events, job)
            restarted = await asyncio.to_thread(sandbox.systemctl, "restart", "dbus.service")
            assert restarted.returncode == 0, restarted.stderr
            await wait_for(lambda: runner.reconnects == 1 and runner.reachable, timeout=20,
                           what="the runner to reconnect")
            (config.runs_dir / unit / "go").touch()
            outcome = await events.wait_finished(job.id)
        assert (outcome.result, outcome.exit_status) == ("success", 0)
        assert "convert: 100.00% (8/8 bytes) done" in events.statuses_of(job.id)
        assert starts(config, unit) == 1

    asyncio.run(scenario())


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_the_real_worker_converts_an_image_inside_its_unit(sandbox: Sandbox) -> None:
    from h2kd.model.spec import parse_spec, spec_to_json

    async def scenario() -> None:
        config = sandbox.config("unused", worker_command=[sys.executable, "-m", "h2kd.worker"])
        source = sandbox.base / "source.raw"
        with open(source, "wb") as f:
            f.truncate(64 << 20)
            for offset in range(0, 64 << 20, 8 << 20):
                f.seek(offset)
                f.write(os.urandom(1 << 20))
        output = config.output_roots[0] / "real" / "disk.qcow2"
        output.parent.mkdir(parents=True, exist_ok=True)
        job_id = f"real-{os.getpid()}"
        spec = spec_to_json(parse_spec({"job_id": job_id, "operation": "convert", "image": {"path": str(source), "format": "raw"},
                                        "parameters": {"output_format": "qcow2"},
                                        "artifacts": {"output_path": str(output)}}))
        job = Job(id=job_id, spec=spec, operation="convert", owner=0, attempt=1)
        events = RecordingEvents()
        async with runner_for(config, events) as runner:
            await runner.start(job, 1)
            outcome = await events.wait_finished(job.id, timeout=60)
        assert (outcome.result, outcome.exit_status) == ("success", 0), outcome
        assert outcome.worker_result is not None and outcome.worker_result["status"] == "completed"
        assert not (difference := disk_difference(source, output, "raw", "qcow2")), difference
        # The worker's progress reached h2kd through the unit's StatusText, up to the last phase at 100%.
        statuses = events.statuses_of(job.id)
        assert statuses and statuses[-1].startswith("commit: 100.00%"), statuses

    asyncio.run(scenario())


def test_worker_modules_are_byte_compiled_once_for_the_units(tmp_path: Path) -> None:
    """Units cannot write next to the sources: h2kd compiles the worker's modules for them, and again
    only what changed."""
    from h2kd.runner import bytecode

    root = tmp_path / "h2kd"
    for name in ("__init__.py", "errors.py", "worker/__init__.py", "worker/main.py", "operations/convert.py",
                 "model/spec.py", "bus/service.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"NAME = {name!r}\n")
    assert bytecode.compile_worker_modules(root) == 6
    main_pyc = bytecode.compiled_path(root / "worker" / "main.py")
    assert main_pyc.exists() and not bytecode.compiled_path(root / "bus" / "service.py").exists()
    assert bytecode.compile_worker_modules(root) == 0
    os.utime(root / "worker" / "main.py", (time.time() + 5, time.time() + 5))
    assert bytecode.compile_worker_modules(root) == 1
    # A Python that may not write byte code itself still loads what was written for it.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-v", "-c", "import h2kd.worker.main as m; print(m.NAME)"], env=env,
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "worker/main.py"
    assert f"matches {root / 'worker' / 'main.py'}" in out.stderr


def test_the_unit_may_write_only_inside_an_output_root_as_the_paths_resolve_at_its_start(tmp_path: Path) -> None:
    from h2kd.runner.unit import writable_output_dir
    root, elsewhere = tmp_path / "out", tmp_path / "etc"
    (root / "alice").mkdir(parents=True)
    elsewhere.mkdir()
    config = Config(output_roots=[root])
    assert writable_output_dir(config, str(root / "alice" / "disk.qcow2")) == root / "alice"
    assert writable_output_dir(config, str(root / "alice")) == root / "alice"     # a directory to put outputs in
    # A directory not there (renamed away since submission): nothing, not the nearest one above it, which could
    # be the whole output root. The worker says the output directory does not exist.
    assert writable_output_dir(config, str(root / "alice" / "new" / "disk.qcow2")) is None
    # The submitter's directory swapped for a symlink leading out of the roots after the checks at submission:
    (root / "alice" / "sub").symlink_to(elsewhere)
    assert writable_output_dir(config, str(root / "alice" / "sub" / "disk.qcow2")) is None
    # A symlink named as the output is not followed: the worker refuses to replace it in alice's directory.
    assert writable_output_dir(config, str(root / "alice" / "sub")) == root / "alice"
    assert writable_output_dir(config, str(elsewhere / "disk.qcow2")) is None
