"""The interfaces h2kd exports are exactly the ones in dbus/*.xml (the API contract), read back by busctl and gdbus."""

from __future__ import annotations

import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from h2kd import BUS_NAME, MANAGER_PATH

CONTRACT_DIR = Path(__file__).resolve().parents[1] / "dbus"


def describe(interface: ET.Element) -> dict:
    """One interface as comparable data: methods with (name, type, direction) args, properties, signals."""
    def args(element: ET.Element, default_direction: str) -> list[tuple]:
        return [(a.get("name"), a.get("type"), a.get("direction", default_direction)) for a in element.findall("arg")]
    return {
        "methods": {m.get("name"): args(m, "in") for m in interface.findall("method")},
        # Signal arguments are always "out"; exporters may or may not say so.
        "signals": {s.get("name"): args(s, "out") for s in interface.findall("signal")},
        "properties": {p.get("name"): (p.get("type"), p.get("access"),
                                       {a.get("name"): a.get("value") for a in p.findall("annotation")})
                       for p in interface.findall("property")},
    }


def find_interface(xml_text: str, name: str) -> ET.Element:
    root = ET.fromstring(_strip_doctype(xml_text))
    for interface in root.iter("interface"):
        if interface.get("name") == name:
            return interface
    raise AssertionError(f"interface {name} not found in:\n{xml_text[:2000]}")


def _strip_doctype(text: str) -> str:
    """From the root <node> on: the DOCTYPE and comments before it are not part of the comparison."""
    start = text.find("<node")
    return text[start:] if start >= 0 else text


def contract(name: str) -> dict:
    return describe(find_interface((CONTRACT_DIR / f"{name}.xml").read_text(), name))


def busctl_xml(env: dict, path: str) -> str:
    return subprocess.run(["busctl", "--system", "introspect", "--xml-interface", BUS_NAME, path],
                          env=env, check=True, capture_output=True, text=True, timeout=30).stdout


def gdbus_xml(env: dict, path: str) -> str:
    return subprocess.run(["gdbus", "introspect", "--system", "--xml", "-d", BUS_NAME, "-o", path],
                          env=env, check=True, capture_output=True, text=True, timeout=30).stdout


def assert_same(exported: dict, expected: dict, name: str) -> None:
    for part in ("methods", "signals", "properties"):
        missing = sorted(set(expected[part]) - set(exported[part]))
        extra = sorted(set(exported[part]) - set(expected[part]))
        assert not missing, f"{name}: {part} in dbus/{name}.xml but not exported: {missing}"
        assert not extra, f"{name}: {part} exported but not in dbus/{name}.xml: {extra}"
        for member, detail in expected[part].items():
            assert exported[part][member] == detail, f"{name}.{member}: exported {exported[part][member]}, contract {detail}"
    assert exported == expected


@pytest.fixture(scope="module")
def job_path(stack_env: dict) -> str:
    """A job object to introspect: submitted held (queue=false) and cancelled afterwards."""
    job_id = "introspect-" + uuid.uuid4().hex[:8]
    out = subprocess.run(["busctl", "--system", "call", BUS_NAME, MANAGER_PATH, BUS_NAME + ".Manager", "SubmitJob",
                          "a{sv}a{sv}", "3", "job_id", "s", job_id, "operation", "s", "inspect",
                          "image", "v", "a{sv}", "1", "path", "s", "/etc/hostname", "1", "queue", "b", "false"],
                         env=stack_env, check=True, capture_output=True, text=True, timeout=30).stdout
    path = out.split()[-1].strip('"')
    yield path
    subprocess.run(["busctl", "--system", "call", BUS_NAME, MANAGER_PATH, BUS_NAME + ".Manager", "CancelJob",
                    "s", job_id], env=stack_env, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def stack_env(stack) -> dict:  # module scope: the job fixture above outlives single tests
    import os
    env = {**os.environ, **stack.env()}
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    return env


def test_manager_interface_matches_contract(stack_env):
    name = BUS_NAME + ".Manager"
    assert_same(describe(find_interface(busctl_xml(stack_env, MANAGER_PATH), name)), contract(name), name)


def test_manager_object_is_an_object_manager(stack_env):
    find_interface(gdbus_xml(stack_env, MANAGER_PATH), "org.freedesktop.DBus.ObjectManager")


def test_only_the_manager_object_says_it_is_an_object_manager(stack_env, job_path):
    """A client that believes introspection must not be sent to call GetManagedObjects where it fails."""
    for path in (job_path, MANAGER_PATH + "/worker/builtin", MANAGER_PATH + "/job", "/"):
        xml_text = gdbus_xml(stack_env, path)
        names = {i.get("name") for i in ET.fromstring(_strip_doctype(xml_text)).iter("interface")}
        assert "org.freedesktop.DBus.ObjectManager" not in names, (path, names)
        if path == job_path:
            assert {BUS_NAME + ".Job", "org.freedesktop.DBus.Properties"} <= names
        refused = subprocess.run(["gdbus", "call", "--system", "-d", BUS_NAME, "-o", path, "-m",
                                  "org.freedesktop.DBus.ObjectManager.GetManagedObjects"],
                                 env=stack_env, capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0 and "UnknownMethod" in refused.stderr, (path, refused.stderr)


def test_the_job_tree_lists_the_jobs_there_are_now(stack_env, job_path):
    """Introspect at the job tree names every job: also one submitted, and not one removed, since the last call
    (the answer is kept between calls, ~80 ms to make with 10,000 jobs)."""
    def children() -> set[str]:
        root = ET.fromstring(_strip_doctype(gdbus_xml(stack_env, MANAGER_PATH + "/job")))
        return {node.get("name") for node in root.findall("node")}

    def manager_call(*args: str) -> str:
        return subprocess.run(["busctl", "--system", "call", BUS_NAME, MANAGER_PATH, BUS_NAME + ".Manager", *args],
                              env=stack_env, check=True, capture_output=True, text=True, timeout=30).stdout

    assert job_path.rsplit("/", 1)[1] in children()
    job_id = "introspect-" + uuid.uuid4().hex[:8]
    added = manager_call("SubmitJob", "a{sv}a{sv}", "3", "job_id", "s", job_id, "operation", "s", "inspect",
                         "image", "v", "a{sv}", "1", "path", "s", "/etc/hostname", "1", "queue", "b", "false")
    added_path = added.split()[-1].strip('"')
    assert added_path.rsplit("/", 1)[1] in children()
    names = {i.get("name") for i in ET.fromstring(_strip_doctype(gdbus_xml(stack_env, added_path))).iter("interface")}
    assert BUS_NAME + ".Job" in names
    manager_call("CancelJob", "s", job_id)
    manager_call("RemoveJob", "s", job_id)
    assert added_path.rsplit("/", 1)[1] not in children()
    assert job_path.rsplit("/", 1)[1] in children()


def test_job_interface_matches_contract(stack_env, job_path):
    name = BUS_NAME + ".Job"
    assert_same(describe(find_interface(gdbus_xml(stack_env, job_path), name)), contract(name), name)


def test_worker_interface_matches_contract(stack_env):
    name = BUS_NAME + ".Worker"
    path = MANAGER_PATH + "/worker/builtin"
    assert_same(describe(find_interface(busctl_xml(stack_env, path), name)), contract(name), name)


def test_comparison_notices_a_difference():
    """The comparison itself must fail on a renamed argument, a changed access or a missing member."""
    name = BUS_NAME + ".Manager"
    expected = contract(name)
    changed = {k: dict(v) for k, v in expected.items()}
    changed["methods"]["GetJob"] = [("id", "s", "in"), ("job_path", "o", "out")]
    with pytest.raises(AssertionError):
        assert_same(changed, expected, name)
    changed = {k: dict(v) for k, v in expected.items()}
    changed["properties"]["Paused"] = ("b", "readwrite")
    with pytest.raises(AssertionError):
        assert_same(changed, expected, name)
    changed = {k: dict(v) for k, v in expected.items()}
    del changed["signals"]["JobNew"]
    with pytest.raises(AssertionError):
        assert_same(changed, expected, name)
