"""h2kctl's bad input (job files, options) is a usage error said in one line, before any bus call.

The bus address points at a socket that does not exist: a check that came after connecting would
exit 6 (unreachable) instead of 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

H2KCTL = str(Path(sys.executable).parent / "h2kctl")
TOO_BIG = 2**63   # one more than D-Bus's widest signed integer (x)


def run_h2kctl(tmp_path: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path / 'no-such-socket'}",
           "LC_ALL": "C.UTF-8"}
    env.pop("H2KCTL_DEBUG", None)
    result = subprocess.run([H2KCTL, *args], env=env, input=stdin, capture_output=True, timeout=30)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                       result.stderr.decode(errors="replace"))


def usage_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one line of a usage error, checked to name `words` and nothing of Python's."""
    assert result.returncode == 2, f"rc={result.returncode}\nstdout:{result.stdout}\nstderr:{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("h2kctl: "), result.stderr
    for bad in ("Traceback", "unexpected error", "Error:", "SignatureBodyMismatch", "UnicodeDecode"):
        assert bad not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def job_file(tmp_path: Path, content: bytes | dict) -> str:
    path = tmp_path / "job.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return str(path)


def test_job_file_not_utf8(tmp_path):
    path = job_file(tmp_path, b'{"operation": "convert", "audit": {"ticket": "caf\xe9"}}')
    line = usage_error(run_h2kctl(tmp_path, "submit", "--file", path), path, "not UTF-8")
    assert "0xe9" in line


def test_job_file_on_stdin_not_utf8(tmp_path):
    usage_error(run_h2kctl(tmp_path, "submit", "--file", "-", stdin=b'{"x": "\xff"}'), "standard input",
                "not UTF-8")


@pytest.mark.parametrize("value", [TOO_BIG, -TOO_BIG - 1, 10**30])
def test_job_file_number_out_of_range(tmp_path, value):
    path = job_file(tmp_path, {"operation": "convert", "execution_policy": {"priority": value}})
    usage_error(run_h2kctl(tmp_path, "submit", "--file", path), path, "execution_policy.priority",
                "out of range")


def test_job_file_number_out_of_range_in_a_list(tmp_path):
    path = job_file(tmp_path, {"operation": "convert", "audit": {"tags": ["a", 1, TOO_BIG]}})
    usage_error(run_h2kctl(tmp_path, "submit", "--file", path), path, "audit.tags[2]", "out of range")


def test_job_file_null_in_a_list(tmp_path):
    path = job_file(tmp_path, {"operation": "convert", "audit": {"tags": ["a", None]}})
    usage_error(run_h2kctl(tmp_path, "submit", "--file", path), path, "audit.tags[1]", "null")


def test_job_file_nested_too_deeply(tmp_path):
    path = job_file(tmp_path, b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    usage_error(run_h2kctl(tmp_path, "submit", "--file", path), path, "nested too deeply")


@pytest.mark.parametrize("owner", ["99999999999999999999", str(2**32)])
def test_list_owner_out_of_range(tmp_path, owner):
    usage_error(run_h2kctl(tmp_path, "list", "--owner", owner), "--owner", owner, "out of range")

