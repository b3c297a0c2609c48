"""A dbus-fast client of h2kd for tests and benchmarks: calls, properties, recorded signals, waiting."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from h2kd import BUS_NAME, MANAGER_PATH

MANAGER = BUS_NAME + ".Manager"
JOB = BUS_NAME + ".Job"
WORKER = BUS_NAME + ".Worker"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"
ERR = BUS_NAME + ".Error."


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Client:
    """A dbus-fast connection to the private bus that records every signal h2kd sends."""

    def __init__(self, bus: MessageBus):
        self.bus = bus
        self.signals: list[Message] = []

    @classmethod
    async def connect(cls, address: str, watch: bool = False) -> "Client":
        client = cls(await MessageBus(bus_address=address).connect())
        if watch:
            client.bus.add_message_handler(client._record)
            await client.dbus("AddMatch", "s", [f"type='signal',sender='{BUS_NAME}'"])
        return client

    def _record(self, msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL and msg.sender != "org.freedesktop.DBus":
            self.signals.append(msg)
        return False

    async def dbus(self, member: str, signature: str, body: list) -> Message:
        return await self.bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                           interface="org.freedesktop.DBus", member=member,
                                           signature=signature, body=body))

    async def call(self, path: str, interface: str, member: str, signature: str = "", body: list | None = None,
                   expect_error: str | None = None) -> Any:
        reply = await self.bus.call(Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                                            signature=signature, body=body or []))
        if expect_error is not None:
            assert reply.message_type == MessageType.ERROR, f"{member} succeeded; expected {expect_error}"
            assert reply.error_name == expect_error, f"{member}: {reply.error_name}: {reply.body}"
            return reply.body[0] if reply.body else ""
        assert reply.message_type == MessageType.METHOD_RETURN, f"{member} failed: {reply.error_name}: {reply.body}"
        return reply.body

    async def manager(self, member: str, signature: str = "", body: list | None = None, **kw: Any) -> Any:
        return await self.call(MANAGER_PATH, MANAGER, member, signature, body, **kw)

    async def submit(self, spec: dict, queue: bool = True, **kw: Any) -> Any:
        return await self.manager("SubmitJob", "a{sv}a{sv}", [spec, {"queue": Variant("b", queue)}], **kw)

    async def prop(self, path: str, interface: str, name: str) -> Any:
        (value,) = await self.call(path, PROPERTIES, "Get", "ss", [interface, name])
        return value.value

    async def job_ids(self) -> list[str]:
        (jobs,) = await self.manager("ListJobs", "a{sv}", [{}])
        return [j[0] for j in jobs]

    def close(self) -> None:
        self.bus.disconnect()


def spec(job_id: str | None = None, priority: int | None = None, requirements: dict | None = None,
         path: str = "/etc/hostname") -> dict:
    out = {"operation": Variant("s", "inspect"), "image": Variant("a{sv}", {"path": Variant("s", path)})}
    if job_id:
        out["job_id"] = Variant("s", job_id)
    if priority is not None:
        out["execution_policy"] = Variant("a{sv}", {"priority": Variant("u", priority)})
    if requirements:
        out["capability_requirements"] = Variant("a{sv}", {k: Variant("s", v) for k, v in requirements.items()})
    return out


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
