"""Names a user may give, across a NATS cluster: what a subject or a KV key would not take
(spaces, ``/``, ``*``, ``>``, ``.``, non-ASCII, 255 characters of four bytes) works end to
end, spawned on one node and addressed from another; what no spawn takes (too long,
empty, a control character) is refused at the spawn (``cluster.spawn`` too) and sent to
from another node is ``AgentNotFound`` with no bucket lookup and nothing counted
malformed."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from nexus_trio import AgentNotFound, Context, Message, agent
from nexus_trio._nats import NatsServer

from .test_nats import local_node

#: names a NATS subject or KV key would not take as they are, each a good agent name
ODD_NAMES = (
    "order desk",
    "a b/",
    "x*y",
    "*",
    ">",
    "x>y",
    "a.b",
    "a.",
    ".a",
    "café",
    "workers/0",
    "=",
    "\U0001f600" * 255,
    "y" * 255,
)


async def _doubles(ctx: Context, msg: Message) -> Any:
    return msg.payload * 2


async def test_odd_names_work_across_the_cluster_and_bad_ones_are_refused_without_a_lookup(
    nats: NatsServer,
) -> None:
    """Regression: a name had no length limit: one of 70,000 characters spawned on node a
    closed a's control connection (its names bucket key past the 4,096-byte line NATS
    takes) and b judged a lost; and a send from b to a string no spawn takes (``""``,
    ``"a\\nb"``) looked it up in the bucket, whose answer for its key was refused as a
    peer's malformed entry: logged and counted in ``entries_malformed`` at each send."""
    async with (
        local_node(nats.url, "a") as (ka, ca),
        local_node(nats.url, "b") as (kb, cb),
    ):
        with trio.fail_after(30):
            for name in ODD_NAMES:
                ka.spawn(agent(name=name)(_doubles))
            for name in ODD_NAMES:
                assert await cb.wait_for_name(name) == ("a", ka.lookup(name).id), name
                assert await kb.request(name, 21) == 42, name
            # refused where a name enters: a spawn, a placement (before any request)
            for name in ("x" * 256, "x" * 70_000):
                with pytest.raises(ValueError, match="characters long \\(at most 255"):
                    ka.spawn(_doubles, name=name)
                with pytest.raises(ValueError, match="characters long \\(at most 255"):
                    await cb.spawn("doubles", name=name)
            malformed = cb.stats().entries_malformed
            for bad in ("x" * 256, "x" * 70_000, "", "a\nb", " x", "x\x1b"):
                with pytest.raises(AgentNotFound):
                    await kb.send(bad, 1)
                with pytest.raises(AgentNotFound):
                    await kb.request(bad, 1, timeout=5)
            assert cb.stats().entries_malformed == malformed == 0
            assert (ca.readiness(), cb.readiness()) == (None, None)
            assert ca.stats().disconnects == 0
        await ka.shutdown()
        await kb.shutdown()
