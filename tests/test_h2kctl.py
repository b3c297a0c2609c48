"""h2kctl as an administrator uses it: the installed command run as a subprocess against the private stack.

Every command, the --json outputs against what busctl reads from the bus, each exit code, the progress
bar in a real pseudo-terminal, plain lines on a pipe, Ctrl-C detaching, and an unprivileged user.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import pty
import pwd
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Iterator

import pytest
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from busclient import WORKER, Client, open_bus, read_until, run
from images import disk_difference
from runas import as_user, user_in_group

from h2kctl.cli import build_parser, normalize_argv
from h2kctl.completion import FILES, render_bash, render_zsh
from h2kctl.manpage import render as render_manpage

REPO = Path(__file__).resolve().parent.parent
H2KCTL = str(Path(sys.executable).parent / "h2kctl")
BUS_NAME = "org.hyper2kvm.h2kd1"
MANAGER = "/org/hyper2kvm/h2kd1"
JOB_IFACE = "org.hyper2kvm.h2kd1.Job"
MANAGER_IFACE = "org.hyper2kvm.h2kd1.Manager"
COMMANDS = ["submit", "list", "status", "show", "watch", "wait", "cancel", "retry", "remove", "start", "logs",
            "events", "queue", "workers", "health", "inspect"]
TERMINAL = {"completed", "failed", "cancelled"}
MiB = 1024 * 1024


# ------------------------------------------------------------------------------------------ helpers

def h2kctl(env: dict[str, str], *args: str, timeout: float = 60, user: str | None = None,
           **kwargs) -> subprocess.CompletedProcess[str]:
    argv = [H2KCTL, *args]
    if user:
        argv = as_user(user, argv)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"rc={result.returncode}\nstdout:{result.stdout}\nstderr:{result.stderr}"
    return result


def busctl_property(env: dict[str, str], path: str, interface: str, name: str):
    out = subprocess.run(["busctl", "--system", "--json=short", "get-property", BUS_NAME, path, interface, name],
                         env=env, capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)["data"]


def job_path(env: dict[str, str], job_id: str) -> str:
    out = subprocess.run(["busctl", "--system", "--json=short", "call", BUS_NAME, MANAGER, MANAGER_IFACE,
                          "GetJob", "s", job_id], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["data"][0]


def job_state(env: dict[str, str], job_id: str) -> str:
    return busctl_property(env, job_path(env, job_id), JOB_IFACE, "State")


def wait_for_state(env: dict[str, str], job_id: str, states: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(env, job_id)
        if state in states or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def clean_up(env: dict[str, str], job_ids: Iterable[str], outputs: Iterable[Path] = (),
             processes: Iterable[subprocess.Popen] = ()) -> None:
    """What a test leaves on the shared stack goes: its h2kctl processes still running, its jobs, their outputs."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
    for job_id in job_ids:
        h2kctl(env, "cancel", job_id)
        h2kctl(env, "remove", job_id)
    for output in outputs:
        output.unlink(missing_ok=True)


def make_raw_with_data(path: Path, size_mib: int) -> Path:
    """A raw disk image full of non-zero data (so that converting it takes a measurable while)."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size_mib):
            f.write(block[i % 7:] + block[:i % 7])
    return path


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, Path]]:
    # Not under pytest's tmp_path: that is closed to the unprivileged user, who must read these.
    base = Path(tempfile.mkdtemp(prefix="h2kctl-images-"))
    try:
        base.chmod(0o755)
        yield _make_images(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _make_images(base: Path) -> dict[str, Path]:
    small = base / "small.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(small), "16M"], check=True)
    with open(small, "r+b") as f:
        f.write(os.urandom(MiB))
    vmdk = base / "small.vmdk"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", str(small), str(vmdk)], check=True)
    big = make_raw_with_data(base / "big.raw", 256)
    not_an_image = base / "notes.vmdk"
    not_an_image.write_text("this is not a disk image\n" * 100)
    for p in (small, vmdk, big, not_an_image):
        p.chmod(0o644)
    return {"small": small, "vmdk": vmdk, "big": big, "text": not_an_image}


@pytest.fixture
def env(stack_env: dict[str, str]) -> dict[str, str]:
    return {**stack_env, "COLUMNS": "100", "LC_ALL": "C.UTF-8"}


@pytest.fixture
def output_dir(stack) -> Path:
    out = Path(stack.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def paused_queue(env):
    ok(h2kctl(env, "queue", "pause"))
    yield
    h2kctl(env, "queue", "resume")


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 60, on_output=None) -> tuple[int, str]:
    """Run argv with stdin/stdout/stderr on a new pseudo-terminal; return (exit status as
    os.waitstatus_to_exitcode gives it, all it wrote). on_output(terminal, text_so_far) is called after each
    read, with the terminal's master side (write CTRL_C to it to press Ctrl-C)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        os.execve(argv[0], argv, env)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:   # EIO: the child has gone and the terminal is closed
                break
            if not chunk:
                break
            output += chunk
            if on_output is not None:
                on_output(fd, output.decode(errors="replace"))
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


# The terminal turns this byte into SIGINT for every process of its foreground group, as a real Ctrl-C does.
CTRL_C = b"\x03"


# ------------------------------------------------------------------ generated files, help, usage

def test_man_page_is_generated_from_the_parser_and_renders():
    text = render_manpage()
    assert (REPO / "h2kctl" / "h2kctl.1").read_text() == text, "run: python -m h2kctl.manpage > h2kctl/h2kctl.1"
    assert text.startswith(".TH H2KCTL 1")
    for section in ("NAME", "SYNOPSIS", "COMMANDS", "OPTIONS", "EXIT STATUS", "JSON OUTPUT"):
        assert f"\n.SH {section}\n" in text
    rendered = subprocess.run(["man", "-l", "-P", "cat", "-"], input=text, capture_output=True, text=True,
                              env={**os.environ, "MANWIDTH": "200"}, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    for command in COMMANDS:
        assert re.search(rf"^\s+h2kctl {command}\b", rendered.stdout, re.M), command
    for code in range(8):
        assert re.search(rf"^\s+{code}\s+\S", rendered.stdout, re.M), code
    for option in ("--no-ask-password", "--no-pager", "--address", "--quiet", "--json", "--wait"):
        assert option in rendered.stdout


@pytest.mark.parametrize("variables, pager", [
    ({"H2KCTL_PAGER": "", "PAGER": "more"}, None), ({"SYSTEMD_PAGER": "", "PAGER": "more"}, None),
    ({"H2KCTL_PAGER": "cat", "PAGER": "more"}, None), ({"PAGER": "more"}, "more")])
def test_the_first_pager_variable_set_decides_and_empty_turns_paging_off(monkeypatch, capsys, variables, pager):
    """As systemd reads SYSTEMD_PAGER: set but empty means no pager, not "try the next variable"."""
    from h2kctl import render
    for name in ("H2KCTL_PAGER", "SYSTEMD_PAGER", "PAGER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    ran: list[str] = []
    monkeypatch.setattr(render.sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(render.shutil, "get_terminal_size", lambda: os.terminal_size((80, 5)))
    monkeypatch.setattr(render.subprocess, "run",
                        lambda command, **kw: ran.append(command) or subprocess.CompletedProcess(command, 0))
    render.page("line\n" * 20, True)
    assert ran == ([pager] if pager else []), ran
    assert capsys.readouterr().out == ("" if pager else "line\n" * 20)


def test_a_pager_that_cannot_be_run_gives_way_to_less_then_more_then_none(monkeypatch, capsys, tmp_path):
    """$PAGER names a program that is not there, or not executable: sh says so with 127 or 126, and the output
    goes through less, else more, else straight to stdout (as systemd does), instead of nowhere."""
    from h2kctl import render
    programs, paged = tmp_path / "bin", tmp_path / "paged"
    programs.mkdir()
    not_executable = tmp_path / "pager.txt"
    not_executable.write_text("")
    for name in ("H2KCTL_PAGER", "SYSTEMD_PAGER", "PAGER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(programs))     # no real less or more
    monkeypatch.setattr(render.sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(render.shutil, "get_terminal_size", lambda: os.terminal_size((80, 5)))
    text = "line\n" * 20

    def install(name: str) -> None:
        pager = programs / name
        pager.write_text(f"#!/bin/sh\n{{ echo {name}; /bin/cat; }} > {paged}\n")
        pager.chmod(0o755)

    for broken in ("no-such-pager", str(not_executable)):
        monkeypatch.setenv("PAGER", broken)
        render.page(text, True)
        assert capsys.readouterr().out == text, broken
        for name in ("more", "less"):
            install(name)
            render.page(text, True)
            assert capsys.readouterr().out == "" and paged.read_text() == f"{name}\n{text}", (broken, name)
        for pager in programs.iterdir():
            pager.unlink()


def test_the_man_page_and_zsh_completion_say_what_each_command_takes():
    """Arguments that may be left out are in brackets; every JSON output and variable is documented; an option
    that may be repeated is completed again by zsh."""
    rendered = subprocess.run(["man", "-l", "-P", "cat", "-"], input=render_manpage(), capture_output=True,
                              text=True, env={**os.environ, "MANWIDTH": "200"}, timeout=60, check=True).stdout
    synopses = {m.group(1): m.group(0).strip() for m in re.finditer(r"^\s+h2kctl (\S+)(?: \S+)*$", rendered, re.M)}
    assert synopses["wait"] == "h2kctl wait [JOB...]", synopses
    assert synopses["watch"] == "h2kctl watch [JOB]" and synopses["cancel"] == "h2kctl cancel [OPTIONS...] JOB..."
    json_section = rendered.split("\nJSON OUTPUT\n", 1)[1].split("\nENVIRONMENT\n", 1)[0]
    assert re.search(r"^\s+status, submit, retry, start$", json_section, re.M), json_section
    environment = rendered.split("\nENVIRONMENT\n", 1)[1].split("\nEXAMPLES\n", 1)[0]
    for variable in ("DBUS_SYSTEM_BUS_ADDRESS", "H2KCTL_PAGER", "PAGER", "COLUMNS", "LINES", "H2KCTL_DEBUG"):
        assert f"${variable}" in environment, variable
    zsh = render_zsh().splitlines()
    for command, specs in (("submit", ["'*--tag=["]), ("list", ["'*--state=["]), ("show", ["'*-p[", "'*--property=["])):
        arguments = zsh[zsh.index(f"                {command})") + 1]     # the _arguments line of the command
        for spec in specs:
            assert spec in arguments, (command, spec, arguments)
    assert not any("(-p --property)" in line for line in zsh)     # repeatable: -p does not rule out --property


def test_completion_scripts_are_generated_and_complete(tmp_path):
    here = REPO / "h2kctl" / "completion"
    assert (here / FILES["bash"]).read_text() == render_bash(), "run: python -m h2kctl.completion --write"
    assert (here / FILES["zsh"]).read_text() == render_zsh(), "run: python -m h2kctl.completion --write"
    script = ('source "$1"; t() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _h2kctl; '
              'echo "${COMPREPLY[*]}"; }; t h2kctl su; t h2kctl submit --format ""; t h2kctl queue p; '
              't h2kctl --address x wor; t h2kctl list --op')
    out = subprocess.run(["bash", "-c", script, "bash", str(here / FILES["bash"])], capture_output=True,
                         text=True, timeout=30, check=True).stdout.splitlines()
    assert out == ["submit", "qcow2 raw", "pause priority", "workers", "--operation"]
    if shutil.which("zsh"):
        subprocess.run(["zsh", "-n", str(here / FILES["zsh"])], check=True, timeout=30)


def test_help_lists_commands_and_exit_codes():
    result = subprocess.run([H2KCTL, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    assert "exit status:" in result.stdout
    for code in range(8):
        assert re.search(rf"^  {code}  ", result.stdout, re.M)
    assert set(COMMANDS) <= set(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("words, dest", [
    (["status"], "job"), (["show"], "job"), (["watch"], "job"), (["wait"], "jobs"), (["cancel"], "jobs"),
    (["cancel", "--no-block"], "jobs"), (["retry", "--wait"], "jobs"), (["remove"], "jobs"), (["start"], "jobs"),
    (["logs", "-f"], "job"), (["events"], "job"), (["queue", "priority"], "job")])
def test_every_command_taking_jobs_takes_ids_that_begin_with_a_dash_after_double_dash(words, dest):
    """Job ids that begin with "-" (a store of an earlier h2kd may hold them): after --, as h2kctl's own suggestions
    put them, they are ids."""
    ids = ["--help", "-x"] if dest == "jobs" else ["--help"]
    args = build_parser().parse_args(normalize_argv([*words, "--", *ids, *(["3"] if words[0] == "queue" else [])]))
    assert getattr(args, dest) == (ids if dest == "jobs" else ids[0])


@pytest.mark.parametrize("args", [["frobnicate"], ["submit", "--priority", "11", "x"], ["list", "--limit", "x"],
                                  ["queue", "max-parallel", "0"], [], ["--json", "cancel", "x"],
                                  ["--json", "logs", "x"]])
def test_bad_usage_exits_2(args):
    result = subprocess.run([H2KCTL, *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr


def test_unreachable_bus_exits_6(tmp_path):
    missing = tmp_path / "no-such-socket"
    result = subprocess.run([H2KCTL, "--address", f"unix:path={missing}", "list"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 6
    assert result.stderr.startswith("h2kctl: ") and len(result.stderr.strip().splitlines()) == 1
    # DBUS_SYSTEM_BUS_ADDRESS is honoured as by every system bus client
    result = subprocess.run([H2KCTL, "health"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={missing}"})
    assert result.returncode == 6 and str(missing) in result.stderr
    # The last of --address and --system wins: here the system bus, at DBUS_SYSTEM_BUS_ADDRESS.
    elsewhere = tmp_path / "system-bus"
    result = subprocess.run([H2KCTL, "--address", f"unix:path={missing}", "list", "--system"], capture_output=True,
                            text=True, timeout=30, env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={elsewhere}"})
    assert result.returncode == 6 and str(elsewhere) in result.stderr and str(missing) not in result.stderr, result


def test_name_not_on_the_bus_exits_6(tmp_path):
    """A bus that is there, without h2kd on it."""
    with open_bus(tmp_path) as address:
        result = subprocess.run([H2KCTL, "--address", address, "queue"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 6, result
    assert "org.hyper2kvm.h2kd1" in result.stderr


# ------------------------------------------------------------------------------ read commands

def test_health_workers_queue_json_match_the_bus(env):
    health = json.loads(ok(h2kctl(env, "health", "--json")).stdout)
    assert health["status"] in ("ok", "degraded")
    assert health["version"] == busctl_property(env, MANAGER, MANAGER_IFACE, "Version")
    human = h2kctl(env, "health")
    assert human.returncode == (0 if health["status"] == "ok" else 1)
    assert f"Status: {health['status']}" in human.stdout

    workers = json.loads(ok(h2kctl(env, "workers", "--json")).stdout)
    builtin = next(w for w in workers if w["kind"] == "builtin")
    for key, prop in (("state", "State"), ("name", "Name"), ("id", "Id")):
        assert builtin[key] == busctl_property(env, builtin["path"], "org.hyper2kvm.h2kd1.Worker", prop)
    assert builtin["id"] in ok(h2kctl(env, "workers")).stdout

    queue = json.loads(ok(h2kctl(env, "queue", "--json")).stdout)
    assert queue["paused"] == busctl_property(env, MANAGER, MANAGER_IFACE, "Paused")
    assert queue["max_parallel_jobs"] == busctl_property(env, MANAGER, MANAGER_IFACE, "MaxParallelJobs")
    assert queue["queued"] == busctl_property(env, MANAGER, MANAGER_IFACE, "JobsQueued")
    assert len(queue["by_priority"]) == 10


def test_workers_lists_each_registered_worker_until_it_unregisters(stack, env):
    async def scenario() -> None:
        worker = await Client.connect(stack.bus_address)
        try:
            caps = json.dumps({"operations": ["inspect"]})
            worker_id, path = await worker.manager("RegisterWorker", "ssa{sv}",
                                                   ["ctl-listed", caps, {"max_jobs": Variant("u", 2)}])
            listed = {w["id"]: w for w in json.loads(ok(h2kctl(env, "workers", "--json")).stdout)}
            assert listed[worker_id]["path"] == path and listed[worker_id]["name"] == "ctl-listed"
            assert listed[worker_id]["kind"] == "external" and listed[worker_id]["max_jobs"] == 2
            assert any(w["kind"] == "builtin" for w in listed.values())
            assert "ctl-listed" in ok(h2kctl(env, "workers")).stdout
            await worker.call(path, WORKER, "Unregister")
            listed = {w["id"] for w in json.loads(ok(h2kctl(env, "workers", "--json")).stdout)}
            assert worker_id not in listed
        finally:
            worker.close()
    run(scenario())


def test_workers_lists_an_external_workers_odd_capabilities_and_runs_with_stdin_closed(stack, env):
    """A worker may declare anything as its operations: h2kctl shows the names among them. A command run from a
    script with its standard input closed (`<&-`) works as with /dev/null."""
    async def scenario() -> None:
        worker = await Client.connect(stack.bus_address)
        try:
            caps = json.dumps({"operations": [1, "convert", {"x": 2}]})
            worker_id, path = await worker.manager("RegisterWorker", "ssa{sv}",
                                                   ["ctl-odd", caps, {"max_jobs": Variant("u", 2)}])
            try:
                listed = subprocess.run(["sh", "-c", 'exec "$0" workers <&-', H2KCTL], env=env,
                                        capture_output=True, text=True, timeout=60)
            finally:
                await worker.call(path, WORKER, "Unregister")
            assert listed.returncode == 0, listed
            (row,) = [line.split() for line in listed.stdout.splitlines() if line.split()[:1] == [worker_id]]
            assert row[1:3] == ["ctl-odd", "external"] and row[-1] == "convert", listed
            assert listed.stderr == "", listed
        finally:
            worker.close()
    run(scenario())


def test_queue_pause_resume_max_parallel_and_priority(env, images, output_dir):
    paused = json.loads(ok(h2kctl(env, "queue", "pause", "--json")).stdout)    # the JSON alone, for jq
    try:
        assert paused["paused"] is True
        assert busctl_property(env, MANAGER, MANAGER_IFACE, "Paused") is True
        assert "Paused: yes" in ok(h2kctl(env, "queue", "stats")).stdout
        job_id = new_id("prio")
        ok(h2kctl(env, "submit", str(images["small"]), "-o", str(output_dir / f"{job_id}.qcow2"), "--id", job_id,
                  "--priority", "7"))
        assert json.loads(ok(h2kctl(env, "queue", "--json")).stdout)["by_priority"][6] >= 1
        ok(h2kctl(env, "queue", "priority", job_id, "2"))
        assert busctl_property(env, job_path(env, job_id), JOB_IFACE, "Priority") == 2
        ok(h2kctl(env, "cancel", job_id))
        assert job_state(env, job_id) == "cancelled"
    finally:
        ok(h2kctl(env, "queue", "resume"))
    assert busctl_property(env, MANAGER, MANAGER_IFACE, "Paused") is False
    before = busctl_property(env, MANAGER, MANAGER_IFACE, "MaxParallelJobs")
    assert json.loads(ok(h2kctl(env, "queue", "max-parallel", "5", "--json")).stdout)["max_parallel_jobs"] == 5
    try:
        assert busctl_property(env, MANAGER, MANAGER_IFACE, "MaxParallelJobs") == 5
    finally:
        ok(h2kctl(env, "queue", "max-parallel", str(before)))


def test_submit_list_status_show_events_match_the_bus(env, images, output_dir, paused_queue):
    job_id = new_id("cli")
    output = output_dir / f"{job_id}.qcow2"
    submitted = json.loads(ok(h2kctl(env, "submit", str(images["vmdk"]), "-o", str(output), "--id", job_id,
                                     "--priority", "3", "--retries", "1", "--timeout", "600", "--ticket", "T-1",
                                     "--tag", "a", "--tag", "b", "--compress=zstd", "--json")).stdout)
    path = job_path(env, job_id)
    assert submitted["id"] == job_id and submitted["path"] == path
    assert submitted["spec"]["audit"]["tags"] == ["a", "b"]
    assert submitted["spec"]["parameters"]["compression_type"] == "zstd"

    status = json.loads(ok(h2kctl(env, "status", job_id, "--json")).stdout)
    for key, prop in (("state", "State"), ("priority", "Priority"), ("owner", "Owner"), ("source", "Source"),
                      ("output", "Output"), ("attempt", "Attempt"), ("operation", "Operation")):
        assert status[key] == busctl_property(env, path, JOB_IFACE, prop), key
    assert status["state"] == "queued" and status["priority"] == 3 and status["owner"] == 0
    assert status["owner_name"] == "root"
    assert status["source"] == str(images["vmdk"])
    assert [h["state"] for h in status["history"]][-1] == "queued"

    listed = json.loads(ok(h2kctl(env, "list", "--json", "--state", "queued")).stdout)
    entry = next(e for e in listed if e["id"] == job_id)
    assert entry["path"] == path and entry["state"] == "queued" and entry["priority"] == 3
    assert all(e["state"] == "queued" for e in listed)
    table = ok(h2kctl(env, "list", "--operation", "convert")).stdout
    assert re.search(rf"^{re.escape(job_id)}\s+convert\s+queued\s+\S+\s+root\s+\S+", table, re.M), table
    assert table.splitlines()[0].split() == ["ID", "OPERATION", "STATE", "PROGRESS", "OWNER", "AGE"]
    # Guest repairs (offline_fix, submitted with --file) are listed by their operation like any other.
    assert job_id not in ok(h2kctl(env, "list", "-q", "--operation", "offline_fix")).stdout.split()
    assert job_id in ok(h2kctl(env, "list", "-q", "--owner", "root")).stdout.split()
    assert job_id not in ok(h2kctl(env, "list", "-q", "--state", "completed")).stdout.split()

    shown = json.loads(ok(h2kctl(env, "show", job_id, "--json")).stdout)
    assert {"Id", "State", "Progress", "Spec", "Result", "Error", "Cancelable"} <= set(shown)
    for prop in ("State", "Priority", "Unit", "Attempt", "Cancelable"):
        assert shown[prop] == busctl_property(env, path, JOB_IFACE, prop), prop
    lines = ok(h2kctl(env, "show", job_id)).stdout.splitlines()
    assert f"Id={job_id}" in lines and "State=queued" in lines and "Cancelable=yes" in lines
    assert ok(h2kctl(env, "show", job_id, "-p", "State,Priority", "--value")).stdout == "queued\n3\n"
    bogus = h2kctl(env, "show", job_id, "-p", "State,Bogus")
    assert bogus.returncode == 2 and "no property 'Bogus'" in bogus.stderr and not bogus.stdout, bogus

    human = ok(h2kctl(env, "status", job_id)).stdout
    assert job_id in human and "State: queued" in human and "History:" in human

    events = json.loads(ok(h2kctl(env, "events", job_id, "--json")).stdout)
    assert events[0]["seq"] >= 1 and events[0]["kind"] == "state"
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    later = json.loads(ok(h2kctl(env, "events", job_id, "--json", "--since", str(events[0]["seq"]))).stdout)
    assert later == events[1:]
    assert "state" in ok(h2kctl(env, "events", job_id)).stdout

    ok(h2kctl(env, "cancel", job_id))
    assert job_state(env, job_id) == "cancelled"
    ok(h2kctl(env, "retry", job_id))
    assert job_state(env, job_id) == "queued"
    ok(h2kctl(env, "cancel", job_id))
    ok(h2kctl(env, "remove", job_id))
    assert h2kctl(env, "status", job_id).returncode == 7


def test_retry_and_start_take_several_jobs_and_go_on_past_one_that_cannot_be(env, images, output_dir, paused_queue):
    """After a full disk failed a batch, one command queues it again, as systemctl restart A B C does: a job
    that cannot be queued is said, the others are queued all the same, and the exit status is the failure's."""
    held = [ok(h2kctl(env, "submit", "-q", "--no-queue", "--operation", "inspect", str(images["small"]))).stdout.strip()
            for _ in range(3)]
    started = h2kctl(env, "start", held[0], "nope-x", held[1])
    assert started.returncode == 7, started
    assert started.stdout == f"Queued job {held[0]}.\nQueued job {held[1]}.\n", started
    assert "nope-x" in started.stderr and started.stderr.count("\n") == 1, started
    assert [job_state(env, j) for j in held] == ["queued", "queued", "validated"]
    as_json = json.loads(ok(h2kctl(env, "start", "--json", held[2])).stdout)
    assert as_json["id"] == held[2] and as_json["state"] == "queued"     # one JOB: one object, as before
    missing = h2kctl(env, "retry", "--json", "nope-x")
    assert (missing.returncode, missing.stdout) == (7, ""), missing    # and nothing, as before, when it fails
    ok(h2kctl(env, "cancel", *held))
    retried = json.loads(ok(h2kctl(env, "retry", "--json", *held)).stdout)
    assert [(job["id"], job["state"]) for job in retried] == [(j, "queued") for j in held]
    ok(h2kctl(env, "cancel", *held))


def test_submit_from_job_file_and_no_queue_then_start(env, images, output_dir, tmp_path, paused_queue):
    job_id = new_id("file")
    spec = {"job_id": job_id, "operation": "convert", "image": {"path": str(images["small"])},
            "parameters": {"output_format": "raw"}, "artifacts": {"output_path": str(output_dir / f"{job_id}.raw")},
            "execution_policy": {"priority": 4}}
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(spec))
    out = ok(h2kctl(env, "submit", "--file", str(job_file), "--no-queue"))
    assert job_id in out.stdout and "h2kctl start" in out.stdout
    assert job_state(env, job_id) == "validated"
    started = json.loads(ok(h2kctl(env, "start", job_id, "--json")).stdout)
    assert started["state"] == job_state(env, job_id) == "queued"
    assert started["spec"]["parameters"]["output_format"] == "raw" and started["priority"] == 4
    ok(h2kctl(env, "cancel", job_id))
    yaml_file = tmp_path / "job.yaml"
    yaml_id = new_id("yaml")
    yaml_file.write_text(f"job_id: {yaml_id}\noperation: inspect\nimage:\n  path: {images['small']}\n")
    if importlib.util.find_spec("yaml") is None:    # optional: without it, a YAML file is a clear usage error
        refused = h2kctl(env, "submit", "--file", str(yaml_file))
        assert refused.returncode == 2 and "YAML job files need PyYAML" in refused.stderr, refused
        assert h2kctl(env, "status", yaml_id).returncode == 7
        return
    ok(h2kctl(env, "submit", "--file", str(yaml_file)))
    assert json.loads(ok(h2kctl(env, "status", yaml_id, "--json")).stdout)["operation"] == "inspect"
    ok(h2kctl(env, "cancel", yaml_id))


def test_no_such_job_exits_7(env):
    # logs is not among them: the journal keeps a job's lines after h2kd has forgotten it (test_h2kctl_races)
    for args in (["status", "nope-x"], ["show", "nope-x"], ["events", "nope-x"], ["cancel", "nope-x"],
                 ["retry", "nope-x"], ["remove", "nope-x"], ["start", "nope-x"],
                 ["watch", "nope-x"], ["queue", "priority", "nope-x", "1"]):
        result = h2kctl(env, *args)
        assert result.returncode == 7, (args, result)
        assert result.stderr.startswith("h2kctl: ") and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_cancel_and_remove_go_on_past_a_job_they_cannot_act_on(env, images, output_dir, paused_queue):
    """Like systemctl stop A B C: every job named is tried, each failure said, the first one's status returned."""
    first, second = new_id("many-1"), new_id("many-2")
    for job_id in (first, second):
        ok(h2kctl(env, "submit", str(images["vmdk"]), "-o", str(output_dir / f"{job_id}.qcow2"), "--id", job_id))
    cancelled = h2kctl(env, "cancel", first, "nope-x", second)
    assert cancelled.returncode == 7, cancelled
    assert cancelled.stdout.splitlines() == [f"Cancelled job {first}.", f"Cancelled job {second}."]
    assert len(cancelled.stderr.strip().splitlines()) == 1 and "nope-x" in cancelled.stderr
    assert job_state(env, first) == job_state(env, second) == "cancelled"
    removed = h2kctl(env, "remove", "nope-x", first, second)
    assert removed.returncode == 7 and removed.stdout.count("Removed job") == 2, removed
    for job_id in (first, second):
        assert h2kctl(env, "status", job_id).returncode == 7


def test_a_missing_source_is_refused_before_submitting(env, tmp_path):
    """(A source the caller may not read: test_unprivileged_user_reads_but_is_not_authorized_to_change, exit 5.)"""
    missing = tmp_path / "missing.vmdk"
    result = h2kctl(env, "submit", str(missing), "-o", "/tmp/x.qcow2")
    assert result.returncode == 1 and "cannot read" in result.stderr and str(missing) in result.stderr


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line h2kctl wrote on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("h2kctl: "), result
    return lines[0]


def test_submit_says_the_state_h2kd_gave_the_job(env, images, output_dir):
    """h2kd stores a job that failed its checks as failed: submit says so, with h2kd's reason and the exit status
    of a failed job (3), also with --json; a resubmission that found the job of its id says that, and its state."""
    job_id = new_id("states")
    output = output_dir / f"{job_id}.qcow2"
    try:
        waited = ok(h2kctl(env, "submit", "-q", "--wait", str(images["vmdk"]), "-o", str(output), "--id", job_id,
                           timeout=120))
        assert waited.stdout == f"{job_id}\n", waited      # -q: the id, as without --wait
        exists = h2kctl(env, "submit", str(images["vmdk"]), "-o", str(output))
        assert exists.returncode == 3 and exists.stdout == "", exists
        assert re.fullmatch(rf"h2kctl: job \S+ failed: VALIDATION_FAILED: {re.escape(str(output))} already exists; "
                            "outputs are never overwritten", one_line(exists)), exists
        failed_id = one_line(exists).split()[2]
        assert job_state(env, failed_id) == "failed"
        nodir = h2kctl(env, "submit", str(images["vmdk"]), "-o", str(output_dir / "nodir" / "x.qcow2"))
        assert nodir.returncode == 3 and "failed: VALIDATION_FAILED: " in one_line(nodir), nodir
        assert f"{output_dir / 'nodir'} is not an existing directory" in one_line(nodir)
        as_json = h2kctl(env, "submit", "--json", str(images["vmdk"]), "-o", str(output))
        assert as_json.returncode == 3, as_json
        assert json.loads(as_json.stdout)["state"] == "failed" and "already exists" in one_line(as_json)

        again = h2kctl(env, "submit", str(images["vmdk"]), "-o", str(output), "--id", job_id)
        assert again.returncode == 0, again
        assert again.stdout == f"Job {job_id} was already submitted with this spec (completed); it was not " \
                               "submitted again.\n", again
        assert ok(h2kctl(env, "submit", "-q", str(images["vmdk"]), "-o", str(output), "--id", job_id)).stdout \
            == f"{job_id}\n"
        failed_again = h2kctl(env, "submit", str(images["vmdk"]), "-o", str(output), "--id", failed_id)
        assert failed_again.returncode == 3, failed_again
        assert one_line(failed_again).startswith(f"h2kctl: job {failed_id} was already submitted with this spec, "
                                                 "and failed: VALIDATION_FAILED: "), failed_again
        held = new_id("held")
        stored = ok(h2kctl(env, "submit", "--no-queue", str(images["vmdk"]), "-o", str(output_dir / f"{held}.qcow2"),
                           "--id", held))
        assert stored.stdout == f"Submitted job {held} (stored; start it with: h2kctl start {held}).\n"
        ok(h2kctl(env, "cancel", held))
    finally:
        output.unlink(missing_ok=True)


def test_a_refused_path_is_said_in_h2kds_words_and_named(env, images, tmp_path, output_dir):
    """Root may submit: a path h2kd refuses is not "not authorized to submit jobs"; a source that is not a regular
    file is bad input, named."""
    outside = h2kctl(env, "submit", str(images["vmdk"]), "-o", "/tmp/x/out.qcow2")
    assert outside.returncode == 5, outside
    assert one_line(outside) == ("h2kctl: refusing /tmp/x/out.qcow2: outputs may only be written below "
                                 f"{output_dir}"), outside
    fifo = tmp_path / "fifo.vmdk"
    os.mkfifo(fifo)
    for source in ("/dev/null", str(fifo)):
        refused = h2kctl(env, "submit", source)
        assert refused.returncode == 2, refused
        assert one_line(refused) == f"h2kctl: refusing {source}: the file descriptor does not refer to a regular " \
                                    "file", refused


def test_a_spec_h2kd_finds_invalid_exits_2(env, images, tmp_path):
    """Bad input is exit 2 whether h2kctl or h2kd finds it (InvalidSpec)."""
    source = str(images["vmdk"])
    path = tmp_path / "job.json"
    cases = [(["--source-format", "foo"], "image.format: "), (["--format", "raw", "--compress"], "parameters.compress: "),
             (["--id", "bad id/.."], "job_id: ")]
    for spec, field in (({"execution_policy": {"priority": "high"}}, "execution_policy.priority"),
                        ({"parameters": {"compress": 1}}, "parameters.compress")):
        job = {"operation": "convert", "image": {"path": source}, **spec}
        cases.append((["--file", f"{path}.{len(cases)}"], field))
        Path(f"{path}.{len(cases) - 1}").write_text(json.dumps(job))
    for args, field in cases:
        result = h2kctl(env, "submit", *([] if args[0] == "--file" else [source]), *args)
        assert result.returncode == 2, (args, result)
        assert field in one_line(result), (args, result)


# --------------------------------------------------------------------------- jobs that run

def test_failed_job_exits_3_with_one_line(env, images, output_dir):
    job_id = new_id("bad")
    result = h2kctl(env, "submit", "--wait", str(images["text"]), "-o", str(output_dir / f"{job_id}.qcow2"),
                    "--id", job_id, "--source-format", "vmdk", timeout=120)
    assert result.returncode == 3, result
    assert result.stderr.startswith(f"h2kctl: job {job_id} failed")
    assert len(result.stderr.strip().splitlines()) == 1
    assert job_state(env, job_id) == "failed"
    status = json.loads(ok(h2kctl(env, "status", job_id, "--json")).stdout)
    assert status["error"]["code"] == busctl_property(env, job_path(env, job_id), JOB_IFACE, "Error")[0]
    assert h2kctl(env, "watch", job_id).returncode == 3   # watching a finished job reports its outcome


def test_wait_blocks_until_a_batch_ends_and_says_how_it_went(env, images, output_dir, paused_queue):
    """Queue a batch and walk away: `h2kctl wait` (every job under way) or `h2kctl wait A B` returns once all
    have ended, one line each, with 3 if one failed. Held jobs are not waited for."""
    good, bad, held = new_id("wait-ok"), new_id("wait-bad"), new_id("wait-held")
    outputs = [output_dir / f"{job_id}.qcow2" for job_id in (good, bad, held)]
    ok(h2kctl(env, "submit", str(images["vmdk"]), "-o", str(outputs[0]), "--id", good))
    ok(h2kctl(env, "submit", str(images["text"]), "-o", str(outputs[1]), "--id", bad, "--source-format", "vmdk"))
    ok(h2kctl(env, "submit", "--no-queue", str(images["vmdk"]), "-o", str(outputs[2]), "--id", held))
    try:
        waiting = subprocess.Popen([H2KCTL, "wait", "--json"], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiting.poll() is None, "wait returned while the jobs were still queued"
        ok(h2kctl(env, "queue", "resume"))
        stdout, stderr = waiting.communicate(timeout=120)
        assert waiting.returncode == 3, stderr
        ended = {job["id"]: job["state"] for job in json.loads(stdout)}
        assert ended[good] == "completed" and ended[bad] == "failed" and held not in ended
        again = h2kctl(env, "wait", good, bad)
        assert again.returncode == 3
        assert sorted(line.split()[1] for line in again.stdout.splitlines()) == sorted([good, bad]), again.stdout
        assert ok(h2kctl(env, "wait", good)).stdout.startswith(f"Job {good} completed")
    finally:
        clean_up(env, (good, bad, held), outputs)


def test_wait_for_a_held_job_says_it_does_not_start_on_its_own(env, images, output_dir, paused_queue):
    """A job stored with --no-queue never starts by itself: waiting for it would never return. That is said at
    once, and the other jobs named are still waited for."""
    held, done = new_id("wait-held"), new_id("wait-done")
    outputs = [output_dir / f"{job_id}.qcow2" for job_id in (held, done)]
    ok(h2kctl(env, "submit", "--no-queue", str(images["vmdk"]), "-o", str(outputs[0]), "--id", held))
    ok(h2kctl(env, "submit", str(images["vmdk"]), "-o", str(outputs[1]), "--id", done))
    waiting = subprocess.Popen([H2KCTL, "wait", held, done], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        assert waiting.poll() is None, "wait returned while a job named was still queued"
        ok(h2kctl(env, "queue", "resume"))
        stdout, stderr = waiting.communicate(timeout=120)
        assert waiting.returncode == 2, (stdout, stderr)
        assert stdout.startswith(f"Job {done} completed"), stdout
        assert stderr.strip() == (f"h2kctl: job {held} is held: stored without queueing, it does not start on its "
                                  f"own; start it with: h2kctl start --wait {held}"), stderr
        assert job_state(env, held) == "validated"
    finally:
        clean_up(env, (held, done), outputs, [waiting])


def test_wait_says_at_once_that_a_job_named_after_many_others_failed(stack, env, images, output_dir, paused_queue):
    """`h2kctl wait` follows so many jobs at a time; a job named after them that fails meanwhile is said as it
    fails, not when the jobs before it have ended (hours, in a batch of hundreds)."""
    queued = [new_id("wait-long") for _ in range(20)]
    outputs = [output_dir / f"{job_id}.qcow2" for job_id in queued]
    failing = new_id("wait-late")
    for job_id, output in zip(queued, outputs):
        ok(h2kctl(env, "submit", "-q", str(images["vmdk"]), "-o", str(output), "--id", job_id))

    async def submit_failing() -> None:
        client = await Client.connect(stack.bus_address)
        try:
            await client.submit({"job_id": Variant("s", failing), "operation": Variant("s", "inspect"),
                                 "image": Variant("a{sv}", {"path": Variant("s", "/nonexistent.vmdk")})})
        finally:
            client.close()

    run(submit_failing())        # fails at once: its source does not exist
    waiting = subprocess.Popen([H2KCTL, "wait", *queued, failing], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        said = read_until(waiting, f"Job {failing} failed", timeout=30)
        assert all(job_state(env, job_id) == "queued" for job_id in queued), said
        ok(h2kctl(env, "cancel", *queued, timeout=120))
        stdout, stderr = waiting.communicate(timeout=120)
        assert waiting.returncode == 3, (said, stdout, stderr)
        lines = (said + stdout).splitlines()
        assert len(lines) == 21 and lines[0].startswith(f"Job {failing} failed"), lines
    finally:
        clean_up(env, [*queued, failing], outputs, [waiting])


def test_wait_for_hundreds_of_jobs_and_one_that_is_gone(stack, env, output_dir):
    """Each job waited for subscribes to its signals and unsubscribes once it ended: the bus allows a connection
    only so many match rules. A job that does not exist is said, and the others are still waited for."""
    job_ids = [new_id("many") for _ in range(300)]

    async def submit_all() -> None:
        client = await Client.connect(stack.bus_address)
        try:
            for job_id in job_ids:    # a missing source: each fails at once
                await client.submit({"job_id": Variant("s", job_id), "operation": Variant("s", "inspect"),
                                     "image": Variant("a{sv}", {"path": Variant("s", "/nonexistent.vmdk")})})
        finally:
            client.close()

    run(submit_all())
    try:
        waited = h2kctl(env, "wait", job_ids[0], "nope-x", *job_ids[1:], timeout=300)
        assert waited.returncode == 3, waited.stderr[-2000:]
        assert len(waited.stdout.splitlines()) == 300 and "failed" in waited.stdout.splitlines()[-1]
        assert waited.stderr.strip().splitlines() == [waited.stderr.strip()] and "nope-x" in waited.stderr
        gone_only = h2kctl(env, "wait", "nope-x")
        assert gone_only.returncode == 7, gone_only
    finally:
        ok(h2kctl(env, "remove", *job_ids, timeout=300))


def test_a_conversion_into_a_directory_names_the_file_it_wrote(env, images, output_dir, tmp_path):
    directory = output_dir / new_id("into")
    directory.mkdir()
    try:
        done = ok(h2kctl(env, "submit", "--wait", str(images["vmdk"]), "-o", f"{directory}/", timeout=120))
        assert done.stdout.strip().endswith(f": {directory / 'small.qcow2'}"), done.stdout
        assert (directory / "small.qcow2").is_file()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_status_of_a_job_given_no_output_path_names_the_files_it_wrote(env, images, output_dir, plain_user):
    """Without -o a conversion writes into a directory h2kd makes for it in the first output root: status names
    the files (from the Result, which the owner and administrators read), others the directory (Output)."""
    job_id = new_id("default-out")
    ok(h2kctl(env, "submit", "--wait", str(images["vmdk"]), "--id", job_id, timeout=120))
    try:
        written = output_dir / job_id / f"{images['vmdk'].stem}.qcow2"
        assert written.is_file()
        status = ok(h2kctl(env, "status", job_id)).stdout
        assert f"{job_id} - convert {images['vmdk']} → {written}\n" in status, status
        assert re.search(rf"^ +Output: {re.escape(str(written))}$", status, re.MULTILINE), status
        # Another user is not given the Result, and so not the files' names: only the directory (Output).
        other = ok(h2kctl(env, "status", job_id, user=plain_user)).stdout
        assert f"{job_id} - convert {images['vmdk']} → {output_dir / job_id}/\n" in other, other
        assert re.search(rf"^ +Output: {re.escape(str(output_dir / job_id))}/$", other, re.MULTILINE), other
        assert str(written) not in other, other
    finally:
        h2kctl(env, "remove", job_id)
        shutil.rmtree(output_dir / job_id, ignore_errors=True)


@contextlib.contextmanager
def completed_submission(env, source, output_dir, prefix, *flags):
    """`h2kctl submit --wait FLAGS SOURCE -o OUTPUT`, checked to have completed: its job id and output, which
    is removed afterwards."""
    job_id = new_id(prefix)
    output = output_dir / f"{job_id}.qcow2"
    ok(h2kctl(env, "submit", "--wait", *flags, str(source), "-o", str(output), "--id", job_id, timeout=120))
    try:
        status = json.loads(ok(h2kctl(env, "status", job_id, "--json")).stdout)
        assert status["state"] == "completed"
        yield job_id, output
    finally:
        output.unlink(missing_ok=True)


def test_submit_verify_and_domain_xml(env, images, output_dir):
    """--verify compares the output with its source; --domain-xml writes a libvirt domain next to it."""
    with completed_submission(env, images["vmdk"], output_dir, "verify", "--verify", "--domain-xml") as (job_id,
                                                                                                           output):
        result = json.loads(busctl_property(env, job_path(env, job_id), JOB_IFACE, "Result"))
        assert result["outputs"]["disks"][0]["compare"]["identical"] is True, result
        parameters = json.loads(busctl_property(env, job_path(env, job_id), JOB_IFACE, "Spec"))["parameters"]
        assert parameters["verify"] and parameters["domain_xml"]
        domain = Path(result["outputs"]["domain_xml"])
        try:
            assert domain == output.with_suffix(".xml")
            disk = ET.parse(domain).getroot().find("devices/disk/source")
            assert disk is not None and disk.get("file") == str(output)
        finally:
            domain.unlink(missing_ok=True)


def test_submit_no_sync_converts_with_sync_false(env, images, output_dir):
    with completed_submission(env, images["vmdk"], output_dir, "nosync", "--no-sync") as (job_id, output):
        assert json.loads(busctl_property(env, job_path(env, job_id), JOB_IFACE, "Spec"))["parameters"]["sync"] is False
        assert not (difference := disk_difference(images["small"], output, "raw", "qcow2")), difference
        assert not [p for p in output_dir.iterdir() if p.name.startswith(".h2k-tmp-") and p.name.endswith(output.name)]
    default = new_id("sync")
    ok(h2kctl(env, "submit", "--no-queue", str(images["vmdk"]), "-o", str(output_dir / f"{default}.qcow2"),
              "--id", default))
    assert json.loads(busctl_property(env, job_path(env, default), JOB_IFACE, "Spec"))["parameters"]["sync"] is True
    ok(h2kctl(env, "cancel", default))
    ok(h2kctl(env, "remove", default))


def test_cancelled_job_exits_4_for_whoever_waits(env, images, output_dir, paused_queue):
    job_id = new_id("cancel")
    ok(h2kctl(env, "submit", str(images["small"]), "-o", str(output_dir / f"{job_id}.qcow2"), "--id", job_id))
    watcher = subprocess.Popen([H2KCTL, "watch", job_id], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        seen = read_until(watcher, f"Job {job_id}: queued")
        ok(h2kctl(env, "cancel", job_id))
        out, err = watcher.communicate(timeout=30)
        out = seen + out
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 4, (out, err)
    assert f"Job {job_id}: queued" in out and "cancelled" in out + err
    assert h2kctl(env, "watch", job_id).returncode == 4


def test_plain_progress_lines_when_not_a_terminal(env, images, output_dir):
    job_id = new_id("plain")
    output = output_dir / f"{job_id}.qcow2"
    result = h2kctl(env, "submit", "--wait", str(images["big"]), "-o", str(output), "--id", job_id,
                    "--compress=zlib", "--source-format", "raw", timeout=300)
    assert result.returncode == 0, result
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == f"Submitted job {job_id}."
    assert any(line.startswith(f"Job {job_id}: ") for line in lines)
    assert lines[-1].startswith(f"Job {job_id} completed")
    # no more than one line per 10% step and per state/phase change
    assert len(lines) < 40
    assert output.exists() and job_state(env, job_id) == "completed"

    logs = h2kctl(env, "logs", "--no-pager", job_id)
    assert logs.returncode == 0 and job_id in logs.stdout, logs
    status = json.loads(ok(h2kctl(env, "status", job_id, "--json")).stdout)
    assert status["progress"] == 1.0, status["progress"]     # a completed job shows its whole progress
    assert status["result"]["status"] == "completed"
    assert status["finished_at_usec"] == busctl_property(env, job_path(env, job_id), JOB_IFACE, "FinishedAt")



def test_logs_show_only_what_root_logged_for_the_job(env, images, output_dir):
    """Any user may send the journal a line carrying H2K_JOB_ID=<a job>; `h2kctl logs` shows only root's (h2kd's
    and the job's units'), so no one can slip lines into what an administrator reads about a job."""
    job_id = new_id("forged")
    ok(h2kctl(env, "submit", "--wait", str(images["vmdk"]), "-o", str(output_dir / f"{job_id}.qcow2"),
              "--id", job_id, timeout=120))
    forged = f"MESSAGE=forged: job {job_id} copied /etc/shadow to /tmp/x"
    subprocess.run(["runuser", "-u", "nobody", "--", "logger", "--journald"], input=f"H2K_JOB_ID={job_id}\n{forged}\n",
                   text=True, check=True)
    every_line = lambda: subprocess.run(["journalctl", "--no-pager", f"H2K_JOB_ID={job_id}"],  # noqa: E731
                                        capture_output=True, text=True).stdout
    deadline = time.monotonic() + 10
    while "forged:" not in every_line():
        assert time.monotonic() < deadline, "the forged line never reached the journal"
        time.sleep(0.2)
    logs = ok(h2kctl(env, "logs", "--no-pager", job_id))
    assert job_id in logs.stdout and "completed" in logs.stdout, logs.stdout
    assert "forged:" not in logs.stdout
    # Removed, and another job submitted under its id: its logs are its own, not the first one's too.
    ok(h2kctl(env, "remove", job_id))
    time.sleep(1.1)                 # journalctl --since counts whole seconds
    garbage = output_dir / f"{job_id}-garbage.vmdk"
    garbage.write_bytes(os.urandom(4096))
    again = h2kctl(env, "submit", "--wait", str(garbage), "-o", str(output_dir / f"{job_id}-again.qcow2"),
                   "--id", job_id, "--source-format", "vmdk", timeout=120)
    assert again.returncode == 3, again         # the job failed
    logs = ok(h2kctl(env, "logs", "--no-pager", job_id))
    assert "completed" not in logs.stdout and f"Job {job_id} failed" in logs.stdout, logs.stdout
    garbage.unlink()

def test_progress_bar_in_a_pseudo_terminal(env, images, output_dir):
    job_id = new_id("tty")
    argv = [H2KCTL, "submit", "--wait", str(images["big"]), "-o", str(output_dir / f"{job_id}.qcow2"),
            "--id", job_id, "--compress=zlib", "--source-format", "raw"]
    code, output = run_in_pty(argv, env, timeout=300)
    assert code == 0, output
    frames = [f.replace("\x1b[K", "") for f in re.split(r"\r|\n", output)]
    frames = [f for f in frames if f.strip()]
    percentages = [float(m) for m in re.findall(r"(\d+\.\d)%", output)]
    assert percentages, output
    assert "[#" in output or "[." in output, output          # the bar itself
    assert re.search(r"\d+\.\d (KiB|MiB|GiB)/\d+\.\d (MiB|GiB)", output), output   # bytes done/total
    assert "\x1b[K" in output                                   # redrawn in place
    assert frames[-1].strip().startswith(f"Job {job_id} completed"), frames[-3:]


def test_ctrl_c_detaches_without_cancelling(env, images, output_dir):
    job_id = new_id("detach")
    argv = [H2KCTL, "submit", "--wait", str(images["big"]), "-o", str(output_dir / f"{job_id}.qcow2"),
            "--id", job_id, "--compress=zlib", "--source-format", "raw"]
    ok(h2kctl(env, "queue", "pause"))
    pressed = []

    def ctrl_c_once_following(terminal: int, text: str) -> None:
        if not pressed and f"{job_id}" in text and "queued" in text:
            os.write(terminal, CTRL_C)
            pressed.append(True)

    try:
        code, output = run_in_pty(argv, env, timeout=60, on_output=ctrl_c_once_following)
        assert pressed, output
        assert code == -signal.SIGINT, output     # ended as Ctrl-C ends a program: not "completed"
        assert f"Detached; the job goes on. Cancel it with: h2kctl cancel {job_id}" in output
        assert "Traceback" not in output
        assert job_state(env, job_id) == "queued"
    finally:
        ok(h2kctl(env, "queue", "resume"))
    assert wait_for_state(env, job_id, TERMINAL, timeout=240) == "completed"


def test_ctrl_c_during_inspect_cancels_its_job(env, images, paused_queue):
    """inspect's job exists only for the report it prints: Ctrl-C cancels it rather than leaving it queued for
    nobody, says it asked for that (the job may still complete), and ends as Ctrl-C ends a program."""
    pressed: list[bool] = []

    def ctrl_c_once_queued(terminal: int, text: str) -> None:
        if not pressed and "queued" in text:
            os.write(terminal, CTRL_C)
            pressed.append(True)

    code, output = run_in_pty([H2KCTL, "inspect", str(images["small"])], env, timeout=60,
                              on_output=ctrl_c_once_queued)
    assert pressed, output
    assert code == -signal.SIGINT, output
    said = re.search(r"Cancel requested for inspect job (\S+)\.", output)
    assert said and "Detached" not in output and "Traceback" not in output, output
    job_id = said.group(1)
    assert wait_for_state(env, job_id, TERMINAL, timeout=60) == "cancelled"


def test_ctrl_c_stops_a_script_that_waits_and_the_jobs_go_on(env, images, output_dir, paused_queue):
    """A batch script: Ctrl-C while h2kctl waits stops the script, as it would stop any command in it, instead
    of letting it go on as if the job had completed (bash goes on after a child that exits by itself, even
    with 130). The jobs h2kctl waited for are not cancelled."""
    first, second, third = new_id("script1"), new_id("script2"), new_id("script3")
    ok(h2kctl(env, "submit", str(images["small"]), "-o", str(output_dir / f"{first}.qcow2"), "--id", first))

    def submit_wait(job_id: str) -> str:
        return (f"{H2KCTL} submit --wait {images['small']} -o {output_dir / (job_id + '.qcow2')} --id {job_id}")

    cases = [(f"{H2KCTL} wait {first} && echo all-converted; {submit_wait(third)}; echo script-finished",
              "waiting-started"),
             (f"for id in {second} {third}; do {submit_wait('$id')}; done; echo script-finished",
              f"Submitted job {second}.")]
    for script, cue in cases:
        pressed = []

        def ctrl_c_once(terminal: int, text: str, cue: str = cue) -> None:
            if not pressed and cue in text and (cue == "waiting-started" or "queued" in text.split(cue)[-1]):
                if cue == "waiting-started":
                    time.sleep(1.0)     # h2kctl wait prints nothing until a job ends
                os.write(terminal, CTRL_C)
                pressed.append(True)

        echo = "echo waiting-started; " if cue == "waiting-started" else ""
        code, output = run_in_pty(["/bin/bash", "-c", echo + script], env, timeout=60, on_output=ctrl_c_once)
        assert pressed, output
        assert code == -signal.SIGINT, output
        assert "script-finished" not in output and "all-converted" not in output, output
        assert "Traceback" not in output, output
        if cue == "waiting-started":    # `wait` says how to cancel what it no longer waits for
            assert f"stopped waiting; 1 of 1 jobs may still run; cancel it with: h2kctl cancel {first}" in output
    assert job_state(env, first) == "queued" and job_state(env, second) == "queued"
    gone = h2kctl(env, "status", third)
    assert gone.returncode == 7, gone      # the script never got as far as submitting it


# Run as another user: signals on h2kd's paths, as h2kd sends them or malformed, sent to h2kctl's connections
# alone (any client of the system bus may address a signal to any other), and a forged announcement that the
# sender is h2kd now.
FORGER = r"""
import asyncio
import sys

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

JOB, PROPS, OBJECTS = "org.hyper2kvm.h2kd1.Job", "org.freedesktop.DBus.Properties", "org.freedesktop.DBus.ObjectManager"
MANAGER, BUS = "/org/hyper2kvm/h2kd1", "org.freedesktop.DBus"


async def forge(address, path, destinations):
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    ended = {"State": Variant("s", "completed"), "Progress": Variant("d", 1.0)}
    invented = {JOB: {"Id": Variant("s", "forged"), "State": Variant("s", "failed"), "Operation": Variant("s", "x")}}
    signals = [(path, JOB, "StateChanged", "ss", ["completed", "forged"]),
               (path, PROPS, "PropertiesChanged", "sa{sv}as", [JOB, ended, []]),
               (MANAGER, OBJECTS, "InterfacesRemoved", "oas", [path, [JOB]]),
               (MANAGER, OBJECTS, "InterfacesAdded", "oa{sa{sv}}", [MANAGER + "/job/forged", invented]),
               ("/org/freedesktop/DBus", BUS, "NameOwnerChanged", "sss", ["org.hyper2kvm.h2kd1", "", bus.unique_name]),
               (path, JOB, "StateChanged", "ss", ["completed", "forged"]),
               (path, JOB, "StateChanged", "", []),
               (path, PROPS, "PropertiesChanged", "s", [JOB]),
               (path, PROPS, "PropertiesChanged", "", []),
               (MANAGER, OBJECTS, "InterfacesAdded", "", []),
               (MANAGER, OBJECTS, "InterfacesRemoved", "s", ["x"])]
    for destination in destinations:
        for where, interface, member, signature, body in signals:
            bus.send(Message(message_type=MessageType.SIGNAL, destination=destination, path=where,
                             interface=interface, member=member, signature=signature, body=body))
    # Answered once the bus has passed on everything sent before it.
    await bus.call(Message(destination=BUS, path="/org/freedesktop/DBus", interface=BUS, member="GetId"))
    bus.disconnect()


asyncio.run(forge(sys.argv[1], sys.argv[2], sys.argv[3:]))
"""


def unique_name_of(address: str, pid: int, timeout: float = 30) -> str:
    """The unique bus name of the connection process `pid` opened, once it has one."""
    async def look() -> str:
        bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                (names,) = (await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                                   interface="org.freedesktop.DBus", member="ListNames"))).body
                for name in (n for n in names if n.startswith(":")):
                    reply = await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                                   interface="org.freedesktop.DBus",
                                                   member="GetConnectionUnixProcessID", signature="s", body=[name]))
                    if reply.message_type == MessageType.METHOD_RETURN and reply.body == [pid]:
                        return name
                await asyncio.sleep(0.1)
            raise AssertionError(f"process {pid} has no connection to the bus")
        finally:
            bus.disconnect()
    return run(look())


def test_signals_from_anyone_but_h2kd_are_not_believed(stack, env, images, output_dir, paused_queue, plain_user):
    """Another user sends h2kctl's connections, and only them, signals saying that a queued job completed or was
    removed, that a job nobody submitted failed, that the sender is h2kd now; and malformed ones. wait, watch of
    the job and watch of all jobs go on as before, without a word on stderr, and end when the job really does."""
    job_id = new_id("unicast")
    output = output_dir / f"{job_id}.qcow2"
    ok(h2kctl(env, "submit", str(images["vmdk"]), "-o", str(output), "--id", job_id))
    path = job_path(env, job_id)

    def follow(*args: str) -> subprocess.Popen:
        return subprocess.Popen([H2KCTL, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)

    waiting = follow("wait", job_id)
    watching, watching_all = follow("watch", job_id), follow("watch")
    followers = [waiting, watching, watching_all]
    try:
        seen = {follower: read_until(follower, f"Job {job_id}: queued") for follower in (watching, watching_all)}
        time.sleep(1.0)     # `wait` says nothing until the job ends: time to subscribe, as the others have
        names = [unique_name_of(stack.bus_address, follower.pid) for follower in followers]
        forger = subprocess.run(as_user(plain_user, [sys.executable, "-c", FORGER, stack.bus_address, path, *names]),
                                env=env, capture_output=True, text=True, timeout=60)
        assert forger.returncode == 0, forger
        time.sleep(2.5)     # past a re-read of each (every second for one job, every three for all)
        ended = [follower.args[1:] for follower in followers if follower.poll() is not None]
        assert not ended, f"ended on a forged signal: {ended}"
        assert job_state(env, job_id) == "queued"
        ok(h2kctl(env, "queue", "resume"))
        assert wait_for_state(env, job_id, TERMINAL, timeout=120) == "completed"
        outcomes = {follower: follower.communicate(timeout=60) for follower in (waiting, watching)}
        time.sleep(1.0)
        watching_all.send_signal(signal.SIGINT)
        outcomes[watching_all] = watching_all.communicate(timeout=30)
    finally:
        clean_up(env, [job_id], [output], followers)
    for follower, (stdout, stderr) in outcomes.items():
        stdout = seen.get(follower, "") + stdout
        assert follower.returncode == 0 and stderr == "", (follower.args, follower.returncode, stdout, stderr)
        assert "forged" not in stdout and f"Job {job_id} completed" in stdout, (follower.args, stdout)
    assert outcomes[waiting][0].startswith(f"Job {job_id} completed"), outcomes[waiting]


def test_ctrl_c_ends_following_at_once_while_h2kd_does_not_answer(stack, env, images, output_dir, paused_queue):
    """h2kd stopped (SIGSTOP: its name stays, calls to it get no answer until they time out, 25 s): Ctrl-C ends
    wait, watch of a job and watch of all jobs within moments, whether a call was in flight while they
    followed, or they had just started and not yet had any answer."""
    job_id = new_id("unanswered")
    output = output_dir / f"{job_id}.qcow2"
    ok(h2kctl(env, "submit", str(images["vmdk"]), "-o", str(output), "--id", job_id))

    def follow(*args: str) -> subprocess.Popen:
        return subprocess.Popen([H2KCTL, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)

    followers = [follow("watch", job_id), follow("watch"), follow("wait", job_id)]
    daemon = stack.daemon_pid
    assert daemon is not None
    ended: dict[str, tuple[int, float, str]] = {}
    try:
        read_until(followers[0], f"Job {job_id}: queued")
        read_until(followers[1], "Watching all jobs")
        time.sleep(1.0)
        os.kill(daemon, signal.SIGSTOP)
        try:
            time.sleep(3.5)     # each has asked h2kd again since (every second for one job, every three for all)
            starting = [follow("watch", job_id), follow("watch"), follow("wait", job_id)]
            followers += starting
            for follower in starting:
                unique_name_of(stack.bus_address, follower.pid)
            time.sleep(1.0)     # connected, and asking h2kd
            for n, follower in enumerate(followers):
                follower.send_signal(signal.SIGINT)
                pressed = time.monotonic()
                _stdout, stderr = follower.communicate(timeout=60)
                took = time.monotonic() - pressed
                ended[f"{' '.join(follower.args[1:])} #{n}"] = (follower.returncode, took, stderr)
        finally:
            os.kill(daemon, signal.SIGCONT)
    finally:
        clean_up(env, [job_id], [output], followers)
    slow = {name: took for name, (_code, took, _stderr) in ended.items() if took > 5}
    assert not slow, ended
    for name, (code, _took, stderr) in ended.items():
        expected = 0 if name.startswith("watch #") else -signal.SIGINT     # watch of all jobs: Ctrl-C is its end
        assert code == expected and "Traceback" not in stderr, (name, ended[name])
        if name.startswith(f"watch {job_id}"):
            assert f"Detached; the job goes on. Cancel it with: h2kctl cancel {job_id}" in stderr, (name, stderr)


def watch_all_during(env: dict[str, str], action) -> tuple[str, str]:
    """`h2kctl watch` running while action() runs (from when it says it watches), stopped with Ctrl-C 1.5 s
    after; its (stdout, stderr) once it has exited 0."""
    watcher = subprocess.Popen([H2KCTL, "watch"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        seen = read_until(watcher, "Watching all jobs")
        action()
        time.sleep(1.5)
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=30)
        out = seen + out
    finally:
        clean_up(env, (), processes=[watcher])
    assert watcher.returncode == 0, err
    return out, err


def test_watch_all_jobs_until_ctrl_c(env, images, output_dir):
    """A job that ends while watched is announced with the file it wrote (its Output names only the directory;
    the Result, read for the announcement, names the file)."""
    job_id = new_id("watchall")
    directory = output_dir / job_id
    directory.mkdir()

    def submit_and_wait() -> None:
        ok(h2kctl(env, "submit", str(images["vmdk"]), "-o", f"{directory}/", "--id", job_id))
        wait_for_state(env, job_id, TERMINAL, timeout=120)
    try:
        out, err = watch_all_during(env, submit_and_wait)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert re.search(rf"Job {job_id} completed.*: {re.escape(str(directory / 'small.qcow2'))}$", out, re.M), out
    assert "Traceback" not in err


def test_watch_all_reports_jobs_left_unfinished_before_it_started_not_finished_ones(env, images, output_dir):
    finished_id, held_id = new_id("before"), new_id("held")
    ok(h2kctl(env, "submit", str(images["vmdk"]), "-o", str(output_dir / f"{finished_id}.qcow2"),
              "--id", finished_id))
    assert wait_for_state(env, finished_id, TERMINAL, timeout=120) == "completed"
    ok(h2kctl(env, "submit", str(images["vmdk"]), "-o", str(output_dir / f"{held_id}.qcow2"), "--id", held_id,
              "--no-queue"))

    def start_and_wait() -> None:
        ok(h2kctl(env, "start", held_id))
        assert wait_for_state(env, held_id, TERMINAL, timeout=120) == "completed"
    out, _err = watch_all_during(env, start_and_wait)
    assert f"Job {held_id} completed" in out and finished_id not in out, out


def test_quiet_watch_of_all_jobs_says_only_how_they_end(env, images, output_dir):
    """`watch -q`: no banner, no progress lines, one line per job as it ends (for a log or a notifier)."""
    held_id = new_id("quietwatch")
    ok(h2kctl(env, "submit", str(images["vmdk"]), "-o", str(output_dir / f"{held_id}.qcow2"), "--id", held_id,
              "--no-queue"))
    watcher = subprocess.Popen([H2KCTL, "watch", "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)     # its first look finds the held job unfinished: its end is news
        ok(h2kctl(env, "start", held_id))
        assert wait_for_state(env, held_id, TERMINAL, timeout=120) == "completed"
        time.sleep(1.0)
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=30)
    finally:
        clean_up(env, (), processes=[watcher])
    assert watcher.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Job {held_id} completed"), out
    assert "Traceback" not in err, err


def test_watch_reports_a_job_that_ends_again_after_a_retry(env, images, output_dir):
    """A job that had ended is retried while `h2kctl watch` runs: its new attempt is shown and its second end
    is reported, like any other job's."""
    job_id = new_id("watch-again")
    watcher = subprocess.Popen([H2KCTL, "watch"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, stdin=subprocess.DEVNULL)
    try:
        seen = read_until(watcher, "Watching all jobs")
        ok(h2kctl(env, "submit", str(images["text"]), "-o", str(output_dir / f"{job_id}.qcow2"), "--id", job_id,
                  "--source-format", "vmdk"))
        seen += read_until(watcher, f"Job {job_id} failed")
        assert ok(h2kctl(env, "retry", job_id)).stdout == f"Queued job {job_id} again.\n"
        seen += read_until(watcher, f"Job {job_id} failed", timeout=30)
        assert busctl_property(env, job_path(env, job_id), JOB_IFACE, "Attempt") == 2
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=30)
        out = seen + out
    finally:
        clean_up(env, [job_id], processes=[watcher])
    assert watcher.returncode == 0, err
    lines = [line for line in out.splitlines() if line.startswith(f"Job {job_id}")]
    ends = [n for n, line in enumerate(lines) if line.startswith(f"Job {job_id} failed: INVALID_IMAGE: ")]
    assert len(ends) == 2, out
    assert any(line.startswith(f"Job {job_id}: ") for line in lines[ends[0] + 1:ends[1]]), out   # the new attempt
    assert "Traceback" not in err


def test_inspect_prints_a_report(env, images):
    result = h2kctl(env, "inspect", "--json", str(images["vmdk"]), timeout=120)
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    assert report["job"]["operation"] == "inspect" and report["job"]["state"] == "completed"
    assert report["job"]["spec"]["image"]["path"] == str(images["vmdk"]), report["job"]   # Get, not GetAll
    assert report["job"]["state"] == job_state(env, report["job"]["id"])
    assert isinstance(report["report"], dict) and report["report"]
    assert "vmdk" in json.dumps(report["report"]).lower()
    human = h2kctl(env, "inspect", str(images["vmdk"]), timeout=120)
    assert human.returncode == 0 and "Report on" in human.stdout
    assert ok(h2kctl(env, "list", "--json", "--operation", "convert")).stdout  # nothing else queued by inspect


def test_inspect_into_a_file_writes_the_report_alone(env, images, paused_queue, tmp_path):
    """`h2kctl inspect FILE > report.txt`: the report, without the lines that said how its job went."""
    report = tmp_path / "report.txt"
    with open(report, "w") as into:
        inspecting = subprocess.Popen([H2KCTL, "inspect", str(images["vmdk"])], env=env, stdout=into,
                                      stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        try:
            time.sleep(1.0)     # its job is queued meanwhile: progress to say
            ok(h2kctl(env, "queue", "resume"))
            _stdout, stderr = inspecting.communicate(timeout=120)
        finally:
            clean_up(env, (), processes=[inspecting])
    text = report.read_text()
    assert inspecting.returncode == 0 and stderr == "", (text, stderr)
    assert text.startswith(f"Report on {images['vmdk']} (job "), text
    assert not re.search(r"^Job \S+: ", text, re.M), text


def test_status_and_events_fall_back_to_ascii_marks_where_stdout_cannot_show_them(env, images, output_dir):
    """As systemctl outside a UTF-8 locale: +, x, *, -> for ✓, ×, ○/●, →; and no traceback."""
    job_id = new_id("ascii")
    output = output_dir / f"{job_id}.qcow2"
    ok(h2kctl(env, "submit", "--wait", str(images["vmdk"]), "-o", str(output), "--id", job_id, timeout=120))
    try:
        head = f"{job_id} - convert {images['vmdk']}"
        assert ok(h2kctl(env, "status", job_id)).stdout.startswith(f"✓ {head} → {output}\n")
        for encoding in ("latin-1", "ascii"):
            narrow = {**env, "PYTHONIOENCODING": encoding}
            status = ok(h2kctl(narrow, "status", job_id))
            assert status.stdout.startswith(f"+ {head} -> {output}\n") and status.stderr == "", status
            events = ok(h2kctl(narrow, "events", job_id))
            assert " -> completed" in events.stdout and "→" not in events.stdout, events
    finally:
        h2kctl(env, "remove", job_id)
        output.unlink(missing_ok=True)


# ------------------------------------------------------------------------ an unprivileged user

@pytest.fixture
def plain_user():
    with user_in_group("h2kctlt", group=None) as name:
        yield name


def test_logs_tell_a_user_who_cannot_read_the_system_journal_what_to_read_instead(env, images, plain_user, output_dir):
    """journalctl, for a user outside its readers, shows no line and a hint of its own; h2kctl says why there is
    nothing and names what the user can read, the job's history."""
    job_id = new_id("logs-plain")
    ok(h2kctl(env, "submit", "--wait", str(images["vmdk"]), "-o", str(output_dir / f"{job_id}.qcow2"),
              "--id", job_id, timeout=120))
    try:
        refused = h2kctl(env, "logs", "--no-pager", job_id, user=plain_user)
        assert refused.returncode == 1 and refused.stdout == "", refused
        assert refused.stderr.startswith(f"h2kctl: the lines of job {job_id} are in the system journal, which this "
                                         "user may not read"), refused.stderr
        assert refused.stderr.strip().endswith(f"h2kctl events {job_id} shows the job's history"), refused.stderr
        assert "Hint" not in refused.stderr and len(refused.stderr.splitlines()) == 1, refused.stderr
        history = ok(h2kctl(env, "events", job_id, user=plain_user))
        assert "completed" in history.stdout, history.stdout
        assert job_id in ok(h2kctl(env, "logs", "--no-pager", job_id)).stdout   # root reads them
    finally:
        h2kctl(env, "remove", job_id)
        (output_dir / f"{job_id}.qcow2").unlink(missing_ok=True)


def test_unprivileged_user_reads_but_is_not_authorized_to_change(env, images, plain_user, output_dir, paused_queue):
    listed = h2kctl(env, "list", "--json", user=plain_user)
    assert listed.returncode == 0, listed
    assert isinstance(json.loads(listed.stdout), list)
    assert h2kctl(env, "queue", "--json", user=plain_user).returncode == 0

    result = h2kctl(env, "--no-ask-password", "submit", str(images["small"]), "-o", "/tmp/never.qcow2",
                    user=plain_user)
    assert result.returncode == 5, result
    assert result.stderr.strip() == "h2kctl: not authorized to submit jobs (polkit action org.hyper2kvm.h2kd1.submit)"

    result = h2kctl(env, "queue", "resume", user=plain_user)
    assert result.returncode == 5 and "org.hyper2kvm.h2kd1.manage" in result.stderr, result
    assert busctl_property(env, MANAGER, MANAGER_IFACE, "Paused") is True

    job_id = new_id("root")
    ok(h2kctl(env, "submit", str(images["small"]), "-o", str(output_dir / f"{job_id}.qcow2"), "--id", job_id))
    result = h2kctl(env, "cancel", job_id, user=plain_user)
    assert result.returncode == 5 and "org.hyper2kvm.h2kd1.cancel-other-user" in result.stderr, result
    assert job_state(env, job_id) == "queued"
    ok(h2kctl(env, "cancel", job_id))

    secret = images["small"].parent / "root-only.vmdk"
    secret.write_bytes(images["small"].read_bytes()[:MiB])
    secret.chmod(0o600)
    result = h2kctl(env, "submit", str(secret), "-o", "/tmp/never.qcow2", user=plain_user)
    assert result.returncode == 5 and "cannot read" in result.stderr and "Permission denied" in result.stderr
    assert pwd.getpwnam(plain_user).pw_uid != 0


@pytest.fixture
def submitting_user():
    """A user in group h2k, whom the example polkit rules let submit (and cancel their own jobs), nothing more."""
    with user_in_group("h2kctls") as name:
        yield name


def test_a_denied_submission_names_the_action_h2kd_refused(env, images, submitting_user, tmp_path):
    """h2kd decides which polkit action a submission needs: a priority above the default needs ...manage, a guest
    repair ...fix-guest. The refusal names that action, not ...submit, which this user has."""
    priority = h2kctl(env, "submit", str(images["vmdk"]), "--priority", "4", user=submitting_user)
    assert priority.returncode == 5, priority
    assert one_line(priority) == ("h2kctl: not authorized to manage the conversion queue "
                                  "(polkit action org.hyper2kvm.h2kd1.manage)"), priority
    job_file = Path(tempfile.mkdtemp(prefix="h2kctl-fix-")) / "fix.json"
    try:
        job_file.parent.chmod(0o755)
        job_file.write_text(json.dumps({"operation": "offline_fix", "image": {"path": str(images["vmdk"])}}))
        job_file.chmod(0o644)
        fix = h2kctl(env, "submit", "--file", str(job_file), user=submitting_user)
    finally:
        shutil.rmtree(job_file.parent, ignore_errors=True)
    assert fix.returncode == 5, fix
    assert one_line(fix).startswith("h2kctl: not authorized to repair a guest operating system"), fix
    assert one_line(fix).endswith("(polkit action org.hyper2kvm.h2kd1.fix-guest)"), fix


def test_another_users_result_is_withheld_and_said_so(env, images, plain_user):
    """What root's job found is root's: another user sees the job, and is told the result is not theirs."""
    inspected = json.loads(ok(h2kctl(env, "inspect", "--json", str(images["vmdk"]), timeout=120)).stdout)
    job_id = inspected["job"]["id"]
    by_root = ok(h2kctl(env, "--no-pager", "status", job_id)).stdout
    assert "Result:" in by_root and "virtual" in by_root, by_root
    withheld = f"the result of job {job_id} is for its owner (uid 0) and administrators to read"
    text = ok(h2kctl(env, "--no-pager", "status", job_id, user=plain_user)).stdout
    assert "State:" in text or "completed" in text, text
    assert f"Result: {withheld}" in text and "virtual" not in text, text
    as_json = json.loads(ok(h2kctl(env, "status", "--json", job_id, user=plain_user)).stdout)
    assert as_json["state"] == "completed" and as_json["result"] is None and as_json["spec"]["job_id"] == job_id
    shown = ok(h2kctl(env, "--no-pager", "show", job_id, user=plain_user)).stdout.splitlines()
    assert "State=completed" in shown and not any(line.startswith("Result=") for line in shown), shown
    refused = h2kctl(env, "show", job_id, "-p", "Result", user=plain_user)
    assert refused.returncode == 5 and refused.stderr.strip() == (
        f"h2kctl: not authorized to read Result: {withheld} (polkit action org.hyper2kvm.h2kd1.read-other-user)")


def test_user_names_are_looked_up_once_per_user(monkeypatch):
    """`list` names each job's owner: with 10,000 jobs and the user database on LDAP, a lookup per row would
    take minutes."""
    from h2kctl import render
    asked: list[int] = []
    real = pwd.getpwuid
    monkeypatch.setattr(render.pwd, "getpwuid", lambda uid: asked.append(uid) or real(uid))
    render.user_name.cache_clear()
    names = [render.user_name(uid) for uid in [0, 0, 65534, 0, 65534, 4_000_000_000] * 500]
    assert sorted(asked) == [0, 65534, 4_000_000_000]
    assert names[:3] == ["root", "root", real(65534).pw_name] and names[5] == "4000000000"


def test_escaped_cells_and_bars_keep_their_columns_and_width():
    """What is escaped is measured as shown: a table's columns stay aligned, and a progress bar stays one line."""
    import io

    from h2kctl.follow import bar_line
    from h2kctl.render import TerminalSafe, table
    shown = io.StringIO()
    table(["NAME", "STATE"], [["a\x1b[2Jb", "failed"], ["plain", "queued"]], TerminalSafe(shown))
    lines = shown.getvalue().splitlines()
    assert lines[1] == "a\\x1b[2Jb failed" and [line.index(state) for line, state in
                                                 zip(lines[1:], ("failed", "queued"))] == [10, 10], lines
    line = bar_line({"Id": "j", "State": "progressing", "Phase": "\x1b]0;x\x07" * 5, "ProgressKnown": True,
                     "Progress": 0.5, "BytesDone": 1, "BytesTotal": 2}, 60, label=True)
    assert len(line) <= 59 and "\x1b" not in line and "\\x1b" in line, line


def test_text_from_an_image_cannot_drive_the_readers_terminal(env, images, output_dir, tmp_path):
    # A VMDK descriptor is text its author chooses, and qemu-img quotes parts of it in its errors: the job's
    # error then carries escape sequences (here: retitle the terminal, erase the screen) to whoever reads it.
    base = images["small"].parent
    payload = "\x1b]0;owned\x07\x1b[2J\u202e"
    evil = base / "evil.vmdk"
    evil.write_text("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
                    f'createType="{payload}"\n\nRW 2048 FLAT "small.raw" 0\n')
    evil.chmod(0o644)
    job_id = new_id("esc")
    submitted = h2kctl(env, "submit", "--wait", str(evil), "-o", str(output_dir / f"{job_id}.qcow2"),
                       "--id", job_id, "--source-format", "vmdk", timeout=120)
    assert submitted.returncode in (1, 3), submitted
    message = busctl_property(env, job_path(env, job_id), JOB_IFACE, "Error")[1]
    assert "\x1b]0;owned" in message          # h2kd keeps the text as it is; showing it is h2kctl's care
    readings = [submitted, h2kctl(env, "status", job_id), h2kctl(env, "list"), h2kctl(env, "watch", job_id),
                h2kctl(env, "wait", job_id), h2kctl(env, "show", job_id)]
    for reading in readings:
        text = reading.stdout + reading.stderr
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", text), (reading.args, text)
    status = readings[1].stdout
    assert "\\x1b]0;owned\\x07\\x1b[2J\\u202e" in status, status      # shown, escaped, not dropped
    code, on_terminal = run_in_pty([H2KCTL, "status", "--no-pager", job_id], env)
    assert code == 0 and "\x1b" not in on_terminal and "\\x1b]0;owned" in on_terminal, on_terminal
    as_json = json.loads(ok(h2kctl(env, "status", job_id, "--json")).stdout)
    assert payload in as_json["error"]["message"]        # --json carries the exact text, escaped as JSON does
    evil.unlink()


# ------------------------------------------------------------------ jobs that take a while

THROTTLED = {"H2KD_WORKER_ENVIRONMENT": "H2K_RATE_LIMIT=16000000"}


@pytest.fixture
def throttled(stack):
    """h2kd whose worker units convert at 16 MB/s: the big image takes some 15 s, time to act while it runs."""
    stack.restart_daemon(daemon_env=THROTTLED)
    yield stack
    stack.restart_daemon(daemon_env={})


def wait_until_converting(env: dict[str, str], job_id: str) -> None:
    deadline = time.monotonic() + 60
    while busctl_property(env, job_path(env, job_id), JOB_IFACE, "Progress") < 0.05:
        assert time.monotonic() < deadline, f"{job_id} made no progress"
        assert job_state(env, job_id) not in TERMINAL, job_state(env, job_id)
        time.sleep(0.1)


def test_cancel_returns_once_the_job_has_stopped(env, images, output_dir, throttled):
    """As systemctl stop: when cancel returns the unit is gone and the job cancelled, so that retry works at once;
    --no-block only asks."""
    job_id = new_id("stop")
    output = output_dir / f"{job_id}.qcow2"
    ok(h2kctl(env, "submit", str(images["big"]), "-o", str(output), "--id", job_id, "--source-format", "raw"))
    try:
        wait_until_converting(env, job_id)
        assert ok(h2kctl(env, "cancel", job_id)).stdout == f"Cancelled job {job_id}.\n"
        assert job_state(env, job_id) == "cancelled"
        assert ok(h2kctl(env, "status", job_id)).stdout.startswith(f"○ {job_id} - convert ")   # stopped, not failed
        assert ok(h2kctl(env, "retry", job_id)).stdout == f"Queued job {job_id} again.\n"
        wait_until_converting(env, job_id)
        requested = ok(h2kctl(env, "cancel", "--no-block", job_id))
        assert requested.stdout == f"Cancel requested for job {job_id}.\n"
        assert wait_for_state(env, job_id, TERMINAL) == "cancelled"
        assert not output.exists()
    finally:
        h2kctl(env, "cancel", job_id)
        h2kctl(env, "remove", job_id)


def test_wait_says_a_failure_when_it_happens_not_after_the_jobs_named_before_it(env, images, output_dir, throttled):
    """A batch of a long conversion and one that fails at once: `h2kctl wait LONG BAD` reports BAD's failure while
    LONG still runs, then LONG's end; --json lists them in the order named."""
    long, bad = new_id("wait-long"), new_id("wait-bad-early")
    outputs = [output_dir / f"{job_id}.qcow2" for job_id in (long, bad)]
    ok(h2kctl(env, "submit", str(images["big"]), "-o", str(outputs[0]), "--id", long, "--source-format", "raw"))
    waiters: list[subprocess.Popen] = []
    try:
        wait_until_converting(env, long)
        ok(h2kctl(env, "submit", str(images["text"]), "-o", str(outputs[1]), "--id", bad, "--source-format", "vmdk"))
        waiters = [subprocess.Popen([H2KCTL, "wait", *flags, long, bad], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
                   for flags in ([], ["--json"])]
        waiting, listing = waiters
        first_line = waiting.stdout.readline()
        assert first_line.startswith(f"Job {bad} failed"), first_line
        assert job_state(env, long) not in TERMINAL, "the long job ended first: nothing was tested"
        ok(h2kctl(env, "cancel", long))
        rest, stderr = waiting.communicate(timeout=60)
        assert waiting.returncode == 3, stderr
        assert rest.startswith(f"Job {long} cancelled"), rest
        listed, stderr = listing.communicate(timeout=60)
        assert listing.returncode == 3, stderr
        assert [job["id"] for job in json.loads(listed)] == [long, bad]    # named order, not the order they ended
    finally:
        clean_up(env, (long, bad), outputs, waiters)


def test_waiting_outlives_a_restart_of_h2kd(stack, env, images, output_dir, throttled):
    """The job goes on while h2kd restarts (its unit is systemd's); so do wait, watch and submit --wait, which
    end with the job's real outcome instead of "h2kd is not reachable"."""
    job_id = new_id("restart")
    output = output_dir / f"{job_id}.qcow2"

    def follow(*args: str) -> subprocess.Popen:
        return subprocess.Popen([H2KCTL, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)

    followers = [follow("submit", "--wait", "--json", str(images["big"]), "-o", str(output), "--id", job_id,
                        "--source-format", "raw")]
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["busctl", "--system", "call", BUS_NAME, MANAGER, MANAGER_IFACE, "GetJob", "s", job_id],
                             env=env, capture_output=True, timeout=30).returncode != 0:
            assert time.monotonic() < deadline and followers[0].poll() is None, followers[0].communicate()
            time.sleep(0.1)
        followers += [follow("watch", job_id), follow("wait", job_id)]
        wait_until_converting(env, job_id)
        # Following when h2kd goes, as this tests: one that met h2kd away at its start would say it keeps trying.
        seen = read_until(followers[1], f"Job {job_id}: ")
        unique_name_of(stack.bus_address, followers[2].pid)
        time.sleep(1.0)     # `wait` says nothing until the job ends: time for its first answers
        stack.stop_daemon()
        time.sleep(3)    # away long enough for every follower to find it gone: each reads at least once a second
        stack.start_daemon()
        assert job_state(env, job_id) not in TERMINAL, "the job ended before h2kd was back: nothing was tested"
        outputs = [f.communicate(timeout=240) for f in followers]
    finally:
        for follower in followers:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
    for follower, (stdout, stderr) in zip(followers, outputs):
        assert follower.returncode == 0 and not stderr, (follower.args, follower.returncode, stdout, stderr)
    followed = json.loads(outputs[0][0])
    assert followed["state"] == "completed" and followed["spec"]["job_id"] == job_id, followed
    assert followed["result"]["outputs"]["disks"][0]["path"] == str(output), followed
    assert (seen + outputs[1][0]).splitlines()[-1].startswith(f"Job {job_id} completed")
    assert outputs[2][0].startswith(f"Job {job_id} completed")
    assert job_state(env, job_id) == "completed"
    output.unlink(missing_ok=True)
