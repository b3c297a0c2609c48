"""How often a worker tells systemd its progress (StatusReporter): a short job's bar moves in visible steps,
a long one reports about once a second, a new phase or message goes out at once, the last report is never
lost, and nothing goes out more often than every STATUS_MIN_GAP."""

from __future__ import annotations

import pytest

from h2kd.worker.main import STATUS_MIN_GAP, STATUS_QUIET, STATUS_STEP, StatusReporter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reporter() -> tuple[StatusReporter, list[str], Clock]:
    """A reporter whose held reports wait for the next one (no timer fires)."""
    sent: list[str] = []
    clock = Clock()
    return StatusReporter(send=sent.append, clock=clock, later=lambda delay, call: None), sent, clock


def percents(sent: list[str]) -> list[float]:
    return [float(line.split(": ")[1].split("%")[0]) for line in sent]


def test_a_long_job_reports_about_once_a_second_and_never_goes_quiet():
    status, sent, clock = reporter()
    for percent in range(0, 30):               # qemu-img's 1% steps, 0.4 s apart
        status("convert", percent, 100)
        clock.now += 0.4
    gaps = [b - a for a, b in zip(percents(sent), percents(sent)[1:])]
    assert len(sent) == 10                     # 12 s of work: a report every 1.2 s (every third step)
    assert all(gap == 3 for gap in gaps)
    status.flush()                             # at the end, what was held back goes out
    assert percents(sent)[-1] == 29


def test_a_short_job_reports_every_step_of_five_percent():
    status, sent, clock = reporter()
    for percent in range(0, 101):              # the whole job in 1 s
        status("convert", percent, 100)
        clock.now += 0.01
    status.flush()
    shown = percents(sent)
    assert shown[0] == 0 and shown[-1] == 100
    assert len(shown) >= 8, shown              # the bar moves visibly, yet ...
    assert all(b - a >= STATUS_STEP * 100 for a, b in zip(shown, shown[1:-1])), shown
    assert len(shown) <= 1 / STATUS_MIN_GAP + 2, shown   # ... never faster than the minimum gap


def test_a_new_phase_or_message_goes_out_at_once():
    status, sent, clock = reporter()
    status("convert", 10, 100, "disk 1 of 2")
    clock.now += STATUS_MIN_GAP * 1.01
    status("convert", 11, 100, "disk 2 of 2")
    clock.now += STATUS_MIN_GAP * 1.01
    status("check", 11, 100, "disk 2 of 2")
    assert [line.removeprefix("STATUS=").split(": ")[0] for line in sent] == ["convert", "convert", "check"]
    assert "disk 2 of 2" in sent[1]


def test_quiet_means_a_report_after_at_most_a_second_of_progress():
    status, sent, clock = reporter()
    status("convert", 1, 1000)
    clock.now += STATUS_QUIET - 0.01
    status("convert", 2, 1000)
    assert len(sent) == 1                       # tiny move, not yet a second: held back
    clock.now += 0.02
    status("convert", 3, 1000)
    assert len(sent) == 2 and "0.30%" in sent[1]


def test_a_message_read_from_the_image_stays_on_the_status_line():
    """A name from a guest (a btrfs subvolume, say) with a line break would otherwise add its own line to the
    sd_notify datagram, e.g. MAINPID=, which systemd takes from a root process."""
    status, sent, _ = reporter()
    status("detect", 1, 2, "subvolume @\nMAINPID=1\r\x1b[2J")
    status.flush()
    (line,) = sent
    assert line.startswith("STATUS=detect: 50.00% ") and "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.endswith("subvolume @\\x0aMAINPID=1\\x0d\\x1b[2J")
    from h2kd.worker.report import parse_status
    assert parse_status(line.removeprefix("STATUS=")).message == "subvolume @\\x0aMAINPID=1\\x0d\\x1b[2J"


def test_a_report_held_back_before_a_long_quiet_step_goes_out_by_itself():
    """The fix steps of a guest repair come milliseconds apart, and then its initramfs is rebuilt for minutes
    with no report: the last step's report, held back by the minimum gap, goes out when it may, not only with
    the next report, minutes later. So does a small move held back until the quiet second."""
    sent: list[str] = []
    clock = Clock()
    timers: list[tuple[float, object]] = []
    status = StatusReporter(send=sent.append, clock=clock, later=lambda delay, call: timers.append((delay, call)))
    status("fix", 1, 3, "fstab")
    clock.now += 0.01
    status("fix", 2, 3, "initramfs")             # too soon after the first: held back
    assert [line.split(" ")[-1] for line in sent] == ["fstab"]
    (delay, due), = timers
    assert delay == pytest.approx(STATUS_MIN_GAP - 0.01)
    clock.now += delay
    due()                                         # the timer fires: nothing else is reported meanwhile
    assert [line.split(" ")[-1] for line in sent] == ["fstab", "initramfs"]
    timers.clear()
    clock.now += 0.5
    status("fix", 2001, 3000, "initramfs")       # a small move of the same step: due once quiet for a second
    (delay, due), = timers
    assert delay == pytest.approx(STATUS_QUIET - 0.5)
    clock.now += delay
    due()
    assert len(sent) == 3 and "66.70%" in sent[-1]


def test_the_worker_sends_a_held_report_within_the_minimum_gap_with_its_real_timer():
    """The default timer (a thread): the held report reaches systemd without another call."""
    import time
    sent: list[str] = []
    status = StatusReporter(send=sent.append)
    status("fix", 1, 3, "fstab")
    status("fix", 2, 3, "initramfs")
    deadline = time.monotonic() + 5
    while len(sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [line.split(" ")[-1] for line in sent] == ["fstab", "initramfs"]
