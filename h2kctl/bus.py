"""The D-Bus side of h2kctl: one connection to h2kd, calls with polkit handling, errors turned into CtlError."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import shutil
import subprocess
import sys
import traceback
from typing import Any, AsyncIterator, Callable
from xml.etree import ElementTree

from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant, unpack_variants
from dbus_fast.aio import MessageBus
from dbus_fast.errors import AuthError, DBusError

from h2kd import BUS_NAME, JOB_PATH_PREFIX, MANAGER_PATH, WORKER_PATH_PREFIX
from h2kd.bus import variants
from h2kd.bus.paths import job_id_of
from h2kctl.errors import CtlError, ExitCode

MANAGER_IFACE = "org.hyper2kvm.h2kd1.Manager"
JOB_IFACE = "org.hyper2kvm.h2kd1.Job"
# Job properties that GetAll leaves out (annotated Explicit in dbus/org.hyper2kvm.h2kd1.Job.xml): read with Get.
JOB_EXPLICIT_PROPERTIES = ("Spec", "Result")
WORKER_IFACE = "org.hyper2kvm.h2kd1.Worker"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
INTROSPECTABLE_IFACE = "org.freedesktop.DBus.Introspectable"
_OBJECT_GONE = {"org.freedesktop.DBus.Error.UnknownObject", "org.freedesktop.DBus.Error.UnknownMethod",
                "org.freedesktop.DBus.Error.UnknownInterface"}
ERROR_PREFIX = "org.hyper2kvm.h2kd1.Error."
POLKIT_PREFIX = "org.hyper2kvm.h2kd1."

DEFAULT_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"
CALL_TIMEOUT = 25.0             # the libdbus default
INTERACTIVE_CALL_TIMEOUT = 300.0  # a person may be typing a password
AGENT_START_TIMEOUT = 5.0

_UNREACHABLE_ERRORS = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoServer",
    "org.freedesktop.DBus.Error.Disconnected",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Timeout",
    "org.freedesktop.DBus.Error.TimedOut",
}
_AUTH_ERRORS = {"org.freedesktop.DBus.Error.AccessDenied", "org.hyper2kvm.h2kd1.Error.NotAuthorized",
                "org.freedesktop.PolicyKit1.Error.NotAuthorized"}
INTERACTIVE_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
BUS_DAEMON = "org.freedesktop.DBus"
BUS_DAEMON_PATH = "/org/freedesktop/DBus"
# What h2kd answers a submission with when the spec (InvalidSpec) or the source's descriptor (InvalidArgument) is
# not acceptable: bad input, as the same problem found by h2kctl itself is.
_BAD_SUBMISSION = {ERROR_PREFIX + "InvalidSpec", ERROR_PREFIX + "InvalidArgument"}
# How h2kd's polkit refusals begin: "Not authorized to ...", or, when a password would do, "Interactive ...".
_NOT_AUTHORIZED = "not authorized to "
_INTERACTIVE = "interactive authentication is required to "
# h2kd's polkit refusal: "<prefix><words> (polkit action <id>)[: reason]" (h2kd.bus.auth.describe_action).
_REFUSAL = re.compile(r"(?:" + re.escape(_NOT_AUTHORIZED) + "|" + re.escape(_INTERACTIVE) + r")(?P<words>.*?) "
                      r"\(polkit action " + re.escape(POLKIT_PREFIX) + r"(?P<action>[a-z0-9-]+)\)(?:: (?P<reason>.*))?",
                      re.IGNORECASE | re.DOTALL)


class Withheld:
    """A property h2kd would not give the caller (another user's job's Result): why, in h2kd's words."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"Withheld({self.reason!r})"


def to_vardict(mapping: dict[str, Any], what: str = "a job spec") -> dict[str, Variant]:
    """A job spec (or options) as a{sv}: natural D-Bus types, None values left out (D-Bus has no null).
    A value D-Bus cannot carry is a usage error naming its field in `what`."""
    # Looked for first: a string D-Bus cannot carry passes to_vardict and fails only while the message is
    # encoded, where no field is known (and the bus would drop the connection over a NUL).
    found = _unsendable(mapping, "")
    if found is None:
        try:
            return variants.to_vardict(mapping)
        except (TypeError, ValueError) as e:
            found = ("", str(e))
    field, problem = found
    raise CtlError(f"{what}: " + (f"field {field}: " if field else "") + problem, ExitCode.USAGE)


def text_problem(text: str) -> str | None:
    """Why D-Bus cannot carry `text` as a string, None if it can: its strings are UTF-8 without NUL.
    (A command line argument that is not UTF-8 arrives here with lone surrogates, PEP 383.)"""
    if "\0" in text:
        return "contains a NUL byte"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 text"
    return None


def shown(text: str) -> str:
    """`text` printable whatever it holds: bytes that are not UTF-8 as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _unsendable(value: Any, field: str) -> tuple[str, str] | None:
    """(field, problem) for the first value in `value` that to_variant refuses, None if there is none."""
    if isinstance(value, dict):
        for key in value:
            problem = text_problem(key) if isinstance(key, str) else None
            if problem:
                return (f"{field}.{shown(key)}" if field else shown(key)), f"the name {problem}"
        items = [(f"{field}.{key}" if field else str(key), v) for key, v in value.items() if v is not None]
    elif isinstance(value, (list, tuple)):
        items = [(f"{field}[{i}]", v) for i, v in enumerate(value)]
    elif value is None:   # left out of a dict, but a list has no way to leave it out
        return field, "null is not allowed here (D-Bus has no null)"
    elif isinstance(value, str):
        problem = text_problem(value)
        return (field, problem) if problem else None
    else:
        try:
            variants.to_variant(value)
        except ValueError as e:
            return field, "number out of range" if isinstance(value, int) else str(e)
        except TypeError as e:
            return field, str(e)
        return None
    for name, item in items:
        found = _unsendable(item, name)
        if found is not None:
            return found
    return None


def symlink_refusal(path: str) -> str:
    """Why a source that is a symbolic link is refused, and what to give instead: h2kd checks the path the
    caller names, and a link could be changed to lead elsewhere after that check."""
    target = os.path.realpath(path)
    return (f"refusing {shown(path)}: it is a symbolic link, and h2kd takes no symbolic link as a source; "
            f"give the path of the image itself" + (f": {shown(target)}" if target != os.path.abspath(path) else ""))


def _is_polkit_denial(text: str) -> bool:
    """Whether h2kd's AccessDenied text is polkit's "no" (h2kd words those "Not authorized to <what>")
    rather than a refusal of the request's content."""
    return not text or text.lower().startswith(_NOT_AUTHORIZED)


def refused_action(text: str) -> tuple[str, str, str] | None:
    """(action, h2kd's words for it, the reason after them) of a polkit refusal in h2kd's words, None if the text
    is no such refusal: h2kd decides which action a request needs (e.g. manage for a --priority below the
    default), so its answer, not h2kctl's expectation, says which one was refused."""
    refusal = _REFUSAL.fullmatch(text)
    if refusal is None:
        return None
    return refusal["action"], refusal["words"], refusal["reason"] or ""


def _submission_error(error: CtlError, source: str | None) -> CtlError:
    """h2kd's refusal of a submission: a spec it finds invalid is bad input (exit 2), as h2kctl's own checks
    say; a descriptor it refuses is the source's fault, so the message names the source."""
    if error.error_name not in _BAD_SUBMISSION:
        return error
    message = error.message
    if error.error_name == ERROR_PREFIX + "InvalidArgument" and source is not None:
        # Only the descriptor of `source` can be wrong here: h2kctl sends no other argument h2kd could refuse.
        message = f"refusing {shown(source)}: {message}"
    return CtlError(message, ExitCode.USAGE, error.error_name)


def in_login_session(pid: int | str = "self") -> bool:
    """Whether the process belongs to a logind session, found as polkit finds it (sd_pid_get_session):
    a session-ID.scope unit in the process's cgroup path."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            cgroups = f.read()
    except OSError:
        return False
    return any(part.startswith("session-") and part.endswith(".scope")
               for line in cgroups.splitlines() for part in line.split(":", 2)[-1].split("/"))


class Client:
    """A connection to h2kd on the system bus (or `address`). Use as `async with Client(...) as c`."""

    def __init__(self, address: str | None = None, ask_password: bool = True):
        self.address = address
        self.ask_password = ask_password
        self.bus: MessageBus | None = None
        self._agent: subprocess.Popen | None = None
        # Whether h2kd has answered a call in this run: until it has, its absence is no restart to wait out quietly.
        self.answered = False
        self.told_unreachable = False   # that h2kctl is trying again: said once, however many jobs wait
        # h2kd's unique name while it owns BUS_NAME, as the bus itself says (see follow_h2kd_owner).
        self.h2kd_owner: str | None = None
        self._owner_found: asyncio.Future[None] | None = None
        self._owner_changes = 0

    @property
    def connected(self) -> bool:
        return self.bus is not None and self.bus.connected

    @property
    def _bus_description(self) -> str:
        return self.address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or f"the system bus ({DEFAULT_SYSTEM_BUS})"

    async def __aenter__(self) -> "Client":
        try:
            if self.address:
                bus = MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
            else:
                bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
            self.bus = await asyncio.wait_for(bus.connect(), CALL_TIMEOUT)
        except (OSError, AuthError, asyncio.TimeoutError, ValueError) as e:
            if isinstance(e, asyncio.TimeoutError):
                reason = f"no answer within {CALL_TIMEOUT:.0f} s"
            else:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__)
            raise CtlError(f"cannot connect to {self._bus_description}: {reason}", ExitCode.UNREACHABLE) from None
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.bus is not None:
            self.bus.disconnect()
        self.close_agent()

    # ------------------------------------------------------------------ calls

    async def call(self, path: str, interface: str, member: str, signature: str = "", body: list | None = None,
                   action: str | None = None, what: str | None = None,
                   unix_fds: list[int] | None = None) -> list[Any]:
        """Call a method of h2kd; return the reply body with variants unpacked.

        action: the polkit action the method needs (None for reads); what: the request in words,
        for the "not authorized to ..." message.
        """
        # Only a change may wait on a person typing a password (300 s); a read never prompts (h2kd asks polkit
        # without interaction for reads), and gets the usual timeout when h2kd does not answer.
        interactive = action is not None and self._can_prompt()
        if interactive and os.geteuid() != 0:
            # As systemctl does: have an agent ready before a call that may need a password.
            self.open_agent()
        try:
            return await self._call_once(path, interface, member, signature, body or [], interactive, unix_fds)
        except DBusError as e:
            if e.type == INTERACTIVE_REQUIRED and self._can_prompt() and self._agent is None:
                if self.open_agent():
                    try:
                        return await self._call_once(path, interface, member, signature, body or [], True,
                                                     unix_fds)
                    except DBusError as again:
                        e = again
            raise self.translate(e, action, what or member, path) from None

    async def _call_once(self, path: str, interface: str, member: str, signature: str, body: list,
                         interactive: bool, unix_fds: list[int] | None = None) -> list[Any]:
        assert self.bus is not None
        flags = MessageFlag.NONE
        if interactive:
            flags |= MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
        message = Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                          signature=signature, body=body, flags=flags, unix_fds=unix_fds or [])
        timeout = INTERACTIVE_CALL_TIMEOUT if flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION else CALL_TIMEOUT
        try:
            reply = await asyncio.wait_for(self.bus.call(message), timeout)
        except UnicodeEncodeError:
            # What the callers did not check themselves: nothing was sent.
            raise CtlError(f"cannot send {member}: an argument is not valid UTF-8 text", ExitCode.USAGE) from None
        except asyncio.TimeoutError:
            raise CtlError(f"h2kd did not answer {member} within {timeout:.0f} s", ExitCode.UNREACHABLE) from None
        except (OSError, EOFError) as e:
            raise CtlError(f"lost the connection to {self._bus_description}: {e}", ExitCode.UNREACHABLE) from None
        if reply.sender != BUS_DAEMON:     # the bus answers for an h2kd that is absent or silent
            self.answered = True
        if reply.message_type == MessageType.ERROR:
            raise DBusError(reply.error_name or "org.freedesktop.DBus.Error.Failed",
                            reply.body[0] if reply.body and isinstance(reply.body[0], str) else "", reply)
        return unpack_variants(reply.body)

    def translate(self, error: DBusError, action: str | None, what: str, path: str = "") -> CtlError:
        """A D-Bus error as a one-line CtlError with the right exit code (`path`: the object called)."""
        name, text = error.type, (error.text or "").strip()
        if name in _OBJECT_GONE and path.startswith(JOB_PATH_PREFIX):
            # The job was removed after its path was looked up: for the user, as if GetJob had said so.
            return CtlError(f"job {job_id_of(path)} no longer exists", ExitCode.NO_SUCH_JOB, name)
        if name in _AUTH_ERRORS or name == INTERACTIVE_REQUIRED:
            if name == INTERACTIVE_REQUIRED or _is_polkit_denial(text):
                return CtlError(self._denial(text, action, what), ExitCode.NOT_AUTHORIZED, name)
            sender = error.reply.sender if error.reply is not None else None
            if sender == BUS_DAEMON:   # the bus policy, whose words do not say what was asked
                return CtlError(f"not authorized to {what}: {text or name}", ExitCode.NOT_AUTHORIZED, name)
            # Refused for another reason than polkit's answer (e.g. an output outside the output roots): h2kd's
            # own words say which, and that the request, not the user's rights, is what it refused.
            return CtlError(text or f"not authorized to {what}", ExitCode.NOT_AUTHORIZED, name)
        if name in _UNREACHABLE_ERRORS or name.startswith("org.freedesktop.DBus.Error.Spawn"):
            return CtlError(f"h2kd is not reachable on {self._bus_description} ({BUS_NAME}: {text or name})",
                            ExitCode.UNREACHABLE, name)
        if name == ERROR_PREFIX + "NoSuchJob":
            return CtlError(text or "no such job", ExitCode.NO_SUCH_JOB, name)
        short = name[len(ERROR_PREFIX):] if name.startswith(ERROR_PREFIX) else name.rsplit(".", 1)[-1]
        return CtlError(text or short, ExitCode.FAILURE, name)

    @staticmethod
    def _denial(text: str, action: str | None, what: str) -> str:
        """The message for polkit's "no": the action h2kd refused, named as h2kd names it."""
        refused = refused_action(text)
        if refused is None:
            if text and not text.lower().startswith(_INTERACTIVE):
                return text[:1].lower() + text[1:]     # h2kd's words, with no action we know of
            return f"not authorized to {what}" + (f" (polkit action {POLKIT_PREFIX}{action})" if action else "")
        refused_id, words, reason = refused
        # The request in the caller's words when h2kd refused the action h2kctl expected; else h2kd's: it
        # asked for another right (e.g. manage, for a priority more urgent than the default).
        asked = what if refused_id == action else words
        return f"not authorized to {asked} (polkit action {POLKIT_PREFIX}{refused_id})" + (
            f": {reason}" if reason else "")

    # --------------------------------------------------------------- polkit agent

    def _can_prompt(self) -> bool:
        return self.ask_password and sys.stdin is not None and sys.stdin.isatty()   # None: stdin closed (<&-)

    def open_agent(self) -> bool:
        """Start pkttyagent for this process, as systemctl does; True once it is listening."""
        if self._agent is not None:
            return True
        agent = shutil.which("pkttyagent")
        if agent is None:
            return False
        read_fd, write_fd = os.pipe()
        argv = [agent, "--notify-fd", str(write_fd), "--process", str(os.getpid())]
        if in_login_session():
            # In a login session a desktop agent may be registered: let it win, as systemctl does.
            # Without a session polkit never consults a fallback agent, so register a plain one.
            argv.append("--fallback")
        try:
            self._agent = subprocess.Popen(argv, pass_fds=(write_fd,), stdout=subprocess.DEVNULL)
        except OSError:
            os.close(read_fd)
            os.close(write_fd)
            return False
        os.close(write_fd)
        # pkttyagent closes the notify fd once it has registered with polkit.
        import select
        select.select([read_fd], [], [], AGENT_START_TIMEOUT)
        os.close(read_fd)
        return True

    def close_agent(self) -> None:
        if self._agent is not None:
            self._agent.terminate()
            try:
                self._agent.wait(2)
            except subprocess.TimeoutExpired:
                self._agent.kill()
                self._agent.wait()
            self._agent = None

    # --------------------------------------------------------------- helpers

    async def manager(self, member: str, signature: str = "", body: list | None = None,
                      action: str | None = None, what: str | None = None) -> list[Any]:
        return await self.call(MANAGER_PATH, MANAGER_IFACE, member, signature, body, action, what)

    async def submit(self, spec: dict[str, Any], queue: bool) -> list[Any]:
        """SubmitJob, or SubmitJobWithImage with the source opened here with the user's own rights, so
        h2kd acts only on what this user could read."""
        options = to_vardict({"queue": queue})
        image = spec.get("image")
        path = image.get("path") if isinstance(image, dict) else None
        if not path or not isinstance(path, str):
            # h2kd says what is wrong with a spec that names no usable source.
            try:
                return await self.manager("SubmitJob", "a{sv}a{sv}", [to_vardict(spec), options],
                                          action="submit", what="submit jobs")
            except CtlError as e:
                raise _submission_error(e, None) from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ELOOP:   # O_NOFOLLOW: h2kd takes no symlink as a source (see symlink_refusal)
                raise CtlError(symlink_refusal(path), ExitCode.FAILURE) from None
            raise CtlError(f"cannot open {shown(path)}: {e.strerror}", ExitCode.FAILURE) from None
        except ValueError:   # a NUL byte, which spec.py lets through only if the spec was built elsewhere
            raise CtlError(f"cannot open \"{shown(path)}\": the path contains a NUL byte", ExitCode.USAGE) from None
        try:
            return await self.call(MANAGER_PATH, MANAGER_IFACE, "SubmitJobWithImage", "ha{sv}a{sv}",
                                   [0, to_vardict(spec), options], action="submit", what="submit jobs",
                                   unix_fds=[fd])
        except CtlError as e:
            raise _submission_error(e, path) from None
        finally:
            os.close(fd)

    async def get_all(self, path: str, interface: str) -> dict[str, Any]:
        (props,) = await self.call(path, PROPS_IFACE, "GetAll", "s", [interface])
        return props

    async def get_property(self, path: str, interface: str, name: str) -> Any:
        (value,) = await self.call(path, PROPS_IFACE, "Get", "ss", [interface, name])
        return value

    async def get_job_path(self, job_id: str) -> str:
        (path,) = await self.manager("GetJob", "s", [job_id])
        return path

    async def read_job(self, path: str, explicit: tuple[str, ...] = JOB_EXPLICIT_PROPERTIES) -> dict[str, Any]:
        """A job's properties: GetAll's, and those of `explicit` (read one by one, at the same time); one the
        caller may not read is a Withheld."""
        props, *values = await asyncio.gather(self.get_all(path, JOB_IFACE),
                                              *(self.get_job_property(path, name) for name in explicit))
        props.update(zip(explicit, values))
        return props

    async def get_job_property(self, path: str, name: str) -> Any:
        """One property of a job, or a Withheld if h2kd does not give it to the caller."""
        try:
            return await self.get_property(path, JOB_IFACE, name)
        except CtlError as e:
            if e.code != ExitCode.NOT_AUTHORIZED:
                raise
            return Withheld(e.message)

    async def job_properties(self, job_id: str, explicit: tuple[str, ...] = JOB_EXPLICIT_PROPERTIES
                             ) -> dict[str, Any]:
        return await self.read_job(await self.get_job_path(job_id), explicit)

    async def workers(self) -> dict[str, dict[str, Any]]:
        """Each worker's properties by object path: the children of the workers' node, read one by one.
        (GetManagedObjects would bring every job along: ~13 MB and a second of decoding with 10,000 jobs.)"""
        (xml,) = await self.call(WORKER_PATH_PREFIX.rstrip("/"), INTROSPECTABLE_IFACE, "Introspect")
        found = {}
        for node in ElementTree.fromstring(xml).findall("node"):
            path = WORKER_PATH_PREFIX + node.get("name", "")
            try:
                (found[path],) = await self._call_once(path, PROPS_IFACE, "GetAll", "s", [WORKER_IFACE], False)
            except DBusError as e:
                if e.type not in _OBJECT_GONE:   # unregistered since the introspection: not a worker now
                    raise self.translate(e, None, "read a worker's properties") from None
        return found

    async def _bus_daemon_call(self, member: str, signature: str = "", body: list | None = None) -> Message:
        """A call to the bus itself (which answers whatever h2kd does); its reply, an error reply included."""
        assert self.bus is not None
        message = Message(destination=BUS_DAEMON, path=BUS_DAEMON_PATH, interface=BUS_DAEMON, member=member,
                          signature=signature, body=body or [])
        try:
            return await asyncio.wait_for(self.bus.call(message), CALL_TIMEOUT)
        except asyncio.TimeoutError:
            raise CtlError(f"the bus did not answer {member} within {CALL_TIMEOUT:.0f} s",
                           ExitCode.UNREACHABLE) from None
        except (OSError, EOFError) as e:
            raise CtlError(f"lost the connection to {self._bus_description}: {e}", ExitCode.UNREACHABLE) from None

    async def add_match(self, rule: str) -> None:
        reply = await self._bus_daemon_call("AddMatch", "s", [rule])
        if reply.message_type == MessageType.ERROR:
            raise CtlError(f"cannot subscribe to signals: {reply.body[0] if reply.body else reply.error_name}")

    async def follow_h2kd_owner(self) -> None:
        """Know from now on which connection is h2kd: the current owner of BUS_NAME, and each new one as the bus
        announces it. Any client of the system bus may send a signal to h2kctl alone, with h2kd's paths and
        members; only the sender, which the bus sets, tells h2kd's own apart."""
        if self._owner_found is None:
            assert self.bus is not None
            self.bus.add_message_handler(self._on_owner_changed)
            self._owner_found = asyncio.ensure_future(self._find_owner())
        # Every job followed at once waits for the one answer; a caller interrupted leaves it to the others.
        await asyncio.shield(self._owner_found)

    async def _find_owner(self) -> None:
        # Subscribed before asking: a change after the answer is then announced, and none is missed.
        await self.add_match(f"type='signal',sender='{BUS_DAEMON}',path='{BUS_DAEMON_PATH}',interface='{BUS_DAEMON}',"
                             f"member='NameOwnerChanged',arg0='{BUS_NAME}'")
        changes = self._owner_changes
        reply = await self._bus_daemon_call("GetNameOwner", "s", [BUS_NAME])
        if changes != self._owner_changes:
            return      # announced while the answer was on its way, or after it: the announcement is newer
        found = reply.message_type == MessageType.METHOD_RETURN and reply.signature == "s"
        self.h2kd_owner = reply.body[0] if found else None     # an error: NameHasNoOwner, h2kd is away

    def _on_owner_changed(self, message: Message) -> None:
        if (message.message_type == MessageType.SIGNAL and message.sender == BUS_DAEMON
                and message.path == BUS_DAEMON_PATH and message.interface == BUS_DAEMON
                and message.member == "NameOwnerChanged" and message.signature == "sss"
                and message.body[0] == BUS_NAME):
            self.h2kd_owner = message.body[2] or None
            self._owner_changes += 1
        return None     # not handled: the other handlers see every message too

    def from_h2kd(self, message: Message) -> bool:
        return message.sender is not None and message.sender == self.h2kd_owner

    def on_message(self, handler: Callable[[Message], None]) -> Callable[[Message], None]:
        """Call `handler` with every signal h2kd sends (once follow_h2kd_owner has run); returns what to give
        remove_handler(). The handler never raises out of here: a signal it cannot make sense of is dropped,
        and the re-reads of whoever follows it set right whatever that signal would have said."""
        assert self.bus is not None

        def wrapped(message: Message) -> None:
            if message.message_type == MessageType.SIGNAL and self.from_h2kd(message):
                try:
                    handler(message)
                except Exception:
                    if os.environ.get("H2KCTL_DEBUG"):
                        traceback.print_exc()
            return None

        self.bus.add_message_handler(wrapped)
        return wrapped

    @contextlib.asynccontextmanager
    async def signals(self, rules: list[str], handler: Callable[[Message], None]) -> AsyncIterator[None]:
        """Signals matching `rules` go to `handler` inside the block, and stop at its end: a client following
        many jobs one after another (h2kctl wait) would otherwise pile up match rules, which the bus limits."""
        assert self.bus is not None
        await self.follow_h2kd_owner()
        wrapped = self.on_message(handler)
        added: list[str] = []
        try:
            for rule in rules:
                await self.add_match(rule)
                added.append(rule)
            yield
        finally:
            self.bus.remove_message_handler(wrapped)
            for rule in added:
                if self.bus.connected:
                    self.bus.send(Message(destination=BUS_DAEMON, path=BUS_DAEMON_PATH,
                                          interface=BUS_DAEMON, member="RemoveMatch", signature="s",
                                          body=[rule], flags=MessageFlag.NO_REPLY_EXPECTED))
