"""The libvirt domain written with a converted VM (h2kd.operations.domain), from the facts inspect reads in
real-looking VMX and OVF texts: disk bus and names, the disk it boots from, NIC models, firmware, and (when
virt-xml-validate is installed) libvirt's own schema."""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import images
from h2kd.operations import convert, domain, inspect

WINDOWS_OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
    <File ovf:href="win10-disk1.vmdk" ovf:id="file1" ovf:size="1048576"/>
    <File ovf:href="win10-disk2.vmdk" ovf:id="file2" ovf:size="1048576"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="40" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="file1"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="60" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk2" ovf:fileRef="file2"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection><Info>The list of logical networks</Info><Network ovf:name="VM Network"/></NetworkSection>
  <VirtualSystem ovf:id="win10">
    <Info>A virtual machine</Info>
    <Name>win10</Name>
    <OperatingSystemSection ovf:id="1" vmw:osType="{os_type}">
      <Info>The kind of installed guest operating system</Info>
      <Description>{description}</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <Item><rasd:ElementName>4 virtual CPU(s)</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>4</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>8192MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>8192</rasd:VirtualQuantity></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:ElementName>SATA Controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>1</rasd:AddressOnParent><rasd:ElementName>Hard disk 2</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>11</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource><rasd:InstanceID>12</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:Address>00:50:56:AA:BB:01</rasd:Address><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection><rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>13</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType></Item>
      <Item><rasd:Address>00:50:56:aa:bb:02</rasd:Address><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection><rasd:ElementName>Network adapter 2</rasd:ElementName>
        <rasd:InstanceID>14</rasd:InstanceID><rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""

VMX = """.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "app01"
guestOS = "{guest_os}"
numvcpus = "2"
memsize = "4096"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "app01.vmdk"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "app01_1.vmdk"
bios.hddOrder = "scsi0:1"
bios.bootOrder = "hdd,cdrom"
ide1:0.present = "TRUE"
ide1:0.deviceType = "cdrom-image"
ide1:0.fileName = "installer.iso"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "00:0c:29:12:34:56"
"""

WINDOWS_11_VMX = 'firmware = "efi"\nuefi.secureBoot.enabled = "TRUE"\nvtpm.present = "TRUE"\n'
WINDOWS_GUESTS = ["windows9-64", "windows2019srv-64", "winxppro", "winnetenterprise", "longhorn"]
LEGACY_WINDOWS_GUESTS = ["winxppro", "winnetenterprise"]
OTHER_GUESTS = ["other5xlinux-64", "ubuntu-64", "rhel8-64"]


def parsed(xml: str) -> ET.Element:
    return ET.fromstring(xml, parser=ET.XMLParser(target=ET.TreeBuilder(insert_comments=True)))


def disks(root: ET.Element) -> list[dict[str, object]]:
    """Each disk of a domain: its source file, target dev and bus, and its boot order (None without one)."""
    found = []
    for disk in root.findall("./devices/disk"):
        target, boot = disk.find("target"), disk.find("boot")
        assert target is not None and disk.find("source") is not None
        found.append({"file": disk.find("source").get("file"), "dev": target.get("dev"),   # type: ignore[union-attr]
                      "bus": target.get("bus"), "boot": None if boot is None else boot.get("order")})
    return found


def nics(root: ET.Element) -> list[tuple[str | None, str | None]]:
    """(MAC address, model) of each NIC."""
    return [((i.find("mac").get("address") if i.find("mac") is not None else None),   # type: ignore[union-attr]
             i.find("model").get("type"))                                          # type: ignore[union-attr]
            for i in root.findall("./devices/interface")]


def comments(root: ET.Element) -> list[str]:
    return [el.text or "" for el in root.iter() if el.tag is ET.Comment]


def windows_ovf_source() -> inspect.Source:
    vm = inspect.parse_ovf(WINDOWS_OVF.format(os_type="windows9_64Guest",
                                              description="Microsoft Windows 10 (64-bit)").encode())
    return inspect.Source("ova", "/srv/vms/win10.ova", "ova", [], vm)


def vmx_source(guest_os: str) -> inspect.Source:
    vm = inspect.parse_vmx(VMX.format(guest_os=guest_os))
    return inspect.Source("vmx", "/srv/vms/app01/app01.vmx", "vmx", [], vm)


OUT = ["/out/win10-disk1.qcow2", "/out/win10-disk2.qcow2"]


def test_a_windows_ovf_gets_sata_disks_intel_nics_and_boots_from_the_disk_first_on_its_controller() -> None:
    source = windows_ovf_source()
    assert source.vm is not None and source.vm["guest_os"] == "windows9_64Guest"
    root = parsed(domain.domain_xml(source, OUT, "qcow2"))
    # vmdisk1 comes first in the hardware section, but vmdisk2 sits at unit 0 of the controller: the VM booted
    # from it. The outputs keep the hardware order; only the boot order follows the placement.
    assert disks(root) == [{"file": OUT[0], "dev": "sda", "bus": "sata", "boot": None},
                           {"file": OUT[1], "dev": "sdb", "bus": "sata", "boot": "1"}]
    assert nics(root) == [("00:50:56:aa:bb:01", "e1000e"), ("00:50:56:aa:bb:02", "e1000")]
    os_element = root.find("os")
    assert os_element is not None and os_element.get("firmware") == "efi"
    assert os_element.find("boot") is None      # libvirt refuses <boot dev> with a device's boot order
    assert root.findtext("vcpu") == "4" and root.findtext("memory") == "8192" and root.findtext("name") == "win10"
    note = " ".join(comments(root))
    assert "Windows" in note and "virtio-win" in note and "SATA" in note and "bus='virtio'" in note
    # Windows keeps the RTC in local time; it expects the Hyper-V enlightenments and clock.
    clock = root.find("clock")
    assert clock is not None and clock.get("offset") == "localtime"
    assert {t.get("name"): t.get("present") for t in clock.findall("timer")}["hypervclock"] == "yes"
    assert root.find("features/hyperv/relaxed") is not None


def test_an_ovf_that_names_windows_only_in_its_description_is_windows_too() -> None:
    vm = inspect.parse_ovf(WINDOWS_OVF.replace(' vmw:osType="{os_type}"', "").format(
        description="Microsoft Windows Server 2016 (64-bit)").encode())
    assert vm["guest_os"] == "Microsoft Windows Server 2016 (64-bit)"
    root = parsed(domain.domain_xml(inspect.Source("ovf", "/srv/vms/w.ovf", "ovf", [], vm), OUT, "raw"))
    assert [d["bus"] for d in disks(root)] == ["sata", "sata"]


def test_a_linux_ovf_keeps_virtio() -> None:
    vm = inspect.parse_ovf(WINDOWS_OVF.format(os_type="rhel8_64Guest",
                                              description="Red Hat Enterprise Linux 8 (64-bit)").encode())
    root = parsed(domain.domain_xml(inspect.Source("ova", "/srv/vms/rhel.ova", "ova", [], vm), OUT, "qcow2"))
    assert disks(root) == [{"file": OUT[0], "dev": "vda", "bus": "virtio", "boot": None},
                           {"file": OUT[1], "dev": "vdb", "bus": "virtio", "boot": "1"}]
    assert nics(root) == [("00:50:56:aa:bb:01", "virtio"), ("00:50:56:aa:bb:02", "virtio")]
    assert comments(root) == []
    assert root.find("clock") is None and root.find("features/hyperv") is None   # a Linux guest keeps UTC


@pytest.mark.parametrize("guest_os", WINDOWS_GUESTS + OTHER_GUESTS)
def test_a_vmx_boots_from_the_disk_bios_hdd_order_names(guest_os: str) -> None:
    source = vmx_source(guest_os)
    assert source.vm is not None and source.vm["boot_disk"] == 1
    out = ["/out/app01-disk1.raw", "/out/app01-disk2.raw"]
    root = parsed(domain.domain_xml(source, out, "raw"))
    windows, legacy = guest_os in WINDOWS_GUESTS, guest_os in LEGACY_WINDOWS_GUESTS
    prefix, bus = ("hd", "ide") if legacy else ("sd", "sata") if windows else ("vd", "virtio")
    first, second = ("b", "a") if legacy else ("a", "b")     # IDE: the boot disk is the first on the first bus
    assert disks(root) == [{"file": out[0], "dev": prefix + first, "bus": bus, "boot": None},
                           {"file": out[1], "dev": prefix + second, "bus": bus, "boot": "1"}]
    assert [d.get("type") for d in root.findall("./devices/disk/driver")] == ["raw", "raw"]
    assert nics(root) == [("00:0c:29:12:34:56", "rtl8139" if legacy else "e1000e" if windows else "virtio")]
    os_element = root.find("os")
    assert os_element is not None and os_element.get("firmware") is None and os_element.find("boot") is None
    assert os_element.find("type").get("machine") == ("pc" if legacy else "q35")    # q35 has no IDE
    assert any("virtio-win" in c for c in comments(root)) == (windows and not legacy)
    assert any("older than Vista" in c for c in comments(root)) == legacy


@pytest.mark.parametrize("guest_os, windows", [
    ("windows9-64", True), ("windows2019srv-64", True), ("windows11-64", True), ("winxppro", True),
    ("winnetenterprise", True), ("winNetStandard", True), ("longhorn", True), ("longhorn-64", True),
    ("windows9_64Guest", True), ("winLonghorn64Guest", True), ("windows2019srv_64Guest", True),
    ("Microsoft Windows Server 2016 (64-bit)", True), ("  WINDOWS 10  ", True),
    ("other5xlinux-64", False), ("ubuntu-64", False), ("rhel8-64", False), ("rhel8_64Guest", False),
    ("darwin19-64", False), ("freebsd12-64", False), ("Red Hat Enterprise Linux 8 (64-bit)", False),
    ("", False), (None, False)])
def test_windows_is_told_from_every_form_of_guest_os(guest_os: str | None, windows: bool) -> None:
    assert domain.is_windows(guest_os) is windows


def test_a_plain_disk_boots_from_its_first_disk_on_virtio() -> None:
    source = inspect.Source("disk", "/srv/images/legacy.vmdk", "vmdk", [], None)
    root = parsed(domain.domain_xml(source, ["/out/legacy.qcow2"], "qcow2"))
    assert disks(root) == [{"file": "/out/legacy.qcow2", "dev": "vda", "bus": "virtio", "boot": "1"}]
    assert nics(root) == [(None, "virtio")]
    assert root.findtext("name") == "legacy" and root.find("os").get("firmware") is None   # type: ignore[union-attr]


@pytest.mark.parametrize("ethernet", ["", 'ethernet0.present = "FALSE"\nethernet0.virtualDev = "e1000"\n'],
                         ids=["no-ethernet-lines", "ethernet-not-present"])
def test_a_vm_that_had_no_nic_gets_none(ethernet: str) -> None:
    """Only a plain disk, which tells nothing of the VM's NICs, is given one on the default network."""
    text = "".join(line + "\n" for line in VMX.format(guest_os="ubuntu-64").splitlines()
                   if not line.startswith("ethernet"))
    vm = inspect.parse_vmx(text + ethernet)
    source = inspect.Source("vmx", "/srv/vms/app01/app01.vmx", "vmx", [], vm)
    root = parsed(domain.domain_xml(source, OUT, "qcow2"))
    assert nics(root) == [] and len(disks(root)) == 2


@pytest.mark.parametrize("boot_disk", [5, -1, None, "1", True])
def test_a_boot_disk_that_names_no_disk_leaves_the_first_one_booting(boot_disk: object) -> None:
    source = vmx_source("ubuntu-64")
    assert source.vm is not None
    source.vm["boot_disk"] = boot_disk
    root = parsed(domain.domain_xml(source, OUT, "qcow2"))
    assert [d["boot"] for d in disks(root)] == ["1", None]


def test_28_disks_are_named_as_libvirt_names_them() -> None:
    source = inspect.Source("vmx", "/srv/vms/big.vmx", "vmx", [], {"name": "big", "guest_os": "rhel8-64"})
    paths = [f"/out/big-disk{i}.qcow2" for i in range(1, 29)]
    found = disks(parsed(domain.domain_xml(source, paths, "qcow2")))
    assert [d["dev"] for d in found] == [f"vd{chr(c)}" for c in range(ord("a"), ord("z") + 1)] + ["vdaa", "vdab"]
    assert [d["file"] for d in found] == paths
    assert len({d["dev"] for d in found}) == 28
    windows = disks(parsed(domain.domain_xml(inspect.Source("vmx", "/srv/vms/big.vmx", "vmx", [],
                                                             {"guest_os": "windows9-64"}), paths, "qcow2")))
    assert [d["dev"] for d in windows][25:] == ["sdz", "sdaa", "sdab"]


@pytest.mark.parametrize("index, name", [(0, "vda"), (25, "vdz"), (26, "vdaa"), (27, "vdab"), (51, "vdaz"),
                                         (52, "vdba"), (701, "vdzz"), (702, "vdaaa")])
def test_disk_names_past_z_go_on_as_the_kernel_counts(index: int, name: str) -> None:
    assert domain.disk_name("vd", index) == name


def test_a_guest_os_that_would_end_the_comment_early_does_not_break_the_xml() -> None:
    source = vmx_source('windows9-64 --> <evil/> --')
    root = parsed(domain.domain_xml(source, OUT, "qcow2"))
    assert root.find(".//evil") is None and len(disks(root)) == 2
    assert all("--" not in c for c in comments(root))


def test_convert_writes_the_domain_of_this_module() -> None:
    assert convert.domain_xml is domain.domain_xml


@pytest.mark.skipif(shutil.which("virt-xml-validate") is None, reason="virt-xml-validate (libvirt-clients) is "
                    "not installed")
@pytest.mark.parametrize("source, count", [(windows_ovf_source(), 2), (vmx_source("windows2019srv-64"), 2),
                                           (vmx_source("rhel8-64"), 2), (vmx_source("ubuntu-64"), 28),
                                           (inspect.Source("disk", "/srv/a.vhdx", "vhdx", [], None), 1),
                                           (vmx_source("winxppro"), 6),
                                           (inspect.Source("vmx", "/srv/w11/w11.vmx", "vmx", [], inspect.parse_vmx(
                                               VMX.format(guest_os="windows11-64") + WINDOWS_11_VMX)), 2)],
                         ids=["windows-ovf", "windows-vmx", "linux-vmx", "28-disks", "plain-disk", "windows-xp",
                              "windows-11"])
def test_libvirt_accepts_the_domain(tmp_path: Path, source: inspect.Source, count: int) -> None:
    xml = tmp_path / "domain.xml"
    xml.write_text(domain.domain_xml(source, [f"/out/d{i}.qcow2" for i in range(count)], "qcow2"))
    run = subprocess.run(["virt-xml-validate", str(xml), "domain"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr + xml.read_text()


def test_offline_fix_repairs_the_disk_the_vm_boots_from() -> None:
    """The guest is repaired on its boot disk (its fstab names the others), which need not be the first."""
    vm = inspect.parse_vmx(VMX.format(guest_os="rhel8-64"))
    two = [object(), object()]
    source = inspect.Source("vmx", "/srv/vms/app01/app01.vmx", "vmx", two, vm)  # type: ignore[arg-type]
    assert vm["boot_disk"] == 1
    assert [p.repaired for p in convert.plan_disks(source, OUT, repairing=True)] == [False, True]
    assert [p.repaired for p in convert.plan_disks(source, OUT, repairing=False)] == [False, False]
    plain = inspect.Source("disk", "/srv/disk.vmdk", "vmdk", [object()], None)  # type: ignore[list-item]
    assert [p.repaired for p in convert.plan_disks(plain, OUT[:1], repairing=True)] == [True]


def test_a_uefi_vm_ignores_a_bios_hdd_order_left_from_its_bios_days() -> None:
    vm = inspect.parse_vmx(VMX.format(guest_os="rhel8-64") + 'firmware = "efi"\n')
    assert vm["firmware"] == "uefi" and vm["boot_disk"] == 0


@pytest.mark.parametrize("controller", ["scsi1", "sata0", "nvme0"])
def test_a_vmx_disk_on_a_controller_not_present_is_left_out(controller: str) -> None:
    """VMware ignores it, as it ignores the controller: it is no disk of the VM."""
    disk = f'{controller}:0.present = "TRUE"\n{controller}:0.fileName = "old.vmdk"\n'
    vm = inspect.parse_vmx(VMX.format(guest_os="rhel8-64") + f'{controller}.present = "FALSE"\n' + disk)
    assert [d["href"] for d in vm["disks"]] == ["app01.vmdk", "app01_1.vmdk"] and vm["boot_disk"] == 1
    vm = inspect.parse_vmx(VMX.format(guest_os="rhel8-64") + f'{controller}.present = "TRUE"\n' + disk)
    assert [d["href"] for d in vm["disks"]] == ["app01.vmdk", "app01_1.vmdk", "old.vmdk"]


def test_ovf_disks_rank_by_controller_kind_as_vmx_disks_do() -> None:
    """An NVMe controller ranks after SATA, as in parse_vmx; a disk on a controller the OVF does not list
    comes after all the others."""
    nvme = WINDOWS_OVF.replace("vmware.sata.ahci", "vmware.nvme.controller")
    sata_and_nvme = nvme.replace(
        "      <Item><rasd:AddressOnParent>1</rasd:AddressOnParent>",
        "      <Item><rasd:Address>0</rasd:Address><rasd:ElementName>SATA Controller 0</rasd:ElementName>\n"
        "        <rasd:InstanceID>4</rasd:InstanceID><rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType>\n"
        "        <rasd:ResourceType>20</rasd:ResourceType></Item>\n"
        "      <Item><rasd:AddressOnParent>1</rasd:AddressOnParent>", 1).replace(
        "<rasd:AddressOnParent>1</rasd:AddressOnParent><rasd:ElementName>Hard disk 2</rasd:ElementName>\n"
        "        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>11</rasd:InstanceID>\n"
        "        <rasd:Parent>3</rasd:Parent>",
        "<rasd:AddressOnParent>1</rasd:AddressOnParent><rasd:ElementName>Hard disk 2</rasd:ElementName>\n"
        "        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>11</rasd:InstanceID>\n"
        "        <rasd:Parent>4</rasd:Parent>")
    vm = inspect.parse_ovf(sata_and_nvme.format(os_type="rhel8_64Guest", description="Linux").encode())
    assert [d["id"] for d in vm["disks"]] == ["vmdisk1", "vmdisk2"]
    assert vm["boot_disk"] == 0       # vmdisk1, unit 1 on the SATA controller, before vmdisk2 on NVMe
    orphan = nvme.replace("<rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>\n"
                          "      <Item><rasd:Address>00:50:56:AA:BB:01",
                          "<rasd:Parent>99</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>\n"
                          "      <Item><rasd:Address>00:50:56:AA:BB:01", 1)
    vm = inspect.parse_ovf(orphan.format(os_type="rhel8_64Guest", description="Linux").encode())
    assert vm["boot_disk"] == 0       # vmdisk2 sits on no known controller: vmdisk1 boots


@pytest.mark.parametrize("table, firmware", [
    ("label: gpt\n,8M,U\n,,L\n", "uefi"),                                           # an EFI system partition
    ("label: gpt\n,1M,21686148-6449-6E6F-744E-656564454649\n,,L\n", "bios"),         # a BIOS boot partition
    ("label: dos\n,,L,*\n", "bios"),
])
def test_a_plain_disks_firmware_is_read_from_its_partition_table(tmp_path: Path, table: str, firmware: str) -> None:
    disk = images.partitioned(tmp_path / "disk.raw", table)
    assert domain.firmware_of_disk(disk.read_bytes()[:domain.DISK_HEAD_BYTES]) == firmware
    assert domain.firmware_of_disk(bytes(domain.DISK_HEAD_BYTES)) is None
    plain = inspect.Source("disk", str(disk), "raw", [object()], None)  # type: ignore[list-item]
    root = parsed(domain.domain_xml(plain, ["/out/disk.qcow2"], "qcow2",
                                    disk.read_bytes()[:domain.DISK_HEAD_BYTES]))
    assert (root.find("os").get("firmware") == "efi") == (firmware == "uefi")


@pytest.mark.parametrize("table, windows", [
    ("label: gpt\n,8M,U\n,16M,E3C9E316-0B5C-4DB8-817D-F92DF00215AE\n,,EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n", True),
    ("label: dos\n,,7,*\n", True),
    ("label: dos\nstart=63,type=7,bootable\n", "legacy"),     # XP and 2003 started the first partition there
    ("label: gpt\n,8M,U\n,,L\n", False),
    ("label: dos\n,,L,*\n", False),
    ("label: dos\n,8M,7\n,,L,*\n", False),      # an NTFS data partition beside an active Linux one
])
def test_a_plain_disk_with_windows_gets_sata_disks(tmp_path: Path, table: str, windows: bool) -> None:
    """A Hyper-V VHDX brings no guest OS: Windows is known by its partition table (a Microsoft reserved
    partition; an active NTFS one), and gets the devices it has drivers for."""
    head = images.partitioned(tmp_path / "disk.raw", table).read_bytes()[:domain.DISK_HEAD_BYTES]
    plain = inspect.Source("disk", str(tmp_path / "disk.vhdx"), "vhdx", [object()], None)  # type: ignore[list-item]
    root = parsed(domain.domain_xml(plain, ["/out/disk.qcow2"], "qcow2", head))
    assert [d["bus"] for d in disks(root)] == (["ide"] if windows == "legacy" else ["sata"] if windows else ["virtio"])
    assert any("(by its partition table)" in c for c in comments(root)) == bool(windows)


@pytest.mark.parametrize("guest_os, legacy", [
    ("winxppro", True), ("winXPPro64Guest", True), ("winNetEnterpriseGuest", True), ("win2000serv", True),
    ("WindowsXP", True), ("Windows2003_64", True), ("WindowsNT4", True), ("Windows2000", True),
    ("Windows10_64", False), ("Windows2008_64", False), ("Windows2019_64", False),
    ("Microsoft Windows Server 2003, Standard Edition (32-bit)", True), ("Microsoft Windows XP Professional", True),
    ("windows9-64", False), ("windows9_64Guest", False), ("longhorn", False), ("winvista", False),
    ("windows7srv-64", False), ("Microsoft Windows Server 2008 R2 (64-bit)", False), ("rhel8-64", False)])
def test_windows_older_than_vista_is_told_apart(guest_os: str, legacy: bool) -> None:
    assert domain.is_legacy_windows(guest_os) == legacy


def test_a_legacy_windows_with_six_disks_keeps_four_on_ide_its_boot_disk_first() -> None:
    vm = {"name": "xp", "guest_os": "winxppro", "firmware": "bios", "boot_disk": 4, "nics": [{"model": "e1000"}]}
    source = inspect.Source("vmx", "/srv/xp/xp.vmx", "vmx", [], vm)
    root = parsed(domain.domain_xml(source, [f"/out/xp-disk{n}.raw" for n in range(1, 7)], "raw"))
    # XP has no AHCI driver: its boot disk (the fifth) must be on IDE, first on the first bus.
    assert [(d["dev"], d["bus"], d["boot"]) for d in disks(root)] == [
        ("hdb", "ide", None), ("hdc", "ide", None), ("hdd", "ide", None), ("sda", "sata", None),
        ("hda", "ide", "1"), ("sdb", "sata", None)]
    assert nics(root) == [(None, "rtl8139")]
    assert root.find("features/hyperv") is None and root.find("clock").get("offset") == "localtime"


def test_a_windows_11_vm_keeps_secure_boot_and_a_tpm() -> None:
    """VMware's Windows 11 VMs boot with Secure Boot and a vTPM; the domain has both (a new TPM, with SMM for
    Secure Boot); a VM without them gets neither."""
    vm = inspect.parse_vmx(VMX.format(guest_os="windows11-64") + WINDOWS_11_VMX)
    assert vm["secure_boot"] is True and vm["tpm"] is True
    root = parsed(domain.domain_xml(inspect.Source("vmx", "/srv/w11/w11.vmx", "vmx", [], vm), OUT, "qcow2"))
    features = {f.get("name"): f.get("enabled") for f in root.findall("os/firmware/feature")}
    assert root.find("os").get("firmware") == "efi" and features == {"secure-boot": "yes", "enrolled-keys": "yes"}
    assert root.find("features/smm").get("state") == "on"
    backend = root.find("devices/tpm/backend")
    assert backend is not None and (backend.get("type"), backend.get("version")) == ("emulator", "2.0")
    ovf = WINDOWS_OVF.replace('<vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>',
                              '<vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>\n'
                              '      <vmw:Config ovf:required="false" vmw:key="bootOptions.efiSecureBootEnabled" '
                              'vmw:value="true"/>\n      <Item><rasd:ElementName>Virtual TPM</rasd:ElementName>'
                              '<rasd:InstanceID>20</rasd:InstanceID><rasd:ResourceSubType>vmware.vtpm'
                              '</rasd:ResourceSubType><rasd:ResourceType>1</rasd:ResourceType></Item>')
    vm = inspect.parse_ovf(ovf.format(os_type="windows11_64Guest", description="Windows 11").encode())
    assert vm["secure_boot"] is True and vm["tpm"] is True
    plain = parsed(domain.domain_xml(windows_ovf_source(), OUT, "qcow2"))
    assert all(plain.find(part) is None for part in ("devices/tpm", "features/smm"))
    # Secure Boot was off: said so, or libvirt would pick an OVMF that enforces it (Debian's first choice).
    assert {f.get("name"): f.get("enabled") for f in plain.findall("os/firmware/feature")} == {"secure-boot": "no"}


def test_the_cpus_keep_the_vms_topology_or_share_one_socket() -> None:
    """libvirt's default topology (a socket per CPU) leaves Windows 10 and 11 two CPUs of eight."""
    def topology(vmx: str) -> tuple[str | None, ...]:
        vm = inspect.parse_vmx(VMX.format(guest_os="windows9-64").replace('numvcpus = "2"', vmx))
        element = parsed(domain.domain_xml(inspect.Source("vmx", "/srv/a.vmx", "vmx", [], vm), OUT, "qcow2")).find(
            "cpu/topology")
        return (element.get("sockets"), element.get("cores"), element.get("threads")) if element is not None else ()
    assert topology('numvcpus = "8"') == ("1", "8", "1")
    assert topology('numvcpus = "8"\ncpuid.coresPerSocket = "4"') == ("2", "4", "1")
    assert topology('numvcpus = "6"\ncpuid.coresPerSocket = "4"') == ("1", "6", "1")     # 4 does not divide 6
    ovf = WINDOWS_OVF.replace("<rasd:VirtualQuantity>4</rasd:VirtualQuantity></Item>",
                              "<rasd:VirtualQuantity>4</rasd:VirtualQuantity>"
                              "<vmw:CoresPerSocket ovf:required=\"false\">2</vmw:CoresPerSocket></Item>", 1)
    vm = inspect.parse_ovf(ovf.format(os_type="windows9_64Guest", description="Windows 10").encode())
    assert vm["cores_per_socket"] == 2
    element = parsed(domain.domain_xml(inspect.Source("ova", "/srv/w.ova", "ova", [], vm), OUT, "qcow2")).find(
        "cpu/topology")
    assert (element.get("sockets"), element.get("cores")) == ("2", "2")


def test_a_plain_windows_disk_gets_the_memory_and_cpus_windows_needs() -> None:
    head = bytearray(domain.DISK_HEAD_BYTES)
    head[510:512] = b"\x55\xaa"
    # One active NTFS partition from sector 2048: Windows Vista or later.
    first, count = (2048).to_bytes(4, "little"), (1 << 20).to_bytes(4, "little")
    head[446:462] = bytes([0x80, 0, 0, 0, 0x07, 0, 0, 0]) + first + count
    root = parsed(domain.domain_xml(inspect.Source("disk", "/srv/w.vhdx", "vhdx", [], None), OUT[:1], "qcow2",
                                    bytes(head)))
    assert root.findtext("memory") == "4096" and root.findtext("vcpu") == "2"
    linux = parsed(domain.domain_xml(inspect.Source("disk", "/srv/l.vhdx", "vhdx", [], None), OUT[:1], "qcow2"))
    assert linux.findtext("memory") == "1024" and linux.findtext("vcpu") == "1"


_ESP, _MSR, _LINUX = (uuid.UUID(u).bytes_le for u in ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                                                      "E3C9E316-0B5C-4DB8-817D-F92DF00215AE",
                                                      "0FC63DAF-8483-4772-8E79-3D69D8477DE4"))


def gpt_head(sector: int, *types: bytes) -> bytes:
    """A disk's first DISK_HEAD_BYTES: a protective MBR and a GPT on `sector`-byte sectors, its header in sector 1
    and its entries from sector 2, one partition of each type."""
    head = bytearray(domain.DISK_HEAD_BYTES)
    head[510:512] = b"\x55\xaa"
    head[sector:sector + 8] = b"EFI PART"
    struct.pack_into("<QII", head, sector + 72, 2, 128, 128)
    for index, kind in enumerate(types):
        head[2 * sector + 128 * index:2 * sector + 128 * index + 16] = kind
    return bytes(head)


@pytest.mark.parametrize("types, windows", [((_ESP, _LINUX), False), ((_ESP, _MSR), True)], ids=["linux", "windows"])
def test_a_plain_disk_on_4k_sectors_gets_them_on_virtio(tmp_path: Path, types: tuple[bytes, ...],
                                                         windows: bool) -> None:
    """A VHDX made with 4 KiB logical sectors holds a GPT laid out on them: with QEMU's default 512-byte sectors
    the guest would find no partition table. SATA disks cannot have 4 KiB ones, so Windows is on virtio too."""
    plain = inspect.Source("disk", "/srv/gen2.vhdx", "vhdx", [object()], None)  # type: ignore[list-item]
    for sector in (512, 4096):
        xml = domain.domain_xml(plain, ["/out/gen2.qcow2"], "qcow2", gpt_head(sector, *types))
        root = parsed(xml)
        assert root.find("os").get("firmware") == "efi"                       # type: ignore[union-attr]
        [disk] = root.findall("./devices/disk")
        blockio = disk.find("blockio")
        if sector == 512:
            assert blockio is None
            assert disks(root)[0]["bus"] == ("sata" if windows else "virtio")
            continue
        assert blockio is not None and blockio.attrib == {"logical_block_size": "4096",
                                                          "physical_block_size": "4096"}, xml
        assert disks(root) == [{"file": "/out/gen2.qcow2", "dev": "vda", "bus": "virtio", "boot": "1"}]
        assert any("4 KiB sectors" in c and "virtio-win" in c for c in comments(root)) == windows
        assert nics(root) == [(None, "e1000e" if windows else "virtio")]
        if shutil.which("virt-xml-validate"):
            (tmp_path / "domain.xml").write_text(xml)
            run = subprocess.run(["virt-xml-validate", str(tmp_path / "domain.xml"), "domain"], capture_output=True,
                                 text=True)
            assert run.returncode == 0, run.stdout + run.stderr + xml


def test_a_plain_disk_whose_partition_table_tells_nothing_says_its_devices_are_guessed() -> None:
    """qemu-io could not read the disk (b""), or it has no partition table (a whole-disk file system): the
    domain says that BIOS and virtio are guesses, rather than passing them off as the VM's."""
    plain = inspect.Source("disk", "/srv/disk.vhdx", "vhdx", [object()], None)  # type: ignore[list-item]
    for head, words in ((b"", "could not be read"), (bytes(domain.DISK_HEAD_BYTES), "no MBR or GPT partition table"),
                        (gpt_head(512, _ESP, _LINUX), None)):
        root = parsed(domain.domain_xml(plain, ["/out/disk.qcow2"], "qcow2", head))
        guessed = [c for c in comments(root) if "are assumed" in c]
        assert [words in c for c in guessed] == ([True] if words else []), comments(root)
    vmx = parsed(domain.domain_xml(vmx_source("rhel8-64"), ["/out/a.qcow2", "/out/b.qcow2"], "qcow2"))
    assert not any("are assumed" in c for c in comments(vmx))
