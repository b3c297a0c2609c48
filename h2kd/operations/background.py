"""Background: one call run on a thread of its own while the caller goes on (qemu-img runs that only read,
an fsync); result() hands back its value, or raises its error, in the caller's thread."""

from __future__ import annotations

import threading
from typing import Any, Callable


class Background:
    """A call run in a thread of its own; result() waits for it and returns its value or raises its error."""

    def __init__(self, call: Callable[[], Any], name: str = "background"):
        self._value: Any = None
        self._error: BaseException | None = None
        self._call = call
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as e:      # handed to whoever asks for the result
            self._error = e

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
