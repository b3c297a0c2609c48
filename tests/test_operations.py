"""The worker program (python -m h2kd.worker) on real images made with qemu-img: conversions checked with
`qemu-img compare`, inspection reports, every bad input of the operations issue, cancellation, no space."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from h2kd.model.result import parse_result
from h2kd.worker.report import parse_status
import images  # tests/ is on sys.path: pytest puts the directory of its conftest there
from images import MiB
from procfs import cpu_list

PYTHON = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable

pytestmark = pytest.mark.skipif(subprocess.run(["which", "qemu-img"], capture_output=True).returncode != 0,
                                reason="qemu-img is not installed")


@dataclass
class Run:
    returncode: int
    result: dict[str, Any]
    statuses: list[str] = field(default_factory=list)
    ready: bool = False
    log: str = ""


def run_worker(work: Path, spec: dict[str, Any], roots: list[Path], env: dict[str, str] | None = None,
               on_status: Callable[[subprocess.Popen[str], str], None] | None = None, attempt: int = 1,
               wrapper: list[str] | None = None, owner: dict[str, int] | None = None,
               source_identity: str | None = None, source_roots: list[Path] | None = None,
               cpu: int | None = None) -> Run:
    """Run the worker as systemd would, with a notify socket this test binds to collect READY/STATUS.
    wrapper: a command the worker runs under (strace ...); owner: the submitter's {"uid", "gid", "mode"};
    source_identity: as h2kd's checks recorded it (None: that of the source now, as checked at submission);
    cpu: the CPU h2kd gave the attempt's conversions."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = work / "spec.json", work / "result.json"
    spec = {"job_id": "job1", **spec}
    spec_path.write_text(json.dumps({"job_id": spec["job_id"], "attempt": attempt, "spec": spec,
                                     "output_roots": [str(r) for r in roots],
                                     **({"source_roots": [str(r) for r in source_roots]} if source_roots else {}),
                                     **({"owner": owner} if owner else {}),
                                     **({"cpu": cpu} if cpu is not None else {}),
                                     "source_identity": _identity(spec) if source_identity is None
                                     else source_identity}))
    sock_path = work / "notify.sock"
    if sock_path.exists():
        sock_path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.05)
    messages: list[str] = []
    proc = subprocess.Popen([*(wrapper or []), PYTHON, "-m", "h2kd.worker", "--spec", str(spec_path), "--result",
                             str(result_path)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "NOTIFY_SOCKET": str(sock_path), **(env or {})})
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    deadline = time.monotonic() + 120
    while True:
        try:
            data = sock.recv(65536).decode()
            for line in data.splitlines():
                messages.append(line)
                if on_status and line.startswith("STATUS="):
                    on_status(proc, line[len("STATUS="):])
        except socket.timeout:
            if proc.poll() is not None:
                break
        assert time.monotonic() < deadline, "the worker did not finish in time"
    sock.close()
    reader.join()
    result = json.loads(result_path.read_text())
    parse_result(result)     # the result must satisfy the contract's model
    return Run(proc.returncode, result, [m[7:] for m in messages if m.startswith("STATUS=")],
               "READY=1" in messages, "".join(output))


def _identity(spec: dict[str, Any]) -> str:
    try:
        st = os.lstat(spec["image"]["path"])
    except (KeyError, OSError):
        return ""
    return f"{st.st_dev}:{st.st_ino}"


def compare(a: Path, fmt_a: str, b: Path, fmt_b: str) -> bool:
    return not images.disk_difference(a, b, fmt_a, fmt_b)


def test_the_comparison_these_tests_use_tells_a_disk_of_another_size_apart(tmp_path: Path) -> None:
    """`qemu-img compare` alone calls a copy grown with zeros, or cut where the source held zeros, identical:
    a conversion that padded or dropped a disk's end would pass every test that compares."""
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(MiB) + bytes(MiB))
    for size in (3 * MiB, MiB + 512 * 1024):
        other = tmp_path / f"other-{size}.raw"
        shutil.copyfile(source, other)
        os.truncate(other, size)
        assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(source), str(other)]
                              ).returncode == 0            # what compare alone says
        assert not compare(source, "raw", other, "raw")
    assert compare(source, "raw", source, "raw")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def assert_monotonic(statuses: list[str]) -> None:
    fractions = [r.fraction for r in map(parse_status, statuses) if r is not None and r.fraction is not None]
    assert fractions, statuses
    assert fractions == sorted(fractions), statuses
    assert fractions[-1] == 1.0


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Source images shared by the tests (never written by them)."""
    d = tmp_path_factory.mktemp("images")
    images.make_raw_with_data(d / "data.raw", 16 * MiB, 0.3, seed=7)
    images.make_raw_with_data(d / "data2.raw", 8 * MiB, 0.5, seed=8)
    return d


@pytest.fixture
def out(tmp_path: Path) -> Path:
    o = tmp_path / "out"
    o.mkdir()
    return o


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory other users can reach, with out/ in it (pytest's tmp_path is root's alone): for jobs of a
    submitter other than root, whose qemu-img runs with the submitter's rights."""
    path = Path(tempfile.mkdtemp(prefix="h2kt-ops-", dir="/tmp"))
    try:
        path.chmod(0o755)
        (path / "out").mkdir()
        (path / "out").chmod(0o1777)     # like /tmp: a submitter may create files in it (h2kd checks that)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def convert_spec(path: Path, output: Path | None, fmt: str | None = None, **parameters: Any) -> dict[str, Any]:
    artifacts = {"output_path": str(output) if output else None}
    if "overwrite" in parameters:
        artifacts["overwrite"] = parameters.pop("overwrite")
    return {"operation": "convert", "image": {"path": str(path), "format": fmt}, "parameters": parameters,
            "artifacts": artifacts}


# ---------------------------------------------------------------- conversions

@pytest.mark.parametrize("kind", [k for k in images.KINDS if k[0] != "raw"], ids=lambda k: f"{k[0]}-{k[1]}")
def test_every_format_converts_to_qcow2_with_identical_content(lib: Path, tmp_path: Path, out: Path,
                                                               kind: tuple[str, str | None]) -> None:
    source = images.make_image(kind[0], kind[1], tmp_path / f"src.{kind[0]}", raw=lib / "data.raw")
    run = run_worker(tmp_path / "w", convert_spec(source, out / "disk.qcow2"), [out])
    assert run.returncode == 0, run.log
    assert run.ready
    assert run.result["status"] == "completed"
    assert compare(lib / "data.raw", "raw", out / "disk.qcow2", "qcow2")
    assert leftovers(out) == ["disk.qcow2"]
    [disk] = run.result["outputs"]["disks"]
    assert disk["path"] == str(out / "disk.qcow2") and disk["format"] == "qcow2"
    assert disk["check"]["status"] == "ok"
    assert run.result["outputs"]["report"]["disks"][0]["subformat"] == (kind[1] if kind[0] in ("vmdk", "vhd") else None)
    assert_monotonic(run.statuses)


def test_raw_source_needs_its_format_declared_and_converts_to_raw(lib: Path, tmp_path: Path, out: Path) -> None:
    run = run_worker(tmp_path / "w", convert_spec(lib / "data.raw", out / "copy.raw", "raw", output_format="raw"),
                     [out])
    assert run.returncode == 0, run.log
    assert compare(lib / "data.raw", "raw", out / "copy.raw", "raw")
    # Sparse by default: the holes stay holes.
    assert os.stat(out / "copy.raw").st_blocks * 512 < 8 * MiB


def test_conversion_options_reach_qemu_img(lib: Path, tmp_path: Path, out: Path) -> None:
    source = images.make_image("vmdk", "monolithicSparse", tmp_path / "src.vmdk", raw=lib / "data.raw")
    run = run_worker(tmp_path / "w1", convert_spec(source, out / "z.qcow2", compress=True, compression_type="zstd",
                                                   cluster_size=131072, coroutines=4), [out])
    assert run.returncode == 0, run.log
    info = json.loads(images.qemu_img("info", "--output=json", str(out / "z.qcow2")))
    assert info["cluster-size"] == 131072
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert compare(lib / "data.raw", "raw", out / "z.qcow2", "qcow2")
    run = run_worker(tmp_path / "w2", convert_spec(source, out / "full.raw", output_format="raw", sparse=False), [out])
    assert run.returncode == 0, run.log
    assert os.stat(out / "full.raw").st_blocks * 512 >= 16 * MiB
    assert compare(lib / "data.raw", "raw", out / "full.raw", "raw")


SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "sync")


def worker_syncs(trace: Path, directory: Path) -> list[str]:
    """The sync calls the worker itself (not qemu-img, which syncs while it creates a qcow2) made on
    `directory` or a file in it, from `strace -f -y -Y`: "call path" each."""
    found = []
    for line in trace.read_text().splitlines():
        match = re.search(r"<([^>]+)>\]? ?(\w+)\(\d+<([^>]*)>", line)
        if match and match.group(1) != "qemu-img" and match.group(2) in SYNC_CALLS:
            path = Path(match.group(3))
            if path == directory or path.parent == directory:
                found.append(f"{match.group(2)} {path.name if path != directory else '.'}")
    return found


def test_an_output_name_long_in_bytes_gets_a_temporary_name_the_file_system_takes(lib: Path, tmp_path: Path,
                                                                                   out: Path) -> None:
    """A file name may be 255 bytes long: 118 Cyrillic letters are 236 of them, as a temporary name with its
    prefix and random part they would be more, and that name is cut to fit, between two letters."""
    name = "\u0434" * 118 + ".qcow2"
    assert len(name.encode()) == 242
    source = images.make_image("qcow2", None, tmp_path / "src.qcow2", raw=lib / "data2.raw")
    run = run_worker(tmp_path / "w", convert_spec(source, out / name), [out])
    assert run.returncode == 0, run.log
    assert leftovers(out) == [name]
    assert compare(lib / "data2.raw", "raw", out / name, "qcow2")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("sync", [True, False])
def test_sync_false_writes_the_output_without_a_single_sync(lib: Path, tmp_path: Path, out: Path,
                                                             sync: bool) -> None:
    source = images.make_image("vmdk", "monolithicSparse", tmp_path / "src.vmdk", raw=lib / "data.raw")
    trace = tmp_path / "strace.log"
    run = run_worker(tmp_path / "w", convert_spec(source, out / "d.qcow2", domain_xml=True, sync=sync), [out],
                     wrapper=["strace", "-f", "-y", "-Y", "-qq", "-e", "signal=none", "-o", str(trace),
                              "-e", "trace=" + ",".join(SYNC_CALLS)])
    assert run.returncode == 0, run.log
    assert compare(lib / "data.raw", "raw", out / "d.qcow2", "qcow2")
    assert leftovers(out) == ["d.qcow2", "d.xml"]       # still renamed into place: no temporary file left
    syncs = worker_syncs(trace, out)
    if sync:
        # The disk and the domain XML were on disk before their names, and so were the names.
        assert any(s.startswith("fsync .h2k-tmp-") and s.endswith("-d.qcow2") for s in syncs), syncs
        assert any(s.startswith("fsync .h2k-tmp-") and s.endswith("-d.xml") for s in syncs), syncs
        assert "fsync ." in syncs, syncs
    else:
        assert syncs == []


def test_a_hyper_v_generation_2_vhdx_gets_a_uefi_domain(tmp_path: Path, out: Path) -> None:
    """A plain disk brings no VM facts: its boot disk, read through qemu as the guest sees it, has an EFI
    system partition, so the domain boots it with UEFI."""
    disk = images.partitioned(tmp_path / "gen2.raw", "label: gpt\n,8M,U\n,,L\n")
    vhdx = tmp_path / "gen2.vhdx"
    images.qemu_img("convert", "-f", "raw", "-O", "vhdx", str(disk), str(vhdx))
    run = run_worker(tmp_path / "w", convert_spec(vhdx, out / "gen2.qcow2", domain_xml=True), [out])
    assert run.returncode == 0, run.log
    assert "<os firmware='efi'>" in (out / "gen2.xml").read_text()


def test_multi_extent_vmdk(lib: Path, tmp_path: Path, out: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    descriptor = images.make_multi_extent_vmdk(src, lib / "data.raw")
    run = run_worker(tmp_path / "w", convert_spec(descriptor, out / "m.qcow2"), [out])
    assert run.returncode == 0, run.log
    assert compare(lib / "data.raw", "raw", out / "m.qcow2", "qcow2")
    report = run.result["outputs"]["report"]["disks"][0]
    assert [os.path.basename(e["filename"]) for e in report["extents"]] == ["multi-f001.vmdk", "multi-f002.vmdk"]


def test_multi_disk_ova_converts_every_disk_in_order_with_domain_xml(lib: Path, tmp_path: Path, out: Path) -> None:
    ova = images.make_ova(tmp_path / "vm.ova", [lib / "data.raw", lib / "data2.raw"], name="webserver")
    spec = convert_spec(ova, out, domain_xml=True)
    run = run_worker(tmp_path / "w", spec, [out])
    assert run.returncode == 0, run.log
    assert leftovers(out) == ["webserver-disk1.qcow2", "webserver-disk2.qcow2", "webserver.xml"]
    assert compare(lib / "data.raw", "raw", out / "webserver-disk1.qcow2", "qcow2")
    assert compare(lib / "data2.raw", "raw", out / "webserver-disk2.qcow2", "qcow2")
    assert not compare(lib / "data2.raw", "raw", out / "webserver-disk1.qcow2", "qcow2")
    xml = (out / "webserver.xml").read_text()
    assert "<vcpu>2</vcpu>" in xml and "<memory unit='MiB'>2048</memory>" in xml and "firmware='efi'" in xml
    assert xml.index("webserver-disk1") < xml.index("webserver-disk2")
    assert xml.count("bus='virtio'") == 2 and "<model type='virtio'/>" in xml
    assert "00:50:56:aa:bb:01" in xml
    manifest = run.result["outputs"]["report"]["manifest"]
    assert {v["file"] for v in manifest["verified"]} == {"webserver-disk1.vmdk", "webserver-disk2.vmdk"}
    assert_monotonic(run.statuses)
    assert "verify: " in run.log and "convert: " in run.log     # the journal sees every phase
    # The outputs get their names last, and the job ends in that phase (not back in "convert"). Statuses are sent
    # at most a few times a second, so which of the earlier phases show varies.
    phases = [r.phase for r in map(parse_status, run.statuses) if r is not None]
    assert "commit" in phases and set(phases[phases.index("commit"):]) == {"commit"}, phases
    # Nothing was extracted next to the OVA.
    assert leftovers(tmp_path) == ["out", "vm.ova", "w"]


def test_vmx_with_two_disks(lib: Path, tmp_path: Path, out: Path) -> None:
    src = tmp_path / "vm"
    src.mkdir()
    images.make_image("vmdk", "monolithicSparse", src / "a.vmdk", raw=lib / "data.raw")
    images.make_image("vmdk", "monolithicFlat", src / "b.vmdk", raw=lib / "data2.raw")
    vmx = images.make_vmx(src, ["a.vmdk", "b.vmdk"], name="db01", firmware="efi")
    run = run_worker(tmp_path / "w", convert_spec(vmx, out / "db01.qcow2"), [out])
    assert run.returncode == 0, run.log
    assert compare(lib / "data.raw", "raw", out / "db01-disk1.qcow2", "qcow2")
    assert compare(lib / "data2.raw", "raw", out / "db01-disk2.qcow2", "qcow2")
    vm = run.result["outputs"]["report"]["vm"]
    assert vm == {"name": "db01", "cpus": 4, "cores_per_socket": 0, "memory_mib": 4096, "firmware": "uefi",
                  "secure_boot": False, "tpm": False, "guest_os": "", "boot_disk": 0,
                  "nics": [{"name": "ethernet0", "model": "vmxnet3", "network": "VM Network",
                            "mac": "00:0c:29:12:34:56"}]}


def test_a_vm_with_a_name_longer_than_a_file_name_converts_into_a_directory(lib: Path, tmp_path: Path,
                                                                             out: Path) -> None:
    """The outputs take the VM's name, cut to leave room for their endings: a 300-letter displayName failed as
    an INTERNAL error (ENAMETOOLONG), and was retried."""
    src = tmp_path / "vm"
    src.mkdir()
    images.make_image("vmdk", "monolithicSparse", src / "a.vmdk", raw=lib / "data.raw")
    long_name = "web" * 100
    vmx = images.make_vmx(src, ["a.vmdk"], name="web")
    vmx.write_text(vmx.read_text().replace('displayName = "web"', f'displayName = "{long_name}"'))
    target = out / "long"
    target.mkdir()
    run = run_worker(tmp_path / "w", convert_spec(vmx, target), [out])
    assert run.returncode == 0, run.log
    assert os.listdir(target) == [long_name[:200] + ".qcow2"]
    assert compare(lib / "data.raw", "raw", target / (long_name[:200] + ".qcow2"), "qcow2")
    assert run.result["outputs"]["report"]["vm"]["name"] == long_name      # reported as the VM calls itself


@pytest.mark.parametrize("declared, written_in, name", [
    ("windows-1252", "cp1252", "Donn\u00e9es"), ("Shift_JIS", "shift_jis", "\u30c7\u30a3\u30b9\u30af"),
    ("no-such-encoding", "utf-8", "Donn\u00e9es")])
def test_a_vmx_is_read_in_the_encoding_it_declares(lib: Path, tmp_path: Path, declared: str, written_in: str,
                                                   name: str) -> None:
    """VMware Workstation on Windows writes a VMX in the system's code page, and names it on the .encoding line;
    a name Python knows no encoding by leaves the text read as UTF-8."""
    from h2kd.operations import inspect

    images.make_image("vmdk", "monolithicSparse", tmp_path / f"{name}.vmdk", raw=lib / "data2.raw")
    vmx = images.make_vmx(tmp_path, [f"{name}.vmdk"], name=name)
    vmx.write_bytes(vmx.read_text().replace('.encoding = "UTF-8"', f'.encoding = "{declared}"').encode(written_in))
    source = inspect.load_source(str(vmx))
    assert [disk.ref.path for disk in source.disks] == [str(tmp_path / f"{name}.vmdk")]
    assert source.vm is not None and source.vm["name"] == name


def test_verify_compares_every_disk_with_its_source(lib: Path, tmp_path: Path, out: Path) -> None:
    src = tmp_path / "vm"
    src.mkdir()
    images.make_image("vmdk", "monolithicSparse", src / "a.vmdk", raw=lib / "data.raw")
    images.make_image("vdi", None, src / "b.vdi", raw=lib / "data2.raw")
    vmx = images.make_vmx(src, ["a.vmdk", "b.vdi"], name="web01")
    run = run_worker(tmp_path / "w", convert_spec(vmx, out / "web01.qcow2", verify=True), [out])
    assert run.returncode == 0, run.log
    assert [d["compare"]["identical"] for d in run.result["outputs"]["disks"]] == [True, True]
    assert "compare: " in run.log     # the journal sees the phase
    assert_monotonic(run.statuses)
    # Without verify, nothing is compared.
    run = run_worker(tmp_path / "w2", convert_spec(src / "a.vmdk", out / "plain.qcow2"), [out])
    assert run.returncode == 0 and run.result["outputs"]["disks"][0]["compare"] is None, run.log


def test_a_conversion_that_differs_from_its_source_fails_verification(lib: Path, tmp_path: Path, out: Path) -> None:
    """A qemu-img whose output is not what it read (a fault, as of bad memory or a bug): verify catches it, the
    job fails, and no output is left; without verify the same job completes."""
    faulty = tmp_path / "faulty-qemu-img"
    faulty.write_text("#!/bin/sh\n"
                      "qemu-img \"$@\" || exit $?\n"
                      "if [ \"$1\" = convert ]; then\n"
                      "    for last in \"$@\"; do :; done\n"
                      "    printf 'flipped' | dd of=\"$last\" bs=1 seek=1048576 conv=notrunc status=none\n"
                      "fi\n")
    faulty.chmod(0o755)
    source = images.make_image("qcow2", None, tmp_path / "src.qcow2", raw=lib / "data.raw")
    env = {"H2K_QEMU_IMG": str(faulty)}
    run = run_worker(tmp_path / "w", convert_spec(source, out / "d.raw", output_format="raw", verify=True), [out],
                     env=env)
    assert run.returncode == 1, run.log     # worth another attempt: a fault may not come again
    error = run.result["error"]
    assert error["code"] == "TOOL_FAILED" and error["phase"] == "compare" and error["retryable"], error
    assert "differs from its source" in error["message"] and "1048576" in error["message"], error
    assert leftovers(out) == []
    run = run_worker(tmp_path / "w2", convert_spec(source, out / "d.raw", output_format="raw"), [out], env=env)
    assert run.returncode == 0, run.log
    assert not compare(lib / "data.raw", "raw", out / "d.raw", "raw")


def cpus_of_each_run(record: Path) -> list[tuple[str, set[int]]]:
    """What a recording qemu-img wrapper wrote: (its command, the CPUs it was allowed) per run."""
    return [(command, cpu_list(allowed)) for command, allowed in
            (line.split(" ", 1) for line in record.read_text().splitlines())]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to keep a conversion on")
def test_the_conversion_and_its_comparison_run_on_the_cpu_h2kd_gave_and_nothing_else_does(
        lib: Path, tmp_path: Path, out: Path) -> None:
    """h2kd gives each attempt a CPU for qemu-img's long walks (h2kd.runner.placement), counted over the
    machine's CPUs: the convert and the compare are kept on that one of the CPUs the worker may use, counted
    round; the worker's quick looks at the source and the output are not kept anywhere, nor a compressing
    conversion."""
    usable = sorted(os.sched_getaffinity(0))
    record = tmp_path / "runs"
    recording = tmp_path / "recording-qemu-img"
    recording.write_text("#!/bin/sh\n"
                         f"echo \"$1 $(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)\" >> {record}\n"
                         "exec qemu-img \"$@\"\n")
    recording.chmod(0o755)
    source = images.make_image("vmdk", "monolithicSparse", tmp_path / "src.vmdk", raw=lib / "data.raw")
    env = {"H2K_QEMU_IMG": str(recording)}
    for n, given in enumerate((1, len(usable))):      # the second, beyond the CPUs the worker has: the first
        record.unlink(missing_ok=True)
        run = run_worker(tmp_path / f"w{n}", convert_spec(source, out / f"d{n}.qcow2", verify=True), [out],
                         env=env, cpu=given)
        assert run.returncode == 0, run.log
        assert compare(lib / "data.raw", "raw", out / f"d{n}.qcow2", "qcow2")
        runs = cpus_of_each_run(record)
        walks = [(command, cpus) for command, cpus in runs if command in ("convert", "compare")]
        assert [command for command, _ in walks] == ["convert", "compare"], runs
        assert all(cpus == {usable[given % len(usable)]} for _, cpus in walks), (given, runs)
        looks = [(command, cpus) for command, cpus in runs if command not in ("convert", "compare")]
        assert looks and all(cpus == set(usable) for _, cpus in looks), runs
    # Compressing is the work itself, which qemu-img may spread over its threads: left to the kernel.
    record.unlink()
    run = run_worker(tmp_path / "w3", convert_spec(source, out / "c.qcow2", compress=True), [out], env=env, cpu=1)
    assert run.returncode == 0, run.log
    assert [cpus for command, cpus in cpus_of_each_run(record) if command == "convert"] == [set(usable)]


def test_existing_output_is_replaced_only_when_asked(lib: Path, tmp_path: Path, out: Path) -> None:
    source = images.make_image("qcow2", None, tmp_path / "src.qcow2", raw=lib / "data.raw")
    (out / "d.qcow2").write_text("precious")
    run = run_worker(tmp_path / "w1", convert_spec(source, out / "d.qcow2"), [out])
    assert run.returncode == 2 and run.result["error"]["code"] == "OUTPUT_EXISTS"
    assert (out / "d.qcow2").read_text() == "precious" and leftovers(out) == ["d.qcow2"]
    run = run_worker(tmp_path / "w2", convert_spec(source, out / "d.qcow2", overwrite=True), [out])
    assert run.returncode == 0, run.log
    assert compare(lib / "data.raw", "raw", out / "d.qcow2", "qcow2")
    assert leftovers(out) == ["d.qcow2"]     # the replaced file, kept aside until the result was written, is gone


def test_an_overwrite_that_fails_half_way_through_its_commit_leaves_the_old_outputs(lib: Path, tmp_path: Path,
                                                                                    out: Path) -> None:
    """Two disks and a domain XML replace the outputs of an earlier run. The commit renames them one by one;
    when a later one cannot take its name (here something not a file appeared at it during the job), the ones
    already renamed must give their names back to the files they replaced, not leave neither."""
    ova = images.make_ova(tmp_path / "vm.ova", [lib / "data.raw", lib / "data2.raw"], name="webserver")
    for name in ("webserver-disk1.qcow2", "webserver-disk2.qcow2"):
        (out / name).write_text(f"earlier {name}")

    def block_the_xml(_proc: subprocess.Popen[str], status: str) -> None:
        if status.startswith("convert") and not (out / "webserver.xml").exists():
            (out / "webserver.xml").mkdir()

    run = run_worker(tmp_path / "w", convert_spec(ova, out, domain_xml=True, overwrite=True), [out],
                     env={"H2K_RATE_LIMIT": str(8 * MiB)}, on_status=block_the_xml)
    assert run.returncode == 2 and run.result["error"]["code"] == "OUTPUT_EXISTS", run.log
    assert leftovers(out) == ["webserver-disk1.qcow2", "webserver-disk2.qcow2", "webserver.xml"]
    for name in ("webserver-disk1.qcow2", "webserver-disk2.qcow2"):
        assert (out / name).read_text() == f"earlier {name}"


def test_overwrite_replaces_only_the_submitters_own_file(lib: Path, tmp_path: Path, shared: Path) -> None:
    out = shared / "out"
    source = images.make_image("qcow2", None, shared / "src.qcow2", raw=lib / "data.raw")
    alice, bob = {"uid": 64101, "gid": 64101, "groups": [64101], "mode": 0o640}, 64102
    (out / "bobs.qcow2").write_text("bob's disk")
    os.chown(out / "bobs.qcow2", bob, bob)
    run = run_worker(tmp_path / "w1", convert_spec(source, out / "bobs.qcow2", overwrite=True), [out], owner=alice)
    assert run.returncode == 2 and run.result["error"]["code"] == "PERMISSION_DENIED", run.log
    assert "belongs to uid 64102" in run.result["error"]["message"]
    assert (out / "bobs.qcow2").read_text() == "bob's disk" and leftovers(out) == ["bobs.qcow2"]
    (out / "alices.qcow2").write_text("alice's old disk")
    os.chown(out / "alices.qcow2", alice["uid"], alice["gid"])
    run = run_worker(tmp_path / "w2", convert_spec(source, out / "alices.qcow2", overwrite=True), [out], owner=alice)
    assert run.returncode == 0, run.log
    assert compare(lib / "data.raw", "raw", out / "alices.qcow2", "qcow2")
    assert (out / "alices.qcow2").stat().st_uid == alice["uid"]


def test_an_output_gets_the_submitters_ownership_and_the_configured_mode(lib: Path, tmp_path: Path,
                                                                       shared: Path) -> None:
    """h2kd's output_mode reaches the file the submitter gets: 0644 here, neither the default 0640 nor the
    temporary file's 0600, so that a setting lost on its way would show; and it is the submitter's, not root's."""
    alice = {"uid": 64101, "gid": 64101, "groups": [64101], "mode": 0o644}
    out = shared / "out"
    mine = out / "mode-0644"
    mine.mkdir(parents=True)
    os.chown(mine, alice["uid"], alice["gid"])
    source = images.make_image("qcow2", None, shared / "mode-src.qcow2", raw=lib / "data.raw")
    os.chown(source, alice["uid"], alice["gid"])
    run = run_worker(tmp_path / "w", convert_spec(source, mine / "o.qcow2"), [out], owner=alice)
    assert run.returncode == 0, run.log
    st = (mine / "o.qcow2").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (64101, 64101, 0o644), oct(st.st_mode)


def test_a_submitter_left_with_no_group_is_refused_as_the_job_runs_not_given_nogroup(lib: Path, tmp_path: Path,
                                                                                     shared: Path) -> None:
    """Checked at submission, the submitter may have lost every group (or their account) while the job waited:
    the attempt fails PERMISSION_DENIED, saying why, rather than reading as "nogroup", through which a file of
    that group (as NFS's squashed files are) would be read that the submitter cannot."""
    secret = images.make_image("qcow2", None, shared / "nogroup.qcow2", raw=lib / "data.raw")
    os.chown(secret, 0, 65534)
    secret.chmod(0o640)
    run = run_worker(tmp_path / "w", convert_spec(secret, shared / "out" / "o.qcow2"), [shared / "out"],
                     owner={"uid": 64101, "gid": 64101, "groups": [], "mode": 0o640})
    assert run.returncode == 2, run.log
    assert run.result["error"]["code"] == "PERMISSION_DENIED", run.result["error"]
    assert "uid 64101 has no group h2kd may act with" in run.result["error"]["message"]
    assert leftovers(shared / "out") == []


def test_an_output_path_now_leading_where_the_submitter_may_not_write_is_refused(lib: Path, tmp_path: Path,
                                                                                 shared: Path) -> None:
    """h2kd checked at submission that alice may write where her output path led; a symlink of hers in it
    leads, by the time the job runs, to a directory of the output root only root may write in. Root must
    not make her output there."""
    out = shared / "out"
    source = images.make_image("qcow2", None, shared / "src.qcow2", raw=lib / "data.raw")
    alice = {"uid": 64101, "gid": 64101, "groups": [64101], "mode": 0o640}
    root_only, mine = out / "root-only", out / "mine"
    root_only.mkdir(mode=0o711)
    (mine / "sub").mkdir(parents=True)
    for directory in (mine, mine / "sub"):
        os.chown(directory, alice["uid"], alice["gid"])
    (mine / "link").symlink_to(root_only)
    run = run_worker(tmp_path / "w1", convert_spec(source, mine / "link" / "o.qcow2"), [out], owner=alice)
    assert run.returncode == 2 and run.result["error"]["code"] == "PERMISSION_DENIED", run.log
    assert run.result["error"]["message"] == f"as the job runs, permission denied: {mine / 'link'} is not writable by uid 64101"
    assert list(root_only.iterdir()) == []
    # Behind a directory she may not search, a name that is there and one that is not get the same answer,
    # which tells nothing of what lies there.
    closed = out / "closed"
    closed.mkdir(mode=0o700)
    (closed / "there").mkdir()
    messages = []
    for n, target in enumerate((closed / "there", closed / "not-there")):
        (mine / "link").unlink()
        (mine / "link").symlink_to(target)
        run = run_worker(tmp_path / f"c{n}", convert_spec(source, mine / "link" / "o.qcow2"), [out], owner=alice)
        assert run.returncode == 2, run.log
        messages.append((run.result["error"]["code"], run.result["error"]["message"]))
    assert messages[0] == messages[1] and messages[0][0] == "PERMISSION_DENIED", messages
    assert "there" not in messages[0][1] and list((closed / "there").iterdir()) == []
    # Where it may write, a symlinked directory is fine.
    (mine / "link").unlink()
    (mine / "link").symlink_to(mine / "sub")
    run = run_worker(tmp_path / "w2", convert_spec(source, mine / "link" / "o.qcow2"), [out], owner=alice)
    assert run.returncode == 0, run.log
    assert (mine / "sub" / "o.qcow2").stat().st_uid == alice["uid"]


# ---------------------------------------------------------------- inspection

@pytest.mark.parametrize("kind", list(images.KINDS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_inspect_identifies_format_from_content(lib: Path, tmp_path: Path, kind: tuple[str, str | None]) -> None:
    # A misleading name: the report must come from the content.
    source = images.make_image(kind[0], kind[1], tmp_path / "disk.img", raw=lib / "data.raw")
    declared = "raw" if kind[0] == "raw" else None
    run = run_worker(tmp_path / "w", {"operation": "inspect", "image": {"path": str(source), "format": declared}},
                     [tmp_path])
    assert run.returncode == 0, run.log
    report = run.result["outputs"]["report"]
    [disk] = report["disks"]
    assert (report["kind"], disk["format"]) == ("disk", kind[0])
    if kind[0] in ("vmdk", "vhd"):
        assert disk["subformat"] == kind[1]
    assert disk["virtual_size"] == 16 * MiB
    # At least the data (30 % of the disk); VDI/VHD/VHDX allocate in large blocks, so up to all of it.
    assert 0.3 * 16 * MiB < disk["required_size"]["qcow2"] < 17 * MiB
    if kind[0] in ("qcow2", "vmdk", "raw"):
        assert disk["required_size"]["qcow2"] < 0.4 * 16 * MiB
    assert disk["allocated_size"] > 0


def test_inspect_ova_reports_vm_and_disks(lib: Path, tmp_path: Path) -> None:
    ova = images.make_ova(tmp_path / "vm.ova", [lib / "data.raw", lib / "data2.raw"], name="app", cpus=3,
                          memory_mib=3072, firmware="bios", algorithm="sha1")
    run = run_worker(tmp_path / "w", {"operation": "inspect", "image": {"path": str(ova)}}, [tmp_path])
    assert run.returncode == 0, run.log
    report = run.result["outputs"]["report"]
    assert report["kind"] == "ova"
    assert report["vm"]["name"] == "app" and report["vm"]["cpus"] == 3 and report["vm"]["memory_mib"] == 3072
    assert report["vm"]["firmware"] == "bios"
    assert report["vm"]["nics"][0]["model"] == "VmxNet3"
    assert [d["member"] for d in report["disks"]] == ["app-disk1.vmdk", "app-disk2.vmdk"]
    assert [d["virtual_size"] for d in report["disks"]] == [16 * MiB, 8 * MiB]
    assert all(d["subformat"] == "streamOptimized" for d in report["disks"])
    assert [v["algorithm"] for v in report["manifest"]["verified"]] == ["sha1", "sha1"]


# ---------------------------------------------------------------- bad input

def _bad_inputs(lib: Path, tmp: Path, out: Path) -> dict[str, tuple[dict[str, Any], str, str]]:
    """name: (spec, error code, words the message must contain)."""
    src = tmp / "src"
    src.mkdir()
    truncated = images.make_truncated_vmdk(src / "trunc.vmdk")
    junk = images.make_not_an_image(src / "notes.vmdk")
    missing = images.make_missing_extent_vmdk(src)
    bad_sum = images.make_ova(src / "badsum.ova", [lib / "data2.raw"], bad_sum=True)
    traversal = images.make_ova(src / "evil.ova", [lib / "data2.raw"], traversal_member=True)
    good = images.make_image("qcow2", None, src / "good.qcow2", raw=lib / "data2.raw")
    (src / "adir").mkdir()
    os.symlink(good, src / "link.qcow2")
    outside = tmp / "elsewhere"
    outside.mkdir()
    os.symlink(outside, out / "escape")
    (out / "taken.qcow2").write_bytes(b"keep me")
    # Images that make qemu open a file the submitter never named: a secret outside the source's directory.
    secret = tmp / "secret.raw"
    secret.write_bytes(b"secret!!" * 4096)
    json_backing = src / "json-backing.qcow2"
    images.qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    'json:{"driver":"raw","offset":0,"size":4096,"file":{"driver":"file","filename":"%s"}}' % secret, str(json_backing), "1M")
    far_backing = src / "far-backing.qcow2"
    images.qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(far_backing), "1M")
    # "sub/../base.qcow2", sub a link to another directory: qemu opens that directory's parent's base.qcow2, not
    # the one next to the image that the name, made plain, names (and that h2kd would have checked).
    (tmp / "other" / "inner").mkdir(parents=True)
    images.qemu_img("create", "-q", "-f", "qcow2", str(tmp / "other" / "base.qcow2"), "1M")
    images.qemu_img("create", "-q", "-f", "qcow2", str(src / "base.qcow2"), "1M")
    os.symlink(tmp / "other" / "inner", src / "sub")
    dotdot_backing = src / "dotdot-backing.qcow2"
    images.qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-u", "-b", "sub/../base.qcow2", str(dotdot_backing),
                    "1M")
    file_protocol = src / "file-protocol.qcow2"
    images.qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b", f"file:{secret}", str(file_protocol),
                    "1M")
    data_file = src / "data-file.qcow2"
    images.qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on", str(data_file),
                    "32K")
    differencing = _differencing_vhd(src / "checkpoint.avhd")
    differencing_vhdx = _differencing_vhdx(src / "checkpoint.avhdx")
    differencing_vdi = _differencing_vdi(src / "snapshot.vdi")
    linked_clone = _vmdk_child(src, "clone", "twoGbMaxExtentSparse", "C:\\VMs\\Base VM\\clone-base.vmdk")
    orphan = _vmdk_child(src, "orphan", "monolithicSparse")
    (src / "orphan-base.vmdk").unlink()
    cut_flat = images.make_image("vmdk", "monolithicFlat", src / "cut.vmdk", size=4 * MiB)
    os.truncate(src / "cut-flat.vmdk", 3 * MiB)
    chunked_ovf, chunked_ova = _chunked(src / "chunked", lib / "data2.raw"), _chunked(src / "ova", lib / "data2.raw", True)
    for name in ("diskless", "nameless", "blank"):
        (src / name).mkdir()
    diskless = images.make_vmx(src / "diskless", [], name="diskless")       # its CD-ROM alone
    nameless = images.make_vmx(src / "nameless", [""], name="nameless")
    blank = src / "blank" / "blank.ovf"       # a blank disk: no ovf:fileRef, to be made empty at import
    blank.write_text(images.make_ovf_text("blank", [("blank-disk1.vmdk", 0, 8 * MiB)]).replace(
        ' ovf:fileRef="file1"', "", 1))
    return {
        "vm without a disk": (convert_spec(diskless, out), "UNSUPPORTED", "without a disk to convert"),
        "vmx disk without a file name": (convert_spec(nameless, out), "UNSUPPORTED", "scsi0:0 no file name"),
        "blank ovf disk": (convert_spec(blank, out), "UNSUPPORTED", "'vmdisk1' has no file: it is a blank disk"),
        "chunked ovf": (convert_spec(chunked_ovf, out), "UNSUPPORTED", "cat chunky-disk1.vmdk.0* > chunky-disk1.vmdk"),
        "chunked ova": (convert_spec(chunked_ova, out), "UNSUPPORTED", "extract the OVA (tar xf), join them"),
        "gzip ovf": (convert_spec(_gzipped(src / "gz", lib / "data2.raw"), out), "UNSUPPORTED",
                     "is gzip-compressed, which is not supported: decompress it (gunzip)"),
        "flat extent cut short": (convert_spec(cut_flat, out / "o.qcow2"), "INVALID_IMAGE", "the copy is incomplete"),
        "differencing vhd": (convert_spec(differencing, out / "o.qcow2", "vhd"), "UNSUPPORTED", "differencing VHD"),
        "differencing vhdx": (convert_spec(differencing_vhdx, out / "o.qcow2"), "UNSUPPORTED",
                              "is a differencing VHDX (a Hyper-V checkpoint, .avhdx); merge the checkpoint"),
        "differencing vdi": (convert_spec(differencing_vdi, out / "o.qcow2"), "UNSUPPORTED",
                             "snapshot.vdi) is a differencing VDI (a VirtualBox snapshot of another disk); merge"),
        "linked clone vmdk": (convert_spec(linked_clone, out / "o.qcow2"), "UNSUPPORTED",
                              'clone.vmdk) is a VMDK snapshot or linked clone whose parent disk is "C:\\VMs\\Base '
                              'VM\\clone-base.vmdk", a Windows path, which cannot be opened here; consolidate it'),
        "vmdk snapshot without its parent": (convert_spec(orphan, out / "o.qcow2"), "UNSUPPORTED",
                                             'whose parent disk is "orphan-base.vmdk", which does not exist; '
                                             "consolidate it"),
        "json: backing file": (convert_spec(json_backing, out / "o.raw", output_format="raw"), "PERMISSION_DENIED",
                               "not a plain file name"),
        "file: backing file": (convert_spec(file_protocol, out / "o.raw", output_format="raw"), "PERMISSION_DENIED",
                               "not a plain file name"),
        "backing file through a link and ..": (convert_spec(dotdot_backing, out / "o.raw", output_format="raw"),
                                               "PERMISSION_DENIED", "not a plain file name"),
        "backing file elsewhere": (convert_spec(far_backing, out / "o.raw", output_format="raw"),
                                   "PERMISSION_DENIED", "outside its directory"),
        "external data file": (convert_spec(data_file, out / "o.raw", output_format="raw"), "PERMISSION_DENIED",
                               "external file"),
        "truncated vmdk": (convert_spec(truncated, out / "o.qcow2"), "INVALID_IMAGE", "damaged"),
        "not an image": (convert_spec(junk, out / "o.qcow2"), "INVALID_IMAGE", "not a disk image"),
        "missing extent": (convert_spec(missing, out / "o.qcow2"), "INVALID_IMAGE", "does not exist"),
        "manifest mismatch": (convert_spec(bad_sum, out), "INVALID_IMAGE", "does not match"),
        "path traversal member": (convert_spec(traversal, out), "PERMISSION_DENIED", "../../etc/x"),
        "directory": (convert_spec(src / "adir", out / "o.qcow2"), "INVALID_IMAGE", "is a directory"),
        "device node": (convert_spec(Path("/dev/null"), out / "o.qcow2"), "INVALID_IMAGE", "device node"),
        "symlink": (convert_spec(src / "link.qcow2", out / "o.qcow2"), "PERMISSION_DENIED", "symbolic link"),
        "output outside roots": (convert_spec(good, outside / "o.qcow2"), "PERMISSION_DENIED", "output roots"),
        "symlinked parent escaping roots": (convert_spec(good, out / "escape" / "o.qcow2"), "PERMISSION_DENIED",
                                            "output roots"),
        "output exists": (convert_spec(good, out / "taken.qcow2"), "OUTPUT_EXISTS", "already exists"),
        "declared format differs": (convert_spec(good, out / "o.qcow2", "vmdk"), "INVALID_IMAGE", "qcow2"),
    }


def _chunked(directory: Path, raw: Path, ova: bool = False) -> Path:
    """An OVF (or OVA) whose disk is split into chunks, as `ovftool --chunkSize` writes it."""
    directory.mkdir()
    vmdk = images.make_image("vmdk", "streamOptimized", directory / "chunky-disk1.vmdk", raw=raw)
    data = vmdk.read_bytes()
    vmdk.unlink()
    size = 64 * 1024
    pieces = [(f"chunky-disk1.vmdk.{n:09d}", data[at:at + size]) for n, at in enumerate(range(0, len(data), size))]
    assert len(pieces) > 1
    ovf = images.make_ovf_text("chunky", [("chunky-disk1.vmdk", len(data), raw.stat().st_size)]).replace(
        'ovf:id="file1"', f'ovf:id="file1" ovf:chunkSize="{size}"', 1).encode()
    if not ova:
        for name, piece in pieces:
            (directory / name).write_bytes(piece)
        (directory / "chunky.ovf").write_bytes(ovf)
        return directory / "chunky.ovf"
    import io
    import tarfile
    with tarfile.open(directory / "chunky.ova", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in [("chunky.ovf", ovf), *pieces]:
            member = tarfile.TarInfo(name)
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))
    return directory / "chunky.ova"


def _gzipped(directory: Path, raw: Path) -> Path:
    """An OVF whose disk file is gzip-compressed (ovf:compression="gzip")."""
    import gzip
    directory.mkdir()
    vmdk = images.make_image("vmdk", "streamOptimized", directory / "gz-disk1.vmdk", raw=raw)
    vmdk.write_bytes(gzip.compress(vmdk.read_bytes()))
    ovf = images.make_ovf_text("gz", [("gz-disk1.vmdk", vmdk.stat().st_size, raw.stat().st_size)]).replace(
        'ovf:id="file1"', 'ovf:id="file1" ovf:compression="gzip"', 1)
    (directory / "gz.ovf").write_text(ovf)
    return directory / "gz.ovf"


def _differencing_vhdx(path: Path) -> Path:
    """A VHDX whose File Parameters say it has a parent (HasParent), as a Hyper-V checkpoint's do."""
    images.qemu_img("create", "-q", "-f", "vhdx", str(path), "8M")
    data = bytearray(path.read_bytes())
    # The metadata table ("metadata" at its region's start) lists the File Parameters item by its GUID, with
    # the item's offset in the region; the item's second 32-bit word holds the flags, HasParent is bit 1.
    region = data.index(b"metadata", 192 * 1024)
    entry = data.index(bytes.fromhex("3767a1ca36fa434db3b633f0aa44e76b"), region, region + 64 * 1024)
    item = region + int.from_bytes(data[entry + 16:entry + 20], "little")
    data[item + 4] |= 2
    path.write_bytes(bytes(data))
    return path


def _differencing_vhd(path: Path) -> Path:
    """A VHD whose footer says it is a differencing disk (Hyper-V checkpoint), with a footer checksum qemu takes."""
    images.qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", str(path), "8M")
    subprocess.run(["qemu-io", "-f", "vpc", "-c", "write -P 7 0 64k", str(path)], check=True, capture_output=True)
    data = bytearray(path.read_bytes())
    for start in (0, len(data) - 512):         # the footer, and its copy at the start of a dynamic VHD
        footer = data[start:start + 512]
        footer[60:64] = (4).to_bytes(4, "big")
        footer[64:68] = bytes(4)
        footer[64:68] = ((~sum(footer)) & 0xFFFFFFFF).to_bytes(4, "big")
        data[start:start + 512] = footer
    path.write_bytes(bytes(data))
    return path


def _differencing_vdi(path: Path) -> Path:
    """A VDI whose header says it is a differencing image (a VirtualBox snapshot): its type, 4, and the UUIDs of
    its parent (the link UUID, the parent's modification UUID) at 0x1a8 and 0x1b8."""
    import uuid

    images.qemu_img("create", "-q", "-f", "vdi", str(path), "8M")
    subprocess.run(["qemu-io", "-f", "vdi", "-c", "write -P 7 0 64k", str(path)], check=True, capture_output=True)
    data = bytearray(path.read_bytes())
    data[0x4C:0x50] = (4).to_bytes(4, "little")
    data[0x1A8:0x1C8] = uuid.uuid4().bytes_le + uuid.uuid4().bytes_le
    path.write_bytes(bytes(data))
    return path


def _vmdk_child(directory: Path, name: str, subformat: str, hint: str | None = None) -> Path:
    """NAME.vmdk, a VMDK snapshot delta (of `subformat`) of NAME-base.vmdk next to it, its parentFileNameHint
    made `hint` if given (as a Workstation linked clone made on Windows names its parent)."""
    base = images.make_image("vmdk", "monolithicSparse", directory / f"{name}-base.vmdk", size=4 * MiB)
    child = directory / f"{name}.vmdk"
    images.qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", "-F", "vmdk", "-b", base.name,
                    str(child))
    if hint is not None:
        child.write_text(child.read_text().replace(f'parentFileNameHint="{base.name}"',
                                                   f'parentFileNameHint="{hint}"'))
    return child


BAD_INPUTS = ["chunked ovf", "chunked ova", "gzip ovf", "flat extent cut short", "differencing vhd", "differencing vhdx", "json: backing file", "file: backing file", "backing file through a link and ..", "backing file elsewhere", "external data file", "truncated vmdk", "not an image", "missing extent", "manifest mismatch", "path traversal member",
              "directory", "device node", "symlink", "output outside roots", "symlinked parent escaping roots",
              "output exists", "declared format differs", "vm without a disk", "vmx disk without a file name",
              "blank ovf disk", "differencing vdi", "linked clone vmdk", "vmdk snapshot without its parent"]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_fails_cleanly(lib: Path, tmp_path: Path, out: Path, name: str) -> None:
    spec, code, words = _bad_inputs(lib, tmp_path, out)[name]
    before = leftovers(out)
    run = run_worker(tmp_path / "w", spec, [out])
    assert run.returncode == 2, run.log
    assert run.result["status"] == "failed"
    error = run.result["error"]
    assert error["code"] == code, error
    assert words in error["message"], error
    assert error["retryable"] is False
    assert leftovers(out) == before
    assert not (tmp_path / "elsewhere").exists() or leftovers(tmp_path / "elsewhere") == []


# (format, subformat, bytes cut off the end): qemu reads what is missing as zeros, and qemu-img check finds
# nothing wrong with a VDI cut anywhere, nor with a qcow2 or sparse VMDK cut within its last cluster (grain).
CUT_SHORT = [("vdi", None, 5 * MiB), ("vdi", None, 512), ("qcow2", None, 4096), ("vmdk", "monolithicSparse", 4096)]


@pytest.mark.parametrize("fmt, subformat, cut", CUT_SHORT, ids=[f"{fmt}-{cut}" for fmt, _, cut in CUT_SHORT])
def test_an_image_copy_cut_short_is_refused(tmp_path: Path, out: Path, fmt: str, subformat: str | None,
                                            cut: int) -> None:
    raw = images.make_raw_with_data(tmp_path / "data.raw", 16 * MiB, 0.05, seed=12)
    source = images.make_image(fmt, subformat, tmp_path / f"cut.{fmt}", raw=raw)
    assert source.stat().st_size < 16 * MiB        # dynamic: the blocks without data take no room
    os.truncate(source, source.stat().st_size - cut)
    run = run_worker(tmp_path / "w", convert_spec(source, out / "o.qcow2"), [out])
    assert run.returncode == 2, run.log
    error = run.result["error"]
    assert error["code"] == "INVALID_IMAGE", error
    assert "the copy is incomplete" in error["message"], error
    assert error["retryable"] is False
    assert leftovers(out) == []
    # validate says so too, though qemu-img check finds nothing wrong.
    run = run_worker(tmp_path / "v", {"operation": "validate", "image": {"path": str(source)}}, [out])
    assert run.returncode == 2 and run.result["error"]["code"] == "INVALID_IMAGE", run.log
    assert "the copy is incomplete" in run.result["error"]["message"], run.result["error"]


def test_a_fixed_vhd_cut_short_is_refused_unless_declared_raw(tmp_path: Path, out: Path) -> None:
    """A fixed VHD is a raw disk followed by its footer: cut short, it has none, and reads as a raw disk (with a
    partition table) that lacks its end. Its name says what it was."""
    raw = images.make_raw_with_data(tmp_path / "data.raw", 16 * MiB, 0.25, seed=8, partition_table=True)
    source = images.make_image("vhd", "fixed", tmp_path / "cut.vhd", raw=raw)
    os.truncate(source, source.stat().st_size - 4096)
    for operation in ("convert", "validate"):
        spec = convert_spec(source, out / "o.qcow2") if operation == "convert" else \
            {"operation": "validate", "image": {"path": str(source)}}
        run = run_worker(tmp_path / operation, spec, [out])
        assert run.returncode == 2, run.log
        error = run.result["error"]
        assert error["code"] == "INVALID_IMAGE", error
        assert "has no VHD footer" in error["message"] and "the copy is incomplete" in error["message"], error
        assert leftovers(out) == []
    # Said to be raw, it is converted as it is.
    run = run_worker(tmp_path / "raw", convert_spec(source, out / "o.qcow2", fmt="raw"), [out])
    assert run.returncode == 0, run.log
    assert (out / "o.qcow2").exists()
    # Virtual PC before 2004 wrote a 511-byte footer, which qemu does not read: such a disk is whole, as raw.
    old = tmp_path / "old.vhd"
    shutil.copy(raw, old)
    with open(old, "ab") as f:
        f.write(b"conectix" + bytes(503))
    run = run_worker(tmp_path / "old", convert_spec(old, out / "old.qcow2"), [out])
    assert run.returncode == 0, run.log


def test_a_split_vmdk_with_an_extent_file_cut_short_is_refused(tmp_path: Path, out: Path) -> None:
    """A VMDK split into 2 GiB extent files (VMware Workstation's default) whose second file was cut within its
    last grain: qemu-img check finds nothing wrong, and qemu would read the missing end as zeros."""
    raw = tmp_path / "data.raw"
    with open(raw, "wb") as f:      # sparse, with data in both extents
        f.truncate(2048 * MiB + 16 * MiB)
        for at, size in ((0, MiB), (2048 * MiB + MiB, 8 * MiB)):
            f.seek(at)
            f.write(random.Random(at).randbytes(size))
    source = images.make_image("vmdk", "twoGbMaxExtentSparse", tmp_path / "split.vmdk", raw=raw)
    extents = sorted(tmp_path.glob("split-s*.vmdk"))
    assert [p.name for p in extents] == ["split-s001.vmdk", "split-s002.vmdk"]
    validate = {"operation": "validate", "image": {"path": str(source)}}
    intact = run_worker(tmp_path / "i", validate, [out])
    assert intact.returncode == 0, intact.log
    with open(extents[0], "ab") as f:      # whole, but not ending on a grain: qemu's map is asked, and agrees
        f.write(bytes(512))
    padded = run_worker(tmp_path / "p", validate, [out])
    assert padded.returncode == 0, padded.log
    for cut, named in ((extents[1], "split-s002.vmdk"), (extents[0], "split-s001.vmdk")):
        os.truncate(cut, cut.stat().st_size - 4096 - 512)
        for run in (run_worker(tmp_path / f"w-{named}", convert_spec(source, out / "o.qcow2"), [out]),
                    run_worker(tmp_path / f"v-{named}", validate, [out])):
            assert run.returncode == 2, run.log
            error = run.result["error"]
            assert error["code"] == "INVALID_IMAGE", error
            assert named in error["message"] and "the copy is incomplete" in error["message"], error
        assert leftovers(out) == []


# (base format, subformat, overlay format, the file cut, bytes cut off its end): a base VMDK's flat extent, a qcow2
# cut by half (qemu-img check of the base finds it) or within its last cluster (it does not), a VDI cut anywhere.
CUT_BASES = [("vmdk", "monolithicFlat", "vmdk", "base-flat.vmdk", 48 * MiB),
             ("qcow2", None, "qcow2", "base.qcow2", 32 * MiB), ("qcow2", None, "qcow2", "base.qcow2", 4096),
             ("vdi", None, "qcow2", "base.vdi", 512)]


@pytest.mark.parametrize("fmt, subformat, overlay_format, cut_file, cut", CUT_BASES,
                         ids=[f"{overlay}-over-{fmt}-{cut}" for fmt, _, overlay, _, cut in CUT_BASES])
def test_the_base_of_a_snapshot_cut_short_is_refused(tmp_path: Path, out: Path, fmt: str, subformat: str | None,
                                                     overlay_format: str, cut_file: str, cut: int) -> None:
    """qemu reads the missing end of a snapshot's base as zeros, as it does the top image's: the snapshot, holding
    nothing of its own, would convert "successfully" into zeros where the base's data was."""
    raw = tmp_path / "data.raw"
    raw.write_bytes(b"\xab" * 64 * MiB)
    images.make_image(fmt, subformat, tmp_path / f"base.{fmt}", raw=raw)
    top = images.make_overlay(tmp_path / f"top.{overlay_format}", tmp_path / f"base.{fmt}", overlay_format, fmt)
    run = run_worker(tmp_path / "whole", convert_spec(top, out / "whole.qcow2"), [out])
    assert run.returncode == 0, run.log
    assert compare(raw, "raw", out / "whole.qcow2", "qcow2")
    os.unlink(out / "whole.qcow2")
    os.truncate(tmp_path / cut_file, (tmp_path / cut_file).stat().st_size - cut)
    validate = {"operation": "validate", "image": {"path": str(top)}}
    for run in (run_worker(tmp_path / "w", convert_spec(top, out / "o.qcow2"), [out]),
                run_worker(tmp_path / "v", validate, [out])):
        assert run.returncode == 2, run.log
        error = run.result["error"]
        assert error["code"] == "INVALID_IMAGE", error
        assert cut_file in error["message"], error
        assert "the copy is incomplete" in error["message"] or "is damaged" in error["message"], error
    assert leftovers(out) == []


def test_the_cut_short_check_reads_only_the_file_that_was_vetted(lib: Path, tmp_path: Path) -> None:
    """It opens the image again by name, as root: a file swapped in meanwhile (by a directory the submitter
    owns) is refused unread, and a FIFO does not hang the worker."""
    import shutil as _shutil

    from h2kd.operations import inspect
    from h2kd.operations.qemuimg import OperationError

    source = images.make_image("vdi", None, tmp_path / "d.vdi", raw=lib / "data.raw")
    loaded = inspect.load_source(str(source), "vdi", check_disks=False)
    inspect.refuse_incomplete(loaded.disks[0], None, loaded.identities)
    _shutil.copy(source, tmp_path / "other.vdi")
    os.replace(tmp_path / "other.vdi", source)
    for swap in (lambda: None, lambda: (os.unlink(source), os.mkfifo(source))):
        swap()
        with pytest.raises(OperationError) as refused:
            inspect.refuse_incomplete(loaded.disks[0], None, loaded.identities)
        assert refused.value.code == "SOURCE_CHANGED", refused.value.message


def test_a_qcow2_ending_in_a_compressed_cluster_is_not_taken_for_a_cut_copy(tmp_path: Path, out: Path) -> None:
    """Its file ends before the last cluster qemu-img check counts, as a cut one does; its data is all there."""
    raw = tmp_path / "text.raw"
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
        for position in range(0, 4 * MiB, 192 * 1024):
            f.seek(position)
            f.write(b"compressible " * 300 + os.urandom(1000))
    source = tmp_path / "packed.qcow2"
    images.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(source))
    checked = json.loads(images.qemu_img("check", "--output=json", str(source)))
    assert checked["image-end-offset"] > source.stat().st_size
    run = run_worker(tmp_path / "w", convert_spec(source, out / "o.qcow2"), [out])
    assert run.returncode == 0, run.log
    assert compare(raw, "raw", out / "o.qcow2", "qcow2")


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_a_vhd_qemu_would_size_by_its_geometry_keeps_its_last_sectors(tmp_path: Path, out: Path,
                                                                      subformat: str) -> None:
    """A VHD from VirtualBox: qemu alone takes its size from the CHS geometry, short of the size the footer
    states, and the copy would lose the disk's end (a GPT's backup header)."""
    size = 16 * MiB + 64 * 1024          # not a whole number of the geometry's cylinders
    raw = images.make_raw_with_data(tmp_path / "disk.raw", size, 0.3, seed=11)
    with open(raw, "r+b") as f:
        f.seek(size - 4096)
        f.write(os.urandom(4096))
    source = images.make_chs_sized_vhd(tmp_path / "vbox.vhd", raw, subformat)
    assert json.loads(images.qemu_img("info", "--output=json", "-f", "vpc", str(source)))["virtual-size"] < size
    run = run_worker(tmp_path / "w", convert_spec(source, out / "disk.qcow2"), [out])
    assert run.returncode == 0, run.log
    [disk] = run.result["outputs"]["disks"]
    assert disk["virtual_size"] == size
    assert run.result["outputs"]["report"]["disks"][0]["virtual_size"] == size
    assert json.loads(images.qemu_img("info", "--output=json", str(out / "disk.qcow2")))["virtual-size"] == size
    assert compare(raw, "raw", out / "disk.qcow2", "qcow2")
    assert leftovers(out) == ["disk.qcow2"]


def test_source_disappearing_mid_conversion(lib: Path, tmp_path: Path, out: Path) -> None:
    images.make_raw_with_data(tmp_path / "big.raw", 16 * MiB, 0.5, seed=3)
    source = images.make_image("vmdk", "monolithicSparse", tmp_path / "big.vmdk", raw=tmp_path / "big.raw")

    def remove_source(proc: subprocess.Popen[str], status: str) -> None:
        report = parse_status(status)
        if report and report.phase == "convert" and source.exists():
            source.unlink()

    run = run_worker(tmp_path / "w", convert_spec(source, out / "o.qcow2"), [out],
                     env={"H2K_RATE_LIMIT": str(4 * MiB)}, on_status=remove_source)
    assert run.returncode == 1, run.log
    assert run.result["error"]["code"] == "SOURCE_CHANGED"
    assert "disappeared" in run.result["error"]["message"]
    assert leftovers(out) == []


def test_the_source_is_checked_on_the_descriptor_root_reads_not_only_by_path(tmp_path: Path) -> None:
    """The worker checks the source by path; if another file takes its place before the operation opens it,
    the operation's own descriptor is checked too, before root reads a byte of it."""
    from h2kd.operations import inspect
    from h2kd.operations.qemuimg import OperationError

    checked, other = tmp_path / "checked.raw", tmp_path / "other.raw"
    for path in (checked, other):
        path.write_bytes(os.urandom(4096))
    st = checked.stat()
    inspect.expect_source(str(checked), f"{st.st_dev}:{st.st_ino}")
    assert inspect.load_source(str(checked), "raw", check_disks=False).disks
    os.replace(other, checked)     # swapped in after the worker's check
    with pytest.raises(OperationError) as refused:
        inspect.load_source(str(checked), "raw", check_disks=False)
    assert refused.value.code == "SOURCE_CHANGED" and "replaced after the job was submitted" in refused.value.message


def test_a_source_without_a_signature_is_probed_through_the_descriptor_that_was_checked(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """Whether a source qemu-img calls raw ends in a VHD footer is read from the file root opened and checked:
    by its path, after the submitter swapped a directory on the way for a symlink, root would open another file
    (and tell whether it ends in a footer, or hang on a FIFO)."""
    from h2kd.operations import inspect, qemuimg

    theirs, elsewhere = tmp_path / "theirs", tmp_path / "elsewhere"
    theirs.mkdir()
    elsewhere.mkdir()
    source = images.make_raw_with_data(theirs / "disk.img", 4 * MiB, 0.25, partition_table=True)
    images.make_image("vhd", "fixed", elsewhere / "disk.img", raw=source)
    real_info = qemuimg.info
    swapped = []

    def info_then_swap(image: Any, *args: Any, **kwargs: Any) -> Any:
        """qemu-img's own look at the source, then the swap."""
        result = real_info(image, *args, **kwargs)
        if not swapped:
            theirs.rename(tmp_path / "theirs.moved")
            theirs.symlink_to(elsewhere)
            swapped.append(image)
        return result

    monkeypatch.setattr(qemuimg, "info", info_then_swap)
    loaded = inspect.load_source(str(source), check_disks=False)
    assert swapped == [str(source)]
    assert loaded.format == "raw" and loaded.disks[0].ref.format == "raw"


def test_the_workers_source_check_tells_nothing_of_what_is_there(tmp_path: Path) -> None:
    """The worker looks the source up again as root, by path, which a submitter can lead (by a symlink
    swapped into it) into a directory closed to them: another file, no file and a path through a file all
    get the one answer, so a failed job tells nothing of what lies there."""
    from h2kd.operations import inspect
    from h2kd.operations.qemuimg import OperationError

    there = tmp_path / "there.raw"
    there.write_bytes(b"\0" * 512)
    answers = set()
    for path in (there, tmp_path / "missing.raw", there / "below"):
        with pytest.raises(OperationError) as refused:
            inspect.expect_source(str(path), "1:2")
        assert refused.value.code == "SOURCE_CHANGED"
        answers.add(refused.value.message.replace(str(path), "PATH"))
    assert answers == {"the source PATH was moved, removed or replaced after the job was submitted; submit it "
                       "again"}


def _qemu_img_children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in children if Path(f"/proc/{c}/comm").read_text().strip() == "qemu-img"]


def test_sigterm_mid_conversion_cancels_and_cleans_up(lib: Path, tmp_path: Path, out: Path) -> None:
    images.make_raw_with_data(tmp_path / "big.raw", 32 * MiB, 0.5, seed=4)
    source = images.make_image("qcow2", None, tmp_path / "big.qcow2", raw=tmp_path / "big.raw")
    seen: dict[str, Any] = {}

    def terminate(proc: subprocess.Popen[str], status: str) -> None:
        report = parse_status(status)
        if report and report.phase == "convert" and report.fraction and not seen:
            seen["children"] = _qemu_img_children(proc.pid)
            seen["partial"] = leftovers(out)
            proc.send_signal(signal.SIGTERM)

    run = run_worker(tmp_path / "w", convert_spec(source, out / "o.qcow2"), [out],
                     env={"H2K_RATE_LIMIT": str(4 * MiB)}, on_status=terminate)
    assert seen["children"] and seen["partial"], "the signal must arrive while qemu-img writes"
    assert run.returncode == 143, run.log
    assert run.result["status"] == "cancelled" and run.result["error"] is None
    assert leftovers(out) == []
    assert not any(Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/comm").read_text().strip() == "qemu-img"
                   for pid in seen["children"])



# Runs the worker (the command line after the wrapper: PYTHON -m h2kd.worker --spec ... --result ...) with a
# SIGTERM sent to itself at a chosen point: after the outputs got their names, or as the result is written.
_LATE_STOP = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
from h2kd.operations import convert
from h2kd.worker import main
where = os.environ["H2K_TEST_STOP_AT"]
def stop_after(real):
    def call(*args, **kwargs):
        value = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return value
    return call
def stop_before(real):
    def call(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    return call
if where == "committed":
    convert._commit = stop_after(convert._commit)
else:
    main._write_result = stop_before(main._write_result)
sys.argv = ["h2k-worker", *sys.argv[4:]]
main.main()
"""


@pytest.mark.parametrize("where", ["committed", "writing the result"])
def test_a_stop_once_the_outputs_have_their_names_lets_the_attempt_complete(lib: Path, tmp_path: Path, out: Path,
                                                                          where: str) -> None:
    """A cancel, an administrator's stop or the time limit that comes once the outputs got their names (or as the
    result is written) finds the work done: the attempt reports it completed, with its outputs, rather than
    cancelled with its outputs left in place, which a retry would then find in its way."""
    script = tmp_path / "late_stop.py"
    script.write_text(_LATE_STOP)
    source = images.make_image("qcow2", None, tmp_path / "src.qcow2", raw=lib / "data2.raw")
    run = run_worker(tmp_path / "w", convert_spec(source, out / "disk.qcow2"), [out], wrapper=[PYTHON, str(script)],
                     env={"H2K_TEST_STOP_AT": "committed" if where == "committed" else "result"})
    assert run.returncode == 0, run.log
    assert run.result["status"] == "completed", run.result
    assert [d["path"] for d in run.result["outputs"]["disks"]] == [str(out / "disk.qcow2")]
    assert leftovers(out) == ["disk.qcow2"]
    assert compare(lib / "data2.raw", "raw", out / "disk.qcow2", "qcow2")
    assert "asked to stop (cancelled) with the outputs already in place" in run.log

@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_running_out_of_space_mid_way(lib: Path, tmp_path: Path, small_tmpfs: Path) -> None:
    images.make_raw_with_data(tmp_path / "six.raw", 16 * MiB, 6 / 16, seed=5)
    source = images.make_image("qcow2", None, tmp_path / "six.qcow2", raw=tmp_path / "six.raw")   # ~6 MiB needed
    ballast = small_tmpfs / "ballast"

    def fill_disk(proc: subprocess.Popen[str], status: str) -> None:
        # Another writer takes the space after the up-front check passed.
        report = parse_status(status)
        if report and report.phase == "convert" and not ballast.exists():
            with open(ballast, "wb") as f:
                f.write(b"\1" * 4 * MiB)

    run = run_worker(tmp_path / "w", convert_spec(source, small_tmpfs / "o.qcow2"), [small_tmpfs],
                     env={"H2K_RATE_LIMIT": str(2 * MiB)}, on_status=fill_disk)
    assert run.returncode == 1, run.log
    assert run.result["error"]["code"] == "NO_SPACE"
    assert "no space" in run.result["error"]["message"].lower()
    assert leftovers(small_tmpfs) == ["ballast"]


def test_not_enough_space_is_refused_before_starting(lib: Path, tmp_path: Path, small_tmpfs: Path) -> None:
    source = images.make_image("qcow2", None, tmp_path / "src.qcow2", raw=lib / "data.raw")   # ~5 MiB of data
    (small_tmpfs / "ballast").write_bytes(b"\1" * 5 * MiB)
    run = run_worker(tmp_path / "w", convert_spec(source, small_tmpfs / "o.qcow2"), [small_tmpfs])
    assert run.returncode == 1, run.log
    assert run.result["error"]["code"] == "NO_SPACE"
    assert "needs" in run.result["error"]["message"]
    assert not any(p.startswith("o.qcow2") for p in leftovers(small_tmpfs))
    assert "convert:" not in " ".join(run.statuses)


# ---------------------------------------------------------------- validation

def test_validate_checks_and_compares(lib: Path, tmp_path: Path) -> None:
    good = images.make_image("qcow2", None, tmp_path / "good.qcow2", raw=lib / "data.raw")
    other = images.make_image("vdi", None, tmp_path / "same.vdi", raw=lib / "data.raw")
    different = images.make_image("vdi", None, tmp_path / "diff.vdi", raw=lib / "data2.raw")
    run = run_worker(tmp_path / "w1", {"operation": "validate", "image": {"path": str(good)},
                                       "parameters": {"compare_with": str(other)}}, [tmp_path])
    assert run.returncode == 0, run.log
    assert run.result["outputs"]["check"]["status"] == "ok"
    assert run.result["outputs"]["compare"]["identical"] is True
    run = run_worker(tmp_path / "w2", {"operation": "validate", "image": {"path": str(good)},
                                       "parameters": {"compare_with": str(different)}}, [tmp_path])
    assert run.returncode == 2
    assert run.result["error"]["code"] == "VALIDATION_FAILED"
    assert run.result["outputs"]["compare"]["identical"] is False



def test_compare_with_is_looked_up_as_the_submitter_before_root_reads_it(lib: Path, tmp_path: Path,
                                                                        shared: Path) -> None:
    """compare_with names a file by path alone. A directory on that path swapped, after submission, for a link to
    another user's private directory leads root to their file: the job must get the submitter's answer
    (permission denied), not anything root read there, such as the names of the disks a private VMX lists."""
    alice = {"uid": 64101, "gid": 64101, "groups": [64101], "mode": 0o640}
    image = images.make_image("qcow2", None, shared / "mine.qcow2", raw=lib / "data2.raw")
    private = shared / "bobs"
    private.mkdir(mode=0o700)
    (private / "vm.vmx").write_text('config.version = "8"\nscsi0:0.present = "TRUE"\n'
                                    'scsi0:0.fileName = "PAYROLL-DB-confidential.vmdk"\n')
    (private / "vm.vmx").chmod(0o600)
    os.chown(private / "vm.vmx", 64102, 64102)
    os.chown(private, 64102, 64102)
    (shared / "alices").symlink_to(private)      # where alice's own directory was when h2kd checked her spec
    st = image.stat()
    run = run_worker(tmp_path / "w", {"operation": "validate", "image": {"path": str(image)},
                                      "parameters": {"compare_with": str(shared / "alices" / "vm.vmx")}},
                     [shared / "out"], owner=alice, source_identity=f"{st.st_dev}:{st.st_ino}")
    assert run.returncode == 2, run.log
    assert run.result["error"]["code"] == "PERMISSION_DENIED", run.result["error"]
    assert "PAYROLL" not in json.dumps(run.result) and "PAYROLL" not in run.log
    # Gone from where the submitter can see: said so, not taken for a refusal.
    run = run_worker(tmp_path / "w2", {"operation": "validate", "image": {"path": str(image)},
                                       "parameters": {"compare_with": str(shared / "gone.qcow2")}},
                     [shared / "out"], owner=alice, source_identity=f"{st.st_dev}:{st.st_ino}")
    assert run.result["error"]["code"] == "INVALID_IMAGE", run.result["error"]
    assert "no such file" in run.result["error"]["message"]


def test_compare_with_must_still_lie_under_the_source_roots_as_the_job_runs(lib: Path, tmp_path: Path,
                                                                         shared: Path) -> None:
    """The administrator's source_roots were checked at submission; a link of the submitter's on the way, pointed
    elsewhere since, must not make the job read a file outside them, even one the submitter may read."""
    alice = {"uid": 64101, "gid": 64101, "groups": [64101], "mode": 0o640}
    sources = shared / "sources"
    sources.mkdir()
    image = images.make_image("qcow2", None, sources / "mine.qcow2", raw=lib / "data2.raw")
    elsewhere = images.make_image("qcow2", None, shared / "elsewhere.qcow2", raw=lib / "data2.raw")
    (sources / "link").symlink_to(sources)
    st = image.stat()
    spec = {"operation": "validate", "image": {"path": str(image)},
            "parameters": {"compare_with": str(sources / "link" / "mine.qcow2")}}
    run = run_worker(tmp_path / "w1", spec, [shared / "out"], owner=alice, source_identity=f"{st.st_dev}:{st.st_ino}",
                     source_roots=[sources])
    assert run.returncode == 0 and run.result["outputs"]["compare"]["identical"], run.log
    (sources / "link").unlink()
    (sources / "link").symlink_to(shared)       # now leads out of the source roots
    spec["parameters"]["compare_with"] = str(sources / "link" / elsewhere.name)
    run = run_worker(tmp_path / "w2", spec, [shared / "out"], owner=alice, source_identity=f"{st.st_dev}:{st.st_ino}",
                     source_roots=[sources])
    assert run.returncode == 2, run.log
    assert run.result["error"]["code"] == "PERMISSION_DENIED", run.result["error"]
    assert "source" in run.result["error"]["message"] and run.result["outputs"].get("compare") is None

def test_validate_reports_a_corrupt_qcow2(lib: Path, tmp_path: Path) -> None:
    image = images.make_image("qcow2", None, tmp_path / "bad.qcow2", raw=lib / "data.raw")
    info = json.loads(images.qemu_img("check", "--output=json", str(image)))
    assert info["check-errors"] == 0
    with open(image, "r+b") as f:      # point the first L1 entry's L2 table into the header
        f.seek(40)
        l1_offset = int.from_bytes(f.read(8), "big")
        f.seek(l1_offset)
        f.write((0x8000000000000000 | 0x200).to_bytes(8, "big"))
    run = run_worker(tmp_path / "w", {"operation": "validate", "image": {"path": str(image)}}, [tmp_path])
    assert run.returncode == 2, run.log
    assert run.result["error"]["code"] == "INVALID_IMAGE"
    assert run.result["outputs"]["check"]["status"] in ("corrupt", "failed")


def test_a_source_never_checked_for_its_submitter_is_not_read(lib: Path, tmp_path: Path, out: Path) -> None:
    source = images.make_image("qcow2", None, tmp_path / "src.qcow2", raw=lib / "data.raw")
    run = run_worker(tmp_path / "w", convert_spec(source, out / "o.qcow2"), [out],
                     owner={"uid": 64101, "gid": 64101, "groups": [64101], "mode": 0o640}, source_identity="")
    assert run.returncode == 2 and run.result["error"]["code"] == "PERMISSION_DENIED", run.log
    assert "was not checked for its submitter" in run.result["error"]["message"]
    assert leftovers(out) == []


def test_files_an_image_refers_to_must_be_readable_by_its_submitter(lib: Path, tmp_path: Path,
                                                                    shared: Path) -> None:
    """h2kd checked only the file the submitter named; a backing file next to it that they may not read
    (someone else's private disk in a shared directory) is refused, not copied into their output."""
    alice, bob = {"uid": 64101, "gid": 64101, "groups": [64101], "mode": 0o640}, 64102
    out = shared / "out"
    base = images.make_image("qcow2", None, shared / "bobs-base.qcow2", raw=lib / "data.raw")
    os.chown(base, bob, bob)
    base.chmod(0o600)
    top = shared / "alices-top.qcow2"
    images.qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base.name, str(top))
    os.chown(top, alice["uid"], alice["gid"])
    run = run_worker(tmp_path / "w1", convert_spec(top, out / "o.qcow2"), [out], owner=alice)
    assert run.returncode == 2 and run.result["error"]["code"] in ("PERMISSION_DENIED", "INVALID_IMAGE"), run.log
    assert "bobs-base.qcow2" in run.result["error"]["message"]
    assert leftovers(out) == []
    base.chmod(0o644)     # now bob shares it: the same job converts
    run = run_worker(tmp_path / "w2", convert_spec(top, out / "o.qcow2"), [out], owner=alice)
    assert run.returncode == 0, run.log
    assert compare(lib / "data.raw", "raw", out / "o.qcow2", "qcow2")
    assert (out / "o.qcow2").stat().st_uid == alice["uid"]


def test_qemu_img_reads_with_the_submitters_rights_so_its_messages_reveal_nothing(tmp_path: Path,
                                                                                  shared: Path) -> None:
    """An image whose backing file is a json: name reading a root-only file as a VDI would make qemu-img,
    run as root, quote that file's bytes in its error ("bad signature ..."), before any check of the name."""
    alice = {"uid": 64101, "gid": 64101, "groups": [64101], "mode": 0o640}
    secret = shared / "secret.bin"
    secret.write_bytes(b"TOPSECRETVALUE!!" * 64)
    secret.chmod(0o600)
    backing = ('json:{"driver":"vdi","file":{"driver":"raw","offset":0,"file":{"driver":"file","filename":"%s"}}}'
               % secret)
    image = shared / "probe.qcow2"
    images.qemu_img("create", "-q", "-f", "qcow2", "-F", "vdi", "-u", "-b", backing, str(image), "1M")
    os.chown(image, alice["uid"], alice["gid"])
    run = run_worker(tmp_path / "w", convert_spec(image, shared / "out" / "o.qcow2"), [shared / "out"], owner=alice)
    assert run.returncode == 2, run.log
    message = run.result["error"]["message"]
    assert "Permission denied" in message, message     # qemu-img, as alice, could not open the file
    # Neither the bytes nor their hex, in either byte order ("size is 0x4552434553504f54" from a VDI header).
    secret_hex = b"TOPSECRE".hex()
    assert "TOPSECRET" not in message and secret_hex[:8] not in message.lower(), message
    assert bytes.fromhex(secret_hex)[::-1].hex()[:8] not in message.lower(), message
    assert leftovers(shared / "out") == []


def test_offline_fix_refuses_a_qcow2_that_leads_to_other_files(out: Path, tmp_path: Path) -> None:
    """A repaired qcow2 is packed back flat: a backing file named through json: would be copied into it."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"secret!!" * 4096)
    image = out / "guest.qcow2"
    images.qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    'json:{"driver":"raw","offset":0,"size":4096,"file":{"driver":"file","filename":"%s"}}' % secret,
                    str(image), "1M")
    before = image.read_bytes()
    run = run_worker(tmp_path / "w", {"operation": "offline_fix", "image": {"path": str(image), "format": "qcow2"}},
                     [out])
    assert run.returncode == 2 and run.result["error"]["code"] == "PERMISSION_DENIED", run.log
    assert "not a plain file name" in run.result["error"]["message"]
    assert image.read_bytes() == before and leftovers(out) == ["guest.qcow2"]


def test_without_an_output_path_the_job_gets_a_directory_of_the_submitters(lib: Path, tmp_path: Path,
                                                                           shared: Path) -> None:
    out = shared / "out"
    source = images.make_image("vmdk", "streamOptimized", shared / "app.vmdk", raw=lib / "data.raw")
    alice = {"uid": 64101, "gid": 64102, "groups": [64102], "mode": 0o640}
    run = run_worker(tmp_path / "w1", {"job_id": "nightly-7", **convert_spec(source, None)}, [out], owner=alice)
    assert run.returncode == 0, run.log
    job_dir = out / "nightly-7"
    [disk] = run.result["outputs"]["disks"]
    assert Path(disk["path"]).parent == job_dir
    assert (job_dir.stat().st_uid, job_dir.stat().st_gid) == (64101, 64102)
    assert job_dir.stat().st_mode & 0o777 == 0o700    # not the user's group: it may be everyone's (users)
    assert Path(disk["path"]).stat().st_uid == 64101
    assert compare(lib / "data.raw", "raw", Path(disk["path"]), "qcow2")
    # With output_group set, h2kd asks for the group to enter too.
    run = run_worker(tmp_path / "w0", {"job_id": "nightly-6", **convert_spec(source, None)}, [out],
                     owner={**alice, "directory_mode": 0o750})
    assert run.returncode == 0 and (out / "nightly-6").stat().st_mode & 0o777 == 0o750, run.log
    # A directory of that name made by someone else (a shared root; job ids are public) is neither taken over
    # nor in the way: the job makes one of its own, which its result names.
    (out / "nightly-8").mkdir()
    os.chown(out / "nightly-8", 64103, 64103)
    run = run_worker(tmp_path / "w2", {"job_id": "nightly-8", **convert_spec(source, None)}, [out], owner=alice)
    assert run.returncode == 0, run.log
    assert list((out / "nightly-8").iterdir()) == []
    [disk] = run.result["outputs"]["disks"]
    made = Path(disk["path"]).parent
    assert made.parent == out and made.name.startswith("nightly-8-") and made.stat().st_uid == 64101
    assert compare(lib / "data.raw", "raw", Path(disk["path"]), "qcow2")
    # So is a link of that name; and the directory made beside it goes again if the job fails.
    (out / "nightly-10").symlink_to(out / "nightly-8")
    spec = {"job_id": "nightly-10", **convert_spec(source, None)}
    spec["image"]["checksum"] = "sha256:" + "0" * 64
    run = run_worker(tmp_path / "w4", spec, [out], owner=alice)
    assert run.returncode == 2 and "does not match" in run.result["error"]["message"], run.log
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("nightly-10")) == ["nightly-10"]
    # A job that fails once its directory is made (here: the source's checksum is wrong) leaves none behind.
    spec = {"job_id": "nightly-9", **convert_spec(source, None)}
    spec["image"]["checksum"] = "sha256:" + "0" * 64
    run = run_worker(tmp_path / "w3", spec, [out], owner=alice)
    assert run.returncode == 2 and "does not match" in run.result["error"]["message"], run.log
    assert not (out / "nightly-9").exists()
    # Nor when an earlier attempt, killed outright, left the directory it made: empty, the submitter's.
    (out / "nightly-9").mkdir(mode=0o700)
    os.chown(out / "nightly-9", 64101, 64102)
    run = run_worker(tmp_path / "w5", spec, [out], owner=alice)
    assert run.returncode == 2 and "does not match" in run.result["error"]["message"], run.log
    assert not (out / "nightly-9").exists()


def test_a_source_rewritten_with_its_old_mtime_counts_as_changed(tmp_path: Path) -> None:
    """The submitter owns their image: they can rewrite its header between the checks and the conversion
    and set its mtime back, but not its ctime."""
    from h2kd.operations import inspect
    from h2kd.operations.qemuimg import OperationError

    image = tmp_path / "mine.qcow2"
    image.write_bytes(b"A" * 4096)
    before = image.stat()
    seen = [inspect.FileIdentity.of(str(image), before)]
    inspect.ensure_unchanged(seen)
    time.sleep(0.01)
    image.write_bytes(b"B" * 4096)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(OperationError, match="was modified or replaced"):
        inspect.ensure_unchanged(seen)


def test_the_commit_refuses_an_output_directory_swapped_for_a_symlink(tmp_path: Path) -> None:
    """The outputs are renamed through the directory opened at commit time, which must be the one planned."""
    from h2kd.operations.tempfiles import open_output_directory
    from h2kd.operations.qemuimg import OperationError

    planned, elsewhere = tmp_path / "alice" / "sub", tmp_path / "etc"
    planned.mkdir(parents=True)
    elsewhere.mkdir()
    os.close(open_output_directory(str(planned)))
    planned.rmdir()
    (tmp_path / "alice" / "sub").symlink_to(elsewhere)
    with pytest.raises(OSError):          # the last component: O_NOFOLLOW
        open_output_directory(str(planned))
    (tmp_path / "alice" / "sub").unlink()
    (tmp_path / "alice").rename(tmp_path / "alice-moved")
    (tmp_path / "alice").symlink_to(tmp_path / "alice-moved")
    (tmp_path / "alice-moved" / "sub").mkdir()
    with pytest.raises(OperationError, match="moved or replaced"):   # a component above it
        open_output_directory(str(planned))


ALICE, BOB = 64101, 64102


def _convert_as_alice(shared: Path, output: Path, progress: Any, **parameters: Any) -> dict[str, Any]:
    """A convert, as alice, of a raw source of hers whose checksum is verified: the phase "verify" comes after the
    plan, before the first temporary file is made."""
    import hashlib

    from h2kd import access
    from h2kd.operations import convert, qemuimg

    source = shared / "alice.raw"
    source.write_bytes(b"\0" * 510 + b"\x55\xaa" + b"alice's bytes" * 1000)
    os.chown(source, ALICE, ALICE)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    spec = {"job_id": "j", "image": {"path": str(source), "format": "raw", "checksum": "sha256:" + digest},
            "parameters": {"output_format": "raw", **parameters}, "artifacts": {"output_path": str(output)}}
    qemuimg.run_as(ALICE, ALICE, [ALICE])
    access.give_groups(ALICE, [ALICE])        # as the worker does with the groups h2kd gives it
    try:
        return convert.run_convert(spec, [str(shared / "out")], progress, owner={"uid": ALICE, "gid": ALICE,
                                                                                  "mode": 0o640})
    finally:
        qemuimg.run_as(0, 0, [])
        access.forget_groups(ALICE)


def test_a_directory_above_the_output_swapped_for_a_symlink_gets_nothing_made_elsewhere(shared: Path) -> None:
    """The submitter owns the directories on the way to their output: swapping one for a symlink into another
    user's tree after the plan (here while the source's checksum is verified) must not make root create the
    temporary output there and hand it to them (swapped back before the commit, the failed job's clean-up would
    look for it in their own tree). The job fails, and leaves nothing in either tree."""
    from h2kd.operations.qemuimg import OperationError
    out = shared / "out"
    bobs = out / "bob" / "vms"
    bobs.mkdir(parents=True)
    for path in (bobs.parent, bobs):
        os.chown(path, BOB, BOB)
        path.chmod(0o755)
    alices = out / "alice" / "vms"
    alices.mkdir(parents=True)
    for path in (alices.parent, alices):
        os.chown(path, ALICE, ALICE)
    swapped = []

    def progress(phase: str, done: int, total: int, message: str) -> None:
        if phase == "verify" and not swapped:     # planned and checked; the temporary file is not made yet
            (out / "alice").rename(out / "alice.real")
            (out / "alice").symlink_to(out / "bob")
            swapped.append(True)
        if phase == "check" and (out / "alice").is_symlink():     # and back, before the commit looks
            (out / "alice").unlink()
            (out / "alice.real").rename(out / "alice")

    with pytest.raises(OperationError, match="moved or replaced"):
        _convert_as_alice(shared, alices / "disk.raw", progress)
    assert swapped
    assert os.listdir(bobs) == []
    assert os.listdir(out / ("alice" if (out / "alice").is_dir() and not (out / "alice").is_symlink()
                             else "alice.real") / "vms") == []


@pytest.mark.parametrize("output_format", ["raw", "qcow2"])
def test_an_output_directory_renamed_away_for_another_users_of_the_same_name_gets_nothing(shared: Path,
                                                                                          output_format: str) -> None:
    """The submitter's right to write was checked on the directory's name; the directory was opened only when the
    first temporary file was made. Renamed away meanwhile (while the checksum is verified), and another user's made
    under that name (as h2kd makes a job directory, which the submitter can pass through but not write in), the
    outputs were made, and given their names, in the other user's directory."""
    from h2kd.operations.qemuimg import OperationError

    out = shared / "out"
    target = out / "job-of-bob"
    target.mkdir()
    os.chown(target, ALICE, ALICE)
    swapped = []

    def progress(phase: str, done: int, total: int, message: str) -> None:
        if phase == "verify" and not swapped:     # planned and checked; no temporary file made yet
            target.rename(out / "alices")
            target.mkdir()
            os.chown(target, BOB, BOB)
            target.chmod(0o755)
            swapped.append(True)

    with pytest.raises(OperationError, match="moved or replaced"):
        _convert_as_alice(shared, target / "disk", progress, output_format=output_format, domain_xml=True)
    assert swapped
    assert os.listdir(target) == []
    assert os.listdir(out / "alices") == []


def test_an_output_directory_swapped_as_it_is_checked_for_one_the_submitter_cannot_reach_gets_nothing(
        shared: Path, monkeypatch) -> None:
    """Swapped for a link, just after its check by name, to a directory anyone may write in but inside one only
    its owner may enter: the directory opened must also be the one the submitter reaches by its name."""
    from h2kd.operations import convert
    from h2kd.operations.qemuimg import OperationError

    out = shared / "out"
    bobs = out / "bob"
    (bobs / "drop").mkdir(parents=True)
    os.chown(bobs, BOB, BOB)
    bobs.chmod(0o700)
    (bobs / "drop").chmod(0o1777)
    alices = out / "alice" / "vms"
    alices.mkdir(parents=True)
    for path in (alices.parent, alices):
        os.chown(path, ALICE, ALICE)
    checked_by_name = convert._check_submitter_may_write

    def then_swapped(directory: str, owner: dict) -> None:
        checked_by_name(directory, owner)
        alices.rename(out / "alice" / "vms.real")
        alices.symlink_to(bobs / "drop")

    monkeypatch.setattr(convert, "_check_submitter_may_write", then_swapped)
    with pytest.raises(OperationError, match="not writable by uid 64101"):
        _convert_as_alice(shared, alices / "disk.raw", lambda *args: None)
    assert os.listdir(bobs / "drop") == []
    assert os.listdir(out / "alice" / "vms.real") == []


def test_a_temporary_file_swapped_for_a_link_is_not_touched(tmp_path: Path) -> None:
    """The submitter may own the output directory: a temporary output replaced by a symlink or a hard link
    to another file is refused before root writes, chmods or chowns it."""
    from h2kd.operations.qemuimg import OperationError
    from h2kd.operations.tempfiles import TempFiles

    victim = tmp_path / "victim"
    victim.write_text("someone else's")
    out = tmp_path / "out"
    out.mkdir()
    temps = TempFiles(owner={"uid": 64101, "gid": 64101})
    temp = temps.create(str(out / "disk.qcow2"))
    assert os.stat(temp).st_uid == 64101                     # the submitter's from the start
    os.close(temps.open_made(temp, os.O_WRONLY))
    for swap in (lambda: os.symlink(victim, temp), lambda: os.link(victim, temp)):
        os.unlink(temp)
        swap()
        with pytest.raises((OperationError, OSError)):
            os.close(temps.open_made(temp, os.O_WRONLY))
    assert victim.read_text() == "someone else's" and victim.stat().st_uid == 0


@pytest.mark.parametrize("durable", [True, False])
def test_a_durable_jobs_notes_reach_the_disk_before_what_they_note(tmp_path: Path, monkeypatch, durable: bool) -> None:
    """What a worker notes so that its files can be cleaned up (the temporary file it is about to make, the
    rename it is about to do) is synced before it makes or renames them: a machine that crashes leaves no file
    that no note names. A job with parameters.sync false pays for no sync."""
    from h2kd.operations import tempfiles
    from h2kd.operations.convert import _commit

    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    out.mkdir()
    synced: list[tuple[str, list[str]]] = []    # what was synced, and what the output directory held then
    real_fsync = os.fsync

    def recorded_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), sorted(os.listdir(out))))
        real_fsync(fd)
    monkeypatch.setattr(tempfiles.os, "fsync", recorded_fsync)
    temps = tempfiles.TempFiles(str(run / tempfiles.RECORD_NAME), durable=durable)
    temp = temps.create(str(out / "disk.qcow2"))
    _commit([(temp, str(out / "disk.qcow2"))], temps, overwrite=False, durable=durable)
    assert os.listdir(out) == ["disk.qcow2"]
    notes = [(path, held) for path, held in synced if path.startswith(str(run))]
    if not durable:
        assert notes == [], synced
        return
    assert (str(run / tempfiles.RECORD_NAME), []) in notes, synced          # before the temporary file existed
    assert (str(run), []) in notes, synced                                 # the record's own name, too
    assert (str(run / tempfiles.COMMIT_NAME), [os.path.basename(temp)]) in notes, synced  # before the rename


def test_a_converted_output_swapped_for_a_link_before_its_check_is_refused_unread(tmp_path: Path) -> None:
    """Between the conversion and the commit the worker (root in guest-repair jobs) reads the output's
    header and size and flushes it: through the file made for it, so a symlink or hard link the submitter
    puts in its place is refused, and nothing of the file it leads to gets into the result."""
    from types import SimpleNamespace
    from h2kd.operations.convert import Planned, _finish_one, options_from
    from h2kd.operations.qemuimg import OperationError
    from h2kd.operations.tempfiles import TempFiles

    secret = tmp_path / "root-only"
    secret.mkdir(mode=0o700)
    victim = secret / "private.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(victim), "7G"], check=True)
    out = tmp_path / "out"
    out.mkdir()
    temps = TempFiles()
    disk = SimpleNamespace(label="disk 1", virtual_size=MiB, member=None,
                           ref=SimpleNamespace(describe=lambda: "source.vmdk", format="vmdk"))
    plan = Planned(disk, str(out / "disk.qcow2"))      # type: ignore[arg-type]
    plan.temp = temps.create(plan.destination)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", plan.temp, "1M"], check=True)
    options = options_from({"output_format": "qcow2"})
    assert _finish_one(plan, options, True, temps)["virtual_size"] == MiB     # the file made for it passes
    os.unlink(plan.temp)
    for swap in (lambda: os.symlink(victim, plan.temp), lambda: os.link(victim, plan.temp)):
        swap()
        with pytest.raises(OperationError, match="replaced during the job") as refused:
            _finish_one(plan, options, True, temps)
        assert str(7 << 30) not in str(refused.value)
        os.unlink(plan.temp)
    assert subprocess.run(["qemu-img", "check", "-q", str(victim)]).returncode == 0


def test_a_vmx_may_name_only_disks_its_submitter_could_read_in_its_own_directory(lib: Path, tmp_path: Path,
                                                                                 shared: Path) -> None:
    alice, bob = {"uid": 64101, "gid": 64101, "groups": [64101], "mode": 0o640}, 64102
    private = images.make_image("vmdk", "monolithicSparse", shared / "bobs.vmdk", raw=lib / "data2.raw")
    os.chown(private, bob, bob)
    private.chmod(0o600)
    vmx = images.make_vmx(shared, ["bobs.vmdk"], name="alices")
    os.chown(vmx, alice["uid"], alice["gid"])
    run = run_worker(tmp_path / "w1", {"operation": "inspect", "image": {"path": str(vmx)}}, [shared / "out"],
                     owner=alice)
    assert run.returncode == 2 and run.result["error"]["code"] == "PERMISSION_DENIED", run.log
    assert "bobs.vmdk" in run.result["error"]["message"]
    # A subdirectory that is a symlink out of the source's directory is not followed either.
    elsewhere = Path(tempfile.mkdtemp(prefix="h2kt-elsewhere-", dir="/tmp"))
    try:
        elsewhere.chmod(0o755)
        images.make_image("vmdk", "monolithicSparse", elsewhere / "d.vmdk", raw=lib / "data2.raw")
        (shared / "lnk").symlink_to(elsewhere)
        vmx = images.make_vmx(shared, ["lnk/d.vmdk"], name="escaping")
        run = run_worker(tmp_path / "w2", {"operation": "inspect", "image": {"path": str(vmx)}}, [shared / "out"])
        assert run.returncode == 2 and run.result["error"]["code"] == "PERMISSION_DENIED", run.log
        assert "leads outside" in run.result["error"]["message"]
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_whether_an_output_path_is_a_directory_is_learned_as_its_submitter(lib: Path, tmp_path: Path,
                                                                            shared: Path) -> None:
    """The worker asked as root whether the output path was a directory, and named a different directory in its
    error either way: behind a symlink of the submitter's to a directory only root may enter, that told them
    which names exist there. Both jobs now get the same answer, naming the link they made."""
    out = shared / "out"
    source = images.make_image("vmdk", "streamOptimized", shared / "app.vmdk", raw=lib / "data.raw")
    alice = {"uid": 64101, "gid": 64102, "groups": [64102], "mode": 0o640}
    private = shared / "roots-only"
    (private / "there").mkdir(parents=True)
    private.chmod(0o700)
    area = out / "alice"
    area.mkdir()
    os.chown(area, 64101, 64102)
    (area / "sub").symlink_to(private)
    messages = {}
    for name in ("there", "absent"):
        run = run_worker(tmp_path / name, convert_spec(source, str(area / "sub" / name)), [out], owner=alice)
        assert run.returncode == 2 and run.result["error"]["code"] == "PERMISSION_DENIED", run.log
        messages[name] = run.result["error"]["message"]
    assert messages["there"] == messages["absent"], messages
    assert f"{area}/sub is not writable" in messages["there"]
    assert list((private / "there").iterdir()) == [] and [p.name for p in private.iterdir()] == ["there"]
