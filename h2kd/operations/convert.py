"""Conversion: every disk of a source to qcow2 or raw, safely, with overall progress.

Where outputs go (artifacts.output_path):
  - an existing directory: the disks are written into it, named after the source: "<stem>.<ext>" for a
    single disk, "<stem>-disk<N>.<ext>" for a VM with several disks (in the VM's disk order);
  - any other path: a single disk is written exactly there; for several disks it is a base name, and disk N
    becomes "<path without its .qcow2/.raw/.img suffix>-disk<N>.<ext>";
  - null: a directory "<first output root>/<job_id>" is created and used as above ("<job_id>-<random>" if
    someone else took that name first: see JobDirectory).
  The domain XML (parameters domain_xml: true) is written next to the disks as "<base>.xml" (see
  h2kd.operations.domain: virtio devices, or SATA disks and Intel NICs for a Windows guest).

Safety rules:
  - every output's parent must resolve (realpath) under one of the output roots;
  - each disk is written to a temporary name in the destination's directory, created with O_EXCL and
    O_NOFOLLOW, then (qcow2) checked and fsynced; only when every disk is done are they all moved to their
    names, and never over an existing file unless artifacts.overwrite is true (even then never over a
    symlink or a directory);
  - parameters.sync (default true) decides whether the outputs are made durable: true fsyncs every output
    (and their directory after the renames) before the job completes; false skips every sync, like
    `qemu-img convert` by hand or importctl --sync=no. The outputs still get their names only when complete,
    but a power loss or crash soon after may lose them or leave them truncated;
  - with parameters.verify, each output is compared with its source (qemu-img compare) before any gets its
    name; a difference fails the job. The disk an offline_fix repairs is not compared: the repair changed it;
  - with parameters.offline_fix, the boot disk (domain.boot_index) is repaired before it gets its name: it is
    converted to a raw temporary file, the guest on it is fixed there (the `repair` given by the worker, see
    h2kd.operations.offline_fix), and it is then converted to the output format with the job's options
    (a raw output is fixed in place). If the repair fails, no output gets a name;
  - each temporary path is first appended to a record file (the attempt's run directory, see TempFiles),
    so that whoever settles an attempt whose worker was killed outright can remove what it left;
  - free space is checked before starting: against a bound computed from the virtual sizes, and only when
    that bound does not fit, against `qemu-img measure`; ENOSPC while writing gives NO_SPACE;
  - a source that disappears or changes during the job gives SOURCE_CHANGED;
  - whatever ends the job early (error, SIGTERM), the temporary files are removed.
Speed: the kernel is asked to start writing each output to disk while qemu-img is still producing it, and
the last fsync runs alongside the output's `qemu-img check`, so durability costs little beyond the disk's
own write speed (with sync false neither happens).
OVA disks are read in place (a byte range of the tar, see qemuimg.ImageRef): nothing is extracted.
The environment variable H2K_RATE_LIMIT (bytes per second) limits qemu-img's I/O (an operator setting,
passed through config.worker_environment).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import threading
import time
from typing import Any, Callable

from h2kd.operations import inspect, qemuimg
from h2kd.operations.background import Background
from h2kd.operations.domain import DISK_HEAD_BYTES, boot_index, domain_xml, vm_name
from h2kd.operations.qemuimg import ConvertOptions, ImageRef, OperationError
from h2kd.operations.tempfiles import TempFiles, open_output_directory

EXTENSIONS = {"qcow2": "qcow2", "raw": "raw"}
SOURCE_POLL_SECONDS = 0.5
WRITEBACK_SECONDS = 0.2
MiB = 1024 * 1024


# repair(raw image, as a descriptor, progress(phase, fraction or None, message)) -> its report; raises
# OperationError. A descriptor: the repair runs as root on a file in a directory the submitter may change.
Repair = Callable[[int, Callable[[str, "float | None", str], None]], dict[str, Any]]


class Planned:
    """One disk's way to its output: the destination, the bytes it needs, its temporary file once created,
    whether it is repaired (offline_fix) before it gets its name, and whether it is compared with its source."""

    def __init__(self, disk: inspect.Disk, destination: str, needed: int = 0, temp: str | None = None,
                 repaired: bool = False, compared: bool = False):
        self.disk = disk
        self.destination = destination
        self.needed = needed
        self.temp = temp
        self.repaired = repaired
        self.compared = compared

    def steps(self, options: ConvertOptions) -> int:
        """How many passes over the disk's virtual size its way takes: the conversion, plus the repair and,
        for a qcow2 output, the conversion of the repaired raw file; or plus the comparison."""
        if not self.repaired:
            return 2 if self.compared else 1
        return 2 if options.output_format == "raw" else 3


def intermediate_options(options: ConvertOptions) -> ConvertOptions:
    """How a disk to be repaired is first converted: to a sparse raw file (loop devices need raw)."""
    return ConvertOptions(output_format="raw", coroutines=options.coroutines, rate_limit=options.rate_limit)


def options_from(parameters: dict[str, Any]) -> ConvertOptions:
    rate = os.environ.get("H2K_RATE_LIMIT", "")
    fmt = parameters.get("output_format") or "qcow2"
    if fmt not in EXTENSIONS:
        raise OperationError("VALIDATION_FAILED", f"parameters.output_format must be qcow2 or raw, not {fmt!r}")
    return ConvertOptions(
        output_format=fmt,
        compress=bool(parameters.get("compress", False)),
        compression_type=parameters.get("compression_type"),
        cluster_size=parameters.get("cluster_size"),
        preallocation=parameters.get("preallocation"),
        sparse=bool(parameters.get("sparse", True)),
        coroutines=parameters.get("coroutines"),
        rate_limit=int(rate) if rate.isdigit() and int(rate) > 0 else None,
    )


# ---------------------------------------------------------------- where outputs go

def _under_roots(directory: str, roots: list[str]) -> bool:
    real = os.path.realpath(directory)
    for root in roots:
        root_real = os.path.realpath(root)
        if real == root_real or real.startswith(root_real.rstrip("/") + "/"):
            return True
    return False


def plan_outputs(source: inspect.Source, output_path: str | None, job_dir: JobDirectory | None, roots: list[str],
                 output_format: str, overwrite: bool,
                 owner: dict[str, int] | None = None) -> tuple[list[str], str, int]:
    """Destination of each disk, the base name (for the domain XML) and their directory, opened (the caller closes
    it); refuses anything unsafe. Without an output path, the outputs go in job_dir (see _job_dir_of)."""
    if not roots:
        raise OperationError("VALIDATION_FAILED", "no output roots are configured; outputs cannot be written")
    ext = EXTENSIONS[output_format]
    count = len(source.disks)
    owner_uid = owner["uid"] if owner else None
    if output_path is None:
        if not _under_roots(roots[0], roots):
            raise OperationError("PERMISSION_DENIED", f"the output root {roots[0]} is not usable")
        assert job_dir is not None
        output_path = job_dir.make(owner)
    if not os.path.isabs(output_path):
        raise OperationError("VALIDATION_FAILED", "artifacts.output_path must be an absolute path")
    into_directory = _is_directory(output_path, owner)
    if into_directory:
        directory, base = output_path, vm_name(source)
    else:
        directory, name = os.path.split(output_path.rstrip("/"))
        base = re.sub(r"\.(qcow2|raw|img)$", "", name) if count > 1 else name
    if owner_uid:
        # As the submitter first: what lies behind their symlinks, where root alone can look, must not shape
        # the answer they get (whether a name exists there, where a link of someone else's leads).
        _check_submitter_may_write(directory, owner)
    if not _under_roots(directory, roots):
        raise OperationError("PERMISSION_DENIED", f"the output location {directory} is outside the configured "
                             f"output roots ({', '.join(roots)})")
    if not os.path.isdir(directory):
        raise OperationError("VALIDATION_FAILED", f"the output directory {directory} does not exist")
    directory = os.path.realpath(directory)
    # Opened now, and the submitter's right to write checked on what was opened: the job writes there and only
    # there, whatever they rename or swap on its path meanwhile (another user's directory of the same name, say).
    directory_fd = open_output_directory(directory)
    try:
        if job_dir is not None:
            job_dir.note_opened(directory, directory_fd)
        if owner_uid:
            _check_submitter_may_write_in(directory_fd, directory, owner)
        destinations, base_path = _named_outputs(directory, base, into_directory, count, ext, overwrite, owner_uid)
    except BaseException:
        os.close(directory_fd)
        raise
    return destinations, base_path, directory_fd


def _named_outputs(directory: str, base: str, into_directory: bool, count: int, ext: str, overwrite: bool,
                   owner_uid: int | None) -> tuple[list[str], str]:
    """The disks' outputs in `directory`, each free (or the submitter's, to be replaced), and the base path."""
    if count == 1:
        names = [f"{base}.{ext}" if into_directory else base]
    else:
        names = [f"{base}-disk{i}.{ext}" for i in range(1, count + 1)]
    destinations = [os.path.join(directory, n) for n in names]
    for destination in destinations:
        _check_destination(destination, overwrite, owner_uid)
    base_path = os.path.join(directory, re.sub(r"\.(qcow2|raw|img)$", "", os.path.basename(base)))
    return destinations, base_path


def _is_directory(path: str, owner: dict[str, Any] | None) -> bool:
    """Whether the output path is a directory (not a link to one), as the submitter sees it: asked as root, the
    answer would shape the job's error, and tell them what lies behind their symlinks where only root can look."""
    if not (owner and owner["uid"]):
        return os.path.isdir(path) and not os.path.islink(path)
    from h2kd.access import kind_as
    return _as_submitter(owner, lambda uid, groups: kind_as(uid, groups, path)) == stat.S_IFDIR


def _check_submitter_may_write(directory: str, owner: dict[str, Any]) -> None:
    """h2kd checked at submission that the submitter may write where the output path led. The path is theirs:
    a symlink in it may lead elsewhere now, to a directory of the root they may not write in, where root
    would make the output for them. The directory must be theirs to write in as the job runs as well."""
    from h2kd.access import check_directory_writable
    _as_submitter(owner, lambda uid, groups: check_directory_writable(directory, uid, groups))


def _check_submitter_may_write_in(fd: int, directory: str, owner: dict[str, Any]) -> None:
    """_check_submitter_may_write for the directory open on fd."""
    from h2kd.access import check_directory_fd_writable
    _as_submitter(owner, lambda uid, groups: check_directory_fd_writable(fd, directory, uid, groups))


def _as_submitter(owner: dict[str, Any], check: Callable[[int, list[int]], Any]) -> Any:
    """check(uid, groups), an h2kd.access check, for the submitter; what it finds against them (or a lookup of
    theirs that hung, a FUSE mount of theirs) is PERMISSION_DENIED."""
    from h2kd.access import groups_for
    from h2kd.errors import H2kError

    uid = int(owner["uid"])
    try:
        return check(uid, groups_for(uid))
    except H2kError as e:
        raise OperationError("PERMISSION_DENIED", f"as the job runs, {e}") from None


def _job_dir_of(spec: dict[str, Any], roots: list[str]) -> JobDirectory | None:
    """Where a convert without artifacts.output_path writes: a directory named after the job in the first
    output root (None when an output path is given)."""
    if (spec.get("artifacts") or {}).get("output_path") is not None or not roots:
        return None
    return JobDirectory(os.path.join(roots[0], spec.get("job_id") or "job"))


class JobDirectory:
    """The output directory of a convert given no output path: "<first output root>/<job id>", made for the
    submitter when the job runs. One that exists already is used only if it is theirs (a retry). The job's id
    is public before it runs, and output roots are often shared: a directory of that name that someone else
    made (to receive the outputs, or just to make the job fail) is passed over for "<job id>-<random>"."""

    ATTEMPTS = 8

    def __init__(self, wanted: str):
        self.wanted = wanted
        # The directory this attempt made, or took over empty from an attempt killed outright: removed if this
        # attempt fails, and noted in temps for h2kd to remove if it is killed outright (note_opened).
        self.made: str | None = None
        self.temps: TempFiles | None = None
        self._noted: str | None = None

    def note_opened(self, directory: str, fd: int) -> None:
        """plan_outputs opened the outputs' directory (`directory`, resolved) on fd: noted if it is the one made."""
        if self.made and self.temps and os.path.realpath(self.made) == directory:
            self.temps.note_made_directory(directory, fd)
            self._noted = directory

    def remove(self) -> None:
        """Remove the directory made (empty by now: the outputs' temporary files are gone), its note first. Called
        as the attempt fails: nothing here may hide why."""
        if not self.made:
            return
        if self.temps and self._noted:
            with contextlib.suppress(OSError):
                self.temps.withdraw_made_directory(self._noted)
        with contextlib.suppress(OSError):
            os.rmdir(self.made)

    def make(self, owner: dict[str, int] | None) -> str:
        uid = owner["uid"] if owner else 0
        names = [self.wanted] + [f"{self.wanted}-{secrets.token_hex(4)}" for _ in range(self.ATTEMPTS)]
        for directory in names:
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                st = os.lstat(directory)
                if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
                    if not os.listdir(directory):
                        # Empty: an earlier attempt's, killed before it wrote anything. This one removes it if
                        # it fails, as one it made.
                        self.made = directory
                    return directory
                continue
            self.made = directory
            if owner:
                os.chown(directory, owner["uid"], owner["gid"], follow_symlinks=False)
                os.chmod(directory, owner.get("directory_mode", 0o700), follow_symlinks=False)
            return directory
        raise OperationError("OUTPUT_EXISTS", f"{self.wanted} and {self.ATTEMPTS} other names for the job's "
                             "directory are taken by others; give artifacts.output_path")


def _check_destination(destination: str, overwrite: bool, owner_uid: int | None = None,
                       dir_fd: int | None = None) -> None:
    """Nothing at `destination`, or (with overwrite) a regular file that the submitter (owner_uid; None: root)
    owns: the worker replaces it as root, so whose it is must be checked here, not left to permissions.
    dir_fd: the destination's directory, opened; the name is then looked up in it."""
    try:
        st = os.lstat(os.path.basename(destination), dir_fd=dir_fd) if dir_fd is not None else os.lstat(destination)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise OperationError("OUTPUT_EXISTS", f"the output {destination} exists and is not a regular file; "
                             "it is never replaced")
    if not overwrite:
        raise OperationError("OUTPUT_EXISTS", f"the output {destination} already exists (set artifacts.overwrite "
                             "to replace it)")
    if owner_uid and st.st_uid != owner_uid:
        raise OperationError("PERMISSION_DENIED", f"the output {destination} belongs to uid {st.st_uid}, not to the "
                             f"submitter (uid {owner_uid}); it is not replaced")


def _hand_over(temps: TempFiles, temp: str, owner: dict[str, int]) -> None:
    """Give a finished temporary file its owner and mode, through a descriptor of the very file made for it
    (see TempFiles.open_made)."""
    fd = temps.open_made(temp, os.O_RDONLY)
    try:
        os.fchown(fd, owner["uid"], owner["gid"])
        os.fchmod(fd, owner.get("mode", 0o640))
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the operation

def plan_disks(source: inspect.Source, destinations: list[str], repairing: bool,
               verifying: bool = False) -> list[Planned]:
    """Each disk with its destination; with offline_fix, the disk the VM boots from is the one repaired, and
    with verify every other disk is compared with its source."""
    boot = boot_index(source, len(source.disks))
    return [Planned(disk, destination, 0, repaired=repairing and index == boot,
                    compared=verifying and not (repairing and index == boot))
            for index, (disk, destination) in enumerate(zip(source.disks, destinations))]


def _needed_bytes(disk: inspect.Disk, options: ConvertOptions) -> int:
    """Bytes the output of `disk` needs, as qemu-img measures it (and its map refines it)."""
    if options.preallocation in ("falloc", "full") or not options.sparse:
        if options.output_format == "raw":
            return disk.virtual_size
        return qemuimg.measure(disk.ref, "qcow2", options.create_options())["fully-allocated"]
    sizes = inspect.required_sizes(disk, options.create_options() if options.output_format == "qcow2" else None)
    return sizes[options.output_format]


def size_bound(virtual_size: int, options: ConvertOptions) -> int:
    """The most bytes an output of this virtual size can take, without asking qemu-img: a raw file is at most
    its virtual size; a qcow2 adds at most 16 bytes per cluster (an 8-byte L2 entry, a 2-byte refcount and
    their tables), a few clusters of header and tables, and a MiB of slack."""
    if options.output_format == "raw":
        return virtual_size
    cluster = options.cluster_size or 65536
    return virtual_size + -(-virtual_size // cluster) * 16 + 8 * cluster + MiB


def _free_bytes(directory_fd: int) -> int:
    st = os.fstatvfs(directory_fd)
    return st.f_bavail * st.f_frsize


def _no_space(directory: str, detail: str) -> OperationError:
    return OperationError("NO_SPACE", f"no space left on the device of {directory}: {detail}; the partial "
                          "output was removed", "convert")


def _check_free_space(plans: list[Planned], options: ConvertOptions, directory: str, directory_fd: int) -> None:
    """NO_SPACE unless the outputs (and the raw file of a disk repaired before a qcow2 output) fit in the directory
    open on directory_fd (opened as `directory`). The bound from the virtual sizes usually settles it at no cost;
    only when it does not fit is qemu-img asked for the real figure."""
    free = _free_bytes(directory_fd)
    raw = intermediate_options(options)
    staged = [p for p in plans if p.repaired and options.output_format != "raw"]
    if (sum(size_bound(p.disk.virtual_size, options) for p in plans)
            + sum(size_bound(p.disk.virtual_size, raw) for p in staged)) <= free:
        return
    for plan in plans:
        plan.needed = _needed_bytes(plan.disk, options)
    needed = sum(p.needed for p in plans) + sum(_needed_bytes(p.disk, raw) for p in staged)
    if needed > free:
        raise OperationError("NO_SPACE", f"not enough space in {directory}: the output needs {needed} bytes, "
                             f"{free} are free", "convert")


def run_convert(spec: dict[str, Any], output_roots: list[str], progress: inspect.ProgressFn,
                on_process: Callable[[Any], None] | None = None,
                owner: dict[str, int] | None = None, temp_record: str | None = None,
                repair: Repair | None = None, on_commit: Callable[[], None] | None = None) -> dict[str, Any]:
    """The convert operation: outputs {"disks": [...], "domain_xml": path|None, "report": ...}, and with
    repair also "offline_fix": the repair's report.

    owner {"uid", "gid", "mode"}: whom the outputs are handed to (the submitter), set before they get their names.
    temp_record: the file where temporary paths are recorded before they are created (see TempFiles).
    repair: fixes the guest on the first disk before it gets its name (see the module docstring). If it
    fails, its OperationError goes on with outputs {"disks": [], "domain_xml": None, "offline_fix": <its
    report, if any>}, and nothing is left in the output directory.
    A failed job leaves no job directory behind either (see plan_outputs) unless an earlier attempt made it.
    on_commit: called just before the outputs start to get their names; from then on the attempt must run to
    its end rather than be stopped (h2kd.worker.main holds a SIGTERM back).
    """
    job_dir = _job_dir_of(spec, output_roots)
    try:
        return _run_convert(spec, output_roots, progress, on_process, owner, temp_record, repair, job_dir,
                            on_commit or (lambda: None))
    except BaseException:
        if job_dir is not None:
            job_dir.remove()
        raise


def _run_convert(spec: dict[str, Any], output_roots: list[str], progress: inspect.ProgressFn,
                 on_process: Callable[[Any], None] | None, owner: dict[str, int] | None, temp_record: str | None,
                 repair: Repair | None, job_dir: JobDirectory | None, on_commit: Callable[[], None]) -> dict[str, Any]:
    image, parameters, artifacts = spec["image"], spec.get("parameters") or {}, spec.get("artifacts") or {}
    options = options_from(parameters)
    durable = bool(parameters.get("sync", True))
    owner_uid = owner["uid"] if owner else None
    progress("inspect", 0, 0, "reading the source")
    source = inspect.load_source(image["path"], image.get("format"), image.get("checksum"), reader_uid=owner_uid)
    if not source.disks:
        raise OperationError("UNSUPPORTED", f"{image['path']} describes a VM without a disk to convert (CD-ROMs and "
                             "disks marked not present are left out; a VM that VMware encrypted keeps its disks' "
                             "names in its encrypted part: decrypt it first)", "inspect")
    overwrite = bool(artifacts.get("overwrite"))
    temps = TempFiles(temp_record, owner, durable)
    if job_dir is not None:
        job_dir.temps = temps
    destinations, base, directory_fd = plan_outputs(source, artifacts.get("output_path"), job_dir,
                                                    output_roots, options.output_format, overwrite, owner)
    temps.adopt_directory(os.path.dirname(destinations[0]), directory_fd)
    outputs: list[dict[str, Any]] = []
    repair_report: dict[str, Any] | None = None
    try:
        domain_path = base + ".xml" if parameters.get("domain_xml") else None
        if domain_path:
            _check_destination(domain_path, overwrite, owner_uid)
        plans = plan_disks(source, destinations, repairing=repair is not None,
                           verifying=bool(parameters.get("verify")))
        _check_free_space(plans, options, os.path.dirname(destinations[0]), directory_fd)
        verify_total = source.verify_bytes()
        # Progress counts the disks' virtual bytes: what qemu-img walks through (its -p is a fraction of that walk);
        # a repaired disk counts once more for its repair and once more for its conversion after the repair.
        sizes = [max(p.disk.virtual_size, 1) for p in plans]
        total = verify_total + sum(size * p.steps(options) for size, p in zip(sizes, plans))
        verification = inspect.verify(source, lambda done: progress("verify", done, total, "checking sums"))
        done_before = verify_total
        for index, (plan, size) in enumerate(zip(plans, sizes), 1):
            label = f"disk {index}/{len(plans)}"
            plan.temp = temps.create(plan.destination)
            part = _Part(progress, done_before, size, total, label)
            if plan.repaired:
                assert repair is not None
                repair_report = _convert_and_repair(plan, options, source, part, on_process, temps, repair, durable)
            else:
                # qemu-img writes through a descriptor of the file made for it, not its name: whatever the submitter
                # renames or swaps on the output's path meanwhile, it writes there and nowhere else (and a worker
                # repairing a guest runs as root).
                target = temps.open_made(plan.temp, os.O_RDWR)
                try:
                    _convert_one(plan.disk.ref, plan.temp, options, source, part.of(0),
                                 f"{label} ({plan.disk.label})", on_process, durable, target)
                finally:
                    os.close(target)
            converted = done_before + size * (plan.steps(options) - plan.compared)
            progress("check", converted, total, f"checking {label}")
            outputs.append(_finish_one(plan, options, durable, temps))
            if plan.compared:
                outputs[-1]["compare"] = _compare_one(plan, options, source, part, on_process, temps)
            done_before += size * plan.steps(options)
        inspect.ensure_unchanged(source.identities)
        if domain_path:
            temp = temps.create(domain_path)
            # A plain disk brings no VM facts: its boot disk's partition table tells the firmware.
            head = b"" if source.vm else qemuimg.read_head(plans[boot_index(source, len(plans))].disk.ref,
                                                           DISK_HEAD_BYTES)
            with open(temps.open_made(temp, os.O_WRONLY), "w", encoding="utf-8") as f:
                f.write(domain_xml(source, [p.destination for p in plans], options.output_format, head))
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            plans_to_commit = [(p.temp, p.destination) for p in plans] + [(temp, domain_path)]
        else:
            plans_to_commit = [(p.temp, p.destination) for p in plans]
        on_commit()
        progress("commit", done_before, total, "giving the outputs their names")
        _commit(plans_to_commit, temps, overwrite, durable, owner)
    finally:
        temps.remove_all()
    progress("commit", total, total, "done")     # the last phase stays the last: Phase never goes back to "convert"
    for entry, plan in zip(outputs, plans):
        entry["path"] = plan.destination
    result = {"disks": outputs, "domain_xml": domain_path,
              "report": inspect.report(source, verification, None),
              "bytes_read": sum(d.ref.size or int(d.info.get("actual-size", 0)) for d in source.disks),
              "bytes_written": sum(o["size"] for o in outputs)}
    if repair_report is not None:
        if len(plans) > 1:
            repair_report["other_disks"] = ("not fixed (the fixes apply to the boot disk; its fstab names the "
                                            "others by UUID)")
        result["offline_fix"] = repair_report
    return result


class _Part:
    """Progress of one disk's way: pass n of it covers [start + n * size, start + (n + 1) * size) of total."""

    def __init__(self, progress: inspect.ProgressFn, start: int, size: int, total: int, label: str):
        self.progress, self.start, self.size, self.total, self.label = progress, start, size, total, label

    def of(self, n: int, phase: str = "convert") -> Callable[[float], None]:
        """progress(fraction) of pass n, a conversion (or a comparison: phase "compare")."""
        base = self.start + n * self.size
        return lambda fraction: self.progress(phase, base + int(self.size * fraction), self.total, self.label)

    def repair_progress(self, n: int) -> Callable[[str, "float | None", str], None]:
        """The repair's progress(phase, fraction or None, message) as pass n."""
        base = self.start + n * self.size

        def report(phase: str, fraction: float | None, message: str) -> None:
            done = base + int(self.size * min(max(fraction or 0.0, 0.0), 1.0))
            self.progress(phase, done, self.total, f"{self.label}: {message}" if message else self.label)
        return report


def _convert_and_repair(plan: Planned, options: ConvertOptions, source: inspect.Source, part: _Part,
                        on_process: Callable[[Any], None] | None, temps: TempFiles, repair: Repair,
                        durable: bool) -> dict[str, Any]:
    """The boot disk of a convert with offline_fix: converted to raw, repaired, converted to the output format
    (a raw output is repaired where it is). Everything happens under temporary names; the repair's report.
    qemu-img and the repair, which runs as root, reach these files only through descriptors of the files made
    for them (TempFiles.open_made): the submitter may swap their names for symlinks meanwhile."""
    assert plan.temp
    what = f"{part.label} ({plan.disk.label})"
    target = temps.open_made(plan.temp, os.O_RDWR)
    try:
        if options.output_format == "raw":
            _convert_one(plan.disk.ref, plan.temp, options, source, part.of(0), what, on_process, durable, target)
            return _repaired(target, repair, part)
        staged = temps.create(plan.destination + ".raw")
        staged_fd = temps.open_made(staged, os.O_RDWR)
        try:
            _convert_one(plan.disk.ref, staged, intermediate_options(options), source, part.of(0), what, on_process,
                         False, staged_fd)
            report = _repaired(staged_fd, repair, part)
            _convert_one(ImageRef(qemuimg.descriptor_path(staged_fd), "raw"), plan.temp, options, source, part.of(2),
                         f"{what}, repaired", on_process, durable, target, staged_fd)
        finally:
            os.close(staged_fd)
        temps.remove(staged)
        return report
    finally:
        os.close(target)


def _repaired(raw_fd: int, repair: Repair, part: _Part) -> dict[str, Any]:
    """Run the repair on a raw file (pass 1 of the disk's way); its report. A failed repair's error leaves the
    job with no output at all."""
    try:
        return repair(raw_fd, part.repair_progress(1))
    except OperationError as e:
        e.outputs = {"disks": [], "domain_xml": None, "offline_fix": e.outputs or None}
        raise


class _Writeback:
    """Has the kernel start writing an output to disk every WRITEBACK_SECONDS while qemu-img is still
    writing it (sync_file_range, which does not wait), so the fsync that must precede the rename finds
    little left to write: the disk works alongside the conversion instead of after it."""

    def __init__(self, fd: int):
        self.fd = os.dup(fd)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="writeback", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        start = _writeback_starter()
        while not self.stopped.wait(WRITEBACK_SECONDS):
            try:
                start(self.fd)
            except OSError:
                return      # the durability comes from the final fsync; this only makes it cheaper

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        os.close(self.fd)


def _writeback_starter() -> Callable[[int], None]:
    """sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) through libc, or fdatasync where it is missing."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        sync_file_range = libc.sync_file_range
        sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    except (ImportError, OSError, AttributeError):
        return os.fdatasync

    def start(fd: int) -> None:
        if sync_file_range(fd, 0, 0, 2) != 0:      # 2: SYNC_FILE_RANGE_WRITE
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return start


def _convert_one(image: ImageRef, target: str, options: ConvertOptions, source: inspect.Source,
                 progress: Callable[[float], None], what: str, on_process: Callable[[Any], None] | None,
                 writeback: bool, target_fd: int, image_fd: int | None = None) -> None:
    """qemu-img convert of `image` into the (temporary) file `target`, open on target_fd, which qemu-img writes
    through; checking now and then that the job's source is unchanged. writeback: have the kernel write the target
    out meanwhile (see _Writeback). image_fd: the descriptor `image` names, if it does (qemuimg.descriptor_path)."""
    last_poll = [time.monotonic()]

    def on_progress(fraction: float) -> None:
        now = time.monotonic()
        if now - last_poll[0] >= SOURCE_POLL_SECONDS:
            last_poll[0] = now
            inspect.ensure_unchanged(source.identities)
        progress(fraction)

    writer = _Writeback(target_fd) if writeback else None
    try:
        qemuimg.convert(image, qemuimg.descriptor_path(target_fd), options, on_progress, on_process,
                        (target_fd,) if image_fd is None else (target_fd, image_fd))
    except qemuimg.QemuImgError as e:
        if e.code == "NO_SPACE":
            raise _no_space(os.path.dirname(target), e.message) from None
        inspect.ensure_unchanged(source.identities)
        raise OperationError(e.code, f"converting {what} failed: {e.message}", "convert") from None
    finally:
        if writer is not None:
            writer.close()
    inspect.ensure_unchanged(source.identities)


def _compare_one(plan: Planned, options: ConvertOptions, source: inspect.Source, part: _Part,
                 on_process: Callable[[Any], None] | None, temps: TempFiles) -> dict[str, Any]:
    """parameters.verify: the converted disk (still under its temporary name) must hold what its source holds,
    as qemu-img compare reads them both; TOOL_FAILED where they differ. qemu-img reads the output through a
    descriptor of the file made for it, as the conversion wrote it."""
    assert plan.temp
    fd = temps.open_made(plan.temp, os.O_RDONLY)
    try:
        comparison = qemuimg.compare(plan.disk.ref, ImageRef(qemuimg.descriptor_path(fd), options.output_format),
                                     part.of(1, "compare"), on_process, (fd,))
    except qemuimg.QemuImgError as e:
        inspect.ensure_unchanged(source.identities)
        raise OperationError(e.code, f"comparing the converted {plan.disk.label} with its source failed: "
                             f"{e.message}", "compare") from None
    finally:
        os.close(fd)
    inspect.ensure_unchanged(source.identities)
    if not comparison.identical:
        raise OperationError("TOOL_FAILED", f"the converted {plan.disk.label} differs from its source: "
                             f"{comparison.message}", "compare")
    return {"identical": True, "message": comparison.message}


def _flush(fd: int, directory: str) -> None:
    """fsync the output (a descriptor of its own, closed here): it must be entirely on disk before it gets
    its name."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _no_space(directory, "the data could not be flushed") from None
        raise
    finally:
        os.close(fd)


def _finish_one(plan: Planned, options: ConvertOptions, durable: bool, temps: TempFiles) -> dict[str, Any]:
    """Check the output (qcow2) and read its virtual size and, if durable, flush it to disk meanwhile.

    The worker may be root in a directory the submitter owns: what it reads itself (the header, the size)
    and flushes comes through a descriptor of the very file made for the output (TempFiles.open_made), not
    through its name, which the submitter could swap for a link to a file they may not read. qemu-img check
    reads it through that descriptor too, with the submitter's rights (qemuimg.run_as), as the conversion wrote
    it."""
    temp = plan.temp
    assert temp
    fd = temps.open_made(temp, os.O_RDONLY)
    try:
        flushing = None
        if durable:
            own_fd = os.dup(fd)
            flushing = Background(lambda: _flush(own_fd, os.path.dirname(temp)), "flush")
        # Stopped (SIGTERM) or a failed check does not wait for the flush: the file is about to be removed.
        result = (qemuimg.check(ImageRef(qemuimg.descriptor_path(fd), options.output_format), pass_fds=(fd,))
                  if options.output_format == "qcow2" else None)
        virtual_size = qemuimg.output_virtual_size(fd, temp, options.output_format)
        if flushing is not None:
            flushing.result()
        size = os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)
    if result is not None and result.status not in ("ok", "leaks"):
        raise OperationError("TOOL_FAILED", f"the converted {plan.disk.label} failed its check: {result.message}",
                             "check")
    if virtual_size < plan.disk.virtual_size:
        raise OperationError("TOOL_FAILED", f"the converted {plan.disk.label} is smaller than its source", "check")
    return {"source": plan.disk.ref.describe(), "source_member": plan.disk.member,
            "source_format": inspect.DRIVER_TO_NAME.get(plan.disk.ref.format, plan.disk.ref.format),
            "format": options.output_format, "virtual_size": virtual_size,
            "size": size, "check": _without_temp_name(result), "compare": None}


def _without_temp_name(result: qemuimg.CheckResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    report = result.as_dict()
    report["details"] = {k: v for k, v in report["details"].items() if k != "filename"}
    return report


def _commit(pairs: list[tuple[str | None, str]], temps: TempFiles, overwrite: bool, durable: bool,
            owner: dict[str, int] | None = None) -> None:
    """Move every temporary file to its name (next to it), all or nothing (as far as the file system allows);
    if durable, make the new names durable too (fsync of their directories). With owner {"uid", "gid",
    "mode"}, each file gets that owner and mode before its name.

    Each rename is noted first (TempFiles.note_commit), and the files replaced keep a temporary name, which
    stays once the commit is whole: until the result says so, a killed worker's commit is undone from the note
    (tempfiles.undo_commit), the earlier files put back. The worker removes them once its result is written."""
    owner_uid = owner["uid"] if owner else None
    directories: dict[str, int] = {}
    committed: list[tuple[int, str, str | None]] = []   # (directory, name, the file it replaced, kept aside)
    try:
        for temp, destination in pairs:
            assert temp and os.path.dirname(temp) == os.path.dirname(destination)
            directory, name = os.path.split(destination)
            if directory not in directories:
                directories[directory] = temps.directory_still_at(directory)
            fd, temp_name = directories[directory], os.path.basename(temp)
            if owner:
                _hand_over(temps, temp, owner)
            replaced = None
            if overwrite:
                _check_destination(destination, True, owner_uid, dir_fd=fd)
                # Until every output has its name, the file replaced keeps a second one: a failure half-way
                # puts it back instead of leaving neither the old output nor the new.
                replaced = temps.keep_aside(destination, fd)
                temps.note_commit(temp, destination, replaced)
                os.rename(temp_name, name, src_dir_fd=fd, dst_dir_fd=fd)
            else:
                temps.note_commit(temp, destination, None)
                try:
                    # Fails if the name was taken meanwhile: never overwrites.
                    os.link(temp_name, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    raise OperationError("OUTPUT_EXISTS", f"the output {destination} appeared during the job; "
                                         "it was left alone", "commit") from None
                os.unlink(temp_name, dir_fd=fd)
            temps.forget(temp)
            committed.append((fd, name, replaced))
        if durable:
            for fd in directories.values():
                os.fsync(fd)
        for _, _, replaced in committed:
            if replaced:
                temps.forget(replaced)      # kept until the result is written: see above
    except BaseException:
        undone = True
        for fd, name, replaced in reversed(committed):
            try:
                if replaced:
                    os.rename(os.path.basename(replaced), name, src_dir_fd=fd, dst_dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
            except OSError:
                undone = False
                if replaced:    # not put back: its temporary name may be the only one it has left
                    temps.forget(replaced)
        if undone:
            temps.withdraw_commit()
        raise
