"""Telling systemd how the daemon is: sd_notify readiness and status, and WATCHDOG=1 pings tied to a liveness check.

The ping task runs on the daemon's event loop, so a loop that is blocked or wedged sends no pings and
systemd (WatchdogSec=) restarts the daemon. A ping is also withheld while the manager's health() says
the job store is not OK, since a restart is the remedy for that too. StatusLine keeps the status that
`systemctl status h2kd` shows current: the queue's counts, and why the daemon is unhealthy while it is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable, Mapping

from systemd import daemon

log = logging.getLogger(__name__)


def _notify(message: str) -> bool:
    """Send one sd_notify message; False when not run by systemd (no NOTIFY_SOCKET) or on error."""
    try:
        return bool(daemon.notify(message))
    except OSError:
        return False


def notify_ready(status: str = "") -> bool:
    return _notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def notify_status(text: str) -> bool:
    return _notify(f"STATUS={text}")


def notify_stopping() -> bool:
    return _notify("STOPPING=1\nSTATUS=stopping")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """systemd's watchdog timeout in seconds for this process, or None when no watchdog is asked for."""
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
        pid = int(environ.get("WATCHDOG_PID", "0") or 0)
    except ValueError:
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 1e6


class StatusLine:
    """STATUS= as the queue is ("3 queued, 2 running"), sent at most every `interval` seconds as the manager's
    counts change (a JobListener: only manager_changed matters), led by the reason while unhealthy, and by what
    keeps jobs from starting while something does ("systemd's manager does not answer"; then send() is called
    now and then: that is a state, not a change the manager tells)."""

    def __init__(self, counts: Callable[[], tuple[int, int, bool]], interval: float = 1.0,
                 blocked: Callable[[], str | None] = lambda: None) -> None:
        self._counts = counts            # () -> (queued, running, paused)
        self._blocked = blocked
        self._interval = interval
        self._problem: str | None = None
        self._sent = ""
        self._pending: asyncio.TimerHandle | None = None
        self._closed = False

    def text(self) -> str:
        queued, running, paused = self._counts()
        line = f"{queued} queued, {running} running" + (", queue paused" if paused else "")
        blocked = self._blocked()
        if blocked:
            line = f"{blocked}; {line}"
        return f"unhealthy: {self._problem}; {line}" if self._problem else line

    def send(self) -> None:
        self._cancel_pending()
        if self._closed:
            return
        text = self.text()
        if text != self._sent and notify_status(text):
            self._sent = text

    def set_problem(self, problem: str | None) -> None:
        """The Watchdog's verdict: shown at once."""
        self._problem = problem
        self.send()

    def manager_changed(self, changed: set[str]) -> None:
        if self._pending is None and not self._closed:
            self._pending = asyncio.get_running_loop().call_later(self._interval, self.send)

    def close(self) -> None:
        """No more updates: the daemon is stopping (and says so itself)."""
        self._closed = True
        self._cancel_pending()

    def _cancel_pending(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def job_added(self, job: Any) -> None: ...
    def job_changed(self, job: Any, changed: set[str], urgent: bool) -> None: ...
    def job_event(self, job: Any, event: Any) -> None: ...
    def job_removed(self, job: Any) -> None: ...
    def worker_added(self, worker: Any) -> None: ...
    def worker_changed(self, worker: Any) -> None: ...
    def worker_removed(self, worker: Any) -> None: ...


class Watchdog:
    """Pings WATCHDOG=1 every half timeout from an asyncio task, only while the daemon is live."""

    def __init__(self, health: Callable[[], Mapping[str, Any]], environ: Mapping[str, str] | None = None,
                 on_problem: Callable[[str | None], None] | None = None) -> None:
        """on_problem is told when the daemon turns unhealthy (the reason) and healthy again (None); by
        default the reason goes to STATUS= on its own."""
        self._health = health
        self._on_problem = on_problem
        self.interval = watchdog_interval(environ)
        self._task: asyncio.Task[None] | None = None
        self._problem: str | None = None   # the last reason a ping was withheld, to log it once

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def start(self) -> None:
        """Begin pinging; must be called from the running event loop. Does nothing without WATCHDOG_USEC."""
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="h2kd-watchdog")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def problem(self) -> str | None:
        """Why the daemon is not live, or None. Called on the loop, so a blocked loop never gets here."""
        try:
            health = self._health()
        except Exception as e:
            return f"health check failed: {e}"
        if not health.get("store_ok", False):
            return "the job store is not OK"
        return None

    async def _run(self) -> None:
        assert self.interval is not None
        period = self.interval / 2
        expected = time.monotonic() + period
        while True:
            await asyncio.sleep(max(0.0, expected - time.monotonic()))
            late = time.monotonic() - expected
            if late > period:
                log.warning("the event loop was blocked for about %.1f s", late)
            expected = time.monotonic() + period
            problem = self.problem()
            if problem is None:
                if self._problem is not None:
                    log.info("healthy again; watchdog pings resume")
                    self._tell(None)
                self._problem = None
                _notify("WATCHDOG=1")
            elif problem != self._problem:
                self._problem = problem
                log.error("withholding watchdog pings: %s", problem)
                self._tell(problem)

    def _tell(self, problem: str | None) -> None:
        if self._on_problem is not None:
            self._on_problem(problem)
        else:
            notify_status(f"unhealthy: {problem}" if problem else "healthy again")
