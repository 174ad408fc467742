"""The limit of consumers of the cluster's JetStream streams (forty-seventh pass, issue 14).

Every node that joins watches the cluster's KV buckets (an ordered consumer on each
bucket's stream while it runs) and, running the durable path, keeps a consumer of its
own on the durable stream. nats-server 2.15 caps a stream that sets no ``max_consumers``
(-1 or 0) at the server's ``jetstream { limits { default_max_consumers } }``, 1,000
unless configured: before, past 1,000 nodes the next one's join was refused
(``maximum consumers limit reached``). So the streams set their own,
:data:`STREAM_MAX_CONSUMERS`: the durable stream is made with it, and a stream that sets
none (made by an earlier version, or by nats-py's ``create_key_value``, which always
sends -1) is updated to it, its other settings kept. A positive one (another node's, the
account's limit, an operator's) is never changed, so no two nodes undo each other's
update. An account whose limit of consumers is below it gives the stream that limit (the
most the account allows), recorded in the stream's metadata (:data:`FROM_ACCOUNT`): a
join that finds the stream still at that value, the account now allowing more, lifts it
again (forty-eighth pass; a value the metadata does not name is a user's, kept). A stream left with fewer is said (a warning naming the
stream, its limit and why, at most one a second for each stream) and counted
(``ClusterStats.streams_capped``).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import logging
from typing import Any, Final, final

import nats.errors
import nats.js.errors

from .._logcall import log_guarded
from .._throttle import Throttle
from ._held import HeldLines

log = logging.getLogger("nexus_trio.nats")

#: JetStream's error code for a stream or a consumer past a limit of consumers: the
#: stream's ``max_consumers`` (for one that sets none, the server's
#: ``default_max_consumers``) or the account's
CONSUMERS_OVER_LIMIT: Final = 10026

#: The ``max_consumers`` of the cluster's streams: no cap of their own in practice. Not
#: -1 (nor 0): nats-server 2.15 gives a stream that sets none its
#: ``default_max_consumers``, 1,000 unless configured. The largest a Go ``int`` holds on a
#: 32-bit build of the server.
STREAM_MAX_CONSUMERS: Final = 2**31 - 1

#: the key of a stream's metadata that names the limit of consumers a node gave it from
#: its account's (the most the account allowed then): a stream whose ``max_consumers``
#: still equals it is no user's choice, and is lifted again once the account allows more
FROM_ACCOUNT: Final = "nexus_trio.max_consumers_from_account"

_BY_LIMIT: Final = "its max_consumers: its account's JetStream limit, or set by hand"


def account_consumers(info: Any, replicas: int) -> int:
    """The limit of consumers of the account whose info (nats-py's ``AccountInfo``) is
    ``info``, for a stream of ``replicas``: its tier's (``R<n>``) if its limits are
    tiered, else its own; -1 (or 0): none."""
    tier = (info.tiers or {}).get(f"R{replicas}")
    limits = info.limits if tier is None else tier.limits
    return int(limits.max_consumers or 0)


@final
class AccountConsumers:
    """What the account allows a stream (its ``AccountInfo``), read once for a
    connection's life: a join that finds its streams held at the account's value asked
    for it at each stream (four ``ACCOUNT.INFO`` a join, forty-eighth pass), now at the
    first. Forgotten (read again when next wanted) at a reconnect, where the server may
    be another, or reloaded with other limits; a value read before a reload is believed
    until then, and a make refused on it reads it again (see :func:`within_account`)."""

    __slots__ = ("_info", "reads")

    def __init__(self) -> None:
        self._info: Any = None
        #: the ACCOUNT.INFO requests made
        self.reads = 0

    async def limit(self, js: Any, replicas: int, *, fresh: bool = False) -> int:
        """The account's limit of consumers for a stream of ``replicas`` (see
        :func:`account_consumers`): read unless known (or if ``fresh``). Asyncio side."""
        if fresh or self._info is None:
            self.reads += 1
            self._info = await js.account_info()
        return account_consumers(self._info, replicas)

    @property
    def known(self) -> bool:
        return self._info is not None

    def forget(self) -> None:
        self._info = None


async def within_account(
    make: Any, js: Any, config: Any, account: AccountConsumers | None = None
) -> Any:
    """``make`` (``add_stream``, ``update_stream``) with the stream ``config``; if
    JetStream refuses its ``max_consumers`` as over the account's limit of consumers,
    with that limit (the most the account lets the stream have), named so in the stream's
    metadata (:data:`FROM_ACCOUNT`). The limit is ``account``'s if it knows it (read
    again if the make is refused on it), else read. Asyncio side."""
    try:
        return await make(config=config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != CONSUMERS_OVER_LIMIT:
            raise
        refused = exc
    account = AccountConsumers() if account is None else account
    fresh = not account.known
    while True:
        cap = await account.limit(js, config.num_replicas or 1, fresh=fresh)
        if 0 < cap < (config.max_consumers or 0):
            metadata = {**(config.metadata or {}), FROM_ACCOUNT: str(cap)}
            try:
                return await make(config=config.evolve(max_consumers=cap, metadata=metadata))
            except nats.js.errors.BadRequestError as exc:
                if fresh or exc.err_code != CONSUMERS_OVER_LIMIT:
                    raise
        elif fresh:
            raise refused
        fresh = True  # (the account's limit known before was not its limit now)


def _given_by_account(config: Any) -> bool:
    """Whether the stream config ``config``'s limit of consumers is the one a node gave
    it from its account's (its metadata names that value: see within_account)."""
    given = (config.metadata or {}).get(FROM_ACCOUNT)
    return given is not None and given == str(config.max_consumers)


async def _account_allows_more(js: Any, config: Any, account: AccountConsumers) -> bool:
    """Whether the stream config ``config`` has a limit of consumers given from its
    account's (see within_account) below STREAM_MAX_CONSUMERS, and the account now
    allows more (its limit raised, or none; ``account``'s, read if unknown). Asyncio
    side; a refused read says no."""
    cap = config.max_consumers or 0
    if not (0 < cap < STREAM_MAX_CONSUMERS and _given_by_account(config)):
        return False
    try:
        allowed = await account.limit(js, config.num_replicas or 1)
    except (nats.errors.Error, OSError):
        return False  # (tried again at the next set-up)
    return allowed <= 0 or allowed > cap


@final
class StreamCaps:
    """One node's lifts of its streams' limits of consumers, and how many set-ups left a
    stream capped (``capped``, each said: a throttled warning)."""

    def __init__(self, node: str, held: HeldLines) -> None:
        self.node = node
        self._held = held
        # a throttle for each stream (the cluster's few): a join says each one
        self._logs: dict[str, Throttle] = {}
        #: set-ups (a join's, a remake's) that left one of the cluster's streams with
        #: fewer than STREAM_MAX_CONSUMERS consumers allowed
        self.capped = 0
        #: what the account allows, for the data connection's life (see AccountConsumers)
        self.account = AccountConsumers()

    async def make(self, js: Any, config: Any) -> Any:
        """The info of the stream of ``config`` (a ``StreamConfig`` asking for
        STREAM_MAX_CONSUMERS): made so (within the account's limit, see within_account)
        unless it is there; one there with other settings (another node's options, an
        earlier version's) read and used as it is, its limit lifted (see :meth:`lift`).
        One request where the make answers (its answer carries the stream's info).
        A make refused while no such stream is there is refused for what JetStream said
        (another stream's subjects overlapping, a setting out of its range): raised as
        that, naming the stream and its subjects (until the fifty-seventh pass the read
        that followed it was raised, ``NotFoundError``, ``stream not found``, and the
        refusal lost: measured, a join beside an operator's stream on
        ``<prefix>.durable.x.>``). Asyncio side."""
        try:
            info = await within_account(js.add_stream, js, config, self.account)
        except nats.js.errors.BadRequestError as refused:
            try:
                there = await js.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                raise nats.js.errors.BadRequestError(
                    code=refused.code,
                    err_code=refused.err_code,
                    description=(
                        f"JetStream refused to make the stream {config.name!r} (subjects"
                        f" {', '.join(config.subjects or [])}): {refused.description}"
                    ),
                ) from refused
            return await self.lift(js, there)
        self.check(info)
        return info

    async def lift(self, js: Any, info: Any) -> Any:
        """The info of the stream whose info is ``info`` (nats-py's ``StreamInfo``) once
        its limit of consumers is lifted (see the module doc): updated if it sets none,
        or if it has the one a node gave it from its account's and the account now
        allows more (what the account allows read once for the connection's life: see
        AccountConsumers). An update refused (a server that does not change it, a user
        not allowed to) leaves it as it is, tried again at the next set-up. Asyncio
        side."""
        why = _BY_LIMIT
        config = info.config
        if (config.max_consumers or 0) <= 0 or await _account_allows_more(js, config, self.account):
            metadata = {k: v for k, v in (config.metadata or {}).items() if k != FROM_ACCOUNT}
            wanted = config.evolve(max_consumers=STREAM_MAX_CONSUMERS, metadata=metadata or None)
            try:
                info = await within_account(js.update_stream, js, wanted, self.account)
            except (nats.errors.Error, OSError) as exc:
                why = (
                    "the server's default_max_consumers, 1,000 on nats-server 2.15: it"
                    f" sets none, and could not be given its own: {exc}"
                )
        self.check(info, why)
        return info

    def check(self, info: Any, why: str = _BY_LIMIT) -> None:
        """Say and count the stream whose info is ``info`` if it allows fewer than
        STREAM_MAX_CONSUMERS consumers (``why``: what caps it)."""
        cap = info.config.max_consumers or 0
        if cap >= STREAM_MAX_CONSUMERS:
            return
        self.capped += 1
        name = info.config.name
        throttle = self._logs.get(name)
        if throttle is None:
            throttle = self._logs[name] = Throttle(kind="streams.capped")
        if self._held.due(
            throttle, f"set-ups of the stream {name} capped", counted="streams_capped", logger=log
        ):
            log_guarded(
                log,
                logging.WARNING,
                "node %s: the stream %s takes at most %s consumers (%s): past that many"
                " nodes, a node's join is refused",
                self.node,
                name,
                cap if cap > 0 else "default_max_consumers",
                why,
            )
