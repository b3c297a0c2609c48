"""The D-Bus API under load: submission rate and latency, listing 10,000 jobs, progress signal fan-out."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast._private.unmarshaller import Unmarshaller

from bench import disks, load
from bench.client import Client, convert_spec, cpu_seconds, median, new_id, percentile, rss_bytes, run_in_processes
from bench.rawbus import RawConnection, message_body, with_body
from bench.stack import rate_limited, restart_with
from h2kd.sandbox.stack import Stack

# (clients, calls in flight per client, submits per client), each made twice (CLIENT_KINDS): 10,000 jobs in
# all, which the listing reuses.
SUBMISSION_CASES = ((1, 1, 500), (1, 16, 1000), (20, 1, 75), (20, 16, 100))
# dbus-fast: clients as most Python programs would write them (h2kctl is one). raw: bench.rawbus, which
# leaves the clients' own CPU out of the figure (on two cores, twenty dbus-fast clients compete with h2kd).
CLIENT_KINDS = ("dbus-fast", "raw")


def job_count(stack: Stack) -> int:
    async def count() -> int:
        client = await Client.connect(stack.bus_address)
        try:
            return len(await client.list_jobs())
        finally:
            client.close()
    return asyncio.run(count())


def submission(stack: Stack, source: Path, cases=SUBMISSION_CASES) -> list[dict[str, Any]]:
    """Held submissions (queue=false: nothing runs) per second and their latency, per client count and kind
    of client, the two kinds one after the other for each case."""
    figures = []
    for clients, window, per_client in cases:
        for kind in CLIENT_KINDS:
            wall, per = load.submit_burst(stack.bus_address, clients, per_client, window, str(source),
                                          raw=kind == "raw")
            latencies = [x for p in per for x in p["latencies"]]
            errors = [e for p in per for e in p["errors"]]
            ids = [i for p in per for i in p["ids"]]
            figures.append({"clients": clients, "in_flight": window, "client": kind,
                            "submits": len(latencies) + len(errors), "errors": len(errors),
                            "distinct_jobs": len(set(ids)), "seconds": wall, "per_second": len(ids) / wall,
                            "p50_ms": percentile(latencies, 0.5) * 1000,
                            "p99_ms": percentile(latencies, 0.99) * 1000})
    return figures


# (clients, submits per second offered in all, seconds): the goal's 20 clients at and around 1,000/s.
PACED_CASES = ((20, 250, 3.0), (20, 500, 3.0), (20, 750, 3.0), (20, 1000, 3.0), (20, 1200, 3.0))


def paced_submission(stack: Stack, source: Path, cases=PACED_CASES) -> list[dict[str, Any]]:
    """Latency of held submissions at an offered rate (load.paced_submit_client): whether h2kd keeps up with
    `rate` submissions a second from 20 clients, and how long each waits meanwhile. The jobs are removed
    after each case."""
    figures = []
    for clients, rate, seconds in cases:
        wall, per = load.paced_submissions(stack.bus_address, clients, rate, seconds, str(source))
        latencies = [x for p in per for x in p["latencies"]]
        errors = [e for p in per for e in p["errors"]]
        ids = [i for p in per for i in p["ids"]]
        # Held jobs count against h2kd's limit of unfinished jobs, and the listing wants its 10,000: each case
        # takes its jobs away again.
        problems = load.cancel_and_remove(stack.bus_address, ids)
        figures.append({"clients": clients, "offered_per_second": rate, "submits": len(latencies) + len(errors),
                        "errors": len(errors), "error_names": sorted(set(errors)), "cleanup_problems": problems[:3],
                        "distinct_jobs": len(set(ids)), "seconds": wall,
                        "per_second": len(ids) / wall, "p50_ms": percentile(latencies, 0.5) * 1000,
                        "p99_ms": percentile(latencies, 0.99) * 1000,
                        "max_ms": max(latencies, default=0.0) * 1000,
                        "client_late_ms": max(p["late_ms"] for p in per)})
    return figures


def top_up(stack: Stack, source: Path, wanted: int) -> None:
    missing = wanted - job_count(stack)
    if missing > 0:
        clients = min(10, missing)
        per = -(-missing // clients)
        load.submit_burst(stack.bus_address, clients, per, 16, str(source))


OBJECT_MANAGER_CALL = dict(destination="org.hyper2kvm.h2kd1", path="/org/hyper2kvm/h2kd1",
                           interface="org.freedesktop.DBus.ObjectManager", member="GetManagedObjects")


def listing(stack: Stack, source: Path, jobs: int = 10_000, repeats: int = 5) -> dict[str, Any]:
    """With `jobs` in the store: GetManagedObjects, ListJobs, RSS, start-up time.

    GetManagedObjects is timed three ways, as clients see it: "raw" is the round trip until the last byte of
    the reply has been received, decoding nothing (what the daemon and dbus-daemon cost; RawConnection);
    "GetManagedObjects_ms" is a dbus-fast client's call, decoding included; busctl is a C client, its
    process start and output included. "decode" is dbus-fast unmarshalling the raw reply in-process alone.
    """
    top_up(stack, source, jobs)

    async def timed_calls() -> dict[str, Any]:
        client = await Client.connect(stack.bus_address)
        try:
            out: dict[str, Any] = {"jobs": len(await client.list_jobs())}
            for label, call in (
                ("GetManagedObjects", lambda: client.call("/org/hyper2kvm/h2kd1",
                                                          "org.freedesktop.DBus.ObjectManager",
                                                          "GetManagedObjects")),
                ("ListJobs", lambda: client.list_jobs()),
                ("ListJobs limit=100", lambda: client.list_jobs(limit=100)),
                ("ListJobs state=completed", lambda: client.list_jobs(state="completed")),
            ):
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    await call()
                    times.append(time.perf_counter() - start)
                out[label + "_ms"] = median(times) * 1000
            return out
        finally:
            client.close()

    figures = _managed_objects_raw(stack, repeats)
    figures.update(_relay_by_shape(stack, repeats))
    figures.update(asyncio.run(timed_calls()))
    figures.update(_managed_objects_busctl(stack, repeats))
    figures["rss_MiB"] = rss_bytes(stack.daemon_pid) / disks.MiB
    startups = []
    for _ in range(3):
        stack.stop_daemon()
        start = time.perf_counter()
        stack.start_daemon()
        startups.append(time.perf_counter() - start)
    figures["startup_s"] = median(startups)
    figures["rss_after_restart_MiB"] = rss_bytes(stack.daemon_pid) / disks.MiB
    with RawConnection(stack.bus_address) as raw:   # the first listing of a fresh daemon builds its records
        start = time.perf_counter()
        raw.call(Message(**OBJECT_MANAGER_CALL))
        figures["GetManagedObjects_first_after_restart_raw_ms"] = (time.perf_counter() - start) * 1000
    figures["rss_after_first_listing_MiB"] = rss_bytes(stack.daemon_pid) / disks.MiB
    return figures


def _managed_objects_raw(stack: Stack, repeats: int) -> dict[str, Any]:
    """GetManagedObjects' round trip to the last byte, the daemon's CPU per call, and the reply's decoding."""
    pid = stack.daemon_pid
    with RawConnection(stack.bus_address) as raw:
        raw.call(Message(**OBJECT_MANAGER_CALL))   # once untimed: a first call may build the daemon's records
        times = []
        cpu_before = cpu_seconds(pid)
        for _ in range(repeats):
            start = time.perf_counter()
            reply = raw.call(Message(**OBJECT_MANAGER_CALL))
            times.append(time.perf_counter() - start)
        cpu = cpu_seconds(pid) - cpu_before
    decode_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decoded = Unmarshaller(io.BytesIO(reply), negotiate_unix_fd=False).unmarshall()
        decode_times.append(time.perf_counter() - start)
    assert decoded is not None and decoded.message_type == MessageType.METHOD_RETURN, "no reply decoded"
    return {"GetManagedObjects_raw_ms": median(times) * 1000, "GetManagedObjects_reply_MB": len(reply) / 1e6,
            "GetManagedObjects_daemon_cpu_ms": cpu / repeats * 1000,
            "GetManagedObjects_objects": len(decoded.body[0]),
            "GetManagedObjects_dbus_fast_decode_ms": median(decode_times) * 1000}


def _relay_by_shape(stack: Stack, repeats: int) -> dict[str, Any]:
    """What dbus-daemon alone costs to pass GetManagedObjects' reply on, by what it holds: the reply's own body
    sent from one bare connection to another as a signal, against a byte array of the same size. h2kd takes no
    part; the difference is dbus-daemon checking each of the reply's values (it validates a whole message
    before routing it), the rest moving its bytes."""
    with RawConnection(stack.bus_address) as sender, RawConnection(stack.bus_address) as receiver:
        body = message_body(sender.call(Message(**OBJECT_MANAGER_CALL)))
        shapes = {"GetManagedObjects_shaped": ("a{oa{sa{sv}}}", [{}], body),
                  "flat": ("ay", [b""], struct.pack("<I", len(body) - 4) + bytes(len(body) - 4))}
        times: dict[str, list[float]] = {name: [] for name in shapes}
        serial = 0
        for _ in range(repeats):
            for name, (signature, empty, payload) in shapes.items():
                serial += 1
                wire = with_body(Message(message_type=MessageType.SIGNAL, destination=receiver.unique_name,
                                         path="/org/hyper2kvm/h2kd1/bench", interface="org.hyper2kvm.h2kd1.Bench",
                                         member="Relay", signature=signature, body=empty, serial=serial), payload)
                times[name].append(_relay_once(sender, receiver, wire))
    return {f"relay_{name}_ms": median(values) * 1000 for name, values in times.items()} | {
        "relay_body_MB": len(body) / 1e6}


def _relay_once(sender: RawConnection, receiver: RawConnection, wire: bytes) -> float:
    """Seconds from the first byte sent to the last received; the send runs on a thread, since dbus-daemon
    takes a large message only as fast as it passes it on."""
    start = time.perf_counter()
    sending = threading.Thread(target=sender.send_wire, args=(wire,))
    sending.start()
    while len(receiver.next_message()) < len(wire) // 2:   # skips NameAcquired and the like
        pass
    took = time.perf_counter() - start
    sending.join()
    return took


def _managed_objects_busctl(stack: Stack, repeats: int) -> dict[str, Any]:
    """busctl's GetManagedObjects (its own start-up included), printed as text and as JSON, to /dev/null."""
    env = {**os.environ, **stack.env()}
    argv = ["busctl", "--system", "call", OBJECT_MANAGER_CALL["destination"], OBJECT_MANAGER_CALL["path"],
            OBJECT_MANAGER_CALL["interface"], OBJECT_MANAGER_CALL["member"]]
    out: dict[str, Any] = {}
    for label, extra in (("busctl", []), ("busctl_json", ["--json=short"])):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(argv[:2] + extra + argv[2:], env=env, stdout=subprocess.DEVNULL, check=True, timeout=60)
            times.append(time.perf_counter() - start)
        out[f"GetManagedObjects_{label}_ms"] = median(times) * 1000
    return out


def remove_all_jobs(stack: Stack) -> list[str]:
    async def ids() -> list[str]:
        client = await Client.connect(stack.bus_address)
        try:
            return [j[0] for j in await client.list_jobs()]
        finally:
            client.close()
    return load.cancel_and_remove(stack.bus_address, asyncio.run(ids()), clients=4, window=32)


def progress_fanout(stack: Stack, work: Path, jobs: int = 50, subscribers: int = 10, seconds: float = 10.0,
                    rate: int = 2 * disks.MiB) -> dict[str, Any]:
    """`jobs` slowed-down conversions at once, `subscribers` clients listening: signals/s and daemon CPU."""
    source = disks.sparse_vmdk(work, "fanout", 512 * disks.MiB, 0.25, seed=9)
    restart_with(stack, rate_limited(rate))

    async def start_jobs() -> list[tuple[str, str]]:
        client = await Client.connect(stack.bus_address)
        try:
            await client.manager("SetMaxParallelJobs", "u", [jobs])
            submitted = await asyncio.gather(*(client.submit(convert_spec(
                str(source), str(stack.output_dir / f"fan-{i}.qcow2"), new_id("fan"), fmt="vmdk"))
                for i in range(jobs)))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = [j[2] for j in await client.list_jobs()]
                if states.count("progressing") >= jobs:
                    break
                await asyncio.sleep(0.5)
            else:
                raise RuntimeError(f"only {states.count('progressing')} of {jobs} jobs were progressing")
            return submitted
        finally:
            client.close()

    submitted = asyncio.run(start_jobs())
    pid = stack.daemon_pid
    sample: dict[str, float] = {}

    def on_go() -> None:
        sample["cpu0"], sample["t0"] = cpu_seconds(pid), time.monotonic()

    results = run_in_processes(subscribers, load.subscriber_client, stack.bus_address, seconds, None, on_go=on_go)
    cpu = cpu_seconds(pid) - sample["cpu0"]
    elapsed = time.monotonic() - sample["t0"]

    async def still_running_then_cancel() -> int:
        client = await Client.connect(stack.bus_address)
        try:
            progressing = sum(1 for j in await client.list_jobs() if j[2] == "progressing")
            for job_id, path in submitted:
                await client.manager("CancelJob", "s", [job_id])
            for job_id, path in submitted:
                await client.wait_terminal(path, 120)
                await client.manager("RemoveJob", "s", [job_id])
            await client.manager("SetMaxParallelJobs", "u", [2])
            return progressing
        finally:
            client.close()

    progressing_at_end = asyncio.run(still_running_then_cancel())
    restart_with(stack, {})
    per_client = [r["signals"] / r["seconds"] for r in results.per_client]
    return {"jobs": jobs, "subscribers": subscribers, "seconds": elapsed,
            "jobs_progressing_at_end": progressing_at_end,
            "signals_per_s_per_client": median(per_client),
            "signals_per_s_all_clients": sum(per_client),
            "daemon_cpu_share": cpu / elapsed,
            "all_connected": all(r["connected"] for r in results.per_client)}
