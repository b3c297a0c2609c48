"""Exit codes of h2kctl and the one exception that carries a user-facing message and its exit code."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    SUCCESS = 0
    FAILURE = 1
    USAGE = 2
    JOB_FAILED = 3
    JOB_CANCELLED = 4
    NOT_AUTHORIZED = 5
    UNREACHABLE = 6
    NO_SUCH_JOB = 7
    INTERRUPTED = 130      # 128 + SIGINT, as a shell reports a program ended by Ctrl-C


# The single description of the exit codes, shown by --help and the man page.
EXIT_CODE_HELP: list[tuple[ExitCode, str]] = [
    (ExitCode.SUCCESS, "success"),
    (ExitCode.FAILURE, "generic failure (e.g. the daemon refused the request, a source file does not exist, a job "
                       "to cancel ended otherwise)"),
    (ExitCode.USAGE, "bad usage or input (unknown command or option, conflicting options, invalid value, a job "
                     "file that is not one JSON or YAML object or has a field of the wrong type, a job spec h2kd "
                     "finds invalid, a property or user that does not exist, a source that is not a regular file, text that is not UTF-8 or holds a NUL "
                     "byte; a job waited for is held: stored with --no-queue, it does not start on its own)"),
    (ExitCode.JOB_FAILED, "the job that was submitted (it failed h2kd's checks, or was submitted before and "
                          "failed), waited for, watched or inspected failed (with wait: one of them)"),
    (ExitCode.JOB_CANCELLED, "the job that was waited for, watched or inspected was cancelled (with wait: one "
                             "of them, and none failed), or the job a resubmission found was"),
    (ExitCode.NOT_AUTHORIZED, "not authorized (polkit or the bus policy denied the call, or h2kd refused what the "
                             "caller may not do as themselves: an output outside the output roots or in a "
                             "directory they cannot write, a source they cannot read, h2kctl finding it so first)"),
    (ExitCode.UNREACHABLE, "h2kd is unreachable (the bus is not there or the name is not on it; while jobs are "
                           "waited for or watched: for more than 2 minutes)"),
    (ExitCode.NO_SUCH_JOB, "no such job"),
    (ExitCode.INTERRUPTED, "Ctrl-C: h2kctl stopped waiting for or watching a job, which goes on (h2kctl then "
                           "ends by SIGINT, so a shell script running it stops too)"),
]


class CtlError(Exception):
    """An error to show as one line "h2kctl: <message>" and to exit with `code`."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE, error_name: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        # The D-Bus error it came from, if any: what a caller may treat apart (see Client.submit).
        self.error_name = error_name


def job_arguments(*job_ids: str) -> str:
    """Job ids as the last words of a command h2kctl suggests: after "--" when one begins with "-", which h2kctl
    would otherwise take for an option (stores of earlier versions hold such ids)."""
    return ("-- " if any(job_id.startswith("-") for job_id in job_ids) else "") + " ".join(job_ids)


class JobHeld(CtlError):
    """A job stored without queueing (--no-queue) was to be followed: it never ends on its own."""

    def __init__(self, job_id: str):
        super().__init__(f"job {job_id} is held: stored without queueing, it does not start on its own; start it "
                         f"with: h2kctl start --wait {job_arguments(job_id)}", ExitCode.USAGE)
