"""What the latency sampling sees beyond the handled messages: a handler call that raised
(``failed_handle_latency``, ``nexus_failed_handle_latency_seconds``) and a message stamped
after this kernel's clock (``timestamps_ahead``, ``nexus_timestamps_ahead_total``).

On a ``MockClock(autojump_threshold=0)``: a handler's 2 s are the clock's, not real time.
"""

from __future__ import annotations

import time
import uuid

import trio
import trio.testing
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nexus_trio import Context, Message, TransportUnavailable, agent
from nexus_trio._ledger import SAMPLE_DENSE, Ledger
from nexus_trio._message import SYSTEM_ID
from nexus_trio.metrics import build_registry
from nexus_trio.testing import open_test_kernel


def _samples(kernel: object) -> dict[str, float]:
    text = generate_latest(build_registry(kernel, process=False)).decode()  # type: ignore[arg-type]
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


@agent(name="slow_fail")
async def slow_fail(ctx: Context, msg: Message) -> None:
    await trio.sleep(2)
    raise ValueError("failed after 2 s")


async def test_a_handler_that_raises_after_2_s_is_timed_in_the_failed_latency(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: only the handler calls that returned were timed; one that raised after
    2 s showed nowhere (``handle_latency.count`` 0, no series of failures' times)."""
    async with open_test_kernel() as kernel:
        ref = kernel.spawn(slow_fail)
        await kernel.send(ref, "x")
        await trio.sleep(5)
        stats = kernel.stats()
        assert stats.failed == 1
        assert stats.handle_latency.count == 0  # (a failure is not mixed in with successes)
        failed = stats.failed_handle_latency
        assert failed.count == 1
        assert failed.total == 2.0 and failed.maximum == 2.0
        values = _samples(kernel)
        assert values["nexus_failed_handle_latency_seconds_count"] == 1
        assert values["nexus_failed_handle_latency_seconds_sum"] == 2.0
        assert values["nexus_failed_handle_latency_seconds_max"] == 2.0
        assert values["nexus_handle_latency_seconds_count"] == 0


@agent(name="too_slow", handle_timeout=1.0)
async def too_slow(ctx: Context, msg: Message) -> None:
    await trio.sleep(5)


async def test_a_handler_timeout_is_not_timed_in_the_failed_latency(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A handler call cut by its ``handle_timeout`` is no failure (``failed`` counts the
    calls that raised): it is counted in ``timed_out``, and its time, the timeout, goes
    in neither latency series (the cancel that cuts it is a ``BaseException``, not an
    ``Exception`` of the handler's). Named mutant: ``record_failure`` for any
    ``BaseException`` in _serve_batches: ``failed_handle_latency.count`` 1."""
    async with open_test_kernel() as kernel:
        ref = kernel.spawn(too_slow)
        await kernel.send(ref, "x")  # (the first message: sampled, count 0)
        await trio.sleep(10)
        stats = kernel.stats()
        assert (stats.timed_out, stats.failed, stats.handled) == (1, 0, 0)
        assert stats.failed_handle_latency.count == 0
        assert stats.handle_latency.count == 0
        assert _samples(kernel)["nexus_failed_handle_latency_seconds_count"] == 0


@agent(name="mostly_fails")
async def mostly_fails(ctx: Context, msg: Message) -> None:
    if msg.payload == "fail":
        raise ValueError("no")


async def test_failures_are_sampled_while_every_message_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression (of the sampling by the count of handled messages): that count does not
    move while every message fails, so after 5 handled (5 is not sampled: one in eight)
    a storm of 40 failures would have had none timed. Each ninth failure in a row forces
    a sample of the next message: the 9th, 18th, 27th and 36th are timed. The handled
    messages' sampling is as before: the first (count 0) and the ninth (count 8)."""
    async with open_test_kernel() as kernel:
        ref = kernel.spawn(mostly_fails)
        for _ in range(5):
            await kernel.send(ref, "ok")
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(40):
            await kernel.send(ref, "fail")
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        assert (stats.handled, stats.failed) == (5, 40)
        assert stats.failed_handle_latency.count == 4
        assert stats.handle_latency.count == 1
        # Four more failures (the 37th to the 44th not sampled: the next is forced), then
        # four handled in one batch: the first takes the forced sample, and a success
        # of it is recorded only as the count would have (5: no); the rest of its batch
        # is sampled by the count again (counts 6, 7 not, 8 yes).
        for payload in ["fail"] * 4 + ["ok"] * 4:
            kernel.send_nowait(ref, payload)
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        assert (stats.handled, stats.failed) == (9, 44)
        assert stats.handle_latency.count == stats.queue_wait.count == 2
        assert stats.failed_handle_latency.count == 4


async def test_the_ninth_failure_in_a_row_is_timed_and_not_the_eighth(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The force is at the ``sample_mask + 1``-th failure not sampled in a row (8 while
    sampling one in eight): after one handled message (count 0, sampled), eight
    failures are none of them timed, and the ninth is."""
    async with open_test_kernel() as kernel:
        ref = kernel.spawn(mostly_fails)
        await kernel.send(ref, "ok")
        for _ in range(8):
            await kernel.send(ref, "fail")
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        assert (stats.handled, stats.failed, stats.failed_handle_latency.count) == (1, 8, 0)
        await kernel.send(ref, "fail")
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        assert (stats.handled, stats.failed, stats.failed_handle_latency.count) == (1, 9, 1)


def test_past_sample_dense_the_ledger_samples_one_in_64_and_forces_at_the_64th_failure() -> None:
    """The ledger's mask: 7 (one in eight) until SAMPLE_DENSE messages are handled, 63
    (one in 64) from then; the failures not sampled in a row force a sample at the
    mask's + 1-th (8, then 64), and the forced sample's start gives back the count's
    mask. (Below the kernel: 65,536 handled messages are not sent here.)"""
    ledger = Ledger(16)
    msg = Message(SYSTEM_ID, SYSTEM_ID, "x")
    for _ in range(7):
        ledger.record_failure(None)
    assert ledger.sample_mask == 7
    ledger.record_failure(None)  # the 8th: the next message is sampled
    assert ledger.sample_mask == 0
    assert ledger.end_forced_sample() == 7 == ledger.sample_mask
    ledger.handled = SAMPLE_DENSE - 1
    ledger.record_latency(time.perf_counter(), msg)
    assert ledger.sample_mask == 7
    ledger.handled = SAMPLE_DENSE
    ledger.record_latency(time.perf_counter(), msg)
    assert ledger.sample_mask == 63
    for _ in range(63):
        ledger.record_failure(None)
    assert ledger.sample_mask == 63
    ledger.record_failure(None)  # the 64th
    assert ledger.sample_mask == 0
    assert ledger.end_forced_sample() == 63 == ledger.sample_mask


class _Inbound:
    """A transport that never sends: the kernel's handle takes messages "from a peer"."""

    async def deliver(self, msg: Message) -> None:
        raise TransportUnavailable("inbound only")

    def deliver_nowait(self, msg: Message) -> None:
        raise TransportUnavailable("inbound only")

    def cancel_query(self, query_id: uuid.UUID, to: uuid.UUID | str) -> None:
        pass

    def query_failed(self, query_id: uuid.UUID, error: BaseException) -> None:
        pass


@agent(name="sink")
async def sink(ctx: Context, msg: Message) -> None:
    return None


async def test_a_message_stamped_ahead_of_this_clock_is_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a message from a peer whose clock is an hour ahead was sampled as
    waiting 0 (its negative wait clamped) and counted nowhere: an operator could not see
    the skew. Now ``timestamps_ahead`` (``nexus_timestamps_ahead_total``) counts it; a
    message stamped in the past is not counted."""
    async with open_test_kernel() as kernel:
        handle = kernel.attach_transport(_Inbound())
        ref = kernel.spawn(sink)
        now = time.time_ns() // 1000
        # The first message handled is sampled (the count 0), and the ninth (count 8).
        await handle.deliver(Message(uuid.uuid4(), ref.id, 0, timestamp=now + 3_600_000_000))
        await trio.testing.wait_all_tasks_blocked()
        for n in range(7):
            await handle.deliver(Message(uuid.uuid4(), ref.id, n, timestamp=now - 1_000_000))
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        assert (stats.handled, stats.queue_wait.count) == (8, 1)
        assert stats.timestamps_ahead == 1
        await handle.deliver(Message(uuid.uuid4(), ref.id, 8, timestamp=now - 1_000_000))
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        assert (stats.handled, stats.queue_wait.count) == (9, 2)
        assert stats.timestamps_ahead == 1  # (stamped a second ago: not ahead)
        assert stats.queue_wait.total >= 1.0
        values = _samples(kernel)
        assert values["nexus_timestamps_ahead_total"] == 1
