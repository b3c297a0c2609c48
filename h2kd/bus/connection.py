"""The daemon's bus connection: dbus-fast's asyncio MessageBus with three documented adjustments.

1. Bursts. dbus-fast 5.2.0's asyncio writer (_MessageWriter.write_callback in
   dbus_fast/aio/message_bus.py) calls sock.send() on the non-blocking socket and treats any
   exception as fatal, BlockingIOError included: when a client pipelines a few thousand calls, the
   replies fill the socket buffer, send() raises EAGAIN and the whole connection is dropped. The
   writer already knows how to wait for writability after a short write, so we hand it a socket
   whose send() reports EAGAIN as "0 bytes written"; it then keeps the rest of the message queued
   and waits for the loop's writer callback. (Only send() is wrapped: we do not pass file
   descriptors, so the writer's sendmsg() path, which could lose descriptors this way, is unused.)

2. Batched writes. dbus-fast writes every message with its own send() as soon as it is queued; h2kd
   sends several per change (signals, then the reply), so messages queued during one turn of the event
   loop are written together at the end of it, in order, with one send() (fewer system calls here and
   fewer wake-ups of dbus-daemon). Messages carrying file descriptors go dbus-fast's own way; a large message
   keeps its own buffer. send_marshalled() queues a message marshalled by the caller the same way.

3. ObjectManager signals. export()/unexport() emit InterfacesAdded/InterfacesRemoved from the
   object's own path; the specification (and Cockpit) expect them from the ObjectManager's path.
   This bus emits none itself; h2kd.bus.service sends them from /org/hyper2kvm/h2kd1.

Use: `bus = await connect_bus(address)` (address None: the system bus), or adopt(bus) for a
MessageBus connected elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
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

    def export_shared(self, path: str, interface: Any) -> None:
        """Export `interface` at one more path. Unlike export(), one instance may serve many paths (it must
        find out from each call which object it serves); every further path costs one small table entry."""
        paths = getattr(interface, "_h2k_paths", 0)
        if not paths:
            self.export(path, interface)
        else:
            exports = self._path_exports.setdefault(path, {})
            if interface.name in exports:
                raise ValueError(f"{interface.name} is already exported at {path}")
            exports[interface.name] = interface
        interface._h2k_paths = paths + 1

    def unexport_shared(self, path: str, interface: Any) -> None:
        """Stop serving `interface` at `path`; it leaves the bus with its last path."""
        exports = self._path_exports.get(path)
        if exports is None or exports.get(interface.name) is not interface:
            return
        interface._h2k_paths -= 1
        if not interface._h2k_paths:
            super().unexport(path, interface)
            return
        del exports[interface.name]
        if not exports:
            del self._path_exports[path]

    def unexport(self, path: str, interface: Any = None) -> None:
        """As MessageBus.unexport, minding interfaces exported at several paths (export_shared)."""
        for name, exported in list(self._path_exports.get(path, {}).items()):
            if getattr(exported, "_h2k_paths", 0) and interface in (None, exported, name):
                self.unexport_shared(path, exported)
                if interface is not None:
                    return
        if path in self._path_exports:
            super().unexport(path, interface)

    def send(self, msg: Any) -> asyncio.Future:
        writer = self._batching_writer()
        if msg.unix_fds or writer is None:
            return super().send(msg)
        if not msg.serial:
            msg.serial = self.next_serial()
        future = self._loop.create_future()
        writer.buffer_message(msg, future)
        self._schedule_batch(writer)
        return future

    def send_marshalled(self, data: bytes | bytearray) -> asyncio.Future:
        """Queue a message the caller marshalled in full (header and body, without file descriptors, its
        serial taken from next_serial()), in order with send()'s messages. For replies too big to marshal
        on every call (h2kd.bus.premarshal). Raises RuntimeError if the connection cannot take it."""
        writer = self._batching_writer()
        if writer is None:
            raise RuntimeError("not connected, or dbus-fast's writer has changed")
        future = self._loop.create_future()
        writer.messages.append((data, None, future))   # the entries buffer_message() makes
        self._schedule_batch(writer)
        return future

    def _batching_writer(self) -> Any:
        """dbus-fast's writer, if connected and still shaped as this class expects."""
        writer = getattr(self, "_writer", None)
        if not self.unique_name or writer is None or not hasattr(writer, "messages"):
            return None
        return writer

    def _schedule_batch(self, writer: Any) -> None:
        if not getattr(writer, "h2k_flush_pending", False):
            writer.h2k_flush_pending = True
            self._loop.call_soon(self._write_batch)

    def _write_batch(self) -> None:
        writer = self._writer
        writer.h2k_flush_pending = False
        if self._disconnected:
            return
        writer.messages = _merged(writer.messages)
        writer._write_without_remove_writer()
        if writer.buf is not None or writer.messages:
            self._loop.add_writer(writer.fd, writer.write_callback)

    # Our objects are announced by h2kd.bus.service from the manager's path instead.
    def _emit_interface_added(self, path: str, interface: Any) -> None:
        return None

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        return None


class _Futures:
    """The futures of messages written as one buffer, settled together (duck-typed as one future)."""

    __slots__ = ("futures",)

    def __init__(self, futures: list[Any]):
        self.futures = futures

    def done(self) -> bool:
        return False

    def set_result(self, result: Any) -> None:
        for future in self.futures:
            if future is not None and not future.done():
                future.set_result(result)

    def set_exception(self, exc: BaseException) -> None:
        for future in self.futures:
            if future is not None and not future.done():
                future.set_exception(exc)


# A message this big is written from its own buffer: joining it to its neighbours would copy it once more.
_JOIN_LIMIT = 64 * 1024


def _merged(messages: deque) -> deque:
    """dbus-fast's queue of (bytes, fds, future) with each run of small messages without descriptors joined."""
    if len(messages) < 2:
        return messages
    out: deque = deque()
    run: list[Any] = []

    def close_run() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            out.append((bytearray().join(m[0] for m in run), None, _Futures([m[2] for m in run])))
        run.clear()

    for entry in messages:
        if entry[1] or len(entry[0]) > _JOIN_LIMIT:
            close_run()
            out.append(entry)
        else:
            run.append(entry)
    close_run()
    return out


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
