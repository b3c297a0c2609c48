"""What h2kctl shows for times and progress bars, whatever values h2kd sends."""

from __future__ import annotations

import io
import re

import pytest

from h2kctl.follow import ProgressView, SteadyProgress, bar_line
from h2kctl.render import iso_time, timestamp

MiB = 1024 * 1024
UINT64_MAX = 2**64 - 1
CAPPED = 2**63 - 1      # h2kd's cap on its times and counts


@pytest.mark.parametrize("usec", [CAPPED, UINT64_MAX, 253402300800 * 10**6, 10**18])
def test_a_time_no_calendar_holds_is_shown_as_not_known(usec):
    assert timestamp(usec) == timestamp(0) == "n/a"
    assert iso_time(usec) is iso_time(0) is None


def test_an_ordinary_time_is_shown_as_systemd_shows_it():
    assert re.fullmatch(r"\w{3} 2024-05-0[67] \d\d:\d\d:\d\d \S+", timestamp(1715076672 * 10**6))


def test_an_expected_end_far_ahead_shows_no_eta():
    props = {"Id": "far", "State": "progressing", "Phase": "converting", "Progress": 0.5, "ProgressKnown": True,
             "BytesDone": 50 * MiB, "BytesTotal": 100 * MiB, "Rate": 1, "ExpectedEndTime": CAPPED}
    assert "ETA" not in bar_line(props, 120)


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")


def job(progress: float, attempt: int = 1, state: str = "progressing", **more) -> dict:
    return {"Id": "j1", "State": state, "Phase": "converting", "Progress": progress, "ProgressKnown": True,
            "BytesDone": int(progress * 100 * MiB), "BytesTotal": 100 * MiB, "Rate": 0, "Attempt": attempt, **more}


def drawn(updates: list[dict]) -> list[str]:
    """The bars a terminal shows for these property updates, one per update."""
    out = io.StringIO()
    view = ProgressView(out, tty=True)
    for props in updates:
        view.update(props, force=True)
    return [frame for frame in out.getvalue().split("\r\x1b[K") if frame]


def shown_percent(frame: str) -> float:
    return float(re.search(r"(\d+\.\d)%", frame).group(1))


def test_the_bar_does_not_go_back_when_h2kd_restarted_serves_an_older_progress():
    # h2kd signalled 57.8 %, then restarted and serves what it saved at the last whole percent.
    frames = drawn([job(0.578), job(0.57), job(0.571), job(0.59)])
    assert [shown_percent(f) for f in frames] == [57.8, 57.8, 57.8, 59.0], frames
    assert "57.8 MiB/100.0 MiB" in frames[1], frames[1]


def test_a_new_attempt_or_a_return_to_the_queue_starts_the_bar_over():
    frames = drawn([job(0.6), job(0.05, attempt=2), job(0.4, attempt=2),
                    job(0.0, attempt=2, state="queued", ProgressKnown=False), job(0.02, attempt=2)])
    assert shown_percent(frames[0]) == 60.0
    assert shown_percent(frames[1]) == 5.0, frames[1]
    assert shown_percent(frames[2]) == 40.0
    assert shown_percent(frames[4]) == 2.0, frames[4]    # interrupted (a reboot) and queued again: starts over


def test_plain_lines_do_not_go_back_either():
    out = io.StringIO()
    view = ProgressView(out, tty=False)
    for props in (job(0.33), job(0.41), job(0.40, Phase="syncing"), job(0.52, Phase="syncing")):
        view.update(props)
    assert out.getvalue().splitlines() == ["Job j1: progressing (converting) 33% (33.0 MiB/100.0 MiB)",
                                           "Job j1: progressing (converting) 41% (41.0 MiB/100.0 MiB)",
                                           "Job j1: progressing (syncing) 41% (41.0 MiB/100.0 MiB)",
                                           "Job j1: progressing (syncing) 52% (52.0 MiB/100.0 MiB)"]


def test_each_jobs_bar_in_watch_keeps_its_highest_progress():
    steady = SteadyProgress()
    lines = [bar_line(steady(props), 100, label=True) for props in (job(0.25), job(0.2), job(0.3))]
    assert [shown_percent(line) for line in lines] == [25.0, 25.0, 30.0], lines
    assert lines[1].startswith("j1 progressing (converting) [")


def test_names_and_reasons_others_chose_stay_within_their_line_and_column():
    """A worker's name, a phase, a path a worker reports: a line break or a tab in them is shown escaped, so that
    they cannot pass for rows of a table, lines of a listing, or break a bar redrawn in place."""
    from h2kctl.follow import final_message
    from h2kctl.render import table

    shown = io.StringIO()
    table(["ID", "NAME", "STATE"], [["w1", "conv7\nw8     trusted-host", "idle"], ["w2", "a\tb", "busy"]], shown)
    lines = shown.getvalue().splitlines()
    assert len(lines) == 3 and lines[1].index("idle") == lines[2].index("busy"), lines
    assert "conv7\\nw8     trusted-host" in lines[1] and "a\\tb" in lines[2], lines
    line = bar_line({"Id": "j", "State": "progressing", "Phase": "convert\nJob x completed", "ProgressKnown": True,
                     "Progress": 0.5, "BytesDone": 1, "BytesTotal": 2}, 80, label=True)
    assert "\n" not in line and "convert\\nJob x completed" in line, line
    done = final_message({"Id": "j", "State": "completed", "Output": "/out/a\nJob k failed: NO_SPACE",
                          "Result": '{"outputs": {}}'})
    assert done == "Job j completed: /out/a\\nJob k failed: NO_SPACE", done


def test_text_a_c_locale_would_write_as_raw_bytes_is_escaped():
    """JSON may carry lone surrogates (a worker's capabilities, "\\udce2\\udc80\\udcae"); Python writes them in a C
    locale as the bytes they stand for, here U+202E, which reverses the line on the reader's terminal."""
    import io as _io

    from h2kctl.render import TerminalSafe
    raw = _io.BytesIO()
    c_locale = _io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape")
    stream = TerminalSafe(c_locale)
    stream.write("gpu \udce2\udc80\udcae tesla\n")
    stream.flush()
    assert raw.getvalue() == b"gpu \\udce2\\udc80\\udcae tesla\n", raw.getvalue()
