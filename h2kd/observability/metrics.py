"""Metrics: Prometheus metrics for h2kd, kept up to date by the manager's listener calls, and their /metrics server.

The original protocol's names are kept so existing dashboards work:
  hyper2kvm_migration_total{operation,status}     counter, a job ended: status completed|failed|cancelled (a job
                                                   retried by hand that ends again counts again)
  hyper2kvm_migration_duration_seconds{operation}  histogram, run time (started_at to finished_at) of completed jobs
  hyper2kvm_migration_failures_total{error_type}   counter, jobs that ended failed, by error code
  hyper2kvm_worker_jobs_active                     gauge, jobs assigned, running or progressing
  hyper2kvm_vmdk_size_bytes                        histogram, virtual size of each VMDK a completed convert read, from
                                                   its Result's outputs.disks (the builtin worker's, or an external
                                                   worker's giving them the same way: Worker.xml)
  hyper2kvm_worker_info{worker,kind,version}       gauge = 1 per registered worker
and added for operators:
  h2kd_jobs{state}                                 gauge, jobs known to the daemon by state
  h2kd_queue_depth{priority}                       gauge, queued jobs by priority 1..10
  h2kd_converted_bytes_total                       counter, bytes written by completed conversions
  h2kd_conversion_throughput_bytes_per_second      histogram, bytes written / execution time of each completed
                                                   conversion (a histogram, not a last-value gauge, so rates and
                                                   quantiles over any window can be taken across a fleet)
  h2kd_job_duration_seconds{operation,status}      histogram, submission (or a retry asked for by hand) to end of
                                                   every finished job
  h2kd_job_retries_total{error_type}               counter, attempts that failed and were retried (WORKER_LOST: put
                                                   back in the queue after losing their worker or unit)
  h2kd_workers{state}                              gauge, registered workers alive|stale
  h2kd_store_ok, h2kd_systemd_reachable            gauges, 1 or 0, as GetHealth has them (sampled, see health_sampled)
  h2kd_jobs_unreadable                             gauge, GetHealth's jobs_unreadable (sampled too)
  h2kd_queue_paused                                gauge, 1 while the queue is paused
  h2kd_queue_oldest_timestamp_seconds              gauge, when the job queued longest joined the queue (0: none)

Every change costs O(1): the listener remembers each job's last counted state and priority, never scans.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from dataclasses import dataclass
from socketserver import BaseServer, ThreadingMixIn
from typing import Any, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, make_wsgi_app

from h2kd import __version__
from h2kd.manager.ports import Event, WorkerInfo
from h2kd.model.job import Job, now_usec
from h2kd.model.states import ACTIVE, TERMINAL, JobState

log = logging.getLogger(__name__)

PRIORITIES = range(1, 11)
HEALTH_SAMPLE_SECONDS = 5.0     # how often the daemon feeds health_sampled
GiB = 1024 ** 3
MiB = 1024 ** 2
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)
SIZE_BUCKETS = tuple(GiB * n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
THROUGHPUT_BUCKETS = tuple(MiB * n for n in (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))


def _vmdk_sizes(job: Job) -> list[int]:
    """The virtual size of each VMDK a completed convert read (an OVA's among them), from its Result; the
    progress total (BytesTotal) is no disk's size: it counts a disk once per pass, a verification included."""
    outputs = (job.result or {}).get("outputs")
    disks = outputs.get("disks") if isinstance(outputs, dict) else None
    if not isinstance(disks, list):
        return []
    return [disk["virtual_size"] for disk in disks
            if isinstance(disk, dict) and disk.get("source_format") == "vmdk"
            and type(disk.get("virtual_size")) is int and disk["virtual_size"] > 0]


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
        # Without a "<name>_created" series next to each counter and histogram: twice the series for no use here,
        # and hyper2kvm_migration_created would read as a count. (prometheus_client's switch is process-wide.)
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.migrations = Counter("hyper2kvm_migration", "Jobs that ended, by operation and how they ended (a job "
                                  "retried by hand that ends again counts again)",
                                  ["operation", "status"], registry=r)
        self.migration_duration = Histogram("hyper2kvm_migration_duration_seconds",
                                            "Run time of completed jobs, from their first start to their end",
                                            ["operation"], buckets=DURATION_BUCKETS, registry=r)
        self.failures = Counter("hyper2kvm_migration_failures", "Jobs that ended failed, by error code (each time, "
                                "for a job retried by hand)",
                                ["error_type"], registry=r)
        self.jobs_active = Gauge("hyper2kvm_worker_jobs_active", "Jobs assigned to a worker, running or progressing",
                                 registry=r)
        self.vmdk_size = Histogram("hyper2kvm_vmdk_size_bytes",
                                   "Virtual size of the VMDK sources of completed conversions",
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
                                      "Time from submission (or from a retry asked for by hand, not counting the "
                                      "time the job lay ended) to the end of finished jobs, by operation and how "
                                      "they ended (completed, failed, cancelled)",
                                      ["operation", "status"], buckets=DURATION_BUCKETS, registry=r)
        self.retries = Counter("h2kd_job_retries", "Attempts that failed and were retried, by error code",
                               ["error_type"], registry=r)
        self.workers = Gauge("h2kd_workers", "Registered workers, alive or stale", ["state"], registry=r)
        self.store_ok = Gauge("h2kd_store_ok", "1 while the job store is sound; 0: a write did not reach the disk (h2kd "
                              "restarts) or the file is damaged (h2kd stops, status 65)",
                              registry=r)
        self.jobs_unreadable = Gauge("h2kd_jobs_unreadable", "Rows of the job store h2kd could not read at start "
                                     "(the journal names their jobs)", registry=r)
        self.systemd_reachable = Gauge("h2kd_systemd_reachable",
                                       "1 while systemd's manager answers h2kd; 0: no conversion can start", registry=r)
        self.queue_paused = Gauge("h2kd_queue_paused", "1 while the queue is paused: no queued job starts",
                                  registry=r)
        self.oldest_queued = Gauge("h2kd_queue_oldest_timestamp_seconds",
                                   "When the job that has waited in the queue longest joined it (Unix time; 0 with "
                                   "none queued): time() minus it is how long the queue has not taken it",
                                   registry=r)

        # Every label value a dashboard expects exists from the start, at 0.
        for state in JobState:
            self.jobs_by_state.labels(state=state.value)
        for priority in PRIORITIES:
            self.queue_depth.labels(priority=str(priority))
        for state in ("alive", "stale"):
            self.workers.labels(state=state)

        self._lock = threading.Lock()   # the HTTP thread reads while the loop writes
        self._jobs: dict[str, _Counted] = {}
        self._asked_again: dict[str, int] = {}  # job id -> when (usec) a retry by hand queued it again
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

    def health_sampled(self, health: dict[str, Any], paused: bool, oldest_queued_since_usec: int) -> None:
        """What the manager's health() and queue said at the last look (see HEALTH_SAMPLE_SECONDS): these are
        states, not events, so they are sampled rather than told."""
        self.store_ok.set(1 if health.get("store_ok") else 0)
        self.jobs_unreadable.set(int(health.get("jobs_unreadable") or 0))
        self.systemd_reachable.set(1 if health.get("systemd_reachable") else 0)
        self.queue_paused.set(1 if paused else 0)
        self.oldest_queued.set(oldest_queued_since_usec / 1e6)

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
            elif before is not None and before.state in TERMINAL and now.state == JobState.RETRYING:
                self._asked_again[job.id] = now_usec()
            elif before is not None and before.state in ACTIVE and now.state == JobState.RETRYING:
                # An attempt that failed and is retried; a failed or cancelled job queued again by hand is not.
                self.retries.labels(error_type=job.error_code or "INTERNAL").inc()
            elif before is not None and before.state in ACTIVE and now.state == JobState.QUEUED:
                # An attempt that lost its worker or unit goes straight back to the queue, with no error of its own.
                self.retries.labels(error_type="WORKER_LOST").inc()

    def _forget(self, job: Job) -> None:
        with self._lock:
            counted = self._jobs.pop(job.id, None)
            self._asked_again.pop(job.id, None)
            if counted is not None:
                self._count(counted, -1)

    def _ended(self, job: Job) -> None:
        status = job.state.value
        self.migrations.labels(operation=job.operation, status=status).inc()
        since = self._asked_again.pop(job.id, job.created_at)
        if job.finished_at and since and job.finished_at >= since:
            took = (job.finished_at - since) / 1e6
            self.job_duration.labels(operation=job.operation, status=status).observe(took)
        if job.state == JobState.FAILED:
            self.failures.labels(error_type=job.error_code or "INTERNAL").inc()
        if job.state != JobState.COMPLETED:
            return
        if job.started_at and job.finished_at >= job.started_at:
            self.migration_duration.labels(operation=job.operation).observe((job.finished_at - job.started_at) / 1e6)
        if job.operation != "convert":
            return
        for size in _vmdk_sizes(job):
            self.vmdk_size.observe(size)
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


# Anyone on the host can connect to the endpoint. A connection that sends nothing would hold a thread and a
# descriptor for ever, and a thousand of them would leave h2kd without descriptors (no submission could open
# its source any more). So a connection gets REQUEST_SECONDS to bring its whole request and RESPONSE_SECONDS
# to take the answer, and at most MAX_CONNECTIONS are open at once: one more drops the oldest of those still
# waiting for their request (a scraper sends its request as soon as it is connected, so it is never the one
# dropped), or, when every one is being answered, is closed at once.
REQUEST_SECONDS = 5.0
RESPONSE_SECONDS = 10.0
MAX_CONNECTIONS = 64


class _RequestReader(io.RawIOBase):
    """A connection's incoming bytes, read no later than a deadline for the whole request: a client that
    sends its request a byte at a time does not get a fresh timeout with each byte."""

    def __init__(self, connection: socket.socket, deadline: float) -> None:
        """connection: the client's socket; deadline: time.monotonic() by which the request must be in."""
        super().__init__()
        self._connection = connection
        self._deadline = deadline

    def readable(self) -> bool:
        """Always: this is a reading stream."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Bytes into buffer, as they come; TimeoutError once the deadline has passed."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._connection.settimeout(left)
        return self._connection.recv_into(buffer)


class _ScrapeHandler(WSGIRequestHandler):
    """One scrape per connection (HTTP/1.0), within the time limits above; logs nothing, as prometheus_client's
    own server does not."""

    def setup(self) -> None:
        """The request is read against its deadline, counted from the connection's acceptance."""
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_RequestReader(self.connection, time.monotonic() + REQUEST_SECONDS))

    def parse_request(self) -> bool:
        """Parse the request; once it is all in, the answer gets its own time limit and the connection is no
        longer one to drop for a newer one."""
        if not super().parse_request():
            return False
        self.connection.settimeout(RESPONSE_SECONDS)
        server = self.server
        if isinstance(server, _ScrapeServer):
            server.answering(self.connection)
        return True

    def handle(self) -> None:
        """Answer the request; a client that was too slow, went away or was dropped is simply let go."""
        try:
            super().handle()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        """Nothing: a request line is no news, and a client could fill the journal with them."""


class _ScrapeServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most MAX_CONNECTIONS of them (see above); server_close() also hangs up
    on the connections still open, so their threads end with the server."""

    daemon_threads = True
    # socketserver's default backlog of 5 drops the connections of a burst (they are tried again a second
    # later), a scraper's among them.
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As WSGIServer; the open connections are tracked from the start."""
        self._lock = threading.Lock()
        # Each open connection, oldest first: True while it waits for its request.
        self._open: dict[socket.socket, bool] = {}
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to a thread of its own, making room for it first if the server is full."""
        with self._lock:
            admitted = len(self._open) < MAX_CONNECTIONS
            if not admitted:
                oldest = next((c for c, waiting in self._open.items() if waiting), None)
                if oldest is not None:
                    # Its thread wakes up to a closed connection and ends, closing it for good.
                    del self._open[oldest]
                    _hang_up(oldest)
                    admitted = True
            if admitted:
                self._open[request] = True
        if not admitted:
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.shutdown_request(request)
            raise

    def answering(self, connection: socket.socket) -> None:
        """The connection's request is in: it is being answered, not waiting."""
        with self._lock:
            if connection in self._open:
                self._open[connection] = False

    def shutdown_request(self, request: Any) -> None:
        """Close the connection. Under the lock: a connection being dropped for a newer one must not be
        closed meanwhile, or its descriptor could already be another's when it is hung up on."""
        with self._lock:
            self._open.pop(request, None)
            super().shutdown_request(request)

    def server_close(self) -> None:
        """Hang up on every connection still open and close the listening socket."""
        with self._lock:
            for connection in self._open:
                _hang_up(connection)
            self._open.clear()
        super().server_close()


def _hang_up(connection: socket.socket) -> None:
    """End a connection that a handler thread may be reading: the thread sees it closed and lets it go."""
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def start_http(metrics: Metrics, address: str, port: int) -> MetricsServer | None:
    """Serve metrics.registry at http://address:port/metrics from a thread; port 0 means disabled (None).
    prometheus_client's own WSGI application answers, so paths and output are those of its start_http_server;
    only the server around it differs (see _ScrapeServer)."""
    if port == 0:
        return None
    family, _, _, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
    server_class = type("_ScrapeServer", (_ScrapeServer,), {"address_family": family})
    server = make_server(sockaddr[0], port, make_wsgi_app(metrics.registry), server_class, _ScrapeHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(server, thread)
