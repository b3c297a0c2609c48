"""Observability: structured journal entries, Prometheus metrics, sd_notify readiness and the watchdog."""
