"""Settings read from h2kd.conf and H2KD_* variables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from h2kd.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("written", ["0600", "600", "0o600", "0O600", "00600"])
def test_output_mode_is_octal_as_chmod_takes_it(tmp_path: Path, written: str) -> None:
    """0600, not the default 0640: a setting read wrongly, or not at all, would show."""
    conf = tmp_path / "h2kd.conf"
    conf.write_text(f'[h2kd]\noutput_mode = "{written}"\n')
    assert load_config(conf, {}).output_mode == 0o600
    assert load_config(tmp_path / "none.conf", {"H2KD_OUTPUT_MODE": written}).output_mode == 0o600


def test_output_mode_bounds(tmp_path: Path) -> None:
    assert load_config(tmp_path / "none.conf", {"H2KD_OUTPUT_MODE": "0"}).output_mode == 0
    assert load_config(tmp_path / "none.conf", {"H2KD_OUTPUT_MODE": "0777"}).output_mode == 0o777
    assert load_config(tmp_path / "none.conf", {}).output_mode == 0o640


@pytest.mark.parametrize("written, says", [
    ("4755", "not within 0000..0777"),         # setuid: the worker applies the mode as root, unmasked
    ("2750", "not within 0000..0777"),
    ("1777", "not within 0000..0777"),
    ("0o1200", "not within 0000..0777"),
    ("0640 ", "not a mode in octal digits"),
    ("0x1a0", "not a mode in octal digits"),
    ("rw-r-----", "not a mode in octal digits"),
    ("", "not a mode in octal digits"),
    ("-1", "not a mode in octal digits"),
])
def test_output_mode_outside_permission_bits_is_refused(tmp_path: Path, written: str, says: str) -> None:
    with pytest.raises(ValueError, match="output_mode") as raised:
        load_config(tmp_path / "none.conf", {"H2KD_OUTPUT_MODE": written})
    assert says in str(raised.value)


@pytest.mark.parametrize("value", ["640", "0o640", "416", "true"])
def test_output_mode_as_a_toml_number_is_refused(tmp_path: Path, value: str) -> None:
    """640 would be 0o1200 and 0o640 cannot be told from 416: only a string says which digits were meant."""
    conf = tmp_path / "h2kd.conf"
    conf.write_text(f"[h2kd]\noutput_mode = {value}\n")
    with pytest.raises(ValueError, match='output_mode.*string of octal digits, e.g. "0640"'):
        load_config(conf, {})


def test_a_bad_output_mode_stops_h2kd_with_the_bad_settings_status(tmp_path: Path) -> None:
    conf = tmp_path / "h2kd.conf"
    conf.write_text("[h2kd]\noutput_mode = 640\n")
    for arguments, environment in ((["--config", str(conf)], {}),
                                   ([], {"H2KD_CONFIG": str(tmp_path / "none.conf"), "H2KD_OUTPUT_MODE": "4750"})):
        ran = subprocess.run([sys.executable, "-m", "h2kd.daemon", *arguments], capture_output=True,
                             text=True, timeout=60, cwd=REPO,
                             env={"PATH": "/usr/bin:/bin", "H2KD_BUS_ADDRESS": "unix:path=/nonexistent",
                                  **environment})
        assert ran.returncode == 78, ran.stderr
        assert "bad settings: setting 'output_mode'" in ran.stderr and "Traceback" not in ran.stderr, ran.stderr


def run_h2kd(tmp_path: Path, *arguments: str, **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "h2kd.daemon", *arguments], capture_output=True, text=True,
                          timeout=60, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "H2KD_BUS_ADDRESS": "unix:path=/nonexistent",
                               "H2KD_SYSTEMD_BUS_ADDRESS": "unix:path=/nonexistent",
                               "H2KD_CONFIG": str(tmp_path / "none.conf"), "H2KD_STATE_DIR": str(tmp_path / "state"),
                               "H2KD_OUTPUT_ROOTS": str(tmp_path / "out"), **environment})


@pytest.mark.parametrize("setting, value, says", [
    ("MAX_PARALLEL_JOBS", "0", "none.conf or H2KD_MAX_PARALLEL_JOBS): 0 is not within 1..256"),
    ("MAX_PARALLEL_JOBS", "-1", "-1 is not within 1..256"),
    ("MAX_JOBS_PER_USER", "0", "0 is not within 1.."),
    ("HEARTBEAT_TIMEOUT_SECONDS", "-5", "-5.0 is not within 0.1.."),
    ("METRICS_PORT", "70000", "70000 is not within 0..65535"),
    ("CPU_WEIGHT", "0", "0 is not within 1..10000"),
])
def test_numbers_h2kd_cannot_work_with_stop_it_with_the_bad_settings_status(tmp_path: Path, setting: str,
                                                                            value: str, says: str) -> None:
    """Not a start after which no job ever runs (no slot), nor a traceback and a restart loop (a negative one)."""
    ran = run_h2kd(tmp_path, **{f"H2KD_{setting}": value})
    assert ran.returncode == 78, ran.stderr
    assert says in ran.stderr and "Traceback" not in ran.stderr, ran.stderr


def test_an_output_group_the_host_does_not_know_and_a_missing_config_file_stop_h2kd(tmp_path: Path) -> None:
    """Every job would fail when its unit is made (an unknown group), or h2kd would run on the defaults (a
    --config file mistyped): both are said at once, with the bad settings status."""
    ran = run_h2kd(tmp_path, H2KD_OUTPUT_GROUP="no-such-group-h2k")
    assert ran.returncode == 78, ran.stderr
    assert "output_group 'no-such-group-h2k' names no group of this host" in ran.stderr, ran.stderr
    missing = tmp_path / "h2kd.conf.typo"
    ran = run_h2kd(tmp_path, "--config", str(missing))
    assert ran.returncode == 78, ran.stderr
    assert f"bad settings: cannot read {missing}: no such file" in ran.stderr and "Traceback" not in ran.stderr


@pytest.mark.parametrize("written, pinned", [("false", False), ("no", False), ("0", False), ("Off", False),
                                             ("true", True), ("yes", True), ("1", True)])
def test_pinning_conversions_is_switched_by_a_toml_boolean_or_a_word_in_the_environment(
        tmp_path: Path, written: str, pinned: bool) -> None:
    assert load_config(tmp_path / "none.conf", {}).pin_conversions is True
    assert load_config(tmp_path / "none.conf", {"H2KD_PIN_CONVERSIONS": written}).pin_conversions is pinned
    conf = tmp_path / "h2kd.conf"
    conf.write_text(f"[h2kd]\npin_conversions = {str(pinned).lower()}\n")
    assert load_config(conf, {}).pin_conversions is pinned


@pytest.mark.parametrize("written", ['"sometimes"', "1", '""'])
def test_pinning_conversions_takes_nothing_but_true_or_false(tmp_path: Path, written: str) -> None:
    conf = tmp_path / "h2kd.conf"
    conf.write_text(f"[h2kd]\npin_conversions = {written}\n")
    with pytest.raises(ValueError, match="pin_conversions.*neither true nor false"):
        load_config(conf, {})
