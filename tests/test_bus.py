"""The D-Bus API on the real private stack, through clients we did not write (busctl, gdbus) and dbus-fast."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from dbus_fast import Message, Variant

from h2kd import BUS_NAME, MANAGER_PATH
from h2kd.bus.connection import connect_bus

from busclient import (ERR, JOB, MANAGER, OBJECT_MANAGER, PROPERTIES, WORKER, Client, new_id, read_until,
                       run, spec, wait_for)


# ---------------------------------------------------------------- foreign clients

def busctl(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["busctl", "--system", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=check)


def busctl_manager(env: dict, method: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return busctl(env, "call", BUS_NAME, MANAGER_PATH, MANAGER, method, *args, check=check)


def busctl_json(env: dict, method: str, *args: str) -> Any:
    out = busctl(env, "--json=short", "call", BUS_NAME, MANAGER_PATH, MANAGER, method, *args).stdout
    return json.loads(out)["data"]


def busctl_property(env: dict, path: str, interface: str, name: str) -> Any:
    out = busctl(env, "--json=short", "get-property", BUS_NAME, path, interface, name).stdout
    return json.loads(out)["data"]


def gdbus(env: dict, path: str, method: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["gdbus", "call", "--system", "-d", BUS_NAME, "-o", path, "-m", method, *args],
                          env=env, capture_output=True, text=True, timeout=60, check=check)


def busctl_submit(env: dict, job_id: str, path: str = "/etc/hostname", queue: bool = True) -> tuple[str, str]:
    out = busctl_manager(env, "SubmitJob", "a{sv}a{sv}", "3", "job_id", "s", job_id, "operation", "s", "inspect",
                         "image", "v", "a{sv}", "1", "path", "s", path,
                         "1", "queue", "b", "true" if queue else "false").stdout.split()
    assert out[0] == "so"
    return out[1].strip('"'), out[2].strip('"')


@pytest.fixture
def paused(stack_env):
    """The queue paused for the test, resumed afterwards whatever happens."""
    busctl_manager(stack_env, "PauseQueue")
    yield
    busctl_manager(stack_env, "ResumeQueue")


# ---------------------------------------------------------------- life cycle through foreign clients

def test_submit_get_list_cancel_retry_remove_with_busctl(stack_env, paused):
    job_id = new_id("busctl")
    got_id, path = busctl_submit(stack_env, job_id)
    assert got_id == job_id and path.startswith(MANAGER_PATH + "/job/")
    assert busctl_manager(stack_env, "GetJob", "s", job_id).stdout.split() == ["o", f'"{path}"']
    listed = {j[0]: j for j in busctl_json(stack_env, "ListJobs", "a{sv}", "0")[0]}
    assert listed[job_id][2] == "queued" and listed[job_id][7] == path
    assert busctl_property(stack_env, path, JOB, "State") == "queued"
    assert busctl_property(stack_env, path, JOB, "Owner") == 0   # tests run as root

    busctl_manager(stack_env, "CancelJob", "s", job_id)
    assert busctl_property(stack_env, path, JOB, "State") == "cancelled"
    busctl_manager(stack_env, "RetryJob", "s", job_id)
    assert busctl_property(stack_env, path, JOB, "State") == "queued"
    busctl_manager(stack_env, "CancelJob", "s", job_id)
    busctl_manager(stack_env, "RemoveJob", "s", job_id)
    gone = busctl_manager(stack_env, "GetJob", "s", job_id, check=False)
    assert gone.returncode != 0 and job_id in gone.stderr
    assert job_id not in {j[0] for j in busctl_json(stack_env, "ListJobs", "a{sv}", "0")[0]}


def test_life_cycle_and_error_names_with_gdbus(stack_env, paused):
    job_id = new_id("gdbus")
    out = gdbus(stack_env, MANAGER_PATH, MANAGER + ".SubmitJob",
                f"{{'job_id': <'{job_id}'>, 'operation': <'inspect'>, 'image': <{{'path': <'/etc/hostname'>}}>}}",
                "{}").stdout
    assert job_id in out and "/org/hyper2kvm/h2kd1/job/" in out
    path = out.split("objectpath '")[1].split("'")[0]

    missing = gdbus(stack_env, MANAGER_PATH, MANAGER + ".GetJob", "no-such-" + job_id, check=False)
    assert missing.returncode != 0 and ERR + "NoSuchJob" in missing.stderr
    not_finished = gdbus(stack_env, MANAGER_PATH, MANAGER + ".RemoveJob", job_id, check=False)
    assert ERR + "InvalidState" in not_finished.stderr
    bad_priority = gdbus(stack_env, MANAGER_PATH, MANAGER + ".SetJobPriority", job_id, "99", check=False)
    assert ERR + "InvalidArgument" in bad_priority.stderr

    gdbus(stack_env, path, JOB + ".Cancel")
    state = gdbus(stack_env, path, PROPERTIES + ".Get", JOB, "State").stdout
    assert "cancelled" in state
    assert ERR + "InvalidState" in gdbus(stack_env, path, JOB + ".Cancel", check=False).stderr
    gdbus(stack_env, path, JOB + ".Retry")
    assert "queued" in gdbus(stack_env, path, PROPERTIES + ".Get", JOB, "State").stdout
    gdbus(stack_env, MANAGER_PATH, MANAGER + ".CancelJob", job_id)
    gdbus(stack_env, MANAGER_PATH, MANAGER + ".RemoveJob", job_id)
    assert ERR + "NoSuchJob" in gdbus(stack_env, MANAGER_PATH, MANAGER + ".GetJob", job_id, check=False).stderr


def test_a_long_event_log_comes_a_page_at_a_time_and_h2kctl_reads_it_all(stack, stack_env):
    """GetEvents answers at most 1,000 events a call, whatever a job's log holds; clients ask again from the
    last seq (h2kctl events does), so the reply never grows with the log."""
    job_id = new_id("pages")

    async def fill() -> int:
        client = await Client.connect(stack.bus_address)
        try:
            _, path = await client.submit(spec(job_id), queue=False)
            for n in range(1100):   # each change of priority is a log event
                await client.manager("SetJobPriority", "su", [job_id, 3 + n % 2])
            (first,) = await client.call(path, JOB, "GetEvents", "t", [0])
            assert [e[0] for e in first] == list(range(1, 1001))
            (rest,) = await client.call(path, JOB, "GetEvents", "t", [1000])
            assert rest and [e[0] for e in rest] == list(range(1001, 1001 + len(rest)))
            (none,) = await client.call(path, JOB, "GetEvents", "t", [rest[-1][0]])
            assert none == []
            return rest[-1][0]
        finally:
            client.close()

    try:
        last = run(fill())
        listed = subprocess.run([sys.executable, "-m", "h2kctl", "events", job_id, "--json"], env=stack_env,
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert [e["seq"] for e in json.loads(listed.stdout)] == list(range(1, last + 1))
    finally:
        gdbus(stack_env, MANAGER_PATH, MANAGER + ".CancelJob", job_id, check=False)
        gdbus(stack_env, MANAGER_PATH, MANAGER + ".RemoveJob", job_id, check=False)


def test_life_cycle_from_python(stack, paused):
    async def scenario() -> None:
        client = await Client.connect(stack.bus_address)
        job_id = new_id("py")
        got_id, path = await client.submit(spec(job_id))
        assert got_id == job_id
        assert (await client.manager("GetJob", "s", [job_id]))[0] == path
        assert await client.prop(path, JOB, "Id") == job_id
        assert await client.prop(path, JOB, "Cancelable") is True
        await client.call(path, JOB, "Cancel")
        assert await client.prop(path, JOB, "State") == "cancelled"
        assert await client.prop(path, JOB, "Cancelable") is False
        (events,) = await client.call(path, JOB, "GetEvents", "t", [0])
        states = [json.loads(e[3]).get("new_state") for e in events if e[2] == "state"]
        assert states[-1] == "cancelled" and "queued" in states
        seqs = [e[0] for e in events]
        assert seqs == sorted(seqs)
        (later,) = await client.call(path, JOB, "GetEvents", "t", [seqs[-2]])
        assert [e[0] for e in later] == seqs[-1:]
        await client.call(path, JOB, "Retry")
        assert await client.prop(path, JOB, "State") == "queued"
        await client.manager("CancelJob", "s", [job_id])
        await client.manager("RemoveJob", "s", [job_id])
        await client.manager("GetJob", "s", [job_id], expect_error=ERR + "NoSuchJob")
        client.close()
    run(scenario())


def test_submit_without_queueing_then_start(stack, paused):
    async def scenario() -> None:
        client = await Client.connect(stack.bus_address)
        job_id = new_id("held")
        _, path = await client.submit(spec(job_id), queue=False)
        assert await client.prop(path, JOB, "State") == "validated"
        await client.manager("StartJob", "s", [job_id])
        assert await client.prop(path, JOB, "State") == "queued"
        await client.manager("StartJob", "s", [job_id], expect_error=ERR + "InvalidState")
        await client.manager("CancelJob", "s", [job_id])
        await client.manager("RemoveJob", "s", [job_id])
        client.close()
    run(scenario())


# ---------------------------------------------------------------- ObjectManager

def test_object_manager_signals_come_from_the_manager_path(stack, paused):
    async def scenario() -> None:
        client = await Client.connect(stack.bus_address, watch=True)
        job_id = new_id("om")
        _, path = await client.submit(spec(job_id))
        (objects,) = await client.call(MANAGER_PATH, OBJECT_MANAGER, "GetManagedObjects")
        assert objects[path][JOB]["Id"].value == job_id
        assert objects[path][JOB]["State"].value == "queued"
        assert any(p.startswith(MANAGER_PATH + "/worker/") for p in objects)
        await client.manager("CancelJob", "s", [job_id])
        await client.manager("RemoveJob", "s", [job_id])
        await wait_for(lambda: _async(any(s.member == "InterfacesRemoved" and s.body[0] == path
                                          for s in client.signals)), 10, "InterfacesRemoved")
        (objects,) = await client.call(MANAGER_PATH, OBJECT_MANAGER, "GetManagedObjects")
        assert path not in objects

        om = [s for s in client.signals if s.interface == OBJECT_MANAGER]
        assert om, "no ObjectManager signals at all"
        assert {s.path for s in om} == {MANAGER_PATH}, [(s.path, s.member) for s in om]
        added = [s for s in om if s.member == "InterfacesAdded" and s.body[0] == path]
        removed = [s for s in om if s.member == "InterfacesRemoved" and s.body[0] == path]
        assert len(added) == 1 and len(removed) == 1
        assert added[0].body[1][JOB]["Id"].value == job_id
        assert added[0].body[1][JOB]["State"].value == "queued"   # it appears where its submission left it
        assert removed[0].body[1] == [JOB]
        new = [s.body for s in client.signals if s.member == "JobNew" and s.path == MANAGER_PATH]
        gone = [s.body for s in client.signals if s.member == "JobRemoved" and s.path == MANAGER_PATH]
        assert [job_id, path] in new
        assert [job_id, path, "cancelled"] in gone
        completed = [s.body for s in client.signals if s.member == "Completed" and s.path == path]
        assert completed and completed[-1][0] is False
        state_changes = [s.body[0] for s in client.signals if s.member == "StateChanged" and s.path == path]
        assert state_changes == ["cancelled"], "a state from before the object appeared came after it"
        client.close()
    run(scenario())


def test_a_job_failing_its_checks_appears_created_then_fails_at_once(stack):
    """As Job.xml says: the object is announced created, then StateChanged failed and Completed(false) follow."""
    async def scenario() -> None:
        client = await Client.connect(stack.bus_address, watch=True)
        job_id = new_id("nofile")
        _, path = await client.submit(spec(job_id, path=f"/nonexistent/{job_id}.vmdk"))
        await wait_for(lambda: _async(any(s.member == "Completed" and s.path == path for s in client.signals)),
                       10, "Completed")
        added = [s for s in client.signals if s.member == "InterfacesAdded" and s.body[0] == path]
        assert len(added) == 1 and added[0].body[1][JOB]["State"].value == "created"
        changes = [s.body for s in client.signals if s.member == "StateChanged" and s.path == path]
        assert [state for state, _ in changes] == ["failed"] and "no such file" in changes[0][1].lower(), changes
        completed = [s.body for s in client.signals if s.member == "Completed" and s.path == path]
        assert len(completed) == 1 and completed[0][0] is False
        order = [s.member for s in client.signals if s.path == path and s.member in ("StateChanged", "Completed")]
        assert order == ["StateChanged", "Completed"]
        assert await client.prop(path, JOB, "State") == "failed"
        await client.manager("RemoveJob", "s", [job_id])
        client.close()
    run(scenario())


def test_object_manager_signals_seen_by_dbus_monitor(stack, stack_env, paused):
    monitor = subprocess.Popen(["dbus-monitor", "--system", f"type='signal',sender='{BUS_NAME}'"],
                               env=stack_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = read_until(monitor, "member=NameLost")     # it has become a monitor
        job_id = new_id("mon")
        _, path = busctl_submit(stack_env, job_id)
        busctl_manager(stack_env, "CancelJob", "s", job_id)
        busctl_manager(stack_env, "RemoveJob", "s", job_id)
        seen += read_until(monitor, "member=InterfacesRemoved")
    finally:
        monitor.terminate()
        output, _ = monitor.communicate(timeout=10)
    output = seen + output
    headers = [line for line in output.splitlines() if line.startswith("signal ")]
    om = [h for h in headers if f"interface={OBJECT_MANAGER};" in h]
    assert any("member=InterfacesAdded" in h for h in om) and any("member=InterfacesRemoved" in h for h in om)
    assert all(f"path={MANAGER_PATH};" in h for h in om), om
    assert f'object path "{path}"' in output


async def _async(value: Any) -> Any:
    return value


# ---------------------------------------------------------------- idempotency, ordering, pause

def test_idempotent_resubmission(stack, paused):
    async def scenario() -> None:
        client = await Client.connect(stack.bus_address)
        job_id = new_id("idem")
        first = await client.submit(spec(job_id))
        again = await client.submit(spec(job_id))
        assert again == first
        assert (await client.job_ids()).count(job_id) == 1
        message = await client.submit(spec(job_id, path="/etc/passwd"), expect_error=ERR + "AlreadyExists")
        assert job_id in message
        assert (await client.job_ids()).count(job_id) == 1
        await client.manager("CancelJob", "s", [job_id])
        await client.manager("RemoveJob", "s", [job_id])
        client.close()
    run(scenario())


def test_priority_and_fifo_order(stack):
    """Queued while paused: the stats count them by priority; after resume they start by priority, FIFO within one."""
    async def assigned_at(client: Client, path: str) -> int:
        (events,) = await client.call(path, JOB, "GetEvents", "t", [0])
        times = [e[1] for e in events if e[2] == "state" and json.loads(e[3]).get("new_state") == "assigned"]
        return times[0] if times else 0

    async def scenario() -> None:
        client = await Client.connect(stack.bus_address)
        await client.manager("PauseQueue")
        try:
            (before,) = await client.manager("GetQueueStats")
            plan = [("a", 5), ("b", 1), ("c", 5), ("d", 10), ("e", 1), ("f", 10)]
            tag = uuid.uuid4().hex[:6]
            paths = {}
            for name, priority in plan:
                job_id, path = await client.submit(spec(f"order-{tag}-{name}", priority=priority))
                paths[name] = path
            (stats,) = await client.manager("GetQueueStats")
            assert stats["paused"].value is True
            counts = [n - b for n, b in zip(stats["by_priority"].value, before["by_priority"].value)]
            assert counts == [2, 0, 0, 0, 2, 0, 0, 0, 0, 2]
            assert stats["queued"].value - before["queued"].value == 6
            waiting = stats["waiting"].value
            assert all(waiting.get(f"order-{tag}-{n}") for n, _ in plan)
            # A queued job's priority can change: f jumps ahead of a and c.
            await client.manager("SetJobPriority", "su", [f"order-{tag}-f", 2])
            assert await client.prop(paths["f"], JOB, "Priority") == 2
            await asyncio.sleep(0.3)
            assert all([await client.prop(p, JOB, "State") == "queued" for p in paths.values()])
        finally:
            await client.manager("ResumeQueue")
        started = {name: await wait_for(lambda p=path: assigned_at(client, p), 60, f"job {name} to start")
                   for name, path in paths.items()}
        order = sorted(started, key=lambda n: started[n])
        assert order == ["b", "e", "f", "a", "c", "d"], order
        client.close()
    run(scenario())


def test_pause_and_resume(stack):
    async def scenario() -> None:
        client = await Client.connect(stack.bus_address, watch=True)
        await client.manager("PauseQueue")
        try:
            assert await client.prop(MANAGER_PATH, MANAGER, "Paused") is True
            job_id, path = await client.submit(spec(new_id("pause")))
            await asyncio.sleep(1.0)
            assert await client.prop(path, JOB, "State") == "queued"
            assert "paused" in await client.prop(path, JOB, "WaitReason")
        finally:
            await client.manager("ResumeQueue")
        assert await client.prop(MANAGER_PATH, MANAGER, "Paused") is False
        await wait_for(lambda: _left_queue(client, path), 30, "the job to leave the queue")
        paused_changes = [s.body[1]["Paused"].value for s in client.signals
                          if s.path == MANAGER_PATH and s.member == "PropertiesChanged" and "Paused" in s.body[1]]
        assert paused_changes[:2] == [True, False]
        client.close()
    run(scenario())


async def _left_queue(client: Client, path: str) -> bool:
    return await client.prop(path, JOB, "State") != "queued"


# ---------------------------------------------------------------- malformed input

BIG = "x" * 100_000
MALFORMED = {
    "wrong type": ({"operation": Variant("s", "inspect"), "image": Variant("a{sv}", {"path": Variant("u", 5)})},
                   "image.path"),
    "image not a dict": ({"operation": Variant("s", "inspect"), "image": Variant("s", "/etc/hostname")}, "image"),
    "missing image": ({"operation": Variant("s", "inspect")}, "image"),
    "missing operation": ({"image": Variant("a{sv}", {"path": Variant("s", "/etc/hostname")})}, "operation"),
    "unknown operation": ({"operation": Variant("s", "teleport"),
                           "image": Variant("a{sv}", {"path": Variant("s", "/etc/hostname")})}, "operation"),
    "priority 99": ({"operation": Variant("s", "inspect"),
                     "image": Variant("a{sv}", {"path": Variant("s", "/etc/hostname")}),
                     "execution_policy": Variant("a{sv}", {"priority": Variant("u", 99)})},
                    "execution_policy.priority"),
    "100 KB string": ({"operation": Variant("s", "inspect"),
                       "image": Variant("a{sv}", {"path": Variant("s", "/etc/hostname")}),
                       "audit": Variant("a{sv}", {"ticket": Variant("s", BIG)})}, "audit.ticket"),
    "100 KB path": ({"operation": Variant("s", "inspect"), "image": Variant("a{sv}", {"path": Variant("s", BIG)})},
                    "image.path"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_spec_is_invalid_spec_naming_the_field(stack, case):
    bad, field = MALFORMED[case]

    async def scenario() -> None:
        client = await Client.connect(stack.bus_address)
        before = await client.job_ids()
        job_id = new_id("bad")
        message = await client.submit({**bad, "job_id": Variant("s", job_id)}, expect_error=ERR + "InvalidSpec")
        assert message.startswith(field), message
        assert len(message) < 2000 and "Traceback" not in message
        after = await client.job_ids()
        assert after == before and job_id not in after
        client.close()
    run(scenario())


def test_malformed_spec_through_busctl(stack_env):
    # Ids only: jobs of earlier tests may still be changing state meanwhile.
    before = [j[0] for j in busctl_json(stack_env, "ListJobs", "a{sv}", "0")[0]]
    result = busctl_manager(stack_env, "SubmitJob", "a{sv}a{sv}", "2", "operation", "s", "inspect",
                            "image", "v", "a{sv}", "1", "path", "b", "true", "0", check=False)
    assert result.returncode != 0 and "image.path" in result.stderr
    assert [j[0] for j in busctl_json(stack_env, "ListJobs", "a{sv}", "0")[0]] == before


def test_unknown_option_and_filter_are_rejected(stack):
    async def scenario() -> None:
        client = await Client.connect(stack.bus_address)
        await client.manager("SubmitJob", "a{sv}a{sv}", [spec(new_id("opt")), {"bogus": Variant("b", True)}],
                             expect_error=ERR + "InvalidArgument")
        await client.manager("ListJobs", "a{sv}", [{"limit": Variant("s", "ten")}],
                             expect_error=ERR + "InvalidArgument")
        await client.manager("ListJobs", "a{sv}", [{"state": Variant("s", "sleeping")}],
                             expect_error=ERR + "InvalidArgument")
        client.close()
    run(scenario())


def test_list_filters(stack, paused):
    async def scenario() -> None:
        client = await Client.connect(stack.bus_address)
        ids = [(await client.submit(spec(new_id("filter"))))[0] for _ in range(3)]
        await client.manager("CancelJob", "s", [ids[1]])
        (cancelled,) = await client.manager("ListJobs", "a{sv}", [{"state": Variant("s", "cancelled")}])
        assert ids[1] in [j[0] for j in cancelled] and all(j[2] == "cancelled" for j in cancelled)
        (both,) = await client.manager("ListJobs", "a{sv}", [{"state": Variant("as", ["cancelled", "queued"])}])
        assert set(ids) <= {j[0] for j in both}
        (all_jobs,) = await client.manager("ListJobs", "a{sv}", [{}])
        (page,) = await client.manager("ListJobs", "a{sv}", [{"offset": Variant("u", 1), "limit": Variant("u", 2)}])
        assert [j[0] for j in page] == [j[0] for j in all_jobs[1:3]]
        (mine,) = await client.manager("ListJobs", "a{sv}", [{"owner": Variant("u", 0)}])
        assert set(ids) <= {j[0] for j in mine}
        for job_id in ids:
            if job_id != ids[1]:
                await client.manager("CancelJob", "s", [job_id])
            await client.manager("RemoveJob", "s", [job_id])
        client.close()
    run(scenario())


# ---------------------------------------------------------------- workers and coalescing

def test_worker_objects_answer_only_their_connection_and_properties_are_coalesced(stack):
    """An external worker reports 300 progress updates in about 1.5 s: watchers get about ten
    PropertiesChanged a second, the final state at once, and other connections cannot drive the worker."""
    async def scenario() -> None:
        watcher = await Client.connect(stack.bus_address, watch=True)
        worker = await Client.connect(stack.bus_address)
        stranger = await Client.connect(stack.bus_address)
        label = uuid.uuid4().hex[:8]
        # null operations is as good as none: every operation.
        caps = json.dumps({"operations": None, "testlab": label})
        worker_id, worker_path = await worker.manager("RegisterWorker", "ssa{sv}",
                                                      ["test-worker", caps, {"max_jobs": Variant("u", 1)}])
        assert await worker.prop(worker_path, WORKER, "Kind") == "external"
        await stranger.call(worker_path, WORKER, "Heartbeat", expect_error="org.freedesktop.DBus.Error.AccessDenied")
        await stranger.call(worker_path, WORKER, "ClaimJob", expect_error="org.freedesktop.DBus.Error.AccessDenied")
        await worker.call(worker_path, WORKER, "Heartbeat")

        job_id, path = await watcher.submit(spec(new_id("busy"), requirements={"testlab": label}))
        found, claimed, claimed_spec = await wait_for(
            lambda: _claim(worker, worker_path), 20, "the worker to claim its job")
        assert claimed == job_id and json.loads(claimed_spec)["job_id"] == job_id

        start = time.monotonic()
        total = 300
        for i in range(1, total + 1):
            await worker.call(worker_path, WORKER, "ReportProgress", "sa{sv}", [job_id, {
                "progress": Variant("d", i / (total + 1)), "bytes_done": Variant("t", i * 1000),
                "bytes_total": Variant("t", (total + 1) * 1000), "phase": Variant("s", "converting")}])
            await asyncio.sleep(0.005)
        busy_seconds = time.monotonic() - start
        await asyncio.sleep(0.3)
        await worker.call(worker_path, WORKER, "ReportResult", "sa{sv}", [job_id, {
            "success": Variant("b", True), "outputs": Variant("s", "{}")}])
        await wait_for(lambda: _async(any(s.member == "Completed" and s.path == path for s in watcher.signals)),
                       10, "Completed")

        changes = [s for s in watcher.signals if s.path == path and s.member == "PropertiesChanged"]
        # State changes go out at once (each carries the progress fields it resets); the rest is coalesced.
        coalesced = [s for s in changes if "Progress" in s.body[1] and "State" not in s.body[1]]
        transitions = len(changes) - len([s for s in changes if "State" not in s.body[1]])
        allowed = busy_seconds / 0.1 + 2
        assert 5 <= len(coalesced) <= allowed, (len(coalesced), busy_seconds)
        values = [s.body[1]["Progress"].value for s in coalesced]
        assert values == sorted(values) and values[-1] > 0.9
        progress_signals = [s for s in watcher.signals if s.path == path and s.member == "Progress"]
        assert 5 <= len(progress_signals) <= allowed + transitions
        final = [s for s in changes if s.body[1].get("State") and s.body[1]["State"].value == "completed"]
        assert final, "the final state was not sent"
        assert await watcher.prop(path, JOB, "State") == "completed"
        assert [s.body for s in watcher.signals if s.member == "Completed" and s.path == path][-1][0] is True

        await worker.call(worker_path, WORKER, "Unregister")
        await wait_for(lambda: _async(any(s.member == "InterfacesRemoved" and s.body[0] == worker_path
                                          and s.path == MANAGER_PATH for s in watcher.signals)),
                       10, "the worker's InterfacesRemoved")
        await watcher.manager("RemoveJob", "s", [job_id])
        for client in (watcher, worker, stranger):
            client.close()
    run(scenario())


def test_worker_json_arguments_must_be_json_objects(stack):
    """Capabilities and a result's outputs are given back as JSON (the Capabilities property, a job's Result):
    NaN and Infinity, which are not JSON, and nesting too deep for the parser are InvalidArgument, like any
    other text that is not a JSON object, and change nothing."""
    nan = '{"a": NaN}'
    infinite = '{"a": [1, -Infinity]}'
    too_large = '{"a": 1e400}'                  # json.loads makes it infinite, given back as Infinity
    too_large_whole = '{"a": -1' + "0" * 400 + "}"     # a Python int, but infinite to JSON.parse and to comparisons
    deep = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"

    async def scenario() -> None:
        worker = await Client.connect(stack.bus_address)
        label = uuid.uuid4().hex[:8]
        for caps in (nan, infinite, too_large, too_large_whole, deep, "[1]", '{"operations": 5}',
                     '{"operations": "convert"}'):
            await worker.manager("RegisterWorker", "ssa{sv}", ["odd", caps, {}],
                                 expect_error=ERR + "InvalidArgument")
        # null operations is as good as none: every operation.
        caps = json.dumps({"operations": None, "testlab": label})
        _, worker_path = await worker.manager("RegisterWorker", "ssa{sv}", ["json-worker", caps, {}])
        assert json.loads(await worker.prop(worker_path, WORKER, "Capabilities"))["testlab"] == label
        job_id, path = await worker.submit(spec(new_id("json"), requirements={"testlab": label}))
        await wait_for(lambda: _claim(worker, worker_path), 20, "the worker to claim its job")
        for outputs in (nan, infinite, too_large, too_large_whole, deep):
            await worker.call(worker_path, WORKER, "ReportResult", "sa{sv}", [job_id, {
                "success": Variant("b", True), "outputs": Variant("s", outputs)}], expect_error=ERR + "InvalidArgument")
        assert await worker.prop(path, JOB, "State") == "assigned"
        attempt = await worker.prop(path, JOB, "Attempt")
        await worker.call(worker_path, WORKER, "ReportResult", "sa{sv}", [job_id, {
            "success": Variant("b", True), "attempt": Variant("u", attempt + 1)}], expect_error=ERR + "InvalidState")
        await worker.call(worker_path, WORKER, "ReportResult", "sa{sv}", [job_id, {
            "success": Variant("b", True), "outputs": Variant("s", '{"disks": 1}'), "attempt": Variant("u", attempt)}])
        assert await worker.prop(path, JOB, "State") == "completed"
        assert json.loads(await worker.prop(path, JOB, "Result"))["outputs"] == {"disks": 1}
        await worker.call(worker_path, WORKER, "Unregister")
        await worker.manager("RemoveJob", "s", [job_id])
        worker.close()
    run(scenario())


async def _claim(worker: Client, worker_path: str) -> Any:
    found, job_id, job_spec = await worker.call(worker_path, WORKER, "ClaimJob")
    return (found, job_id, job_spec) if found else None


# ---------------------------------------------------------------- bursts

def test_daemon_survives_a_burst_of_pipelined_calls(stack, stack_env):
    """5,000 calls sent without waiting for replies: every one is answered (by h2kd, or refused by the bus
    for exceeding its limits), h2kd keeps its connection, and it still answers afterwards."""
    pid = stack.daemon_pid

    async def scenario() -> dict[str, int]:
        # Our own connection type: plain dbus-fast would drop the *client's* connection on EAGAIN.
        bus = await connect_bus(stack.bus_address)
        calls = [bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER, member="GetJob",
                                  signature="s", body=[f"burst-{i}"])) for i in range(5000)]
        replies = await asyncio.gather(*calls)
        kinds: dict[str, int] = {}
        for reply in replies:
            kinds[reply.error_name or "ok"] = kinds.get(reply.error_name or "ok", 0) + 1
        (stats,) = (await bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER,
                                           member="GetQueueStats"))).body
        assert "queued" in stats
        bus.disconnect()
        return kinds

    kinds = run(scenario())
    assert sum(kinds.values()) == 5000
    assert kinds.get(ERR + "NoSuchJob", 0) > 0, kinds
    assert set(kinds) <= {ERR + "NoSuchJob", "org.freedesktop.DBus.Error.LimitsExceeded"}, kinds
    assert stack.daemon_pid == pid
    assert "queued" in busctl_manager(stack_env, "GetQueueStats").stdout


def test_daemon_survives_a_burst_of_large_replies(stack, stack_env):
    """Four connections pipeline 1,250 ListJobs each over 60 jobs (megabytes of replies at once): h2kd's
    socket fills up, and it must wait for it to drain rather than drop its bus connection."""
    pid = stack.daemon_pid
    tag = uuid.uuid4().hex[:6]

    async def scenario() -> dict[str, int]:
        client = await Client.connect(stack.bus_address)
        ids = [(await client.submit(spec(f"large-{tag}-{i}"), queue=False))[0] for i in range(60)]
        buses = [await connect_bus(stack.bus_address) for _ in range(4)]
        calls = [bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER, member="ListJobs",
                                  signature="a{sv}", body=[{}])) for bus in buses for _ in range(1250)]
        replies = await asyncio.gather(*calls)
        kinds: dict[str, int] = {}
        for reply in replies:
            kinds[reply.error_name or "ok"] = kinds.get(reply.error_name or "ok", 0) + 1
        for job_id in ids:
            await client.manager("CancelJob", "s", [job_id])
            await client.manager("RemoveJob", "s", [job_id])
        for bus in buses:
            bus.disconnect()
        client.close()
        return kinds

    kinds = run(scenario())
    assert kinds.get("ok", 0) > 0 and set(kinds) <= {"ok", "org.freedesktop.DBus.Error.LimitsExceeded"}, kinds
    assert stack.daemon_pid == pid
    assert "queued" in busctl_manager(stack_env, "GetQueueStats").stdout
