"""A job's result is kept with the job for good and loaded again at every start of h2kd, so it has a size limit.

The builtin worker leaves out of a result larger than the limit all but where the outputs are, and says so in it
(the attempt's outcome is unchanged); and h2kd reads no more than the limit (and a little) of a result file,
whoever wrote it: a larger one is a result it cannot make sense of, and the attempt failed. Either way h2kd goes on serving, and starts as fast.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from busclient import Client, new_id, run
import images
from h2kd.manager.manager import MAX_RESULT_BYTES

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")

# Disks with long names: each one's entry in an inspection report (or a conversion's outputs) is about 1.3 KB, so
# 100 of them make a result of some 130 KB (inspect) to 160 KB (convert), past the limit and its slack.
MANY_DISKS = 100

# A worker that keeps no limit, for a source whose VM name is 20 MB long: its result is a completed one.
UNBOUNDED_WORKER = r'''
import json, os, sys
from systemd import daemon

spec = json.load(open(sys.argv[sys.argv.index("--spec") + 1]))
result_path = sys.argv[sys.argv.index("--result") + 1]
daemon.notify("READY=1")
result = {"status": "completed", "outputs": {"report": {"kind": "vmx", "vm": {"name": "x" * 20_000_000}}},
          "error": None, "metrics": {"execution_seconds": 0.1, "bytes_read": 0, "bytes_written": 0},
          "worker": "builtin", "attempt": spec["attempt"]}
with open(result_path + ".tmp", "w") as f:
    json.dump(result, f)
os.replace(result_path + ".tmp", result_path)
'''


def many_disk_vmx(directory: Path) -> Path:
    """A VMX with MANY_DISKS small qcow2 disks, each with a long (but ordinary) file name."""
    names = []
    for index in range(MANY_DISKS):
        name = f"disk{index:03d}-{'x' * 180}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(directory / name), "1M"], check=True,
                       timeout=30)
        names.append(name)
    return images.make_vmx(directory, names, name="many")


def run_job(stack: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Submit a job (with the queue running) and wait for its end; its properties."""
    async def go() -> dict[str, Any]:
        async with Client.connected(stack.bus_address, watch=True) as client:
            await client.manager("ResumeQueue")
            _, path = await client.submit(spec)
            return await client.wait_terminal(path, timeout=180) | {"path": path}
    return run(go())


def job_properties(stack: Any, path: str) -> dict[str, Any]:
    """A job's properties, as they are now."""
    async def go() -> dict[str, Any]:
        async with Client.connected(stack.bus_address) as client:
            return await client.job_props(path)
    return run(go())


def test_the_limit_is_the_one_external_workers_have():
    from h2kd.runner.systemd import MAX_RESULT_FILE_BYTES
    from h2kd.worker.main import MAX_RESULT_BYTES as WORKER_LIMIT

    assert WORKER_LIMIT == MAX_RESULT_BYTES == 65536
    assert MAX_RESULT_BYTES < MAX_RESULT_FILE_BYTES <= 2 * MAX_RESULT_BYTES


def limit_in(message: str, before: str) -> int:
    """The number of bytes a message gives after `before`."""
    assert before in message, message
    return int(message.split(before, 1)[1].split(" bytes")[0])


def test_an_inspection_whose_report_is_too_large_completes_saying_what_was_left_out(stack: Any,
                                                                                   tmp_path: Path) -> None:
    vmx = many_disk_vmx(tmp_path)
    props = run_job(stack, {"operation": "inspect", "image": {"path": str(vmx)},
                            "execution_policy": {"retry_count": 2}})

    assert props["State"] == "completed", props["Error"]
    assert len(props["Result"]) < MAX_RESULT_BYTES
    result = json.loads(props["Result"])
    note = result["outputs"]["left_out"]
    assert "more than the limit of 65536 bytes" in note and "the outputs' report is left out" in note, note
    assert limit_in(note, "the result was ") > 2 * MAX_RESULT_BYTES
    assert set(result["outputs"]) == {"left_out"} and result["attempt"] == 1


def test_a_conversion_whose_result_is_too_large_completes_keeping_where_its_outputs_are(stack: Any,
                                                                                      tmp_path: Path) -> None:
    vmx = many_disk_vmx(tmp_path)
    job_id = new_id("many")
    output = stack.output_dir / f"{job_id}.raw"
    try:
        props = run_job(stack, {"job_id": job_id, "operation": "convert", "image": {"path": str(vmx)},
                                "parameters": {"output_format": "raw"}, "artifacts": {"output_path": str(output)},
                                "execution_policy": {"retry_count": 2}})

        assert props["State"] == "completed", props["Error"]
        assert len(props["Result"]) < MAX_RESULT_BYTES
        result = json.loads(props["Result"])
        assert result["attempt"] == 1
        note = result["outputs"]["left_out"]
        assert "more than the limit of 65536 bytes" in note and "only where the outputs are is kept" in note, note
        disks = result["outputs"]["disks"]
        assert len(disks) == MANY_DISKS
        assert [d["format"] for d in disks] == ["raw"] * MANY_DISKS
        written = sorted(p for p in stack.output_dir.iterdir() if p.name.startswith(job_id))
        assert sorted(Path(d["path"]) for d in disks) == written
        assert all(p.stat().st_size == 1024 * 1024 for p in written)
    finally:
        for path in stack.output_dir.glob(f"{job_id}*"):
            path.unlink()


def test_h2kd_does_not_read_a_result_file_past_the_limit(stack: Any, tmp_path: Path) -> None:
    worker = stack.base_dir / "unbounded-worker.py"
    worker.write_text(UNBOUNDED_WORKER)
    source = images.make_image("qcow2", None, tmp_path / "small.qcow2",
                               raw=images.make_raw_with_data(tmp_path / "small.raw", 1024 * 1024, 0.5))
    stack.restart_daemon(daemon_env={"H2KD_WORKER_COMMAND": f"{sys.executable} {worker}"})
    try:
        props = run_job(stack, {"operation": "inspect", "image": {"path": str(source)},
                                "execution_policy": {"retry_count": 2}})
    finally:
        stack.restart_daemon(daemon_env={})

    assert props["State"] == "failed", props["Error"]
    code, message = props["Error"]
    assert code == "INTERNAL", message
    # Read no further than the limit and some slack.
    assert MAX_RESULT_BYTES < limit_in(message, "h2kd could not understand the attempt's result file: it is "
                                                "larger than ") <= 2 * MAX_RESULT_BYTES
    result = json.loads(props["Result"])
    assert len(props["Result"]) < MAX_RESULT_BYTES and result["attempt"] == 1

    # Restarted, h2kd has the job as it was, and runs the next one with the builtin worker.
    started = time.monotonic()
    again = job_properties(stack, props["path"])
    assert (again["State"], tuple(again["Error"])) == ("failed", (code, message))
    assert time.monotonic() - started < 5
    assert run_job(stack, {"operation": "inspect", "image": {"path": str(source)}})["State"] == "completed"
