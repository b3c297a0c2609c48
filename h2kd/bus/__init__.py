"""The thin D-Bus surface of h2kd (dbus-fast): Manager, Job and Worker objects over the JobManager.

    from h2kd.bus import BusService, connect_bus
    bus = await connect_bus(config.bus_address)           # None: the system bus
    service = BusService(bus, manager, authority, config)  # authority: h2kd.bus.auth.Authority
    await service.export()
    manager.add_listener(service)
    await bus.request_name(BUS_NAME)

Modules: connection (the bus, burst-safe, ObjectManager signals left to us), service (exports and
JobListener), manager_iface/job_iface/worker_iface (the interfaces of dbus/*.xml), actions (job
commands behind polkit), base (shared interface plumbing), call (who is calling), errors (named
D-Bus errors), variants (a{sv} conversion), paths (object paths), auth (polkit), premarshal
(GetManagedObjects replies from entries marshalled in advance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from h2kd.bus.connection import connect_bus
    from h2kd.bus.service import BusService

__all__ = ["BusService", "connect_bus"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: h2kctl imports h2kd.bus.variants, and must not load the daemon's modules with it.
    if name == "connect_bus":
        from h2kd.bus.connection import connect_bus
        return connect_bus
    if name == "BusService":
        from h2kd.bus.service import BusService
        return BusService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
