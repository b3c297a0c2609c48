"""What a worker writes to the journal when the text quotes a guest: one line each, whatever the guest's names
hold (a line break, a NUL, a "<0>" that journald would read as a priority, bytes that are not UTF-8)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from h2kd.observability import wire
from h2kd.operations import offline_fix
from h2kd.operations.offline_fix.outcome import FAILED, Fix
from h2kd.worker import main as worker

NOT_UTF8 = b"\xff".decode("utf-8", "surrogateescape")     # how a guest's file name that is not UTF-8 is read


def test_each_fix_is_logged_on_one_line_whatever_its_reason_quotes(monkeypatch, capsys) -> None:
    reason = f"update-initramfs failed: kernel 6.1{NOT_UTF8}\n<0>all hands\0<1>and more"
    for module, name in ((offline_fix.fstab, "fix_fstab"), (offline_fix.fstab, "fix_crypttab"),
                         (offline_fix.fstab, "fix_resume"), (offline_fix.network, "fix_network"),
                         (offline_fix.vmtools, "fix_vmtools"), (offline_fix.initramfs, "fix_initramfs"),
                         (offline_fix.bootloader, "fix_bootloader")):
        monkeypatch.setattr(module, name, lambda *args, _name=name: Fix(_name, FAILED, reason))
    fixes = offline_fix._apply_fixes(None, None, {"initramfs_tool": "", "kernels": [], "boot_loader": ""}, {},
                                     lambda *args: None, lambda: False)
    assert [fix.reason for fix in fixes] == [reason] * 7        # the Result keeps the words as they were
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7
    assert all(line.startswith("offline_fix: fix_") for line in lines)
    assert lines[0].endswith("kernel 6.1\\udcff\\x0a<0>all hands\\x00<1>and more")


def test_a_worker_line_naming_a_file_that_is_not_utf8_reaches_the_journal(tmp_path: Path, monkeypatch) -> None:
    """It raised UnicodeEncodeError: the worker ended without a result, and the job was retried for nothing."""
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "socket"))
    journal.settimeout(5)
    monkeypatch.setattr(wire, "JOURNAL_SOCKET", str(tmp_path / "socket"))
    monkeypatch.setenv("JOURNAL_STREAM", "8:1")
    monkeypatch.setitem(worker._JOURNAL_FIELDS, "H2K_JOB_ID", "j1")
    try:
        worker.say(f"h2k-worker: failed: no initramfs for kernel 6.1{NOT_UTF8}", error=True)
        entry = journal.recv(65536).decode("utf-8")
    finally:
        journal.close()
    assert "MESSAGE=h2k-worker: failed: no initramfs for kernel 6.1\\udcff\n" in entry
    assert "H2K_JOB_ID=j1\n" in entry


@pytest.mark.parametrize("text, shown", [("a\nb", "a\\x0ab"), ("\x1b[2J", "\\x1b[2J"), ("é ✓", "é ✓"),
                                         (NOT_UTF8, "\\udcff")])
def test_one_line_escapes_only_what_would_break_the_line(text: str, shown: str) -> None:
    assert wire.one_line(text) == shown
