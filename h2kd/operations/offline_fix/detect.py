"""What the guest is: distribution and version (os-release), boot mode, boot loader, initramfs tool,
installed kernels and network configuration systems."""

from __future__ import annotations

import re
import shlex
from typing import Any

from h2kd.operations.offline_fix.devices import AttachedDisk
from h2kd.operations.offline_fix.guestfs import GuestFS

ESP_TYPES = {"0xef", "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"}


def parse_os_release(text: str | None) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (text or "").splitlines():
        m = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            try:
                parts = shlex.split(m.group(2))
            except ValueError:
                parts = [m.group(2)]
            values[m.group(1)] = parts[0] if parts else ""
    return values


def kernels(guest: GuestFS) -> list[str]:
    found = set()
    for directory in ("/lib/modules", "/usr/lib/modules"):
        for name in guest.listdir(directory):
            if guest.is_dir(f"{directory}/{name}/kernel") or guest.exists(f"{directory}/{name}/modules.dep"):
                found.add(name)
    return sorted(found)


def boot_mode(guest: GuestFS, disk: AttachedDisk, fstab_points: list[str]) -> str:
    if "/boot/efi" in fstab_points or any(d.part_type.lower() in ESP_TYPES for d in disk.devices) \
            or guest.is_dir("/boot/efi/EFI"):
        return "uefi"
    return "bios"


def boot_loader(guest: GuestFS) -> str:
    if guest.is_file("/boot/grub/grub.cfg") or guest.is_file("/boot/grub2/grub.cfg") \
            or guest.is_file("/etc/default/grub"):
        return "grub"
    if guest.is_dir("/boot/loader/entries") or guest.is_dir("/boot/efi/loader/entries"):
        return "systemd-boot"
    if guest.is_file("/boot/extlinux/extlinux.conf") or guest.is_file("/boot/syslinux/syslinux.cfg"):
        return "syslinux"
    return "unknown"


def initramfs_tool(guest: GuestFS) -> str:
    if guest.is_dir("/etc/initramfs-tools") and guest.exists("/usr/sbin/update-initramfs"):
        return "initramfs-tools"
    if guest.exists("/usr/bin/dracut") or guest.exists("/usr/sbin/dracut"):
        return "dracut"
    if guest.exists("/usr/bin/mkinitcpio"):
        return "mkinitcpio"
    return "unknown"


def network_systems(guest: GuestFS) -> list[str]:
    systems = []
    if guest.is_file("/etc/network/interfaces"):
        systems.append("ifupdown")
    if guest.listdir("/etc/netplan"):
        systems.append("netplan")
    if guest.listdir("/etc/NetworkManager/system-connections") or guest.is_dir("/etc/NetworkManager"):
        systems.append("NetworkManager")
    if any(n.endswith((".network", ".link")) for n in guest.listdir("/etc/systemd/network")):
        systems.append("systemd-networkd")
    if guest.is_dir("/etc/sysconfig/network-scripts"):
        systems.append("network-scripts")
    return systems


def detect_linux(guest: GuestFS, disk: AttachedDisk, root_description: str, fstab_points: list[str]) -> dict[str, Any]:
    release = parse_os_release(guest.read_text("/etc/os-release") or guest.read_text("/usr/lib/os-release"))
    return {
        "family": "linux",
        "id": release.get("ID", ""),
        "version_id": release.get("VERSION_ID", ""),
        "name": release.get("PRETTY_NAME") or release.get("NAME", ""),
        "id_like": release.get("ID_LIKE", ""),
        "root": root_description,
        "boot_mode": boot_mode(guest, disk, fstab_points),
        "boot_loader": boot_loader(guest),
        "initramfs_tool": initramfs_tool(guest),
        "kernels": kernels(guest),
        "network": network_systems(guest),
        "partition_table": disk.partition_table or "none",
    }
