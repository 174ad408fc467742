"""Keeping the cycle collector off long-lived agent structures.

Every running agent owns a task, a nursery, cancel scopes, a memory channel pair and
their coroutine frames: some forty objects the cycle collector tracks. With 100,000
agents running, each full collection walks millions of objects that live as long as
their agents, and the collector's own rule (a full pass whenever the old generation
grew by a quarter) runs one every few thousand activations: measured, most of the
time of a cold fan-out to 100k agents went to the collector. CPython's answer for
long-lived heaps is :func:`gc.freeze` (what Instagram's servers use): it moves every
tracked object to a permanent generation that collections skip, in constant time.

The keeper freezes after every ``batch`` long-lived creations (an agent spawned, a run
scheduled, a run started: each makes objects that live as long as the agent), so the
structures of spawned and running agents stop being walked. A run that ends takes the
creations it was counted for off those counted since the last freeze: the keeper counts
growth, and a restart (a run ends, its agent's next one starts) is none, so a crash loop
does not freeze (each freeze raises the young threshold, below, under which the dead
runs' cycles would pile up); an agent stopped for good takes its spawn off the same way. Reference counting still frees frozen objects; only
*cyclic* garbage among them waits: when as many runs ended as are frozen/2 (stopped
agents leave their cycles behind), the keeper unfreezes (constant time too) so the
next full collection reclaims them, and freezes again at the next burst. A kernel that
froze unfreezes when it closes. ``[kernel] gc_freeze = false`` turns all of this off.

Queued messages are long-lived too, from the collector's point of view: a producer that
fills mailboxes faster than agents drain them (a fan-out burst) makes a message per send
that lives until it is handled, and every collection of the old generations walks all of
them again (measured: a quarter of the time of a million-message fan-out). So the keeper
also freezes when the kernel's backlog (messages accepted, not yet handled) has grown by
``batch`` since the last freeze. A handled message is freed by reference counting, frozen
or not; what a freeze holds back is the cyclic garbage not yet collected at that moment.
That stays bounded: once ``_BACKLOG_THAWS`` backlog freezes happened and the backlog has
fallen to half of what it was at the last one, the keeper unfreezes everything.

Between two freezes of a burst, the collector's young collections (one per 700 tracked
objects allocated, by default) walk the very objects the next freeze takes: an agent's
start makes about 40 of them, each walked once in generation 0 and again in generation 1
before the freeze makes the walks pointless (measured: 1.2 of the 9 seconds of starting
100,000 agents, 17% of it with its cache effects). So while it freezes, the keeper raises
the young generation's threshold (``gc.set_threshold``) above what a batch allocates: a
freeze empties the young generation before it fills. The first young collection that
starts anyway (a burst is over: that many objects were allocated without a freeze), any
thaw, and the kernel's close put the thresholds back as they were. The threshold is the
process's, shared by every kernel in it (one raise, one restore).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import contextlib
import gc
from typing import Final

_BATCH: Final = 2048
#: tracked objects per batched creation the raised young threshold leaves room for (an
#: agent's start makes about 40)
_YOUNG_PER_CREATION: Final = 64
#: backlog freezes after which a draining backlog gives the heap back to the collector
_BACKLOG_THAWS: Final = 16


class _YoungThreshold:
    """The process's young-generation threshold, raised while keepers freeze bursts."""

    def __init__(self) -> None:
        #: the thresholds to put back; None while not raised
        self.saved: tuple[int, int, int] | None = None
        self._watching = False

    def raise_(self, level: int) -> None:
        if self.saved is not None:
            return
        saved = gc.get_threshold()
        if saved[0] == 0 or saved[0] >= level:
            # Young collections are off (threshold 0) or already this rare: leave them.
            return
        # Raised first, remembered second: a collection in another thread in between
        # (gc callbacks run in the thread that collects) then finds nothing to restore,
        # instead of restoring before the raise and leaving it raised for good.
        gc.set_threshold(level, saved[1], saved[2])
        self.saved = saved
        if not self._watching:
            gc.callbacks.append(self._on_collection)
            self._watching = True

    def restore(self) -> None:
        saved = self.saved
        if saved is None:
            return
        # Forgotten first: a raise in another thread in between finds the threshold
        # still high and leaves it to this restore.
        self.saved = None
        current = gc.get_threshold()
        # Put back only what we changed (the application may have set the others since).
        gc.set_threshold(saved[0], current[1], current[2])

    def unwatch(self) -> None:
        """Restore, and stop watching collections (not from inside a gc callback)."""
        self.restore()
        if self._watching:
            self._watching = False
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        # A collection starts while raised: a burst is over (or someone called
        # gc.collect()); the usual thresholds from now on. (Not removed from
        # gc.callbacks here: the list is being walked.)
        if phase == "start" and self.saved is not None:
            self.restore()


#: shared by every keeper of the process (the thresholds are the process's)
YOUNG: Final = _YoungThreshold()


class HeapKeeper:
    """Counts agent runs starting and ending and freezes or thaws the collector's heap."""

    __slots__ = (
        "_backlog_freezes",
        "_backlog_mark",
        "_ended",
        "_frozen",
        "_holding",
        "_started",
        "batch",
        "enabled",
        "freezes",
        "thaws",
    )

    def __init__(self, enabled: bool, batch: int = _BATCH) -> None:
        self.enabled = enabled
        self.batch = batch
        #: long-lived creations since the last freeze
        self._started = 0
        #: runs frozen since the last thaw, and runs ended since then
        self._frozen = 0
        self._ended = 0
        #: the backlog at the last backlog freeze, and backlog freezes since the last thaw
        self._backlog_mark = 0
        self._backlog_freezes = 0
        #: something this keeper froze is still frozen
        self._holding = False
        self.freezes = 0
        self.thaws = 0

    def created(self) -> None:
        """Objects that live as long as an agent (or its run) were just made."""
        if not self.enabled:
            return
        self._started += 1
        if self._started >= self.batch:
            self._freeze()

    def removed(self) -> None:
        """An agent (or supervisor) stopped for good: the creation its spawn was counted for
        is garbage now, taken off those counted since the last freeze (not below 0), as a
        run's end takes off its own (see :meth:`run_ended`). Agents spawned and stopped
        over and over (short-lived workers, one per job) are no growth, and freeze
        nothing."""
        started = self._started
        if started:
            self._started = started - 1

    def backlog(self, queued: int) -> None:
        """The kernel holds ``queued`` messages accepted and not yet handled (told on the
        producers' slow path, once in sixteen sends, and once per run of tells from
        another kernel)."""
        if not self.enabled:
            return
        mark = self._backlog_mark
        if queued >= mark + self.batch:
            self._freeze()
            self._backlog_mark = queued
            self._backlog_freezes += 1
        elif queued * 2 < mark:
            # Most of what the last freeze held is handled: measure growth from here.
            self._backlog_mark = queued
            if self._backlog_freezes >= _BACKLOG_THAWS:
                self._thaw()

    def _freeze(self) -> None:
        # What was created since the last freeze is frozen with the rest.
        gc.freeze()
        YOUNG.raise_(self.batch * _YOUNG_PER_CREATION)
        self._holding = True
        self.freezes += 1
        self._frozen += self._started
        self._started = 0

    def _thaw(self) -> None:
        gc.unfreeze()
        YOUNG.restore()
        self._holding = False
        self.thaws += 1
        self._frozen = self._ended = 0
        self._backlog_freezes = 0

    def run_ended(self, made: int = 1) -> None:
        """A run ended: the ``made`` creations it was counted for (its start; a dormant
        agent's wake-up too) are garbage now.

        They are taken off the creations counted since the last freeze (not below 0): the
        keeper freezes on growth, and a restart, whose new run replaces the one that
        ended, is none. Counting every restart froze the heap each 2,048 of them and kept
        the young threshold raised, so that the dead runs' cycles piled up in the young
        generation (131,072 objects: 20 MB of a process agent's kernel) before a
        collection. Every ended run still counts towards the thaw, as before.
        """
        started = self._started
        if started:
            self._started = started - made if started > made else 0
        if not self._frozen:
            return
        ended = self._ended = self._ended + 1
        if ended >= self.batch and ended * 2 >= self._frozen:
            # Enough frozen agents stopped that their cycles are worth a collection.
            self._thaw()

    def close(self) -> None:
        """The kernel closes: give everything it froze back to the collector (once, however
        often it is called)."""
        if self._holding:
            gc.unfreeze()
            self._holding = False
            self._frozen = self._ended = self._started = 0
            self._backlog_mark = self._backlog_freezes = 0
        YOUNG.unwatch()
