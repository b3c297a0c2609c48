"""offline_fix: repair a converted Linux guest so that it boots on KVM (virtio disk and NIC).

    run_offline_fix(image_path, params, progress, cancelled) -> {"os", "fixes", "dry_run", ...}
    boot_disk_repair(parameters) -> repair(raw_path, progress): for convert with offline_fix

params: dry_run (bool), remove_vmware_tools (bool). progress(phase, fraction or None, message).

The image is attached as a loop device (no nbd is needed), so it must be raw. A qcow2 image is converted
to a raw temporary file next to it, fixed, converted back to a temporary qcow2 and only then renamed over
the original: a failure leaves the original untouched. A raw image is fixed in place. A dry run attaches
the (raw or temporary raw) image read-only and mounts without journal replay: not one byte changes.

Fixes, in order (modules of this package): fstab, crypttab, resume (device names to UUID=), network
(MAC pinning, VMware NIC names), vmware_tools (removal when asked), initramfs (virtio drivers,
regenerated in a chroot), bootloader (root=UUID=, device.map, GRUB regenerated in a chroot). Each is
listed in the result as applied, skipped, failed (or planned, in a dry run) with its reason. Any failed
fix fails the job (TOOL_FAILED) with the list in its outputs; a Windows guest fails it as UNSUPPORTED;
a disk without a recognisable Linux root as INVALID_IMAGE. Loop devices and mounts are always released.
"""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Any, Callable

from h2kd.operations import inspect, qemuimg
from h2kd.operations.offline_fix import bootloader, detect, fstab, initramfs, network, vmtools
from h2kd.operations.offline_fix.devices import attached_disk
from h2kd.operations.offline_fix.mounts import GuestMounts
from h2kd.operations.offline_fix.outcome import FAILED, Fix
from h2kd.operations.qemuimg import ConvertOptions, ImageRef, OperationError

Progress = Callable[[str, "float | None", str], None]
TEMP_PREFIX = ".h2k-fix-"


def _check_cancelled(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise OperationError("CANCELLED", "the offline fix was cancelled; the guest was unmounted and detached",
                             "offline_fix")


def fix_raw_image(raw_path: str, params: dict[str, Any], progress: Progress,
                  cancelled: Callable[[], bool]) -> dict[str, Any]:
    """Attach, find, mount, detect and fix a raw disk image; always unmounts and detaches."""
    dry_run = bool(params.get("dry_run"))
    work_dir = os.path.dirname(os.path.abspath(raw_path))
    progress("attach", None, "attaching the disk")
    with attached_disk(raw_path, read_only=dry_run) as disk:
        _check_cancelled(cancelled)
        with GuestMounts(disk, work_dir, read_only=dry_run) as mounts:
            progress("mount", None, "looking for the root filesystem")
            root = mounts.find_root()
            if root is None:
                evidence = mounts.windows_evidence()
                if evidence:
                    error = OperationError("UNSUPPORTED", f"this is a Windows guest ({evidence}); offline fixes for "
                                           "Windows guests are not supported yet", "detect")
                    error.outputs = {"os": {"family": "windows", "evidence": evidence}, "fixes": [],
                                     "dry_run": dry_run}
                    raise error
                found = ", ".join(d.describe() for d in disk.devices) or "nothing"
                raise OperationError("INVALID_IMAGE", "no Linux root filesystem (one holding etc/os-release and "
                                     f"etc/fstab) could be mounted on this disk; it holds: {found}", "detect")
            guest = mounts.mount_root(root)
            where = root.device.describe() + (f", subvolume {root.subvolume}" if root.subvolume else "")
            entries = fstab.parse_fstab(guest.read_text("/etc/fstab"))
            mounts.mount_fstab(guest, entries, lambda spec: fstab.resolve(spec, disk))
            os_info = detect.detect_linux(guest, disk, where, [point for _, point, _, _ in entries])
            if mounts.unmounted_fstab_entries:
                os_info["not_mounted"] = mounts.unmounted_fstab_entries
            progress("detect", None, f"{os_info['name'] or os_info['id'] or 'Linux'} on {where}")
            if not dry_run:
                mounts.prepare_chroot(guest)
            fixes = _apply_fixes(guest, disk, os_info, params, progress, cancelled)
            changed = sorted(set(guest.changed))
    result = {"os": os_info, "fixes": [f.as_dict() for f in fixes], "dry_run": dry_run,
              "changed_files": changed}
    failed = [f for f in fixes if f.status == FAILED]
    if failed:
        error = OperationError("TOOL_FAILED", "offline fixes failed: " +
                               "; ".join(f"{f.name}: {f.reason}" for f in failed), "offline_fix")
        error.outputs = result
        raise error
    return result


def _apply_fixes(guest: Any, disk: Any, os_info: dict[str, Any], params: dict[str, Any], progress: Progress,
                 cancelled: Callable[[], bool]) -> list[Fix]:
    steps: list[tuple[str, Callable[[], Fix]]] = [
        ("fstab", lambda: fstab.fix_fstab(guest, disk)),
        ("crypttab", lambda: fstab.fix_crypttab(guest, disk)),
        ("resume", lambda: fstab.fix_resume(guest, disk)),
        ("network", lambda: network.fix_network(guest)),
        ("vmware_tools", lambda: vmtools.fix_vmtools(guest, bool(params.get("remove_vmware_tools")))),
        ("initramfs", lambda: initramfs.fix_initramfs(guest, os_info["initramfs_tool"], os_info["kernels"])),
        ("bootloader", lambda: bootloader.fix_bootloader(guest, disk, os_info["boot_loader"])),
    ]
    fixes = []
    for index, (name, step) in enumerate(steps):
        _check_cancelled(cancelled)
        progress("fix", index / len(steps), name)
        try:
            fix = step()
        except OSError as e:
            fix = Fix(name, FAILED, f"{type(e).__name__}: {e}")
        fixes.append(fix)
        print(f"offline_fix: {fix.name}: {fix.status}: {fix.reason}", flush=True)
    progress("fix", 1.0, "done")
    return fixes


def _convert(source: ImageRef, destination: str, fmt: str, phase: str, progress: Progress) -> None:
    try:
        qemuimg.convert(source, destination, ConvertOptions(output_format=fmt),
                        lambda fraction: progress(phase, fraction, f"{source.format} to {fmt}"))
    except qemuimg.QemuImgError as e:
        raise OperationError(e.code, f"converting {source.path} to {fmt} failed: {e.message}", phase) from None


def _temp_next_to(path: str, suffix: str) -> tuple[str, tuple[int, int]]:
    """A temporary file, (path, (device, inode)), in the image's directory, or, where that is not writable
    (a dry run on an image outside the output roots: its unit may not write there), in the working directory
    (the attempt's)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.access(directory, os.W_OK):
        directory = os.getcwd()
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=directory)
    try:
        made = os.fstat(fd)
    finally:
        os.close(fd)
    return temp, (made.st_dev, made.st_ino)


def _open_made(path: str, made: tuple[int, int]) -> int:
    """A descriptor of the temporary file made at `path`, refusing anything else found there now: whoever
    owns the image's directory could put a link to another file under that name, which root would chown."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != made or st.st_nlink != 1:
        os.close(fd)
        raise OperationError("PERMISSION_DENIED", f"the temporary file {path} was replaced during the repair",
                             "pack")
    return fd


def run_offline_fix(image_path: str, params: dict[str, Any], progress: Progress,
                    cancelled: Callable[[], bool] = lambda: False, image_format: str | None = None,
                    reader_uid: int | None = None) -> dict[str, Any]:
    """Fix the Linux guest on a raw or qcow2 image (see the module docstring). reader_uid: the submitter,
    when not root (see inspect.load_source)."""
    image_path = os.path.abspath(image_path)
    if not os.path.isfile(image_path):
        raise OperationError("INVALID_IMAGE", f"{image_path} is not a file", "offline_fix")
    fmt = image_format or qemuimg.probe_format(image_path)
    if fmt == "raw":
        result = fix_raw_image(image_path, params, progress, cancelled)
        result["image"] = {"path": image_path, "format": "raw", "method": "loop device on the image"}
        return result
    if fmt != "qcow2":
        raise OperationError("UNSUPPORTED", f"offline_fix works on raw and qcow2 images, not {fmt}; convert the "
                             "image first (or run convert with offline_fix)", "offline_fix")
    # A qcow2 is unpacked with everything it refers to (backing files) and packed back flat: those files
    # are vetted as a conversion's source would be, or a repair could copy any file into the image.
    vetted = inspect.load_source(image_path, "qcow2", check_disks=False, reader_uid=reader_uid)
    temps: list[str] = []
    try:
        raw, _ = _temp_next_to(image_path, ".raw")
        temps.append(raw)
        _convert(ImageRef(image_path, "qcow2"), raw, "raw", "unpack", progress)
        inspect.ensure_unchanged(vetted.identities, "unpack")
        result = fix_raw_image(raw, params, progress, cancelled)
        if not params.get("dry_run") and result["changed_files"]:
            fixed, made = _temp_next_to(image_path, ".qcow2")
            temps.append(fixed)
            _convert(ImageRef(raw, "raw"), fixed, "qcow2", "pack", progress)
            # The new file takes the original's place, so it must keep the original's owner and mode (root
            # made it). Only the file that was vetted and repaired is asked: another one put there since
            # would lose its content to the replace, and lend its owner to the repaired image.
            original = os.lstat(image_path)
            if inspect.FileIdentity.of(image_path, original) != vetted.identities[0]:
                raise OperationError("SOURCE_CHANGED", f"{image_path} was modified or replaced during the repair",
                                     "pack")
            fd = _open_made(fixed, made)
            try:
                os.fchown(fd, original.st_uid, original.st_gid)
                os.fchmod(fd, stat.S_IMODE(original.st_mode) & 0o777)   # never a set-id bit, whoever set it
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(fixed, image_path)
            temps.remove(fixed)
        result["image"] = {"path": image_path, "format": "qcow2",
                           "method": "qcow2 unpacked to a raw file next to it, fixed on a loop device, packed back"}
        return result
    finally:
        for temp in temps:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------- for the worker

def _reporter_progress(reporter: Callable[..., None], size: int) -> Progress:
    """progress(phase, fraction, message) in the worker's terms: reporter(phase, done, total, message)."""
    def progress(phase: str, fraction: float | None, message: str) -> None:
        if fraction is None:
            reporter(phase, 0, 0, message)
        else:
            reporter(phase, int(size * min(max(fraction, 0.0), 1.0)), size, message)
    return progress


def _under_roots(path: str, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(real.startswith(os.path.realpath(r).rstrip("/") + "/") for r in roots)


def run_offline_fix_job(spec: dict[str, Any], output_roots: list[str], reporter: Callable[..., None],
                        reader_uid: int | None = None) -> dict[str, Any]:
    """The offline_fix operation of a job spec. The image is changed in place, so (like any output) it must
    be under one of the output roots."""
    image = spec["image"]
    path = image["path"]
    params = spec.get("parameters") or {}
    if not params.get("dry_run") and not _under_roots(path, output_roots):
        raise OperationError("PERMISSION_DENIED", f"{path} is changed in place by offline_fix, so it must be under "
                             f"one of the output roots ({', '.join(output_roots) or 'none configured'}); a dry run "
                             "may read any image", "offline_fix")
    size = os.path.getsize(path) if os.path.exists(path) else 0
    return run_offline_fix(path, params, _reporter_progress(reporter, size), image_format=image.get("format"),
                           reader_uid=reader_uid)


def boot_disk_repair(parameters: dict[str, Any]) -> Callable[[str, Progress], dict[str, Any]]:
    """convert with offline_fix: the repair h2kd.operations.convert applies to the boot disk, as a raw
    temporary file, before the disk gets its name (so a disk that failed its repair never appears).
    Its report becomes the convert outputs' "offline_fix"."""
    params = {"dry_run": False, "remove_vmware_tools": bool(parameters.get("remove_vmware_tools"))}

    def repair(raw_path: str, progress: Progress) -> dict[str, Any]:
        result = fix_raw_image(raw_path, params, progress, lambda: False)
        result["image"] = {"format": "raw", "method": "the converted disk fixed on a loop device before it got "
                           "its name"}
        return result
    return repair
