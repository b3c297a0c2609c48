"""Fixture builders: real disk images made with qemu-img, OVAs with OVF and manifest, and broken inputs.

Every builder returns the path it wrote. Disk builders start from a raw file with random data in some
blocks (make_raw_with_data), so a converted copy can be checked against it with `qemu-img compare`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

from bench.disks import BLOCK, MiB, qemu_img, raw_with_data, to_format

__all__ = ["BLOCK", "KINDS", "MiB", "disk_difference", "make_chs_sized_vhd", "make_image", "make_missing_extent_vmdk",
           "make_multi_extent_vmdk", "make_not_an_image", "make_ova", "make_overlay", "make_ovf_text",
           "make_raw_with_data", "make_truncated_vmdk", "make_vmx", "qemu_img", "vhd_geometry"]

# make_image(fmt, subformat): the qemu-img driver and creation options for each fixture kind.
KINDS = {
    ("vmdk", "monolithicSparse"): ("vmdk", "subformat=monolithicSparse"),
    ("vmdk", "streamOptimized"): ("vmdk", "subformat=streamOptimized"),
    ("vmdk", "twoGbMaxExtentSparse"): ("vmdk", "subformat=twoGbMaxExtentSparse"),
    ("vmdk", "monolithicFlat"): ("vmdk", "subformat=monolithicFlat"),
    ("vhd", "fixed"): ("vpc", "subformat=fixed,force_size=on"),
    ("vhd", "dynamic"): ("vpc", "subformat=dynamic,force_size=on"),
    ("vhdx", None): ("vhdx", None),
    ("vdi", None): ("vdi", None),
    ("qcow2", None): ("qcow2", None),
    ("raw", None): ("raw", None),
}


def make_raw_with_data(path: str | Path, size: int, data_fraction: float, seed: int = 1,
                       partition_table: bool = False) -> Path:
    """A sparse raw file of `size` bytes with random data in about data_fraction of its 64 KiB blocks."""
    path = raw_with_data(Path(path), size, data_fraction, seed, piece=BLOCK)
    if partition_table:
        with open(path, "r+b") as f:
            f.seek(510)
            f.write(b"\x55\xaa")
    return path


def make_image(fmt: str, subformat: str | None, path: str | Path, raw: str | Path | None = None,
               size: int = 16 * MiB, data_fraction: float = 0.25, seed: int = 1) -> Path:
    """An image of the given kind holding `raw`'s content (a fresh random raw file if None)."""
    path = Path(path)
    if raw is None:
        raw = make_raw_with_data(path.with_suffix(".src.raw"), size, data_fraction, seed)
    return to_format(Path(raw), path, *KINDS[(fmt, subformat)])


def make_multi_extent_vmdk(directory: str | Path, raw: str | Path, name: str = "multi") -> Path:
    """A VMDK descriptor with two FLAT extents (the two halves of `raw`, whose size must be even in sectors)."""
    directory, raw = Path(directory), Path(raw)
    data = raw.read_bytes()
    half = len(data) // 2
    (directory / f"{name}-f001.vmdk").write_bytes(data[:half])
    (directory / f"{name}-f002.vmdk").write_bytes(data[half:])
    sectors = half // 512
    descriptor = directory / f"{name}.vmdk"
    descriptor.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\n\n"
        f"# Extent description\nRW {sectors} FLAT \"{name}-f001.vmdk\" 0\nRW {sectors} FLAT \"{name}-f002.vmdk\" 0\n\n"
        "# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.adapterType = \"lsilogic\"\n")
    return descriptor


def make_missing_extent_vmdk(directory: str | Path) -> Path:
    """A monolithicFlat descriptor whose -flat extent file was removed."""
    descriptor = make_image("vmdk", "monolithicFlat", Path(directory) / "noextent.vmdk", size=4 * MiB)
    for extent in Path(directory).glob("noextent-flat.vmdk"):
        extent.unlink()
    return descriptor


def make_truncated_vmdk(path: str | Path) -> Path:
    """A monolithicSparse VMDK cut off in the middle of its data."""
    path = Path(path)
    full = make_image("vmdk", "monolithicSparse", path.with_suffix(".full.vmdk"), size=16 * MiB, data_fraction=0.5)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    full.unlink()
    return path


def make_overlay(path: str | Path, base: str | Path, fmt: str, base_format: str) -> Path:
    """An image of format `fmt` with no data of its own over `base`, a file next to it, named relatively: a
    qcow2 overlay, or a VMDK snapshot delta naming its parent by parentFileNameHint."""
    path = Path(path)
    qemu_img("create", "-q", "-f", fmt, "-F", base_format, "-b", Path(base).name, str(path))
    return path


def vhd_geometry(sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a disk of `sectors`, by the VHD specification's algorithm:
    what VirtualBox and Virtual PC write in a footer. Their product is at most `sectors`, often less."""
    sectors = min(sectors, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        per_track, heads = 255, 16
        cylinders_times_heads = sectors // per_track
    else:
        per_track = 17
        cylinders_times_heads = sectors // per_track
        heads = max((cylinders_times_heads + 1023) // 1024, 4)
        if cylinders_times_heads >= heads * 1024 or heads > 16:
            per_track, heads = 31, 16
            cylinders_times_heads = sectors // per_track
        if cylinders_times_heads >= heads * 1024:
            per_track, heads = 63, 16
            cylinders_times_heads = sectors // per_track
    return cylinders_times_heads // heads, heads, per_track


def make_chs_sized_vhd(path: str | Path, raw: str | Path, subformat: str = "dynamic", creator: bytes = b"vbox") -> Path:
    """A VHD of `raw`'s content (its size a multiple of 512) as VirtualBox writes one: the footer states the
    exact size, with the CHS geometry of the specification (smaller unless the size happens to fit it) and
    `creator` as the creator application, which makes qemu size the disk by that geometry."""
    path = to_format(Path(raw), Path(path), "vpc", f"subformat={subformat},force_size=on")
    data = bytearray(path.read_bytes())
    cylinders, heads, per_track = vhd_geometry(os.path.getsize(raw) // 512)
    starts = [len(data) - 512] + ([0] if data.startswith(b"conectix") else [])   # a dynamic VHD's copy at 0
    for start in starts:
        footer = data[start:start + 512]
        footer[28:32] = creator
        footer[56:60] = cylinders.to_bytes(2, "big") + bytes([heads, per_track])
        footer[64:68] = bytes(4)
        footer[64:68] = ((~sum(footer)) & 0xFFFFFFFF).to_bytes(4, "big")   # one's complement of the byte sum
        data[start:start + 512] = footer
    path.write_bytes(bytes(data))
    return path


def make_not_an_image(path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(b"This is a shopping list, not a disk.\n" * 200)
    return path


OVF_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
{files}
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
{disks}
  </DiskSection>
  <NetworkSection><Info>Networks</Info><Network ovf:name="VM Network"/></NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <VirtualHardwareSection>
      <Info>Virtual hardware</Info>
      <Item><rasd:ElementName>{cpus} virtual CPU(s)</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ElementName>{memory}MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{memory}</rasd:VirtualQuantity></Item>
      <Item><rasd:ElementName>SCSI Controller 0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
{disk_items}
      <Item><rasd:Address>00:50:56:aa:bb:01</rasd:Address><rasd:Connection>VM Network</rasd:Connection>
        <rasd:ElementName>Network adapter 1</rasd:ElementName><rasd:InstanceID>9</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="{firmware}"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def make_ovf_text(name: str, disk_files: list[tuple[str, int, int]], cpus: int = 2, memory_mib: int = 2048,
                  firmware: str = "efi") -> str:
    """An OVF for disks [(file name, file size, capacity)], listed so that the hardware order is reversed
    from the References order: readers must follow the hardware section."""
    files = "\n".join(f'    <File ovf:href="{f}" ovf:id="file{i}" ovf:size="{s}"/>'
                      for i, (f, s, _) in enumerate(disk_files, 1))
    disks = "\n".join(f'    <Disk ovf:capacity="{c}" ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" '
                      'ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>'
                      for i, (_, _, c) in enumerate(disk_files, 1))
    items = "\n".join(f'      <Item><rasd:AddressOnParent>{unit}</rasd:AddressOnParent><rasd:ElementName>Hard disk {unit + 1}'
                      f'</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource>'
                      f'<rasd:InstanceID>{10 + i}</rasd:InstanceID><rasd:Parent>3</rasd:Parent>'
                      '<rasd:ResourceType>17</rasd:ResourceType></Item>'
                      for unit, i in enumerate(range(1, len(disk_files) + 1)))
    return OVF_TEMPLATE.format(files=files, disks=disks, disk_items=items, name=name, cpus=cpus,
                               memory=memory_mib, firmware=firmware)


def make_ova(path: str | Path, raws: list[str | Path], name: str = "testvm", bad_sum: bool = False,
             traversal_member: bool = False, algorithm: str = "sha256", **vm: object) -> Path:
    """A multi-disk OVA: OVF first, then the manifest, then one streamOptimized VMDK per raw file.

    bad_sum: the manifest's sum of the last disk is wrong. traversal_member: a member "../../etc/x" is added.
    """
    path = Path(path)
    work = path.parent / (path.name + ".parts")
    work.mkdir(exist_ok=True)
    disk_files = []
    for index, raw in enumerate(raws, 1):
        vmdk = make_image("vmdk", "streamOptimized", work / f"{name}-disk{index}.vmdk", raw=raw)
        disk_files.append((vmdk.name, vmdk.stat().st_size, os.path.getsize(raw)))
    ovf = make_ovf_text(name, disk_files, **vm).encode()  # type: ignore[arg-type]
    members = [(f"{name}.ovf", ovf)]
    sums = [f"{algorithm.upper()}({name}.ovf)= {hashlib.new(algorithm, ovf).hexdigest()}"]
    for index, (file_name, _, _) in enumerate(disk_files, 1):
        digest = hashlib.new(algorithm, (work / file_name).read_bytes()).hexdigest()
        if bad_sum and index == len(disk_files):
            digest = ("0" if digest[0] != "0" else "1") + digest[1:]
        sums.append(f"{algorithm.upper()}({file_name})= {digest}")
    members.append((f"{name}.mf", ("\n".join(sums) + "\n").encode()))
    members += [(file_name, (work / file_name).read_bytes()) for file_name, _, _ in disk_files]
    if traversal_member:
        members.append(("../../etc/x", b"owned\n"))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member_name, data in members:
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    for file in work.iterdir():
        file.unlink()
    work.rmdir()
    return path


def make_vmx(directory: str | Path, disks: list[str], name: str = "vmxvm", cpus: int = 4, memory_mib: int = 4096,
             firmware: str = "bios") -> Path:
    """A .vmx naming the given disk files (relative names, in the directory) as scsi0:0, scsi0:1, ..."""
    lines = ['.encoding = "UTF-8"', 'config.version = "8"', 'virtualHW.version = "19"',
             f'displayName = "{name}"', f'numvcpus = "{cpus}"', f'memsize = "{memory_mib}"',
             'ethernet0.present = "TRUE"', 'ethernet0.virtualDev = "vmxnet3"',
             'ethernet0.networkName = "VM Network"', 'ethernet0.addressType = "generated"',
             'ethernet0.generatedAddress = "00:0c:29:12:34:56"', 'ide1:0.present = "TRUE"',
             'ide1:0.deviceType = "cdrom-image"', 'ide1:0.fileName = "installer.iso"']
    if firmware == "efi":
        lines.append('firmware = "efi"')
    for unit, disk in enumerate(disks):
        lines += [f'scsi0:{unit}.present = "TRUE"', f'scsi0:{unit}.fileName = "{disk}"']
    path = Path(directory) / f"{name}.vmx"
    path.write_text("\n".join(lines) + "\n")
    return path


def partitioned(path: str | Path, table: str, size: int = 32 * MiB) -> Path:
    """A raw disk with the partition table `table`, as sfdisk reads it ("label: gpt\n,8M,U\n,,L\n")."""
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "--quiet", str(path)], input=table, text=True, check=True, capture_output=True)
    return path


def disk_difference(reference: str | Path, output: str | Path, ref_format: str | None = None,
                    out_format: str | None = None) -> str:
    """How `output` differs from `reference` as a guest sees them ("" when it is the same disk): their virtual
    sizes, and then their content. `qemu-img compare` alone takes a larger disk whose extra part reads as zeros
    for the same, and a smaller one too when the part cut off held zeros."""
    sizes = [json.loads(qemu_img("info", "--output=json", *(["-f", fmt] if fmt else []), str(path)))["virtual-size"]
             for path, fmt in ((reference, ref_format), (output, out_format))]
    if sizes[0] != sizes[1]:
        return f"{output} is a disk of {sizes[1]} bytes, {reference} of {sizes[0]}"
    formats = [*(["-f", ref_format] if ref_format else []), *(["-F", out_format] if out_format else [])]
    done = subprocess.run(["qemu-img", "compare", *formats, str(reference), str(output)], capture_output=True,
                          text=True, timeout=120)
    return "" if done.returncode == 0 else f"{output} differs from {reference}: {done.stdout}{done.stderr}".strip()
