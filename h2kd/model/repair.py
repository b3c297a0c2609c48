"""Whether a job repairs the guest on its disk, for the parts that treat such jobs apart: the bus (another
polkit action), the runner (loop and device-mapper devices) and the worker (qemu-img keeps root's rights).

Kept apart from the spec models so that the worker can ask without loading pydantic.
"""

from __future__ import annotations

from typing import Any


def fixes_guest(spec: dict[str, Any]) -> bool:
    """Whether a job of this spec (as submitted, or as stored) repairs the guest on its disk: it then runs the
    guest's own programs (initramfs and boot loader tools) as root, which needs more than a submission."""
    parameters = spec.get("parameters")
    # Any true value: validation would take "yes" or 1 for true as well.
    return spec.get("operation") == "offline_fix" or (
        spec.get("operation") == "convert" and isinstance(parameters, dict) and bool(parameters.get("offline_fix")))
