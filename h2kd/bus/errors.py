"""Turns exceptions raised while serving a call into named D-Bus errors; a caller never sees a traceback.

H2kError subclasses become org.hyper2kvm.h2kd1.Error.<dbus_name>; polkit refusals become the
standard org.freedesktop.DBus.Error names; anything unexpected becomes ...Error.Failed with a short
message, and the traceback goes to the log only.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

from dbus_fast.errors import DBusError

from h2kd import BUS_NAME
from h2kd.errors import H2kError, InteractiveAuthorizationRequired, InvalidState, NotAuthorized
from h2kd.model.states import InvalidTransition

log = logging.getLogger("h2kd.bus")

ERROR_PREFIX = BUS_NAME + ".Error."
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
INTERACTIVE_AUTHORIZATION_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
FAILED = ERROR_PREFIX + "Failed"


def to_dbus_error(exc: BaseException, member: str = "") -> DBusError:
    if isinstance(exc, DBusError):
        return exc
    if isinstance(exc, NotAuthorized):
        return DBusError(ACCESS_DENIED, str(exc) or "not authorized")
    if isinstance(exc, InteractiveAuthorizationRequired):
        return DBusError(INTERACTIVE_AUTHORIZATION_REQUIRED, str(exc) or "interactive authorization required")
    if isinstance(exc, H2kError):
        return DBusError(ERROR_PREFIX + exc.dbus_name, str(exc) or exc.__class__.__name__)
    if isinstance(exc, InvalidTransition):  # the state machine said no: same meaning as InvalidState
        return DBusError(ERROR_PREFIX + InvalidState.dbus_name, str(exc))
    log.error("%s failed unexpectedly", member or "a D-Bus call", exc_info=exc)
    return DBusError(FAILED, f"internal error in h2kd ({exc.__class__.__name__}); see the h2kd log")


def bus_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a D-Bus method body (sync or async) so every exception leaves as a named D-Bus error.

    Keeps the signature (dbus-fast reads the D-Bus types from its annotations).
    """
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except Exception as exc:
                raise to_dbus_error(exc, fn.__name__) from None
        return async_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise to_dbus_error(exc, fn.__name__) from None
    return wrapper
