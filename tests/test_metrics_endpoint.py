"""The /metrics endpoint under idle and slow connections: anyone on the host can open them, so they must not pile
up in h2kd (each held a thread and a descriptor for as long as its client liked, and a thousand of them left h2kd
without descriptors). A connection that has not sent its request within a few seconds is closed, scrapes go on
meanwhile, and h2kd keeps serving its callers.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import select
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client import generate_latest
from prometheus_client.exposition import start_http_server

from busclient import Client, run
import images
from h2kd.observability.metrics import Metrics, start_http

# "A few seconds" to send a request; closing takes at most this long after it.
CLOSED_WITHIN = 10.0
IDLE_CONNECTIONS = 1100     # more than the 1024 descriptors a service gets by default


def free_port() -> int:
    """A loopback port nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_quietly(port: int, count: int, batch: int = 100) -> list[socket.socket]:
    """`count` connections to the port that send nothing. They are opened a batch at a time, each batch once
    the one before is connected (or has had 5 s for it): a burst larger than the listening socket's backlog
    would leave most of them waiting to be tried again, seconds later."""
    connections: list[socket.socket] = []
    while len(connections) < count:
        opening = []
        for _ in range(min(batch, count - len(connections))):
            connection = socket.socket()
            connection.setblocking(False)
            connection.connect_ex(("127.0.0.1", port))
            opening.append(connection)
        connections += opening
        deadline = time.monotonic() + 5
        while opening and time.monotonic() < deadline:
            poller = select.poll()
            for connection in opening:
                poller.register(connection, select.POLLOUT)
            connected = {fd for fd, _ in poller.poll(max(int((deadline - time.monotonic()) * 1000), 1))}
            opening = [c for c in opening if c.fileno() not in connected]
    return connections


def closed_by_peer(connection: socket.socket) -> bool:
    """Whether the other end has closed the connection (without waiting)."""
    connection.setblocking(False)
    try:
        return connection.recv(1) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as e:
        return e.errno != errno.ENOTCONN     # not connected yet is not closed


def wait_all_closed(connections: list[socket.socket], within: float) -> list[socket.socket]:
    """Wait up to `within` seconds for the other end to close every connection; those still open."""
    deadline = time.monotonic() + within
    left = list(connections)
    while left and time.monotonic() < deadline:
        poller = select.poll()
        for connection in left:
            poller.register(connection, select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.poll(200)
        left = [c for c in left if not closed_by_peer(c)]
    return left


def scrape(url: str) -> tuple[str, bytes]:
    """GET the URL: its content type and body."""
    with urllib.request.urlopen(url, timeout=15) as response:
        assert response.status == 200
        return response.headers["Content-Type"], response.read()


def answer(port: int, method: str, target: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """The status, headers (but Date and Server) and body the server on the port answers a request with."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{target}", method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            status, head, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        status, head, body = e.code, e.headers, e.read()
    return status, {k: v for k, v in head.items() if k not in ("Date", "Server")}, body


@contextlib.contextmanager
def closing_all(connections: list[socket.socket]) -> Iterator[list[socket.socket]]:
    """The connections, closed at the end of the block."""
    try:
        yield connections
    finally:
        for connection in connections:
            connection.close()


@pytest.fixture
def served() -> Iterator[tuple[Metrics, Any]]:
    """Metrics, served on a free loopback port."""
    metrics = Metrics()
    server = start_http(metrics, "127.0.0.1", free_port())
    assert server is not None
    try:
        yield metrics, server
    finally:
        server.stop()


def test_idle_and_slow_connections_are_closed_while_scrapes_go_on(served: tuple[Metrics, Any]) -> None:
    metrics, server = served
    port = server.address[1]
    with closing_all(open_quietly(port, 20)) as idle, closing_all([socket.create_connection(("127.0.0.1", port))]) \
            as (slow,):
        started = time.monotonic()
        body = scrape(server.url)[1]
        assert body == generate_latest(metrics.registry)
        assert b'h2kd_jobs{state="queued"} 0.0' in body

        # A request that comes a byte at a time never ends in time, however steady the bytes.
        request = b"GET /metrics HTTP/1.0\r\nHost: x\r\nX-Padding: " + b"a" * 200
        sent = 0
        while sent < len(request) and time.monotonic() - started < CLOSED_WITHIN + 5:
            if closed_by_peer(slow):
                break
            slow.setblocking(True)
            try:
                slow.send(request[sent:sent + 1])
            except OSError:
                break
            sent += 1
            time.sleep(0.25)
        assert closed_by_peer(slow) or wait_all_closed([slow], 1) == [], "a request sent slowly is let through"
        assert time.monotonic() - started < CLOSED_WITHIN + 2

        assert wait_all_closed(idle, CLOSED_WITHIN - (time.monotonic() - started)) == [], \
            "idle connections are left open"
        assert scrape(server.url)[1] == generate_latest(metrics.registry)


def test_stopping_the_endpoint_closes_its_connections(served: tuple[Metrics, Any]) -> None:
    _, server = served
    port = server.address[1]
    with closing_all(open_quietly(port, 5)) as idle:
        time.sleep(0.5)     # accepted
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2
        assert wait_all_closed(idle, 1.0) == [], "connections outlive the endpoint"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_the_endpoint_answers_as_prometheus_clients_own_server(served: tuple[Metrics, Any]) -> None:
    metrics, server = served
    reference, thread = start_http_server(free_port(), addr="127.0.0.1", registry=metrics.registry)
    try:
        for method, target, headers in [
                ("GET", "/metrics", {}), ("GET", "/", {}), ("GET", "/metrics?name[]=h2kd_jobs", {}),
                ("GET", "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}),
                ("GET", "/metrics", {"Accept-Encoding": "gzip"}), ("GET", "/favicon.ico", {}),
                ("OPTIONS", "/metrics", {}), ("POST", "/metrics", {}), ("HEAD", "/metrics", {})]:
            ours = answer(server.address[1], method, target, headers)
            assert ours == answer(reference.server_address[1], method, target, headers), (method, target, headers)
            assert ours[0] in (200, 405)
    finally:
        reference.shutdown()
        reference.server_close()
        thread.join(5)


def h2kd_descriptors(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@contextlib.contextmanager
def descriptor_limit(pid: int, soft: int) -> Iterator[None]:
    """The process's soft limit on open files set to `soft` for the block, then put back."""
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_a_thousand_idle_connections_leave_h2kd_serving(stack: Any, tmp_path: Path) -> None:
    ours, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if ours < IDLE_CONNECTIONS + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    source = images.make_image("qcow2", None, tmp_path / "small.qcow2",
                               raw=images.make_raw_with_data(tmp_path / "small.raw", 1024 * 1024, 0.5))
    pid = stack.daemon_pid
    assert pid is not None
    # What a service gets without LimitNOFILE=: h2kd must not depend on a higher limit to stay up.
    with descriptor_limit(pid, 1024):
        before = h2kd_descriptors(pid)
        with closing_all(open_quietly(stack.metrics_port, IDLE_CONNECTIONS)) as idle:
            started = time.monotonic()
            time.sleep(2)
            assert b"h2kd_jobs{" in scrape(stack.metrics_url)[1]
            assert h2kd_descriptors(pid) < before + 200

            async def inspect() -> str:
                async with Client.connected(stack.bus_address, watch=True) as client:
                    await client.manager("ResumeQueue")
                    _, path = await client.submit({"operation": "inspect", "image": {"path": str(source)}})
                    return (await client.wait_terminal(path, timeout=60))["State"]
            assert run(inspect()) == "completed"

            assert wait_all_closed(idle, max(CLOSED_WITHIN - (time.monotonic() - started), 3)) == [], \
                "idle connections are left open"
        assert h2kd_descriptors(pid) < before + 50


def test_a_metrics_port_another_program_took_first_leaves_h2kd_serving(stack: Any) -> None:
    """The metrics port is any local user's to bind before h2kd starts: h2kd must still come up and serve the
    bus (not end, to be restarted into the same failure), and say in its log why there are no metrics."""
    port = free_port()
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    before = dict(stack.daemon_env)
    try:
        stack.restart_daemon({**before, "H2KD_METRICS_PORT": str(port)})
        pid = stack.daemon_pid
        time.sleep(1.0)      # past the point where the endpoint is started

        async def health() -> dict[str, Any]:
            async with Client.connected(stack.bus_address) as client:
                (values,) = await client.manager("GetHealth")
                return {k: v.value for k, v in values.items()}
        assert run(health())["store_ok"] is True
        assert stack.daemon_pid == pid is not None
        log = stack.daemon_log.read_text(errors="replace")
        assert f"cannot serve metrics on 127.0.0.1 port {port}: Address already in use" in log, log[-2000:]
    finally:
        squatter.close()
        stack.restart_daemon(before)
