"""Convert options through the whole stack: a job submitted over D-Bus, run by h2k-worker in a transient unit
of the private systemd manager, its output checked with `qemu-img compare`.

test_operations.py proves what the worker does with each option (e.g. that sync false makes no sync call);
here a user's view: the job with the option completes and leaves exactly its output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from busclient import Client, new_id, run
import images
from images import MiB

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")

TEMP_PREFIX = ".h2k-tmp-"


def convert_job(stack: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Submit a convert job (with the queue running) and wait for its end; its properties."""
    async def go() -> dict[str, Any]:
        async with Client.connected(stack.bus_address, watch=True) as client:
            await client.manager("ResumeQueue")
            _, path = await client.submit(spec)
            return await client.wait_terminal(path, timeout=120)
    return run(go())


def identical(reference: Path, ref_format: str, output: Path, out_format: str) -> tuple[bool, str]:
    difference = images.disk_difference(reference, output, ref_format, out_format)
    return not difference, difference


@pytest.mark.parametrize("output_format", ["qcow2", "raw"])
def test_convert_with_sync_false_completes_with_its_output_and_nothing_else(stack: Any, tmp_path: Path,
                                                                           output_format: str) -> None:
    raw = images.make_raw_with_data(tmp_path / "data.raw", 8 * MiB, 0.3, seed=21)
    source = images.make_image("vmdk", "monolithicSparse", tmp_path / "src.vmdk", raw=raw)
    output = stack.output_dir / f"{new_id('nosync')}.{output_format}"
    props = convert_job(stack, {"operation": "convert", "image": {"path": str(source)},
                                "parameters": {"sync": False, "output_format": output_format},
                                "artifacts": {"output_path": str(output)}})
    try:
        assert props["State"] == "completed", props["Error"]
        # What the worker was given, in its attempt's envelope, not only what h2kd stored.
        envelope = json.loads((stack.state_dir / "runs" / props["Unit"] / "spec.json").read_text())
        assert envelope["spec"]["parameters"]["sync"] is False
        same, words = identical(raw, "raw", output, output_format)
        assert same, words
        [disk] = json.loads(props["Result"])["outputs"]["disks"]
        assert disk["path"] == str(output)
        assert [p.name for p in stack.output_dir.iterdir() if p.name.startswith(TEMP_PREFIX)
                and p.name.endswith(output.name)] == []
    finally:
        output.unlink(missing_ok=True)
