"""Running agents: a kernel, spawn (agents, classes, handlers, supervisors), tell, request,
replies, stop, stats, events and dead letters, as a user program writes them."""

from __future__ import annotations

import uuid
from typing import Any

import trio

from nexus_trio import (
    SYSTEM_ID,
    AgentNotFound,
    AgentRef,
    Backoff,
    Config,
    DeadLetter,
    KernelConfig,
    KernelStats,
    Message,
    MessageKind,
    NexusError,
    RequestTimeout,
    RestartStrategy,
    Supervisor,
    new_id,
    open_kernel,
)

from .agents import Counter, Tally, echo, greeter


async def main() -> dict[str, Any]:
    """Exercise the kernel API; returns what it saw (checked by test_typing_usage.py)."""
    config = Config(kernel=KernelConfig(mailbox_capacity=128, send_timeout_ms=100))
    seen: dict[str, Any] = {}
    async with open_kernel(config) as kernel:
        echo_ref: AgentRef = kernel.spawn(echo)
        counter: AgentRef = kernel.spawn(Counter, name="counter")
        kernel.spawn(greeter)
        team: AgentRef = kernel.spawn(
            Supervisor(
                strategy=RestartStrategy.ONE_FOR_ALL,
                max_restarts=3,
                within=5.0,
                backoff=Backoff(initial=0.01, maximum=0.1, jitter=0.2),
                children=[Tally, echo.with_options(name="team-echo")],
                name="team",
            )
        )
        sent: Message = await kernel.send(counter, {"n": 1})
        kernel.send_nowait(echo_ref, "no wait", kind=MessageKind.EVENT)
        seen["count"] = await kernel.request("counter", None, timeout=5.0)
        seen["greeting"] = await kernel.request(kernel.lookup("greeter"), "world")
        seen["echo"] = await kernel.request(echo_ref.id, [1, 2, 3], trace_id=new_id())
        seen["sent_id"] = sent.id
        seen["team_is_local"] = kernel.is_local(team)
        reply: Message = sent.reply(counter.id, "ok")
        seen["reply_to"] = reply.reply_to
        seen["evolved_to"] = sent.evolve(to="greeter").to
        try:
            await kernel.send(uuid.uuid4(), "nobody")
        except AgentNotFound as exc:
            seen["not_found"] = type(exc).__name__
        try:
            await kernel.request("nobody-by-that-name", timeout=0.5)
        except RequestTimeout:
            seen["timeout"] = True
        except NexusError as exc:
            seen["request_error"] = type(exc).__name__
        try:
            # (flagged by the type checker too: an ignore it did not need is an error)
            kernel.spawn(echo, capacity=5)  # type: ignore[call-overload]
        except TypeError as exc:
            seen["misspelt_option"] = str(exc)
        await kernel.stop(counter)
        stats: KernelStats = kernel.stats()
        seen["handled"] = stats.handled
        seen["agents"] = sorted(ref.name or "" for ref in kernel.agents())
        recent: list[DeadLetter] = kernel.recent_dead_letters()
        seen["dead_letters"] = len(recent)
        seen["sender_is_system"] = sent.sender == SYSTEM_ID
    return seen


if __name__ == "__main__":
    print(trio.run(main))
