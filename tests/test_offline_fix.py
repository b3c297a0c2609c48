"""offline_fix, proven by booting: a Debian guest built as a VMware guest (tests/guest/build.sh) does not
boot from a virtio disk after a plain conversion, and does after h2kd converts it with offline_fix.

How the guests are booted (stated plainly): qemu-system-x86_64 under TCG (no KVM), virtio-blk disk,
virtio-net NIC on user networking, 1 GiB, 2 vCPUs, no firmware boot loader: the kernel and initramfs are
read from the guest's own /boot (debugfs, no mount) and started with -kernel/-initrd and the command line
of the guest's own /boot/grub/grub.cfg, plus console=ttyS0. So what GRUB would pass (root=/dev/sda1 before
the fix, root=UUID=... after it) and the guest's own initramfs decide whether the root is found. A unit in
the guest prints H2K-BOOT-OK and its first NIC's state on the serial port, then powers off.

Jobs go through the daemon and a real transient unit (the `stack` fixture, SubmitJob over D-Bus).
These tests need root, loop devices and qemu-system-x86; the guest is built (once, cached) if absent.
The last two check what the repair, which runs as root, leaves behind when its worker is killed, and that
it cannot be led to another file by a symlink put in the submitter's directory while it runs.
The guest is untrusted input too: the tests at the end give it device nodes and FIFOs where the repair
writes, files larger than it reads, fstab lines no path can be and files that kept a scan busy for minutes;
and they stop the worker in the middle of its clean-up, which must finish all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant

from busclient import JOB, Client, new_id, wait_for
from images import disk_difference
from h2kd.bus.paths import job_path

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="offline fixes need root (loop devices, mounts)")]

BUILDER = Path(__file__).parent / "guest" / "build.sh"
QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 200.0
STUCK_SIGNS = ("ALERT!", "Kernel panic", "(initramfs)")


# ---------------------------------------------------------------- the guest and its boot

@pytest.fixture(scope="module")
def guest() -> dict[str, Any]:
    out = subprocess.run([str(BUILDER)], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"building the test guest failed:\n{out.stderr[-3000:]}"
    directory = Path(out.stdout.strip().splitlines()[-1])
    info = json.loads((directory / "guest.json").read_text())
    info["vmdk"] = directory / "guest.vmdk"
    return info


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600, **kw)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def loops_of(path: Path) -> list[str]:
    return run(["losetup", "-j", str(path.resolve())]).stdout.splitlines()


def h2k_mounts() -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if ".h2k-mnt-" in line]


def boot_files(image: Path, fmt: str, workdir: Path) -> tuple[Path, Path, str]:
    """Kernel, initramfs and kernel command line as the guest's grub.cfg gives them (read with debugfs)."""
    raw = workdir / "boot-view.raw"
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(raw)])
    try:
        table = json.loads(run(["sfdisk", "-J", str(raw)]).stdout)["partitiontable"]
        start = next(p["start"] for p in table["partitions"] if p["type"] == "83") * table.get("sectorsize", 512)
        fs = f"{raw}?offset={start}"

        def dump(guest_path: str, name: str) -> Path:
            target = workdir / name
            target.unlink(missing_ok=True)
            run(["debugfs", "-R", f"dump {guest_path} {target}", fs])
            assert target.exists() and target.stat().st_size > 0, f"{guest_path} could not be read from the guest"
            return target

        grub = dump("/boot/grub/grub.cfg", "grub.cfg").read_text()
        linux = re.search(r"^\s*linux\s+(\S+)\s+(.*)$", grub, flags=re.M)
        initrd = re.search(r"^\s*initrd\s+(\S+)", grub, flags=re.M)
        assert linux and initrd, "the guest's grub.cfg has no linux/initrd entry"
        return dump(linux.group(1), "vmlinuz"), dump(initrd.group(1), "initrd.img"), linux.group(2).strip()
    finally:
        raw.unlink(missing_ok=True)


def boot(image: Path, fmt: str, workdir: Path, timeout: float = BOOT_TIMEOUT) -> tuple[str, float, str]:
    """Boot under TCG from a virtio disk; (serial output, seconds, command line). Stops at the marker's
    power-off, at a sign the boot is stuck in the initramfs, or at the timeout."""
    kernel, initrd, cmdline = boot_files(image, fmt, workdir)
    serial = workdir / "serial.log"
    serial.unlink(missing_ok=True)
    argv = [QEMU, "-machine", "q35", "-m", "1024", "-smp", "2", "-display", "none", "-no-reboot",
            "-serial", f"file:{serial}", "-monitor", "none",
            "-drive", f"file={image},if=virtio,format={fmt},snapshot=on",
            "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", f"{cmdline} console=ttyS0"]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while proc.poll() is None and time.monotonic() - started < timeout:
            text = serial.read_text(errors="replace") if serial.exists() else ""
            if any(sign in text for sign in STUCK_SIGNS) and "H2K-BOOT-OK" not in text:
                time.sleep(2)        # let the message finish
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    return (serial.read_text(errors="replace") if serial.exists() else ""), time.monotonic() - started, cmdline


# ---------------------------------------------------------------- jobs through the daemon

async def _run_job(address: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    client = await Client.connect(address)
    try:
        job_id = spec["job_id"].value
        await client.submit(spec)
        path = job_path(job_id)
        deadline = time.monotonic() + timeout
        while True:
            state = await client.prop(path, JOB, "State")
            if state in ("completed", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, f"job {job_id} still {state} after {timeout} s"
            await asyncio.sleep(0.5)
        result = await client.prop(path, JOB, "Result")
        error = await client.prop(path, JOB, "Error")
        return {"state": state, "result": json.loads(result) if result else {}, "error": list(error)}
    finally:
        client.close()


def job_spec(operation: str, image: Path, parameters: dict[str, Variant],
             output: Path | None = None) -> dict[str, Variant]:
    spec: dict[str, Variant] = {
        "job_id": Variant("s", new_id("fix")),
        "operation": Variant("s", operation),
        "image": Variant("a{sv}", {"path": Variant("s", str(image))}),
        "parameters": Variant("a{sv}", parameters),
        "execution_policy": Variant("a{sv}", {"timeout_seconds": Variant("u", 900)}),
    }
    if output is not None:
        spec["artifacts"] = Variant("a{sv}", {"output_path": Variant("s", str(output))})
    return spec


def submit(stack: Any, operation: str, image: Path, parameters: dict[str, Variant], output: Path | None = None,
           timeout: float = 400) -> dict[str, Any]:
    spec = job_spec(operation, image, parameters, output)
    return asyncio.run(asyncio.wait_for(_run_job(stack.bus_address, spec, timeout), timeout + 30))


def systemctl(stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """systemctl of the stack's own manager, the one running the job units."""
    env = {"XDG_RUNTIME_DIR": str(stack.runtime_dir), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(["systemctl", "--user", *args], env=env, capture_output=True, text=True, timeout=60)


def ours(directory: Path) -> list[str]:
    """What h2kd's jobs may have put in a directory besides the outputs: temporary files and mount points."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".h2k-"))


def loops_backed_under(directory: Path) -> list[str]:
    backing = run(["losetup", "-l", "-n", "-O", "BACK-FILE"]).stdout.splitlines()
    return [b for b in backing if b.strip().startswith(str(directory))]


def fixes_by_name(outputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in outputs["fixes"]}


# ---------------------------------------------------------------- small disks for the failure cases

def small_disk(path: Path, tree: Path, corrupt: bool = False) -> Path:
    """A 64 MiB MBR disk with one ext4 partition filled from `tree` (mkfs.ext4 -d: no loop device)."""
    path.unlink(missing_ok=True)
    run(["truncate", "-s", "64M", str(path)])
    run(["sfdisk", "-q", str(path)], input="label: dos\nstart=2048, type=83\n")
    run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-E", f"offset={2048 * 512}", str(path), "60M"])
    if corrupt:
        with open(path, "r+b") as f:          # the primary superblock and group descriptors
            f.seek(2048 * 512 + 1024)
            f.write(b"\0" * 8192)
    return path


def linux_tree(root: Path) -> Path:
    """A Debian-looking tree whose programs cannot run: the fixes get as far as the chroot and fail there."""
    for d in ("etc/initramfs-tools", "usr/sbin", "lib/modules/6.1.0-9-amd64/kernel", "boot/grub", "proc", "sys",
              "dev", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/os-release").write_text('ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12"\n')
    (root / "etc/fstab").write_text("/dev/sda1 / ext4 defaults 0 1\n")
    (root / "etc/initramfs-tools/modules").write_text("")
    (root / "usr/sbin/update-initramfs").write_text("#!/bin/sh\nexit 0\n")     # no /bin/sh in this guest
    (root / "usr/sbin/update-initramfs").chmod(0o755)
    (root / "lib/modules/6.1.0-9-amd64/modules.dep").write_text(
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\n")
    (root / "boot/grub/grub.cfg").write_text("linux /boot/vmlinuz root=/dev/sda1 ro\n")
    return root


# ---------------------------------------------------------------- the tests

def test_unfixed_guest_does_not_boot_from_a_virtio_disk(guest: dict[str, Any], tmp_path: Path) -> None:
    image = tmp_path / "plain.qcow2"
    run(["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", str(guest["vmdk"]), str(image)])
    serial, seconds, cmdline = boot(image, "qcow2", tmp_path)
    assert "root=/dev/sda1" in cmdline
    assert "H2K-BOOT-OK" not in serial, "the unfixed guest booted; the test guest is not a VMware-like guest"
    assert any(sign in serial for sign in STUCK_SIGNS), f"no sign of the failed root mount after {seconds:.0f} s:\n" \
                                                         + serial[-2000:]


def test_convert_with_offline_fix_boots_with_its_virtio_nic_up(stack: Any, guest: dict[str, Any],
                                                               tmp_path: Path) -> None:
    output = stack.output_dir / f"{new_id('guest')}.qcow2"
    job = submit(stack, "convert", guest["vmdk"], {"offline_fix": Variant("b", True),
                                                   "remove_vmware_tools": Variant("b", True)}, output)
    assert job["state"] == "completed", job
    fix = job["result"]["outputs"]["offline_fix"]
    assert fix["os"]["id"] == "debian" and fix["os"]["initramfs_tool"] == "initramfs-tools"
    statuses = {name: f["status"] for name, f in fixes_by_name(fix).items()}
    for name in ("fstab", "resume", "network", "initramfs", "bootloader", "vmware_tools"):
        assert statuses[name] == "applied", (name, fixes_by_name(fix)[name])
    assert loops_of(output) == [] and h2k_mounts() == []
    assert not list(stack.output_dir.glob(".h2k-*")), "temporary files were left behind"

    serial, seconds, cmdline = boot(output, "qcow2", tmp_path)
    assert re.search(r"root=UUID=[0-9a-f-]{36}", cmdline), cmdline
    assert "H2K-BOOT-OK" in serial, f"no boot marker after {seconds:.0f} s:\n{serial[-3000:]}"
    nic = re.search(r"H2K-NIC name=(\S+) state=(\S+) addr=(\S+) driver=(\S+)", serial)
    assert nic, serial[-2000:]
    assert nic.group(2) == "up" and nic.group(3) == "10.0.2.15/24" and nic.group(4) == "virtio_net", nic.group(0)
    output.unlink()


def test_dry_run_changes_nothing_and_lists_the_planned_fixes(stack: Any, guest: dict[str, Any]) -> None:
    image = stack.output_dir / f"{new_id('dry')}.qcow2"
    run(["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", str(guest["vmdk"]), str(image)])
    before = sha256(image)
    job = submit(stack, "offline_fix", image, {"dry_run": Variant("b", True)})
    assert job["state"] == "completed", job
    outputs = job["result"]["outputs"]
    assert outputs["dry_run"] is True
    assert sha256(image) == before
    fixes = fixes_by_name(outputs)
    for name in ("fstab", "network", "initramfs", "bootloader"):
        assert fixes[name]["status"] == "planned" and fixes[name]["changes"], fixes[name]
    assert any("/dev/sda1 -> UUID=" in c for c in fixes["fstab"]["changes"])
    assert loops_of(image) == [] and h2k_mounts() == []
    assert not list(stack.output_dir.glob(".h2k-*"))
    image.unlink()


@pytest.mark.parametrize("case", ["programs_cannot_run", "corrupt_root"])
def test_a_failure_half_way_leaves_the_job_failed_and_nothing_attached(stack: Any, tmp_path: Path,
                                                                        case: str) -> None:
    image = small_disk(stack.output_dir / f"{new_id(case)}.raw", linux_tree(tmp_path / "tree"),
                       corrupt=(case == "corrupt_root"))
    job = submit(stack, "offline_fix", image, {}, timeout=200)
    assert job["state"] == "failed", job
    code, message = job["error"]
    if case == "programs_cannot_run":
        assert code == "TOOL_FAILED" and "initramfs" in message, job["error"]
        failed = [f["name"] for f in job["result"]["outputs"]["fixes"] if f["status"] == "failed"]
        assert "initramfs" in failed
    else:
        assert code == "INVALID_IMAGE" and "no Linux root filesystem" in message, job["error"]
    assert loops_of(image) == [], "a loop device was left attached"
    assert h2k_mounts() == [], "a mount was left behind"
    assert not list(stack.output_dir.glob(".h2k-*"))
    image.unlink()


@pytest.mark.parametrize("output_format", ["qcow2", "raw"])
def test_convert_whose_repair_fails_never_shows_its_output(stack: Any, tmp_path: Path, output_format: str) -> None:
    """The output gets its name only once converted and repaired: while the repair runs (and after it
    failed) there is nothing under the output's name, and nothing of the job is left in the directory."""
    source = small_disk(tmp_path / "vmware-like.raw", linux_tree(tmp_path / "tree"))
    output = stack.output_dir / f"{new_id('unfixable')}.{output_format}"
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if output.exists() or output.is_symlink():
                seen.append(f"{output.name} existed during the job")
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        job = submit(stack, "convert", source, {"offline_fix": Variant("b", True),
                                                "output_format": Variant("s", output_format)}, output, timeout=200)
    finally:
        done.set()
        watcher.join()
    assert job["state"] == "failed", job
    code, message = job["error"]
    assert code == "TOOL_FAILED" and "initramfs" in message, job["error"]
    outputs = job["result"]["outputs"]
    assert outputs["disks"] == [] and outputs["domain_xml"] is None
    assert "initramfs" in [f["name"] for f in outputs["offline_fix"]["fixes"] if f["status"] == "failed"]
    assert seen == [] and not output.exists()
    assert not [p.name for p in stack.output_dir.iterdir() if p.name.startswith(".h2k-")], "temporary files left"
    backing = run(["losetup", "-l", "-n", "-O", "BACK-FILE"]).stdout.split()
    assert not [b for b in backing if b.startswith(str(stack.output_dir))], "a loop device was left attached"
    assert h2k_mounts() == []


def test_an_image_outside_the_output_roots_is_refused_when_submitted(stack: Any, tmp_path: Path) -> None:
    """offline_fix rewrites its image as an output is written: one outside the output roots is refused at
    submission, with the reason, and no job is stored (before, the job was accepted and failed when it ran). A
    dry run only reads, and may look at it."""
    image = small_disk(tmp_path / "outside.raw", linux_tree(tmp_path / "tree"))
    before = sha256(image)
    spec = job_spec("offline_fix", image, {})

    async def refused() -> tuple[str, bool]:
        client = await Client.connect(stack.bus_address)
        try:
            message = await client.submit(spec, expect_error="org.freedesktop.DBus.Error.AccessDenied")
            stored = await client.manager("GetJob", "s", [spec["job_id"].value],
                                          expect_error="org.hyper2kvm.h2kd1.Error.NoSuchJob")
            return message, bool(stored)
        finally:
            client.close()
    message, _ = asyncio.run(refused())
    assert message.startswith(f"refusing {image}: offline_fix changes it in place") and str(stack.output_dir) in message
    assert "dry run may read any image" in message
    job = submit(stack, "offline_fix", image, {"dry_run": Variant("b", True)}, timeout=200)
    assert job["state"] == "completed", job
    assert sha256(image) == before
    # Named through a link inside an output root, the image still lies outside them. h2kctl opens the image and
    # passes its descriptor (SubmitJobWithImage): h2kd must resolve the path it was given all the same.
    link = stack.output_dir / new_id("link-out")
    link.symlink_to(tmp_path)
    job_file = tmp_path / "fix.json"
    job_file.write_text(json.dumps({"operation": "offline_fix", "image": {"path": str(link / image.name)}}))
    try:
        refused = subprocess.run([str(Path(sys.executable).parent / "h2kctl"), "submit", "--file", str(job_file)],
                                 env={**os.environ, **stack.env()}, capture_output=True, text=True, timeout=60)
    finally:
        link.unlink()
    assert refused.returncode == 5 and "offline_fix changes it in place" in refused.stderr, refused
    assert sha256(image) == before


def test_a_windows_guest_is_reported_as_not_supported(stack: Any, tmp_path: Path) -> None:
    tree = tmp_path / "win"
    (tree / "Windows/System32/config").mkdir(parents=True)
    (tree / "Windows/System32/config/SYSTEM").write_bytes(b"regf" + b"\0" * 4092)
    image = small_disk(stack.output_dir / f"{new_id('win')}.raw", tree)
    job = submit(stack, "offline_fix", image, {}, timeout=120)
    assert job["state"] == "failed", job
    code, message = job["error"]
    assert code == "UNSUPPORTED" and "Windows" in message and "not supported" in message, job["error"]
    assert loops_of(image) == [] and h2k_mounts() == []
    image.unlink()


def test_a_repaired_qcow2_keeps_its_owner_and_mode(guest: dict[str, Any], tmp_path: Path) -> None:
    """The repaired qcow2 replaces the original: it must stay its owner's, with its mode, and no temporary
    file of the repair may be left next to it."""
    from h2kd.operations.offline_fix import run_offline_fix

    directory = tmp_path / "images"
    directory.mkdir()
    image = directory / "alice.qcow2"
    run(["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", str(guest["vmdk"]), str(image)])
    os.chown(image, 4242, 4343)
    image.chmod(0o640)
    before = image.stat()
    result = run_offline_fix(str(image), {}, lambda phase, fraction, message: None, image_format="qcow2")
    assert result["changed_files"], result
    after = image.stat()
    assert after.st_ino != before.st_ino, "the image was not replaced by its repaired copy"
    assert (after.st_uid, after.st_gid, after.st_mode & 0o7777) == (4242, 4343, 0o640)
    assert [p.name for p in directory.iterdir()] == ["alice.qcow2"]
    assert loops_of(image) == [] and h2k_mounts() == []


def test_a_link_on_the_images_path_swapped_before_the_replace_does_not_lead_it_elsewhere(
        guest: dict[str, Any], tmp_path: Path, monkeypatch: Any) -> None:
    """The image is named through a symbolic link to its directory, which the submitter owns. Swapped for a
    link to a root-only directory after the repaired copy was checked and before it takes the image's place,
    the link must not send root's rename there: the root-only file of the same name stays as it was, and the
    image in its real directory is the one replaced."""
    from h2kd.operations.offline_fix import run_offline_fix
    from h2kd.operations.tempfiles import TEMP_PREFIX

    real = tmp_path / "real"
    real.mkdir()
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    victim = private / "alice.qcow2"
    victim.write_bytes(b"root's own file")
    victim_inode = victim.stat().st_ino
    link = tmp_path / "alice"
    link.symlink_to(real)
    image = real / "alice.qcow2"
    run(["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", str(guest["vmdk"]), str(image)])
    before = image.stat().st_ino
    real_fsync = os.fsync
    swapped: list[str] = []

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if not swapped and os.path.basename(name).startswith(TEMP_PREFIX) and name.endswith("-alice.qcow2"):
            link.unlink()
            link.symlink_to(private)
            swapped.append(name)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)

    result = run_offline_fix(str(link / "alice.qcow2"), {}, lambda phase, fraction, message: None,
                             image_format="qcow2")
    assert swapped, "the repaired copy was never synced before its rename"
    assert result["changed_files"], result
    assert victim.read_bytes() == b"root's own file" and victim.stat().st_ino == victim_inode
    assert image.stat().st_ino != before, "the image was not replaced by its repaired copy"
    assert sorted(p.name for p in real.iterdir()) == ["alice.qcow2"] and ours(private) == []


def test_a_worker_killed_in_the_middle_of_a_repair_leaves_no_temporary_file(stack: Any, guest: dict[str, Any]) -> None:
    """A worker killed outright during the repair (SIGKILL: the OOM killer, or a stop that ran out of time)
    cannot remove the raw copy it was repairing. h2kd removes it when it settles the attempt, because the
    worker recorded it before it made it; the image is left as it was."""
    image = stack.output_dir / f"{new_id('killed')}.qcow2"
    run(["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", str(guest["vmdk"]), str(image)])
    before = sha256(image)
    spec = job_spec("offline_fix", image, {})
    job = job_path(spec["job_id"].value)

    async def scenario() -> tuple[list[str], subprocess.CompletedProcess[str], str]:
        client = await Client.connect(stack.bus_address)
        try:
            await client.submit(spec)

            async def repairing() -> tuple[str, list[str]] | None:
                props = await client.job_props(job)
                assert props["State"] not in ("completed", "failed", "cancelled"), props["Error"]
                seen = ours(stack.output_dir)
                return (props["Unit"], seen) if props["Phase"] == "fix" and seen else None
            unit, seen = await wait_for(repairing, 300, "the repair to be under way")
            killed = await asyncio.to_thread(systemctl, stack, "kill", "--signal=KILL", unit)

            async def over() -> str | None:
                state = await client.prop(job, JOB, "State")
                return state if state in ("completed", "failed", "cancelled") else None
            return seen, killed, await wait_for(over, 120, "the killed attempt to be settled")
        finally:
            client.close()

    seen, killed, state = asyncio.run(asyncio.wait_for(scenario(), 500))
    assert killed.returncode == 0, killed.stderr
    assert state == "failed"
    assert any(name.endswith(".raw") for name in seen), f"no raw copy was being repaired: {seen}"
    assert ours(stack.output_dir) == [], f"left behind (while repairing there were {seen})"
    assert sha256(image) == before
    deadline = time.monotonic() + 30
    while loops_backed_under(stack.output_dir) and time.monotonic() < deadline:
        time.sleep(0.2)       # the unit's mounts go with its last process, and the loop device with them
    assert loops_backed_under(stack.output_dir) == []
    image.unlink()


@pytest.mark.parametrize("case", ["offline_fix of a qcow2", "offline_fix of a raw image", "convert with offline_fix"])
def test_a_symlink_swapped_in_during_the_repair_does_not_lead_it_elsewhere(tmp_path: Path, monkeypatch: Any,
                                                                             case: str) -> None:
    """The submitter owns the directory of the raw file the repair works on as root (the image, or the raw copy
    of a qcow2 or of a converted disk) and may swap its name for a symlink while the repair runs. The repair
    goes on with the file it opened and checked: a root-only disk the symlink leads to stays byte for byte as
    it was, and the fixes are made on the real file."""
    from h2kd.operations.convert import run_convert
    from h2kd.operations.offline_fix import boot_disk_repair, run_offline_fix
    from h2kd.operations.qemuimg import OperationError

    tree = linux_tree(tmp_path / "tree")
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    victim = small_disk(private / "victim.raw", tree)      # a disk the fixes would change if they reached it
    untouched = sha256(victim)
    alice = tmp_path / "alice"
    alice.mkdir()
    run_dir = tmp_path / "run"          # the worker's working directory, as in its unit
    run_dir.mkdir(mode=0o700)
    monkeypatch.chdir(run_dir)
    swapped: list[str] = []

    def swap(phase: str) -> None:
        if phase != "attach" or swapped:
            return
        name = next(p for p in alice.iterdir() if p.name.endswith(".raw") and p.name != "moved-away")
        name.rename(alice / "moved-away")
        name.symlink_to(victim)
        swapped.append(name.name)

    with pytest.raises(OperationError) as failed:
        if case == "convert with offline_fix":
            source = small_disk(tmp_path / "vmware-like.raw", tree)
            spec = {"job_id": "swap", "operation": "convert", "image": {"path": str(source)},
                    "parameters": {"offline_fix": True}, "artifacts": {"output_path": str(alice / "out.qcow2")}}
            run_convert(spec, [str(alice)], lambda phase, done, total, message: swap(phase),
                        repair=boot_disk_repair({}))
        else:
            raw = small_disk(alice / "disk.raw", tree)
            image = raw
            if case == "offline_fix of a qcow2":
                image = alice / "disk.qcow2"
                run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)])
                raw.unlink()
            run_offline_fix(str(image), {}, lambda phase, fraction, message: swap(phase))
    assert swapped, "the repair never got to attaching the disk"
    assert sha256(victim) == untouched, "the repair wrote to the file the symlink led to"
    # The guest's programs cannot run here, so the repair fails, but only after it fixed the real file's fstab.
    assert failed.value.code == "TOOL_FAILED" and "initramfs" in failed.value.message, failed.value.message
    report = failed.value.outputs.get("offline_fix") or failed.value.outputs
    assert fixes_by_name(report)["fstab"]["status"] == "applied", report
    assert ours(alice) == [] and ours(run_dir) == [] and h2k_mounts() == []


def test_a_symlink_swapped_in_for_another_disks_output_does_not_lead_root_elsewhere(tmp_path: Path,
                                                                                    monkeypatch: Any) -> None:
    """A convert that repairs the guest runs qemu-img as root for every disk, not only the repaired one. The
    submitter, who owns the output directory, may swap the temporary name of the second disk's output for a
    symlink between its creation and qemu-img opening it: qemu-img still writes the file made for it, and a
    root-only file the symlink leads to stays byte for byte as it was."""
    from h2kd.operations import qemuimg
    from h2kd.operations.convert import run_convert
    from tests.images import make_image, make_vmx

    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    victim = private / "victim.img"
    victim.write_bytes(os.urandom(1 << 20))
    untouched = sha256(victim)
    vm = tmp_path / "vm"
    vm.mkdir()
    raw = tmp_path / "blank.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "16M"])
    for name in ("boot.vmdk", "data.vmdk"):
        make_image("vmdk", "monolithicSparse", vm / name, raw=raw)
    vmx = make_vmx(vm, ["boot.vmdk", "data.vmdk"])
    alice = tmp_path / "alice"
    alice.mkdir()
    real_convert = qemuimg.convert
    swapped: list[str] = []

    def convert_after_a_swap(source: Any, destination: str, *args: Any, **kwargs: Any) -> None:
        if source.path.endswith("data.vmdk"):
            for temp in alice.glob(".h2k-tmp-*"):
                if temp.is_file() and not temp.is_symlink() and temp.stat().st_size == 0:
                    temp.rename(alice / "moved-away")
                    temp.symlink_to(victim)
                    swapped.append(temp.name)
        real_convert(source, destination, *args, **kwargs)

    monkeypatch.setattr(qemuimg, "convert", convert_after_a_swap)
    spec = {"job_id": "swap2", "operation": "convert", "image": {"path": str(vmx)},
            "parameters": {"offline_fix": True}, "artifacts": {"output_path": str(alice / "out.qcow2")}}
    try:
        # The guest's repair is not what this is about: it stands aside, and only the conversions run.
        run_convert(spec, [str(alice)], lambda phase, done, total, message: None,
                    repair=lambda raw_fd, progress: {"fixes": []})
    except (qemuimg.OperationError, OSError):
        pass            # the swapped name is not the file made for the output: refusing it is right too
    assert swapped, "the second disk was never converted"
    assert sha256(victim) == untouched, "root's qemu-img wrote to the file the symlink led to"


@pytest.mark.parametrize("operation", ["convert", "offline_fix"])
def test_a_guest_repair_reads_images_with_its_submitters_rights(tmp_path: Path, monkeypatch: Any,
                                                                   operation: str) -> None:
    """A job that repairs a guest needs root for the loop device and the mounts, not for qemu-img: a source
    swapped, after the checks, for a symlink to a root-only image is not read (the job fails), where root's
    qemu-img would have copied that image into the submitter's output."""
    import tempfile

    from h2kd.operations import qemuimg
    from h2kd.worker.main import _run_operation, _validated_spec

    uid, gid = 4242, 4343
    monkeypatch.setattr(qemuimg, "_CREDENTIALS", {})        # run_as, called by the worker, changes it
    base = Path(tempfile.mkdtemp(prefix="h2k-repair-as-user-"))
    try:
        base.chmod(0o755)
        private = base / "root-only"
        private.mkdir(mode=0o700)
        secret = private / "secret.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(secret), "16M"])
        home = base / "home"
        home.mkdir()
        os.chown(home, uid, gid)
        image = home / "disk.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"])
        os.chown(image, uid, gid)
        real_convert = qemuimg.convert
        outcomes: list[str] = []
        swap = [False]

        def convert_after_a_swap(source: Any, destination: str, *args: Any, **kwargs: Any) -> None:
            if swap[0] and source.path == str(image) and not image.is_symlink():
                image.rename(home / "moved-away.qcow2")
                image.symlink_to(secret)
            try:
                real_convert(source, destination, *args, **kwargs)
            except qemuimg.QemuImgError as e:
                outcomes.append(e.message)
                raise
            outcomes.append("read")

        monkeypatch.setattr(qemuimg, "convert", convert_after_a_swap)
        spec = _validated_spec({"job_id": "as-user", "operation": operation, "image": {"path": str(image)},
                                "parameters": {"offline_fix": True} if operation == "convert" else {},
                                "artifacts": {"output_path": str(home / "out.qcow2")}})
        owner = {"uid": uid, "gid": gid, "groups": [gid]}
        monkeypatch.chdir(base)
        # Unswapped, qemu-img reads and writes with the submitter's rights, through the worker's descriptors of
        # the temporary files; the repair then fails on this blank disk (no file system), as root's would.
        with pytest.raises(qemuimg.OperationError) as blank:
            _run_operation(spec, [str(home)], lambda *report: None, lambda process: None, owner)
        assert outcomes == ["read"] and "no Linux root filesystem" in blank.value.message, (outcomes, blank.value)
        outcomes.clear()
        swap[0] = True
        with pytest.raises(qemuimg.OperationError):
            _run_operation(spec, [str(home)], lambda *report: None, lambda process: None, owner)
        assert outcomes and outcomes[0] != "read", outcomes
        assert "Permission denied" in outcomes[0], outcomes
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_an_image_its_submitter_may_no_longer_write_is_not_repaired(tmp_path: Path) -> None:
    """Whether the submitter may write the image was checked at submission; a repair that starts later (from the
    queue, or retried hours after) finds its owner took that right back: root must not rewrite it for them. A dry
    run, which writes nothing, still may."""
    import tempfile

    from h2kd.operations.offline_fix import run_offline_fix
    from h2kd.operations.qemuimg import OperationError

    base = Path(tempfile.mkdtemp(prefix="h2k-repair-write-"))
    try:
        base.chmod(0o755)
        image = base / "disk.raw"
        image.write_bytes(bytes(4 * 1024 * 1024))
        os.chown(image, 4242, 4343)
        image.chmod(0o444)          # hers, and closed to writing since the submission
        content = image.read_bytes()
        owner = {"uid": 4242, "gid": 4343, "groups": [4343]}
        with pytest.raises(OperationError, match="may no longer write the image") as refused:
            run_offline_fix(str(image), {}, lambda phase, fraction, message: None, image_format="raw", owner=owner)
        assert refused.value.code == "PERMISSION_DENIED"
        assert image.read_bytes() == content and loops_of(image) == []
        with pytest.raises(OperationError, match="no Linux root filesystem"):    # a blank disk, looked at all the same
            run_offline_fix(str(image), {"dry_run": True}, lambda phase, fraction, message: None, image_format="raw",
                            owner=owner)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- kernels without LOOP_CONFIGURE

UNKNOWN_LOOP_IOCTL = 0x4CFF     # no loop ioctl has this number: refused as kernels before 5.8 refuse LOOP_CONFIGURE


def without_loop_configure(monkeypatch: Any) -> list[tuple[int, int]]:
    """Make the kernel refuse devices.LOOP_CONFIGURE as a kernel older than 5.8 does; the loop ioctls made
    from then on, as (request, errno or 0), are recorded in the list returned."""
    import fcntl

    from h2kd.operations.offline_fix import devices

    monkeypatch.setattr(devices, "LOOP_CONFIGURE", UNKNOWN_LOOP_IOCTL)
    calls: list[tuple[int, int]] = []
    real_ioctl = fcntl.ioctl

    def ioctl(fd: int, request: int, *args: Any) -> Any:
        try:
            result = real_ioctl(fd, request, *args)
        except OSError as e:
            calls.append((request, e.errno or -1))
            raise
        calls.append((request, 0))
        return result

    monkeypatch.setattr(devices.fcntl, "ioctl", ioctl)
    return calls


def sysfs_flag(loop: str, name: str) -> str:
    return Path(f"/sys/block/{os.path.basename(loop)}/{name}").read_text().strip()


@pytest.mark.parametrize("read_only", [False, True], ids=["read-write", "read-only"])
def test_without_loop_configure_the_disk_is_attached_with_loop_set_fd(tmp_path: Path, monkeypatch: Any,
                                                                      read_only: bool) -> None:
    """On a kernel without LOOP_CONFIGURE the disk is still attached on the descriptor, with its partitions,
    autoclear, read-only when asked (even on a descriptor open for writing, as a dry run must not write
    whatever it is given), and is gone afterwards."""
    import errno

    from h2kd.operations.offline_fix import devices

    image = small_disk(tmp_path / "disk.raw", linux_tree(tmp_path / "tree"))
    before = sha256(image)
    calls = without_loop_configure(monkeypatch)
    marker = b"h2k-loop-set-fd-" + os.urandom(8)
    outside_fs = 62 << 20           # within partition 1 (1 MiB to 64 MiB), past its 60 MiB file system
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        with devices.attached_disk(fd, read_only=read_only) as disk:
            loop = disk.loop
            requests = [request for request, _ in calls]
            assert (UNKNOWN_LOOP_IOCTL, errno.EINVAL) in calls or (UNKNOWN_LOOP_IOCTL, errno.ENOTTY) in calls, calls
            assert (devices.LOOP_SET_FD, 0) in calls and (devices.LOOP_SET_STATUS64, 0) in calls, calls
            assert requests.index(devices.LOOP_SET_FD) < requests.index(devices.LOOP_SET_STATUS64)
            assert Path(sysfs_flag(loop, "loop/backing_file")).resolve() == image.resolve()
            assert sysfs_flag(loop, "loop/autoclear") == "1" and sysfs_flag(loop, "loop/partscan") == "1"
            part = disk.partition(1)
            assert part is not None and part.fstype == "ext4" and Path(part.path).exists(), disk.devices
            assert disk.partition_table == "dos"
            assert sysfs_flag(loop, "ro") == ("1" if read_only else "0")
            if read_only:
                with pytest.raises(OSError) as refused:
                    writer = os.open(part.path, os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.pwrite(writer, marker, outside_fs)
                        os.fsync(writer)
                    finally:
                        os.close(writer)
                assert refused.value.errno in (errno.EPERM, errno.EACCES, errno.EROFS), refused.value
            else:
                writer = os.open(part.path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    assert os.pwrite(writer, marker, outside_fs) == len(marker)
                    os.fsync(writer)
                finally:
                    os.close(writer)
        assert not Path(f"/sys/block/{os.path.basename(loop)}/loop/backing_file").exists(), "still attached"
        assert not Path(f"/sys/block/{os.path.basename(loop)}/{os.path.basename(loop)}p1").exists()
        assert loops_of(image) == []
        if read_only:
            assert sha256(image) == before, "a read-only attach changed the image"
        else:
            assert os.pread(fd, len(marker), (1 << 20) + outside_fs) == marker, "the write did not reach the image"
    finally:
        os.close(fd)


def test_without_loop_configure_a_dry_run_leaves_the_image_as_it_was(tmp_path: Path, monkeypatch: Any) -> None:
    """A dry run on a kernel without LOOP_CONFIGURE gets as far as the guest's fixes and changes no byte of the
    image, though its descriptor is open for writing."""
    from h2kd.operations.offline_fix import devices, fix_raw_image

    image = small_disk(tmp_path / "disk.raw", linux_tree(tmp_path / "tree"))
    before = sha256(image)
    calls = without_loop_configure(monkeypatch)
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    monkeypatch.chdir(work)
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        result = fix_raw_image(fd, {"dry_run": True}, lambda phase, fraction, message: None, lambda: False)
    finally:
        os.close(fd)
    assert (devices.LOOP_SET_FD, 0) in calls, calls
    assert fixes_by_name(result)["fstab"]["status"] == "planned", result
    assert sha256(image) == before
    assert loops_of(image) == [] and h2k_mounts() == [] and list(work.iterdir()) == []


def test_a_loop_device_the_kernel_refuses_is_reported_with_what_failed(tmp_path: Path, monkeypatch: Any) -> None:
    """When LOOP_SET_FD itself fails, the message says so, and does not blame the job's device policy."""
    from h2kd.operations.offline_fix import devices
    from h2kd.operations.qemuimg import OperationError

    image = small_disk(tmp_path / "disk.raw", linux_tree(tmp_path / "tree"))
    without_loop_configure(monkeypatch)
    monkeypatch.setattr(devices, "LOOP_SET_FD", UNKNOWN_LOOP_IOCTL)
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(OperationError) as failed:
            with devices.attached_disk(fd, read_only=True, name="disk.raw"):
                pass
    finally:
        os.close(fd)
    message = failed.value.message
    assert "disk.raw" in message and "LOOP_SET_FD" in message, message
    assert "allowed" not in message, message
    assert loops_of(image) == []


def test_a_disk_image_is_roots_alone_while_it_is_attached(tmp_path: Path, monkeypatch: Any) -> None:
    """The submitter owns the image (their qemu-img wrote it) and could change its file systems under the
    kernel's feet while they are mounted: an image another process holds open is refused before anything is
    attached; otherwise it is root's (0600) while attached, and gets its owner and mode back afterwards."""
    import stat

    from h2kd.operations.offline_fix import devices
    from h2kd.operations.qemuimg import OperationError

    image = small_disk(tmp_path / "disk.raw", linux_tree(tmp_path / "tree"))
    os.chown(image, 64101, 64102)
    os.chmod(image, 0o640)
    work = tmp_path / "work"          # the worker's working directory: the attempt's run directory
    work.mkdir(mode=0o700)
    monkeypatch.chdir(work)
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        with open(image, "rb") as kept:
            holder = subprocess.Popen(["sleep", "120"], stdin=kept)
        try:
            with pytest.raises(OperationError) as refused:
                with devices.attached_disk(fd, read_only=False, name="disk.raw"):
                    pass
        finally:
            holder.kill()
            holder.wait()
        assert refused.value.code == "PERMISSION_DENIED", refused.value.message
        assert "disk.raw is held open by another process" in refused.value.message
        assert loops_of(image) == []
        mine = os.stat(image)
        assert (mine.st_uid, mine.st_gid, stat.S_IMODE(mine.st_mode)) == (64101, 64102, 0o640)
        with devices.attached_disk(fd, read_only=False, name="disk.raw") as disk:
            assert disk.partition(1) is not None
            held = os.stat(image)
            assert (held.st_uid, held.st_gid, stat.S_IMODE(held.st_mode)) == (0, 0, 0o600)
            assert (work / "held-images").exists()     # for the runner, should the worker be killed now
        back = os.stat(image)
        assert (back.st_uid, back.st_gid, stat.S_IMODE(back.st_mode)) == (64101, 64102, 0o640)
        assert list(work.iterdir()) == []
    finally:
        os.close(fd)


def test_a_dry_run_leaves_the_images_owner_alone(tmp_path: Path) -> None:
    """A dry run may read an image that is not its submitter's: it is attached read-only as it is, owner,
    mode and other readers included."""
    import stat

    from h2kd.operations.offline_fix import devices

    image = small_disk(tmp_path / "disk.raw", linux_tree(tmp_path / "tree"))
    os.chown(image, 64101, 64102)
    os.chmod(image, 0o644)
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with open(image, "rb"):
            with devices.attached_disk(fd, read_only=True, name="disk.raw") as disk:
                assert disk.partition(1) is not None
                held = os.stat(image)
                assert (held.st_uid, held.st_gid, stat.S_IMODE(held.st_mode)) == (64101, 64102, 0o644)
    finally:
        os.close(fd)
    assert loops_of(image) == []


@pytest.mark.parametrize("cut, problem", [(4096, "the copy is incomplete"), (1 << 20, "is damaged")])
def test_a_qcow2_cut_short_or_damaged_is_not_repaired(tmp_path: Path, cut: int, problem: str) -> None:
    """Cut within its last cluster, a qcow2 passes qemu-img check; unpacked for the repair, its missing end
    would read as zeros. Cut by more, qemu-img check finds it damaged. Either is refused before anything is
    attached or written."""
    from h2kd.operations.offline_fix import run_offline_fix
    from h2kd.operations.qemuimg import OperationError

    image = tmp_path / "guest.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
         str(small_disk(tmp_path / "disk.raw", linux_tree(tmp_path / "tree"))), str(image)])
    os.truncate(image, image.stat().st_size - cut)
    with pytest.raises(OperationError) as refused:
        run_offline_fix(str(image), {"dry_run": False}, lambda phase, fraction, message: None)
    assert refused.value.code == "INVALID_IMAGE" and problem in refused.value.message, refused.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw", "guest.qcow2", "tree"]
    assert loops_of(image) == []


def _held_by_root(directory: Path, name: str = "disk.raw") -> tuple[Path, Path]:
    """An image of uid 64101's that a repair noted and made root's, as a worker killed then leaves it; (the
    image, the record)."""
    from h2kd.operations.tempfiles import inode_generation, note_held

    image = directory / name
    image.write_bytes(bytes(4096))
    os.chown(image, 64101, 64102)
    image.chmod(0o640)
    record = directory / "held-images"
    fd = os.open(image, os.O_RDONLY)
    try:
        note_held(str(record), str(image), os.fstat(fd), inode_generation(fd))
    finally:
        os.close(fd)
    os.chown(image, 0, 0)
    image.chmod(0o600)
    return image, record


def test_an_image_a_live_repair_holds_is_not_given_back(tmp_path: Path) -> None:
    """Between making an image root's and binding its loop device, and while it is bound, a repair holds it
    (hold_image): a record read meanwhile (its unit's name taken again by a new attempt, h2kd starting) must not
    hand the image back in the middle of the repair. Once the holder is gone, it is given back."""
    import fcntl
    import stat

    from h2kd.operations.tempfiles import release_held

    image, record = _held_by_root(tmp_path)
    repair = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(repair, fcntl.LOCK_EX)
        assert release_held(str(record), attached=lambda path: False) == []
        assert (image.stat().st_uid, stat.S_IMODE(image.stat().st_mode)) == (0, 0o600) and record.exists()
    finally:
        os.close(repair)
    assert release_held(str(record), attached=lambda path: False) == [str(image)]
    assert (image.stat().st_uid, image.stat().st_gid, stat.S_IMODE(image.stat().st_mode)) == (64101, 64102, 0o640)
    assert not record.exists()


def test_a_new_root_file_given_the_images_inode_number_is_not_given_away(tmp_path: Path) -> None:
    """The image's owner deletes it; root makes a file of its own (0600) at the same path, and the file system
    gives it the freed inode number: that file is not the image, and stays root's."""
    from h2kd.operations.tempfiles import inode_generation, release_held

    image, record = _held_by_root(tmp_path)
    noted = image.stat().st_ino
    probe = os.open(image, os.O_RDONLY)
    try:
        if inode_generation(probe) is None:
            pytest.skip("this file system does not keep inode generations")
    finally:
        os.close(probe)
    image.unlink()
    # ext4 gives a new file the lowest free number of its group: files are made until the image's comes round.
    for n in range(10_000):
        made = tmp_path / f"new-{n}"
        os.close(os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        if made.stat().st_ino == noted:
            made.rename(image)
            break
    else:
        pytest.skip("this file system did not give the freed inode number to a new file")
    assert release_held(str(record), attached=lambda path: False) == []
    assert (image.stat().st_uid, image.stat().st_mode & 0o777) == (0, 0o600)


def test_a_damaged_record_gives_back_what_it_can_and_goes(tmp_path: Path) -> None:
    """A line cut short (a full disk) is passed over, not read again every ten seconds for ever."""
    from h2kd.operations.tempfiles import release_held

    image, record = _held_by_root(tmp_path)
    with open(record, "a") as f:
        f.write('{"path": "/etc/sha\n[1, 2]\n{"path": 7}\n')
    assert release_held(str(record), attached=lambda path: False) == [str(image)]
    assert not record.exists()


def test_an_image_reached_through_a_symbolic_link_is_not_given_back(tmp_path: Path) -> None:
    """The path must lead to the file as it did, with no link on the way: its owner may swap a directory of
    theirs for a link elsewhere."""
    from h2kd.operations.tempfiles import release_held

    real = tmp_path / "real"
    real.mkdir()
    image, record = _held_by_root(real)
    moved = tmp_path / "moved"
    real.rename(moved)
    real.symlink_to(moved)
    assert release_held(str(moved / "held-images"), attached=lambda path: False) == []
    assert (moved / "disk.raw").stat().st_uid == 0


def test_a_repair_leaves_alone_an_image_another_process_has_locked(tmp_path: Path, monkeypatch: Any) -> None:
    import fcntl

    from h2kd.operations.offline_fix import devices
    from h2kd.operations.qemuimg import OperationError

    image = small_disk(tmp_path / "disk.raw", linux_tree(tmp_path / "tree"))
    os.chown(image, 64101, 64102)
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    monkeypatch.chdir(work)
    theirs = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    fcntl.flock(theirs, fcntl.LOCK_EX)
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        with pytest.raises(OperationError) as refused:
            with devices.attached_disk(fd, read_only=False, name="disk.raw"):
                pass
        assert refused.value.code == "PERMISSION_DENIED" and "locked by another process" in refused.value.message
        assert image.stat().st_uid == 64101 and loops_of(image) == []
    finally:
        os.close(fd)
        os.close(theirs)


def test_an_image_whose_loop_device_stays_bound_stays_roots(tmp_path: Path, monkeypatch: Any) -> None:
    """A file system only lazily unmounted keeps its loop device bound: the image is not given back to its
    owner then, who could change it under the kernel; the runner gives it back once the device is gone."""
    import stat

    from h2kd.operations.offline_fix import devices
    from h2kd.operations.tempfiles import release_held

    image = small_disk(tmp_path / "disk.raw", linux_tree(tmp_path / "tree"))
    os.chown(image, 64101, 64102)
    os.chmod(image, 0o640)
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    monkeypatch.chdir(work)
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        with devices.attached_disk(fd, read_only=False, name="disk.raw") as disk:
            # What a lazily unmounted file system does: something still holds the device.
            still_holding = os.open(disk.loop, os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)
    try:
        held = os.stat(image)
        assert (held.st_uid, stat.S_IMODE(held.st_mode)) == (0, 0o600)
        assert release_held(str(work / "held-images")) == []      # still bound: not yet
    finally:
        os.close(still_holding)           # autoclear takes the device away now
    deadline = time.monotonic() + 10
    while loops_of(image) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert release_held(str(work / "held-images")) == [str(image)]
    back = os.stat(image)
    assert (back.st_uid, back.st_gid, stat.S_IMODE(back.st_mode)) == (64101, 64102, 0o640)


def test_a_qcow2_repairs_progress_climbs_through_unpack_fix_and_pack(tmp_path: Path, monkeypatch: Any) -> None:
    """Unpack, fix and pack each report 0..1 of their own; the job's progress is their sum on one scale, so it
    rises through all three instead of reaching 100% when the unpacking ends (progress never goes back: the
    fix and the pack would have shown 100% for minutes). The worker is told once, before the repaired image
    takes the original's place, that the attempt is past stopping (a cancel then would report nothing changed,
    a retry would repair the repaired image). The guest's fix stands aside: the qemu-img runs are real."""
    from h2kd.operations import offline_fix

    image = tmp_path / "guest.qcow2"
    raw = tmp_path / "guest.raw"
    raw.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)])

    def fix_standing_aside(fd: int, params: dict[str, Any], progress: Any, cancelled: Any, what: str) -> dict:
        for fraction in (0.0, 0.5, 1.0):
            progress("fix", fraction, "a fix")
        return {"changed_files": ["/etc/fstab"], "fixes": []}
    monkeypatch.setattr(offline_fix, "fix_raw_image", fix_standing_aside)
    seen: list[tuple[str, float]] = []
    original = image.stat().st_ino
    committed: list[bool] = []

    def on_commit() -> None:   # the worker stops taking stops here: the image must not have been replaced yet
        committed.append(image.stat().st_ino == original)
    offline_fix.run_offline_fix(str(image), {}, lambda phase, fraction, message: seen.append((phase, fraction))
                                if fraction is not None else None, on_commit=on_commit)
    assert committed == [True] and image.stat().st_ino != original, committed
    fractions = [fraction for _, fraction in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0), seen
    by_phase = {phase: [f for p, f in seen if p == phase] for phase in ("unpack", "fix", "pack")}
    assert max(by_phase["unpack"]) <= 1 / 3 + 1e-9 and by_phase["fix"] == pytest.approx([1 / 3, 0.5, 2 / 3])
    assert min(by_phase["pack"]) >= 2 / 3 - 1e-9, seen
    assert not (difference := disk_difference(raw, image, "raw", "qcow2")), difference     # packed back whole


def test_an_image_neither_raw_nor_qcow2_is_refused_by_the_format_found_in_it(tmp_path: Path) -> None:
    """Not declared, the format is the one found through the file that was checked (no probe of the path
    by root beforehand): a VMDK is refused, saying what to do instead, and nothing is written."""
    from h2kd.operations import offline_fix
    from h2kd.operations.qemuimg import OperationError

    image = tmp_path / "guest.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", str(image), "8M"])
    before = sorted(tmp_path.iterdir())
    with pytest.raises(OperationError, match="offline_fix works on raw and qcow2 images, not vmdk; convert the "
                                             r"image first \(or run convert with offline_fix\)"):
        offline_fix.run_offline_fix(str(image), {}, lambda phase, fraction, message: None)
    assert sorted(tmp_path.iterdir()) == before


# ---------------------------------------------------------------- what a guest's own files may hold

def guest_entry(image: Path, path: str) -> tuple[str, bytes]:
    """(its type as debugfs names it, its content if a regular file) of a path on a small_disk's file system,
    read without mounting it; ("", b"") when there is no such path."""
    fs = f"{image}?offset={2048 * 512}"
    described = run(["debugfs", "-R", f"stat {path}", fs]).stdout
    kind = re.search(r"Type:\s+(.+?)\s+Mode:", described)
    if not kind:
        return "", b""
    content = b""
    if kind.group(1) == "regular":
        content = subprocess.run(["debugfs", "-R", f"cat {path}", fs], capture_output=True, check=True,
                                 timeout=120).stdout
    return kind.group(1), content


class Hung(BaseException):
    """The repair did not return within the time a test gave it."""


def fix_in_place(image: Path, work: Path, progress: Any = None, limit: float = 120) -> Any:
    """fix_raw_image on `image` (not a dry run), from the working directory `work`, as the worker runs it; the
    OperationError it ends with (these guests' programs cannot run, so the initramfs fix fails), or what it
    returned. Hung if it takes longer than `limit` seconds."""
    import signal

    from h2kd.operations.offline_fix import fix_raw_image
    from h2kd.operations.qemuimg import OperationError

    def hung(signum: int, frame: Any) -> None:
        raise Hung(f"the repair did not return within {limit:.0f} s")

    # SIGUSR1, not SIGALRM: pytest-timeout's timer is SIGALRM, and the repair holds that one while it cleans up.
    previous = signal.signal(signal.SIGUSR1, hung)
    watchdog = threading.Timer(limit, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    watchdog.start()
    cwd = os.getcwd()
    os.chdir(work)
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        return fix_raw_image(fd, {}, progress or (lambda phase, fraction, message: None), lambda: False,
                             image.name)
    except OperationError as e:
        return e
    finally:
        watchdog.cancel()
        watchdog.join()
        signal.signal(signal.SIGUSR1, previous)
        os.close(fd)
        os.chdir(cwd)


def mounts_under(directory: Path) -> list[list[str]]:
    """The mounts below `directory`, as /proc/mounts lists them (device, mount point, type, options, ...)."""
    return [line.split() for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(directory) + "/")]


@pytest.mark.parametrize("planted", ["a FIFO", "a character device (1:3)", "a block device (a loop device)"])
def test_a_node_the_guest_holds_by_the_name_of_a_temporary_copy_is_never_written_to(tmp_path: Path,
                                                                                   planted: str) -> None:
    """A guest may ship anything under the name an earlier h2kd gave its temporary copy of a file it rewrites
    (/etc/fstab.h2k-tmp): a FIFO (the repair would wait on it for ever) or a device node, which root would
    write the new fstab to (a loop device or a disk of the host's). The copy is made under a new name that was
    not there before, and the guest's file systems are mounted nodev and nosuid: the node is left as it is and
    nothing is written through it; /etc/fstab is rewritten all the same."""
    import stat

    tree = linux_tree(tmp_path / "tree")
    trap = tree / "etc/fstab.h2k-tmp"
    scratch = tmp_path / "scratch.img"
    loop = ""
    try:
        if planted == "a FIFO":
            os.mkfifo(trap, 0o644)
            expected = "FIFO"
        elif planted.startswith("a character device"):
            os.mknod(trap, 0o644 | stat.S_IFCHR, os.makedev(1, 3))
            expected = "character special"
        else:
            scratch.write_bytes(b"the scratch disk's own data\n" * 4096)
            loop = run(["losetup", "--find", "--show", str(scratch)]).stdout.strip()
            os.mknod(trap, 0o644 | stat.S_IFBLK, os.stat(loop).st_rdev)
            expected = "block special"
        scratch_before = scratch.read_bytes() if loop else b""
        image = small_disk(tmp_path / "disk.raw", tree)
        work = tmp_path / "work"
        work.mkdir(mode=0o700)
        options: list[list[str]] = []

        def progress(phase: str, fraction: Any, message: str) -> None:
            if phase == "fix" and not options:
                options.extend(m[3].split(",") for m in mounts_under(work) if m[2] == "ext4")

        outcome = fix_in_place(image, work, progress)
        assert getattr(outcome, "code", None) == "TOOL_FAILED", outcome
        assert fixes_by_name(outcome.outputs)["fstab"]["status"] == "applied", outcome.outputs
        assert options and all("nodev" in o and "nosuid" in o for o in options), options
        kind, fstab = guest_entry(image, "/etc/fstab")
        assert kind == "regular" and re.match(rb"UUID=[0-9a-f-]{36} / ext4", fstab), (kind, fstab)
        assert guest_entry(image, "/etc/fstab.h2k-tmp")[0] == expected, "the guest's own entry was replaced"
        if loop:
            run(["blockdev", "--flushbufs", loop])
            assert scratch.read_bytes() == scratch_before, "the new fstab was written to the device the node names"
        assert loops_of(image) == [] and mounts_under(work) == [] and list(work.iterdir()) == []
    finally:
        if loop:
            run(["losetup", "-d", loop])


def test_a_guest_file_larger_than_the_repair_reads_is_refused_not_cut_short(tmp_path: Path) -> None:
    """The repair reads at most 4 MiB of a file, and rewrites what it read: a longer fstab came back cut to its
    first 4 MiB, the rest of it lost. Such a file is refused, by name and with the limit, and left whole."""
    tree = linux_tree(tmp_path / "tree")
    text = "/dev/sda1 / ext4 defaults 0 1\n" + ("# " + "x" * 1021 + "\n") * 4500 + "/dev/sda2 none swap sw 0 0\n"
    (tree / "etc/fstab").write_text(text)
    image = small_disk(tmp_path / "disk.raw", tree)
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    outcome = fix_in_place(image, work)
    assert getattr(outcome, "code", None) == "INVALID_IMAGE", outcome
    message = outcome.message
    assert "/etc/fstab" in message and "4 MiB (4194304 bytes)" in message, message
    assert guest_entry(image, "/etc/fstab") == ("regular", text.encode())
    assert guest_entry(image, "/etc/fstab.h2k-backup") == ("", b"")
    assert loops_of(image) == [] and mounts_under(work) == [] and list(work.iterdir()) == []


@pytest.mark.parametrize("point", ["proc", "run"])
def test_a_guest_whose_proc_or_run_is_a_link_does_not_have_its_programs_run(tmp_path: Path, point: str) -> None:
    """The chroot's /proc, /sys, /dev and /run are h2kd's mounts: a guest whose own is a link (to a host path its
    programs might then reach) is refused before any of them runs, unmounted and detached."""
    tree = linux_tree(tmp_path / "tree")
    (tree / point).rmdir()
    (tree / point).symlink_to("/etc")
    image = small_disk(tmp_path / "disk.raw", tree)
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    outcome = fix_in_place(image, work)
    assert getattr(outcome, "code", None) == "INVALID_IMAGE", outcome
    assert f"the guest's /{point} is a symbolic link" in outcome.message, outcome.message
    assert loops_of(image) == [] and mounts_under(work) == [] and list(work.iterdir()) == []


@pytest.mark.parametrize("line, note", [
    ("/dev/sda1 /mnt\\000x ext4 defaults 0 2", "line 2 of /etc/fstab (it holds a NUL character"),
    ("/dev/sda" + "1" * 5000 + " /data ext4 defaults 0 2", "/data (/dev/sda1111111"),
], ids=["NUL in a mount point", "partition number of 5000 digits"])
def test_an_fstab_line_no_disk_or_path_can_match_is_passed_over_and_reported(tmp_path: Path, line: str,
                                                                              note: str) -> None:
    """An octal \\000 in a mount point made a path Python refuses, and a partition number longer than int()
    takes (4300 digits) a number it refuses: both crashed the repair as an internal error of h2kd's, retried
    for ever. The line is passed over and reported in the result with what was not mounted; the rest of the
    fstab is repaired."""
    tree = linux_tree(tmp_path / "tree")
    for directory in ("mnt", "data"):
        (tree / directory).mkdir()
    (tree / "etc/fstab").write_text(f"/dev/sda1 / ext4 defaults 0 1\n{line}\n")
    image = small_disk(tmp_path / "disk.raw", tree)
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    outcome = fix_in_place(image, work)
    assert getattr(outcome, "code", None) == "TOOL_FAILED" and "initramfs" in outcome.message, outcome
    assert any(entry.startswith(note) for entry in outcome.outputs["os"]["not_mounted"]), outcome.outputs["os"]
    assert all(len(entry) < 300 for entry in outcome.outputs["os"]["not_mounted"]), "a name shown whole"
    assert fixes_by_name(outcome.outputs)["fstab"]["status"] == "applied", outcome.outputs
    fstab = guest_entry(image, "/etc/fstab")[1].decode()
    assert re.match(r"UUID=[0-9a-f-]{36} / ext4", fstab), fstab
    assert loops_of(image) == [] and mounts_under(work) == [] and list(work.iterdir()) == []


def _scan_cases() -> dict[str, tuple[dict[str, str], str, str]]:
    """Guest files (path: content) each of which a scan of the network or initramfs fix took about a minute
    over, before; the fix that scans it, and a change it must still find."""
    vmware_rule = 'SUBSYSTEM=="net", ATTR{address}=="00:50:56:8a:5c:01", NAME="ens192"\n'
    pinned_link = "[Match]\nMACAddress=00:50:56:8a:5c:01\n[Link]\nName=ens192\n"
    many_nics = "".join(f"iface eth{n} inet dhcp\n" for n in range(40000)) + \
        "auto " + " ".join(f"eth{n}" for n in range(40000)) + "\n"
    return {
        "udev rule, a long line": ({"/etc/udev/rules.d/70-net.rules": "ATTR{address}==" * 21000 + "\n" + vmware_rule},
                                   "network", "/etc/udev/rules.d/70-net.rules: moved aside"),
        "networkd .link, empty lines": ({"/etc/systemd/network/10-nic.link": "\n" * 150000 + pinned_link},
                                        "network", "/etc/systemd/network/10-nic.link: moved aside"),
        "ifupdown, many NICs": ({"/etc/network/interfaces": many_nics},
                                "network", "auto eth39999 -> auto /e*/40000=eth39999"),
        "mkinitcpio.conf, no closing parenthesis": ({"/etc/mkinitcpio.conf": "MODULES=(\n" * 30000,
                                                     "/lib/modules/6.1.0/modules.dep":
                                                     "kernel/drivers/block/virtio_blk.ko:\n"},
                                                    "initramfs", "/etc/mkinitcpio.conf: MODULES += virtio_pci"),
    }


@pytest.mark.parametrize("case", list(_scan_cases()))
def test_no_guest_file_keeps_a_fix_busy_for_longer_than_reading_it_takes(tmp_path: Path, case: str) -> None:
    """A pattern that backtracks over a long line (a udev rule's ATTR{address}== ... NAME=, 320 KB: 64 s), runs
    on over every empty line at each of them (a .link file's MACAddress=), or a lookup in a list that grows
    with the file (ifupdown's NIC names) kept a fix busy in the square of the file's size, until the job's time
    limit. Each such file is now scanned in a moment, and what it configures is still found. (The fixes run
    on a guest tree in a directory, in a dry run: the scans are the same as on a mounted guest.)"""
    from h2kd.operations.offline_fix import initramfs, network
    from h2kd.operations.offline_fix.guestfs import GuestFS

    files, fix_name, change = _scan_cases()[case]
    root = tmp_path / "guest"
    for path, content in files.items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text(content)
    guest = GuestFS(str(root), dry_run=True)
    started = time.monotonic()
    fix = network.fix_network(guest) if fix_name == "network" else \
        initramfs.fix_initramfs(guest, "mkinitcpio", ["6.1.0"])
    seconds = time.monotonic() - started
    assert seconds < 10, f"the {fix_name} fix took {seconds:.1f} s over {case}"
    assert fix.status == "planned" and any(c.startswith(change) or change in c for c in fix.changes), fix


# ---------------------------------------------------------------- a stop during the clean-up

# Stands in for umount (first on the worker's PATH): the first unmount of the guest's clean-up (not a probe's)
# tells the test it started, and waits until the test lets it go.
_UMOUNT_HOOK = """#!/bin/sh
case "$*" in
    *.h2k-mnt-*/probe-*) ;;
    *.h2k-mnt-*)
        if mkdir "$H2K_TEST_HOOKS/paused" 2>/dev/null; then
            i=0
            while [ ! -e "$H2K_TEST_HOOKS/go" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
        fi ;;
esac
exec {umount} "$@"
"""


def test_a_stop_during_the_clean_up_waits_until_the_guest_is_unmounted_and_detached(tmp_path: Path) -> None:
    """The worker turns SIGTERM into an exception wherever it lands: in the first unmount of the clean-up, it
    cut the clean-up short, and the guest's other file systems stayed mounted, its loop device bound, its volume
    groups active. A stop that comes during the clean-up now waits for it: the worker (run as its unit runs it,
    with a stand-in umount that pauses) unmounts everything, detaches the disk, and only then stops, cancelled."""
    import signal

    images_dir = tmp_path / "images"
    images_dir.mkdir()
    image = small_disk(images_dir / "disk.raw", linux_tree(tmp_path / "tree"))
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    umount = shutil.which("umount")
    assert umount
    (hooks / "umount").write_text(_UMOUNT_HOOK.format(umount=umount))
    (hooks / "umount").chmod(0o755)
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    spec = {"job_id": "stop-in-clean-up", "operation": "offline_fix", "image": {"path": str(image)},
            "parameters": {}, "execution_policy": {"timeout_seconds": 600}}
    (run_dir / "spec.json").write_text(json.dumps({"job_id": spec["job_id"], "attempt": 1, "spec": spec,
                                                   "output_roots": [str(images_dir)]}))
    env = {**os.environ, "PATH": f"{hooks}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
           "H2K_TEST_HOOKS": str(hooks), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("NOTIFY_SOCKET", None)
    log = tmp_path / "worker.log"
    with open(log, "w") as output:
        worker = subprocess.Popen([sys.executable, "-m", "h2kd.worker", "--spec", str(run_dir / "spec.json"),
                                   "--result", str(run_dir / "result.json")], cwd=run_dir, env=env,
                                  stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (hooks / "paused").exists():
            assert worker.poll() is None, f"the worker ended before its clean-up:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the clean-up never started"
            time.sleep(0.1)
        assert mounts_under(run_dir), "nothing was mounted when the clean-up started"
        worker.send_signal(signal.SIGTERM)
        time.sleep(1)               # the stop arrives while the unmount waits
        (hooks / "go").touch()
        code = worker.wait(timeout=240)
        left = mounts_under(run_dir)
        result = json.loads((run_dir / "result.json").read_text())
        assert code == 143 and result["status"] == "cancelled", (code, result, log.read_text()[-3000:])
        assert left == [], f"left mounted: {left}"
        assert loops_of(image) == [], "the loop device was left attached"
        assert sorted(p.name for p in run_dir.iterdir()) == ["result.json", "spec.json"]
        assert "clean-up problems" not in log.read_text(), log.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        # What a clean-up cut short left behind: unmounted here, so that autoclear takes the loop device away.
        for mount in reversed(mounts_under(run_dir)):
            subprocess.run(["umount", "-l", mount[1]], capture_output=True, timeout=60)
        for line in loops_of(image):
            subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True, timeout=60)


@pytest.mark.parametrize("ending", ["it fails half-way", "a stop comes"])
def test_a_volume_group_is_deactivated_however_its_activation_ended(tmp_path: Path, monkeypatch: Any,
                                                                     ending: str) -> None:
    """vgchange -ay may activate some of a group's volumes and fail on another, or be stopped (SIGTERM turned
    into an exception) once it has: the group was listed for deactivation only after it succeeded, so its
    active volumes stayed active for good. It is listed before, and deactivated whatever happened.
    device-mapper is not available on every test host (not on this one): the disk and its loop device are
    real, LVM's commands are played by a stand-in, which says partition 1 holds the volume group guestvg."""
    import signal

    from h2kd.operations.offline_fix import commands, devices
    from h2kd.operations.qemuimg import OperationError

    class Stop(BaseException):
        pass

    image = small_disk(tmp_path / "disk.raw", linux_tree(tmp_path / "tree"))
    real_probe, real_run = devices.probe, commands.run
    calls: list[list[str]] = []

    def probe(path: str) -> dict[str, str]:
        info = real_probe(path)
        return {**info, "TYPE": "LVM2_member"} if path.endswith("p1") else info

    def lvm(argv: list[str], **kwargs: Any) -> commands.Completed:
        if argv[0] not in ("vgs", "pvs", "vgchange", "lvs"):
            return real_run(argv, **kwargs)
        calls.append(argv)
        if argv[0] == "vgs":
            uuid = "|40bXMc-R1iO-24KL-lnMI-SSjG-6CMe-XUc4nZ" if "vg_name,vg_uuid" in argv else ""
            return commands.Completed(argv, 0, f"  guestvg{uuid}\n", "")
        if argv[:2] == ["vgchange", "-ay"]:
            if ending == "a stop comes":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            return commands.Completed(argv, 5, "", "  device-mapper: reload ioctl on guestvg-data failed")
        return commands.Completed(argv, 0, "", "")

    def stop(signum: int, frame: Any) -> None:
        raise Stop()

    monkeypatch.setattr(devices, "probe", probe)
    monkeypatch.setattr(commands, "have", lambda program: True)
    monkeypatch.setattr(commands, "run", lvm)
    (tmp_path / "sys").mkdir()
    monkeypatch.setattr(devices, "DM_SYSFS", str(tmp_path / "sys"), raising=False)
    previous = signal.signal(signal.SIGTERM, stop)
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises((OperationError, Stop)) as ended:
            with devices.attached_disk(fd, read_only=True, name="disk.raw"):
                pytest.fail("the disk was attached although its volume group could not be activated")
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.close(fd)
    assert isinstance(ended.value, Stop if ending == "a stop comes" else OperationError), ended.value
    activated = [argv for argv in calls if argv[:2] == ["vgchange", "-ay"]]
    deactivated = [argv for argv in calls if argv[:2] == ["vgchange", "-an"]]
    assert activated and activated[0][-1] == "guestvg", calls
    assert deactivated and deactivated[0][-1] == "guestvg", f"guestvg was never deactivated: {calls}"
    assert loops_of(image) == []


# ---------------------------------------------------------------- a guest's LVM next to the host's

# Plays LVM 2.03's vgs, pvs, lvs and vgchange (first on PATH) over the world of $H2K_TEST_LVM/world.json, and
# writes down each command line it is given. A physical volume is seen through --devices when it is named there,
# and without --devices only when it is in the host's devices file, as RHEL 9's LVM sees devices. vgchange -ay
# makes the device-mapper devices LVM would, in a sysfs tree of its own (dm-N/dm/name, dm/uuid, dev, ro, slaves/)
# and as nodes in /dev/mapper that lead to the block device an LV lies on; -an takes them away. As LVM 2.03.16
# does: --readonly refuses activation, an LV flagged to be skipped is activated with -K only, and it is read-only
# when read_only_volume_list names its group (exactly: "*" is no pattern there). A "p1" or "disk" in the world is
# the partition or loop device of the image the test attached.
_LVM_STAND_IN = r'''#!@PYTHON@
import json
import os
import re
import sys

state = os.environ["H2K_TEST_LVM"]
with open(os.path.join(state, "world.json")) as f:
    world = json.load(f)
program, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.path.join(state, "calls.jsonl"), "a") as f:
    f.write(json.dumps([program, *args]) + "\n")

VALUED = {"--devices", "--config", "-o", "--options", "--separator"}
FLAGS = {"--noheadings", "-K", "--ignoreactivationskip", "--readonly", "-ay", "-an"}


def fail(message, status=5):
    print(message, file=sys.stderr)
    sys.exit(status)


options, names, i = {}, [], 0
while i < len(args):
    if args[i] in VALUED and i + 1 < len(args):
        options[args[i]] = args[i + 1]
        i += 1
    elif args[i] in FLAGS:
        options[args[i]] = True
    elif args[i].startswith("-"):
        fail(f"{program}: unrecognized option '{args[i]}'\n  Error during parsing of command line.", 3)
    else:
        names.append(args[i])
    i += 1


def place(ref):
    if ref.startswith("/"):
        return ref
    image = os.path.realpath(world["image"])
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                if f.read().strip() == image:
                    return f"/dev/{name}" + ("" if ref == "disk" else ref)
        except OSError:
            pass
    fail(f"stand-in {program}: no loop device of {image}")


if "--devices" in options:
    wanted = options["--devices"].split(",")
    pvs = [pv for pv in world["pvs"] if place(pv["pv"]) in wanted]
elif world.get("host_lvm_fails"):
    fail("  /run/lock/lvm/P_global:aux: open failed: Read-only file system\n  Can't get lock for #global.")
else:
    pvs = [pv for pv in world["pvs"] if pv.get("in_devices_file")]
groups = {pv["vg"]: pv["vg_uuid"] for pv in pvs if pv["vg"]}


def report(rows):
    fields = options.get("-o", options.get("--options", "")).split(",")
    separator = options.get("--separator", " ")
    for field in fields:
        if field not in {"pv_name", "vg_name", "vg_uuid", "lv_name", "lv_uuid"}:
            fail(f"  Unrecognised field: {field}")
    for row in rows:
        print("  " + separator.join(row[field] for field in fields))


def escaped(name):
    return name.replace("-", "--")


def plain(uuid):
    return uuid.replace("-", "")


if program == "pvs":
    report([{"pv_name": place(pv["pv"]), "vg_name": pv["vg"], "vg_uuid": pv["vg_uuid"]} for pv in pvs])
elif program == "vgs":
    report([{"vg_name": g, "vg_uuid": u} for g, u in groups.items() if not names or g in names])
elif program == "lvs":
    report([{"vg_name": lv["vg"], "lv_name": lv["lv"], "vg_uuid": groups[lv["vg"]], "lv_uuid": lv["lv_uuid"]}
            for lv in world["lvs"] if lv["vg"] in groups and (not names or lv["vg"] in names)])
elif program == "vgchange":
    sysfs = world["sys"]
    for group in names:
        if group not in groups:
            fail(f'  Volume group "{group}" not found\n  Cannot process volume group {group}')
        if "--readonly" in options and "-ay" in options:
            fail(f"  Operation prohibited while --readonly is set.\n  Can't get lock for {group}.\n"
                 f"  Cannot process volume group {group}")
        prefix = f"LVM-{plain(groups[group])}"
        active = 0
        if "-ay" in options:
            listed = re.search(r"\bread_only_volume_list\s*=\s*\[([^]]*)\]", options.get("--config", ""))
            read_only = re.findall(r'"([^"]*)"', listed.group(1)) if listed else []
            skip_ignored = "-K" in options or "--ignoreactivationskip" in options
            for lv in world["lvs"]:
                if lv["vg"] != group or lv.get("inactive") or lv.get("skip") and not skip_ignored:
                    continue
                node = place(lv.get("node", "p1"))
                number = os.stat(node).st_rdev
                taken = {int(n[3:]) for n in os.listdir(sysfs) if n.startswith("dm-")}
                dm = os.path.join(sysfs, f"dm-{min(set(range(len(taken) + 1)) - taken)}")
                os.makedirs(os.path.join(dm, "dm"))
                os.makedirs(os.path.join(dm, "slaves"))
                name = f"{escaped(group)}-{escaped(lv['lv'])}"
                for leaf, value in (("dm/name", name), ("dm/uuid", prefix + plain(lv["lv_uuid"])),
                                    ("dev", f"{os.major(number)}:{os.minor(number)}"),
                                    ("ro", "1" if group in read_only or f"{group}/{lv['lv']}" in read_only else "0"),
                                    ("slaves/" + lv.get("lies_on", os.path.basename(node)), "")):
                    with open(os.path.join(dm, leaf), "w") as f:
                        f.write(value + "\n")
                mapper = f"/dev/mapper/{name}"
                if not os.path.lexists(mapper):     # a node already there is left as it is
                    os.symlink(node, mapper)
                    with open(os.path.join(state, "made"), "a") as f:
                        f.write(mapper + "\n")
                active += 1
        else:
            for dm in os.listdir(sysfs):
                with open(os.path.join(sysfs, dm, "dm/uuid")) as f:
                    uuid = f.read().strip()
                if uuid.startswith(prefix):
                    with open(os.path.join(sysfs, dm, "dm/name")) as f:
                        name = f.read().strip()
                    made = os.path.join(state, "made")
                    if os.path.exists(made) and f"/dev/mapper/{name}\n" in open(made).read():
                        os.unlink(f"/dev/mapper/{name}")
                    for leaf in os.listdir(os.path.join(sysfs, dm, "slaves")):
                        os.unlink(os.path.join(sysfs, dm, "slaves", leaf))
                    for leaf in ("dm/name", "dm/uuid", "dev", "ro"):
                        os.unlink(os.path.join(sysfs, dm, leaf))
                    for leaf in ("slaves", "dm", ""):
                        os.rmdir(os.path.join(sysfs, dm, leaf))
        print(f'  {active} logical volume(s) in volume group "{group}" now active')
'''


def lvm_uuid() -> str:
    """A UUID as LVM writes them: 32 letters and digits, in groups of 6, 4, 4, 4, 4, 4 and 6."""
    import secrets
    import string

    chars = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
    return "-".join(chars[a:b] for a, b in ((0, 6), (6, 10), (10, 14), (14, 18), (18, 22), (22, 26), (26, 32)))


class LvmWorld:
    """A small_disk whose partition 1 is the guest's physical volume of the volume group `group` (a name no host
    has): devices.probe says it is one, and its ext4 is what the guest's LVs show, their nodes leading to it.
    LVM is played by _LVM_STAND_IN, device-mapper's sysfs by a tree of the test's (devices.DM_SYSFS); /dev/mapper
    is the host's own: the stand-in's nodes and the test's go there, named after the group, and are taken away
    at the end."""

    def __init__(self, tmp_path: Path, monkeypatch: Any) -> None:
        import secrets

        from h2kd.operations.offline_fix import devices

        self.tmp = tmp_path
        self.group = "h2kt" + secrets.token_hex(4)
        self.group_uuid = lvm_uuid()
        self.image = small_disk(tmp_path / "disk.raw", linux_tree(tmp_path / "tree"))
        self.state = tmp_path / "lvm"
        self.sys = self.state / "sys"
        self.sys.mkdir(parents=True)
        programs = tmp_path / "lvm-programs"
        programs.mkdir()
        for program in ("vgs", "pvs", "lvs", "vgchange"):
            (programs / program).write_text(_LVM_STAND_IN.replace("@PYTHON@", sys.executable))
            (programs / program).chmod(0o755)
        self.world: dict[str, Any] = {
            "image": str(self.image), "sys": str(self.sys), "lvs": [],
            "pvs": [{"pv": "p1", "vg": self.group, "vg_uuid": self.group_uuid, "in_devices_file": False}]}
        self.host_disks: list[str] = []
        self.host_dms: list[Path] = []
        real_probe = devices.probe

        def probe(path: str) -> dict[str, str]:
            info = real_probe(path)
            return {**info, "TYPE": "LVM2_member"} if re.fullmatch(r"/dev/loop\d+p1", path) else info

        monkeypatch.setenv("PATH", f"{programs}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}")
        monkeypatch.setenv("H2K_TEST_LVM", str(self.state))
        monkeypatch.setattr(devices, "DM_SYSFS", str(self.sys), raising=False)
        monkeypatch.setattr(devices, "probe", probe)
        monkeypatch.chdir(tmp_path)        # where a repair notes the image it holds

    def lv(self, name: str, **how: Any) -> dict[str, Any]:
        lv = {"vg": self.group, "lv": name, "lv_uuid": lvm_uuid(), **how}
        self.world["lvs"].append(lv)
        return lv

    def host_disk(self) -> str:
        """A loop device of the test's standing for one of the host's disks."""
        image = self.tmp / f"host{len(self.host_disks)}.raw"
        run(["truncate", "-s", "8M", str(image)])
        self.host_disks.append(run(["losetup", "-f", "--show", str(image)]).stdout.strip())
        return self.host_disks[-1]

    def host_dm(self, name: str, uuid: str) -> None:
        """An active device-mapper device of the host, on one of its disks."""
        disk = self.host_disk()
        dm = self.sys / f"dm-{len(list(self.sys.iterdir()))}"
        self.host_dms.append(dm)
        (dm / "dm").mkdir(parents=True)
        (dm / "slaves").mkdir()
        number = os.stat(disk).st_rdev
        for leaf, value in (("dm/name", name), ("dm/uuid", uuid), ("dev", f"{os.major(number)}:{os.minor(number)}"),
                            ("ro", "0"), (f"slaves/{os.path.basename(disk)}", "")):
            (dm / leaf).write_text(value + "\n")

    def mapper(self, lv: str) -> Path:
        return Path("/dev/mapper") / f"{self.group}-{lv}"

    def attach(self, read_only: bool) -> Any:
        from h2kd.operations.offline_fix import devices

        (self.state / "world.json").write_text(json.dumps(self.world))
        fd = os.open(self.image, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        stack = contextlib.ExitStack()
        stack.callback(os.close, fd)
        try:
            return _Attached(stack, stack.enter_context(devices.attached_disk(fd, read_only, "disk.raw")))
        except BaseException:
            stack.close()
            raise

    def calls(self, program: str | None = None) -> list[list[str]]:
        log = self.state / "calls.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        return [argv for argv in map(json.loads, lines) if program is None or argv[0] == program]

    def activations(self) -> list[list[str]]:
        return [argv for argv in self.calls("vgchange") if "-ay" in argv]

    def left(self) -> list[str]:
        """What is left of the guest's: device-mapper devices the stand-in made, and its /dev/mapper nodes, the
        image's loop device."""
        made = self.state / "made"
        return [str(p) for p in self.sys.iterdir() if p not in self.host_dms] + \
            [m for m in (made.read_text().split() if made.exists() else []) if os.path.lexists(m)] + \
            loops_of(self.image)

    def close(self) -> None:
        for node in Path("/dev/mapper").glob(f"{self.group}-*"):
            if node.is_symlink():
                node.unlink()
        for disk in self.host_disks:
            subprocess.run(["losetup", "-d", disk], capture_output=True, timeout=60)
        for line in loops_of(self.image):
            subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True, timeout=60)


class _Attached:
    """attached_disk() entered: `disk`, and close() to leave it."""

    def __init__(self, stack: Any, disk: Any) -> None:
        self.stack, self.disk = stack, disk

    def lvs(self) -> list[tuple[str, str]]:
        return [(d.lv_name, d.path) for d in self.disk.devices if d.kind == "lv"]

    def close(self) -> None:
        self.stack.close()


@pytest.fixture
def lvm_world(tmp_path: Path, monkeypatch: Any) -> Any:
    world = LvmWorld(tmp_path, monkeypatch)
    try:
        yield world
    finally:
        world.close()


@pytest.mark.parametrize("host_has", ["a volume group LVM lists", "an active device-mapper device of that name",
                                      "the guest's volume group active"])
def test_a_guest_volume_group_named_like_one_of_the_hosts_is_not_activated(lvm_world: Any, host_has: str) -> None:
    """The check counted the volume groups a plain `vgs` lists by the guest's group's name, and refused above
    one: on a host with an LVM devices file (RHEL 9's default) a plain vgs never sees the guest's loop device, so
    a guest's "rhel" passed next to the host's "rhel", and its LVs took the names of the host's. The host's
    groups are now listed apart from the guest's physical volumes, and its active device-mapper devices looked
    at, by name and by volume group UUID (the same image attached twice, a copy of a host disk)."""
    from h2kd.operations.qemuimg import OperationError

    world = lvm_world
    world.lv("root")
    if host_has == "a volume group LVM lists":
        world.world["pvs"].append({"pv": world.host_disk(), "vg": world.group, "vg_uuid": lvm_uuid(),
                                   "in_devices_file": True})
    elif host_has == "an active device-mapper device of that name":
        world.host_dm(f"{world.group}-swap", "LVM-" + (lvm_uuid() + lvm_uuid()).replace("-", ""))
    else:
        world.host_dm("othervg-root", "LVM-" + (world.group_uuid + lvm_uuid()).replace("-", ""))
    with pytest.raises(OperationError) as refused:
        world.attach(read_only=False).close()
    assert refused.value.code == "UNSUPPORTED", refused.value
    assert world.group in str(refused.value) and "vgimportclone" in str(refused.value), refused.value
    assert world.activations() == [], world.calls()
    assert world.left() == []


def test_a_host_whose_volume_groups_cannot_be_listed_activates_no_guest_group(lvm_world: Any) -> None:
    """The check took a failing `vgs` for "no clash" and went on activating. It refuses now: a group it cannot
    compare with the host's is not activated."""
    from h2kd.operations.qemuimg import OperationError

    world = lvm_world
    world.lv("root")
    world.world["host_lvm_fails"] = True
    with pytest.raises(OperationError) as refused:
        world.attach(read_only=False).close()
    assert refused.value.code == "UNSUPPORTED", refused.value
    assert "could not be listed" in str(refused.value) and "Can't get lock" in str(refused.value), refused.value
    assert world.activations() == [], world.calls()
    assert world.left() == []


@pytest.mark.parametrize("case", ["a node of its name for an LV left inactive", "a node of its name that is "
                                  "another device", "a device of its UUID on another disk"])
def test_a_guest_logical_volume_is_the_device_of_its_uuid_on_the_guests_disk(lvm_world: Any, case: str) -> None:
    """Any LV whose /dev/mapper/<vg>-<lv> existed was taken for the guest's, whatever that node was. An LV is now
    the device-mapper device whose UUID is LVM's for it, lying on the guest's loop device, through a node that is
    that very device; an LV LVM left inactive is passed over whatever node has its name. (The host here has no
    devices file: plain LVM commands see the guest's physical volume too, which is no clash.)"""
    from h2kd.operations.qemuimg import OperationError

    world = lvm_world
    world.world["pvs"][0]["in_devices_file"] = True
    world.lv("data")
    if case == "a node of its name for an LV left inactive":
        world.lv("root", inactive=True)
        world.mapper("root").symlink_to(world.host_disk())
        attached = world.attach(read_only=False)
        try:
            assert attached.lvs() == [(f"{world.group}/data", str(world.mapper("data")))]
        finally:
            attached.close()
        assert world.left() == []
        return
    if case == "a node of its name that is another device":
        world.mapper("data").symlink_to(world.host_disk())
        problem = f"{world.mapper('data')} is not the device of the guest's logical volume {world.group}/data"
    else:
        world.world["lvs"][0]["lies_on"] = os.path.basename(world.host_disk())
        problem = f"lies on {os.path.basename(world.host_disks[0])}, not on the guest's disk"
    with pytest.raises(OperationError) as refused:
        world.attach(read_only=False).close()
    assert refused.value.code == "UNSUPPORTED" and problem in str(refused.value), refused.value
    assert len(world.activations()) == 1 and world.left() == [], world.calls()


def root_lv_activated(world: Any, read_only: bool) -> list[str]:
    """Attach the world's guest disk, check that its one LV, root, is found at its device-mapper node, detach;
    the "ro" flags of the device-mapper devices it had meanwhile."""
    attached = world.attach(read_only=read_only)
    try:
        assert attached.lvs() == [(f"{world.group}/root", str(world.mapper("root")))]
        return [(dm / "ro").read_text().strip() for dm in world.sys.iterdir()]
    finally:
        attached.close()


def test_a_dry_run_activates_the_guests_volume_groups_read_only(lvm_world: Any) -> None:
    """A dry run activated with `vgchange --readonly -ay`, which turns activation off in LVM (LVM 2.03.16
    refuses it outright: "Operation prohibited while --readonly is set"): an LVM guest's dry run never found its
    root. It activates as a repair does, with the group in read_only_volume_list, which makes the LVs read-only."""
    world = lvm_world
    world.lv("root")
    read_only = root_lv_activated(world, read_only=True)
    assert read_only == ["1"], (read_only, world.activations())
    assert not any("--readonly" in argv for argv in world.calls()), world.calls()
    assert world.left() == []


def test_a_logical_volume_flagged_to_be_skipped_at_activation_is_activated(lvm_world: Any) -> None:
    """An LV with LVM's activation-skip flag (a thin snapshot has it by default) stayed inactive, and a guest
    whose root it is had none. The guest's groups are activated with -K (--ignoreactivationskip)."""
    world = lvm_world
    world.lv("root", skip=True)
    read_only = root_lv_activated(world, read_only=False)
    assert read_only == ["0"], (read_only, world.activations())
    assert world.left() == []
