"""Many KV writes at once: what a node writes or drops in bulk (the names of the agents
it spawns, its names and placement records on a clean leave, the names of a forgotten
node) goes out in windows of concurrent requests, not one round trip after another.

One at a time, a node holding 5,000 placed agents spent about 10 s on its 10,000
deletes, past the 5 s its leave is given: the leave was cut off before it announced
itself, and the others judged the node lost instead of gone.

And what a node reads in bulk: the watch of a bucket (:class:`Watch`), which replays
every entry to a node joining, applies each one where nats-py reads it; what the watch
refuses is counted and logged without flooding the log (:class:`Refusals`).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, final

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.client import KV_STREAM_TEMPLATE
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE, KeyValue

from .._logcall import log_guarded
from .._plural import count_of, first_few
from .._throttle import Throttle
from . import _direct as direct
from . import _wire as wire
from ._aio import call_aio
from ._held import HeldLines

if TYPE_CHECKING:
    from nats.aio.msg import Msg as NatsMsg
    from nats.js import JetStreamContext

log = logging.getLogger("nexus_trio.nats")

#: writes in flight at once (each is one JetStream publish and its ack)
WINDOW: Final = 256


def bucket_stream(config: api.KeyValueConfig, max_consumers: int) -> api.StreamConfig:
    """The stream of the KV bucket ``config``, as nats-py's ``create_key_value`` makes it
    (its settings copied: nats-py 2.x) but with ``max_consumers``: made so with
    ``add_stream``, whose answer carries the stream's info (``create_key_value`` returns
    none, and the stream then had to be read again and updated to a limit of consumers
    of its own: four requests a bucket at a cluster's first join, two now)."""
    duplicate_window = 120.0  # (nats-py's: 2 minutes, or the TTL if shorter)
    if config.ttl and config.ttl < duplicate_window:
        duplicate_window = config.ttl
    return api.StreamConfig(
        name=KV_STREAM_TEMPLATE.format(bucket=config.bucket),
        description=config.description,
        subjects=[f"$KV.{config.bucket}.>"],
        allow_direct=config.direct,
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        deny_delete=True,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=duplicate_window,
        max_age=config.ttl,
        max_bytes=config.max_bytes,
        max_consumers=max_consumers,
        max_msg_size=config.max_value_size,
        max_msgs=-1,
        max_msgs_per_subject=config.history,
        num_replicas=config.replicas,
        storage=config.storage,
        republish=config.republish,
    )


async def put_values(kv: KeyValue, entries: Sequence[tuple[str, bytes]]) -> list[int | Exception]:
    """Put each ``(key, value)`` of ``entries`` (distinct keys), all at once: one outcome
    per entry, in order, the revision written or the exception of a put that failed."""

    async def one(key: str, value: bytes) -> int | Exception:
        try:
            return await kv.put(key, value)
        except Exception as exc:
            return exc

    async def all_of() -> list[int | Exception]:
        return list(await asyncio.gather(*(one(key, value) for key, value in entries)))

    return await call_aio(all_of)


async def read_names(
    kv: KeyValue, names: Sequence[str], *, window: int = WINDOW
) -> list[Any | Exception | None]:
    """Read the entry of each of ``names`` (its key :func:`_wire.name_key`), ``window``
    at a time: one outcome per name, in order, the entry, None if there is none (or it
    was deleted), or the exception of a read that failed (the bucket unreachable)."""

    async def one(key: str) -> Any | Exception | None:
        try:
            return await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except Exception as exc:
            return exc

    async def all_of(chunk: Sequence[str]) -> list[Any | Exception | None]:
        return list(await asyncio.gather(*(one(wire.name_key(name)) for name in chunk)))

    outcomes: list[Any | Exception | None] = []
    for start in range(0, len(names), window):
        outcomes += await call_aio(all_of, names[start : start + window])
    return outcomes


async def delete_names(
    kv: KeyValue,
    entries: Sequence[tuple[str, int]],
    not_dropped: Callable[[Sequence[tuple[str, Exception]]], None] | None = None,
    *,
    window: int = WINDOW,
) -> list[bool | Exception]:
    """Delete the entry of each ``(name, revision)`` of ``entries`` (its key
    :func:`_wire.name_key`) if it is still at that revision (a compare-and-set: an entry
    written since is kept), ``window`` at a time.

    One outcome per entry, in order: True (deleted), False (the entry changed since, or
    was deleted already), or the exception of a delete that failed (the bucket
    unreachable); those, as ``(name, exception)``, are handed to ``not_dropped`` in one
    call if given (see :func:`say_not_dropped`). Never raises for one entry; cancelling
    the caller cancels the rest.
    """

    async def one(key: str, revision: int) -> bool | Exception:
        try:
            await kv.delete(key, last=revision)
        except nats.js.errors.BadRequestError:
            return False  # "wrong last sequence": written again, or dropped, since
        except Exception as exc:
            return exc
        return True

    async def all_of(chunk: Sequence[tuple[str, int]]) -> list[bool | Exception]:
        return list(await asyncio.gather(*(one(key, revision) for key, revision in chunk)))

    keyed = [(wire.name_key(name), revision) for name, revision in entries]
    outcomes: list[bool | Exception] = []
    for start in range(0, len(keyed), window):
        outcomes += await call_aio(all_of, keyed[start : start + window])
    failed = [
        (name, outcome)
        for (name, _), outcome in zip(entries, outcomes, strict=True)
        if isinstance(outcome, Exception)
    ]
    if not_dropped is not None and failed:
        not_dropped(failed)
    return outcomes


def say_not_dropped(node: str, what: str, failed: Sequence[tuple[str, Exception]]) -> None:
    """One WARNING line for the entries of ``node`` a :func:`delete_names` could not drop
    (``what``: "name", "placement record"): how many, the first few, the first error.
    A leave whose bucket did not answer (its server gone) failed every drop, and said a
    line each: 2,000 lines for 2,000 names (forty-seventh pass)."""
    log_guarded(
        log,
        logging.WARNING,
        "node %s: could not drop %s: %s (%r)",
        node,
        count_of(len(failed), what),
        first_few([name for name, _ in failed]),
        failed[0][1],
    )


#: a watch whose replay brings nothing new for this long fails (the server does not deliver)
REPLAY_STALL: Final = 30.0


class Watch:
    """Every entry of a KV bucket (its latest value per key, then each update) handed to
    ``apply(entry)`` (a :class:`nats.js.kv.KeyValue.Entry`) as nats-py reads it.

    What ``kv.watchall()`` does, but without its queue: that one hands each entry over
    through two asyncio tasks (the subscription's and the reader of the watcher, whose
    ``updates()`` makes a task per entry), three turns of the Trio scheduler each under
    trio-asyncio. A node joining a cluster of 10,000 names and records spent 3.7-4.2 s
    replaying them so; each is applied where it is read now (see
    :func:`_direct.deliver_inline`). ``apply`` must not suspend; an entry it raises for is
    logged and skipped.
    """

    def __init__(self, apply: Callable[[KeyValue.Entry], None]) -> None:
        self._apply = apply
        self._sub: Any = None
        self._ready: asyncio.Future[None] | None = None
        #: entries applied so far
        self.applied = 0

    async def start(self, js: JetStreamContext, kv: KeyValue, stall: float = REPLAY_STALL) -> None:
        """Subscribe (asyncio side) and return once the bucket's current entries are
        applied; ``nats.errors.TimeoutError`` if the replay stalls for ``stall`` s."""
        self._ready = ready = asyncio.get_running_loop().create_future()
        bucket = kv._name  # (nats-py keeps them private; a KV bucket is its stream)
        prefix = f"$KV.{bucket}."

        def take(msg: NatsMsg) -> None:
            entry = _entry(bucket, prefix, msg)
            if entry is not None:
                self.applied += 1
                self._apply(entry)
            if not ready.done() and msg.metadata.num_pending == 0:
                ready.set_result(None)

        async def on_message(msg: NatsMsg) -> None:
            take(msg)

        self._sub = sub = await js.subscribe(
            f"{prefix}>",
            stream=f"KV_{bucket}",
            cb=on_message,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=300.0,
        )
        direct.deliver_inline(getattr(sub, "_sub", sub), take)
        info = await sub.consumer_info()
        if info.num_pending == 0 and sub.delivered == 0 and not ready.done():
            ready.set_result(None)  # an empty bucket
        while True:
            applied = self.applied
            try:
                await asyncio.wait_for(asyncio.shield(ready), stall)
                return
            except TimeoutError:
                if self.applied == applied:
                    await self.stop()
                    raise nats.errors.TimeoutError from None

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()


@final
class Refusals:
    """The entries of a bucket its watch refuses (a key the code does not write, a body
    that is not one): counted, and logged at once, then at most once a second with the
    count so far, as anyone who may write the bucket can write many."""

    __slots__ = ("_held", "_log", "count", "what")

    def __init__(self, what: str, held: HeldLines | None = None) -> None:
        #: what an entry of the bucket is, for the log line ("a placement record")
        self.what = what
        self.count = 0
        self._log = Throttle(kind="cluster.kv_entry_ignored")
        # the node's: the entries refused after the last line are said at its leave
        self._held = HeldLines() if held is None else held

    def refuse(self, node: str, key: str, why: str) -> None:
        """Count the entry at ``key`` refused by ``node``, saying ``why``."""
        self.count += 1
        kind = self.what.removeprefix("a ")
        if self._held.due(self._log, f"refused entries ({kind})", counted="entries_malformed"):
            log_guarded(
                log,
                logging.WARNING,
                "node %s: ignoring %s %r: %s (%d so far)",
                node,
                self.what,
                key,
                why,
                self.count,
            )


def _entry(bucket: str, prefix: str, msg: NatsMsg) -> KeyValue.Entry | None:
    """The KV entry of a message of the bucket's stream, as ``kv.watch`` makes it; None
    for a marker of a kind it does not know (nats-server 2.11+)."""
    meta = msg.metadata
    headers = msg.headers
    op = None
    if headers and KV_OP in headers:
        op = headers[KV_OP]
    elif headers and KV_MARKER_REASON in headers:
        reason = headers[KV_MARKER_REASON]
        if reason in ("MaxAge", "Purge"):
            op = KV_PURGE
        elif reason == "Remove":
            op = KV_DEL
        else:
            return None
    return KeyValue.Entry(
        bucket=bucket,
        key=msg.subject[len(prefix) :],
        value=msg.data,
        revision=meta.sequence.stream,
        delta=meta.num_pending,
        created=None,  # (unread here)
        operation=op,
    )
