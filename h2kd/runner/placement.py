"""Which CPU each conversion's qemu-img is kept on: the one the fewest of h2kd's running attempts were given.

`qemu-img convert` hands every read and write to a pool of threads and sleeps until it comes back. Left to the
kernel, the pool's threads run on other CPUs than qemu-img's own, and every hand-off is a wake-up across CPUs,
which costs more than the copy it carries (most of all in a virtual machine). Kept on one CPU, a conversion of a
sparse VMDK took about half the time (bench/RESULTS.md); two conversions kept on the same CPU, twice as long as
on two: so they are spread over the CPUs h2kd itself may use.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Iterable, Sequence


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity: what an administrator's CPUAffinity= left it)."""
    return sorted(os.sched_getaffinity(0))


def choose_cpu(usable: Sequence[int], given: Iterable[int | None]) -> int | None:
    """The usable CPU given to the fewest running attempts (`given`: each one's CPU, None where it has none),
    the lowest-numbered among equals; None if there is no CPU to choose."""
    if not usable:
        return None
    counts = Counter(cpu for cpu in given if cpu is not None)
    return min(usable, key=lambda cpu: (counts[cpu], cpu))
