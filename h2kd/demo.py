"""`make demo`: build a sample VMware disk, convert it through h2kd with h2kctl's live progress bar, verify it.

Runs inside `h2k-sandbox run --`, so h2kd is on the private bus named by DBUS_SYSTEM_BUS_ADDRESS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 1024 * 1024


def make_sample_vmdk(directory: Path, size_mib: int = 2048, data_mib: int = 512) -> Path:
    """A sparse 2 GiB streamOptimized VMDK (as VMware exports them) with 512 MiB of scattered data."""
    raw = directory / "sample.raw"
    with raw.open("wb") as f:
        f.truncate(size_mib * MiB)
        step = size_mib // data_mib * 4
        for i in range(0, size_mib, step):
            f.seek(i * MiB)
            f.write(os.urandom(4 * MiB))
    vmdk = directory / "sample-vm.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(raw), str(vmdk)], check=True)
    return vmdk


def main() -> int:
    output_dir = Path(os.environ.get("H2K_SANDBOX_OUTPUT_DIR", "/var/lib/h2kd/output"))
    h2kctl = shutil.which("h2kctl") or str(Path(sys.executable).with_name("h2kctl"))
    with tempfile.TemporaryDirectory(prefix="h2k-demo-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        print("Building a sample VMware disk (2 GiB virtual, 512 MiB of data, streamOptimized)...", flush=True)
        source = make_sample_vmdk(work)
        (work / "sample.raw").unlink()
        output = output_dir / "sample-vm.qcow2"
        if output.exists():
            output.unlink()
        print(f"Converting {source.name} to {output} through h2kd:", flush=True)
        submit = subprocess.run([h2kctl, "submit", str(source), "--output", str(output), "--format", "qcow2",
                                 "--wait"])
        if submit.returncode != 0:
            print(f"demo: the conversion failed (h2kctl exit {submit.returncode})", file=sys.stderr)
            return 1
        compare = subprocess.run(["qemu-img", "compare", "-f", "vmdk", "-F", "qcow2", str(source), str(output)],
                                 capture_output=True, text=True)
        if compare.returncode != 0:
            print(f"demo: the output differs from the source: {compare.stdout}{compare.stderr}", file=sys.stderr)
            return 1
        print(f"Verified: {output} has the same contents as {source.name} (qemu-img compare).")
        subprocess.run([h2kctl, "list"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
