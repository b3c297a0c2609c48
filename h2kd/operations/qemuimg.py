"""A thin wrapper over the qemu-img program: info, measure, check, compare and convert with live progress.

Every call names the input format with -f: qemu-img is never left to guess (a guessed "raw" on untrusted
input would let a crafted file be taken for something else). Images are referred to by ImageRef, which is
either a plain absolute path or a byte range of a larger file (a disk stored inside an OVA's tar), given
to qemu-img as a json: filename over the raw driver's offset/size, so nothing has to be extracted; open
options of the format's driver (a VHD's force_size_calc) go into such a json: filename too.

OperationError, the failure type every operation raises (code, phase, message), lives here because
every operation module sits on top of this one.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import threading
from typing import Any, Callable, Iterator, NamedTuple, Sequence

QEMU_IMG = os.environ.get("H2K_QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("H2K_QEMU_IO", "qemu-io")

# The credentials every qemu-img runs with (subprocess's user, group, extra_groups); empty: the worker's own.
_CREDENTIALS: dict[str, Any] = {}


def run_as(uid: int, gid: int, groups: list[int]) -> None:
    """From now on, run qemu-img with this uid, gid and these groups (uid 0: as the worker, root).

    The worker sets the submitter's: qemu-img follows what an image names (backing files, json: names),
    so with root's rights a crafted image could make it read any file. With theirs, it can reach only what
    they could. (It writes and checks outputs through descriptors of the files h2kd made for them.)"""
    _CREDENTIALS.clear()
    if uid:
        _CREDENTIALS.update(user=uid, group=gid, extra_groups=groups)


# The CPU number `qemu-img convert` and `compare` are started on, if any: see keep_convert_and_compare_on.
_CONVERT_AND_COMPARE_CPU: int | None = None


def keep_convert_and_compare_on(cpu: int | None) -> None:
    """From now on, start `qemu-img convert` (but a compressing one) and `qemu-img compare` on one CPU (None:
    wherever the kernel puts them): the cpu-th of those the worker may use, counted round. h2kd gives the number,
    counted over every CPU of the machine (h2kd.runner.placement says why); the unit may have fewer."""
    global _CONVERT_AND_COMPARE_CPU
    _CONVERT_AND_COMPARE_CPU = cpu


@contextlib.contextmanager
def _on_the_given_cpu() -> Iterator[None]:
    """The calling thread kept on the CPU of keep_convert_and_compare_on while it starts a child, which inherits
    that (and only that)."""
    try:
        before = sorted(os.sched_getaffinity(0))
    except OSError:
        before = []
    if _CONVERT_AND_COMPARE_CPU is None or len(before) < 2:
        yield
        return
    try:
        os.sched_setaffinity(0, {before[_CONVERT_AND_COMPARE_CPU % len(before)]})
    except OSError:     # a seccomp filter or a cpuset that changed meanwhile: the kernel places the child
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):      # the child is started: it must reach the caller, who stops it
            os.sched_setaffinity(0, before)


# The error codes of the result contract that an operation may raise (h2kd.model.result.ErrorCode).
NOT_RETRYABLE = {"VALIDATION_FAILED", "INVALID_IMAGE", "PERMISSION_DENIED", "OUTPUT_EXISTS", "UNSUPPORTED"}


class OperationError(Exception):
    """An operation failed. message is shown to users as is, so it reads as a sentence."""

    def __init__(self, code: str, message: str, phase: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.phase = phase
        self.outputs: dict[str, Any] = {}

    @property
    def retryable(self) -> bool:
        return self.code not in NOT_RETRYABLE


class QemuImgError(OperationError):
    """qemu-img exited with an error; stderr holds its own words."""

    def __init__(self, command: str, returncode: int, stderr: str, code: str = "TOOL_FAILED"):
        text = " ".join(line.removeprefix("qemu-img: ").strip() for line in stderr.strip().splitlines()[-3:])
        super().__init__(code, f"qemu-img {command} failed (exit {returncode}): {text or 'no message'}")
        self.returncode = returncode
        self.stderr = stderr


# The value types here are NamedTuples rather than dataclasses: they are as good for this, and much cheaper
# to define, which matters since every worker start imports this module.
class ImageRef(NamedTuple):
    """An image for qemu-img: a file (absolute path), or `size` bytes at `offset` inside it (a tar member);
    options: open options of the format's driver, as (name, value) pairs (("force_size_calc", "current_size"))."""

    path: str
    format: str
    offset: int | None = None
    size: int | None = None
    options: tuple[tuple[str, str], ...] = ()

    def qemu_name(self) -> str:
        if not self.path.startswith("/"):
            # A relative name with a colon would be taken for a protocol ("nbd:..."), and one inside a json:
            # name would be looked up from qemu-img's working directory.
            raise ValueError(f"image paths given to qemu-img must be absolute: {self.path!r}")
        if self.offset is None and not self.options:
            return self.path
        file: dict[str, Any] = {"driver": "file", "filename": self.path}
        if self.offset is not None:
            file = {"driver": "raw", "offset": self.offset, "size": self.size, "file": file}
        return "json:" + json.dumps({"driver": self.format, **dict(self.options), "file": file})

    def format_args(self, flag: str = "-f") -> list[str]:
        return [flag, self.format]

    def describe(self) -> str:
        return self.path if self.offset is None else f"{self.path} (bytes {self.offset}..{self.offset + (self.size or 0)})"


def _run(command: str, args: list[str], timeout: float | None = 600,
         pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    # errors="replace": qemu-img quotes file names as they are, and an image names its backing file in any bytes.
    try:
        return subprocess.run([QEMU_IMG, command, *args], capture_output=True, text=True, errors="replace",
                              timeout=timeout, stdin=subprocess.DEVNULL, pass_fds=pass_fds, **_CREDENTIALS)
    except FileNotFoundError:
        raise OperationError("TOOL_FAILED", f"the qemu-img program ({QEMU_IMG}) is not installed") from None
    except subprocess.TimeoutExpired:
        raise OperationError("TOOL_FAILED", f"qemu-img {command} did not finish within {timeout} seconds") from None


def _json_output(command: str, proc: subprocess.CompletedProcess[str]) -> Any:
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise QemuImgError(command, proc.returncode, proc.stderr or "output was not JSON") from None


def info(image: ImageRef | str, fmt: str | None = None, *, backing_chain: bool = False,
         force_share: bool = True) -> Any:
    """`qemu-img info --output=json`: a dict, or a list (image first) with backing_chain.

    fmt=None (only with a plain path) lets qemu-img probe; inspection uses that solely to name a format
    it does not itself recognise, never to decide how to read a file.
    """
    args = ["--output=json"]
    if force_share:
        args.append("-U")     # reading metadata of an image in use is harmless and often wanted
    if backing_chain:
        args.append("--backing-chain")
    if isinstance(image, ImageRef):
        args += image.format_args() + [image.qemu_name()]
    else:
        args += (["-f", fmt] if fmt else []) + [image]
    proc = _run("info", args)
    if proc.returncode != 0:
        raise QemuImgError("info", proc.returncode, proc.stderr, code="INVALID_IMAGE")
    return _json_output("info", proc)


def vpc_footer(tail: bytes) -> bytes | None:
    """`tail`, a file's last 512 bytes, if it is a VHD footer (a fixed VHD is a raw disk plus it); else None."""
    return tail if len(tail) == 512 and tail.startswith(b"conectix") else None


def output_virtual_size(fd: int, path: str, fmt: str) -> int:
    """The virtual size of an image we just wrote ourselves (open on fd; path names it in errors), from its
    header (qcow2) or its length (raw), without another qemu-img run."""
    if fmt == "raw":
        return os.fstat(fd).st_size
    if fmt == "qcow2":
        header = os.pread(fd, 32, 0)
        if len(header) == 32 and header.startswith(b"QFI\xfb"):
            return int.from_bytes(header[24:32], "big")
        raise OperationError("TOOL_FAILED", f"{path} has no qcow2 header", "check")
    raise OperationError("UNSUPPORTED", f"h2kd does not write {fmt} images", "check")


def probe_format(path: str, tail: bytes) -> str:
    """The format qemu-img sees in a file, with a fixed VHD named "vpc" (qemu-img alone calls it raw).

    tail: the file's last 512 bytes (b"" if it is shorter), read through a descriptor of the file that was
    checked: opened again by its path, as root, the file could be another one by then (a directory on the way
    swapped for a symlink), and a FIFO there would hang the job."""
    fmt = info(path)["format"]
    if fmt != "raw":
        return fmt
    return "raw" if vpc_footer(tail) is None else "vpc"


def measure(image: ImageRef, output_format: str, options: dict[str, Any] | None = None) -> dict[str, int]:
    """`qemu-img measure`: {"required": bytes for the data, "fully-allocated": bytes if preallocated}."""
    args = ["--output=json", "-O", output_format]
    opts = _options_text(options or {})
    if opts:
        args += ["-o", opts]
    args += image.format_args() + [image.qemu_name()]
    proc = _run("measure", args)
    if proc.returncode != 0:
        raise QemuImgError("measure", proc.returncode, proc.stderr, code="INVALID_IMAGE")
    data = _json_output("measure", proc)
    return {"required": int(data["required"]), "fully-allocated": int(data["fully-allocated"])}


_HEX_LINE = re.compile(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2}\s)+)", re.MULTILINE)


def read_head(image: ImageRef, length: int) -> bytes:
    """The first `length` bytes of the disk the image holds, as a guest sees them (`qemu-io -c "read -v"`,
    read-only, with the rights qemu-img has); b"" if qemu-io cannot read them."""
    args = [QEMU_IO, "-r", "-U", *image.format_args(), "-c", f"read -v 0 {length}", image.qemu_name()]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=120,
                              stdin=subprocess.DEVNULL, **_CREDENTIALS)
    except (OSError, subprocess.TimeoutExpired):
        return b""
    if proc.returncode != 0:
        return b""
    return bytes.fromhex("".join(_HEX_LINE.findall(proc.stdout)).replace(" ", ""))


def data_bytes(image: ImageRef) -> int:
    """Bytes of the image that hold data (`qemu-img map`); zero and unallocated ranges do not count."""
    return sum(int(e["length"]) for e in _map_entries(image) if e.get("data") and not e.get("zero"))


def data_end(image: ImageRef) -> int:
    """Where the data `qemu-img map` places in the image's own file ends: the file must hold at least this many
    bytes. Ranges qemu gives no offset for (compressed clusters) and those of backing files (depth > 0) do not
    count; zero ones do, as qemu calls zero what it would read past the end of the file."""
    return extent_data_ends(image, (1 << 64,))[0]


def extent_data_ends(image: ImageRef, extent_sizes: Sequence[int]) -> list[int]:
    """data_end() of each file of an image made of extents (a split VMDK) whose virtual sizes are
    `extent_sizes`, in order: a range's offset is in the file of the extent its start falls in. (A range
    running on into the next extent can only have been merged by qemu-img because its offsets go on there.)"""
    starts = list(itertools.accumulate(extent_sizes, initial=0))[:-1]
    ends = [0] * len(extent_sizes)
    for entry in _map_entries(image):
        if not entry.get("data") or "offset" not in entry or entry.get("depth"):
            continue
        start, length, offset = int(entry["start"]), int(entry["length"]), int(entry["offset"])
        index = bisect.bisect_right(starts, start) - 1
        while length > 0 and 0 <= index < len(extent_sizes):
            part = min(length, starts[index] + extent_sizes[index] - start)
            ends[index] = max(ends[index], offset + part)
            start, offset, length, index = start + part, offset + part, length - part, index + 1
    return ends


def _map_entries(image: ImageRef) -> Iterator[dict[str, Any]]:
    """The ranges of `qemu-img map --output=json`, one at a time, as qemu-img writes them: a large image
    written here and there has millions, not worth holding all at once."""
    proc, reader, stderr_parts = _started("map", ["--output=json", *image.format_args(), image.qemu_name()],
                                          text=True)
    decoder = json.JSONDecoder()
    pending = ""
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            pending += line
            while True:
                pending = pending.lstrip("[,] \t\r\n")
                if not pending:
                    break
                try:
                    entry, end = decoder.raw_decode(pending)
                except ValueError:
                    break           # a range not complete yet: the next line has the rest
                pending = pending[end:]
                yield entry
        returncode = proc.wait()
    finally:
        _stop(proc)                 # the caller stopped early, or failed: no qemu-img left behind
        reader.join(timeout=5)
        proc.stdout.close()  # type: ignore[union-attr]
    if returncode != 0 or pending:
        raise QemuImgError("map", returncode, "".join(stderr_parts) or "output was not JSON", code="INVALID_IMAGE")


class CheckResult(NamedTuple):
    """status: ok | leaks (harmless unused clusters) | corrupt | failed (could not be checked) | unsupported."""

    status: str
    returncode: int
    message: str
    details: dict[str, Any]

    @property
    def usable(self) -> bool:
        return self.status in ("ok", "leaks", "unsupported")

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "exit_code": self.returncode, "message": self.message, "details": self.details}


_CHECK_MEANING = {
    0: ("ok", "no errors were found"),
    1: ("failed", "the check could not be completed (the image is probably damaged or truncated)"),
    2: ("corrupt", "the image is corrupted"),
    3: ("leaks", "clusters are leaked (wasted space, but the data is intact)"),
    63: ("unsupported", "this image format does not support consistency checks"),
}


def check(image: ImageRef, *, force_share: bool = False, pass_fds: tuple[int, ...] = ()) -> CheckResult:
    """`qemu-img check` with its exit code turned into a status and a sentence; pass_fds as for convert()."""
    args = ["--output=json"] + (["-U"] if force_share else []) + image.format_args() + [image.qemu_name()]
    proc = _run("check", args, timeout=None, pass_fds=pass_fds)
    status, meaning = _CHECK_MEANING.get(proc.returncode, ("failed", "qemu-img check failed"))
    try:
        details = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        details = {}
    tool_words = " ".join(line.strip() for line in (proc.stderr or "").splitlines()[-3:])
    message = meaning + (f": {tool_words}" if tool_words and status not in ("ok", "unsupported") else "")
    return CheckResult(status, proc.returncode, message, details if isinstance(details, dict) else {})


class CompareResult(NamedTuple):
    identical: bool
    message: str


def compare(first: ImageRef, second: ImageRef, progress: Callable[[float], None] | None = None,
            on_process: Callable[[subprocess.Popen[bytes] | None], None] | None = None,
            pass_fds: tuple[int, ...] = ()) -> CompareResult:
    """`qemu-img compare` (contents only; a longer image must be zero past the shorter one's end), calling
    progress(fraction) as it goes; on_process and pass_fds as for convert()."""
    args = ["-p", "-U"] + first.format_args("-f") + second.format_args("-F") + [first.qemu_name(), second.qemu_name()]
    returncode, said, stderr = _with_progress("compare", args, progress, on_process, pass_fds)
    text = (said + " " + stderr.strip()).strip()
    if returncode == 0:
        return CompareResult(True, text or "Images are identical.")
    if returncode == 1:
        return CompareResult(False, text or "Images differ.")
    raise QemuImgError("compare", returncode, stderr or f"qemu-img was killed by signal {-returncode}",
                       code="TOOL_FAILED")


class ConvertOptions(NamedTuple):
    output_format: str = "qcow2"
    compress: bool = False
    compression_type: str | None = None
    cluster_size: int | None = None
    preallocation: str | None = None
    sparse: bool = True
    coroutines: int | None = None
    rate_limit: int | None = None          # bytes per second, None: unlimited

    def create_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.output_format == "qcow2":
            if self.cluster_size:
                opts["cluster_size"] = self.cluster_size
            if self.compress and self.compression_type:
                opts["compression_type"] = self.compression_type
        if self.preallocation:
            opts["preallocation"] = self.preallocation
        return opts

    def arguments(self) -> list[str]:
        args = ["-O", self.output_format]
        opts = _options_text(self.create_options())
        if opts:
            args += ["-o", opts]
        if self.compress:
            args.append("-c")
        if not self.sparse or self.preallocation in ("falloc", "full"):
            args += ["-S", "0"]          # write every block, zeros included
        if self.coroutines:
            args += ["-m", str(self.coroutines)]
        # Out-of-order writes only help and only are safe where block placement does not matter:
        # a raw file; a qcow2 would get its clusters allocated in a scattered order, compression forbids it.
        if self.output_format == "raw" and not self.compress:
            args.append("-W")
        if self.rate_limit:
            args += ["-r", str(self.rate_limit)]
        return args


def _options_text(options: dict[str, Any]) -> str:
    # qemu option values escape a comma by doubling it; our values never contain one, but be exact.
    return ",".join(f"{k}={str(v).replace(',', ',,')}" for k, v in options.items())


_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def descriptor_path(fd: int) -> str:
    """A name for qemu-img of the file open on `fd` (given to it with pass_fds): opening /proc/self/fd/N
    reaches that very file, whatever its path leads to now. For files in a directory someone else may
    change, where root must not follow a name swapped for a symlink."""
    return f"/proc/self/fd/{fd}"


def convert(source: ImageRef, destination: str, options: ConvertOptions,
            progress: Callable[[float], None] | None = None,
            on_process: Callable[[subprocess.Popen[bytes] | None], None] | None = None,
            pass_fds: tuple[int, ...] = ()) -> None:
    """Run `qemu-img convert -p`, calling progress(fraction 0..1) as qemu-img reports it (progress and
    on_process: see _with_progress). pass_fds: the descriptors the source or destination name (see
    descriptor_path)."""
    if not destination.startswith("/"):
        raise ValueError("the destination given to qemu-img must be an absolute path")
    args = ["-p", *source.format_args(), *options.arguments(), source.qemu_name(), destination]
    # Compressing is the work itself, which qemu-img may spread over its threads: left to the kernel.
    returncode, _, stderr = _with_progress("convert", args, progress, on_process, pass_fds,
                                           on_the_given_cpu=not options.compress)
    if returncode != 0:
        code = "NO_SPACE" if "No space left on device" in stderr else "TOOL_FAILED"
        if returncode < 0:
            stderr = stderr or f"qemu-img was killed by signal {-returncode}"
        raise QemuImgError("convert", returncode, stderr, code=code)
    if progress:
        progress(1.0)


def _started(command: str, args: list[str], text: bool, pass_fds: tuple[int, ...] = (),
             on_the_given_cpu: bool = False) -> tuple[Any, Any, list[Any]]:
    """`qemu-img command args` started with its stdout piped, and a thread collecting its stderr: the process,
    the thread, and the list its stderr lands in once the thread ends. on_the_given_cpu: started on the CPU of
    keep_convert_and_compare_on."""
    try:
        with _on_the_given_cpu() if on_the_given_cpu else contextlib.nullcontext():
            proc = subprocess.Popen([QEMU_IMG, command, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=text, errors="replace" if text else None,
                                    bufsize=-1 if text else 0, pass_fds=pass_fds, **_CREDENTIALS)
    except FileNotFoundError:
        raise OperationError("TOOL_FAILED", f"the qemu-img program ({QEMU_IMG}) is not installed") from None
    stderr: list[Any] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    return proc, reader, stderr


def _with_progress(command: str, args: list[str], progress: Callable[[float], None] | None,
                   on_process: Callable[[subprocess.Popen[bytes] | None], None] | None,
                   pass_fds: tuple[int, ...], on_the_given_cpu: bool = True) -> tuple[int, str, str]:
    """Run `qemu-img command args` (args with -p), calling progress(fraction 0..1) as it reports; its exit
    status, what else it wrote to stdout, and its stderr.

    If progress() (or a signal handler) raises, the child is killed and waited for before the exception goes
    on, so no writer is left behind the caller's clean-up. on_process is told the running child (and None once
    it has ended), for a signal handler that must stop it."""
    proc, reader, stderr_chunks = _started(command, args, text=False, pass_fds=pass_fds,
                                           on_the_given_cpu=on_the_given_cpu)
    if on_process:
        on_process(proc)
    said: list[bytes] = []
    try:
        pending = b""
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            pending += chunk
            *complete, pending = re.split(rb"[\r\n]", pending)
            for piece in complete:
                match = _PROGRESS.search(piece)
                if match and progress:
                    progress(min(float(match.group(1)) / 100.0, 1.0))
                elif not match and piece.strip():
                    said.append(piece.strip())
        returncode = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        reader.join(timeout=5)
        proc.stdout.close()  # type: ignore[union-attr]
        if on_process:
            on_process(None)
    said += [pending.strip()] if pending.strip() else []
    return returncode, b" ".join(said).decode(errors="replace"), b"".join(stderr_chunks).decode(errors="replace")


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            pass
