"""The tests' dbus-fast client of h2kd: bench's client, recording every signal, with calls that may expect an error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any, Awaitable, Iterator

from dbus_fast import Message, MessageType, Variant

from bench.client import JOB, MANAGER, OBJECT_MANAGER, PROPERTIES, WORKER, CallFailed, new_id
from bench.client import ERROR_PREFIX as ERR
from bench.client import Client as BenchClient
from h2kd.bus.variants import to_vardict

__all__ = ["ERR", "JOB", "MANAGER", "OBJECT_MANAGER", "PROPERTIES", "WORKER", "CallFailed", "Client", "new_id",
           "read_until", "run", "spec", "wait_for"]


class Client(BenchClient):
    """With watch=True, every signal h2kd sends is kept in `signals`. A call given expect_error=NAME asserts
    that it fails with that D-Bus error and returns the error's text; otherwise a failure raises CallFailed."""

    def __init__(self, bus: Any):
        super().__init__(bus)
        self.signals: list[Message] = []

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL and msg.sender != "org.freedesktop.DBus":
            self.signals.append(msg)
        return super()._on_message(msg)

    async def call(self, path: str, interface: str, member: str, signature: str = "", body: list | None = None,
                   expect_error: str | None = None, **options: Any) -> Any:
        return await _expecting(member, expect_error, super().call(path, interface, member, signature, body,
                                                                   **options))

    async def manager(self, member: str, signature: str = "", body: list | None = None,
                      expect_error: str | None = None) -> Any:
        return await _expecting(member, expect_error, super().manager(member, signature, body))

    async def submit(self, spec: dict, queue: bool = True, expect_error: str | None = None) -> Any:
        return await _expecting("SubmitJob", expect_error, super().submit(spec, queue))


async def _expecting(member: str, expect_error: str | None, reply: Awaitable[Any]) -> Any:
    if expect_error is None:
        return await reply
    try:
        body = await reply
    except CallFailed as failure:
        assert failure.name == expect_error, f"{member}: {failure.name}: {failure.text}"
        return failure.text
    raise AssertionError(f"{member} succeeded ({body}); expected {expect_error}")


def spec(job_id: str | None = None, priority: int | None = None, requirements: dict[str, str] | None = None,
         path: str = "/etc/hostname") -> dict[str, Variant]:
    """An inspect job's spec as a{sv}, ready for a raw SubmitJob call."""
    return to_vardict({"operation": "inspect", "image": {"path": path}, "job_id": job_id or None,
                       "execution_policy": None if priority is None else {"priority": priority},
                       "capability_requirements": requirements or None})


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


async def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def read_until(proc: subprocess.Popen[str], text: str, timeout: float = 60, stream: str = "stdout") -> str:
    """What a client program (h2kctl watch, dbus-monitor) writes (on `stream`), read until it has written `text`:
    that is how a test knows the program has subscribed, under any load, rather than by sleeping a while. Read
    from the pipe itself, bypassing the file object's buffer, so communicate() afterwards gets the rest."""
    pipe = getattr(proc, stream)
    assert pipe is not None
    fd = pipe.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in data:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {text!r} within {timeout} s; so far: {data.decode(errors='replace')}"
        chunk = os.read(fd, 65536)
        assert chunk, f"the program ended before writing {text!r}; it wrote: {data.decode(errors='replace')}"
        data += chunk
    return data.decode(errors="replace")


@contextlib.contextmanager
def open_bus(directory: Path) -> Iterator[str]:
    """A system-type dbus-daemon of our own in `directory` that lets anyone own any name; its address."""
    config, socket_path = directory / "bus.conf", directory / "bus"
    config.write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={socket_path}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow send_destination="*"/><allow receive_sender="*"/><allow own="*"/>
</policy></busconfig>
""")
    bus = subprocess.Popen(["dbus-daemon", "--config-file", str(config), "--nofork", "--print-address"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert bus.stdout is not None
        bus.stdout.readline()
        yield f"unix:path={socket_path}"
    finally:
        bus.terminate()
        bus.wait(10)
