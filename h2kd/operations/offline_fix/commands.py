"""Running the host and guest programs offline fixes need: output captured, a time limit, and the whole
process group killed if the caller is interrupted (SIGTERM, a time limit), so that no child keeps a guest
filesystem busy while it is being unmounted.

uninterrupted() guards the clean-up (unmounting, deactivating volume groups, detaching the loop device) from
those very interruptions: a stop that comes while it runs is held until it is over. Cut short, the clean-up
would leave the guest's file systems mounted, its volume groups active and its loop device bound, for good.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from h2kd.operations.offline_fix import confine
from h2kd.operations.qemuimg import OperationError

DEFAULT_TIMEOUT = 120.0
KILLED_OUTPUT_SECONDS = 10.0    # how long the output of a program killed at its time limit is waited for


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def last_words(self, lines: int = 4) -> str:
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " | ".join(line.strip() for line in text[-lines:]) or f"exit status {self.returncode}"


def have(program: str) -> bool:
    return shutil.which(program) is not None


def run(argv: list[str], *, timeout: float = DEFAULT_TIMEOUT, env: dict[str, str] | None = None,
        input_text: str | None = None, shown: list[str] | None = None) -> Completed:
    """Run argv in a process group of its own; never raises for a non-zero exit (see Completed.ok). shown: the
    command as messages and the Completed name it (argv itself by default)."""
    shown = shown or argv
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                env=env, start_new_session=True)
    except FileNotFoundError:
        raise OperationError("TOOL_FAILED", f"the program {argv[0]} is not installed on this host",
                             "offline_fix") from None
    try:
        stdout, stderr = proc.communicate(input_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            stdout, stderr = proc.communicate(timeout=KILLED_OUTPUT_SECONDS)
        except subprocess.TimeoutExpired:   # a process outside the group still holds its output: not waited for
            stdout, stderr = "", ""
        return Completed(shown, -9, stdout, (stderr or "") + f"\n{shown[0]} did not finish within {timeout:.0f} s")
    except BaseException:
        _kill_group(proc)
        raise
    return Completed(shown, proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def checked(argv: list[str], what: str, **kwargs: object) -> Completed:
    """run(), raising TOOL_FAILED naming `what` when the program fails."""
    result = run(argv, **kwargs)  # type: ignore[arg-type]
    if not result.ok:
        raise OperationError("TOOL_FAILED", f"{what} failed: {result.last_words()}", "offline_fix")
    return result


def in_guest(root: str, argv: list[str], *, timeout: float = 600.0) -> Completed:
    """Run a guest program chrooted into the guest's root, confined (see confine: namespaces of its own, few
    capabilities) and with a plain environment."""
    return run([sys.executable, "-I", "-S", confine.__file__, root, "--", *argv], timeout=timeout, env={},
               shown=argv)


# The signals a stop comes by: SIGTERM (a cancel, systemd stopping the unit), SIGINT, SIGALRM (the worker's
# time limit).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)
_guard = threading.local()


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Run the block with the stop signals held: their handlers (the worker's, which raises to stop the
    attempt) run once the block is over, in the order the signals came, as if they had come just then.
    Nested blocks hold them until the outermost one ends. Signal handlers belong to the main thread; in any
    other the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or getattr(_guard, "held", None) is not None:
        yield
        return
    held: list[int] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: object) -> None:
        if signum not in held:
            held.append(signum)

    _guard.held = held
    try:
        for signum in _STOP_SIGNALS:
            handler = signal.getsignal(signum)
            if handler is not None:         # a handler set outside Python cannot be put back: left alone
                previous[signum] = signal.signal(signum, hold)
        yield
    finally:
        # Blocked while the handlers go back: a stop that came between two of them would run the real handler
        # there, and its exception would leave the others holding for good. It comes once they are all back.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            _guard.held = None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for signum in held:
            signal.raise_signal(signum)
