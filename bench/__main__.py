"""`python -m bench`: boot a private stack, run the benchmarks side by side, print the figures.

    bench/run                      # everything, full figures (about 6 minutes on 2 cores)
    bench/run --only submission,listing
    bench/run --quick              # smaller disks and counts, to try the harness
    bench/run --json out.json      # also write the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import api, cockpit, disks, faults, speed
from h2kd.sandbox.stack import Stack, new_base_dir

ALL = ("conversion", "parallel", "submission", "listing", "cockpit", "fanout", "burst", "subscribers", "kill")


def machine() -> dict[str, Any]:
    mem_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    df = subprocess.run(["df", "-hT", "/tmp"], capture_output=True, text=True).stdout.splitlines()[-1].split()
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return {"nproc": os.cpu_count(), "cpu": model, "memory_GiB": round(mem_kib / 1024 / 1024, 1),
            "kernel": platform.release(), "disk": f"{df[0]} {df[1]} ({df[2]}, /tmp)", "qemu_img": qemu,
            "python": platform.python_version()}


def show(title: str, rows: Any) -> None:
    print(f"\n== {title}", flush=True)
    for row in rows if isinstance(rows, list) else [rows]:
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 6:
        return f"[{len(value)} items: {value[:3]}...]"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", default=",".join(ALL), help="comma-separated subset of: " + ", ".join(ALL))
    parser.add_argument("--quick", action="store_true", help="smaller disks and counts")
    parser.add_argument("--runs", type=int, default=4,
                        help="repetitions of each conversion measurement (four: each order once)")
    parser.add_argument("--json", help="write the figures to this file too")
    parser.add_argument("--keep", action="store_true", help="keep the stack's directory (logs) afterwards")
    args = parser.parse_args(argv)
    wanted = [w for w in args.only.split(",") if w]
    unknown = set(wanted) - set(ALL)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    quick = args.quick
    figures: dict[str, Any] = {"machine": machine(), "quick": quick}
    show("machine", figures["machine"])
    base = new_base_dir("h2k-bench-")
    work = base / "disks"
    started = time.monotonic()
    try:
        with Stack(base) as stack:
            work.mkdir()
            small = disks.sparse_vmdk(work, "inspect-me", 16 * disks.MiB, 0.25)
            print(f"stack up in {base} (h2kd pid {stack.daemon_pid})", flush=True)
            if "conversion" in wanted:
                figures["conversion"] = speed.conversion_overhead(stack, work, runs=2 if quick else args.runs,
                                                                   big=not quick)
                show("conversion overhead: job through h2kd vs qemu-img convert by hand (medians)",
                     figures["conversion"])
            if "parallel" in wanted:
                figures["parallel"] = speed.parallel_conversions(
                    stack, work, runs=1 if quick else 4, size=256 * disks.MiB if quick else disks.GiB)
                show("parallel conversions: total throughput", figures["parallel"])
            if "submission" in wanted:
                cases = ((1, 1, 200), (20, 16, 20)) if quick else api.SUBMISSION_CASES
                figures["submission"] = api.submission(stack, small, cases)
                show("submission (queue=false, durable store)", figures["submission"])
                paced = ((20, 500, 1.0), (20, 1000, 1.0)) if quick else api.PACED_CASES
                figures["submission_paced"] = api.paced_submission(stack, small, paced)
                show("submission at an offered rate (20 clients, queue=false, durable store)",
                     figures["submission_paced"])
            if "listing" in wanted:
                figures["listing"] = api.listing(stack, small, jobs=1000 if quick else 10_000)
                show("listing with many jobs in the store", figures["listing"])
            if "cockpit" in wanted:
                missing = cockpit.missing_programs()
                if missing:
                    print(f"\ncockpit: skipped, not installed: {', '.join(missing)}")
                else:
                    jobs = 1000 if quick else 10_000
                    api.top_up(stack, small, jobs)
                    try:
                        figures["cockpit"] = cockpit.page_load(stack, base, jobs=api.job_count(stack))
                    except Exception as e:   # the other benchmarks still run
                        figures["cockpit"] = {"error": f"{type(e).__name__}: {e}"}
                    show("Cockpit page with many jobs in the store (Chromium)", figures["cockpit"])
            if "submission" in wanted or "listing" in wanted or "cockpit" in wanted:
                problems = api.remove_all_jobs(stack)
                if problems:
                    print(f"  clean-up problems: {problems[:5]}")
            if "fanout" in wanted:
                figures["fanout"] = api.progress_fanout(stack, work, jobs=10 if quick else 50,
                                                        seconds=5 if quick else 10)
                show("progress fan-out", figures["fanout"])
            if "burst" in wanted:
                figures["burst"] = faults.submit_burst(stack, small, clients=10 if quick else 50,
                                                       per_client=100)
                show("burst of submits", figures["burst"])
            if "subscribers" in wanted:
                figures["subscribers"] = faults.subscribers_while_jobs_run(
                    stack, small, subscribers=20 if quick else 200, jobs=10 if quick else 100)
                show("subscribers while jobs run", figures["subscribers"])
            if "kill" in wanted:
                figures["kill"] = faults.kill_during_conversions(stack, work, kills=3 if quick else 20,
                                                                 jobs=4 if quick else 16)
                show("kill -9 of h2kd during conversions", figures["kill"])
    finally:
        figures["total_seconds"] = time.monotonic() - started
        print(f"\ntotal {figures['total_seconds']:.0f} s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
