"""VMware Tools in the guest: found (packages open-vm-tools*, or VMware's own installer) and, when asked,
removed with the guest's package manager in a chroot."""

from __future__ import annotations

from h2kd.operations.offline_fix import commands
from h2kd.operations.offline_fix.guestfs import GuestFS
from h2kd.operations.offline_fix.outcome import FAILED, SKIPPED, Fix

PACKAGES = ("open-vm-tools-desktop", "open-vm-tools-sdmp", "open-vm-tools-containerinfo", "open-vm-tools")
VMWARE_INSTALLER_MARKS = ("/etc/vmware-tools/locations", "/usr/bin/vmware-uninstall-tools.pl")


def _dpkg_installed(guest: GuestFS) -> list[str]:
    status = guest.read_text("/var/lib/dpkg/status", limit=64 * 1024 * 1024) or ""
    installed = []
    for block in status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(" "))
        if fields.get("Package") in PACKAGES and fields.get("Status", "").endswith(" installed"):
            installed.append(fields["Package"])
    return [p for p in PACKAGES if p in installed]


def _rpm_installed(guest: GuestFS) -> list[str]:
    if not (guest.exists("/usr/bin/rpm") and guest.exists("/usr/bin/vmtoolsd")):
        return []
    return ["open-vm-tools"]


def fix_vmtools(guest: GuestFS, requested: bool) -> Fix:
    fix = Fix("vmware_tools")
    deb = _dpkg_installed(guest)
    rpm = [] if deb else _rpm_installed(guest)
    installer = [m for m in VMWARE_INSTALLER_MARKS if guest.exists(m)]
    present = deb or rpm
    if not present and not installer:
        return fix.done(guest.dry_run, "VMware Tools are not installed")
    if not requested:
        fix.status = SKIPPED
        fix.reason = f"VMware Tools are installed ({', '.join(present) or 'VMware installer'}); not removed " \
                     "(remove_vmware_tools is false)"
        return fix
    if installer and not present:
        fix.status = FAILED
        fix.reason = ("VMware Tools were installed by VMware's own installer; remove them in the running guest with "
                      "vmware-uninstall-tools.pl")
        return fix
    command = ["dpkg", "--purge", *deb] if deb else ["rpm", "-e", *rpm]
    fix.changes.append(f"remove {' '.join(present)} ({' '.join(command)})")
    if guest.dry_run:
        return fix.done(True, "VMware Tools would be removed")
    result = commands.in_guest(guest.root, command, timeout=300)
    if not result.ok:
        fix.status, fix.reason = FAILED, f"{' '.join(command)} failed in the guest: {result.last_words()}"
        return fix
    return fix.done(False, f"removed {' '.join(present)}")
