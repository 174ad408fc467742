"""Prometheus metrics and a health check for a running kernel, served from Trio.

``await serve_metrics(kernel, host, port)`` runs a tiny HTTP/1.1 server (``trio.serve_tcp``
style, one request per connection) next to the kernel:

* ``GET /metrics`` — the Prometheus text format (``prometheus_client.generate_latest`` on a
  custom collector): kernel counters, dead letters and rejected sends by reason, the
  handle-latency and queue-wait summaries, the ``process_*`` series of the process and, only
  when asked for (``[metrics] per_agent``), per-agent series for at most ``per_agent_limit``
  agents, the deepest mailboxes first;
* ``GET /healthz`` — liveness: ``200 ok`` while the kernel runs and is not shutting down,
  ``503`` otherwise (what ``nexus health`` and a container ``HEALTHCHECK`` ask);
* ``GET /readyz`` — readiness: ``200 ready`` when the kernel runs and every readiness
  check added to it (:func:`add_readiness`: a NATS cluster's while it joins, is joined
  and leaves; ``nexus run``'s while it starts) says ready, ``503`` with the reasons in one
  line otherwise (``shutting down``, ``starting``, ``not joined``, ``nats connection down
  since 3 s``, ``leaving``): what a Kubernetes ``readinessProbe`` or a load balancer
  asks, to take the process out of rotation without restarting it (``nexus health
  --ready``); also the gauge ``nexus_ready``.

A scrape must not stall the agents it observes. By default it reports kernel-wide series
only: ``kernel.stats()`` is O(1) and the text is a few dozen lines, rendered on the event
loop. With per-agent series (opt-in, capped) the snapshot walks the agents a slice at a
time (:meth:`Kernel.scan_agents <nexus_trio.Kernel.scan_agents>`: 4,096 mailbox depths
read, or 512 chosen agents' counters copied, between two checkpoints) and the text is
rendered on the loop in pieces of at most 500 samples (about 2 ms each); after each slice
and piece the scrape gives the other tasks as much loop time as it took, while any of them
is runnable (:class:`_Turns`), so the agents run between slices and pieces and a
back-to-back scraper takes about half of a busy loop, not a piece in each of its rounds. Such a snapshot is not of one
moment, as with the collectors of the Prometheus client libraries: the kernel-wide series
are read together when the scrape starts, each agent's depth when the walk visits it and
its counters when they are copied; an agent spawned during the walk is in the next scrape,
one that stopped before its counters were copied is left out. Not in a worker thread:
with the GIL, a busy event loop starves one (measured: a ``to_thread`` job waited 7 s
behind a ring workload, and a 20-agent render more than the 10 s a request may take).
Scrapes share renders (:class:`MetricsRenderer`): one render at a time, concurrent scrapes wait for the one in progress, and a render is reused for
``cache_ms``. A request that takes more than 10 s in all (reading it and rendering) gets
``503`` with the reason, not a closed connection; a connection whose request head is not
all in within the 10 s is closed without an answer (it asked for nothing). The endpoint
counts its connections, the ``accept`` calls that failed for lack of descriptors and the
requests it refused (400, 404, 405, 431, 505) by status (:class:`EndpointStats`, exported as
``nexus_metrics_*`` series). Code beside the kernel adds series of its own with
:func:`add_collector` (a NATS cluster's ``nexus_cluster_*`` while the node is joined).

Typical use, next to a kernel::

    async with open_kernel(config) as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 9464)
        ...

<!-- PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing) -->
"""

from __future__ import annotations

import copy
import errno
import logging
import re
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

import attrs
import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._brief import brief
from ._config import unbracketed, url_host
from ._deadletter import DeadLetterReason
from ._errors import error_repr
from ._ledger import REJECTION_REASONS
from ._logcall import log_guarded
from ._throttle import Throttle, count_dropped
from .logs import escape_control, log_calls_failed, log_lines_dropped, records_lost

if TYPE_CHECKING:
    from ._kernel import AgentScan, Kernel
    from ._stats import AgentStats, HistogramSnapshot, KernelStats

# The text format generate_latest writes. prometheus-client names it CONTENT_TYPE_PLAIN_0_0_4
# only from 0.23 on (pyproject allows 0.20), where CONTENT_TYPE_LATEST became format 1.0.0.
_TEXT_FORMAT: Final = "text/plain; version=0.0.4; charset=utf-8"

__all__ = [
    "EndpointStats",
    "add_collector",
    "add_readiness",
    "KernelCollector",
    "MetricsRenderer",
    "MetricsSnapshot",
    "Route",
    "build_registry",
    "readiness",
    "remove_collector",
    "remove_readiness",
    "render_snapshot",
    "serve_metrics",
    "serve_routes",
    "take_snapshot",
    "take_snapshot_in_steps",
]

log = logging.getLogger("nexus_trio.metrics")

_MAX_REQUEST_HEAD: Final = 8192
#: the empty line that ends a request head: CRLF CRLF, or bare LF line ends
_HEAD_END: Final = re.compile(rb"\n\r?\n")
_REQUEST_TIMEOUT: Final = 10.0
#: a Host header's value (RFC 9112 3.2: uri-host [":" port]; RFC 3986 3.2.2): a bracketed
#: IP literal, or a name or IPv4 address (unreserved, sub-delims, %XX), then a port
_HOST: Final = re.compile(
    rb"(?:\[[A-Za-z0-9._~!$&'()*+,;=:-]+\]|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)"
    rb"(?::[0-9]*)?"
)
#: what separates the parts of a request line (RFC 9112 3: SP, or HTAB, VT, FF or a bare
#: CR, which a server may take for SP); not what str.split() takes for whitespace in
#: Latin-1 (0x1C-0x1F, 0x85, 0xA0 too): a proxy in front would not see the same parts
_REQUEST_LINE_SPACES: Final = b" \t\x0b\x0c\r"
_REQUEST_LINE_SPACE: Final = re.compile(b"[" + re.escape(_REQUEST_LINE_SPACES) + b"]+")
#: the start of a request line whose method is HEAD
_HEAD_METHOD: Final = re.compile(b"HEAD[" + re.escape(_REQUEST_LINE_SPACES) + b"]")
#: an HTTP version (RFC 9112 2.3: ``HTTP/DIGIT.DIGIT``, case-sensitive): major, minor
_HTTP_VERSION: Final = re.compile(r"HTTP/([0-9])\.([0-9])")
#: a body shorter than this is sent joined to its head, a longer one after it
_JOIN_BELOW: Final = 65536
#: samples rendered between two checkpoints (about 4 us each here: a piece is ~2 ms)
_PIECE_SAMPLES: Final = 500
#: with per-agent series, agents whose mailbox depth a snapshot reads between two
#: checkpoints (about 0.3 us each here: ~1.2 ms), and chosen agents whose counters it
#: copies (about 2 us each: ~1 ms); see Kernel.scan_agents
_SCAN_VISITS: Final = 4096
_SCAN_COPIES: Final = 512
#: checks in a row with no other task runnable after which a scrape stops giving way
_IDLE_CHECKS: Final = 8
#: at its limit of connections, the endpoint closes the oldest connection whose request
#: head is not all in after this many seconds (see serve_routes)
_SHED_AFTER: Final = 2.0


class _Turns:
    """A scrape's turns on the event loop: after each slice of its work, it gives the
    other tasks about as much loop time as the slice took, while any of them is
    runnable (a bare checkpoint gave them one scheduling round per slice: a stop of
    1,000 agents, a few rounds each, then waited for a 2 ms slice in each round, 0.4 s
    stretched to 16-35 s by back-to-back scrapes). So a scrape takes at most about half
    of a busy loop, and little more on an idle one: it goes on once no other task was
    runnable at 8 checks in a row (Trio runs a round's tasks in a random order, so one
    other task runnable in every round is seen at a check only half the time: with 2
    checks in a row, the stop above still took 6 s; with 8, 0.9-1.2 s against 0.4-0.6 s
    unscraped, measured at load 26)."""

    __slots__ = ("_since",)

    def __init__(self) -> None:
        self._since = time.perf_counter()

    async def give_way(self) -> None:
        """End a slice of work: checkpoint, then let the others run as long as it took."""
        until = 2 * time.perf_counter() - self._since
        idle = 0
        while True:
            await trio.lowlevel.checkpoint()
            now = time.perf_counter()
            if now >= until:
                break
            if trio.lowlevel.current_statistics().tasks_runnable:
                idle = 0
            else:
                idle += 1
                if idle >= _IDLE_CHECKS:
                    break
        self._since = now


#: ``accept`` errors that say the process or the system is out of something (descriptors,
#: memory): retried after ``_ACCEPT_RETRY`` seconds, as ``trio.serve_listeners`` does
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
_ACCEPT_RETRY: Final = 0.1
#: the statuses of the answers that refuse a request (counted in EndpointStats.refused)
_REFUSALS: Final = (400, 404, 405, 431, 505)
#: the labels of ``nexus_dead_letters_total`` and ``nexus_sends_rejected_total``, each
#: exported from the first scrape (at 0)
_DEAD_LETTER_REASONS: Final = frozenset(reason.value for reason in DeadLetterReason)
#: the kinds of log lines dropped every kernel has (at 0 from the first scrape)
_DROPPED_KINDS: Final = frozenset(("agent_failure", "dead_letter"))
_REJECTION_REASONS: Final = frozenset(REJECTION_REASONS)


@attrs.define
class EndpointStats:
    """Counters of the HTTP endpoint (:func:`serve_metrics`) of a :class:`MetricsRenderer`.

    Exported with the kernel's series (``nexus_metrics_*``) by the renderer's scrapes.
    """

    #: connections accepted
    accepted: int = 0
    #: connections open now (a scrape counts its own)
    open: int = 0
    #: ``accept`` calls that failed for lack of descriptors or memory (EMFILE, ENFILE,
    #: ENOMEM, ENOBUFS); each is retried 0.1 s later
    accept_failures: int = 0
    #: times the endpoint had ``max_connections`` open and stopped accepting until one
    #: closed, a connection waiting (it and the next waited in the listen backlog)
    limited: int = 0
    #: connections closed without an answer while the endpoint was at its limit, for not
    #: having sent a whole request head within 2 s (a client that sends nothing, or a
    #: byte at a time): room for the connections waiting behind them
    shed: int = 0
    #: requests refused, by the status of the answer: 400 (not an HTTP request, a
    #: version that is not ``HTTP/DIGIT.DIGIT``, a bad ``Host`` or header line, a target
    #: in absolute form that is no URL), 404 (an unknown path), 405 (a method other than
    #: GET and HEAD), 431 (a head past 8 KiB), 505 (an HTTP major version other than 1);
    #: every one of them there from the start
    refused: dict[int, int] = attrs.field(factory=lambda: dict.fromkeys(_REFUSALS, 0))
    #: requests whose render (route) raised, each answered 500
    render_failures: int = 0
    #: requests not answered within the 10 s a request may take, each answered 503
    unanswered: int = 0
    #: requests whose connection failed otherwise (not the client going away)
    request_failures: int = 0

    def copy(self) -> EndpointStats:
        """A copy, of this moment (``refused`` too)."""
        return attrs.evolve(self, refused=dict(self.refused))

    def count_refused(self, status: int) -> None:
        self.refused[status] = self.refused.get(status, 0) + 1


@attrs.frozen
class MetricsSnapshot:
    """What one scrape reports, copied from the kernel in the kernel's thread.

    ``agents`` holds the per-agent stats to export (empty unless per-agent series are on),
    already cut to the limit; ``agents_left_out`` counts the live agents that were not (of
    those the walk visited: see :func:`take_snapshot_in_steps`).
    """

    stats: KernelStats
    kernel_up: bool
    per_agent: bool
    per_agent_limit: int
    agents: tuple[AgentStats, ...] = ()
    agents_left_out: int = 0
    #: log records nexus_trio's handlers could not write, process-wide (see
    #: :func:`nexus_trio.logs.records_lost`)
    log_records_lost: int = 0
    #: log calls of the kernel that raised (a filter or handler of the application),
    #: process-wide (see :func:`nexus_trio.logs.log_calls_failed`)
    log_calls_failed: int = 0
    #: log lines held back by the kernel's bounds on floods, by kind, process-wide (see
    #: :func:`nexus_trio.logs.log_lines_dropped`)
    log_lines_dropped: Mapping[str, int] = attrs.field(factory=dict)
    #: the counters of the endpoint the scrape came through (a copy), if any
    endpoint: EndpointStats | None = None
    #: the families of the collectors added to the kernel (:func:`add_collector`: a
    #: cluster's), collected when the snapshot was taken
    extra: tuple[Metric, ...] = ()
    #: the kernel was ready when the snapshot was taken (:func:`readiness`; ``nexus_ready``)
    ready: bool = True


def _agent_series(
    kernel: Kernel, per_agent: bool | None, per_agent_limit: int | None
) -> tuple[bool, int]:
    """``per_agent`` and ``per_agent_limit``, checked, each the kernel's ``[metrics]`` key
    when None: the one place every entry point of this module takes their defaults from."""
    if per_agent is not None and not isinstance(per_agent, bool):
        raise TypeError(f"per_agent must be True or False, got {per_agent!r}")
    if per_agent_limit is not None:
        if isinstance(per_agent_limit, bool) or not isinstance(per_agent_limit, int):
            raise TypeError(f"per_agent_limit must be an integer, got {per_agent_limit!r}")
        if per_agent_limit < 1:
            raise ValueError(f"per_agent_limit must be >= 1, got {per_agent_limit!r}")
    config = kernel.config.metrics
    return (
        config.per_agent if per_agent is None else per_agent,
        config.per_agent_limit if per_agent_limit is None else per_agent_limit,
    )


#: the collectors added to each kernel's series, in the order they were added
_added: weakref.WeakKeyDictionary[Kernel, list[Collector]] = weakref.WeakKeyDictionary()
#: the readiness checks added to each kernel, in the order they were added: each returns
#: None when ready, else why not (see add_readiness)
_checks: weakref.WeakKeyDictionary[Kernel, list[Callable[[], str | None]]] = (
    weakref.WeakKeyDictionary()
)
#: the checks that failed at their last call (raised, or returned what is no reason), by
#: the ids of their kernel and of the check (both held meanwhile: the check in _checks,
#: the kernel by whoever calls readiness): the reason said, the failed calls in a row
#: and whether a line of this failure was said (see _said). A failure is logged as it
#: starts and as its reason changes, and its end once with the count: not at every
#: probe, every few seconds, while it lasts. A plain dict, for a
#: ready kernel's readiness() tests it empty in a few nanoseconds (a weak one's len() or
#: get() cost it 0.08-0.1 us a call, of 0.42 us); an entry is dropped as its check works
#: or is removed, or as its kernel is collected (a finalizer: see _check_failed)
_failing: dict[tuple[int, int], list[Any]] = {}
#: the failure lines said of each check or collector (by the same key as _failing, kept
#: while it works: one that fails at every other call starts a failure at every other
#: call): the Throttle that opens a window of FLAP_WINDOW seconds, the lines said in the
#: window, the lines held back since the last one said. Dropped as the check is removed
#: or its kernel collected.
_said: dict[tuple[int, int], list[Any]] = {}
#: a check's failure lines (its failure starting, or its error changing) said in a window
#: of FLAP_WINDOW seconds: one that fails and works again at every other scrape or probe
#: says the first few, then the rest are counted (kind ``metrics.check_failure``) and said
#: by its next failure line. The line of its working again comes only after a failure
#: line said (so at most as often).
FLAP_LINES: Final = 3
FLAP_WINDOW: Final = 600.0
#: what a failing readiness check or collector is called in its log line, and what its
#: failure does (see _check_failed)
_READINESS_CHECK: Final = ("readiness check", "the kernel is not ready while it fails")
_COLLECTOR: Final = ("metrics collector", "its series are left out of scrapes while it fails")
_T = TypeVar("_T")

#: what :func:`serve_routes` asks for a request's answer: ``await route(path)`` gives
#: its status, body and content type
Route = Callable[[str], Awaitable[tuple[int, bytes, str]]]


def _add_to(added: weakref.WeakKeyDictionary[Kernel, list[_T]], kernel: Kernel, item: _T) -> None:
    items = added.setdefault(kernel, [])
    if any(i is item for i in items):
        raise ValueError(f"{item!r} is already added to this kernel's metrics")
    items.append(item)


def _remove_from(
    added: weakref.WeakKeyDictionary[Kernel, list[_T]], kernel: Kernel, item: _T
) -> None:
    items = added.get(kernel)
    if items is not None:
        items[:] = [i for i in items if i is not item]


def add_collector(kernel: Kernel, collector: Collector) -> None:
    """Export what ``collector.collect()`` yields with ``kernel``'s series, at every scrape
    of it (:func:`take_snapshot`, :class:`KernelCollector`, :class:`MetricsRenderer`) until
    :func:`remove_collector`: how a transport outside the core exports its own series (the
    NATS cluster's ``nexus_cluster_*``, added at its join and removed at its leave) without
    the kernel knowing of it. ``collect()`` is called in the kernel's thread when a
    snapshot is taken, with the kernel-wide values (it must be quick and not wait); its
    families are written after the kernel's. One that raises, or yields what is no
    ``Metric``, is left out of the scrape (the rest is scraped) and logged as it starts
    failing, as its error changes and once as it works again. Adding one collector twice
    is a ValueError."""
    _add_to(_added, kernel, collector)


def remove_collector(kernel: Kernel, collector: Collector) -> None:
    """Stop exporting ``collector``'s series with ``kernel``'s (from the next snapshot on);
    a collector not added is left alone."""
    _remove_from(_added, kernel, collector)
    _failing.pop((id(kernel), id(collector)), None)
    _said.pop((id(kernel), id(collector)), None)


def add_readiness(kernel: Kernel, check: Callable[[], str | None]) -> None:
    """Make ``check`` part of ``kernel``'s readiness (:func:`readiness`: ``GET /readyz``,
    the gauge ``nexus_ready``) until :func:`remove_readiness`: how code beside the kernel
    takes it out of rotation without the kernel knowing why (a NATS cluster while it is
    not joined, its connection is down or it leaves; ``nexus run`` while it starts).

    ``check()`` returns None when it is ready, else the reason, a short line (``"not
    joined"``). It is called in the kernel's thread at each ``/readyz`` request and
    snapshot: it must be quick and not wait. One that raises or returns anything else
    makes the kernel not ready, with a reason naming it, at each call; it is logged as it
    starts failing and as that reason changes (with the traceback), and once as it works
    again, with the failed calls in a row: not at every probe while it fails. Adding one
    check twice (the same object) is a ValueError."""
    if not callable(check):
        raise TypeError(f"a readiness check must be callable, got {check!r}")
    _add_to(_checks, kernel, check)


def remove_readiness(kernel: Kernel, check: Callable[[], str | None]) -> None:
    """Take ``check`` out of ``kernel``'s readiness; a check not added is left alone."""
    _remove_from(_checks, kernel, check)
    _failing.pop((id(kernel), id(check)), None)
    _said.pop((id(kernel), id(check)), None)


def readiness(kernel: Kernel) -> str | None:
    """None when ``kernel`` is ready to take traffic, else why not, in one line.

    Not ready: once its shutdown started (``shutting down``), and while a check added
    with :func:`add_readiness` gives a reason; the reasons in that order (each once),
    joined by ``"; "``, their control characters escaped. Liveness (``/healthz``,
    :func:`health`) is the first of these alone: a kernel not ready is not restarted
    for it, only given no traffic (as Kubernetes' readiness and liveness probes)."""
    reasons: list[str] = []
    if kernel.shutting_down:
        reasons.append("shutting down")
    for check in tuple(_checks.get(kernel, ())):
        try:
            reason = check()
        except Exception as exc:
            reason = f"readiness check {_check_name(check)} raised {type(exc).__name__}"
            _check_failed(kernel, check, reason, "raised", exc)
        else:
            if reason is not None and not isinstance(reason, str):
                wrong = reason
                reason = (
                    f"readiness check {_check_name(check)} returned a"
                    f" {type(reason).__name__}, not a str or None"
                )
                _check_failed(kernel, check, reason, f"returned {brief(wrong, 200)}", None)
            elif _failing:
                _check_works(kernel, check)
        if reason is not None:
            # (str's own strip: a reason may be a str subclass whose methods raise; what
            # follows works on the plain str it returns)
            reason = escape_control(str.strip(reason)) or "not ready"
            if reason not in reasons:
                reasons.append(reason)
    return "; ".join(reasons) if reasons else None


def _check_failed(
    kernel: Kernel,
    check: object,
    reason: str,
    what: str,
    exc: BaseException | None,
    role: tuple[str, str] = _READINESS_CHECK,
) -> None:
    """``check`` (a readiness check, or what ``role`` names: its name and what its
    failure does) failed (``reason``): logged if its last call did not fail so (the
    traceback of ``exc`` with it), else counted only."""
    key = (id(kernel), id(check))
    state = _failing.get(key)
    if state is not None and state[0] == reason:
        state[1] += 1
        if state[2]:
            return
        # A failure none of whose lines was said (held back: FLAP_LINES in the window)
        # that lasts is said as the window ends: else the last line of a check that
        # flapped, then failed for good, stayed its "works again" for as long as it failed.
        said = _said.get(key)
        if said is None or not said[0].due():
            return
        said[1] = 0
        said[2] -= 1  # (its start, held back, is said now)
        calls = state[1]
    else:
        calls = 1 if state is None else state[1] + 1
        if key not in _said and all(said[0] != key[0] for said in _said):
            weakref.finalize(kernel, _forget_failing, key[0])
    held = _may_say(key)
    # (the third item: whether a line of this failure was said, for its end to be said)
    _failing[key] = [reason, calls, held is not None or (state is not None and state[2])]
    if held is None:
        return
    log_guarded(
        log,
        logging.ERROR,
        "%s %s %s (%s; logged again when its error changes or it works again; failed"
        " calls in a row: %d%s)",
        role[0],
        error_repr(check),
        what,
        role[1],
        calls,
        held,
        exc_info=exc,
    )


def _may_say(key: tuple[int, int]) -> str | None:
    """Whether a line of the check of ``key`` may be said now: None if not (it is
    counted), else what the line adds of the lines held back before it ("" if none)."""
    said = _said.get(key)
    if said is None:
        said = _said[key] = [Throttle(FLAP_WINDOW, clock=_now), 0, 0]
    if said[0].due():
        said[1] = 0
    if said[1] >= FLAP_LINES:
        said[2] += 1
        count_dropped("metrics.check_failure")
        return None
    said[1] += 1
    held, said[2] = said[2], 0
    return (
        f"; {held:,} failures of it not logged before this one: more than {FLAP_LINES} in"
        f" {FLAP_WINDOW / 60:g} minutes"
        if held
        else ""
    )


def _now() -> float:
    """Trio's clock in a Trio run (a MockClock's in tests), else the monotonic clock."""
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()


def _forget_failing(kernel_id: int) -> None:
    """A kernel with checks failing was collected: their entries go (an id is reused)."""
    for key in [key for key in _failing if key[0] == kernel_id]:
        del _failing[key]
    for key in [key for key in _said if key[0] == kernel_id]:
        del _said[key]


def _check_works(kernel: Kernel, check: object, role: tuple[str, str] = _READINESS_CHECK) -> None:
    """``check`` answered: the end of its failure (if it failed) is logged, with the count."""
    state = _failing.pop((id(kernel), id(check)), None)
    if state is not None and state[2]:  # (if none of its failure's lines was said: nor this)
        log_guarded(
            log,
            logging.INFO,
            "%s %s works again after %d failed calls in a row (the last: %s)",
            role[0],
            error_repr(check),
            state[1],
            state[0],
        )


def _check_name(check: Callable[[], str | None]) -> str:
    # (a check object's __getattr__ is user code: it may raise another error than
    # AttributeError, which getattr's default does not take, or give no str)
    try:
        name = getattr(check, "__qualname__", None)
    except Exception:
        name = None
    return escape_control(name if isinstance(name, str) and name else error_repr(check))


def _collect_added(kernel: Kernel) -> tuple[Metric, ...]:
    """The families of the collectors added to ``kernel``. One that raises (at its call
    or as it yields) or yields what is no ``Metric`` is left out of this scrape, whole,
    and logged as a failing readiness check is (as it starts failing, as its error
    changes, and once as it works again): the kernel's series and the other collectors'
    are still scraped. ``prometheus_client``'s registry fails the scrape with a 500
    instead; one transport's bug must not blind the kernel's monitoring."""
    collectors = _added.get(kernel)
    if not collectors:
        return ()
    families: list[Metric] = []
    for collector in tuple(collectors):
        try:
            got = list(collector.collect())
        except Exception as exc:
            _check_failed(
                kernel, collector, f"raised {type(exc).__name__}", "raised", exc, _COLLECTOR
            )
            continue
        wrong = next((family for family in got if not isinstance(family, Metric)), None)
        if wrong is None:
            try:
                got = [_utf8_family(family) for family in got]
            except TypeError as exc:
                _check_failed(kernel, collector, "yielded no text", str(exc), None, _COLLECTOR)
                continue
        else:
            what = f"yielded {brief(wrong, 200)}, not a prometheus_client Metric"
            _check_failed(
                kernel, collector, f"yielded a {type(wrong).__name__}", what, None, _COLLECTOR
            )
            continue
        if _failing:
            _check_works(kernel, collector, _COLLECTOR)
        families += got
    return tuple(families)


def _utf8_family(family: Metric) -> Metric:
    """``family`` as the text format can write it: a lone surrogate in its name, help,
    unit, or a sample's name, label name or value (no UTF-8 text holds one: the whole
    render raised ``UnicodeEncodeError``, a 500) is written as its escape, as in the
    kernel's own labels (:func:`_label_value`). ``TypeError`` naming the first of them
    that is no str (the render would raise on it too)."""
    texts = [family.name, family.documentation, family.unit]
    for sample in family.samples:
        texts.append(sample.name)
        texts += sample.labels
        texts += sample.labels.values()
    try:
        # (one join and one isascii for the usual family, all ASCII: a few us a scrape)
        if "".join(texts).isascii():
            return family
    except TypeError:
        wrong = next(text for text in texts if not isinstance(text, str))
        raise TypeError(
            f"family {brief(family.name, 80)}: a name, help, unit or label is"
            f" {brief(wrong, 80)}, not a str"
        ) from None
    if all(_label_value(text) is text for text in texts):
        return family  # (nothing to escape, nothing copied)
    # (a copy, not a new Metric: its constructor would check the name again, and add
    # the unit to it)
    fixed = copy.copy(family)
    fixed.name = _label_value(family.name)
    fixed.documentation = _label_value(family.documentation)
    fixed.unit = _label_value(family.unit)
    fixed.samples = [
        sample._replace(
            name=_label_value(sample.name),
            labels={_label_value(k): _label_value(v) for k, v in sample.labels.items()},
        )
        for sample in family.samples
    ]
    return fixed


def take_snapshot(
    kernel: Kernel, *, per_agent: bool | None = None, per_agent_limit: int | None = None
) -> MetricsSnapshot:
    """Copy what a scrape reports, in one go; call it from the kernel's thread.

    Without ``per_agent`` this is ``kernel.stats()`` and nothing per agent. With it, the
    ``per_agent_limit`` agents with the deepest mailboxes (ties: the earliest spawned) are
    kept, ordered by depth: O(agents) without a checkpoint (a mailbox depth read per
    agent, about 0.3 us; :func:`take_snapshot_in_steps` lets the agents run meanwhile).
    ``per_agent`` and ``per_agent_limit`` are by default the kernel's ``[metrics]
    per_agent`` and ``per_agent_limit``, here and in :func:`take_snapshot_in_steps`,
    :class:`KernelCollector`, :func:`build_registry` and :class:`MetricsRenderer`; a
    value given wins.
    """
    per_agent, per_agent_limit = _agent_series(kernel, per_agent, per_agent_limit)
    stats, up, logs, scan = _begin_snapshot(kernel, per_agent, per_agent_limit)
    if scan is not None:
        while scan.step():
            pass
    return _end_snapshot(stats, up, logs, per_agent_limit, scan)


async def take_snapshot_in_steps(
    kernel: Kernel, *, per_agent: bool | None = None, per_agent_limit: int | None = None
) -> MetricsSnapshot:
    """What :func:`take_snapshot` copies, giving way between the steps of its walk over the
    agents (:meth:`Kernel.scan_agents`; as long as each step took, while other tasks are
    runnable): what :class:`MetricsRenderer` does.

    The kernel-wide values (``stats``, ``kernel_up``, ``log_records_lost``,
    ``log_calls_failed``) are read
    together, when it starts: they are exact, of that moment. With ``per_agent``, the
    agents live at that moment are then visited 4,096 at a time (a mailbox depth read
    each, about 1 ms) and the chosen ones' counters copied 512 at a time, the agents
    running between the steps, so the per-agent values are not all of one moment (as
    with the collectors of the Prometheus client libraries): an agent is chosen for its
    depth when visited and exported with its counters when copied; one spawned meanwhile
    is in the next scrape; one that stopped before its visit is not counted, one chosen
    that stopped before its copy is left out (``agents`` then has fewer than the limit;
    ``agents_left_out`` counts the agents visited and not chosen). An agent that keeps
    its depth is chosen as :func:`take_snapshot` chooses it. Nothing is done in one go for
    all the agents (no list of them is copied). With at most 4,096 agents and 512 chosen
    there is no checkpoint: the snapshot is of one moment.
    """
    per_agent, per_agent_limit = _agent_series(kernel, per_agent, per_agent_limit)
    stats, up, logs, scan = _begin_snapshot(kernel, per_agent, per_agent_limit)
    if scan is not None:
        turns = _Turns()
        while scan.step():
            await turns.give_way()
    return _end_snapshot(stats, up, logs, per_agent_limit, scan)


#: what a snapshot reads of the process and the kernel's added parts: log records lost,
#: log calls failed, the added collectors' families, whether ready, log lines dropped
_Logs = tuple[int, int, tuple[Metric, ...], bool, dict[str, int]]


def _begin_snapshot(
    kernel: Kernel, per_agent: bool, per_agent_limit: int
) -> tuple[KernelStats, bool, _Logs, AgentScan | None]:
    """The kernel-wide values, read now (the logging counts: records lost, calls that
    raised; the added collectors' families; whether it is ready), and the walk over the
    agents if ``per_agent``."""
    scan = None
    if per_agent:
        scan = kernel.scan_agents(
            per_agent_limit, visits_per_step=_SCAN_VISITS, copies_per_step=_SCAN_COPIES
        )
    logs = (
        records_lost(),
        log_calls_failed(),
        _collect_added(kernel),
        readiness(kernel) is None,
        log_lines_dropped(),
    )
    return kernel.stats(), not kernel.shutting_down, logs, scan


def _end_snapshot(
    stats: KernelStats,
    up: bool,
    logs: _Logs,
    per_agent_limit: int,
    scan: AgentScan | None,
) -> MetricsSnapshot:
    lost, failed, extra, ready, dropped = logs
    if scan is None:
        return MetricsSnapshot(
            stats,
            up,
            False,
            per_agent_limit,
            log_records_lost=lost,
            log_calls_failed=failed,
            log_lines_dropped=dropped,
            extra=extra,
            ready=ready,
        )
    return MetricsSnapshot(
        stats,
        up,
        True,
        per_agent_limit,
        scan.chosen,
        scan.left_out,
        log_records_lost=lost,
        log_calls_failed=failed,
        log_lines_dropped=dropped,
        extra=extra,
        ready=ready,
    )


class KernelCollector:
    """A ``prometheus_client`` collector that reads the kernel at each ``collect()``.

    It calls the kernel, so use it only from the kernel's thread (e.g. ``generate_latest``
    in a Trio task); :func:`serve_metrics` renders a :class:`MetricsSnapshot` in pieces
    instead (see :class:`MetricsRenderer`).

    Series (``_total`` is added to counters by the exposition format):
    ``nexus_messages_accepted``, ``nexus_messages_handled``, ``nexus_replies_delivered``,
    ``nexus_messages_forwarded``, ``nexus_handler_failures``, ``nexus_run_failures``,
    ``nexus_handler_timeouts``, ``nexus_dead_letters{reason}``,
    ``nexus_sends_rejected{reason}``, ``nexus_restarts``, ``nexus_given_up``,
    ``nexus_dead_letter_stream_dropped``, ``nexus_event_stream_dropped``,
    ``nexus_tells_after_detach``, ``nexus_requests_after_detach``,
    ``nexus_timestamps_ahead``, ``nexus_dead_letter_lines_not_logged``, ``nexus_handler_failure_lines_not_logged``,
    ``nexus_log_lines_dropped{kind}`` (process-wide),
    ``nexus_log_records_lost``,
    ``nexus_log_calls_failed`` (counters); ``nexus_agents_alive``,
    ``nexus_messages_in_flight``, ``nexus_sends_waiting``, ``nexus_max_mailbox_depth``,
    ``nexus_kernel_up``, ``nexus_ready``, ``nexus_agent_series_exported``,
    ``nexus_agent_series_truncated``
    (gauges); ``nexus_handle_latency_seconds``, ``nexus_queue_wait_seconds`` and
    ``nexus_failed_handle_latency_seconds`` (summaries
    with quantiles 0.5/0.9/0.99/0.999, plus a ``_max`` gauge); with ``per_agent``, per
    agent (labels ``agent_id``, ``agent_name``): ``nexus_agent_received``,
    ``nexus_agent_handled``, ``nexus_agent_failed``, ``nexus_agent_run_failures``,
    ``nexus_agent_timed_out``, ``nexus_agent_dead_lettered``, ``nexus_agent_restarts``
    (counters) and ``nexus_agent_mailbox_depth``, ``nexus_agent_mailbox_high_water``,
    ``nexus_agent_mailbox_capacity`` (gauges). ``per_agent`` and ``per_agent_limit`` not
    given are the kernel's ``[metrics] per_agent`` and ``per_agent_limit``.
    """

    def __init__(
        self,
        kernel: Kernel,
        *,
        per_agent: bool | None = None,
        per_agent_limit: int | None = None,
    ) -> None:
        per_agent, per_agent_limit = _agent_series(kernel, per_agent, per_agent_limit)
        self.kernel = kernel
        self.per_agent = per_agent
        self.per_agent_limit = per_agent_limit

    def describe(self) -> Iterable[Metric]:
        # Registering must not take a snapshot of a kernel (and no names clash with others).
        return []

    def collect(self) -> Iterator[Metric]:
        snapshot = take_snapshot(
            self.kernel, per_agent=self.per_agent, per_agent_limit=self.per_agent_limit
        )
        return _families(snapshot)


def _families(snapshot: MetricsSnapshot) -> Iterator[Metric]:
    s = snapshot.stats

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, value=value)

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, value=value)

    # (a send waiting for room counts once it got in: one that gives up is taken out of
    # stats().accepted again, and a Prometheus counter must never go down)
    yield counter(
        "nexus_messages_accepted", "Messages the kernel accepted.", s.accepted - s.sends_waiting
    )
    yield counter("nexus_messages_handled", "Messages handled by agents.", s.handled)
    yield counter(
        "nexus_replies_delivered",
        "Replies delivered to a waiting request.",
        s.replies_delivered,
    )
    yield counter(
        "nexus_messages_forwarded",
        "Messages handed to a transport for a remote kernel.",
        s.forwarded,
    )
    yield counter("nexus_handler_failures", "Handler calls that raised.", s.failed)
    yield counter(
        "nexus_run_failures",
        "Agent runs that failed outside a handler (on_start, on_stop, a background task).",
        s.run_failures,
    )
    yield counter("nexus_handler_timeouts", "Handler calls cancelled by timeout.", s.timed_out)
    yield counter("nexus_restarts", "Agent and supervisor restarts.", s.restarts)
    yield counter(
        "nexus_given_up",
        "Children the root supervisor stopped for good after too many failures.",
        s.given_up,
    )
    yield counter(
        "nexus_dead_letter_stream_dropped",
        "Dead letters a slow stream subscriber did not receive.",
        s.dead_letter_stream_dropped,
    )
    yield counter(
        "nexus_event_stream_dropped",
        "Lifecycle events a slow stream subscriber did not receive.",
        s.event_stream_dropped,
    )
    yield counter(
        "nexus_tells_after_detach",
        "Tells to another node of a cluster the kernel left: dead-lettered, not sent.",
        s.tells_after_detach,
    )
    yield counter(
        "nexus_requests_after_detach",
        "Requests to another node of a cluster the kernel left: refused, not sent.",
        s.requests_after_detach,
    )
    yield counter(
        "nexus_timestamps_ahead",
        "Sampled messages whose timestamp was after this kernel's clock as their handling"
        " began (the sender's clock ahead: skew across nodes); their queue wait counted 0.",
        s.timestamps_ahead,
    )
    yield counter(
        "nexus_dead_letter_lines_not_logged",
        "Dead letters past [kernel] dead_letter_log_limit log lines a second of their reason:"
        " counted, said in one line a second, not logged one by one.",
        s.dead_letter_lines_not_logged,
    )
    yield counter(
        "nexus_handler_failure_lines_not_logged",
        "Handler failures past [kernel] failure_log_limit log lines a second of their agent:"
        " counted, said in one line a second, no traceback each.",
        s.failure_lines_not_logged,
    )
    yield counter(
        "nexus_log_records_lost",
        "Log records nexus_trio's log handlers could not write (a full disk, a closed pipe),"
        " in this process.",
        snapshot.log_records_lost,
    )
    yield counter(
        "nexus_log_calls_failed",
        "Log calls of the kernel that raised (a logging filter or handler of the application);"
        " the kernel went on. In this process.",
        snapshot.log_calls_failed,
    )
    dropped = CounterMetricFamily(
        "nexus_log_lines_dropped",
        "Log lines held back by the kernel's bounds on floods (each said by its count in a"
        " later line; what they stand for counted elsewhere), by kind. In this process.",
        labels=["kind"],
    )
    lines = snapshot.log_lines_dropped
    for kind in sorted(_DROPPED_KINDS.union(lines)):
        dropped.add_metric([kind], lines.get(kind, 0))
    yield dropped
    # Every reason there from the first scrape, at 0 (as Prometheus asks of series known
    # in advance): a series that appears at its first count hides that count from rate().
    dead = CounterMetricFamily(
        "nexus_dead_letters", "Accepted messages not handled, by reason.", labels=["reason"]
    )
    for reason in sorted(_DEAD_LETTER_REASONS.union(s.dead_letters_by_reason)):
        dead.add_metric([reason], s.dead_letters_by_reason.get(reason, 0))
    yield dead
    rejected = CounterMetricFamily(
        "nexus_sends_rejected",
        "Sends refused with an exception to the caller, by reason.",
        labels=["reason"],
    )
    for reason in sorted(_REJECTION_REASONS.union(s.rejected)):
        rejected.add_metric([reason], s.rejected.get(reason, 0))
    yield rejected
    yield gauge("nexus_agents_alive", "Live agents.", s.agents_alive)
    # (the sends waiting for room are not in nexus_messages_accepted_total yet: nor in
    # flight here, so that one scrape balances; they are a gauge of their own)
    yield gauge(
        "nexus_messages_in_flight",
        "Accepted messages not yet done: in mailboxes and handlers.",
        s.in_flight - s.sends_waiting,
    )
    yield gauge(
        "nexus_sends_waiting",
        "Sends waiting for room in a full mailbox (not yet in nexus_messages_accepted_total).",
        s.sends_waiting,
    )
    yield gauge(
        "nexus_max_mailbox_depth", "Deepest any mailbox has been (high water).", s.max_mailbox_depth
    )
    yield gauge(
        "nexus_kernel_up",
        "1 while the kernel runs and is not shutting down.",
        1 if snapshot.kernel_up else 0,
    )
    yield gauge(
        "nexus_ready",
        "1 while the kernel is ready to take traffic (GET /readyz answers 200): running, not"
        " shutting down, and every readiness check added to it (a cluster's: joined, NATS"
        " connections up) says so.",
        1 if snapshot.ready else 0,
    )
    yield gauge(
        "nexus_agent_series_exported",
        "Agents with per-agent series in this scrape (0 unless [metrics] per_agent).",
        len(snapshot.agents),
    )
    yield gauge(
        "nexus_agent_series_truncated",
        f"1 if per-agent series are on and agents beyond the {snapshot.per_agent_limit} "
        "deepest mailboxes were left out.",
        1 if snapshot.agents_left_out else 0,
    )
    yield from _summary(
        "nexus_handle_latency_seconds", "Handler latency (sampled).", s.handle_latency
    )
    yield from _summary(
        "nexus_queue_wait_seconds",
        "Time in the mailbox before handling (sampled).",
        s.queue_wait,
    )
    yield from _summary(
        "nexus_failed_handle_latency_seconds",
        "Handler latency of the calls that raised (sampled; the others in"
        " nexus_handle_latency_seconds).",
        s.failed_handle_latency,
    )
    if snapshot.endpoint is not None:
        yield from endpoint_families(snapshot.endpoint)
    yield from snapshot.extra
    if snapshot.per_agent:
        for series in _AGENT_SERIES:
            yield _agent_family(series, snapshot.agents)


def endpoint_families(
    e: EndpointStats, *, prefix: str = "nexus_metrics_", what: str = "the metrics endpoint"
) -> Iterator[Metric]:
    """The series of an HTTP endpoint's counters ``e`` (:func:`serve_routes`): each named
    ``prefix`` + its name, its help naming the endpoint as ``what``. A kernel's scrape has
    its endpoint's (``nexus_metrics_*``); the ``--workers`` group endpoint its own
    (``nexus_group_*``)."""
    yield CounterMetricFamily(
        f"{prefix}connections", f"Connections {what} accepted.", value=e.accepted
    )
    yield GaugeMetricFamily(
        f"{prefix}connections_open",
        f"Connections to {what} open now (this scrape's too).",
        value=e.open,
    )
    yield CounterMetricFamily(
        f"{prefix}accept_failures",
        f"Connections {what} could not accept for lack of file descriptors or"
        " memory (retried every 0.1 s).",
        value=e.accept_failures,
    )
    yield CounterMetricFamily(
        f"{prefix}connections_limited",
        f"Times {what} had its maximum of connections open and new ones waited"
        " in the listen backlog.",
        value=e.limited,
    )
    yield CounterMetricFamily(
        f"{prefix}connections_shed",
        f"Connections {what} closed at its maximum of connections for not having sent a"
        " request head within 2 s (room for those waiting behind them).",
        value=e.shed,
    )
    refused = CounterMetricFamily(
        f"{prefix}requests_refused",
        f"Requests {what} refused, by the status of its answer (400, 404, 405, 431, 505).",
        labels=["status"],
    )
    for status, n in sorted(e.refused.items()):
        refused.add_metric([str(status)], n)
    yield refused
    yield CounterMetricFamily(
        f"{prefix}render_failures",
        f"Requests to {what} whose render raised (answered 500).",
        value=e.render_failures,
    )
    yield CounterMetricFamily(
        f"{prefix}requests_unanswered",
        f"Requests to {what} not answered within 10 s (answered 503).",
        value=e.unanswered,
    )
    yield CounterMetricFamily(
        f"{prefix}request_failures",
        f"Connections to {what} that failed otherwise than by the client going away.",
        value=e.request_failures,
    )


_AGENT_LABELS: Final = ["agent_id", "agent_name"]

#: the per-agent series, in the order they are written: the AgentStats field, whether
#: it is a counter (else a gauge), the name and the help text
_AGENT_SERIES: Final = (
    ("received", True, "nexus_agent_received", "Messages put in the agent's mailbox."),
    ("handled", True, "nexus_agent_handled", "Messages the agent handled."),
    ("failed", True, "nexus_agent_failed", "Handler calls that raised."),
    (
        "run_failures",
        True,
        "nexus_agent_run_failures",
        "Runs that failed outside a handler (on_start, on_stop, a background task).",
    ),
    ("timed_out", True, "nexus_agent_timed_out", "Handler calls cancelled by timeout."),
    ("dead_lettered", True, "nexus_agent_dead_lettered", "Messages to the agent dead-lettered."),
    ("restarts", True, "nexus_agent_restarts", "Restarts of the agent."),
    ("mailbox_depth", False, "nexus_agent_mailbox_depth", "Messages queued in the mailbox."),
    (
        "mailbox_high_water",
        False,
        "nexus_agent_mailbox_high_water",
        "Deepest the mailbox has been.",
    ),
    ("mailbox_capacity", False, "nexus_agent_mailbox_capacity", "Capacity of the mailbox."),
)


def _agent_family(series: tuple[str, bool, str, str], agents: Sequence[AgentStats]) -> Metric:
    """The family of one per-agent series, with a sample for each of ``agents``."""
    field, counter, name, doc = series
    family: CounterMetricFamily | GaugeMetricFamily = (
        CounterMetricFamily(name, doc, labels=_AGENT_LABELS)
        if counter
        else GaugeMetricFamily(name, doc, labels=_AGENT_LABELS)
    )
    for a in agents:
        family.add_metric([str(a.id), _label_value(a.name or "")], getattr(a, field))
    return family


def _label_value(text: str) -> str:
    """``text`` as a label value: a lone surrogate (``"\\udc80"``, what a non-UTF-8 byte of
    a file name decodes to), which no UTF-8 text can hold, as its escape ``\\udc80``, as
    in the log lines; anything else as it is (the text format escapes quotes,
    backslashes and newlines)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _summary(name: str, doc: str, h: HistogramSnapshot) -> Iterator[Metric]:
    metric = Metric(name, doc, "summary")
    for q, value in (("0.5", h.p50), ("0.9", h.p90), ("0.99", h.p99), ("0.999", h.p999)):
        metric.add_sample(name, {"quantile": q}, value)
    metric.add_sample(name + "_count", {}, h.count)
    metric.add_sample(name + "_sum", {}, h.total)
    yield metric
    yield GaugeMetricFamily(name + "_max", doc + " Maximum.", value=h.maximum)


def build_registry(
    kernel: Kernel,
    *,
    per_agent: bool | None = None,
    per_agent_limit: int | None = None,
    process: bool = True,
) -> CollectorRegistry:
    """A registry with a :class:`KernelCollector` (and ``process_*`` series if ``process``);
    ``per_agent`` and ``per_agent_limit`` not given are the kernel's ``[metrics]`` keys.

    Its collector reads the kernel, so ``generate_latest(registry)`` belongs in the
    kernel's thread.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KernelCollector(kernel, per_agent=per_agent, per_agent_limit=per_agent_limit))
    if process:
        ProcessCollector(registry=registry)
    return registry


def render_snapshot(snapshot: MetricsSnapshot, *, process: bool = True) -> bytes:
    """The Prometheus text of ``snapshot`` (plus ``process_*`` series); safe in any thread."""
    return b"".join(_pieces(snapshot, process=process))


class _Piece(Collector):
    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> Iterator[Metric]:
        yield self.family


def _pieces(snapshot: MetricsSnapshot, *, process: bool) -> Iterator[bytes]:
    """The text of ``snapshot``, in pieces of at most ``_PIECE_SAMPLES`` samples, each
    made only when it is asked for (the samples of a per-agent family too: a piece is
    made from its slice of the agents).

    A family with more samples (only per-agent families have that many) is written in
    several pieces: its ``# HELP`` and ``# TYPE`` lines come once, before the first, and
    its samples stay together, as the text format wants.
    """
    # The kernel-wide and process families have a few samples each (one per reason at
    # most): one piece each.
    for family in _families(attrs.evolve(snapshot, per_agent=False)):
        yield generate_latest(_Piece(family))
    if snapshot.per_agent:
        agents = snapshot.agents
        for series in _AGENT_SERIES:
            # one piece, with the HELP and TYPE lines, for a family without samples too
            for start in range(0, max(len(agents), 1), _PIECE_SAMPLES):
                piece = _agent_family(series, agents[start : start + _PIECE_SAMPLES])
                text = generate_latest(_Piece(piece))
                yield _without_head(text) if start else text
    if process:
        for family in ProcessCollector(registry=None).collect():
            yield generate_latest(_Piece(family))


def _without_head(text: bytes) -> bytes:
    """The samples of a family's text, without its ``# HELP`` and ``# TYPE`` lines."""
    help_line, type_line, rest = text.split(b"\n", 2)
    assert help_line.startswith(b"# HELP ") and type_line.startswith(b"# TYPE ")
    return rest


@attrs.define(eq=False)
class _Render:
    done: trio.Event = attrs.field(factory=trio.Event)
    body: bytes | None = None
    error: BaseException | None = None


class MetricsRenderer:
    """Renders ``/metrics`` for a kernel, sharing renders between scrapes.

    :meth:`render` takes a :class:`MetricsSnapshot` (:func:`take_snapshot_in_steps`) and
    turns it into text on the event loop, both in pieces with a checkpoint between them
    (see the module docstring). One render
    runs at a time: a scrape that arrives while one is in progress waits for it and gets
    its result (if the scrape rendering it is cancelled, the next waiter renders anew), and
    a finished render is reused for ``cache_seconds`` (0 = reuse only by the scrapes that
    waited for it). ``renders`` counts the renders done. ``endpoint`` holds the counters
    of the endpoint serving this renderer, set by :func:`serve_metrics` (``None`` until
    then; two endpoints with one renderer share them), exported with the kernel's series.

    ``per_agent``, ``per_agent_limit`` and ``cache_seconds`` not given are the kernel's
    ``[metrics] per_agent``, ``per_agent_limit`` and ``cache_ms`` (the config is their one
    default).
    """

    def __init__(
        self,
        kernel: Kernel,
        *,
        per_agent: bool | None = None,
        per_agent_limit: int | None = None,
        cache_seconds: float | None = None,
        process: bool = True,
    ) -> None:
        if cache_seconds is None:
            cache_seconds = kernel.config.metrics.cache_ms / 1000
        if not cache_seconds >= 0:
            raise ValueError(f"cache_seconds must be >= 0, got {cache_seconds!r}")
        self.kernel = kernel
        self.per_agent, self.per_agent_limit = _agent_series(kernel, per_agent, per_agent_limit)
        self.cache_seconds = cache_seconds
        self.process = process
        self.renders = 0
        self.endpoint: EndpointStats | None = None
        self._in_progress: _Render | None = None
        self._cached: bytes | None = None
        self._cached_at = 0.0

    @classmethod
    def for_kernel(cls, kernel: Kernel) -> MetricsRenderer:
        """A renderer set up from ``kernel.config.metrics`` (``per_agent``, ``per_agent_limit``,
        ``cache_ms``): the same as ``MetricsRenderer(kernel)``."""
        return cls(kernel)

    async def render(self) -> bytes:
        """The Prometheus text of the kernel, fresh or shared (see the class docstring)."""
        while True:
            now = trio.current_time()
            if self._cached is not None and now - self._cached_at < self.cache_seconds:
                await trio.lowlevel.checkpoint()
                return self._cached
            in_progress = self._in_progress
            if in_progress is None:
                break
            await in_progress.done.wait()
            if in_progress.body is not None:
                return in_progress.body
            if not isinstance(in_progress.error, trio.Cancelled):
                raise RuntimeError("the metrics render this scrape waited for failed") from (
                    in_progress.error
                )
            # The scrape that rendered gave up (its client went, or its time ran out).
        current = self._in_progress = _Render()
        try:
            snapshot = attrs.evolve(
                await take_snapshot_in_steps(
                    self.kernel,
                    # Not during a shutdown: the agents are stopping, one at a time for
                    # those with an on_stop, and a render piece in each of those
                    # scheduling rounds made back-to-back scrapes stretch a 1,000-agent
                    # stop from 0.2 s to 12 s.
                    per_agent=self.per_agent and not self.kernel.shutting_down,
                    per_agent_limit=self.per_agent_limit,
                ),
                endpoint=None if self.endpoint is None else self.endpoint.copy(),
            )
            parts = []
            turns = _Turns()
            for piece in self._pieces(snapshot):
                parts.append(piece)
                await turns.give_way()
            current.body = b"".join(parts)
            self.renders += 1
            self._cached, self._cached_at = current.body, now
            return current.body
        except BaseException as exc:
            current.error = exc
            raise
        finally:
            self._in_progress = None
            current.done.set()

    def _pieces(self, snapshot: MetricsSnapshot) -> Iterator[bytes]:
        return _pieces(snapshot, process=self.process)


def health(kernel: Kernel) -> bool:
    """True while the kernel runs and is not shutting down."""
    return not kernel.shutting_down


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


def _response(status: int, body: bytes, content_type: str, *, head: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
    ]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head_bytes if head else head_bytes + body


def _path_of(target: str) -> str | None:
    """The path of a request target: of the origin form (``/metrics?x=1``), or of the
    absolute form (``http://host:9464/metrics``, sent through a proxy; RFC 9112 3.2.2: a
    server must accept it), where an empty path is ``/``; None for an absolute form that
    is no URL (``http://[::1/``: the parser raises ValueError)."""
    if target[:8].lower().startswith(("http://", "https://")):
        try:
            return urllib.parse.urlsplit(target).path or "/"
        except ValueError:
            return None
    return target.split("?", 1)[0]


async def _checked_route(route: Route, method: str, target: str) -> tuple[int, bytes, str]:
    """What ``route`` answers for the path of ``target``; a method other than GET and
    HEAD, or a target that is no URL, is refused here, never routed."""
    text = "text/plain; charset=utf-8"
    if method not in ("GET", "HEAD"):
        return 405, b"method not allowed\n", text
    path = _path_of(target)
    if path is None:
        return 400, b"bad request: the target is not a URL\n", text
    return await route(path)


async def _route(kernel: Kernel, renderer: MetricsRenderer, path: str) -> tuple[int, bytes, str]:
    text = "text/plain; charset=utf-8"
    if path == "/metrics":
        return 200, await renderer.render(), _TEXT_FORMAT
    if path == "/healthz":
        if health(kernel):
            return 200, b"ok\n", text
        return 503, b"shutting down\n", text
    if path == "/readyz":
        reason = readiness(kernel)
        if reason is None:
            return 200, b"ready\n", text
        return 503, reason.encode() + b"\n", text
    if path == "/":
        return 200, b"nexus_trio: GET /metrics (Prometheus), GET /healthz, GET /readyz\n", text
    return 404, b"not found\n", text


def _header_problem(head: bytes, version: str) -> bytes | None:
    """Why the header lines of a request head make it a bad request, or None: a line
    starting with a space or a tab (obsolete line folding, RFC 9112 5.2, refused rather
    than joined to the line before; or whitespace before the first field, 2.2), a line
    without a colon (not a field line: RFC 9112 5 makes the message invalid), a field
    name followed by whitespace before its colon (RFC 9112 5.1: must be refused, as
    ``Host : x`` is neither a ``Host`` nor nothing), or a ``Host`` header that RFC 9112 3.2
    refuses: an HTTP/1.1 request without one, any with more than one, or a value that is
    not ``host[:port]`` (an empty one will do). Field names are case-insensitive; spaces
    and tabs around the value are not part of it."""
    hosts = []
    for line in head.split(b"\n")[1:]:  # the request line skipped
        if line[:1] in (b" ", b"\t"):
            return b"a header line starts with whitespace (obsolete line folding)"
        name, colon, value = line.partition(b":")
        if not colon:
            if line in (b"", b"\r"):  # the empty line that ends the head
                continue
            return b"a header line without a colon"
        if name[-1:] in (b" ", b"\t"):
            return b"whitespace between a header name and its colon"
        if name.lower() == b"host":
            hosts.append(value.removesuffix(b"\r").strip(b" \t"))
    if not hosts:
        return None if version == "HTTP/1.0" else b"an HTTP/1.1 request needs a Host header"
    if len(hosts) > 1:
        return b"more than one Host header"
    if _HOST.fullmatch(hosts[0]) is None:
        return b"the Host header is not a host[:port]"
    return None


async def _read_head(stream: trio.abc.Stream) -> tuple[bytes, bool]:
    """The request head, up to the empty line that ends it (``CRLF`` or bare ``LF`` line
    ends) or all the client sent before it ended its side, without the empty lines before
    its request line (RFC 9112 2.2: skipped), and True; or, if it is longer than
    ``_MAX_REQUEST_HEAD`` bytes (those empty lines included), however it was cut into
    reads, what was read of it (without those empty lines) and False."""
    data = bytearray()
    skipped = 0  # the empty lines before the request line
    line_started = False
    searched = 0  # no end of the head before this (each byte is searched once)
    while True:
        if not line_started:  # data[:skipped] is empty lines, the rest the last read
            rest = data[skipped:]
            skipped += len(rest) - len(rest.lstrip(b"\r\n"))
            line_started = skipped < len(data)
            searched = max(searched, skipped)
        end = _HEAD_END.search(data, searched)
        if end is not None:
            if end.end() <= _MAX_REQUEST_HEAD:
                return bytes(data[skipped : end.end()]), True
            return bytes(data[skipped:]), False
        if len(data) > _MAX_REQUEST_HEAD:
            return bytes(data[skipped:]), False
        searched = max(len(data) - 2, 0)  # an end ("\n\r\n") may start in the last 2 bytes
        chunk = await stream.receive_some(4096)
        if not chunk:
            return bytes(data[skipped:]), True
        data += chunk


@final
class _RequestLines:
    """The throttles of an endpoint's per-request lines (a render that raised, a request
    unanswered in time, a connection that failed otherwise): each logged at once, then at
    most once a second with its count so far, the rest counted by kind (``endpoint.*``
    in ``log_lines_dropped()``). A scraper hammering a broken render wrote a line and a
    traceback a request."""

    __slots__ = ("failed", "render_failed", "unanswered")

    def __init__(self) -> None:
        self.render_failed = Throttle(1.0, clock=trio.current_time, kind="endpoint.render_failure")
        self.unanswered = Throttle(1.0, clock=trio.current_time, kind="endpoint.unanswered")
        self.failed = Throttle(1.0, clock=trio.current_time, kind="endpoint.request_failure")


async def _handle_connection(
    stream: trio.SocketStream,
    kernel: Kernel,
    renderer: MetricsRenderer,
    lines: _RequestLines | None = None,
) -> None:
    async def route(path: str) -> tuple[int, bytes, str]:
        return await _route(kernel, renderer, path)

    await _answer_connection(stream, route, renderer.endpoint, lines=lines)


async def _answer_connection(
    stream: trio.SocketStream,
    route: Route,
    endpoint: EndpointStats | None,
    what: str = "metrics",
    *,
    lines: _RequestLines | None = None,
    heads: dict[trio.CancelScope, float] | None = None,
    reading: trio.CancelScope | None = None,
) -> None:
    """Read one request from ``stream`` and answer it with ``route``: a request that is
    no HTTP/1.x request is refused here (400, 431, 505), never routed. ``what`` names the
    server in the log lines (see serve_routes); ``lines`` throttles them (the endpoint's,
    shared by its connections; None: this connection's own). ``reading``: the scope the
    request head is read in, in ``heads`` (with when the connection was accepted) until
    the head is read (the endpoint cancels the oldest to shed it: the connection is then
    closed without an answer, and counted in ``endpoint.shed`` here, only if the cancel
    cut the read: a head read whole meanwhile is answered, and not counted)."""
    if lines is None:
        lines = _RequestLines()

    def say(throttle: Throttle, level: int, line: str, *args: object, **kw: Any) -> None:
        """Log ``line`` if ``throttle`` lets one through (the rest counted by its kind)."""
        if throttle.due():
            log_guarded(log, level, line + "; at most a line a second)", *args, **kw)

    if endpoint is None:
        endpoint = EndpointStats()  # (counted nowhere: a connection answered on its own)
    text = "text/plain; charset=utf-8"
    answering = False  # a request was read and has no answer yet
    sent = False  # an answer was sent, whole (not one cut short: nothing to keep)

    async def send(data: bytes) -> None:
        nonlocal sent
        sent = False
        await stream.send_all(data)
        sent = True

    async def refuse(status: int, body: bytes, *, head: bool = False) -> None:
        endpoint.count_refused(status)
        await send(_response(status, body, text, head=head))

    try:
        with trio.move_on_after(_REQUEST_TIMEOUT):
            if reading is None or heads is None:
                head, fits = await _read_head(stream)
            else:
                with reading:
                    try:
                        head, fits = await _read_head(stream)
                    finally:
                        heads.pop(reading, None)  # (gone already if shed)
                if reading.cancelled_caught:
                    endpoint.shed += 1
                    return  # shed: it asked for nothing yet
            if not fits:
                # an answer to HEAD has no body (RFC 9110 9.3.2), whatever it refuses
                asks_head = _HEAD_METHOD.match(head) is not None
                await refuse(431, b"request head too large\n", head=asks_head)
                return
            request_line = head.split(b"\n", 1)[0].strip(_REQUEST_LINE_SPACES)
            parts = [part.decode("latin-1") for part in _REQUEST_LINE_SPACE.split(request_line)]
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                if head:  # (else the client ended its side before a request line)
                    await refuse(400, b"bad request\n")
                return
            method, target, version = parts
            speaks = _HTTP_VERSION.fullmatch(version)
            if speaks is None:
                body = b"bad request: the HTTP version is not HTTP/DIGIT.DIGIT\n"
                await refuse(400, body, head=method == "HEAD")
                return
            if speaks[1] != "1":  # (a higher minor of 1 is answered as 1.1: RFC 9110 6.2)
                body = b"HTTP version not supported: this endpoint speaks HTTP/1.1\n"
                await refuse(505, body, head=method == "HEAD")
                return
            problem = _header_problem(head, version)
            if problem is not None:
                body = b"bad request: " + problem + b"\n"
                await refuse(400, body, head=method == "HEAD")
                return
            answering = True
            try:
                status, body, content_type = await _checked_route(route, method, target)
            except Exception as exc:
                # Said, and logged: not taken for the client going away (an OSError) nor
                # left as a connection closed without an answer.
                endpoint.render_failures += 1
                say(
                    lines.render_failed,
                    logging.ERROR,
                    "%s request %s %s failed (render failures so far: %d",
                    what,
                    method,
                    target,
                    endpoint.render_failures,
                    exc_info=exc,
                )
                status, content_type = 500, text
                body = f"the {what} render failed: {type(exc).__name__}\n".encode()
            answering = False
            if status in _REFUSALS:
                endpoint.count_refused(status)
            head_bytes = _response(status, body, content_type, head=True)
            if method == "HEAD":
                await send(head_bytes)
            elif len(body) < _JOIN_BELOW:
                await send(head_bytes + body)  # one segment
            else:
                # Not joined: a client that does not read would hold a copy of the text
                # (the renderer shares one between its scrapes) until the request timeout.
                await send(head_bytes)
                await send(body)
        if answering:
            # Said, not a connection closed without a word (the client would not know why).
            endpoint.unanswered += 1
            say(
                lines.unanswered,
                logging.WARNING,
                "%s request %s %s: no answer within %g s (requests unanswered so far: %d",
                what,
                method,
                target,
                _REQUEST_TIMEOUT,
                endpoint.unanswered,
            )
            body = f"no answer within {_REQUEST_TIMEOUT:g} s (the kernel is busy)\n".encode()
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await send(_response(503, body, text, head=method == "HEAD"))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the client went away
    except Exception as exc:  # a scrape must never take the kernel down
        endpoint.request_failures += 1
        say(
            lines.failed,
            logging.ERROR,
            "%s request failed (failures so far: %d",
            what,
            endpoint.request_failures,
            exc_info=exc,
        )
    finally:
        if sent:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await _close_gracefully(stream)
        else:
            # Nothing sent, or an answer cut short (a client that does not read, past the
            # request timeout or at the endpoint's end): no answer to keep from a reset,
            # so no lingering for the client's end (such a client held a shutdown, or its
            # slot past the request timeout, for that 1 s more).
            await trio.aclose_forcefully(stream)


async def _close_gracefully(stream: trio.SocketStream) -> None:
    """Half-close, then read what the client still sends (an unread request would make the
    kernel answer with a reset that can destroy the response), then close."""
    try:
        await stream.send_eof()
        received = 0
        while received < 1 << 20:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            received += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await stream.aclose()


async def serve_metrics(
    kernel: Kernel,
    host: str = "127.0.0.1",
    port: int = 9464,
    *,
    renderer: MetricsRenderer | None = None,
    max_connections: int | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` for ``kernel`` on ``host:port`` until
    cancelled.

    ``port=0`` picks a free port. With ``nursery.start(serve_metrics, ...)`` the bound port
    is returned once the server listens. ``/metrics`` is rendered by ``renderer``, by
    default :meth:`MetricsRenderer.for_kernel` (the kernel's ``[metrics]`` keys
    ``per_agent``, ``per_agent_limit`` and ``cache_ms``).

    At most ``max_connections`` connections (by default the kernel's ``[metrics]
    max_connections``, 32) are open at once (each holds a descriptor and
    a task for up to the 10 s a request may take); past it the endpoint stops accepting
    until one closes, and the next connections wait in the listen backlog, which costs
    the process nothing (counted in ``renderer.endpoint.limited``, logged at most once a
    second); at the limit, a connection whose request head is not all in 2 s after it was
    accepted is closed without an answer, the oldest first (``renderer.endpoint.shed``),
    for those waiting behind it. Its counters are ``renderer.endpoint`` (:class:`EndpointStats`).
    """
    if max_connections is None:
        max_connections = kernel.config.metrics.max_connections
    if renderer is None:
        renderer = MetricsRenderer.for_kernel(kernel)
    if renderer.endpoint is None:
        renderer.endpoint = EndpointStats()
    chosen = renderer

    async def route(path: str) -> tuple[int, bytes, str]:
        return await _route(kernel, chosen, path)

    await serve_routes(
        route,
        host,
        port,
        max_connections=max_connections,
        endpoint=renderer.endpoint,
        what="metrics",
        task_status=task_status,
    )


async def serve_routes(
    route: Route,
    host: str,
    port: int,
    *,
    max_connections: int = 32,
    endpoint: EndpointStats | None = None,
    what: str = "metrics",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``route`` on ``host:port`` as :func:`serve_metrics` serves a kernel's paths,
    until cancelled: one request per connection, the same refusals of what is no HTTP/1.x
    request (400, 431, 505, never routed), the same 10 s bound on a request, the same
    limit of ``max_connections`` open at once. ``await route(path)`` gives the status,
    the body and its content type of a GET or HEAD of ``path`` (the target's path, its
    query string cut; another method is refused with 405, never routed); an exception it
    raises is a 500 naming its type, logged.
    ``endpoint`` counts the connections and refusals (a new :class:`EndpointStats` if
    None); ``what`` names the server in its log lines and errors (``nexus run --workers``'
    group endpoint serves its ``/healthz``, ``/readyz`` and ``/metrics`` so).
    ``task_status.started`` gets the bound port."""
    if not 0 <= port <= 65535:
        raise ValueError(f"{what} port must be within 0..65535, got {port!r}")
    if isinstance(max_connections, bool) or not isinstance(max_connections, int):
        raise TypeError(f"max_connections must be an integer, got {max_connections!r}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
    # (an IPv6 address is taken with or without a URL's brackets, and written in them)
    host = unbracketed(host)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        # Said with the address: a bare "Address already in use" names neither.
        raise OSError(
            exc.errno,
            f"the {what} server cannot listen on {url_host(host)}:{port}: {exc.strerror or exc}",
        ) from exc
    bound = listeners[0].socket.getsockname()[1]
    log_guarded(log, logging.INFO, "%s on http://%s:%d/metrics", what, url_host(host), bound)
    if endpoint is None:
        endpoint = EndpointStats()
    counts = endpoint
    # Not trio.serve_listeners: it logs a failed accept with its traceback at each retry,
    # ten times a second while the process is out of descriptors, and counts nothing.
    failure_log = Throttle(1.0, clock=trio.current_time, kind="endpoint.accept_failure")
    limit_log = Throttle(1.0, clock=trio.current_time, kind="endpoint.connection_limit")
    # Past the limit, connections wait in accept (the listen backlog), not answered 503:
    # one waiting holds no descriptor nor task here, and costs the loop nothing (a flood
    # answered 503 would cost an accept, a write and a close each). Prometheus and health
    # probes come one at a time: only a flood or a leak of connections meets the limit.
    slots = trio.Semaphore(max_connections)

    lines = _RequestLines()
    #: the connections whose request head is not read yet: the scope of the read, and
    #: when the connection was accepted (the oldest first). Put here by the accept, not
    #: by the connection's task: the accept loop looks as the connection's task is only
    #: started, and saw no head to wait for (at a limit of 1, or with the others' heads
    #: all in, a silent connection was never shed: it held its slot for the 10 s).
    heads: dict[trio.CancelScope, float] = {}

    async def handle(stream: trio.SocketStream, reading: trio.CancelScope) -> None:
        try:
            await _answer_connection(
                stream, route, counts, what, lines=lines, heads=heads, reading=reading
            )
        finally:
            counts.open -= 1
            slots.release()
            await trio.aclose_forcefully(stream)

    # One accept loop at a time takes a slot and accepts (two listeners: a host that is
    # 127.0.0.1 and ::1): a loop that met the limit while the other's accept was under
    # way saw no head to shed and waited for a free slot with no deadline (the other's
    # silent connection held it the 10 s), and a slot freed by a shed could be taken by
    # the other loop, leaving the shedding one waiting with no deadline the same way.
    admitting = trio.Lock()

    async def admit(listener: trio.SocketListener) -> trio.SocketStream | None:
        """A slot taken for a connection waiting on ``listener`` (at the limit, the
        oldest connection still reading its head shed for it once due) and the
        connection accepted, counted; None if the accept failed for lack of descriptors
        or memory (counted, logged: it is retried)."""
        if slots.value == 0:
            counts.limited += 1
            if limit_log.due():
                log_guarded(
                    log,
                    logging.WARNING,
                    "the %s endpoint has %d connections open, its limit: new"
                    " connections wait in the listen backlog until one closes (times"
                    " at the limit so far: %d)",
                    what,
                    max_connections,
                    counts.limited,
                )
        while slots.value == 0 and heads:
            # At the limit: the oldest connection still reading its head gets
            # until _SHED_AFTER s after it began, then is shed for the ones
            # waiting behind it (a client that sends nothing, or a byte at a time,
            # held its slot for the 10 s a request may take: 32 of them kept
            # every scrape out, again and again). None comes meanwhile: nothing
            # is accepted at the limit.
            oldest, began = next(iter(heads.items()))
            with trio.move_on_at(began + _SHED_AFTER):
                await slots.acquire()
                slots.release()
                break
            if heads.get(oldest) == began:
                # (counted by the connection, if the cancel cuts its read: a loop
                # that stalled past the deadline may find its head in meanwhile)
                oldest.cancel()
                del heads[oldest]
                # Its slot is waited for below (it is freed as the shed one
                # closes): the next is shed only when the limit is met again.
                # Looking again at once shed every connection 2 s old, for the
                # one slot needed (the shed one still held it).
                break
        await slots.acquire()
        try:
            stream = await listener.accept()
        except OSError as exc:
            slots.release()
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            counts.accept_failures += 1
            if failure_log.due():
                log_guarded(
                    log,
                    logging.ERROR,
                    "the %s endpoint cannot accept a connection: %s (failures so"
                    " far: %d); retrying every %g s",
                    what,
                    exc,
                    counts.accept_failures,
                    _ACCEPT_RETRY,
                )
            return None
        except BaseException:
            slots.release()
            raise
        counts.accepted += 1
        counts.open += 1
        return stream

    async def accept_loop(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                # A connection waits in the backlog before a slot is taken for it: a loop
                # that took one first held it while it waited in accept, and with two
                # listeners (a host that is 127.0.0.1 and ::1) the other's connections
                # met a limit that was not there: at a limit of 1 they waited for good, at
                # 2 a lone connection was counted at the limit and shed 2 s after its accept.
                await trio.lowlevel.wait_readable(listener.socket)
                async with admitting:
                    stream = await admit(listener)
                    if stream is not None:
                        # (its head is in ``heads`` before another loop looks there)
                        reading = trio.CancelScope()
                        heads[reading] = trio.current_time()
                        nursery.start_soon(handle, stream, reading)
                if stream is None:
                    await trio.sleep(_ACCEPT_RETRY)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, nursery)
        task_status.started(bound)
