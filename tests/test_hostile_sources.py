"""Sources crafted to exhaust or crash the root worker: each is refused with a sentence saying why, in bounded time
and memory, or read as the ordinary file it is; none ends as a retryable INTERNAL error.

A submitter may hand the worker any file: an OVA's tar headers may claim gigabytes, a VMX or a VMDK descriptor may
give numbers of thousands of digits or lines a pattern backtracks over, a VHDX may point past its end, and qemu-img
may quote a file name in bytes no codec reads. The large inputs are sparse files: nothing is written but headers.
"""

from __future__ import annotations

import errno
import hashlib
import io
import shutil
import struct
import subprocess
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest

import images
from test_operations import Run, run_worker

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")

# What an inspection of a few small files may take, worker start and qemu-img runs included. The inputs of the
# tests that are bounded by it took from a minute to hours before they were read in linear time.
SECONDS = 20
MiB = 1 << 20


def inspect_job(tmp_path: Path, source: Path, seconds: int | None = None) -> Run:
    """The worker's inspection of `source`, killed after `seconds` if given (a test failure)."""
    spec = {"operation": "inspect", "image": {"path": str(source)}}
    wrapper = ["timeout", "--signal=KILL", str(seconds)] if seconds else None
    try:
        return run_worker(tmp_path / "work", spec, [tmp_path], wrapper=wrapper)
    except (FileNotFoundError, ValueError):          # no result written: the worker was killed
        pytest.fail(f"the inspection of {source.name} did not finish within {seconds} seconds")


def refused(run: Run, *words: str) -> str:
    """The message of a job that failed with INVALID_IMAGE, checked to hold `words`."""
    assert run.returncode == 2, run.log
    error = run.result["error"]
    assert error["code"] == "INVALID_IMAGE" and not error["retryable"], error
    for word in words:
        assert word in error["message"], error
    return str(error["message"])


def small_disk(path: Path, subformat: str = "streamOptimized") -> Path:
    images.qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", str(path), "1M")
    return path


# ---------------------------------------------------------------- OVA: a tar whose headers claim anything

def header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    """A tar header block of a member `name` of `size` bytes (GNU's base-256 above 8 GiB) and type `kind`."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.GNU_FORMAT)


def with_size_field(block: bytes, field: bytes) -> bytes:
    """A header block with its 12-byte size field replaced, and its checksum made right again."""
    block = block[:124] + field + block[136:]
    block = block[:148] + b" " * 8 + block[156:]
    return block[:148] + b"%06o\0 " % sum(block) + block[156:]


def write_tar(path: Path, parts: list[bytes | int]) -> Path:
    """A tar of `parts`: header blocks and data as bytes (padded to blocks), and holes of that many bytes
    (rounded up to blocks), which take no space; two zero blocks end it."""
    with open(path, "wb") as f:
        for part in parts:
            if isinstance(part, int):
                f.seek(-(-part // 512) * 512, 1)
            else:
                f.write(part + bytes(-len(part) % 512))
        f.write(bytes(1024))
    return path


def ovf_and_disk(directory: Path, href: str = "disk1.vmdk") -> list[bytes | int]:
    """The parts of an OVA holding an OVF (vm.ovf) and its one disk, named `href`."""
    disk = small_disk(directory / "disk.vmdk").read_bytes()
    ovf = images.make_ovf_text("vm", [(href, len(disk), 1 << 20)]).encode()
    return [header("vm.ovf", len(ovf)), ovf, header(href, len(disk)), disk]


def test_an_ova_manifest_larger_than_any_descriptor_is_refused_unread(tmp_path: Path) -> None:
    """Its size is what its tar header says: 64 MiB of a hole here, or terabytes, all read into the root worker."""
    ova = write_tar(tmp_path / "vm.ova", [*ovf_and_disk(tmp_path), header("vm.mf", 64 * MiB), 64 * MiB])
    refused(inspect_job(tmp_path, ova), "the manifest 'vm.mf'", "larger than 16 MiB")


@pytest.mark.parametrize("name, kind, told", [("././@LongLink", tarfile.GNUTYPE_LONGNAME, "long name"),
                                              ("././@PaxHeader", tarfile.XHDTYPE, "pax")], ids=["long name", "pax"])
def test_an_extended_tar_header_claiming_more_than_a_mebibyte_is_refused_unread(tmp_path: Path, name: str,
                                                                                 kind: bytes, told: str) -> None:
    """A GNU long name or pax records of 64 MiB (a hole): tarfile would read them whole into memory."""
    ova = write_tar(tmp_path / "vm.ova", [header(name, 64 * MiB, kind), 64 * MiB, *ovf_and_disk(tmp_path)])
    refused(inspect_job(tmp_path, ova), f"extended tar header ({told}) of {64 * MiB} bytes", "more than 1 MiB")


def pax_record(keyword: str, value: bytes) -> bytes:
    """A pax record, "<length> <keyword>=<value>" and a newline, its length counting its own digits."""
    rest = b" " + keyword.encode() + b"=" + value + b"\n"
    length = len(rest)
    while length != len(rest) + len(str(length)):
        length = len(rest) + len(str(length))
    return str(length).encode() + rest


def test_extended_tar_headers_are_bounded_in_all_too(tmp_path: Path) -> None:
    """Pax records of a mebibyte for each of five members, each header within its bound: their sum is bounded."""
    record = pax_record("comment", b"c" * (MiB - 100))
    parts: list[bytes | int] = []
    for number in range(5):
        parts += [header("././@PaxHeader", len(record), tarfile.XHDTYPE), record, header(f"f{number}", 0)]
    ova = write_tar(tmp_path / "vm.ova", [*ovf_and_disk(tmp_path), *parts])
    refused(inspect_job(tmp_path, ova), "more than 4 MiB in all")


def test_pax_records_are_read_in_linear_time(tmp_path: Path) -> None:
    """tarfile looks for a "hdrcharset" record with a pattern that rescans a run of digits from each of its
    digits: a mebibyte of them took it some twenty minutes. Records that are no records are refused at once."""
    ova = write_tar(tmp_path / "vm.ova", [header("././@PaxHeader", MiB, tarfile.XHDTYPE), b"1" * MiB,
                                          *ovf_and_disk(tmp_path)])
    refused(inspect_job(tmp_path, ova, SECONDS), "has a malformed pax header")


def test_extended_tar_headers_in_a_row_are_refused(tmp_path: Path) -> None:
    """tarfile recursed once per long name before the member they name: a thousand made it fail with
    RecursionError, an INTERNAL error."""
    name = b"n" * 100 + b"\0"
    chain = [header("././@LongLink", len(name), tarfile.GNUTYPE_LONGNAME), name] * 1000
    ova = write_tar(tmp_path / "vm.ova", [*ovf_and_disk(tmp_path), *chain, header("f", 0)])
    refused(inspect_job(tmp_path, ova), "two extended tar headers of one kind (long name) for one member")


def test_an_ova_of_more_than_ten_thousand_members_is_refused(tmp_path: Path) -> None:
    """Empty members cost the archive 512 bytes each, and the listing a record each."""
    parts: list[bytes | int] = [*ovf_and_disk(tmp_path), *(header(f"f{n}", 0) for n in range(10_001))]
    ova = write_tar(tmp_path / "vm.ova", parts)
    refused(inspect_job(tmp_path, ova), "more than 10000 members")


@pytest.mark.parametrize("size", [-1, -512])
def test_a_member_of_a_negative_size_is_refused(tmp_path: Path, size: int) -> None:
    """GNU's base-256 size field has a sign (a first byte 0xFF): -1 went to os.pread as a length (EINVAL), and
    over -512 tarfile stepped back to the header it had just read, listing it again and again without end."""
    ovf_header, ovf, disk_header, _ = ovf_and_disk(tmp_path)
    assert isinstance(disk_header, bytes)
    field = b"\xff" + (2**88 + size).to_bytes(11, "big")
    ova = write_tar(tmp_path / "vm.ova", [ovf_header, ovf, with_size_field(disk_header, field)])
    refused(inspect_job(tmp_path, ova, SECONDS), "'disk1.vmdk' with a negative size")


def test_a_member_running_past_the_end_of_the_ova_is_refused(tmp_path: Path) -> None:
    """A member said to hold 2^80 bytes ends past any file, at an offset no read can take (OverflowError): refused
    as a copy cut short within its last member is."""
    ovf_header, ovf, disk_header, _ = ovf_and_disk(tmp_path)
    assert isinstance(ovf, bytes) and isinstance(disk_header, bytes)
    field = b"\x80" + (1 << 80).to_bytes(11, "big")
    ova = write_tar(tmp_path / "vm.ova", [ovf_header, ovf, with_size_field(disk_header, field)])
    disk_at = 512 + -(-len(ovf) // 512) * 512 + 512
    refused(inspect_job(tmp_path, ova), "is cut short", f"its member 'disk1.vmdk' ends at byte {disk_at + (1 << 80)}")


@pytest.mark.parametrize("form", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_an_ova_with_long_member_names_and_pax_records_is_read(tmp_path: Path, form: int) -> None:
    """What tar writes for names longer than 100 bytes (pax records, or GNU long names) is read as tar reads it."""
    href = "disks/" + "d" * 150 + ".vmdk"
    disk = small_disk(tmp_path / "disk.vmdk").read_bytes()
    ovf = images.make_ovf_text("vm", [(href, len(disk), 1 << 20)]).encode()
    ova = tmp_path / "vm.ova"
    with tarfile.open(ova, "w", format=form) as tar:
        for name, data in (("vm.ovf", ovf), (href, disk)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000.5       # a fractional time: a pax record
            tar.addfile(info, io.BytesIO(data))
    run = inspect_job(tmp_path, ova)
    assert run.returncode == 0, run.log
    assert [d["member"] for d in run.result["outputs"]["report"]["disks"]] == [href]


# ---------------------------------------------------------------- VMX: lines read in linear time

def vmx_with(directory: Path, *lines: str, encoding: str = "UTF-8", tail: str = "") -> Path:
    """A VMX named vm, of one disk, with `lines` added, its .encoding line saying `encoding`, ending in `tail`."""
    small_disk(directory / "d.vmdk", "monolithicSparse")
    vmx = images.make_vmx(directory, ["d.vmdk"], name="vm")
    text = vmx.read_text().replace('.encoding = "UTF-8"', f'.encoding = "{encoding}"')
    vmx.write_text(text + "".join(line + "\n" for line in lines) + tail)
    return vmx


def test_a_vmx_value_with_a_long_run_of_blanks_is_read_at_once(tmp_path: Path) -> None:
    """`key = "x<1 MiB of spaces>y"`: a pattern with \\s*$ after a lazy value took hours over it."""
    vmx = vmx_with(tmp_path, 'annotation = "x' + " " * MiB + 'y"')
    run = inspect_job(tmp_path, vmx, SECONDS)
    assert run.returncode == 0, run.log
    assert run.result["outputs"]["report"]["vm"]["name"] == "vm"


def test_a_vmx_declaring_punycode_is_read_as_utf8(tmp_path: Path) -> None:
    """Python decodes punycode in quadratic time (4 MiB: minutes), and no VMware writes a VMX in it."""
    vmx = vmx_with(tmp_path, encoding="punycode", tail="-" + "a" * (4 * MiB))
    run = inspect_job(tmp_path, vmx, SECONDS)
    assert run.returncode == 0, run.log
    report = run.result["outputs"]["report"]
    assert report["vm"]["name"] == "vm" and [d["path"] for d in report["disks"]] == [str(tmp_path / "d.vmdk")]


def test_a_vmx_of_millions_of_short_lines_is_refused_and_a_long_real_one_read(tmp_path: Path) -> None:
    """16 MiB of `k<N>=v` lines made a dictionary of four million settings: seconds and hundreds of megabytes.
    A VMX has hundreds of lines; one of twenty thousand (a long annotation, many devices) is still read."""
    vmx = vmx_with(tmp_path, *(f"{n:x}=v" for n in range(1_800_000)))
    assert 14 * MiB < vmx.stat().st_size <= 16 * MiB
    refused(inspect_job(tmp_path, vmx, SECONDS), "the VMX file has more than 100000 lines")
    vmx = vmx_with(tmp_path, *(f'guestinfo.key{n} = "value {n}"' for n in range(20_000)))
    run = inspect_job(tmp_path, vmx, SECONDS)
    assert run.returncode == 0, run.log
    assert run.result["outputs"]["report"]["vm"]["name"] == "vm"


def test_a_vmx_value_that_is_not_a_number_is_not_quoted_in_the_public_error(tmp_path: Path) -> None:
    """The job's Error is everyone's to read, and the VMX may be its submitter's alone (mode 0600)."""
    vmx = vmx_with(tmp_path, 'memsize = "TopSecret-Pa55w0rd"')      # the last of a key's lines counts
    message = refused(inspect_job(tmp_path, vmx), "the VMX file gives memsize a value that is not a whole number")
    assert "TopSecret" not in message and "Pa55w0rd" not in message, message


def test_a_file_of_newlines_is_found_no_image_at_once(tmp_path: Path) -> None:
    """Looking for a VMX's first line with ^\\s* scanned on from each of 64 KiB of newlines: a minute of CPU."""
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\n" * 65536)
    refused(inspect_job(tmp_path, blank, SECONDS), "is not a disk image")


@pytest.mark.parametrize("key, told", [("scsi0:" + "1" * 5000, "a disk unit number"),
                                       ("scsi" + "1" * 5000 + ":0", "a disk controller number")])
def test_a_vmx_disk_numbered_with_thousands_of_digits_is_refused(tmp_path: Path, key: str, told: str) -> None:
    vmx = vmx_with(tmp_path, f'{key}.present = "TRUE"', f'{key}.fileName = "d.vmdk"')
    message = refused(inspect_job(tmp_path, vmx), "the VMX file gives", told, "of 5000 characters")
    assert "1" * 100 not in message


# ---------------------------------------------------------------- descriptors, tables and numbers

def flat_descriptor(directory: Path, sectors: str, extent_bytes: int = 512) -> Path:
    """A monolithicFlat descriptor whose one extent, flat.bin of `extent_bytes`, is said to hold `sectors`."""
    (directory / "flat.bin").write_bytes(bytes(extent_bytes))
    descriptor = directory / "disk.vmdk"
    descriptor.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                          f'createType="monolithicFlat"\n\nRW {sectors} FLAT "flat.bin" 0\n\nddb.adapterType = "ide"\n')
    return descriptor


def test_a_vmdk_extent_of_thousands_of_digits_is_refused(tmp_path: Path) -> None:
    message = refused(inspect_job(tmp_path, flat_descriptor(tmp_path, "9" * 5000)), "an extent size in sectors",
                      "of 5000 characters")
    assert "9" * 100 not in message


def test_a_vmdk_descriptor_larger_than_16_mib_is_refused(tmp_path: Path) -> None:
    """Its extents went unchecked: a flat extent cut short to 512 bytes of its 999999 sectors converted as zeros."""
    descriptor = flat_descriptor(tmp_path, "999999")
    with open(descriptor, "r+b") as f:
        f.truncate(17 * MiB)         # a hole: NULs, which end the text qemu reads
    refused(inspect_job(tmp_path, descriptor), f"the VMDK descriptor {descriptor} is larger than 16 MiB")


@pytest.mark.parametrize("damage", ["metadata at 2^64 - 1", "region table cut short"])
def test_a_vhdx_whose_tables_lead_past_its_end_is_refused_as_invalid(tmp_path: Path, damage: str) -> None:
    """A metadata region at 2^64 - 1 made os.pread raise OverflowError, a region table cut short after its
    signature struct.error: both ended as INTERNAL, a fault of h2kd to retry. qemu-img says what is wrong."""
    image = tmp_path / "disk.vhdx"
    images.qemu_img("create", "-q", "-f", "vhdx", str(image), "1M")
    if damage == "region table cut short":
        with open(image, "r+b") as f:
            f.truncate(192 * 1024 + 8)
    else:
        data = bytearray(image.read_bytes())
        metadata = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
        for table in (192 * 1024, 256 * 1024):          # the region table and its copy
            entry = data.index(metadata, table, table + 64 * 1024)
            data[entry + 16:entry + 24] = struct.pack("<Q", 2**64 - 1)
        image.write_bytes(bytes(data))
    refused(inspect_job(tmp_path, image), f"({image}) is not a readable vhdx image")


def ova_of_ovf(directory: Path, ovf: str) -> Path:
    """An OVA holding `ovf` as vm.ovf and its disk disk1.vmdk."""
    disk = small_disk(directory / "disk.vmdk").read_bytes()
    return write_tar(directory / "vm.ova", [header("vm.ovf", len(ovf.encode())), ovf.encode(),
                                            header("disk1.vmdk", len(disk)), disk])


@pytest.mark.parametrize("unit", ["\u00b2", "7" * 5000], ids=["superscript two", "5000 digits"])
def test_an_ovf_disk_address_that_is_no_number_is_passed_over(tmp_path: Path, unit: str) -> None:
    """A "²" is a digit to str.isdigit() but not to int(), and int() refuses 5000 digits: where a disk sits on its
    controller only ranks it for the boot disk, and the OVA is read as if it gave none."""
    ovf = images.make_ovf_text("vm", [("disk1.vmdk", 512, 1 << 20)])
    ovf = ovf.replace("<rasd:AddressOnParent>0</rasd:AddressOnParent>", f"<rasd:AddressOnParent>{unit}"
                      "</rasd:AddressOnParent>")
    assert unit in ovf
    run = inspect_job(tmp_path, ova_of_ovf(tmp_path, ovf))
    assert run.returncode == 0, run.log
    assert run.result["outputs"]["report"]["vm"]["boot_disk"] == 0


# ---------------------------------------------------------------- an OVF's manifest

def ovf_directory(directory: Path) -> tuple[Path, Path]:
    """vm.ovf and its disk disk1.vmdk in `directory`; (the OVF, the path of its manifest, not written)."""
    disk = small_disk(directory / "disk1.vmdk")
    ovf = directory / "vm.ovf"
    ovf.write_text(images.make_ovf_text("vm", [(disk.name, disk.stat().st_size, 1 << 20)]))
    return ovf, directory / "vm.mf"


def test_an_ovf_manifest_in_bytes_no_text_holds_is_refused_as_invalid(tmp_path: Path) -> None:
    """A byte 0xFF made the strict UTF-8 decoding raise, a retryable INTERNAL error."""
    ovf, manifest = ovf_directory(tmp_path)
    manifest.write_bytes(b"\xff\n")
    refused(inspect_job(tmp_path, ovf), "line 1 of the manifest is not a checksum")


def test_an_ovf_manifest_larger_than_16_mib_is_refused_not_cut_short(tmp_path: Path) -> None:
    """Read up to 16 MiB, it lost what came after: here a wrong sum, of a disk that then went unchecked."""
    ovf, manifest = ovf_directory(tmp_path)
    good = hashlib.sha256(ovf.read_bytes()).hexdigest()
    manifest.write_text(f"SHA256(vm.ovf)= {good}\n" + "\n" * (17 * MiB) + f"SHA256(disk1.vmdk)= {'0' * 64}\n")
    refused(inspect_job(tmp_path, ovf), f"the manifest {manifest} is larger than 16 MiB")


# ---------------------------------------------------------------- what qemu-img says, in any bytes

def top_of_missing_base(directory: Path) -> Path:
    """A qcow2 whose backing file, named with the byte 0xFF, is not there: qemu-img quotes the name as is."""
    top = directory / "top.qcow2"
    subprocess.run([b"qemu-img", b"create", b"-q", b"-f", b"qcow2", b"-F", b"qcow2", b"-u", b"-b", b"\xff.qcow2",
                    bytes(top), b"1M"], check=True)
    return top


def test_qemu_img_words_in_bytes_no_codec_reads_are_reported(tmp_path: Path) -> None:
    message = refused(inspect_job(tmp_path, top_of_missing_base(tmp_path)), "is not a readable qcow2 image")
    assert "\ufffd.qcow2" in message


def test_the_head_of_a_disk_qemu_io_cannot_open_reads_as_nothing(tmp_path: Path) -> None:
    """qemu-io's complaint quotes the missing file's name in its bytes: read_head still answers b""."""
    from h2kd.operations import qemuimg

    assert qemuimg.read_head(qemuimg.ImageRef(str(top_of_missing_base(tmp_path)), "qcow2"), 512) == b""


# ---------------------------------------------------------------- whatever else a value may do

@pytest.mark.parametrize("fault", [ValueError("Exceeds the limit (4300 digits) for integer string conversion"),
                                   OverflowError("Python int too large to convert to C long"),
                                   UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
                                   struct.error("unpack_from requires a buffer of at least 12 bytes")],
                         ids=["ValueError", "OverflowError", "UnicodeDecodeError", "struct.error"])
def test_a_value_no_check_foresaw_makes_the_source_invalid_not_an_internal_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: Exception) -> None:
    """The reading of a VMX fails as parsing an unforeseen value would: the source is named as malformed, and the
    error is INVALID_IMAGE, not retried."""
    from h2kd.operations import inspect
    from h2kd.operations.qemuimg import OperationError

    def parse(_: str) -> dict[str, Any]:
        raise fault

    vmx = vmx_with(tmp_path)
    monkeypatch.setattr(inspect, "parse_vmx", parse)
    with pytest.raises(OperationError) as raised:
        inspect.load_source(str(vmx))
    assert raised.value.code == "INVALID_IMAGE" and not raised.value.retryable
    assert raised.value.message == (f"the source {vmx} is damaged or malformed: a value in it cannot be read "
                                    f"({type(fault).__name__})")


def test_a_failing_read_is_not_taken_for_a_malformed_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error is the host's, not the source's: it goes on as it is, for the worker to report."""
    from h2kd.operations import inspect

    def parse(_: str) -> dict[str, Any]:
        raise OSError(errno.EIO, "Input/output error")

    vmx = vmx_with(tmp_path)
    monkeypatch.setattr(inspect, "parse_vmx", parse)
    with pytest.raises(OSError) as raised:
        inspect.load_source(str(vmx))
    assert raised.value.errno == errno.EIO
