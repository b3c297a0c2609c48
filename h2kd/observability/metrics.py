"""Metrics: Prometheus metrics for h2kd, kept up to date by the manager's listener calls, and their /metrics server.

The original protocol's names are kept so existing dashboards work:
  hyper2kvm_migration_total{operation,status}     counter, a job ended: status completed|failed|cancelled
  hyper2kvm_migration_duration_seconds{operation}  histogram, run time (started_at to finished_at) of completed jobs
  hyper2kvm_migration_failures_total{error_type}   counter, jobs that ended failed, by error code
  hyper2kvm_worker_jobs_active                     gauge, jobs assigned, running or progressing
  hyper2kvm_vmdk_size_bytes                        histogram, source size (bytes_total) of completed VMDK conversions
  hyper2kvm_worker_info{worker,kind,version}       gauge = 1 per registered worker
and added for operators:
  h2kd_jobs{state}                                 gauge, jobs known to the daemon by state
  h2kd_queue_depth{priority}                       gauge, queued jobs by priority 1..10
  h2kd_converted_bytes_total                       counter, bytes written by completed conversions
  h2kd_conversion_throughput_bytes_per_second      histogram, bytes written / execution time of each completed
                                                   conversion (a histogram, not a last-value gauge, so rates and
                                                   quantiles over any window can be taken across a fleet)
  h2kd_job_duration_seconds{operation}             histogram, submission to end of every finished job
  h2kd_job_retries_total{error_type}               counter, attempts that failed and were retried
  h2kd_workers{state}                              gauge, registered workers alive|stale

Every change costs O(1): the listener remembers each job's last counted state and priority, never scans.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from socketserver import BaseServer
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from h2kd import __version__
from h2kd.manager.ports import Event, WorkerInfo
from h2kd.model.job import Job
from h2kd.model.states import ACTIVE, TERMINAL, JobState

log = logging.getLogger(__name__)

PRIORITIES = range(1, 11)
GiB = 1024 ** 3
MiB = 1024 ** 2
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)
SIZE_BUCKETS = tuple(GiB * n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
THROUGHPUT_BUCKETS = tuple(MiB * n for n in (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))


def _is_vmdk(job: Job) -> bool:
    image = job.spec.get("image") or {}
    fmt = (image.get("format") or "").lower()
    return fmt == "vmdk" or (not fmt and str(image.get("path") or "").lower().endswith(".vmdk"))


def _worker_state(worker: WorkerInfo) -> str:
    return "stale" if worker.state == "stale" else "alive"


@dataclass
class _Counted:
    """What a job last contributed to the gauges, so a change only moves the difference."""

    state: JobState
    priority: int


class Metrics:
    """A JobListener that keeps a private CollectorRegistry current. Synchronous and never raises."""

    def __init__(self, jobs: Iterable[Job] = (), workers: Iterable[WorkerInfo] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.migrations = Counter("hyper2kvm_migration", "Jobs that ended, by operation and final status",
                                  ["operation", "status"], registry=r)
        self.migration_duration = Histogram("hyper2kvm_migration_duration_seconds",
                                            "Run time of completed jobs, from their first start to their end",
                                            ["operation"], buckets=DURATION_BUCKETS, registry=r)
        self.failures = Counter("hyper2kvm_migration_failures", "Jobs that ended failed, by error code",
                                ["error_type"], registry=r)
        self.jobs_active = Gauge("hyper2kvm_worker_jobs_active", "Jobs assigned to a worker, running or progressing",
                                 registry=r)
        self.vmdk_size = Histogram("hyper2kvm_vmdk_size_bytes", "Size of the VMDK sources of completed conversions",
                                   buckets=SIZE_BUCKETS, registry=r)
        self.worker_info = Gauge("hyper2kvm_worker_info", "Registered workers (value always 1)",
                                 ["worker", "kind", "version"], registry=r)
        self.jobs_by_state = Gauge("h2kd_jobs", "Jobs known to the daemon, by state", ["state"], registry=r)
        self.queue_depth = Gauge("h2kd_queue_depth", "Queued jobs, by priority (1 is most urgent)",
                                 ["priority"], registry=r)
        self.converted_bytes = Counter("h2kd_converted_bytes", "Bytes written by completed conversions", registry=r)
        self.throughput = Histogram("h2kd_conversion_throughput_bytes_per_second",
                                    "Bytes written per second of execution, one sample per completed conversion",
                                    buckets=THROUGHPUT_BUCKETS, registry=r)
        self.job_duration = Histogram("h2kd_job_duration_seconds",
                                      "Time from submission to the end of finished jobs, by operation",
                                      ["operation"], buckets=DURATION_BUCKETS, registry=r)
        self.retries = Counter("h2kd_job_retries", "Attempts that failed and were retried, by error code",
                               ["error_type"], registry=r)
        self.workers = Gauge("h2kd_workers", "Registered workers, alive or stale", ["state"], registry=r)

        # Every label value a dashboard expects exists from the start, at 0.
        for state in JobState:
            self.jobs_by_state.labels(state=state.value)
        for priority in PRIORITIES:
            self.queue_depth.labels(priority=str(priority))
        for state in ("alive", "stale"):
            self.workers.labels(state=state)

        self._lock = threading.Lock()   # the HTTP thread reads while the loop writes
        self._jobs: dict[str, _Counted] = {}
        self._workers: dict[str, tuple[str, tuple[str, str, str]]] = {}  # id -> (alive|stale, info labels)
        for job in jobs:
            self.job_added(job)
        for worker in workers:
            self.worker_added(worker)

    # -- JobListener ---------------------------------------------------------------------------------

    def job_added(self, job: Job) -> None:
        self._safely(self._track, job)

    def job_changed(self, job: Job, changed: set[str], urgent: bool) -> None:
        if "state" in changed or "priority" in changed or job.id not in self._jobs:
            self._safely(self._track, job)

    def job_event(self, job: Job, event: Event) -> None:
        pass

    def job_removed(self, job: Job) -> None:
        self._safely(self._forget, job)

    def worker_added(self, worker: WorkerInfo) -> None:
        self._safely(self._track_worker, worker)

    def worker_changed(self, worker: WorkerInfo) -> None:
        self._safely(self._track_worker, worker)

    def worker_removed(self, worker: WorkerInfo) -> None:
        self._safely(self._forget_worker, worker)

    def manager_changed(self, changed: set[str]) -> None:
        pass

    # -- bookkeeping ---------------------------------------------------------------------------------

    @staticmethod
    def _safely(update, *args) -> None:
        try:
            update(*args)
        except Exception:  # a listener must not raise into the manager
            log.exception("could not update metrics")

    def _count(self, counted: _Counted, delta: int) -> None:
        self.jobs_by_state.labels(state=counted.state.value).inc(delta)
        if counted.state == JobState.QUEUED:
            self.queue_depth.labels(priority=str(counted.priority)).inc(delta)
        if counted.state in ACTIVE:
            self.jobs_active.inc(delta)

    def _track(self, job: Job) -> None:
        with self._lock:
            before = self._jobs.get(job.id)
            now = _Counted(JobState(job.state), int(job.priority))
            if before == now:
                return
            if before is not None:
                self._count(before, -1)
            self._count(now, +1)
            self._jobs[job.id] = now
            # A job first seen already finished (loaded from the store) did not just end.
            if before is not None and before.state != now.state and now.state in TERMINAL:
                self._ended(job)
            elif before is not None and before.state in ACTIVE and now.state == JobState.RETRYING:
                # An attempt that failed and is retried; a failed or cancelled job queued again by hand is not.
                self.retries.labels(error_type=job.error_code or "INTERNAL").inc()

    def _forget(self, job: Job) -> None:
        with self._lock:
            counted = self._jobs.pop(job.id, None)
            if counted is not None:
                self._count(counted, -1)

    def _ended(self, job: Job) -> None:
        status = job.state.value
        self.migrations.labels(operation=job.operation, status=status).inc()
        if job.finished_at and job.created_at and job.finished_at >= job.created_at:
            self.job_duration.labels(operation=job.operation).observe((job.finished_at - job.created_at) / 1e6)
        if job.state == JobState.FAILED:
            self.failures.labels(error_type=job.error_code or "INTERNAL").inc()
        if job.state != JobState.COMPLETED:
            return
        if job.started_at and job.finished_at >= job.started_at:
            self.migration_duration.labels(operation=job.operation).observe((job.finished_at - job.started_at) / 1e6)
        if job.operation != "convert":
            return
        if _is_vmdk(job) and job.bytes_total > 0:
            self.vmdk_size.observe(job.bytes_total)
        metrics = (job.result or {}).get("metrics") or {}
        written = int(metrics.get("bytes_written") or 0)
        if written > 0:
            self.converted_bytes.inc(written)
            seconds = float(metrics.get("execution_seconds") or 0)
            if seconds <= 0 and job.started_at and job.finished_at > job.started_at:
                seconds = (job.finished_at - job.started_at) / 1e6
            if seconds > 0:
                self.throughput.observe(written / seconds)

    def _track_worker(self, worker: WorkerInfo) -> None:
        labels = (worker.id, worker.kind, str(worker.capabilities.get("version") or
                                              (__version__ if worker.kind == "builtin" else "unknown")))
        with self._lock:
            before = self._workers.get(worker.id)
            now = (_worker_state(worker), labels)
            if before == now:
                return
            if before is not None:
                self.workers.labels(state=before[0]).dec()
                if before[1] != labels:
                    self.worker_info.remove(*before[1])
            self.workers.labels(state=now[0]).inc()
            self.worker_info.labels(*labels).set(1)
            self._workers[worker.id] = now

    def _forget_worker(self, worker: WorkerInfo) -> None:
        with self._lock:
            before = self._workers.pop(worker.id, None)
            if before is not None:
                self.workers.labels(state=before[0]).dec()
                self.worker_info.remove(*before[1])


class MetricsServer:
    """The running /metrics endpoint; stop() closes its socket and ends its thread."""

    def __init__(self, server: BaseServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_http(metrics: Metrics, address: str, port: int) -> MetricsServer | None:
    """Serve metrics.registry at http://address:port/metrics from a thread; port 0 means disabled (None)."""
    if port == 0:
        return None
    server, thread = start_http_server(port, addr=address, registry=metrics.registry)
    return MetricsServer(server, thread)
