"""Durable storage of jobs, their history and event logs."""

from h2kd.store.sqlite import JobStore, StoreUnusable

__all__ = ["JobStore", "StoreUnusable"]
