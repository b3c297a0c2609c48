"""Host-level checks of a job before it is queued: its source and output exist, are allowed, and fit the caller.

A refusal of the caller (it may not read the source, write the output, or write an image repaired in
place, or that image lies outside the output roots) raises NotAuthorized, so nothing is stored; any other problem (a missing file, an output that
exists) is returned as a sentence and the job ends failed with VALIDATION_FAILED. The source's identity
(device and inode) is recorded on the job so that the worker converts exactly the file that was checked.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from h2kd.access import (acting_groups, check_image_writable, check_output_allowed, check_repairable_in_place,
                         check_source_readable)
from h2kd.config import Config
from h2kd.errors import H2kError, InvalidArgument, NotAuthorized
from h2kd.model.job import Job


class HostChecks:
    """Callable as JobManager's host_validator: (job, source_proof) -> problem or None."""

    def __init__(self, config: Config):
        self._config = config

    def __call__(self, job: Job, source_proof: os.stat_result | None = None) -> str | None:
        gids = acting_groups(job.owner, job.owner_groups) if job.owner else []
        if job.owner and not gids:
            # Acting with some stand-in group ("nogroup") would give the caller files of that group they may not
            # read themselves.
            raise NotAuthorized(f"uid {job.owner} has no group h2kd may act with (no entry in the user database, "
                                "or the calling process kept none of the user's groups): h2kd reads and writes "
                                "files only with a caller's own user and groups")
        try:
            if source_proof is not None and not job.owner:
                self._check_proof(job.source, source_proof)
                resolved, seen = Path(job.source), source_proof
            else:
                # With a descriptor too: the worker's qemu-img reads the image by its path with the caller's
                # rights, so a descriptor alone is not enough. Said now rather than failing later.
                resolved, seen = check_source_readable(job.source, job.owner, gids, self._config.source_roots)
                if source_proof is not None:
                    self._check_proof(job.source, source_proof)
            if job.operation == "offline_fix" and not (job.spec.get("parameters") or {}).get("dry_run"):
                check_repairable_in_place(resolved, self._config.output_roots)
                check_image_writable(resolved, seen.st_dev, seen.st_ino, job.owner, gids)
            job.source_identity = f"{seen.st_dev}:{seen.st_ino}"
            if job.operation == "convert" and job.output:
                overwrite = bool((job.spec.get("artifacts") or {}).get("overwrite"))
                check_output_allowed(job.output, job.owner, gids, self._config.output_roots, overwrite)
            compare_with = (job.spec.get("parameters") or {}).get("compare_with")
            if compare_with:
                check_source_readable(compare_with, job.owner, gids, self._config.source_roots)
        except NotAuthorized:
            raise
        except H2kError as e:
            return str(e)
        return None

    @staticmethod
    def _check_proof(path: str, proof: os.stat_result) -> None:
        """The caller opened the source itself: the path must name that very file, not a link to it."""
        try:
            seen = os.lstat(path)
        except OSError as e:
            raise InvalidArgument(f"cannot use {path}: {e.strerror}") from None
        if stat.S_ISLNK(seen.st_mode):
            raise NotAuthorized(f"refusing {path}: it is a symbolic link; give the path of the image itself")
        if (seen.st_dev, seen.st_ino) != (proof.st_dev, proof.st_ino):
            raise NotAuthorized(f"refusing {path}: the file descriptor passed is not this file")
