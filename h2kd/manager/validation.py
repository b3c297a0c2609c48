"""Host-level checks of a job before it is queued: its source and output exist, are allowed, and fit the caller."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from h2kd.config import Config
from h2kd.model.job import Job


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in (r.resolve() for r in roots))


class HostChecks:
    """Callable as JobManager's host_validator: returns a sentence saying what is wrong, or None."""

    def __init__(self, config: Config):
        self._config = config

    def __call__(self, job: Job) -> str | None:
        return self.check_source(job) or self.check_output(job)

    def check_source(self, job: Job) -> str | None:
        path = job.source
        if not os.path.isabs(path):
            return f"the image path {path!r} must be absolute"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return f"the image {path} does not exist"
        except PermissionError:
            return f"the image {path} cannot be reached"
        if stat.S_ISLNK(st.st_mode):
            return f"the image {path} is a symbolic link; give the path of the file itself"
        if not stat.S_ISREG(st.st_mode):
            return f"the image {path} is not a regular file"
        if not _under(Path(path).resolve(), self._config.source_roots):
            return f"the image {path} is outside the allowed source directories"
        if job.owner != 0 and not _readable_by(st, job.owner):
            return f"permission denied: {path} is not readable by uid {job.owner}"
        return None

    def check_output(self, job: Job) -> str | None:
        if job.operation != "convert":
            return None
        output = job.output
        if not output:
            return "artifacts.output_path is required for convert"
        if not os.path.isabs(output):
            return f"the output path {output!r} must be absolute"
        parent = Path(output).parent
        if not parent.is_dir():
            return f"the output directory {parent} does not exist"
        if not _under(parent.resolve(), self._config.output_roots):
            roots = ", ".join(str(r) for r in self._config.output_roots)
            return f"the output {output} is outside the output directories ({roots})"
        if os.path.lexists(output) and not (job.spec.get("artifacts") or {}).get("overwrite"):
            return f"the output {output} already exists; h2kd never overwrites unless artifacts.overwrite is set"
        return None


def _readable_by(st: os.stat_result, uid: int) -> bool:
    import grp
    import pwd

    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    try:
        user = pwd.getpwuid(uid)
        gids = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    except KeyError:
        gids = set()
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)
