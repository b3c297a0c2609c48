"""Priority queue of waiting jobs and matching of jobs to workers."""

from h2kd.scheduler.queue import Scheduler, worker_can_run

__all__ = ["Scheduler", "worker_can_run"]
