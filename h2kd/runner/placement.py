"""Which CPU each attempt's qemu-img is kept on: the one the fewest of h2kd's running attempts were given.

`qemu-img convert` hands every read and write to a pool of threads and sleeps until it comes back. Left to the
kernel, the pool's threads run on other CPUs than qemu-img's own, and every hand-off is a wake-up across CPUs,
which costs more than the copy it carries (most of all in a virtual machine). Kept on one CPU, a conversion of a
sparse VMDK took about half the time (bench/RESULTS.md); two conversions kept on the same CPU, twice as long as
on two: so they are spread.

h2kd counts over every CPU of the machine: the units get their CPUs from systemd (the CPUAffinity= of
system.conf, the slice's AllowedCPUs=), not from h2kd.service. The worker maps the number it is given onto the
CPUs it may use, counted round (h2kd.operations.qemuimg.keep_convert_and_compare_on): where those are fewer than
the machine's, the spread is only roughly even.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Iterable, Sequence


def cpu_slots() -> list[int]:
    """The numbers to spread attempts over: one per CPU of the machine."""
    return list(range(os.cpu_count() or 1))


def choose_cpu(slots: Sequence[int], given: Iterable[int | None]) -> int | None:
    """The slot given to the fewest running attempts (`given`: each one's, None where it has none), the
    highest-numbered among equals (CPU 0 is the one that takes most interrupts and housekeeping); None if there
    is none to choose."""
    if not slots:
        return None
    counts = Counter(cpu for cpu in given if cpu is not None)
    return min(slots, key=lambda cpu: (counts[cpu], -cpu))
