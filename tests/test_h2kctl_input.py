"""h2kctl's bad input (job files, options, sources) is a usage error said in one line, before any bus call; text
an image brings is shown as it is, without line breaks of its own.

The bus address points at a socket that does not exist: a check that came after connecting would
exit 6 (unreachable) instead of 2.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

H2KCTL = str(Path(sys.executable).parent / "h2kctl")
TOO_BIG = 2**63   # one more than D-Bus's widest signed integer (x)


def run_h2kctl(tmp_path: Path, *args: str | bytes, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
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


def test_list_owner_no_such_user(tmp_path):
    """h2kctl(1): a user that does not exist is bad input (exit 2), found before h2kd is asked."""
    usage_error(run_h2kctl(tmp_path, "list", "--owner", "no-such-user-h2k"), "--owner", "no such user",
                "no-such-user-h2k")



@pytest.mark.parametrize("content, field, problem", [
    ({"operation": "convert", "image": "/x.vmdk"}, "field image:", "must be an object"),
    ({"operation": "convert", "image": {"path": 5}}, "field image.path:", "must be a string"),
    ({"operation": "convert", "image": {"path": "/x\0y.vmdk"}}, "field image.path:", "NUL"),
    ({"operation": "convert", "audit": {"ticket": "T-\0"}}, "field audit.ticket:", "NUL"),
])
def test_job_file_field_of_the_wrong_kind(tmp_path, content, field, problem):
    path = job_file(tmp_path, content)
    usage_error(run_h2kctl(tmp_path, "submit", "--file", path), path, field, problem)


@pytest.mark.parametrize("args, named", [
    (["submit", b"/tmp/disk-\xff.vmdk"], "SOURCE"),
    (["submit", "/etc/hostname", "-o", b"/var/lib/h2kd/output/\xfe.qcow2"], "--output"),
    (["submit", "/etc/hostname", "--ticket", b"caf\xe9"], "--ticket"),
    (["status", b"job-\xff"], "JOB"),
    (["cancel", "job-1", b"job-\xff"], "JOB"),
])
def test_argument_that_is_not_utf8(tmp_path, args, named):
    """D-Bus carries only UTF-8 text: such an argument (a file name from another system) cannot be sent."""
    line = usage_error(run_h2kctl(tmp_path, *args), named, "not valid UTF-8")
    assert "\\x" in line      # the bytes shown as escapes


def test_symlinked_source_says_it_is_a_link_and_names_its_target(tmp_path):
    """h2kd takes no symbolic link as a source (it could be turned elsewhere after the check): h2kctl says so
    instead of "Too many levels of symbolic links", and names the file to give instead."""
    image = tmp_path / "disk.vmdk"
    image.write_bytes(b"\0" * 512)
    link = tmp_path / "link.vmdk"
    link.symlink_to(image)
    for result in (run_h2kctl(tmp_path, "submit", str(link)),
                   run_h2kctl(tmp_path, "submit", "--file", job_file(tmp_path, {"image": {"path": str(link)}}))):
        assert result.returncode == 1, result
        assert result.stderr.strip().splitlines() == [
            f"h2kctl: refusing {link}: it is a symbolic link, and h2kd takes no symbolic link as a source; "
            f"give the path of the image itself: {image}"], result.stderr


@pytest.mark.parametrize("args, named", [
    (["--verify", "--operation", "inspect"], "--verify applies to --operation convert only, not inspect"),
    (["--domain-xml", "--operation", "validate"], "--domain-xml applies to --operation convert only"),
    (["--no-sync", "--operation", "inspect"], "--no-sync applies to --operation convert only"),
    (["--compare-with", "/x.img"], "--compare-with applies to --operation validate only, not convert"),
])
def test_a_flag_the_operation_would_ignore_is_refused(tmp_path, args, named):
    source = tmp_path / "disk.vmdk"
    source.write_bytes(b"\0" * 512)
    usage_error(run_h2kctl(tmp_path, "submit", str(source), *args), named)


def test_flags_that_shape_a_spec_are_refused_with_a_job_file(tmp_path):
    path = job_file(tmp_path, {"operation": "convert", "image": {"path": str(tmp_path / "disk.vmdk")}})
    usage_error(run_h2kctl(tmp_path, "submit", "--file", path, "--verify", "--priority", "7"),
                "--verify, --priority: not with --file")


@pytest.mark.parametrize("content, problem", [
    (b'{"operation": "convert", "image": ', "is not valid JSON"),
    (b'[{"operation": "convert"}]', "a job file must hold one object"),
    (b'"convert"', "a job file must hold one object"),
])
def test_job_file_that_is_not_one_object_is_bad_input(tmp_path, content, problem):
    path = job_file(tmp_path, content)
    usage_error(run_h2kctl(tmp_path, "submit", "--file", path), path, problem)


def test_wait_with_no_queue_is_refused_before_anything_is_sent(tmp_path):
    """A held job never starts: --wait would store one and then fail, leaving it behind."""
    source = tmp_path / "disk.vmdk"
    source.write_bytes(b"\0" * 512)
    line = usage_error(run_h2kctl(tmp_path, "submit", "--no-queue", "--wait", str(source)), "--wait", "--no-queue")
    assert "h2kctl start --wait" in line


def test_a_job_file_on_standard_input_is_named_so(tmp_path):
    line = usage_error(run_h2kctl(tmp_path, "submit", "--file", "-", stdin=b'{"operation": '), "standard input",
                       "is not valid JSON")
    assert "- is" not in line


@pytest.mark.parametrize("operation", ["inspect", "convert"])
def test_operation_is_refused_with_a_job_file(tmp_path, operation):
    """The job file says what to do: --operation beside it would be silently ignored."""
    path = job_file(tmp_path, {"operation": "convert", "image": {"path": str(tmp_path / "disk.vmdk")}})
    usage_error(run_h2kctl(tmp_path, "submit", "--file", path, "--operation", operation),
                "--operation: not with --file")


def test_line_breaks_in_a_reports_values_do_not_make_lines_of_their_own():
    """An image names its VM and disks (an OVF's Name): a line break there must not print as a line of the report,
    e.g. a made-up 'status: verified' under it."""
    from h2kctl.render import nested

    shown = io.StringIO()
    nested({"vm": {"name": "web01\n  status: verified", "disks\r\nx": ["a\nb"]}}, shown)
    assert shown.getvalue().splitlines() == ["vm:", "  name: web01\\n  status: verified", "  disks\\r\\nx:",
                                             "    - a\\nb"]


def test_a_directory_as_source_is_bad_input(tmp_path):
    """h2kctl(1): a source that is not a regular file exits 2, a directory like a FIFO."""
    usage_error(run_h2kctl(tmp_path, "submit", str(tmp_path)), str(tmp_path), "it is a directory")
