"""Declaring agents: ``@agent`` bare and with options on functions and classes, ``agent(X)``,
the ``Agent`` base class, and what a handler may return."""

from __future__ import annotations

from typing import Any

from nexus_trio import Agent, AgentSpec, Context, Message, MessageKind, agent


@agent
async def echo(ctx: Context, msg: Message) -> Any:
    return msg.payload


@agent(name="greeter", mailbox_capacity=64, handle_timeout=2.0, overflow="drop_oldest")
async def greeter(ctx: Context, msg: Message) -> str:
    return f"hello {msg.payload}"


@agent(restart="transient", shutdown_timeout=1.0)
async def forwarder(ctx: Context, msg: Message) -> Message | None:
    if msg.kind is MessageKind.EVENT:
        return None
    return Message(sender=ctx.id, to="greeter", payload=msg.payload)


class Counter(Agent):
    def __init__(self) -> None:
        self.count = 0

    async def on_start(self, ctx: Context) -> None:
        self.count = 0

    async def handle(self, ctx: Context, msg: Message) -> int:
        self.count += 1
        return self.count

    async def on_stop(self, ctx: Context) -> None:
        ctx.log.info("counted %d", self.count)


@agent(name="tally")
class Tally(Agent):
    async def handle(self, ctx: Context, msg: Message) -> int:
        return len(str(msg.payload))


async def shout(ctx: Context, msg: Message) -> str:
    return str(msg.payload).upper()


counter_spec: AgentSpec = agent(Counter)
shout_spec: AgentSpec = agent(shout)
echo_spec: AgentSpec = echo
# mypy keeps a decorated class's own type (class decorators cannot change it), so `Tally` is
# `type[Tally]` to the checker and an AgentSpec at run time; spawn accepts both.
renamed: AgentSpec = echo.with_options(name="echo-2")
# agent(Cls, name=...) is used in docs/supervision.md and examples/supervised.py: it works at
# run time; the overload that types it is pending in nexus_trio/_agent.py.
named_counter: AgentSpec = agent(Counter, name="counter")
named_handler: AgentSpec = agent(shout, name="shout")

ALL_SPECS: tuple[AgentSpec, ...] = (
    echo_spec,
    greeter,
    forwarder,
    counter_spec,
    shout_spec,
    renamed,
    named_counter,
    named_handler,
)


def misspelt_options() -> list[str]:
    """A misspelt option of ``agent``, ``AgentSpec.with_options`` and ``AgentSpec``: the type checker
    flags the first (an ignore it did not need is an error: ``warn_unused_ignores``), and
    at run time each is a TypeError naming the option meant; returns their texts."""
    texts = []
    try:
        agent(shout, capacity=5)  # type: ignore[call-overload]
    except TypeError as exc:
        texts.append(str(exc))
    try:
        agent(capacity=5)  # type: ignore[call-overload]
    except TypeError as exc:
        texts.append(str(exc))
    try:
        echo.with_options(capacity=5)
    except TypeError as exc:
        texts.append(str(exc))
    try:
        AgentSpec(factory=echo.factory, capacity=5)  # type: ignore[call-arg]
    except TypeError as exc:
        texts.append(str(exc))
    return texts
