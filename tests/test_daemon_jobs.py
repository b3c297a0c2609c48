"""Jobs end to end through h2kd, its D-Bus API and real transient units: what a user of the API sees.

test_operations.py and test_runner.py prove the worker and the runner on their own; here every piece runs
together in the private stack. Every image format is converted through the daemon and checked with
`qemu-img compare`; every bad input of the operations issue ends in a clear error with nothing left behind;
failing workers, retries with backoff, cancel, `systemctl stop`, external workers and lost heartbeats are
driven over the bus; and the metrics and journal entries those jobs leave are read back.

The tests that need a slow conversion, a short heartbeat timeout, short backoffs or a full file system share
one restart of h2kd with those settings (fixture `tuned`), and run last.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from prometheus_client.parser import text_string_to_metric_families

from busclient import ERR, JOB, MANAGER, PROPERTIES, WORKER, Client, run, wait_for
import images
from images import MiB
from procfs import cpu_list
from h2kd import BUS_NAME, MANAGER_PATH
from h2kd.observability.journal import MESSAGE_IDS
from h2kd.runner.unit import unit_object_path

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")

FINAL = ("completed", "failed", "cancelled")
TEMP_PREFIX = ".h2k-tmp-"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
# The tuned daemon's worker units copy at 8 MB/s: the slow source's 32 MiB of data take about 4 s.
RATE_LIMIT = 8_000_000
HEARTBEAT_TIMEOUT = 2
BACKOFF_BASE = 0.5
SMALL_FS_BYTES = 4 * MiB


# ---------------------------------------------------------------- helpers

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def variant(value: Any) -> Variant:
    """A spec value as D-Bus wants it: nested objects a{sv}, numbers u (every number in our specs is unsigned)."""
    if isinstance(value, Variant):
        return value
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("u", value)
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, dict):
        return Variant("a{sv}", {k: variant(v) for k, v in value.items()})
    if isinstance(value, list):
        return Variant("as", [str(v) for v in value])
    raise TypeError(f"no D-Bus type for {value!r}")


def job_spec(job_id: str, source: Path | str, output: Path | None = None, fmt: str | None = None,
             retry_count: int | None = None, requirements: dict[str, Any] | None = None,
             parameters: dict[str, Any] | None = None, priority: int | None = None) -> dict[str, Variant]:
    image: dict[str, Any] = {"path": str(source)}
    if fmt:
        image["format"] = fmt
    spec: dict[str, Any] = {"job_id": job_id, "operation": "convert", "image": image}
    if output is not None:
        spec["artifacts"] = {"output_path": str(output)}
    policy: dict[str, Any] = {}
    if retry_count is not None:
        policy["retry_count"] = retry_count
    if priority is not None:
        policy["priority"] = priority
    if policy:
        spec["execution_policy"] = policy
    if requirements:
        spec["capability_requirements"] = requirements
    if parameters:
        spec["parameters"] = parameters
    return {k: variant(v) for k, v in spec.items()}


async def wait_props(client: Client, path: str, states: tuple[str, ...] = FINAL, timeout: float = 90,
                     progress_above: float | None = None) -> dict[str, Any]:
    """The job's properties once it is in one of `states` (and past `progress_above`, if given)."""
    async def reached() -> dict[str, Any] | None:
        props = await client.job_props(path)
        if props["State"] in states and (progress_above is None or props["Progress"] > progress_above):
            return props
        if props["State"] in FINAL and props["State"] not in states:
            raise AssertionError(f"job ended {props['State']} while waiting for {states}: {props['Error']}")
        return None
    return await wait_for(reached, timeout, f"{path} to reach {states}")


async def events(client: Client, path: str) -> list[tuple[int, str, dict[str, Any]]]:
    """The job's event log as (time usec, kind, data)."""
    (raw,) = await client.call(path, JOB, "GetEvents", "t", [0])
    return [(when, kind, json.loads(data)) for _, when, kind, data in raw]


def state_events(log: list[tuple[int, str, dict[str, Any]]]) -> list[tuple[int, str, str]]:
    return [(when, data["new_state"], data.get("reason", "")) for when, kind, data in log if kind == "state"]


async def health(client: Client) -> dict[str, Any]:
    (values,) = await client.manager("GetHealth")
    return {k: v.value for k, v in values.items()}


def compare(reference: Path, ref_format: str, output: Path, out_format: str) -> None:
    """A source and its converted copy: the same disk to a guest (size and content)."""
    difference = images.disk_difference(reference, output, ref_format, out_format)
    assert not difference, difference


def leftovers(directory: Path, job_id: str) -> list[str]:
    """Anything a job may have left in an output directory: its outputs or any temporary file."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX) or job_id in p.name)


def systemctl(stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"XDG_RUNTIME_DIR": str(stack.runtime_dir), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(["systemctl", "--user", *args], env=env, capture_output=True, text=True, timeout=60)


def unit_load_state(stack: Any, unit: str) -> str:
    return systemctl(stack, "show", "-P", "LoadState", unit).stdout.strip()


def scrape(url: str) -> tuple[bytes, dict[tuple[str, frozenset], float]]:
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read()
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return body, samples


def metric(samples: dict, name: str, **labels: str) -> float:
    """One sample's value; a labelled series that does not exist yet counts as 0."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def read_journal(*matches: str, until: Any, timeout: float = 15.0) -> list[dict[str, Any]]:
    """`journalctl -o json` entries matching every FIELD=value, once until(entries) holds (or the time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["journalctl", "--no-pager", "-o", "json", *matches],
                             capture_output=True, text=True, timeout=30)
        entries = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        if until(entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.2)


def message_text(entry: dict[str, Any]) -> str:
    text = entry.get("MESSAGE", "")
    return bytes(text).decode(errors="replace") if isinstance(text, list) else str(text)


class Heartbeats:
    """Keeps an external worker alive: a Heartbeat call every `interval` seconds until stopped."""

    def __init__(self, client: Client, worker_path: str, interval: float = 0.4):
        self._task = asyncio.create_task(self._beat(client, worker_path, interval))

    @staticmethod
    async def _beat(client: Client, worker_path: str, interval: float) -> None:
        while True:
            await client.call(worker_path, WORKER, "Heartbeat")
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def register_worker(client: Client, name: str, capabilities: dict[str, Any]) -> tuple[str, str]:
    worker_id, worker_path = await client.manager("RegisterWorker", "ssa{sv}",
                                                  [name, json.dumps(capabilities), {"max_jobs": Variant("u", 1)}])
    return worker_id, worker_path


async def claim(client: Client, worker_path: str) -> tuple[str, dict[str, Any]] | None:
    found, job_id, spec_json = await client.call(worker_path, WORKER, "ClaimJob")
    return (job_id, json.loads(spec_json)) if found else None


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw files with random data: the content every fixture image is made of, and what outputs must equal."""
    d = tmp_path_factory.mktemp("daemon-jobs")
    images.make_raw_with_data(d / "data.raw", 8 * MiB, 0.3, seed=11)
    images.make_raw_with_data(d / "data2.raw", 4 * MiB, 0.5, seed=12)
    return d


@pytest.fixture(scope="module")
def daemon(stack: Any) -> Any:
    """The shared stack's h2kd, with its queue running (other tests may have left it paused)."""
    async def resume() -> None:
        client = await Client.connect(stack.bus_address)
        await client.manager("ResumeQueue")
        client.close()
    run(resume())
    return stack


# ---------------------------------------------------------------- issue 4: every format through the daemon

@dataclass
class FormatCase:
    name: str
    source: Path
    source_format: str                      # what the result should call the source's format
    declared: str | None = None             # image.format given in the spec
    output_format: str = "qcow2"
    references: list[tuple[Path, str]] = field(default_factory=list)   # what each output must equal
    job_id: str = ""
    outputs: list[Path] = field(default_factory=list)
    props: dict[str, Any] = field(default_factory=dict)
    progress: list[float] = field(default_factory=list)     # the job's Progress signals, in order


SINGLE_DISK_KINDS = [
    ("vmdk-monolithicSparse", "vmdk", "monolithicSparse", None),
    ("vmdk-streamOptimized", "vmdk", "streamOptimized", None),
    ("vmdk-twoGbMaxExtentSparse", "vmdk", "twoGbMaxExtentSparse", None),
    ("vmdk-monolithicFlat", "vmdk", "monolithicFlat", None),
    ("vhd-fixed", "vhd", "fixed", "vhd"),          # a fixed VHD probes as raw: the user says what it is
    ("vhd-dynamic", "vhd", "dynamic", None),
    ("vhdx", "vhdx", None, None),
    ("vdi", "vdi", None, None),
    ("qcow2", "qcow2", None, None),
    ("raw", "raw", None, "raw"),
]
FORMAT_CASES = [k[0] for k in SINGLE_DISK_KINDS] + ["vmdk-multi-extent-descriptor", "ova-two-disks-manifest"]


def _format_cases(lib: Path, directory: Path) -> list[FormatCase]:
    cases = []
    for name, fmt, subformat, declared in SINGLE_DISK_KINDS:
        source = images.make_image(fmt, subformat, directory / f"{name}.{fmt}", raw=lib / "data.raw")
        driver = images.KINDS[(fmt, subformat)][0]
        case = FormatCase(name, source, fmt, declared, references=[(source, driver), (lib / "data.raw", "raw")])
        if fmt == "raw":
            case.output_format = "raw"      # raw to raw too: the other output format
        cases.append(case)
    multi = directory / "multi"
    multi.mkdir()
    descriptor = images.make_multi_extent_vmdk(multi, lib / "data.raw")
    cases.append(FormatCase("vmdk-multi-extent-descriptor", descriptor, "vmdk",
                            references=[(descriptor, "vmdk"), (lib / "data.raw", "raw")]))
    ova = images.make_ova(directory / "two-disks.ova", [lib / "data.raw", lib / "data2.raw"], name="twodisk")
    cases.append(FormatCase("ova-two-disks-manifest", ova, "vmdk",
                            references=[(lib / "data.raw", "raw"), (lib / "data2.raw", "raw")]))
    return cases


@pytest.fixture(scope="module")
def converted(daemon: Any, lib: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, FormatCase]]:
    """Every format submitted at once over D-Bus; each case with the job's final properties."""
    stack = daemon
    cases = _format_cases(lib, tmp_path_factory.mktemp("formats"))

    async def submit_all() -> None:
        client = await Client.connect(stack.bus_address, watch=True)
        paths = {}
        for case in cases:
            case.job_id = new_id(f"fmt-{case.name}")
            ext = case.output_format
            output = stack.output_dir / f"{case.job_id}.{ext}"
            _, paths[case.name] = await client.submit(job_spec(
                case.job_id, case.source, output, case.declared,
                parameters={"output_format": case.output_format} if case.output_format != "qcow2" else None))
            if case.name.startswith("ova"):
                case.outputs = [stack.output_dir / f"{case.job_id}-disk{i}.{ext}"
                                for i in range(1, len(case.references) + 1)]
            else:
                case.outputs = [output]
        for case in cases:
            case.props = await wait_props(client, paths[case.name], timeout=120)
        await asyncio.sleep(0.3)    # coalesced signals still on their way
        for case in cases:
            case.progress = [m.body[0] for m in client.signals
                             if m.path == paths[case.name] and m.member == "Progress" and m.interface == JOB]
        client.close()

    run(submit_all())
    yield {case.name: case for case in cases}
    for case in cases:
        for path in stack.output_dir.iterdir():
            if case.job_id in path.name:
                path.unlink()


@pytest.mark.parametrize("name", FORMAT_CASES)
def test_every_format_converts_through_the_daemon_and_a_unit(converted: dict[str, FormatCase], daemon: Any,
                                                             name: str) -> None:
    case = converted[name]
    props = case.props
    assert props["State"] == "completed", props["Error"]
    assert tuple(props["Error"]) == ("", "")
    assert props["Unit"].startswith("h2k-job-") and props["Unit"].endswith("-1.service"), props["Unit"]
    assert props["Worker"] == "builtin" and props["Progress"] == 1.0
    known = [p for p in case.progress if p >= 0]     # -1: not known yet (before the unit reports)
    assert known and known == sorted(known) and known[-1] == 1.0, case.progress
    result = json.loads(props["Result"])
    assert result["status"] == "completed" and result["error"] is None
    disks = result["outputs"]["disks"]
    assert [d["path"] for d in disks] == [str(p) for p in case.outputs]
    assert {d["format"] for d in disks} == {case.output_format}
    assert {d["source_format"] for d in disks} == {case.source_format}
    if name.startswith("ova"):
        assert [d["source_member"] for d in disks] == ["twodisk-disk1.vmdk", "twodisk-disk2.vmdk"]
        for (reference, ref_format), output in zip(case.references, case.outputs):
            compare(reference, ref_format, output, case.output_format)
    else:
        for reference, ref_format in case.references:
            compare(reference, ref_format, case.outputs[0], case.output_format)
    assert leftovers(daemon.output_dir, case.job_id) == sorted(p.name for p in case.outputs)


# ---------------------------------------------------------------- issue 4: bad input through the daemon

@dataclass
class BadCase:
    name: str
    spec: dict[str, Variant]
    job_id: str
    # "worker": the unit ran and failed; "host": refused by h2kd's checks at submission, job failed
    # VALIDATION_FAILED; "refused": SubmitJob answered with an error and no job exists.
    where: str
    code: str                  # error code, or the D-Bus error name when refused
    words: list[str]           # what the message must say
    watch: list[Path] = field(default_factory=list)   # directories where nothing may appear
    outcome: dict[str, Any] = field(default_factory=dict)


def _bad_cases(stack: Any, lib: Path, src: Path) -> list[BadCase]:
    out = stack.output_dir
    truncated = images.make_truncated_vmdk(src / "trunc.vmdk")
    junk = images.make_not_an_image(src / "notes.vmdk")
    missing = images.make_missing_extent_vmdk(src)
    bad_sum = images.make_ova(src / "badsum.ova", [lib / "data2.raw"], name="badsum", bad_sum=True)
    traversal = images.make_ova(src / "evil.ova", [lib / "data2.raw"], name="evil", traversal_member=True)
    good = images.make_image("qcow2", None, src / "good.qcow2", raw=lib / "data2.raw")
    (src / "adir").mkdir()
    link = src / "link.qcow2"
    os.symlink(good, link)
    outside = src / "elsewhere"
    outside.mkdir()
    cases = []

    def add(name: str, source: Path, where: str, code: str, words: list[str], output: Path | None = None,
            watch: list[Path] | None = None) -> None:
        job_id = new_id("bad-" + name.replace(" ", "-"))
        # retry_count 2: an error that cannot succeed on retry must still not be retried.
        spec = job_spec(job_id, source, output or out / f"{job_id}.qcow2", retry_count=2)
        cases.append(BadCase(name, spec, job_id, where, code, words, [out, *(watch or [])]))

    add("truncated vmdk", truncated, "worker", "INVALID_IMAGE", ["damaged", str(truncated)])
    add("not an image", junk, "worker", "INVALID_IMAGE", ["not a disk image", str(junk)])
    add("missing extent", missing, "worker", "INVALID_IMAGE", ["does not exist", "noextent-flat.vmdk"])
    add("bad ova manifest sum", bad_sum, "worker", "INVALID_IMAGE", ["does not match", "badsum-disk1.vmdk"])
    add("ova path traversal member", traversal, "worker", "PERMISSION_DENIED", ["../../etc/x"])
    add("directory", src / "adir", "host", "VALIDATION_FAILED", ["not a regular file", str(src / "adir")])
    add("device node", Path("/dev/null"), "host", "VALIDATION_FAILED", ["not a regular file", "/dev/null"])
    add("symlink", link, "refused", ACCESS_DENIED, ["symbolic link", str(link)])
    add("output outside the output roots", good, "refused", ACCESS_DENIED, ["outputs may only be written below",
                                                                          str(out)],
        output=outside / "o.qcow2", watch=[outside])
    taken = out / f"taken-{uuid.uuid4().hex[:8]}.qcow2"
    taken.write_bytes(b"precious, never overwritten\n")
    add("output that exists", good, "host", "VALIDATION_FAILED", ["already exists", str(taken)], output=taken)
    return cases


BAD_CASES = ["truncated vmdk", "not an image", "missing extent", "bad ova manifest sum", "ova path traversal member",
             "directory", "device node", "symlink", "output outside the output roots", "output that exists"]


@pytest.fixture(scope="module")
def bad_outcomes(daemon: Any, lib: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, BadCase]]:
    """Every bad input submitted at once; each case with what SubmitJob answered and the job's final state."""
    stack = daemon
    src = tmp_path_factory.mktemp("bad")
    cases = _bad_cases(stack, lib, src)
    before = {c.name: [sorted(os.listdir(d)) for d in c.watch] for c in cases}
    pid = stack.daemon_pid

    async def submit_all() -> None:
        client = await Client.connect(stack.bus_address)
        paths = {}
        for case in cases:
            reply = await client.bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER,
                                                  member="SubmitJob", signature="a{sv}a{sv}", body=[case.spec, {}]))
            if reply.message_type == MessageType.ERROR:
                case.outcome["error_reply"] = (reply.error_name, reply.body[0] if reply.body else "")
            else:
                paths[case.name] = reply.body[1]
        for case in cases:
            if case.name in paths:
                case.outcome["props"] = await wait_props(client, paths[case.name], timeout=90)
                case.outcome["events"] = await events(client, paths[case.name])
            else:
                get = await client.bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER,
                                                    member="GetJob", signature="s", body=[case.job_id]))
                case.outcome["get_job_error"] = get.error_name
        case_health = await health(client)
        for case in cases:
            case.outcome["health"] = case_health
            case.outcome["pid_after"] = stack.daemon_pid
            case.outcome["pid_before"] = pid
        client.close()

    run(submit_all())
    for case in cases:
        case.outcome["before"] = before[case.name]
        case.outcome["after"] = [sorted(os.listdir(d)) for d in case.watch]
    yield {case.name: case for case in cases}
    for path in stack.output_dir.glob("taken-*.qcow2"):
        path.unlink()


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_through_the_daemon_fails_clearly_and_leaves_nothing(bad_outcomes: dict[str, BadCase],
                                                                        daemon: Any, name: str) -> None:
    case = bad_outcomes[name]
    outcome = case.outcome
    if case.where == "refused":
        assert "error_reply" in outcome, f"SubmitJob accepted {name}: {outcome.get('props', {}).get('State')}"
        error_name, message = outcome["error_reply"]
        assert error_name == case.code, outcome["error_reply"]
        for words in case.words:
            assert words in message, message
        assert outcome["get_job_error"] == ERR + "NoSuchJob", "a refused submission left a job behind"
    else:
        assert "error_reply" not in outcome, outcome.get("error_reply")
        props = outcome["props"]
        code, message = props["Error"]
        assert props["State"] == "failed", props
        assert code == case.code, props["Error"]
        for words in case.words:
            assert words in message, message
        result = json.loads(props["Result"])
        assert result["status"] == "failed" and result["error"]["code"] == case.code
        assert result["error"]["retryable"] is False
        assert result["outputs"].get("disks") in (None, [])
        if case.where == "worker":
            # It ran in a unit, once: the error cannot succeed on retry, so retry_count 2 was not used.
            assert props["Unit"].endswith("-1.service") and props["Attempt"] == 1, props
            assert not [s for _, s, _ in state_events(outcome["events"]) if s == "retrying"]
            # The worker's own last lines come with the result, not with the error, which is everyone's.
            assert any(f"h2k-worker: failed: {case.code}" in line for line in result["log_tail"]), result
            assert "h2k-worker:" not in message, message
        else:
            # Refused by h2kd's host checks: no unit was ever started.
            assert props["Unit"] == "" and props["Attempt"] == 0, props
            assert result["error"]["phase"] == "validation"
    assert outcome["after"] == outcome["before"], "something was left in an output directory"
    assert leftovers(daemon.output_dir, case.job_id) == []
    if name == "output that exists":
        assert Path(case.words[1]).read_bytes() == b"precious, never overwritten\n"
    h = outcome["health"]
    assert h["status"] == "ok" and h["store_ok"] and h["systemd_reachable"], h
    assert outcome["pid_after"] == outcome["pid_before"], "h2kd died or was restarted"


# ---------------------------------------------------------------- the tuned daemon (slow units, short timers)

@pytest.fixture(scope="module")
def small_fs(stack: Any) -> Iterator[Path]:
    """A 4 MiB tmpfs: an output location too small for the conversions aimed at it."""
    path = stack.base_dir / "small-output"
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES},mode=0755", "h2k-small", str(path)],
                   check=True)
    yield path
    subprocess.run(["umount", str(path)], check=False)
    path.rmdir()


@pytest.fixture(scope="module")
def tuned(stack: Any, small_fs: Path, request: pytest.FixtureRequest) -> Any:
    """h2kd whose units copy at 8 MB/s, whose workers go stale after 2 s without heartbeat, whose retries
    wait 0.5 s then 1 s, and with the small tmpfs as a second output root. Restored at the end of the module."""
    request.addfinalizer(lambda: stack.restart_daemon(daemon_env={}))
    stack.restart_daemon(daemon_env={
        "H2KD_WORKER_ENVIRONMENT": f"H2K_RATE_LIMIT={RATE_LIMIT}",
        "H2KD_HEARTBEAT_TIMEOUT_SECONDS": str(HEARTBEAT_TIMEOUT),
        "H2KD_RETRY_BACKOFF_BASE_SECONDS": str(BACKOFF_BASE),
        "H2KD_OUTPUT_ROOTS": f"{stack.output_dir}:{small_fs}",
    })

    async def resume() -> None:
        client = await Client.connect(stack.bus_address)
        await client.manager("ResumeQueue")
        client.close()
    run(resume())
    return stack


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VMDK with 32 MiB of data: about 4 s to convert at the tuned rate."""
    d = tmp_path_factory.mktemp("slow")
    raw = images.make_raw_with_data(d / "slow.raw", 64 * MiB, 0.5, seed=21)
    vmdk = images.make_image("vmdk", "monolithicSparse", d / "slow.vmdk", raw=raw)
    raw.unlink()
    return vmdk


@pytest.fixture(scope="module")
def small_vmdk(lib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return images.make_image("vmdk", "monolithicSparse", tmp_path_factory.mktemp("small") / "small.vmdk",
                             raw=lib / "data2.raw")


class UnitWatch:
    """Follows one unit on the systemd manager's own bus: when it went inactive, by systemd's clock."""

    def __init__(self, bus: MessageBus, unit: str):
        self.bus = bus
        self.path = unit_object_path(unit)
        self.inactive_at: int | None = None      # InactiveEnterTimestamp, usec since the epoch
        self.removed = False

    @classmethod
    async def start(cls, address: str, unit: str) -> "UnitWatch":
        watch = cls(await MessageBus(bus_address=address).connect(), unit)
        watch.bus.add_message_handler(watch._on_message)
        for rule in (f"type='signal',interface='org.freedesktop.DBus.Properties',path='{watch.path}'",
                     "type='signal',interface='org.freedesktop.systemd1.Manager',member='UnitRemoved'"):
            await watch.bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                         interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                                         body=[rule]))
        # It may have changed before the match was in place.
        reply = await watch.bus.call(Message(destination="org.freedesktop.systemd1", path=watch.path,
                                             interface=PROPERTIES, member="GetAll", signature="s",
                                             body=["org.freedesktop.systemd1.Unit"]))
        if reply.message_type == MessageType.METHOD_RETURN:
            watch._apply(reply.body[0])
        return watch

    def _apply(self, values: dict[str, Variant]) -> None:
        state = values.get("ActiveState")
        stamp = values.get("InactiveEnterTimestamp")
        if state is not None and state.value in ("inactive", "failed") and stamp is not None and stamp.value:
            self.inactive_at = stamp.value

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type != MessageType.SIGNAL:
            return False
        if msg.member == "PropertiesChanged" and msg.path == self.path and \
                msg.body[0] == "org.freedesktop.systemd1.Unit":
            self._apply(msg.body[1])
        elif msg.member == "UnitRemoved" and msg.body[1] == self.path:
            self.removed = True
        return False

    def close(self) -> None:
        self.bus.disconnect()


def test_cancel_stops_the_unit_removes_partial_output_then_says_cancelled(tuned: Any, slow_source: Path) -> None:
    stack = tuned
    job_id = new_id("cancel")
    output = stack.output_dir / f"{job_id}.qcow2"

    async def scenario() -> tuple[dict[str, Any], UnitWatch, list[str], list]:
        client = await Client.connect(stack.bus_address)
        _, path = await client.submit(job_spec(job_id, slow_source, output))
        running = await wait_props(client, path, ("progressing",), 60, progress_above=0.02)
        unit = running["Unit"]
        watch = await UnitWatch.start(stack.systemd_bus_address, unit)
        assert watch.inactive_at is None, "the unit ended before it could be cancelled"
        partial = [p.name for p in stack.output_dir.iterdir() if p.name.startswith(TEMP_PREFIX)]
        await client.manager("CancelJob", "s", [job_id])
        final = await wait_props(client, path, timeout=60)
        await wait_for(lambda: _true(watch.removed or unit_load_state(stack, unit) == "not-found"), 10,
                       "the unit to be collected")
        log = await events(client, path)
        client.close()
        return final, watch, partial, log

    final, watch, partial, log = run(scenario())
    watch.close()
    assert partial, "no partial output was being written when the job was cancelled"
    assert final["State"] == "cancelled", final["Error"]
    assert json.loads(final["Result"])["status"] == "cancelled"
    assert tuple(final["Error"]) == ("", "")
    # Cancelled only once systemd saw the unit stop: h2kd's end time is not before the unit's.
    assert watch.inactive_at is not None, "systemd never reported the unit inactive"
    assert final["FinishedAt"] >= watch.inactive_at, (final["FinishedAt"], watch.inactive_at)
    assert unit_load_state(stack, final["Unit"]) == "not-found"
    assert leftovers(stack.output_dir, job_id) == [], "partial output left behind"
    reasons = [reason for _, state, reason in state_events(log) if state == "cancelled"]
    # Who cancelled is said (the test runs as root).
    assert reasons == [f"cancelled by uid {os.getuid()}; the unit has stopped"], reasons


async def _true(value: bool) -> bool:
    return value


def test_administrator_systemctl_stop_cancels_the_job(tuned: Any, slow_source: Path) -> None:
    stack = tuned
    job_id = new_id("admin-stop")
    output = stack.output_dir / f"{job_id}.qcow2"

    async def scenario() -> tuple[dict[str, Any], subprocess.CompletedProcess[str], list]:
        client = await Client.connect(stack.bus_address)
        _, path = await client.submit(job_spec(job_id, slow_source, output))
        running = await wait_props(client, path, ("progressing",), 60, progress_above=0.02)
        stopped = await asyncio.to_thread(systemctl, stack, "stop", running["Unit"])
        final = await wait_props(client, path, timeout=60)
        log = await events(client, path)
        client.close()
        return final, stopped, log

    final, stopped, log = run(scenario())
    assert stopped.returncode == 0, stopped.stderr
    assert final["State"] == "cancelled", final["Error"]
    assert final["Attempt"] == 1
    reasons = [reason for _, state, reason in state_events(log) if state == "cancelled"]
    assert len(reasons) == 1 and "stopped outside h2kd" in reasons[0], reasons
    assert unit_load_state(stack, final["Unit"]) == "not-found"
    assert leftovers(stack.output_dir, job_id) == []


def job_units_running(stack: Any) -> list[str]:
    listed = systemctl(stack, "list-units", "--plain", "--no-legend", "--state=active,activating,deactivating",
                       "h2k-job-*").stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def converting_qemu_img_cpus(stack: Any, unit: str) -> set[int] | None:
    """The CPUs the `qemu-img convert` the unit's worker runs may use; None while there is none."""
    main = systemctl(stack, "show", "-p", "MainPID", "--value", unit).stdout.strip()
    try:
        children = Path(f"/proc/{main}/task/{main}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if argv[0].endswith(b"qemu-img") and argv[1:2] == [b"convert"]:
            return cpu_list(status.split("Cpus_allowed_list:")[1].splitlines()[0])
    return None


def cpus_of_two_conversions_at_once(stack: Any, source: Path, restart_between: bool = False) -> list[set[int]]:
    """Two conversions of `source` started together (restart_between: the second once h2kd was restarted
    while the first ran): the CPUs each one's qemu-img may use (both then cancelled)."""
    async def scenario() -> list[set[int]]:
        client = await Client.connect(stack.bus_address)
        # Alone: an attempt of an earlier test still running would count on a CPU of its own.
        await wait_for(lambda: _true(not job_units_running(stack)), 60, "earlier job units to end")
        ids = [new_id("placed") for _ in range(2)]
        specs = [job_spec(job_id, source, stack.output_dir / f"{job_id}.qcow2") for job_id in ids]
        if restart_between:
            _, path = await client.submit(specs[0])
            await wait_props(client, path, ("progressing",), 60, progress_above=0.02)
            client.close()
            await asyncio.to_thread(stack.restart_daemon)
            client = await Client.connect(stack.bus_address)
            paths = [path, (await client.submit(specs[1]))[1]]
        else:
            paths = [path for _, path in await asyncio.gather(*(client.submit(spec) for spec in specs))]
        units = [(await wait_props(client, path, ("progressing",), 60, progress_above=0.02))["Unit"]
                 for path in paths]
        cpus = []
        for unit in units:
            async def found(unit: str = unit) -> set[int] | None:
                return await asyncio.to_thread(converting_qemu_img_cpus, stack, unit)
            cpus.append(await wait_for(found, 30, f"the qemu-img of {unit}"))
        for job_id, path in zip(ids, paths):
            await client.manager("CancelJob", "s", [job_id])
            assert (await wait_props(client, path, timeout=60))["State"] == "cancelled"
        client.close()
        return cpus
    return run(scenario())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to spread conversions over")
def test_conversions_running_at_once_are_each_kept_on_a_cpu_of_their_own_unless_switched_off(
        tuned: Any, slow_source: Path) -> None:
    """qemu-img hands its reads and writes to threads; kept on one CPU, the hand-offs cost no wake-ups across
    CPUs (about half a conversion's time, bench/RESULTS.md), and two conversions are spread over two CPUs.
    With pin_conversions = false, the kernel places them."""
    stack = tuned
    usable = os.sched_getaffinity(0)        # the units' too: the stack's systemd started from this process
    first, second = cpus_of_two_conversions_at_once(stack, slow_source)
    assert len(first) == 1 and len(second) == 1 and first != second, (first, second)
    assert first | second <= usable
    # A restarted h2kd knows which CPU the conversion it finds running was given.
    first, second = cpus_of_two_conversions_at_once(stack, slow_source, restart_between=True)
    assert len(first) == 1 and len(second) == 1 and first != second, (first, second)
    tuned_env = dict(stack.daemon_env)
    try:
        stack.restart_daemon({**tuned_env, "H2KD_PIN_CONVERSIONS": "false"})
        assert cpus_of_two_conversions_at_once(stack, slow_source) == [usable, usable]
    finally:
        stack.restart_daemon(tuned_env)


def test_source_removed_mid_conversion_fails_with_the_worker_log_tail(tuned: Any, slow_source: Path,
                                                                     tmp_path: Path) -> None:
    """A retryable failure (the worker exits 1, SOURCE_CHANGED) with no retries left: failed, log tail attached."""
    stack = tuned
    source = tmp_path / "vanishing.vmdk"
    shutil.copyfile(slow_source, source)
    job_id = new_id("vanish")

    async def scenario() -> dict[str, Any]:
        client = await Client.connect(stack.bus_address)
        _, path = await client.submit(job_spec(job_id, source, stack.output_dir / f"{job_id}.qcow2"))
        await wait_props(client, path, ("progressing",), 60, progress_above=0.02)
        source.unlink()
        final = await wait_props(client, path, timeout=60)
        client.close()
        return final

    final = run(scenario())
    code, message = final["Error"]
    assert final["State"] == "failed" and code == "SOURCE_CHANGED", final["Error"]
    assert f"the source file {source} disappeared" in message, message
    result = json.loads(final["Result"])
    tail = "\n".join(result["log_tail"])
    assert f"h2k-worker: job {job_id} attempt 1" in tail and "h2k-worker: failed: SOURCE_CHANGED" in tail, tail
    assert result["error"]["retryable"] is True and result["attempt"] == 1
    assert leftovers(stack.output_dir, job_id) == []


def test_log_tail_in_the_result_holds_only_the_units_own_lines(tuned: Any, tmp_path: Path) -> None:
    stack = tuned
    junk = images.make_not_an_image(tmp_path / "junk.vmdk")
    job_id = new_id("tail")

    async def scenario() -> dict[str, Any]:
        client = await Client.connect(stack.bus_address)
        _, path = await client.submit(job_spec(job_id, junk, stack.output_dir / f"{job_id}.qcow2"))
        final = await wait_props(client, path, timeout=60)
        client.close()
        return final

    final = run(scenario())
    code, message = final["Error"]
    tail = json.loads(final["Result"])["log_tail"]
    assert code == "INVALID_IMAGE" and "h2k-worker:" not in message, final["Error"]
    printed = read_journal(f"H2K_JOB_ID={job_id}", "SYSLOG_IDENTIFIER=h2k-worker",
                           until=lambda entries: any("h2k-worker: failed" in message_text(e) for e in entries))
    unit_lines = {message_text(e) for e in printed}
    assert unit_lines and tail
    assert [line for line in tail if line not in unit_lines] == [], "lines in the tail the unit never printed"


def test_a_convert_without_an_output_path_writes_into_a_directory_of_its_own(tuned: Any, small_vmdk: Path,
                                                                              lib: Path) -> None:
    """The first output root gets a directory named after the job, with the outputs in it."""
    stack = tuned
    job_id = new_id("default-out")

    async def scenario() -> dict[str, Any]:
        client = await Client.connect(stack.bus_address)
        _, path = await client.submit(job_spec(job_id, small_vmdk))
        final = await wait_props(client, path, timeout=90)
        client.close()
        return final

    final = run(scenario())
    assert final["State"] == "completed", final["Error"]
    [disk] = json.loads(final["Result"])["outputs"]["disks"]
    try:
        assert Path(disk["path"]).parent == stack.output_dir / job_id
        compare(lib / "data2.raw", "raw", Path(disk["path"]), "qcow2")
    finally:
        shutil.rmtree(stack.output_dir / job_id, ignore_errors=True)


def test_the_directory_of_a_convert_killed_outright_goes_with_its_temporary_files(tuned: Any, slow_source: Path) -> None:
    """A worker killed outright (here by an administrator's SIGKILL; the OOM killer alike) removes nothing
    itself: h2kd removes the partial output it recorded and then the directory made for the job, empty."""
    stack = tuned
    job_id = new_id("killed-default-out")

    async def scenario() -> tuple[list[str], dict[str, Any]]:
        client = await Client.connect(stack.bus_address)
        _, path = await client.submit(job_spec(job_id, slow_source))
        running = await wait_props(client, path, ("progressing",), 60, progress_above=0.02)
        inside = sorted(p.name for p in (stack.output_dir / job_id).iterdir())
        killed = await asyncio.to_thread(systemctl, stack, "kill", "--signal=KILL", running["Unit"])
        assert killed.returncode == 0, killed.stderr
        final = await wait_props(client, path, timeout=60)
        client.close()
        return inside, final

    inside, final = run(scenario())
    assert [name.startswith(TEMP_PREFIX) for name in inside] == [True], inside
    assert final["State"] == "failed", final["State"]
    assert not (stack.output_dir / job_id).exists()


def test_retryable_failure_is_retried_with_growing_backoff(tuned: Any, small_fs: Path, slow_source: Path) -> None:
    """NO_SPACE on every attempt (the output's file system is too small): attempts 1, 2 and 3, the waits
    between them 0.5 s then 1 s, and the job fails with the last attempt's error and log tail."""
    stack = tuned
    job_id = new_id("retry")
    source = slow_source      # 32 MiB of data: its qcow2 needs far more than the 4 MiB there is
    _, before = scrape(stack.metrics_url)

    async def scenario() -> tuple[dict[str, Any], list]:
        client = await Client.connect(stack.bus_address)
        _, path = await client.submit(job_spec(job_id, source, small_fs / f"{job_id}.qcow2",
                                               retry_count=2))
        final = await wait_props(client, path, timeout=90)
        log = await events(client, path)
        client.close()
        return final, log

    final, log = run(scenario())
    _, after = scrape(stack.metrics_url)
    code, message = final["Error"]
    assert final["State"] == "failed" and code == "NO_SPACE", final["Error"]
    assert "space" in message and json.loads(final["Result"])["log_tail"], (message, final["Result"])
    assert final["Attempt"] == 3 and final["Unit"].endswith("-3.service"), final
    states = state_events(log)
    assigned = [reason for _, state, reason in states if state == "assigned"]
    assert assigned == [f"attempt {n} assigned to worker builtin" for n in (1, 2, 3)], assigned
    retrying = [(when, reason) for when, state, reason in states if state == "retrying"]
    assert len(retrying) == 2 and all("NO_SPACE" in reason for _, reason in retrying), retrying
    waits = []
    for when, _ in retrying:
        requeued = next(t for t, state, _ in states if state == "queued" and t > when)
        waits.append((requeued - when) / 1e6)
    # The second wait is at least twice the base: the backoff grew. (Not compared with the first, which a
    # loaded machine can lengthen at random.)
    assert waits[0] >= BACKOFF_BASE * 0.9 and waits[1] >= 2 * BACKOFF_BASE * 0.9, waits
    assert metric(after, "h2kd_job_retries_total", error_type="NO_SPACE") == \
        metric(before, "h2kd_job_retries_total", error_type="NO_SPACE") + 2
    assert metric(after, "hyper2kvm_migration_failures_total", error_type="NO_SPACE") == \
        metric(before, "hyper2kvm_migration_failures_total", error_type="NO_SPACE") + 1
    assert leftovers(small_fs, job_id) == []


# ---------------------------------------------------------------- external workers

def test_external_worker_runs_the_job_only_it_can_run(tuned: Any, small_vmdk: Path) -> None:
    """A job needing a GPU waits (the builtin worker has none) until a worker advertising one registers,
    claims it, converts it itself over its own connection, reports progress and the result."""
    stack = tuned
    job_id = new_id("gpu")
    output = stack.output_dir / f"{job_id}.qcow2"
    _, before = scrape(stack.metrics_url)

    async def scenario() -> dict[str, Any]:
        watcher = await Client.connect(stack.bus_address)
        _, path = await watcher.submit(job_spec(job_id, small_vmdk, output, requirements={"gpu": True}))
        await asyncio.sleep(1.0)
        waiting = await watcher.job_props(path)
        assert waiting["State"] == "queued" and waiting["Worker"] == "" and waiting["Attempt"] == 0, waiting
        assert "gpu" in waiting["WaitReason"], waiting["WaitReason"]

        worker = await Client.connect(stack.bus_address)
        worker_id, worker_path = await register_worker(worker, "gpu-box", {"operations": ["convert"], "gpu": True})
        beats = Heartbeats(worker, worker_path)
        claimed_id, claimed_spec = await wait_for(lambda: claim(worker, worker_path), 10, "a job to claim")
        assert claimed_id == job_id and claimed_spec["capability_requirements"] == {"gpu": True}
        assert await worker.prop(worker_path, WORKER, "State") == "busy"
        _, mid = scrape(stack.metrics_url)

        # The worker's own conversion, with progress reported as it goes.
        await worker.call(worker_path, WORKER, "ReportProgress", "sa{sv}", [job_id, {
            "progress": Variant("d", 0.25), "bytes_done": Variant("t", 1 * MiB),
            "bytes_total": Variant("t", 4 * MiB), "phase": Variant("s", "convert")}])
        progressing = await watcher.job_props(path)
        await asyncio.to_thread(subprocess.run, ["qemu-img", "convert", "-O", "qcow2", str(small_vmdk), str(output)],
                                check=True)
        written = output.stat()
        await worker.call(worker_path, WORKER, "ReportProgress", "sa{sv}", [job_id, {
            "progress": Variant("d", 1.0), "bytes_done": Variant("t", 4 * MiB),
            "bytes_total": Variant("t", 4 * MiB), "phase": Variant("s", "convert")}])
        outputs = {"disks": [{"path": str(output), "format": "qcow2", "source_format": "vmdk",
                              "virtual_size": 3 * MiB}]}
        await worker.call(worker_path, WORKER, "ReportResult", "sa{sv}", [job_id, {
            "success": Variant("b", True), "outputs": Variant("s", json.dumps(outputs)),
            "bytes_read": Variant("t", small_vmdk.stat().st_size),
            "bytes_written": Variant("t", output.stat().st_size)}])
        final = await wait_props(watcher, path, timeout=10)
        idle = await worker.prop(worker_path, WORKER, "ActiveJobs")
        await beats.stop()
        await worker.call(worker_path, WORKER, "Unregister")
        watcher.close()
        worker.close()
        return {"final": final, "progressing": progressing, "worker_id": worker_id, "outputs": outputs,
                "idle": idle, "mid": mid, "written": written}

    seen = run(scenario())
    final, progressing = seen["final"], seen["progressing"]
    assert progressing["State"] == "progressing" and progressing["Progress"] == 0.25
    assert progressing["Worker"] == seen["worker_id"] and progressing["Unit"] == ""
    assert final["State"] == "completed", final["Error"]
    assert final["Worker"] == seen["worker_id"] and final["Unit"] == "" and final["Attempt"] == 1
    result = json.loads(final["Result"])
    assert result["outputs"] == seen["outputs"] and result["worker"] == seen["worker_id"]
    assert seen["idle"] == 0
    # The external worker's output is its own: h2kd neither moved, rewrote nor re-owned it.
    after, written = output.stat(), seen["written"]
    assert (after.st_ino, after.st_size, after.st_mtime_ns, after.st_uid) == (
        written.st_ino, written.st_size, written.st_mtime_ns, written.st_uid)
    # While it was registered, the worker was counted alive and described.
    mid = seen["mid"]
    assert metric(mid, "h2kd_workers", state="alive") == metric(before, "h2kd_workers", state="alive") + 1
    assert any(name == "hyper2kvm_worker_info" and dict(labels).get("worker") == seen["worker_id"]
               and dict(labels).get("kind") == "external" for name, labels in mid)
    # Its outputs.disks, given as the builtin worker's, count as the VMDKs converted.
    _, ended = scrape(stack.metrics_url)
    for name, moved in (("hyper2kvm_vmdk_size_bytes_count", 1), ("hyper2kvm_vmdk_size_bytes_sum", 3 * MiB)):
        assert metric(ended, name) - metric(before, name) == moved, name
    output.unlink()


def test_worker_that_stops_heartbeating_has_its_job_requeued_for_another(tuned: Any, small_vmdk: Path) -> None:
    stack = tuned
    job_id = new_id("stale")
    output = stack.output_dir / f"{job_id}.qcow2"
    caps = {"operations": ["convert"], "gpu": True}
    _, before = scrape(stack.metrics_url)

    async def scenario() -> dict[str, Any]:
        watcher = await Client.connect(stack.bus_address)
        _, path = await watcher.submit(job_spec(job_id, small_vmdk, output, requirements={"gpu": True},
                                                retry_count=1))
        silent = await Client.connect(stack.bus_address)
        silent_id, silent_path = await register_worker(silent, "goes-quiet", caps)
        claimed = await wait_for(lambda: claim(silent, silent_path), 10, "the first worker's claim")
        assert claimed[0] == job_id
        await silent.call(silent_path, WORKER, "ReportProgress", "sa{sv}", [job_id, {
            "progress": Variant("d", 0.4), "phase": Variant("s", "convert")}])
        took_it = await watcher.job_props(path)
        started = time.monotonic()
        # No more heartbeats (the connection stays open): the job must come back to the queue.
        requeued = await wait_props(watcher, path, ("queued",), 15)
        requeued_after = time.monotonic() - started
        stale_state = await silent.prop(silent_path, WORKER, "State")
        _, stale_metrics = scrape(stack.metrics_url)

        other = await Client.connect(stack.bus_address)
        other_id, other_path = await register_worker(other, "takes-over", caps)
        beats = Heartbeats(other, other_path)
        reclaimed = await wait_for(lambda: claim(other, other_path), 10, "the second worker's claim")
        late = await silent.call(silent_path, WORKER, "ReportResult", "sa{sv}",
                                 [job_id, {"success": Variant("b", True), "outputs": Variant("s", "{}")}],
                                 expect_error=ERR + "InvalidState")
        await asyncio.to_thread(subprocess.run, ["qemu-img", "convert", "-O", "qcow2", str(small_vmdk), str(output)],
                                check=True)
        await other.call(other_path, WORKER, "ReportResult", "sa{sv}", [job_id, {
            "success": Variant("b", True), "outputs": Variant("s", json.dumps({"disks": [{"path": str(output)}]}))}])
        final = await wait_props(watcher, path, timeout=10)
        log = await events(watcher, path)
        await beats.stop()
        for client, worker_path in ((silent, silent_path), (other, other_path)):
            await client.call(worker_path, WORKER, "Unregister")
            client.close()
        watcher.close()
        return {"took_it": took_it, "requeued": requeued, "requeued_after": requeued_after, "stale": stale_state,
                "reclaimed": reclaimed, "late": late, "final": final, "log": log, "silent_id": silent_id,
                "other_id": other_id, "stale_metrics": stale_metrics}

    seen = run(scenario())
    assert seen["took_it"]["State"] == "progressing" and seen["took_it"]["Worker"] == seen["silent_id"]
    requeued = seen["requeued"]
    assert requeued["Worker"] == "" and requeued["Progress"] == 0.0, requeued
    assert seen["requeued_after"] < HEARTBEAT_TIMEOUT + 3, seen["requeued_after"]
    assert seen["stale"] == "stale"
    assert seen["reclaimed"][0] == job_id
    assert "not claimed by worker" in seen["late"], seen["late"]
    final = seen["final"]
    assert final["State"] == "completed" and final["Worker"] == seen["other_id"] and final["Attempt"] == 2, final
    lost = [data["message"] for _, kind, data in seen["log"] if kind == "log" and "lost" in data.get("message", "")]
    assert lost == [f"worker {seen['silent_id']} lost: it missed its heartbeats"], lost
    stale_metrics = seen["stale_metrics"]
    assert metric(stale_metrics, "h2kd_workers", state="stale") == metric(before, "h2kd_workers", state="stale") + 1
    output.unlink()


# ---------------------------------------------------------------- issue 6: metrics and journal after real jobs

def test_metrics_and_journal_follow_real_jobs(tuned: Any, small_vmdk: Path, slow_source: Path,
                                              tmp_path: Path) -> None:
    """A conversion that completes, one that fails, one cancelled while it runs and one cancelled while queued:
    every metric of the observability issue moves by what they did, and `journalctl H2K_JOB_ID=<id>` tells
    each job's story from both h2kd and the worker unit."""
    stack = tuned
    junk = images.make_not_an_image(tmp_path / "junk.vmdk")
    ok_id, bad_id, cancel_id, queued_id = (new_id(p) for p in ("obs-ok", "obs-bad", "obs-cancel", "obs-queued"))
    body_before, before = scrape(stack.metrics_url)

    async def scenario() -> dict[str, Any]:
        client = await Client.connect(stack.bus_address)
        _, ok_path = await client.submit(job_spec(ok_id, small_vmdk, stack.output_dir / f"{ok_id}.qcow2"))
        ok = await wait_props(client, ok_path, timeout=60)
        _, bad_path = await client.submit(job_spec(bad_id, junk, stack.output_dir / f"{bad_id}.qcow2"))
        bad = await wait_props(client, bad_path, timeout=60)

        _, cancel_path = await client.submit(job_spec(cancel_id, slow_source,
                                                      stack.output_dir / f"{cancel_id}.qcow2"))
        await wait_props(client, cancel_path, ("progressing",), 60, progress_above=0.02)
        _, running = scrape(stack.metrics_url)
        await client.manager("CancelJob", "s", [cancel_id])
        cancelled = await wait_props(client, cancel_path, timeout=60)

        await client.manager("PauseQueue")
        try:
            _, queued_path = await client.submit(job_spec(queued_id, small_vmdk,
                                                          stack.output_dir / f"{queued_id}.qcow2", priority=3))
            _, paused = scrape(stack.metrics_url)
            await client.manager("CancelJob", "s", [queued_id])
            await wait_props(client, queued_path, ("cancelled",), 10)
        finally:
            await client.manager("ResumeQueue")
        client.close()
        return {"ok": ok, "bad": bad, "cancelled": cancelled, "running": running, "paused": paused}

    seen = run(scenario())
    body_after, after = scrape(stack.metrics_url)
    ok, bad = seen["ok"], seen["bad"]
    assert ok["State"] == "completed" and bad["State"] == "failed" and seen["cancelled"]["State"] == "cancelled"
    assert bad["Error"][0] == "INVALID_IMAGE"

    def moved(name: str, samples: dict | None = None, **labels: str) -> float:
        return metric(samples if samples is not None else after, name, **labels) - metric(before, name, **labels)

    # The original protocol's names.
    assert moved("hyper2kvm_migration_total", operation="convert", status="completed") == 1
    assert moved("hyper2kvm_migration_total", operation="convert", status="failed") == 1
    assert moved("hyper2kvm_migration_total", operation="convert", status="cancelled") == 2
    assert moved("hyper2kvm_migration_failures_total", error_type="INVALID_IMAGE") == 1
    assert moved("hyper2kvm_migration_duration_seconds_count", operation="convert") == 1
    run_seconds = (ok["FinishedAt"] - ok["StartedAt"]) / 1e6
    assert moved("hyper2kvm_migration_duration_seconds_sum", operation="convert") == pytest.approx(run_seconds,
                                                                                                   abs=1e-3)
    assert moved("hyper2kvm_worker_jobs_active", seen["running"]) == 1
    assert moved("hyper2kvm_worker_jobs_active") == 0
    assert moved("hyper2kvm_vmdk_size_bytes_count") == 1
    info = subprocess.run(["qemu-img", "info", "--output=json", str(small_vmdk)], capture_output=True, check=True)
    assert moved("hyper2kvm_vmdk_size_bytes_sum") == json.loads(info.stdout)["virtual-size"] > 0
    assert metric(after, "hyper2kvm_worker_info", worker="builtin", kind="builtin",
                  version=_version()) == 1
    # Added for operators.
    for state, count in (("completed", 1), ("failed", 1), ("cancelled", 2), ("queued", 0), ("running", 0),
                         ("progressing", 0)):
        assert moved("h2kd_jobs", state=state) == count, state
    assert moved("h2kd_jobs", seen["running"], state="progressing") == 1
    assert moved("h2kd_queue_depth", seen["paused"], priority="3") == 1
    assert moved("h2kd_queue_depth", priority="3") == 0
    assert moved("h2kd_jobs", seen["paused"], state="queued") == 1
    metrics = json.loads(ok["Result"])["metrics"]
    assert metrics["bytes_written"] > 0
    assert moved("h2kd_converted_bytes_total") == metrics["bytes_written"]
    assert moved("h2kd_conversion_throughput_bytes_per_second_count") == 1
    assert moved("h2kd_conversion_throughput_bytes_per_second_sum") == pytest.approx(
        metrics["bytes_written"] / metrics["execution_seconds"], rel=1e-6)
    for status, count in (("completed", 1), ("failed", 1), ("cancelled", 2)):
        assert moved("h2kd_job_duration_seconds_count", operation="convert", status=status) == count, status
    assert moved("h2kd_job_duration_seconds_sum", operation="convert", status="completed") == pytest.approx(
        (ok["FinishedAt"] - ok["CreatedAt"]) / 1e6, abs=1e-3)
    assert metric(after, "h2kd_workers", state="alive") >= 1
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=body_after, capture_output=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr

    # The journal: h2kd's lifecycle entries and the worker unit's own lines, under the same H2K_JOB_ID.
    daemon_pid = str(stack.daemon_pid)
    expected = {ok_id: ["submitted", "started", "completed"], bad_id: ["submitted", "started", "failed"],
                cancel_id: ["submitted", "started", "cancelled"]}
    worker_says = {ok_id: "h2k-worker: completed", bad_id: "h2k-worker: failed: INVALID_IMAGE",
                   cancel_id: f"h2k-worker: job {cancel_id} attempt 1"}
    for job_id, lifecycle in expected.items():
        def complete(entries: list[dict[str, Any]], job_id: str = job_id, lifecycle: list[str] = lifecycle) -> bool:
            ids = {e.get("MESSAGE_ID") for e in entries}
            texts = [message_text(e) for e in entries if e.get("SYSLOG_IDENTIFIER") == "h2k-worker"]
            return all(MESSAGE_IDS[k] in ids for k in lifecycle) and any(worker_says[job_id] in t for t in texts)
        entries = read_journal(f"H2K_JOB_ID={job_id}", until=complete)
        from_daemon = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "h2kd"]
        from_worker = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "h2k-worker"]
        assert [e["MESSAGE_ID"] for e in from_daemon if e["MESSAGE_ID"] != MESSAGE_IDS["progress"]] == \
            [MESSAGE_IDS[k] for k in lifecycle], [message_text(e) for e in from_daemon]
        for entry in from_daemon:
            assert entry["_PID"] == daemon_pid
            assert entry["H2K_OPERATION"] == "convert" and entry["H2K_JOB_ID"] == job_id
        states = [e["H2K_STATE"] for e in from_daemon if e["MESSAGE_ID"] != MESSAGE_IDS["progress"]]
        assert states[0] in ("created", "validated", "queued") and states[1:] == ["running", lifecycle[-1]], states
        assert from_worker, f"no line of the worker unit for {job_id}"
        assert all(e["_PID"] != daemon_pid and e["H2K_ATTEMPT"] == "1" for e in from_worker)
        assert any(worker_says[job_id] in message_text(e) for e in from_worker), \
            [message_text(e) for e in from_worker]
    for job_id in (ok_id, bad_id, cancel_id):
        for path in stack.output_dir.iterdir():
            if job_id in path.name:
                path.unlink()


def _version() -> str:
    from h2kd import __version__
    return __version__
