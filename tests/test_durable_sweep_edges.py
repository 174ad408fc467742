"""The durable sweep's edges: a node that leaves takes nothing over, and a consumer
someone pulls is left to them (forty-fifth pass, issue 14).

A sweep (see ``DurableChannel._sweep``) did not ask whether its node was leaving: one
that ran while the kernel drained its agents at a shutdown (the cluster still joined)
took over a gone node's messages on a node about to leave, which forwarded them to its
own stopping agents or held them until ``ack_wait``. And a takeover a sweep started for
a node no member pulled that node's consumer beside a process of its name whose join
the sweeper had not heard yet (the sweep's read found the consumer between two of its
fetches). Forty-sixth pass: a takeover under way as the kernel begins to shut down
ends there, handing back what it fetched, and a consumer whose puller is busy
delivering (no request waiting) is left to it too. Real nats-server, in-process nodes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
import warnings
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import nats.aio.client
import nats.js.errors
import pytest
import trio
import trio_asyncio
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import DiscardPolicy
from nats.js.errors import ServiceUnavailableError

from nexus_trio import (
    ClusterConfig,
    Config,
    Context,
    DurableConfig,
    KernelConfig,
    Message,
    NatsConfig,
    TransportUnavailable,
    agent,
    open_kernel,
)
from nexus_trio._nats import Cluster, NatsServer, _durable
from nexus_trio._nats import _wire as wire
from nexus_trio._nats._aio import call_aio, call_aio_bounded
from nexus_trio._nats._direct import end_fetch, fetched
from nexus_trio.config import load_config
from nexus_trio.nats import join_cluster

from .nats_server import PATIENT, node_config, until
from .test_durable_lost_node import _keeper
from .test_durable_missing_agent import store_for
from .test_durable_moved_name import DURABLE
from .test_nats import local_node

QUICK = {"server_lost_wait": 0.5, "last_notice_wait": 1.0}
GHOST = "ghost"
#: seconds a takeover looks for a puller of a consumer no one pulls, in the tests that
#: have none (``_PULLER_ACTIVITY_WAIT``, 2 s, was a third of their time)
_NO_PULLER_WAIT = 0.1


async def _past_first_wait(cluster: Cluster) -> None:
    """Once this node's path has run ``last_notice_wait``: a sweep leaves a node it never
    saw go to that first wait (a sender may still have it)."""
    wait = cluster.options.last_notice_wait
    await until(lambda: trio.current_time() > cluster.durable._started + wait)


async def _consumer(cluster: Cluster, node: str) -> Any:
    """``node``'s durable consumer's info, None if it has none."""
    try:
        return await call_aio(cluster.data_js.consumer_info, f"{cluster.prefix}-durable", node)
    except nats.js.errors.NotFoundError:
        return None


async def _swept_and_ended(cluster: Cluster) -> int:
    """Once ``cluster``'s path has run its first wait, a periodic sweep made and the
    takeover of the gone node it started ended: the takeovers it started."""
    await _past_first_wait(cluster)
    await cluster.durable._sweep(True)
    swept = cluster.durable.swept
    await until(lambda: GHOST not in cluster.durable._takeovers)
    return swept


async def _standin_holding(cluster: Cluster) -> tuple[Any, Any]:
    """A stand-in for a process of the gone node's name (a pull subscription of its
    consumer) holding a message for ``keeper-a`` it fetched: it, and that message."""
    standin = await call_aio(
        cluster.data_js.pull_subscribe,
        wire.durable_subject(cluster.prefix, GHOST, "*"),
        durable=GHOST,
        stream=f"{cluster.prefix}-durable",
    )
    await store_for(cluster, "keeper-a", "held by the process", node=GHOST)
    held = await call_aio(standin.fetch, 1, 5.0)
    assert len(held) == 1
    return standin, held[0]


async def test_a_sweep_under_way_when_the_kernel_begins_to_shut_down_takes_nothing_over(
    nats: NatsServer,
) -> None:
    """A message is stored for a node a never had (its subject has no consumer); a's
    sweep reads the stream, and the kernel begins its shutdown (an agent still draining,
    the cluster still joined) before the sweep's reads end: no takeover starts
    (``durable_swept`` 0), no consumer is made for the gone node, its message stays
    stored for the nodes that stay; a sweep asked while the kernel drains reads nothing.
    (On f4c2c8f's _durable.py swapped in: swept 1, a takeover of the gone node started
    on the draining node, its "taking over" warning logged.)"""
    hold = trio.Event()
    draining = trio.Event()

    @agent(name="slow")
    async def slow(ctx: Context, msg: Message) -> Any:
        draining.set()
        await hold.wait()

    async with local_node(nats.url, "a", durable=DURABLE, **QUICK) as (ka, ca):
        ka.spawn(_keeper([], "keeper-a"))
        ka.spawn(slow)
        entered, release = trio.Event(), trio.Event()
        real = ca.durable._unpulled
        reads = 0

        async def gated() -> Any:
            nonlocal reads
            reads += 1
            found = await real()
            entered.set()
            await trio_asyncio.trio_as_aio(release.wait)()
            return found

        ca.durable._unpulled = gated  # type: ignore[method-assign]
        with trio.fail_after(30):
            await _past_first_wait(ca)
            await store_for(ca, "keeper-a", "for the gone", node=GHOST)
            async with trio.open_nursery() as outer:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ca.durable._sweep, True)
                    await entered.wait()
                    await ka.send("slow", "keep draining")
                    await draining.wait()
                    outer.start_soon(ka.shutdown, 30.0)
                    await until(lambda: ka.shutting_down)
                    release.set()
                swept, sweeps = ca.durable.swept, ca.durable.sweeps
                await ca.durable._sweep(True)  # (asked while it drains: not made)
                again = (reads, ca.durable.sweeps - sweeps)
                ghost = await _consumer(ca, GHOST)
                stored = await call_aio(ca.durable._stored_for, GHOST)
                taken = ca.stats().durable_taken_over
                hold.set()
    assert (swept, sweeps, ghost, stored, taken) == (0, 1, None, True, 0)
    assert again == (1, 0)


@pytest.mark.parametrize("first_check", ["answered", "not answered"])
async def test_a_takeover_a_sweep_starts_leaves_a_consumer_someone_pulls_to_them(
    nats: NatsServer, first_check: str
) -> None:
    """A process of the gone node's name (a stand-in here: a pull subscription of its
    consumer) holds a message it fetched and, between two fetches, has no pull request
    waiting: a's sweep finds the consumer then. Before the takeover starts, the process
    fetches again (its request waits: a's view has not heard its join). The takeover
    sees the request waiting on the consumer, takes nothing and ends
    (``left_to_pullers``), looked at again later. (On f4c2c8f's _durable.py swapped in:
    the takeover pulls beside the process, never ends (the message it holds is never
    drained), and the wait for its end times out.)

    Forty-eighth pass, ``not answered``: a check whose read of the consumer failed (not
    answered once, as at a JetStream leader change) was made no more, and the takeover
    pulled on beside the process (its messages by id dead at once, by name forwarded,
    its drained consumer deleted). Now that subscription is dropped and the next one
    checks: checked twice, nothing taken. (On 5699b98's _durable.py swapped in: checked
    once; the takeover pulls beside the stand-in and the wait for its end times out.)"""
    async with local_node(nats.url, "a", durable=DURABLE, **QUICK) as (ka, ca):
        ka.spawn(_keeper([], "keeper-a"))
        stream = f"{ca.prefix}-durable"
        js = ca.data_js
        standin, _held = await _standin_holding(ca)
        real = ca.durable._unpulled
        real_check = ca.durable._pulled_by_others
        fetching: list[asyncio.Future[Any]] = []
        checks: list[str] = []

        async def between() -> Any:
            found = await real()
            # (the process's next fetch, as the sweep's read ends: it waits on the server)
            fetching.append(asyncio.ensure_future(standin.fetch(1, 20.0)))
            while not (await js.consumer_info(stream, GHOST)).num_waiting:  # noqa: ASYNC110 (the server's state: no event)
                await asyncio.sleep(0.02)
            return found

        async def check(psub: Any, info: Any) -> str | None:
            checks.append("asked")
            if first_check == "not answered" and len(checks) == 1:
                raise NatsTimeoutError  # (the consumer's read not answered)
            return await real_check(psub, info)

        ca.durable._unpulled = between  # type: ignore[method-assign]
        ca.durable._pulled_by_others = check  # type: ignore[method-assign]
        with trio.fail_after(20):
            swept = await _swept_and_ended(ca)
            info = await _consumer(ca, GHOST)
            left = ca.stats().durable_left_to_pullers
            taken = ca.stats().durable_taken_over

        async def stop() -> None:
            fetching[0].cancel()
            await standin.unsubscribe()

        await call_aio(stop)
    assert (swept, len(checks)) == (1, 1 if first_check == "answered" else 2)
    assert left == 1
    assert (info.num_ack_pending, info.num_waiting, taken) == (1, 1, 0)


async def test_a_takeover_leaves_a_consumer_to_a_puller_busy_delivering_with_no_request_waiting(
    nats: NatsServer,
) -> None:
    """Forty-sixth pass: a process of the gone node's name (a stand-in here: a pull
    subscription of its consumer) busy with a message it fetched has no pull request
    waiting on the consumer as the takeover a's sweep started subscribes; it acks that
    message a moment later. The takeover reads the consumer again before it fetches:
    acked meanwhile, someone pulls it; it takes nothing and ends
    (``durable_left_to_pullers``), and the second message stays for the process, which
    fetches it. (On f647f8e's _durable.py swapped in: the takeover pulls beside the
    process, forwards the second message to a's ``keeper-a`` and deletes the drained
    consumer: the process's fetch is refused, ServiceUnavailableError. Checked on
    ce80c03's, the parent's, which has the counter ``stats()`` reads.)"""
    handled: list[Any] = []
    async with local_node(nats.url, "a", durable=DURABLE, **QUICK) as (ka, ca):
        ka.spawn(_keeper(handled, "keeper-a"))
        standin, held = await _standin_holding(ca)
        second = await store_for(ca, "keeper-a", "for the process next", node=GHOST)
        real = ca.durable._subscribe_taken

        async def busy(node: str) -> Any:
            subscribed = await real(node)
            # (the process, done with its message, acks it: no request of its waits)
            await held.ack()
            await ca.nc.flush()
            return subscribed

        ca.durable._subscribe_taken = busy  # type: ignore[method-assign]
        with trio.fail_after(20):
            swept = await _swept_and_ended(ca)
            stats = ca.stats()
            nxt = await call_aio(standin.fetch, 1, 5.0)
            await call_aio(nxt[0].ack)
            await call_aio(standin.unsubscribe)
    assert (swept, stats.durable_left_to_pullers) == (1, 1)
    assert (stats.durable_taken_over, stats.durable_dead, handled) == (0, 0, [])
    assert wire.decode_message(nxt[0].data).id == second.id


async def test_a_takeover_under_way_when_the_kernel_begins_to_shut_down_ends_and_hands_back(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty-sixth pass: a takeover begun before a shutdown ran until the leave's
    ``stop()``, the agents' drain included: it forwarded a gone node's messages to the
    node's own stopping agents. 20 messages for ``keeper-a`` (here) and 20 for a name
    that runs nowhere (nakked to wait, redelivered for as long as the takeover runs: a
    long one) are stored for a node a never had; a's sweep takes it over, and its first
    fetch is held until the kernel begins its shutdown (an agent still draining, the
    cluster still joined). The takeover ends at that fetch's end, while the drain goes
    on: what it fetched is nakked back (``durable_handed_back_at_leave``), nothing is
    taken over, forwarded, handled or dead, and all 40 stay stored on the gone node's
    subjects (counted there). (On f647f8e's _durable.py swapped in: the takeover forwards
    the fetched ``keeper-a`` messages to a, and never ends while the drain is held: the
    wait for its end times out.)"""
    patient = attrs.evolve(DURABLE, max_deliver=1000)
    # (no puller here: the takeover need not wait 2 s to see none)
    monkeypatch.setattr(_durable, "_PULLER_ACTIVITY_WAIT", _NO_PULLER_WAIT)
    hold = trio.Event()
    draining = trio.Event()
    handled: list[Any] = []

    @agent(name="slow")
    async def slow(ctx: Context, msg: Message) -> Any:
        draining.set()
        await hold.wait()

    async with local_node(nats.url, "a", durable=patient, **QUICK) as (ka, ca):
        ka.spawn(_keeper(handled, "keeper-a"))
        ka.spawn(slow)
        real = _durable._poll
        fetched: list[int] = []
        shutting = trio.Event()

        async def gated(psub: Any, batch: int, idle: bool) -> Any:
            got = await real(psub, batch, idle)
            if got[0] and psub is not ca.durable._psub and not fetched:
                fetched.append(len(got[0]))
                await trio_asyncio.trio_as_aio(shutting.wait)()
            return got

        monkeypatch.setattr(_durable, "_poll", gated)
        stream = f"{ca.prefix}-durable"
        with trio.fail_after(30):
            await _past_first_wait(ca)
            for i in range(20):
                await store_for(ca, "keeper-a", i, node=GHOST)
                await store_for(ca, "nowhere", i, node=GHOST)
            await ca.durable._sweep(True)
            await until(lambda: bool(fetched))
            async with trio.open_nursery() as outer:
                await ka.send("slow", "keep draining")
                await draining.wait()
                outer.start_soon(ka.shutdown, 30.0)
                await until(lambda: ka.shutting_down)
                shutting.set()
                await until(lambda: GHOST not in ca.durable._takeovers)
                # (each hand-back counted as its nak is sent)
                await until(lambda: ca.durable.handed_back_at_leave >= fetched[0])
                await call_aio(ca.nc.flush)
                state = (
                    await call_aio(
                        ca.data_js.stream_info,
                        stream,
                        subjects_filter=wire.durable_subject(ca.prefix, GHOST, "*"),
                    )
                ).state
                stats = ca.stats()
                drained = ka.stopped
                hold.set()
    assert fetched[0] > 0
    assert stats.durable_handed_back_at_leave == fetched[0]
    assert (stats.durable_taken_over, stats.durable_forwarded, stats.durable_dead) == (0, 0, 0)
    assert (handled, drained) == ([], False)
    assert (state.messages, sum((state.subjects or {}).values())) == (40, 40)


@pytest.mark.parametrize("held_until", ["the close begins", "the takeover is cancelled"])
async def test_a_takeover_under_way_at_the_cluster_s_close_hands_back_what_it_fetched(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch, held_until: str
) -> None:
    """Forty-sixth pass: the cluster's close (its kernel still running) cancelled a
    takeover under way at once, its fetch with it: what that fetch took waited out
    ``ack_wait`` (30 s here) before anyone could have it. 20 messages for ``keeper-a``
    are stored for a node no one has; a's sweep takes it over and its first fetch is held
    until a's cluster begins to close. The leave's ``stop()`` waits for the takeover's
    safe point: the fetched batch is handed back (nakked). Node b, joined after with
    ``keeper-a``, sweeps and takes all 20 over at once: each handled once. (On
    f647f8e's _durable.py swapped in: the batch a's fetch took waits out ack_wait, and
    the wait for all 20 times out.)

    Forty-eighth pass, ``the takeover is cancelled``: a fetch still under way at the
    leave's bound (half of ``stop()``'s; held here until the takeover is cancelled
    there) was cancelled, and nats-py's fetch keeps what it took so far to itself:
    dropped, those messages waited out ``ack_wait``. The fetch is now shielded from the
    cancel and ended, and what it took is nakked back as it returns. (On 5699b98's
    _durable.py swapped in: nothing handed back, the wait for the 20 times out.)"""
    handled: list[tuple[Any, Any]] = []
    real = _durable._poll
    fetched: list[int] = []
    options = attrs.evolve(PATIENT, durable=DURABLE, **QUICK)
    # (no puller here, a's or b's: a takeover need not wait 2 s to see none, twice)
    monkeypatch.setattr(_durable, "_PULLER_ACTIVITY_WAIT", _NO_PULLER_WAIT)
    async with open_kernel(node_config()) as ka:
        async with join_cluster(ka, nats.url, "a", options=options) as ca:

            async def gated(psub: Any, batch: int, idle: bool) -> Any:
                got = await real(psub, batch, idle)
                if got[0] and psub is not ca.durable._psub and not fetched:
                    fetched.append(len(got[0]))
                    scope = ca.durable._takeovers[GHOST]
                    close = held_until == "the close begins"
                    while not (ca.closing if close else scope.cancel_called):  # noqa: ASYNC110 (no event)
                        await asyncio.sleep(0.01)
                return got

            monkeypatch.setattr(_durable, "_poll", gated)
            stored = {(await store_for(ca, "keeper-a", i, node=GHOST)).id for i in range(20)}
            with trio.fail_after(20):
                await _past_first_wait(ca)
                await ca.durable._sweep(True)
                await until(lambda: bool(fetched))
        stats = ca.stats()
        await ka.shutdown()
    async with local_node(nats.url, "b", durable=DURABLE, **QUICK) as (kb, cb):
        kb.spawn(_keeper(handled, "keeper-a"))
        with trio.fail_after(20):
            await _past_first_wait(cb)
            await cb.durable._sweep(True)
            await until(lambda: len(handled) >= 20)
    assert stats.durable_handed_back_at_leave == fetched[0] > 0
    assert stats.durable_unsettled_at_leave == 0
    assert sorted(msg_id for msg_id, _ in handled) == sorted(stored)


async def test_options_whose_max_age_is_not_above_the_sweep_s_period_warn_at_the_users_line(
    nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Forty-fifth pass: options built in Python (no config load to warn) with a
    ``max_age`` (3 s) not above the sweep's period (4 x ``last_notice_wait``, 1 s) were
    said at the join, as a log line. Forty-sixth pass: said as a short
    ``server_lost_wait`` is, a ``ClusterOptionsWarning`` at the line that built the
    options (also through ``attrs.evolve``), naming both options, and the join says
    nothing more; a ``max_age`` above it, or the durable path off, say nothing. (Fails
    on f647f8e: no warning, a log line at the join.)"""
    from nexus_trio.nats import ClusterOptions, ClusterOptionsWarning

    short = attrs.evolve(DURABLE, duplicate_window=2.0, max_age=3.0)
    with pytest.warns(ClusterOptionsWarning) as given:
        options = ClusterOptions(durable=short, **QUICK)
    assert [(str(w.message), w.filename) for w in given] == [
        (
            "DurableOptions.max_age (3s) is not above the durable sweep's period, 4 x"
            " ClusterOptions.last_notice_wait (1s) = 4s: a durable message stored for a node"
            " gone for good after its look found nothing can reach its max_age before the"
            " sweep that takes it over, and goes uncounted; raise DurableOptions.max_age"
            " well above 4s (or lower ClusterOptions.last_notice_wait)",
            __file__,
        )
    ]
    with pytest.warns(ClusterOptionsWarning) as evolved:
        attrs.evolve(options, prefix="ops")
    assert [w.filename for w in evolved] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClusterOptions(durable=attrs.evolve(short, max_age=4.5), **QUICK)
        ClusterOptions(durable=attrs.evolve(short, enabled=False), **QUICK)
        async with open_kernel() as kernel:
            async with join_cluster(kernel, nats.url, "a", options=options):
                await kernel.shutdown()
    assert not [r for r in caplog.records if "sweep's period" in r.getMessage()]


async def test_a_join_of_a_config_s_options_leaves_a_short_max_age_to_the_load(
    nats: NatsServer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Forty-fifth pass (review): a config file's ``[durable] max_age`` not above the
    sweep's period is said by the load; the join of that config's options (no
    ``options``, as ``nexus run --nats`` joins) said it again, in other words, and a CLI
    user read it twice. Said once now, by the load (as a short ``server_lost_wait``:
    ClusterOptionsWarning's quieting of a config's options); options built in Python
    still hear it at the join (the test above). (Fails on aee6fa4: two lines.)"""
    path = tmp_path / "config.toml"
    path.write_text(
        "[kernel]\nrequest_timeout_ms = 5000\n[nats]\nserver_lost_wait = 0.5\n"
        "[cluster]\nlast_notice_wait = 1.0\n[durable]\nduplicate_window = 2\nmax_age = 3\n",
        encoding="utf-8",
    )
    path.chmod(0o600)
    loaded = load_config(path, env={"HOME": str(tmp_path)}, cwd=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no ClusterOptionsWarning at the join)
        async with open_kernel(loaded.config) as kernel:
            async with join_cluster(kernel, nats.url, "a"):
                await kernel.shutdown()
    said = [r.getMessage() for r in caplog.records if "sweep's period" in r.getMessage()]
    assert len(said) == 1
    assert said[0].startswith("[durable] max_age (3s) is not above the durable sweep's period")


async def test_a_join_of_a_config_built_in_python_says_its_doubtful_values_once(
    nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Forty-sixth pass: a ``Config`` built in Python (no load to warn) joined without
    ``options`` heard neither a short ``server_lost_wait`` nor a short ``[durable]
    max_age``. The join says each once now, as a ``ClusterOptionsWarning`` in the
    config's words at the line of the join, as a load would (the loaded config's join
    above says nothing). (Fails on f647f8e: no warning.)"""
    from nexus_trio.nats import ClusterOptionsWarning

    config = Config(
        kernel=KernelConfig(request_timeout_ms=5000),
        nats=NatsConfig(server_lost_wait=0.5),
        cluster=ClusterConfig(reconnect_wait=0.5, last_notice_wait=1.0),
        durable=DurableConfig(duplicate_window=2, max_age=3),
    )
    async with open_kernel(config) as kernel:
        with pytest.warns(ClusterOptionsWarning) as said:
            async with join_cluster(kernel, nats.url, "a"):
                await kernel.shutdown()
    assert [(str(w.message).partition(":")[0], w.filename) for w in said] == [
        ("[nats] server_lost_wait (0.5) is not above [cluster] reconnect_wait (0.5)", __file__),
        (
            "[durable] max_age (3s) is not above the durable sweep's period, 4 x [cluster]"
            " last_notice_wait (1s) = 4s",
            __file__,
        ),
    ]
    assert not [r for r in caplog.records if "not above" in r.getMessage()]


class _ClosingOps:
    """A settle queue (the seam of ``DurableChannel._ops``) that takes ``room`` items and
    is closed after: a put then is refused, and what it took is sent only as the test
    says (the rest dropped unsent with the queue at the leave's close)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.taken: list[tuple[Any, str]] = []

    def put(self, item: tuple[Any, str]) -> bool:
        if len(self.taken) < self.room:
            self.taken.append(item)
            return True
        return False


#: when the durable stream of the fakes below was made anew (JetStream's ``created``),
#: and when the old one's message, and a new one's, were stored (their ack subjects' time)
_MADE_ANEW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
_OLD = _MADE_ANEW - timedelta(seconds=1)
_NEW = _MADE_ANEW + timedelta(milliseconds=1)


class _FetchedMsg:
    """A fetched JetStream message (fake): its naks sent; stored at ``stored``."""

    is_acked = False

    def __init__(self, stored: datetime = _OLD) -> None:
        self.naks = 0
        self.reply = f"$JS.ACK.fake.{id(self)}"  # (the subject its nak goes to)
        self.metadata = SimpleNamespace(timestamp=stored)

    async def nak(self, delay: float | None = None) -> None:
        self.naks += 1


def test_a_remake_s_hand_back_the_leave_takes_out_of_the_client_is_counted_unsettled_only() -> None:
    """Fiftieth pass: the naks of what the old pull subscription held when the pull was
    set up again are counted in ``handed_back_at_remake`` as the client takes them; at
    a leave with the data connection down those the client still held are taken back
    out of its reconnect buffer, never sent (``unsent_in_client``): counted in
    ``unsettled_at_leave`` there, and taken out of ``handed_back_at_remake``, never in
    both. 7 sent, the subjects of the last 5 kept (``max_ack_pending``: 4 x 1 + 1), 3 of
    them taken out with one ack: (4, 4). (Fails with the subtraction in
    unsent_in_client taken out as a mutant: (7, 4).)"""
    channel = _durable.DurableChannel.__new__(_durable.DurableChannel)
    channel.cluster = SimpleNamespace(node="a")  # type: ignore[assignment]
    channel.options = SimpleNamespace(  # type: ignore[assignment]
        redelivery_delay=1.0, max_in_flight=1, max_waiting=1
    )
    channel._settles_sent = 0
    channel.handed_back_at_leave = channel.unsettled_at_leave = 0
    channel.handed_back_at_remake = 0
    channel._handed_back = set()
    channel._remade_back = OrderedDict()
    channel._anew_at = None
    held = [_FetchedMsg() for _ in range(7)]
    trio.run(channel._send_ops, [(m, _durable._REMADE_BACK) for m in held])
    assert (channel.handed_back_at_remake, [m.naks for m in held]) == (7, [1] * 7)
    assert list(channel._remade_back) == [m.reply for m in held[2:]]
    channel.unsent_in_client([m.reply for m in held[4:]] + ["$JS.ACK.fake.an-ack"])
    assert (channel.handed_back_at_remake, channel.unsettled_at_leave) == (4, 4)
    assert list(channel._remade_back) == [m.reply for m in held[2:4]]


def test_a_settle_of_a_delivery_of_the_stream_before_it_was_made_anew_is_not_sent() -> None:
    """Fifty-first pass: the durable stream made anew numbers from 1 again and JetStream
    settles by the sequence an ack subject names, so a settle of a delivery of the old
    stream (an answer that came after the remake) reached the new stream's message of
    that sequence (an ack removed it unhandled). Those the node held at the remake are
    settled nowhere now, counted in ``stale_settles``, and not counted unsettled at the
    leave (they were no settle owed to JetStream); a delivery of the new stream is
    settled as before. (On main's _durable.py: AttributeError, no _stream_made_anew;
    with ``_settles_sent`` not stepped for a dropped one as a mutant: the leave counts
    them in ``unsettled_at_leave``, ``assert 3 == 0``.)"""
    channel = _durable.DurableChannel.__new__(_durable.DurableChannel)
    channel.cluster = SimpleNamespace(node="a")  # type: ignore[assignment]
    channel.options = SimpleNamespace(redelivery_delay=1.0)  # type: ignore[assignment]
    channel._stream = "nexus-durable"
    old, late, queued = (_FetchedMsg() for _ in range(3))
    new = _FetchedMsg(_NEW)  # (a delivery of the new stream)
    channel._in_flight = {uuid.uuid4(): (old, 0.0, None)}  # type: ignore[dict-item]
    channel._late = OrderedDict({uuid.uuid4(): (late, None)})  # type: ignore[dict-item]
    channel._held = deque()
    channel._ops = SimpleNamespace(queued=[(queued, "nak")])  # type: ignore[assignment]
    channel._settles_queued, channel._settles_sent = 4, 0
    channel.stale_settles = channel.unsettled_at_leave = 0
    channel._anew_at = _MADE_ANEW
    channel._stream_made_anew()
    ops = [(old, "nak"), (queued, "nak"), (new, "nak"), (late, "progress"), (late, "nak")]
    trio.run(channel._send_ops, ops)
    assert [m.naks for m in (old, late, queued, new)] == [0, 0, 0, 1]
    assert channel.stale_settles == 3
    channel._count_unsent()
    assert channel.unsettled_at_leave == 0


def _remade_channel() -> _durable.DurableChannel:
    """A node's durable channel (fake) whose pull holds nothing, its settle queue empty."""
    channel = _durable.DurableChannel.__new__(_durable.DurableChannel)
    channel.cluster = SimpleNamespace(node="a")  # type: ignore[assignment]
    channel.options = SimpleNamespace(redelivery_delay=1.0)  # type: ignore[assignment]
    channel._stream = "nexus-durable"
    channel._in_flight = {}
    channel._late = OrderedDict()
    channel._held = deque()
    channel._ops = SimpleNamespace(queued=[])  # type: ignore[assignment]
    channel._settles_queued = channel._settles_sent = 0
    channel.stale_settles = channel.unsettled_at_leave = 0
    return channel


def test_a_settle_of_the_new_stream_queued_as_the_pull_finds_it_made_anew_is_sent() -> None:
    """Fifty-second pass: the stale-settle filter took every settle queued when the
    pull found the stream made anew, a takeover's settle of a delivery of the new
    stream too (a takeover fetches through a subscription of its own, which may have
    bound the new stream first): its nak went nowhere, and its message waited out
    ``ack_wait``. A delivery is of the old stream now when it was stored before the new
    one was made (its ack subject's time against JetStream's ``created``): the new
    stream's nak is sent, the old one's is not. (On main's _durable.py: naks ``[0, 0]``,
    ``stale_settles`` 2.)"""
    channel = _remade_channel()
    old, new = _FetchedMsg(_OLD), _FetchedMsg(_NEW)
    channel._ops.queued = [(old, "nak"), (new, "nak")]  # type: ignore[attr-defined]
    channel._settles_queued = 2
    channel._anew_at = _MADE_ANEW
    channel._stream_made_anew()
    trio.run(channel._send_ops, channel._ops.queued)
    assert ([old.naks, new.naks], channel.stale_settles) == ([0, 1], 1)
    channel._count_unsent()
    assert channel.unsettled_at_leave == 0


@pytest.mark.parametrize("remakes", [1, 2])
def test_a_settle_of_the_old_stream_the_settle_task_took_before_the_remake_is_not_sent(
    remakes: int,
) -> None:
    """Fifty-second pass: the stale-settle filter was the set of ack subjects the node
    held when its pull found the stream made anew: a batch the settle task had taken
    from the queue already (sent one by one, each nak an await) was in none of them,
    and a second remake replaced the set with what the node held then, so a settle of
    the first old stream still under way escaped it. Either escape sent the old
    delivery's nak to the new stream's message of its sequence. Stored before the
    newest stream was made, it is settled nowhere now: ``remakes`` 1, the batch taken
    before the remake; 2, the nak queued at the first remake and taken before the
    second. (On main's _durable.py: ``[1, 0]`` naks, ``stale_settles`` 1 (the
    second delivery, in hand at the remake, is filtered), for both.)"""
    channel = _remade_channel()
    taken, in_hand = _FetchedMsg(_OLD), _FetchedMsg(_OLD)
    channel._in_flight = {uuid.uuid4(): (in_hand, 0.0, None)}  # type: ignore[dict-item]
    if remakes == 2:
        channel._ops.queued = [(taken, "nak")]  # type: ignore[attr-defined]
        channel._anew_at = _MADE_ANEW - timedelta(minutes=1)
        channel._stream_made_anew()
        channel._ops.queued = []  # type: ignore[attr-defined]  # (the settle task took it)
    channel._anew_at = _MADE_ANEW
    channel._stream_made_anew()
    channel._settles_queued = 2
    trio.run(channel._send_ops, [(taken, "nak"), (in_hand, "nak")])
    assert ([taken.naks, in_hand.naks], channel.stale_settles) == ([0, 0], 2)
    channel._count_unsent()
    assert channel.unsettled_at_leave == 0


class _StaleForwarded(_FetchedMsg):
    """A fetched JetStream message (fake) to forward: its acks and terms sent too."""

    data = b"the message"

    def __init__(self) -> None:
        super().__init__()
        self.metadata = SimpleNamespace(
            sequence=SimpleNamespace(stream=1), num_delivered=1, timestamp=_OLD
        )
        self.headers = {wire.MSG_ID_HEADER: "m1"}
        self.acks = self.terms = 0

    async def ack(self) -> None:
        self.acks += 1

    async def term(self) -> None:
        self.terms += 1


@pytest.mark.parametrize("stored", [True, False])
def test_a_forward_of_a_delivery_of_the_stream_before_it_was_made_anew_stores_its_copy(
    stored: bool,
) -> None:
    """Review of the fifty-first pass: a forward (the message's agent runs on another
    node now) of a delivery of the stream before it was made anew was dropped with the
    rest of its settles: its copy was never stored for the other node, and the message,
    which this node held, was handled nowhere (counted only as a settle not sent). The
    copy is stored now, and only its ack is not sent (it would remove the new stream's
    message of its sequence); a copy JetStream does not take is dead at once
    (``dead_unforwarded``, in ``durable_dead``), neither nakked nor termed (its stream
    is gone). (On main's _durable.py: nothing published, forwarded 0.)"""
    published: list[tuple[str, bytes]] = []

    async def publish(subject: str, data: bytes, headers: dict[str, str]) -> None:
        if not stored:
            raise NatsTimeoutError
        published.append((subject, data))

    channel = _durable.DurableChannel.__new__(_durable.DurableChannel)
    channel.cluster = SimpleNamespace(  # type: ignore[assignment]
        node="a", data_js=SimpleNamespace(publish=publish), held=SimpleNamespace(due=_due)
    )
    channel.options = SimpleNamespace(redelivery_delay=1.0, max_deliver=5)  # type: ignore[assignment]
    channel._stream = "nexus-durable"
    forwarded, taken = _StaleForwarded(), _StaleForwarded()
    channel._in_flight = {}
    channel._late = OrderedDict()
    channel._held = deque()
    channel._ops = SimpleNamespace(  # type: ignore[assignment]
        queued=[
            (forwarded, f"{_durable._FORWARD}nexus.durable.b.x"),
            (taken, f"{_durable._TAKEN}nexus.durable.c.y"),
        ]
    )
    channel._settles_queued, channel._settles_sent = 2, 0
    channel.stale_settles = channel.unsettled_at_leave = 0
    channel.forwarded = channel.taken_over = channel.dead_unforwarded = 0
    channel._forward_failures = 0
    channel._unforwarded_log = channel._forward_failed_log = None  # type: ignore[assignment]
    channel._anew_at = _MADE_ANEW
    channel._stream_made_anew()
    trio.run(channel._send_ops, channel._ops.queued)
    sent = [(m.acks, m.naks, m.terms) for m in (forwarded, taken)]
    assert (sent, channel.stale_settles) == ([(0, 0, 0), (0, 0, 0)], 2)
    if stored:
        assert published == [
            ("nexus.durable.b.x", b"the message"),
            ("nexus.durable.c.y", b"the message"),
        ]
        assert (channel.forwarded, channel.taken_over, channel.dead_unforwarded) == (2, 1, 0)
    else:
        assert (channel.forwarded, channel.dead_unforwarded, channel._forward_failures) == (0, 2, 0)
    channel._count_unsent()
    assert channel.unsettled_at_leave == 0


def _due(*args: Any, **kwargs: Any) -> bool:
    return False  # (a throttle that lets no line through: the fake logs nothing)


class _NoWaiting:
    def delivered(self, jsmsg: Any) -> None:
        pass


def test_a_hand_back_the_leave_does_not_send_is_counted_unsettled_not_handed_back() -> None:
    """Forty-sixth pass (review): a takeover's hand-back at a leave counted all it
    fetched in ``handed_back_at_leave`` as it queued the naks, and each nak the closing
    queue did not send (refused, the queue closed; or taken and dropped unsent at its
    close) in ``unsettled_at_leave`` too: a double count. 10 fetched, the queue takes 6
    and sends 2: 2 handed back (those nakked), 8 unsettled, 10 in all, none in both.
    (Fails with the old counting put back as a mutant, the nak counted at the queue:
    handed back 10, unsettled 8, 18 in all.)"""
    ops = _ClosingOps(room=6)
    channel = _durable.DurableChannel.__new__(_durable.DurableChannel)
    channel.cluster = SimpleNamespace(node="a")  # type: ignore[assignment]
    channel.options = SimpleNamespace(redelivery_delay=1.0)  # type: ignore[assignment]
    channel._ops = ops  # type: ignore[assignment]
    channel._settles_queued = channel._settles_sent = 0
    channel.handed_back_at_leave = channel.unsettled_at_leave = 0
    channel._handed_back = set()
    channel._anew_at = None
    fetched = [_FetchedMsg() for _ in range(10)]
    channel._hand_back_at_leave(GHOST, fetched, _NoWaiting())  # type: ignore[arg-type]
    trio.run(channel._send_ops, ops.taken[:2])
    channel._count_unsent()
    assert (channel.handed_back_at_leave, channel.unsettled_at_leave) == (2, 8)
    assert [m.naks for m in fetched] == [1, 1] + [0] * 8
    channel._count_unsent()  # (a second stop counts them not again)
    assert channel.handed_back_at_leave + channel.unsettled_at_leave == len(fetched)


async def test_a_node_s_own_fetch_cancelled_at_its_leave_hands_back_what_it_took(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty-eighth pass: the leave's ``stop()`` cancels the node's own pull, its fetch
    under way too, which dropped what it had taken: those messages waited out
    ``ack_wait`` (30 s here). 20 messages are stored for a's ``keeper-a``, and a's fetch
    that took them does not return until its pull is cancelled by a's close. They are
    nakked back to a's consumer as the fetch returns (``durable_handed_back_at_leave``),
    and a's next process has each handled once. (On 5699b98's _durable.py swapped in:
    the next process gets them only after ack_wait: the wait times out.)"""
    handled: list[tuple[Any, Any]] = []
    real = _durable._poll
    fetched: list[int] = []
    options = attrs.evolve(PATIENT, durable=DURABLE, **QUICK)
    async with open_kernel(node_config()) as ka:
        async with join_cluster(ka, nats.url, "a", options=options) as ca:

            async def held(psub: Any, batch: int, idle: bool) -> Any:
                got = await real(psub, batch, idle)
                if got[0] and psub is ca.durable._psub and not fetched:
                    fetched.append(len(got[0]))
                    scope = ca.durable._pulling
                    while not scope.cancel_called:  # noqa: ASYNC110 (a Trio scope: no event)
                        await asyncio.sleep(0.01)
                return got

            monkeypatch.setattr(_durable, "_poll", held)
            stored = {(await store_for(ca, "keeper-a", i)).id for i in range(20)}
            with trio.fail_after(20):
                await until(lambda: bool(fetched))
        stats = ca.stats()
        await ka.shutdown()
    monkeypatch.setattr(_durable, "_poll", real)
    async with local_node(nats.url, "a", durable=DURABLE, **QUICK) as (ka2, _ca2):
        ka2.spawn(_keeper(handled, "keeper-a"))
        with trio.fail_after(20):
            await until(lambda: len(handled) >= 20)
    assert stats.durable_handed_back_at_leave == fetched[0] > 0
    assert stats.durable_unsettled_at_leave == 0
    assert sorted(msg_id for msg_id, _ in handled) == sorted(stored)


async def test_a_fetch_ended_at_a_leave_returns_what_its_long_poll_took_at_once(
    nats: NatsServer,
) -> None:
    """(What a cancelled fetch's hand-back relies on: ``end_fetch`` ends a nats-py fetch
    under way at once, with what it took. A fetch of 10 with a 30 s long poll takes the
    one message stored and waits for more; ended, it returns that message, and one that
    took nothing returns nothing, well before its poll's end, with no request of its
    sent after the end. Without the ending the first returned at the poll's end, 30 s:
    the wait here times out.)"""
    async with local_node(nats.url, "a", durable=DURABLE, **QUICK) as (_ka, ca):
        stream = f"{ca.prefix}-durable"
        psub = await call_aio(
            ca.data_js.pull_subscribe,
            wire.durable_subject(ca.prefix, GHOST, "*"),
            durable=GHOST,
            stream=stream,
        )
        stored = await store_for(ca, "keeper-a", "taken by the poll", node=GHOST)

        async def ended(expect_one: bool) -> list[Any]:
            fetch = asyncio.ensure_future(psub.fetch(10, 30.0))
            while True:  # (until the poll took the message, or waits with none)
                info = await ca.data_js.consumer_info(stream, GHOST)
                if (info.num_ack_pending if expect_one else info.num_waiting) == 1:
                    break
                await asyncio.sleep(0.02)
            assert end_fetch(psub)
            return fetched(await fetch)

        with trio.fail_after(10):
            took = await trio_asyncio.aio_as_trio(ended)(True)
            none = await trio_asyncio.aio_as_trio(ended)(False)
            # (the request the poll began with, if any: none sent after the end)
            await call_aio(ca.nc.flush)
            left = (await call_aio(ca.data_js.consumer_info, stream, GHOST)).num_waiting
            await call_aio(took[0].ack)
            await call_aio(psub.unsubscribe)
    assert [wire.decode_message(m.data).id for m in took] == [stored.id]
    assert none == []
    assert left <= 1


async def _taking_over_idle(
    ca: Cluster, handled: list[Any], info: Callable[[], Awaitable[Any]]
) -> Any:
    """Once ``ca``'s path has run its first wait: a message for ``keeper-a`` stored for
    the gone node (returned), taken over by ``ca``'s sweep and handled (``handled``),
    and the takeover in its next long poll (its request waits on the consumer ``info()``
    reads)."""
    await _past_first_wait(ca)
    first = await store_for(ca, "keeper-a", "found by the sweep", node=GHOST)
    await ca.durable._sweep(True)
    await until(lambda: len(handled) == 1)
    while not (await info()).num_waiting:  # noqa: ASYNC110 (the server's state)
        await trio.sleep(0.02)  # (the takeover's idle long poll)
    return first


async def test_a_message_a_cancelled_takeover_s_request_took_before_its_unsubscribe_is_handed_back(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty-ninth pass (a reviewer's find): a's takeover of a gone node, in an idle long
    poll (30 s here) when a's durable path stops, is cancelled at half the stop's bound;
    its fetch ends at once, but its request stays on the server until the subscription's
    unsubscribe. A message stored for that node then is delivered to the takeover's
    inbox right before the unsubscribe (here: stored, seen unacked in the consumer, and
    flushed into the subscription's queue, the unsubscribe held until then). It is
    nakked back now (``handed_back_at_leave`` 1) and a stand-in puller of the gone
    node's consumer gets it at once (``ack_wait`` 60 s). (On main's _durable.py swapped
    in: handed_back_at_leave 0, and the stand-in's fetch of 5 s gets nothing: the
    message waits out ack_wait in the unsubscribed queue.)"""
    monkeypatch.setattr(_durable, "_PULLER_ACTIVITY_WAIT", _NO_PULLER_WAIT)
    # (the takeover's long poll outlasts the stop's wait for it: it is cancelled there)
    monkeypatch.setattr(_durable, "FETCH_WAIT", 30.0)
    patient = attrs.evolve(DURABLE, ack_wait=60.0)
    real_unsubscribe = _durable._unsubscribe_taken
    handled: list[Any] = []
    sent: list[Any] = []
    unsubscribed = trio.Event()
    async with local_node(nats.url, "a", durable=patient, **QUICK) as (ka, ca):
        ka.spawn(_keeper(handled, "keeper-a"))
        stream = f"{ca.prefix}-durable"

        async def info() -> Any:
            return await call_aio(ca.data_js.consumer_info, stream, GHOST)

        async def store_then_unsubscribe(psub: Any) -> None:
            with trio.CancelScope(shield=True):
                while (await info()).num_ack_pending:  # noqa: ASYNC110 (the server's state)
                    await trio.sleep(0.02)  # (the first one's ack)
                sent.append(await store_for(ca, "keeper-a", "as a leaves", node=GHOST))
                while not (await info()).num_ack_pending:  # noqa: ASYNC110 (the server's state)
                    await trio.sleep(0.02)  # (delivered to the takeover's inbox)
                await call_aio(ca.nc.flush)  # (in the subscription's queue)
            await real_unsubscribe(psub)
            unsubscribed.set()

        with trio.fail_after(30):
            first = await _taking_over_idle(ca, handled, info)
            monkeypatch.setattr(_durable, "_unsubscribe_taken", store_then_unsubscribe)
            await ca.durable.stop(4.0)
            await unsubscribed.wait()
            handed_back = ca.durable.handed_back_at_leave
            standin = await call_aio(
                ca.data_js.pull_subscribe,
                wire.durable_subject(ca.prefix, GHOST, "*"),
                durable=GHOST,
                stream=stream,
            )
            try:
                got = await call_aio(standin.fetch, 1, 5.0)
            except NatsTimeoutError:
                got = []
            for jsmsg in got:
                await call_aio(jsmsg.ack)
            await call_aio(standin.unsubscribe)
    assert handled == [(first.id, "found by the sweep")]
    assert handed_back == 1
    assert [wire.decode_message(jsmsg.data).id for jsmsg in got] == [sent[0].id]


@pytest.mark.parametrize(
    ("limit", "said"),
    [
        ({"max_bytes": "stored"}, ("maximum bytes exceeded", "(full: the stream's max_bytes,")),
        (
            {"max_msgs_per_subject": 1, "discard_new_per_subject": True},
            ("maximum messages per subject exceeded", "(full: the stream's max_msgs_per_subject,"),
        ),
    ],
)
async def test_a_durable_send_past_a_limit_an_operator_set_names_that_limit(
    nats: NatsServer, limit: dict[str, Any], said: tuple[str, str]
) -> None:
    """Fifty-second pass: JetStream refuses a publish past any of a stream's limits with
    discard new with the one code, 10077 (measured on nats-server: ``maximum bytes
    exceeded``, ``maximum messages per subject exceeded``, ``maximum messages
    exceeded``), which ``send_durable`` read as the node's own bound: its error said
    "full: the stream's max_messages, None if this node made it" for a stream an
    operator had bounded by its bytes, or by its messages a subject (a node sets
    neither). It names the limit JetStream says was reached now, and that the kernel
    sets none of the two; nothing more is stored. (On main's _durable.py: the error ends
    ``(full: the stream's max_messages, None if this node made it); nothing was
    stored``.)"""
    async with local_node(nats.url, "a") as (kernel, cluster):
        kernel.spawn(_keeper([], "keeper-a"))
        stream = f"{cluster.prefix}-durable"
        js = cluster.data_js
        with trio.fail_after(20):
            await cluster.durable.stop()  # (nothing pulls: what is stored stays)
            await cluster.send_durable("keeper-a", "stored")
            info = await call_aio(js.stream_info, stream)
            bounds = {k: info.state.bytes if v == "stored" else v for k, v in limit.items()}
            config = info.config.evolve(discard=DiscardPolicy.NEW, **bounds)
            await call_aio(js.update_stream, config)
            with pytest.raises(TransportUnavailable) as refused:
                await cluster.send_durable("keeper-a", "refused")
            after = await call_aio(js.stream_info, stream)
    text = str(refused.value)
    assert f"stream {stream!r} refused it on subject {cluster.prefix}.durable.a." in text
    assert all(part in text for part in said)
    assert "set by an operator: a node sets none); nothing was stored" in text
    assert "max_messages" not in text
    assert after.state.messages == 1


async def test_a_durable_send_a_store_failure_refuses_says_that_not_a_full_stream(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fifty-sixth pass: code 10077 is nats-server's for any failure of a stream's store
    (``JSStreamStoreFailedF``: a store closed by a delete or a shutdown, a disk error),
    not only a limit reached with discard new; one whose description names no limit was
    said "full: a limit of the stream", and a forward's copy refused so waited a full
    stream's growing delay. Its line says the store failed, with JetStream's
    description. Here JetStream's answer to the publish is that error (nats-py's, as it
    raises one; no real server closes a store on demand). (On main's _durable.py: the
    error ends ``(full: a limit of the stream: store closed); nothing was stored``.)"""
    async with local_node(nats.url, "a") as (kernel, cluster):
        kernel.spawn(_keeper([], "keeper-a"))
        js = cluster.data_js

        async def refused(*args: Any, **kwargs: Any) -> Any:
            raise ServiceUnavailableError(code=503, err_code=10077, description="store closed")

        monkeypatch.setattr(js, "publish", refused)
        with trio.fail_after(20), pytest.raises(TransportUnavailable) as failed:
            await cluster.send_durable("keeper-a", "refused")
    text = str(failed.value)
    assert text.endswith(
        "description='store closed' (the stream's store failed: store closed; no limit of"
        " it said); nothing was stored"
    ), text
    assert "full" not in text


async def test_every_jetstream_api_request_of_a_node_goes_under_the_one_api_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fifty-sixth pass: a cluster has no option for a JetStream domain or an imported
    API's prefix (its contexts were nats-py's defaults), and the durable path's raw
    requests (a look's CONSUMER.INFO, a sweep's STREAM.INFO) wrote ``$JS.API`` out: a
    context made with another prefix would have left them on the account's own API.
    All now take ``wire.JS_API``, the prefix the cluster's contexts are made with. Here
    a nats-server in JetStream domain ``hub`` (it answers ``$JS.hub.API`` as its own)
    and that prefix in ``wire.JS_API``: every API request the nodes' clients publish
    (two joins, b's look, a sweep, a durable message's delivery) goes under it. (On
    main's code: all of them under ``$JS.API``, the look's
    ``$JS.API.CONSUMER.INFO.nexus-durable.b`` among them.)"""
    monkeypatch.setattr(wire, "JS_API", "$JS.hub.API", raising=False)
    published: list[str] = []
    publish = nats.aio.client.Client.publish

    async def seen(self: Any, subject: str, *args: Any, **kwargs: Any) -> Any:
        if subject.startswith("$JS."):
            published.append(subject)
        return await publish(self, subject, *args, **kwargs)

    monkeypatch.setattr(nats.aio.client.Client, "publish", seen)
    handled: list[Any] = []
    sent: list[Message] = []
    with NatsServer(config="jetstream { domain: hub }") as server:
        async with (
            local_node(server.url, "a", **QUICK) as (_ka, ca),
            local_node(server.url, "b", **QUICK) as (kb, cb),
        ):
            kb.spawn(_keeper(handled, "keeper-b"))
            with trio.fail_after(30):
                await cb.names_published()
                await _past_first_wait(cb)
                await cb.durable._sweep(True)
                sent.append(await cb.send_durable("keeper-b", "through the hub's API"))
                await until(lambda: cb.stats().durable_acked >= 1)
    api = [subject for subject in published if ".API." in subject]
    stream = f"{ca.prefix}-durable"
    assert [subject for subject in api if not subject.startswith("$JS.hub.API.")] == []
    assert f"$JS.hub.API.CONSUMER.INFO.{stream}.b" in api
    assert f"$JS.hub.API.STREAM.INFO.{stream}" in api
    assert f"$JS.hub.API.CONSUMER.MSG.NEXT.{stream}.b" in api
    assert handled == [(sent[0].id, "through the hub's API")]


async def test_a_takeover_whose_unsubscribe_never_returns_ends_within_its_bound(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fiftieth pass (review of the forty-ninth): a takeover's pull subscription ended at
    a leave was unsubscribed shielded with no bound (``_unsubscribe_taken``): an
    ``UNSUB`` whose write does not return (nats-py's ``_send_unsubscribe`` waits on its
    flush queue, which a flusher stuck on a server that reads nothing leaves full) held
    the takeover's end, and with it the cluster's nursery, the node's leave, for ever.
    Here a's takeover of a gone node, in an idle long poll (30 s) when a's durable path
    stops (bound 4 s), meets a ``_send_unsubscribe`` that does not return until the test
    ends: the takeover ends all the same, within the stop's bound and 2 s
    (``_PULL_CANCEL_WAIT`` for the unsubscribe, as much for its cancel), and its
    first message was handled once. (On main's _durable.py swapped in: the takeover
    has not ended 6 s after the stop, TooSlowError.)"""
    monkeypatch.setattr(_durable, "_PULLER_ACTIVITY_WAIT", _NO_PULLER_WAIT)
    # (the takeover's long poll outlasts the stop's wait for it: it is cancelled there)
    monkeypatch.setattr(_durable, "FETCH_WAIT", 30.0)
    handled: list[Any] = []
    released: list[bool] = []
    held: list[int] = []
    async with local_node(nats.url, "a", durable=DURABLE, **QUICK) as (ka, ca):
        ka.spawn(_keeper(handled, "keeper-a"))
        stream = f"{ca.prefix}-durable"
        conn = ca.durable._psub._sub._conn
        send_unsubscribe = conn._send_unsubscribe

        async def info() -> Any:
            return await call_aio(ca.data_js.consumer_info, stream, GHOST)

        async def stuck(sid: int, limit: int = 0) -> None:
            held.append(sid)
            while not released:  # noqa: ASYNC110 (released by the test's end)
                await asyncio.sleep(0.02)
            await send_unsubscribe(sid, limit)

        try:
            with trio.fail_after(30):
                first = await _taking_over_idle(ca, handled, info)
                conn._send_unsubscribe = stuck
                stopped = trio.current_time()
                await ca.durable.stop(4.0)
                with trio.fail_after(6.0):
                    while ca.durable._takeovers:
                        await ca.durable._takeover_ended.wait()
                ended = trio.current_time() - stopped
        finally:
            released.append(True)
            conn._send_unsubscribe = send_unsubscribe
    # (the takeover's and the node's own pull's, each sent again by nats-py's
    # unsubscribe as its cut unsubscribe_server_first ends)
    assert len(set(held)) == 2
    assert ended < 6.0
    assert handled == [(first.id, "found by the sweep")]


async def test_what_a_takeover_s_failed_fetch_left_in_its_subscription_is_taken_not_left(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty-ninth pass: a takeover whose fetch failed dropped its pull subscription
    (``psub = None``) without unsubscribing it. A pull request of it still on the server
    took the next message stored for the node into its inbox, which nobody read: it
    waited out ``ack_wait`` (60 s here). Here a's takeover of a gone node (kept after its
    consumer drained) fails a fetch whose 30 s request stays on the server (sent into
    the subscription's inbox, then the failure raised), a message for ``keeper-a``
    delivered to that request first. The subscription is unsubscribed now and what it holds settled as the
    takeover settles what it fetches: forwarded to a, handled once; the failure counted.
    (On main's _durable.py swapped in: the wait for it to be handled times out at 20 s.)"""
    monkeypatch.setattr(_durable, "_PULLER_ACTIVITY_WAIT", _NO_PULLER_WAIT)
    patient = attrs.evolve(DURABLE, ack_wait=60.0)
    real = _durable._poll
    handled: list[Any] = []
    sent: list[Any] = []
    armed: list[bool] = []
    async with local_node(nats.url, "a", durable=patient, **QUICK) as (ka, ca):
        ka.spawn(_keeper(handled, "keeper-a"))
        stream = f"{ca.prefix}-durable"

        async def kept(node: str) -> bool:
            return False  # (the consumer drained, the takeover goes on: no drop)

        ca.durable._dropped_when_drained = kept  # type: ignore[method-assign]

        async def failing(psub: Any, batch: int, idle: bool) -> Any:
            if psub is ca.durable._psub or armed != [True]:
                return await real(psub, batch, idle)
            armed.append(False)
            # (a request of this subscription that outlives its fetch: sent as
            # test_a_pull_request_the_server_still_holds_when_the_kernel_stops_takes_no_message
            # sends one, tests/test_nats.py)
            request = json.dumps({"batch": 1, "expires": 30_000_000_000}).encode()
            subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{GHOST}"
            await ca.nc.publish(subject, request, psub._deliver)
            await ca.nc.flush()
            while (await ca.data_js.consumer_info(stream, GHOST)).num_ack_pending:  # noqa: ASYNC110 (the server's state)
                await asyncio.sleep(0.02)  # (the first one's ack)
            store = trio_asyncio.trio_as_aio(store_for)
            sent.append(await store(ca, "keeper-a", "into the dropped inbox", node=GHOST))
            while not (await ca.data_js.consumer_info(stream, GHOST)).num_ack_pending:  # noqa: ASYNC110 (the server's state)
                await asyncio.sleep(0.02)  # (delivered to that request's inbox)
            await ca.nc.flush()  # (in the subscription's queue)
            raise NatsError("a refused fetch (the test's)")

        monkeypatch.setattr(_durable, "_poll", failing)
        with trio.fail_after(20):
            await _past_first_wait(ca)
            first = await store_for(ca, "keeper-a", "found by the sweep", node=GHOST)
            await ca.durable._sweep(True)
            await until(lambda: len(handled) == 1)
            armed.append(True)
            await until(lambda: len(handled) == 2)
            failures = ca.durable.takeover_fetch_failures
    assert armed == [True, False]
    assert handled == [(first.id, "found by the sweep"), (sent[0].id, "into the dropped inbox")]
    assert failures == 1


async def test_a_result_whose_cancel_lands_after_it_returned_goes_to_dropped() -> None:
    """Forty-ninth pass: ``call_aio_bounded`` dropped the result of an asyncio side that
    returned as the Trio caller was cancelled (the cancel woke the caller before the
    task's end did: the task could not be cancelled any more, and its result was never
    read). Here the asyncio side cancels its caller and returns 42 in one step: the
    caller is cancelled, and 42 goes to ``dropped``; one cancelled under way gives
    nothing there. (With the new code's ``dropped(...)`` call left out as a mutant:
    ``[]`` where ``[42]`` is asserted.)"""
    got: list[int] = []
    async with trio_asyncio.open_loop():
        with trio.CancelScope() as scope:

            async def returns_as_cancelled() -> int:
                scope.cancel()
                return 42

            await call_aio_bounded(1.0, returns_as_cancelled, dropped=got.append)
        assert scope.cancelled_caught
        assert got == [42]
        with trio.CancelScope() as scope:

            async def cancelled_under_way() -> int:
                scope.cancel()
                await asyncio.sleep(30)  # (cancelled here by the caller's cancel)
                return 43

            await call_aio_bounded(1.0, cancelled_under_way, dropped=got.append)
        assert scope.cancelled_caught
    assert got == [42]


async def test_a_fetch_that_returned_as_its_pull_was_cancelled_hands_back_what_it_took(
    nats: NatsServer,
) -> None:
    """Forty-ninth pass: a cancel of a's pull (the leave's stop) that landed after its
    fetch had returned, before the result reached the pull, dropped the result: the
    messages it took were neither handed over nor handed back, and waited out
    ``ack_wait`` (30 s here). Here the first fetch that takes some of the 20 messages
    stored for ``keeper-a`` cancels the pull as it returns (in the same step: the
    cancel lands first). What it took is nakked back (``handed_back_at_leave``), and
    a's next process has each of the 20 handled once. (On main's _durable.py and
    _aio.py swapped in, or with the new code's ``dropped(...)`` call left out:
    handed_back_at_leave stays 0, the wait for it times out at 20 s.)"""
    handled: list[tuple[Any, Any]] = []
    fetched: list[int] = []
    async with local_node(nats.url, "a", durable=DURABLE, **QUICK) as (_ka, ca):
        durable = ca.durable
        real = durable._fetch_shielded

        async def returns_as_cancelled(*args: Any) -> Any:
            got = await real(*args)
            if got[0] and not fetched:
                fetched.append(len(got[0]))
                durable._pulling.cancel()
            return got

        durable._fetch_shielded = returns_as_cancelled  # type: ignore[method-assign]
        stored = {(await store_for(ca, "keeper-a", i)).id for i in range(20)}
        with trio.fail_after(20):
            await durable._pull_ended.wait()
            await until(lambda: durable.handed_back_at_leave >= fetched[0])
            handed_back = durable.handed_back_at_leave
    async with local_node(nats.url, "a", durable=DURABLE, **QUICK) as (ka2, _ca2):
        ka2.spawn(_keeper(handled, "keeper-a"))
        with trio.fail_after(20):
            await until(lambda: len(handled) >= 20)
    assert handed_back == fetched[0] > 0
    assert sorted(msg_id for msg_id, _ in handled) == sorted(stored)


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"{oops", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"ack_floor": {"stream_seq": -1}}', "its ack_floor is not a sequence"),
        (b'{"delivered": 3}', "its delivered is not a sequence"),
        (b'{"num_ack_pending": true}', "its num_ack_pending is not a count"),
        (b'{"ts": "yesterday"}', "its ts is no time: 'yesterday'"),
        (b'{"ts": 5}', "its ts is no time: 5"),
        (b'{"ts": "2026-12-07T15:58:19"}', "its ts names no time zone"),
        (b'{"created": 5}', "its created is no time: 5"),
    ],
)
def test_a_garbled_consumer_state_for_a_look_names_the_request_and_what_is_wrong(
    answer: bytes, said: str
) -> None:
    """Fifty-fifth pass: a look reads its consumer's state raw (for the answer's ``ts``,
    which nats-py drops); an answer that is not nats-server's is a ValueError naming the
    request and the field (the look logs it and looks again later), an error answer is
    raised as nats-py raises it, and a good one is read as nats-py reads it (nanoseconds
    cut to microseconds, as nats-py cuts a stored message's time)."""
    subject = "$JS.API.CONSUMER.INFO.px-durable.a"
    with pytest.raises(
        ValueError,
        match=rf"^the answer to \$JS\.API\.CONSUMER\.INFO\.px-durable\.a is not nats-server's: {said}",
    ):
        _durable._consumer_state_answer(answer, subject)
    gone = b'{"error": {"code": 404, "err_code": 10014, "description": "consumer not found"}}'
    with pytest.raises(nats.js.errors.NotFoundError):
        _durable._consumer_state_answer(gone, subject)
    good = {
        "ack_floor": {"consumer_seq": 1, "stream_seq": 4},
        "delivered": {"consumer_seq": 3, "stream_seq": 9},
        "num_ack_pending": 2,
        "ts": "2026-12-07T15:58:19.599742579Z",
        "created": "2026-12-07T15:50:01.25Z",
    }
    state = _durable._consumer_state_answer(json.dumps(good).encode(), subject)
    at = datetime(2026, 12, 7, 15, 58, 19, 599742, tzinfo=UTC)
    assert (state.floor, state.last, state.pending, state.at) == (4, 9, 2, at)
    assert state.created == "2026-12-07T15:50:01.25Z"
    none_yet = _durable._consumer_state_answer(b'{"num_ack_pending": 0}', subject)
    assert (none_yet.floor, none_yet.last, none_yet.pending, none_yet.at) == (0, 0, 0, None)
    assert none_yet.created is None
