"""Daemon settings: defaults for a production host, overridden by /etc/h2kd/h2kd.conf (TOML) and H2KD_* variables."""

from __future__ import annotations

import functools
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_CONFIG_FILE = Path("/etc/h2kd/h2kd.conf")
SLICE_WEIGHT = 50   # as systemd/h2k.slice: conversions are batch work and yield to interactive services


@dataclass
class Config:
    state_dir: Path = Path("/var/lib/h2kd")
    # Outputs may only be written below these directories.
    output_roots: list[Path] = field(default_factory=lambda: [Path("/var/lib/h2kd/output")])
    # Sources given by path must resolve below one of these (file descriptors are always allowed).
    source_roots: list[Path] = field(default_factory=lambda: [Path("/")])
    max_parallel_jobs: int = 2
    # Unfinished jobs (waiting, held with queue=false, retrying or running) h2kd takes: from everyone together,
    # and from any one user but root. A submission beyond either fails with QueueFull.
    max_queued_jobs: int = 100_000
    max_jobs_per_user: int = 1_000
    # Where to serve (None: the system bus) and where systemd's manager is (None: the system bus).
    bus_address: str | None = None
    systemd_bus_address: str | None = None
    slice: str = "h2k.slice"
    # The slice's CPU and I/O weights, set at every start when given. Unset, h2kd leaves an existing slice as
    # it is (h2k.slice's own 50, or what an administrator set with systemctl set-property) and creates a
    # missing one with SLICE_WEIGHT.
    cpu_weight: int | None = None
    io_weight: int | None = None
    # The command that runs inside each unit; the spec/result paths are appended.
    worker_command: list[str] = field(default_factory=lambda: ["/usr/bin/env", "h2k-worker"])
    worker_environment: dict[str, str] = field(default_factory=dict)
    # Finished jobs are kept this long, and at most this many (beyond it, those of whoever has the most go).
    retention_max_age_days: float = 30.0
    retention_max_count: int = 10_000
    heartbeat_timeout_seconds: float = 30.0
    retry_backoff_base_seconds: float = 5.0
    retry_backoff_max_seconds: float = 600.0
    # Outputs belong to the submitter; with output_group set, to that group instead of the submitter's own.
    output_group: str = ""
    # Octal, as chmod takes it: "0640" in h2kd.conf, H2KD_OUTPUT_MODE=0640. Permission bits only: the worker
    # applies it as root, unmasked, so setuid, setgid and sticky bits are refused (see _parse_mode).
    output_mode: int = 0o640
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9163            # 0 disables; not Cockpit's 9090
    polkit_timeout_seconds: float = 25.0
    # Checks that may show a password prompt wait as long as a client does (h2kctl: 300 s).
    polkit_interactive_timeout_seconds: float = 300.0
    property_coalesce_seconds: float = 0.1
    # Each job's qemu-img convert and compare kept on one CPU, jobs spread over the CPUs (h2kd.runner.placement);
    # false: the kernel places them as it does any program.
    pin_conversions: bool = True

    @property
    def store_path(self) -> Path:
        return self.state_dir / "h2kd.sqlite"

    @property
    def runs_dir(self) -> Path:
        """Per-attempt spec and result files, read by the worker and by reconciliation."""
        return self.state_dir / "runs"


def _coerce(kind: type | str, value: object) -> object:
    kind = str(kind)
    if "None" in kind and value in ("", None):
        return None
    if "list[Path]" in kind:
        items = value.split(":") if isinstance(value, str) else list(value)  # type: ignore[arg-type]
        return [Path(p) for p in items if p]
    if "list[str]" in kind:
        return value.split() if isinstance(value, str) else list(value)  # type: ignore[arg-type]
    if "dict" in kind:  # from the environment: "NAME=value NAME2=value2"
        if isinstance(value, str):
            return dict(item.split("=", 1) for item in value.split() if "=" in item)
        return dict(value)  # type: ignore[arg-type]
    if "Path" in kind:
        return Path(value)  # type: ignore[arg-type]
    if "int" in kind and "str" not in kind:
        return int(value)  # type: ignore[arg-type]
    if "float" in kind:
        return float(value)  # type: ignore[arg-type]
    return None if value in ("", None) else str(value)


_MODE_DIGITS = re.compile(r"(?:0[oO])?[0-7]+")


def _parse_mode(value: object) -> int:
    """A file mode written as octal digits, as chmod(1) takes them: "0640", "640" or "0o640".

    A TOML number is refused: the file cannot tell 0o640 from 416, and 440 written for 0o440 would read
    as 0o670, a mode nobody asked for."""
    if not isinstance(value, str):
        raise ValueError(f"write the mode as a string of octal digits, e.g. \"0640\", not {value!r}")
    if not _MODE_DIGITS.fullmatch(value):
        raise ValueError(f"{value!r} is not a mode in octal digits (e.g. 0640)")
    mode = int(value, 8)
    if mode > 0o777:
        raise ValueError(f"{value} is not within 0000..0777: outputs get permission bits only, never setuid, "
                         "setgid or sticky")
    return mode


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _parse_bool(value: object) -> bool:
    """A TOML true or false; from the environment, true/yes/on/1 or false/no/off/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{value!r} is neither true nor false")


# Settings whose text means something other than their type says.
_PARSERS = {"output_mode": _parse_mode, "pin_conversions": _parse_bool}

MAX_PARALLEL_JOBS = 256
# The values each number may take, (least, most) with None for no bound: outside them h2kd would start and then
# fail at every job (no job ever starting with 0 slots, a negative limit raising in the scheduler).
_BOUNDS: dict[str, tuple[float, float | None]] = {
    "max_parallel_jobs": (1, MAX_PARALLEL_JOBS), "max_queued_jobs": (1, None), "max_jobs_per_user": (1, None),
    "cpu_weight": (1, 10_000), "io_weight": (1, 10_000),          # systemd's CPUWeight= and IOWeight= ranges
    "retention_max_age_days": (0, None), "retention_max_count": (0, None),
    "heartbeat_timeout_seconds": (0.1, None), "retry_backoff_base_seconds": (0, None),
    "retry_backoff_max_seconds": (0, None), "metrics_port": (0, 65_535), "polkit_timeout_seconds": (0.1, None),
    "polkit_interactive_timeout_seconds": (0.1, None), "property_coalesce_seconds": (0, None),
}


def _check_bounds(name: str, value: object) -> None:
    least, most = _BOUNDS.get(name, (None, None))
    if least is None or value is None or not isinstance(value, (int, float)):
        return
    if value != value or value < least or (most is not None and value > most):   # NaN too
        raise ValueError(f"{value} is not within {least:g}..{'' if most is None else f'{most:g}'}")


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Defaults < config file < environment (H2KD_STATE_DIR, H2KD_OUTPUT_ROOTS=a:b, ...)."""
    environ = os.environ if environ is None else environ
    path = path or Path(environ.get("H2KD_CONFIG", DEFAULT_CONFIG_FILE))
    values: dict[str, object] = {}
    if path.exists():
        try:
            with path.open("rb") as f:
                section = tomllib.load(f).get("h2kd", {})
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: {e}") from None
        if not isinstance(section, dict):
            raise ValueError(f"{path}: h2kd must be a section ([h2kd]), not a value")
        values.update(section)
    for f in fields(Config):
        env_value = environ.get("H2KD_" + f.name.upper())
        if env_value is not None:
            values[f.name] = env_value
    config = Config()
    known = {f.name: f for f in fields(Config)}
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"unknown setting {name!r} in {path}")
        try:
            parse = _PARSERS.get(name) or functools.partial(_coerce, known[name].type)
            setattr(config, name, parse(value))
            _check_bounds(name, getattr(config, name))
        except (TypeError, ValueError) as e:
            raise ValueError(f"setting {name!r} ({path} or H2KD_{name.upper()}): {e}") from None
    if "output_roots" not in values:
        config.output_roots = [config.state_dir / "output"]
    return config
