"""Device names to UUID=: the guest's fstab, crypttab and resume device, and kernel command lines.

A disk that was /dev/sda on VMware is /dev/vda on KVM (virtio-blk), so names like /dev/sda1 must become
UUID=... . Names are mapped to this disk's partitions by number (sda1 is partition 1); a name of another
disk (sdb1) cannot be mapped and is left alone, and said so.

The guest's files are untrusted input: a line the repair cannot use (a mount point holding a NUL character,
a partition number thousands of digits long) is passed over and said so, never taken for an error of h2kd's.
"""

from __future__ import annotations

import re

from h2kd.operations.offline_fix.devices import AttachedDisk, BlockDevice
from h2kd.operations.offline_fix.guestfs import GuestFS
from h2kd.operations.offline_fix.outcome import Fix

# Names the kernel gives a disk by its bus: they change when the bus does.
DEVICE_NAME = re.compile(r"/dev/(?P<bus>sd|hd|vd|xvd)(?P<disk>[a-z]+)(?P<part>\d*)")
# Also loop device names: what a boot loader tool run during the fix could write for this disk.
_KERNEL_ARGS = re.compile(r"\b(?P<key>root|resume)=(?P<value>/dev/(?:(?:sd|hd|vd|xvd)[a-z]+\d*|loop\d+(?:p\d+)?))"
                          r"(?=[\s\"']|$)")

FstabEntry = tuple[str, str, str, str]     # spec, mount point, type, options
# No disk has a partition numbered with more digits than this (and int() refuses thousands of them).
_MAX_PARTITION_DIGITS = 6
_NAME_MAX, _PATH_MAX = 255, 4095           # the kernel's limits, in bytes, for one name and a whole path
_SHOWN_CHARS = 80


def parse_fstab(text: str | None, unusable: list[str] | None = None) -> list[FstabEntry]:
    """The entries of an fstab. A line whose mount point no path can be (see _unusable) is left out, and
    said so in `unusable`: the guest could not mount it either, and the rest of its fstab can still be
    repaired, so it is no reason to refuse the repair."""
    entries = []
    for number, line in enumerate((text or "").splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        problem = _unusable(fields, point)
        if problem:
            if unusable is not None:
                unusable.append(f"line {number} of /etc/fstab ({problem}: the line was left out)")
            continue
        entries.append((fields[0], point, fields[2], fields[3] if len(fields) > 3 else "defaults"))
    return entries


def _unusable(fields: list[str], point: str) -> str | None:
    if any("\0" in field for field in fields) or "\0" in point:
        return "it holds a NUL character, which no path or option may hold"
    encoded = point.encode("utf-8", errors="surrogateescape")
    if len(encoded) > _PATH_MAX or any(len(name) > _NAME_MAX for name in encoded.split(b"/")):
        return f"its mount point is longer than a path may be ({_PATH_MAX} bytes, {_NAME_MAX} for each name)"
    return None


def _unescape(path: str) -> str:
    """libmount's octal escapes (\\040 for a space): each stands for one byte, which may be part of a UTF-8
    character."""
    raw = path.encode("utf-8", errors="surrogateescape")
    raw = re.sub(rb"\\([0-3][0-7]{2})", lambda m: bytes([int(m.group(1), 8)]), raw)
    return raw.decode("utf-8", errors="surrogateescape")


def shown(name: str) -> str:
    """A name of the guest's as a message shows it: cut short when it is longer than any real one."""
    return name if len(name) <= _SHOWN_CHARS else name[:_SHOWN_CHARS] + f"... ({len(name)} characters)"


def resolve(spec: str, disk: AttachedDisk) -> BlockDevice | None:
    """The device of this disk that an fstab/crypttab spec names, or None."""
    for key in ("UUID", "LABEL", "PARTUUID"):
        if spec.startswith(key + "="):
            return disk.by(key, spec.split("=", 1)[1].strip("\"'"))
    for prefix, key in (("/dev/disk/by-uuid/", "UUID"), ("/dev/disk/by-label/", "LABEL"),
                        ("/dev/disk/by-partuuid/", "PARTUUID")):
        if spec.startswith(prefix):
            return disk.by(key, spec[len(prefix):])
    m = DEVICE_NAME.fullmatch(spec)
    if m:
        return by_device_name(m, disk)
    if spec.startswith("/dev/mapper/") or spec.count("/") == 3 and spec.startswith("/dev/"):
        for device in disk.devices:
            if device.kind == "lv" and (device.path == spec or "/dev/" + device.lv_name == spec):
                return device
    return None


def by_device_name(m: re.Match[str], disk: AttachedDisk) -> BlockDevice | None:
    if m.group("disk") != "a":
        return None       # another disk of the VM: not this image
    if m.group("part"):
        if len(m.group("part")) > _MAX_PARTITION_DIGITS:
            return None
        return disk.partition(int(m.group("part")))
    whole = next((d for d in disk.devices if d.kind == "disk"), None)
    return whole


def uuid_spec(name: str, disk: AttachedDisk) -> str | None:
    """UUID=... for a device name of this disk (or of its loop device), or None when it cannot be mapped."""
    m = DEVICE_NAME.fullmatch(name)
    device = by_device_name(m, disk) if m else next((d for d in disk.devices if d.path == name), None)
    return f"UUID={device.uuid}" if device and device.uuid else None


def rename_kernel_args(text: str, disk: AttachedDisk, changes: list[str], where: str) -> str:
    """root=/dev/sda1 and resume=/dev/sda2 in a command line (or a file of them) to UUID=."""
    def replace(m: re.Match[str]) -> str:
        spec = uuid_spec(m.group("value"), disk)
        if spec is None:
            changes.append(f"{where}: {shown(m.group(0))} left alone (not a device of this disk)")
            return m.group(0)
        changes.append(f"{where}: {m.group(0)} -> {m.group('key')}={spec}")
        return f"{m.group('key')}={spec}"
    return _KERNEL_ARGS.sub(replace, text)


def _rewrite_first_fields(text: str, column: int, disk: AttachedDisk, where: str, fix: Fix) -> str:
    """Replace device names in one whitespace-separated column, keeping the line's layout."""
    out = []
    for line in text.splitlines(keepends=True):
        body = line.split("#", 1)[0]
        fields = body.split()
        if len(fields) > column and DEVICE_NAME.fullmatch(fields[column]):
            name = fields[column]
            spec = uuid_spec(name, disk)
            if spec is None:
                fix.reason = f"{shown(name)} in {where} is not a device of this disk; left alone"
            else:
                start = _field_start(line, column)
                line = line[:start] + spec + line[start + len(name):]
                fix.changes.append(f"{where}: {name} -> {spec}")
        out.append(line)
    return "".join(out)


def _field_start(line: str, column: int) -> int:
    index, seen = 0, -1
    in_field = False
    for index, char in enumerate(line):
        if char.isspace():
            in_field = False
        elif not in_field:
            in_field = True
            seen += 1
            if seen == column:
                return index
    return len(line)


def fix_fstab(guest: GuestFS, disk: AttachedDisk) -> Fix:
    fix = Fix("fstab")
    text = guest.read_text("/etc/fstab")
    if text is None:
        return fix.done(guest.dry_run, "the guest has no /etc/fstab")
    new = _rewrite_first_fields(text, 0, disk, "/etc/fstab", fix)
    if fix.changes:
        guest.write_text("/etc/fstab", new)
    return fix.done(guest.dry_run, fix.reason or ("device names replaced by UUID= (backup: /etc/fstab.h2k-backup)"
                                                   if fix.changes else "fstab names no bus-specific device"))


def fix_crypttab(guest: GuestFS, disk: AttachedDisk) -> Fix:
    fix = Fix("crypttab")
    text = guest.read_text("/etc/crypttab")
    if text is None:
        return fix.done(guest.dry_run, "the guest has no /etc/crypttab")
    new = _rewrite_first_fields(text, 1, disk, "/etc/crypttab", fix)
    if fix.changes:
        guest.write_text("/etc/crypttab", new)
    return fix.done(guest.dry_run, fix.reason or ("device names replaced by UUID= (backup: /etc/crypttab.h2k-backup)"
                                                   if fix.changes else "crypttab names no bus-specific device"))


RESUME_FILES = ("/etc/initramfs-tools/conf.d/resume", "/etc/uswsusp.conf")


def fix_resume(guest: GuestFS, disk: AttachedDisk) -> Fix:
    """The resume (hibernation) device of the initramfs configuration. Kernel command lines: see bootloader."""
    fix = Fix("resume")
    found = False
    for path in RESUME_FILES:
        text = guest.read_text(path)
        if text is None:
            continue
        found = True
        out = []
        for line in text.splitlines(keepends=True):
            m = re.match(r"^(\s*(?:RESUME\s*=|resume device\s*=)\s*)(\S+)(.*)$", line, flags=re.S)
            if m and DEVICE_NAME.fullmatch(m.group(2).strip("\"'")):
                name = m.group(2).strip("\"'")
                spec = uuid_spec(name, disk)
                if spec:
                    line = f"{m.group(1)}{spec}{m.group(3)}"
                    fix.changes.append(f"{path}: {name} -> {spec}")
                else:
                    fix.reason = f"{shown(name)} in {path} is not a device of this disk; left alone"
            out.append(line)
        if fix.changes:
            guest.write_text(path, "".join(out))
    if not found:
        return fix.done(guest.dry_run, "no resume device is configured")
    return fix.done(guest.dry_run, fix.reason or "resume device named by UUID=")
