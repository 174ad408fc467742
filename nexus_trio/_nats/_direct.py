"""Messages of a subscription taken inline, in nats-py's reading task, with no task switch.

nats-py queues each message of a subscription that has a callback for the
subscription's own asyncio task. Under trio-asyncio every asyncio task switch is a turn
of the Trio scheduler (one callback per ``_main_loop_one``), measured at ~100 us on this
2-core machine against ~30 us in plain asyncio, and a request between two kernels paid
it twice (the query on the responder, the reply on the requester). Our callbacks never
suspend, so while the subscription's queue is empty nothing of it is in flight, and a
message can be handed to a synchronous ``take`` right where nats-py parsed it, in order.

This relies on nats-py internals (``Subscription._pending_queue``, ``_pending_size``),
checked when installed: a nats-py release without them leaves the subscription as it
was (its task delivers, only later). Writing a published message to the socket at once
instead of waiting for the client's flusher task was measured too, and dropped: on this
machine it made a request slower (the writer's process keeps the CPU the server and the
receiver need; see docs/distributed.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("nexus_trio.nats")


def deliver_inline(sub: Any, take: Callable[[Any], None]) -> bool:
    """Hand the messages of subscription ``sub`` to ``take`` in nats-py's reading task.

    ``sub`` must have been subscribed with a callback that only calls ``take``, and
    ``take`` must never suspend: a message that finds older ones still queued for the
    subscription's task (only those that came before this call) goes behind them, to
    that callback, so the order is kept. An exception from ``take`` is logged, never
    raised into the client's reading task (which would stop reading). Returns False,
    changing nothing, if ``sub`` does not have the expected shape.
    """
    queue = getattr(sub, "_pending_queue", None)
    if not isinstance(queue, asyncio.Queue) or not isinstance(
        getattr(sub, "_pending_size", None), int
    ):
        return False
    queue_put = queue.put_nowait

    def put_nowait(msg: Any) -> None:
        if not queue.empty():
            queue_put(msg)
            return
        # nats-py counted its bytes as waiting for the subscription's task: not any more
        sub._pending_size -= len(msg.data)
        try:
            take(msg)
        except Exception:
            log.exception("a NATS message on %s could not be handled", msg.subject)

    # an instance attribute: this one queue, which nats-py fills through put_nowait
    setattr(queue, "put_nowait", put_nowait)  # noqa: B010
    return True
