"""Disks for the benchmarks and the tests, built with qemu-img: sparse VMDKs with a share of random data, fully
allocated disks, tiny ones, and the raw files they start from."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB
BLOCK = 64 * 1024


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def raw_with_data(path: Path, size: int, data_fraction: float, seed: int = 7, piece: int = MiB) -> Path:
    """A sparse raw file of `size` bytes with random data in about `data_fraction` of its pieces of `piece`
    bytes (the same file again for the same seed)."""
    rng = random.Random(seed)
    pieces = size // piece
    chosen = sorted(rng.sample(range(pieces), max(1, int(pieces * data_fraction))))
    with open(path, "wb") as f:
        f.truncate(size)
        for index in chosen:
            f.seek(index * piece)
            f.write(rng.randbytes(piece))
    return path


def full_raw(path: Path, size: int) -> Path:
    """A raw file with random data in every block (nothing sparse, nothing compressible)."""
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = min(left, 16 * MiB)
            f.write(os.urandom(chunk))
            left -= chunk
    return path


def to_format(raw: Path, path: Path, driver: str, options: str | None = None) -> Path:
    """`raw`'s content as an image at `path` (qemu-img driver and its creation options)."""
    args = ["convert", "-f", "raw", "-O", driver] + (["-o", options] if options else []) + [str(raw), str(path)]
    qemu_img(*args)
    return path


def sparse_vmdk(directory: Path, name: str, size: int, data_fraction: float, seed: int = 7) -> Path:
    """A monolithicSparse VMDK of `size` bytes with about data_fraction of it holding random data."""
    raw = raw_with_data(directory / f"{name}.src.raw", size, data_fraction, seed)
    try:
        return to_format(raw, directory / f"{name}.vmdk", "vmdk", "subformat=monolithicSparse")
    finally:
        raw.unlink()


def allocated_vmdk(directory: Path, name: str, size: int) -> Path:
    """A monolithicFlat VMDK whose flat extent is fully written with random data."""
    raw = full_raw(directory / f"{name}.src.raw", size)
    try:
        return to_format(raw, directory / f"{name}.vmdk", "vmdk", "subformat=monolithicFlat")
    finally:
        raw.unlink()


def data_bytes(path: Path, fmt: str | None = None) -> int:
    """Allocated data bytes as `qemu-img map` sees them (what a conversion has to copy)."""
    import json
    out = qemu_img("map", "--output=json", *(["-f", fmt] if fmt else []), str(path))
    return sum(int(e["length"]) for e in json.loads(out) if e.get("data") and not e.get("zero"))


def identical(first: Path, second: Path) -> tuple[bool, str]:
    proc = subprocess.run(["qemu-img", "compare", "-U", str(first), str(second)], capture_output=True, text=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()
