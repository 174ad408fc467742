"""A live durable message after a restart of its node that left messages waiting.

    python benchmarks/durable_waiting_restart.py [--waiting 1000] [--delay 15] [--rounds 1]

Starts a private nats-server (JetStream, 127.0.0.1). A first process of node ``a``
(``DurableOptions(max_waiting=--waiting)``, ``missing_agent_delay`` and its cap
``--delay``: the longest wait of the defaults, 15 s, from the first nak; the other
options default: ``max_in_flight`` 64, the consumer's ``max_ack_pending`` ``4 x 64 +
--waiting``) gets ``--waiting`` messages for a name no agent has and lets them all wait,
then leaves. A second process of ``a`` (same options) gets as many again, and once each
is decided (waiting, or terminated past the bound) one message for an agent it runs:
prints how long that one took (wall time, from its store to its handler), and the
second process's counters. (In the forty-third pass the slots held at the bind count
against ``max_waiting``; before, the second process let as many more wait, which held
every slot of the consumer.)
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


from nexus_trio import Context, Message, agent, open_kernel  # noqa: E402
from nexus_trio._nats import ClusterOptions, DurableOptions, NatsServer, join_cluster  # noqa: E402
from nexus_trio._nats import _wire as wire  # noqa: E402
from nexus_trio._nats._aio import call_aio  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from durable_waiting import _until, counters, print_rounds, store_burst  # noqa: E402


def _decided(cluster: Any) -> int:
    stats = cluster.stats()
    return int(stats.durable_agent_missing + stats.durable_wait_full)


async def one_round(waiting: int, delay: float) -> dict[str, Any]:
    server = NatsServer().start()
    live: list[float] = []
    durable = DurableOptions(
        max_waiting=waiting, missing_agent_delay=delay, missing_agent_delay_max=delay
    )
    options = ClusterOptions(durable=durable)
    try:

        @agent(name="there")
        async def there(ctx: Context, msg: Message) -> Any:
            live.append(time.monotonic())
            return "ok"

        out: dict[str, Any] = {}
        async with (
            open_kernel() as kernel,
            join_cluster(kernel, server.url, "a", options=options) as cluster,
        ):
            await call_aio(store_burst, cluster, range(waiting), "gone")
            await _until(lambda: _decided(cluster) >= waiting)
            out["first_waiting"] = cluster.stats().durable_agent_missing
            await kernel.shutdown()
        async with (
            open_kernel() as kernel,
            join_cluster(kernel, server.url, "a", options=options) as cluster,
        ):
            kernel.spawn(there)
            await call_aio(store_burst, cluster, range(waiting), "gone")
            await _until(lambda: _decided(cluster) >= min(waiting, 4 * 64))
            msg = Message(sender=uuid.uuid4(), to="there", payload="live")
            sent = time.monotonic()
            await call_aio(
                cluster.data_js.publish,
                wire.durable_subject(cluster.prefix, cluster.node, uuid.uuid4()),
                wire.encode_message(msg),
                headers={wire.MSG_ID_HEADER: str(msg.id)},
            )
            await _until(lambda: bool(live), timeout=120.0)
            out["live_message_s"] = round(live[0] - sent, 3)
            out.update(counters(cluster, "second_"))
            await kernel.shutdown()
        return out
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print_rounds(args.rounds, one_round, args.waiting, args.delay)


if __name__ == "__main__":
    main()
