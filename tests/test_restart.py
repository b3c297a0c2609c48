"""h2kd killed with SIGKILL and started again: the queue, its order and running conversions all come back.

These are the promises of the store (issue: nothing lost or duplicated) and of the runner (units are
systemd's, so a conversion goes on while h2kd is away and is settled exactly once when it returns).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from dbus_fast import Variant

from busclient import ERR, JOB, Client, run, spec, wait_for
import images
from images import MiB
from h2kd.store.sqlite import JobStore


def convert_spec(source: Path, output: Path, job_id: str, priority: int = 5) -> dict:
    return {
        "job_id": Variant("s", job_id),
        "operation": Variant("s", "convert"),
        "image": Variant("a{sv}", {"path": Variant("s", str(source))}),
        "artifacts": Variant("a{sv}", {"output_path": Variant("s", str(output))}),
        "execution_policy": Variant("a{sv}", {"priority": Variant("u", priority)}),
    }


@pytest.fixture(scope="module")
def source_image(tmp_path_factory) -> Path:
    """A VMDK with 96 MiB of data: a few seconds to convert when the worker's I/O is throttled."""
    directory = tmp_path_factory.mktemp("restart")
    raw = directory / "disk.raw"
    images.make_raw_with_data(raw, 256 * MiB, 96 / 256, seed=7)
    vmdk = directory / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(raw), str(vmdk)], check=True)
    raw.unlink()
    return vmdk


@pytest.fixture
def throttled(stack):
    """h2kd whose worker units convert at 24 MB/s, so a kill lands in the middle of a conversion."""
    stack.restart_daemon(daemon_env={"H2KD_WORKER_ENVIRONMENT": "H2K_RATE_LIMIT=24000000"})
    yield stack
    stack.restart_daemon(daemon_env={})


async def job_state(client: Client, path: str) -> str:
    return await client.prop(path, JOB, "State")


def test_queue_survives_sigkill_in_order_and_paused(stack, source_image, tmp_path):
    async def before_kill():
        client = await Client.connect(stack.bus_address)
        await client.manager("PauseQueue")
        await client.manager("SetMaxParallelJobs", "u", [1])
        submitted = []
        for i, priority in enumerate([5, 3, 5, 1, 3, 5, 10, 1]):
            job_id = f"order-{i}-{uuid.uuid4().hex[:6]}"
            await client.submit(convert_spec(source_image, stack.output_dir / f"{job_id}.qcow2", job_id, priority))
            submitted.append((job_id, priority))
        (listed,) = await client.manager("ListJobs", "a{sv}", [{}])
        client.close()
        return submitted, listed

    submitted, listed_before = run(before_kill())
    stack.kill_daemon()
    stack.restart_daemon()

    async def after_restart():
        client = await Client.connect(stack.bus_address)
        (listed,) = await client.manager("ListJobs", "a{sv}", [{}])
        assert [j[:6] for j in listed] == [j[:6] for j in listed_before], "jobs changed across the kill"
        assert await client.prop("/org/hyper2kvm/h2kd1", "org.hyper2kvm.h2kd1.Manager", "Paused") is True
        (stats,) = await client.manager("GetQueueStats")
        counts = stats["by_priority"].value
        for priority in (1, 3, 5, 10):
            assert counts[priority - 1] >= sum(1 for _, p in submitted if p == priority)
        paths = {job_id: (await client.manager("GetJob", "s", [job_id]))[0] for job_id, _ in submitted}
        await client.manager("ResumeQueue")
        for job_id, _ in submitted:
            await wait_for(lambda: _is(client, paths[job_id], "completed"), 120, f"{job_id} to complete")
        started = {job_id: await client.prop(paths[job_id], JOB, "StartedAt") for job_id, _ in submitted}
        client.close()
        return started

    started = run(after_restart())
    expected = [job_id for job_id, _ in sorted(submitted, key=lambda s: s[1])]  # sort is stable: FIFO per level
    assert sorted(started, key=started.get) == expected
    for job_id, _ in submitted:
        out = stack.output_dir / f"{job_id}.qcow2"
        assert not images.disk_difference(source_image, out), images.disk_difference(source_image, out)
        out.unlink()


async def _is(client: Client, path: str, state: str) -> bool:
    return await job_state(client, path) == state


def _attempt_starts(events) -> list[dict]:
    import json

    return [e for e in events if e[2] == "state" and json.loads(e[3]).get("new_state") == "assigned"]


@pytest.mark.parametrize("unit_ends_while_away, running_unrecorded", [(False, False), (True, False), (True, True)],
                         ids=["back-while-running", "back-after-end", "back-after-end-recorded-assigned"])
def test_sigkill_mid_conversion_completes_exactly_once(throttled, source_image, unit_ends_while_away,
                                                       running_unrecorded):
    """running_unrecorded: h2kd was killed before it had recorded the job running (its store says "assigned",
    as after a kill between starting the unit and storing its start): the times are the unit's all the same."""
    stack = throttled
    job_id = f"kill9-{uuid.uuid4().hex[:8]}"
    output = stack.output_dir / f"{job_id}.qcow2"

    async def start_and_wait_for_progress():
        client = await Client.connect(stack.bus_address)
        await client.manager("ResumeQueue")
        _, path = await client.submit(convert_spec(source_image, output, job_id))
        await wait_for(lambda: _progress_above(client, path, 0.05), 60, "progress")
        unit = await client.prop(path, JOB, "Unit")
        client.close()
        return path, unit

    submitted_at = time.time()
    path, unit = run(start_and_wait_for_progress())
    stack.kill_daemon()
    killed_at = time.time()
    assert unit, "a running job names its unit"
    ended_by = 0.0
    if unit_ends_while_away:
        _wait_unit_gone(stack, unit)
        ended_by = time.time()
    if running_unrecorded:
        with sqlite3.connect(stack.state_dir / "h2kd.sqlite") as db:
            db.execute("UPDATE jobs SET state = 'assigned', started_at = 0, phase = '', progress = 0, "
                       "progress_known = 0, bytes_done = 0 WHERE id = ?", (job_id,))
        db.close()

    stack.restart_daemon(daemon_env={"H2KD_WORKER_ENVIRONMENT": "H2K_RATE_LIMIT=24000000"})

    async def after_restart():
        client = await Client.connect(stack.bus_address)
        await wait_for(lambda: _is_final(client, path), 120, "the job to end")
        state = await job_state(client, path)
        attempt = await client.prop(path, JOB, "Attempt")
        started_at = await client.prop(path, JOB, "StartedAt")
        finished_at = await client.prop(path, JOB, "FinishedAt")
        (events,) = await client.call(path, JOB, "GetEvents", "t", [0])
        client.close()
        return state, attempt, started_at, finished_at, events

    state, attempt, started_at, finished_at, events = run(after_restart())
    assert state == "completed"
    # When the conversion started, before h2kd was killed, and ended ("completed in N s"), not when h2kd came back
    assert submitted_at * 1e6 <= started_at <= killed_at * 1e6, (submitted_at, started_at, killed_at)
    if unit_ends_while_away:
        assert started_at < finished_at <= ended_by * 1e6, (started_at, finished_at, ended_by)
    assert attempt == 1
    assert len(_attempt_starts(events)) == 1, "the conversion was started more than once"
    assert [e[2] for e in events].count("result") == 1, "the job was settled more than once"
    assert not images.disk_difference(source_image, output), images.disk_difference(source_image, output)
    assert [p.name for p in stack.output_dir.iterdir() if p.name.startswith(f".{job_id}") or
            (job_id in p.name and p != output)] == [], "temporary files left behind"
    output.unlink()


async def _progress_above(client: Client, path: str, fraction: float) -> bool:
    return await client.prop(path, JOB, "Progress") > fraction


async def _is_final(client: Client, path: str) -> bool:
    return await job_state(client, path) in ("completed", "failed", "cancelled")


def _wait_unit_gone(stack, unit: str) -> None:
    import time

    env = {"XDG_RUNTIME_DIR": str(stack.runtime_dir), "PATH": "/usr/bin:/bin"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = subprocess.run(["systemctl", "--user", "show", "-P", "ActiveState", unit], env=env,
                               capture_output=True, text=True).stdout.strip()
        if state in ("inactive", "failed", ""):
            return
        time.sleep(0.2)
    raise AssertionError(f"{unit} still runs")


def test_a_second_h2kd_on_the_same_state_ends_at_once_and_leaves_it_alone(stack):
    """An administrator runs h2kd by hand while the service runs: the second one ends before it opens the store
    or talks to systemd (two would start units and write events over each other), naming the h2kd that holds
    the state; the first goes on serving."""
    env = stack.daemon_environment()
    ran = subprocess.run([sys.executable, "-m", "h2kd.daemon"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=stack.base_dir)
    assert ran.returncode == 1, ran.stderr
    assert f"another h2kd (pid {stack.daemon_pid}) is using {stack.state_dir}" in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr and "bus name" not in ran.stderr, ran.stderr
    health = subprocess.run([sys.executable, "-m", "h2kctl", "health"], env={**os.environ, **stack.env()},
                            capture_output=True, text=True, timeout=60)
    assert health.returncode == 0, health.stdout + health.stderr


def test_sighup_leaves_h2kd_serving_and_says_why(stack):
    """SIGHUP would otherwise end h2kd, which systemd takes for a clean exit and does not restart."""
    pid = stack.daemon_pid
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "SIGHUP ignored" not in stack.daemon_log.read_text():
        assert time.monotonic() < deadline, "h2kd did not say what it made of SIGHUP"
        time.sleep(0.05)

    async def still_serving():
        client = await Client.connect(stack.bus_address)
        try:
            (stats,) = await client.manager("GetQueueStats")
            return stats
        finally:
            client.close()

    assert "queued" in run(still_serving())
    assert stack.daemon_pid == pid


BROKEN_DISK = '''
import os

_real_fdatasync = os.fdatasync
_trigger = os.environ["H2K_TEST_BROKEN_DISK"]


def _fdatasync(fd):
    # While the trigger file exists, the disk under the job store's log fails its writes, as a dying disk does.
    if os.path.exists(_trigger) and os.readlink(f"/proc/self/fd/{fd}").endswith("-wal"):
        raise OSError(5, "Input/output error")
    _real_fdatasync(fd)


os.fdatasync = _fdatasync
'''


def test_a_write_the_disk_did_not_confirm_ends_h2kd_and_its_restart_reads_the_store_afresh(stack, tmp_path):
    """After a failed fdatasync nobody knows what the store holds: h2kd answers that the change's fate is known
    only after a restart, ends with a failure status (so systemd restarts it), and the restart finds its jobs."""
    (tmp_path / "sitecustomize.py").write_text(BROKEN_DISK)
    trigger = tmp_path / "disk-fails"
    before, unsure = f"before-{uuid.uuid4().hex[:8]}", f"unsure-{uuid.uuid4().hex[:8]}"
    stack.restart_daemon(daemon_env={"PYTHONPATH": str(tmp_path), "H2K_TEST_BROKEN_DISK": str(trigger)})
    try:
        async def submit_both() -> str:
            client = await Client.connect(stack.bus_address)
            try:
                await client.submit(spec(before), queue=False)
                trigger.touch()
                return await client.submit(spec(unsure), queue=False, expect_error=ERR + "StoreFailed")
            finally:
                client.close()

        refusal = run(submit_both())
        assert "known only once h2kd has restarted" in refusal, refusal
        deadline = time.monotonic() + 30
        while stack.daemon_pid is not None:
            assert time.monotonic() < deadline, "h2kd went on serving on a store it cannot trust"
            time.sleep(0.1)
        assert stack.kill_daemon() == 1
        assert "could not reach the disk" in stack.daemon_log.read_text()
    finally:
        trigger.unlink(missing_ok=True)
        stack.restart_daemon(daemon_env={})

    async def after_restart() -> list[str]:
        client = await Client.connect(stack.bus_address)
        try:
            await client.submit(spec(), queue=False)      # and it takes changes again
            return await client.job_ids()
        finally:
            client.close()

    assert before in run(after_restart())


def test_a_store_found_damaged_while_h2kd_runs_stops_it_for_good_with_one_clear_line(stack):
    """The file opens and loads, but SQLite's check finds it damaged: h2kd stops with status 65, which
    h2kd.service does not restart on (each restart would find the same damage and drop the bus name again),
    saying what was found and what to do."""
    store = stack.state_dir / "h2kd.sqlite"
    stack.stop_daemon()
    kept = store.read_bytes()
    logged_before = stack.daemon_log.read_text() if stack.daemon_log.exists() else ""
    try:
        with open(store, "r+b") as f:
            f.seek(36)                              # the header's count of free pages
            f.write((7).to_bytes(4, "big"))
        stack.start_daemon()
        deadline = time.monotonic() + 60
        while stack.daemon_pid is not None:
            assert time.monotonic() < deadline, "h2kd went on serving on a damaged store"
            time.sleep(0.1)
        assert stack.kill_daemon() == 65
        logged = stack.daemon_log.read_text()[len(logged_before):]
        assert f"the job store {store} is damaged (SQLite's check found:" in logged, logged
        assert "freelist" in logged and "sqlite3's .recover" in logged and "Traceback" not in logged, logged
    finally:
        if stack.daemon_pid is not None:
            stack.stop_daemon()
        store.write_bytes(kept)
        for extra in ("-wal", "-shm"):
            Path(f"{store}{extra}").unlink(missing_ok=True)
        stack.start_daemon()


def _start_h2kd_on(state: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "H2KD_STATE_DIR": str(state), "H2KD_OUTPUT_ROOTS": str(tmp_path / "out"),
           "H2KD_BUS_ADDRESS": "unix:path=/nonexistent", "H2KD_SYSTEMD_BUS_ADDRESS": "unix:path=/nonexistent",
           "H2KD_CONFIG": str(tmp_path / "absent.conf")}
    return subprocess.run([sys.executable, "-m", "h2kd.daemon"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)


def test_a_job_whose_row_cannot_be_read_keeps_its_attempts_files_and_health_says_so(stack):
    """A row h2kd cannot read (a state of a later version, a damaged value) is left in the store, not loaded: its
    attempt's directory was removed at start as belonging to no job, and health said the store was fine."""
    from h2kd.runner.unit import unit_name

    job_id = "unreadable-" + uuid.uuid4().hex[:8]
    neighbour = job_id + "-x"      # its escaped id begins as the other's does

    async def submit() -> None:
        client = await Client.connect(stack.bus_address)
        try:
            for held in (job_id, neighbour):
                await client.submit(spec(held), queue=False)
        finally:
            client.close()

    async def health() -> dict:
        client = await Client.connect(stack.bus_address)
        try:
            (values,) = await client.manager("GetHealth")
            return {key: value.value for key, value in values.items()}
        finally:
            client.close()

    run(submit())
    store = stack.state_dir / "h2kd.sqlite"
    runs = stack.state_dir / "runs"
    attempt_dir, neighbours_dir = runs / unit_name(job_id, 1), runs / unit_name(neighbour, 1)
    stack.stop_daemon()
    logged_before = stack.daemon_log.read_text()
    try:
        with contextlib.closing(sqlite3.connect(store)) as db, db:
            (state,) = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            db.execute("UPDATE jobs SET state = 'frozen-by-a-later-h2kd' WHERE id = ?", (job_id,))
        for directory in (attempt_dir, neighbours_dir):
            directory.mkdir(parents=True)
            (directory / "result.json").write_text("{}")
        stack.start_daemon()
        seen = run(health())
        assert seen["jobs_unreadable"] == 1 and seen["status"] == "degraded", seen
        # Not store_ok: the watchdog has h2kd restarted when it fails, and the row would be there again.
        assert seen["store_ok"] is True, seen
        deadline = time.monotonic() + 15    # the metrics sample health every few seconds
        while "\nh2kd_jobs_unreadable 1.0\n" not in urllib.request.urlopen(stack.metrics_url,
                                                                          timeout=5).read().decode():
            assert time.monotonic() < deadline, "h2kd_jobs_unreadable never said 1"
            time.sleep(0.5)
        time.sleep(1)       # the removal of directories of no job runs off the event loop
        assert (attempt_dir / "result.json").exists()
        assert not neighbours_dir.exists()          # an attempt of no job h2kd has: removed as before
        logged = stack.daemon_log.read_text()[len(logged_before):]
        assert f"job '{job_id}' in the store {store} cannot be read" in logged
    finally:
        stack.stop_daemon()
        with contextlib.closing(sqlite3.connect(store)) as db, db:
            db.execute("UPDATE jobs SET state = ? WHERE id = ?", (state, job_id))
        shutil.rmtree(attempt_dir, ignore_errors=True)
        stack.start_daemon()
    assert run(health())["jobs_unreadable"] == 0


def test_a_store_of_a_later_version_stops_h2kd_with_one_clear_line(tmp_path):
    """It ended in a traceback (RuntimeError), as after going back to an older h2kd."""
    state = tmp_path / "state"
    store = state / "h2kd.sqlite"
    JobStore(store).close()
    with contextlib.closing(sqlite3.connect(store)) as db, db:
        db.execute("INSERT INTO schema_version (version) VALUES (2)")
    before = store.read_bytes()
    ran = _start_h2kd_on(state, tmp_path)
    assert ran.returncode == 65, ran.stderr     # not restarted: it would fail again
    assert (f"the job store {store} was written by another version of h2kd (schema version 2; this one reads "
            "version 1)" in ran.stderr), ran.stderr
    assert "Traceback" not in ran.stderr, ran.stderr
    assert store.read_bytes() == before


def test_a_store_cut_to_nothing_stops_h2kd_instead_of_forgetting_every_job(tmp_path):
    """SQLite takes an empty file for a new store: h2kd started with no jobs and removed their attempts' files."""
    state = tmp_path / "state"
    attempt = state / "runs" / "h2k-job-lost-1.service"
    attempt.mkdir(parents=True)
    (state / "h2kd.sqlite").touch()
    ran = _start_h2kd_on(state, tmp_path)
    assert ran.returncode == 65, ran.stderr     # not restarted: it would fail again
    assert (f"the job store {state / 'h2kd.sqlite'} is an empty file, while {state / 'runs'} holds 1 attempts' "
            "directories" in ran.stderr), ran.stderr
    assert "Traceback" not in ran.stderr, ran.stderr
    assert (state / "h2kd.sqlite").stat().st_size == 0 and attempt.is_dir()


def test_a_store_that_is_no_database_stops_h2kd_with_one_clear_line(tmp_path):
    """Not a traceback: the file, what SQLite found, and what the administrator can do."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "h2kd.sqlite").write_bytes(b"not an SQLite file" * 1000)
    ran = _start_h2kd_on(state, tmp_path)
    assert ran.returncode == 1, ran.stderr
    assert (f"the job store {state / 'h2kd.sqlite'} cannot be opened (file is not a database): h2kd cannot start"
            in ran.stderr), ran.stderr
    assert "Traceback" not in ran.stderr, ran.stderr
    assert (state / "h2kd.sqlite").read_bytes() == b"not an SQLite file" * 1000     # kept for recovery
