"""Job specs as h2kctl builds them: from command line flags or a JSON/YAML job file, with the source
image resolved to an absolute path and proven readable with the user's own rights."""

from __future__ import annotations

import errno
import json
import os
from argparse import Namespace
from typing import Any

from h2kctl.bus import shown, symlink_refusal, text_problem, to_vardict
from h2kctl.errors import CtlError, ExitCode
from h2kctl.render import user_name


def readable_source(path: str, what: str = "the source") -> str:
    """The absolute path of a source image the calling user can open read-only (else CtlError); `what` names
    where the path came from, for a path D-Bus cannot carry."""
    problem = text_problem(path)
    if problem:
        raise CtlError(f"{what} \"{shown(path)}\" {problem}; h2kd takes only UTF-8 paths without NUL bytes",
                       ExitCode.USAGE)
    absolute = os.path.abspath(os.path.expanduser(path))
    if os.path.islink(absolute):
        raise CtlError(symlink_refusal(absolute))
    try:
        fd = os.open(absolute, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        # Exit status 5 for a source the caller may not read, as when h2kd refuses it for them.
        denied = e.errno in (errno.EACCES, errno.EPERM)
        raise CtlError(f"cannot read {path}: {e.strerror}",
                       ExitCode.NOT_AUTHORIZED if denied else ExitCode.FAILURE) from None
    try:
        if os.path.isdir(absolute):
            raise CtlError(f"cannot read {path}: it is a directory", ExitCode.USAGE)
    finally:
        os.close(fd)
    return absolute


def load_job_file(path: str) -> dict[str, Any]:
    """A job spec from a JSON file, or a YAML file when PyYAML is installed ('-' reads stdin)."""
    where = "job file on standard input" if path == "-" else f"job file {path}"
    try:
        if path == "-":
            import sys
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise CtlError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CtlError(f"{where} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})",
                       ExitCode.USAGE) from None
    try:
        return _parse_job_file(path, where, text)
    except RecursionError:   # json, yaml and the a{sv} conversion all recurse once per level
        raise CtlError(f"{where} is nested too deeply", ExitCode.USAGE) from None


def _parse_job_file(path: str, where: str, text: str) -> dict[str, Any]:
    path = "standard input" if path == "-" else path    # as the messages below name it
    try:
        spec = json.loads(text)
    except ValueError as json_error:
        if path.endswith((".yaml", ".yml")) or not text.lstrip().startswith(("{", "[")):
            try:
                import yaml
            except ImportError:
                raise CtlError(f"{path} is not valid JSON ({json_error}); YAML job files need PyYAML",
                               ExitCode.USAGE) from None
            try:
                spec = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise CtlError(f"{path} is neither JSON nor YAML: {str(e).splitlines()[0]}", ExitCode.USAGE) from None
        else:
            raise CtlError(f"{path} is not valid JSON: {json_error}", ExitCode.USAGE) from None
    if not isinstance(spec, dict):
        raise CtlError(f"{path}: a job file must hold one object (a job spec)", ExitCode.USAGE)
    # Found now, not when the spec is sent: h2kd's answer could not name the file, dbus-fast's not the field.
    to_vardict(spec, where)
    image = spec.get("image")
    if image is not None and not isinstance(image, dict):
        raise CtlError(f'{where}: field image: must be an object, e.g. {{"path": "/srv/import/disk.vmdk"}}',
                       ExitCode.USAGE)
    if image is not None and image.get("path") is not None:
        if not isinstance(image["path"], str):
            raise CtlError(f"{where}: field image.path: must be a string (the source image's path)",
                           ExitCode.USAGE)
        image["path"] = readable_source(image["path"], f"{where}: field image.path:")
    return spec


def spec_from_args(args: Namespace, operation: str) -> dict[str, Any]:
    """A job spec from the flags of `submit` (or `inspect`): only what was given; h2kd fills defaults."""
    spec: dict[str, Any] = {"operation": operation,
                            "image": {"path": readable_source(args.source, "SOURCE"),
                                      "format": getattr(args, "source_format", None)}}
    if getattr(args, "id", None):
        spec["job_id"] = args.id
    parameters: dict[str, Any] = {}
    if operation == "convert":
        if args.format:
            parameters["output_format"] = args.format
        if args.compress is not None:
            parameters["compress"] = True
            if args.compress:
                parameters["compression_type"] = args.compress
        if getattr(args, "sync", True) is False:
            parameters["sync"] = False
        if getattr(args, "verify", False):
            parameters["verify"] = True
        if getattr(args, "domain_xml", False):
            parameters["domain_xml"] = True
    if operation == "validate" and getattr(args, "compare_with", None):
        parameters["compare_with"] = readable_source(args.compare_with, "--compare-with")
    if parameters:
        spec["parameters"] = parameters
    policy = {"priority": getattr(args, "priority", None), "retry_count": getattr(args, "retries", None),
              "timeout_seconds": getattr(args, "timeout", None)}
    if any(v is not None for v in policy.values()):
        spec["execution_policy"] = policy
    output = getattr(args, "output", None)
    if output or getattr(args, "overwrite", False):
        spec["artifacts"] = {"output_path": os.path.abspath(output) if output else None,
                             "overwrite": True if getattr(args, "overwrite", False) else None}
    spec["audit"] = {"requested_by": user_name(os.getuid()), "ticket": getattr(args, "ticket", None),
                     "tags": list(getattr(args, "tag", None) or []) or None}
    return spec
