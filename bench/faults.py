"""Load and faults with nothing lost: submit bursts, many subscribers, kill -9 of h2kd during conversions.

Each function returns what it observed (counts, lists of problems); the benchmark prints it, the tests
(tests/test_load_faults.py) assert on it at a smaller scale.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import disks, load
from bench.client import Client, convert_spec, inspect_spec, new_id, run_in_processes, with_client
from bench.stack import rate_limited, restart_with, unit_run_dirs
from h2kd.runner.unit import unit_name
from h2kd.sandbox.stack import Stack


def _job_ids(stack: Stack) -> list[str]:
    return with_client(stack.bus_address, Client.job_ids)


def _health(stack: Stack) -> dict[str, Any]:
    return with_client(stack.bus_address, Client.health)


def submit_burst(stack: Stack, source: Path, clients: int = 50, per_client: int = 100) -> dict[str, Any]:
    """`clients` processes each pipelining `per_client` held submits at once; then every job is ended."""
    before = set(_job_ids(stack))
    pid = stack.daemon_pid
    wall, per = load.submit_burst(stack.bus_address, clients, per_client, per_client, str(source))
    replied = [i for p in per for i in p["ids"]]
    errors = [e for p in per for e in p["errors"]]
    after = _job_ids(stack)
    new = [j for j in after if j not in before]
    health = _health(stack)
    problems = load.cancel_and_remove(stack.bus_address, new, clients=4, window=64)
    left = [j for j in _job_ids(stack) if j in set(new)]
    return {"submits": clients * per_client, "replies": len(replied), "errors": errors,
            "distinct_replied": len(set(replied)), "new_jobs": len(new), "new_jobs_distinct": len(set(new)),
            "replied_equals_new": sorted(replied) == sorted(new), "seconds": wall,
            "per_second": len(replied) / wall, "same_daemon": stack.daemon_pid == pid,
            "health": health.get("status"), "cleanup_problems": problems, "left_after_cleanup": len(left)}


def subscribers_while_jobs_run(stack: Stack, source: Path, subscribers: int = 200, jobs: int = 100,
                               parallel: int = 8, timeout: float = 600) -> dict[str, Any]:
    """`subscribers` listening clients while `jobs` small inspect jobs run; every client must see every end."""
    stop_dir = Path(tempfile.mkdtemp(prefix="h2k-bench-"))
    stop_file = stop_dir / "stop"
    pid = stack.daemon_pid
    outcome: dict[str, Any] = {}

    def stop_subscribers() -> None:
        try:
            stop_file.touch()
        except OSError:   # the directory is gone: the subscribers were stopped already
            pass

    async def run_jobs() -> None:
        try:
            async with Client.connected(stack.bus_address, watch=True) as client:
                await client.manager("SetMaxParallelJobs", "u", [parallel])
                submitted = await asyncio.gather(*(client.submit(inspect_spec(str(source), new_id("sub")))
                                                   for _ in range(jobs)))
                start = time.monotonic()
                states = {}
                for job_id, path in submitted:
                    states[job_id] = (await client.wait_terminal(path, timeout))["State"]
                outcome["jobs_seconds"] = time.monotonic() - start
                outcome["states"] = sorted(set(states.values()))
                await asyncio.sleep(1.0)   # the last Completed signals reach the subscribers
                for job_id, _ in submitted:
                    await client.manager("RemoveJob", "s", [job_id])
                await client.manager("SetMaxParallelJobs", "u", [2])
        finally:
            stop_subscribers()

    def on_go() -> None:
        outcome["thread_error"] = None
        import threading

        def runner() -> None:
            try:
                asyncio.run(run_jobs())
            except BaseException as exc:
                outcome["thread_error"] = repr(exc)
                stop_subscribers()
        thread = threading.Thread(target=runner, daemon=True)
        thread.start()
        outcome["thread"] = thread

    try:
        results = run_in_processes(subscribers, load.subscriber_client, stack.bus_address, timeout,
                                   str(stop_file), on_go=on_go, timeout=timeout + 60)
        outcome["thread"].join(timeout=60)
    finally:
        shutil.rmtree(stop_dir, ignore_errors=True)
    seen = [r["completed"] for r in results.per_client]
    return {"subscribers": subscribers, "jobs": jobs, "jobs_seconds": outcome.get("jobs_seconds"),
            "final_states": outcome.get("states"), "error": outcome.get("thread_error"),
            "completed_seen_min": min(seen), "completed_seen_max": max(seen),
            "all_connected": all(r["connected"] for r in results.per_client),
            "same_daemon": stack.daemon_pid == pid, "health": _health(stack).get("status"),
            "left_behind": stop_dir.exists()}


def kill_during_conversions(stack: Stack, work: Path, kills: int = 20, jobs: int = 16,
                            data_bytes: int = 64 * disks.MiB, rate: int = 16 * disks.MiB,
                            seed: int | None = None, timeout: float = 900) -> dict[str, Any]:
    """kill -9 h2kd `kills` times at random moments while `jobs` conversions run, restarting it each time.

    Then: every job completed once (one terminal state event, one attempt that ran, one unit that ran), outputs
    identical to their sources (qemu-img compare). An attempt whose unit h2kd was starting when it was killed,
    and that never ran, costs no attempt (it goes back to the queue): it is counted in `never_started`, not as
    a problem; its run directory, if h2kd had made it yet (it records the attempt first), stays with the job's
    others until the job is removed.
    """
    rng = random.Random(seed)
    size = max(4 * data_bytes, 64 * disks.MiB)
    sources = [disks.sparse_vmdk(work, f"kill{i}", size, data_bytes / size, seed=200 + i) for i in range(jobs)]
    outputs = [stack.output_dir / f"{new_id('kill')}.qcow2" for _ in range(jobs)]
    restart_with(stack, rate_limited(rate))

    async def submit(client: Client) -> list[tuple[str, str]]:
        return list(await asyncio.gather(*(client.submit(convert_spec(str(s), str(o), new_id("kill"), fmt="vmdk"))
                                           for s, o in zip(sources, outputs))))

    submitted = with_client(stack.bus_address, submit)

    async def states(client: Client) -> list[str]:
        return [(await client.job_props(p))["State"] for _, p in submitted]

    done_kills = 0
    kill_states: list[list[str]] = []
    deadline = time.monotonic() + timeout
    while done_kills < kills and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.1, 1.5))
        now = with_client(stack.bus_address, states)
        if all(s in ("completed", "failed", "cancelled") for s in now):
            break
        kill_states.append(sorted(set(now)))
        stack.kill_daemon()
        done_kills += 1
        stack.start_daemon()

    attempts: dict[str, int] = {}

    async def finish(client: Client) -> dict[str, Any]:
        problems: list[str] = []
        never_started = 0
        for (job_id, path), source, output in zip(submitted, sources, outputs):
            props = await client.wait_terminal(path, max(deadline - time.monotonic(), 30))
            if props["State"] != "completed":
                problems.append(f"{job_id} ended {props['State']}: {props['Error']}")
                continue
            attempts[job_id] = props["Attempt"]
            entered = [json.loads(e[3]).get("new_state") for e in await client.events(path) if e[2] == "state"]
            if props["Attempt"] != 1:
                if entered.count("running") == 1:
                    never_started += props["Attempt"] - 1
                else:
                    problems.append(f"{job_id} took {props['Attempt']} attempts")
            finals = [s for s in entered if s in ("completed", "failed", "cancelled")]
            if len(finals) != 1:
                problems.append(f"{job_id} reached a final state {len(finals)} times: {entered}")
            if entered.count("running") != 1:
                problems.append(f"{job_id} started running {entered.count('running')} times: {entered}")
            ok, text = disks.identical(source, output)
            if not ok:
                problems.append(f"{job_id}: output differs from its source: {text}")
        return {"problems": problems, "never_started": never_started}

    result = with_client(stack.bus_address, finish)
    units = unit_run_dirs(stack)
    for job_id, _ in submitted:
        mine = [u for u in units if u.startswith(unit_name(job_id, 1).rsplit("-", 1)[0] + "-")]
        expected = [unit_name(job_id, attempt) for attempt in range(1, attempts.get(job_id, 1) + 1)]
        # The attempt that ran has its directory; one that never started may have none (h2kd killed between
        # recording it and making its directory).
        if not set(mine) <= set(expected) or expected[-1] not in mine:
            result["problems"].append(f"{job_id}: units {mine}")
    leftovers = [p.name for p in stack.output_dir.iterdir() if p.name.startswith(".h2k-tmp-")]
    if leftovers:
        result["problems"].append(f"temporary files left: {leftovers}")
    health = _health(stack)

    async def clean(client: Client) -> None:
        for job_id, _ in submitted:
            await client.manager("RemoveJob", "s", [job_id])
    with_client(stack.bus_address, clean)
    for o in outputs:
        o.unlink(missing_ok=True)
    for s in sources:
        s.unlink(missing_ok=True)
    restart_with(stack, {})
    return {"kills": done_kills, "jobs": jobs, "states_at_kills": kill_states, "health": health.get("status"),
            **result}
