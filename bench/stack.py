"""Booting the private stack for benchmarks and load tests, and changing h2kd's settings between runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from h2kd.sandbox.stack import Stack

CONFIG_NAME = "h2kd.conf"   # Stack points H2KD_CONFIG at BASE/h2kd.conf


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_settings(stack: Stack, settings: Mapping[str, Any]) -> None:
    """Write h2kd's settings file in the stack (read at the daemon's next start); empty removes it."""
    path = stack.base_dir / CONFIG_NAME
    if not settings:
        path.unlink(missing_ok=True)
        return
    path.write_text("[h2kd]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items()))


def restart_with(stack: Stack, settings: Mapping[str, Any] | None = None,
                 daemon_env: Mapping[str, str] | None = None) -> None:
    """Restart h2kd with these settings (None: keep the current file) and environment (None: keep)."""
    if settings is not None:
        write_settings(stack, settings)
    stack.restart_daemon(daemon_env)


def rate_limited(bytes_per_second: int) -> dict[str, Any]:
    """Settings that slow every conversion down to `bytes_per_second` (qemu-img -r, via H2K_RATE_LIMIT)."""
    return {"worker_environment": {"H2K_RATE_LIMIT": str(int(bytes_per_second))}}


def unit_run_dirs(stack: Stack) -> list[str]:
    """The attempt directories h2kd made (one per unit it started: h2k-job-<id>-<attempt>.service)."""
    runs = stack.state_dir / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


def daemon_log_text(stack: Stack) -> str:
    try:
        return Path(stack.daemon_log).read_text(errors="replace")
    except OSError:
        return ""
