"""Host-level checks of a job before it is queued: its source and output exist, are allowed, and fit the caller.

A refusal of the caller (it may not read the source or write the output) raises NotAuthorized, so
nothing is stored; any other problem (a missing file, an output that exists) is returned as a
sentence and the job ends failed with VALIDATION_FAILED.
"""

from __future__ import annotations

from h2kd.access import caller_groups, check_output_allowed, check_source_readable
from h2kd.config import Config
from h2kd.errors import H2kError, NotAuthorized
from h2kd.model.job import Job


class HostChecks:
    """Callable as JobManager's host_validator."""

    def __init__(self, config: Config):
        self._config = config

    def __call__(self, job: Job) -> str | None:
        gids = caller_groups(job.owner) if job.owner else []
        try:
            check_source_readable(job.source, job.owner, gids, self._config.source_roots)
            if job.operation == "convert" and job.output:
                overwrite = bool((job.spec.get("artifacts") or {}).get("overwrite"))
                try:
                    check_output_allowed(job.output, job.owner, gids, self._config.output_roots)
                except H2kError as e:
                    if not (overwrite and e.dbus_name == "AlreadyExists"):
                        raise
            compare_with = (job.spec.get("parameters") or {}).get("compare_with")
            if compare_with:
                check_source_readable(compare_with, job.owner, gids, self._config.source_roots)
        except NotAuthorized:
            raise
        except H2kError as e:
            return str(e)
        return None
