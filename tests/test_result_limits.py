"""A job's result is kept with the job for good and loaded again at every start of h2kd, so it has a size limit.

The builtin worker leaves out of a result larger than the limit (1 MiB) all but where the outputs are, and says so
in it (the attempt's outcome is unchanged); and h2kd reads no more than the limit (and a little) of a result file,
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

from busclient import Client, run
import images
from h2kd.runner.systemd import MAX_RESULT_FILE_BYTES
from h2kd.worker.main import MAX_RESULT_BYTES

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")

# Disks with long names: each one's entry in an inspection report is about 1.3 KB, so 100 of them make a result of
# some 130 KB (more than the 64 KiB a first limit allowed, which left such a report out).
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


def limit_in(message: str, before: str) -> int:
    """The number of bytes a message gives after `before`."""
    assert before in message, message
    return int(message.split(before, 1)[1].split(" bytes")[0])


def test_the_report_of_a_vm_with_many_disks_is_kept_whole(stack: Any, tmp_path: Path) -> None:
    """A VM of 100 disks with long names is an ordinary one: its inspection's report (some 130 KB) is all there."""
    vmx = many_disk_vmx(tmp_path)
    props = run_job(stack, {"operation": "inspect", "image": {"path": str(vmx)}})
    assert props["State"] == "completed", props["Error"]
    outputs = json.loads(props["Result"])["outputs"]
    assert "left_out" not in outputs
    assert len(outputs["report"]["disks"]) == MANY_DISKS
    assert len(props["Result"]) > 100 * 1024


def _many_outputs(count: int, name_length: int) -> dict[str, Any]:
    """A convert's outputs of `count` disks, each with a report of some size, as the worker makes them."""
    return {"disks": [{"path": f"/var/lib/h2kd/output/vm/disk{i:04d}-{'x' * name_length}.qcow2", "format": "qcow2",
                       "size": 1 << 30, "check": {"status": "ok", "message": "y" * 2000}} for i in range(count)],
            "domain_xml": "/var/lib/h2kd/output/vm/vm.xml", "report": {"kind": "vmx", "disks": ["z" * 2000] * count}}


def test_a_result_too_large_keeps_its_outcome_and_where_the_outputs_are() -> None:
    """What the worker writes in place of a result of more than MAX_RESULT_BYTES: a completed attempt stays
    completed, with each output's path and format and a note of what was left out; a failed one keeps its error,
    its message cut short; with too many outputs for even that, their paths go to the journal."""
    from h2kd.model.result import parse_result
    from h2kd.worker.main import _result_text, _within_limit

    metrics = {"execution_seconds": 1.0, "bytes_read": 0, "bytes_written": 0}
    completed = {"status": "completed", "outputs": _many_outputs(300, 100), "error": None, "metrics": metrics,
                 "worker": "builtin", "attempt": 1}
    size = len(_result_text(completed))
    assert size > MAX_RESULT_BYTES
    kept = _within_limit(completed)
    parse_result(kept)
    assert kept["status"] == "completed" and kept["error"] is None
    assert len(_result_text(kept)) <= MAX_RESULT_BYTES
    assert kept["outputs"]["disks"] == [{"path": d["path"], "format": "qcow2"} for d in completed["outputs"]["disks"]]
    assert kept["outputs"]["domain_xml"] == "/var/lib/h2kd/output/vm/vm.xml"
    assert kept["outputs"]["left_out"] == (f"the result was {size} bytes, more than the limit of {MAX_RESULT_BYTES} "
                                           "bytes: only where the outputs are is kept")

    failed = {**completed, "status": "failed", "outputs": _many_outputs(300, 100),
              "error": {"phase": "convert", "code": "TOOL_FAILED", "message": "m" * 5000, "retryable": True}}
    kept = _within_limit(failed)
    parse_result(kept)
    assert kept["status"] == "failed" and kept["error"]["code"] == "TOOL_FAILED" and kept["error"]["retryable"]
    assert kept["error"]["message"] == "m" * 1024

    crowded = {**completed, "outputs": _many_outputs(5000, 200)}
    kept = _within_limit(crowded)
    assert set(kept["outputs"]) == {"left_out"} and "the 5001 outputs are listed in the journal" in kept["outputs"]["left_out"]

    small = {**completed, "outputs": _many_outputs(2, 10)}
    assert _within_limit(small) is small


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
    assert limit_in(message, "h2kd could not understand the attempt's result file: it is larger than ") == \
        MAX_RESULT_FILE_BYTES
    result = json.loads(props["Result"])
    assert len(props["Result"]) < 64 * 1024 and result["attempt"] == 1

    # Restarted, h2kd has the job as it was, and runs the next one with the builtin worker.
    started = time.monotonic()
    again = job_properties(stack, props["path"])
    assert (again["State"], tuple(again["Error"])) == ("failed", (code, message))
    assert time.monotonic() - started < 5
    assert run_job(stack, {"operation": "inspect", "image": {"path": str(source)}})["State"] == "completed"
