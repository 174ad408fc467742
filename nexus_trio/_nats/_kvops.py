"""Many KV writes at once: what a node writes or drops in bulk (the names of the agents
it spawns, its names and placement records on a clean leave, the names of a forgotten
node) goes out in windows of concurrent requests, not one round trip after another.

One at a time, a node holding 5,000 placed agents spent about 10 s on its 10,000
deletes, past the 5 s its leave is given: the leave was cut off before it announced
itself, and the others judged the node lost instead of gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import nats.js.errors

from . import _wire as wire
from ._aio import call_aio

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

#: writes in flight at once (each is one JetStream publish and its ack)
WINDOW: Final = 256


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


async def delete_names(
    kv: KeyValue,
    entries: Sequence[tuple[str, int]],
    not_dropped: Callable[[str, Exception], None] | None = None,
    *,
    window: int = WINDOW,
) -> list[bool | Exception]:
    """Delete the entry of each ``(name, revision)`` of ``entries`` (its key
    :func:`_wire.name_key`) if it is still at that revision (a compare-and-set: an entry
    written since is kept), ``window`` at a time.

    One outcome per entry, in order: True (deleted), False (the entry changed since, or
    was deleted already), or the exception of a delete that failed (the bucket
    unreachable), also handed to ``not_dropped(name, exception)`` if given. Never raises
    for one entry; cancelling the caller cancels the rest.
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
    if not_dropped is not None:
        for (name, _), outcome in zip(entries, outcomes, strict=True):
            if isinstance(outcome, Exception):
                not_dropped(name, outcome)
    return outcomes
