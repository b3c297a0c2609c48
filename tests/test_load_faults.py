"""Load and faults on a private stack of real programs; each case ends with nothing lost.

Bursts of submits from many client processes, hundreds of signal subscribers, kill -9 of h2kd during
conversions, worker units killed / stopped by an administrator / hitting their timeout, a full output
file system, systemd re-executing and polkitd restarting under load, the job store's disk full, and
random malformed specs thrown at SubmitJob.

The figures are those bench/ measures: 5,000 submits from 50 clients, 200 subscribers while 100 jobs
run, 20 kills of h2kd during a batch of conversions (smaller disks than bench/'s, slowed down so that
the batch outlasts the kills). The numbers used are printed; timings are never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from dbus_fast import Variant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import disks, faults
from bench.client import ERROR_PREFIX, CallFailed, Client, convert_spec, new_id
from bench.stack import rate_limited, restart_with
from h2kd.sandbox.stack import Stack, new_base_dir

SMALL_FS_BYTES = 16 * disks.MiB
RETRY_BACKOFF_SECONDS = "1"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@contextlib.contextmanager
def tmpfs(path: Path, size: int | str, name: str) -> Iterator[Path]:
    """A small file system of its own mounted at `path` (made here) while the block runs."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", name, str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@contextlib.contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def lstack() -> Iterator[Stack]:
    """A stack of our own: these tests kill and reconfigure h2kd and mount a small output file system."""
    base = new_base_dir("h2k-load-")
    try:
        with tmpfs(base / "smallfs", SMALL_FS_BYTES, "h2k-small") as small:
            stack = Stack(base)
            stack.daemon_env = {"H2KD_OUTPUT_ROOTS": f"{stack.output_dir}:{small}",
                                "H2KD_RETRY_BACKOFF_BASE_SECONDS": RETRY_BACKOFF_SECONDS}
            with running(stack):
                (base / "disks").mkdir()
                yield stack
    finally:
        if not os.environ.get("H2K_KEEP_STACK"):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def small_fs(lstack: Stack) -> Path:
    return lstack.base_dir / "smallfs"


@pytest.fixture(scope="module")
def work(lstack: Stack) -> Path:
    return lstack.base_dir / "disks"


@pytest.fixture(scope="module")
def small_source(work: Path) -> Path:
    return disks.sparse_vmdk(work, "small", 16 * disks.MiB, 0.25)


@pytest.fixture
def slow_conversions(lstack: Stack) -> Iterator[None]:
    """h2kd restarted so that conversions copy 1 MiB/s (they then last long enough to be hit)."""
    restart_with(lstack, rate_limited(disks.MiB))
    yield
    restart_with(lstack, {})


@pytest.fixture
def disk_and_output(lstack: Stack, work: Path) -> Iterator[Callable[..., tuple[Path, Path]]]:
    """make(name, size=64 MiB, data_fraction=0.25, seed=len(name)): a sparse VMDK with random data and where
    its output goes (removed after the test). The default holds 16 MiB of data: 16 s at 1 MiB/s."""
    outputs: list[Path] = []

    def make(name: str, size: int = 64 * disks.MiB, data_fraction: float = 0.25,
             seed: int | None = None) -> tuple[Path, Path]:
        outputs.append(lstack.output_dir / f"{name}.qcow2")
        return disks.sparse_vmdk(work, name, size, data_fraction, seed=len(name) if seed is None else seed), outputs[-1]

    yield make
    for output in outputs:
        output.unlink(missing_ok=True)


def systemctl(stack: Stack, *args: str) -> None:
    """`systemctl --user ARGS` on the stack's systemd manager; it must succeed."""
    subprocess.run(["systemctl", "--user", *args], env={**os.environ, "XDG_RUNTIME_DIR": str(stack.runtime_dir)},
                   check=True, capture_output=True, timeout=60)


def partial_files(output: Path) -> list[str]:
    """Temporary files of this output (".h2k-tmp-<random>-<name>") left in its directory."""
    return [p.name for p in output.parent.iterdir()
            if p.name.startswith(".h2k-tmp-") and p.name.endswith("-" + output.name)]


async def wait_state(client: Client, path: str, states: set[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        props = await client.job_props(path)
        if props["State"] in states:
            return props
        if time.monotonic() > deadline:
            raise AssertionError(f"job stayed {props['State']} (wanted {states}): {props['Error']}")
        await asyncio.sleep(0.2)


async def healthy(client: Client) -> None:
    health = await client.health()
    assert health["status"] == "ok", health
    assert health["store_ok"] and health["systemd_reachable"], health


async def ended(client: Client, path: str, timeout: float, state: str, *error_codes: str) -> dict[str, Any]:
    """The job's properties once it is over: it must have ended in `state` (with one of error_codes if any)."""
    end = await client.wait_terminal(path, timeout)
    assert end["State"] == state, (end["State"], end["Error"])
    if error_codes:
        assert end["Error"][0] in error_codes, end["Error"]
    return end


async def healthy_then_remove(client: Client, *job_ids: str) -> None:
    """After the fault h2kd is healthy; the test's jobs are then removed."""
    await healthy(client)
    for job_id in job_ids:
        await client.manager("RemoveJob", "s", [job_id])


# ---------------------------------------------------------------- bursts and subscribers

@pytest.mark.slow
def test_burst_of_submits_from_50_clients_gives_one_job_each(lstack: Stack, small_source: Path) -> None:
    figures = faults.submit_burst(lstack, small_source, clients=50, per_client=100)
    print("burst:", {k: v for k, v in figures.items() if k != "errors"})
    assert figures["errors"] == []
    assert figures["replies"] == figures["submits"] == 5000
    assert figures["distinct_replied"] == figures["new_jobs"] == figures["new_jobs_distinct"] == 5000
    assert figures["replied_equals_new"]
    assert figures["same_daemon"] and figures["health"] == "ok"
    assert figures["cleanup_problems"] == [] and figures["left_after_cleanup"] == 0


@pytest.mark.slow
def test_200_subscribers_each_see_every_job_end(lstack: Stack, small_source: Path) -> None:
    figures = faults.subscribers_while_jobs_run(lstack, small_source, subscribers=200, jobs=100, parallel=8,
                                                timeout=480)
    print("subscribers:", figures)
    assert figures["error"] is None
    assert figures["final_states"] == ["completed"]
    assert figures["all_connected"] and figures["same_daemon"] and figures["health"] == "ok"
    assert figures["completed_seen_min"] == figures["completed_seen_max"] == 100
    assert figures["left_behind"] is False   # its scratch directory is removed


# ---------------------------------------------------------------- kill -9 of h2kd

@pytest.mark.slow
def test_kill_9_of_h2kd_during_conversions_loses_nothing(lstack: Stack, work: Path) -> None:
    figures = faults.kill_during_conversions(lstack, work, kills=20, jobs=8, data_bytes=16 * disks.MiB,
                                             rate=1 * disks.MiB, seed=4)
    print("kill -9:", figures)
    assert figures["kills"] == 20, figures     # the batch outlasted every kill
    assert any(set(s) & {"running", "progressing", "assigned"} for s in figures["states_at_kills"])
    assert figures["problems"] == []
    assert figures["health"] == "ok"


# ---------------------------------------------------------------- worker units

async def _submit_and_wait_running(client: Client, source: Path, output: Path, retry_count: int = 0,
                                   timeout_seconds: int | None = None) -> tuple[str, str, dict[str, Any]]:
    job_id, path = await client.submit(convert_spec(str(source), str(output), new_id("fault"), fmt="vmdk",
                                                    retry_count=retry_count, timeout_seconds=timeout_seconds))
    props = await wait_state(client, path, {"progressing"}, 60)
    assert props["Unit"], props
    return job_id, path, props


def test_worker_unit_killed_fails_then_retry_completes(lstack: Stack, disk_and_output: Callable[..., Any],
                                                       slow_conversions: None) -> None:
    source, output = disk_and_output("killed")

    async def scenario() -> None:
        async with Client.connected(lstack.bus_address) as client:
            # No retries left: the attempt fails as a lost unit, nothing partial remains.
            job_id, path, props = await _submit_and_wait_running(client, source, output)
            systemctl(lstack, "kill", "--signal=KILL", props["Unit"])
            await ended(client, path, 60, "failed", "UNIT_FAILED", "WORKER_LOST")
            assert not output.exists()
            assert partial_files(output) == []
            await client.manager("RemoveJob", "s", [job_id])
            # With a retry: attempt 2 runs in a new unit and completes with a correct output.
            job_id, path, props = await _submit_and_wait_running(client, source, output, retry_count=1)
            first_unit = props["Unit"]
            systemctl(lstack, "kill", "--signal=KILL", first_unit)
            await wait_state(client, path, {"retrying", "queued", "assigned", "running", "progressing"}, 30)
            end = await ended(client, path, 200, "completed")
            assert end["Attempt"] == 2 and end["Unit"] != first_unit
            assert disks.identical(source, output)[0]
            assert partial_files(output) == []
            await healthy_then_remove(client, job_id)
    run(scenario())


def test_administrator_stopping_the_unit_cancels_the_job(lstack: Stack, disk_and_output: Callable[..., Any],
                                                         slow_conversions: None) -> None:
    source, output = disk_and_output("stopped")

    async def scenario() -> None:
        async with Client.connected(lstack.bus_address) as client:
            job_id, path, props = await _submit_and_wait_running(client, source, output, retry_count=2)
            # StopUnit straight on the systemd manager's bus, as `systemctl stop` does.
            subprocess.run(["busctl", f"--address={lstack.systemd_bus_address}", "call", "org.freedesktop.systemd1",
                            "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager", "StopUnit", "ss",
                            props["Unit"], "replace"], check=True, capture_output=True)
            end = await ended(client, path, 60, "cancelled")
            assert end["Attempt"] == 1          # a stop is not a failure: no retry
            assert not output.exists() and partial_files(output) == []
            await healthy_then_remove(client, job_id)
    run(scenario())


@pytest.mark.slow
def test_unit_hitting_its_timeout_fails_with_timeout(lstack: Stack, disk_and_output: Callable[..., Any],
                                                     slow_conversions: None) -> None:
    # 128 MiB of data at 1 MiB/s would take about two minutes; the job's timeout is 60 s (the minimum).
    source, output = disk_and_output("timeout", 256 * disks.MiB, 0.5, seed=3)

    async def scenario() -> None:
        async with Client.connected(lstack.bus_address) as client:
            job_id, path, _ = await _submit_and_wait_running(client, source, output, timeout_seconds=60)
            await ended(client, path, 120, "failed", "TIMEOUT")
            assert not output.exists() and partial_files(output) == []
            await healthy_then_remove(client, job_id)
    run(scenario())


# ---------------------------------------------------------------- full output file system

def test_output_too_big_for_its_file_system_is_no_space(lstack: Stack, work: Path, small_fs: Path) -> None:
    source = disks.sparse_vmdk(work, "toobig", 64 * disks.MiB, 0.5, seed=5)    # 32 MiB of data, 16 MiB fs

    async def scenario() -> None:
        async with Client.connected(lstack.bus_address) as client:
            job_id, path = await client.submit(convert_spec(str(source), str(small_fs / "toobig.qcow2"),
                                                            new_id("full"), fmt="vmdk", retry_count=1))
            await ended(client, path, 60, "failed", "NO_SPACE")
            assert list(small_fs.iterdir()) == []
            await healthy_then_remove(client, job_id)
    run(scenario())


def test_file_system_filling_up_during_the_conversion_is_no_space(lstack: Stack, work: Path, small_fs: Path,
                                                                  slow_conversions: None) -> None:
    source = disks.sparse_vmdk(work, "fits", 32 * disks.MiB, 0.25, seed=6)      # 8 MiB of data: fits at first
    output = small_fs / "fits.qcow2"
    filler = small_fs / "filler"

    async def scenario() -> None:
        async with Client.connected(lstack.bus_address) as client:
            job_id, path, _ = await _submit_and_wait_running(client, source, output)
            with open(filler, "wb") as f:     # someone else takes all the space while qemu-img writes
                try:
                    while True:
                        f.write(b"\xff" * disks.MiB)
                        f.flush()
                except OSError:
                    pass
            await ended(client, path, 60, "failed", "NO_SPACE")
            filler.unlink()
            assert list(small_fs.iterdir()) == []
            await healthy_then_remove(client, job_id)
    try:
        run(scenario())
    finally:
        filler.unlink(missing_ok=True)


# ---------------------------------------------------------------- systemd restarted under load

def test_systemd_reexec_under_load_loses_no_job(lstack: Stack, disk_and_output: Callable[..., Any]) -> None:
    disks_and_outputs = [disk_and_output(f"reexec{i}", seed=30 + i) for i in range(3)]
    restart_with(lstack, rate_limited(4 * disks.MiB))

    async def scenario() -> None:
        async with Client.connected(lstack.bus_address) as client:
            submitted = [await client.submit(convert_spec(str(s), str(o), new_id("reexec"), fmt="vmdk"))
                         for s, o in disks_and_outputs]
            await wait_state(client, submitted[0][1], {"progressing"}, 60)
            systemctl(lstack, "daemon-reexec")
            for (job_id, path), (source, output) in zip(submitted, disks_and_outputs):
                end = await ended(client, path, 120, "completed")
                assert end["Attempt"] == 1, job_id
                assert disks.identical(source, output)[0]
            await healthy_then_remove(client, *(job_id for job_id, _ in submitted))
    try:
        run(scenario())
    finally:
        restart_with(lstack, {})


# ---------------------------------------------------------------- polkit restarted, store disk full

SUBMITTER_SCRIPT = r"""
import asyncio, json, sys
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

async def main(address, count, path):
    bus = await MessageBus(bus_address=address).connect()
    outcomes = []
    for i in range(count):
        spec = {"operation": Variant("s", "inspect"), "image": Variant("a{sv}", {"path": Variant("s", path)})}
        reply = await bus.call(Message(destination="org.hyper2kvm.h2kd1", path="/org/hyper2kvm/h2kd1",
                                       interface="org.hyper2kvm.h2kd1.Manager", member="SubmitJob",
                                       signature="a{sv}a{sv}", body=[spec, {"queue": Variant("b", False)}]))
        if reply.message_type == MessageType.ERROR:
            outcomes.append(["error", reply.error_name, reply.body[0] if reply.body else ""])
        else:
            outcomes.append(["ok", reply.body[0]])
        await asyncio.sleep(0.01)
    print(json.dumps(outcomes))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


@pytest.fixture
def group_member(work: Path) -> Iterator[str]:
    """A real user in group h2k, whom the example polkit rules let submit without a password."""
    from runas import user_in_group

    with user_in_group("h2kt-load") as name:
        yield name


@pytest.mark.slow
def test_polkit_restarted_under_load_denies_clearly_then_serves_again(lstack: Stack, work: Path,
                                                                      group_member: str) -> None:
    """A member submits in a loop while polkitd restarts twice: every call gets a job or a clear AccessDenied
    (never a hang or another error), every acknowledged job exists once, and submits work again afterwards."""
    from runas import as_user

    script = work / "submitter.py"
    script.write_text(SUBMITTER_SCRIPT)
    script.chmod(0o644)
    work.chmod(0o755)
    readable = work / "public.img"
    readable.write_bytes(os.urandom(65536))
    readable.chmod(0o644)
    env = {**os.environ, **lstack.env()}
    submitter = subprocess.Popen(as_user(group_member, [sys.executable, str(script), lstack.bus_address, "150",
                                                        str(readable)]),
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2):
            time.sleep(0.5)
            lstack.restart_polkitd()
        out, err = submitter.communicate(timeout=240)
    finally:
        if submitter.poll() is None:
            submitter.kill()
            submitter.wait()
    assert submitter.returncode == 0, err
    outcomes = json.loads(out)
    assert len(outcomes) == 150
    errors = [o for o in outcomes if o[0] == "error"]
    assert all(o[1] == "org.freedesktop.DBus.Error.AccessDenied" for o in errors), errors
    acknowledged = [o[1] for o in outcomes if o[0] == "ok"]
    assert outcomes[-1][0] == "ok", "submits did not work again after polkitd came back"

    async def check() -> None:
        async with Client.connected(lstack.bus_address) as client:
            uid = int(subprocess.run(["id", "-u", group_member], capture_output=True, text=True).stdout)
            assert sorted(j[0] for j in await client.list_jobs(owner=uid)) == sorted(acknowledged), \
                "acknowledged and stored jobs differ"
            await healthy(client)
            for job_id in acknowledged:
                await client.manager("CancelJob", "s", [job_id])
                await client.manager("RemoveJob", "s", [job_id])
    run(check())


@pytest.mark.slow
def test_store_disk_full_refuses_submits_clearly_and_recovers(work: Path) -> None:
    """h2kd's state directory on a tiny file system that fills up: SubmitJob answers with a clear error and
    stores nothing half-way; h2kd keeps serving, and once there is room again submits are stored."""
    base = new_base_dir("h2k-storefull-")
    try:
        with tmpfs(base / "state", "2m", "h2k-store") as state, running(Stack(base, state_dir=state)) as stack:
            filler = state / "filler"
            acknowledged: list[str] = []

            async def scenario() -> None:
                async with Client.connected(stack.bus_address) as client:
                    spec = {"operation": "inspect", "image": {"path": "/etc/hostname"}}
                    before, _ = await client.submit(spec, queue=False)
                    acknowledged.append(before)
                    with open(filler, "wb") as f:   # take the rest of the space
                        try:
                            while True:
                                f.write(b"\0" * 65536)
                        except OSError:
                            pass
                    refused = 0
                    for _ in range(20):
                        try:
                            job_id, _ = await client.submit({**spec, "audit": {"ticket": "x" * 200}}, queue=False)
                            acknowledged.append(job_id)
                        except CallFailed as e:
                            refused += 1
                            assert e.name == ERROR_PREFIX + "StoreFailed", (e.name, e.text)
                            assert "cannot be written" in e.text and "Traceback" not in e.text, e.text
                    assert refused > 0, "a full store accepted every submit"
                    listed_full = await client.job_ids()
                    filler.unlink()
                    after, _ = await client.submit(spec, queue=False)
                    acknowledged.append(after)
                    listed = await client.job_ids()
                    assert before in listed and after in listed
                    assert set(listed_full) <= set(listed)
                    assert (await client.health())["store_ok"]
            run(scenario())
            # Everything acknowledged is really stored: a restart reads it back.
            stack.restart_daemon()

            async def reread() -> None:
                async with Client.connected(stack.bus_address) as client:
                    # Exactly what was acknowledged: nothing lost, and no refused submit half-stored.
                    assert sorted(await client.job_ids()) == sorted(acknowledged)
            run(reread())
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _fill(path: Path) -> None:
    """Write `path` until its file system has no room left."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_no_room_for_an_attempts_files_waits_and_does_not_use_up_retries(work: Path, small_source: Path) -> None:
    """h2kd's runs directory is full when a job (without retries) is to start: its attempt cannot write its spec
    file. The job waits a backoff, not failed, and once there is room it runs and completes."""
    base = new_base_dir("h2k-runsfull-")
    try:
        state = base / "state"
        state.mkdir(mode=0o700)
        with tmpfs(state / "runs", "1m", "h2k-runs") as runs:
            stack = Stack(base, state_dir=state)
            stack.daemon_env = {"H2KD_RETRY_BACKOFF_BASE_SECONDS": RETRY_BACKOFF_SECONDS}
            with running(stack):
                filler = runs / "filler"
                _fill(filler)

                async def scenario() -> None:
                    async with Client.connected(stack.bus_address) as client:
                        job_id, path = await client.submit({"operation": "inspect",
                                                            "image": {"path": str(small_source)}})
                        waiting = await wait_state(client, path, {"retrying"}, 60)
                        assert "No space left" in waiting["Error"][1], waiting["Error"]
                        filler.unlink()
                        end = await ended(client, path, 120, "completed")
                        assert end["Attempt"] >= 2
                        await healthy_then_remove(client, job_id)
                run(scenario())
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- random and malformed specs

_KEYS = ["job_id", "operation", "image", "parameters", "execution_policy", "capability_requirements",
         "artifacts", "audit", "path", "format", "checksum", "priority", "retry_count", "timeout_seconds",
         "idempotent", "output_path", "overwrite", "tags", "output_format", "cluster_size", "compress", "x", ""]

# D-Bus strings cannot hold NUL (clients refuse to send them), so the strings thrown are everything else.
# A D-Bus string is UTF-8 without NUL: lone surrogates cannot even be sent (the client's marshaller refuses them).
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)

_scalars = st.one_of(
    st.builds(lambda v: Variant("s", v), _text),
    st.builds(lambda v: Variant("s", v), st.sampled_from(["inspect", "convert", "validate", "/etc/hostname",
                                                          "qcow2", "raw", "vmdk", "../../etc/passwd"])),
    st.builds(lambda v: Variant("u", v), st.integers(0, 2**32 - 1)),
    st.builds(lambda v: Variant("i", v), st.integers(-2**31, 2**31 - 1)),
    st.builds(lambda v: Variant("t", v), st.integers(0, 2**64 - 1)),
    st.builds(lambda v: Variant("x", v), st.integers(-2**63, 2**63 - 1)),
    st.builds(lambda v: Variant("y", v), st.integers(0, 255)),
    st.builds(lambda v: Variant("n", v), st.integers(-2**15, 2**15 - 1)),
    st.builds(lambda v: Variant("b", v), st.booleans()),
    st.builds(lambda v: Variant("d", v), st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(lambda v: Variant("o", v), st.sampled_from(["/", "/a/b", "/org/hyper2kvm/h2kd1"])),
    st.builds(lambda v: Variant("g", v), st.sampled_from(["", "s", "a{sv}"])),
    st.builds(lambda v: Variant("ay", v), st.binary(max_size=16)),
    st.builds(lambda v: Variant("as", v), st.lists(_text, max_size=4)),
    st.builds(lambda v: Variant("ai", v), st.lists(st.integers(-2**31, 2**31 - 1), max_size=4)),
    st.builds(lambda v: Variant("(si)", list(v)), st.tuples(_text, st.integers(-5, 5))),
    st.builds(lambda v: Variant("a{ss}", v), st.dictionaries(_text, _text, max_size=3)),
)

_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.builds(lambda d: Variant("a{sv}", d), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5)),
        st.builds(lambda v: Variant("v", v), inner),
        st.builds(lambda v: Variant("av", v), st.lists(inner, max_size=3)),
    ),
    max_leaves=12,
)


def _valid_ish(source: str) -> st.SearchStrategy[dict[str, Variant]]:
    """Mostly right specs with one part randomised, so that validation goes deep, not only the top level."""
    base = {"operation": Variant("s", "inspect"), "image": Variant("a{sv}", {"path": Variant("s", source)})}
    return st.builds(lambda key, value, drop: {**{k: v for k, v in base.items() if k != drop}, key: value},
                     st.sampled_from(_KEYS), _values, st.sampled_from(["", "operation", "image"]))


@pytest.mark.slow
def test_random_and_malformed_specs_never_crash_nor_half_create(lstack: Stack, small_source: Path) -> None:
    outcomes: dict[str, int] = {}

    async def connect() -> Client:
        return await Client.connect(lstack.bus_address)

    loop = asyncio.new_event_loop()
    client = loop.run_until_complete(connect())
    pid = lstack.daemon_pid
    created: list[str] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(spec=st.one_of(st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6), _valid_ish(str(small_source))))
    def throw(spec: dict[str, Variant]) -> None:
        async def one() -> None:
            before = len(await client.list_jobs())
            try:
                # Held (queue=false) so that nothing runs; the Variants are sent as they are.
                job_id, _path = await client.submit(spec, queue=False)
            except CallFailed as exc:
                outcomes[exc.name] = outcomes.get(exc.name, 0) + 1
                assert exc.name == ERROR_PREFIX + "InvalidSpec", (exc.name, exc.text, spec)
                assert "Traceback" not in exc.text and 'File "' not in exc.text, exc.text
                assert exc.text.strip()
                assert len(await client.list_jobs()) == before, "a refused spec left a job behind"
                return
            outcomes["accepted"] = outcomes.get("accepted", 0) + 1
            created.append(job_id)
            assert len(await client.list_jobs()) in (before, before + 1)   # +0: identical resubmission
            try:
                await client.manager("CancelJob", "s", [job_id])
            except CallFailed as exc:   # a job that failed its host checks is already over
                assert exc.name == ERROR_PREFIX + "InvalidState", exc
            await client.manager("RemoveJob", "s", [job_id])
        loop.run_until_complete(one())

    try:
        throw()
        print("outcomes:", outcomes)
        assert lstack.daemon_pid == pid, "h2kd died"
        loop.run_until_complete(healthy(client))
        assert outcomes.get(ERROR_PREFIX + "InvalidSpec", 0) > 0   # the generator did reach validation
    finally:
        client.close()
        loop.close()
