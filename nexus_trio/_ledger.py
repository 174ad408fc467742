"""The ledger: where the kernel counts, and where every unhandled message is recorded.

The conservation law ``accepted == handled + replies + forwarded + dead_lettered +
in_flight`` is kept here, as plain integers (one Trio thread, no locks), so that
``Kernel.stats()`` costs the same at ten agents and at a million. The ledger also owns
the two observable streams (dead letters and lifecycle events) and the log lines that go
with them. It knows nothing of routing: what a dead Query means for its requester, and
how a monitor's notice is delivered, are callbacks handed in by the kernel.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Final, final

import trio

from ._deadletter import DeadLetter, DeadLetterReason
from ._errors import AgentNotFound, KernelShuttingDown, error_repr
from ._events import EventKind, LifecycleEvent
from ._logcall import log_guarded
from ._logfields import log_fields
from ._mailbox import HighWater
from ._message import SYSTEM_ID, Address, Message, MessageKind
from ._stats import FOLD_AT, Histogram
from ._streams import Broadcast, Subscription
from ._throttle import LineBudget

dead_letter_log: Final = logging.getLogger("nexus_trio.dead_letters")
agent_log: Final = logging.getLogger("nexus_trio.agent")
#: handled messages sampled one in eight before the sampling thins to one in 64
SAMPLE_DENSE: Final = 65_536
#: what a send refused with an exception to its caller is counted under
#: (``stats().rejected``; see :meth:`Ledger.reject`)
REJECTION_REASONS: Final = ("mailbox_full", "no_such_agent", "shutting_down")
log: Final = logging.getLogger("nexus_trio.kernel")


def _unlink(index: dict[uuid.UUID, set[uuid.UUID]], key: uuid.UUID, value: uuid.UUID) -> None:
    """Remove ``value`` from ``index[key]``, and the entry once it is empty."""
    entries = index.get(key)
    if entries is not None:
        entries.discard(value)
        if not entries:
            del index[key]


def _of_all(total: int) -> str:
    """What a line of records not logged says of the kind's limit (if any)."""
    return f" or {total:,} of all" if total else ""


@final
class Ledger:
    """Counters, dead letters, lifecycle events and monitors of one kernel."""

    __slots__ = (
        "_dead_letters",
        "_events",
        "_monitors",
        "_unsaid_wake",
        "_watching",
        "accepted",
        "agents_alive",
        "dead",
        "dead_by_reason",
        "dead_letter_lines",
        "failed",
        "failed_latency",
        "failure_lines",
        "failures_unsampled",
        "forwarded",
        "given_up",
        "handle_latency",
        "handled",
        "high_water",
        "now",
        "on_dead_query",
        "queue_wait",
        "rejected",
        "replies",
        "requests_after_detach",
        "restarts",
        "run_failures",
        "sample_mask",
        "send_notice",
        "sends_waiting",
        "tells_after_detach",
        "timed_out",
        "timestamps_ahead",
    )

    def __init__(
        self,
        dead_letter_buffer: int,
        dead_letter_log_limit: int = 0,
        failure_log_limit: int = 0,
        log_kind_limit: int = 0,
    ) -> None:
        self.accepted = 0
        #: sends waiting for room in a full mailbox: counted in ``accepted`` (in flight)
        #: while they wait, taken out of it again if they never get in
        self.sends_waiting = 0
        self.handled = 0
        self.replies = 0
        self.forwarded = 0
        self.failed = 0
        #: agent runs that failed outside a handler (``failed`` counts handler calls)
        self.run_failures = 0
        self.timed_out = 0
        self.dead = 0
        self.restarts = 0
        #: children the root stopped for good after too many failures
        self.given_up = 0
        #: tells and requests a detached transport's ``left`` took (see
        #: Kernel.detach_transport): dead-lettered, and refused to their requesters
        self.tells_after_detach = 0
        self.requests_after_detach = 0
        #: agents not forgotten yet, less those whose last run ended in the kernel's
        #: stop (the tree forgets them all at its end; counted out as each run ends)
        self.agents_alive = 0
        #: the deepest any mailbox has been (kept by the mailboxes, read in O(1))
        self.high_water = HighWater()
        self.dead_by_reason: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.handle_latency = Histogram()
        self.queue_wait = Histogram()
        #: the handling time of sampled handler calls that raised (see record_failure)
        self.failed_latency = Histogram()
        #: handler failures not sampled since the last one that was (see record_failure)
        self.failures_unsampled = 0
        #: sampled messages whose timestamp was after this kernel's clock as their
        #: handling began (their sender's clock ahead: skew across nodes); each waited 0
        self.timestamps_ahead = 0
        #: a message is sampled for the latency histograms when ``handled & sample_mask
        #: == 0`` as it starts (the count before it): one in eight for the first
        #: SAMPLE_DENSE handled messages, then one in 64 (see record_latency)
        self.sample_mask = 7
        # The ring of recent dead letters keeps them for long: without the frames of their
        # errors (a traceback holds every local of the handler that raised). Events keep
        # no ring (nothing reads one; 256 of them kept as many failed runs' frames).
        self._dead_letters: Broadcast[DeadLetter] = Broadcast(
            dead_letter_buffer, "dead_letters()", DeadLetter.without_frames
        )
        self._events: Broadcast[LifecycleEvent] = Broadcast(0, "events()")
        #: target -> its watchers, and watcher -> its targets (to end a stopped watcher's
        #: monitors: without it, a long-lived target kept every watcher it ever had)
        self._monitors: dict[uuid.UUID, set[uuid.UUID]] = {}
        self._watching: dict[uuid.UUID, set[uuid.UUID]] = {}
        self.now: Callable[[], float] = time.perf_counter
        #: what a dead Query means for its requester (set by the kernel's router); its
        #: last argument is the name of the agent where it was dead-lettered, if known
        self.on_dead_query: Callable[
            [Message, DeadLetterReason, BaseException | None, str | None], None
        ] = lambda msg, reason, error, recipient_name: None
        #: how a monitor notice reaches its watcher (set by the kernel's router)
        self.send_notice: Callable[[Message], None] = lambda msg: None
        #: set when a second has lines not logged: the kernel's task that says them at
        #: the second's end waits for it (see :meth:`say_unlogged_when_due`)
        self._unsaid_wake = trio.Event()
        #: dead-letter log lines a second of each reason, and failure lines (a handler's,
        #: with its traceback; a handler timeout; a run failed outside a handler) a
        #: second of each agent, and of each kind over all its reasons or agents
        #: (``log_kind_limit``: a thousand failing agents are not a thousand times the
        #: agent's limit): the rest counted and said in one line a second (a storm of a
        #: million dead letters is not a million lines). A per-key limit of 0 asks for a
        #: line each: the kind's limit does not apply then either.
        self.dead_letter_lines = LineBudget(
            dead_letter_log_limit,
            self._say_dead_letters,
            self._unsaid_wake_set,
            trio.current_time,
            total=log_kind_limit if dead_letter_log_limit else 0,
            kind="dead_letter",
        )
        self.failure_lines = LineBudget(
            failure_log_limit,
            self._say_failures,
            self._unsaid_wake_set,
            trio.current_time,
            total=log_kind_limit if failure_log_limit else 0,
            kind="agent_failure",
        )

    # --- conservation -------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self.accepted - self.handled - self.replies - self.dead - self.forwarded

    def reject(self, exc: BaseException) -> None:
        """A send refused with an exception to its caller (never accepted); counted under
        one of :data:`REJECTION_REASONS`."""
        if isinstance(exc, AgentNotFound):
            key = "no_such_agent"
        elif isinstance(exc, KernelShuttingDown):
            key = "shutting_down"
        else:
            key = "mailbox_full"
        self.rejected[key] += 1

    def record_latency(self, started: float, msg: Message, begun: int | None = None) -> None:
        """Record one sampled message's handling time and time in the mailbox: from its
        timestamp to ``begun`` (``time.time_ns()`` read as its handling began; without
        it, now).

        Sampling is by the kernel-wide count of handled messages, so agents that handle
        few messages are seen too. One in eight while the kernel has handled fewer than
        SAMPLE_DENSE messages (a short run or a quiet kernel still gets thousands of
        samples), then one in 64: at high rates a sample in eight cost a seventh of a
        no-op message, and one in 64 still gives ~15,000 samples per million messages.
        """
        # Deferred: two list appends; folded into the buckets in bulk when FOLD_AT are
        # kept or when anything reads the histograms (a record of each cost 0.3-0.6 us
        # more a sample). Both values are finite: differences of clock reads.
        handle, wait = self.handle_latency, self.queue_wait
        handle.defer(self.now() - started)
        # From the message's timestamp, taken by its sender: one whose clock is ahead of
        # this one's (another node's, a bridge agent's) gave a negative wait, which made
        # the summary's sum fall (Prometheus takes a fall for a reset): it waited 0.
        waited = (time.time_ns() if begun is None else begun) // 1000 - msg.timestamp
        if waited > 0:
            wait.defer(waited / 1e6)
        else:
            wait.defer(0.0)
            if waited < 0:
                # counted: an operator sees the skew (nexus_timestamps_ahead_total)
                self.timestamps_ahead += 1
        if len(wait.unfolded) >= FOLD_AT:
            handle.fold()
            wait.fold()
        if self.handled >= SAMPLE_DENSE:
            self.sample_mask = 63

    def record_failure(self, started: float | None) -> None:
        """A handler call that failed (counted in ``failed``: it raised an ``Exception``,
        or what is no Exception nor a cancel nor a Ctrl-C, ``sys.exit()``): its
        handling time goes into ``failed_latency`` if its start was sampled (``started``,
        the clock read as it began; None if not).

        Sampled as handled messages are, by the kernel-wide count of handled messages as
        the call starts: that count does not move while every message fails, so a
        failure not sampled counts toward forcing one: at the ``sample_mask + 1``-th in a
        row (8, later 64), the next message started anywhere is sampled (``sample_mask``
        0 until it starts: see :meth:`end_forced_sample`), whose failure, if it fails, is
        recorded; a success of it is recorded only if the count would have sampled it.
        """
        if started is not None:
            self.failures_unsampled = 0
            self.failed_latency.record(self.now() - started)
            return
        self.failures_unsampled += 1
        if self.failures_unsampled > self.sample_mask:
            self.failures_unsampled = 0
            self.sample_mask = 0

    def end_forced_sample(self) -> int:
        """A message sampled because ``sample_mask`` was 0 (forced by
        :meth:`record_failure`) started: the mask is as the count has it again, and
        returned (the stepper's own copy)."""
        mask = self.sample_mask = 7 if self.handled < SAMPLE_DENSE else 63
        return mask

    # --- dead letters ---------------------------------------------------------------------

    def dead_letter(
        self,
        msg: Message,
        reason: DeadLetterReason,
        recipient: Address,
        recipient_name: str | None = None,
        *,
        error: BaseException | None = None,
        detail: str = "",
    ) -> None:
        """Record one accepted message as not handled: count, log, publish, and fail its
        requester if it was a Query."""
        self.dead += 1
        self.dead_by_reason[reason.value] += 1
        if msg.kind is MessageKind.QUERY:
            self.on_dead_query(msg, reason, error, recipient_name)
        if dead_letter_log.isEnabledFor(logging.INFO) and self.dead_letter_lines.allowed(
            reason.value
        ):
            log_guarded(
                dead_letter_log,
                logging.INFO,
                "dead letter %s to %s: %s%s",
                msg.id,
                recipient,
                reason.value,
                f" ({detail})" if detail else "",
                extra={**log_fields(recipient, recipient_name, msg), "reason": reason.value},
            )
        letters = self._dead_letters
        if error is not None and not letters.has_subscribers:
            # Nobody listens: only the ring's frame-free copy is built.
            letters.publish_kept(DeadLetter.kept(msg, reason, recipient, error, detail))
        else:
            letters.publish(DeadLetter(msg, reason, recipient, error, detail))

    def _unsaid_wake_set(self) -> None:
        self._unsaid_wake.set()

    def _say_dead_letters(self, total: int, by_reason: str) -> None:
        log_guarded(
            dead_letter_log,
            logging.INFO,
            "%s dead letters not logged in the last second (%s): past %s lines a second of"
            " a reason%s; each is counted (stats().dead_letters_by_reason,"
            " nexus_dead_letters_total)",
            f"{total:,}",
            by_reason,
            self.dead_letter_lines.limit,
            _of_all(self.dead_letter_lines.total),
            extra={"not_logged": total},
        )

    def _say_failures(self, total: int, by_agent: str) -> None:
        log_guarded(
            agent_log,
            logging.ERROR,
            "%s handler failures not logged in the last second (%s): past %s lines a second"
            " of an agent%s; each is counted (stats().failed, nexus_handler_failures_total;"
            " a handler timeout in timed_out, a run's failure outside a handler in"
            " run_failures) and its message dead-lettered",
            f"{total:,}",
            by_agent,
            self.failure_lines.limit,
            _of_all(self.failure_lines.total),
            extra={"not_logged": total},
        )

    def say_unlogged(self) -> None:
        """Write the lines of the records not logged this second (dead letters, handler
        failures), if any."""
        self.dead_letter_lines.say_unlogged()
        self.failure_lines.say_unlogged()

    async def say_unlogged_when_due(self) -> None:
        """Run by the kernel: when a second has records not logged, write their line at
        the second's end, also when no other record comes to write it.

        It waits for the earliest such end of either budget, and wakes when a budget's
        second gets its first record not logged (its end may be sooner): waiting for
        one budget's end and then the other's said a failure line up to a second late
        when a dead-letter second ending later was waited for first."""
        budgets = (self.dead_letter_lines, self.failure_lines)
        while True:
            ends = [end for budget in budgets if (end := budget.window_end) is not None]
            with trio.move_on_at(min(ends, default=math.inf)):
                await self._unsaid_wake.wait()
            # (a wake set from here on is for a second not seen yet: the loop sees it)
            self._unsaid_wake = trio.Event()
            now = trio.current_time()
            for budget in budgets:
                end = budget.window_end
                if end is not None and end <= now:
                    # (a record after the second's end says it as the next one begins:
                    # then there is nothing left here to say)
                    budget.say_unlogged()

    def dead_letters(self, buffer: int) -> Subscription[DeadLetter]:
        return self._dead_letters.subscribe(buffer)

    def recent_dead_letters(self) -> list[DeadLetter]:
        return list(self._dead_letters.recent)

    @property
    def dead_letter_stream_dropped(self) -> int:
        return self._dead_letters.dropped

    # --- lifecycle events -----------------------------------------------------------------

    def events(self, buffer: int) -> Subscription[LifecycleEvent]:
        return self._events.subscribe(buffer)

    @property
    def has_event_subscribers(self) -> bool:
        return self._events.has_subscribers

    @property
    def event_stream_dropped(self) -> int:
        return self._events.dropped

    def publish_event(self, event: LifecycleEvent) -> None:
        self._events.publish(event)

    def event(
        self,
        kind: EventKind,
        agent_id: uuid.UUID,
        name: str | None,
        reason: str = "",
        error: BaseException | None = None,
        restarts: int = 0,
    ) -> None:
        """Publish a lifecycle event (built only if somebody listens)."""
        if self._events.has_subscribers:
            self._events.publish(
                LifecycleEvent(kind, agent_id, name, trio.current_time(), reason, error, restarts)
            )

    def finish_streams(self) -> None:
        self.say_unlogged()
        self._dead_letters.finish()
        self._events.finish()

    # --- monitors -------------------------------------------------------------------------

    def watch(self, watcher: uuid.UUID, target: uuid.UUID) -> None:
        """``watcher`` monitors ``target``: idempotent (a second call adds nothing)."""
        self._monitors.setdefault(target, set()).add(watcher)
        self._watching.setdefault(watcher, set()).add(target)

    def unwatch(self, watcher: uuid.UUID, target: uuid.UUID) -> bool:
        """``watcher`` no longer monitors ``target`` (however many times it asked);
        False if it did not."""
        watched = self._watching.get(watcher)
        if watched is None or target not in watched:
            return False
        _unlink(self._watching, watcher, target)
        _unlink(self._monitors, target, watcher)
        return True

    def notify(
        self,
        target: uuid.UUID,
        name: str | None,
        event: str,
        reason: str | BaseException | None,
        *,
        final: bool,
    ) -> None:
        """Tell the watchers of ``target`` that it failed or stopped (an Event message).

        ``reason``: why, or the error it failed with (its repr, made only if somebody
        watches). ``final``: it stopped for good. Its monitors of others end with it (as
        in Erlang and Akka: a monitor belongs to the watcher's lifetime), and so do the
        ones on it.
        """
        if not self._monitors and not self._watching:
            return  # no monitor in the whole kernel (most stops)
        if final:
            watchers = self._monitors.pop(target, None)
            for watched in self._watching.pop(target, ()):
                _unlink(self._monitors, watched, target)
            for watcher in watchers or ():
                _unlink(self._watching, watcher, target)
        else:
            watchers = self._monitors.get(target)
        if not watchers:
            return
        if not isinstance(reason, str):
            reason = error_repr(reason)
        for watcher in list(watchers):
            self.send_notice(
                Message(
                    sender=target,
                    to=watcher,
                    kind=MessageKind.EVENT,
                    payload={"event": event, "agent": str(target), "name": name, "reason": reason},
                )
            )

    def notify_noproc(self, watcher: uuid.UUID, target: Address) -> None:
        """Monitoring something that does not exist: the notice comes at once (Erlang)."""
        self.send_notice(
            Message(
                sender=target if isinstance(target, uuid.UUID) else SYSTEM_ID,
                to=watcher,
                kind=MessageKind.EVENT,
                payload={
                    "event": "stopped",
                    "agent": None if isinstance(target, str) else str(target),
                    "name": target if isinstance(target, str) else None,
                    "reason": "noproc",
                },
            )
        )
