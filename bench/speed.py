"""Conversion speed: a job through h2kd against qemu-img by hand, one disk at a time and several at once."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from bench import disks
from bench.client import Client, convert_spec, median, new_id
from h2kd.sandbox.stack import Stack


def hand_convert(sources: list[Path], outputs: list[Path], fmt: str = "vmdk",
                 pinned: bool = False) -> tuple[float, float]:
    """`qemu-img convert` by hand, one process per source, all at once; (seconds until every convert ended,
    seconds until every output was also fsynced). pinned: each process kept on one CPU, spread over this
    process's CPUs as h2kd spreads its conversions (`taskset -c N qemu-img convert ...`)."""
    cpus = sorted(os.sched_getaffinity(0), reverse=True)      # the last first, as h2kd.runner.placement gives
    start = time.perf_counter()
    procs = [subprocess.Popen([*(["taskset", "-c", str(cpus[i % len(cpus)])] if pinned else []),
                               "qemu-img", "convert", "-f", fmt, "-O", "qcow2", str(s), str(o)])
             for i, (s, o) in enumerate(zip(sources, outputs))]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError("qemu-img convert failed")
    converted = time.perf_counter()
    for output in outputs:
        fd = os.open(output, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return converted - start, time.perf_counter() - start


async def side_by_side(runs: int, by_hand: Callable[[bool], tuple[float, float]],
                       job: Callable[[bool], Awaitable[float]]) -> dict[str, float]:
    """Median seconds of each way, over `runs` runs whose order changes from run to run (in four runs, each way
    comes first once and right after each other way once: what one leaves to the disk weighs on each): by hand
    (by_hand(pinned) -> seconds, seconds including an fsync of the outputs; pinned: kept on CPUs as h2kd keeps
    its conversions) and through h2kd (job(sync) -> seconds, with parameters.sync true, the default, and false).
    Keys hand_s, hand_fsync_s, hand_pinned_s, hand_pinned_fsync_s, job_s, job_nosync_s."""
    times: dict[str, list[float]] = {"hand_s": [], "hand_fsync_s": [], "hand_pinned_s": [],
                                     "hand_pinned_fsync_s": [], "job_s": [], "job_nosync_s": []}
    sides = ("job", "hand", "job_nosync", "hand_pinned")
    orders = ((0, 1, 3, 2), (1, 2, 0, 3), (2, 3, 1, 0), (3, 0, 2, 1))
    for run in range(runs):
        for side in (sides[i] for i in orders[run % 4]):
            if side.startswith("hand"):
                plain, synced = by_hand(side == "hand_pinned")
                times[side + "_s"].append(plain)
                times[side + "_fsync_s"].append(synced)
            else:
                times[side + "_s"].append(await job(side == "job"))
    return {key: median(values) for key, values in times.items()}


def _spec(source: Path, output: Path, sync: bool) -> dict[str, Any]:
    spec = convert_spec(str(source), str(output), new_id("bench"), fmt="vmdk")
    if not sync:
        spec["parameters"]["sync"] = False
    return spec


async def job_convert(client: Client, sources: list[Path], outputs: list[Path],
                      breakdown: list[dict[str, float]] | None = None, sync: bool = True) -> float:
    """Submit one convert job per source at once; seconds from the first submit to the last Completed signal.

    sync: the jobs' parameters.sync (false: outputs not synced to disk, as `qemu-img convert` by hand).
    breakdown, if given, gets per job: created->started (unit start), started->finished, the worker's own
    execution_seconds (from its result) and the rest (unit + h2kd overhead around the worker).
    """
    start = time.monotonic()
    paths = await asyncio.gather(*(client.submit(_spec(s, o, sync)) for s, o in zip(sources, outputs)))
    job_paths = [p for _, p in paths]
    await client.until(lambda: all(p in client.completed for p in job_paths), 900)
    end = max(client.completed[p][2] for p in job_paths)
    for job_id, path in paths:
        props = await client.job_props(path)
        if props["State"] != "completed":
            raise RuntimeError(f"job {job_id} ended {props['State']}: {props['Error']}")
        if breakdown is not None:
            worker = float(json.loads(props["Result"]).get("metrics", {}).get("execution_seconds", 0.0))
            breakdown.append({"to_unit_start_s": (props["StartedAt"] - props["CreatedAt"]) / 1e6,
                              "unit_to_finish_s": (props["FinishedAt"] - props["StartedAt"]) / 1e6,
                              "worker_execution_s": worker})
        await client.manager("RemoveJob", "s", [job_id])
    return end - start


def conversion_overhead(stack: Stack, work: Path, runs: int = 4, big: bool = True) -> list[dict[str, Any]]:
    """For each disk: median seconds by hand and through h2kd (in the order of side_by_side), the ratios and the
    fixed cost. A job with sync false against `qemu-img convert` by hand (ratio_nosync), a job with the default
    sync true against the same followed by an fsync (ratio_sync); and both against `qemu-img convert` kept on a
    CPU as h2kd keeps its own (ratio_nosync_pinned, ratio_sync_pinned: h2kd's own share, placement aside)."""
    cases = [("tiny sparse VMDK (16 MiB, 25% data)", disks.sparse_vmdk(work, "tiny", 16 * disks.MiB, 0.25))]
    if big:
        cases += [("2 GiB sparse VMDK (25% data)", disks.sparse_vmdk(work, "sparse2g", 2 * disks.GiB, 0.25)),
                  ("1 GiB fully allocated VMDK", disks.allocated_vmdk(work, "full1g", disks.GiB))]
    figures = []

    async def measure() -> None:
        client = await Client.connect(stack.bus_address, watch=True)
        try:
            for label, source in cases:
                parts: dict[bool, list[dict[str, float]]] = {True: [], False: []}   # by sync

                def by_hand(pinned: bool, source: Path = source) -> tuple[float, float]:
                    output = stack.output_dir / f"{new_id('hand')}.qcow2"
                    try:
                        return hand_convert([source], [output], pinned=pinned)
                    finally:
                        output.unlink()

                async def job(sync: bool, source: Path = source) -> float:
                    output = stack.output_dir / f"{new_id('job')}.qcow2"
                    seconds = await job_convert(client, [source], [output], parts[sync], sync=sync)
                    output.unlink()
                    return seconds

                m = await side_by_side(runs, by_hand, job)
                h, hs, j, jn = m["hand_s"], m["hand_fsync_s"], m["job_s"], m["job_nosync_s"]
                hp, hps = m["hand_pinned_s"], m["hand_pinned_fsync_s"]
                figures.append({"disk": label, "data_bytes": disks.data_bytes(source), "runs": runs,
                                "hand_s": h, "job_nosync_s": jn, "ratio_nosync": jn / h, "extra_nosync_s": jn - h,
                                "hand_fsync_s": hs, "job_s": j, "ratio_sync": j / hs, "extra_sync_s": j - hs,
                                # like for like in placement too: h2kd's own share of a job
                                "hand_pinned_s": hp, "ratio_nosync_pinned": jn / hp, "extra_nosync_pinned_s": jn - hp,
                                "hand_pinned_fsync_s": hps, "ratio_sync_pinned": j / hps, "extra_sync_pinned_s": j - hps,
                                **{k: median([p[k] for p in parts[True]]) for k in parts[True][0]},
                                **{"nosync_" + k: median([p[k] for p in parts[False]]) for k in parts[False][0]}})
        finally:
            client.close()

    asyncio.run(measure())
    return figures


def parallel_conversions(stack: Stack, work: Path, counts: tuple[int, ...] = (1, 2, 4), runs: int = 4,
                         size: int = disks.GiB, data_fraction: float = 0.25) -> list[dict[str, Any]]:
    """Total throughput (data bytes/s) of n simultaneous conversions through h2kd and by hand, as in
    conversion_overhead: jobs with sync false against plain `qemu-img convert` runs (ratio_nosync), default jobs
    against the same runs each followed by an fsync of its output (ratio_sync), and both against runs kept on
    CPUs as h2kd keeps its own (ratio_nosync_pinned, ratio_sync_pinned)."""
    sources = [disks.sparse_vmdk(work, f"par{i}", size, data_fraction, seed=100 + i) for i in range(max(counts))]
    data = [disks.data_bytes(s) for s in sources]
    figures = []

    async def through_h2kd(n: int, sync: bool) -> float:
        client = await Client.connect(stack.bus_address, watch=True)
        try:
            await client.manager("SetMaxParallelJobs", "u", [max(counts)])
            outputs = [stack.output_dir / f"{new_id('par')}.qcow2" for _ in range(n)]
            seconds = await job_convert(client, sources[:n], outputs, sync=sync)
            for o in outputs:
                o.unlink()
            return seconds
        finally:
            client.close()

    def by_hand(n: int, pinned: bool) -> tuple[float, float]:
        outputs = [stack.output_dir / f"{new_id('hand')}.qcow2" for _ in range(n)]
        try:
            return hand_convert(sources[:n], outputs, pinned=pinned)
        finally:
            for o in outputs:
                o.unlink()

    for n in counts:
        m = asyncio.run(side_by_side(runs, lambda pinned, n=n: by_hand(n, pinned),
                                     lambda sync, n=n: through_h2kd(n, sync)))
        h, hs, j, jn = m["hand_s"], m["hand_fsync_s"], m["job_s"], m["job_nosync_s"]
        hp, hps = m["hand_pinned_s"], m["hand_pinned_fsync_s"]
        total = sum(data[:n])
        mibps = lambda seconds: total / seconds / disks.MiB  # noqa: E731
        figures.append({"parallel": n, "data_bytes": total,
                        "hand_s": h, "job_nosync_s": jn, "hand_MiBps": mibps(h), "job_nosync_MiBps": mibps(jn),
                        "ratio_nosync": jn / h,
                        "hand_fsync_s": hs, "job_s": j, "hand_fsync_MiBps": mibps(hs), "job_MiBps": mibps(j),
                        "ratio_sync": j / hs, "hand_pinned_s": hp, "ratio_nosync_pinned": jn / hp,
                        "hand_pinned_fsync_s": hps, "ratio_sync_pinned": j / hps})
    return figures
