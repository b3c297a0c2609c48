"""h2kd's main program: wires config, store, manager, systemd runner, D-Bus service and observability, then serves."""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from dbus_fast import RequestNameReply

from h2kd import BUS_NAME, __version__
from h2kd.config import Config, load_config
from h2kd.errors import StoreFailed
from h2kd.manager.manager import JobManager
from h2kd.manager.validation import HostChecks
from h2kd.model.job import Job
from h2kd.runner.unit import UNIT_PREFIX
from h2kd.store import JobStore, StoreUnusable

log = logging.getLogger("h2kd")

# h2kd holds every kept job's record in memory (up to retention_max_count, 10,000 by default). At Python's
# default thresholds (700, 10, 10) the collector ran every 700 net allocations and, every hundredth time,
# walked all those records: with 5,000-10,000 jobs, 0.7-1.3 s of collection for 6,000 submissions (bench/,
# timed with gc.callbacks), 10-15% of the daemon's CPU. Young collections 28 times rarer cut that to
# under 0.1 s; cyclic garbage waits longer before it is freed, a few megabytes at most.
GC_THRESHOLDS = (20_000, 10, 10)
# EX_CONFIG: settings h2kd cannot work with. h2kd.service does not restart on it (RestartPreventExitStatus=):
# the same settings would fail the same way.
EXIT_BAD_SETTINGS = 78
# EX_DATAERR: the job store is damaged, lost, or another version's. Not restarted either: a restart would find the
# same store ten seconds in, again and again, each time dropping the bus name and the jobs' followers.
EXIT_STORE_DAMAGED = 65


# The state directory and the output roots, when h2kd makes them, may be passed through by everyone: a
# submitter reaches the directory made for their job in the first output root, which is theirs, and nothing
# else (the store and runs/ are root's alone by their own modes). A directory an administrator made keeps its mode.
PASSABLE = 0o711


class BadSettings(Exception):
    """The settings name something h2kd cannot use (an output root it cannot create, ...)."""


LOCK_NAME = "h2kd.lock"


def hold_state_directory(config: Config) -> int | None:
    """Take the state directory for this h2kd: an exclusive lock, held until the process ends (however it
    ends), with our pid in the file for whoever finds it taken. The pid of the h2kd that holds it instead, or
    0 if that pid is unknown; None once it is ours.

    Two h2kd on one store would both start units and write events under the same sequence numbers: a second
    one (an administrator trying `h2kd --debug` while the service runs) must end before it opens the store
    or talks to systemd, not when it finds the bus name taken."""
    fd = os.open(config.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        # A POSIX lock, not flock(): children h2kd forks (a check made as its caller, which may hang) do not
        # inherit it, so none can keep the next h2kd from starting after this one was killed.
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        return int(holder) if holder.isdigit() else 0
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return None         # fd stays open, and the lock with it, for as long as this process lives


def prepare_directories(config: Config) -> None:
    for directory, mode in ((config.state_dir, PASSABLE), (config.runs_dir, 0o700),
                            *((root, PASSABLE) for root in config.output_roots)):
        try:
            missing = [d for d in (directory, *directory.parents) if not os.path.lexists(d)]
            for made in reversed(missing):   # each with its mode, whatever the umask (the service's is 0027)
                made.mkdir(exist_ok=True)
                os.chmod(made, mode if made == directory else PASSABLE)
        except OSError as e:
            raise BadSettings(f"cannot create {directory}: {e.strerror} (under h2kd.service, a directory outside "
                              f"/var/lib/h2kd needs ReadWritePaths= in a drop-in)") from None
        # Under ProtectSystem=strict an existing directory outside /var/lib/h2kd is read-only for h2kd: it would
        # start, and then refuse every output there with a mere "not writable".
        if not os.access(directory, os.W_OK):
            raise BadSettings(f"{directory} is not writable by h2kd ({_why_not_writable(directory)}); under "
                              f"h2kd.service, add a drop-in (systemctl edit h2kd.service) with [Service] "
                              f"ReadWritePaths={directory}")


def check_output_group(config: Config) -> None:
    """output_group must name a group this host knows: otherwise every job would fail as its unit is made."""
    if config.output_group:
        import grp
        try:
            grp.getgrnam(config.output_group)
        except KeyError:
            raise BadSettings(f"output_group {config.output_group!r} names no group of this host") from None


def _why_not_writable(directory: Path) -> str:
    try:
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError as e:
        return e.strerror or str(e)
    return "a read-only file system" if read_only else "permission denied"


async def serve(config: Config) -> int:
    gc.set_threshold(*GC_THRESHOLDS)
    from h2kd.bus import BusService, connect_bus
    from h2kd.bus.auth import Authority
    from h2kd.observability.health import StatusLine, Watchdog, notify_ready, notify_stopping
    from h2kd.observability.journal import JournalLog
    from h2kd.observability.metrics import HEALTH_SAMPLE_SECONDS, Metrics, start_http
    from h2kd.runner import SystemdRunner

    # Before anything else: a signal that comes while h2kd starts (its name may already be on the bus)
    # must find the handlers in place, not the default action that ends the process.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP would end h2kd, which systemd takes for a clean exit and does not restart.
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
        "SIGHUP ignored: h2kd reads its settings only when it starts; restart it to apply changes "
        "(running conversions go on and are picked up again)"))
    prepare_directories(config)
    check_output_group(config)
    holder = hold_state_directory(config)
    if holder is not None:
        log.error("another h2kd%s is using %s; h2kd ends without touching it", f" (pid {holder})" if holder else "",
                  config.state_dir)
        return 1
    Job.default_output_root = str(next(iter(config.output_roots), ""))
    store_lost_its_disk = asyncio.Event()

    def end_for_the_store() -> None:
        log.critical("a write to the job store %s could not reach the disk: h2kd ends, so that it starts again "
                     "from what the disk holds (systemd restarts it)", config.store_path)
        store_lost_its_disk.set()
        stop.set()

    store_damage: list[str] = []

    def end_for_damage(found: str) -> None:
        log.critical("the job store %s is damaged (SQLite's check found: %s): h2kd stops, and is not restarted. %s",
                     config.store_path, found, STORE_RECOVERY)
        store_damage.append(found)
        stop.set()

    try:
        _refuse_a_lost_store(config)
        store = JobStore(config.store_path, on_sync_lost=lambda: loop.call_soon_threadsafe(end_for_the_store),
                         on_damage=lambda found: loop.call_soon_threadsafe(end_for_damage, found))
    except StoreUnusable as e:
        log.critical("%s: h2kd cannot start, and is not restarted", e)
        return EXIT_STORE_DAMAGED
    except StoreFailed as e:
        return _store_unusable(e)
    manager = JobManager(config, store, host_validator=HostChecks(config))
    runner = SystemdRunner(config, manager)
    manager.attach_runner(runner)
    try:
        await runner.connect()
    except Exception as e:  # jobs wait until systemd is reachable; health says so
        log.error("cannot reach systemd's manager: %s; trying again", e)
        runner.keep_connecting()

    bus = await connect_bus(config.bus_address, negotiate_unix_fd=True)
    authority = Authority(bus, config.polkit_timeout_seconds, config.polkit_interactive_timeout_seconds)
    try:
        manager.load()
    except StoreFailed as e:
        await runner.close()
        bus.disconnect()
        store.close()
        return _store_unusable(e)
    service = BusService(bus, manager, authority, config)
    metrics = Metrics(manager.jobs)
    manager.add_listener(service)
    manager.add_listener(JournalLog())
    manager.add_listener(metrics)
    status_line = StatusLine(lambda: (manager.jobs_queued, manager.jobs_running, manager.paused),
                             blocked=lambda: None if runner.reachable else "systemd's manager does not answer, "
                                                                           "no job starts")
    manager.add_listener(status_line)
    await service.export()
    await manager.start()
    reply = await bus.request_name(BUS_NAME)
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        log.error("the bus name %s is taken (%s); is another h2kd running?", BUS_NAME, reply)
        return 1
    try:
        metrics_server = start_http(metrics, config.metrics_address, config.metrics_port)
    except OSError as e:
        # The port is any user's to take first: that must not keep the conversions down (nor restart h2kd in a
        # loop). Metrics are missing until h2kd starts again with the port free.
        log.error("cannot serve metrics on %s port %d: %s; h2kd runs without them (metrics_port)",
                  config.metrics_address, config.metrics_port, e.strerror or e)
        metrics_server = None

    async def sample_health() -> None:
        while True:
            try:
                metrics.health_sampled(manager.health(), manager.paused, manager.oldest_queued_since())
                status_line.send()
            except Exception:   # the next look may go better; the daemon goes on either way
                log.exception("could not sample h2kd's health for its metrics and status")
            await asyncio.sleep(HEALTH_SAMPLE_SECONDS)
    sampling = asyncio.ensure_future(sample_health())
    watchdog = Watchdog(manager.health, on_problem=status_line.set_problem)
    watchdog.start()
    notify_ready(status_line.text())
    log.info("h2kd %s serving %s", __version__, BUS_NAME)

    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({disconnected, stopping}, return_when=asyncio.FIRST_COMPLETED)
    status_line.close()
    notify_stopping()
    watchdog.stop()
    sampling.cancel()
    await manager.stop()
    service.close()
    await runner.close()
    if metrics_server is not None:
        metrics_server.stop()
    if not disconnected.done():
        bus.disconnect()
    store.close()
    if store_damage:
        return EXIT_STORE_DAMAGED
    if store_lost_its_disk.is_set():
        return 1
    if disconnected.done() and not stopping.done():
        log.error("lost the bus connection")
        return 1
    return 0


STORE_RECOVERY = ("Keep the file aside for recovery (sqlite3's .recover) and restore a copy, or move it away to "
                  "start with no jobs; then start h2kd.")


def _refuse_a_lost_store(config: Config) -> None:
    """StoreUnusable if the store is an empty file while attempts' directories say jobs were stored: SQLite takes an
    empty file for a new store, and h2kd would start with no jobs, forget those jobs and remove their directories.
    (An empty file with a write-ahead log is a store whose first writes are all in the log.)"""
    store = config.store_path
    try:
        if store.stat().st_size > 0 or Path(f"{store}-wal").stat().st_size > 0:
            return
    except FileNotFoundError:
        pass
    if not store.exists():
        return
    try:
        attempts = [name for name in os.listdir(config.runs_dir) if name.startswith(UNIT_PREFIX)]
    except FileNotFoundError:
        return
    if attempts:
        raise StoreUnusable(f"the job store {store} is an empty file, while {config.runs_dir} holds "
                            f"{len(attempts)} attempts' directories: the store was lost (cut to nothing?)")


def _store_unusable(error: StoreFailed) -> int:
    log.critical("%s: h2kd cannot start. If SQLite says the file is damaged (\"malformed\", \"not a database\"): "
                 "%s Otherwise see the reason given (a full disk, permissions)", error, STORE_RECOVERY)
    return 1


class _PriorityPrefix(logging.Formatter):
    """Each line begins with its record's syslog priority ("<4>" for a warning), which journald reads from a
    service's stderr (sd-daemon(3)): `journalctl -u h2kd -p warning` then finds h2kd's warnings."""

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelno
        priority = 2 if level >= logging.CRITICAL else 3 if level >= logging.ERROR else \
            4 if level >= logging.WARNING else 6 if level >= logging.INFO else 7
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).split("\n"))


def _stderr_is_the_journal() -> bool:
    try:
        seen = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{seen.st_dev}:{seen.st_ino}"


def configure_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = _PriorityPrefix if _stderr_is_the_journal() else logging.Formatter
    handler.setFormatter(formatter("%(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="h2kd", description="VM disk conversion daemon (D-Bus: org.hyper2kvm.h2kd1)")
    parser.add_argument("--config", help="settings file (TOML, section [h2kd]); default /etc/h2kd/h2kd.conf")
    parser.add_argument("--version", action="version", version=f"h2kd {__version__}")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.debug)
    try:
        if args.config and not os.path.lexists(args.config):
            # Named on purpose: running on the defaults instead would hide a typing mistake.
            raise ValueError(f"cannot read {args.config}: no such file")
        config = load_config(Path(args.config) if args.config else None)
    except ValueError as e:   # a malformed file, an unknown setting, a value of the wrong kind
        log.error("bad settings: %s", e)
        return EXIT_BAD_SETTINGS
    try:
        return asyncio.run(serve(config))
    except BadSettings as e:
        log.error("bad settings: %s", e)
        return EXIT_BAD_SETTINGS


if __name__ == "__main__":
    sys.exit(main())
