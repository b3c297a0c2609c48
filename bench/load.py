"""Load generators run in separate client processes: submitters, signal subscribers, and clean-up of held jobs."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from dbus_fast import Message, Variant

from bench.client import (MANAGER, CallFailed, Client, call_window, inspect_spec, ready_and_wait,
                          run_in_processes)
from bench.rawbus import ERROR, RawConnection
from h2kd import BUS_NAME, MANAGER_PATH
from h2kd.bus.variants import to_vardict


async def submit_client(index: int, ready: Any, go: Any, address: str, count: int, window: int,
                        source: str) -> dict[str, Any]:
    """Submit `count` held inspect jobs (queue=false) with `window` calls in flight.

    Returns {"latencies": [s...], "ids": [job ids replied], "errors": [error names]}.
    """
    async with Client.connected(address) as client:
        await ready_and_wait(ready, go)
        spec = inspect_spec(source)
        results = await call_window([lambda: client.submit(spec, queue=False) for _ in range(count)], window)
    out: dict[str, Any] = {"latencies": [], "ids": [], "errors": []}
    for latency, value in results:
        if isinstance(value, BaseException):
            out["errors"].append(value.name if isinstance(value, CallFailed) else repr(value))
        else:
            out["latencies"].append(latency)
            out["ids"].append(value[0])
    return out


async def subscriber_client(index: int, ready: Any, go: Any, address: str, seconds: float,
                            stop_file: str | None = None) -> dict[str, Any]:
    """Listen to every h2kd signal for `seconds` (or until stop_file exists); count what arrives."""
    async with Client.connected(address, watch=True) as client:
        await ready_and_wait(ready, go)
        start = time.monotonic()
        deadline = start + seconds
        while time.monotonic() < deadline and not (stop_file and os.path.exists(stop_file)):
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - start
        connected = client.bus.connected
    return {"signals": client.signal_count, "seconds": elapsed, "connected": connected,
            "completed": len(client.completed)}


async def raw_submit_client(index: int, ready: Any, go: Any, address: str, count: int, window: int,
                            source: str) -> dict[str, Any]:
    """submit_client's calls, made on a RawConnection: the same SubmitJob, sent as ready-made bytes, its
    reply read without decoding (the job id aside), so that the clients' own CPU stays out of the figure."""
    call = Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER, member="SubmitJob",
                   signature="a{sv}a{sv}", body=[to_vardict(inspect_spec(source)), {"queue": Variant("b", False)}],
                   serial=1)
    wire = bytearray(call._marshall(False))
    out: dict[str, Any] = {"latencies": [], "ids": [], "errors": []}
    with RawConnection(address) as connection:
        await ready_and_wait(ready, go)
        sent_at: dict[int, float] = {}     # serial -> when it was sent, for the calls in flight
        for _ in range(min(window, count)):
            sent_at[connection.send_again(wire)] = time.perf_counter()
        unsent = count - len(sent_at)
        while sent_at:
            reply = connection.next_reply()
            latency = time.perf_counter() - sent_at.pop(reply.reply_serial)
            if unsent:
                sent_at[connection.send_again(wire)] = time.perf_counter()
                unsent -= 1
            if reply.type == ERROR:   # as submit_client: an error's round trip is not a submission's latency
                out["errors"].append(reply.error_name)
            else:
                out["latencies"].append(latency)
                out["ids"].append(reply.first_string())
    return out


async def paced_submit_client(index: int, ready: Any, go: Any, address: str, count: int, rate: float,
                              clients: int, source: str) -> dict[str, Any]:
    """`count` SubmitJob calls at a fixed pace (`rate` per second from this client), whatever the replies do:
    an offered load, as an administrator's scripts and tools produce it, rather than a client that waits for
    each reply before the next call. Latency runs from the moment a call was due, so a client held up by a
    slow reply counts the wait of the calls it sent late (no coordinated omission).

    The clients' schedules are staggered by index so that `clients` of them together send evenly."""
    call = Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER, member="SubmitJob",
                   signature="a{sv}a{sv}", body=[to_vardict(inspect_spec(source)), {"queue": Variant("b", False)}],
                   serial=1)
    wire = bytearray(call._marshall(False))
    out: dict[str, Any] = {"latencies": [], "ids": [], "errors": [], "late_ms": 0.0}
    interval = 1.0 / rate
    with RawConnection(address) as connection:
        await ready_and_wait(ready, go)
        start = time.perf_counter() + interval * index / clients
        due_at: dict[int, float] = {}     # serial -> when it was due, for the calls in flight
        sent = 0
        while sent < count or due_at:
            now = time.perf_counter()
            next_due = start + sent * interval if sent < count else now + 1.0
            if sent < count and now >= next_due:
                out["late_ms"] = max(out["late_ms"], (now - next_due) * 1000)
                due_at[connection.send_again(wire)] = next_due
                sent += 1
                continue
            if not due_at:
                time.sleep(next_due - now)
                continue
            if not connection.reply_within(next_due - now):
                continue
            reply = connection.next_reply()
            latency = time.perf_counter() - due_at.pop(reply.reply_serial)
            if reply.type == ERROR:
                out["errors"].append(reply.error_name)
            else:
                out["latencies"].append(latency)
                out["ids"].append(reply.first_string())
    return out


def paced_submissions(address: str, clients: int, rate: float, seconds: float, source: str
                      ) -> tuple[float, list[dict]]:
    """Submissions offered at `rate` per second in all, from `clients` processes, for `seconds`;
    (wall seconds, per-client results)."""
    per_client = max(1, round(rate * seconds / clients))
    results = run_in_processes(clients, paced_submit_client, address, per_client, rate / clients, clients,
                               source)
    return results.wall_seconds, results.per_client


def submit_burst(address: str, clients: int, per_client: int, window: int, source: str,
                 raw: bool = False) -> tuple[float, list[dict]]:
    """Submissions from `clients` processes at once; (wall seconds, per-client results). raw: the clients
    use RawConnection instead of dbus-fast."""
    results = run_in_processes(clients, raw_submit_client if raw else submit_client, address, per_client,
                               window, source)
    return results.wall_seconds, results.per_client


async def _cancel_and_remove(address: str, ids: list[str], window: int) -> list[str]:
    async with Client.connected(address) as client:

        async def end(job_id: str) -> None:
            try:
                await client.manager("CancelJob", "s", [job_id])
            except CallFailed as exc:
                if not exc.name.endswith("InvalidState"):   # already over: fine, remove it anyway
                    raise
            await client.manager("RemoveJob", "s", [job_id])

        ended = await call_window([lambda j=j: end(j) for j in ids], window)
    return [repr(value) for _latency, value in ended if isinstance(value, BaseException)]


async def _cleanup_worker(index: int, ready: Any, go: Any, address: str, chunks: list[list[str]],
                          window: int) -> list[str]:
    await ready_and_wait(ready, go)
    return await _cancel_and_remove(address, chunks[index], window)


def cancel_and_remove(address: str, ids: list[str], clients: int = 4, window: int = 32) -> list[str]:
    """Cancel (if still cancelable) and remove every job in `ids`; the failures, if any."""
    if not ids:
        return []
    clients = max(1, min(clients, len(ids)))
    chunks = [ids[i::clients] for i in range(clients)]
    results = run_in_processes(clients, _cleanup_worker, address, chunks, window)
    return [p for per in results.per_client for p in per]
