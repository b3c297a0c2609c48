"""GetManagedObjects and ListJobs on /org/hyper2kvm/h2kd1: what every object says of itself, as dbus-fast,
busctl and gdbus read it.

The daemon sends these replies from parts marshalled in advance (h2kd.bus.premarshal); these tests check
that what arrives is what each object's Properties.GetAll says at that moment, also while a change has
not been announced yet and after a job has gone, and that the bytes are those dbus-fast itself would send.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from hypothesis import given, settings
from hypothesis import strategies as st

from h2kd import BUS_NAME, MANAGER_PATH
from h2kd.bus.manager_iface import LIST_ROW_SIGNATURE
from h2kd.bus.premarshal import REPLY_SIGNATURE, ReplyTooLarge, array_reply, object_entry, struct_bytes

from busclient import JOB, OBJECT_MANAGER, PROPERTIES, WORKER, Client, new_id, run, spec, wait_for


async def _managed_objects(client: Client) -> Message:
    reply = await client.bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=OBJECT_MANAGER,
                                          member="GetManagedObjects"))
    assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    assert reply.signature == REPLY_SIGNATURE
    return reply


async def _get_all(client: Client, path: str, interface: str) -> dict[str, Variant]:
    (values,) = await client.call(path, PROPERTIES, "GetAll", "s", [interface])
    return values


async def _list_rows(client: Client) -> dict[str, list[Any]]:
    """ListJobs' rows by job path."""
    (rows,) = await client.manager("ListJobs", "a{sv}", [{}])
    return {row[7]: list(row) for row in rows}


def _row_from_properties(path: str, props: dict[str, Variant]) -> list[Any]:
    """The ListJobs row a job's properties call for."""
    progress = props["Progress"].value if props["ProgressKnown"].value else -1.0
    return [props["Id"].value, props["Operation"].value, props["State"].value, progress, props["Owner"].value,
            props["Priority"].value, props["CreatedAt"].value, path]


async def _watcher_and_worker(address: str, rule: str, worker_name: str) -> tuple[Client, list[Message], Client,
                                                                                   str, str]:
    """A client that records every message it receives (replies too, and the signals of match `rule`), in
    order; and a worker of its own, registered for inspect jobs that require its lab label.
    (watcher, its messages, worker, the worker's path, the label)"""
    watcher = await Client.connect(address)
    arrivals: list[Message] = []

    def arrived(msg: Message) -> bool:
        arrivals.append(msg)
        return False                  # not handled: dbus-fast goes on as usual
    watcher.bus.add_message_handler(arrived)
    await watcher.bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                   interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule]))
    worker = await Client.connect(address)
    label = uuid.uuid4().hex[:8]
    _worker_id, worker_path = await worker.manager("RegisterWorker", "ssa{sv}", [
        worker_name, json.dumps({"operations": ["inspect"], "testlab": label}), {"max_jobs": Variant("u", 1)}])
    return watcher, arrivals, worker, worker_path, label


async def _claim(worker: Client, worker_path: str) -> Any:
    found, job_id, _spec = await worker.call(worker_path, WORKER, "ClaimJob")
    return job_id if found else None


async def _report(worker: Client, worker_path: str, job_id: str, progress: float) -> None:
    await worker.call(worker_path, WORKER, "ReportProgress", "sa{sv}", [job_id, {
        "progress": Variant("d", progress), "bytes_done": Variant("t", int(progress * 4096)),
        "bytes_total": Variant("t", 4096), "phase": Variant("s", "converting")}])


def test_listing_is_what_each_object_says_after_changes_announced_or_not_and_removals(stack):
    """GetManagedObjects and ListJobs, both sent from marshalled parts, against each job's GetAll."""
    async def scenario() -> None:
        watcher, arrivals, worker, worker_path, label = await _watcher_and_worker(
            stack.bus_address, f"type='signal',sender='{BUS_NAME}',member='PropertiesChanged'", "listing-worker")

        held_id, held = await watcher.submit(spec(new_id("held"), priority=3), queue=False)
        running_id, running = await watcher.submit(spec(new_id("run"), requirements={"testlab": label}))
        cancelled_id, cancelled = await watcher.submit(spec(new_id("cancel"), requirements={"testlab": label}))
        removed_id, removed = await watcher.submit(spec(new_id("gone"), requirements={"testlab": label}))
        assert await wait_for(lambda: _claim(worker, worker_path), 20, "the claim") == running_id

        async def check_listing(objects: dict, paths: list[str]) -> None:
            """GetManagedObjects (given) and ListJobs (called now) say what each job's GetAll says."""
            rows = await _list_rows(watcher)
            for path in paths:
                assert set(objects[path]) == {JOB}, path
                props = await _get_all(watcher, path, JOB)
                assert objects[path][JOB] == props, path
                assert rows[path] == _row_from_properties(path, props), path
            assert set(objects[worker_path]) == {WORKER}
            assert objects[worker_path][WORKER] == await _get_all(watcher, worker_path, WORKER)

        # A progress report right after another is held back for coalescing: listed before it is announced.
        unannounced_seen = False
        for attempt in range(1, 4):
            first, second = attempt / 8, attempt / 8 + 1 / 16
            await _report(worker, worker_path, running_id, first)
            await _report(worker, worker_path, running_id, second)
            reply = await _managed_objects(watcher)
            (objects,) = reply.body
            assert objects[running][JOB]["Progress"] == Variant("d", second)
            await check_listing(objects, [held, running, cancelled, removed])

            def announcement() -> int | None:
                return next((i for i, m in enumerate(arrivals)
                             if m.member == "PropertiesChanged" and m.path == running
                             and m.body[1].get("Progress") == Variant("d", second)), None)
            await wait_for(lambda: _async(announcement() is not None), 10, "the coalesced PropertiesChanged")
            if arrivals.index(reply) < announcement():
                unannounced_seen = True
                break
        assert unannounced_seen, "every listing came after the change was announced; the case was not tested"
        # Once announced, the listing comes from what was announced; still the same values.
        (objects,) = (await _managed_objects(watcher)).body
        assert objects[running][JOB]["Progress"] == Variant("d", second)
        await check_listing(objects, [held, running, cancelled, removed])

        # Changed, then listed at once.
        await watcher.manager("CancelJob", "s", [cancelled_id])
        await watcher.manager("SetJobPriority", "su", [held_id, 9])
        (objects,) = (await _managed_objects(watcher)).body
        assert objects[cancelled][JOB]["State"] == Variant("s", "cancelled")
        assert objects[cancelled][JOB]["Cancelable"] == Variant("b", False)
        assert objects[held][JOB]["Priority"] == Variant("u", 9)
        await check_listing(objects, [held, running, cancelled, removed])

        # Removed: gone from the listing, the others unchanged.
        await watcher.manager("CancelJob", "s", [removed_id])
        await watcher.manager("RemoveJob", "s", [removed_id])
        (objects,) = (await _managed_objects(watcher)).body
        assert removed not in objects and removed not in await _list_rows(watcher)
        await check_listing(objects, [held, running, cancelled])

        await worker.call(worker_path, WORKER, "ReportResult", "sa{sv}", [running_id, {
            "success": Variant("b", True), "outputs": Variant("s", "{}")}])
        await worker.call(worker_path, WORKER, "Unregister")
        (objects,) = (await _managed_objects(watcher)).body
        assert worker_path not in objects
        assert objects[running][JOB]["State"] == Variant("s", "completed")
        await watcher.manager("CancelJob", "s", [held_id])
        for job_id in (held_id, running_id, cancelled_id):
            await watcher.manager("RemoveJob", "s", [job_id])
        watcher.close()
        worker.close()
    run(scenario())


def test_spec_and_result_are_read_with_get_only(stack, stack_env):
    """Spec and Result (large JSON) are left out of GetAll, GetManagedObjects and InterfacesAdded, as sd-bus
    does with properties it marks explicit; Get reads them, and PropertiesChanged names a new Result without
    its value (it is not for every user: see test_auth)."""
    async def scenario() -> None:
        watcher, arrivals, worker, worker_path, label = await _watcher_and_worker(
            stack.bus_address, f"type='signal',sender='{BUS_NAME}'", "explicit-worker")
        job_id, path = await watcher.submit(spec(new_id("explicit"), priority=7, requirements={"testlab": label}))
        assert await wait_for(lambda: _claim(worker, worker_path), 20, "the claim") == job_id

        async def get(name: str) -> Any:
            (value,) = await watcher.call(path, PROPERTIES, "Get", "ss", [JOB, name])
            return value.value

        async def listed() -> dict[str, Variant]:
            (objects,) = (await _managed_objects(watcher)).body
            return objects[path][JOB]

        added = next(m for m in arrivals if m.member == "InterfacesAdded" and m.body[0] == path)
        for props in (added.body[1][JOB], await _get_all(watcher, path, JOB), await listed()):
            assert {"Spec", "Result"}.isdisjoint(props) and {"Id", "State", "Source", "Error"} <= set(props)
        submitted = json.loads(await get("Spec"))
        assert submitted["job_id"] == job_id and submitted["execution_policy"]["priority"] == 7
        assert submitted["capability_requirements"] == {"testlab": label}
        assert await get("Result") == "{}"

        def state_told() -> Message | None:
            return next((m for m in arrivals if m.member == "PropertiesChanged" and m.path == path
                         and "State" in m.body[1]), None)
        await wait_for(lambda: _async(state_told()), 10, "the claim's PropertiesChanged")
        # A change of state that leaves the Result as it was does not name it (clients would read it again).
        assert not any("Result" in m.body[2] for m in arrivals if m.member == "PropertiesChanged"), arrivals

        outputs = {"disks": [{"path": "/nowhere/disk.qcow2"}]}
        await worker.call(worker_path, WORKER, "ReportResult", "sa{sv}", [job_id, {
            "success": Variant("b", True), "outputs": Variant("s", json.dumps(outputs))}])
        result = json.loads(await get("Result"))
        assert result["outputs"] == outputs

        def announced() -> Message | None:
            return next((m for m in arrivals if m.member == "PropertiesChanged" and m.path == path
                         and "Result" in m.body[2]), None)
        change = await wait_for(lambda: _async(announced()), 10, "the Result's PropertiesChanged")
        assert "Result" not in change.body[1]
        assert not any("Result" in m.body[1] for m in arrivals if m.member == "PropertiesChanged")
        # Announced, the job's listing is made from what was announced: still without the Result.
        props = await listed()
        assert props["State"] == Variant("s", "completed") and "Result" not in props
        assert "Result" not in await _get_all(watcher, path, JOB)
        # busctl reads them by name too.
        out = await asyncio.to_thread(subprocess.run, [
            "busctl", "--system", "--json=short", "get-property", BUS_NAME, path, JOB, "Result"],
            env=stack_env, capture_output=True, text=True, timeout=60, check=True)
        assert json.loads(json.loads(out.stdout)["data"]) == result

        await worker.call(worker_path, WORKER, "Unregister")
        await watcher.manager("RemoveJob", "s", [job_id])
        watcher.close()
        worker.close()
    run(scenario())


def test_busctl_and_gdbus_read_the_listing(stack, stack_env):
    async def prepare() -> tuple[Client, list[tuple[str, str]]]:
        client = await Client.connect(stack.bus_address)
        jobs = [await client.submit(spec(new_id("c-client"), priority=p), queue=False) for p in (2, 7)]
        await client.manager("CancelJob", "s", [jobs[1][0]])
        return client, jobs

    async def properties(client: Client, paths: list[str]) -> dict[str, dict[str, Variant]]:
        return {path: await _get_all(client, path, JOB) for path in paths}

    async def clean_up(client: Client, jobs: list[tuple[str, str]]) -> None:
        await client.manager("CancelJob", "s", [jobs[0][0]])
        for job_id, _path in jobs:
            await client.manager("RemoveJob", "s", [job_id])
        client.close()

    async def scenario() -> None:
        client, jobs = await prepare()
        paths = [path for _id, path in jobs]
        expected = await properties(client, paths)

        # busctl (sd-bus): each value with its type.
        out = await asyncio.to_thread(subprocess.run, [
            "busctl", "--system", "--json=short", "call", BUS_NAME, MANAGER_PATH, OBJECT_MANAGER,
            "GetManagedObjects"], env=stack_env, capture_output=True, text=True, timeout=60, check=True)
        decoded = json.loads(out.stdout)
        assert decoded["type"] == REPLY_SIGNATURE
        (objects,) = decoded["data"]
        for path in paths:
            listed = objects[path][JOB]
            assert set(listed) == set(expected[path])
            for name, value in expected[path].items():
                as_json = json.loads(json.dumps(value.value))   # structs are JSON arrays
                assert listed[name] == {"type": value.signature, "data": as_json}, (path, name)
        assert any(p.startswith(MANAGER_PATH + "/worker/") for p in objects)

        # gdbus (GDBus validates every message it receives before showing it).
        out = await asyncio.to_thread(subprocess.run, [
            "gdbus", "call", "--system", "-d", BUS_NAME, "-o", MANAGER_PATH, "-m",
            OBJECT_MANAGER + ".GetManagedObjects"], env=stack_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("({objectpath '/org/hyper2kvm/h2kd1/")
        for (job_id, path), priority, state in zip(jobs, (2, 7), ("validated", "cancelled")):
            # Each object path once as a key (GVariant text types only the first).
            assert out.stdout.count(f"'{path}': {{") == 1
            entry = out.stdout.split(f"'{path}': {{", 1)[1].split(f"'{MANAGER_PATH}/", 1)[0]
            assert f"'Id': <'{job_id}'>" in entry and f"'Priority': <uint32 {priority}>" in entry
            assert f"'State': <'{state}'>" in entry
        # Only the manager is an ObjectManager: asked anywhere else, h2kd says so at once (walking every job
        # there held the daemon for a second or more, for any caller).
        for path in (MANAGER_PATH + "/job", jobs[0][1], "/org/hyper2kvm"):
            out = await asyncio.to_thread(subprocess.run, [
                "busctl", "--system", "call", BUS_NAME, path, OBJECT_MANAGER, "GetManagedObjects"],
                env=stack_env, capture_output=True, text=True, timeout=60)
            assert out.returncode != 0 and "no object manager at" in out.stderr, (path, out.stdout, out.stderr)
        # Nor with arguments, anywhere.
        for path in (MANAGER_PATH, "/"):
            out = await asyncio.to_thread(subprocess.run, [
                "busctl", "--system", "call", BUS_NAME, path, OBJECT_MANAGER, "GetManagedObjects", "s", "x"],
                env=stack_env, capture_output=True, text=True, timeout=60)
            assert out.returncode != 0 and "GetManagedObjects takes no arguments (given 's')" in out.stderr, (
                path, out.stdout, out.stderr)
        await clean_up(client, jobs)
    run(scenario())


# ---------------------------------------------------------------- the bytes, against dbus-fast's own marshalling

_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FF), min_size=1, max_size=6)
_values = st.one_of(
    st.builds(lambda v: Variant("s", v),
              st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=9)),
    st.builds(lambda v: Variant("d", v), st.floats(allow_nan=False)),
    st.builds(lambda v: Variant("t", v), st.integers(0, 2**64 - 1)),
    st.builds(lambda v: Variant("u", v), st.integers(0, 2**32 - 1)),
    st.builds(lambda v: Variant("b", v), st.booleans()),
    st.builds(lambda v: Variant("y", v), st.integers(0, 255)),
    st.builds(lambda a, b: Variant("(ss)", [a, b]), st.text("ab\u00e9", max_size=5), st.text("xy", max_size=3)),
)
_paths = st.builds(lambda parts: "/" + "/".join(parts),
                   st.lists(st.text("abcxyz_019", min_size=1, max_size=7), min_size=1, max_size=3))
_objects = st.dictionaries(_paths, st.dictionaries(_names, st.dictionaries(_names, _values, max_size=5),
                                                   max_size=2), max_size=6)


def _joined_and_marshalled(call: Message, serial: int, signature: str, value: list[Any],
                           elements: list[bytes]) -> tuple[bytes, bytes]:
    """The reply to `call` as array_reply joins `elements`, and as dbus-fast marshals `value` itself."""
    expected = Message.new_method_return(call, signature, [value])
    expected.serial = serial
    reply = Message.new_method_return(call, signature, [])
    reply.serial = serial
    return bytes(array_reply(reply, elements)), bytes(expected._marshall(False))


@settings(max_examples=300, deadline=None)
@given(objects=_objects, serial=st.integers(1, 2**32 - 1), reply_to=st.integers(1, 2**32 - 1),
       sender=st.sampled_from([":1.5", ":1.123456", "org.example.Caller"]))
def test_joined_entries_are_the_bytes_dbus_fast_marshals(objects, serial, reply_to, sender):
    call = Message(destination=BUS_NAME, path=MANAGER_PATH, interface=OBJECT_MANAGER, member="GetManagedObjects",
                   serial=reply_to)
    call.sender = sender
    joined, marshalled = _joined_and_marshalled(
        call, serial, REPLY_SIGNATURE, objects,
        [object_entry(path, interfaces) for path, interfaces in objects.items()])
    assert joined == marshalled


_rows = st.lists(st.tuples(
    st.text(max_size=12).filter(lambda t: "\0" not in t), st.sampled_from(["inspect", "convert"]),
    st.sampled_from(["queued", "progressing"]), st.floats(allow_nan=False), st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), _paths), max_size=8)


@settings(max_examples=300, deadline=None)
@given(rows=_rows, serial=st.integers(1, 2**32 - 1), reply_to=st.integers(1, 2**32 - 1))
def test_joined_list_rows_are_the_bytes_dbus_fast_marshals(rows, serial, reply_to):
    call = Message(destination=BUS_NAME, path=MANAGER_PATH, interface=BUS_NAME + ".Manager", member="ListJobs",
                   signature="a{sv}", body=[{}], serial=reply_to)
    call.sender = ":1.42"
    joined, marshalled = _joined_and_marshalled(
        call, serial, "a" + LIST_ROW_SIGNATURE, [list(r) for r in rows],
        [struct_bytes(LIST_ROW_SIGNATURE, list(r)) for r in rows])
    assert joined == marshalled


def test_array_reply_refuses_other_shapes_and_oversized_arrays():
    call = Message(destination=BUS_NAME, path=MANAGER_PATH, interface=OBJECT_MANAGER, member="GetManagedObjects",
                   serial=7)
    for signature in ("as", "a(s)a(s)", "(s)"):
        reply = Message.new_method_return(call, signature, [])
        reply.serial = 8
        with pytest.raises(RuntimeError):
            array_reply(reply, [])
    reply = Message.new_method_return(call, REPLY_SIGNATURE, [])
    reply.serial = 8
    half = bytes(33 * 1024 * 1024)   # two of them exceed the specification's 64 MiB for one array
    with pytest.raises(ReplyTooLarge):
        array_reply(reply, [half, half])


async def _async(value: Any) -> Any:
    return value
