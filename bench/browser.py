"""A headless Debian Chromium driven through chromedriver (W3C WebDriver over HTTP/JSON, stdlib only).

    with Browser.start(tmp_path) as browser:
        browser.get("http://127.0.0.1:9090/...")
        button = browser.find("#submit-button")
        browser.click(button)
        browser.screenshot(Path("artifacts/page.png"))

Only loopback is used: chromedriver listens on 127.0.0.1 and Chromium runs without background
networking. Stopping ends the WebDriver session (Chromium quits), then chromedriver, and then any
process chromedriver started that is still there, all by pid.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"   # the W3C name of an element reference
ENTER = "\ue007"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--no-default-browser-check"]

T = TypeVar("T")


class WebDriverError(RuntimeError):
    """An error answer from chromedriver: `error` is the W3C error code (e.g. "no such element")."""

    def __init__(self, error: str, message: str):
        super().__init__(f"{error}: {message}")
        self.error = error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a living process, from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every living process below `pid`, parents before children."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found: list[tuple[int, int]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def kill_if_same(pid: int, started: int) -> None:
    """SIGKILL pid, unless it has gone (or its number now belongs to a process started later)."""
    stat = _stat(pid)
    if stat is not None and stat[1] == started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "a condition") -> T:
    """predicate()'s first truthy value; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Browser:
    def __init__(self, driver: subprocess.Popen[bytes], port: int, session: str, log_path: Path):
        self._driver = driver
        self.port = port
        self._base = f"http://127.0.0.1:{port}"
        self.session = session
        self.log_path = log_path

    # ---- life cycle ----
    @classmethod
    def start(cls, work_dir: Path, width: int = 1280, height: int = 1000) -> "Browser":
        work_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log_path = work_dir / "chromedriver.log"
        # No --allowed-ips: with it, chromedriver listens on every interface and filters callers; without it,
        # on loopback alone.
        driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}", f"--log-path={log_path}"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: _ready(base), 20, what="chromedriver")
            args = CHROMIUM_ARGS + [f"--user-data-dir={work_dir / 'profile'}", f"--window-size={width},{height}"]
            answer = _request(base, "POST", "/session", {"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            }}}, timeout=60)
        except BaseException:
            stop_process(driver)
            raise
        return cls(driver, port, answer["sessionId"], log_path)

    def stop(self) -> None:
        chromium = descendants(self._driver.pid)
        try:
            self._call("DELETE", "", timeout=20)
        except Exception:
            pass
        stop_process(self._driver)
        for pid, started in chromium:      # whatever chromedriver started and did not end itself
            kill_if_same(pid, started)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- WebDriver commands ----
    def _call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        return _request(self._base, method, f"/session/{self.session}{path}", body, timeout)

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url}, timeout=60)

    def set_window_size(self, width: int, height: int) -> None:
        self._call("POST", "/window/rect", {"width": width, "height": height})

    def find(self, css: str) -> str:
        return self._call("POST", "/element", {"using": "css selector", "value": css})[ELEMENT_KEY]

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT_KEY] for e in self._call("POST", "/elements", {"using": "css selector", "value": css})]

    def exists(self, css: str) -> bool:
        return bool(self.find_all(css))

    def click(self, element: str) -> None:
        self._call("POST", f"/element/{element}/click", {})

    def clear(self, element: str) -> None:
        self._call("POST", f"/element/{element}/clear", {})

    def type(self, element: str, text: str) -> None:
        self._call("POST", f"/element/{element}/value", {"text": text})

    def text(self, element: str) -> str:
        return self._call("GET", f"/element/{element}/text")

    def attribute(self, element: str, name: str) -> str | None:
        return self._call("GET", f"/element/{element}/attribute/{name}")

    def displayed(self, element: str) -> bool:
        return bool(self._call("GET", f"/element/{element}/displayed"))

    def active_element(self) -> str:
        return self._call("GET", "/element/active")[ELEMENT_KEY]

    def execute(self, script: str, *args: Any) -> Any:
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path: Path) -> Path:
        data = base64.b64decode(self._call("GET", "/screenshot", timeout=60))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def full_page_screenshot(self, path: Path) -> Path:
        """The whole page, not just the window: the window grows to the page's height for the shot."""
        rect = self._call("GET", "/window/rect")
        height = int(self.execute("return document.documentElement.scrollHeight"))
        try:
            self.set_window_size(rect["width"], max(rect["height"], height + 100))
            return self.screenshot(path)
        finally:
            self.set_window_size(rect["width"], rect["height"])

    def console_log(self) -> list[dict[str, Any]]:
        """The browser's console messages so far (chromedriver's log extension); [] if unsupported."""
        try:
            return self._call("POST", "/se/log", {"type": "browser"})
        except WebDriverError:
            return []


def _request(base: str, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json; charset=utf-8"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            answer = json.load(reply)
    except urllib.error.HTTPError as e:
        try:
            value = json.load(e).get("value", {})
        except ValueError:
            raise WebDriverError("http error", f"{e.code} {e.reason}") from None
        raise WebDriverError(value.get("error", "unknown error"), value.get("message", "")) from None
    return answer.get("value")


def _ready(base: str) -> bool:
    try:
        return bool(_request(base, "GET", "/status", timeout=2).get("ready"))
    except (OSError, WebDriverError, ValueError):
        return False


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to a child of ours, SIGKILL if it has not ended 10 s later; reaped either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
