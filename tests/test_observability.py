"""Observability without the daemon: metrics as scraped text and through promtool, journal entries and the
message catalog read back from a real journald with journalctl, and sd_notify watchdog pings from a real
child process.

The listener calls below are made the way JobManager makes them: Job.move_to() then
job_changed(job, {"state", ...}, urgent=True); progress updates as job_changed(job, {"progress", ...}).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from h2kd.manager.ports import Event, WorkerInfo
from h2kd.model.job import Job, now_usec
from h2kd.model.states import JobState
from h2kd.observability.health import Watchdog, watchdog_interval
from h2kd.observability.journal import MESSAGE_IDS, JournalLog
from h2kd.observability.metrics import Metrics, start_http

REPO = Path(__file__).resolve().parents[1]
CATALOG = REPO / "systemd" / "h2kd.catalog"
S = JobState
T0 = 1_700_000_000_000_000  # usec


# ------------------------------------------------------------------------------------------------
# Driving listeners as the manager does


class Lifecycle:
    """Moves jobs through their states and tells the listeners, in the manager's order and wording."""

    def __init__(self, *listeners) -> None:
        self.listeners = listeners

    def submit(self, job: Job) -> Job:
        for listener in self.listeners:
            listener.job_added(job)
        return job

    def move(self, job: Job, state: JobState, reason: str = "", **attrs) -> None:
        for name, value in attrs.items():
            setattr(job, name, value)
        old = job.move_to(state)
        event = Event(job.id, 0, T0, "state", {"old_state": old.value, "new_state": state.value, "reason": reason})
        for listener in self.listeners:
            listener.job_changed(job, {"state", "cancelable", *attrs}, True)
            listener.job_event(job, event)

    def update(self, job: Job, **attrs) -> None:
        for name, value in attrs.items():
            setattr(job, name, value)
        for listener in self.listeners:
            listener.job_changed(job, set(attrs), False)

    def remove(self, job: Job) -> None:
        for listener in self.listeners:
            listener.job_removed(job)

    def run_to_progressing(self, job: Job, unit: str = "") -> None:
        self.move(job, S.VALIDATED)
        self.move(job, S.QUEUED)
        self.move(job, S.ASSIGNED, attempt=job.attempt + 1, worker="builtin")
        self.move(job, S.RUNNING, unit=unit or f"h2k-job-{job.id}-{job.attempt}.service",
                  started_at=job.started_at or T0 + 2_000_000)
        self.move(job, S.PROGRESSING)


def make_job(job_id: str, operation: str = "convert", path: str = "/srv/vm/web01.vmdk", fmt: str | None = "vmdk",
             priority: int = 5, owner: int = 1000) -> Job:
    spec = {
        "job_id": job_id, "operation": operation,
        "image": {"path": path, "format": fmt, "checksum": None},
        "parameters": {}, "execution_policy": {"priority": priority, "retry_count": 1,
                                               "timeout_seconds": 3600, "idempotent": True},
        "capability_requirements": {},
        "artifacts": {"output_path": f"/var/lib/h2kd/output/{job_id}.qcow2", "keep_intermediates": False,
                      "overwrite": False},
        "audit": {"requested_by": "ops", "ticket": None, "tags": []},
    }
    return Job(id=job_id, spec=spec, operation=operation, owner=owner, priority=priority, created_at=T0)


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """Every sample of the text exposition, keyed by (sample name, labels)."""
    text = generate_latest(metrics.registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# ------------------------------------------------------------------------------------------------
# Metrics


def test_each_metric_moves_with_the_job_lifecycle():
    metrics = Metrics()
    life = Lifecycle(metrics)
    GiB = 1024 ** 3

    # A VMDK conversion that completes: 10 s of work after 2 s in the queue, 8 GiB source, 3 GiB written.
    good = life.submit(make_job("good-1", priority=3))
    s = scrape(metrics)
    assert value(s, "h2kd_jobs", state="created") == 1
    life.move(good, S.VALIDATED)
    life.move(good, S.QUEUED)
    s = scrape(metrics)
    assert value(s, "h2kd_jobs", state="created") == 0
    assert value(s, "h2kd_jobs", state="queued") == 1
    assert value(s, "h2kd_queue_depth", priority="3") == 1
    good.priority = 1   # set_priority() while queued
    metrics.job_changed(good, {"priority"}, True)
    s = scrape(metrics)
    assert value(s, "h2kd_queue_depth", priority="3") == 0
    assert value(s, "h2kd_queue_depth", priority="1") == 1
    life.move(good, S.ASSIGNED, attempt=1, worker="builtin")
    s = scrape(metrics)
    assert value(s, "h2kd_queue_depth", priority="1") == 0
    assert value(s, "hyper2kvm_worker_jobs_active") == 1
    life.move(good, S.RUNNING, started_at=T0 + 2_000_000, unit="h2k-job-good\\x2d1-1.service")
    life.move(good, S.PROGRESSING)
    # Verified: two passes over the disk, so the progress total is twice its size.
    life.update(good, progress=0.5, progress_known=True, bytes_done=8 * GiB, bytes_total=16 * GiB)
    s = scrape(metrics)
    assert value(s, "hyper2kvm_worker_jobs_active") == 1
    assert value(s, "h2kd_jobs", state="progressing") == 1
    life.move(good, S.COMPLETED, finished_at=T0 + 12_000_000, progress=1.0, bytes_done=16 * GiB,
              result={"status": "completed",
                      "outputs": {"disks": [{"source_format": "vmdk", "virtual_size": 8 * GiB, "format": "qcow2"}]},
                      "metrics": {"execution_seconds": 8.0, "bytes_read": 8 * GiB, "bytes_written": 3 * GiB}})
    s = scrape(metrics)
    assert value(s, "hyper2kvm_migration_total", operation="convert", status="completed") == 1
    assert value(s, "hyper2kvm_migration_duration_seconds_count", operation="convert") == 1
    assert value(s, "hyper2kvm_migration_duration_seconds_sum", operation="convert") == pytest.approx(10.0)
    assert value(s, "h2kd_job_duration_seconds_count", operation="convert", status="completed") == 1
    assert value(s, "h2kd_job_duration_seconds_sum", operation="convert", status="completed") == pytest.approx(12.0)
    assert value(s, "hyper2kvm_vmdk_size_bytes_count") == 1
    assert value(s, "hyper2kvm_vmdk_size_bytes_sum") == 8 * GiB
    assert value(s, "h2kd_converted_bytes_total") == 3 * GiB
    assert value(s, "h2kd_conversion_throughput_bytes_per_second_count") == 1
    assert value(s, "h2kd_conversion_throughput_bytes_per_second_sum") == pytest.approx(3 * GiB / 8.0)
    assert value(s, "hyper2kvm_worker_jobs_active") == 0
    assert value(s, "h2kd_jobs", state="completed") == 1
    assert value(s, "h2kd_jobs", state="progressing") == 0

    # A conversion that fails once (retried), then for good with NO_SPACE.
    bad = life.submit(make_job("bad-1", path="/srv/vm/db.vhdx", fmt="vhdx"))
    life.run_to_progressing(bad)
    life.move(bad, S.RETRYING, error_code="TOOL_FAILED", error_message="qemu-img: I/O error")
    s = scrape(metrics)
    assert value(s, "h2kd_job_retries_total", error_type="TOOL_FAILED") == 1
    assert value(s, "h2kd_jobs", state="retrying") == 1
    life.move(bad, S.QUEUED)
    life.move(bad, S.ASSIGNED, attempt=2)
    life.move(bad, S.RUNNING)
    life.move(bad, S.FAILED, error_code="NO_SPACE", error_message="no space left on /var/lib/h2kd/output",
              finished_at=T0 + 30_000_000, result={"status": "failed", "metrics": {"bytes_written": 10 ** 9}})
    s = scrape(metrics)
    assert value(s, "hyper2kvm_migration_failures_total", error_type="NO_SPACE") == 1
    assert value(s, "hyper2kvm_migration_total", operation="convert", status="failed") == 1
    # Durations by how the jobs ended: the failure's does not mix with the conversion's.
    assert value(s, "h2kd_job_duration_seconds_count", operation="convert", status="completed") == 1
    assert value(s, "h2kd_job_duration_seconds_count", operation="convert", status="failed") == 1
    assert value(s, "h2kd_job_duration_seconds_sum", operation="convert", status="failed") == pytest.approx(30.0)
    # A failed job's run time and bytes are not a conversion's.
    assert value(s, "hyper2kvm_migration_duration_seconds_count", operation="convert") == 1
    assert value(s, "h2kd_converted_bytes_total") == 3 * GiB
    assert value(s, "hyper2kvm_vmdk_size_bytes_count") == 1
    # Queued again by hand (RetryJob): not an attempt retried after failing.
    life.move(bad, S.RETRYING, error_code="", error_message="")
    s = scrape(metrics)
    assert value(s, "h2kd_job_retries_total", error_type="TOOL_FAILED") == 1
    assert value(s, "h2kd_job_retries_total", error_type="INTERNAL") in (None, 0)
    assert value(s, "h2kd_jobs", state="retrying") == 1
    life.move(bad, S.QUEUED)
    assert value(scrape(metrics), "h2kd_job_retries_total", error_type="WORKER_LOST") in (None, 0)
    # An attempt that lost its worker, put straight back in the queue.
    life.move(bad, S.ASSIGNED, attempt=3)
    life.move(bad, S.RUNNING)
    life.move(bad, S.QUEUED, reason="back in the queue: worker w-1 was lost")
    assert value(scrape(metrics), "h2kd_job_retries_total", error_type="WORKER_LOST") == 1
    life.move(bad, S.FAILED, error_code="NO_SPACE", finished_at=now_usec() + 5_000_000)
    s = scrape(metrics)
    # Every ending counts; the second is timed from the retry by hand, not from the submission (at T0).
    assert value(s, "hyper2kvm_migration_total", operation="convert", status="failed") == 2
    assert value(s, "h2kd_job_duration_seconds_count", operation="convert", status="failed") == 2
    assert value(s, "h2kd_job_duration_seconds_sum", operation="convert", status="failed") == pytest.approx(35.0,
                                                                                                           abs=2)

    # An inspection cancelled while queued.
    dropped = life.submit(make_job("dropped-1", operation="inspect", priority=7))
    life.move(dropped, S.VALIDATED)
    life.move(dropped, S.QUEUED)
    assert value(scrape(metrics), "h2kd_queue_depth", priority="7") == 1
    life.move(dropped, S.CANCELLED, finished_at=T0 + 1_000_000)
    s = scrape(metrics)
    assert value(s, "hyper2kvm_migration_total", operation="inspect", status="cancelled") == 1
    assert value(s, "h2kd_queue_depth", priority="7") == 0
    assert value(s, "h2kd_jobs", state="cancelled") == 1
    assert value(s, "h2kd_job_duration_seconds_count", operation="inspect", status="cancelled") == 1

    # Removing finished jobs (pruning) takes them out of the state gauge, not out of the counters.
    life.remove(good)
    s = scrape(metrics)
    assert value(s, "h2kd_jobs", state="completed") == 0
    assert value(s, "hyper2kvm_migration_total", operation="convert", status="completed") == 1


def test_repeated_and_non_state_updates_do_not_count_twice():
    metrics = Metrics()
    life = Lifecycle(metrics)
    job = life.submit(make_job("steady-1"))
    life.run_to_progressing(job)
    for step in range(1, 50):
        life.update(job, progress=step / 50, progress_known=True, bytes_done=step)
    metrics.job_changed(job, {"state"}, True)   # the same state announced again
    metrics.job_added(job)                      # and the job announced again
    s = scrape(metrics)
    assert value(s, "h2kd_jobs", state="progressing") == 1
    assert value(s, "hyper2kvm_worker_jobs_active") == 1
    assert sum(v for (name, _), v in s.items() if name == "h2kd_jobs") == 1


def test_jobs_loaded_at_start_count_by_state_but_not_as_endings():
    done = make_job("old-done")
    for state in (S.VALIDATED, S.QUEUED, S.ASSIGNED, S.RUNNING, S.COMPLETED):
        done.move_to(state)
    waiting = make_job("old-waiting", priority=2)
    waiting.move_to(S.VALIDATED)
    waiting.move_to(S.QUEUED)
    metrics = Metrics([done, waiting])
    s = scrape(metrics)
    assert value(s, "h2kd_jobs", state="completed") == 1
    assert value(s, "h2kd_queue_depth", priority="2") == 1
    assert value(s, "hyper2kvm_migration_total", operation="convert", status="completed") == 0


def test_workers_alive_stale_and_info():
    metrics = Metrics()
    builtin = WorkerInfo(id="builtin", name="host1", kind="builtin", capabilities={"operations": ["convert"]})
    remote = WorkerInfo(id="w1", name="nbd-box", kind="external", capabilities={"version": "2.3.1"})
    metrics.worker_added(builtin)
    metrics.worker_added(remote)
    s = scrape(metrics)
    assert value(s, "h2kd_workers", state="alive") == 2
    assert value(s, "hyper2kvm_worker_info", worker="w1", kind="external", version="2.3.1") == 1
    from h2kd import __version__
    assert value(s, "hyper2kvm_worker_info", worker="builtin", kind="builtin", version=__version__) == 1
    remote.state = "busy"
    metrics.worker_changed(remote)
    remote.state = "stale"
    metrics.worker_changed(remote)
    s = scrape(metrics)
    assert value(s, "h2kd_workers", state="alive") == 1
    assert value(s, "h2kd_workers", state="stale") == 1
    metrics.worker_removed(remote)
    s = scrape(metrics)
    assert value(s, "h2kd_workers", state="stale") == 0
    assert ("hyper2kvm_worker_info", frozenset({"worker": "w1", "kind": "external", "version": "2.3.1"}.items())) \
        not in s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_endpoint_serves_metrics_that_promtool_accepts():
    metrics = Metrics()
    life = Lifecycle(metrics)
    metrics.worker_added(WorkerInfo(id="builtin", name="host1", kind="builtin", capabilities={}))
    job = life.submit(make_job("scraped-1"))
    life.run_to_progressing(job)
    life.move(job, S.COMPLETED, finished_at=T0 + 5_000_000,
              result={"metrics": {"execution_seconds": 2.0, "bytes_written": 4096}})
    failed = life.submit(make_job("scraped-2"))
    life.run_to_progressing(failed)
    life.move(failed, S.FAILED, error_code="INVALID_IMAGE", finished_at=T0 + 6_000_000)

    assert start_http(metrics, "127.0.0.1", 0) is None   # port 0: disabled
    port = _free_port()
    server = start_http(metrics, "127.0.0.1", port)
    assert server is not None
    try:
        assert server.url == f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(server.url, timeout=5) as response:
            assert response.status == 200
            body = response.read()
    finally:
        server.stop()
    text = body.decode()
    assert 'hyper2kvm_migration_total{operation="convert",status="completed"} 1.0' in text
    assert 'hyper2kvm_migration_failures_total{error_type="INVALID_IMAGE"} 1.0' in text
    assert "h2kd_converted_bytes_total 4096.0" in text
    # Only the metrics themselves: no "<name>_created" gauge beside each counter and histogram, which doubles the
    # series and reads like a count of its own (hyper2kvm_migration_created).
    assert "_created" not in text

    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    assert check.stdout.strip() == b"" and check.stderr.strip() == b"", check.stdout + check.stderr

    # Stopped means the port is closed.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


# ------------------------------------------------------------------------------------------------
# journald


@pytest.fixture(scope="session")
def journald(tmp_path_factory):
    """A journald answering on /run/systemd/journal/socket: the running one, or one of ours (own cgroup).
    Kept for the whole run: a stack started while it ran uses it too (start_journald finds it live), and
    would lose its journal if it stopped at the end of this module."""
    if os.geteuid() != 0:
        pytest.skip("starting systemd-journald needs root")
    from h2kd.sandbox.systemd import start_journald
    handle = start_journald(tmp_path_factory.mktemp("journald") / "journald.log")
    yield
    if handle is not None:
        handle.stop()


def read_journal(*matches: str, expect: int, timeout: float = 10.0) -> list[dict]:
    """Entries matching every FIELD=value, once at least `expect` of them are there."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["journalctl", "--no-pager", "-o", "json", *matches],
                             capture_output=True, text=True, timeout=30)
        entries = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        if len(entries) >= expect or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


def catalog_variables() -> dict[str, set[str]]:
    """For each MESSAGE_ID of the catalog, the fields its text quotes (@NAME@)."""
    quoted: dict[str, set[str]] = {}
    current = None
    for line in CATALOG.read_text().splitlines():
        if line.startswith("-- "):
            current = line[3:].strip()
            quoted[current] = set()
        elif current is not None:
            quoted[current] |= set(re.findall(r"@([A-Z_]+)@", line))
    return quoted


def assert_catalog_can_explain(entries: list[dict]) -> None:
    """Every field a catalog text quotes is in the entry (journalctl -x would print the bare name)."""
    quoted = catalog_variables()
    for entry in entries:
        missing = quoted[entry["MESSAGE_ID"]] - entry.keys()
        assert not missing, (entry["MESSAGE"], missing)


def unique_id(name: str) -> str:
    return f"{name}-{os.getpid()}-{time.time_ns()}"


def test_lifecycle_entries_carry_fields_and_message_ids(journald):
    log = JournalLog()
    life = Lifecycle(log)
    job_id = unique_id("jlife")
    job = life.submit(make_job(job_id, owner=1234))
    life.run_to_progressing(job, unit="h2k-job-unit-1.service")
    for percent in range(0, 101):   # a hundred progress updates: only the ten checkpoints are journaled
        life.update(job, progress=percent / 100, progress_known=True, phase="converting",
                    bytes_done=percent * 1000, bytes_total=100_000)
    life.move(job, S.COMPLETED, finished_at=T0 + 14_500_000)

    entries = read_journal(f"H2K_JOB_ID={job_id}", expect=13)
    ids = [e["MESSAGE_ID"] for e in entries]
    assert ids == ([MESSAGE_IDS["submitted"], MESSAGE_IDS["started"]] + [MESSAGE_IDS["progress"]] * 10
                   + [MESSAGE_IDS["completed"]]), [e["MESSAGE"] for e in entries]
    started = entries[1]
    assert started["H2K_STATE"] == "running"
    assert started["H2K_OPERATION"] == "convert"
    assert started["H2K_WORKER"] == "builtin"
    assert started["H2K_ATTEMPT"] == "1"
    assert started["H2K_OWNER_UID"] == "1234"
    assert started["SYSLOG_IDENTIFIER"] == "h2kd"
    assert started["PRIORITY"] == "6"
    # Where in h2kd the entry was written: the lifecycle step, not the helper that sends every entry.
    assert started["CODE_FUNC"] == "JournalLog._state_changed", started["CODE_FUNC"]
    assert started["CODE_FILE"].endswith("h2kd/observability/journal.py") and int(started["CODE_LINE"]) > 0
    assert [e["H2K_PROGRESS_PERCENT"] for e in entries[2:12]] == [str(p) for p in range(10, 101, 10)]
    assert entries[-1]["H2K_STATE"] == "completed"
    assert entries[-1]["H2K_DURATION_SECONDS"] == "12.500"
    # The catalog quotes digit-free copies of the same fields.
    assert entries[-1]["HYPERKVM_JOB_ID"] == job_id
    assert entries[-1]["H2K_OUTPUT"] == f"/var/lib/h2kd/output/{job_id}.qcow2"
    assert_catalog_can_explain(entries)


def test_a_job_given_no_output_path_is_journaled_with_the_directory_it_wrote_into(journald, monkeypatch):
    monkeypatch.setattr(Job, "default_output_root", "/srv/h2kd-out")
    log = JournalLog()
    life = Lifecycle(log)
    job_id = unique_id("jdefault")
    job = make_job(job_id)
    job.spec["artifacts"]["output_path"] = None
    life.submit(job)
    # Submitted: the directory it will be given in h2kd's first output root.
    submitted = read_journal(f"H2K_JOB_ID={job_id}", expect=1)[0]
    assert submitted["MESSAGE_ID"] == MESSAGE_IDS["submitted"]
    assert submitted["H2K_OUTPUT"] == f"/srv/h2kd-out/{job_id}/"
    life.run_to_progressing(job, unit="h2k-job-unit-1.service")
    # Completed: the directory its result names (written by an attempt of an h2kd with other settings).
    written = f"/var/lib/h2kd/output/{job_id}/web01.qcow2"
    life.move(job, S.COMPLETED, finished_at=T0 + 3_000_000, result={"outputs": {"disks": [{"path": written}]}})
    completed = read_journal(f"H2K_JOB_ID={job_id}", expect=3)[-1]
    assert completed["MESSAGE_ID"] == MESSAGE_IDS["completed"]
    assert completed["H2K_OUTPUT"] == f"/var/lib/h2kd/output/{job_id}/"


def test_failure_cancel_retry_and_lost_worker_entries(journald):
    log = JournalLog()
    life = Lifecycle(log)
    failed_id, cancelled_id = unique_id("jfail"), unique_id("jcancel")
    failed = life.submit(make_job(failed_id))
    life.run_to_progressing(failed)
    life.move(failed, S.RETRYING, error_code="TOOL_FAILED", error_message="qemu-img exited 1")
    life.move(failed, S.QUEUED)
    life.move(failed, S.ASSIGNED, attempt=2)
    life.move(failed, S.RUNNING)
    life.move(failed, S.FAILED, error_code="NO_SPACE", error_message="output root full")
    cancelled = life.submit(make_job(cancelled_id))
    life.move(cancelled, S.VALIDATED)
    life.move(cancelled, S.CANCELLED, cancelled_by=1000)

    entries = read_journal(f"H2K_JOB_ID={failed_id}", f"MESSAGE_ID={MESSAGE_IDS['failed']}", expect=1)
    assert len(entries) == 1
    assert entries[0]["PRIORITY"] == "3"
    assert entries[0]["H2K_ERROR_CODE"] == "NO_SPACE"
    assert entries[0]["H2K_ATTEMPT"] == "2"
    assert "output root full" in entries[0]["MESSAGE"]
    retried = read_journal(f"H2K_JOB_ID={failed_id}", f"MESSAGE_ID={MESSAGE_IDS['retried']}", expect=1)
    assert [e["H2K_ERROR_CODE"] for e in retried] == ["TOOL_FAILED"]
    assert retried[0]["PRIORITY"] == "4"
    gone = read_journal(f"H2K_JOB_ID={cancelled_id}", f"MESSAGE_ID={MESSAGE_IDS['cancelled']}", expect=1)
    assert [e["H2K_STATE"] for e in gone] == ["cancelled"]
    assert [e["MESSAGE"] for e in gone] == [f"Job {cancelled_id} cancelled by uid 1000"]
    assert [e["H2K_CANCELLED_BY_UID"] for e in gone] == ["1000"]
    # Retried by hand: an event of its own, not "will be retried after" an error, and no warning; no error
    # fields for a job that had none.
    life.move(cancelled, S.RETRYING)
    again = read_journal(f"H2K_JOB_ID={cancelled_id}", f"MESSAGE_ID={MESSAGE_IDS['requeued']}", expect=1)
    assert [e["MESSAGE"] for e in again] == [f"Job {cancelled_id} queued again by request (it had cancelled)"]
    assert again[0]["PRIORITY"] == "5" and again[0]["H2K_PREVIOUS_STATE"] == "cancelled"
    assert "H2K_ERROR_CODE" not in again[0]
    assert read_journal(f"H2K_JOB_ID={cancelled_id}", f"MESSAGE_ID={MESSAGE_IDS['retried']}", expect=0) == []
    life.move(failed, S.RETRYING)
    failed_again = read_journal(f"H2K_JOB_ID={failed_id}", f"MESSAGE_ID={MESSAGE_IDS['requeued']}", expect=1)
    assert [e["MESSAGE"] for e in failed_again] == [
        f"Job {failed_id} queued again by request (it had failed: NO_SPACE: output root full)"]

    # The submitter's own mistake is said to them: a warning in the journal, not an error.
    mistaken_id = unique_id("jmistake")
    mistaken = life.submit(make_job(mistaken_id))
    life.move(mistaken, S.FAILED, error_code="OUTPUT_EXISTS", error_message="the output exists")
    mistake = read_journal(f"H2K_JOB_ID={mistaken_id}", f"MESSAGE_ID={MESSAGE_IDS['failed']}", expect=1)
    assert mistake[0]["PRIORITY"] == "4"

    # An attempt that lost its worker goes straight back to the queue: a warning, with why.
    lost_id = unique_id("jlost")
    lost_job = life.submit(make_job(lost_id))
    life.run_to_progressing(lost_job)
    life.move(lost_job, S.QUEUED, reason="back in the queue: worker w-1 was lost: missed its heartbeats")
    requeued = read_journal(f"H2K_JOB_ID={lost_id}", f"MESSAGE_ID={MESSAGE_IDS['retried']}", expect=1)
    assert [e["MESSAGE"] for e in requeued] == [
        f"Job {lost_id} attempt 1 back in the queue: worker w-1 was lost: missed its heartbeats"]
    assert requeued[0]["PRIORITY"] == "4" and requeued[0]["H2K_ERROR_CODE"] == "WORKER_LOST"

    worker_id = unique_id("w")
    worker = WorkerInfo(id=worker_id, name="remote-box", kind="external", capabilities={}, state="busy")
    log.worker_added(worker)
    worker.state = "stale"
    log.worker_changed(worker)
    log.worker_changed(worker)   # still stale: no second entry
    lost = read_journal(f"H2K_WORKER={worker_id}", expect=1)
    assert [e["MESSAGE_ID"] for e in lost] == [MESSAGE_IDS["worker-lost"]]
    assert lost[0]["H2K_WORKER_NAME"] == "remote-box"
    assert_catalog_can_explain(entries + retried + gone + again + failed_again + mistake + requeued + lost)


def test_journal_log_is_silent_without_a_journal(tmp_path):
    """With no journald socket (a private mount namespace hides /run/systemd/journal), nothing raises."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    probe = textwrap.dedent("""
        import os
        from h2kd.model.job import Job
        from h2kd.model.states import JobState
        from h2kd.observability.journal import JournalLog
        assert not os.path.exists("/run/systemd/journal/socket")
        log = JournalLog()
        job = Job(id="nojournal", spec={"image": {"path": "/a.vmdk"}}, operation="convert", owner=0)
        log.job_added(job)
        for state in ("validated", "queued", "assigned", "running", "failed"):
            job.move_to(JobState(state))
            log.job_changed(job, {"state"}, True)
        print("no journal, no error")
    """)
    Path("/run/systemd/journal").mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                          'mount -t tmpfs none /run/systemd/journal && exec "$0" -c "$1"', sys.executable, probe],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no journal, no error"


def catalog_root(tmp_path: Path) -> Path:
    """A directory laid out like / with our catalog installed and `journalctl --update-catalog` run on it."""
    root = tmp_path / "root"
    (root / "usr/lib/systemd/catalog").mkdir(parents=True)
    shutil.copy(CATALOG, root / "usr/lib/systemd/catalog/h2kd.catalog")
    subprocess.run(["journalctl", f"--root={root}", "--update-catalog"], check=True, timeout=30)
    return root


def test_catalog_defines_every_message_id(tmp_path):
    """`journalctl --update-catalog` (here on a private --root) accepts the file and lists our ids."""
    root = catalog_root(tmp_path)
    listed = subprocess.run(["journalctl", f"--root={root}", "--list-catalog"], check=True, capture_output=True,
                            text=True, timeout=30).stdout
    ids = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert ids == set(MESSAGE_IDS.values())
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS)
    for line in listed.splitlines():
        assert " h2kd: " in line


def test_journalctl_x_explains_a_failure(journald, tmp_path):
    """`journalctl -x` shows the catalog text, with this job's values, under a real entry.

    journalctl -x reads /var/lib/systemd/catalog/database only, so a private mount namespace puts a
    database built from our catalog there: the host's catalog is never touched.
    """
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    root = catalog_root(tmp_path)
    job_id = unique_id("jx")
    life = Lifecycle(JournalLog())
    job = life.submit(make_job(job_id))
    life.run_to_progressing(job)
    life.move(job, S.FAILED, error_code="OUTPUT_EXISTS", error_message="/var/lib/h2kd/output/x.qcow2 exists")
    assert read_journal(f"H2K_JOB_ID={job_id}", f"MESSAGE_ID={MESSAGE_IDS['failed']}", expect=1)

    database = root / "var/lib/systemd/catalog"
    script = ('mount --bind "$0" /var/lib/systemd/catalog && '
              'exec journalctl --no-pager -x "H2K_JOB_ID=$1" "MESSAGE_ID=$2"')
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(database),
                          job_id, MESSAGE_IDS["failed"]], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"Subject: h2kd job {job_id} failed: OUTPUT_EXISTS" in text
    assert f"journalctl H2K_JOB_ID={job_id}" in text
    assert f"h2kctl status {job_id}" in text
    assert f"h2kctl retry {job_id}" in text
    assert "/var/lib/h2kd/output/x.qcow2 exists" in text
    assert "Documentation: man:h2kctl(1)" in text
    assert "@" not in text and "HYPERKVM_" not in text   # every quoted field was substituted


# ------------------------------------------------------------------------------------------------
# Watchdog


def test_watchdog_interval_follows_systemd_environment():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert not Watchdog(lambda: {"store_ok": True}, environ={}).enabled


WATCHDOG_CHILD = textwrap.dedent("""
    import asyncio, time
    from h2kd.observability.health import Watchdog, notify_ready, notify_status, notify_stopping

    health = {"store_ok": True}

    async def main():
        watchdog = Watchdog(lambda: health)
        watchdog.start()
        notify_ready("up")
        await asyncio.sleep(3.0)        # ~30 pings due: the test asks for 6, so a starved child still passes
        notify_status("blocking")
        time.sleep(1.5)                 # the event loop is wedged
        notify_status("unblocked")
        await asyncio.sleep(3.0)
        health["store_ok"] = False
        notify_status("store-broken")
        await asyncio.sleep(1.0)
        watchdog.stop()
        notify_stopping()

    asyncio.run(main())
""")


def test_watchdog_pings_only_while_the_loop_and_store_are_live(tmp_path):
    sock_path = tmp_path / "notify"
    received: list[tuple[float, str]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(10)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000", "PYTHONPATH": str(REPO)}
        env.pop("WATCHDOG_PID", None)
        child = subprocess.Popen([sys.executable, "-c", WATCHDOG_CHILD], env=env)
        try:
            while True:
                message = sock.recv(4096).decode()
                received.append((time.monotonic(), message))
                if message.startswith("STOPPING=1"):
                    break
        finally:
            assert child.wait(timeout=10) == 0

    def index(status: str) -> int:
        return next(i for i, (_, m) in enumerate(received) if m == f"STATUS={status}")

    messages = [m for _, m in received]
    assert messages[0] == "READY=1\nSTATUS=up"
    blocking, unblocked, broken = index("blocking"), index("unblocked"), index("store-broken")
    free = messages[:blocking]
    # 0.2 s timeout: a ping every 0.1 s while the loop is free (3 s of it).
    assert free.count("WATCHDOG=1") >= 6, messages
    # While the loop is blocked, no ping: systemd's 0.2 s timeout expires.
    assert "WATCHDOG=1" not in messages[blocking:unblocked]
    last_before = max(t for t, m in received[:blocking] if m == "WATCHDOG=1")
    first_after = min(t for t, m in received[unblocked:] if m == "WATCHDOG=1")
    assert first_after - last_before > 1.0
    # Free again: pings resume.
    assert messages[unblocked:broken].count("WATCHDOG=1") >= 6, messages
    # The store is not OK: the loop runs but no more pings, and the status says why.
    assert "WATCHDOG=1" not in messages[broken:]
    assert "STATUS=unhealthy: the job store is not OK" in messages[broken:]


def test_watchdog_for_another_pid_does_not_ping(tmp_path):
    sock_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(5)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "100000",
               "WATCHDOG_PID": "1", "PYTHONPATH": str(REPO)}
        script = WATCHDOG_CHILD.replace("time.sleep(1.5)", "pass").replace("await asyncio.sleep(1.0)",
                                                                            "await asyncio.sleep(0.3)")
        child = subprocess.Popen([sys.executable, "-c", script], env=env)
        messages = []
        try:
            while not (messages and messages[-1].startswith("STOPPING=1")):
                messages.append(sock.recv(4096).decode())
        finally:
            assert child.wait(timeout=10) == 0
    assert "READY=1\nSTATUS=up" in messages
    assert "WATCHDOG=1" not in messages


@pytest.fixture(scope="module")
def systemd_user(tmp_path_factory):
    """A real systemd manager (systemd --user, in a cgroup of its own) to run a unit with WatchdogSec=."""
    if os.geteuid() != 0:
        pytest.skip("starting a systemd manager here needs root")
    from h2kd.sandbox.systemd import start_user_manager
    base = tmp_path_factory.mktemp("systemd-user")
    manager = start_user_manager(base / "runtime", base / "manager.log")
    yield manager
    manager.stop()


BLOCKING_DAEMON = textwrap.dedent("""
    import asyncio, time
    from h2kd.observability.health import Watchdog, notify_ready, notify_status

    async def main():
        watchdog = Watchdog(lambda: {"store_ok": True})
        assert watchdog.enabled
        watchdog.start()
        notify_ready("serving")
        await asyncio.sleep(7)          # longer than WatchdogSec: only the pings keep it alive
        notify_status("blocking")
        time.sleep(30)                  # the event loop is wedged

    asyncio.run(main())
""")


def test_systemd_watchdog_fires_when_the_daemon_loop_is_blocked(systemd_user):
    unit = f"h2k-watchdog-test-{os.getpid()}-{time.time_ns()}.service"
    env = systemd_user.systemctl_env()
    started = subprocess.run(
        ["systemd-run", "--user", "--quiet", f"--unit={unit}", "--property=Type=notify",
         "--property=NotifyAccess=main", "--property=WatchdogSec=3", f"--setenv=PYTHONPATH={REPO}",
         sys.executable, "-c", BLOCKING_DAEMON],
        env=env, capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr

    def show() -> dict[str, str]:
        out = subprocess.run(["systemctl", "--user", "show", unit, "-p", "ActiveState,Result,StatusText"],
                             env=env, capture_output=True, text=True, timeout=10).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    try:
        seen = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            props = show()
            seen.append(props)
            if props.get("Result") not in ("success", None) or props.get("ActiveState") in ("failed", "inactive"):
                break
            time.sleep(0.1)
        # It outlived its 3 s watchdog while its loop was free, and reached the blocking part alive (for 3 s:
        # wide enough for systemctl's polls on a loaded machine).
        assert any(p.get("StatusText") == "blocking" and p.get("ActiveState") == "active" for p in seen), seen
        assert seen[-1].get("Result") == "watchdog", seen[-1]
    finally:
        subprocess.run(["systemctl", "--user", "stop", unit], env=env, capture_output=True, timeout=30)
        subprocess.run(["systemctl", "--user", "reset-failed", unit], env=env, capture_output=True, timeout=30)


def test_the_daemons_log_lines_reach_the_journal_with_their_priority(systemd_user, journald):
    """Run as a service, h2kd logs to stderr, which is the journal: each line carries its priority, so
    `journalctl -p warning` finds warnings and errors, tracebacks included."""
    marker = f"{os.getpid()}-{time.time_ns()}"
    program = textwrap.dedent(f"""
        import logging
        from h2kd.daemon import configure_logging
        configure_logging(False)
        log = logging.getLogger("h2kd")
        log.info("told {marker}")
        log.warning("warned {marker}")
        try:
            raise ValueError("bad {marker}")
        except ValueError:
            log.exception("failed {marker}")
    """)
    ran = subprocess.run(["systemd-run", "--user", "--wait", "--quiet", f"--setenv=PYTHONPATH={REPO}",
                          sys.executable, "-c", program],
                         env=systemd_user.systemctl_env(), capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    priorities = {}
    for word, expected in (("told", "6"), ("warned", "4"), ("failed", "3")):
        entries = read_journal(f"MESSAGE=h2kd: {word} {marker}", expect=1)
        assert entries, f"the {word} line never reached the journal"
        priorities[word] = entries[0]["PRIORITY"]
    assert priorities == {"told": "6", "warned": "4", "failed": "3"}
    assert read_journal(f"MESSAGE=ValueError: bad {marker}", "PRIORITY=3", expect=1), "the traceback lost its priority"


# ------------------------------------------------------------------------------------------------
# Through the daemon (the private stack)


async def _submit(bus_address: str, spec: dict) -> str:
    from dbus_fast import Message, MessageType, Variant
    from dbus_fast.aio import MessageBus

    from h2kd import BUS_NAME, MANAGER_PATH

    def variant(value):
        if isinstance(value, dict):
            return Variant("a{sv}", {k: variant(v) for k, v in value.items()})
        if isinstance(value, bool):
            return Variant("b", value)
        if isinstance(value, int):
            return Variant("u", value)
        return Variant("s", value)

    bus = await MessageBus(bus_address=bus_address).connect()
    try:
        reply = await bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=BUS_NAME + ".Manager",
                                       member="SubmitJob", signature="a{sv}a{sv}",
                                       body=[{k: variant(v) for k, v in spec.items()}, {}]))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        return reply.body[0]
    finally:
        bus.disconnect()


def _scrape_url(url: str) -> tuple[bytes, dict]:
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read()
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return body, samples


def test_daemon_metrics_and_journal_for_a_rejected_job(stack):
    import asyncio

    body, before = _scrape_url(stack.metrics_url)
    assert value(before, "h2kd_workers", state="alive") >= 1
    assert any(name == "hyper2kvm_worker_info" and dict(labels).get("worker") == "builtin"
               for name, labels in before)
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr

    job_id = unique_id("e2e-missing")
    missing = stack.output_dir.parent / "no-such-disk.vmdk"
    assert asyncio.run(_submit(stack.bus_address, {
        "job_id": job_id, "operation": "convert", "image": {"path": str(missing)},
        "artifacts": {"output_path": str(stack.output_dir / f"{job_id}.qcow2")}})) == job_id

    entries = read_journal(f"H2K_JOB_ID={job_id}", expect=2)
    assert [e["MESSAGE_ID"] for e in entries][:1] == [MESSAGE_IDS["submitted"]]
    failed = [e for e in entries if e["MESSAGE_ID"] == MESSAGE_IDS["failed"]]
    assert [e["H2K_ERROR_CODE"] for e in failed] == ["VALIDATION_FAILED"], [e["MESSAGE"] for e in entries]
    assert failed[0]["_PID"] == str(stack.daemon_pid)

    _, after = _scrape_url(stack.metrics_url)
    assert value(after, "hyper2kvm_migration_failures_total", error_type="VALIDATION_FAILED") == \
        value(before, "hyper2kvm_migration_failures_total", error_type="VALIDATION_FAILED") + 1
    assert value(after, "hyper2kvm_migration_total", operation="convert", status="failed") == \
        value(before, "hyper2kvm_migration_total", operation="convert", status="failed") + 1
    assert value(after, "h2kd_jobs", state="failed") == value(before, "h2kd_jobs", state="failed") + 1


def test_daemon_metrics_tell_its_health_and_how_long_the_queue_has_been_stuck(stack):
    """What an operator alerts on: the store and systemd as GetHealth has them, a paused queue, and the age of
    the job queued longest (time() minus its submission), sampled every few seconds."""
    import asyncio

    from h2kd import BUS_NAME, MANAGER_PATH
    from h2kd.observability.metrics import HEALTH_SAMPLE_SECONDS

    def sampled(until: Callable[[dict], bool]) -> dict:
        deadline = time.monotonic() + 3 * HEALTH_SAMPLE_SECONDS + 5
        while True:
            _, samples = _scrape_url(stack.metrics_url)
            if until(samples) or time.monotonic() > deadline:
                return samples
            time.sleep(0.5)

    calm = sampled(lambda m: value(m, "h2kd_queue_paused") == 0 and value(m, "h2kd_queue_oldest_timestamp_seconds") == 0)
    assert value(calm, "h2kd_store_ok") == 1 and value(calm, "h2kd_systemd_reachable") == 1
    assert value(calm, "h2kd_queue_paused") == 0
    assert value(calm, "h2kd_jobs", state="queued") == 0
    assert value(calm, "h2kd_queue_oldest_timestamp_seconds") == 0
    env = {**os.environ, **stack.env()}

    def manager(member: str, *args: str) -> None:
        subprocess.run(["gdbus", "call", "--system", "-d", BUS_NAME, "-o", MANAGER_PATH, "-m",
                        f"{BUS_NAME}.Manager.{member}", *args], env=env, capture_output=True, timeout=30, check=True)
    manager("PauseQueue")
    job_id = unique_id("stuck")
    try:
        submitted = time.time()
        asyncio.run(_submit(stack.bus_address, {"job_id": job_id, "operation": "inspect",
                                                "image": {"path": "/etc/hostname"}}))
        stuck = sampled(lambda m: value(m, "h2kd_queue_oldest_timestamp_seconds") > 0)
        assert value(stuck, "h2kd_queue_paused") == 1
        oldest = value(stuck, "h2kd_queue_oldest_timestamp_seconds")
        assert submitted - 1 <= oldest <= time.time(), (submitted, oldest)
    finally:
        manager("CancelJob", job_id)
        manager("ResumeQueue")
    again = sampled(lambda m: value(m, "h2kd_queue_paused") == 0
                    and value(m, "h2kd_queue_oldest_timestamp_seconds") == 0)
    assert value(again, "h2kd_queue_paused") == 0
    assert value(again, "h2kd_queue_oldest_timestamp_seconds") == 0


def test_the_status_systemctl_shows_follows_the_queue(stack, tmp_path):
    """`systemctl status h2kd` shows h2kd's STATUS=: the queue as it is, not as it was at start."""
    import asyncio

    from dbus_fast.aio import MessageBus

    from h2kd import BUS_NAME, MANAGER_PATH

    async def manager_call(member: str) -> None:
        bus = await MessageBus(bus_address=stack.bus_address).connect()
        try:
            from dbus_fast import Message, MessageType
            reply = await bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH,
                                           interface=BUS_NAME + ".Manager", member=member))
            assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        finally:
            bus.disconnect()

    sock_path = tmp_path / "notify"
    before = dict(stack.daemon_env)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(10)

        def status_until_match(pattern: str) -> re.Match:
            seen: list[str] = []
            while not (seen and (found := re.fullmatch(pattern, seen[-1]))):
                try:
                    message = sock.recv(4096).decode()
                except TimeoutError:
                    raise AssertionError(f"no STATUS= like {pattern!r}; got {seen}") from None
                seen += [line[len("STATUS="):] for line in message.splitlines() if line.startswith("STATUS=")]
            return found

        def status_until(wanted: str) -> None:
            status_until_match(re.escape(wanted))

        stack.restart_daemon({**before, "NOTIFY_SOCKET": str(sock_path)})
        try:
            first = status_until_match(r"(\d+) queued, (\d+) running")
            queued, running = int(first.group(1)), int(first.group(2))
            asyncio.run(manager_call("PauseQueue"))
            status_until(f"{queued} queued, {running} running, queue paused")
            job_id = unique_id("status")
            asyncio.run(_submit(stack.bus_address, {
                "job_id": job_id, "operation": "inspect", "image": {"path": "/etc/hostname"}}))
            status_until(f"{queued + 1} queued, {running} running, queue paused")
            subprocess.run(["gdbus", "call", "--system", "-d", BUS_NAME, "-o", MANAGER_PATH, "-m",
                            BUS_NAME + ".Manager.CancelJob", job_id], env={**os.environ, **stack.env()},
                           capture_output=True, timeout=30, check=True)
            status_until(f"{queued} queued, {running} running, queue paused")
        finally:
            asyncio.run(manager_call("ResumeQueue"))
            stack.restart_daemon(before)


def test_status_and_metrics_say_when_systemd_does_not_answer(stack, tmp_path):
    """With systemd's manager out of reach no job can start: `systemctl status h2kd` and the metrics say so,
    rather than a queue that looks merely slow."""
    sock_path = tmp_path / "notify"
    before = dict(stack.daemon_env)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(20)
        stack.restart_daemon({**before, "NOTIFY_SOCKET": str(sock_path),
                              "H2KD_SYSTEMD_BUS_ADDRESS": f"unix:path={tmp_path / 'no-systemd'}"})
        try:
            seen: list[str] = []
            while not any(line.startswith("systemd's manager does not answer, no job starts; ") for line in seen):
                try:
                    message = sock.recv(4096).decode()
                except TimeoutError:
                    raise AssertionError(f"STATUS= never said systemd is away; got {seen}") from None
                seen += [line[len("STATUS="):] for line in message.splitlines() if line.startswith("STATUS=")]
            deadline = time.monotonic() + 20
            while value(_scrape_url(stack.metrics_url)[1], "h2kd_systemd_reachable") != 0:
                assert time.monotonic() < deadline, "h2kd_systemd_reachable stayed 1"
                time.sleep(0.5)
        finally:
            stack.restart_daemon(before)


def test_the_status_line_says_nothing_more_once_closed(tmp_path, monkeypatch):
    """After STOPPING=1 the queue's counts must not come back over it, from a timer set before or a change after."""
    import asyncio

    from h2kd.observability.health import StatusLine

    sock_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))

        async def main() -> None:
            line = StatusLine(lambda: (2, 1, False), interval=0.05)
            line.manager_changed({"JobsQueued"})
            line.set_problem("the job store is not OK")   # sent at once; the timer set before must not fire later
            line.manager_changed({"JobsQueued"})
            line.close()
            line.manager_changed({"JobsRunning"})
            await asyncio.sleep(0.3)

        asyncio.run(main())
        received = []
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
    assert received == ["STATUS=unhealthy: the job store is not OK; 2 queued, 1 running"]
