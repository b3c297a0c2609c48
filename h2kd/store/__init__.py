"""Durable storage of jobs, their history and event logs."""

from h2kd.store.sqlite import JobStore

__all__ = ["JobStore"]
