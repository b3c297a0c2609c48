"""The daemon's bus connection: dbus-fast's asyncio MessageBus with two documented adjustments.

1. Bursts. dbus-fast 5.2.0's asyncio writer (_MessageWriter.write_callback in
   dbus_fast/aio/message_bus.py) calls sock.send() on the non-blocking socket and treats any
   exception as fatal, BlockingIOError included: when a client pipelines a few thousand calls, the
   replies fill the socket buffer, send() raises EAGAIN and the whole connection is dropped. The
   writer already knows how to wait for writability after a short write, so we hand it a socket
   whose send() reports EAGAIN as "0 bytes written"; it then keeps the rest of the message queued
   and waits for the loop's writer callback. (Only send() is wrapped: we do not pass file
   descriptors, so the writer's sendmsg() path, which could lose descriptors this way, is unused.)

2. ObjectManager signals. export()/unexport() emit InterfacesAdded/InterfacesRemoved from the
   object's own path; the specification (and Cockpit) expect them from the ObjectManager's path.
   This bus emits none itself; h2kd.bus.service sends them from /org/hyper2kvm/h2kd1.

Use: `bus = await connect_bus(address)` (address None: the system bus), or adopt(bus) for a
MessageBus connected elsewhere.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from dbus_fast import BusType
from dbus_fast.aio import MessageBus

log = logging.getLogger("h2kd.bus")


class _EagainAsShortWrite:
    """Wraps the connection's socket for the writer only; everything but send() passes through."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def send(self, data: Any, *flags: int) -> int:
        try:
            return self._sock.send(data, *flags)
        except BlockingIOError:  # socket buffer full: nothing written, wait until writable
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class H2kMessageBus(MessageBus):
    """MessageBus that survives reply bursts and leaves ObjectManager signals to the service."""

    __slots__ = ()   # same layout as MessageBus, so adopt() can convert an existing connection

    async def connect(self) -> "H2kMessageBus":
        await super().connect()
        self.tolerate_full_socket()
        return self

    def tolerate_full_socket(self) -> None:
        writer = getattr(self, "_writer", None)
        if writer is None or not hasattr(writer, "sock"):
            log.warning("dbus-fast's writer has changed; EAGAIN tolerance is not applied")
            return
        if not isinstance(writer.sock, _EagainAsShortWrite):
            writer.sock = _EagainAsShortWrite(writer.sock)

    # Our objects are announced by h2kd.bus.service from the manager's path instead.
    def _emit_interface_added(self, path: str, interface: Any) -> None:
        return None

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        return None


async def connect_bus(address: str | None = None, negotiate_unix_fd: bool = False) -> H2kMessageBus:
    """Connect to `address`, or to the system bus when it is None."""
    if address:
        bus = H2kMessageBus(bus_address=address, negotiate_unix_fd=negotiate_unix_fd)
    else:
        bus = H2kMessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=negotiate_unix_fd)
    return await bus.connect()


def adopt(bus: MessageBus) -> H2kMessageBus:
    """Give an already connected dbus-fast MessageBus both adjustments (BusService.export does this).

    H2kMessageBus adds no state, so switching the object's class is safe.
    """
    if not isinstance(bus, H2kMessageBus):
        if type(bus) is not MessageBus:
            raise TypeError(f"cannot adjust a {type(bus).__name__}; use connect_bus()")
        bus.__class__ = H2kMessageBus
    bus.tolerate_full_socket()
    return bus  # type: ignore[return-value]
