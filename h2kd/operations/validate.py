"""Validation: `qemu-img check` of an image with a clear verdict, and optionally a content comparison.

outputs = {"check": {status, exit_code, message, details}, "compare": {identical, message, with} | None,
           "format": ..., "virtual_size": ...}
A corrupt image (or one that cannot be checked at all) fails the job with INVALID_IMAGE; leaked clusters
and formats without a check (raw, VHD) pass, and say so. Differing contents in the comparison fail the
job with VALIDATION_FAILED, since that is what was asked to be shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from h2kd.operations import inspect, qemuimg
from h2kd.operations.qemuimg import OperationError


def _single_disk(path: str, declared: str | None, what: str, reader_uid: int | None = None,
                 named_by_spec_only: bool = False,
                 source_roots: Sequence[str] = ("/",)) -> tuple[inspect.Disk, list[inspect.FileIdentity]]:
    """named_by_spec_only: h2kd did not record this file's identity at submission (compare_with), so the
    submitter's right to read it is checked here too, not only that of the files it refers to, and that it
    still lies under the source roots."""
    if reader_uid and named_by_spec_only:
        _looked_up_by(reader_uid, path, what, source_roots)
    source = inspect.load_source(path, declared, check_disks=False, reader_uid=reader_uid)
    if reader_uid and named_by_spec_only:
        inspect.check_readable_by(source.identities[:1], reader_uid)
    if len(source.disks) != 1:
        raise OperationError("UNSUPPORTED", f"{what} {path} holds {len(source.disks)} disks; validate takes one disk",
                             "validate")
    return source.disks[0], source.identities


def _looked_up_by(uid: int, path: str, what: str, source_roots: Sequence[str]) -> None:
    """The submitter looks the file up first, with their own rights, and root then reads only the file they
    found there (inspect.expect_source): a path whose directory was swapped for a link to one closed to them
    after h2kd's check at submission gets the submitter's answer, and nothing root parsed of what lies there."""
    from h2kd.access import check_source_readable, groups_for
    from h2kd.errors import H2kError, InvalidArgument, NotAuthorized

    try:
        # Checked at submission too; a symlink of the submitter's on the way may lead elsewhere now.
        _, seen = check_source_readable(path, uid, groups_for(uid), source_roots)
    except NotAuthorized as e:
        raise OperationError("PERMISSION_DENIED", f"{what}: {e}", "validate") from None
    except InvalidArgument as e:        # no such file, or no regular file: as the submitter sees it
        raise OperationError("INVALID_IMAGE", f"{what}: {e}", "validate") from None
    except H2kError as e:               # the check itself did not finish (a file system not answering): may pass later
        raise OperationError("TOOL_FAILED", f"{what}: {e}", "validate") from None
    inspect.expect_source(path, f"{seen.st_dev}:{seen.st_ino}")


def _with_outputs(error: OperationError, outputs: dict[str, Any]) -> OperationError:
    error.outputs = outputs   # the failed result still shows what was found
    return error


def run_validate(spec: dict[str, Any], progress: inspect.ProgressFn, reader_uid: int | None = None,
                 source_roots: Sequence[str] = ("/",)) -> dict[str, Any]:
    """The validate operation. reader_uid: the submitter, when not root (see inspect.load_source); source_roots:
    where the files a spec names may be (Config.source_roots)."""
    image, parameters = spec["image"], spec.get("parameters") or {}
    progress("validate", 0, 0, "checking the image")
    disk, read = _single_disk(image["path"], image.get("format"), "the image", reader_uid)
    result = qemuimg.check(disk.ref, force_share=True)
    # Nothing qemu-img says goes out before the files it read are known unchanged since they were vetted.
    inspect.ensure_unchanged(read, "check")
    outputs: dict[str, Any] = {"format": inspect.DRIVER_TO_NAME.get(disk.ref.format, disk.ref.format),
                               "virtual_size": disk.virtual_size, "check": result.as_dict(), "compare": None}
    if result.status in ("corrupt", "failed"):
        raise _with_outputs(OperationError("INVALID_IMAGE", f"{image['path']} failed its check: {result.message}",
                                           "check"), outputs)
    try:
        inspect.refuse_incomplete(disk, result, read)     # a copy cut short passes qemu-img check
    except OperationError as e:
        raise _with_outputs(e, outputs) from None
    other_path = parameters.get("compare_with")
    if other_path:
        progress("compare", 0, 0, f"comparing with {other_path}")
        other, other_read = _single_disk(other_path, None, "parameters.compare_with", reader_uid,
                                         named_by_spec_only=True, source_roots=source_roots)
        comparison = qemuimg.compare(disk.ref, other.ref)
        inspect.ensure_unchanged(read + other_read, "compare")
        outputs["compare"] = {"with": other_path, "identical": comparison.identical, "message": comparison.message}
        if not comparison.identical:
            raise _with_outputs(OperationError("VALIDATION_FAILED", f"{image['path']} and {other_path} differ in "
                                               f"content: {comparison.message}", "compare"), outputs)
    progress("validate", 1, 1, "done")
    return outputs
