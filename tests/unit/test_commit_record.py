"""Undoing a killed worker's commit (h2kd.operations.tempfiles.undo_commit): only the very file it made."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from h2kd.operations.tempfiles import TempFiles, undo_commit


def test_a_file_made_at_the_name_since_with_the_freed_inode_number_is_not_undone():
    """The worker was killed with its output named; someone removed that output and made a file of their own
    there before h2kd settled the attempt. ext4 gives the new file the inode number just freed: only the inode's
    generation tells it from the worker's, and it stays."""
    root = Path(tempfile.mkdtemp(prefix="h2kt-commit-", dir="/var/tmp"))
    try:
        record = root / "run" / "temp-files"
        record.parent.mkdir()
        out = root / "out"
        out.mkdir()
        temps = TempFiles(str(record))
        temp = temps.create(str(out / "disk.qcow2"))
        Path(temp).write_bytes(b"the worker's output")
        temps.note_commit(temp, str(out / "disk.qcow2"), None)
        os.rename(temp, out / "disk.qcow2")
        noted = json.loads((record.parent / "commit").read_text())
        if noted["generation"] is None:
            pytest.skip("this file system keeps no inode generations")
        made = (out / "disk.qcow2").stat().st_ino
        (out / "disk.qcow2").unlink()
        (out / "disk.qcow2").write_bytes(b"someone else's file")
        if (out / "disk.qcow2").stat().st_ino != made:
            pytest.skip("the file system did not give the freed inode number to the next file")
        assert undo_commit(str(record.parent / "commit"), [str(out)]) == []
        assert (out / "disk.qcow2").read_bytes() == b"someone else's file"
        # The worker's own file, still there, is undone.
        (out / "disk.qcow2").unlink()
        temp = temps.create(str(out / "disk.qcow2"))
        Path(temp).write_bytes(b"the worker's output")
        temps.note_commit(temp, str(out / "disk.qcow2"), None)
        os.rename(temp, out / "disk.qcow2")
        assert undo_commit(str(record.parent / "commit"), [str(out)]) == [str(out / "disk.qcow2")]
        assert not (out / "disk.qcow2").exists()
    finally:
        shutil.rmtree(root)
