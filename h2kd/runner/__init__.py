"""Runs job attempts as transient systemd units (SystemdRunner)."""

from h2kd.runner.systemd import SystemdRunner

__all__ = ["SystemdRunner"]
