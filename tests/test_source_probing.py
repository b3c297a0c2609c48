"""What the files a source names tell a submitter who may not read them: nothing.

The worker runs as root. A descriptor (a VMDK's extents, a VMX's disks, an OVF's disks and manifest) names
files by relative paths that may pass through directories closed to the submitter, and a submitter may swap
a directory of their own for a symlink between the checks and the reads. Whatever lies there (a file of
someone else's, nothing, a FIFO) they get one answer, and root neither reads nor hashes it for them. An OVF
cannot make the parser expand entities, and a VM description cannot make the report huge.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import pytest

import images
from test_operations import run_worker

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")

NOBODY = {"uid": 65534, "gid": 65534, "mode": 0o640}
SECRET = b"root:$6$secret-hash:19000::\n"        # 28 bytes a submitter must not learn anything of


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory under /tmp that the submitter (nobody) owns, like their home, with a directory "private"
    in it that only root may enter."""
    path = Path(tempfile.mkdtemp(prefix="h2kt-probe-", dir="/tmp"))
    try:
        path.chmod(0o755)
        os.chown(path, NOBODY["uid"], NOBODY["gid"])
        (path / "private").mkdir(mode=0o700)
        (path / "out").mkdir(mode=0o1777)
        (path / "out").chmod(0o1777)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def give_to_nobody(*paths: Path) -> None:
    """Make the files the submitter's, as if they had made them."""
    for path in paths:
        os.chown(path, NOBODY["uid"], NOBODY["gid"], follow_symlinks=False)


def vmdk_descriptor(extent: str) -> str:
    """A VMDK descriptor whose one flat extent, said to hold 999999 sectors, is the file named `extent`."""
    return ('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n'
            f'RW 999999 FLAT "{extent}" 0\n\nddb.adapterType = "ide"\n')


def write_source(base: Path, carrier: str, name: str) -> Path:
    """A source of the submitter's that names `name` as a VMDK extent, a VMX disk, an OVF disk or a manifest
    entry."""
    if carrier == "vmdk extent":
        source = base / "probe.vmdk"
        source.write_text(vmdk_descriptor(name))
    elif carrier == "vmx disk":
        source = images.make_vmx(base, [name], name="probe")
    else:
        source = base / "probe.ovf"
        source.write_text(images.make_ovf_text("probe", [(name if carrier == "ovf disk" else "disk.vmdk", 512, 1)]))
        if carrier == "manifest entry":
            (base / "probe.mf").write_text(f"SHA256({name})= {'0' * 64}\n")
            give_to_nobody(base / "probe.mf")
    give_to_nobody(source)
    return source


def place(path: Path, state: str) -> None:
    """Put at `path` what the submitter must not learn about: a file, nothing, or a FIFO."""
    if state == "file":
        path.write_bytes(SECRET)
        path.chmod(0o600)
    elif state == "fifo":
        os.mkfifo(path, 0o600)


# ---------------------------------------------------------------- names behind a closed directory

@pytest.mark.parametrize("carrier", ["vmdk extent", "vmx disk", "ovf disk", "manifest entry"])
def test_a_file_behind_a_directory_closed_to_the_submitter_gets_one_answer(base: Path, tmp_path: Path,
                                                                            carrier: str) -> None:
    """`RW 999999 FLAT "private/secret.txt" 0` must not tell its size, whether it exists, or what it is."""
    source = write_source(base, carrier, "private/secret.txt")
    errors = {}
    for state in ("file", "missing", "fifo"):
        place(base / "private" / "secret.txt", state)
        run = run_worker(tmp_path / state, {"operation": "inspect", "image": {"path": str(source)}},
                         [base / "out"], owner=NOBODY)
        assert run.returncode == 2, run.log
        errors[state] = run.result["error"]
        (base / "private" / "secret.txt").unlink(missing_ok=True)
    assert {e["code"] for e in errors.values()} == {"PERMISSION_DENIED"}, errors
    assert len({e["message"] for e in errors.values()}) == 1, errors
    message = errors["file"]["message"]
    assert "private/secret.txt" in message and "not readable by uid 65534" in message, message
    assert str(len(SECRET)) not in message


def disk_for_group(base: Path, gid: int) -> Path:
    """base/group-disks/d.vmdk, in a directory only root and group `gid` may enter; the directory."""
    shared = base / "group-disks"
    shared.mkdir(mode=0o750)
    os.chown(shared, 0, gid)
    images.qemu_img("create", "-q", "-f", "vmdk", str(shared / "d.vmdk"), "1M")
    os.chown(shared / "d.vmdk", 0, gid)
    (shared / "d.vmdk").chmod(0o640)
    return shared


def test_the_files_a_source_names_are_checked_with_the_groups_h2kd_gave(base: Path, tmp_path: Path) -> None:
    """The envelope's groups are those h2kd worked out at submission (the caller's connection's, within the user
    database's): the checks of the files a source names act with them, as qemu-img does, not with another
    lookup. A disk in a directory of group "disk" is found with that group given, and refused without it."""
    import grp

    disk_group = grp.getgrnam("disk").gr_gid
    shared = disk_for_group(base, disk_group)
    vmx = write_source(base, "vmx disk", "group-disks/d.vmdk")
    spec = {"operation": "inspect", "image": {"path": str(vmx)}}
    given = run_worker(tmp_path / "given", spec, [base / "out"], owner={**NOBODY, "groups": [65534, disk_group]})
    assert given.returncode == 0, given.log
    assert [d["path"] for d in given.result["outputs"]["report"]["disks"]] == [str(shared / "d.vmdk")]
    without = run_worker(tmp_path / "without", spec, [base / "out"], owner={**NOBODY, "groups": [65534]})
    assert without.returncode == 2, without.log
    assert without.result["error"]["code"] == "PERMISSION_DENIED", without.result["error"]


@pytest.fixture
def member_of_a_group(base: Path) -> Iterator[tuple[dict[str, object], int]]:
    """A user who is in group h2kt-probe in the user database, with a VMX of theirs in `base` whose disk lies in
    a directory only that group may enter; (their owner envelope without groups, the group's gid)."""
    import grp
    import pwd

    group, user = "h2kt-probe", "h2kt-probe-user"
    subprocess.run(["userdel", user], capture_output=True)
    subprocess.run(["groupdel", group], capture_output=True)
    subprocess.run(["groupadd", group], check=True)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", group, user], check=True)
    try:
        entry, gid = pwd.getpwnam(user), grp.getgrnam(group).gr_gid
        disk_for_group(base, gid)
        vmx = images.make_vmx(base, ["group-disks/d.vmdk"], name="probe")
        os.chown(vmx, entry.pw_uid, entry.pw_gid)
        yield {"uid": entry.pw_uid, "gid": entry.pw_gid, "mode": 0o640, "vmx": str(vmx)}, gid
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)


def test_an_envelope_giving_no_groups_is_not_filled_in_from_the_user_database(
        base: Path, tmp_path: Path, member_of_a_group: tuple[dict[str, object], int]) -> None:
    """A caller whose process kept none of its groups gets none in the worker either: its envelope's empty list
    is an answer, not a gap to fill from the user database (which would give back the group it dropped)."""
    owner, gid = member_of_a_group
    vmx = str(owner.pop("vmx"))
    spec = {"operation": "inspect", "image": {"path": vmx}}
    dropped = run_worker(tmp_path / "dropped", spec, [base / "out"], owner={**owner, "groups": []})
    assert dropped.returncode == 2, dropped.log
    assert dropped.result["error"]["code"] == "PERMISSION_DENIED", dropped.result["error"]
    kept = run_worker(tmp_path / "kept", spec, [base / "out"], owner={**owner, "groups": [owner["gid"], gid]})
    assert kept.returncode == 0, kept.log


def test_files_the_submitter_can_see_are_still_found_and_described(base: Path, tmp_path: Path) -> None:
    """Disks in a subdirectory of the submitter's work; a missing one or a FIFO of their own is named as such
    (they can see that themselves)."""
    disks = base / "disks"
    disks.mkdir()
    images.qemu_img("create", "-q", "-f", "vmdk", str(disks / "d.vmdk"), "1M")
    give_to_nobody(disks, disks / "d.vmdk")
    vmx = write_source(base, "vmx disk", "disks/d.vmdk")
    run = run_worker(tmp_path / "ok", {"operation": "inspect", "image": {"path": str(vmx)}}, [base / "out"],
                     owner=NOBODY)
    assert run.returncode == 0, run.log
    assert run.result["outputs"]["report"]["disks"][0]["path"] == str(disks / "d.vmdk")
    for state, expected in (("missing", "does not exist"), ("fifo", "not a regular file")):
        descriptor = write_source(base, "vmdk extent", "disks/extent.raw")
        place(disks / "extent.raw", state)
        run = run_worker(tmp_path / state, {"operation": "inspect", "image": {"path": str(descriptor)}},
                         [base / "out"], owner=NOBODY)
        assert run.returncode == 2 and run.result["error"]["code"] == "INVALID_IMAGE", run.log
        assert expected in run.result["error"]["message"]
        (disks / "extent.raw").unlink(missing_ok=True)


def test_a_descriptor_naming_hundreds_of_extents_is_checked_extent_by_extent(base: Path, tmp_path: Path) -> None:
    """A VMDK split in hundreds of flat extents, each named twice: read as the submitter may; one in the middle
    that they may not read is named, and one cut short is found, as in a descriptor of one extent."""
    extents = [f"d-f{number:03}.vmdk" for number in range(600)]
    for name in extents:
        (base / name).write_bytes(b"\0" * 512)
        give_to_nobody(base / name)
    lines = "".join(f'RW 1 FLAT "{name}" 0\n' for name in extents + extents)
    source = base / "d.vmdk"
    source.write_text(vmdk_descriptor("d-f000.vmdk").replace('RW 999999 FLAT "d-f000.vmdk" 0\n', lines))
    give_to_nobody(source)
    inspect = {"operation": "inspect", "image": {"path": str(source)}}
    run = run_worker(tmp_path / "ok", inspect, [base / "out"], owner=NOBODY)
    assert run.returncode == 0, run.log
    named = {Path(extent["filename"]).name for extent in run.result["outputs"]["report"]["disks"][0]["extents"]}
    assert named >= set(extents)

    (base / extents[407]).chmod(0o600)
    os.chown(base / extents[407], 0, 0)
    run = run_worker(tmp_path / "closed", inspect, [base / "out"], owner=NOBODY)
    assert run.returncode == 2 and run.result["error"]["code"] == "PERMISSION_DENIED", run.log
    assert f"the VMDK extent '{extents[407]}' is not readable by uid 65534" in run.result["error"]["message"]

    give_to_nobody(base / extents[407])
    (base / extents[407]).chmod(0o640)
    source.write_text(source.read_text() + f'RW 2 FLAT "{extents[512]}" 0\n')
    run = run_worker(tmp_path / "short", inspect, [base / "out"], owner=NOBODY)
    assert run.returncode == 2 and run.result["error"]["code"] == "INVALID_IMAGE", run.log
    assert f"the VMDK extent '{extents[512]}' holds 512 bytes where its descriptor" in run.result["error"]["message"]


# ---------------------------------------------------------------- sums read after a swap

def ovf_with_manifest(directory: Path, first: tuple[str, int] | None = None) -> Path:
    """vm.ovf, its disk disk.vmdk and vm.mf with the sums of both (and, first, of a sparse file of the given
    name and size), all the submitter's."""
    directory.mkdir()
    disk = directory / "disk.vmdk"
    images.qemu_img("create", "-q", "-f", "vmdk", str(disk), "1M")
    ovf = directory / "vm.ovf"
    ovf.write_text(images.make_ovf_text("vm", [(disk.name, disk.stat().st_size, 1 << 20)]))
    lines = []
    files = [ovf, disk]
    if first:
        big = directory / first[0]
        with open(big, "wb") as f:
            f.truncate(first[1])
        files.insert(0, big)
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        lines.append(f"SHA256({file.name})= {digest.hexdigest()}")
    (directory / "vm.mf").write_text("\n".join(lines) + "\n")
    give_to_nobody(directory, *directory.iterdir())
    return ovf


def swap_for_symlink(directory: Path, target: Path) -> None:
    """What the submitter can do to a directory of their own: put a symlink to `target` in its place."""
    directory.rename(directory.with_name(directory.name + ".moved"))
    directory.symlink_to(target)


def verify_within(source: object, seconds: float) -> Exception | None:
    """inspect.verify(source), or the error it raised; AssertionError if it hangs (a FIFO opened for reading
    waits for a writer)."""
    from h2kd.operations import inspect

    outcome: list[Exception | None] = []

    def run() -> None:
        """verify(), keeping what it raised."""
        try:
            inspect.verify(source)  # type: ignore[arg-type]
            outcome.append(None)
        except Exception as e:   # noqa: BLE001 - the error is the result
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else AssertionError("verify() hung")


@pytest.mark.parametrize("sums", ["manifest", "image.checksum"])
def test_sums_are_never_taken_of_what_a_swapped_directory_leads_to(base: Path, sums: str) -> None:
    """After load_source checked the files as the submitter, they swap their directory for a symlink to a
    root-only one holding a file of the same name: a copy of theirs, another file, nothing or a FIFO. Root must
    not hash it ("does not match" tells a byte at a time), say it is missing, or hang: one answer."""
    from h2kd.operations import inspect
    from h2kd.operations.qemuimg import OperationError

    vm = base / "vm"
    if sums == "manifest":
        ovf_with_manifest(vm)
        source_path, checksum, victim = vm / "vm.ovf", None, "disk.vmdk"
    else:
        vm.mkdir()
        images.qemu_img("create", "-q", "-f", "qcow2", str(vm / "disk.qcow2"), "1M")
        give_to_nobody(vm, vm / "disk.qcow2")
        source_path, victim = vm / "disk.qcow2", "disk.qcow2"
        checksum = "sha256:" + hashlib.sha256((vm / victim).read_bytes()).hexdigest()
    private = base / "private"
    outcomes = {}
    for state in ("copy", "other", "missing", "fifo"):
        source = inspect.load_source(str(source_path), checksum=checksum, reader_uid=NOBODY["uid"])
        original = (vm / victim).read_bytes()
        if state == "copy":
            (private / victim).write_bytes(original)
        elif state == "other":
            (private / victim).write_bytes(bytes(len(original)))
        elif state == "fifo":
            os.mkfifo(private / victim, 0o600)
        swap_for_symlink(vm, private)
        try:
            outcome = verify_within(source, 10)
        finally:
            if state == "fifo":     # release a reader that waits for a writer
                try:
                    os.close(os.open(private / victim, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
            vm.unlink()
            vm.with_name("vm.moved").rename(vm)
            (private / victim).unlink(missing_ok=True)
        assert isinstance(outcome, OperationError), f"{state}: {outcome!r}"
        outcomes[state] = (outcome.code, outcome.message)
    assert {code for code, _ in outcomes.values()} == {"SOURCE_CHANGED"}, outcomes
    assert len({message for _, message in outcomes.values()}) == 1, outcomes
    assert "moved, removed or replaced" in outcomes["copy"][1]


def test_a_job_whose_directory_is_swapped_while_sums_are_taken_says_only_that_it_changed(base: Path,
                                                                                          tmp_path: Path) -> None:
    """The same through the worker: the swap comes while the first, large, file of the manifest is hashed."""
    vm = base / "vm"
    ovf = ovf_with_manifest(vm, first=("big.bin", 2 << 30))
    (base / "private" / "disk.vmdk").write_bytes(bytes((vm / "disk.vmdk").stat().st_size))
    swapped: list[str] = []

    def swap_once_verifying(_: subprocess.Popen[str], status: str) -> None:
        """Swap the directory once the worker reports that it hashes."""
        if status.startswith("verify") and not swapped:
            swap_for_symlink(vm, base / "private")
            swapped.append(status)

    run = run_worker(tmp_path / "w", {"operation": "inspect", "image": {"path": str(ovf)}}, [base / "out"],
                     owner=NOBODY, on_status=swap_once_verifying)
    assert swapped, run.log
    assert run.returncode != 0 and run.result["status"] == "failed", run.log
    error = run.result["error"]
    assert error["code"] == "SOURCE_CHANGED" and "moved, removed or replaced" in error["message"], error
    assert "does not match" not in error["message"]


def test_a_source_swapped_before_the_commit_checks_gets_one_answer(base: Path) -> None:
    """The checks made before the outputs are committed: nothing there, or another file, read the same."""
    from h2kd.operations import inspect
    from h2kd.operations.qemuimg import OperationError

    vm = base / "vm"
    vm.mkdir()
    images.qemu_img("create", "-q", "-f", "qcow2", str(vm / "disk.qcow2"), "1M")
    give_to_nobody(vm, vm / "disk.qcow2")
    source = inspect.load_source(str(vm / "disk.qcow2"), reader_uid=NOBODY["uid"])
    messages = set()
    for state in ("file", "missing"):
        place(base / "private" / "disk.qcow2", state)
        swap_for_symlink(vm, base / "private")
        with pytest.raises(OperationError) as refused:
            inspect.ensure_unchanged(source.identities)
        messages.add(refused.value.message)
        vm.unlink()
        vm.with_name("vm.moved").rename(vm)
        (base / "private" / "disk.qcow2").unlink(missing_ok=True)
    assert len(messages) == 1, messages


# ---------------------------------------------------------------- what a VM description may make

def ova_with(ovf: bytes, directory: Path) -> Path:
    """An OVA holding `ovf` (as vm.ovf) and its disk."""
    disk = directory / "disk1.vmdk"
    images.qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", str(disk), "1M")
    path = directory / "vm.ova"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("vm.ovf", ovf), ("disk1.vmdk", disk.read_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    give_to_nobody(path)
    return path


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_an_ovf_declaring_entities_is_refused_in_any_encoding(base: Path, tmp_path: Path, encoding: str) -> None:
    """A UTF-16 OVF hides "<!DOCTYPE" from a byte search; expat would expand its entities (a billion laughs)."""
    text = images.make_ovf_text("&laugh3;", [("disk1.vmdk", 512, 1 << 20)])
    declaration = ('<!DOCTYPE Envelope [<!ENTITY laugh "ha"><!ENTITY laugh2 "&laugh;&laugh;&laugh;&laugh;">'
                   '<!ENTITY laugh3 "&laugh2;&laugh2;&laugh2;&laugh2;">]>\n')
    text = text.replace('encoding="UTF-8"?>\n', f'encoding="{encoding.upper()}"?>\n{declaration}', 1)
    ova = ova_with(text.encode(encoding), base)
    run = run_worker(tmp_path / "w", {"operation": "inspect", "image": {"path": str(ova)}}, [base / "out"],
                     owner=NOBODY)
    assert run.returncode == 2, run.log
    assert run.result["error"]["code"] == "INVALID_IMAGE", run.result["error"]
    assert "declares a DOCTYPE or entities" in run.result["error"]["message"]


@pytest.mark.parametrize("filler, told", [("<a>" * 150_000 + "</a>" * 150_000, "more than 100000 elements"),
                                           ("<a/>" * 150_000, "more than 100000 elements"),
                                           (("<a " + " ".join(f'x{n}=""' for n in range(90_000)) + "/>") * 3,
                                            "more than 200000 attributes")])
def test_an_ovf_of_more_elements_than_any_vm_has_is_refused(base: Path, tmp_path: Path, filler: str,
                                                            told: str) -> None:
    """A tree of millions of empty elements, well within 16 MiB, costs the worker (root) a gigabyte."""
    text = images.make_ovf_text("vm", [("disk1.vmdk", 512, 1 << 20)])
    text = text.replace("</Envelope>", filler + "</Envelope>")
    assert len(text) < 16 << 20
    ova = ova_with(text.encode(), base)
    run = run_worker(tmp_path / "w", {"operation": "inspect", "image": {"path": str(ova)}}, [base / "out"],
                     owner=NOBODY)
    assert run.returncode == 2, run.log
    assert run.result["error"] == {**run.result["error"], "code": "INVALID_IMAGE",
                                   "message": f"the OVF descriptor holds {told}, which is refused"}


def test_the_largest_vm_an_ovf_may_describe_is_within_its_element_limit() -> None:
    from h2kd.operations import inspect

    disks = [(f"disk{n}.vmdk", 512, 1 << 20) for n in range(inspect.MAX_VM_DISKS)]
    vm = inspect.parse_ovf(images.make_ovf_text("vm", disks).encode())
    assert len(vm["disks"]) == inspect.MAX_VM_DISKS


def vmx_job(base: Path, tmp_path: Path, name: str, extra: list[str]) -> dict[str, object]:
    """The result of inspecting a VMX (display name `name`, with the `extra` lines) of one disk."""
    images.qemu_img("create", "-q", "-f", "vmdk", str(base / "d.vmdk"), "1M")
    vmx = images.make_vmx(base, ["d.vmdk"], name="vm")
    text = vmx.read_text().replace('displayName = "vm"', f'displayName = "{name}"')
    vmx.write_text(text + "".join(line + "\n" for line in extra))
    give_to_nobody(base / "d.vmdk", vmx)
    run = run_worker(tmp_path / "w", {"operation": "inspect", "image": {"path": str(vmx)}}, [base / "out"],
                     owner=NOBODY)
    return {"returncode": run.returncode, **run.result}


def test_a_source_closed_to_its_submitter_after_the_submission_is_not_read(base: Path, tmp_path: Path) -> None:
    """The job waited in the queue; meanwhile the VMX's owner made it theirs alone. Root must not read it for the
    submitter: no VM facts in their result, only that they may no longer read it."""
    images.qemu_img("create", "-q", "-f", "vmdk", str(base / "d.vmdk"), "1M")
    vmx = images.make_vmx(base, ["d.vmdk"], name="vm")
    vmx.write_text(vmx.read_text().replace('displayName = "vm"', 'displayName = "payroll-db-7"'))
    give_to_nobody(base / "d.vmdk")
    vmx.chmod(0o600)                                    # root's file, as its owner left it after the submission
    run = run_worker(tmp_path / "w", {"operation": "inspect", "image": {"path": str(vmx)}}, [base / "out"],
                     owner=NOBODY)
    assert run.returncode != 0 and run.result["status"] == "failed", run.log
    assert run.result["error"]["code"] == "PERMISSION_DENIED", run.result
    assert "may no longer read the source" in run.result["error"]["message"]
    assert "payroll-db-7" not in json.dumps(run.result)


def test_a_vmx_listing_thousands_of_nics_is_refused(base: Path, tmp_path: Path) -> None:
    """A VMX of `ethernetN.present = "TRUE"` lines would make a report of megabytes."""
    nics = [f'ethernet{n}.present = "TRUE"' for n in range(1, 5000)]
    result = vmx_job(base, tmp_path, "vm", nics)
    assert result["returncode"] == 2, result
    assert result["error"]["code"] == "INVALID_IMAGE"        # type: ignore[index]
    assert "more than 64 NICs" in result["error"]["message"]   # type: ignore[index]


def test_a_vm_name_longer_than_a_kib_is_refused(base: Path, tmp_path: Path) -> None:
    """Refused, not cut short: the message says how long it is without repeating it."""
    result = vmx_job(base, tmp_path, "n" * 4000, [])
    assert result["returncode"] == 2, result
    assert result["error"]["code"] == "INVALID_IMAGE"        # type: ignore[index]
    assert "name of 4000 characters" in result["error"]["message"]   # type: ignore[index]
    assert "n" * 1025 not in result["error"]["message"]       # type: ignore[index]


def test_an_ordinary_vmx_is_reported_in_full(base: Path, tmp_path: Path) -> None:
    """A long name and ten NICs, as real VMs have, are within the bounds."""
    name = "web-01 (production) " * 20
    nics = [line for n in range(1, 10) for line in (f'ethernet{n}.present = "TRUE"',
                                                    f'ethernet{n}.virtualDev = "vmxnet3"')]
    result = vmx_job(base, tmp_path, name, nics)
    assert result["returncode"] == 0, result
    vm = result["outputs"]["report"]["vm"]          # type: ignore[index]
    assert vm["name"] == name and len(vm["nics"]) == 10


@pytest.mark.parametrize("line, told", [
    ('numvcpus = "many"', "numvcpus"),
    ('numvcpus = "' + "9" * 5000 + '"', "numvcpus"),
    ('memsize = "' + "9" * 5000 + '"', "memsize"),
    ('memsize = "99999999999999"', "memsize"),
])
def test_a_vmx_giving_a_count_no_vm_can_have_is_refused(base: Path, tmp_path: Path, line: str, told: str) -> None:
    """A number that is not one, or has thousands of digits, is a damaged VMX: refused as such, by name."""
    result = vmx_job(base, tmp_path, "vm", [line])
    assert result["returncode"] == 2, result
    assert result["error"]["code"] == "INVALID_IMAGE", result["error"]   # type: ignore[index]
    message = result["error"]["message"]                                  # type: ignore[index]
    assert told in message and "9" * 100 not in message and "4" * 50 not in message, message


@pytest.mark.parametrize("value", ["four", "4" * 50, "-2"])
def test_a_garbled_cores_per_socket_hint_is_passed_over(base: Path, tmp_path: Path, value: str) -> None:
    """Cores per socket only shapes the CPU topology; the VM is still inspected, as if it gave none."""
    result = vmx_job(base, tmp_path, "vm", ['numvcpus = "4"', f'cpuid.coresPerSocket = "{value}"'])
    assert result["returncode"] == 0, result
    vm = result["outputs"]["report"]["vm"]      # type: ignore[index]
    assert (vm["cpus"], vm["cores_per_socket"]) == (4, 0)


def test_counts_written_with_leading_zeros_are_read_as_numbers(base: Path, tmp_path: Path) -> None:
    result = vmx_job(base, tmp_path, "vm", ['numvcpus = "0000000000000000000000002"', 'memsize = "02048"'])
    assert result["returncode"] == 0, result
    vm = result["outputs"]["report"]["vm"]      # type: ignore[index]
    assert (vm["cpus"], vm["memory_mib"]) == (2, 2048)


def ovf_with_hardware(base: Path, **replace: str) -> Path:
    """An OVA whose OVF has the text `old` of its hardware section replaced by `new` (replace={old: new})."""
    text = images.make_ovf_text("vm", [("disk1.vmdk", 512, 1 << 20)])
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return ova_with(text.encode(), base)


def test_a_garbled_cores_per_socket_hint_in_an_ovf_is_passed_over(base: Path, tmp_path: Path) -> None:
    cpus = "<rasd:VirtualQuantity>2</rasd:VirtualQuantity>"
    ova = ovf_with_hardware(base, **{cpus: cpus + '<vmw:CoresPerSocket ovf:required="false">two</vmw:CoresPerSocket>'})
    run = run_worker(tmp_path / "w", {"operation": "inspect", "image": {"path": str(ova)}}, [base / "out"],
                     owner=NOBODY)
    assert run.returncode == 0, run.log
    vm = run.result["outputs"]["report"]["vm"]
    assert (vm["cpus"], vm["cores_per_socket"]) == (2, 0)


@pytest.mark.parametrize("old, new, told", [
    ("<rasd:VirtualQuantity>2</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>two</rasd:VirtualQuantity>",
     "CPUs"),
    ("<rasd:VirtualQuantity>2048</rasd:VirtualQuantity>",
     "<rasd:VirtualQuantity>" + "9" * 5000 + "</rasd:VirtualQuantity>", "memory"),
    ("<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>",
     "<rasd:AllocationUnits>byte * 2^99999999</rasd:AllocationUnits>", "allocation unit"),
    ('ovf:capacity="1048576"', 'ovf:capacity="lots"', "capacity"),
])
def test_an_ovf_giving_a_size_no_vm_can_have_is_refused(base: Path, tmp_path: Path, old: str, new: str,
                                                         told: str) -> None:
    ova = ovf_with_hardware(base, **{old: new})
    run = run_worker(tmp_path / "w", {"operation": "inspect", "image": {"path": str(ova)}}, [base / "out"],
                     owner=NOBODY)
    assert run.returncode == 2, run.log
    assert run.result["error"]["code"] == "INVALID_IMAGE", run.result["error"]
    assert told in run.result["error"]["message"] and "9" * 100 not in run.result["error"]["message"]
