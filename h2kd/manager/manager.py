"""JobManager: the core. Takes submissions, keeps jobs in the store, feeds the scheduler, drives runners and workers.

It knows nothing of D-Bus: the bus layer calls these methods and listens through JobListener.
CONTRACT (implemented in this file):

    m = JobManager(config, store, runner)         # runner may be None: jobs then wait ("no runner")
    m.add_listener(listener)
    await m.start(); await m.stop()
    # queries (sync, raise NoSuchJob)
    m.get(job_id) -> Job;  m.jobs -> list[Job] in submission order
    m.list_jobs(states=None, operation=None, owner=None, limit=0, offset=0) -> list[Job]
    m.events(job_id, since=0) -> list[Event];  m.history(job_id) -> list[dict]
    m.queue_stats() -> dict;  m.health() -> dict
    m.paused, m.max_parallel, m.jobs_queued, m.jobs_running
    m.workers -> list[WorkerInfo];  m.get_worker(worker_id) -> WorkerInfo
    # commands (raise InvalidSpec, AlreadyExists, QueueFull, InvalidState, NoSuchJob, InvalidArgument)
    m.submit(spec: dict, owner: int, queue: bool = True) -> tuple[Job, bool]   # bool: newly created
    await m.cancel(job_id)   # queued: cancelled at once; running: unit stopped, cancelled when gone
    m.retry(job_id); m.start_job(job_id); m.remove(job_id)
    m.set_priority(job_id, priority); m.pause(); m.resume(); m.set_max_parallel(n)
    # external workers (raise NoSuchWorker, InvalidState)
    m.register_worker(name, capabilities: dict, max_jobs: int, owner: int, bus_name: str) -> WorkerInfo
    m.heartbeat(worker_id); m.claim(worker_id) -> Job | None
    m.report_progress(worker_id, job_id, progress: float|None, bytes_done, bytes_total, phase, message)
    m.report_result(worker_id, job_id, success, outputs: dict, error_code, error_message, bytes_read, bytes_written)
    m.unregister_worker(worker_id); m.refresh_worker(worker_id)
    m.bus_name_lost(bus_name)   # a worker's connection vanished: treat its worker as stale
"""
