"""The durable stream's limit of consumers (forty-seventh pass, issue 14).

Each node that runs the durable path keeps a consumer of its own on the durable stream.
nats-server 2.15 caps a stream that sets no ``max_consumers`` at the server's
``jetstream { limits { default_max_consumers } }`` (1,000 unless configured), so before,
past 1,000 nodes the next one's consumer was refused (its join failed with JetStream's
bare 400). The stream now sets its own (``STREAM_MAX_CONSUMERS``), one made by an earlier
version is updated to it, and an account's lower limit is taken, said and counted. These
tests lower the server's default to 2 (its config key), so a handful of nodes show it.
"""

from __future__ import annotations

import logging
import os
import signal
from types import SimpleNamespace
from typing import Any

import nats.js.errors
import pytest
import trio
from nats.js.api import AccountLimits, ConsumerConfig, StreamConfig

from nexus_trio._nats import NatsServer
from nexus_trio._nats._aio import call_aio
from nexus_trio._nats._stream_caps import (
    CONSUMERS_OVER_LIMIT,
    FROM_ACCOUNT,
    STREAM_MAX_CONSUMERS,
    AccountConsumers,
    account_consumers,
    within_account,
)

from .nats_server import until
from .test_nats import local_node

#: a server whose streams that set no max_consumers take at most 2 consumers
DEFAULT_2 = "jetstream { limits { default_max_consumers: 2 } }"


async def _consumer_names(js: Any, stream: str) -> list[str]:
    return sorted(info.name for info in await js.consumers_info(stream))


async def _limit_by_hand(cluster: Any, limit: int) -> tuple[Any, str]:
    """The durable stream's max_consumers set to ``limit`` (as an operator would): the
    cluster's JetStream context and the stream's name."""
    js, durable = cluster.data_js, f"{cluster.prefix}-durable"
    info = await call_aio(js.stream_info, durable)
    await call_aio(js.update_stream, info.config.evolve(max_consumers=limit))
    return js, durable


async def _stream(cluster: Any) -> Any:
    return await call_aio(cluster.data_js.stream_info, f"{cluster.prefix}-durable")


async def test_a_third_node_joins_a_server_whose_default_is_two_consumers_a_stream() -> None:
    """On 1242268's code the third join failed (``BadRequestError``, ``maximum
    consumers limit reached``): the stream set no max_consumers."""
    server = NatsServer(config=DEFAULT_2).start()
    try:
        async with (
            local_node(server.url, "a") as (_ka, ca),
            local_node(server.url, "b"),
            local_node(server.url, "c") as (_kc, cc),
        ):
            info = await _stream(ca)
            assert info.config.max_consumers == STREAM_MAX_CONSUMERS
            assert info.state.consumer_count == 3
            assert (ca.stats().streams_capped, cc.stats().streams_capped) == (0, 0)
    finally:
        server.stop()


async def test_streams_of_an_earlier_version_are_updated_their_other_settings_kept() -> None:
    """A durable stream and a bucket's stream that set no max_consumers (as 1242268's
    code made them, and nats-py makes every bucket's) are given one by the next node's
    join, the rest of their settings as they were; on 1242268's code nothing updated
    them and the third node's join was refused."""
    server = NatsServer(config=DEFAULT_2).start()
    try:
        async with local_node(server.url, "a") as (_ka, ca):
            js, durable = ca.data_js, f"{ca.prefix}-durable"
            nodes_stream = f"KV_{ca.prefix}-nodes"
            for name, other in ((durable, {"max_age": 3600.0}), (nodes_stream, {})):
                info = await call_aio(js.stream_info, name)
                old = info.config.evolve(max_consumers=-1, **other)
                assert (await call_aio(js.update_stream, old)).config.max_consumers == -1
            async with local_node(server.url, "b"), local_node(server.url, "c") as (_kc, cc):
                after = await _stream(ca)
                kv = await call_aio(js.stream_info, nodes_stream)
                assert after.state.consumer_count == 3
            assert (after.config.max_consumers, after.config.max_age) == (
                STREAM_MAX_CONSUMERS,
                3600.0,
            )
            assert kv.config.max_consumers == STREAM_MAX_CONSUMERS
            assert cc.stats().streams_capped == 0
    finally:
        server.stop()


async def test_a_limit_set_by_hand_is_kept_said_and_counted_and_a_node_past_it_is_refused_by_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No node changes a stream's positive max_consumers (an operator's, another node's
    fallback): the next join says it and counts it; a node whose durable consumer it
    refuses fails its join naming the stream and its limit, not with JetStream's bare
    400 (1242268's code: ``BadRequestError``)."""
    caplog.set_level(logging.WARNING, logger="nexus_trio.nats")
    server = NatsServer().start()
    try:
        async with local_node(server.url, "a") as (_ka, ca):
            _js, durable = await _limit_by_hand(ca, 2)
            async with local_node(server.url, "b") as (_kb, cb):
                assert (await _stream(ca)).config.max_consumers == 2
                assert cb.stats().streams_capped == 1
                with pytest.raises(ValueError, match="limit of consumers") as refused:
                    async with local_node(server.url, "c"):
                        pass
    finally:
        server.stop()
    said = [r.getMessage() for r in caplog.records if "takes at most" in r.getMessage()]
    assert said == [
        f"node {node}: the stream {durable} takes at most 2 consumers (its max_consumers:"
        " its account's JetStream limit, or set by hand): past that many nodes, a node's"
        " join is refused"
        for node in "bc"
    ]
    assert str(refused.value) == (
        f"JetStream refuses node 'c''s durable consumer: the durable stream {durable!r} is"
        " at its limit of consumers, its max_consumers (2; -1: the server's"
        " default_max_consumers, 1,000 on nats-server 2.15) or its account's (maximum"
        " consumers limit reached); each node that ran the durable path keeps a consumer"
        " until a takeover drains it: raise the limit, or delete the consumers of nodes"
        " gone for good"
    )


async def test_an_account_limit_below_the_streams_own_gives_them_that_limit_said_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An account whose JetStream limit of consumers is below STREAM_MAX_CONSUMERS
    refuses a stream asking more: each of the cluster's streams takes the account's
    limit (the most it allows), said naming the stream and counted; the join goes on
    (1242268's code made them with none: no ``streams_capped``)."""
    caplog.set_level(logging.WARNING, logger="nexus_trio.nats")
    server = NatsServer(
        config="accounts { A { jetstream { max_consumers: 40, max_mem: 1G, max_file: 1G },"
        " users [ { user: u, password: p } ] } }"
    ).start()
    try:
        async with local_node(f"nats://u:p@127.0.0.1:{server.port}", "a") as (_ka, ca):
            names = await call_aio(ca.data_js.streams_info)
            limits = {info.config.name: info.config.max_consumers for info in names}
            capped = ca.stats().streams_capped
    finally:
        server.stop()
    assert set(limits.values()) == {40} and f"{ca.prefix}-durable" in limits
    assert capped == len(limits)
    said = sorted(r.getMessage() for r in caplog.records if "takes at most" in r.getMessage())
    assert said == sorted(
        f"node a: the stream {name} takes at most 40 consumers (its max_consumers: its"
        " account's JetStream limit, or set by hand): past that many nodes, a node's join"
        " is refused"
        for name in limits
    )


def test_the_account_limit_is_its_tier_s_if_tiered() -> None:
    def limits(n: int) -> AccountLimits:
        return AccountLimits(
            max_memory=-1,
            max_storage=-1,
            max_streams=-1,
            max_consumers=n,
            max_ack_pending=-1,
            memory_max_stream_bytes=-1,
            storage_max_stream_bytes=-1,
            max_bytes_required=False,
        )

    plain = SimpleNamespace(limits=limits(40), tiers=None)
    tiered = SimpleNamespace(limits=limits(-1), tiers={"R3": SimpleNamespace(limits=limits(7))})
    assert account_consumers(plain, 1) == 40
    assert (account_consumers(tiered, 3), account_consumers(tiered, 1)) == (7, -1)


async def test_a_remake_refused_by_the_limit_is_counted_and_tried_again() -> None:
    """A node whose consumer is deleted under it makes it anew at its next failed fetch;
    one the stream's limit refuses then is a failed remake (counted in
    ``durable_remake_failures``; logged naming the stream and its limit, throttled with
    the failed fetches), tried again at the next failed fetch: once there is room the
    node pulls on. (A mutant whose remake does not catch the refusal's ValueError ends
    the node's durable path: its cluster fails.)"""
    server = NatsServer().start()
    try:
        async with local_node(server.url, "a") as (_ka, ca):
            js, durable = await _limit_by_hand(ca, 1)
            await call_aio(js.delete_consumer, durable, "a")
            await call_aio(js.add_consumer, durable, ConsumerConfig(durable_name="x"))
            with trio.fail_after(30):
                await until(lambda: ca.stats().durable_remake_failures >= 1)
                await call_aio(js.delete_consumer, durable, "x")
                while True:  # (until its consumer is made anew: the path pulls on)
                    names = await call_aio(_consumer_names, js, durable)
                    if "a" in names:
                        break
                    await trio.sleep(0.05)
            stats = ca.stats()
    finally:
        server.stop()
    assert names == ["a"]
    assert stats.durable_remake_failures >= 1 and stats.streams_capped >= 1


async def _api_requests(cluster: Any, during: Any, subjects: str = "$JS.API.STREAM.>") -> list[str]:
    """The JetStream API requests on ``subjects`` (the stream API's unless told; their
    subjects, in order) any client made while ``during()`` ran, seen by a subscriber on
    ``cluster``'s connection; ended by a marker it publishes itself, so all that came
    before it are in."""
    seen: list[str] = []
    end = "$JS.API.STREAM.INFO.nexus-test-end"

    async def record(msg: Any) -> None:
        seen.append(msg.subject)

    async def watch() -> Any:
        sub = await cluster.nc.subscribe(subjects, cb=record)
        await cluster.nc.flush()
        return sub

    sub = await call_aio(watch)
    await during()
    await call_aio(cluster.nc.publish, end, b"")
    with trio.fail_after(10):
        await until(lambda: end in seen)
    await call_aio(sub.unsubscribe)
    return seen[: seen.index(end)]


async def test_a_join_reads_each_bucket_s_stream_once() -> None:
    """A bucket there (every join but a cluster's first) costs one STREAM.INFO, which
    the lift of its limit of consumers and its birth read; on 5699b98's code each bucket
    took four requests: nats-py's create (refused once the limit was lifted: another
    config), ``key_value``'s info, the lift's, the birth's."""
    server = NatsServer().start()
    try:
        async with local_node(server.url, "a") as (_ka, ca):

            async def join_b() -> None:
                async with local_node(server.url, "b"):
                    pass

            seen = await _api_requests(ca, join_b)
    finally:
        server.stop()
    # (the streams' set-up, not the reads of their entries: STREAM.MSG.GET)
    buckets = [s for s in seen if ".KV_" in s and not s.startswith("$JS.API.STREAM.MSG.")]
    assert buckets == [
        f"$JS.API.STREAM.INFO.KV_{ca.prefix}-{bucket}" for bucket in ("nodes", "names", "placed")
    ]


ACCOUNT = (
    "accounts {{ A {{ jetstream {{ max_consumers: {limit}, max_mem: 1G, max_file: 1G }},"
    " users [ {{ user: u, password: p }} ] }} }}"
)


async def _raise_account_limit(server: NatsServer, cluster: Any, limit: int) -> None:
    """The account's limit of consumers raised to ``limit`` (the server's config
    rewritten and reloaded, as an operator would), until JetStream says so."""
    (server.log_path.parent / "server.conf").write_text(ACCOUNT.format(limit=limit))
    os.kill(server.pid, signal.SIGHUP)
    with trio.fail_after(10):
        while True:  # (until the reload is in)
            try:
                info = await call_aio(cluster.data_js.account_info)
            except nats.js.errors.ServiceUnavailableError:
                # (JetStream answers "unavailable" for a moment while the account's
                # limits are reloaded: seen once in a loaded suite)
                info = None
            if info is not None and info.limits.max_consumers == limit:
                break
            await trio.sleep(0.05)


async def test_a_stream_capped_by_the_account_is_lifted_once_the_account_allows_more() -> None:
    """A stream given its account's limit of consumers (40) is lifted to the account's
    new one (100) by the next join once the operator raises it, its metadata naming the
    new value; a value no node gave (35, set by hand on the durable stream) is kept. On
    5699b98's code every stream stayed at 40 for good."""
    server = NatsServer(config=ACCOUNT.format(limit=40)).start()
    url = f"nats://u:p@127.0.0.1:{server.port}"
    try:
        async with local_node(url, "a") as (_ka, ca):
            js = ca.data_js
            before = {i.config.name: i.config for i in await call_aio(js.streams_info)}
            durable = f"{ca.prefix}-durable"
            await call_aio(js.update_stream, before[durable].evolve(max_consumers=35))
            await _raise_account_limit(server, ca, 100)
            async with local_node(url, "b") as (_kb, cb):
                after = {i.config.name: i.config for i in await call_aio(js.streams_info)}
                capped = cb.stats().streams_capped
    finally:
        server.stop()
    assert {name: c.max_consumers for name, c in before.items()} == dict.fromkeys(before, 40)
    assert {c.metadata[FROM_ACCOUNT] for c in before.values()} == {"40"}
    buckets = [name for name in after if name != durable]
    assert len(buckets) == 3
    assert [(after[n].max_consumers, after[n].metadata[FROM_ACCOUNT]) for n in buckets] == [
        (100, "100")
    ] * 3
    assert after[durable].max_consumers == 35
    assert capped == 4  # (each still below STREAM_MAX_CONSUMERS: said and counted)


async def test_a_stream_capped_by_the_account_is_lifted_whole_once_the_account_has_no_limit() -> (
    None
):
    """The account's limit taken away (-1): the next join gives each stream
    STREAM_MAX_CONSUMERS and drops the metadata's record; nothing is capped then."""
    server = NatsServer(config=ACCOUNT.format(limit=40)).start()
    url = f"nats://u:p@127.0.0.1:{server.port}"
    try:
        async with local_node(url, "a") as (_ka, ca):
            await _raise_account_limit(server, ca, -1)
            async with local_node(url, "b") as (_kb, cb):
                after = [i.config for i in await call_aio(ca.data_js.streams_info)]
                capped = cb.stats().streams_capped
    finally:
        server.stop()
    assert [c.max_consumers for c in after] == [STREAM_MAX_CONSUMERS] * 4
    assert [FROM_ACCOUNT in (c.metadata or {}) for c in after] == [False] * 4
    assert capped == 0


async def test_a_cluster_s_first_join_reads_each_bucket_s_stream_once() -> None:
    """A bucket not there costs its info's "not found" and its stream's make, whose
    answer carries the info, its limit of consumers its own from the start; on 94b2b0a's
    code each bucket took four requests: the "not found", nats-py's create_key_value
    (its answer not returned), the info read again and the update to a limit of
    consumers of its own."""
    server = NatsServer().start()
    try:
        async with local_node(server.url, "a") as (_ka, ca):

            async def first_join() -> None:
                async with local_node(server.url, "b", prefix="first"):
                    pass

            seen = await _api_requests(ca, first_join)
            made = await call_aio(ca.data_js.stream_info, "KV_first-nodes")
    finally:
        server.stop()
    buckets = [s for s in seen if ".KV_first-" in s and not s.startswith("$JS.API.STREAM.MSG.")]
    assert buckets == [
        f"$JS.API.STREAM.{request}.KV_first-{bucket}"
        for bucket in ("nodes", "names", "placed")
        for request in ("INFO", "CREATE")
    ]
    assert made.config.max_consumers == STREAM_MAX_CONSUMERS
    assert (made.config.max_msgs_per_subject, made.config.max_age) == (1, 2.0)


async def test_a_join_reads_what_the_account_allows_once_for_its_streams_held_at_it() -> None:
    """A join that finds the cluster's four streams held at the account's limit of
    consumers (40, the account still at 40) asks for the account's info once, not at
    each stream (on 94b2b0a's code: four ACCOUNT.INFO a join); the streams stay at 40,
    said and counted as before."""
    server = NatsServer(config=ACCOUNT.format(limit=40)).start()
    url = f"nats://u:p@127.0.0.1:{server.port}"
    try:
        async with local_node(url, "a") as (_ka, ca):
            joined: list[Any] = []

            async def join_b() -> None:
                async with local_node(url, "b") as (_kb, cb):
                    joined.append([i.config for i in await call_aio(ca.data_js.streams_info)])
                    joined.append(cb.stats().streams_capped)

            seen = await _api_requests(ca, join_b, "$JS.API.>")
    finally:
        server.stop()
    after, capped = joined
    assert seen.count("$JS.API.INFO") == 1
    assert [c.max_consumers for c in after] == [40] * 4
    assert capped == 4


def test_what_the_account_allows_is_read_once_and_again_where_a_make_is_refused_on_it() -> None:
    """``AccountConsumers`` keeps the account's info: a second stream's make refused for
    its limit uses it, no request; a value known from before (100) that the account no
    longer allows (40, lowered by a reload) is read again once a make on it is refused,
    and the stream gets 40; forgotten (a reconnect), it is read at the next refusal."""
    allowed = [40]
    made: list[int] = []
    reads: list[int] = []

    async def account_info() -> Any:
        reads.append(allowed[0])
        return SimpleNamespace(tiers=None, limits=SimpleNamespace(max_consumers=allowed[0]))

    async def make(config: Any) -> Any:
        if config.max_consumers > allowed[0]:
            raise nats.js.errors.BadRequestError(err_code=CONSUMERS_OVER_LIMIT)
        made.append(config.max_consumers)
        return config

    js = SimpleNamespace(account_info=account_info)
    config = StreamConfig(name="s", num_replicas=1, max_consumers=STREAM_MAX_CONSUMERS)
    account = AccountConsumers()

    async def main() -> None:
        for _ in range(2):
            made_so = await within_account(make, js, config, account)
            assert made_so.metadata == {FROM_ACCOUNT: "40"}
        assert (made, reads, account.reads) == ([40, 40], [40], 1)
        allowed[0] = 100
        account.forget()
        assert await account.limit(js, 1) == 100
        allowed[0] = 40  # (lowered again: the known 100 is stale)
        await within_account(make, js, config, account)
        assert (made, reads, account.reads) == ([40, 40, 40], [40, 100, 40], 3)

    trio.run(main)
