"""Shared test fixtures: one private stack for the whole run, the environment for bus clients, and the PID 1 guard.

bench/ is made importable here: the tests' bus client and disk images build on its own.

The guard: a systemd manager started in the wrong cgroup takes over every process of the machine,
PID 1 included (see h2kd/sandbox/cgroup.py). The run fails if /proc/1/cgroup differs at the end
from what it was at the start, whatever the tests said.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest

from h2kd.sandbox.stack import Stack, new_base_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PID1_CGROUP = Path("/proc/1/cgroup")
_pid1_at_start = pytest.StashKey[str]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.stash[_pid1_at_start] = PID1_CGROUP.read_text()


# trylast: after the session's fixtures are torn down (the shared stack stopped), also after -x or Ctrl-C.
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.stash.get(_pid1_at_start, None)
    after = PID1_CGROUP.read_text()
    if before is None or before == after:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = ("PID 1's cgroup changed during the test run: a systemd manager or journald was "
               "started in the root cgroup.\n--- /proc/1/cgroup at the start ---\n" + before +
               "--- /proc/1/cgroup at the end ---\n" + after)
    if reporter is not None:
        reporter.write_sep("=", "PID 1 CGROUP CHANGED", red=True, bold=True)
        reporter.write_line(message)
    else:
        print(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The private stack with h2kd, shared by the whole run. A test that needs a fresh daemon calls
    stack.restart_daemon(). If the stack cannot boot, every test using it errors with the reason."""
    base = new_base_dir("h2k-test-")
    private = Stack(base)
    try:
        private.start()
        yield private
    finally:
        private.stop()
        if not os.environ.get("H2K_KEEP_STACK"):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _h2kd_is_up_for_each_test(request: pytest.FixtureRequest) -> None:
    """A test that left h2kd ended (on purpose or by a fault it found) does not fail every test after it:
    the next test that uses the stack finds h2kd started again on the same state."""
    if "stack" not in request.fixturenames:
        return
    shared: Stack = request.getfixturevalue("stack")
    if shared.daemon_pid is None:
        shared.restart_daemon()


@pytest.fixture
def stack_env(stack: Stack) -> dict[str, str]:
    """os.environ plus the stack's variables: for busctl --system, gdbus --system, h2kctl."""
    env = {**os.environ, **stack.env()}
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    return env
