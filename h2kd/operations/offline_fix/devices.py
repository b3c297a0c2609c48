"""Block devices for a disk image: a loop device with its partitions, and the LVM logical volumes on them.

attached_disk() is a context manager: whatever happens inside it (an error, SIGTERM turned into an
exception), the volume groups it activated are deactivated and the loop device is detached, and a stop that
comes during that clean-up waits until it is done (commands.uninterrupted). A volume group is listed for
deactivation before it is activated: an activation that failed half-way, or was stopped, may have left some
of its volumes active. The loop device is also marked autoclear while we hold it open, so even a killed
worker leaves no loop device behind once its mounts are gone.

The image is given as a descriptor the caller opened and checked, and the loop device is configured on that
very file: the image lies in a directory its submitter may change, and a name looked up again could lead, by
a symlink swapped in meanwhile, to any file or disk of the host. losetup will not do: it turns even
/proc/self/fd/N back into a path and opens that. LOOP_CONFIGURE (Linux 5.8) is preferred: it sets the device
up atomically, autoclear and partition scan included, in one call. Older kernels get LOOP_SET_FD on the same
descriptor, then LOOP_SET_STATUS64 (a worker killed between the two leaves the device bound), and a read-only
attach opens the loop device read-only, which makes the kernel bind it read-only.

While an image is attached for writing (a repair) it is root's alone (0600), and a write lease first proves that
no other process has it open or mapped: its submitter owns it (their qemu-img wrote it) and could otherwise
change the file systems under the kernel's feet while they are mounted. Its owner and mode are given back once
detached, and not before: an image whose loop device could not be detached (a file system only lazily unmounted)
stays root's. Its owner is noted first in the working directory (tempfiles.note_held), so that the runner gives
it back should the worker be killed meanwhile. A read-only attach (a dry run, which may read any image its
submitter can read) leaves the image's owner alone: taking someone else's file away, even for a while, is not a
dry run's to do.

There is no udev on every host: after the partition scan the partition nodes are waited for, and created with
`partx -a` when the kernel did not.

A guest's LVM volume groups share one namespace with the host's: a guest group named like one of the host's
(both "rhel") would get the host's device-mapper names, and a copy of a host's disk its very devices. So a guest
group is activated only when no volume group of the host (pvs, the guest's own physical volumes set aside) and
no device-mapper device of the host (sysfs) has its name or UUID, and a check that cannot be made refuses. Once
activated, a guest LV is the device-mapper device whose UUID is LVM's for it (LVM-<VG UUID><LV UUID>), lying on
the guest's loop device alone, and reached by a /dev/mapper node that is that very device: a node found by name
only could be any device of the host.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Iterator

from h2kd.observability.wire import one_line
from h2kd.operations.offline_fix import commands
from h2kd.operations.qemuimg import OperationError
from h2kd.operations.tempfiles import HELD_NAME, hold_image, inode_generation, note_held

PARTITION_WAIT_SECONDS = 10.0
ATTACH_TRIES = 20
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
_LOOP_CONFIG_SIZE = 304        # struct loop_config: u32 fd, u32 block_size, struct loop_info64 (232), u64[8]
_LOOP_INFO64_SIZE = 232
_INFO_FLAGS_OFFSET = 52        # lo_flags in loop_info64, after five u64 and three u32
_LO_FLAGS_OFFSET = 8 + _INFO_FLAGS_OFFSET       # the loop_info64 inside loop_config


@dataclass
class BlockDevice:
    """A partition, a whole disk or a logical volume, as blkid sees it."""

    path: str
    kind: str                       # "partition", "disk", "lv"
    number: int | None = None       # partition number
    fstype: str = ""
    uuid: str = ""
    label: str = ""
    partuuid: str = ""
    part_type: str = ""             # MBR type (0x83) or GPT type GUID
    lv_name: str = ""               # "vg/lv"

    def describe(self) -> str:
        what = f"partition {self.number}" if self.kind == "partition" else \
            f"logical volume {self.lv_name}" if self.kind == "lv" else "the whole disk"
        return f"{what} ({self.fstype or 'no filesystem'})"


@dataclass
class AttachedDisk:
    loop: str
    read_only: bool
    devices: list[BlockDevice] = field(default_factory=list)
    partition_table: str = ""         # "dos", "gpt" or ""
    volume_groups: list[str] = field(default_factory=list)

    def partition(self, number: int) -> BlockDevice | None:
        return next((d for d in self.devices if d.kind == "partition" and d.number == number), None)

    def by(self, key: str, value: str) -> BlockDevice | None:
        value = value.strip()
        for d in self.devices:
            if key == "UUID" and d.uuid and d.uuid.lower() == value.lower():
                return d
            if key == "LABEL" and d.label and d.label == value:
                return d
            if key == "PARTUUID" and d.partuuid and d.partuuid.lower() == value.lower():
                return d
        return None


def probe(path: str) -> dict[str, str]:
    """blkid's low-level probe of a device (no cache): TYPE, UUID, LABEL, PARTUUID, PTTYPE, ..."""
    result = commands.run(["blkid", "-p", "-o", "export", path], timeout=30)
    values: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


class AttachError(Exception):
    """Attaching failed at `step` (what was being done, for the message) with the OSError `error`."""

    def __init__(self, step: str, error: OSError) -> None:
        super().__init__(f"{step}: {error.strerror or error}")
        self.step = step
        self.error = error


def _attach(image_fd: int, read_only: bool) -> tuple[str, int]:
    """A free loop device configured on the file open on image_fd, partitions scanned, autoclear: its path and
    a descriptor of it, which keeps it attached until closed."""
    config = bytearray(_LOOP_CONFIG_SIZE)
    struct.pack_into("=I", config, 0, image_fd)
    struct.pack_into("=I", config, _LO_FLAGS_OFFSET,
                     LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN | (LO_FLAGS_READ_ONLY if read_only else 0))
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise AttachError("opening /dev/loop-control", e) from None
    configure = True
    try:
        for _ in range(ATTACH_TRIES):
            try:
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            except OSError as e:
                raise AttachError("asking /dev/loop-control for a free loop device", e) from None
            loop = f"/dev/loop{number}"
            if not os.path.exists(loop):
                _make_node(loop, f"/sys/block/loop{number}/dev")
            if configure:
                fd = _open_loop(loop, os.O_RDWR)
                try:
                    fcntl.ioctl(fd, LOOP_CONFIGURE, bytes(config))
                    return loop, fd
                except OSError as e:
                    os.close(fd)
                    if e.errno == errno.EBUSY:
                        continue        # another program took it between our question and our claim
                    if e.errno not in (errno.EINVAL, errno.ENOTTY):
                        raise AttachError(f"configuring {loop} on the image (LOOP_CONFIGURE)", e) from None
                    configure = False   # a kernel older than 5.8: the device is still free, bind it the old way
            attached = _set_fd(loop, image_fd, read_only)
            if attached is not None:
                return loop, attached
    finally:
        os.close(control)
    raise AttachError("finding a free loop device", OSError(errno.EBUSY, "every free loop device was taken by "
                                                                          "another program first"))


def _open_loop(loop: str, mode: int) -> int:
    try:
        return os.open(loop, mode | os.O_CLOEXEC)
    except OSError as e:
        raise AttachError(f"opening {loop}", e) from None


def _set_fd(loop: str, image_fd: int, read_only: bool) -> int | None:
    """LOOP_SET_FD and LOOP_SET_STATUS64 on `loop`: its descriptor, or None if another program took it first.
    LOOP_SET_FD has no read-only flag: the kernel binds the device read-only when the image or the loop device
    is open read-only, hence the loop device's mode."""
    fd = _open_loop(loop, os.O_RDONLY if read_only else os.O_RDWR)
    try:
        fcntl.ioctl(fd, LOOP_SET_FD, image_fd)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EBUSY:
            return None
        raise AttachError(f"binding {loop} to the image (LOOP_SET_FD)", e) from None
    info = bytearray(_LOOP_INFO64_SIZE)
    struct.pack_into("=I", info, _INFO_FLAGS_OFFSET, LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN)
    try:
        fcntl.ioctl(fd, LOOP_SET_STATUS64, bytes(info))
    except OSError as e:
        # Not yet autoclear: closing alone would leave it bound.
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, LOOP_CLR_FD, 0)
        os.close(fd)
        raise AttachError(f"setting autoclear and partition scan on {loop} (LOOP_SET_STATUS64)", e) from None
    return fd


def _partition_numbers(loop: str) -> list[int]:
    name = os.path.basename(loop)
    numbers = []
    for entry in os.listdir(f"/sys/block/{name}") if os.path.isdir(f"/sys/block/{name}") else []:
        m = re.fullmatch(rf"{re.escape(name)}p(\d+)", entry)
        if m:
            numbers.append(int(m.group(1)))
    return sorted(numbers)


def _table_partitions(loop: str) -> list[int]:
    """Partition numbers in the disk's table (partx), for when the kernel has not listed them (yet)."""
    result = commands.run(["partx", "-g", "-o", "NR", loop], timeout=30)
    return sorted(int(x) for x in result.stdout.split() if x.isdigit()) if result.ok else []


def _wait_for_partitions(loop: str) -> list[int]:
    expected = _table_partitions(loop)
    deadline = time.monotonic() + PARTITION_WAIT_SECONDS
    tried_partx = False
    while True:
        known = _partition_numbers(loop)
        nodes = [n for n in (expected or known) if os.path.exists(f"{loop}p{n}")]
        if len(nodes) >= len(expected or known) and set(expected) <= set(known):
            return nodes
        if not tried_partx:
            commands.run(["partx", "-a", loop], timeout=30)
            tried_partx = True
        if time.monotonic() > deadline:
            missing = [n for n in expected if not os.path.exists(f"{loop}p{n}")]
            raise OperationError("TOOL_FAILED", f"the partition devices {', '.join(f'{loop}p{n}' for n in missing)} "
                                 f"did not appear within {PARTITION_WAIT_SECONDS:.0f} s", "attach")
        for n in known:
            node = f"{loop}p{n}"
            if not os.path.exists(node):
                _make_node(node, f"/sys/block/{os.path.basename(loop)}/{os.path.basename(node)}/dev")
        time.sleep(0.1)


def _make_node(node: str, dev_file: str) -> None:
    """Create a partition node from its sysfs dev number (no udev, no devtmpfs entry yet)."""
    try:
        with open(dev_file) as f:
            major, minor = (int(x) for x in f.read().strip().split(":"))
        os.mknod(node, 0o600 | 0o060000, os.makedev(major, minor))
    except (OSError, ValueError):
        pass


def _describe(loop: str, numbers: list[int], disk: AttachedDisk) -> None:
    table = probe(loop)
    disk.partition_table = table.get("PTTYPE", "")
    if not numbers:
        info = table
        disk.devices.append(BlockDevice(loop, "disk", None, info.get("TYPE", ""), info.get("UUID", ""),
                                        info.get("LABEL", "")))
        return
    for n in numbers:
        path = f"{loop}p{n}"
        info = probe(path)
        disk.devices.append(BlockDevice(path, "partition", n, info.get("TYPE", ""), info.get("UUID", ""),
                                        info.get("LABEL", ""), info.get("PART_ENTRY_UUID", ""),
                                        info.get("PART_ENTRY_TYPE", "")))


def _activate_lvm(disk: AttachedDisk) -> None:
    pvs = [d.path for d in disk.devices if d.fstype == "LVM2_member"]
    if not pvs:
        return
    if not commands.have("vgchange"):
        raise OperationError("UNSUPPORTED", "the disk uses LVM, but the LVM tools (lvm2) are not installed on "
                             "this host", "attach")
    # LVM looks at the guest's physical volumes, and at them alone, whatever the host's devices file (RHEL 9's
    # default, which has no loop device in it) or filters say: --devices overrides both.
    only_these = ["--devices", ",".join(pvs)]
    groups = _guest_groups(only_these)
    _refuse_clashes(disk, groups)
    for group in groups:
        disk.volume_groups.append(group)
        # -K: an LV flagged to be skipped at activation (as snapshots often are) may be what the guest mounts.
        commands.checked(["vgchange", "-ay", "-K", *only_these, "--config",
                          _activation_config(group, disk.read_only), group], f"activating volume group {group}")
    if not groups:
        return
    listing = commands.checked(["lvs", "--noheadings", "--separator", "|", "-o", "vg_name,lv_name,vg_uuid,lv_uuid",
                                *only_these, *groups], "listing the guest's logical volumes")
    mapped = {device.uuid: device for device in _mapped_devices()}
    for line in listing.stdout.splitlines():
        if not line.strip():
            continue
        group, volume, group_uuid, volume_uuid = _fields(line, 4, "logical volume")
        if groups.get(group) != group_uuid:
            continue
        # An LV with no device of its UUID (left inactive, or a pool LVM maps under a layer's UUID) has nothing
        # to use: a device of its name, if any, is someone else's.
        device = mapped.get(f"LVM-{group_uuid}{volume_uuid}")
        if device is None:
            continue
        path = _guest_node(device, f"{group}/{volume}", disk.loop)
        info = probe(path)
        disk.devices.append(BlockDevice(path, "lv", None, info.get("TYPE", ""), info.get("UUID", ""),
                                        info.get("LABEL", ""), lv_name=f"{group}/{volume}"))


# Where the device-mapper devices (dm-N) are found, with dm/name, dm/uuid, dev and slaves/ in each.
DM_SYSFS = "/sys/block"
# What LVM accepts as a VG or LV name, and the form of its UUIDs: anything else is not a name LVM made, and
# nothing a guest wrote reaches LVM's command line or configuration unless it is one.
_LVM_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,127}")
_LVM_UUID = re.compile(r"[A-Za-z0-9]{6}(?:-[A-Za-z0-9]{4}){5}-[A-Za-z0-9]{6}")
_RENAME_HINT = ("run the repair on a host without a volume group of that name, or give the guest's volume group "
                "another name and new UUIDs on a copy of the image (vgimportclone --basevgname on its physical "
                "volumes, then the guest's /etc/fstab and kernel command line changed to match)")


@dataclass(frozen=True)
class _Mapped:
    """A device-mapper device of the host, as sysfs shows it."""

    node: str       # dm-N
    name: str
    uuid: str
    dev: tuple[int, int]


def _fields(line: str, count: int, what: str) -> list[str]:
    """One line of a vgs/lvs report (--separator |), names and UUIDs checked; UUIDs without their dashes."""
    values = [value.strip() for value in line.strip().split("|")]
    names, uuids = values[:count // 2], values[count // 2:]
    if len(values) != count or not all(_valid_name(n) for n in names) or \
            not all(_LVM_UUID.fullmatch(u) for u in uuids):
        raise OperationError("INVALID_IMAGE", f"LVM lists a {what} of the guest with a name or UUID LVM does not "
                             f"make: {line.strip()[:200]!r}", "attach")
    return names + [u.replace("-", "") for u in uuids]


def _valid_name(name: str) -> bool:
    return bool(_LVM_NAME.fullmatch(name)) and name not in (".", "..")


def _guest_groups(only_these: list[str]) -> dict[str, str]:
    """The guest's volume groups: their UUIDs (no dashes) by name."""
    listing = commands.checked(["vgs", "--noheadings", "--separator", "|", "-o", "vg_name,vg_uuid", *only_these],
                               "listing the guest's volume groups")
    groups: dict[str, str] = {}
    for line in listing.stdout.splitlines():
        if not line.strip():
            continue
        name, uuid = _fields(line, 2, "volume group")
        if groups.get(name, uuid) != uuid:
            raise OperationError("INVALID_IMAGE", f"the disk holds two volume groups named {name}; neither can be "
                                 "activated by its name", "attach")
        groups[name] = uuid
    return dict(sorted(groups.items()))


def _refuse_clashes(disk: AttachedDisk, groups: dict[str, str]) -> None:
    """UNSUPPORTED if a guest volume group has the name of one of the host's, or is already active on the host:
    its LVs would get the device-mapper names, or the very devices, of the host's. A check that cannot be made
    refuses too."""
    if not groups:
        return
    names = ", ".join(groups)
    host = commands.run(["pvs", "--noheadings", "--separator", "|", "-o", "pv_name,vg_name"], timeout=60)
    if not host.ok:
        raise OperationError("UNSUPPORTED", f"the volume groups of this host could not be listed (pvs: "
                             f"{host.last_words()}), so the guest's ({names}) cannot be told apart from them and "
                             "are not activated; LVM must work on this host for a guest with LVM to be repaired",
                             "attach")
    ours = _our_devices(disk)
    for line in host.stdout.splitlines():
        pv, sep, group = line.strip().partition("|")
        # The guest's own physical volumes show here too when the host has no devices file.
        if sep and group in groups and not _is_ours(pv, ours):
            raise OperationError("UNSUPPORTED", f"the guest's volume group {group} has the name of a volume group "
                                 f"of this host (on {pv}); it cannot be activated safely: {_RENAME_HINT}", "attach")
    mapped = _mapped_devices()
    uuids = {uuid: name for name, uuid in groups.items()}
    for device in mapped:
        group = _group_of(device.name)
        if group in groups:
            raise OperationError("UNSUPPORTED", f"the guest's volume group {group} has the name of a volume group "
                                 f"active on this host (device-mapper device {device.name}); it cannot be "
                                 f"activated safely: {_RENAME_HINT}", "attach")
        if device.uuid.startswith("LVM-") and device.uuid[4:36] in uuids:
            group = uuids[device.uuid[4:36]]
            raise OperationError("UNSUPPORTED", f"the guest's volume group {group} is already active on this host "
                                 f"(device-mapper device {device.name}): the image is in use elsewhere, or is a "
                                 f"copy of a disk of this host; it cannot be activated safely: {_RENAME_HINT}",
                                 "attach")


def _our_devices(disk: AttachedDisk) -> set[int]:
    numbers = set()
    for path in [disk.loop, *(d.path for d in disk.devices if d.kind == "partition")]:
        with contextlib.suppress(OSError):
            numbers.add(os.stat(path).st_rdev)
    return numbers


def _is_ours(path: str, ours: set[int]) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISBLK(info.st_mode) and info.st_rdev in ours


def _group_of(dm_name: str) -> str | None:
    """The volume group an LVM device-mapper name is of ("my--vg-root" is my-vg's), None if it has no '-'
    separating one."""
    i = 0
    while i < len(dm_name):
        if dm_name[i] == "-":
            if dm_name[i + 1:i + 2] != "-":
                return dm_name[:i].replace("--", "-")
            i += 1
        i += 1
    return None


def _mapped_devices() -> list[_Mapped]:
    """The host's device-mapper devices (one that goes away meanwhile left out). UNSUPPORTED if they cannot be
    listed: what is not known cannot be told apart from the guest's."""
    found = []
    try:
        nodes = sorted(os.listdir(DM_SYSFS))
    except OSError as e:
        raise OperationError("UNSUPPORTED", f"the device-mapper devices of this host could not be listed "
                             f"({DM_SYSFS}: {e.strerror or e}), so the guest's logical volumes cannot be told "
                             "apart from them", "attach") from None
    for node in nodes:
        if not re.fullmatch(r"dm-\d+", node):
            continue
        try:
            values = [_read(f"{DM_SYSFS}/{node}/{leaf}") for leaf in ("dm/name", "dm/uuid", "dev")]
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OperationError("UNSUPPORTED", f"the device-mapper device {node} of this host could not be read "
                                 f"({e.strerror or e}), so the guest's logical volumes cannot be told apart from "
                                 "the host's", "attach") from None
        name, uuid, dev = values
        major, _, minor = dev.partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        found.append(_Mapped(node, name, uuid, (int(major), int(minor))))
    return found


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _activation_config(group: str, read_only: bool) -> str:
    """LVM configuration for activating the guest's volume group `group` (a name _guest_groups checked).

    volume_list names the group alone: a host's own list (an HA cluster's, or its host tags') would leave the
    guest's LVs inactive. A dry run activates them read-only with read_only_volume_list: --readonly would not do,
    it turns activation off altogether; and "*" is not a pattern there, the group must be named."""
    listed = f'[ "{group}" ]'
    return f"activation {{ volume_list = {listed}" + (f" read_only_volume_list = {listed}" if read_only else "") + " }"


def _guest_node(device: _Mapped, lv: str, loop: str) -> str:
    """/dev/mapper/<name> of the device-mapper device of the guest's LV `lv`, once it proves to be that very
    device, and to lie on the guest's disk alone; UNSUPPORTED otherwise."""
    elsewhere = sorted(leaf for leaf in _leaves(device.node) if not re.fullmatch(
        rf"{re.escape(os.path.basename(loop))}(p\d+)?", leaf))
    if elsewhere:
        raise OperationError("UNSUPPORTED", f"the device of the guest's logical volume {lv} ({device.name}) lies on "
                             f"{', '.join(elsewhere)}, not on the guest's disk {loop}; it is not used", "attach")
    path = f"/dev/mapper/{device.name}"
    try:
        info = os.stat(path)
    except OSError as e:
        raise OperationError("TOOL_FAILED", f"the guest's logical volume {lv} is active ({device.node}), but its "
                             f"device node {path} cannot be used: {e.strerror or e}", "attach") from None
    if not stat.S_ISBLK(info.st_mode) or (os.major(info.st_rdev), os.minor(info.st_rdev)) != device.dev:
        raise OperationError("UNSUPPORTED", f"{path} is not the device of the guest's logical volume {lv} "
                             f"({device.node}, {device.dev[0]}:{device.dev[1]}) but another device of this host; "
                             "it is not used", "attach")
    return path


def _leaves(node: str, depth: int = 0) -> set[str]:
    """The block devices (not device-mapper ones) under the device-mapper device `node`; UNSUPPORTED if they
    cannot be read, as a device whose place is not known cannot be the guest's."""
    try:
        below = os.listdir(f"{DM_SYSFS}/{node}/slaves")
    except OSError as e:
        raise OperationError("UNSUPPORTED", f"the devices under the device-mapper device {node} could not be "
                             f"listed ({e.strerror or e}); it is not used", "attach") from None
    leaves = set()
    for name in below:
        if re.fullmatch(r"dm-\d+", name) and depth < 16:
            leaves |= _leaves(name, depth + 1)
        else:
            leaves.add(name)
    return leaves


def _deactivate_lvm(disk: AttachedDisk) -> list[str]:
    problems = []
    pvs = [d.path for d in disk.devices if d.fstype == "LVM2_member"]
    for group in reversed(disk.volume_groups):
        result = commands.run(["vgchange", "-an", "--devices", ",".join(pvs), group], timeout=60)
        if not result.ok:
            problems.append(f"deactivating volume group {group}: {result.last_words()}")
    disk.volume_groups.clear()
    return problems


def attached_loops(image_path: str) -> list[str]:
    """Loop devices currently backed by image_path (for checks and clean-up)."""
    result = commands.run(["losetup", "-j", os.path.realpath(image_path), "-O", "NAME", "-n"], timeout=30)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


@contextlib.contextmanager
def attached_disk(image_fd: int, read_only: bool, name: str = "the image") -> Iterator[AttachedDisk]:
    """Attach the raw image open on image_fd (named `name` in messages) as a loop device with its partitions
    and LVs; always detached afterwards."""
    if read_only:
        with _attached(image_fd, read_only, name) as disk:
            yield disk
        return
    with _root_alone(image_fd, name) as hold:
        with _attached(image_fd, read_only, name, hold) as disk:
            yield disk


@dataclass
class _Hold:
    still_attached: bool = False    # the loop device could not be detached: the image stays root's


@contextlib.contextmanager
def _root_alone(image_fd: int, name: str) -> Iterator[_Hold]:
    """The image is root's alone while attached (see the module docstring). PERMISSION_DENIED if another
    process has it open."""
    before = os.fstat(image_fd)
    path = os.readlink(f"/proc/self/fd/{image_fd}")
    record = os.path.join(os.getcwd(), HELD_NAME)
    note_held(record, path, before, inode_generation(image_fd))
    try:
        # Before the image is root's: the runner gives it back only once no live process holds it (tempfiles).
        hold_image(image_fd)
    except BlockingIOError:     # not made root's: the note is left, and passed over
        raise OperationError("PERMISSION_DENIED", f"{name} is locked by another process, which could change it "
                             "while its file systems are mounted; it is not attached", "attach") from None
    hold = _Hold()
    try:
        os.fchown(image_fd, 0, 0)
        os.fchmod(image_fd, 0o600)
        try:
            fcntl.fcntl(image_fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                raise OperationError("PERMISSION_DENIED", f"{name} is held open by another process, which could "
                                     "change it while its file systems are mounted; it is not attached",
                                     "attach") from None
            if e.errno not in (errno.EINVAL, errno.ENOLCK):     # a file system without leases (NFS)
                raise
        else:
            fcntl.fcntl(image_fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        yield hold
    finally:
        with commands.uninterrupted():
            if hold.still_attached:
                print(one_line(f"offline_fix: {name} stays root's: its loop device could not be detached"),
                      flush=True)
            else:
                os.fchown(image_fd, before.st_uid, before.st_gid)
                os.fchmod(image_fd, before.st_mode & 0o777)     # never a set-id bit back
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(record)


@contextlib.contextmanager
def _attached(image_fd: int, read_only: bool, name: str, hold: _Hold | None = None) -> Iterator[AttachedDisk]:
    try:
        loop, holder = _attach(image_fd, read_only)
    except AttachError as e:
        # A device policy shows as a refusal to open the devices, not as an ioctl failing on them.
        denied = e.step.startswith("opening") and e.error.errno in (errno.EPERM, errno.EACCES, errno.ENOENT)
        hint = " (are loop devices allowed to this job?)" if denied else ""
        raise OperationError("TOOL_FAILED", f"attaching {name} as a loop device failed: {e}{hint}",
                             "attach") from None
    disk = AttachedDisk(loop, read_only)
    try:
        numbers = _wait_for_partitions(loop)
        _describe(loop, numbers, disk)
        _activate_lvm(disk)
        yield disk
    finally:
        with commands.uninterrupted():
            problems = _deactivate_lvm(disk) if disk.volume_groups else []
            os.close(holder)
            detach = _detach(loop)
            if detach:
                problems.append(detach)
                if hold is not None:
                    hold.still_attached = True
            if problems:
                # Only reported: an exception here would hide the one that brought us here.
                print(one_line("offline_fix: clean-up problems: " + "; ".join(problems)), flush=True)


def _detach(loop: str) -> str | None:
    for _ in range(50):
        if not os.path.exists(f"/sys/block/{os.path.basename(loop)}/loop"):
            return None         # autoclear already took it away
        result = commands.run(["losetup", "-d", loop], timeout=30)
        if result.ok or "No such device" in result.stderr:
            # losetup -d of a busy device only marks it autoclear; wait until it is really gone.
            if not os.path.exists(f"/sys/block/{os.path.basename(loop)}/loop/backing_file"):
                return None
        time.sleep(0.1)
    return f"the loop device {loop} could not be detached"
