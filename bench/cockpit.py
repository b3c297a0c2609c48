"""h2kd's Cockpit page served for the benchmarks and the tests (cockpit-ws on loopback with a no-login local
session whose cockpit-bridge talks to the stack's bus, showing the page from this repository's cockpit/), and
how long the page takes to show its job list."""

from __future__ import annotations

import os
import pwd
import subprocess
import statistics
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.browser import (CHROMEDRIVER, CHROMIUM, Browser, descendants, free_port, kill_if_same, stop_process,
                           wait_until)

REPO = Path(__file__).resolve().parents[1]
COCKPIT_WS = "/usr/lib/cockpit/cockpit-ws"
PROGRAMS = (COCKPIT_WS, "/usr/bin/cockpit-bridge", CHROMIUM, CHROMEDRIVER)


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if not os.path.exists(p)]


@contextmanager
def page_server(stack: Any, data_dir: Path, user: str | None = None) -> Iterator[str]:
    """cockpit-ws on a free loopback port, for the page's URL; stopped afterwards with the bridges it started
    (by pid). data_dir holds the page's link and cockpit-ws's log. With `user`, cockpit-ws and its bridge run
    as that user (data_dir and this repository must be readable by them), so the page sees what they may."""
    (data_dir / "cockpit").mkdir(parents=True)
    (data_dir / "cockpit" / "h2kd").symlink_to(REPO / "cockpit")
    port = free_port()
    env = {**os.environ, **stack.env(), "XDG_DATA_DIRS": f"{data_dir}:/usr/share",
           # Without these, the bridge starts a session dbus-daemon and an ssh-agent of its own, whose
           # sockets (/tmp/dbus-*, /tmp/ssh-*) outlive them. The page needs neither.
           "DBUS_SESSION_BUS_ADDRESS": f"unix:path={data_dir}/no-session-bus",
           "SSH_AUTH_SOCK": str(data_dir / "no-ssh-agent")}
    identity: dict[str, Any] = {}
    if user is not None:
        account = pwd.getpwnam(user)
        env.update(HOME=account.pw_dir, USER=user, LOGNAME=user)
        identity = dict(user=account.pw_uid, group=account.pw_gid,
                        extra_groups=os.getgrouplist(user, account.pw_gid), cwd=account.pw_dir)
    log_path = data_dir / "cockpit-ws.log"
    with open(log_path, "wb") as log:
        ws = subprocess.Popen([COCKPIT_WS, "--no-tls", "--address", "127.0.0.1", "--port", str(port),
                               "--local-session=cockpit-bridge"],
                              env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **identity)
    base = f"http://127.0.0.1:{port}/cockpit/@localhost/h2kd"

    def serving() -> bool:
        try:
            with urllib.request.urlopen(base + "/manifest.json", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            if ws.poll() is not None:
                raise RuntimeError(f"cockpit-ws exited: {log_path.read_text()}") from None
            return False
    try:
        wait_until(serving, 20, what="cockpit-ws")
        yield base + "/index.html"
    finally:
        started = descendants(ws.pid)            # the bridge(s) of the session
        stop_process(ws)
        deadline = time.monotonic() + 5
        for pid, start in started:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            kill_if_same(pid, start)


def load_page(browser: Browser, url: str, timeout: float = 30, interval: float = 0.1) -> None:
    """Open the page and wait until it has started and shows the daemon it reached (checked every `interval` s)."""
    browser.get(url)
    wait_until(lambda: browser.execute("return document.body.dataset.ready === '1' && "
                                       "document.getElementById('daemon-version').textContent !== ''"),
               timeout, interval=interval, what="the page to connect to h2kd")


def shown_job_ids(browser: Browser) -> list[str]:
    """The ids of the jobs in the page's job list, top to bottom."""
    return browser.execute("return [...document.querySelectorAll('tr[data-job-id]')].map(r => r.dataset.jobId)")


def page_load(stack: Any, work_dir: Path, jobs: int, loads: int = 3) -> dict[str, Any]:
    """Open the page `loads` times in one Chromium with `jobs` jobs in the store: seconds until it shows the
    daemon it reached and until its job list holds the newest jobs (200 at most), for the first (cold) load
    and as the median of the loads after it, and the page's script heap after the last load."""
    rows = min(jobs, 200)
    connected, listed = [], []
    with page_server(stack, work_dir / "cockpit-data") as url, \
            Browser.start(work_dir / "chromium", width=1280, height=1100) as browser:
        for _ in range(loads):
            start = time.perf_counter()
            load_page(browser, url, timeout=120, interval=0.02)
            connected.append(time.perf_counter() - start)
            wait_until(lambda: len(shown_job_ids(browser)) >= rows, 120, interval=0.02,
                       what=f"{rows} rows in the job list")
            listed.append(time.perf_counter() - start)
        heap = browser.execute("return performance.memory ? performance.memory.usedJSHeapSize : 0")
    return {"jobs": jobs, "loads": loads, "first_connected_s": connected[0], "first_list_shown_s": listed[0],
            "connected_s": statistics.median(connected[1:] or connected),
            "list_shown_s": statistics.median(listed[1:] or listed), "js_heap_MiB": heap / 2**20}
