"""virtio drivers in the guest's initramfs: added to its tool's configuration, and every installed kernel's
initramfs regenerated inside a chroot of the guest (initramfs-tools, dracut or mkinitcpio)."""

from __future__ import annotations

import re

from h2kd.operations.offline_fix import commands
from h2kd.operations.offline_fix.guestfs import GuestFS
from h2kd.operations.offline_fix.outcome import FAILED, Fix

VIRTIO_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net")
DRACUT_CONF = "/etc/dracut.conf.d/90-h2k-virtio.conf"
REGENERATE_TIMEOUT = 900.0


def _kernel_has(guest: GuestFS, kernel: str, module: str) -> bool:
    base = f"/lib/modules/{kernel}"
    if not guest.is_dir(base):
        base = f"/usr/lib/modules/{kernel}"
    names = {module, module.replace("_", "-")}
    builtin = guest.read_text(f"{base}/modules.builtin") or ""
    dep = guest.read_text(f"{base}/modules.dep") or ""
    pattern = re.compile(r"/(" + "|".join(re.escape(n) for n in names) + r")\.ko(\.[a-z]+)?:?")
    return bool(pattern.search(builtin) or pattern.search(dep))


def _initramfs_tools_config(guest: GuestFS, fix: Fix) -> None:
    path = "/etc/initramfs-tools/modules"
    text = guest.read_text(path) or ""
    listed = {line.split()[0] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")}
    missing = [m for m in VIRTIO_MODULES if m not in listed]
    if missing:
        addition = "# Added for KVM (virtio) by h2kd offline_fix\n" + "".join(m + "\n" for m in missing)
        guest.write_text(path, text + ("" if text.endswith("\n") or not text else "\n") + addition)
        fix.changes.append(f"{path}: added {' '.join(missing)}")
    conf = "/etc/initramfs-tools/initramfs.conf"
    conf_text = guest.read_text(conf)
    if conf_text and re.search(r"^MODULES=dep\s*$", conf_text, flags=re.M):
        # "dep" keeps only the drivers of the hardware the initramfs was built on (VMware's).
        guest.write_text(conf, re.sub(r"^MODULES=dep\s*$", "MODULES=most", conf_text, flags=re.M))
        fix.changes.append(f"{conf}: MODULES=dep -> MODULES=most")


def _dracut_config(guest: GuestFS, fix: Fix) -> None:
    text = ('# Added for KVM (virtio) by h2kd offline_fix\n'
            f'add_drivers+=" {" ".join(VIRTIO_MODULES)} "\n'
            '# A host-only initramfs built in a chroot would describe the conversion host, not the VM.\n'
            'hostonly="no"\n')
    if guest.write_text(DRACUT_CONF, text):
        fix.changes.append(f"{DRACUT_CONF}: add_drivers {' '.join(VIRTIO_MODULES)}, hostonly=no")


def _mkinitcpio_config(guest: GuestFS, fix: Fix) -> None:
    path = "/etc/mkinitcpio.conf"
    text = guest.read_text(path)
    if text is None:
        raise FileNotFoundError("the guest has no /etc/mkinitcpio.conf")
    # The first MODULES=( and the first ")" after it, found one after the other: one pattern (MODULES=\(,
    # [^)]*, \)) ran on to the end of the file again at every MODULES=( of a file without a ")".
    start = re.search(r"^MODULES=\(", text, flags=re.M)
    end = text.find(")", start.end()) if start else -1
    current = text[start.end():end].split() if start and end >= 0 else []
    missing = [x for x in VIRTIO_MODULES if x not in current]
    if not missing:
        return
    new_line = "MODULES=(" + " ".join(current + missing) + ")"
    text = text[:start.start()] + new_line + text[end + 1:] if start and end >= 0 else text + "\n" + new_line + "\n"
    guest.write_text(path, text)
    fix.changes.append(f"{path}: MODULES += {' '.join(missing)}")


_REGENERATE = {
    "initramfs-tools": ["update-initramfs", "-u", "-k", "all"],
    "dracut": ["dracut", "-f", "--regenerate-all"],
    "mkinitcpio": ["mkinitcpio", "-P"],
}


def fix_initramfs(guest: GuestFS, tool: str, kernels: list[str]) -> Fix:
    fix = Fix("initramfs")
    if tool not in _REGENERATE:
        fix.status, fix.reason = FAILED, ("no known initramfs tool (initramfs-tools, dracut, mkinitcpio) was found "
                                          "in the guest; its initramfs cannot be given virtio drivers")
        return fix
    if not kernels:
        fix.status, fix.reason = FAILED, "the guest has no installed kernel (no /lib/modules/<version>)"
        return fix
    lacking = [k for k in kernels if not _kernel_has(guest, k, "virtio_blk")]
    if len(lacking) == len(kernels):
        fix.status, fix.reason = FAILED, f"no installed kernel has the virtio_blk driver ({', '.join(kernels)})"
        return fix
    try:
        {"initramfs-tools": _initramfs_tools_config, "dracut": _dracut_config,
         "mkinitcpio": _mkinitcpio_config}[tool](guest, fix)
    except OSError as e:
        fix.status, fix.reason = FAILED, f"the {tool} configuration could not be changed: {e}"
        return fix
    command = _REGENERATE[tool]
    fix.changes.append(f"regenerate the initramfs of {', '.join(kernels)} ({' '.join(command)})")
    if guest.dry_run:
        return fix.done(True, f"virtio drivers would be added ({tool})")
    result = commands.in_guest(guest.root, command, timeout=REGENERATE_TIMEOUT)
    if not result.ok:
        fix.status, fix.reason = FAILED, f"{' '.join(command)} failed in the guest: {result.last_words()}"
        return fix
    verified = _verify(guest, tool, kernels)
    if verified:
        fix.status, fix.reason = FAILED, verified
        return fix
    note = f" (kernels without virtio_blk: {', '.join(lacking)})" if lacking else ""
    return fix.done(False, f"virtio drivers added and the initramfs regenerated with {tool}{note}")


def _verify(guest: GuestFS, tool: str, kernels: list[str]) -> str | None:
    """For initramfs-tools (lsinitramfs is part of it): each regenerated image holds virtio_blk."""
    if tool != "initramfs-tools":
        return None
    for kernel in kernels:
        image = f"/boot/initrd.img-{kernel}"
        if not guest.exists(image) or not _kernel_has(guest, kernel, "virtio_blk"):
            continue
        if _builtin(guest, kernel, "virtio_blk"):
            continue
        listing = commands.in_guest(guest.root, ["lsinitramfs", image], timeout=300)
        if listing.ok and "virtio_blk" not in listing.stdout:
            return f"{image} was regenerated but still holds no virtio_blk driver"
    return None


def _builtin(guest: GuestFS, kernel: str, module: str) -> bool:
    text = guest.read_text(f"/lib/modules/{kernel}/modules.builtin") or ""
    return f"/{module}.ko" in text
