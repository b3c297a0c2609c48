"""offline_fix: repair a converted Linux guest so that it boots on KVM (virtio disk and NIC).

    run_offline_fix(image_path, params, progress, cancelled) -> {"os", "fixes", "dry_run", ...}
    boot_disk_repair(parameters) -> repair(raw_fd, progress): for convert with offline_fix

params: dry_run (bool), remove_vmware_tools (bool). progress(phase, fraction or None, message).

The image is attached as a loop device (no nbd is needed), so it must be raw. A qcow2 image is converted
to a raw temporary file next to it, fixed, converted back to a temporary qcow2 and only then renamed over
the original: a failure leaves the original untouched. A raw image is fixed in place. A dry run attaches
the (raw or temporary raw) image read-only and mounts without journal replay: not one byte changes.
The temporary files are h2kd.operations.tempfiles ones: recorded before they exist, so that the runner
removes them when a worker killed outright could not.

The repair runs as root, but the raw file (the image or its temporary copy) lies in a directory its
submitter may change: once the worker has opened and checked it, every program reaches it through that
descriptor, never by its name again (the loop device is configured on it, qemu-img is given
/proc/self/fd/N), so a name swapped for a symlink meanwhile leads nowhere. For the same reason the mount
points are made in the worker's working directory (the attempt's run directory, root's alone), not next
to the image. qemu-img itself runs with the submitter's rights (the worker's qemuimg.run_as), as in any
conversion: it reads only what they could, and the temporary files it writes are theirs until the repaired
image takes the original's owner.

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
from typing import Any, Callable

from h2kd.observability.wire import one_line
from h2kd.operations import inspect, qemuimg
from h2kd.operations.offline_fix import bootloader, commands, detect, fstab, initramfs, network, vmtools
from h2kd.operations.offline_fix.devices import attached_disk
from h2kd.operations.offline_fix.mounts import GuestMounts
from h2kd.operations.offline_fix.outcome import FAILED, Fix
from h2kd.operations.qemuimg import ConvertOptions, ImageRef, OperationError, descriptor_path
from h2kd.operations.tempfiles import TempFiles

Progress = Callable[[str, "float | None", str], None]


def _check_cancelled(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise OperationError("CANCELLED", "the offline fix was cancelled; the guest was unmounted and detached",
                             "offline_fix")


def fix_raw_image(raw_fd: int, params: dict[str, Any], progress: Progress, cancelled: Callable[[], bool],
                  name: str = "the image") -> dict[str, Any]:
    """Attach, find, mount, detect and fix the raw disk image open on raw_fd (named `name` in messages);
    always unmounts and detaches. The mount points go in the working directory (see the module docstring)."""
    dry_run = bool(params.get("dry_run"))
    progress("attach", None, "attaching the disk")
    with attached_disk(raw_fd, read_only=dry_run, name=name) as disk:
        _check_cancelled(cancelled)
        with GuestMounts(disk, os.getcwd(), read_only=dry_run) as mounts:
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
            # A line it cannot use is no reason to refuse the repair: it is reported with the entries not mounted.
            entries = fstab.parse_fstab(guest.read_text("/etc/fstab"), mounts.unmounted_fstab_entries)
            mounts.mount_fstab(guest, entries, lambda spec: fstab.resolve(spec, disk))
            os_info = detect.detect_linux(guest, disk, where, [point for _, point, _, _ in entries])
            if mounts.unmounted_fstab_entries:
                os_info["not_mounted"] = mounts.unmounted_fstab_entries
            # Progress messages reach every local user (GetEvents, LogMessage, systemctl status): what the guest
            # is and where it lives goes in the Result, which only the job's owner and administrators read.
            progress("detect", None, "found the guest's root filesystem")
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
        print(one_line(f"offline_fix: {fix.name}: {fix.status}: {fix.reason}"), flush=True)
    progress("fix", 1.0, "done")
    return fixes


def _convert(source: ImageRef, destination_fd: int, fmt: str, phase: str, progress: Progress,
             source_fd: int | None = None) -> None:
    """qemu-img convert of `source` into the temporary file open on destination_fd; source_fd: the descriptor
    source's path names, if it is one (descriptor_path)."""
    fds = (destination_fd,) + ((source_fd,) if source_fd is not None else ())
    try:
        qemuimg.convert(source, descriptor_path(destination_fd), ConvertOptions(output_format=fmt),
                        lambda fraction: progress(phase, fraction, f"{source.format} to {fmt}"), pass_fds=fds)
    except qemuimg.QemuImgError as e:
        what = "the unpacked image" if source_fd is not None else source.path
        raise OperationError(e.code, f"converting {what} to {fmt} failed: {e.message}", phase) from None


def _stage(progress: Progress, index: int, stages: int) -> Progress:
    """progress for stage `index` (from 0) of `stages` equal ones: its fractions mapped onto its part of the whole."""
    def staged(phase: str, fraction: float | None, message: str) -> None:
        progress(phase, None if fraction is None else (index + min(max(fraction, 0.0), 1.0)) / stages, message)
    return staged


def _temp_directory(image_directory: str) -> str:
    """Where the temporary files go: the image's directory (resolved), or, where that is not writable (a dry run
    on an image outside the output roots: its unit may not write there), the working directory (the attempt's)."""
    return image_directory if os.access(image_directory, os.W_OK) else os.getcwd()


def _open_vetted(path: str, vetted: inspect.FileIdentity, writable: bool) -> int:
    """A descriptor of the file at `path` for the repair, which must be the one vetted: a name swapped for a
    symlink (O_NOFOLLOW) or another file since then is refused, before root attaches it."""
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except OSError as e:
        raise OperationError("SOURCE_CHANGED", f"{path} cannot be opened any more ({e.strerror}); was it replaced?",
                             "attach") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (vetted.device, vetted.inode):
        os.close(fd)
        raise OperationError("SOURCE_CHANGED", f"{path} was replaced during the repair", "attach")
    return fd


def run_offline_fix(image_path: str, params: dict[str, Any], progress: Progress,
                    cancelled: Callable[[], bool] = lambda: False, image_format: str | None = None,
                    owner: dict[str, Any] | None = None, temp_record: str | None = None,
                    on_commit: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Fix the Linux guest on a raw or qcow2 image (see the module docstring). owner {"uid", "gid"}: the
    submitter, when not root, whose rights qemu-img runs with (qemuimg.run_as) and to whom the temporary files
    it writes belong (see inspect.load_source). temp_record: where the temporary files are recorded before
    they are created (see TempFiles). on_commit: called just before a repaired qcow2 takes the image's place;
    from then on the attempt runs to its end (a stop then would report nothing changed, and a retry would
    repair the repaired image)."""
    reader_uid = (owner or {}).get("uid") or None
    image_path = os.path.abspath(image_path)
    if not os.path.isfile(image_path):
        raise OperationError("INVALID_IMAGE", f"{image_path} is not a file", "offline_fix")
    dry_run = bool(params.get("dry_run"))
    # A qcow2 is unpacked with everything it refers to (backing files) and packed back flat: those files
    # are vetted as a conversion's source would be, or a repair could copy any file into the image. A raw
    # image is vetted the same way, so that the file attached is known to be the one h2kd checked. Its format
    # is the one found through the descriptor checked: probed by its path, as root, it could be another file.
    vetted = inspect.load_source(image_path, image_format, check_disks=False, reader_uid=reader_uid)
    fmt = vetted.format
    if fmt not in ("raw", "qcow2"):
        raise OperationError("UNSUPPORTED", f"offline_fix works on raw and qcow2 images, not {fmt}; convert the "
                             "image first (or run convert with offline_fix)", "offline_fix")
    if reader_uid and not dry_run:
        # Checked at submission; since then its owner may have closed it (chmod, a group left, a retry hours
        # later), and root would rewrite it all the same.
        inspect.check_writable_by(vetted.identities[0], reader_uid,
                                  "the submitter may no longer write the image, which the repair changes")
    if fmt == "qcow2":
        # A damaged qcow2 is not repaired in place; nor one cut within its last cluster, which passes qemu-img
        # check, but its check tells where it should end: the repair would unpack zeros where data was missing.
        disk = vetted.disks[0]
        checked = qemuimg.check(disk.ref, force_share=True)
        if not checked.usable:
            raise OperationError("INVALID_IMAGE", f"{image_path} is damaged: {checked.message}", "offline_fix")
        inspect.refuse_incomplete(disk, checked, vetted.identities)
    if fmt == "raw":
        fd = _open_vetted(image_path, vetted.identities[0], writable=not dry_run)
        try:
            result = fix_raw_image(fd, params, progress, cancelled, image_path)
        finally:
            os.close(fd)
        result["image"] = {"path": image_path, "format": "raw", "method": "loop device on the image"}
        return result
    temps = TempFiles(temp_record, owner if reader_uid else None)
    # TempFiles takes resolved directories (tempfiles.open_output_directory).
    image_directory, image_name = os.path.realpath(os.path.dirname(image_path)), os.path.basename(image_path)
    opened: list[int] = []
    try:
        raw = temps.create(os.path.join(_temp_directory(image_directory), image_name + ".raw"))
        raw_fd = temps.open_made(raw, os.O_RDWR)
        opened.append(raw_fd)
        # Three stages, each reporting 0..1 of its own, share one scale: progress never goes back, so each
        # alone on the whole would show 100% from the end of the unpacking on, through minutes of fix and pack.
        _convert(ImageRef(image_path, "qcow2"), raw_fd, "raw", "unpack", _stage(progress, 0, 3))
        inspect.ensure_unchanged(vetted.identities, "unpack")
        result = fix_raw_image(raw_fd, params, _stage(progress, 1, 3), cancelled, "the unpacked image")
        if not dry_run and result["changed_files"]:
            fixed = temps.create(os.path.join(image_directory, image_name))
            fixed_fd = temps.open_made(fixed, os.O_RDWR)
            opened.append(fixed_fd)
            _convert(ImageRef(descriptor_path(raw_fd), "raw"), fixed_fd, "qcow2", "pack", _stage(progress, 2, 3),
                     raw_fd)
            # The new file takes the original's place, so it must keep the original's owner and mode (root
            # made it). Only the file that was vetted and repaired is asked: another one put there since
            # would lose its content to the replace, and lend its owner to the repaired image.
            # Looked up, and replaced below, through the directory the temporary files were made in: a
            # symbolic link on the image's path, swapped meanwhile, cannot send root's rename elsewhere.
            directory_fd = temps.directory_still_at(image_directory)
            original = os.stat(image_name, dir_fd=directory_fd, follow_symlinks=False)
            if inspect.FileIdentity.of(image_path, original) != vetted.identities[0]:
                raise OperationError("SOURCE_CHANGED", f"{image_path} was modified or replaced during the repair",
                                     "pack")
            os.fchown(fixed_fd, original.st_uid, original.st_gid)
            os.fchmod(fixed_fd, stat.S_IMODE(original.st_mode) & 0o777)   # never a set-id bit, whoever set it
            os.fsync(fixed_fd)
            on_commit()
            os.rename(os.path.basename(fixed), image_name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
            temps.forget(fixed)
            os.fsync(directory_fd)
        result["image"] = {"path": image_path, "format": "qcow2",
                           "method": "qcow2 unpacked to a raw file next to it, fixed on a loop device, packed back"}
        return result
    finally:
        with commands.uninterrupted():
            for fd in opened:
                os.close(fd)
            temps.remove_all()


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
                        owner: dict[str, Any] | None = None, temp_record: str | None = None,
                        on_commit: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """The offline_fix operation of a job spec. The image is changed in place, so (like any output) it must
    be under one of the output roots. temp_record: the attempt's record of temporary files (see TempFiles)."""
    image = spec["image"]
    path = image["path"]
    params = spec.get("parameters") or {}
    if not params.get("dry_run") and not _under_roots(path, output_roots):
        raise OperationError("PERMISSION_DENIED", f"{path} is changed in place by offline_fix, so it must be under "
                             f"one of the output roots ({', '.join(output_roots) or 'none configured'}); a dry run "
                             "may read any image", "offline_fix")
    size = os.path.getsize(path) if os.path.exists(path) else 0
    return run_offline_fix(path, params, _reporter_progress(reporter, size), image_format=image.get("format"),
                           owner=owner, temp_record=temp_record, on_commit=on_commit)


def boot_disk_repair(parameters: dict[str, Any]) -> Callable[[int, Progress], dict[str, Any]]:
    """convert with offline_fix: the repair h2kd.operations.convert applies to the boot disk, as a raw
    temporary file (given as a descriptor the caller checked: see the module docstring), before the disk
    gets its name (so a disk that failed its repair never appears). Its report becomes the convert
    outputs' "offline_fix"."""
    params = {"dry_run": False, "remove_vmware_tools": bool(parameters.get("remove_vmware_tools"))}

    def repair(raw_fd: int, progress: Progress) -> dict[str, Any]:
        result = fix_raw_image(raw_fd, params, progress, lambda: False, "the converted disk")
        result["image"] = {"format": "raw", "method": "the converted disk fixed on a loop device before it got "
                           "its name"}
        return result
    return repair
