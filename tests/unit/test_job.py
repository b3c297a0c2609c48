"""The job record's derived views: where it writes."""

import pytest

from h2kd.model.job import Job
from h2kd.model.states import JobState as S


def _job(operation: str = "convert", output_path: str | None = None, result: dict | None = None,
         state: S = S.QUEUED) -> Job:
    spec = {"job_id": "web01", "operation": operation, "image": {"path": "/srv/vm/web01.vmdk"},
            "artifacts": {"output_path": output_path}}
    return Job(id="web01", spec=spec, operation=operation, owner=1000, result=result or {}, state=state)


@pytest.fixture
def first_root(monkeypatch):
    monkeypatch.setattr(Job, "default_output_root", "/var/lib/h2kd/output/")


def test_an_output_path_given_is_where_the_job_writes(first_root):
    assert _job(output_path="/srv/out/web01.qcow2").output_place == "/srv/out/web01.qcow2"


def test_without_an_output_path_a_convert_writes_into_a_directory_named_after_it(first_root):
    assert _job().output_place == "/var/lib/h2kd/output/web01/"
    # Once written, the directory its result names (an earlier h2kd may have had another first root).
    done = _job(result={"outputs": {"disks": [{"path": "/old/root/web01/web01.qcow2"}]}}, state=S.COMPLETED)
    assert done.output_place == "/old/root/web01/"


@pytest.mark.parametrize("state", [S.FAILED, S.CANCELLED])
def test_a_job_that_ended_without_writing_names_no_directory(first_root, state):
    """A failed or cancelled attempt removes what it made: no directory to point to."""
    assert _job(state=state).output_place == ""
    assert _job(state=state, output_path="/srv/out/web01.qcow2").output_place == "/srv/out/web01.qcow2"


def test_a_result_naming_a_relative_path_gives_no_directory(first_root):
    assert _job(result={"outputs": {"disks": [{"path": "web01.qcow2"}]}}, state=S.COMPLETED).output_place == ""


def test_an_operation_that_writes_nothing_has_no_output_place(first_root):
    assert _job(operation="inspect").output_place == ""


def test_without_a_known_first_root_nothing_is_made_up(monkeypatch):
    monkeypatch.setattr(Job, "default_output_root", "")
    assert _job().output_place == ""
