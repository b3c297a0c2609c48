"""What /proc says of a process, as the tests read it."""

from __future__ import annotations


def cpu_list(text: str) -> set[int]:
    """The CPUs of a list as /proc shows them ("0-2,5")."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus
