"""Two agents, A and B: the system pings A, A pings B, each answers with a pong.

Run it with ``python examples/ping_agent.py``.
"""

from __future__ import annotations

from typing import Any

import trio

from nexus_trio import SYSTEM_ID, Agent, Context, Message, open_kernel


class Pinger(Agent):
    """Answers every ping with a pong that counts how many it has seen; A also pings B."""

    def __init__(self) -> None:
        self.count = 0

    async def handle(self, ctx: Context, msg: Message) -> Any:
        if not (isinstance(msg.payload, dict) and msg.payload.get("ping")):
            return None
        self.count += 1
        # a message carries its sender's id; the kernel's refs carry the names
        names = {ref.id: ref.name for ref in ctx.kernel.agents()}
        origin = "system" if msg.sender == SYSTEM_ID else names.get(msg.sender, str(msg.sender))
        print(f"{ctx.name} got ping #{self.count} from {origin}")
        if ctx.name == "A":
            answer = await ctx.request("B", {"ping": True})
            print(f"A got pong from B: {answer}")
        return {"pong": True, "count": self.count, "agent": ctx.name}


async def main() -> None:
    async with open_kernel() as kernel:
        kernel.spawn(Pinger, name="A")
        kernel.spawn(Pinger, name="B")
        for _ in range(2):
            reply = await kernel.request("A", {"ping": True}, timeout=2.0)
            print(f"system got pong from A: {reply}")
    stats = kernel.stats()
    print(
        f"shut down cleanly: {stats.handled} handled, {stats.replies_delivered} replies, "
        f"{stats.dead_lettered} dead letters, {stats.in_flight} in flight"
    )


if __name__ == "__main__":
    trio.run(main)
