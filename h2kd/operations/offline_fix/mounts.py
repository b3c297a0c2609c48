"""Mounting a guest: finding its root filesystem, mounting the rest per its fstab, and preparing a chroot.

GuestMounts is a context manager that records every mount it makes and unmounts them all in reverse
order when it ends, however it ends; a stop that comes meanwhile waits until they are all undone
(commands.uninterrupted). The root is the filesystem (partition, logical volume or btrfs subvolume) that
holds both etc/os-release (or usr/lib/os-release) and etc/fstab. Read-only (dry run) mounts also skip
journal replay, so not a single block of the image changes.

The guest's file systems are mounted nodev and nosuid: a device node the guest ships (7:0, or a host NVMe
disk's 259:0, which the job's device policy lets through) must name nothing root could open by it, and no
set-id program of the guest's gains anything. Nothing the repair runs needs either: the chroot's /dev and
/run are tmpfs mounts of ours, and its programs run as root (confined: see confine, which also gives them a
/proc of their own).

For the chroot the guest gets a read-only sysfs and a private /dev on a tmpfs holding
only the basic character devices and this disk's own block devices: guest programs (update-grub's
os-prober, for one) never see the host's disks.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from dataclasses import dataclass

from h2kd.observability.wire import one_line
from h2kd.operations.offline_fix import commands
from h2kd.operations.offline_fix.devices import AttachedDisk, BlockDevice
from h2kd.operations.offline_fix.fstab import shown
from h2kd.operations.offline_fix.guestfs import GuestFS
from h2kd.operations.qemuimg import OperationError

LINUX_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs")
WINDOWS_FILESYSTEMS = ("ntfs", "vfat", "exfat", "ext4", "ext3", "ext2")   # ext: test stand-ins for NTFS
_BASIC_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
                  "tty": (5, 0)}
_MOUNTABLE_FSTAB_TYPES = set(LINUX_FILESYSTEMS) | {"vfat", "auto"}
_GUEST_OPTIONS = ["nodev", "nosuid"]


@dataclass
class RootCandidate:
    device: BlockDevice
    subvolume: str | None       # btrfs subvolume path, None for the default one


def _read_only_options(fstype: str) -> list[str]:
    if fstype in ("ext3", "ext4"):
        return ["ro", "noload"]          # no journal replay
    if fstype == "xfs":
        return ["ro", "norecovery"]
    if fstype == "btrfs":
        return ["ro", "nologreplay"]
    return ["ro"]


def _probe_options(fstype: str) -> list[str]:
    return _read_only_options(fstype) + _GUEST_OPTIONS


class GuestMounts:
    """Every mount made for one guest, undone in reverse order by close() (also via `with`)."""

    def __init__(self, disk: AttachedDisk, work_dir: str, read_only: bool):
        self.disk = disk
        self.read_only = read_only
        self.base = tempfile.mkdtemp(prefix=".h2k-mnt-", dir=work_dir)
        self.root = os.path.join(self.base, "root")
        os.mkdir(self.root, 0o700)
        self.mounted: list[str] = []
        self.mounted_guest_paths: list[str] = []
        self.unmounted_fstab_entries: list[str] = []
        self.chroot_ready = False

    def __enter__(self) -> GuestMounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- mounting
    def mount(self, source: str, target: str, fstype: str | None = None, options: list[str] | None = None,
              what: str = "") -> None:
        argv = ["mount"] + (["-t", fstype] if fstype else []) + (["-o", ",".join(options)] if options else [])
        # Listed before it is made: a stop while mount runs may come after the kernel mounted it, and close()
        # must then unmount it all the same (one that is not mounted is passed over).
        self.mounted.append(target)
        result = commands.run(argv + [source, target], timeout=120)
        if not result.ok:
            self.mounted.pop()
            raise OperationError("TOOL_FAILED", f"mounting {what or source} failed: {result.last_words()}", "mount")

    def _options(self, device: BlockDevice, subvolume: str | None = None) -> list[str]:
        options = (_read_only_options(device.fstype) if self.read_only else []) + _GUEST_OPTIONS
        if subvolume is not None:
            options.append(f"subvol={subvolume}")
        return options

    def _probe_dir(self) -> str:
        return tempfile.mkdtemp(prefix="probe-", dir=self.base)

    def find_root(self) -> RootCandidate | None:
        """The guest's root: the first filesystem holding etc/os-release and etc/fstab."""
        for device in self.disk.devices:
            if device.fstype not in LINUX_FILESYSTEMS:
                continue
            for candidate in self._candidates_on(device):
                return candidate
        return None

    def _candidates_on(self, device: BlockDevice) -> list[RootCandidate]:
        probe = self._probe_dir()
        try:
            try:
                # Probing is always read-only and without journal replay.
                self.mount(device.path, probe, device.fstype, _probe_options(device.fstype), device.describe())
            except OperationError:
                return []
            try:
                if _looks_like_root(GuestFS(probe)):
                    return [RootCandidate(device, None)]
                if device.fstype == "btrfs":
                    return [RootCandidate(device, sub) for sub in _btrfs_root_subvolumes(probe)]
                return []
            finally:
                self._unmount_last()
        finally:
            _remove_probe(probe)

    def windows_evidence(self) -> str | None:
        """Where a Windows installation is on this disk (e.g. "partition 2: /Windows/System32/config"), or None."""
        for device in self.disk.devices:
            if device.fstype not in WINDOWS_FILESYSTEMS:
                continue
            probe = self._probe_dir()
            try:
                try:
                    self.mount(device.path, probe, None, _probe_options(device.fstype), device.describe())
                except OperationError:
                    continue
                try:
                    found = GuestFS(probe).find_case_insensitive("/Windows/System32/config")
                    if found:
                        return f"{device.describe()}: {found}"
                finally:
                    self._unmount_last()
            finally:
                _remove_probe(probe)
        return None

    def mount_root(self, candidate: RootCandidate) -> GuestFS:
        device = candidate.device
        self.mount(device.path, self.root, device.fstype, self._options(device, candidate.subvolume),
                   f"the root filesystem ({device.describe()})")
        return GuestFS(self.root, dry_run=self.read_only)

    def mount_fstab(self, guest: GuestFS, entries: list[tuple[str, str, str, str]],
                    resolve: "callable[[str], BlockDevice | None]") -> None:   # type: ignore[valid-type]
        """Mount the guest's other filesystems (spec, mount point, type, options) below the root."""
        wanted = [(spec, point, fstype, opts) for spec, point, fstype, opts in entries
                  if point.startswith("/") and point != "/" and fstype in _MOUNTABLE_FSTAB_TYPES]
        for spec, point, fstype, opts in sorted(wanted, key=lambda e: e[1].count("/")):
            device = resolve(spec)
            if device is None or not device.fstype:
                self.unmounted_fstab_entries.append(f"{shown(point)} ({shown(spec)}: not on this disk)")
                continue
            target = guest.host_path(point)
            if not os.path.isdir(target):
                self.unmounted_fstab_entries.append(f"{shown(point)} (no such directory in the guest)")
                continue
            subvolume = next((o.split("=", 1)[1] for o in opts.split(",") if o.startswith("subvol=")), None)
            self.mount(device.path, target, device.fstype, self._options(device, subvolume), f"{point} ({spec})")
            self.mounted_guest_paths.append(point)

    def prepare_chroot(self, guest: GuestFS) -> None:
        """sysfs (read-only) and a private /dev with this disk's devices, for running guest programs (each gets a
        /proc of its own: see confine). A /proc, /sys, /dev or /run that is a symbolic link is refused: the guest's
        programs are to find what is mounted here, not wherever the guest's link leads."""
        for point in ("/proc", "/sys", "/dev", "/run"):
            if os.path.islink(os.path.join(guest.root, point.lstrip("/"))):
                raise OperationError("INVALID_IMAGE", f"the guest's {point} is a symbolic link; its programs are "
                                     "not run in it", "mount")
        for point in ("/proc", "/sys", "/dev"):
            if not os.path.isdir(guest.host_path(point)):
                raise OperationError("INVALID_IMAGE", f"the guest has no {point} directory; its programs cannot run",
                                     "mount")
        self.mount("sysfs", guest.host_path("/sys"), "sysfs", ["ro,nosuid,nodev,noexec"], "sysfs")
        dev = guest.host_path("/dev")
        self.mount("tmpfs", dev, "tmpfs", ["mode=0755,nosuid,size=4m"], "a private /dev")
        for name, (major, minor) in _BASIC_DEVICES.items():
            os.mknod(os.path.join(dev, name), 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2")):
            os.symlink(target, os.path.join(dev, name))
        os.mkdir(os.path.join(dev, "shm"), 0o1777)
        os.mkdir(os.path.join(dev, "pts"), 0o755)
        for path in [self.disk.loop] + [d.path for d in self.disk.devices]:
            _copy_node(path, os.path.join(dev, path.removeprefix("/dev/")))
        # What udev would make: grub-mkconfig writes root=UUID= only if /dev/disk/by-uuid/<uuid> exists.
        for device in self.disk.devices:
            for kind, value in (("by-uuid", device.uuid), ("by-label", device.label),
                                ("by-partuuid", device.partuuid)):
                if value and "/" not in value:
                    link_dir = os.path.join(dev, "disk", kind)
                    os.makedirs(link_dir, exist_ok=True)
                    link = os.path.join(link_dir, value)
                    if not os.path.lexists(link):
                        os.symlink(device.path, link)
        run_dir = guest.host_path("/run")
        if os.path.isdir(run_dir):
            self.mount("tmpfs", run_dir, "tmpfs", ["mode=0755,nosuid,nodev,size=16m"], "a private /run")
        self.chroot_ready = True

    # ---- unmounting
    def _unmount_last(self) -> None:
        with commands.uninterrupted():
            _unmount(self.mounted[-1])
            self.mounted.pop()

    def close(self) -> None:
        with commands.uninterrupted():
            problems = []
            while self.mounted:
                problem = _unmount(self.mounted[-1])
                self.mounted.pop()
                if problem:
                    problems.append(problem)
            try:
                for entry in os.listdir(self.base):
                    os.rmdir(os.path.join(self.base, entry))
                os.rmdir(self.base)
            except OSError as e:
                problems.append(f"removing {self.base}: {e}")
            if problems:
                print(one_line("offline_fix: clean-up problems: " + "; ".join(problems)), flush=True)


def _unmount(target: str) -> str | None:
    last = ""
    for attempt in range(20):
        result = commands.run(["umount", target], timeout=60)
        if result.ok or "not mounted" in result.stderr:
            return None
        last = result.last_words()
        time.sleep(0.1 * (attempt + 1))
    # Still busy (a stray guest process?): detach it from the tree so nothing is left mounted here;
    # the kernel releases it, and the loop device, once the last user is gone.
    lazy = commands.run(["umount", "-l", target], timeout=60)
    return None if lazy.ok else f"unmounting {target}: {last}"


def _remove_probe(probe: str) -> None:
    # Still mounted only when a stop cut its mount short: close() unmounts it and removes it then.
    with contextlib.suppress(OSError):
        os.rmdir(probe)


def _copy_node(source: str, destination: str) -> None:
    try:
        st = os.stat(source)
    except FileNotFoundError:
        return
    if not stat.S_ISBLK(st.st_mode):
        return
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    os.mknod(destination, 0o660 | stat.S_IFBLK, st.st_rdev)


def _looks_like_root(tree: GuestFS) -> bool:
    has_release = tree.is_file("/etc/os-release") or tree.is_file("/usr/lib/os-release")
    return has_release and tree.is_file("/etc/fstab")


def _btrfs_root_subvolumes(top: str) -> list[str]:
    """Subvolumes one level below the top of a btrfs filesystem that look like a root (e.g. "@", "root")."""
    found = []
    tree = GuestFS(top)
    for name in tree.listdir("/"):
        path = os.path.join(top, name)
        if os.path.isdir(path) and not os.path.islink(path) and os.stat(path).st_ino == 256 \
                and _looks_like_root(GuestFS(path)):
            found.append(name)     # inode 256 is the root directory of a btrfs subvolume
    return found
