"""The outcome of one fix as the job result lists it: name, status, reason and the changes made (or planned)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

APPLIED, SKIPPED, FAILED, PLANNED = "applied", "skipped", "failed", "planned"


@dataclass
class Fix:
    name: str
    status: str = SKIPPED
    reason: str = ""
    changes: list[str] = field(default_factory=list)

    def done(self, dry_run: bool, reason: str) -> "Fix":
        """Applied, or planned in a dry run; skipped when there was nothing to change."""
        if not self.changes:
            self.status, self.reason = SKIPPED, reason or "nothing to change"
        else:
            self.status, self.reason = (PLANNED if dry_run else APPLIED), reason
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason, "changes": list(self.changes)}
