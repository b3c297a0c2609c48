"""D-Bus client side of the benchmarks and the tests: calls, specs, waiting for jobs, clients in other processes.

Everything here talks to h2kd only through the bus (dbus-fast), as any client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, TypeVar

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from h2kd import BUS_NAME, MANAGER_PATH
from h2kd.bus.variants import to_vardict

MANAGER = BUS_NAME + ".Manager"
JOB = BUS_NAME + ".Job"
EXPLICIT_JOB_PROPERTIES = ("Spec", "Result")   # left out of GetAll (dbus/org.hyper2kvm.h2kd1.Job.xml)
WORKER = BUS_NAME + ".Worker"
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
ERROR_PREFIX = BUS_NAME + ".Error."
TERMINAL = {"completed", "failed", "cancelled"}

T = TypeVar("T")


class CallFailed(RuntimeError):
    def __init__(self, name: str, text: str):
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def convert_spec(source: str, output: str, job_id: str | None = None, fmt: str | None = None,
                 output_format: str = "qcow2", retry_count: int = 0, timeout_seconds: int | None = None,
                 priority: int | None = None) -> dict[str, Any]:
    policy: dict[str, Any] = {"retry_count": retry_count}
    if timeout_seconds:
        policy["timeout_seconds"] = timeout_seconds
    if priority:
        policy["priority"] = priority
    return {"job_id": job_id, "operation": "convert", "image": {"path": source, "format": fmt},
            "parameters": {"output_format": output_format}, "execution_policy": policy,
            "artifacts": {"output_path": output}}


def inspect_spec(source: str, job_id: str | None = None) -> dict[str, Any]:
    return {"job_id": job_id, "operation": "inspect", "image": {"path": source}}


class Client:
    """One connection to the bus; optionally records h2kd's signals (count and the Completed ones)."""

    def __init__(self, bus: MessageBus):
        self.bus = bus
        self.signal_count = 0
        self.completed: dict[str, tuple[bool, str, float]] = {}   # job path -> (success, message, when)
        self.states: dict[str, str] = {}                          # job path -> last State seen in a signal
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future]] = []

    @classmethod
    async def connect(cls, address: str, watch: bool = False) -> "Client":
        client = cls(await MessageBus(bus_address=address).connect())
        if watch:
            client.bus.add_message_handler(client._on_message)
            await client.dbus("AddMatch", "s", [f"type='signal',sender='{BUS_NAME}'"])
        return client

    @classmethod
    @contextlib.asynccontextmanager
    async def connected(cls, address: str, watch: bool = False) -> AsyncIterator[Any]:
        """`async with Client.connected(address) as client:` a connection closed at the end."""
        client = await cls.connect(address, watch)
        try:
            yield client
        finally:
            client.close()

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type != MessageType.SIGNAL or not (msg.path or "").startswith(MANAGER_PATH):
            return False
        self.signal_count += 1
        if msg.interface == JOB and msg.member == "Completed":
            self.completed[msg.path] = (bool(msg.body[0]), str(msg.body[1]), time.monotonic())
        elif msg.interface == JOB and msg.member == "StateChanged":
            self.states[msg.path] = msg.body[0]
        elif msg.interface == PROPERTIES and msg.body and msg.body[0] == JOB and "State" in msg.body[1]:
            self.states[msg.path] = msg.body[1]["State"].value
        for predicate, future in list(self._waiters):
            if not future.done() and predicate():
                future.set_result(True)
        return False

    async def until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until a signal makes predicate() true (checked at once too)."""
        if predicate():
            return
        future = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.remove(entry)

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: list | None = None, destination: str = BUS_NAME) -> Any:
        reply = await self.bus.call(Message(destination=destination, path=path, interface=interface,
                                            member=member, signature=signature, body=body or []))
        if reply.message_type == MessageType.ERROR:
            raise CallFailed(reply.error_name or "", str(reply.body[0]) if reply.body else "")
        return reply.body

    async def dbus(self, member: str, signature: str = "", body: list | None = None) -> Any:
        return await self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", member, signature, body,
                               destination="org.freedesktop.DBus")

    async def manager(self, member: str, signature: str = "", body: list | None = None) -> Any:
        return await self.call(MANAGER_PATH, MANAGER, member, signature, body)

    async def submit(self, spec: dict[str, Any], queue: bool = True) -> tuple[str, str]:
        """SubmitJob: (job id, job path). Plain values in `spec` are sent with their natural D-Bus types;
        Variants as they are (a spec typed by hand, malformed on purpose or not)."""
        body = await self.manager("SubmitJob", "a{sv}a{sv}", [to_vardict(spec), {"queue": Variant("b", queue)}])
        return body[0], body[1]

    async def prop(self, path: str, interface: str, name: str) -> Any:
        (value,) = await self.call(path, PROPERTIES, "Get", "ss", [interface, name])
        return value.value

    async def job_props(self, path: str, explicit: tuple[str, ...] = EXPLICIT_JOB_PROPERTIES) -> dict[str, Any]:
        """GetAll's properties, and those of `explicit`, which it leaves out, read one by one."""
        body = await self.call(path, PROPERTIES, "GetAll", "s", [JOB])
        props = {k: v.value for k, v in body[0].items()}
        for name in explicit:
            props[name] = await self.prop(path, JOB, name)
        return props

    async def list_jobs(self, **filters: Any) -> list[list[Any]]:
        return (await self.manager("ListJobs", "a{sv}", [to_vardict(filters)]))[0]

    async def job_ids(self) -> list[str]:
        return [job[0] for job in await self.list_jobs()]

    async def health(self) -> dict[str, Any]:
        body = await self.manager("GetHealth")
        return {k: v.value for k, v in body[0].items()}

    async def events(self, path: str) -> list[tuple[int, int, str, str]]:
        return [tuple(e) for e in (await self.call(path, JOB, "GetEvents", "t", [0]))[0]]

    async def wait_terminal(self, path: str, timeout: float = 600, poll: float = 0.5) -> dict[str, Any]:
        """Wait for a job to reach a final state (signals if watching, else polling); its properties."""
        deadline = time.monotonic() + timeout
        while True:
            props = await self.job_props(path, explicit=())
            if props["State"] in TERMINAL:
                return props | {name: await self.prop(path, JOB, name) for name in EXPLICIT_JOB_PROPERTIES}
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {path} still {props['State']} after {timeout} s")
            try:
                await self.until(lambda: self.states.get(path) in TERMINAL or path in self.completed,
                                 min(poll, left))
            except asyncio.TimeoutError:
                pass

    def close(self) -> None:
        self.bus.disconnect()


def with_client(address: str, use: Callable[["Client"], Awaitable[T]]) -> T:
    """`use(client)` run to its end on a connection of its own (e.g. with_client(address, Client.job_ids))."""
    async def session() -> T:
        async with Client.connected(address) as client:
            return await use(client)
    return asyncio.run(session())


async def call_window(calls: Iterable[Callable[[], Any]], window: int) -> list[tuple[float, Any]]:
    """Run coroutine factories with at most `window` in flight; (latency seconds, result or exception) each."""
    results: list[tuple[float, Any]] = []
    semaphore = asyncio.Semaphore(window)

    async def one(make: Callable[[], Any]) -> None:
        async with semaphore:
            start = time.perf_counter()
            try:
                value = await make()
            except Exception as exc:   # recorded: the caller decides what a failure means
                value = exc
            results.append((time.perf_counter() - start, value))

    await asyncio.gather(*(one(c) for c in calls))
    return results


# ------------------------------------------------------------------ clients in other processes

@dataclass
class ProcessResults:
    wall_seconds: float
    per_client: list[Any] = field(default_factory=list)


def _child(work: Callable[..., Any], index: int, args: tuple, ready: Any, go: Any, out: Any) -> None:
    async def main() -> Any:
        return await work(index, ready, go, *args)
    try:
        out.put((index, asyncio.run(main())))
    except BaseException as exc:  # reported to the parent, which fails loudly
        out.put((index, RuntimeError(f"client {index} failed: {exc!r}")))


def run_in_processes(count: int, work: Callable[..., Any], *args: Any, start_timeout: float = 120,
                     timeout: float = 600, on_go: Callable[[], Any] | None = None) -> ProcessResults:
    """Run `await work(index, ready, go, *args)` in `count` forked processes.

    Each must call `await ready_and_wait(ready, go)` once connected; the wall clock starts when all are
    ready and `go` is set, and stops when the last one has reported its return value. on_go() is called
    just after `go` is set (e.g. to start work the clients should see).
    """
    ctx = multiprocessing.get_context("fork")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(work, i, args, ready, go, out), daemon=True) for i in range(count)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + start_timeout
    results: dict[int, Any] = {}
    for _ in range(count):
        if not ready.acquire(timeout=max(deadline - time.monotonic(), 0.1)):
            # a client died before being ready: collect what it said
            while not out.empty():
                i, value = out.get()
                results[i] = value
            go.set()
            _reap(procs)
            raise RuntimeError(f"clients did not get ready: {[v for v in results.values()][:3]}")
    start = time.perf_counter()
    go.set()
    if on_go is not None:
        on_go()
    while len(results) < count:
        i, value = out.get(timeout=timeout)
        results[i] = value
    wall = time.perf_counter() - start
    _reap(procs)
    failures = [v for v in results.values() if isinstance(v, BaseException)]
    if failures:
        raise failures[0]
    return ProcessResults(wall, [results[i] for i in range(count)])


def _reap(procs: list[Any]) -> None:
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()


async def ready_and_wait(ready: Any, go: Any) -> None:
    ready.release()
    await asyncio.get_running_loop().run_in_executor(None, go.wait)


# ------------------------------------------------------------------ figures

def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(fraction * (len(ordered) - 1)))))
    return ordered[index]


def median(values: list[float]) -> float:
    return percentile(values, 0.5) if len(values) % 2 else \
        (sorted(values)[len(values) // 2 - 1] + sorted(values)[len(values) // 2]) / 2


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
