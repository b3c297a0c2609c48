"""The boot loader configuration: root= (and resume=) by UUID, no stale device.map, and GRUB's
configuration regenerated in a chroot of the guest (update-grub / grub-mkconfig / grub2-mkconfig).

If the guest's GRUB cannot regenerate its configuration, the device names in the existing grub.cfg are
replaced directly, and the result says so.
"""

from __future__ import annotations

import re

from h2kd.operations.offline_fix import commands
from h2kd.operations.offline_fix.devices import AttachedDisk
from h2kd.operations.offline_fix.fstab import rename_kernel_args
from h2kd.operations.offline_fix.guestfs import GuestFS
from h2kd.operations.offline_fix.outcome import FAILED, Fix

GRUB_CONFIGS = ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg")
DEVICE_MAPS = ("/boot/grub/device.map", "/boot/grub2/device.map")
_DEVICE_ROOT = re.compile(r"\broot=/dev/(?:(?:sd|hd|vd|xvd)[a-z]+\d*|loop\d+)")


def _default_grub(guest: GuestFS, disk: AttachedDisk, fix: Fix) -> None:
    path = "/etc/default/grub"
    text = guest.read_text(path)
    if text is None:
        return
    new = rename_kernel_args(text, disk, fix.changes, path)
    new, count = re.subn(r"^[ \t]*(GRUB_DISABLE_LINUX_UUID[ \t]*=[ \t]*[\"']?true[\"']?)[ \t]*$",
                         r"# Disabled by h2kd offline_fix: on KVM root= must name the filesystem's UUID.\n#\1",
                         new, flags=re.M)
    if count:
        fix.changes.append(f"{path}: GRUB_DISABLE_LINUX_UUID=true commented out")
    if new != text:
        guest.write_text(path, new)


def _grub_command(guest: GuestFS) -> tuple[list[str], str] | None:
    if guest.exists("/usr/sbin/update-grub") and guest.is_file("/boot/grub/grub.cfg"):
        return ["update-grub"], "/boot/grub/grub.cfg"
    for program, config in (("grub2-mkconfig", "/boot/grub2/grub.cfg"), ("grub-mkconfig", "/boot/grub/grub.cfg")):
        for prefix in ("/usr/sbin/", "/usr/bin/", "/sbin/"):
            if guest.exists(prefix + program) and guest.is_file(config):
                return [program, "-o", config], config
    return None


def _rewrite_configs(guest: GuestFS, disk: AttachedDisk, fix: Fix, paths: list[str]) -> None:
    for path in paths:
        text = guest.read_text(path)
        if text is None:
            continue
        new = rename_kernel_args(text, disk, fix.changes, path)
        if new != text:
            guest.write_text(path, new)


def _loader_entries(guest: GuestFS) -> list[str]:
    entries = []
    for directory in ("/boot/loader/entries", "/boot/efi/loader/entries"):
        entries += [f"{directory}/{n}" for n in guest.listdir(directory) if n.endswith(".conf")]
    return entries


def fix_bootloader(guest: GuestFS, disk: AttachedDisk, loader: str) -> Fix:
    fix = Fix("bootloader")
    for device_map in DEVICE_MAPS:
        if guest.remove(device_map):
            fix.changes.append(f"{device_map}: removed (stale BIOS disk map; kept as {device_map}.h2k-backup)")
    if loader == "systemd-boot":
        _rewrite_configs(guest, disk, fix, _loader_entries(guest))
        return fix.done(guest.dry_run, "loader entries name the root by UUID")
    if loader != "grub":
        fix.status, fix.reason = FAILED, f"the boot loader ({loader}) is not one offline_fix can configure"
        return fix
    _default_grub(guest, disk, fix)
    configs = [p for p in GRUB_CONFIGS if guest.is_file(p)]
    command = _grub_command(guest)
    if guest.dry_run:
        _rewrite_configs(guest, disk, fix, configs)          # records the planned root= changes
        if command:
            fix.changes.append(f"regenerate {command[1]} ({' '.join(command[0])})")
        return fix.done(True, "GRUB would name the root by UUID")
    reason = ""
    if command:
        argv, config = command
        result = commands.in_guest(guest.root, argv, timeout=300)
        if result.ok:
            fix.changes.append(f"{config}: regenerated ({' '.join(argv)})")
        else:
            reason = f"{' '.join(argv)} failed ({result.last_words(2)}); "
    else:
        reason = "the guest has no grub-mkconfig; "
    _rewrite_configs(guest, disk, fix, configs)      # whatever regeneration left behind
    stale = [p for p in configs if _DEVICE_ROOT.search(guest.read_text(p) or "")]
    if stale:
        fix.status, fix.reason = FAILED, reason + f"{', '.join(stale)} still names the root by a device name"
        return fix
    if not configs:
        fix.status, fix.reason = FAILED, reason + "no grub.cfg was found"
        return fix
    return fix.done(False, (reason + "root= set by UUID in grub.cfg directly") if reason else
                    "GRUB configuration regenerated with root=UUID=")
