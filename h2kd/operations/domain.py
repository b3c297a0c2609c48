"""The libvirt domain written next to a converted VM's disks (convert's parameters.domain_xml).

The domain boots the guest on KVM the way it booted before:
  - a Windows guest (see is_windows) has its disks on SATA (sda, sdb, ...) and its NICs on e1000e, or e1000
    for a NIC that already was an E1000: Windows has drivers for these, and none for virtio unless the
    virtio-win drivers were installed; from a virtio disk it would not boot (INACCESSIBLE_BOOT_DEVICE). A
    comment in the domain says so, and how to move to virtio once the drivers are in;
  - any other guest (Linux, or an OS the facts do not name) has its disks (vda, vdb, ...) and NICs on virtio;
  - the disk the VM booted from (the facts' boot_disk; the first disk of a plain disk source) has
    <boot order='1'/>, and <os> has no <boot dev=.../>: libvirt refuses the two together;
  - disks are named as libvirt and the kernel name them: vda ... vdz, vdaa, vdab, ... (see disk_name);
  - a Windows guest also gets its clock in local time, as Windows keeps the RTC, and the Hyper-V
    enlightenments and timers virt-install gives Windows;
  - a Windows older than Vista (XP, 2003) has drivers for none of these: it gets the i440FX machine, IDE
    disks (hda to hdd) and RTL8139 NICs;
  - a VM that had Secure Boot on gets it on again (with SMM), and one with a vTPM gets an emulated TPM 2.0
    (Windows 11 needs both); what the guest sealed to its old TPM (BitLocker keys) does not come along;
  - the CPUs have the VM's topology (cores per socket), or all sit in one socket: libvirt's default, one
    socket a CPU, leaves Windows client editions two of them;
  - the machine is q35, with UEFI (firmware='efi') or BIOS as the VM had; memory, CPUs and MAC addresses
    come from the facts too. A plain disk (a VHDX of a Hyper-V generation 2 VM, say) brings no facts: its
    boot disk's partition table tells the firmware and whether it holds Windows (see disk_facts);
  - a plain disk whose GPT is laid out on 4 KiB sectors (a Hyper-V VHDX made with 4 KiB logical sectors) is
    given them (<blockio>) on virtio, also for Windows: QEMU's SATA and IDE disks have 512-byte sectors only,
    and the guest would find no partition table there.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any

from h2kd.operations import inspect


# A file name holds 255 bytes: the outputs add "-disk64.qcow2", and their temporary names more (TempFiles).
MAX_FILE_NAME_STEM = 200


def vm_name(source: inspect.Source) -> str:
    """The VM's name made safe for a file name, and short enough for one: the domain is named after it, and so
    are the outputs of a convert into a directory (convert.plan_outputs)."""
    name = (source.vm or {}).get("name") or os.path.basename(source.path)
    name = re.sub(r"\.(vmdk|vhdx?|vdi|qcow2|raw|img|ova|ovf|vmx)$", "", name, flags=re.I)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:MAX_FILE_NAME_STEM].strip("._") or "disk"


def is_windows(guest_os: str | None) -> bool:
    """Whether a guest OS, as the facts give it, is Windows: a VMX guestOS ("windows9-64", "winxppro",
    "winnetenterprise", "longhorn"), an OVF vmw:osType ("windows9_64Guest", "winLonghorn64Guest") or an
    OperatingSystemSection description ("Microsoft Windows Server 2019 (64-bit)")."""
    text = (guest_os or "").strip().lower()
    return text.startswith(("win", "longhorn")) or "windows" in text


# Windows before Vista (XP, 2003, 2000, NT, 9x) as VMware names it, in a VMX ("winxppro", "winnetenterprise") or
# an OVF ("winXPProGuest", "winNetStandardGuest"), or in words.
# Compared with letters and digits only: VirtualBox names them "WindowsXP", "Windows2003_64", "WindowsNT4", and
# descriptions "Microsoft Windows Server 2003".
_LEGACY_WINDOWS_IDS = ("winxp", "winnet", "win2000", "winnt", "win95", "win98", "winme", "win31")
_LEGACY_WINDOWS_WORDS = ("windowsxp", "windowsserver2003", "windows2003", "windows2000", "windowsnt",
                         "windows98", "windows95", "windowsme", "windows31")


def is_legacy_windows(guest_os: str | None) -> bool:
    """Whether a Windows guest is older than Vista: it has no AHCI (SATA) driver and no Intel e1000e one."""
    text = re.sub(r"[^a-z0-9]", "", (guest_os or "").lower())
    return text.startswith(_LEGACY_WINDOWS_IDS) or any(words in text for words in _LEGACY_WINDOWS_WORDS)


def disk_name(prefix: str, index: int) -> str:
    """The target name of the disk at `index` (from 0), as libvirt and the kernel make it: "vd" gives vda
    ... vdz, then vdaa, vdab, ... vdzz, vdaaa."""
    if index < 0:
        raise ValueError(f"a disk index cannot be negative: {index}")
    letters = ""
    while index >= 0:
        letters = chr(ord("a") + index % 26) + letters
        index = index // 26 - 1
    return prefix + letters


# The first bytes of a disk that firmware_of_disk needs: a GPT header and 128 entries, on 512-byte or 4 KiB
# sectors.
DISK_HEAD_BYTES = 64 * 1024
# Partition type GUIDs as a GPT stores them (the first three fields little-endian).
_ESP = bytes.fromhex("28732ac11ff8d211ba4b00a0c93ec93b")   # C12A7328-F81F-11D2-BA4B-00A0C93EC93B
_MSR = bytes.fromhex("16e3c9e35c0bb84d817df92df00215ae")   # E3C9E316-0B5C-4DB8-817D-F92DF00215AE
_WINDOWS_BY_TABLE = "Windows (by its partition table)"
_LEGACY_WINDOWS_BY_TABLE = "Windows XP or 2003 (by its partition table)"


def _gpt_sector(head: bytes) -> int | None:
    """The sector size a GPT in `head` is laid out on (its header is in sector 1), None if there is none."""
    return next((sector for sector in (512, 4096) if head[sector:sector + 8] == b"EFI PART"
                 and len(head) >= sector + 92), None)


def _gpt_types(head: bytes) -> list[bytes] | None:
    """The type GUIDs of a GPT's partitions (512-byte or 4 KiB sectors), None if `head` holds no GPT."""
    sector = _gpt_sector(head)
    if sector is None:
        return None
    entries_lba, count, size = struct.unpack_from("<QII", head, sector + 72)
    start = entries_lba * sector
    return [head[start + index * size:start + index * size + 16] for index in range(min(count, 128)) if size >= 16]


def firmware_of_disk(head: bytes) -> str | None:
    """"uefi" for a disk with a GPT holding an EFI system partition, "bios" for any other partition table, None
    if `head` (the disk's first DISK_HEAD_BYTES) shows none."""
    types = _gpt_types(head)
    if types is not None:
        return "uefi" if _ESP in types else "bios"
    return "bios" if head[510:512] == b"\x55\xaa" else None


def disk_facts(head: bytes) -> dict[str, Any]:
    """What a disk's partition table says of the VM it came from: its firmware, and Windows when a GPT has a
    Microsoft reserved partition (Windows Setup makes one, Linux never) or an MBR's active partition is NTFS;
    one starting at sector 63 was made by Windows XP or 2003 (Vista and later start at sector 2048)."""
    types = _gpt_types(head)
    guest_os = ""
    if types is not None:
        guest_os = _WINDOWS_BY_TABLE if _MSR in types else ""
    elif head[510:512] == b"\x55\xaa":
        for n in range(4):
            entry = head[446 + 16 * n:446 + 16 * (n + 1)]
            if entry[0] == 0x80 and entry[4] == 0x07:
                first = struct.unpack_from("<I", entry, 8)[0]
                guest_os = _LEGACY_WINDOWS_BY_TABLE if first == 63 else _WINDOWS_BY_TABLE
    facts = {"firmware": firmware_of_disk(head) or "bios", "guest_os": guest_os}
    if types is not None and _gpt_sector(head) == 4096:
        facts["sector_size"] = 4096
    return facts


def boot_index(source: inspect.Source, count: int) -> int:
    """The index of the disk the VM boots from: the facts' boot_disk if it names one of the `count` disks,
    the first disk otherwise."""
    boot = (source.vm or {}).get("boot_disk")
    if isinstance(boot, int) and not isinstance(boot, bool) and 0 <= boot < count:
        return boot
    return 0


def _escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _quoted_attribute(text: str) -> str:
    return '"' + _escaped(text).replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;") + '"'


def _comment_safe(text: str) -> str:
    """`text` fit to stand in an XML comment: no "--", no trailing "-", nothing but plain characters."""
    text = re.sub(r"[^A-Za-z0-9 _.,:()+/-]", "", text)
    return re.sub(r"-{2,}", "-", text).rstrip("-")[:80]


_WINDOWS_NOTE = """\
its disks are on SATA and its NICs are Intel ones
         (e1000e, or e1000 where VMware had an E1000): devices Windows has drivers for. It has none for
         virtio unless the virtio-win drivers were installed, and would not boot from a virtio disk
         (INACCESSIBLE_BOOT_DEVICE). To move it to virtio, which is faster: in the running guest, install the
         virtio-win drivers (virtio-win-guest-tools.exe on the virtio-win ISO), and boot it once with a small
         extra virtio disk attached, so that Windows sets up its virtio storage driver. Shut it down, then
         change each disk's target to bus='virtio' with dev vda, vdb, ... (removing the disk's
         <address type='drive' .../> if libvirt added one) and each NIC's model to type='virtio'. Should it
         stop at boot with INACCESSIBLE_BOOT_DEVICE, its AHCI driver was left disabled (it was installed on
         another controller): on VMware, before converting, enable it (storahci; msahci on Windows 7 and
         2008 R2) or, better, install the virtio-win drivers there. -->"""


_LEGACY_WINDOWS_NOTE = """it has drivers for neither virtio nor SATA (AHCI)
         nor Intel e1000e devices, so it runs on the i440FX machine ('pc') with its first four disks on IDE
         (hda to hdd; any more on SATA, seen once an AHCI driver is installed) and its NICs as RTL8139, as
         on a physical PC of its time. -->"""


def _windows_comment(guest_os: str, legacy: bool) -> list[str]:
    """Why a Windows guest's devices are not virtio, and how to move it to virtio: an XML comment."""
    name = _comment_safe(guest_os) or "Windows"
    if legacy:
        return [f"    <!-- A Windows guest older than Vista ({name}): " + _LEGACY_WINDOWS_NOTE]
    return [f"    <!-- A Windows guest ({name}): " + _WINDOWS_NOTE]


def _guess_comment(head: bytes) -> list[str]:
    """For a plain disk whose partition table tells nothing: that its firmware and devices are guessed."""
    if not head:
        why = "The boot disk's first sectors could not be read"
    elif firmware_of_disk(head) is None:
        why = "The boot disk has no MBR or GPT partition table"
    else:
        return []
    return [f"    <!-- {why}: BIOS firmware and virtio devices are assumed. A disk with a GPT and an EFI system "
            "partition needs <os firmware='efi'>; Windows needs SATA disks and e1000e NICs. -->"]


def domain_xml(source: inspect.Source, disk_paths: list[str], disk_format: str,
               boot_disk_head: bytes = b"") -> str:
    """A libvirt domain for the converted VM (see the module docstring): its disks, in the order of
    `disk_paths` (the outputs, in the VM's disk order) and of format `disk_format`, its NICs, CPUs, memory
    and firmware. boot_disk_head: the boot disk's first DISK_HEAD_BYTES, for a source without VM facts."""
    vm = source.vm or disk_facts(boot_disk_head)
    windows = is_windows(vm.get("guest_os"))
    legacy = windows and is_legacy_windows(vm.get("guest_os"))
    machine = "pc" if legacy else "q35"
    # A plain disk brings no sizes: Windows 10 and 11 need 4 GiB and 2 CPUs to install, and run no better below.
    memory = int(vm.get("memory_mib") or (4096 if windows else 1024))
    cpus = max(int(vm.get("cpus") or (2 if windows else 1)), 1)
    cpu = (f"  <cpu mode='host-model'><topology sockets='{cpus // _cores(vm, cpus)}' dies='1' "
           f"cores='{_cores(vm, cpus)}' threads='1'/></cpu>")
    q = _quoted_attribute
    lines = ["<domain type='kvm'>", f"  <name>{_escaped(vm_name(source))}</name>",
             f"  <memory unit='MiB'>{memory}</memory>", f"  <vcpu>{cpus}</vcpu>"]
    # No <boot dev=.../> here: the boot disk carries <boot order='1'/>, and libvirt refuses both.
    secure_boot = vm.get("firmware") == "uefi" and bool(vm.get("secure_boot")) and not legacy
    if secure_boot:
        # As the VM booted on VMware: Secure Boot on, with Microsoft's keys enrolled (OVMF's secboot firmware),
        # which needs SMM.
        lines += ["  <os firmware='efi'>", f"    <type arch='x86_64' machine='{machine}'>hvm</type>",
                  "    <firmware><feature enabled='yes' name='secure-boot'/>"
                  "<feature enabled='yes' name='enrolled-keys'/></firmware>", "  </os>"]
    elif vm.get("firmware") == "uefi" and not legacy:
        # Without Secure Boot, as the VM ran: libvirt would otherwise pick the first firmware that fits, which
        # on Debian and Fedora is OVMF with Secure Boot enforced, and unsigned boot loaders would stop.
        lines += ["  <os firmware='efi'>", f"    <type arch='x86_64' machine='{machine}'>hvm</type>",
                  "    <firmware><feature enabled='no' name='secure-boot'/></firmware>", "  </os>"]
    else:
        lines += ["  <os>", f"    <type arch='x86_64' machine='{machine}'>hvm</type>", "  </os>"]
    # As virt-install and virt-v2v set up a Windows guest: its clock keeps local time (Windows sets the RTC so),
    # and the Hyper-V enlightenments and timers it expects (Vista on) keep it fast and its clock steady.
    enlightened = windows and not legacy
    lines.append("  <features><acpi/><apic/>" + ("<smm state='on'/>" if secure_boot else "")
                 + ("\n    <hyperv><relaxed state='on'/><vapic state='on'/><spinlocks state='on' retries='8191'/>"
                    "</hyperv>\n  " if enlightened else "") + "</features>")
    lines.append(cpu)
    if enlightened:
        lines += ["  <clock offset='localtime'>", "    <timer name='rtc' tickpolicy='catchup'/>",
                  "    <timer name='pit' tickpolicy='delay'/>", "    <timer name='hpet' present='no'/>",
                  "    <timer name='hypervclock' present='yes'/>", "  </clock>"]
    elif legacy:
        lines.append("  <clock offset='localtime'/>")
    lines.append("  <devices>")
    if not source.vm:
        lines += _guess_comment(boot_disk_head)
    if windows:
        lines += _windows_comment(str(vm.get("guest_os") or ""), legacy)
    boot = boot_index(source, len(disk_paths))
    sector_4k = vm.get("sector_size") == 4096        # known of the boot disk of a plain disk source only
    if sector_4k and windows:
        lines.append("    <!-- The boot disk has 4 KiB sectors, which QEMU's SATA and IDE disks cannot give: it is on "
                     "virtio, which Windows boots from only with the virtio-win drivers installed. -->")
    for index, path in enumerate(disk_paths):
        blockio = sector_4k and index == boot
        target = f"dev='{disk_name('vd', index)}' bus='virtio'" if blockio else _target(index, boot, windows, legacy)
        lines += ["    <disk type='file' device='disk'>",
                  f"      <driver name='qemu' type={q(disk_format)}/>",
                  f"      <source file={q(path)}/>", f"      <target {target}/>"]
        if blockio:
            lines.append("      <blockio logical_block_size='4096' physical_block_size='4096'/>")
        if index == boot:
            lines.append("      <boot order='1'/>")
        lines.append("    </disk>")
    # A plain disk tells nothing of the NICs the VM had: it gets one, on the default network. A VM described as
    # having none (no ethernetN, or none present) gets none, as it ran.
    for nic in (vm.get("nics") or []) if source.vm else [{}]:
        lines += ["    <interface type='network'>", "      <source network='default'/>"]
        mac = (nic.get("mac") or "").strip()
        if re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}", mac):
            lines.append(f"      <mac address={q(mac.lower())}/>")
        lines += [f"      <model type='{'rtl8139' if legacy else _nic_model(nic, windows)}'/>", "    </interface>"]
    if vm.get("tpm") and not legacy:
        # A new, empty TPM: what the guest sealed to its VMware vTPM (BitLocker keys) does not come along.
        lines += ["    <tpm model='tpm-crb'>", "      <backend type='emulator' version='2.0'/>", "    </tpm>"]
    lines += ["    <console type='pty'/>", "  </devices>", "</domain>", ""]
    return "\n".join(lines)


def _cores(vm: dict[str, Any], cpus: int) -> int:
    """Cores per socket: as the VM had them (VMX cpuid.coresPerSocket, OVF CoresPerSocket), else all in one
    socket. libvirt's default, a socket per CPU, leaves Windows client editions two of them at most."""
    per_socket = vm.get("cores_per_socket")
    if isinstance(per_socket, int) and per_socket > 0 and cpus % per_socket == 0:
        return per_socket
    return cpus


def _target(index: int, boot: int, windows: bool, legacy: bool) -> str:
    """The <target> attributes of the disk at `index`: virtio; SATA for Windows; for a Windows older than Vista
    IDE (two buses of two) for the boot disk first, then the disks in their order, SATA past the fourth."""
    if legacy:
        ide_order = [boot] + [n for n in range(4) if n != boot][:3]
        if index in ide_order:
            return f"dev='{disk_name('hd', ide_order.index(index))}' bus='ide'"
        return f"dev='{disk_name('sd', index - sum(1 for n in ide_order if n < index))}' bus='sata'"
    if windows:
        return f"dev='{disk_name('sd', index)}' bus='sata'"
    return f"dev='{disk_name('vd', index)}' bus='virtio'"


def _nic_model(nic: dict[str, Any], windows: bool) -> str:
    """virtio, or for Windows an Intel NIC it has a driver for: e1000 if VMware's NIC was an E1000 already
    (older Windows, XP and 2003 among them, have no e1000e driver), e1000e otherwise (vmxnet3's driver came
    with VMware Tools)."""
    if not windows:
        return "virtio"
    return "e1000" if str(nic.get("model") or "").strip().lower() == "e1000" else "e1000e"
