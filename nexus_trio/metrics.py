"""Prometheus metrics and a health check for a running kernel, served from Trio.

``await serve_metrics(kernel, host, port)`` runs a tiny HTTP/1.1 server (``trio.serve_tcp``
style, one request per connection) in the kernel's own Trio thread, so every scrape reads
:meth:`Kernel.stats` consistently, without locks and without the threaded server of
``prometheus_client``:

* ``GET /metrics`` — the Prometheus text format (``prometheus_client.generate_latest`` on a
  custom collector): kernel counters, dead letters and rejected sends by reason, the
  handle-latency and queue-wait summaries, per-agent series (up to ``per_agent_limit``
  agents) and the ``process_*`` series of the process;
* ``GET /healthz`` — ``200 ok`` while the kernel runs and is not shutting down, ``503``
  otherwise (what ``nexus health`` and a container ``HEALTHCHECK`` ask).

Typical use, next to a kernel::

    async with open_kernel(config) as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 9464)
        ...
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Final

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

if TYPE_CHECKING:
    from ._kernel import Kernel
    from ._stats import HistogramSnapshot

__all__ = ["KernelCollector", "build_registry", "serve_metrics"]

log = logging.getLogger("nexus_trio.metrics")

#: above this many live agents, per-agent series are left out of a scrape
DEFAULT_PER_AGENT_LIMIT: Final = 10_000

_MAX_REQUEST_HEAD: Final = 8192
_REQUEST_TIMEOUT: Final = 10.0


class KernelCollector:
    """A ``prometheus_client`` collector reading ``kernel.stats()`` at each scrape.

    Series (``_total`` is added to counters by the exposition format):
    ``nexus_messages_accepted``, ``nexus_messages_handled``, ``nexus_replies_delivered``,
    ``nexus_messages_forwarded``, ``nexus_handler_failures``, ``nexus_handler_timeouts``,
    ``nexus_dead_letters{reason}``, ``nexus_sends_rejected{reason}``, ``nexus_restarts``,
    ``nexus_dead_letter_stream_dropped`` (counters); ``nexus_agents_alive``,
    ``nexus_messages_in_flight``, ``nexus_max_mailbox_depth``, ``nexus_kernel_up``,
    ``nexus_agent_series_truncated`` (gauges); ``nexus_handle_latency_seconds`` and
    ``nexus_queue_wait_seconds`` (summaries with quantiles 0.5/0.9/0.99/0.999, plus a
    ``_max`` gauge); per agent (labels ``agent_id``, ``agent_name``):
    ``nexus_agent_received``, ``nexus_agent_handled``, ``nexus_agent_failed``,
    ``nexus_agent_timed_out``, ``nexus_agent_dead_lettered``, ``nexus_agent_restarts``
    (counters) and ``nexus_agent_mailbox_depth``, ``nexus_agent_mailbox_high_water``,
    ``nexus_agent_mailbox_capacity`` (gauges).
    """

    def __init__(self, kernel: Kernel, *, per_agent_limit: int = DEFAULT_PER_AGENT_LIMIT) -> None:
        if per_agent_limit < 0:
            raise ValueError(f"per_agent_limit must be >= 0, got {per_agent_limit!r}")
        self.kernel = kernel
        self.per_agent_limit = per_agent_limit

    def describe(self) -> Iterable[Metric]:
        # Registering must not take a snapshot of a kernel (and no names clash with others).
        return []

    def collect(self) -> Iterator[Metric]:
        kernel = self.kernel
        alive = kernel.stats().agents_alive
        per_agent = alive <= self.per_agent_limit
        s = kernel.stats(agents=per_agent)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield counter("nexus_messages_accepted", "Messages the kernel accepted.", s.accepted)
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
        yield counter("nexus_handler_timeouts", "Handler calls cancelled by timeout.", s.timed_out)
        yield counter("nexus_restarts", "Agent and supervisor restarts.", s.restarts)
        yield counter(
            "nexus_dead_letter_stream_dropped",
            "Dead letters a slow stream subscriber did not receive.",
            s.dead_letter_stream_dropped,
        )
        dead = CounterMetricFamily(
            "nexus_dead_letters", "Accepted messages not handled, by reason.", labels=["reason"]
        )
        for reason, n in sorted(s.dead_letters_by_reason.items()):
            dead.add_metric([reason], n)
        yield dead
        rejected = CounterMetricFamily(
            "nexus_sends_rejected",
            "Sends refused with an exception to the caller, by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(s.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield gauge("nexus_agents_alive", "Live agents.", s.agents_alive)
        yield gauge("nexus_messages_in_flight", "Accepted messages not yet done.", s.in_flight)
        yield gauge("nexus_max_mailbox_depth", "Deepest mailbox right now.", s.max_mailbox_depth)
        yield gauge(
            "nexus_kernel_up",
            "1 while the kernel runs and is not shutting down.",
            0 if kernel.shutting_down else 1,
        )
        yield gauge(
            "nexus_agent_series_truncated",
            f"1 if per-agent series were left out (more than {self.per_agent_limit} agents).",
            0 if per_agent else 1,
        )
        yield from _summary(
            "nexus_handle_latency_seconds", "Handler latency (sampled).", s.handle_latency
        )
        yield from _summary(
            "nexus_queue_wait_seconds",
            "Time in the mailbox before handling (sampled).",
            s.queue_wait,
        )
        if not per_agent:
            return
        labels = ["agent_id", "agent_name"]
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "received": CounterMetricFamily(
                "nexus_agent_received", "Messages put in the agent's mailbox.", labels=labels
            ),
            "handled": CounterMetricFamily(
                "nexus_agent_handled", "Messages the agent handled.", labels=labels
            ),
            "failed": CounterMetricFamily(
                "nexus_agent_failed", "Handler calls that raised.", labels=labels
            ),
            "timed_out": CounterMetricFamily(
                "nexus_agent_timed_out", "Handler calls cancelled by timeout.", labels=labels
            ),
            "dead_lettered": CounterMetricFamily(
                "nexus_agent_dead_lettered", "Messages to the agent dead-lettered.", labels=labels
            ),
            "restarts": CounterMetricFamily(
                "nexus_agent_restarts", "Restarts of the agent.", labels=labels
            ),
            "mailbox_depth": GaugeMetricFamily(
                "nexus_agent_mailbox_depth", "Messages queued in the mailbox.", labels=labels
            ),
            "mailbox_high_water": GaugeMetricFamily(
                "nexus_agent_mailbox_high_water", "Deepest the mailbox has been.", labels=labels
            ),
            "mailbox_capacity": GaugeMetricFamily(
                "nexus_agent_mailbox_capacity", "Capacity of the mailbox.", labels=labels
            ),
        }
        for a in s.agents:
            values = [str(a.id), a.name or ""]
            for field, family in families.items():
                family.add_metric(values, getattr(a, field))
        yield from families.values()


def _summary(name: str, doc: str, h: HistogramSnapshot) -> Iterator[Metric]:
    metric = Metric(name, doc, "summary")
    for q, value in (("0.5", h.p50), ("0.9", h.p90), ("0.99", h.p99), ("0.999", h.p999)):
        metric.add_sample(name, {"quantile": q}, value)
    metric.add_sample(name + "_count", {}, h.count)
    metric.add_sample(name + "_sum", {}, h.total)
    yield metric
    yield GaugeMetricFamily(name + "_max", doc + " Maximum.", value=h.maximum)


def build_registry(
    kernel: Kernel, *, per_agent_limit: int = DEFAULT_PER_AGENT_LIMIT, process: bool = True
) -> CollectorRegistry:
    """A registry with the kernel's collector (and ``process_*`` series if ``process``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KernelCollector(kernel, per_agent_limit=per_agent_limit))
    if process:
        ProcessCollector(registry=registry)
    return registry


def health(kernel: Kernel) -> bool:
    """True while the kernel runs and is not shutting down."""
    return not kernel.shutting_down


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
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


def _route(
    kernel: Kernel, registry: CollectorRegistry, method: str, target: str
) -> tuple[int, bytes, str]:
    text = "text/plain; charset=utf-8"
    if method not in ("GET", "HEAD"):
        return 405, b"method not allowed\n", text
    path = target.split("?", 1)[0]
    if path == "/metrics":
        return 200, generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
    if path == "/healthz":
        if health(kernel):
            return 200, b"ok\n", text
        return 503, b"shutting down\n", text
    if path == "/":
        return 200, b"nexus_trio: GET /metrics (Prometheus), GET /healthz\n", text
    return 404, b"not found\n", text


async def _read_head(stream: trio.abc.Stream) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > _MAX_REQUEST_HEAD:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


async def _handle_connection(
    stream: trio.SocketStream, kernel: Kernel, registry: CollectorRegistry
) -> None:
    try:
        with trio.move_on_after(_REQUEST_TIMEOUT):
            head = await _read_head(stream)
            if head is None:
                await stream.send_all(
                    _response(431, b"request head too large\n", "text/plain; charset=utf-8")
                )
                return
            request_line = head.split(b"\n", 1)[0].decode("latin-1").strip()
            parts = request_line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                if request_line:
                    await stream.send_all(
                        _response(400, b"bad request\n", "text/plain; charset=utf-8")
                    )
                return
            method, target, _version = parts
            status, body, content_type = _route(kernel, registry, method, target)
            await stream.send_all(_response(status, body, content_type, head=method == "HEAD"))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the client went away
    except Exception:  # a scrape must never take the kernel down
        log.exception("metrics request failed")
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await _close_gracefully(stream)


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
    per_agent_limit: int = DEFAULT_PER_AGENT_LIMIT,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` and ``/healthz`` for ``kernel`` on ``host:port`` until cancelled.

    ``port=0`` picks a free port. With ``nursery.start(serve_metrics, ...)`` the bound port
    is returned once the server listens. Per-agent series are left out while more than
    ``per_agent_limit`` agents are alive (``nexus_agent_series_truncated`` is then 1).
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics port must be within 0..65535, got {port!r}")
    registry = build_registry(kernel, per_agent_limit=per_agent_limit)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    task_status.started(bound)

    async def handler(stream: trio.SocketStream) -> None:
        await _handle_connection(stream, kernel, registry)

    await trio.serve_listeners(handler, listeners)
