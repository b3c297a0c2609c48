"""Errors the core raises; each maps to one D-Bus error name org.hyper2kvm.h2kd1.Error.<dbus_name>."""

from __future__ import annotations


class H2kError(Exception):
    """Base class. The message is shown to users as is, so it must read as a sentence."""

    dbus_name = "Failed"


class NoSuchJob(H2kError):
    dbus_name = "NoSuchJob"


class NoSuchWorker(H2kError):
    dbus_name = "NoSuchWorker"


class InvalidSpec(H2kError):
    """A job spec failed validation. `field` names the offending field (dotted path)."""

    dbus_name = "InvalidSpec"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class InvalidState(H2kError):
    dbus_name = "InvalidState"


class AlreadyExists(H2kError):
    dbus_name = "AlreadyExists"


class QueueFull(H2kError):
    dbus_name = "QueueFull"


class StoreFailed(H2kError):
    """The job store could not be written (e.g. its disk is full); nothing of the request was kept, except when
    the disk failed to confirm a committed write: its message then says the change's fate is known only after
    h2kd has restarted (which it then does)."""

    dbus_name = "StoreFailed"


class InvalidArgument(H2kError):
    dbus_name = "InvalidArgument"


class NotAuthorized(H2kError):
    """Raised by the authorization layer; the bus maps it to org.freedesktop.DBus.Error.AccessDenied."""

    dbus_name = "NotAuthorized"


class AuthorizationUnavailable(NotAuthorized):
    """No answer could be had (polkit unreachable, too many checks of the caller under way): not a "no"."""


class InteractiveAuthorizationRequired(H2kError):
    dbus_name = "InteractiveAuthorizationRequired"
