"""Settings read from h2kd.conf and H2KD_* variables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from h2kd.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("written", ["0640", "640", "0o640", "0O640", "00640"])
def test_output_mode_is_octal_as_chmod_takes_it(tmp_path: Path, written: str) -> None:
    conf = tmp_path / "h2kd.conf"
    conf.write_text(f'[h2kd]\noutput_mode = "{written}"\n')
    assert load_config(conf, {}).output_mode == 0o640
    assert load_config(tmp_path / "none.conf", {"H2KD_OUTPUT_MODE": written}).output_mode == 0o640


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
    for config, environment in ((conf, {}), (tmp_path / "none.conf", {"H2KD_OUTPUT_MODE": "4750"})):
        ran = subprocess.run([sys.executable, "-m", "h2kd.daemon", "--config", str(config)], capture_output=True,
                             text=True, timeout=60, cwd=REPO,
                             env={"PATH": "/usr/bin:/bin", "H2KD_BUS_ADDRESS": "unix:path=/nonexistent",
                                  **environment})
        assert ran.returncode == 78, ran.stderr
        assert "bad settings: setting 'output_mode'" in ran.stderr and "Traceback" not in ran.stderr, ran.stderr
