"""Job specs: what is accepted, the defaults filled in, and the InvalidSpec a person gets for bad input."""

from __future__ import annotations

import copy
import json

import pytest

from h2kd.errors import InvalidSpec
from h2kd.model.spec import (ConvertJobSpec, InspectJobSpec, JobSpec, ValidateJobSpec, parse_spec, same_spec,
                             spec_to_json)

CHECKSUM = "sha256:" + "ab" * 32


def convert(**extra):
    spec = {"operation": "convert", "image": {"path": "/src/disk.vmdk"},
            "artifacts": {"output_path": "/out/disk.qcow2"}}
    spec.update(extra)
    return spec


def test_convert_spec_with_every_field():
    spec = parse_spec({
        "job_id": "vm-42.disk_0",
        "operation": "convert",
        "image": {"path": "/src/disk.vmdk", "format": "vmdk", "checksum": CHECKSUM},
        "parameters": {"output_format": "qcow2", "compress": True, "compression_type": "zstd",
                       "cluster_size": 65536, "preallocation": "off", "sparse": False, "coroutines": 16},
        "execution_policy": {"priority": 1, "retry_count": 5, "timeout_seconds": 86400, "idempotent": False},
        "capability_requirements": {"qemu_img": True, "formats": ["vmdk"], "min_free_bytes": 10 * 2**30},
        "artifacts": {"output_path": "/out/disk.qcow2", "keep_intermediates": True, "overwrite": True},
        "audit": {"requested_by": "alice", "ticket": "OPS-1", "tags": ["migration", "wave-3"]},
    })
    assert isinstance(spec, ConvertJobSpec) and isinstance(spec, JobSpec)
    data = spec_to_json(spec)
    assert data["job_id"] == "vm-42.disk_0"
    assert data["parameters"]["compression_type"] == "zstd" and data["parameters"]["cluster_size"] == 65536
    assert data["execution_policy"] == {"priority": 1, "retry_count": 5, "timeout_seconds": 86400,
                                        "idempotent": False}
    assert data["capability_requirements"]["min_free_bytes"] == 10 * 2**30
    assert data["audit"]["tags"] == ["migration", "wave-3"]
    json.dumps(data)  # plain JSON all the way down
    assert spec_to_json(parse_spec(data)) == data  # the stored form parses back to itself


def test_defaults_are_filled_in():
    data = spec_to_json(parse_spec({"operation": "convert", "image": {"path": "/src/d.vmdk"}}))
    assert data["image"] == {"path": "/src/d.vmdk", "format": None, "checksum": None}
    assert data["parameters"] == {"output_format": "qcow2", "compress": False, "compression_type": None,
                                  "cluster_size": None, "preallocation": None, "sparse": True, "coroutines": None,
                                  "domain_xml": False, "verify": False, "offline_fix": False,
                                  "remove_vmware_tools": False, "sync": True}
    assert data["execution_policy"] == {"priority": 5, "retry_count": 0, "timeout_seconds": 3600,
                                        "idempotent": True}
    assert data["capability_requirements"] == {}
    assert data["artifacts"] == {"output_path": None, "keep_intermediates": False, "overwrite": False}
    assert data["audit"] == {"requested_by": "", "ticket": "", "tags": []}


def test_sync_defaults_to_true_and_false_is_kept():
    assert parse_spec(convert()).parameters.sync is True
    relaxed = spec_to_json(parse_spec(convert(parameters={"sync": False, "output_format": "raw"})))
    assert relaxed["parameters"]["sync"] is False
    assert spec_to_json(parse_spec(relaxed)) == relaxed      # stored and read back, it stays false
    # Spelling out the default is the same job; sync false is another one.
    assert same_spec(parse_spec(convert(job_id="j")), parse_spec(convert(job_id="j", parameters={"sync": True})))
    assert not same_spec(parse_spec(convert(job_id="j")), parse_spec(convert(job_id="j", parameters={"sync": False})))


def test_inspect_and_validate_specs():
    inspect = parse_spec({"operation": "inspect", "image": {"path": "/src/a.vhdx", "format": "vhdx"}})
    assert isinstance(inspect, InspectJobSpec) and spec_to_json(inspect)["parameters"] == {}
    validate = parse_spec({"operation": "validate", "image": {"path": "/out/a.qcow2"},
                           "parameters": {"compare_with": "/src/a.vmdk"}})
    assert isinstance(validate, ValidateJobSpec)
    assert spec_to_json(validate)["parameters"] == {"compare_with": "/src/a.vmdk"}
    assert spec_to_json(parse_spec({"operation": "validate", "image": {"path": "/x"}}))["parameters"] == {
        "compare_with": None}


@pytest.mark.parametrize("fmt", ["vmdk", "vhd", "vhdx", "vdi", "qcow2", "raw", "ova"])
def test_every_image_format_is_accepted(fmt):
    assert parse_spec(convert(image={"path": "/src/d", "format": fmt})).image.format == fmt


def test_job_id_is_generated_when_absent_null_or_empty():
    ids = {parse_spec(convert()).job_id for _ in range(50)}
    ids |= {parse_spec(convert(job_id=None)).job_id, parse_spec(convert(job_id="")).job_id}
    assert len(ids) == 52
    for job_id in ids:
        assert parse_spec(convert(job_id=job_id)).job_id == job_id  # a generated id is itself valid


@pytest.mark.parametrize("job_id", ["a" + "-" * 63, "a" * 15 + "-" * 49, "." + "-" * 60])
def test_a_job_id_too_long_for_its_units_name_once_escaped_is_refused(job_id):
    """Each "-" is four characters of the unit's name (\\x2d): 64 of them made a name systemd and the file system
    refuse, and the job failed only when it ran."""
    with pytest.raises(InvalidSpec, match="too many dashes"):
        parse_spec(convert(job_id=job_id))


@pytest.mark.parametrize("job_id", ["-help", "--no-block", "-"])
def test_a_job_id_that_begins_with_a_dash_is_refused(job_id):
    """`h2kctl list -q | xargs h2kctl remove` took such an id for an option (--help: nothing removed, status 0)."""
    with pytest.raises(InvalidSpec, match="must not begin with a dash"):
        parse_spec(convert(job_id=job_id))


@pytest.mark.parametrize("job_id", ["a" * 16 + "-" * 48, "." + "-" * 47 + "a" * 16, "a" * 64, "x-" * 32])
def test_every_job_id_accepted_names_a_unit_and_its_files_that_can_exist(job_id, tmp_path):
    import time

    from h2kd.runner.unit import unit_name

    parsed = parse_spec(convert(job_id=job_id)).job_id
    name = unit_name(parsed, 2**32 - 1)
    assert len(name) <= 255, name                    # systemd's limit on a unit's name
    (tmp_path / name).mkdir()                        # the attempt's run directory is named after its unit
    (tmp_path / f"{name}@{time.time_ns()}").touch()  # and so is a record of the images it holds


def test_generated_job_ids_sort_in_the_order_they_were_made():
    """Jobs h2kd names sort by age (ls of the default output root, a sort of their ids)."""
    import time

    made = []
    for _ in range(30):
        made.append(parse_spec(convert()).job_id)
        time.sleep(0.0015)          # past the next millisecond
    assert sorted(made) == made
    now_ms = time.time_ns() // 1_000_000
    assert all(len(job_id) == 32 and now_ms - 1000 < int(job_id[:12], 16) <= now_ms for job_id in made)
    assert len({parse_spec(convert()).job_id for _ in range(10_000)}) == 10_000   # many in each millisecond


def test_empty_optional_strings_mean_unset():
    # What a D-Bus client, which cannot send null, sends for "not given".
    data = spec_to_json(parse_spec({
        "operation": "convert", "image": {"path": "/d", "format": "", "checksum": ""},
        "parameters": {"preallocation": "", "compression_type": ""}, "artifacts": {"output_path": ""}}))
    assert data["image"] == {"path": "/d", "format": None, "checksum": None}
    assert data["parameters"]["preallocation"] is None and data["parameters"]["compression_type"] is None
    assert data["artifacts"]["output_path"] is None
    with pytest.raises(InvalidSpec) as info:
        parse_spec({"operation": "convert", "image": {"path": ""}})
    assert info.value.field == "image.path"


def test_checksum_is_kept_in_lower_case():
    spec = parse_spec(convert(image={"path": "/d", "checksum": "sha256:" + "AB" * 32}))
    assert spec.image.checksum == CHECKSUM


def test_parse_does_not_change_the_input():
    data = convert(execution_policy={"priority": 2})
    before = copy.deepcopy(data)
    parse_spec(data)
    assert data == before


def test_same_spec_ignores_key_order_only():
    a = convert(job_id="j1", audit={"tags": ["x"], "ticket": "T"})
    b = {k: a[k] for k in reversed(list(a))}
    b["audit"] = {"ticket": "T", "tags": ["x"]}
    assert same_spec(parse_spec(a), parse_spec(b))
    assert same_spec(parse_spec(a), spec_to_json(parse_spec(b)))
    # Spelling out a default is the same job; changing anything else is not.
    assert same_spec(parse_spec(a), parse_spec({**a, "execution_policy": {"priority": 5}}))
    assert not same_spec(parse_spec(a), parse_spec({**a, "execution_policy": {"priority": 4}}))
    assert not same_spec(parse_spec(a), parse_spec({**a, "audit": {"tags": ["x"], "ticket": "T2"}}))
    assert not same_spec(parse_spec(a), parse_spec({**a, "artifacts": {"output_path": "/out/other.qcow2"}}))


# ---------------------------------------------------------------- malformed input

HUGE = "x" * 1_000_000

BAD = [
    # (spec, field, words the message must contain)
    ({"image": {"path": "/d"}}, "operation", "required"),
    ({"operation": "teleport", "image": {"path": "/d"}}, "operation", "teleport"),
    ({"operation": 3, "image": {"path": "/d"}}, "operation", "must be one of"),
    ({"operation": "convert"}, "image", "required"),
    (convert(image="/d.vmdk"), "image", "object"),
    (convert(image={}), "image.path", "required"),
    (convert(image={"path": 7}), "image.path", "string"),
    (convert(image={"path": "relative/d.vmdk"}), "image.path", "absolute"),
    (convert(image={"path": "/d\n/other/.h2k-tmp-0-x.qcow2"}), "image.path", "control characters"),
    (convert(artifacts={"output_path": "/out/d\n/x"}), "artifacts.output_path", "control characters"),
    (convert(image={"path": "/" + HUGE}), "image.path", "4096"),
    (convert(image={"path": "/d", "format": "iso"}), "image.format", "'iso'"),
    (convert(image={"path": "/d", "checksum": "md5:abc"}), "image.checksum", "sha256"),
    (convert(image={"path": "/d", "checksum": "sha256:" + "a" * 63}), "image.checksum", "64 hexadecimal"),
    (convert(image={"path": "/d", "checksum": "sha256:" + "g" * 64}), "image.checksum", "64 hexadecimal"),
    (convert(execution_policy={"priority": 0}), "execution_policy.priority", "from 1 to 10"),
    (convert(execution_policy={"priority": 11}), "execution_policy.priority", "from 1 to 10"),
    (convert(execution_policy={"priority": "high"}), "execution_policy.priority", "whole number"),
    (convert(execution_policy={"priority": "5"}), "execution_policy.priority", "whole number"),
    (convert(execution_policy={"priority": 2.5}), "execution_policy.priority", "whole number"),
    (convert(execution_policy={"priority": True}), "execution_policy.priority", "whole number"),
    (convert(execution_policy={"retry_count": 6}), "execution_policy.retry_count", "from 0 to 5"),
    (convert(execution_policy={"retry_count": -1}), "execution_policy.retry_count", "from 0 to 5"),
    (convert(execution_policy={"timeout_seconds": 59}), "execution_policy.timeout_seconds", "60 to 86400"),
    (convert(execution_policy={"timeout_seconds": 86401}), "execution_policy.timeout_seconds", "60 to 86400"),
    (convert(execution_policy={"idempotent": "yes"}), "execution_policy.idempotent", "true or false"),
    (convert(execution_policy={"urgent": True}), "execution_policy.urgent", "not a known field"),
    (convert(execution_policy=[5]), "execution_policy", "object"),
    (convert(parameters={"output_format": "vmdk"}), "parameters.output_format", "'qcow2' or 'raw'"),
    (convert(parameters={"colour": "blue"}), "parameters.colour", "not a parameter of convert"),
    (convert(parameters={"compress": 1}), "parameters.compress", "true or false"),
    (convert(parameters={"compress": True, "compression_type": "lz4"}), "parameters.compression_type", "zstd"),
    (convert(parameters={"compression_type": "zstd"}), "parameters.compression_type", "compress"),
    (convert(parameters={"output_format": "raw", "compress": True}), "parameters.compress", "qcow2"),
    (convert(parameters={"compress": True, "preallocation": "metadata"}), "parameters.preallocation",
     "cannot be used with compress"),
    (convert(parameters={"compress": True, "preallocation": "full"}), "parameters.preallocation",
     "cannot be used with compress"),
    (convert(parameters={"cluster_size": 1000}), "parameters.cluster_size", "power of two"),
    (convert(parameters={"cluster_size": 4 * 2**20}), "parameters.cluster_size", "power of two"),
    (convert(parameters={"cluster_size": 256}), "parameters.cluster_size", "power of two"),
    (convert(parameters={"preallocation": "lazy"}), "parameters.preallocation", "'lazy'"),
    (convert(parameters={"coroutines": 17}), "parameters.coroutines", "from 1 to 16"),
    (convert(parameters={"sparse": None}), "parameters.sparse", "true or false"),
    (convert(parameters={"sync": "no"}), "parameters.sync", "true or false"),
    (convert(parameters={"sync": 0}), "parameters.sync", "true or false"),
    ({"operation": "validate", "image": {"path": "/d"}, "parameters": {"sync": False}},
     "parameters.sync", "not a parameter of validate"),
    (convert(artifacts={"sync": False}), "artifacts.sync", "not a known field"),
    ({"operation": "inspect", "image": {"path": "/d"}, "parameters": {"deep": True}},
     "parameters.deep", "not a parameter of inspect"),
    ({"operation": "validate", "image": {"path": "/d"}, "parameters": {"compare_with": "x"}},
     "parameters.compare_with", "absolute"),
    (convert(job_id="a b"), "job_id", "letters, digits"),
    (convert(job_id="x" * 65), "job_id", "64"),
    (convert(job_id="../etc"), "job_id", "letters, digits"),
    (convert(job_id=".."), "job_id", "not . or .."),
    (convert(job_id="."), "job_id", "not . or .."),
    (convert(job_id=HUGE), "job_id", "64"),
    (convert(job_id=12), "job_id", "string"),
    (convert(artifacts={"output_path": "out.qcow2"}), "artifacts.output_path", "absolute"),
    (convert(artifacts={"output_path": "/o\0x"}), "artifacts.output_path", "control characters"),
    # Shown to every user as they are: nothing a terminal or a page would act on (a C1 CSI, a right-to-left
    # override that turns "...exe.vmdk" around).
    (convert(artifacts={"output_path": "/o/\u202ekdmv.exe"}), "artifacts.output_path", "bidirectional overrides"),
    (convert(image={"path": "/d\x9b2J.vmdk"}), "image.path", "control characters"),
    (convert(audit={"ticket": "T-1\nPaused: yes"}), "audit.ticket", "control characters"),
    (convert(audit={"requested_by": "\u2067alice"}), "audit.requested_by", "bidirectional overrides"),
    (convert(audit={"tags": ["ok", "a\x1b[2J"]}), "audit.tags.1", "control characters"),
    (convert(capability_requirements={"site": "x\nPaused: yes"}), "capability_requirements.site",
     "control characters"),
    (convert(capability_requirements={"sites": ["a", "b\u202e"]}), "capability_requirements.sites",
     "without control characters"),
    (convert(artifacts={"overwrite": "no"}), "artifacts.overwrite", "true or false"),
    (convert(audit={"tags": "a,b"}), "audit.tags", "list"),
    (convert(audit={"tags": ["t"] * 33}), "audit.tags", "32"),
    (convert(audit={"tags": ["ok", "y" * 65]}), "audit.tags.1", "64"),
    (convert(audit={"tags": ["ok", ""]}), "audit.tags.1", "empty"),
    (convert(audit={"requested_by": HUGE}), "audit.requested_by", "256"),
    (convert(audit={"ticket": ["T-1"]}), "audit.ticket", "string"),
    (convert(capability_requirements=["nbd"]), "capability_requirements", "object"),
    (convert(capability_requirements={"nbd": "yes"}), "capability_requirements.nbd", "true or false"),
    (convert(capability_requirements={"formats": ["vmdk", "iso"]}), "capability_requirements.formats", "formats"),
    (convert(capability_requirements={"min_free_bytes": -1}), "capability_requirements.min_free_bytes", "least 0"),
    (convert(capability_requirements={"Bad Key": True}), 'capability_requirements."Bad Key"', "requirement name"),
    (convert(capability_requirements={"gpu": {"x": 1}}), "capability_requirements.gpu", "true or false"),
    (convert(capability_requirements={f"k{i}": True for i in range(33)}), "capability_requirements", "32"),
    (convert(surprise=1), "surprise", "not a known field"),
]


@pytest.mark.parametrize(("spec", "field", "words"), BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_malformed_spec_names_the_field(spec, field, words):
    with pytest.raises(InvalidSpec) as info:
        parse_spec(spec)
    error = info.value
    message = str(error)
    assert error.field == field
    assert error.dbus_name == "InvalidSpec"
    assert message.startswith(f"{field}: ")
    assert words in message
    # A person's sentence, not a library's dump: short, one line, no pydantic wording or URL.
    assert len(message) < 300 and "\n" not in message
    for noise in ("pydantic", "Traceback", "errors.pydantic.dev", "Input should", "type=", "input_value"):
        assert noise not in message


@pytest.mark.parametrize("data", [None, [], "convert", 42])
def test_spec_that_is_not_an_object(data):
    with pytest.raises(InvalidSpec) as info:
        parse_spec(data)
    assert "object" in str(info.value)


def test_first_bad_field_is_reported():
    with pytest.raises(InvalidSpec) as info:
        parse_spec(convert(image={"path": "/d", "format": "iso"}, execution_policy={"priority": 0}))
    assert info.value.field == "image.format"


# Anything a client can send over D-Bus or JSON: parse_spec either accepts it or raises InvalidSpec, never
# another exception.
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=True)
    | st.text(max_size=80) | st.sampled_from(["/a/b", "convert", "qcow2", "sha256:" + "0" * 64, "vmdk"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
_field_names = st.sampled_from(["job_id", "operation", "image", "parameters", "execution_policy",
                                "capability_requirements", "artifacts", "audit", "extra"])


@settings(max_examples=120, deadline=None)
@given(st.dictionaries(_field_names, _json_values, max_size=8),
       st.sampled_from(["inspect", "convert", "validate", None]))
@example(data={"parameters": {"\n": None}}, operation="inspect")   # a made-up name must not break the line
def test_any_input_is_accepted_or_invalid_spec(data, operation):
    if operation is not None:
        data.setdefault("operation", operation)
        data.setdefault("image", {"path": "/d"})
    try:
        spec = parse_spec(data)
    except InvalidSpec as e:
        assert "pydantic" not in str(e) and "\n" not in str(e)
    else:
        assert spec_to_json(parse_spec(spec_to_json(spec))) == spec_to_json(spec)
