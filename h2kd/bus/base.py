"""What the three exported interfaces share: named out-arguments in introspection, and polkit checks.

dbus-fast names method in-arguments after the Python parameters but leaves out-arguments and
signal arguments unnamed; the interface XML in dbus/ names them, so each interface lists those
names (OUT_ARG_NAMES, SIGNAL_ARG_NAMES) and introspect() fills them in, with the EmitsChangedSignal
annotation of properties that change unannounced (UNANNOUNCED_PROPERTIES) or are announced by name only
(INVALIDATED_PROPERTIES), and sd-bus's Explicit annotation of properties read with Get only
(EXPLICIT_PROPERTIES; busctl knows it).
Properties are declared from one table per interface (add_read_properties), so the getters, the
PropertiesChanged payloads and GetManagedObjects all read the same values.
"""

from typing import Any, Callable, ClassVar, Mapping

from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property

from h2kd import BUS_NAME
from h2kd.bus.call import current_caller

ACTION_PREFIX = BUS_NAME + "."
EMITS_CHANGED_SIGNAL = "org.freedesktop.DBus.Property.EmitsChangedSignal"
EXPLICIT = "org.freedesktop.systemd1.Explicit"


class ApiInterface(ServiceInterface):
    OUT_ARG_NAMES: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    SIGNAL_ARG_NAMES: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    # Properties whose changes are not announced by PropertiesChanged (read them when needed).
    UNANNOUNCED_PROPERTIES: ClassVar[frozenset[str]] = frozenset()
    # Properties left out of GetAll and GetManagedObjects (read them one by one with Get).
    EXPLICIT_PROPERTIES: ClassVar[frozenset[str]] = frozenset()
    # Properties whose changes PropertiesChanged names without their values (read them when needed).
    INVALIDATED_PROPERTIES: ClassVar[frozenset[str]] = frozenset()

    def introspect(self):  # type: ignore[override]
        interface = super().introspect()
        for method in interface.methods:
            names = self.OUT_ARG_NAMES.get(method.name, ())
            for arg, name in zip(method.out_args, names):
                arg.name = name
        for signal in interface.signals:
            names = self.SIGNAL_ARG_NAMES.get(signal.name, ())
            for arg, name in zip(signal.args, names):
                arg.name = name
        for prop in interface.properties:
            if prop.name in self.UNANNOUNCED_PROPERTIES:
                prop.annotations[EMITS_CHANGED_SIGNAL] = "false"
            elif prop.name in self.INVALIDATED_PROPERTIES:
                prop.annotations[EMITS_CHANGED_SIGNAL] = "invalidates"
            if prop.name in self.EXPLICIT_PROPERTIES:
                prop.annotations[EXPLICIT] = "true"
        return interface


def add_read_properties(cls: type, table: Mapping[str, tuple[str, Callable[[Any], Any]]], source: str) -> None:
    """Declare one read-only D-Bus property per table entry: name -> (signature, value from self.<source>)."""
    for name, (signature, value_of) in table.items():
        getter = _make_getter(name, signature, value_of, source)
        setattr(cls, name, dbus_property(access=PropertyAccess.READ, name=name)(getter))


def _make_getter(name: str, signature: str, value_of: Callable[[Any], Any], source: str) -> Callable[[Any], Any]:
    def getter(self: Any) -> Any:
        return value_of(getattr(self, source))
    # dbus-fast reads the D-Bus type from the return annotation and fetches the value by __name__.
    getter.__name__ = name
    getter.__annotations__ = {"return": signature}
    return getter


class Authorizer:
    """polkit checks for the current caller (see h2kd.bus.auth.Authority)."""

    def __init__(self, authority: Any):
        self._authority = authority

    async def check(self, action: str, details: dict[str, str] | None = None, interactive: bool = True) -> None:
        """interactive=False: never ask the caller's agent, whatever the call allows."""
        caller = current_caller()
        await self._authority.check(caller.sender, ACTION_PREFIX + action, interactive and caller.allow_interactive,
                                    details)

    async def caller_uid(self) -> int:
        return await self._authority.caller_uid(current_caller().sender)

    async def caller_connected(self) -> bool:
        """Whether the caller is still on the bus (see Authority.connected)."""
        return await self._authority.connected(current_caller().sender)

    async def caller_groups(self) -> tuple[int, ...] | None:
        """The groups of the caller's connection (UnixGroupIDs), None if the bus does not tell them."""
        return await self._authority.caller_groups(current_caller().sender)
