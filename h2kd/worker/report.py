"""The progress line a worker sends as sd_notify STATUS=, readable by people (systemctl status) and by h2kd.

Format:  "<phase>: <percent>% (<done>/<total> bytes) <message>"   when the total is known
         "<phase>: <done> bytes <message>"                        when it is not
The runner sees it as the unit's StatusText and parses it back with parse_status().
"""

from __future__ import annotations

import re
from typing import NamedTuple

from h2kd.observability.wire import one_line

_KNOWN = re.compile(r"^(?P<phase>[a-z_-]+): (?P<pct>\d{1,3}\.\d\d)% \((?P<done>\d+)/(?P<total>\d+) bytes\)(?: (?P<msg>.*))?$")
_UNKNOWN = re.compile(r"^(?P<phase>[a-z_-]+): (?P<done>\d+) bytes(?: (?P<msg>.*))?$")


class ProgressReport(NamedTuple):
    phase: str
    fraction: float | None      # 0..1, None when the total is unknown
    bytes_done: int
    bytes_total: int
    message: str = ""


def format_status(report: ProgressReport) -> str:
    # A message may carry names read from the image (a guest's subvolumes): a line break in it would add lines
    # of its own to the sd_notify datagram (MAINPID=..., which systemd takes from a root process).
    message = f" {one_line(report.message)}" if report.message else ""
    if report.fraction is None:
        return f"{report.phase}: {report.bytes_done} bytes{message}"
    pct = min(max(report.fraction, 0.0), 1.0) * 100
    return f"{report.phase}: {pct:.2f}% ({report.bytes_done}/{report.bytes_total} bytes){message}"


def parse_status(text: str) -> ProgressReport | None:
    """The report in a StatusText, or None for any other text (e.g. a plain message)."""
    if m := _KNOWN.match(text):
        return ProgressReport(m["phase"], float(m["pct"]) / 100, int(m["done"]), int(m["total"]), m["msg"] or "")
    if m := _UNKNOWN.match(text):
        return ProgressReport(m["phase"], None, int(m["done"]), 0, m["msg"] or "")
    return None
