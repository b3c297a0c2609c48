"""The job spec of the Worker Job Protocol: its pydantic models, and parse_spec(), which turns any bad input into
InvalidSpec naming the first bad field in plain words.

Each operation has its own spec class (InspectJobSpec, ConvertJobSpec, ValidateJobSpec, OfflineFixJobSpec), so that its
`parameters` are checked by that operation's model; all of them are JobSpec. Build specs with parse_spec(),
not by instantiating the classes, so that the operation picks the class.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError,
                      model_validator)
from pydantic_core import PydanticCustomError

from h2kd.errors import InvalidSpec

OPERATIONS = ("inspect", "convert", "validate", "offline_fix")
IMAGE_FORMATS = ("vmdk", "vhd", "vhdx", "vdi", "qcow2", "raw", "ova")
# Requirement flags with a fixed meaning; a worker advertises them as booleans in its capabilities.
REQUIREMENT_FLAGS = ("nbd", "loop", "lvm", "dm", "qemu_img")

MAX_PATH = 4096
MAX_TEXT = 256
MAX_TAGS = 32
MAX_TAG = 64
MAX_REQUIREMENTS = 32
MAX_REQUIREMENT_LIST = 32
# A whole spec, as the JSON text h2kd stores and exports: the limits above count characters, and a spec near
# all of them at once, in 4-byte characters, would be ~300 KB held several times over per job. A usual
# spec is under 1 KiB.
MAX_SPEC_BYTES = 16 * 1024

# What a terminal or a page acts on rather than shows: C0 and C1 controls (a newline, an escape sequence), DEL,
# and the bidirectional overrides that reorder the rest of a line. Paths and the words of a spec are shown to
# every user (h2kctl, Cockpit, the journal): none of them may hold these.
_UNSHOWABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_UNSHOWABLE_SAID = "must not contain control characters (such as a newline) or bidirectional overrides"
JOB_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A job's systemd unit is named after its id, escaped as systemd-escape does: a "-" (and a leading ".") takes
# four characters (\x2d). A file name holds at most 255: the unit's run directory takes "h2k-job-" and
# "-<attempt>.service" (27) besides the id, and a record of held images named after it "@<nanoseconds>" (20).
MAX_ESCAPED_JOB_ID = 208
_CHECKSUM_RE = re.compile(r"sha256:[0-9a-fA-F]{64}")
_REQUIREMENT_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")   # field names and list indexes, printed as they are


def new_job_id() -> str:
    """A fresh job id: 32 hex digits, the milliseconds since 1970 (12) then 80 random bits (20), which tell apart
    the ids made in one millisecond. Ids made by h2kd sort in the order they were made, to the millisecond
    (unless the clock is set back), and so the store's indexes of job ids take new ones at their end instead
    of at random places: about a tenth less of the daemon's time per submission (bench/)."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


# ---------------------------------------------------------------- field types

def _fail(kind: str, message: str, **context: Any) -> PydanticCustomError:
    # The "h2k_" prefix tells explain_validation_error() that the message is already ours.
    return PydanticCustomError("h2k_" + kind, message, context or None)


def _check_job_id(value: str) -> str:
    if not JOB_ID_RE.fullmatch(value):
        raise _fail("job_id", "must be 1 to 64 letters, digits, dots, underscores or dashes")
    if value in (".", ".."):     # a job's output directory is named after its id
        raise _fail("job_id", "must name a directory of its own: not . or ..")
    if value.startswith("-"):   # `h2kctl list -q | xargs h2kctl remove` would pass it as an option
        raise _fail("job_id", "must not begin with a dash: command lines would take it for an option")
    if len(value) + 3 * value.count("-") + (3 if value.startswith(".") else 0) > MAX_ESCAPED_JOB_ID:
        raise _fail("job_id", "has too many dashes for the names of its systemd unit and of the files named after "
                    f"it, where each takes four characters (\\x2d) of the {MAX_ESCAPED_JOB_ID} they have for the id")
    return value


def _check_path(value: str) -> str:
    if _UNSHOWABLE.search(value):
        # Paths go into line-based records and logs; no one names a disk image with a newline.
        raise _fail("path", _UNSHOWABLE_SAID)
    if not value.startswith("/"):
        raise _fail("path", "must be an absolute path (starting with /)")
    return value


def _check_showable(value: str) -> str:
    if _UNSHOWABLE.search(value):
        raise _fail("text", _UNSHOWABLE_SAID)
    return value


def _check_checksum(value: str) -> str:
    if not _CHECKSUM_RE.fullmatch(value):
        raise _fail("checksum", "must be \"sha256:\" followed by 64 hexadecimal digits")
    return value.lower()


def _int_range(low: int, high: int) -> Any:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise _fail("range", "must be a whole number from {low} to {high}, not {value}",
                        low=low, high=high, value=value)
        return value
    return Annotated[int, AfterValidator(check)]


def _check_cluster_size(value: int) -> int:
    if not (512 <= value <= 2 * 1024 * 1024 and value & (value - 1) == 0):
        raise _fail("cluster_size", "must be a power of two from 512 to 2097152 (2 MiB), not {value}", value=value)
    return value


def _none_means_new_id(value: Any) -> Any:
    return new_job_id() if value is None or value == "" else value


def _empty_means_none(value: Any) -> Any:
    # D-Bus has no null: a client leaving an optional string unset sends "".
    return None if value == "" else value


Unset = BeforeValidator(_empty_means_none)


JobId = Annotated[str, BeforeValidator(_none_means_new_id), Field(min_length=1, max_length=64),
                  AfterValidator(_check_job_id)]
FilePath = Annotated[str, Field(min_length=1, max_length=MAX_PATH), AfterValidator(_check_path)]
ShortText = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(_check_showable)]
Tag = Annotated[str, Field(min_length=1, max_length=MAX_TAG), AfterValidator(_check_showable)]
ImageFormat = Literal["vmdk", "vhd", "vhdx", "vdi", "qcow2", "raw", "ova"]
Priority = _int_range(1, 10)
RetryCount = _int_range(0, 5)
TimeoutSeconds = _int_range(60, 86400)
Coroutines = _int_range(1, 16)
Checksum = Annotated[str, Field(max_length=80), AfterValidator(_check_checksum)]
OptionalPath = Annotated[FilePath | None, Unset]


class _Strict(BaseModel):
    """Every spec model: unknown keys are errors and values are not coerced ("5" is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ---------------------------------------------------------------- parts common to every operation

class ImageSpec(_Strict):
    path: FilePath
    format: Annotated[ImageFormat | None, Unset] = None          # None: probed
    checksum: Annotated[Checksum | None, Unset] = None


DEFAULT_PRIORITY = 5   # 1 is the most urgent; a submission more urgent than this needs the manage action


class ExecutionPolicy(_Strict):
    priority: Priority = DEFAULT_PRIORITY
    retry_count: RetryCount = 0
    timeout_seconds: TimeoutSeconds = 3600
    idempotent: bool = True


class Artifacts(_Strict):
    output_path: OptionalPath = None
    keep_intermediates: bool = False
    overwrite: bool = False


class Audit(_Strict):
    requested_by: ShortText = ""
    ticket: ShortText = ""
    tags: Annotated[list[Tag], Field(max_length=MAX_TAGS)] = []


def _check_requirements(value: dict[str, Any]) -> dict[str, Any]:
    """Requirements are open-ended (a worker may advertise anything), so their keys and values are checked here."""
    if len(value) > MAX_REQUIREMENTS:
        raise _fail("requirements", "must have at most {limit} entries", limit=MAX_REQUIREMENTS)
    for key, item in value.items():
        if not _REQUIREMENT_KEY_RE.fullmatch(key):
            raise _fail("requirement_key", "is not a valid requirement name (lower-case letters, digits and "
                        "underscores, starting with a letter, at most 64)", subfield=key[:64])
        problem = _requirement_problem(key, item)
        if problem:
            raise _fail("requirement", problem, subfield=key)
    return dict(value)


def _requirement_problem(key: str, item: Any) -> str | None:
    is_int = isinstance(item, int) and not isinstance(item, bool)
    if key in REQUIREMENT_FLAGS:
        return None if isinstance(item, bool) else "must be true or false"
    if key.startswith("min_"):
        return None if is_int and 0 <= item < 2**63 else "must be a whole number of at least 0"
    if key == "formats":
        if not isinstance(item, list) or not all(isinstance(f, str) and f in IMAGE_FORMATS for f in item):
            return "must be a list of image formats (" + ", ".join(IMAGE_FORMATS) + ")"
        return None
    if isinstance(item, bool) or (is_int and 0 <= item < 2**63):
        return None
    if isinstance(item, str):
        if _UNSHOWABLE.search(item):
            return _UNSHOWABLE_SAID     # the wait reason of a job no worker takes quotes it
        return None if len(item) <= MAX_TEXT else f"must be at most {MAX_TEXT} characters long"
    if isinstance(item, list):
        if len(item) <= MAX_REQUIREMENT_LIST and all(isinstance(s, str) and 0 < len(s) <= MAX_TAG
                                                     and not _UNSHOWABLE.search(s) for s in item):
            return None
        return (f"must be a list of at most {MAX_REQUIREMENT_LIST} names of at most {MAX_TAG} characters, "
                "without control characters")
    return "must be true or false, a whole number, a string or a list of strings"


Requirements = Annotated[dict[str, Any], AfterValidator(_check_requirements)]


# ---------------------------------------------------------------- per-operation parameters

class InspectParameters(_Strict):
    """inspect takes no parameters."""


class ConvertParameters(_Strict):
    output_format: Literal["qcow2", "raw"] = "qcow2"
    compress: bool = False
    compression_type: Annotated[Literal["zlib", "zstd"] | None, Unset] = None
    cluster_size: Annotated[int, AfterValidator(_check_cluster_size)] | None = None
    preallocation: Annotated[Literal["off", "metadata", "falloc", "full"] | None, Unset] = None
    sparse: bool = True
    coroutines: Coroutines | None = None
    domain_xml: bool = False   # also write a libvirt domain XML next to the disks
    verify: bool = False       # compare each output with its source before it gets its name (reads both again)
    offline_fix: bool = False              # fix the converted guest so it boots on KVM (see operations.offline_fix)
    remove_vmware_tools: bool = False      # with offline_fix: also remove VMware Tools from the guest
    # Like systemd-importd's --sync=: true writes each output out to disk (fsync) before it gets its name;
    # false skips every sync. The output still appears under its name only when complete (temporary name,
    # atomic rename), but a power loss or crash soon after may lose it or leave it truncated or with
    # holes, exactly as after a `qemu-img convert` by hand.
    sync: bool = True

    @model_validator(mode="after")
    def _combinations(self) -> ConvertParameters:
        # Combinations qemu-img would refuse, reported as the field that cannot apply.
        if self.output_format == "raw":
            if self.compress:
                raise _problem("compress", "needs output_format qcow2; raw images cannot be compressed")
            if self.cluster_size is not None:
                raise _problem("cluster_size", "applies only to output_format qcow2")
            if self.preallocation == "metadata":
                raise _problem("preallocation", "metadata preallocation needs output_format qcow2")
        if self.compression_type is not None and not self.compress:
            raise _problem("compression_type", "applies only when compress is true")
        if self.compress and self.preallocation not in (None, "off"):
            raise _problem("preallocation", "cannot be used with compress: a compressed image is written "
                                            "as it goes, never allocated ahead")
        if self.remove_vmware_tools and not self.offline_fix:
            raise _problem("remove_vmware_tools", "applies only when offline_fix is true")
        return self


class ValidateParameters(_Strict):
    compare_with: OptionalPath = None


class OfflineFixParameters(_Strict):
    """offline_fix repairs the Linux guest on image.path (raw or qcow2) in place."""

    dry_run: bool = False                  # report what would change, change nothing
    remove_vmware_tools: bool = False


def _problem(field: str, message: str) -> PydanticCustomError:
    return _fail("combination", message, subfield=field)


# ---------------------------------------------------------------- the spec

class JobSpec(_Strict):
    """Fields every operation shares. The concrete class is picked by `operation` in parse_spec()."""

    job_id: JobId = Field(default_factory=new_job_id)
    operation: str
    image: ImageSpec
    parameters: BaseModel
    execution_policy: ExecutionPolicy = Field(default_factory=ExecutionPolicy)
    capability_requirements: Requirements = Field(default_factory=dict)
    artifacts: Artifacts = Field(default_factory=Artifacts)
    audit: Audit = Field(default_factory=Audit)


class InspectJobSpec(JobSpec):
    operation: Literal["inspect"]
    parameters: InspectParameters = Field(default_factory=InspectParameters)


class ConvertJobSpec(JobSpec):
    operation: Literal["convert"]
    parameters: ConvertParameters = Field(default_factory=ConvertParameters)


class ValidateJobSpec(JobSpec):
    operation: Literal["validate"]
    parameters: ValidateParameters = Field(default_factory=ValidateParameters)


class OfflineFixJobSpec(JobSpec):
    operation: Literal["offline_fix"]
    parameters: OfflineFixParameters = Field(default_factory=OfflineFixParameters)


AnyJobSpec = Annotated[Union[InspectJobSpec, ConvertJobSpec, ValidateJobSpec, OfflineFixJobSpec],
                       Field(discriminator="operation")]
_SPEC_ADAPTER: TypeAdapter[JobSpec] = TypeAdapter(AnyJobSpec)


def parse_spec(data: Any) -> JobSpec:
    """Validate a submitted spec (JSON-like dict). Raises InvalidSpec(field, message) for the first bad field."""
    if not isinstance(data, dict):
        raise InvalidSpec("", "the job spec must be an object (a mapping of field names to values)")
    if data.get("job_id") in (None, ""):
        data = {**data, "job_id": new_job_id()}
    try:
        return _SPEC_ADAPTER.validate_python(data)
    except ValidationError as e:
        field, message = explain_validation_error(e, data)
        raise InvalidSpec(field, message) from None


def spec_to_json(spec: JobSpec) -> dict[str, Any]:
    """The spec as plain JSON-able data, every default filled in: what the store and the bus keep."""
    return spec.model_dump(mode="json")


def same_spec(a: JobSpec | dict[str, Any], b: JobSpec | dict[str, Any]) -> bool:
    """Whether two specs are the same job (for idempotent resubmission): equal in every field, key order aside.
    A dict is read as a spec first, so one stored before a field existed gets that field's default."""
    def normal(spec: JobSpec | dict[str, Any]) -> Any:
        if isinstance(spec, BaseModel):
            return spec_to_json(spec)
        try:
            return spec_to_json(parse_spec(spec))
        except InvalidSpec:     # stored under older, looser rules: compared as it is
            return spec
    return normal(a) == normal(b)


# ---------------------------------------------------------------- pydantic errors in plain words

_TYPE_WORDS = {
    "string_type": "must be a string",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "dict_type": "must be an object (a mapping of names to values)",
    "model_type": "must be an object (a mapping of names to values)",
    "model_attributes_type": "must be an object (a mapping of names to values)",
    "list_type": "must be a list",
    "none_required": "must be null",
}


def describe_value(value: Any) -> str:
    """A short description of a bad value, safe to show however big the value is."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= 40 else "a very large number"
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"a string of {len(value)} characters"
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a value of type {type(value).__name__}"


def _message_for(error: dict[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind.startswith("h2k_"):
        return error["msg"]
    if kind == "value_error":   # a ValueError raised by one of our validators: its text is meant for people
        return str(ctx.get("error", "")) or "has a value that is not allowed"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind in _TYPE_WORDS:
        return f"{_TYPE_WORDS[kind]}, not {describe_value(value)}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}, not {describe_value(value)}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}, not {describe_value(value)}"
    if kind in ("literal_error", "enum"):
        return f"must be one of {ctx.get('expected', 'the listed values')}, not {describe_value(value)}"
    if kind == "string_too_short" or (kind == "too_short" and isinstance(value, str)):
        return "must not be empty" if ctx.get("min_length") == 1 else \
            f"must be at least {ctx.get('min_length')} characters long"
    if kind == "string_too_long" or (kind == "too_long" and isinstance(value, str)):
        return f"must be at most {ctx.get('max_length')} characters long, not {_length(value)}"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} entries"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} entries"
    return "has a value that is not allowed"


def _length(value: Any) -> str:
    return f"{len(value)}" if isinstance(value, (str, list)) else "longer"


def explain_validation_error(error: ValidationError, data: Any = None) -> tuple[str, str]:
    """(dotted field, plain message) for the first problem pydantic found; never pydantic's own wording."""
    first = error.errors(include_url=False)[0]
    kind = first["type"]
    if kind == "union_tag_not_found":
        return "operation", "is required (one of " + ", ".join(OPERATIONS) + ")"
    if kind == "union_tag_invalid":
        got = data.get("operation") if isinstance(data, dict) else None
        return "operation", f"must be one of {', '.join(OPERATIONS)}, not {describe_value(got)}"
    loc = [str(part) for part in first["loc"]]
    # A discriminated union puts the chosen operation first in the location: it is not a field.
    if loc and loc[0] in OPERATIONS and isinstance(data, dict) and data.get("operation") == loc[0]:
        loc = loc[1:]
    loc = [part for part in loc if part != "[key]"]
    subfield = (first.get("ctx") or {}).get("subfield")
    if subfield:
        loc.append(str(subfield))
    message = _message_for(first)
    if kind == "extra_forbidden" and len(loc) >= 2 and loc[0] == "parameters" and isinstance(data, dict):
        message = f"is not a parameter of {data.get('operation')} jobs"
    return ".".join(_field_name(part) for part in loc), message


def _field_name(part: str) -> str:
    """A part of a field's path as it goes into an error: a name the caller made up is quoted, with control
    characters escaped, so it cannot break the message's line or pass for something else."""
    return part if _PLAIN_NAME.fullmatch(part) else json.dumps(part)
