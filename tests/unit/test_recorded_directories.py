"""The job directory a worker killed outright made: removed by h2kd (tempfiles.remove_recorded) only while it is
that very directory, empty, named after the job, right in an output root, and not removed by the worker itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from h2kd.operations.qemuimg import OperationError
from h2kd.operations.tempfiles import TempFiles, remove_recorded


def made_and_noted(temps: TempFiles, directory: Path) -> str:
    """`directory` made and noted as JobDirectory and plan_outputs do: opened at its resolved path."""
    directory.mkdir()
    resolved = os.path.realpath(directory)
    fd = os.open(resolved, os.O_RDONLY | os.O_DIRECTORY)
    try:
        temps.note_made_directory(resolved, fd)
    finally:
        os.close(fd)
    return resolved


def test_the_job_directory_is_removed_empty_even_where_the_root_is_reached_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "root-link").symlink_to(tmp_path / "out")
    record = tmp_path / "temp-files"
    temps = TempFiles(str(record))
    job_dir = made_and_noted(temps, tmp_path / "root-link" / "nightly-1")
    partial = temps.create(os.path.join(job_dir, "disk.qcow2"))
    assert remove_recorded(str(record), [str(tmp_path / "root-link")], job_id="nightly-1") == [partial, job_dir]
    assert list((tmp_path / "out").iterdir()) == []


def test_only_a_job_directory_right_in_a_root_still_the_one_made_and_empty_is_removed(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    (root / "deeper").mkdir()
    record = tmp_path / "temp-files"
    temps = TempFiles(str(record))
    own = made_and_noted(temps, root / "nightly-2-0011aabb")       # the name taken, a random suffix added
    holding = made_and_noted(temps, root / "nightly-2")
    (root / "nightly-2" / "users-file").write_bytes(b"keep me")
    other_name = made_and_noted(temps, root / "someone-elses")
    nested = made_and_noted(temps, root / "deeper" / "nightly-2-0123abcd")
    replaced = made_and_noted(temps, root / "nightly-2-89abcdef")
    os.rename(replaced, root / "aside")
    (root / "nightly-2-89abcdef").mkdir()      # made while the noted one still exists: another inode
    os.rmdir(root / "aside")
    assert remove_recorded(str(record), [str(root)]) == []          # no job id given: no directory at all
    assert remove_recorded(str(record), [str(root)], job_id="nightly-2") == [own]
    assert not os.path.exists(own)
    for path in (holding, other_name, nested, replaced):
        assert os.path.isdir(path), path
    assert (root / "nightly-2" / "users-file").read_bytes() == b"keep me"


def test_a_directory_the_worker_removed_itself_is_not_removed_again_when_made_anew(tmp_path: Path) -> None:
    """The worker failed, removed its job directory and withdrew the note; a directory made at that name since
    is someone else's, even with the inode number just freed (as ext4 may give it): played here by a directory
    with the very device and inode noted, left in place."""
    root = tmp_path / "out"
    root.mkdir()
    record = tmp_path / "temp-files"
    temps = TempFiles(str(record))
    job_dir = made_and_noted(temps, root / "nightly-3")
    temps.withdraw_made_directory(job_dir)
    assert remove_recorded(str(record), [str(root)], job_id="nightly-3") == []
    assert os.path.isdir(job_dir)


def test_a_path_with_a_line_break_is_never_written_to_the_record(tmp_path: Path) -> None:
    """A record is a line a path: a line break (a name a submitter's symlink leads to) would add a line of theirs."""
    record = tmp_path / "temp-files"
    with pytest.raises(OperationError, match="line break"):
        made_and_noted(TempFiles(str(record)), tmp_path / "a\n+1:2:x")
    assert not record.exists()
