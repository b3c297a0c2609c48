"""File access checked as the caller (h2kd.access): the child that looks as the caller."""

from __future__ import annotations

import errno
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from h2kd import access
from h2kd.errors import H2kError


def _hangs(path: str) -> tuple[int, ...]:
    time.sleep(3600)     # as a lookup in a FUSE mount whose server never answers
    return (0,)


def check_that_hangs(timeout: float = 30) -> BaseException | None:
    """Make a check as uid 65534 whose lookup hangs, in a thread; what it raised, or None if it was still
    waiting after `timeout` seconds. (tests/test_unit_files.py runs it with h2kd.service's capabilities.)"""
    outcome: list[BaseException] = []

    def check() -> None:
        try:
            access._as_caller(65534, [65534], _hangs, "/mnt/theirs/disk.vmdk")
        except BaseException as e:
            outcome.append(e)
    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else None


def test_a_check_that_hangs_is_given_up_and_its_child_ended(monkeypatch):
    """A caller may point h2kd at a path in a file system of their own that never answers: the check, made on
    the daemon's event loop, gives up after CALLER_CHECK_SECONDS, tells why, and leaves no child behind."""
    monkeypatch.setattr(access, "CALLER_CHECK_SECONDS", 0.5)
    monkeypatch.setattr(access, "_STALLED", {})
    error = check_that_hangs()
    assert error is not None, "the check as the caller never gave up"
    assert isinstance(error, H2kError)
    assert "checking /mnt/theirs/disk.vmdk as uid 65534 took longer than 0.5 s" in str(error)
    assert access._UNREAPED == set()
    # The same caller's next checks, one after another, would hold the loop 0.5 s each: they are refused for a
    # while without being made (this one, made, would find no such path and say so), and the others' go on.
    with pytest.raises(H2kError, match="checks for uid 65534 resume"):
        access.look_up_as(65534, [65534], "/mnt/theirs/disk.vmdk")
    assert access.look_up_as(65533, [65533], "/") == 0


def test_a_check_that_answers_is_told_what_the_caller_found():
    directory = Path(tempfile.mkdtemp(prefix="h2kt-access-"))     # pytest's tmp_path is closed to other users
    try:
        directory.chmod(0o755)
        image = directory / "disk.raw"
        image.write_bytes(b"\0" * 512)
        image.chmod(0o644)
        [(code, device, inode, _)] = access.look_up_and_open_each_as(65534, [65534], [str(image)])
        assert code == 0 and (device, inode) == (image.stat().st_dev, image.stat().st_ino)
        image.chmod(0o600)
        assert access.look_up_and_open_each_as(65534, [65534], [str(image)])[0][0] == errno.EACCES
    finally:
        shutil.rmtree(directory)


def test_many_files_checked_together_get_each_the_answer_of_its_own_check():
    """A descriptor may name thousands of files: they are looked up as the caller a batch to a child, and each
    gets, in order, what a check of it alone finds (across batches, whatever the files are)."""
    import os

    directory = Path(tempfile.mkdtemp(prefix="h2kt-access-"))
    try:
        directory.chmod(0o755)
        (directory / "closed").mkdir(mode=0o700)
        paths = []
        for number in range(access._PATHS_PER_CHILD * 2 + 7):
            path = directory / f"f{number}"
            kind = number % 5
            if kind == 0:
                path.write_bytes(b"x")
                path.chmod(0o644)
            elif kind == 1:
                path.write_bytes(b"x")
                path.chmod(0o600)           # theirs to see, not to read
            elif kind == 2:
                path = directory / "closed" / f"f{number}"
                path.write_bytes(b"x")
            elif kind == 3:
                os.mkfifo(path, 0o644)
            paths.append(str(path))         # kind 4: nothing there
        together = access.look_up_and_open_each_as(65534, [65534], paths)
        alone = [access.look_up_and_open_each_as(65534, [65534], [path])[0] for path in paths]
        assert together == alone
        assert {found[0] for found in together} == {0, errno.EACCES, errno.ENOENT}
        assert access.look_up_and_open_each_as(65534, [65534], []) == []
    finally:
        shutil.rmtree(directory)
