"""Object paths: job and worker ids escaped as systemd's bus_path_encode() escapes a label."""

import pytest

from h2kd import JOB_PATH_PREFIX
from h2kd.bus.paths import escape_label, job_path, unescape_label


@pytest.mark.parametrize("label, escaped", [
    ("", "_"),
    ("abc", "abc"),
    ("Job42", "Job42"),
    ("42", "_342"),                       # a digit first is escaped, later ones are kept
    ("a-b.c_d", "a_2db_2ec_5fd"),
    ("0f3e9a", "_30f3e9a"),
    ("é", "_c3_a9"),                      # every byte of a non-ASCII character
    ("a b/c", "a_20b_2fc"),
])
def test_escape_label_as_systemd_does(label, escaped):
    assert escape_label(label) == escaped


@pytest.mark.parametrize("label", ["", "x", "1", "nightly-batch.7", "_", "__", "é-ü", "a_2db"])
def test_unescape_label_gives_the_label_back(label):
    assert unescape_label(escape_label(label)) == label


def test_a_job_path_is_the_prefix_and_the_escaped_id():
    assert job_path("db-01") == JOB_PATH_PREFIX + "db_2d01"
