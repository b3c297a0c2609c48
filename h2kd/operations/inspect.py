"""Inspection: what a source is (from its content, never its name), which disks it holds, and whether it is sound.

A source is one of:
  disk  a single image file: VMDK (monolithicSparse, streamOptimized, twoGbMaxExtentSparse, monolithicFlat,
        or any descriptor with extents; snapshot deltas with their parents), VHD fixed/dynamic, VHDX, VDI,
        qcow2 (with its backing chain), or raw (only with a partition table or when image.format says raw);
  ova   a tar holding an OVF, an optional manifest and the disks; read in place, nothing extracted;
  ovf   an OVF descriptor whose disks sit next to it;
  vmx   a VMware configuration whose disks sit next to it.

Every file is opened without following symlinks and must be a regular file. Files a source refers to
(VMDK extents, backing files, OVF/VMX disks, manifest entries, OVA members) must be plain names resolving
inside the source's own directory (or the OVA): a crafted descriptor must not make a root daemon read
/etc/shadow. For a submitter other than root, each such file is looked up and opened as the submitter first
(see _open_referenced): root looks at nothing they could not see themselves, and reads a file again later only
through a lookup that must find the very file they were checked for. Names with a protocol prefix (json:,
nbd:...) and qcow2 external data files are refused outright.
run_inspect() returns the structured report of the result contract's outputs["report"].
"""

from __future__ import annotations

import codecs
import errno
import io
import os
import re
import stat
import struct
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

from h2kd.operations import qemuimg
from h2kd.operations.background import Background
from h2kd.operations.qemuimg import ImageRef, OperationError

if TYPE_CHECKING:       # tarfile, ElementTree and hashlib are imported where OVAs, OVFs and sums need them
    import tarfile
    import xml.etree.ElementTree as ET

# progress(phase, bytes_done, bytes_total, message)
ProgressFn = Callable[[str, int, int, str], None]

# Spec names (h2kd.model.spec.IMAGE_FORMATS) to qemu-img driver names.
SPEC_TO_DRIVER = {"vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi", "qcow2": "qcow2", "raw": "raw"}
DRIVER_TO_NAME = {"vpc": "vhd"}
CHECKABLE = {"qcow2", "vmdk", "vdi", "vhdx"}
MAX_DESCRIPTOR = 16 * 1024 * 1024      # OVF / VMX / VMDK descriptor texts are small; refuse giants
# What a VM description (OVF, VMX) may put in the report, well above what any hypervisor makes (VMware: 10
# NICs, some 600 disks at most; names of 80 characters): a descriptor beyond it is refused, not cut short.
MAX_VM_TEXT = 1024                      # characters of any one value: a name, a file name, a MAC...
MAX_VM_DISKS = 640
MAX_VM_NICS = 64
MAX_VMX_LINES = 100_000                 # a VMX holds hundreds of settings; millions of short lines cost gigabytes
MAX_MANIFEST_ENTRIES = 4096
# An OVF of 640 disks and 64 NICs has some 20,000 elements. Each costs the tree a few hundred bytes: 16 MiB of
# "<a>" would cost a gigabyte.
MAX_XML_ELEMENTS = 100_000
MAX_XML_ATTRIBUTES = 200_000
# Counts and sizes a descriptor gives, far above what any hypervisor allows a VM (VMware: 768 vCPUs, 24 TiB of
# memory, 62 TiB disks): a larger one is a damaged or crafted descriptor, refused by name rather than carried
# into the report and the domain XML (Python's int() itself refuses more than 4,300 digits, as INTERNAL).
MAX_VM_CPUS = 4096
MAX_VM_MEMORY_MIB = 64 * 2**20           # 64 TiB
MAX_DISK_CAPACITY = 2**60                # bytes
_MAX_UNIT_EXPONENT = 60                  # "byte * 2^60": an OVF allocation unit of an exbibyte
# What an OVA's tar may hold before it is refused, far above what any exporter writes (a few members, long names
# of a few hundred bytes): every member costs the listing a record, and every extended header (a GNU long name,
# pax records) is read whole, so a crafted archive must not make either grow without limit.
MAX_TAR_MEMBERS = 10_000
MAX_TAR_EXTENSION = 1024 * 1024          # bytes of one extended header
MAX_TAR_EXTENSIONS = 4 * 1024 * 1024     # bytes of all the extended headers of an archive
MAX_TAR_NAME = 4096                      # bytes of a member's name: PATH_MAX, no file system takes a longer one
HASH_CHUNK = 1024 * 1024


def _invalid(message: str, phase: str = "inspect") -> OperationError:
    return OperationError("INVALID_IMAGE", message, phase)


# ---------------------------------------------------------------- opening files safely

class FileIdentity(NamedTuple):
    """What must not change while we read a file. The ctime too: a file's owner can rewrite it and put its
    mtime back (an image header naming another backing file, between the check and the conversion), but
    cannot set the ctime."""

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> FileIdentity:
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_regular_file(path: str, what: str = "the image") -> tuple[int, FileIdentity]:
    """A read-only fd of a regular file that is not a symlink, and its identity; OperationError otherwise."""
    if not os.path.isabs(path):
        raise OperationError("VALIDATION_FAILED", f"{what} path must be absolute: {path}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise _invalid(f"{what} {path} does not exist") from None
    except PermissionError:
        raise OperationError("PERMISSION_DENIED", f"{what} {path} cannot be accessed: permission denied") from None
    except OSError as e:
        raise _invalid(f"{what} {path} cannot be read: {e.strerror}") from None
    _refuse_non_regular(path, st.st_mode, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except PermissionError:
        raise OperationError("PERMISSION_DENIED", f"{what} {path} cannot be opened: permission denied") from None
    except OSError as e:
        if e.errno == 40:  # ELOOP: it became a symlink after lstat
            raise OperationError("PERMISSION_DENIED", f"{what} {path} is a symbolic link; give the path of the "
                                 "file itself") from None
        raise _invalid(f"{what} {path} cannot be opened: {e.strerror}") from None
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        _refuse_non_regular(path, opened.st_mode, what)
        raise OperationError("SOURCE_CHANGED", f"{what} {path} was replaced while it was being opened")
    return fd, FileIdentity.of(path, opened)


def _refuse_non_regular(path: str, mode: int, what: str) -> None:
    """OperationError saying what `path` (of this st_mode) is, unless it is a regular file."""
    if stat.S_ISLNK(mode):
        raise OperationError("PERMISSION_DENIED", f"{what} {path} is a symbolic link; symlinks are refused, "
                             "give the path of the file itself")
    if stat.S_ISDIR(mode):
        raise _invalid(f"{what} {path} is a directory, not an image file")
    if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        raise _invalid(f"{what} {path} is a device node; only image files can be converted")
    if not stat.S_ISREG(mode):
        raise _invalid(f"{what} {path} is not a regular file (a FIFO or socket)")


def ensure_unchanged(identities: list[FileIdentity], phase: str = "convert") -> None:
    """SOURCE_CHANGED if a file read so far was removed, replaced or modified."""
    for ident in identities:
        # One answer whatever is found: the lookup is root's, and the submitter may have swapped a directory on
        # the way for a symlink into one closed to them; "gone" would tell that nothing is there.
        try:
            st = os.stat(ident.path, follow_symlinks=False)
        except OSError:
            st = None
        if st is None or FileIdentity.of(ident.path, st) != ident:
            raise OperationError("SOURCE_CHANGED", f"the source file {ident.path} disappeared or was modified or "
                                 "replaced during the job", phase)


def _read_head_tail(fd: int, offset: int, size: int) -> tuple[bytes, bytes]:
    head = os.pread(fd, min(size, 65536), offset)
    tail = os.pread(fd, 512, offset + size - 512) if size >= 512 else b""
    return head, tail


def _parts(name: str) -> list[str]:
    """The components of a "/"-separated name, as pathlib's PurePosixPath sees them for a relative name
    (empty and "." components dropped); pathlib itself costs every worker start more than this."""
    return [part for part in name.split("/") if part not in ("", ".")]


def _normal_name(name: str) -> str:
    """A relative "/"-separated name in its plain form ("./a//b" is "a/b")."""
    return "/".join(_parts(name)) or "."


def _local_file(directory: str, name: str, what: str) -> str:
    """The path of `name`, a file a source refers to, refusing names that escape `directory` as written
    (absolute, or with ".."). Nothing is looked up here: where the name leads is _open_referenced's to check,
    once the submitter is known to see it."""
    if not name or name.startswith("/") or ".." in _parts(name) or "\0" in name:
        raise OperationError("PERMISSION_DENIED", f"{what} {name!r} is not a plain relative file name; files "
                             "outside the source's directory are refused")
    return os.path.join(directory, name)


def _open_referenced(path: str, directory: str, name: str, what: str, reader_uid: int | None,
                     seen: tuple[int, int] | None = None) -> tuple[int, FileIdentity]:
    """A read-only descriptor of `path`, a file the source refers to as `name`, and its identity; it must be a
    regular file, not a symlink, and lie in `directory` (a subdirectory in the name must not lead out of it).

    With reader_uid (a submitter other than root), the submitter looks the file up and opens it first, with
    their own rights on every directory on the way (_seen_by_submitter); only then does root look it up, and it
    must find the file they opened. So a file behind a directory closed to them gets the answer their own
    lookup gives whether it is there or not, whatever it is, and root opens nothing they could not. seen: what
    _seen_by_submitter() already found at `path` for reader_uid."""
    if reader_uid:
        if seen is None:
            seen = _seen_by_submitter([(path, name)], what, reader_uid)[0]
        changed = OperationError("SOURCE_CHANGED", f"{what} {name!r} was moved, removed or replaced while it was "
                                 "being checked")
        fd = _open_known(path, lambda st: (st.st_dev, st.st_ino) == seen, changed)
    else:
        if not os.path.lexists(path):
            raise _invalid(f"{what} {name!r} does not exist")
        fd, _ = open_regular_file(path, what)
    try:
        if os.path.dirname(name) and not _inside(_where_open(fd, path), directory):
            # A subdirectory in the name that is a symlink leading out (lnk/disk.vmdk with lnk -> /secret).
            raise OperationError("PERMISSION_DENIED", f"{what} {name!r} leads outside its directory {directory}; "
                                 "such files are refused")
        return fd, FileIdentity.of(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise


def _open_each_referenced(files: list[tuple[str, str]], directory: str, what: str,
                          reader_uid: int | None) -> Iterator[tuple[str, int, FileIdentity]]:
    """_open_referenced() of each (path, name) of `files` in turn, as (name, descriptor, identity): the caller
    closes each descriptor. The submitter's lookups are made first, many to a child process."""
    seen = _seen_by_submitter(files, what, reader_uid) if reader_uid and files else [None] * len(files)
    for (path, name), found in zip(files, seen, strict=True):
        yield (name, *_open_referenced(path, directory, name, what, reader_uid, found))


def _seen_by_submitter(files: list[tuple[str, str]], what: str, uid: int) -> list[tuple[int, int]]:
    """(device, inode) of each regular file the submitter `uid` finds at a path of `files` ((path, name as the
    source writes it) pairs) and may open for reading, looked up and opened in child processes with their uid
    and groups; OperationError for the first that is not, telling only what their own lookup told them."""
    from h2kd.access import groups_for, look_up_and_open_each_as
    from h2kd.errors import H2kError

    try:
        found = look_up_and_open_each_as(uid, groups_for(uid), [path for path, _ in files])
    except H2kError as e:       # the check did not finish (a file system not answering): a later attempt may pass
        shown = f"{what} {files[0][1]!r}" + (f" and the {len(files) - 1} other files the source names"
                                             if len(files) > 1 else "")
        raise OperationError("TOOL_FAILED", f"{shown} could not be checked for the source's submitter: {e}") from None
    for (path, name), (code, device, inode, mode) in zip(files, found, strict=True):
        if not mode and code in (errno.ENOENT, errno.ENOTDIR):
            raise _invalid(f"{what} {name!r} does not exist")
        if not mode or (code and stat.S_ISREG(mode)):
            raise OperationError("PERMISSION_DENIED", f"the source refers to a file its submitter may not read: "
                                 f"{what} {name!r} is not readable by uid {uid}: {os.strerror(code)}")
        _refuse_non_regular(path, mode, what)
    return [(device, inode) for _, device, inode, _ in found]


def _open_known(path: str, expected: Callable[[os.stat_result], bool], changed: OperationError,
                describe: str | None = None) -> int:
    """A read-only descriptor of the regular file at `path`, whose status must be `expected`: `changed`
    otherwise, whatever is there instead (or nothing). Root looks it up with O_PATH, which opens no device and
    waits for no FIFO, and reads only once the file is known to be the one expected. describe: what to call the
    expected file if it is no regular file (it was checked for the submitter: saying what it is tells nothing)."""
    try:
        handle = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise changed from None
    try:
        st = os.fstat(handle)
        if not expected(st):
            raise changed
        if not stat.S_ISREG(st.st_mode):
            if describe is None:
                raise changed
            _refuse_non_regular(path, st.st_mode, describe)
        try:
            return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            raise changed from None
    finally:
        os.close(handle)


def _where_open(fd: int, path: str) -> str:
    """Where the file open on `fd` (opened as `path`) is now; realpath(path) where /proc is not there to tell."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


# ---------------------------------------------------------------- formats from content

# Blanks within a line only: \s would span line ends, and each of 64 KiB of newlines would start a scan of all the
# rest (a minute of CPU for a file of nothing but newlines).
_VMX_SIGNATURE = re.compile(rb"^[ \t]*(config\.version|virtualHW\.version|\.encoding)[ \t]*=", re.M | re.I)


def sniff(head: bytes, tail: bytes) -> str | None:
    """The format whose signature the bytes carry: a qemu-img driver name, or ova/ovf/vmx, or None."""
    if head[257:262] == b"ustar":
        return "ova"
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith((b"KDMV", b"COWD")):
        return "vmdk"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if head.startswith(b"conectix") or tail.startswith(b"conectix"):
        return "vpc"
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == 0xBEDA107F:
        return "vdi"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"# Disk DescriptorFile") or (b"createType" in head[:4096] and b"RW " in head[:4096]):
        return "vmdk"
    if text.startswith(b"<") and b"Envelope" in head[:8192]:
        return "ovf"
    if _VMX_SIGNATURE.search(head[:65536]):
        return "vmx"
    return None


def _has_partition_table(head: bytes) -> bool:
    return head[510:512] == b"\x55\xaa" or head[512:520] == b"EFI PART"


def _vhd_type(footer: bytes | None) -> str | None:
    if not footer or len(footer) < 64:
        return None
    return {2: "fixed", 3: "dynamic", 4: "differencing"}.get(struct.unpack_from(">I", footer, 60)[0], "unknown")


# ---------------------------------------------------------------- disks

class Disk:
    """One disk of a source as qemu-img sees it (plain classes here, not dataclasses: cheaper to import)."""

    def __init__(self, label: str, ref: ImageRef, info: dict[str, Any], chain: list[dict[str, Any]],
                 check: qemuimg.CheckResult | None, subformat: str | None, member: str | None = None):
        self.label = label
        self.ref = ref
        self.info = info
        self.chain = chain
        self.check = check
        self.subformat = subformat
        self.member = member            # the tar member name for a disk inside an OVA

    @property
    def virtual_size(self) -> int:
        return int(self.info.get("virtual-size", 0))

    def report(self, required: dict[str, int] | None = None) -> dict[str, Any]:
        fmt = self.ref.format
        specific = (self.info.get("format-specific") or {}).get("data") or {}
        out: dict[str, Any] = {
            "label": self.label,
            "path": self.ref.path,
            "member": self.member,
            "format": DRIVER_TO_NAME.get(fmt, fmt),
            "subformat": self.subformat,
            "virtual_size": self.virtual_size,
            "allocated_size": int(self.info.get("actual-size", 0)) if self.member is None else self.ref.size,
            "cluster_size": self.info.get("cluster-size"),
            "dirty": bool(self.info.get("dirty-flag", False)),
            "extents": [{"filename": e.get("filename"), "format": e.get("format") or None,
                         "virtual_size": e.get("virtual-size"), "compressed": bool(e.get("compressed", False))}
                        for e in specific.get("extents", [])] if fmt == "vmdk" else [],
            "backing_chain": [{"filename": c.get("filename"), "format": c.get("format"),
                               "virtual_size": c.get("virtual-size")} for c in self.chain[1:]],
            "check": self.check.as_dict() if self.check else None,
        }
        if required is not None:
            out["required_size"] = required
        return out


def _vmdk_descriptor_extents(text: str, what: str) -> list[tuple[str, int | None]]:
    """The extent files a descriptor names, each with the bytes it must hold when it is a flat extent (its
    sectors from its offset on), None for a sparse one; `what` names the descriptor in errors."""
    extents = []
    limit = MAX_DISK_CAPACITY // 512
    for line in text.splitlines():
        m = re.match(r'^\s*(RW|RDONLY|NOACCESS)\s+([0-9]+)\s+(\w+)\s+"([^"]*)"(?:\s+([0-9]+))?', line)
        if not m or m.group(3).upper() == "ZERO":
            continue
        needed = None
        if m.group(3).upper() in ("FLAT", "VMFS"):
            sectors = _whole_number(m.group(2), "an extent size in sectors", what, limit)
            needed = (_whole_number(m.group(5), "an extent offset in sectors", what, limit) + sectors) * 512
        extents.append((m.group(4), needed))
    return extents


def _check_vmdk_descriptor(fd: int, path: str, size: int, reader_uid: int | None = None) -> None:
    """Extents of a text descriptor must be present, regular, non-symlinked files next to it, and (with
    reader_uid, see load_source) ones the submitter may read: checked as them before root looks at them."""
    if size > MAX_DESCRIPTOR:
        # Its extents would go unchecked, a flat one cut short among them.
        raise _invalid(f"the VMDK descriptor {path} is larger than 16 MiB; a descriptor is a short text file, and "
                       "one this large is refused")
    text = os.pread(fd, size, 0).decode("utf-8", errors="replace")
    directory = os.path.dirname(path)
    wanted: dict[str, int] = {}     # name -> the most bytes a line naming it asks of it (0: a sparse extent)
    for name, needed in _vmdk_descriptor_extents(text, f"the VMDK descriptor {path}"):
        wanted[name] = max(wanted.get(name, 0), needed or 0)
    files = [(_local_file(directory, name, "the VMDK extent"), name) for name in wanted]
    for name, extent_fd, found in _open_each_referenced(files, directory, "the VMDK extent", reader_uid):
        os.close(extent_fd)
        needed = wanted[name]
        if found.size < needed:
            # qemu reads past the end of a flat extent as zeros: a copy cut short would convert "successfully".
            raise _invalid(f"the VMDK extent {name!r} holds {found.size} bytes where its descriptor {path} says "
                           f"{needed}: the copy is incomplete")


def _inside(path: str, directory: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(directory)
    return real == root or real.startswith(root.rstrip("/") + "/")


def _has_protocol(name: str) -> bool:
    """Whether qemu reads `name` as "protocol:rest" (json:{...}, nbd://..., file:x, host_device:x) rather than
    as a file name: its rule is a colon before the first slash."""
    colon, slash = name.find(":"), name.find("/")
    return colon >= 0 and (slash < 0 or colon < slash)


def _refuse_external_data(chain: list[dict[str, Any]], label: str) -> None:
    """A qcow2 external data file can name any file on the host; it is not vetted, so it is refused."""
    for element in chain:
        data_file = ((element.get("format-specific") or {}).get("data") or {}).get("data-file")
        if data_file:
            raise OperationError("PERMISSION_DENIED", f"{label} keeps its data in an external file "
                                 f"({str(data_file)[:200]}); such images are refused")


def _chain_files(chain: list[dict[str, Any]], label: str) -> list[str]:
    """Every file the images of a backing chain make qemu open: the images and their VMDK extents.

    Refuses a backing file named with a protocol prefix, as written in the image (a json: backing file,
    for one, can name any file on the host), and any file qemu does not report by its absolute path: qemu
    makes plain relative names absolute, so a relative one came through a protocol (file:x is opened
    relative to the worker's directory, not the image's). Refuses a name with a ".." in it too: the kernel follows
    a symlink before the "..", so the file qemu opens is not the one the name, made plain, names."""
    files = []
    for element in chain:
        written = element.get("backing-filename") or ""
        if _has_protocol(written) or ".." in written.split("/"):
            raise OperationError("PERMISSION_DENIED", f"{label} refers to {written[:200]!r}, which is not a plain "
                                 "file name; such images are refused")
        files.append(element.get("filename", ""))
        for extent in ((element.get("format-specific") or {}).get("data") or {}).get("extents", []):
            files.append(extent.get("filename", ""))
    for name in files:
        if name and (not os.path.isabs(name) or ".." in name.split("/")):
            raise OperationError("PERMISSION_DENIED", f"{label} refers to {name[:200]!r}, which is not a plain "
                                 "file name; such images are refused")
    return [f for f in files if f]


def load_disk(ref: ImageRef, label: str, identities: list[FileIdentity], check_source: bool = True,
              reader_uid: int | None = None) -> Disk:
    """qemu-img's view of one disk, refusing files outside its directory and damaged images, and (with
    reader_uid, see load_source) files it leads to that the submitter may not read."""
    # `qemu-img check` runs alongside `info`: both only read, and each costs a qemu-img start on every job.
    # It opens no file that info does not open too (info follows the backing chain before it is vetted).
    checking = Background(lambda: qemuimg.check(ref, force_share=True)) \
        if check_source and ref.format in CHECKABLE else None
    try:
        return _load_disk(ref, label, identities, checking, reader_uid)
    except Exception:
        if checking is not None:
            checking.wait()      # the job goes on to fail: no qemu-img left behind. (Stopped does not wait:
        raise                    # the worker ends at once, and systemd ends what is left in its unit.)


def _load_disk(ref: ImageRef, label: str, identities: list[FileIdentity], checking: Background | None,
               reader_uid: int | None) -> Disk:
    if ref.format == "vhdx" and _vhdx_has_parent(ref, identities):
        # qemu does not read one (its parent locator), and would only say "Operation not supported".
        raise OperationError("UNSUPPORTED", f"{label} ({ref.describe()}) is a differencing VHDX (a Hyper-V "
                             "checkpoint, .avhdx); merge the checkpoint in Hyper-V (delete the checkpoint, or "
                             "Merge-VHD), or convert the merged disk")
    if ref.format == "vdi" and _vdi_has_parent(ref, identities):
        # qemu reads none (its parent is known by UUID alone, to VirtualBox), and would only say "unsupported
        # VDI image (non-NULL link UUID)".
        raise OperationError("UNSUPPORTED", f"{label} ({ref.describe()}) is a differencing VDI (a VirtualBox "
                             "snapshot of another disk); merge the snapshot in VirtualBox (delete it, or copy the "
                             "current state with VBoxManage clonemedium), or convert the merged disk")
    if ref.format == "vmdk":
        _refuse_unreachable_parent(ref, label, identities, reader_uid)
    chain = _qemu_view(ref, label)
    _refuse_external_data(chain, label)
    if ref.offset is None:
        directory = os.path.dirname(ref.path)
        for name in _chain_files(chain, label):
            full = os.path.abspath(name)        # _chain_files: every name is absolute
            if full == ref.path:
                continue
            if not reader_uid and not _inside(full, directory):
                # Root's own job: said at once. For a submitter, only once they are known to see the file.
                raise OperationError("PERMISSION_DENIED", f"{label} refers to {name}, outside its directory "
                                     f"{directory}; such images are refused")
            fd, ident = _open_referenced(full, directory, name, f"the backing or extent file of {label}",
                                         reader_uid)
            os.close(fd)
            identities.append(ident)
    elif len(chain) > 1:
        raise OperationError("UNSUPPORTED", f"{label} inside the OVA has a backing file; only self-contained "
                             "disks are supported in an OVA")
    info = chain[0]
    subformat = None
    if ref.format == "vmdk":
        subformat = ((info.get("format-specific") or {}).get("data") or {}).get("create-type")
        if ref.offset is not None and subformat not in ("streamOptimized", "monolithicSparse"):
            raise OperationError("UNSUPPORTED", f"{label} inside the OVA is a {subformat} VMDK; an OVA disk must "
                                 "be a single-file VMDK")
    elif ref.format == "vpc":
        footer = _vpc_footer(ref, identities)
        subformat = _vhd_type(footer)
        if subformat == "differencing":
            # qemu reads a differencing VHD (a Hyper-V checkpoint, .avhd) as if it stood alone, without its
            # parent: the conversion would succeed with every block the parent holds left zero.
            raise OperationError("UNSUPPORTED", f"{label} ({ref.describe()}) is a differencing VHD (a checkpoint "
                                 "of another disk); merge the checkpoint in Hyper-V, or convert the merged disk")
        if _vhd_current_size(footer) > int(info.get("virtual-size", 0)):
            # qemu sizes a VHD from another creator than Hyper-V, Disk2vhd, XenServer or a recent qemu
            # (VirtualBox, Virtual PC, an older qemu) by the CHS geometry in its footer, which rounds down: the
            # copy would lose the disk's last sectors, a GPT's backup header with them. The footer's current
            # size loses nothing; where the guest saw the CHS size (Virtual PC), it only adds zero sectors.
            ref = ref._replace(options=(("force_size_calc", "current_size"),))
            chain = _qemu_view(ref, label)
            info = chain[0]
    result = None
    if checking is not None:
        result = checking.result()
        if not result.usable:
            raise _invalid(f"{label} ({ref.describe()}) is damaged: {result.message}")
    disk = Disk(label, ref, info, chain, result, subformat)
    refuse_incomplete(disk, result, identities)
    _refuse_incomplete_backing(chain, label, identities, reader_uid)
    return disk


def _refuse_incomplete_backing(chain: list[dict[str, Any]], label: str, identities: list[FileIdentity],
                               reader_uid: int | None) -> None:
    """The checks a disk's own file gets (its VMDK descriptor's extents, `qemu-img check`, refuse_incomplete), on
    each file of its backing chain: qemu reads a base cut short as zeros too, and the checks of the top image
    never look at its base. Whatever load_disk's check_source says: a caller that checks a disk itself checks
    its top image only. Each file was vetted by _load_disk (recorded in `identities`); root reads one again only
    through _reopen, and qemu-img runs with the submitter's rights."""
    for element in chain[1:]:
        path, fmt = os.path.abspath(element.get("filename", "")), element.get("format", "")
        base_label = f"the backing file {os.path.basename(path)} of {label}"
        if fmt == "vmdk":
            fd = _reopen(path, identities)
            try:
                if not os.pread(fd, 4, 0).startswith((b"KDMV", b"COWD")):
                    _check_vmdk_descriptor(fd, path, os.fstat(fd).st_size, reader_uid)
            finally:
                os.close(fd)
        base = ImageRef(path, fmt)
        checked = qemuimg.check(base, force_share=True) if fmt in CHECKABLE else None
        if checked is not None and not checked.usable:
            raise _invalid(f"{base_label} ({path}) is damaged: {checked.message}")
        refuse_incomplete(Disk(base_label, base, element, [element], checked, None), checked, identities)


def _qemu_view(ref: ImageRef, label: str) -> list[dict[str, Any]]:
    """`qemu-img info` of the image and its backing chain, the image first; INVALID_IMAGE if qemu cannot read it."""
    try:
        chain = qemuimg.info(ref, backing_chain=True)
    except qemuimg.QemuImgError as e:
        raise _invalid(f"{label} ({ref.describe()}) is not a readable {DRIVER_TO_NAME.get(ref.format, ref.format)} "
                       f"image: {e.message.split(': ', 1)[-1]}") from None
    return chain if isinstance(chain, list) else [chain]


def _reopen(path: str, identities: list[FileIdentity], phase: str = "") -> int:
    """A descriptor of a file opened (and recorded in `identities`) before, opened again by its name for a look
    of our own: SOURCE_CHANGED unless it is still that regular file, with one message whatever is found there
    instead. Root reads it, and the submitter may change the directories on its way meanwhile."""
    known = next((i for i in identities if i.path == path), None)
    changed = OperationError("SOURCE_CHANGED", f"{path} was moved, removed or replaced while it was read", phase)
    # The whole identity, not only the inode: one freed and reused by a new file must not pass for the old.
    return _open_known(path, lambda st: known is None or FileIdentity.of(path, st) == known, changed)


def _vpc_footer(ref: ImageRef, identities: list[FileIdentity]) -> bytes | None:
    """The VHD footer qemu goes by: the copy at the start of a dynamic VHD, else the footer at the end."""
    start = ref.offset or 0
    fd = _reopen(ref.path, identities)
    try:
        end = start + (ref.size or 0) if ref.offset is not None else os.fstat(fd).st_size
        for position in (start, end - 512):
            footer = os.pread(fd, 512, position) if position >= start else b""
            if footer.startswith(b"conectix"):
                return footer
    finally:
        os.close(fd)
    return None


# The VHDX format's GUIDs of its metadata region and of its File Parameters item, as the file stores them.
_VHDX_METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
_VHDX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
_VHDX_REGION_TABLE = 192 * 1024
_VHDX_HAS_PARENT = 2


def _vhdx_has_parent(ref: ImageRef, identities: list[FileIdentity]) -> bool:
    """Whether a VHDX says it has a parent (HasParent in its File Parameters): a differencing VHDX, as a Hyper-V
    checkpoint (.avhdx) is. A VHDX whose tables cannot be read: False, and qemu-img says what is wrong."""
    start = ref.offset or 0
    fd = _reopen(ref.path, identities)
    try:
        # Offsets are the file's own 64-bit numbers: one past its end (2^64 - 1) is no offset to read at.
        end = start + ref.size if ref.size is not None else os.fstat(fd).st_size
        metadata_at = _vhdx_lookup(fd, start + _VHDX_REGION_TABLE, end, b"regi", "<I", 8, 16, _VHDX_METADATA_REGION,
                                   "<Q")
        if metadata_at is None:
            return False
        item_at = _vhdx_lookup(fd, start + metadata_at, end, b"metadata", "<H", 10, 32, _VHDX_FILE_PARAMETERS, "<I")
        if item_at is None or start + metadata_at + item_at + 8 > end:
            return False
        parameters = os.pread(fd, 8, start + metadata_at + item_at)
        return len(parameters) == 8 and bool(struct.unpack_from("<I", parameters, 4)[0] & _VHDX_HAS_PARENT)
    finally:
        os.close(fd)


def _vhdx_lookup(fd: int, at: int, end: int, magic: bytes, count_format: str, count_at: int, first: int,
                 guid: bytes, value_format: str) -> int | None:
    """In the VHDX region or metadata table at `at` (starting with `magic`, its entry count at `count_at`, its
    32-byte entries from `first`), the value right after the GUID of the entry that starts with `guid`; None when
    the table or the entry is not there before `end`, where the image ends."""
    table = os.pread(fd, min(64 * 1024, end - at), at) if at < end else b""
    if len(table) < first or not table.startswith(magic):
        return None
    (count,) = struct.unpack_from(count_format, table, count_at)
    for entry in range(first, min(first + 32 * count, len(table) - 31), 32):
        if table[entry:entry + 16] == guid:
            return struct.unpack_from(value_format, table, entry + 16)[0]
    return None


# What qemu reads of a VMDK's descriptor to find its parent (its DESC_SIZE).
_VMDK_DESCRIPTOR_READ = 20 * 512


def _vmdk_parent_hint(ref: ImageRef, identities: list[FileIdentity]) -> str:
    """The parent a VMDK snapshot delta or linked clone names (parentFileNameHint), as qemu finds it in the
    descriptor; "" for a VMDK without a parent."""
    start = ref.offset or 0
    fd = _reopen(ref.path, identities)
    try:
        end = start + ref.size if ref.size is not None else os.fstat(fd).st_size
        header = os.pread(fd, 36, start)
        at = start
        if header[:4] == b"KDMV" and len(header) == 36:
            # A sparse extent holds its descriptor at the sector its header gives; a descriptor file is one.
            at += 512 * struct.unpack_from("<Q", header, 28)[0]
        descriptor = os.pread(fd, min(_VMDK_DESCRIPTOR_READ, end - at), at) if at < end else b""
    finally:
        os.close(fd)
    found = re.search(rb'parentFileNameHint="([^"]*)"', descriptor.split(b"\0", 1)[0])
    return found.group(1).decode("utf-8", "replace") if found else ""


def _refuse_unreachable_parent(ref: ImageRef, label: str, identities: list[FileIdentity],
                               reader_uid: int | None) -> None:
    """UNSUPPORTED for a VMDK whose parent qemu cannot open, which would only say "Unknown protocol 'C'" or "No
    such file or directory". VMware Workstation on Windows names a linked clone's parent by its full path
    ("C:\\VMs\\Base\\Base.vmdk"); a missing one is looked for as the submitter (see _present)."""
    hint = _vmdk_parent_hint(ref, identities)
    if not hint:
        return
    if re.match(r"[A-Za-z]:", hint) or "\\" in hint:
        problem = "a Windows path, which cannot be opened here"
    elif ref.offset is None and not _has_protocol(hint) \
            and not _present(os.path.join(os.path.dirname(ref.path), hint), reader_uid):
        problem = "which does not exist"
    else:
        return          # qemu opens it: its backing chain is vetted as any other
    raise OperationError("UNSUPPORTED", f'{label} ({ref.describe()}) is a VMDK snapshot or linked clone whose parent '
                         f'disk is "{hint[:200]}", {problem}; consolidate it in VMware (delete its snapshots, or make '
                         "a full clone), or put the parent next to it and give its file name in parentFileNameHint")


# VDI 1.1, the only version qemu reads; a differencing image's type.
_VDI_VERSION_1_1 = 0x00010001
_VDI_DIFFERENCING = 4


def _vdi_has_parent(ref: ImageRef, identities: list[FileIdentity]) -> bool:
    """Whether a VDI's header says it is a differencing image, as a VirtualBox snapshot is: by its image type (at
    0x4c), or by the UUIDs of its parent (the link UUID at 0x1a8, the parent's modification at 0x1b8), which qemu
    refuses when set."""
    fd = _reopen(ref.path, identities)
    try:
        header = os.pread(fd, 0x1C8, ref.offset or 0)
    finally:
        os.close(fd)
    if len(header) < 0x1C8 or struct.unpack_from("<I", header, 0x44)[0] != _VDI_VERSION_1_1:
        return False
    return struct.unpack_from("<I", header, 0x4C)[0] == _VDI_DIFFERENCING or any(header[0x1A8:0x1C8])


def _vhd_current_size(footer: bytes | None) -> int:
    """The disk size a VHD footer states (its current size), in whole sectors as qemu takes it; 0 if none."""
    if not footer or len(footer) < 56:
        return 0
    return struct.unpack_from(">Q", footer, 48)[0] // 512 * 512


def refuse_incomplete(disk: Disk, checked: qemuimg.CheckResult | None, identities: list[FileIdentity]) -> None:
    """INVALID_IMAGE for a copy cut short (an interrupted transfer): qemu reads past the end of an image file as
    zeros, so it would convert "successfully", with zeros where its last blocks were. qemu itself refuses a
    VHD or VHDX whose blocks lie past its end, and qemu-img check a qcow2 or sparse VMDK missing a whole cluster
    (grain); nothing notices a VDI cut anywhere, nor a qcow2 or VMDK cut within its last cluster (checked: the
    disk's qemu-img check, which tells where a qcow2 ends; without it a qcow2 is not looked at)."""
    ref, label, info = disk.ref, disk.label, disk.info
    if ref.format not in ("vdi", "qcow2", "vmdk"):
        return
    fd = _reopen(ref.path, identities)
    try:
        start = ref.offset or 0
        present = os.fstat(fd).st_size - start
        if ref.offset is not None:
            present = min(present, ref.size or 0)
        needed = _vdi_data_end(fd, start, present) if ref.format == "vdi" else 0
    finally:
        os.close(fd)
    if ref.format == "qcow2":
        # The check counts the clusters in use up to image-end-offset. A file ending before it may also just
        # end in a compressed cluster (shorter than a cluster): only then is qemu's map asked where data ends.
        end = int(((checked.details if checked else None) or {}).get("image-end-offset") or 0)
        needed = qemuimg.data_end(ref) if end > present else 0
    elif ref.format == "vmdk":
        # A sparse VMDK's file holds whole grains: one ending within a grain may have been cut there, and only
        # then is qemu's map asked.
        extents = ((info.get("format-specific") or {}).get("data") or {}).get("extents") or []
        single = len(extents) == 1 and extents[0].get("filename") == info.get("filename")
        if not single and ref.offset is None:
            _refuse_cut_extent(ref, label, extents, identities)
            return
        grain = int(extents[0].get("cluster-size") or 0) if single and not extents[0].get("compressed") else 0
        needed = qemuimg.data_end(ref) if grain and present % grain else 0
    if needed > present:
        tables = {"vdi": "block map places", "qcow2": "cluster tables place", "vmdk": "grain tables place"}
        raise _invalid(f"{label} ({ref.describe()}) holds {present} bytes where its {tables[ref.format]} data up to "
                       f"byte {needed}: the copy is incomplete")


def _refuse_cut_extent(ref: ImageRef, label: str, extents: list[dict[str, Any]], identities: list[FileIdentity]
                       ) -> None:
    """refuse_incomplete() of a VMDK whose descriptor names its extent files: a split one (twoGbMaxExtentSparse,
    VMware Workstation's default) has one sparse extent file per 2 GiB, each of whole grains."""
    directory = os.path.dirname(ref.path)
    sizes: list[int] = []
    suspects: dict[int, tuple[str, int]] = {}     # extent index -> (file, its size), for those ending mid-grain
    for index, extent in enumerate(extents):
        sizes.append(int(extent.get("virtual-size") or 0))
        grain = int(extent.get("cluster-size") or 0)
        if extent.get("format") != "SPARSE" or not grain or extent.get("compressed"):
            continue
        path = os.path.abspath(os.path.join(directory, str(extent.get("filename") or "")))
        fd = _reopen(path, identities)
        try:
            present = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if present % grain:
            suspects[index] = (path, present)
    if not suspects:
        return
    needed = qemuimg.extent_data_ends(ref, sizes)
    for index, (path, present) in suspects.items():
        if needed[index] > present:
            raise _invalid(f"{label} ({ref.describe()}): its extent file {os.path.basename(path)} holds {present} "
                           f"bytes where its grain tables place data up to byte {needed[index]}: the copy is "
                           "incomplete")


# Block map entries from this value on (discarded, unallocated) place no block in the file.
_VDI_NO_BLOCK = 0xFFFFFFFE
_VDI_MAP_CHUNK = 256 * 1024


def _vdi_data_end(fd: int, start: int, present: int) -> int:
    """Where the last block a VDI's block map places in its file ends (counted from the image's start at
    `start`; `present`: the bytes the file holds from there). From the header, without a qemu-img run."""
    # qemu reads VDI 1.1 headers only: the block map's and the data's offsets at 0x154, the disk size at 0x170
    # and the block size at 0x178, little-endian.
    header = os.pread(fd, 0x188, start)
    if len(header) < 0x188:
        return 0x188
    map_offset, data_offset = struct.unpack_from("<II", header, 0x154)
    disk_size, block_size = struct.unpack_from("<QI", header, 0x170)
    if not block_size:
        return 0
    blocks = -(-disk_size // block_size)
    map_end = map_offset + 4 * blocks
    if map_end > present:
        return map_end          # the block map itself is cut short
    last, last_index = -1, 0
    for first in range(0, blocks, _VDI_MAP_CHUNK):
        count = min(_VDI_MAP_CHUNK, blocks - first)
        chunk = os.pread(fd, 4 * count, start + map_offset + 4 * first)
        if len(chunk) < 4 * count:
            raise OperationError("SOURCE_CHANGED", "the VDI became shorter while its block map was read")
        entries = struct.unpack(f"<{count}I", chunk)
        highest = max((entry for entry in entries if entry < _VDI_NO_BLOCK), default=-1)
        if highest > last:
            last, last_index = highest, first + entries.index(highest)
    if last < 0:
        return map_end
    # Block `last` holds virtual block last_index; the disk's last block may be partly beyond its size.
    return data_offset + last * block_size + min(block_size, disk_size - last_index * block_size)


def required_sizes(disk: Disk, options: dict[str, Any] | None = None) -> dict[str, int]:
    """Bytes a sparse qcow2 / sparse raw / full raw copy needs.

    qemu-img measure counts every block some drivers (VDI, VHD, VHDX) report as allocated, even when
    `qemu-img map` knows them to be zero; the data map plus qcow2's worst-case metadata is then the
    tighter (and still safe) bound.
    """
    measured = qemuimg.measure(disk.ref, "qcow2", options)
    data = qemuimg.data_bytes(disk.ref)
    metadata = max(measured["fully-allocated"] - disk.virtual_size, 0)
    return {"qcow2": min(measured["required"], data + metadata), "raw": min(data, disk.virtual_size),
            "raw_full": disk.virtual_size}


# ---------------------------------------------------------------- OVF, manifest, VMX

def _ln(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(element: ET.Element, name: str) -> str | None:
    for key, value in element.attrib.items():
        if _ln(key) == name:
            return value
    return None


def _child_text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if _ln(child.tag) == name:
            return (child.text or "").strip()
    return None


def _units(text: str | None) -> int:
    """Multiplier of an OVF allocation unit ("byte * 2^20", "MegaBytes", ...)."""
    if not text:
        return 1
    t = text.replace(" ", "").lower()
    if m := re.fullmatch(r"byte\*2\^([0-9]+)", t):
        exponent = m.group(1)
        if len(exponent) > 2 or int(exponent) > _MAX_UNIT_EXPONENT:
            raise _invalid(f"the OVF descriptor gives an allocation unit of 2^{_shown(exponent)} bytes; "
                           f"at most 2^{_MAX_UNIT_EXPONENT} is understood")
        return 2 ** int(exponent)
    return {"byte": 1, "bytes": 1, "kilobytes": 2**10, "megabytes": 2**20, "gigabytes": 2**30,
            "kb": 2**10, "mb": 2**20, "gb": 2**30}.get(t, 1)


def _parse_xml_without_dtd(data: bytes, what: str) -> ET.Element:
    """The element tree of an XML document that has no DOCTYPE: INVALID_IMAGE for one that declares any
    (entities expanding to gigabytes, external entities naming host files). The parser itself refuses it, in
    whatever encoding the document is written (a byte search would miss a UTF-16 one)."""
    import xml.etree.ElementTree as ET
    from xml.parsers import expat

    def refuse(*_: Any) -> None:
        """Stop the parser at the first declaration."""
        raise _invalid(f"{what} declares a DOCTYPE or entities, which are refused")

    def qualified(name: str) -> str:
        """ElementTree's "{uri}local" for expat's "uri}local"."""
        return "{" + name if "}" in name else name

    builder = ET.TreeBuilder()
    counted = {"elements": 0, "attributes": 0}

    def start(tag: str, attributes: dict[str, str]) -> None:
        """Build the element, refusing a document of more elements or attributes than any OVF has."""
        counted["elements"] += 1
        counted["attributes"] += len(attributes)
        for kind, limit in (("elements", MAX_XML_ELEMENTS), ("attributes", MAX_XML_ATTRIBUTES)):
            if counted[kind] > limit:
                raise _invalid(f"{what} holds more than {limit} {kind}, which is refused")
        builder.start(qualified(tag), {qualified(key): value for key, value in attributes.items()})

    parser = expat.ParserCreate(namespace_separator="}")
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: builder.end(qualified(tag))
    parser.CharacterDataHandler = builder.data
    parser.buffer_text = True
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise _invalid(f"{what} is not valid XML: {e}") from None
    return builder.close()


def _refuse_oversized(vm: dict[str, Any], what: str) -> None:
    """INVALID_IMAGE for a VM description that would put more in the report than any real VM has: more than
    MAX_VM_DISKS disks or MAX_VM_NICS NICs, or a value (name, guest OS, file name, network...) longer than
    MAX_VM_TEXT characters. Refused rather than cut short: a conversion must not go on with a VM other than
    the one described, nor its report tell a name the VM does not have."""
    _refuse_too_many(vm["disks"], MAX_VM_DISKS, "disks", what)
    _refuse_too_many(vm["nics"], MAX_VM_NICS, "NICs", what)
    values = list(vm.items())
    for group, label in (("disks", "disk"), ("nics", "NIC")):
        for number, device in enumerate(vm[group], 1):
            values += [(f"{label} {number}'s {key}", value) for key, value in device.items()]
    for field, value in values:
        if isinstance(value, str) and len(value) > MAX_VM_TEXT:
            raise _invalid(f"{what} gives a {field} of {len(value)} characters; values longer than {MAX_VM_TEXT} "
                           "characters are refused")


def _whole_number(text: str | None, field: str, what: str, limit: int, default: int = 0) -> int:
    """A count or size a descriptor gives (`default` if it gives none); INVALID_IMAGE for one that is not a whole
    number or is above `limit`."""
    text = (text or "").strip()
    if not text:
        return default
    if not (text.isascii() and text.isdigit()):
        # Not quoted: the message is public (the job's Error), and the file may be its submitter's alone.
        raise _invalid(f"{what} gives {field} a value that is not a whole number ({len(text)} characters)")
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(limit)) or int(digits) > limit:
        raise _invalid(f"{what} gives {field} {_shown(text)}, more than any VM has (at most {limit})")
    return int(digits)


def _hint_number(text: str | None, limit: int) -> int:
    """A number a descriptor gives only as a hint (cores per socket, a disk's unit on its controller: the VM runs
    the same without it), 0 as if it gave none where it is not a whole number up to `limit`: without cores per
    socket, the domain puts all the cores in one socket (domain._cores)."""
    try:
        return _whole_number(text, "a hint", "the descriptor", limit)
    except OperationError:      # its message is for nobody
        return 0


def _shown(text: str) -> str:
    """A value for a message: as it is if short, else by its length only."""
    return repr(text) if len(text) <= 40 else f"of {len(text)} characters"


def _refuse_too_many(items: list[Any] | dict[str, Any], limit: int, kind: str, what: str) -> None:
    """INVALID_IMAGE once a descriptor lists more than `limit` `kind` (checked as they are gathered, so that no
    work grows with a crafted count)."""
    if len(items) > limit:
        raise _invalid(f"{what} lists more than {limit} {kind}, which is refused")


def parse_ovf(data: bytes) -> dict[str, Any]:
    """VM name, CPUs, memory, firmware, disks in order and NICs from an OVF descriptor, within the bounds of
    _refuse_oversized(); one with a DOCTYPE is refused."""
    if len(data) > MAX_DESCRIPTOR:
        raise _invalid("the OVF descriptor is larger than 16 MiB")
    what = "the OVF descriptor"
    root = _parse_xml_without_dtd(data, what)
    if _ln(root.tag) != "Envelope":
        raise _invalid("the OVF descriptor has no Envelope element")
    files: dict[str, dict[str, Any]] = {}
    disks: dict[str, dict[str, Any]] = {}
    for el in root.iter():
        name = _ln(el.tag)
        if name == "File" and _attr(el, "id"):
            files[_attr(el, "id") or ""] = {"href": _attr(el, "href"), "size": _attr(el, "size"),
                                           "compression": _attr(el, "compression"),
                                           "chunk_size": _attr(el, "chunkSize")}
        elif name == "Disk" and _attr(el, "diskId"):
            capacity = (_whole_number(_attr(el, "capacity"), "a disk capacity", what, MAX_DISK_CAPACITY)
                        * _units(_attr(el, "capacityAllocationUnits")))
            if capacity > MAX_DISK_CAPACITY:
                raise _invalid(f"{what} gives a disk capacity of {capacity} bytes, more than any disk has "
                               f"(at most {MAX_DISK_CAPACITY})")
            disks[_attr(el, "diskId") or ""] = {"id": _attr(el, "diskId"), "file_ref": _attr(el, "fileRef"),
                                                "capacity": capacity, "format": _attr(el, "format")}
            _refuse_too_many(disks, MAX_VM_DISKS, "disks", what)
    system = next((el for el in root.iter() if _ln(el.tag) == "VirtualSystem"), root)
    vm_name = _child_text(system, "Name") or _attr(system, "id") or ""
    cpus, cores_per_socket, memory_mib, firmware = 1, 0, 0, "bios"
    ordered: list[str] = []
    nics: list[dict[str, Any]] = []
    items = [el for el in system.iter() if _ln(el.tag) in ("Item", "StorageItem", "EthernetPortItem")]
    # Where each disk sits (controller kind, controller, unit): the lowest is the disk the VM boots from.
    controllers = {_child_text(item, "InstanceID"): (_controller_rank(item), position)
                   for position, item in enumerate(items)
                   if _child_text(item, "ResourceType") in _OVF_CONTROLLER_RANK}
    placement: dict[str, tuple[int, int, int]] = {}
    for item in items:
        kind = _child_text(item, "ResourceType")
        if kind == "3":
            cpus = _whole_number(_child_text(item, "VirtualQuantity"), "a number of CPUs", what, MAX_VM_CPUS, 1)
            cores_per_socket = _hint_number(_child_text(item, "CoresPerSocket"), MAX_VM_CPUS)
        elif kind == "4":
            quantity = _whole_number(_child_text(item, "VirtualQuantity"), "an amount of memory", what,
                                     MAX_VM_MEMORY_MIB * 2**20)
            memory_mib = quantity * _units(_child_text(item, "AllocationUnits") or "byte * 2^20") // 2**20
            if memory_mib > MAX_VM_MEMORY_MIB:
                raise _invalid(f"{what} gives an amount of memory of {memory_mib} MiB, more than any VM has "
                               f"(at most {MAX_VM_MEMORY_MIB})")
        elif kind == "17":
            host = _child_text(item, "HostResource") or ""
            ref = host.rsplit("/", 1)[-1]
            if ref in disks and ref not in ordered:
                ordered.append(ref)
            elif ref in files:   # "ovf:/file/<id>": a disk given by file only
                disks.setdefault(ref, {"id": ref, "file_ref": ref, "capacity": 0, "format": None})
                ordered.append(ref)
            else:
                continue
            _refuse_too_many(ordered, MAX_VM_DISKS, "disks", what)
            unit = _hint_number(_child_text(item, "AddressOnParent"), MAX_VM_DISKS)
            placement[ref] = (*controllers.get(_child_text(item, "Parent"), (_UNKNOWN_CONTROLLER, 0)), unit)
        elif kind == "10":
            nics.append({"name": _child_text(item, "ElementName"), "model": _child_text(item, "ResourceSubType"),
                         "network": _child_text(item, "Connection"), "mac": _child_text(item, "Address")})
            _refuse_too_many(nics, MAX_VM_NICS, "NICs", what)
    ordered += [d for d in disks if d not in ordered]
    secure_boot = False
    for el in root.iter():
        key, value = (_attr(el, "key") or "").lower(), (_attr(el, "value") or "").lower()
        if _ln(el.tag) == "Config" and key == "firmware":
            firmware = "uefi" if value == "efi" else "bios"
        elif _ln(el.tag) == "Config" and key == "bootoptions.efisecurebootenabled":
            secure_boot = value == "true"
        elif _ln(el.tag) == "Firmware" and (_attr(el, "type") or "").upper() == "EFI":
            firmware = "uefi"
    tpm = any("vtpm" in (_child_text(item, "ResourceSubType") or "").lower() for item in items)
    os_section = next((el for el in system.iter() if _ln(el.tag) == "OperatingSystemSection"), None)
    guest_os = ""
    if os_section is not None:
        guest_os = _attr(os_section, "osType") or _child_text(os_section, "Description") or ""
    disk_list = []
    for disk_id in ordered:
        disk = disks[disk_id]
        file = files.get(disk.get("file_ref") or "", {})
        disk_list.append({**disk, "href": file.get("href"), "compression": file.get("compression"),
                          "chunk_size": file.get("chunk_size")})
    placed = [placement[d] for d in ordered if d in placement]
    boot_disk = ordered.index(next(d for d in ordered if placement.get(d) == min(placed))) if placed else 0
    vm = {"name": vm_name, "cpus": cpus, "cores_per_socket": cores_per_socket, "memory_mib": memory_mib,
          "firmware": firmware,
          "secure_boot": firmware == "uefi" and secure_boot, "tpm": tpm,
          "guest_os": guest_os, "boot_disk": boot_disk, "disks": disk_list, "nics": nics}
    _refuse_oversized(vm, what)
    return vm


# OVF ResourceType of disk controllers, ranked as parse_vmx ranks them: SCSI, SATA and NVMe ("other storage",
# told apart by their ResourceSubType), IDE; then disks on a controller the OVF does not describe.
_OVF_CONTROLLER_RANK = {"6": 0, "20": 1, "5": 3}
_UNKNOWN_CONTROLLER = 4


def _controller_rank(item: ET.Element) -> int:
    kind = _child_text(item, "ResourceType") or ""
    if kind == "20" and "nvme" in (_child_text(item, "ResourceSubType") or "").lower():
        return 2
    return _OVF_CONTROLLER_RANK[kind]


_MANIFEST_LINE = re.compile(r"^\s*(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$")


def parse_manifest(text: str) -> dict[str, tuple[str, str]]:
    """{file name: (algorithm, hex digest)} from an OVF manifest; INVALID_IMAGE for one of more than
    MAX_MANIFEST_ENTRIES files or a file name longer than MAX_VM_TEXT (each goes into the report)."""
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        if m := _MANIFEST_LINE.match(line):
            if len(m.group(2)) > MAX_VM_TEXT:
                raise _invalid(f"line {number} of the manifest names a file of more than {MAX_VM_TEXT} characters, "
                               "which is refused")
            sums[m.group(2)] = (m.group(1).lower(), m.group(3).lower())
            _refuse_too_many(sums, MAX_MANIFEST_ENTRIES, "files", "the manifest")
        elif line.strip():
            # Not the line itself: the manifest is read (as root) before its reader's rights are checked.
            raise _invalid(f"line {number} of the manifest is not a checksum")
    return sums


_VMX_ENCODING = re.compile(rb'^[ \t]*\.encoding[ \t]*=[ \t]*"([A-Za-z0-9_.:-]{1,64})"', re.M | re.I)
# The text encodings a .vmx is written in (the code pages of the systems VMware runs on), by Python's names for
# them: a VMX may name any codec Python has, and some are no text encoding at all ("punycode" decodes in
# quadratic time, "undefined" not at all).
_VMX_ENCODINGS = frozenset({
    "utf-8", "ascii", *(f"iso8859-{n}" for n in range(1, 17)), *(f"cp{n}" for n in range(1250, 1259)), "cp874",
    "shift_jis", "cp932", "euc_jp", "euc_kr", "cp949", "gbk", "gb2312", "gb18030", "big5", "big5hkscs", "cp950",
    "koi8-r", "koi8-u", "tis-620"})


def _vmx_text(data: bytes) -> str:
    """A .vmx file's text, decoded as its .encoding line says: VMware Workstation on Windows writes the system's
    code page ("windows-1252", "Shift_JIS", "GBK"...), and a disk named with an accented letter there (0xE9, an
    e-acute in windows-1252) would not be found read as UTF-8. Without the line, or with a name of no text
    encoding VMware writes, UTF-8 (VMware's default); a byte the encoding does not map reads as U+FFFD, and a
    disk whose name holds one is reported missing."""
    declared = _VMX_ENCODING.search(data[:65536])
    encoding = "utf-8"
    if declared:
        try:
            named = codecs.lookup(declared.group(1).decode("ascii")).name
        except LookupError:
            named = ""
        if named in _VMX_ENCODINGS:
            encoding = named
    return data.decode(encoding, "replace")


_VMX_KEY = re.compile(r"[A-Za-z0-9_.:\[\]-]+")


def _vmx_setting(line: str) -> tuple[str, str] | None:
    """(key in lower case, value) of a .vmx line `key = "value"`, None for any other line (a comment, a blank).
    The value loses the blanks around it and one quote at each end, if there. Split by hand: a pattern for the
    same backtracks over a run of blanks inside a value, in time quadratic in its length."""
    name, equals, rest = line.partition("=")
    key = name.strip()
    if not equals or not _VMX_KEY.fullmatch(key):
        return None
    value = rest.lstrip()
    value = (value[1:] if value.startswith('"') else value).rstrip()
    return key.lower(), value[:-1] if value.endswith('"') else value


def parse_vmx(text: str) -> dict[str, Any]:
    """VM name, CPUs, memory, firmware, disks in order and NICs from a .vmx file's key = "value" lines, within
    the bounds of _refuse_oversized()."""
    what = "the VMX file"
    keys: dict[str, str] = {}
    # Read a line at a time (splitlines would make every line first), and only so many.
    for number, line in enumerate(io.StringIO(text, newline=None), 1):
        if number > MAX_VMX_LINES:
            raise _invalid(f"{what} has more than {MAX_VMX_LINES} lines, which is refused")
        setting = _vmx_setting(line)
        if setting:
            keys[setting[0]] = setting[1]
    order = {"scsi": 0, "sata": 1, "nvme": 2, "ide": 3}
    found = []
    for key, value in keys.items():
        m = re.fullmatch(r"(scsi|sata|nvme|ide)([0-9]+):([0-9]+)\.filename", key)
        if not m:
            continue
        device, controller = key.rsplit(".", 1)[0], m.group(1) + m.group(2)
        if keys.get(device + ".present", "true").lower() == "false":
            continue
        # VMware leaves out every disk of a controller that is not present (scsi1.present = "FALSE").
        if keys.get(controller + ".present", "true").lower() == "false":
            continue
        if "cdrom" in keys.get(device + ".devicetype", "").lower() or value.lower().endswith(".iso"):
            continue
        controller_number = _whole_number(m.group(2), "a disk controller number", what, MAX_VM_DISKS)
        unit = _whole_number(m.group(3), "a disk unit number", what, MAX_VM_DISKS)
        found.append(((order[m.group(1)], controller_number, unit), device, value))
        _refuse_too_many(found, MAX_VM_DISKS, "disks", what)
    nics = []
    for key in sorted(k for k in keys if re.fullmatch(r"ethernet\d+\.present", k)):
        dev = key.rsplit(".", 1)[0]
        if keys[key].lower() != "true":
            continue
        nics.append({"name": dev, "model": keys.get(dev + ".virtualdev", "e1000"),
                     "network": keys.get(dev + ".networkname"),
                     "mac": keys.get(dev + ".address") or keys.get(dev + ".generatedaddress")})
        _refuse_too_many(nics, MAX_VM_NICS, "NICs", what)
    devices = [device for _, device, _ in sorted(found)]
    # bios.hddOrder lists the disks the BIOS tries, first the one it boots from ("scsi0:1,scsi0:0"). A UEFI VM
    # boots by its NVRAM's entries instead: a bios.hddOrder there is left over from its BIOS days.
    efi = keys.get("firmware", "").lower() == "efi"
    first = "" if efi else keys.get("bios.hddorder", "").split(",")[0].strip().lower()
    vm = {"name": keys.get("displayname", ""),
          "cpus": _whole_number(keys.get("numvcpus"), "numvcpus", what, MAX_VM_CPUS, 1),
          "cores_per_socket": _hint_number(keys.get("cpuid.corespersocket"), MAX_VM_CPUS),
          "memory_mib": _whole_number(keys.get("memsize"), "memsize", what, MAX_VM_MEMORY_MIB),
          "firmware": "uefi" if efi else "bios",
          "secure_boot": efi and keys.get("uefi.secureboot.enabled", "").lower() == "true",
          "tpm": keys.get("vtpm.present", "").lower() == "true",
          "guest_os": keys.get("guestos", ""), "boot_disk": devices.index(first) if first in devices else 0,
          "disks": [{"id": device, "href": name} for _, device, name in sorted(found)], "nics": nics}
    _refuse_oversized(vm, what)
    return vm


# ---------------------------------------------------------------- a whole source

class Source:
    """A whole source: its kind, its disks in order, the VM's facts and the files that must not change."""

    def __init__(self, kind: str, path: str, format: str, disks: list[Disk], vm: dict[str, Any] | None = None,
                 identities: list[FileIdentity] | None = None, manifest: dict[str, tuple[str, str]] | None = None,
                 to_verify: list[tuple[str, str, int, int]] | None = None, checksum: str | None = None):
        self.kind = kind                        # disk | ova | ovf | vmx
        self.path = path
        self.format = format                    # the top-level format name (vmdk, vhd, ova, ...)
        self.disks = disks
        self.vm = vm
        self.identities = identities if identities is not None else []
        self.manifest = manifest
        # (name, path, offset, size) of every file the manifest covers: checked by verify()
        self.to_verify = to_verify if to_verify is not None else []
        self.checksum = checksum                # image.checksum of the spec ("sha256:<hex>")

    def verify_bytes(self) -> int:
        total = sum(size for _, _, _, size in self.to_verify)
        if self.checksum:
            total += self.identities[0].size
        return total


# path -> "dev:ino" of the file h2kd checked at submission (see expect_source). A worker runs one job.
_EXPECTED_SOURCES: dict[str, str] = {}


def expect_source(path: str, identity: str) -> None:
    """The source at `path` must be the file h2kd checked for the submitter ("dev:ino"). Checked now, by path,
    to fail early; load_source checks its descriptor again before reading a byte (a file swapped in between
    would otherwise be parsed by root). SOURCE_CHANGED otherwise, with one message whatever is found there:
    the lookup is root's, and telling "not found" from "another file" would tell the submitter whether a file
    exists where a symlink swapped into the path leads (a directory closed to them)."""
    path = os.path.abspath(path)
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    _ensure_expected(path, st.st_dev if st else -1, st.st_ino if st else -1, identity)
    _EXPECTED_SOURCES[path] = identity


def _ensure_expected(path: str, device: int, inode: int, expected: str) -> None:
    """SOURCE_CHANGED unless (device, inode) is the "dev:ino" h2kd checked for the submitter."""
    if f"{device}:{inode}" != expected:
        raise _source_replaced(path)


def _source_replaced(path: str) -> OperationError:
    """The one answer for a source that is not the file h2kd checked, whatever is at its path instead."""
    return OperationError("SOURCE_CHANGED", f"the source {path} was moved, removed or replaced after the job "
                          "was submitted; submit it again", "start")


def _open_expected(path: str, expected: str) -> tuple[int, FileIdentity]:
    """open_regular_file() of the source h2kd checked for the submitter ("dev:ino"): root's lookup must find that
    very file before anything of it, or of whatever took its place, is looked at or told."""
    fd = _open_known(path, lambda st: f"{st.st_dev}:{st.st_ino}" == expected, _source_replaced(path), "the image")
    return fd, FileIdentity.of(path, os.fstat(fd))


def load_source(path: str, declared_format: str | None = None, checksum: str | None = None,
                check_disks: bool = True, reader_uid: int | None = None) -> Source:
    """Open and identify a source and its disks (no hashing yet: see verify()).

    reader_uid: the submitter, when not root. h2kd checked that they may read the file they named; every
    other file it leads to (backing files, extents, the disks of an OVF or VMX) must be theirs to read too."""
    path = os.path.abspath(path)
    expected = _EXPECTED_SOURCES.get(path)
    fd, identity = open_regular_file(path) if expected is None else _open_expected(path, expected)
    try:
        if reader_uid:
            # Checked at submission; since then its owner may have closed it (chmod, a group left), and root
            # would read and describe it (a VMX's facts) all the same.
            check_readable_by([identity], reader_uid, "the submitter may no longer read the source")
        head, tail = _read_head_tail(fd, 0, identity.size)
        kind = sniff(head, tail)
        declared = SPEC_TO_DRIVER.get(declared_format or "", declared_format)
        if kind is None:
            kind = _unsigned_format(path, head, tail, declared)
        if declared and declared != kind:
            shown = DRIVER_TO_NAME.get(kind, kind)
            raise _invalid(f"image.format says {declared_format} but the content of {path} is {shown}")
        identities = [identity]
        if kind == "ova":
            source = _load_ova(fd, path, identity.size, identities, check_disks)
        elif kind in ("ovf", "vmx"):
            source = _load_described(fd, path, kind, identity.size, identities, check_disks, reader_uid)
        else:
            if kind == "vmdk" and not head.startswith((b"KDMV", b"COWD")):
                _check_vmdk_descriptor(fd, path, identity.size, reader_uid)
            disk = load_disk(ImageRef(path, kind), os.path.basename(path), identities, check_disks, reader_uid)
            source = Source("disk", path, DRIVER_TO_NAME.get(kind, kind), [disk], None, identities)
    except (ValueError, OverflowError, struct.error) as e:
        # A value in the files that no check above foresaw (UnicodeError is a ValueError): the source is at fault,
        # and a retry would meet the same. Its words are left out: they may quote a file root read.
        raise _invalid(f"the source {path} is damaged or malformed: a value in it cannot be read "
                       f"({type(e).__name__})") from None
    finally:
        os.close(fd)
    source.checksum = checksum
    return source


def check_readable_by(identities: list[FileIdentity], uid: int,
                      problem: str = "the source refers to a file its submitter may not read") -> None:
    """Each of these files must be one `uid` (not root) could read itself; OperationError (`problem`) otherwise."""
    from h2kd.access import check_file_readable, groups_for   # only sources that refer to other files
    from h2kd.errors import H2kError

    gids = groups_for(uid)
    for ident in identities:
        try:
            check_file_readable(ident.path, ident.device, ident.inode, uid, gids)
        except H2kError as e:
            raise OperationError("PERMISSION_DENIED", f"{problem}: {e}") from None


def check_writable_by(identity: FileIdentity, uid: int, problem: str) -> None:
    """The file must be one `uid` (not root) could open for writing itself; OperationError (`problem`) otherwise."""
    from pathlib import Path

    from h2kd.access import check_image_writable, groups_for
    from h2kd.errors import H2kError

    try:
        check_image_writable(Path(identity.path), identity.device, identity.inode, uid, groups_for(uid))
    except H2kError as e:
        raise OperationError("PERMISSION_DENIED", f"{problem}: {e}") from None


def _unsigned_format(path: str, head: bytes, tail: bytes, declared: str | None) -> str:
    """No signature of ours: a raw disk if it looks like one (or is declared so), else refused."""
    try:
        probed = qemuimg.probe_format(path, tail)
    except qemuimg.QemuImgError as e:
        raise _invalid(f"{path} is not a disk image: {e.message}") from None
    if probed != "raw":
        raise OperationError("UNSUPPORTED", f"{path} is a {probed} image, which h2kd does not convert "
                             "(supported: VMDK, VHD, VHDX, VDI, qcow2, raw, OVA, OVF, VMX)")
    if declared != "raw" and path.lower().endswith(".vhd") and tail[1:9] != b"conectix":
        # A fixed VHD is a raw disk and its footer, in its last 512 bytes: cut short, it is a raw disk without
        # its end, and converting it would lose that end. (Virtual PC before 2004 wrote a 511-byte footer,
        # which qemu does not know: such a disk reads as raw, as before.)
        raise _invalid(f"{path} is named as a VHD but has no VHD footer, which a fixed VHD ends with: the copy is "
                       "incomplete (if it is a raw disk, give image.format \"raw\")")
    if declared == "raw" or _has_partition_table(head):
        return "raw"
    raise _invalid(f"{path} is not a disk image: its content matches none of VMDK, VHD, VHDX, VDI, qcow2, OVA, "
                   "OVF or VMX and it has no partition table (give image.format \"raw\" if it is a raw disk)")


def _tar_members(fd: int, path: str, size: int) -> list[tarfile.TarInfo]:
    """The members of the OVA's tar (`size` bytes), each with its offset_data, as tarfile.TarInfo: its headers
    are read one by one with tarfile's own parser, their extended headers (GNU long names, pax records) here.
    tarfile's listing would keep a record of any number of members, read an extended header of any size it claims
    into memory, take pax records in time quadratic in a run of digits, recurse once per extended header in a row,
    and step back to a header it read already over a negative size. INVALID_IMAGE for an archive beyond the
    MAX_TAR_* bounds, with a negative size, or cut short."""
    import tarfile

    members: list[tarfile.TarInfo] = []
    at = extension_bytes = 0
    given: dict[str, Any] = {}          # what the extended headers read since the last member give the next one
    kinds: set[str] = set()
    while True:
        try:
            info = tarfile.TarInfo.frombuf(os.pread(fd, 512, at), "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            if kinds:
                raise _invalid(f"the OVA {path} ends, or is damaged, between a member's extended headers and "
                               "the member") from None
            if at == 0:
                raise _invalid(f"the OVA {path} is not a readable tar archive: {e}") from None
            return members          # as for tarfile, the archive ends at the first block that is no header
        if info.size < 0:
            raise _invalid(f"the OVA {path} has a member {info.name!r} with a negative size; the archive is damaged")
        data_at = at + 512
        if info.type in _TAR_EXTENSIONS:
            kind = _TAR_EXTENSIONS[info.type]
            if kind in kinds:
                raise _invalid(f"the OVA {path} has two extended tar headers of one kind ({kind}) for one member; "
                               "the archive is refused")
            kinds.add(kind)
            if info.size > MAX_TAR_EXTENSION:
                raise _invalid(f"the OVA {path} has an extended tar header ({kind}) of {info.size} bytes; more than "
                               f"{MAX_TAR_EXTENSION // 2**20} MiB is refused")
            extension_bytes += info.size
            if extension_bytes > MAX_TAR_EXTENSIONS:
                raise _invalid(f"the OVA {path} has extended tar headers (long names, pax records) of more than "
                               f"{MAX_TAR_EXTENSIONS // 2**20} MiB in all, which is refused")
            _refuse_past_end(path, "an extended tar header", data_at + info.size, size)
            _take_extension(kind, os.pread(fd, info.size, data_at), given, path)
            at = data_at + -(-info.size // 512) * 512
            continue
        if "name" in given:
            info.name = given["name"].rstrip("/") if info.isdir() else given["name"]
        if len(info.name.encode("utf-8", "surrogateescape")) > MAX_TAR_NAME:
            raise _invalid(f"the OVA {path} has a member whose name is longer than {MAX_TAR_NAME} bytes, which is "
                           "refused")
        if info.type == tarfile.GNUTYPE_SPARSE or given.get("sparse"):
            # Refused in any case (_safe_members); and where the next header starts would take its sparse map.
            raise _invalid(f"the OVA {path} has a member {info.name!r} that is not a plain file")
        info.size = given.get("size", info.size)
        info.offset_data = data_at
        at = data_at
        if info.isreg() or info.type not in tarfile.SUPPORTED_TYPES:     # tarfile's rule: data follows
            _refuse_past_end(path, f"its member {info.name!r}", data_at + info.size, size)
            at += -(-info.size // 512) * 512
        members.append(info)
        _refuse_too_many(members, MAX_TAR_MEMBERS, "members", f"the OVA {path}")
        given, kinds = {}, set()


# The extended header types of tar, by what they are to messages: GNU long names and links, pax records for the
# next member (Solaris's among them) and for all that follow.
_TAR_EXTENSIONS = {b"L": "long name", b"K": "long link name", b"x": "pax", b"X": "pax", b"g": "global pax"}


def _take_extension(kind: str, data: bytes, given: dict[str, Any], path: str) -> None:
    """Note in `given` what an extended header of this kind, holding `data`, gives the next member: a name, a size,
    or that it is sparse. Where two give a name, the first is tarfile's."""
    if kind == "long name":
        given.setdefault("name", data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))
    if not kind.endswith("pax"):
        return
    records = _pax_records(data, path)
    if any(keyword.startswith("GNU.sparse.") for keyword in records):
        given["sparse"] = True
    if kind == "global pax":
        # tar applies them to every member that follows: one name or size for all.
        if records.keys() & {"path", "linkpath", "size"}:
            raise _invalid(f"the OVA {path} has a global pax header giving every member one name or size; the "
                           "archive is refused")
        return
    if "path" in records:
        given.setdefault("name", records["path"].decode("utf-8", "surrogateescape").rstrip("/"))
    if "size" in records:
        value = records["size"]
        if not (value.isdigit() and len(value) <= 20):
            raise _invalid(f"the OVA {path} has a pax header whose size is not a whole number; the archive is damaged")
        given["size"] = int(value)


def _pax_records(data: bytes, path: str) -> dict[str, bytes]:
    """{keyword: value} of the records of a pax header ("<length> <keyword>=<value>\n" each, NULs after them);
    INVALID_IMAGE for one that holds anything else."""
    records: dict[str, bytes] = {}
    position = 0
    while position < len(data):
        space = data.find(b" ", position, position + 21)
        length = data[position:space] if space > position else b""
        if not length.isdigit():            # bytes: ASCII digits only
            if not data[position:].strip(b"\0"):
                break
            raise _invalid(f"the OVA {path} has a malformed pax header; the archive is damaged")
        end = position + int(length)
        keyword, equals, value = data[space + 1:end - 1].partition(b"=")
        if not (equals and keyword) or data[end - 1:end] != b"\n":
            raise _invalid(f"the OVA {path} has a malformed pax header; the archive is damaged")
        records[keyword.decode("utf-8", "surrogateescape")] = value
        position = end
    return records


def _refuse_past_end(path: str, what: str, end: int, size: int) -> None:
    """INVALID_IMAGE if `what` in the OVA ends at byte `end`, past the file's end (`size`): a copy cut short."""
    if end > size:
        raise _invalid(f"the OVA {path} is cut short: {what} ends at byte {end}, past the end of the file "
                       f"({size} bytes)")


def _safe_members(listed: list[tarfile.TarInfo], path: str) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    for member in listed:
        name = member.name
        if name.startswith("/") or ".." in _parts(name) or "\\" in name:
            raise OperationError("PERMISSION_DENIED", f"the OVA {path} has a member with an unsafe name "
                                 f"{name!r} (path traversal); the archive is refused")
        if member.issym() or member.islnk():
            raise OperationError("PERMISSION_DENIED", f"the OVA {path} has a link member {name!r}; archives "
                                 "with links are refused")
        if member.isdir():
            continue
        if not member.isreg() or member.issparse():
            raise _invalid(f"the OVA {path} has a member {name!r} that is not a plain file")
        members[_normal_name(name)] = member
    return members


def _load_ova(fd: int, path: str, size: int, identities: list[FileIdentity], check_disks: bool) -> Source:
    import hashlib
    members = _safe_members(_tar_members(fd, path, size), path)
    ovfs = [m for n, m in members.items() if n.lower().endswith(".ovf") and "/" not in n]
    if not ovfs:
        raise _invalid(f"the OVA {path} holds no OVF descriptor")
    ovf_member = ovfs[0]
    if ovf_member.size > MAX_DESCRIPTOR:
        raise _invalid("the OVF descriptor is larger than 16 MiB")
    ovf_data = os.pread(fd, ovf_member.size, ovf_member.offset_data)
    stem = ovf_member.name[:-4]
    mf = members.get(stem + ".mf") or next((m for n, m in members.items() if n.lower().endswith(".mf")), None)
    manifest = None
    if mf is not None:
        if mf.size > MAX_DESCRIPTOR:
            raise _invalid(f"the manifest {mf.name!r} in the OVA {path} is larger than 16 MiB; a list of checksums "
                           "this large is refused")
        manifest = parse_manifest(os.pread(fd, mf.size, mf.offset_data).decode("utf-8", "replace"))
    if manifest is not None and ovf_member.name in manifest:
        algorithm, expected = manifest[ovf_member.name]
        if hashlib.new(algorithm, ovf_data).hexdigest() != expected:
            raise _invalid(f"the manifest {algorithm.upper()} of {ovf_member.name} does not match its content")
    vm = parse_ovf(ovf_data)
    disks = []
    to_verify = []
    for index, entry in enumerate(vm["disks"], 1):
        _refuse_fileless(entry, "ovf")
        href = entry.get("href") or ""
        _local_file("", href, "the OVF disk file")
        _refuse_packed(entry, "extract the OVA (tar xf), ")
        member = members.get(_normal_name(href))
        if member is None:
            raise _invalid(f"the OVF names the disk file {href!r}, which is not in the OVA")
        head, tail = _read_head_tail(fd, member.offset_data, member.size)
        fmt = sniff(head, tail)
        if fmt not in ("vmdk", "vpc", "vhdx", "vdi", "qcow2"):
            raise _invalid(f"the OVA member {href!r} is not a disk image this program reads")
        disk = load_disk(ImageRef(path, fmt, member.offset_data, member.size), f"disk {index} ({href})",
                         identities, check_disks)
        disk.member = member.name
        disks.append(disk)
    if manifest is not None:
        for name, _ in manifest.items():
            if name == ovf_member.name:
                continue
            member = members.get(name)
            if member is None:
                raise _invalid(f"the manifest lists {name!r}, which is not in the OVA")
            to_verify.append((name, path, member.offset_data, member.size))
    source = Source("ova", path, "ova", disks, vm, identities, manifest, to_verify)
    return source


def _refuse_fileless(disk: dict[str, Any], kind: str) -> None:
    """UNSUPPORTED for a disk the VM's description names no file for: in an OVF, a blank disk (no ovf:fileRef,
    or one to no File) that an import is to create empty; in a VMX, an empty fileName."""
    if disk.get("href"):
        return
    if kind == "vmx":
        raise OperationError("UNSUPPORTED", f"the VMX gives the disk {disk.get('id')} no file name: give it its "
                             "file, or remove the disk from the VMX")
    raise OperationError("UNSUPPORTED", f"the OVF disk {_shown(str(disk.get('id') or ''))} has no file: it is a "
                         "blank disk, to be made empty at import, which this program does not make; remove it from "
                         "the OVF (and the OVF's entry from the .mf), convert, and add an empty disk to the "
                         "converted VM")


def _refuse_packed(disk: dict[str, Any], first: str = "") -> None:
    """UNSUPPORTED for an OVF disk file stored gzip-compressed (ovf:compression) or split into chunks
    (ovf:chunkSize, as `ovftool --chunkSize` writes it: HREF.000000000, HREF.000000001, ...), saying how to
    make it a plain disk file; `first`: what to do before that."""
    href = disk.get("href") or ""
    if disk.get("compression"):
        raise OperationError("UNSUPPORTED", f"the OVF disk {href} is {disk['compression']}-compressed, which is not "
                             f"supported: {first}decompress it (gunzip) and remove ovf:compression from the OVF and "
                             "its manifest entry from the .mf, or export the VM without compression")
    if disk.get("chunk_size"):
        raise OperationError("UNSUPPORTED", f"the OVF disk {href} is split into chunks of {disk['chunk_size']} bytes "
                             f"({href}.000000000, {href}.000000001, ...), which is not supported: {first}join them "
                             f"in order (cat {href}.0* > {href}) and remove ovf:chunkSize from the OVF and the "
                             "chunks' entries from the .mf, or export the VM without --chunkSize")


def _load_described(fd: int, path: str, kind: str, size: int, identities: list[FileIdentity],
                    check_disks: bool, reader_uid: int | None = None) -> Source:
    import hashlib
    if size > MAX_DESCRIPTOR:
        raise _invalid(f"the {kind.upper()} file {path} is larger than 16 MiB")
    data = os.pread(fd, size, 0)
    vm = parse_ovf(data) if kind == "ovf" else parse_vmx(_vmx_text(data))
    directory = os.path.dirname(path)
    manifest = None
    to_verify: list[tuple[str, str, int, int]] = []
    if kind == "ovf":
        mf_path = path[:-4] + ".mf" if path.lower().endswith(".ovf") else path + ".mf"
        if _present(mf_path, reader_uid):
            mf_name = os.path.basename(mf_path)
            mf_fd, mf_ident = _open_referenced(mf_path, directory, mf_name, "the manifest", reader_uid)
            try:
                identities.append(mf_ident)
                if mf_ident.size > MAX_DESCRIPTOR:
                    raise _invalid(f"the manifest {mf_path} is larger than 16 MiB; a list of checksums this large "
                                   "is refused")
                manifest = parse_manifest(os.pread(mf_fd, mf_ident.size, 0).decode("utf-8", "replace"))
            finally:
                os.close(mf_fd)
            entries = []
            for name in manifest:
                file_path = _local_file(directory, name, "the manifest entry")
                if file_path == path:
                    algorithm, expected = manifest[name]
                    if hashlib.new(algorithm, data).hexdigest() != expected:
                        raise _invalid(f"the manifest {algorithm.upper()} of {name} does not match its content")
                else:
                    entries.append((file_path, name))
            for name, entry_fd, entry_ident in _open_each_referenced(entries, directory, "the manifest entry",
                                                                     reader_uid):
                os.close(entry_fd)
                identities.append(entry_ident)
                to_verify.append((name, entry_ident.path, 0, entry_ident.size))
    disks = []
    for index, entry in enumerate(vm["disks"], 1):
        _refuse_fileless(entry, kind)
        href = entry.get("href") or ""
        what = f"the {kind.upper()} disk file"
        disk_path = _local_file(directory, href, what)
        _refuse_packed(entry)
        disk_fd, ident = _open_referenced(disk_path, directory, href, what, reader_uid)
        try:
            identities.append(ident)
            head, tail = _read_head_tail(disk_fd, 0, ident.size)
            fmt = sniff(head, tail)
            if fmt not in ("vmdk", "vpc", "vhdx", "vdi", "qcow2"):
                raise _invalid(f"the disk file {href!r} is not a disk image this program reads")
            if fmt == "vmdk" and not head.startswith((b"KDMV", b"COWD")):
                _check_vmdk_descriptor(disk_fd, disk_path, ident.size, reader_uid)
        finally:
            os.close(disk_fd)
        disks.append(load_disk(ImageRef(disk_path, fmt), f"disk {index} ({href})", identities, check_disks,
                               reader_uid))
    return Source(kind, path, kind, disks, vm, identities, manifest, to_verify)


def _present(path: str, reader_uid: int | None) -> bool:
    """Whether there is something at `path` (an optional file next to the source), as the submitter sees it:
    root's lookup would tell them what lies behind a directory closed to them."""
    if not reader_uid:
        return os.path.lexists(path)
    from h2kd.access import groups_for, look_up_as
    from h2kd.errors import H2kError

    try:
        code = look_up_as(reader_uid, groups_for(reader_uid), path)
    except H2kError:
        return True         # _open_referenced says why it cannot be checked
    return code not in (errno.ENOENT, errno.ENOTDIR)


def verify(source: Source, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Check the manifest's sums and image.checksum by reading the files; INVALID_IMAGE on a mismatch.

    Each file is opened again by its name, as root, so it must still be the very file load_source() found (and
    checked for the submitter): SOURCE_CHANGED otherwise, with one message whatever is there instead, so that a
    directory swapped for a symlink meanwhile tells nothing of the files it leads to."""
    done = 0
    verified = []

    def digest(file_path: str, offset: int, size: int, algorithm: str) -> str:
        import hashlib          # only when there is something to check: it costs a plain disk's job start
        nonlocal done
        h = hashlib.new(algorithm)
        fd = _reopen(file_path, source.identities, "verify")
        try:
            position, end = offset, offset + size
            while position < end:
                chunk = os.pread(fd, min(HASH_CHUNK, end - position), position)
                if not chunk:
                    raise OperationError("SOURCE_CHANGED", f"{file_path} became shorter while it was read", "verify")
                h.update(chunk)
                position += len(chunk)
                done += len(chunk)
                if progress:
                    progress(done)
        finally:
            os.close(fd)
        return h.hexdigest()

    if source.checksum:
        expected = source.checksum.split(":", 1)[-1].lower()
        if digest(source.path, 0, source.identities[0].size, "sha256") != expected:
            raise _invalid(f"the SHA256 of {source.path} does not match image.checksum", "verify")
        verified.append({"file": os.path.basename(source.path), "algorithm": "sha256", "source": "image.checksum"})
    for name, file_path, offset, size in source.to_verify:
        algorithm, expected = source.manifest[name]  # type: ignore[index]
        if digest(file_path, offset, size, algorithm) != expected:
            raise _invalid(f"the manifest {algorithm.upper()} of {name} does not match its content "
                           "(the file is damaged or was altered)", "verify")
        verified.append({"file": name, "algorithm": algorithm, "source": "manifest"})
    return {"present": source.manifest is not None, "verified": verified}


def report(source: Source, verification: dict[str, Any] | None, sizes: list[dict[str, int]] | None) -> dict[str, Any]:
    """The structured inspection report."""
    return {
        "kind": source.kind,
        "path": source.path,
        "format": source.format,
        "vm": source.vm and {k: v for k, v in source.vm.items() if k != "disks"},
        "disks": [disk.report(sizes[i] if sizes else None) for i, disk in enumerate(source.disks)],
        "manifest": verification,
        "virtual_size": sum(d.virtual_size for d in source.disks),
    }


def run_inspect(spec: dict[str, Any], progress: ProgressFn, reader_uid: int | None = None) -> dict[str, Any]:
    """The inspect operation: outputs {"report": ...}. reader_uid: see load_source()."""
    image = spec["image"]
    progress("inspect", 0, 0, "reading the source")
    source = load_source(image["path"], image.get("format"), image.get("checksum"), reader_uid=reader_uid)
    total = source.verify_bytes()
    verification = verify(source, lambda done: progress("verify", done, total, "checking sums"))
    sizes = [required_sizes(d) for d in source.disks]
    progress("inspect", total, total, "done")
    return {"report": report(source, verification, sizes)}
