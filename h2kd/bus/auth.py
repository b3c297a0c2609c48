"""Who is calling and may they do it: caller credentials from the bus, decisions from polkit.

Every privileged D-Bus method asks `Authority.check` with the caller's unique bus name. The
subject sent to polkit is that bus name (polkit resolves it to the process and uid itself, so a
caller cannot claim to be someone else). uid 0 is allowed without asking polkit. Any answer
other than a clear "yes" denies: a polkit that is missing, fails or does not answer within the
timeout means NotAuthorized, and each check is an independent coroutine, so a slow answer for one
caller never holds up another.

How many checks are in flight is bounded, per user and in all (CHECKS_*): h2kd's connection may await at
most 128 replies at once (dbus-daemon's max_replies_per_connection, shared with its calls to systemd), and
polkit keeps a check open for as long as an agent prompts. Without a bound, any local user's flood of calls,
or their own agent never answering, would leave no room for everyone else's checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from dataclasses import dataclass
from typing import AsyncIterator

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from h2kd.errors import AuthorizationUnavailable, InteractiveAuthorizationRequired, NotAuthorized

ACTION_SUBMIT = "org.hyper2kvm.h2kd1.submit"
ACTION_CANCEL = "org.hyper2kvm.h2kd1.cancel"
ACTION_CANCEL_OTHER_USER = "org.hyper2kvm.h2kd1.cancel-other-user"
ACTION_MANAGE = "org.hyper2kvm.h2kd1.manage"
ACTION_REGISTER_WORKER = "org.hyper2kvm.h2kd1.register-worker"
ACTION_FIX_GUEST = "org.hyper2kvm.h2kd1.fix-guest"
ACTION_READ_OTHER_USER = "org.hyper2kvm.h2kd1.read-other-user"

# What the caller was trying to do, as the end of "Not authorized to ...".
ACTION_WORDS = {
    ACTION_SUBMIT: "submit conversion jobs",
    ACTION_CANCEL: "cancel, retry or start this job",
    ACTION_CANCEL_OTHER_USER: "cancel, retry or start another user's job",
    ACTION_MANAGE: "manage the conversion queue",
    ACTION_REGISTER_WORKER: "register a worker",
    ACTION_FIX_GUEST: "repair a guest operating system (its own programs run as root)",
    ACTION_READ_OTHER_USER: "read the results of another user's jobs",
}

_DBUS = "org.freedesktop.DBus"
_DBUS_PATH = "/org/freedesktop/DBus"
_POLKIT = "org.freedesktop.PolicyKit1"
_POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
_POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
_ALLOW_USER_INTERACTION = 1
# Only names that lose their owner matter to the cache; unique names never come back.
_NAME_GONE_MATCH = (
    f"type='signal',sender='{_DBUS}',path='{_DBUS_PATH}',interface='{_DBUS}',"
    "member='NameOwnerChanged',arg2=''"
)

CHECKS_PER_USER = 8       # of one uid in flight at polkit; more wait their turn,
WAITING_PER_USER = 64     # up to this many; any more are refused at once
CHECKS_IN_FLIGHT = 64     # of all users together

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credentials:
    """What the bus daemon knows about a connection: its uid, pid and (when known) groups."""

    uid: int
    pid: int
    gids: tuple[int, ...] | None    # None: the bus does not tell them (UnixGroupIDs)


def allows_interaction(message: Message) -> bool:
    """Whether the caller set ALLOW_INTERACTIVE_AUTHORIZATION on its method call."""
    return bool(message.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)


def describe_action(action_id: str) -> str:
    """What a refusal of `action_id` says was refused: h2kd's words for it, then the action's id, which
    programs (h2kctl) read and an administrator's polkit rule names: "cancel this job (polkit action ...)"."""
    return f"{ACTION_WORDS.get(action_id, 'perform this action')} (polkit action {action_id})"


class Authority:
    """polkit checks and caller identity on one bus connection (the one the daemon serves on)."""

    def __init__(self, bus: MessageBus, timeout: float, interactive_timeout: float | None = None,
                 per_user: int = CHECKS_PER_USER, waiting_per_user: int = WAITING_PER_USER,
                 in_flight: int = CHECKS_IN_FLIGHT):
        """timeout bounds a check (its wait for a turn included); interactive_timeout (default: the same) one
        where the caller allowed interaction, since a person may be typing a password into an agent meanwhile."""
        self._bus = bus
        self._timeout = timeout
        self._interactive_timeout = max(timeout, interactive_timeout or timeout)
        self._per_user = per_user
        self._waiting_per_user = waiting_per_user
        self._all_turns = asyncio.Semaphore(in_flight)
        self._user_turns: dict[int, asyncio.Semaphore] = {}
        self._checks_of: dict[int, int] = {}    # uid -> its checks in flight or waiting for a turn
        # unique name -> lookup in flight or done; shared so concurrent callers ask only once.
        self._credentials: dict[str, asyncio.Task[Credentials]] = {}
        self._watch: asyncio.Task[None] | None = None
        self._cancellation_ids = itertools.count(1)

    # -- caller identity ------------------------------------------------------------------------

    async def caller_credentials(self, sender: str) -> Credentials:
        await self._watch_names()
        lookup = self._credentials.get(sender)
        if lookup is None:
            lookup = asyncio.ensure_future(self._fetch_credentials(sender))
            self._credentials[sender] = lookup
            lookup.add_done_callback(lambda task: self._forget_failed(sender, task))
        # shield: one impatient caller must not cancel the lookup the others wait for.
        return await asyncio.shield(lookup)

    async def caller_uid(self, sender: str) -> int:
        return (await self.caller_credentials(sender)).uid

    async def caller_groups(self, sender: str) -> tuple[int, ...] | None:
        """The groups of the sender's connection (UnixGroupIDs, given by dbus-daemon since 1.14 and by
        dbus-broker), None when the bus does not tell them."""
        return (await self.caller_credentials(sender)).gids

    async def caller_pid(self, sender: str) -> int:
        return (await self.caller_credentials(sender)).pid

    def cached_names(self) -> set[str]:
        """Unique names whose credentials are held (they are dropped when the name leaves the bus)."""
        return set(self._credentials)

    async def _fetch_credentials(self, sender: str) -> Credentials:
        call = Message(
            destination=_DBUS,
            path=_DBUS_PATH,
            interface=_DBUS,
            member="GetConnectionCredentials",
            signature="s",
            body=[sender],
        )
        try:
            reply = await asyncio.wait_for(self._bus.call(call), self._timeout)
        except Exception as e:  # timeout, disconnected bus
            raise NotAuthorized(f"Not authorized: cannot identify the caller {sender} ({e!r})") from e
        if reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else reply.error_name
            raise NotAuthorized(f"Not authorized: cannot identify the caller {sender} ({detail})")
        found = reply.body[0]
        if "UnixUserID" not in found:
            raise NotAuthorized(f"Not authorized: the bus does not know the uid of {sender}")
        pid = found["ProcessID"].value if "ProcessID" in found else 0
        gids = tuple(found["UnixGroupIDs"].value) if "UnixGroupIDs" in found else None
        return Credentials(uid=found["UnixUserID"].value, pid=pid, gids=gids)

    async def connected(self, sender: str) -> bool:
        """Whether `sender` is still on the bus: a unique name that has left never comes back. True when the
        bus does not answer (a later NameOwnerChanged still tells)."""
        call = Message(destination=_DBUS, path=_DBUS_PATH, interface=_DBUS, member="NameHasOwner", signature="s",
                       body=[sender])
        try:
            reply = await asyncio.wait_for(self._bus.call(call), self._timeout)
        except Exception:
            return True
        return reply.message_type != MessageType.METHOD_RETURN or bool(reply.body[0])

    def _forget_failed(self, sender: str, task: asyncio.Task[Credentials]) -> None:
        if (task.cancelled() or task.exception() is not None) and self._credentials.get(sender) is task:
            del self._credentials[sender]

    async def _watch_names(self) -> None:
        """Subscribe to names leaving the bus before the first lookup, so no cached entry can leak."""
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._add_name_watch())
        await asyncio.shield(self._watch)

    async def _add_name_watch(self) -> None:
        # Without the watch, lookups still work; only the cache would keep names that left.
        self._bus.add_message_handler(self._on_message)
        try:
            reply = await self._bus.call(
                Message(
                    destination=_DBUS,
                    path=_DBUS_PATH,
                    interface=_DBUS,
                    member="AddMatch",
                    signature="s",
                    body=[_NAME_GONE_MATCH],
                )
            )
        except Exception as e:
            log.warning("cannot watch callers leaving the bus: %r", e)
            return
        if reply.message_type == MessageType.ERROR:
            log.warning("cannot watch callers leaving the bus: %s", reply.body)

    def _on_message(self, message: Message) -> None:
        if (
            message.message_type == MessageType.SIGNAL
            and message.member == "NameOwnerChanged"
            and message.interface == _DBUS
            and message.sender == _DBUS
            and message.signature == "sss"
            and message.body[2] == ""
        ):
            self._credentials.pop(message.body[0], None)
        return None  # never consume: other handlers may want the same signal

    async def close(self) -> None:
        self._bus.remove_message_handler(self._on_message)
        self._credentials.clear()
        if self._watch is not None and self._watch.done() and self._bus.connected:
            await self._bus.call(
                Message(
                    destination=_DBUS,
                    path=_DBUS_PATH,
                    interface=_DBUS,
                    member="RemoveMatch",
                    signature="s",
                    body=[_NAME_GONE_MATCH],
                )
            )

    # -- authorization ----------------------------------------------------------------------------

    async def check(
        self,
        sender: str,
        action_id: str,
        allow_interactive: bool,
        details: dict[str, str] | None = None,
    ) -> None:
        """Return if `sender` may perform `action_id`; raise NotAuthorized or
        InteractiveAuthorizationRequired otherwise."""
        uid = await self.caller_uid(sender)
        if uid == 0:
            return
        words = describe_action(action_id)
        cancellation_id = f"h2kd-{os.getpid()}-{next(self._cancellation_ids)}"
        call = Message(
            destination=_POLKIT,
            path=_POLKIT_PATH,
            interface=_POLKIT_IFACE,
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[
                ["system-bus-name", {"name": Variant("s", sender)}],
                action_id,
                dict(details or {}),
                _ALLOW_USER_INTERACTION if allow_interactive else 0,
                cancellation_id,
            ],
        )
        timeout = self._interactive_timeout if allow_interactive else self._timeout
        asked = False
        try:
            async with asyncio.timeout(timeout), self._turn(uid, words):
                asked = True
                reply = await self._bus.call(call)
        except TimeoutError:
            log.warning("polkit did not answer %s for %s within %.1fs", action_id, sender, timeout)
            if asked:
                self._cancel_check(cancellation_id)
            raise AuthorizationUnavailable(f"Not authorized to {words}: authorization service unavailable") from None
        except asyncio.CancelledError:
            if asked:
                self._cancel_check(cancellation_id)
            raise
        except NotAuthorized:   # no turn: too many checks of this user under way
            raise
        except Exception as e:  # the connection itself failed
            log.warning("polkit check %s for %s failed: %r", action_id, sender, e)
            raise AuthorizationUnavailable(f"Not authorized to {words}: authorization service unavailable") from e
        if reply.message_type == MessageType.ERROR:
            log.warning("polkit refused to check %s for %s: %s %s", action_id, sender, reply.error_name, reply.body)
            raise AuthorizationUnavailable(f"Not authorized to {words}: authorization service unavailable")
        is_authorized, is_challenge, _result_details = reply.body[0]
        if is_authorized:
            return
        if is_challenge and not allow_interactive:
            raise InteractiveAuthorizationRequired(f"Interactive authentication is required to {words}")
        raise NotAuthorized(f"Not authorized to {words}")

    @contextlib.asynccontextmanager
    async def _turn(self, uid: int, words: str) -> AsyncIterator[None]:
        """Wait until `uid` may have one more check at polkit (see CHECKS_*), or refuse if too many wait."""
        checks = self._checks_of.get(uid, 0)
        if checks >= self._per_user + self._waiting_per_user:
            raise AuthorizationUnavailable(f"Not authorized to {words}: uid {uid} has {checks} authorization checks under "
                                f"way; try again once they are answered")
        self._checks_of[uid] = checks + 1
        turns = self._user_turns.setdefault(uid, asyncio.Semaphore(self._per_user))
        try:
            async with turns, self._all_turns:
                yield
        finally:
            self._checks_of[uid] -= 1
            if not self._checks_of[uid]:
                del self._checks_of[uid], self._user_turns[uid]

    async def check_job_control(
        self,
        sender: str,
        job_owner: int,
        allow_interactive: bool,
        details: dict[str, str] | None = None,
    ) -> None:
        """Cancel/retry/start a job: the caller's own job needs ...cancel, anyone else's
        ...cancel-other-user."""
        own = (await self.caller_uid(sender)) == job_owner
        action = ACTION_CANCEL if own else ACTION_CANCEL_OTHER_USER
        await self.check(sender, action, allow_interactive, details)

    def _cancel_check(self, cancellation_id: str) -> None:
        """Tell polkit to drop a check we gave up on (it may be waiting for an agent)."""
        if not self._bus.connected:
            return
        try:
            sent = self._bus.send(
                Message(
                    destination=_POLKIT,
                    path=_POLKIT_PATH,
                    interface=_POLKIT_IFACE,
                    member="CancelCheckAuthorization",
                    signature="s",
                    body=[cancellation_id],
                    flags=MessageFlag.NO_REPLY_EXPECTED,
                )
            )
            sent.add_done_callback(lambda f: f.cancelled() or f.exception())
        except Exception as e:  # best effort: polkit's own timeout ends the check anyway
            log.debug("could not cancel polkit check %s: %r", cancellation_id, e)
