"""The Cockpit page in a real browser: cockpit-ws with a local cockpit-bridge on the private bus, headless Chromium.

Everything a user does here goes through the page (typing, clicking, the keyboard); what the test
compares the page with comes from the daemon itself over busctl, or from the files the jobs wrote.
Screenshots are kept in artifacts/ (not committed).
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from dbus_fast import Variant

from bench import load
from bench.browser import ELEMENT_KEY, ENTER, Browser, wait_until
from bench.client import Client, inspect_spec, with_client
from bench.cockpit import load_page, missing_programs, page_server, shown_job_ids
# tests/ is on sys.path: pytest puts the directory of its conftest there
from images import MiB, make_image

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
BUS = "org.hyper2kvm.h2kd1"
MANAGER_PATH = "/org/hyper2kvm/h2kd1"
MANAGER = BUS + ".Manager"
JOB = BUS + ".Job"

_missing = missing_programs() + [p for p in ("qemu-img", "busctl") if shutil.which(p) is None]
pytestmark = [pytest.mark.stack,
              pytest.mark.skipif(bool(_missing), reason=f"not installed: {', '.join(_missing)}")]


# ------------------------------------------------------------------------------------------ helpers

def worker_row_text(browser: Browser, css: str) -> str:
    """The text shown in the element `css` selects, read in one step: the workers' table is drawn anew every few
    seconds (their heartbeats' ages), so an element found first may be gone by the time its text is asked."""
    return browser.execute("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)


def busctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["busctl", "--system", *args], env=env, capture_output=True, text=True, timeout=30)


def busctl_json(env: dict[str, str], *args: str) -> Any:
    done = busctl(env, "--json=short", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["data"]


def job_property(env: dict[str, str], job_id: str, name: str) -> Any:
    path = busctl_json(env, "call", BUS, MANAGER_PATH, MANAGER, "GetJob", "s", job_id)[0]
    return busctl_json(env, "get-property", BUS, path, JOB, name)


def submit_error(bus_address: str, source: str, output: str) -> tuple[str, str]:
    """(error name, message) of SubmitJob for a conversion of source to output, called straight over D-Bus."""
    from dbus_fast import Message, MessageType, Variant
    from dbus_fast.aio import MessageBus

    async def call() -> tuple[str, str]:
        bus = await MessageBus(bus_address=bus_address).connect()
        try:
            spec = {"operation": Variant("s", "convert"),
                    "image": Variant("a{sv}", {"path": Variant("s", source)}),
                    "artifacts": Variant("a{sv}", {"output_path": Variant("s", output)})}
            reply = await bus.call(Message(destination=BUS, path=MANAGER_PATH, interface=MANAGER,
                                           member="SubmitJob", signature="a{sv}a{sv}", body=[spec, {}]))
        finally:
            bus.disconnect()
        if reply.message_type != MessageType.ERROR:
            return "", ""
        return reply.error_name or "", str(reply.body[0]) if reply.body else ""
    return asyncio.run(call())


def convert_on_the_page(browser: Any, cockpit_url: str, source: Path, output: Path) -> str:
    """Open the page, submit a conversion of `source` to `output` through its form, and wait until it runs;
    its job id."""
    open_page(browser, cockpit_url)
    fill_form(browser, str(source), str(output), "qcow2")
    job_id = submit(browser)
    wait_until(lambda: (s := row_state(browser, job_id)) and s["state"] == "progressing", 60, interval=0.05,
               what="the conversion to run")
    return job_id


def row_state(browser: Browser, job_id: str) -> dict[str, Any] | None:
    """What the job's row shows: state, progress bar value, progress text, visible buttons."""
    return browser.execute("""
        const row = document.querySelector(`tr[data-job-id="${arguments[0]}"]`);
        if (!row) return null;
        const bar = row.querySelector('[role=progressbar]');
        const shown = sel => { const b = row.querySelector(sel); return !!b && !b.hidden && b.offsetParent !== null; };
        return {state: row.querySelector('.job-state').textContent,
                value: bar.getAttribute('aria-valuenow'),
                info: row.querySelector('.progress-info').textContent,
                cancel: shown('.job-cancel'), retry: shown('.job-retry'), start: shown('.job-start')};
    """, job_id)


def fill_form(browser: Browser, source: str, output: str, fmt: str = "qcow2", priority: int = 5,
              compress: bool = False, verify: bool = False) -> None:
    for css, value in (("#source-path", source), ("#output-path", output), ("#priority", str(priority))):
        field = browser.find(css)
        browser.clear(field)
        browser.type(field, value)
    browser.click(browser.find(f"#output-format option[value='{fmt}']"))
    for css, wanted in (("#compress", compress), ("#verify", verify)):
        checkbox = browser.find(css)
        if bool(browser.execute("return arguments[0].checked", {ELEMENT_KEY: checkbox})) != wanted:
            browser.click(checkbox)


def submit(browser: Browser) -> str:
    """Press "Start conversion"; the id of the job the page says it submitted."""
    browser.execute("document.getElementById('submit-status').hidden = true;"
                    "document.getElementById('submit-status').dataset.jobId = '';")
    browser.click(browser.find("#submit-button"))

    def submitted() -> str | None:
        status = browser.find("#submit-status")
        error = browser.find("#submit-error")
        if browser.displayed(error):
            raise AssertionError("the page shows an error: " + browser.text(error))
        return browser.attribute(status, "data-job-id") if browser.displayed(status) else None
    return wait_until(submitted, 20, what="the page to confirm the submission")


def open_page(browser: Browser, url: str, connected: bool = True) -> None:
    """Open the page and wait until it shows the h2kd it reached (connected) or only until it has started."""
    if connected:
        load_page(browser, url)
    else:
        browser.get(url)
        wait_until(lambda: browser.execute("return document.body.dataset.ready === '1'"), 30,
                   what="the page to start")
    browser.execute("window.scriptErrors = [];"
                    "window.addEventListener('error', e => window.scriptErrors.push(String(e.message)));"
                    "window.addEventListener('unhandledrejection', e => window.scriptErrors.push(String(e.reason)));")


def announced(browser: Browser) -> str:
    """What the page's live region last said (it is visually hidden: WebDriver's text would be empty)."""
    return browser.execute("return document.getElementById('announcer').textContent")


def script_errors(browser: Browser) -> list[str]:
    """Uncaught JavaScript errors since open_page()."""
    return browser.execute("return window.scriptErrors || []")


def fail_job_reads(browser: Browser, path: str = "") -> None:
    """From now on, the page's Properties.GetAll calls on the Job at `path` (on every Job if empty) go to an
    object h2kd does not have, so each is answered with an error; window.failedReads counts them. The calls are
    rewritten in the page's own channel to the bridge (cockpit.transport.filter), until stop_failing_job_reads()
    or the page is loaded again."""
    browser.execute("""
        const [target, prefix, elsewhere] = arguments;
        window.failedReads = 0;
        window.failReadsOf = target;
        window.failJobReads = true;
        if (window.jobReadFilter)
            return;
        window.jobReadFilter = true;
        cockpit.transport.filter((data, channel) => {
            if (!window.failJobReads || !channel || typeof data !== "string")
                return true;
            let message;
            try {
                message = JSON.parse(data.substring(channel.length + 1));
            } catch (e) {
                return true;
            }
            const call = message && message.call;
            if (!call || call[1] !== "org.freedesktop.DBus.Properties" || call[2] !== "GetAll" ||
                    call[3][0] !== "org.hyper2kvm.h2kd1.Job" || !call[0].startsWith(prefix) ||
                    (window.failReadsOf && call[0] !== window.failReadsOf))
                return true;
            window.failedReads++;
            call[0] = elsewhere;
            cockpit.transport.inject(channel + "\\n" + JSON.stringify(message), true);
            return false;
        }, true);
    """, path, MANAGER_PATH + "/job/", MANAGER_PATH + "/unreadable")


def stop_failing_job_reads(browser: Browser) -> None:
    browser.execute("window.failJobReads = false;")


def job_path(env: dict[str, str], job_id: str) -> str:
    return busctl_json(env, "call", BUS, MANAGER_PATH, MANAGER, "GetJob", "s", job_id)[0]


def held_jobs(bus_address: str, source: str, count: int) -> list[str]:
    """Submit `count` inspections of source held back from the queue (queue=false); their ids, oldest first."""
    async def submit_all(client: Client) -> list[str]:
        # one at a time: each gets a later CreatedAt than the one before
        return [(await client.submit(inspect_spec(source), queue=False))[0] for _ in range(count)]
    return with_client(bus_address, submit_all)


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def cockpit_url(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    sockets = lambda: set(glob.glob("/tmp/dbus-*") + glob.glob("/tmp/ssh-*"))  # noqa: E731
    before = sockets()
    with page_server(stack, tmp_path_factory.mktemp("cockpit-data")) as url:
        yield url
    # Nothing the bridge started may leave its socket behind (a session bus, an ssh-agent).
    assert sockets() - before == set()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    with Browser.start(tmp_path_factory.mktemp("chromium"), width=1280, height=1100) as b:
        yield b


def test_the_browser_driver_listens_on_loopback_alone(browser: Browser) -> None:
    """The tests talk only to loopback: chromedriver's port is on 127.0.0.1 (and ::1), not on every interface."""
    listening = subprocess.run(["ss", "-Hltn", f"sport = :{browser.port}"], capture_output=True, text=True,
                               check=True).stdout.split("\n")
    addresses = [line.split()[3].rsplit(":", 1)[0] for line in listening if line.strip()]
    assert addresses and set(addresses) <= {"127.0.0.1", "[::1]"}, listening


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """VMDKs with enough data that a conversion takes seconds (progress is visible) and a smaller one."""
    directory = tmp_path_factory.mktemp("cockpit-images")
    directory.chmod(0o755)
    big = make_image("vmdk", "monolithicSparse", directory / "big.vmdk", size=1024 * MiB, data_fraction=0.6, seed=8)
    (directory / "big.src.raw").unlink()
    return {"big": big}


@pytest.fixture(autouse=True)
def page_on_failure(request: pytest.FixtureRequest, browser: Browser) -> Iterator[None]:
    """When a test fails, keep what the page showed: artifacts/cockpit-failed-<test>.png and its text."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        name = request.node.name
        try:
            browser.full_page_screenshot(ARTIFACTS / f"cockpit-failed-{name}.png")
            (ARTIFACTS / f"cockpit-failed-{name}.txt").write_text(browser.execute("return document.body.innerText"))
        except Exception as e:  # the browser itself may be what failed
            print(f"no screenshot of the failure: {e}")


@pytest.fixture
def env(stack: Any) -> dict[str, str]:
    values = {**os.environ, **stack.env()}
    values.pop("DBUS_SESSION_BUS_ADDRESS", None)
    return values


# ------------------------------------------------------------------------------------------ tests

def test_page_shows_the_daemon_queue_workers_and_health(browser: Browser, cockpit_url: str,
                                                        env: dict[str, str]) -> None:
    open_page(browser, cockpit_url)
    version = busctl_json(env, "get-property", BUS, MANAGER_PATH, MANAGER, "Version")
    assert browser.text(browser.find("#daemon-version")) == f"h2kd {version}"
    parallel = busctl_json(env, "get-property", BUS, MANAGER_PATH, MANAGER, "MaxParallelJobs")
    assert browser.text(browser.find("#max-parallel")) == str(parallel)
    health = busctl_json(env, "call", BUS, MANAGER_PATH, MANAGER, "GetHealth")[0]
    wait_until(lambda: browser.text(browser.find("#health-status")) == health["status"]["data"], 10,
               what="the health status")
    # The builtin worker is listed with the host's name.
    worker = busctl_json(env, "get-property", BUS, MANAGER_PATH + "/worker/builtin", BUS + ".Worker", "Name")
    wait_until(lambda: browser.exists("tr[data-worker-id='builtin']"), 10, what="the builtin worker")
    assert worker in worker_row_text(browser, "tr[data-worker-id='builtin']")
    # Every form control has a label a screen reader announces.
    unlabelled = browser.execute("""
        return [...document.querySelectorAll('input, select, textarea')]
            .filter(e => e.labels.length === 0 && !e.getAttribute('aria-label')).map(e => e.id);""")
    assert unlabelled == []


def test_workers_come_and_go_on_the_page(browser: Browser, cockpit_url: str, stack: Any,
                                        sources: dict[str, Path]) -> None:
    """An external worker that registers while the page is open gets its row, which follows it as it claims
    a job (busy, 1 of its 2 jobs); when it unregisters, the row goes."""
    open_page(browser, cockpit_url)
    wait_until(lambda: browser.exists("tr[data-worker-id='builtin']"), 10, what="the builtin worker")

    async def scenario() -> None:
        worker = await Client.connect(stack.bus_address)
        job_id = ""
        try:
            # Only a worker with a GPU may run this job: the builtin one leaves it queued.
            spec = {**inspect_spec(str(sources["big"])), "capability_requirements": {"gpu": True}}
            job_id, _ = await worker.submit(spec)
            worker_id, path = await worker.call(MANAGER_PATH, MANAGER, "RegisterWorker", "ssa{sv}",
                                                ["cockpit-listed", json.dumps({"operations": ["inspect"], "gpu": True}),
                                                 {"max_jobs": Variant("u", 2)}])
            row = f"tr[data-worker-id='{worker_id}']"
            wait_until(lambda: browser.exists(row), 10, what="the new worker's row")
            text = worker_row_text(browser, row)
            assert "cockpit-listed" in text and "external" in text and "0 / 2" in text and "inspect" in text
            found, claimed, _spec = await worker.call(path, BUS + ".Worker", "ClaimJob")
            assert found and claimed == job_id
            wait_until(lambda: "busy" in worker_row_text(browser, row) and "1 / 2" in worker_row_text(browser, row),
                       10, what="the worker's row to show it busy with one job")
            await worker.call(path, BUS + ".Worker", "Unregister")
            wait_until(lambda: not browser.exists(row), 10, what="the unregistered worker's row to go")
            assert browser.exists("tr[data-worker-id='builtin']")
        finally:
            if job_id:
                for method in ("CancelJob", "RemoveJob"):
                    try:
                        await worker.call(MANAGER_PATH, MANAGER, method, "s", [job_id])
                    except Exception:
                        pass
            worker.close()
    asyncio.run(scenario())
    assert script_errors(browser) == []

def heartbeat_age(browser: Browser, row: str) -> int | None:
    """The age the row's last-heartbeat cell shows, in seconds (None when it shows none, or minutes)."""
    match = re.fullmatch(r"(\d+) s ago", worker_row_text(browser, row + " td[data-label='Last heartbeat']").strip())
    return int(match.group(1)) if match else None


def test_a_workers_last_heartbeat_follows_its_heartbeats(browser: Browser, cockpit_url: str, stack: Any) -> None:
    """LastHeartbeat changes unannounced: the page reads it again, so a worker that beats looks alive, and one
    that has not beaten for a while looks it."""
    open_page(browser, cockpit_url)

    async def scenario() -> None:
        worker = await Client.connect(stack.bus_address)
        try:
            worker_id, path = await worker.call(MANAGER_PATH, MANAGER, "RegisterWorker", "ssa{sv}",
                                                ["cockpit-beating", json.dumps({"operations": ["inspect"]}), {}])
            row = f"tr[data-worker-id='{worker_id}']"
            wait_until(lambda: browser.exists(row), 10, what="the new worker's row")
            wait_until(lambda: (heartbeat_age(browser, row) or 0) >= 8, 20, what="the row to show a heartbeat aging")
            await worker.call(path, BUS + ".Worker", "Heartbeat")
            wait_until(lambda: (heartbeat_age(browser, row) or 99) <= 6, 10,
                       what="the row to show the heartbeat just sent")
            await worker.call(path, BUS + ".Worker", "Unregister")
        finally:
            worker.close()
    asyncio.run(scenario())
    # This host's worker beats on its own while h2kd runs.
    assert (heartbeat_age(browser, "tr[data-worker-id='builtin']") or 99) <= 20
    assert script_errors(browser) == []


def test_conversion_from_the_form_shows_progress_and_completes(browser: Browser, cockpit_url: str,
                                                               env: dict[str, str], stack: Any,
                                                               sources: dict[str, Path]) -> None:
    open_page(browser, cockpit_url)
    output = stack.output_dir / "from-cockpit.qcow2"
    fill_form(browser, str(sources["big"]), str(output), "qcow2", priority=3, verify=True)
    job_id = submit(browser)
    assert job_property(env, job_id, "Priority") == 3
    # Who submitted from Cockpit (the session's user), recorded with the job.
    assert json.loads(job_property(env, job_id, "Spec"))["audit"]["requested_by"] == pwd.getpwuid(os.getuid()).pw_name

    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        shown = row_state(browser, job_id)
        if shown is not None:
            seen.append(shown)
            if shown["state"] in ("completed", "failed", "cancelled"):
                break
        time.sleep(0.05)
    assert seen, "the job never appeared in the list"
    assert seen[-1]["state"] == "completed", (seen[-1], job_property(env, job_id, "Error"))
    assert seen[-1]["value"] == "100"
    values = [int(s["value"]) for s in seen if s["value"] is not None]
    between = sorted({v for v in values if 0 < v < 100})
    assert len(between) >= 2, f"the progress bar did not advance visibly: {values}"
    assert values == sorted(values), f"the progress bar went backwards: {values}"
    running = [s for s in seen if s["state"] in ("running", "progressing")]
    assert any("/s" in s["info"] for s in running), "no transfer rate was shown while it ran"
    assert any(" left" in s["info"] or "almost done" in s["info"] for s in running), "no time left was shown"
    assert any(s["cancel"] for s in running), "no Cancel button while it ran"
    assert not seen[-1]["cancel"] and not seen[-1]["retry"], "Cancel/Retry shown for a completed job"

    # What the page says happened did happen.
    info = subprocess.run(["qemu-img", "info", "--output=json", str(output)], capture_output=True, text=True,
                          check=True)
    assert json.loads(info.stdout)["format"] == "qcow2"

    # Details: the history from GetEvents, the spec and result, and the journal. The page is loaded again
    # first, so that it knows the job only from what it reads (GetAll leaves out Spec and Result).
    open_page(browser, cockpit_url)
    wait_until(lambda: browser.exists(f"tr[data-job-id='{job_id}'] .job-link"), 15, what="the job's row")
    browser.click(browser.find(f"tr[data-job-id='{job_id}'] .job-link"))
    assert browser.attribute(browser.active_element(), "id") == "details-card"
    wait_until(lambda: browser.exists("#details-history li[data-kind='result']"), 15, what="the job's history")
    history = browser.text(browser.find("#details-history"))
    for state in ("queued", "running", "completed"):
        assert f"→ {state}" in history
    assert "progress" in history
    def shown(box: str) -> Any:
        return wait_until(lambda: (t := browser.execute(f"return document.getElementById('{box}').textContent"))
                          .startswith("{") and t, 15, what=f"the job's {box}")
    assert json.loads(shown("details-spec")) == json.loads(job_property(env, job_id, "Spec"))
    result = json.loads(shown("details-result"))
    assert result == json.loads(job_property(env, job_id, "Result"))
    assert result["outputs"]["disks"][0]["path"] == str(output)
    assert result["outputs"]["disks"][0]["compare"]["identical"] is True     # "Compare the output" was ticked
    journal = wait_until(lambda: (t := browser.execute(
        "return document.getElementById('details-journal').textContent")) and "completed" in t and t, 15,
        what="the job's journal")
    assert job_id in journal
    browser.full_page_screenshot(ARTIFACTS / "cockpit.png")
    assert script_errors(browser) == []


def test_cancel_and_retry_buttons(browser: Browser, cockpit_url: str, env: dict[str, str], stack: Any,
                                  sources: dict[str, Path]) -> None:
    open_page(browser, cockpit_url)
    # zlib compression of random data is slow enough to catch the job while it runs.
    output = stack.output_dir / "to-cancel.qcow2"
    fill_form(browser, str(sources["big"]), str(output), "qcow2", compress=True)
    job_id = submit(browser)
    row = f"tr[data-job-id='{job_id}']"
    wait_until(lambda: (s := row_state(browser, job_id)) and s["state"] == "progressing" and s["cancel"], 60,
               interval=0.05, what="the job to run")
    # Operated with the keyboard: focus the row's Cancel button and press Enter. The first press only asks.
    cancel = browser.find(f"{row} .job-cancel")
    browser.execute("arguments[0].focus()", {ELEMENT_KEY: cancel})
    browser.type(browser.active_element(), ENTER)
    wait_until(lambda: browser.text(cancel) == "Really cancel?", 5, what="the cancel to ask first")
    # A screen reader hears the question too: the button's name follows its text, and a live region says it.
    assert browser.attribute(cancel, "aria-label") == f"Really cancel job {job_id}?"
    assert browser.attribute(browser.find("#announcer"), "aria-live") == "polite"
    wait_until(lambda: f"Really cancel job {job_id}?" in announced(browser), 5, what="the question announced")
    time.sleep(1.0)
    assert job_property(env, job_id, "State") == "progressing", "one press cancelled the job"
    browser.type(browser.active_element(), ENTER)
    wait_until(lambda: (s := row_state(browser, job_id)) and s["state"] == "cancelled", 30, what="the cancellation")
    assert job_property(env, job_id, "State") == "cancelled"
    shown = wait_until(lambda: (s := row_state(browser, job_id)) and not s["cancel"] and s["retry"] and s, 10,
                       what="Retry instead of Cancel")
    assert shown["value"] is not None and int(shown["value"]) < 100
    # Keyboard focus stays on the row (on Retry, which replaced Cancel) instead of falling to the page.
    assert "job-retry" in (browser.attribute(browser.active_element(), "class") or "")
    assert not output.exists(), "a cancelled conversion left its output"

    # Retry queues a new attempt; it runs and can be cancelled again.
    attempt = job_property(env, job_id, "Attempt")
    browser.click(browser.find(f"{row} .job-retry"))
    wait_until(lambda: job_property(env, job_id, "Attempt") > attempt, 30, what="a new attempt")
    wait_until(lambda: (s := row_state(browser, job_id)) and s["cancel"] and not s["retry"], 30,
               interval=0.05, what="Cancel to come back")
    again = browser.find(f"{row} .job-cancel")
    # Asked, and not answered: the button goes back to what it was, for the eye and for the ear.
    browser.click(again)
    assert browser.attribute(again, "aria-label") == f"Really cancel job {job_id}?"
    wait_until(lambda: browser.text(again) == "Cancel", 8, what="the question to lapse")
    assert browser.attribute(again, "aria-label") == f"Cancel job {job_id}"
    assert job_property(env, job_id, "State") != "cancelled"
    browser.click(again)
    browser.click(again)
    wait_until(lambda: (s := row_state(browser, job_id)) and s["state"] == "cancelled", 30, what="the second cancel")
    assert script_errors(browser) == []


def detail_fact(browser: Browser, label: str) -> str | None:
    """The value the open job's details show for `label` (State, Progress, ...)."""
    return browser.execute("""
        const dt = [...document.querySelectorAll('#details-facts dt')].find(dt => dt.textContent === arguments[0]);
        return dt ? dt.nextElementSibling.textContent : null;""", label)


def test_details_of_a_running_job_are_not_redrawn(browser: Browser, cockpit_url: str, env: dict[str, str],
                                                  stack: Any, sources: dict[str, Path]) -> None:
    """While a job runs, its details change several times a second: only what changed is written, in place, so
    that text selected in them (the spec, say, to copy it) stays selected, and the history only grows."""
    before = dict(stack.daemon_env)
    # A conversion limited to 40 MB/s runs for about 15 s, however fast the machine.
    stack.restart_daemon({**before, "H2KD_WORKER_ENVIRONMENT": "H2K_RATE_LIMIT=40000000"})
    output = stack.output_dir / "details-in-place.qcow2"
    job_id = ""
    try:
        job_id = convert_on_the_page(browser, cockpit_url, sources["big"], output)
        browser.click(browser.find(f"tr[data-job-id='{job_id}'] .job-link"))
        wait_until(lambda: browser.execute("""
            return document.getElementById('details-spec').textContent.startsWith('{') &&
                document.querySelectorAll('#details-history li').length > 0 &&
                document.getElementById('details-journal').textContent !== '';"""), 15, what="the job's details")
        first_progress = detail_fact(browser, "Progress")
        browser.execute("""
            const spec = document.getElementById('details-spec');
            spec.closest('details').open = true;
            const range = document.createRange();
            range.selectNodeContents(spec);
            getSelection().removeAllRanges();
            getSelection().addRange(range);
            window.kept = {spec: spec.textContent,
                           operation: [...document.querySelectorAll('#details-facts dt')]
                               .find(dt => dt.textContent === 'Operation').nextElementSibling.firstChild,
                           history: document.querySelector('#details-history li')};
            window.rewrites = [];
            window.removals = [];
            const box = node => (node.nodeType === 1 ? node : node.parentElement).closest('[id]').id;
            const text = nodes => [...nodes].map(n => n.textContent).join('');
            new MutationObserver(records => {
                for (const r of records) {
                    if (r.type !== 'childList')
                        continue;
                    if (r.removedNodes.length && text(r.removedNodes) === text(r.addedNodes))
                        window.rewrites.push(box(r.target) + ': ' + text(r.addedNodes).slice(0, 60));
                    if (r.target.id === 'details-history' && r.removedNodes.length)
                        window.removals.push(r.removedNodes.length);
                }
            }).observe(document.getElementById('details-card'), {childList: true, subtree: true});""")
        time.sleep(6)
        assert job_property(env, job_id, "State") == "progressing", "it ended too soon to tell"
        assert detail_fact(browser, "Progress") != first_progress, "the job did not advance meanwhile"
        kept = browser.execute("""
            return {selected: getSelection().toString() === window.kept.spec && window.kept.spec !== '',
                    operation: window.kept.operation.isConnected, history: window.kept.history.isConnected,
                    rewrites: window.rewrites, removals: window.removals};""")
        assert kept == {"selected": True, "operation": True, "history": True, "rewrites": [], "removals": []}
        # The Result is read again when h2kd says it changed (by name only): the finished job's comes by itself.
        result = wait_until(lambda: (t := browser.execute("return document.getElementById('details-result')"
                                                          ".textContent")).startswith("{") and t, 60,
                            what="the finished job's result")
        assert json.loads(result)["outputs"]["disks"][0]["path"] == str(output)
        assert script_errors(browser) == []
    finally:
        if job_id:
            load.cancel_and_remove(stack.bus_address, [job_id])
        output.unlink(missing_ok=True)
        stack.restart_daemon(before)


def test_daemon_errors_are_shown_next_to_the_form(browser: Browser, cockpit_url: str, env: dict[str, str],
                                                  stack: Any, sources: dict[str, Path]) -> None:
    open_page(browser, cockpit_url)
    error_box = browser.find("#submit-error")

    # Refused by the spec check: a relative path. The page shows the daemon's own words.
    fill_form(browser, "images/disk.vmdk", str(stack.output_dir / "never.qcow2"))
    browser.click(browser.find("#submit-button"))
    wait_until(lambda: browser.displayed(error_box), 20, what="the error")
    name, expected = submit_error(stack.bus_address, "images/disk.vmdk", str(stack.output_dir / "never.qcow2"))
    assert name, "h2kd accepted a relative source path"
    message = browser.text(browser.find("#submit-error .daemon-message"))
    assert message == expected
    assert name.rsplit(".", 1)[-1] in browser.text(error_box)
    assert browser.attribute(error_box, "role") == "alert"
    # "Next to the form": inside the form's card.
    assert browser.execute("return document.getElementById('submit-card').contains(arguments[0])",
                           {ELEMENT_KEY: error_box})

    # An output outside h2kd's output directories: refused at the call, or stored as a job that failed
    # the host checks at once. Either way the daemon's words are next to the form.
    outside = "/var/tmp/h2k-cockpit-outside.qcow2"
    fill_form(browser, str(sources["big"]), outside)
    browser.click(browser.find("#submit-button"))
    wait_until(lambda: browser.displayed(error_box) and
               browser.text(browser.find("#submit-error .daemon-message")) != message, 20,
               what="the second error")
    shown = browser.text(browser.find("#submit-error .daemon-message"))
    failed_id = browser.attribute(error_box, "data-job-id")
    if failed_id:
        code, daemon_message = job_property(env, failed_id, "Error")
        assert shown == daemon_message
        assert code in browser.text(error_box)
        assert job_property(env, failed_id, "State") == "failed"
    else:
        name, expected = submit_error(stack.bus_address, str(sources["big"]), outside)
        assert name and shown == expected
        assert name.rsplit(".", 1)[-1] in browser.text(error_box)
    assert outside in shown
    assert not browser.displayed(browser.find("#submit-status"))
    assert not Path(outside).exists()


def test_pause_and_resume_the_queue(browser: Browser, cockpit_url: str, env: dict[str, str]) -> None:
    open_page(browser, cockpit_url)
    paused = lambda: busctl_json(env, "get-property", BUS, MANAGER_PATH, MANAGER, "Paused")  # noqa: E731
    assert paused() is False
    try:
        browser.click(browser.find("#pause-button"))
        wait_until(paused, 10, what="the queue to pause")
        wait_until(lambda: browser.displayed(browser.find("#resume-button")), 10, what="the Resume button")
        assert "Paused" in browser.text(browser.find("#queue-state"))
        assert not browser.displayed(browser.find("#pause-button"))
        browser.click(browser.find("#resume-button"))
        wait_until(lambda: paused() is False, 10, what="the queue to resume")
        wait_until(lambda: browser.displayed(browser.find("#pause-button")), 10, what="the Pause button")
    finally:
        busctl(env, "call", BUS, MANAGER_PATH, MANAGER, "ResumeQueue")


def test_page_follows_the_daemon_going_away_and_coming_back(browser: Browser, cockpit_url: str, stack: Any,
                                                            env: dict[str, str], sources: dict[str, Path]) -> None:
    inspect = busctl(env, "call", BUS, MANAGER_PATH, MANAGER, "SubmitJob", "a{sv}a{sv}", "2", "operation", "s",
                     "inspect", "image", "a{sv}", "1", "path", "s", str(sources["big"]), "0")
    assert inspect.returncode == 0, inspect.stderr
    open_page(browser, cockpit_url)
    wait_until(lambda: browser.exists("tr[data-job-id]"), 10, what="the job list")
    listed = {j[0] for j in busctl_json(env, "call", BUS, MANAGER_PATH, MANAGER, "ListJobs", "a{sv}", "0")[0]}
    banner = browser.find("#connection-error")
    stack.stop_daemon()
    try:
        wait_until(lambda: browser.displayed(banner), 15, what="the page to notice h2kd is gone")
        assert "not running" in browser.text(banner)
        assert browser.attribute(browser.find("#submit-button"), "disabled") is not None
        # Jobs of a daemon that is gone are not shown as if they were live, nor its version.
        wait_until(lambda: not browser.exists("tr[data-job-id]"), 15, what="the list to empty")
        assert browser.text(browser.find("#daemon-version")) == ""
        # Nor is the list said to be empty: without h2kd, nobody can tell which jobs there are.
        empty = browser.find("#jobs-empty")
        wait_until(lambda: browser.displayed(empty) and browser.text(empty) != "", 15, what="the list's empty text")
        assert browser.text(empty) == "The jobs are not known while h2kd is not running.", browser.text(empty)
    finally:
        stack.start_daemon()
    wait_until(lambda: not browser.displayed(banner), 20, what="the page to see h2kd again")
    # Without reloading, the list comes back from the new daemon.
    wait_until(lambda: set(browser.execute(
        "return [...document.querySelectorAll('tr[data-job-id]')].map(r => r.dataset.jobId)")) == listed, 20,
        what="the job list to come back")
    assert browser.attribute(browser.find("#submit-button"), "disabled") is None
    assert script_errors(browser) == []


def test_page_opened_while_h2kd_is_down_finds_it_once_started(browser: Browser, cockpit_url: str, stack: Any,
                                                               env: dict[str, str], sources: dict[str, Path]) -> None:
    """Nobody owns h2kd's name when the page opens, and D-Bus cannot start h2kd (the stack's bus has no activation):
    the bridge answers the page's watch of the name with no owner and then closes it. The page says h2kd is not
    running, and once h2kd is started it shows it, its jobs included, without being reloaded."""
    made = held_jobs(stack.bus_address, str(sources["big"]), 1)
    try:
        stack.stop_daemon()
        try:
            open_page(browser, cockpit_url, connected=False)
            banner = browser.find("#connection-error")
            wait_until(lambda: browser.displayed(banner) and "not running" in browser.text(banner), 15,
                       what="the page to say h2kd is not running")
            assert browser.attribute(browser.find("#submit-button"), "disabled") is not None
            assert browser.text(browser.find("#daemon-version")) == ""
            # Long enough for the page's first watches of the name to have been closed.
            time.sleep(3)
            assert browser.displayed(banner)
            empty = browser.find("#jobs-empty")
            assert browser.displayed(empty), "the job list's place is empty"
            assert browser.text(empty) == "The jobs are not known while h2kd is not running.", browser.text(empty)
        finally:
            stack.start_daemon()
        wait_until(lambda: not browser.displayed(banner), 45, what="the page to find the h2kd started after it")
        wait_until(lambda: made[0] in shown_job_ids(browser), 15, what="the job list")
        assert browser.attribute(browser.find("#submit-button"), "disabled") is None
        version = busctl_json(env, "get-property", BUS, MANAGER_PATH, MANAGER, "Version")
        wait_until(lambda: browser.text(browser.find("#daemon-version")) == f"h2kd {version}", 10,
                   what="h2kd's version")
        assert script_errors(browser) == []
    finally:
        load.cancel_and_remove(stack.bus_address, made)


def call_channels(browser: Browser) -> list[str]:
    """The channels the page's calls to h2kd go out on (GetHealth, every few seconds), once one has gone out."""
    browser.execute("""
        window.callChannels = new Set();
        cockpit.transport.filter((data, channel) => {
            if (channel && typeof data === "string" && data.includes('"call"'))
                window.callChannels.add(channel);
            return true;
        }, true);""")
    return wait_until(lambda: browser.execute("return [...window.callChannels]"), 15, what="a call from the page")


def test_page_connects_again_when_its_connection_to_h2kd_is_closed(browser: Browser, cockpit_url: str,
                                                                   env: dict[str, str], stack: Any,
                                                                   sources: dict[str, Path]) -> None:
    """The bridge closes the page's connection to h2kd while h2kd goes on running (as it does when it is told
    to): the page says so, then connects again by itself and shows the jobs."""
    made = held_jobs(stack.bus_address, str(sources["big"]), 1)
    try:
        open_page(browser, cockpit_url)
        wait_until(lambda: made[0] in shown_job_ids(browser), 15, what="the job list")
        channels = call_channels(browser)
        assert len(channels) == 1, channels
        browser.execute("""
            cockpit.transport.inject("\\n" + JSON.stringify({command: "close", channel: arguments[0],
                                                             problem: "terminated"}), false);""", channels[0])
        banner = browser.find("#connection-error")
        assert browser.displayed(banner) and "lost" in browser.text(banner), browser.text(banner)
        wait_until(lambda: not browser.displayed(banner), 15, what="the page to connect again")
        wait_until(lambda: made[0] in shown_job_ids(browser), 15, what="the job list again")
        assert browser.attribute(browser.find("#submit-button"), "disabled") is None
        assert script_errors(browser) == []
    finally:
        load.cancel_and_remove(stack.bus_address, made)


def test_an_expected_end_beyond_what_a_date_holds_is_not_shown_as_nan(browser: Browser, cockpit_url: str,
                                                                       env: dict[str, str], stack: Any,
                                                                       sources: dict[str, Path]) -> None:
    """h2kd caps an expected end at 2^63-1 microseconds, past the last time a JavaScript Date holds: the row says
    nothing of the time left rather than "NaN d NaN h left". The change is handed to the page as h2kd's signal
    would be, on a held job that h2kd leaves alone meanwhile."""
    made = held_jobs(stack.bus_address, str(sources["big"]), 1)
    try:
        open_page(browser, cockpit_url)
        wait_until(lambda: made[0] in shown_job_ids(browser), 15, what="the job list")
        channels = call_channels(browser)
        changed = {"State": {"t": "s", "v": "progressing"}, "Phase": {"t": "s", "v": "converting"},
                   "Progress": {"t": "d", "v": 0.5}, "ProgressKnown": {"t": "b", "v": True},
                   "BytesDone": {"t": "t", "v": 512 * MiB}, "BytesTotal": {"t": "t", "v": 1024 * MiB},
                   "Rate": {"t": "t", "v": 1}, "ExpectedEndTime": {"t": "t", "v": 2**63 - 1}}
        signal = {"signal": [job_path(env, made[0]), "org.freedesktop.DBus.Properties", "PropertiesChanged",
                             [JOB, changed, []]]}
        browser.execute("cockpit.transport.inject(arguments[0] + '\\n' + JSON.stringify(arguments[1]), false);",
                        channels[0], signal)
        shown = wait_until(lambda: (s := row_state(browser, made[0])) and s["state"] == "progressing" and s, 10,
                           what="the row to show the change")
        time.sleep(1.5)     # the page redraws the time left every second
        info = row_state(browser, made[0])["info"]
        assert "512 MiB of 1.0 GiB" in info and "NaN" not in info and "left" not in info, (shown, info)
        assert script_errors(browser) == []
    finally:
        load.cancel_and_remove(stack.bus_address, made)
        open_page(browser, cockpit_url)


def test_readable_at_a_narrow_width(browser: Browser, cockpit_url: str) -> None:
    try:
        browser.set_window_size(400, 1400)
        open_page(browser, cockpit_url)
        wait_until(lambda: browser.exists("tr[data-job-id]"), 10, what="the job list")
        width = browser.execute("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"the page scrolls sideways at 400 px: {width}"
        browser.full_page_screenshot(ARTIFACTS / "cockpit-narrow.png")
    finally:
        browser.set_window_size(1280, 1100)


def test_many_jobs_the_newest_are_shown_and_the_list_follows_changes(browser: Browser, cockpit_url: str,
                                                                     env: dict[str, str], stack: Any,
                                                                     sources: dict[str, Path]) -> None:
    """More jobs than the page shows (200): it shows the newest, says how many there are, and keeps up with
    jobs that are removed or change state without reloading."""
    made = held_jobs(stack.bus_address, str(sources["big"]), 210)
    try:
        listed = busctl_json(env, "call", BUS, MANAGER_PATH, MANAGER, "ListJobs", "a{sv}", "0")[0]
        newest = [row[0] for row in sorted(listed, key=lambda row: (-row[6], row[0]))][:200]
        open_page(browser, cockpit_url)
        wait_until(lambda: shown_job_ids(browser) == newest, 30, what="the newest 200 jobs, newest first")
        more = browser.find("#jobs-more")
        assert browser.displayed(more)
        assert f"Showing 200 of {len(listed)} jobs" in browser.text(more)
        # Every shown row has the job's own values, read from its object (not only what the list gives).
        row = browser.find(f"tr[data-job-id='{made[-1]}']")
        assert "inspect · big.vmdk" in browser.text(row)
        assert row_state(browser, made[-1])["cancel"] is True

        # The newest job is cancelled and removed: it leaves the page and the next older one comes into view.
        busctl(env, "call", BUS, MANAGER_PATH, MANAGER, "CancelJob", "s", made[-1])
        wait_until(lambda: (row_state(browser, made[-1]) or {}).get("state") == "cancelled", 15,
                   what="the cancelled state on the page")
        assert busctl(env, "call", BUS, MANAGER_PATH, MANAGER, "RemoveJob", "s", made[-1]).returncode == 0
        next_older = [row[0] for row in sorted(listed, key=lambda row: (-row[6], row[0]))][200]
        wait_until(lambda: shown_job_ids(browser) == newest[1:] + [next_older], 15,
                   what="the removed job to go and the next one to come into view")

        # A job not on screen that changes state comes into view under a filter that now matches it.
        oldest = made[0]
        assert oldest not in shown_job_ids(browser)
        browser.click(browser.find("#job-filter option[value='finished']"))
        busctl(env, "call", BUS, MANAGER_PATH, MANAGER, "CancelJob", "s", oldest)
        wait_until(lambda: oldest in shown_job_ids(browser), 15, what="the cancelled old job under 'finished'")
        assert row_state(browser, oldest)["retry"] is True
        assert script_errors(browser) == []
    finally:
        browser.click(browser.find("#job-filter option[value='all']"))
        load.cancel_and_remove(stack.bus_address, made)


def test_a_running_job_stays_in_view_above_a_batch_queued_after_it(browser: Browser, cockpit_url: str,
                                                                  env: dict[str, str], stack: Any,
                                                                  sources: dict[str, Path]) -> None:
    """Hundreds of jobs submitted after the one converting must not push it off the list (200 rows): running
    jobs come first. A job held back from the queue says so, and its Start button queues it."""
    before = dict(stack.daemon_env)
    # Conversions limited to 20 MB/s (an operator's setting): the job runs for half a minute, however fast the
    # machine, while the batch is submitted.
    stack.restart_daemon({**before, "H2KD_WORKER_ENVIRONMENT": "H2K_RATE_LIMIT=20000000"})
    output = stack.output_dir / "stays-in-view.qcow2"
    made: list[str] = []
    running = ""
    try:
        running = convert_on_the_page(browser, cockpit_url, sources["big"], output)
        made = held_jobs(stack.bus_address, str(sources["big"]), 205)
        wait_until(lambda: made[-1] in shown_job_ids(browser), 30, what="the batch on the page")
        shown = shown_job_ids(browser)
        assert job_property(env, running, "State") == "progressing", "it ended too soon to tell"
        assert shown[0] == running and len(shown) == 200, shown[:3]
        assert "running, then the newest" in browser.text(browser.find("#jobs-more"))

        held = row_state(browser, made[-1])
        assert held["start"] and held["cancel"] and held["info"].startswith("Held"), held
        browser.click(browser.find(f"tr[data-job-id='{made[-1]}'] .job-start"))
        wait_until(lambda: job_property(env, made[-1], "State") != "validated", 20, what="the held job to start")
        wait_until(lambda: not (row_state(browser, made[-1]) or {"start": True})["start"], 15,
                   what="its Start button to go")

        # A job that failed says why in the list too, so that failures can be gone through without opening each.
        failed, _ = with_client(stack.bus_address, lambda client: client.submit(inspect_spec("/nonexistent.vmdk")))
        made.append(failed)
        code, message = job_property(env, failed, "Error")
        wait_until(lambda: (row_state(browser, failed) or {}).get("info", "").startswith(f"{code}: {message[:30]}"),
                   15, what="the failed job's error in its row")
        assert script_errors(browser) == []
    finally:
        if running:
            busctl(env, "call", BUS, MANAGER_PATH, MANAGER, "CancelJob", "s", running)
        load.cancel_and_remove(stack.bus_address, made)
        output.unlink(missing_ok=True)
        stack.restart_daemon(before)


def test_a_submitted_job_is_reported_submitted_when_reading_it_back_fails(browser: Browser, cockpit_url: str,
                                                                         env: dict[str, str], stack: Any,
                                                                         sources: dict[str, Path]) -> None:
    """SubmitJob succeeded but the page cannot read the new job back: it says the job was submitted (it was),
    not that it could not be, which would have the administrator submit it twice."""
    open_page(browser, cockpit_url)
    before = {j[0] for j in busctl_json(env, "call", BUS, MANAGER_PATH, MANAGER, "ListJobs", "a{sv}", "0")[0]}
    output = stack.output_dir / "read-back-fails.qcow2"
    job_id = ""
    assert busctl(env, "call", BUS, MANAGER_PATH, MANAGER, "PauseQueue").returncode == 0
    try:
        fill_form(browser, str(sources["big"]), str(output))
        fail_job_reads(browser)
        job_id = submit(browser)
        assert browser.execute("return window.failedReads") >= 1, "the page did not read the new job back"
        assert browser.text(browser.find("#submit-status")) == f"Job {job_id} submitted."
        assert not browser.displayed(browser.find("#submit-error"))
        after = {j[0] for j in busctl_json(env, "call", BUS, MANAGER_PATH, MANAGER, "ListJobs", "a{sv}", "0")[0]}
        assert after - before == {job_id}
        assert job_property(env, job_id, "State") == "queued"
        stop_failing_job_reads(browser)
        wait_until(lambda: (row_state(browser, job_id) or {}).get("state") == "queued", 15,
                   what="the submitted job's row")
        assert script_errors(browser) == []
    finally:
        stop_failing_job_reads(browser)
        busctl(env, "call", BUS, MANAGER_PATH, MANAGER, "ResumeQueue")
        if job_id:
            load.cancel_and_remove(stack.bus_address, [job_id])


def test_a_job_that_cannot_be_read_is_retried_with_a_backoff(browser: Browser, cockpit_url: str,
                                                           env: dict[str, str], stack: Any,
                                                           sources: dict[str, Path]) -> None:
    """A job whose GetAll keeps failing is read again later and later, not in a loop of calls; the other jobs
    are shown meanwhile, and the job too once it can be read."""
    made = held_jobs(stack.bus_address, str(sources["big"]), 3)
    unreadable = made[1]
    try:
        open_page(browser, cockpit_url)
        wait_until(lambda: set(made) <= set(shown_job_ids(browser)), 15, what="the new jobs")
        fail_job_reads(browser, job_path(env, unreadable))
        # A new h2kd: the page lists the jobs afresh and reads the ones it shows.
        stack.restart_daemon()
        wait_until(lambda: browser.execute("return window.failedReads") >= 1, 30,
                   what="the page to read the job again")
        wait_until(lambda: {made[0], made[2]} <= set(shown_job_ids(browser)), 15, what="the other jobs")
        time.sleep(6)
        # Read at once, then after 1, 2 and 4 s: at most 4 calls in the first 6 s, 5 with some slack.
        reads = browser.execute("return window.failedReads")
        assert reads <= 5, f"the page read the unreadable job {reads} times in 6 s"
        shown = shown_job_ids(browser)
        assert unreadable not in shown
        assert {made[0], made[2]} <= set(shown)
        stop_failing_job_reads(browser)
        wait_until(lambda: unreadable in shown_job_ids(browser), 20, what="the job once it can be read")
        assert script_errors(browser) == []
    finally:
        stop_failing_job_reads(browser)
        load.cancel_and_remove(stack.bus_address, made)



@pytest.fixture(scope="module")
def viewer_url(stack: Any) -> Iterator[str]:
    """The page as served to a user who is neither root nor in any group of h2kd's (cockpit-ws and its bridge
    run as that user): the user and the page's directory are removed afterwards."""
    name = "h2kt-viewer"
    subprocess.run(["userdel", "-r", name], capture_output=True)      # left over from an interrupted run
    subprocess.run(["useradd", "--create-home", "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
    data_dir = Path(tempfile.mkdtemp(prefix="h2k-cockpit-viewer-"))
    try:
        data_dir.chmod(0o755)
        with page_server(stack, data_dir, user=name) as url:
            yield url
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        subprocess.run(["userdel", "-r", name], capture_output=True)


def test_another_users_job_shows_why_its_result_is_withheld(browser: Browser, viewer_url: str, stack: Any,
                                                            env: dict[str, str], tmp_path: Path) -> None:
    """A user who does not own a job sees it, its spec and its error, but in place of its result the reason
    h2kd gives for withholding it; the result itself (what the job found in the image) appears nowhere."""
    tmp_path.chmod(0o755)
    source = make_image("vmdk", "monolithicSparse", tmp_path / "private.vmdk", size=16 * MiB, seed=5)

    async def inspected(client: Client) -> str:
        job_id, path = await client.submit(inspect_spec(str(source)))
        assert (await client.wait_terminal(path, timeout=120))["State"] == "completed"
        return job_id
    job_id = with_client(stack.bus_address, inspected)
    try:
        result = job_property(env, job_id, "Result")
        assert "virtual_size" in result, result
        open_page(browser, viewer_url)
        wait_until(lambda: browser.exists(f"tr[data-job-id='{job_id}'] .job-link"), 15, what="the job's row")
        assert row_state(browser, job_id)["state"] == "completed"
        browser.click(browser.find(f"tr[data-job-id='{job_id}'] .job-link"))
        spec = wait_until(lambda: (t := browser.execute("return document.getElementById('details-spec').textContent"))
                          .startswith("{") and t, 15, what="the job's spec")
        assert json.loads(spec) == json.loads(job_property(env, job_id, "Spec"))
        shown = wait_until(lambda: (t := browser.execute("return document.getElementById('details-result')"
                                                         ".textContent")) != "No result yet." and t, 15,
                           what="the job's result box")
        assert f"the result of job {job_id} is for its owner (uid 0) and administrators to read" in shown, shown
        page_text = browser.execute("return document.body.innerText")
        assert "virtual_size" not in page_text
        assert script_errors(browser) == []
    finally:
        load.cancel_and_remove(stack.bus_address, [job_id])


def test_a_user_with_limited_access_is_told_to_turn_on_administrative_access(browser: Browser, viewer_url: str,
                                                                             env: dict[str, str], stack: Any,
                                                                             tmp_path: Path) -> None:
    """polkit wants an administrator for managing the queue and for submitting (the user is in no group of h2kd's):
    the page says what would let them, Cockpit's administrative access, with h2kd's own words after it."""
    open_page(browser, viewer_url)
    browser.click(browser.find("#pause-button"))
    alert = browser.find("#action-error")
    wait_until(lambda: browser.displayed(alert), 15, what="the refusal")
    text = browser.text(browser.find("#action-error .alert-text"))
    assert text.startswith("Cannot pause the queue: This needs administrative access."), text
    assert "“Limited access”" in text
    assert "(polkit action org.hyper2kvm.h2kd1.manage)" in text, text
    assert "InteractiveAuthorizationRequired" not in text and "AccessDenied" not in text
    assert busctl_json(env, "get-property", BUS, MANAGER_PATH, MANAGER, "Paused") is False
    browser.click(browser.find("#action-error .alert-close"))
    assert not browser.displayed(alert)

    tmp_path.chmod(0o755)
    source = make_image("vmdk", "monolithicSparse", tmp_path / "limited.vmdk", size=16 * MiB, seed=6)
    before = busctl_json(env, "call", BUS, MANAGER_PATH, MANAGER, "ListJobs", "a{sv}", "0")[0]
    fill_form(browser, str(source), str(stack.output_dir / "limited.qcow2"))
    browser.click(browser.find("#submit-button"))
    error_box = browser.find("#submit-error")
    wait_until(lambda: browser.displayed(error_box), 20, what="the refusal of the submission")
    text = browser.text(error_box)
    assert text.startswith("Starting a conversion needs administrative access."), text
    assert "“Limited access”" in text
    assert "(polkit action org.hyper2kvm.h2kd1.submit)" in browser.text(browser.find("#submit-error .daemon-message"))
    assert "InteractiveAuthorizationRequired" not in text and "AccessDenied" not in text
    assert busctl_json(env, "call", BUS, MANAGER_PATH, MANAGER, "ListJobs", "a{sv}", "0")[0] == before
    assert script_errors(browser) == []


def test_a_failure_quoting_an_images_words_and_a_reused_id(browser: Browser, cockpit_url: str, stack: Any,
                                                           env: dict[str, str], tmp_path: Path) -> None:
    """A failure's message may quote an image's own words at length, overrides that turn a line around included:
    the list shows its first line, cut and escaped, for every viewer. The job removed and another submitted under
    its id while its details are open: the details are the new job's, its history not mixed with the first's."""
    tmp_path.chmod(0o755)
    words = "\u202e" + "gnol " * 24     # as much as qemu quotes of a createType it does not know
    evil = tmp_path / "evil.vmdk"
    evil.write_text("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
                    f'createType="{words}"\n\nRW 2048 FLAT "d.raw" 0\n')
    evil.chmod(0o644)
    with open(tmp_path / "d.raw", "wb") as extent:
        extent.truncate(MiB)
    (tmp_path / "d.raw").chmod(0o644)
    job_id = f"reused-{os.getpid()}"

    async def ended(client: Client) -> dict[str, Any]:
        _, path = await client.submit(inspect_spec(str(evil), job_id))
        return await client.wait_terminal(path, timeout=120)
    first = with_client(stack.bus_address, ended)
    try:
        assert first["State"] == "failed" and "\u202e" in first["Error"][1], first["Error"]
        open_page(browser, cockpit_url)
        wait_until(lambda: browser.exists(f"tr[data-job-id='{job_id}'] .job-link"), 15, what="the job's row")
        info = browser.execute("""
            const row = document.querySelector(`tr[data-job-id='${arguments[0]}']`);
            const cells = [...row.querySelectorAll('*')].filter(n => n.title && n.title.includes('gnol'));
            return {text: row.textContent, title: cells.length ? cells[0].title : null};""", job_id)
        assert "\u202e" not in info["text"] and info["text"].count("gnol") < 24 and "…" in info["text"], info
        assert info["title"] is not None and info["title"].count("gnol") == 24, info["title"]
        assert "\u202e" not in info["title"] and "\\u202e" in info["title"], info["title"]

        browser.click(browser.find(f"tr[data-job-id='{job_id}'] .job-link"))
        wait_until(lambda: browser.execute("return document.querySelectorAll('#details-history li').length") > 0,
                   15, what="the first job's history")
        load.cancel_and_remove(stack.bus_address, [job_id])
        evil.write_text(evil.read_text().replace(words, "monolithicFlat"))
        time.sleep(1.1)         # the journal is asked from the job's creation on, in whole seconds
        second = with_client(stack.bus_address, ended)
        assert second["State"] == "completed", second["Error"]
        history = wait_until(lambda: (t := browser.execute(
            "return document.getElementById('details-history').textContent")) and "completed" in t and t, 30,
                             what="the second job's history")
        # The first job's history ended in its failure quoting the image's words: none of it is shown.
        assert history.count("— → created") == 1 and "gnol" not in history and "failed" not in history, history
        journal = wait_until(lambda: (t := browser.execute(
            "return document.getElementById('details-journal').textContent")) and "completed" in t and t, 30,
                             what="the second job's journal")
        assert "gnol" not in journal and "failed" not in journal, journal
        assert script_errors(browser) == []
    finally:
        load.cancel_and_remove(stack.bus_address, [job_id])
