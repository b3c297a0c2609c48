"""Who is calling: the D-Bus message being served, made visible to method bodies through a ContextVar.

dbus-fast does not hand the caller's unique name to method handlers. Message handlers added with
bus.add_message_handler() run synchronously just before a method call is dispatched, so
`remember_call` records the message there; synchronous methods run in the same stack, and the task
that runs an async method copies the context when it is created, so both see their own call even
while other calls are being served.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass

from dbus_fast import Message, MessageType
from dbus_fast.constants import MessageFlag

from h2kd import MANAGER_INTERFACE, MANAGER_PATH


@dataclass(frozen=True)
class Caller:
    sender: str                 # unique bus name, e.g. ":1.42"
    allow_interactive: bool     # the caller set ALLOW_INTERACTIVE_AUTHORIZATION
    path: str = ""              # the object called (one interface instance serves every job's path)
    passed_fds: tuple[int, ...] = ()   # descriptors that came with the call (the method must close them)


_current: ContextVar[Caller | None] = ContextVar("h2kd_bus_caller", default=None)

# The one method that takes descriptors (an "h" argument): its path, interfaces (D-Bus lets a call leave the
# interface out), member and signature. Descriptors that come with any other message are closed, also with a
# call of that name that dbus-fast will not hand to the method (another path or interface, another
# signature): nothing else would ever close them.
TAKES_FDS = (MANAGER_PATH, (MANAGER_INTERFACE, None), "SubmitJobWithImage", "ha{sv}a{sv}")


def remember_call(msg: Message) -> bool:
    """Message handler: remember the method call about to be dispatched. Never consumes the message.

    Descriptors anyone sends h2kd (up to 16 a message) stay open in h2kd until closed: those that come
    with a message that takes none are closed here at once, before h2kd runs out of descriptors."""
    fds = tuple(msg.unix_fds or ())
    path, interfaces, member, signature = TAKES_FDS
    if fds and not (msg.message_type == MessageType.METHOD_CALL and msg.path == path and msg.interface in interfaces
                    and msg.member == member and msg.signature == signature):
        close_fds(fds)
        fds = ()
    if msg.message_type == MessageType.METHOD_CALL:
        flags = int(msg.flags.value if hasattr(msg.flags, "value") else msg.flags)
        _current.set(Caller(sender=msg.sender or "",
                            allow_interactive=bool(flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION.value),
                            path=msg.path or "", passed_fds=fds))
    return False


def close_fds(fds: tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def current_caller() -> Caller:
    caller = _current.get()
    if caller is None:  # only possible if a method runs outside a bus call (a bug)
        raise RuntimeError("no D-Bus call is being served")
    return caller
