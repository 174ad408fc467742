"""The built-in demo workloads of ``nexus run``: the real kernel under real load.

* ``ring`` — agents in a ring; a token is forwarded from each agent to the next for one
  lap (as many hops as agents, at least 100), then retires. Up to ``window`` tokens
  circulate at once (at most one mailbox' worth, so the ring itself never overflows);
  the driver injects a new token when one retires.
* ``fanout`` — a driver sends to the agents round robin with ``await kernel.send``: when
  a mailbox is full the driver waits (backpressure), and after ``send_timeout`` the send
  is refused (``MailboxFull``, counted in ``rejected``) and the driver goes on.
* ``request`` — agents in pairs (0-1, 2-3, ...; an odd last agent pairs with itself);
  each agent runs a loop in ``ctx.nursery`` doing ``ctx.request`` to its partner, one at a
  time, and answers its partner's queries.
* In a swarm (``nexus run --workers N``, see ``_swarm``) agent ``k`` runs on worker
  ``k mod N``: ring successors and request partners are addressed by name (they may live
  in another process); each worker injects ring tokens at its own agents (a token retires
  wherever its lap ends and frees a slot there: the tokens in the swarm stay within the
  window); worker 0 alone drives the fan-out, to the agents of every worker.
* ``pool`` — one pool (:func:`nexus_trio.pool`) named ``pool`` with ``agents`` workers
  behind a round-robin router; the driver sends to the pool's name as ``fanout`` does to
  agents, so every message goes through the router and then a worker. Pools of up to
  10,000 workers are also resized every second, between ``agents`` and half of it, while
  the traffic flows (shrinking lets the removed workers finish their queues).

``rate`` (messages per second in total, 0 = as fast as possible) paces the driver (fanout),
the token injection (ring: a token is one lap of messages) or each agent's loop (request:
a round trip is two messages). Nothing buffers without bound: every message goes through
a kernel mailbox. :meth:`Demo.stop` makes the agents stop generating traffic so that the
kernel's graceful shutdown drains quickly.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import trio

from .._agent import AgentRef, AgentSpec, Context, agent
from .._errors import KernelShuttingDown, MailboxFull, NexusError
from .._kernel import Kernel
from .._message import Address, Message, MessageKind
from .._pool import pool, pool_workers
from .._supervisor import Supervisor
from ._swarm import SwarmLayout

#: how a swarm worker learns the addresses of agents by name (the whole workload's)
Resolver = Callable[[Sequence[str]], Awaitable[list[AgentRef]]]

__all__ = ["WORKLOADS", "Demo", "Pacer", "spawn_many"]

WORKLOADS: Final = ("ring", "fanout", "request", "pool")

#: fewest hops of a ring token (small rings go round several times)
_MIN_LAP: Final = 100
#: most sends between two yields of the fanout driver
_DRIVER_BATCH: Final = 8192
#: agents per group supervisor (and per progress update)
_SPAWN_GROUP: Final = 5_000
#: the pool workload's pool, how long its workers may take to start, and its resizing
_POOL_NAME: Final = "pool"
_POOL_START_TIMEOUT: Final = 600.0
_POOL_RESIZE_LIMIT: Final = 10_000
_POOL_RESIZE_EVERY: Final = 1.0
#: how long the stop of a run waits for a resize under way
_POOL_RESIZE_TIMEOUT: Final = 10.0


class Pacer:
    """Paces events at ``rate / share`` per second (``rate`` 0 or less = no pacing: a
    ring's tokens of ``share`` hops each, a pair's share of the total), catching up after
    stalls of less than a second and forgetting longer ones. ``phase`` (0 to 1) puts the
    first event that part of an interval later.

    The interval is ``share / rate``, not ``1 / (rate / share)``: a tiny rate (``5e-324``)
    divided first underflowed to 0, "unpaced". An interval too long for a float is
    infinite: the first event (at phase 0) and no other."""

    __slots__ = ("_interval", "_next")

    def __init__(self, rate: float, *, share: float = 1.0, phase: float = 0.0) -> None:
        self._interval = share / rate if rate > 0 else 0.0
        # (0 x inf is NaN, a deadline that never comes and never waits)
        self._next = trio.current_time() + (phase * self._interval if phase else 0.0)

    async def wait(self, n: int = 1) -> None:
        if not self._interval:
            return
        now = trio.current_time()
        if self._next < now - 1.0:
            self._next = now
        due = self._next
        self._next += n * self._interval
        if due > now:
            await trio.sleep_until(due)


async def send_round_robin(
    send: Callable[[AgentRef, Any], Awaitable[Any]],
    refs: Sequence[AgentRef],
    payload: Any,
    i: int,
    count: int,
) -> int:
    """The fan-out driver's sends between two yields: ``count`` sends of ``payload``
    round robin over ``refs`` from index ``i`` (modulo their number), awaited one by one
    (each respects backpressure); returns the next index. A send refused with
    ``MailboxFull`` (after ``send_timeout``: counted by the kernel) is skipped.

    ``try``/``except``, not ``with contextlib.suppress(MailboxFull)``: the context
    manager (a class built and its two methods called, a send) was about a tenth of the
    driving worker's instructions a crossing tell and its local twin under ``--workers
    2`` (callgrind; docs/distributed.md, forty-sixth pass)."""
    n = len(refs)
    for _ in range(count):
        # (not contextlib.suppress: see above)
        try:  # noqa: SIM105
            await send(refs[i % n], payload)
        except MailboxFull:
            pass  # refused after send_timeout: counted
        i += 1
    return i


async def spawn_many(
    kernel: Kernel,
    spec: AgentSpec,
    count: int,
    prefix: str,
    *,
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    indices: Sequence[int] | None = None,
) -> list[AgentRef]:
    """Spawn ``count`` agents named ``{prefix}-{i}`` in groups of ``_SPAWN_GROUP``
    (``i`` in ``range(count)``, or in ``indices``: a swarm worker's share).

    Each group is one :class:`Supervisor` (``{prefix}-group-{k}``) spawned with all its
    children: its agents start together when it starts, instead of one by one through the
    root supervisor's inbox. Progress is reported (and the kernel gets to run) after each
    group; stops early if ``should_stop()`` becomes true.
    """
    refs: list[AgentRef] = []
    groups = 0
    numbers = range(count) if indices is None else indices
    for start in range(0, len(numbers), _SPAWN_GROUP):
        names = [f"{prefix}-{i}" for i in numbers[start : start + _SPAWN_GROUP]]
        children: Any = [spec.with_options(name=name) for name in names]
        kernel.spawn(Supervisor(children=children, name=f"{prefix}-group-{groups}"))
        groups += 1
        refs.extend(kernel.lookup(name) for name in names)
        if progress is not None:
            progress(len(refs))
        await trio.lowlevel.checkpoint()
        if should_stop is not None and should_stop():
            break
    # let the group supervisors start (a few scheduling rounds each, all at once)
    for _ in range(groups + 4):
        await trio.lowlevel.checkpoint()
    # The agents live as long as the run: move them out of the cyclic GC's reach, or
    # every full collection rescans all of them (at 100k agents that is most of the
    # time a fan-out spends; see docs/benchmarks.md).
    gc.freeze()
    return refs


class Demo:
    """One demo workload over ``agents`` agents of one kernel."""

    def __init__(
        self,
        kernel: Kernel,
        kind: str,
        agents: int,
        *,
        rate: float = 0.0,
        payload_size: int = 16,
        seed: int | None = None,
        swarm: SwarmLayout | None = None,
        resolve: Resolver | None = None,
    ) -> None:
        if kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {kind!r}")
        if agents < 1:
            raise ValueError(f"a demo workload needs at least 1 agent, got {agents!r}")
        if rate < 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
        if payload_size < 0:
            raise ValueError(f"payload size must be >= 0, got {payload_size!r}")
        self.kernel = kernel
        self.kind = kind
        self.agents = agents
        self.rate = rate
        self.blob = "x" * payload_size
        self.running = True
        self.refs: list[AgentRef] = []
        #: the agents of this process (all of them, unless in a swarm)
        self.local_refs: list[AgentRef] = []
        self._rng = random.Random(seed)
        self._next: dict[uuid.UUID, Address] = {}
        if swarm is not None and resolve is None:
            raise ValueError("a swarm worker's demo needs a resolver for the others' agents")
        self.swarm = swarm
        self._resolve = resolve
        capacity = kernel.config.kernel.mailbox_capacity
        self.window = max(1, min(agents, capacity))
        if swarm is not None:  # every worker injects its part of the tokens
            self.window = max(1, self.window // swarm.size)
        self._tokens = trio.Semaphore(self.window)

    # --- the agents -----------------------------------------------------------------------

    def spec(self) -> AgentSpec:
        """The spec of this workload's agents."""
        if self.kind == "ring":
            return self._ring_spec()
        if self.kind in ("fanout", "pool"):
            return self._fanout_spec()
        return self._request_spec()

    def _ring_spec(self) -> AgentSpec:
        demo = self
        following = self._next

        async def ring(ctx: Context, msg: Message) -> Any:
            hops, data = msg.payload
            if hops <= 1 or not demo.running:
                demo._tokens.release()
                return None
            return Message(sender=ctx.id, to=following[ctx.id], payload=[hops - 1, data])

        return agent(name="ring")(ring)

    def _fanout_spec(self) -> AgentSpec:
        async def sink(ctx: Context, msg: Message) -> None:
            return None

        return agent(name="sink")(sink)

    def _request_spec(self) -> AgentSpec:
        demo = self
        partners = self._next
        # a round trip is two messages; each agent does its share of the total rate
        rate, share = self.rate, 2 * self.agents

        async def loop(ctx: Context, partner: Address) -> None:
            pacer = Pacer(rate, share=share, phase=demo._rng.random())
            while demo.running:
                await pacer.wait()
                try:
                    await ctx.request(partner, demo.blob)
                except KernelShuttingDown:
                    return
                except NexusError:
                    # timed out, failed or refused: counted by the kernel; go on, gently
                    await trio.sleep(0.01)

        async def peer(ctx: Context, msg: Message) -> Any:
            if msg.kind is MessageKind.QUERY:
                return msg.payload
            if msg.payload == "start" and demo.running:
                ctx.nursery.start_soon(loop, ctx, partners[ctx.id])
            return None

        return agent(name="peer")(peer)

    # --- running ----------------------------------------------------------------------------

    async def spawn(
        self,
        *,
        progress: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[AgentRef]:
        """Spawn the agents and wire them up (ring successors, request partners)."""
        if self.kind == "pool":
            self.refs = self.local_refs = await self._spawn_pool(progress)
            return self.refs
        if self.swarm is not None:
            return await self._spawn_share(self.swarm, progress, should_stop)
        self.refs = self.local_refs = await spawn_many(
            self.kernel,
            self.spec(),
            self.agents,
            self.kind,
            progress=progress,
            should_stop=should_stop,
        )
        ids = [ref.id for ref in self.refs]
        n = len(ids)
        if self.kind == "ring":
            for i, agent_id in enumerate(ids):
                self._next[agent_id] = ids[(i + 1) % n]
        elif self.kind == "request":
            for i, agent_id in enumerate(ids):
                partner = i + 1 if i % 2 == 0 else i - 1
                self._next[agent_id] = ids[partner] if partner < n else agent_id
        return self.refs

    async def _spawn_share(
        self,
        swarm: SwarmLayout,
        progress: Callable[[int], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> list[AgentRef]:
        """A swarm worker's agents (``k`` with ``k mod N == index``), wired by name to
        the others' (they may not be known yet: a name is resolved when first used)."""
        n = self.agents
        indices = swarm.local_indices(n)
        self.local_refs = await spawn_many(
            self.kernel,
            self.spec(),
            len(indices),
            self.kind,
            progress=progress,
            should_stop=should_stop,
            indices=indices,
        )
        for k, ref in zip(indices, self.local_refs, strict=False):
            if self.kind == "ring":
                self._next[ref.id] = f"{self.kind}-{(k + 1) % n}"
            elif self.kind == "request":
                partner = k + 1 if k % 2 == 0 else k - 1
                self._next[ref.id] = f"{self.kind}-{partner}" if partner < n else ref.id
        assert self._resolve is not None
        self.refs = await self._resolve([f"{self.kind}-{k}" for k in range(n)])
        return self.refs

    async def drive(self) -> None:
        """Generate traffic until cancelled or :meth:`stop`."""
        if not self.refs:
            return
        if self.swarm is not None and self.kind == "fanout" and self.swarm.index != 0:
            return  # worker 0 drives the swarm's fan-out
        try:
            if self.kind == "ring":
                await self._drive_ring()
            elif self.kind == "fanout":
                await self._drive_fanout()
            elif self.kind == "pool":
                await self._drive_pool()
            else:
                await self._drive_request()
        except KernelShuttingDown:
            return

    def stop(self) -> None:
        """Stop generating traffic: tokens retire, request loops end."""
        self.running = False

    async def _drive_ring(self) -> None:
        refs = self.local_refs
        n = len(refs)
        if not n:
            return  # a swarm worker with none of the ring's agents (more workers than agents)
        lap = max(len(self.refs), _MIN_LAP)  # hops per token
        # (a swarm's workers each inject their part of the tokens)
        workers = self.swarm.size if self.swarm is not None else 1
        pacer = Pacer(self.rate, share=lap * workers)
        i = 0
        while self.running:
            await self._tokens.acquire()
            await pacer.wait()
            try:
                await self.kernel.send(refs[i % n], [lap, self.blob])
            except MailboxFull:
                self._tokens.release()
            i += 1

    async def _drive_fanout(self, targets: list[AgentRef] | None = None) -> None:
        refs = targets or self.refs
        n = len(refs)
        send = self.kernel.send
        blob = self.blob
        # a few messages per agent between two yields: an agent's wake-up costs more than
        # a message, so batches amortise it (and every send still respects backpressure)
        batch = max(256, min(4 * n, _DRIVER_BATCH))
        if self.rate:
            batch = max(1, min(batch, int(self.rate / 50)))
        pacer = Pacer(self.rate)
        i = 0
        while self.running:
            i = await send_round_robin(send, refs, blob, i, batch)
            if self.rate:
                await pacer.wait(batch)
            else:
                await trio.lowlevel.checkpoint()

    async def _drive_request(self) -> None:
        for ref in self.local_refs:
            await self.kernel.send(ref, "start")
        await trio.sleep_forever()

    # --- the pool workload (self-contained: spawn, resize, drive) ---------------------------

    async def _spawn_pool(self, progress: Callable[[int], None] | None) -> list[AgentRef]:
        self.kernel.spawn(pool(self.spec(), size=self.agents, name=_POOL_NAME))
        # Answered once the router's on_start has started the workers.
        workers = await pool_workers(self.kernel, _POOL_NAME, timeout=_POOL_START_TIMEOUT)
        if progress is not None:
            progress(len(workers))
        return workers

    async def _drive_pool(self) -> None:
        router = [self.kernel.lookup(_POOL_NAME)]
        async with trio.open_nursery() as nursery:
            if 2 <= self.agents <= _POOL_RESIZE_LIMIT:
                nursery.start_soon(self._resize_pool_forever)
            await self._drive_fanout(router)
            nursery.cancel_scope.cancel()

    async def _resize_pool_forever(self) -> None:
        sizes = [max(1, self.agents // 2), self.agents]
        i = 0
        while self.running:
            await trio.sleep(_POOL_RESIZE_EVERY)
            # Asked, and seen through even when the run stops meanwhile (shielded, bounded):
            # a resize still in the router's mailbox at the stop would be handled in the
            # shutdown, where a grow is refused (a handler_error dead letter), and a request
            # given up at the stop would leave its answer without a requester (an
            # unroutable reply). A shrink is answered once the removed workers have handled
            # what was queued for them.
            with trio.CancelScope(shield=True), contextlib.suppress(NexusError):
                # refused (counted) or failed (logged by the pool): the demo goes on
                await self.kernel.request(
                    _POOL_NAME, {"$resize": sizes[i % 2]}, timeout=_POOL_RESIZE_TIMEOUT
                )
            i += 1
