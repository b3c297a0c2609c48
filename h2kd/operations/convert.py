"""Conversion: every disk of a source to qcow2 or raw, safely, with overall progress.

Where outputs go (artifacts.output_path):
  - an existing directory: the disks are written into it, named after the source: "<stem>.<ext>" for a
    single disk, "<stem>-disk<N>.<ext>" for a VM with several disks (in the VM's disk order);
  - any other path: a single disk is written exactly there; for several disks it is a base name, and disk N
    becomes "<path without its .qcow2/.raw/.img suffix>-disk<N>.<ext>";
  - null: a directory "<first output root>/<job_id>" is created and used as above.
  The domain XML (parameters domain_xml: true) is written next to the disks as "<base>.xml".

Safety rules:
  - every output's parent must resolve (realpath) under one of the output roots;
  - each disk is written to a temporary name in the destination's directory, created with O_EXCL and
    O_NOFOLLOW, then fsynced and (qcow2) checked; only when every disk is done are they all moved to their
    names, and never over an existing file unless artifacts.overwrite is true (even then never over a
    symlink or a directory);
  - free space is checked before starting (qemu-img measure); ENOSPC while writing gives NO_SPACE;
  - a source that disappears or changes during the job gives SOURCE_CHANGED;
  - whatever ends the job early (error, SIGTERM), the temporary files are removed.
OVA disks are read in place (a byte range of the tar, see qemuimg.ImageRef): nothing is extracted.
The environment variable H2K_RATE_LIMIT (bytes per second) limits qemu-img's I/O (an operator setting,
passed through config.worker_environment).
"""

from __future__ import annotations

import errno
import os
import re
import time
import xml.sax.saxutils as sax
from dataclasses import dataclass
from typing import Any, Callable

from h2kd.operations import inspect, qemuimg
from h2kd.operations.qemuimg import ConvertOptions, ImageRef, OperationError

EXTENSIONS = {"qcow2": "qcow2", "raw": "raw"}
TEMP_PREFIX = ".h2k-tmp-"
SOURCE_POLL_SECONDS = 0.5


@dataclass
class Planned:
    disk: inspect.Disk
    destination: str
    needed: int
    temp: str | None = None


class TempFiles:
    """Temporary outputs of this job; removed unless committed."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def create(self, destination: str) -> str:
        directory, name = os.path.split(destination)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for _ in range(100):
                temp_name = f"{TEMP_PREFIX}{os.urandom(6).hex()}-{name}"[:255]
                try:
                    fd = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600, dir_fd=dir_fd)
                except FileExistsError:
                    continue
                os.close(fd)
                path = os.path.join(directory, temp_name)
                self.paths.append(path)
                return path
        finally:
            os.close(dir_fd)
        raise OperationError("INTERNAL", f"could not create a temporary file in {directory}")

    def forget(self, path: str) -> None:
        self.paths.remove(path)

    def remove_all(self) -> None:
        for path in self.paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.paths.clear()


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


def _stem(source: inspect.Source) -> str:
    name = (source.vm or {}).get("name") or os.path.basename(source.path)
    name = re.sub(r"\.(vmdk|vhdx?|vdi|qcow2|raw|img|ova|ovf|vmx)$", "", name, flags=re.I)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "disk"


def plan_outputs(source: inspect.Source, output_path: str | None, job_id: str, roots: list[str],
                 output_format: str, overwrite: bool) -> tuple[list[str], str]:
    """Destination of each disk and the base name (for the domain XML); refuses anything unsafe."""
    if not roots:
        raise OperationError("VALIDATION_FAILED", "no output roots are configured; outputs cannot be written")
    ext = EXTENSIONS[output_format]
    count = len(source.disks)
    if output_path is None:
        directory = os.path.join(roots[0], job_id)
        if not _under_roots(roots[0], roots):
            raise OperationError("PERMISSION_DENIED", f"the output root {roots[0]} is not usable")
        os.makedirs(directory, mode=0o750, exist_ok=True)
        output_path = directory
    if not os.path.isabs(output_path):
        raise OperationError("VALIDATION_FAILED", "artifacts.output_path must be an absolute path")
    if os.path.isdir(output_path) and not os.path.islink(output_path):
        directory, base = output_path, _stem(source)
    else:
        directory, name = os.path.split(output_path.rstrip("/"))
        base = re.sub(r"\.(qcow2|raw|img)$", "", name) if count > 1 else name
    if not _under_roots(directory, roots):
        raise OperationError("PERMISSION_DENIED", f"the output location {directory} is outside the configured "
                             f"output roots ({', '.join(roots)})")
    if not os.path.isdir(directory):
        raise OperationError("VALIDATION_FAILED", f"the output directory {directory} does not exist")
    directory = os.path.realpath(directory)
    if count == 1:
        names = [base if not os.path.isdir(output_path) or os.path.islink(output_path) else f"{base}.{ext}"]
    else:
        names = [f"{base}-disk{i}.{ext}" for i in range(1, count + 1)]
    destinations = [os.path.join(directory, n) for n in names]
    for destination in destinations:
        _check_destination(destination, overwrite)
    base_path = os.path.join(directory, re.sub(r"\.(qcow2|raw|img)$", "", os.path.basename(base)))
    return destinations, base_path


def _check_destination(destination: str, overwrite: bool) -> None:
    try:
        st = os.lstat(destination)
    except FileNotFoundError:
        return
    if os.path.islink(destination) or not os.path.isfile(destination):
        raise OperationError("OUTPUT_EXISTS", f"the output {destination} exists and is not a regular file; "
                             "it is never replaced")
    if not overwrite:
        raise OperationError("OUTPUT_EXISTS", f"the output {destination} already exists (set artifacts.overwrite "
                             "to replace it)")
    del st


# ---------------------------------------------------------------- the operation

def _needed_bytes(disk: inspect.Disk, options: ConvertOptions) -> int:
    if options.preallocation in ("falloc", "full") or not options.sparse:
        if options.output_format == "raw":
            return disk.virtual_size
        return qemuimg.measure(disk.ref, "qcow2", options.create_options())["fully-allocated"]
    sizes = inspect.required_sizes(disk, options.create_options() if options.output_format == "qcow2" else None)
    return sizes[options.output_format]


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _no_space(directory: str, detail: str) -> OperationError:
    return OperationError("NO_SPACE", f"no space left on the device of {directory}: {detail}; the partial "
                          "output was removed", "convert")


def run_convert(spec: dict[str, Any], output_roots: list[str], progress: inspect.ProgressFn,
                on_process: Callable[[Any], None] | None = None,
                owner: dict[str, int] | None = None) -> dict[str, Any]:
    """The convert operation: outputs {"disks": [...], "domain_xml": path|None, "report": ...}.

    owner {"uid", "gid", "mode"}: whom the outputs are handed to (the submitter), set before they get their names.
    """
    image, parameters, artifacts = spec["image"], spec.get("parameters") or {}, spec.get("artifacts") or {}
    options = options_from(parameters)
    progress("inspect", 0, 0, "reading the source")
    source = inspect.load_source(image["path"], image.get("format"), image.get("checksum"))
    destinations, base = plan_outputs(source, artifacts.get("output_path"), spec.get("job_id") or "job",
                                      output_roots, options.output_format, bool(artifacts.get("overwrite")))
    domain_path = base + ".xml" if parameters.get("domain_xml") else None
    if domain_path:
        _check_destination(domain_path, bool(artifacts.get("overwrite")))
    plans = [Planned(disk, dest, _needed_bytes(disk, options)) for disk, dest in zip(source.disks, destinations)]
    directory = os.path.dirname(destinations[0])
    needed, free = sum(p.needed for p in plans), _free_bytes(directory)
    if needed > free:
        raise OperationError("NO_SPACE", f"not enough space in {directory}: the output needs {needed} bytes, "
                             f"{free} are free", "convert")
    verify_total = source.verify_bytes()
    weights = [max(p.needed, 1) for p in plans]
    total = verify_total + sum(weights)
    verification = inspect.verify(source, lambda done: progress("verify", done, total, "checking sums"))
    temps = TempFiles()
    outputs: list[dict[str, Any]] = []
    try:
        done_before = verify_total
        for index, (plan, weight) in enumerate(zip(plans, weights), 1):
            label = f"disk {index}/{len(plans)}"
            plan.temp = temps.create(plan.destination)
            _convert_one(plan, options, source, label, done_before, weight, total, progress, on_process)
            done_before += weight
        progress("check", total, total, "checking outputs")
        for plan in plans:
            outputs.append(_finish_one(plan, options))
        inspect.ensure_unchanged(source.identities)
        if domain_path:
            temp = temps.create(domain_path)
            with open(temp, "w", encoding="utf-8") as f:
                f.write(domain_xml(source, [p.destination for p in plans], options.output_format))
                f.flush()
                os.fsync(f.fileno())
            plans_to_commit = [(p.temp, p.destination) for p in plans] + [(temp, domain_path)]
        else:
            plans_to_commit = [(p.temp, p.destination) for p in plans]
        if owner:
            for temp, _ in plans_to_commit:
                os.chown(temp, owner["uid"], owner["gid"], follow_symlinks=False)
                os.chmod(temp, owner.get("mode", 0o640))
        _commit(plans_to_commit, temps, bool(artifacts.get("overwrite")))
    finally:
        temps.remove_all()
    progress("convert", total, total, "done")
    for entry, plan in zip(outputs, plans):
        entry["path"] = plan.destination
    return {"disks": outputs, "domain_xml": domain_path,
            "report": inspect.report(source, verification, None),
            "bytes_read": sum(d.ref.size or int(d.info.get("actual-size", 0)) for d in source.disks),
            "bytes_written": sum(o["size"] for o in outputs)}


def _convert_one(plan: Planned, options: ConvertOptions, source: inspect.Source, label: str, done_before: int,
                 weight: int, total: int, progress: inspect.ProgressFn, on_process: Callable[[Any], None] | None
                 ) -> None:
    last_poll = [time.monotonic()]

    def on_progress(fraction: float) -> None:
        now = time.monotonic()
        if now - last_poll[0] >= SOURCE_POLL_SECONDS:
            last_poll[0] = now
            inspect.ensure_unchanged(source.identities)
        progress("convert", done_before + int(weight * fraction), total, label)

    assert plan.temp
    try:
        qemuimg.convert(plan.disk.ref, plan.temp, options, on_progress, on_process)
    except qemuimg.QemuImgError as e:
        if e.code == "NO_SPACE":
            raise _no_space(os.path.dirname(plan.temp), e.message) from None
        inspect.ensure_unchanged(source.identities)
        raise OperationError(e.code, f"converting {label} ({plan.disk.label}) failed: {e.message}", "convert") \
            from None
    inspect.ensure_unchanged(source.identities)
    try:
        fd = os.open(plan.temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _no_space(os.path.dirname(plan.temp), "the data could not be flushed") from None
        raise


def _finish_one(plan: Planned, options: ConvertOptions) -> dict[str, Any]:
    assert plan.temp
    ref = ImageRef(plan.temp, options.output_format)
    result = None
    if options.output_format == "qcow2":
        result = qemuimg.check(ref)
        if result.status not in ("ok", "leaks"):
            raise OperationError("TOOL_FAILED", f"the converted {plan.disk.label} failed its check: {result.message}",
                                 "check")
    out_info = qemuimg.info(ref, force_share=False)
    if int(out_info["virtual-size"]) < plan.disk.virtual_size:
        raise OperationError("TOOL_FAILED", f"the converted {plan.disk.label} is smaller than its source", "check")
    return {"source": plan.disk.ref.describe(), "source_member": plan.disk.member,
            "source_format": inspect.DRIVER_TO_NAME.get(plan.disk.ref.format, plan.disk.ref.format),
            "format": options.output_format, "virtual_size": int(out_info["virtual-size"]),
            "size": os.stat(plan.temp).st_blocks * 512, "check": _without_temp_name(result)}


def _without_temp_name(result: qemuimg.CheckResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    report = result.as_dict()
    report["details"] = {k: v for k, v in report["details"].items() if k != "filename"}
    return report


def _commit(pairs: list[tuple[str | None, str]], temps: TempFiles, overwrite: bool) -> None:
    """Move every temporary file to its name, all or nothing (as far as the file system allows)."""
    committed: list[str] = []
    try:
        for temp, destination in pairs:
            assert temp
            if overwrite:
                _check_destination(destination, True)
                os.rename(temp, destination)
            else:
                try:
                    os.link(temp, destination)      # fails if the name was taken meanwhile: never overwrites
                except FileExistsError:
                    raise OperationError("OUTPUT_EXISTS", f"the output {destination} appeared during the job; "
                                         "it was left alone", "commit") from None
                os.unlink(temp)
            temps.forget(temp)
            committed.append(destination)
    except BaseException:
        for destination in committed:
            try:
                os.unlink(destination)
            except OSError:
                pass
        raise
    for directory in {os.path.dirname(d) for _, d in pairs}:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- libvirt domain XML

def domain_xml(source: inspect.Source, disk_paths: list[str], disk_format: str) -> str:
    """A libvirt domain for the converted VM: virtio disks and network, CPUs, memory and firmware."""
    vm = source.vm or {}
    name = _stem(source)
    memory = int(vm.get("memory_mib") or 1024)
    cpus = int(vm.get("cpus") or 1)
    q = sax.quoteattr
    lines = ["<domain type='kvm'>", f"  <name>{sax.escape(name)}</name>",
             f"  <memory unit='MiB'>{memory}</memory>", f"  <vcpu>{cpus}</vcpu>"]
    if vm.get("firmware") == "uefi":
        lines += ["  <os firmware='efi'>", "    <type arch='x86_64' machine='q35'>hvm</type>", "  </os>"]
    else:
        lines += ["  <os>", "    <type arch='x86_64' machine='q35'>hvm</type>", "  </os>"]
    lines += ["  <features><acpi/><apic/></features>", "  <cpu mode='host-model'/>", "  <devices>"]
    for index, path in enumerate(disk_paths):
        target = "vd" + chr(ord("a") + index) if index < 26 else f"vd{index}"
        lines += ["    <disk type='file' device='disk'>",
                  f"      <driver name='qemu' type={q(disk_format)}/>",
                  f"      <source file={q(path)}/>", f"      <target dev={q(target)} bus='virtio'/>",
                  "    </disk>"]
    for nic in vm.get("nics") or [{}]:
        lines += ["    <interface type='network'>", "      <source network='default'/>"]
        mac = (nic.get("mac") or "").strip()
        if re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}", mac):
            lines.append(f"      <mac address={q(mac.lower())}/>")
        lines += ["      <model type='virtio'/>", "    </interface>"]
    lines += ["    <console type='pty'/>", "  </devices>", "</domain>", ""]
    return "\n".join(lines)
