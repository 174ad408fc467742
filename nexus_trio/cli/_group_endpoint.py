"""The group endpoint of ``nexus run --workers N --group-port Q``: one ``/healthz``,
``/readyz`` and ``/metrics`` for the whole process group, served by the parent.

Each worker serves its own endpoint on P + i (``--metrics-port P``); the parent asks them
over the metrics host (loopback for a wildcard), all at once, each with a short bound, and
answers for the group, as a gunicorn master or an Erlang node's health answers for what
it supervises:

* ``/healthz`` — ``200 ok`` while the parent runs and every worker process is alive and,
  once it said it was ready (it joined: its endpoint listens), answers its own
  ``/healthz`` with 200 within :data:`ASK_TIMEOUT`; else ``503`` with one reason per
  failing worker, in one line, each prefixed ``worker-i:`` (``worker-1: ended (killed by
  SIGKILL)``, ``worker-1: no answer within 0.8 s``, ``worker-0: shutting down``). A
  worker still starting is alive (the parent kills one not ready in its start's bound).
  Once the run is asked to stop (a signal, a worker that died), ``503 shutting down``, as
  a kernel's own ``/healthz``, followed by the workers that ended (``shutting down;
  worker-1: ended (killed by SIGKILL)``): no worker is asked any more.
* ``/readyz`` — ``200 ready`` only when every worker's own ``/readyz`` says ready;
  else ``503`` with each failing worker's reasons (``worker-1: starting``, ``worker-0:
  not joined``, ``worker-1: no answer within 0.8 s``), or ``shutting down`` (as above).
* ``/metrics`` — every worker's series, each sample with a ``worker`` label added, and
  ``nexus_group_worker_up{worker}`` (1 when its ``/metrics`` answered within
  :data:`METRICS_TIMEOUT`, else 0 and its series are left out of this scrape; 0 for a
  worker not started or ended, which is not asked), and the endpoint's own series:
  ``nexus_group_scrapes_total``, ``nexus_group_scrape_duration_seconds``,
  ``nexus_group_worker_scrape_duration_seconds{worker}``,
  ``nexus_group_worker_scrape_failures_total{worker,reason}``,
  ``nexus_group_worker_probe_failures_total{worker,probe,reason}`` (the ``/healthz`` and
  ``/readyz`` asks of a running worker that got no answer or not 200, since the forty-fourth
  pass), ``nexus_group_worker_families_refused_total{worker}`` and, since the
  forty-fifth pass, the endpoint's own requests that failed:
  ``nexus_group_render_failures_total`` (its answer raised: 500),
  ``nexus_group_requests_unanswered_total`` (none within 10 s: 503) and
  ``nexus_group_request_failures_total`` (as a worker's ``nexus_metrics_*`` of the same
  names), and since the forty-sixth pass the rest of its server's counters, as those:
  ``nexus_group_connections_total``, ``nexus_group_connections_open``,
  ``nexus_group_accept_failures_total``, ``nexus_group_connections_limited_total``,
  ``nexus_group_connections_shed_total`` (since the fifty-sixth pass) and
  ``nexus_group_requests_refused_total{status}``. The prefix ``nexus_group_`` is the group's: a worker's family named so (a
  user's agent, or the worker, exporting one) is left out of the group's scrape, counted
  there and logged once per worker and name, so that it can never clash with the
  group's own.

A worker whose answer failed is looked at again (its state, which reads its end with
``waitid(WNOWAIT)``) before its port's words are trusted: one killed as it was asked is
named ``ended (killed by SIGKILL)``, not by what its half-closed port said.

Requests that are no HTTP/1.x request are refused as a worker's endpoint refuses them
(the same server: :func:`nexus_trio.metrics.serve_routes`). The endpoint runs its own Trio
loop in a thread of the parent (which waits for its workers in threads); a worker that
hangs (SIGSTOPped, a blocked loop) costs an answer its bound, never the parent.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Final

import attrs
import trio

from .._logcall import log_guarded
from ..metrics import EndpointStats, endpoint_families, serve_routes
from ._hosts import header_host, probe_host, url_host

if TYPE_CHECKING:
    from prometheus_client.core import Metric

log = logging.getLogger("nexus_trio.cli")

#: seconds a worker's ``/healthz`` or ``/readyz`` may take before the group's answer
#: names it (under a Kubernetes probe's default ``timeoutSeconds``, 1)
ASK_TIMEOUT: Final = 0.8
#: seconds a worker's ``/metrics`` may take before a scrape of the group leaves it out
METRICS_TIMEOUT: Final = 5.0
#: the most of a worker's ``/healthz`` or ``/readyz`` answer read (its body is one line)
_MAX_ANSWER: Final = 64 * 1024
#: the most of a worker's ``/metrics`` answer read
_MAX_METRICS: Final = 256 * 1024 * 1024
#: the most of a worker's reasons quoted in the group's answer
_MAX_REASON: Final = 500
_TEXT: Final = "text/plain; charset=utf-8"
#: how the parent says a worker is: not started yet, starting (not ready), running, or
#: ended (then with how: ``exit code 1``, ``killed by SIGKILL``)
NOT_STARTED: Final = "not started"
STARTING: Final = "starting"
RUNNING: Final = "running"
ENDED: Final = "ended"
#: why a worker asked gave a scrape of the group no usable /metrics (the ``reason``
#: label of ``nexus_group_worker_scrape_failures_total``)
NO_ANSWER: Final = "no_answer"
BAD_STATUS: Final = "status"
NOT_PARSABLE: Final = "not_parsable"
#: the probes the group asks its workers (the ``probe`` label of
#: ``nexus_group_worker_probe_failures_total``; its ``reason`` is NO_ANSWER or BAD_STATUS)
PROBES: Final = ("healthz", "readyz")
#: the prefix of the group's own series: a worker's family named so is left out
GROUP_PREFIX: Final = "nexus_group_"


@attrs.frozen
class GroupState:
    """What the parent says of its workers now."""

    #: the run was asked to stop (a signal, a worker that died or failed)
    stopping: bool
    #: per worker, in order: (:data:`NOT_STARTED` / :data:`STARTING` / :data:`RUNNING` /
    #: :data:`ENDED`, how it ended or "")
    workers: tuple[tuple[str, str], ...]


def _one_line(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _connect_failure(exc: OSError) -> str:
    """Why a connection failed, in the OS's words (``Connection refused``): trio's ``all
    attempts to connect to H:P failed`` has them in its cause, one per address tried."""
    cause = exc.__cause__
    said: list[str] = []
    if isinstance(cause, BaseExceptionGroup):
        for error in cause.exceptions:
            # (each says its address in its message: the errno's own words are enough)
            if isinstance(error, OSError) and error.errno:
                text = os.strerror(error.errno)
            else:
                text = str(error)
            if text not in said:
                said.append(text)
    return "; ".join(said) or exc.strerror or str(exc)


async def ask(host: str, port: int, path: str, *, timeout: float, limit: int) -> tuple[int, bytes]:
    """GET ``path`` of the endpoint on ``host:port``: its status and body. OSError (with a
    reason fit for the group's answer) if it is not reached, does not answer within
    ``timeout`` seconds or answers something else than HTTP/1.x or more than ``limit``
    bytes."""
    where = url_host(host)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {header_host(host)}:{port}\r\nConnection: close\r\n\r\n"
    )
    data = bytearray()
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise OSError(f"no endpoint on {where}:{port} ({_connect_failure(exc)})") from None
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(request.encode("ascii"))
            try:
                while chunk := await stream.receive_some(65536):
                    data += chunk
                    if len(data) > limit:
                        raise OSError(f"answered more than {limit} bytes")
            except trio.BrokenResourceError as exc:
                raise OSError(f"closed the connection ({exc})") from None
        head, sep, body = bytes(data).partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        if (
            not sep
            or len(parts) < 2
            or not parts[0].startswith(b"HTTP/1.")
            or not parts[1].isdigit()
        ):
            raise OSError("answered no HTTP/1.x response")
        return int(parts[1]), body
    raise OSError(f"no answer within {timeout:g} s")


class GroupEndpoint:
    """The parent's endpoint for its workers (see the module doc): :meth:`start` listens
    (in a thread of its own), :meth:`close` stops it."""

    def __init__(
        self,
        host: str,
        port: int,
        worker_ports: Sequence[int],
        state: Callable[[], GroupState],
        *,
        ask_timeout: float = ASK_TIMEOUT,
        metrics_timeout: float = METRICS_TIMEOUT,
        max_connections: int = 32,
    ) -> None:
        self.host = host
        self.port = port
        self.worker_ports = tuple(worker_ports)
        self.state = state
        self.ask_timeout = ask_timeout
        self.metrics_timeout = metrics_timeout
        #: at most this many connections open at once (``[metrics] max_connections``)
        self.max_connections = max_connections
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        #: scrapes of the group served, and per (worker, reason) the scrapes in which
        #: that worker, asked, gave no usable /metrics (see _own_series)
        self._scrapes = 0
        self._scrape_failures: collections.Counter[tuple[int, str]] = collections.Counter()
        #: per (worker, probe, reason): its /healthz or /readyz asked, no answer or not 200
        self._probe_failures: collections.Counter[tuple[int, str, str]] = collections.Counter()
        #: per worker: its families left out of a scrape (the group's prefix), and the
        #: (worker, family) pairs logged (once each)
        self._families_refused: collections.Counter[int] = collections.Counter()
        self._refusals_logged: set[tuple[int, str]] = set()
        #: what its server counted (requests whose answer raised, unanswered in 10 s,
        #: failed otherwise: exported as ``nexus_group_render_failures_total``, ...)
        self.endpoint = EndpointStats()

    def start(self) -> int:
        """Listen; the bound port. OSError (naming the address) if it cannot listen."""
        self._thread = threading.Thread(target=self._run, name="nexus-group-endpoint", daemon=True)
        self._thread.start()
        self._listening.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self.port

    def close(self, timeout: float = 2.0) -> None:
        """Stop serving (bounded: the thread is a daemon)."""
        token, scope = self._token, self._scope
        if token is not None and scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(scope.cancel)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    try:
                        self.port = await nursery.start(
                            functools.partial(
                                serve_routes,
                                what="group metrics",
                                max_connections=self.max_connections,
                                endpoint=self.endpoint,
                            ),
                            self.route,
                            self.host,
                            self.port,
                        )
                    except OSError as exc:  # (it cannot listen: said by start)
                        self._error = exc
                        return
                    finally:
                        self._listening.set()

        try:
            trio.run(main)
        except BaseException as exc:
            if self._listening.is_set():
                log_guarded(log, logging.ERROR, "the group endpoint failed", exc_info=exc)
            else:
                self._error = exc
        finally:
            self._listening.set()

    async def route(self, path: str) -> tuple[int, bytes, str]:
        if path in ("/healthz", "/readyz"):
            problems = await self._problems(path)
            if not problems:
                return 200, b"ok\n" if path == "/healthz" else b"ready\n", _TEXT
            return 503, "; ".join(problems).encode() + b"\n", _TEXT
        if path == "/metrics":
            return 200, await self._metrics(), _METRICS_FORMAT
        if path == "/":
            body = b"nexus_trio --workers group: GET /metrics, GET /healthz, GET /readyz\n"
            return 200, body, _TEXT
        return 404, b"not found\n", _TEXT

    async def _problems(self, path: str) -> list[str]:
        """Why the group is not healthy (``/healthz``) or not ready (``/readyz``)."""
        state = self.state()
        problems: list[str | None] = [None] * len(state.workers)
        host = probe_host(self.host)
        probe = path.removeprefix("/")

        def failed(i: int, reason: str, said: str) -> None:
            ended = self._ended_since(i)
            if not ended:  # (one that ended meanwhile is no failure: it is said as ended)
                self._probe_failures[i, probe, reason] += 1
            problems[i] = ended or f"worker-{i}: {said}"

        async def ask_worker(i: int) -> None:
            try:
                status, body = await ask(
                    host, self.worker_ports[i], path, timeout=self.ask_timeout, limit=_MAX_ANSWER
                )
            except OSError as exc:
                failed(i, NO_ANSWER, str(exc))
                return
            if status != 200:
                failed(i, BAD_STATUS, _one_line(body) or f"status {status}")

        async with trio.open_nursery() as nursery:
            for i, (how, end) in enumerate(state.workers):
                if how == ENDED:
                    problems[i] = f"worker-{i}: ended ({end})"
                elif state.stopping:
                    continue  # (said once for all, below: none is asked)
                elif how == NOT_STARTED:
                    problems[i] = f"worker-{i}: not started"
                elif how == STARTING and path == "/readyz":
                    problems[i] = f"worker-{i}: starting"
                elif how == RUNNING:
                    nursery.start_soon(ask_worker, i)
        # (stopping: the workers that ended are still named, the one that died first too)
        return ["shutting down"] * state.stopping + [p for p in problems if p is not None]

    def _ended_since(self, i: int) -> str | None:
        """``worker-i: ended (how)`` if worker ``i``, running when it was asked, has
        ended since (the state reads its end with ``waitid(WNOWAIT)`` before its watch
        reaps it), else None: a worker just killed, its threads still exiting, has a
        port that refuses, resets or does not answer for a moment, and what its port
        said is not trusted over its end."""
        workers = self.state().workers
        if i < len(workers) and workers[i][0] == ENDED:
            return f"worker-{i}: ended ({workers[i][1]})"
        return None

    async def _metrics(self) -> bytes:
        """Every worker's series with a ``worker`` label, and whether each answered. A
        worker not started yet, or ended, is not asked (up 0): what answers on its port
        then is not it (another process may have taken the port it left, or holds the
        one it could not listen on)."""
        host = probe_host(self.host)
        texts: list[str | None] = [None] * len(self.worker_ports)
        state = self.state()

        took: dict[int, float] = {}
        failures = self._scrape_failures

        async def scrape(i: int) -> None:
            began = time.perf_counter()
            try:
                status, body = await ask(
                    host,
                    self.worker_ports[i],
                    "/metrics",
                    timeout=self.metrics_timeout,
                    limit=_MAX_METRICS,
                )
            except OSError as exc:
                log_guarded(log, logging.DEBUG, "worker-%d's /metrics: %s", i, exc)
                if not self._ended_since(i):  # (one that ended meanwhile is no failure)
                    failures[i, NO_ANSWER] += 1
                return
            finally:
                took[i] = time.perf_counter() - began
            if status == 200:
                texts[i] = body.decode("utf-8", "replace")
            elif not self._ended_since(i):
                failures[i, BAD_STATUS] += 1

        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i, (how, _end) in enumerate(state.workers):
                if how in (STARTING, RUNNING):
                    nursery.start_soon(scrape, i)
        self._scrapes += 1
        scrape_took = time.perf_counter() - began

        def unparsable(i: int) -> None:
            failures[i, NOT_PARSABLE] += 1

        def own() -> Iterator[Metric]:
            yield from self._own_series(scrape_took, took)

        return render_group_metrics(
            texts, own=own, on_unparsable=unparsable, on_refused=self._refused
        )

    def _refused(self, i: int, name: str) -> None:
        """Worker ``i``'s family ``name`` (the group's prefix) was left out: counted, and
        logged once per worker and name."""
        self._families_refused[i] += 1
        if (i, name) not in self._refusals_logged and len(self._refusals_logged) < 1024:
            self._refusals_logged.add((i, name))
            _log_refused(i, name)

    def _own_series(self, scrape_took: float, took: dict[int, float]) -> Iterator[Metric]:
        """The endpoint's own series (after its scrape's failures were all counted)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield CounterMetricFamily(
            "nexus_group_scrapes",
            "scrapes of the group's /metrics served, this one included",
            value=self._scrapes,
        )
        yield GaugeMetricFamily(
            "nexus_group_scrape_duration_seconds",
            "seconds this scrape of the group took to ask its workers (the slowest, or"
            " the bound of one that did not answer)",
            value=scrape_took,
        )
        durations = GaugeMetricFamily(
            "nexus_group_worker_scrape_duration_seconds",
            "seconds the worker's /metrics took to answer (or fail) this scrape of the"
            " group; no sample for a worker not asked (not started, or ended)",
            labels=["worker"],
        )
        for i in sorted(took):
            durations.add_metric([f"worker-{i}"], took[i])
        yield durations
        failed = CounterMetricFamily(
            "nexus_group_worker_scrape_failures",
            "scrapes of the group in which the worker, asked, gave no usable /metrics, by"
            " reason: no_answer (not reached, closed, or no answer within the bound),"
            " status (not 200), not_parsable",
            labels=["worker", "reason"],
        )
        for i in range(len(self.worker_ports)):
            for reason in (NO_ANSWER, BAD_STATUS, NOT_PARSABLE):
                failed.add_metric([f"worker-{i}", reason], self._scrape_failures[i, reason])
        yield failed
        probes = CounterMetricFamily(
            "nexus_group_worker_probe_failures",
            "the group's /healthz or /readyz asks of the worker (running) that failed, by"
            " probe (healthz, readyz) and reason: no_answer (not reached, closed, or no"
            " answer within the bound), status (not 200: it said it is not healthy or"
            " not ready)",
            labels=["worker", "probe", "reason"],
        )
        for i in range(len(self.worker_ports)):
            for probe in PROBES:
                for reason in (NO_ANSWER, BAD_STATUS):
                    probes.add_metric(
                        [f"worker-{i}", probe, reason], self._probe_failures[i, probe, reason]
                    )
        yield probes
        refused = CounterMetricFamily(
            "nexus_group_worker_families_refused",
            f"the worker's families left out of a scrape of the group (each time): named"
            f" {GROUP_PREFIX}*, the prefix of the group's own series",
            labels=["worker"],
        )
        for i in range(len(self.worker_ports)):
            refused.add_metric([f"worker-{i}"], self._families_refused[i])
        yield refused
        # (its server's counters, as a worker's nexus_metrics_* of the same names)
        yield from endpoint_families(self.endpoint, prefix=GROUP_PREFIX, what="the group endpoint")


_METRICS_FORMAT: Final = "text/plain; version=0.0.4; charset=utf-8"


def _log_refused(i: int, name: str) -> None:
    log_guarded(
        log,
        logging.WARNING,
        "worker-%d's /metrics has a family %r: left out of the group's scrape (the prefix"
        " %s* is the group's own series; counted in"
        " nexus_group_worker_families_refused_total)",
        i,
        name,
        GROUP_PREFIX,
    )


def render_group_metrics(
    texts: Sequence[str | None],
    *,
    own: Callable[[], Iterable[Metric]] | None = None,
    on_unparsable: Callable[[int], None] | None = None,
    on_refused: Callable[[int, str], None] = _log_refused,
) -> bytes:
    """The Prometheus text of the workers' texts (None: that worker did not answer), each
    sample labelled ``worker="worker-i"``, with ``nexus_group_worker_up``, and the series
    ``own()`` gives (the endpoint's own, read once the texts were parsed: each one not
    parsable is told to ``on_unparsable`` with its worker's index first). A worker's
    family named with the group's prefix (:data:`GROUP_PREFIX`), or with a sample so
    named, is left out and told to ``on_refused`` (its worker's index, its name): the
    group's series are the group's own, never merged with a worker's."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "nexus_group_worker_up",
        "1 if the worker's /metrics answered this scrape of the group, else 0",
        labels=["worker"],
    )
    for i, text in enumerate(texts):
        worker = f"worker-{i}"
        parsed: list[Metric] = []
        if text is not None:
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError as exc:  # (not ours: said, and left out)
                log_guarded(log, logging.WARNING, "%s's /metrics is not parsable: %s", worker, exc)
                text = None
                if on_unparsable is not None:
                    on_unparsable(i)
        up.add_metric([worker], 0 if text is None else 1)
        for family in parsed:
            if family.name.startswith(GROUP_PREFIX) or any(
                s.name.startswith(GROUP_PREFIX) for s in family.samples
            ):
                on_refused(i, family.name)
                continue
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples.extend(
                Sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )

    class _Families:
        def collect(self) -> Iterator[Metric]:
            yield up
            if own is not None:
                yield from own()
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families())
    return generate_latest(registry)
