"""The Prometheus endpoint and the health check (nexus_trio.metrics), served from Trio.

These tests run on the real clock (sockets and MockClock's autojump do not mix); they
assert values, never timings.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import heapq
import itertools
import logging
import pathlib
import random
import re
import select
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

import pytest
import trio
import trio.testing
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from nexus_trio import (
    Agent,
    AgentRef,
    AgentScan,
    Config,
    Context,
    Kernel,
    KernelConfig,
    MailboxFull,
    Message,
    MetricsConfig,
    agent,
    metrics,
)
from nexus_trio.logs import log_lines_dropped
from nexus_trio.metrics import (
    EndpointStats,
    KernelCollector,
    MetricsRenderer,
    add_collector,
    add_readiness,
    build_registry,
    readiness,
    remove_collector,
    remove_readiness,
    render_snapshot,
    serve_metrics,
    serve_routes,
    take_snapshot,
)
from nexus_trio.testing import open_test_kernel
from nexus_trio.testing import test_config as base_config


@agent(name="echo")
async def echo(ctx, msg):
    return msg.payload


@agent
async def unnamed(ctx, msg):
    return None


@agent(name="boom", on_error="restart")
async def boom(ctx, msg):
    raise RuntimeError("boom")


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 exchange over loopback: status, headers, body."""
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await http(port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def with_metrics(**metrics: object) -> Config:
    import attrs

    return attrs.evolve(base_config(), metrics=MetricsConfig(**metrics))  # type: ignore[arg-type]


@agent
async def idle(ctx, msg):
    return None


async def test_metrics_endpoint_exposes_the_kernel_counters_and_per_agent_series():
    config = with_metrics(per_agent=True)
    async with open_test_kernel(config) as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)
        kernel.spawn(echo)
        kernel.spawn(boom)
        for i in range(5):
            assert await kernel.request("echo", i) == i
        await kernel.send("boom", "x")
        await trio.testing.wait_all_tasks_blocked()

        status, headers, body = await get(port, "/metrics")
        assert status == 200
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert int(headers["content-length"]) == len(body)
        values = samples(body.decode())
        stats = kernel.stats()
        assert stats.accepted == 11  # 5 queries + 5 replies + 1 command
        assert values[("nexus_messages_accepted_total", ())] == stats.accepted
        assert values[("nexus_messages_handled_total", ())] == stats.handled == 5
        assert values[("nexus_replies_delivered_total", ())] == stats.replies_delivered == 5
        assert values[("nexus_handler_failures_total", ())] == 1
        assert values[("nexus_restarts_total", ())] == stats.restarts == 1
        assert values[("nexus_dead_letters_total", (("reason", "handler_error"),))] == 1
        assert values[("nexus_agents_alive", ())] == 2
        assert values[("nexus_messages_in_flight", ())] == 0
        assert values[("nexus_kernel_up", ())] == 1
        assert values[("nexus_agent_series_truncated", ())] == 0
        assert values[("nexus_agent_series_exported", ())] == 2
        assert values[("nexus_handle_latency_seconds_count", ())] == stats.handle_latency.count
        assert ("nexus_handle_latency_seconds", (("quantile", "0.99"),)) in values
        assert ("nexus_queue_wait_seconds", (("quantile", "0.5"),)) in values
        assert ("process_resident_memory_bytes", ()) in values

        echo_id = str(kernel.lookup("echo").id)
        boom_id = str(kernel.lookup("boom").id)
        echo_labels = (("agent_id", echo_id), ("agent_name", "echo"))
        boom_labels = (("agent_id", boom_id), ("agent_name", "boom"))
        assert values[("nexus_agent_received_total", echo_labels)] == 5
        assert values[("nexus_agent_handled_total", echo_labels)] == 5
        assert values[("nexus_agent_failed_total", boom_labels)] == 1
        assert values[("nexus_agent_restarts_total", boom_labels)] == 1
        assert values[("nexus_agent_dead_lettered_total", boom_labels)] == 1
        assert values[("nexus_agent_mailbox_depth", echo_labels)] == 0
        assert values[("nexus_agent_mailbox_capacity", echo_labels)] == 1024
        nursery.cancel_scope.cancel()


async def test_every_dead_letter_and_rejection_reason_is_exported_from_the_start_at_0():
    """Regression: ``nexus_dead_letters_total{reason}`` and
    ``nexus_sends_rejected_total{reason}`` had a series only once a reason had happened,
    so the first dead letters of a reason were in no ``rate()`` or ``increase()`` (its
    series started at 1, 5, ...: Prometheus sees no increase from nothing) and an alert on
    them missed the first burst; Prometheus's guidance: export 0 for series known in
    advance. Every reason (``DeadLetterReason``, and the three a send is refused for) is
    there from the first scrape, at 0."""
    from nexus_trio import AgentNotFound, DeadLetterReason

    async with open_test_kernel() as kernel:
        first = samples(render_snapshot(take_snapshot(kernel), process=False).decode())
        dead = {
            dict(k[1])["reason"]: v for k, v in first.items() if k[0] == "nexus_dead_letters_total"
        }
        rejected = {
            dict(k[1])["reason"]: v
            for k, v in first.items()
            if k[0] == "nexus_sends_rejected_total"
        }
        assert dead == {reason.value: 0 for reason in DeadLetterReason}
        assert rejected == {"mailbox_full": 0, "no_such_agent": 0, "shutting_down": 0}

        kernel.spawn(boom)
        await kernel.send("boom", "x")
        with pytest.raises(AgentNotFound):
            await kernel.send("nobody", "x")
        await trio.testing.wait_all_tasks_blocked()
        then = samples(render_snapshot(take_snapshot(kernel), process=False).decode())
        assert then[("nexus_dead_letters_total", (("reason", "handler_error"),))] == 1
        assert then[("nexus_sends_rejected_total", (("reason", "no_such_agent"),))] == 1
        changed = {key for key in first if key[0].endswith("_total") and then[key] != first[key]}
        assert changed >= {
            ("nexus_dead_letters_total", (("reason", "handler_error"),)),
            ("nexus_sends_rejected_total", (("reason", "no_such_agent"),)),
        }
        assert set(then) == set(first)  # no series came or went


async def test_healthz_is_200_while_running_and_503_once_shutting_down():
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)
        status, _, body = await get(port, "/healthz")
        assert (status, body) == (200, b"ok\n")
        await kernel.shutdown()
        status, _, body = await get(port, "/healthz")
        assert (status, body) == (503, b"shutting down\n")
        status, _, body = await get(port, "/metrics")
        assert status == 200
        assert samples(body.decode())[("nexus_kernel_up", ())] == 0
        nursery.cancel_scope.cancel()


async def test_readyz_is_200_ready_while_running_and_503_once_shutting_down():
    """Readiness next to liveness: a kernel alone is ready while it runs; its shutdown
    makes it not ready (as /healthz unhealthy), said in one line, and ``nexus_ready``."""
    async with open_test_kernel(with_metrics(cache_ms=0)) as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)
        assert (await get(port, "/readyz"))[::2] == (200, b"ready\n")
        status, headers, body = await http(port, b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, headers["content-length"], body) == (200, "6", b"")
        assert samples((await get(port, "/metrics"))[2].decode())[("nexus_ready", ())] == 1
        await kernel.shutdown()
        assert (await get(port, "/readyz"))[::2] == (503, b"shutting down\n")
        assert samples((await get(port, "/metrics"))[2].decode())[("nexus_ready", ())] == 0
        nursery.cancel_scope.cancel()


async def test_readyz_says_the_reasons_of_the_checks_added_in_one_line_until_removed(caplog):
    """Code beside the kernel (a cluster, ``nexus run``) takes it out of rotation with
    ``add_readiness``: each reason once, in order, in one line; liveness is untouched."""
    state = {"joined": False}

    def cluster_check() -> str | None:
        return None if state["joined"] else "not joined"

    def starting() -> str | None:
        return "starting"

    async with open_test_kernel(with_metrics(cache_ms=0)) as kernel, trio.open_nursery() as n:
        port = await n.start(serve_metrics, kernel, "127.0.0.1", 0)
        add_readiness(kernel, starting)
        add_readiness(kernel, cluster_check)
        add_readiness(kernel, lambda: "starting")  # (the same reason: said once)
        assert (await get(port, "/readyz"))[::2] == (503, b"starting; not joined\n")
        assert (await get(port, "/healthz"))[::2] == (200, b"ok\n")  # alive all along
        assert samples((await get(port, "/metrics"))[2].decode())[("nexus_ready", ())] == 0
        with pytest.raises(ValueError, match="already added"):
            add_readiness(kernel, starting)
        with pytest.raises(TypeError, match="must be callable, got 'ready'"):
            add_readiness(kernel, "ready")  # type: ignore[arg-type]
        remove_readiness(kernel, starting)
        remove_readiness(kernel, starting)  # (not added any more: left alone)
        state["joined"] = True
        assert readiness(kernel) == "starting"  # the lambda's
        n.cancel_scope.cancel()
    async with open_test_kernel() as kernel:
        assert readiness(kernel) is None  # (checks are the kernel's own: not this one's)
        # A reason over lines is kept to one (escaped); a check that raises or answers
        # something else makes the kernel not ready, naming it, and is logged.
        add_readiness(kernel, lambda: "nats connection\ndown")

        def broken() -> str | None:
            raise RuntimeError("bug")

        def wrong() -> str | None:
            return 0  # type: ignore[return-value]

        add_readiness(kernel, broken)
        add_readiness(kernel, wrong)
        with caplog.at_level(logging.ERROR, logger="nexus_trio.metrics"):
            said = readiness(kernel)
        assert said == (
            "nats connection\\ndown"
            "; readiness check test_readyz_says_the_reasons_of_the_checks_added_in_one_line"
            "_until_removed.<locals>.broken raised RuntimeError"
            "; readiness check test_readyz_says_the_reasons_of_the_checks_added_in_one_line"
            "_until_removed.<locals>.wrong returned a int, not a str or None"
        )
        assert len([r for r in caplog.records if "readiness check" in r.getMessage()]) == 2
        await kernel.shutdown()
        assert readiness(kernel) is not None and readiness(kernel).startswith("shutting down; ")


class _ReprFails:
    def __repr__(self) -> str:
        raise RuntimeError("repr bug")


class _CheckWithoutName:
    """A readiness check object (no ``__qualname__``) that raises and cannot be shown."""

    def __call__(self) -> str | None:
        raise ValueError("check bug")

    def __repr__(self) -> str:
        raise RuntimeError("repr bug")


async def test_a_readiness_check_that_cannot_be_shown_makes_the_kernel_not_ready_not_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression (fifty-first pass): a check returning a value whose ``repr`` raises (or a
    check object whose own ``repr`` raises) made ``readiness()`` raise the ``repr``'s
    error: ``/readyz`` answered 500 and every ``/metrics`` scrape failed whole (its
    snapshot asks readiness). Such a check makes the kernel not ready, as any failing
    one, its value or name shown as ``error_repr`` shows it (``<_ReprFails, whose repr()
    raised RuntimeError: repr bug>``)."""

    def odd() -> str | None:
        return _ReprFails()  # type: ignore[return-value]

    async with open_test_kernel() as kernel:
        add_readiness(kernel, odd)
        add_readiness(kernel, _CheckWithoutName())
        with caplog.at_level(logging.ERROR, logger="nexus_trio.metrics"):
            reason = readiness(kernel)
        name = "test_a_readiness_check_that_cannot_be_shown_makes_the_kernel_not_ready_not_a_500"
        assert reason == (
            f"readiness check {name}.<locals>.odd returned a _ReprFails, not a str or None;"
            " readiness check <_CheckWithoutName, whose repr() raised RuntimeError: repr bug>"
            " raised ValueError"
        )
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        assert samples((await renderer.render()).decode())[("nexus_ready", ())] == 0
    said = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert len(said) == 2
    assert said[0].startswith("readiness check <function ")
    assert said[0].endswith(" returned <_ReprFails, whose repr() raised RuntimeError: repr bug>")
    assert said[1] == (
        "readiness check <_CheckWithoutName, whose repr() raised RuntimeError: repr bug> raised"
    )


class _CheckOfLookups:
    """A check object whose attributes are looked up in a dict it holds (``__getattr__``
    raising ``KeyError``, not ``AttributeError``), or whose ``__qualname__`` is no str."""

    def __init__(self, fields: dict[str, object]) -> None:
        self.fields = fields

    def __getattr__(self, name: str) -> object:
        return self.fields[name]

    def __repr__(self) -> str:
        return "<check of lookups>"

    def __call__(self) -> str | None:
        raise RuntimeError("down")


async def test_a_failing_readiness_check_whose_name_cannot_be_read_makes_the_kernel_not_ready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review of the fifty-first pass: a failing check is named by its ``__qualname__``,
    read with ``getattr(check, "__qualname__", None)``, which lets every exception but
    ``AttributeError`` through: a check object whose ``__getattr__`` raises ``KeyError``
    (attributes looked up in a dict) made ``readiness()`` raise it, so ``/readyz``
    answered 500 and every ``/metrics`` scrape failed whole; one whose ``__qualname__``
    is no str made it raise ``TypeError``. Such a check is named by its ``repr`` (as
    ``error_repr`` shows it) and makes the kernel not ready, as any failing one. (Fails
    with main's metrics.py: ``KeyError: '__qualname__'`` out of ``readiness()``.)"""
    async with open_test_kernel() as kernel:
        add_readiness(kernel, _CheckOfLookups({}))
        add_readiness(kernel, _CheckOfLookups({"__qualname__": 7}))
        with caplog.at_level(logging.ERROR, logger="nexus_trio.metrics"):
            reason = readiness(kernel)
        assert reason == "readiness check <check of lookups> raised RuntimeError"
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        assert samples((await renderer.render()).decode())[("nexus_ready", ())] == 0
    said = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert said == ["readiness check <check of lookups> raised"] * 2


async def test_a_failing_readiness_check_is_logged_as_its_error_changes_not_at_every_probe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: a check that raised (or returned what is no reason) was logged, with its
    traceback, at every call: at every probe, every few seconds, while it failed. Logged
    now as it starts failing and as its error changes; its end once, with the failed calls
    in a row; each call still makes the kernel not ready, naming the check."""
    errors: list[Exception | None] = [RuntimeError("bug")]

    def flaky() -> str | None:
        if errors[0] is not None:
            raise errors[0]
        return None

    async with open_test_kernel() as kernel:
        add_readiness(kernel, flaky)
        with caplog.at_level(logging.INFO, logger="nexus_trio.metrics"):
            said = [readiness(kernel) for _ in range(5)]
            errors[0] = ValueError("other")
            said += [readiness(kernel) for _ in range(3)]
            errors[0] = None
            said += [readiness(kernel) for _ in range(2)]
            errors[0] = RuntimeError("bug")
            said.append(readiness(kernel))
            remove_readiness(kernel, flaky)
            add_readiness(kernel, flaky)  # (taken out and back: its failure said anew)
            said.append(readiness(kernel))
    name = "readiness check test_a_failing_readiness_check_is_logged_as_its_error_changes"
    raised = f"{name}_not_at_every_probe.<locals>.flaky raised"
    assert said == (
        [f"{raised} RuntimeError"] * 5
        + [f"{raised} ValueError"] * 3
        + [None, None, f"{raised} RuntimeError", f"{raised} RuntimeError"]
    )
    lines = [
        (
            r.levelname,
            re.sub(r"<function \S+ at 0x[0-9a-f]+>", "flaky", r.getMessage()).split(" (")[0],
            r.exc_info is not None,
        )
        for r in caplog.records
        if "readiness check" in r.getMessage()
    ]
    assert lines == [
        ("ERROR", "readiness check flaky raised", True),
        ("ERROR", "readiness check flaky raised", True),
        ("INFO", "readiness check flaky works again after 8 failed calls in a row", False),
        ("ERROR", "readiness check flaky raised", True),
        ("ERROR", "readiness check flaky raised", True),
    ]
    counts = [r.getMessage().rsplit(": ", 1)[1] for r in caplog.records if r.levelname == "ERROR"]
    assert counts == ["1)", "6)", "1)", "1)"]
    # What is kept of a failing check goes with its kernel (ids are reused). (A check that
    # answers no str here: a traceback logged would hold the kernel for the report.)
    async with open_test_kernel() as kernel:
        add_readiness(kernel, lambda: 0)  # type: ignore[arg-type,return-value]
        assert readiness(kernel) is not None
        kernel_id = id(kernel)
    assert [key[0] for key in metrics._failing].count(kernel_id) == 1
    del kernel
    gc.collect()
    assert [key[0] for key in metrics._failing].count(kernel_id) == 0


#: hostile and odd requests, ``{}`` the path: /readyz must answer each as /healthz does
#: (one parser and one set of rules for both)
_HOSTILE = [
    b"POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"GET {} HTTP/2.0\r\nHost: x\r\n\r\n",
    b"GET {} HTTP/1.x\r\nHost: x\r\n\r\n",
    b"GET {} HTTP/1.1\r\n\r\n",  # no Host
    b"GET {} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET {} HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET {} HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET {} HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET {} HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n",
    b"GET {} HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
    b"HEAD {} HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET {}?probe=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://example.com{} HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://[::1{} HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\r\n\nGET {} HTTP/1.1\nHost: x\n\n",
    b"GET {} HTTP/1.0\r\n\r\n",
    b"GET {}/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET\t{}\tHTTP/1.1\r\nHost: x\r\n\r\n",
    b"get {} HTTP/1.1\r\nHost: x\r\n\r\n",
]


async def test_readyz_answers_hostile_requests_by_the_rules_of_healthz():
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)
        for request in _HOSTILE:
            ready = await http(port, request.replace(b"{}", b"/readyz"))
            alive = await http(port, request.replace(b"{}", b"/healthz"))
            assert ready[0] == alive[0], request
            if ready[0] == 200:
                assert ready[2] == (b"" if request.startswith(b"HEAD") else b"ready\n")
            else:
                assert ready[2] == alive[2], request  # the same refusal, word for word
        nursery.cancel_scope.cancel()


async def test_unknown_paths_methods_and_garbage_get_http_errors_and_the_server_goes_on():
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)
        assert (await get(port, "/nope"))[0] == 404
        post = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        status, headers, _ = await http(port, post)
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        assert (await http(port, b"hello\r\n\r\n"))[0] == 400
        status, headers, body = await http(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body) == (200, b"")
        assert headers["content-length"] == "3"
        assert (await get(port, "/metrics?x=1"))[0] == 200
        assert (await http(port, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n"))[0] == 431
        assert (await get(port, "/healthz"))[0] == 200
        nursery.cancel_scope.cancel()


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return set(samples(text))


async def test_by_default_a_scrape_has_no_per_agent_series_and_its_size_does_not_grow_with_agents():
    bodies = {}
    for n in (100, 10_000):
        async with open_test_kernel() as kernel:
            for _ in range(n):
                kernel.spawn(idle)
            await trio.testing.wait_all_tasks_blocked()
            renderer = MetricsRenderer.for_kernel(kernel)
            renderer.process = False  # process_* values (RSS, CPU) differ between the runs
            bodies[n] = (await renderer.render()).decode()
            values = samples(bodies[n])
            assert values[("nexus_agents_alive", ())] == n
            assert values[("nexus_agent_series_exported", ())] == 0
            assert values[("nexus_agent_series_truncated", ())] == 0
            assert not [
                name
                for name, _ in values
                if name.startswith("nexus_agent_") and "series" not in name
            ]
    assert series(bodies[100]) == series(bodies[10_000])
    # Only the digits of the counters differ (100 -> 10000 in agents_alive).
    assert abs(len(bodies[10_000]) - len(bodies[100])) < 50, (len(bodies[100]), len(bodies[10_000]))


async def test_per_agent_series_are_opt_in_and_capped_to_the_deepest_mailboxes():
    async with open_test_kernel(with_metrics(per_agent=True, per_agent_limit=3)) as kernel:
        refs = [kernel.spawn(idle, name=f"a{i}") for i in range(10)]
        await trio.testing.wait_all_tasks_blocked()
        # send_nowait enqueues without yielding, and render() snapshots before its first
        # checkpoint: the depths are those below.
        for depth, ref in zip((0, 5, 1, 0, 7, 2, 0, 3, 0, 0), refs, strict=True):
            for _ in range(depth):
                kernel.send_nowait(ref, "x")
        renderer = MetricsRenderer.for_kernel(kernel)
        values = samples((await renderer.render()).decode())
        depths = {
            dict(labels)["agent_name"]: value
            for (name, labels), value in values.items()
            if name == "nexus_agent_mailbox_depth"
        }
        assert depths == {"a4": 7, "a1": 5, "a7": 3}
        assert values[("nexus_agent_series_exported", ())] == 3
        assert values[("nexus_agent_series_truncated", ())] == 1
        assert values[("nexus_agents_alive", ())] == 10


async def test_an_agent_name_with_a_lone_surrogate_does_not_fail_the_scrape():
    """Regression: a name holding a lone surrogate (``"\\udc80"``, what a non-UTF-8 byte
    of a file name or argument decodes to) was taken by spawn, and every per-agent
    scrape then failed with 500 (UnicodeEncodeError: no UTF-8 text holds it). Such a name
    is refused at spawn now (it is no UTF-8 text), so no scrape meets it; the other
    agents' labels (quotes, backslashes, newlines: escaped by the text format) are as
    they were, and the scrape still answers 200 after the refusal. (A name with a newline
    is refused at spawn since the thirty-fifth pass: a control character.)"""
    names = ['q"uote', "back\\slash"]
    async with (
        open_test_kernel(with_metrics(per_agent=True)) as kernel,
        trio.open_nursery() as nursery,
    ):
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)
        with pytest.raises(ValueError, match="UTF-8"):
            kernel.spawn(idle, name="bad\udc80name")
        with pytest.raises(ValueError, match="control character"):
            kernel.spawn(idle, name="new\nline")
        refs = [kernel.spawn(idle, name=name) for name in names]
        kernel.send_nowait(refs[0], "x")
        await trio.testing.wait_all_tasks_blocked()
        status, _, body = await get(port, "/metrics")
        assert status == 200, body
        handled = {
            dict(labels)["agent_name"]: value
            for (name, labels), value in samples(body.decode("utf-8")).items()
            if name == "nexus_agent_handled_total"
        }
        assert handled == {'q"uote': 1, "back\\slash": 0}
        nursery.cancel_scope.cancel()


async def test_per_agent_series_within_the_limit_are_all_there_and_not_truncated():
    async with open_test_kernel() as kernel:
        kernel.spawn(echo)
        kernel.spawn(boom)
        snapshot = take_snapshot(kernel, per_agent=True, per_agent_limit=2)
        assert {a.name for a in snapshot.agents} == {"echo", "boom"}
        assert snapshot.agents_left_out == 0
        text = render_snapshot(snapshot, process=False).decode()
        assert samples(text)[("nexus_agent_series_truncated", ())] == 0
        assert "nexus_agent_handled_total" in text
        from prometheus_client import generate_latest

        off = generate_latest(build_registry(kernel, process=False)).decode()
        assert "nexus_agent_handled_total" not in off
        on = generate_latest(build_registry(kernel, per_agent=True, process=False)).decode()
        assert "nexus_agent_handled_total" in on


async def test_the_per_agent_limit_is_the_config_key_unless_one_is_given():
    """Regression: ``take_snapshot``, ``take_snapshot_in_steps``, ``KernelCollector``,
    ``build_registry`` and ``MetricsRenderer`` kept 1,000 agents by default, a copy of
    the config's default: a kernel configured with another ``[metrics] per_agent_limit``
    was exported with 1,000 unless each was given the limit. By default they take the
    kernel's now; a limit given still wins."""
    from prometheus_client import generate_latest

    from nexus_trio.metrics import take_snapshot_in_steps

    async with open_test_kernel(with_metrics(per_agent_limit=2)) as kernel:
        for i in range(5):
            kernel.spawn(idle, name=f"a{i}")
        await trio.testing.wait_all_tasks_blocked()

        def exported(text: bytes) -> float:
            return samples(text.decode())[("nexus_agent_series_exported", ())]

        for given, limit in (({}, 2), ({"per_agent_limit": 3}, 3)):
            assert take_snapshot(kernel, per_agent=True, **given).per_agent_limit == limit
            assert len(take_snapshot(kernel, per_agent=True, **given).agents) == limit
            in_steps = await take_snapshot_in_steps(kernel, per_agent=True, **given)
            assert (in_steps.per_agent_limit, len(in_steps.agents)) == (limit, limit)
            assert KernelCollector(kernel, per_agent=True, **given).per_agent_limit == limit
            registry = build_registry(kernel, per_agent=True, process=False, **given)
            assert exported(generate_latest(registry)) == limit
            renderer = MetricsRenderer(kernel, per_agent=True, process=False, **given)
            assert renderer.per_agent_limit == limit
            assert exported(await renderer.render()) == limit


async def test_a_plain_renderer_takes_per_agent_and_cache_ms_from_the_config():
    """Regression: ``MetricsRenderer(kernel)`` had defaults of its own for ``per_agent``
    (False) and ``cache_seconds`` (1.0), copies of the config's: a kernel configured with
    ``[metrics] per_agent = true`` or another ``cache_ms`` got neither unless each was
    given again (only ``for_kernel`` read them). The config is the one source now; a value
    given still wins."""
    config = with_metrics(per_agent=True, per_agent_limit=2, cache_ms=250)
    async with open_test_kernel(config) as kernel:
        for i in range(3):
            kernel.spawn(idle, name=f"a{i}")
        await trio.testing.wait_all_tasks_blocked()
        plain = MetricsRenderer(kernel, process=False)
        assert (plain.per_agent, plain.per_agent_limit, plain.cache_seconds) == (True, 2, 0.25)
        exported = samples((await plain.render()).decode())
        assert exported[("nexus_agent_series_exported", ())] == 2
        from_config = MetricsRenderer.for_kernel(kernel)
        assert (from_config.per_agent, from_config.cache_seconds) == (True, 0.25)
        given = MetricsRenderer(kernel, per_agent=False, cache_seconds=0, process=False)
        assert (given.per_agent, given.cache_seconds) == (False, 0)
        assert samples((await given.render()).decode())[("nexus_agent_series_exported", ())] == 0
    async with open_test_kernel() as kernel:  # the config's defaults
        plain = MetricsRenderer(kernel)
        assert (plain.per_agent, plain.per_agent_limit, plain.cache_seconds) == (False, 1000, 1.0)


async def test_every_metrics_entry_point_takes_per_agent_from_the_config_unless_given():
    """Regression: ``take_snapshot``, ``take_snapshot_in_steps``, ``KernelCollector`` and
    ``build_registry`` had ``per_agent=False`` of their own while ``MetricsRenderer`` read
    ``[metrics] per_agent``: a kernel configured with ``per_agent = true`` exported no
    per-agent series through them unless each was told again. The config is the one
    default now; a value given still wins, and a value that is not a bool is refused."""
    from prometheus_client import generate_latest

    from nexus_trio.metrics import take_snapshot_in_steps

    async with open_test_kernel(with_metrics(per_agent=True, per_agent_limit=2)) as kernel:
        for i in range(3):
            kernel.spawn(idle, name=f"a{i}")
        await trio.testing.wait_all_tasks_blocked()

        def exported(text: bytes) -> float:
            return samples(text.decode())[("nexus_agent_series_exported", ())]

        for given, on, count in (({}, True, 2), ({"per_agent": False}, False, 0)):
            snapshot = take_snapshot(kernel, **given)
            assert (snapshot.per_agent, len(snapshot.agents)) == (on, count)
            in_steps = await take_snapshot_in_steps(kernel, **given)
            assert (in_steps.per_agent, len(in_steps.agents)) == (on, count)
            assert KernelCollector(kernel, **given).per_agent is on
            assert (
                exported(generate_latest(build_registry(kernel, process=False, **given))) == count
            )
            renderer = MetricsRenderer(kernel, process=False, **given)
            assert renderer.per_agent is on
            assert exported(await renderer.render()) == count
        for make in (
            lambda: take_snapshot(kernel, per_agent="yes"),  # type: ignore[arg-type]
            lambda: KernelCollector(kernel, per_agent=1),  # type: ignore[arg-type]
            lambda: build_registry(kernel, per_agent="no"),  # type: ignore[arg-type]
            lambda: MetricsRenderer(kernel, per_agent="no"),  # type: ignore[arg-type]
        ):
            with pytest.raises(TypeError, match="per_agent must be True or False"):
                make()
    async with open_test_kernel() as kernel:  # the config's default: off
        assert take_snapshot(kernel).per_agent is False
        assert KernelCollector(kernel).per_agent is False


async def test_concurrent_scrapes_share_one_render_made_on_the_loop_in_pieces():
    async with open_test_kernel() as kernel:
        renderer = MetricsRenderer(kernel, per_agent=True, cache_seconds=0, process=False)
        real = renderer._pieces
        made: list[str] = []

        def pieces(snapshot):
            # Each piece is made in the scraping task, on the loop: no worker thread.
            made.append(threading.current_thread().name)
            yield from real(snapshot)

        renderer._pieces = pieces  # type: ignore[method-assign]
        bodies: list[bytes] = []

        async def scrape() -> None:
            bodies.append(await renderer.render())

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(scrape)
        assert renderer.renders == 1
        assert made == [threading.current_thread().name]
        assert len(bodies) == 20 and len(set(bodies)) == 1
        assert b"nexus_agents_alive" in bodies[0]
        # With cache_seconds=0 the next scrape renders again.
        await renderer.render()
        assert renderer.renders == 2


async def test_a_large_per_agent_render_lets_the_agents_run_between_its_pieces():
    async with open_test_kernel() as kernel:
        refs = [kernel.spawn(unnamed) for _ in range(1200)]
        renderer = MetricsRenderer(
            kernel, per_agent=True, per_agent_limit=2000, cache_seconds=0, process=False
        )
        ticks = 0
        rendering = True

        async def other_work() -> None:
            nonlocal ticks
            while rendering:
                ticks += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_work)
            await trio.lowlevel.checkpoint()
            start = ticks
            body = await renderer.render()
            during = ticks - start
            rendering = False
        # 9 per-agent families of 1,200 samples: three pieces each, a checkpoint after
        # every piece (and after each small family), so the other task ran many times.
        assert during >= 27
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        for name in ("nexus_agent_handled", "nexus_agent_mailbox_depth"):
            assert len(families[name].samples) == 1200
            assert body.count(f"# HELP {name}".encode()) == 1
            assert body.count(f"# TYPE {name}".encode()) == 1
        ids = {s.labels["agent_id"] for s in families["nexus_agent_received"].samples}
        assert ids == {str(ref.id) for ref in refs}
        # The whole text in one go (any thread) is the same bytes.
        assert (
            render_snapshot(
                take_snapshot(kernel, per_agent=True, per_agent_limit=2000), process=False
            )
            == body
        )


async def test_a_per_agent_render_makes_no_more_than_a_piece_of_samples_between_checkpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: the per-agent families were built whole, all agents at once, before
    the first of them was cut into pieces: 9 samples per agent in one go (1,000 agents,
    the default limit: 9,000 samples, some 36 ms without a checkpoint; more with a higher
    limit). Each piece now makes at most ``_PIECE_SAMPLES`` samples."""
    from prometheus_client import metrics_core
    from prometheus_client.samples import Sample

    from nexus_trio import metrics

    made = 0

    def counted(*args: object, **kwargs: object) -> Sample:
        nonlocal made
        made += 1
        return Sample(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(metrics_core, "Sample", counted)
    async with open_test_kernel() as kernel:
        for _ in range(1200):
            kernel.spawn(unnamed)
        renderer = MetricsRenderer(
            kernel, per_agent=True, per_agent_limit=2000, cache_seconds=0, process=False
        )
        real = renderer._pieces
        per_piece: list[int] = []

        def pieces(snapshot):
            # the samples made for each piece, between two checkpoints of the render
            nonlocal made
            for piece in real(snapshot):
                per_piece.append(made)
                made = 0
                yield piece

        renderer._pieces = pieces  # type: ignore[method-assign]
        made = 0
        body = await renderer.render()
    assert sum(per_piece) >= 9 * 1200
    assert max(per_piece) <= metrics._PIECE_SAMPLES
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert len(families["nexus_agent_mailbox_capacity"].samples) == 1200


async def test_a_render_is_reused_within_cache_seconds(mock_clock):
    async with open_test_kernel() as kernel:
        renderer = MetricsRenderer(kernel, cache_seconds=1.0, process=False)
        first = await renderer.render()
        kernel.spawn(echo)
        mock_clock.jump(0.5)
        assert await renderer.render() == first
        assert renderer.renders == 1
        mock_clock.jump(0.6)
        again = await renderer.render()
        assert renderer.renders == 2
        assert samples(again.decode())[("nexus_agents_alive", ())] == 1


async def test_a_failed_render_fails_its_waiters_and_the_next_scrape_renders_again():
    async with open_test_kernel() as kernel:
        renderer = MetricsRenderer(kernel, per_agent=True, cache_seconds=0, process=False)
        real = renderer._pieces

        def failing(snapshot):
            yield b"# a first piece\n"
            raise OSError("disk on fire")

        renderer._pieces = failing  # type: ignore[method-assign]
        errors: list[BaseException] = []

        async def scrape() -> None:
            try:
                await renderer.render()
            except Exception as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(scrape)
        assert sorted(type(e).__name__ for e in errors) == [
            "OSError",
            "RuntimeError",
            "RuntimeError",
        ]
        renderer._pieces = real  # type: ignore[method-assign]
        assert b"nexus_agents_alive" in await renderer.render()


async def test_when_the_rendering_scrape_is_cancelled_a_waiting_scrape_renders_anew():
    async with open_test_kernel() as kernel:
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        real = renderer._pieces
        renders_started = 0
        first_scope = trio.CancelScope()

        def pieces(snapshot):
            nonlocal renders_started
            renders_started += 1
            for n, piece in enumerate(real(snapshot)):
                if renders_started == 1 and n == 5:
                    # The first render's scrape gives up (its client went) at a checkpoint
                    # between pieces: by now the other two scrapes wait for this render.
                    assert waiting == 2
                    first_scope.cancel()
                yield piece

        renderer._pieces = pieces  # type: ignore[method-assign]
        bodies: list[bytes] = []
        waiting = 0

        async def scrape() -> None:
            nonlocal waiting
            waiting += 1
            bodies.append(await renderer.render())

        async def given_up_scrape() -> None:
            with first_scope:
                await renderer.render()
                raise AssertionError("not cancelled")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(given_up_scrape)
            while not renders_started:  # until its render has begun
                await trio.lowlevel.checkpoint()
            nursery.start_soon(scrape)
            nursery.start_soon(scrape)
        assert first_scope.cancelled_caught
        assert len(bodies) == 2 and bodies[0] == bodies[1]
        assert b"nexus_agents_alive" in bodies[0]
        # the given-up render was not counted; one of the waiters rendered for both
        assert renders_started == 2 and renderer.renders == 1


async def exchanged(
    handle: Callable[[trio.abc.Stream], Awaitable[object]], request: bytes
) -> bytes:
    """What ``handle(stream)`` (one connection's handler) answers ``request``, whole."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle, server)
        await client.send_all(request)
        data = b""
        while chunk := await client.receive_some(65536):
            data += chunk
        await client.aclose()
    return data


async def test_a_request_whose_render_takes_too_long_gets_503_with_the_reason(mock_clock):
    from nexus_trio import metrics

    mock_clock.autojump_threshold = 0
    async with open_test_kernel() as kernel:
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        stuck = trio.Event()

        async def never() -> bytes:
            await stuck.wait()
            return b""

        renderer.render = never  # type: ignore[method-assign]
        data = await exchanged(
            functools.partial(metrics._handle_connection, kernel=kernel, renderer=renderer),
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        assert data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert data.endswith(b"\r\n\r\nno answer within 10 s (the kernel is busy)\n")
        assert trio.current_time() >= 10


@pytest.mark.parametrize("error", [RuntimeError("no snapshot"), OSError("disk on fire")])
async def test_a_request_whose_render_fails_gets_500_and_the_failure_is_logged(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: a render that raised (or a scrape that waited for one that did) left
    the client with a connection closed without an answer, and an ``OSError`` from the
    render was taken for the client going away: not even logged."""
    from nexus_trio import metrics

    async with open_test_kernel() as kernel:
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)

        async def failing() -> bytes:
            await trio.lowlevel.checkpoint()
            raise error

        renderer.render = failing  # type: ignore[method-assign]
        for method in ("GET", "HEAD"):
            data = await exchanged(
                functools.partial(metrics._handle_connection, kernel=kernel, renderer=renderer),
                f"{method} /metrics HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            )
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
            expected = f"the metrics render failed: {type(error).__name__}\n".encode()
            assert f"Content-Length: {len(expected)}".encode() in head
            assert body == (expected if method == "GET" else b"")
    failures = [r for r in caplog.records if r.name == "nexus_trio.metrics" and r.exc_info]
    assert [r.exc_info[1] for r in failures] == [error, error]


async def test_a_scraper_hammering_a_broken_render_writes_a_line_a_second_and_counts_all(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 4 of the forty-fourth pass: the endpoint's per-request lines were written one a
    request (a line and a traceback per failed render): a scraper hammering a broken
    render flooded the log. Now each is logged at once, then at most once a second with
    its count so far; the requests are counted (``nexus_metrics_render_failures_total``)
    and the lines held back too (``endpoint.render_failure``)."""
    from nexus_trio import metrics

    async with open_test_kernel() as kernel:
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        renderer.endpoint = EndpointStats()
        lines = metrics._RequestLines()  # the endpoint's, as serve_routes makes them

        async def failing() -> bytes:
            await trio.lowlevel.checkpoint()
            raise RuntimeError("broken")

        renderer.render = failing  # type: ignore[method-assign]
        handle = functools.partial(
            metrics._handle_connection, kernel=kernel, renderer=renderer, lines=lines
        )
        before = log_lines_dropped().get("endpoint.render_failure", 0)
        for _second in range(3):
            for _ in range(50):
                data = await exchanged(handle, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                assert data.startswith(b"HTTP/1.1 500 ")
            mock_clock.jump(1.0)
        text = (await MetricsRenderer(kernel, cache_seconds=0, process=False).render()).decode()
    said = [r.getMessage() for r in caplog.records if r.name == "nexus_trio.metrics" and r.exc_info]
    assert said == [
        f"metrics request GET /metrics failed (render failures so far: {n}; at most a line a"
        " second)"
        for n in (1, 51, 101)
    ]
    assert renderer.endpoint.render_failures == 150
    assert log_lines_dropped()["endpoint.render_failure"] - before == 147
    assert "endpoint.render_failure" in text  # (the kernel's scrape: the kind's count)


async def test_requests_unanswered_in_a_burst_write_one_line_and_count_all(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    from nexus_trio import metrics

    mock_clock.autojump_threshold = 0
    async with open_test_kernel() as kernel:
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        renderer.endpoint = EndpointStats()
        lines = metrics._RequestLines()
        stuck = trio.Event()

        async def never() -> bytes:
            await stuck.wait()
            return b""

        renderer.render = never  # type: ignore[method-assign]
        handle = functools.partial(
            metrics._handle_connection, kernel=kernel, renderer=renderer, lines=lines
        )
        before = log_lines_dropped().get("endpoint.unanswered", 0)
        answers: list[bytes] = []

        async def scrape() -> None:
            answers.append(await exchanged(handle, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(scrape)
    assert len(answers) == 40 and all(a.startswith(b"HTTP/1.1 503 ") for a in answers)
    said = [r.getMessage() for r in caplog.records if "no answer within" in r.getMessage()]
    assert said == [
        "metrics request GET /metrics: no answer within 10 s (requests unanswered so far: 1;"
        " at most a line a second)"
    ]
    assert renderer.endpoint.unanswered == 40
    assert log_lines_dropped()["endpoint.unanswered"] - before == 39


async def test_a_raising_log_filter_does_not_take_the_metrics_endpoint_down() -> None:
    """A filter of the application on ``nexus_trio.metrics`` that raises: a request whose
    render fails still gets its 500, and the endpoint goes on serving (its log calls
    raised out of the connection's task and ended the endpoint, and ``nexus run`` with
    it)."""

    class Broken(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise KeyError("the filter's bug")

    logger = logging.getLogger("nexus_trio.metrics")
    broken = Broken()
    logger.addFilter(broken)
    try:
        async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
            renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)

            async def failing() -> bytes:
                await trio.lowlevel.checkpoint()
                raise RuntimeError("render failed")

            renderer.render = failing  # type: ignore[method-assign]
            port = await nursery.start(
                lambda task_status: serve_metrics(
                    kernel, "127.0.0.1", 0, renderer=renderer, task_status=task_status
                )
            )
            for _ in range(2):
                status, _headers, body = await http(
                    port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                )
                assert (status, body) == (500, b"the metrics render failed: RuntimeError\n")
            assert (await http(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))[::2] == (
                200,
                b"ok\n",
            )
            nursery.cancel_scope.cancel()
    finally:
        logger.removeFilter(broken)


async def test_twenty_concurrent_http_scrapes_cost_one_render():
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        for _ in range(50):
            kernel.spawn(idle)
        renderer = MetricsRenderer(kernel, cache_seconds=3600)
        port = await nursery.start(
            lambda task_status: serve_metrics(
                kernel, "127.0.0.1", 0, renderer=renderer, task_status=task_status
            )
        )
        results: list[tuple[int, bytes]] = []

        async def scrape() -> None:
            status, _, body = await get(port, "/metrics")
            results.append((status, body))

        async with trio.open_nursery() as clients:
            for _ in range(20):
                clients.start_soon(scrape)
        assert [status for status, _ in results] == [200] * 20
        assert len({body for _, body in results}) == 1
        assert renderer.renders == 1
        nursery.cancel_scope.cancel()


def test_bad_arguments_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="per_agent_limit must be >= 1, got 0"):
        KernelCollector(None, per_agent_limit=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache_seconds must be >= 0, got -1"):
        MetricsRenderer(None, cache_seconds=-1)  # type: ignore[arg-type]


async def test_serve_metrics_refuses_a_port_out_of_range():
    async with open_test_kernel() as kernel:
        with pytest.raises(ValueError, match=r"metrics port must be within 0\.\.65535, got 70000"):
            await serve_metrics(kernel, "127.0.0.1", 70000)
        with pytest.raises(ValueError, match="max_connections must be >= 1, got 0"):
            await serve_metrics(kernel, "127.0.0.1", 0, max_connections=0)


async def test_run_failures_outside_a_handler_are_a_counter_kernel_wide_and_per_agent() -> None:
    starts = 0

    class StartsBadly(Agent):
        async def on_start(self, ctx: Context) -> None:
            nonlocal starts
            starts += 1
            if starts == 1:
                raise RuntimeError("on_start fails once")

    async with open_test_kernel() as kernel:
        ref = kernel.spawn(agent(StartsBadly, name="starts-badly"))
        boom_ref = kernel.spawn(boom)
        await kernel.send(boom_ref, "x")  # a handler failure: not a run failure
        await trio.testing.wait_all_tasks_blocked()
        assert starts == 2
        stats = kernel.stats()
        assert (stats.failed, stats.run_failures) == (1, 1)
        values = samples(
            render_snapshot(take_snapshot(kernel, per_agent=True), process=False).decode()
        )
    assert values[("nexus_run_failures_total", ())] == 1
    assert values[("nexus_handler_failures_total", ())] == 1
    labels = (("agent_id", str(ref.id)), ("agent_name", "starts-badly"))
    assert values[("nexus_agent_run_failures_total", labels)] == 1
    assert values[("nexus_agent_failed_total", labels)] == 0
    boom_labels = (("agent_id", str(boom_ref.id)), ("agent_name", "boom"))
    assert values[("nexus_agent_run_failures_total", boom_labels)] == 0


async def test_log_records_lost_are_a_counter_of_the_scrape() -> None:
    import errno
    import io
    import logging

    from nexus_trio.logs import configure_logging, records_lost

    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    logger = logging.getLogger("nexus_trio")
    handlers, level = list(logger.handlers), logger.level
    configure_logging("info", stream=Full())
    try:
        async with open_test_kernel() as kernel:
            before = samples(render_snapshot(take_snapshot(kernel), process=False).decode())
            assert before[("nexus_log_records_lost_total", ())] == records_lost()
            for i in range(3):
                logging.getLogger("nexus_trio.test").warning("lost %d", i)
            after = samples(render_snapshot(take_snapshot(kernel), process=False).decode())
            lost = after[("nexus_log_records_lost_total", ())]
            assert lost - before[("nexus_log_records_lost_total", ())] == 3
            assert lost == records_lost()
    finally:
        for handler in list(logger.handlers):
            if handler not in handlers:
                logger.removeHandler(handler)
                handler.close()
        logger.setLevel(level)


async def test_log_calls_that_raised_are_a_counter_of_the_scrape() -> None:
    """A raising filter of the application on the dead-letter logger: each dead letter's
    log call raised, and ``nexus_log_calls_failed_total`` counts them (process-wide, as
    :func:`nexus_trio.logs.log_calls_failed`)."""
    import logging

    from nexus_trio.logs import log_calls_failed

    class Broken(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise KeyError("the filter's bug")

    logger = logging.getLogger("nexus_trio.dead_letters")
    broken, level = Broken(), logger.level
    logger.setLevel(logging.DEBUG)
    logger.addFilter(broken)
    try:
        async with open_test_kernel() as kernel:
            before = samples(render_snapshot(take_snapshot(kernel), process=False).decode())
            assert before[("nexus_log_calls_failed_total", ())] == log_calls_failed()
            ref = kernel.spawn(boom)
            for i in range(3):
                await kernel.send(ref, i)
            await trio.testing.wait_all_tasks_blocked()
            assert kernel.stats().dead_letters_by_reason == {"handler_error": 3}
            after = samples(render_snapshot(take_snapshot(kernel), process=False).decode())
            failed = after[("nexus_log_calls_failed_total", ())]
            assert failed - before[("nexus_log_calls_failed_total", ())] == 3
            assert failed == log_calls_failed()
    finally:
        logger.removeFilter(broken)
        logger.setLevel(level)


async def test_a_metrics_port_in_use_is_an_error_naming_the_address() -> None:
    """Regression: a metrics port in use failed with a bare ``OSError: [Errno 98] Address
    already in use`` (``nexus run`` printed just that, and a traceback): it did not say the
    metrics server could not listen, nor on which address."""
    taken = trio.socket.socket()
    await taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
            with pytest.raises(OSError, match="in use") as caught:
                await nursery.start(serve_metrics, kernel, "127.0.0.1", port)
    finally:
        taken.close()
    text = str(caught.value)
    assert f"127.0.0.1:{port}" in text
    assert "metrics" in text
    assert "in use" in text


@pytest.mark.parametrize("host", ["::1", "[::1]"])
async def test_an_ipv6_metrics_host_is_written_in_brackets_with_or_without_them(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Fifty-third pass: ``serve_metrics(kernel, "::1", P)`` logged ``metrics on
    http://::1:P/metrics`` and its error said ``cannot listen on ::1:P``, where the port
    cannot be told from the address; ``"[::1]"`` (a URL's spelling) could not listen at
    all (``Name or service not known``). Both listen on ``::1`` and write ``[::1]:P``."""
    caplog.set_level(logging.INFO, logger="nexus_trio.metrics")
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, host, 0)
        stream = await trio.open_tcp_stream("::1", port)
        await stream.aclose()
        assert f"metrics on http://[::1]:{port}/metrics" in caplog.messages
        with pytest.raises(OSError, match="in use") as caught:
            await nursery.start(serve_metrics, kernel, host, port)
        assert f"the metrics server cannot listen on [::1]:{port}: " in str(caught.value)
        nursery.cancel_scope.cancel()


async def test_accept_failing_for_lack_of_descriptors_is_counted_retried_and_logged_once_a_second(
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: with the process out of file descriptors, ``accept`` failing with
    EMFILE was logged by ``trio.serve_listeners`` with its traceback at each retry, ten
    times a second, and counted nowhere. It is now retried every 0.1 s as before, counted
    (``EndpointStats.accept_failures``, ``nexus_metrics_accept_failures_total``) and
    logged at most once a second with the count."""
    import errno
    import os

    mock_clock.autojump_threshold = 0
    attempts = 0

    async def out_of_descriptors(self: trio.SocketListener) -> trio.SocketStream:
        nonlocal attempts
        attempts += 1
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(trio.SocketListener, "accept", out_of_descriptors)
    async with open_test_kernel() as kernel:
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve_metrics(
                    kernel, "127.0.0.1", 0, renderer=renderer, task_status=task_status
                )
            )
            # (a connection waits in the backlog: the endpoint accepts only then)
            with socket.create_connection(("127.0.0.1", port)):
                await trio.sleep(4.95)  # mock time: retries at 0.0, 0.1, ..., 4.9
            nursery.cancel_scope.cancel()
        values = samples((await renderer.render()).decode())
    assert attempts == 50  # every 0.1 s, not in a spin
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in logged] == ["nexus_trio.metrics"] * 5  # at 0, 1, 2, 3 and 4 s
    assert [r.exc_info for r in logged] == [None] * 5  # no traceback
    assert "cannot accept a connection: [Errno 24] Too many open files" in logged[0].getMessage()
    counts = [int(re.findall(r"failures so far: (\d+)", r.getMessage())[0]) for r in logged]
    assert counts[0] == 1
    # a second between two lines: 10 retries (11 where the float sum of the 0.1 s sleeps
    # falls a hair short of the second)
    assert all(b - a in (10, 11) for a, b in itertools.pairwise(counts))
    assert renderer.endpoint is not None
    assert renderer.endpoint.accept_failures == attempts
    assert values[("nexus_metrics_accept_failures_total", ())] == attempts


async def test_serve_routes_names_its_server_in_every_log_line_and_error_answer(
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: ``serve_routes(..., what="group metrics")`` (``nexus run --workers``'
    group endpoint) said "the metrics endpoint cannot accept a connection", "metrics
    request GET /readyz failed" and answered "the metrics render failed" in the parent's
    log, beside its workers' own metrics endpoints: ``what`` named the server in its
    listen line and its listen error only, not in the lines its docstring promised."""
    import errno
    import os

    mock_clock.autojump_threshold = 0

    async def out_of_descriptors(self: trio.SocketListener) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async def broken(path: str) -> tuple[int, bytes, str]:
        raise RuntimeError(f"no answer for {path}")

    with monkeypatch.context() as patched:
        patched.setattr(trio.SocketListener, "accept", out_of_descriptors)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                functools.partial(serve_routes, what="group metrics"), broken, "127.0.0.1", 0
            )
            # (a connection waits in the backlog: the endpoint accepts only then)
            with socket.create_connection(("127.0.0.1", port)):
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    data = await exchanged(
        functools.partial(
            metrics._answer_connection, route=broken, endpoint=None, what="group metrics"
        ),
        b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 500 ")
    assert data.endswith(b"\r\n\r\nthe group metrics render failed: RuntimeError\n")
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert logged == [
        "the group metrics endpoint cannot accept a connection: [Errno 24] Too many open"
        " files (failures so far: 1); retrying every 0.1 s",
        "group metrics request GET /readyz failed (render failures so far: 1; at most a line a"
        " second)",
    ]


async def settle() -> None:
    """Until the server has taken what the loopback delivered (a few idle rounds)."""
    for _ in range(10):
        await trio.testing.wait_all_tasks_blocked()


def open_descriptors() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


async def test_connections_past_the_limit_wait_in_the_backlog_without_a_descriptor_each(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: the endpoint accepted every connection: each one that sent nothing (or a
    byte at a time) held a task and a file descriptor of the kernel's process for the 10 s
    a request may take, so a client opening connections in a loop could take every
    descriptor (no process agent spawned, no NATS reconnection). At most 32 are now open;
    the next ones wait in the listen backlog (the OS's, no descriptor of ours) until one
    closes, which is counted and logged at most once a second."""
    # The request timeouts never fire: the clock moves only when the test says so (it
    # jumps by itself only if the test hangs, to fail it).
    mock_clock.autojump_threshold = 5.0
    async with open_test_kernel() as kernel:
        renderer = MetricsRenderer(kernel, cache_seconds=3600, process=False)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve_metrics(
                    kernel, "127.0.0.1", 0, renderer=renderer, task_status=task_status
                )
            )
            before = open_descriptors()
            idle: list[trio.socket.SocketType] = []
            for _ in range(40):
                sock = trio.socket.socket()
                await sock.connect(("127.0.0.1", port))
                idle.append(sock)
            await settle()
            # 40 client sockets, and the server's side of 32 of them
            assert open_descriptors() - before == 40 + 32
            endpoint = renderer.endpoint
            assert endpoint is not None
            assert (endpoint.accepted, endpoint.open, endpoint.limited) == (32, 32, 1)
            # A scrape behind them waits, unanswered.
            scrape = await trio.open_tcp_stream("127.0.0.1", port)
            await scrape.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await settle()
            assert select.select([scrape.socket], [], [], 0) == ([], [], [])
            # One closes: the first waiting is accepted, and the limit is reached again
            # (counted; not logged again within the second).
            idle.pop(0).close()
            await settle()
            assert (endpoint.accepted, endpoint.open, endpoint.limited) == (33, 32, 2)
            mock_clock.jump(1.0)
            idle.pop(0).close()
            await settle()
            assert (endpoint.accepted, endpoint.open, endpoint.limited) == (34, 32, 3)
            # All the idle ones go: the scrape is answered.
            for sock in idle:
                sock.close()
            async with scrape:
                data = b""
                while chunk := await scrape.receive_some(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nok\n")
            assert endpoint.accepted == 41
            values = samples((await renderer.render()).decode())
            assert values[("nexus_metrics_connections_limited_total", ())] == 3
            nursery.cancel_scope.cancel()
    assert endpoint.open == 0
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(logged) == 2, logged
    assert "32 connections open, its limit" in logged[0]
    assert "(times at the limit so far: 1)" in logged[0]
    assert "(times at the limit so far: 3)" in logged[1]


@contextlib.asynccontextmanager
async def limited_endpoint(
    mock_clock: trio.testing.MockClock, max_connections: int
) -> AsyncIterator[tuple[int, MetricsRenderer, EndpointStats]]:
    """A test kernel's endpoint with ``max_connections``, on a clock that moves when the
    test says so: its port, its renderer and its counters (stopped as the block ends)."""
    mock_clock.autojump_threshold = 5.0
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        renderer = MetricsRenderer(kernel, cache_seconds=3600, process=False)
        port = await nursery.start(
            lambda task_status: serve_metrics(
                kernel,
                "127.0.0.1",
                0,
                renderer=renderer,
                max_connections=max_connections,
                task_status=task_status,
            )
        )
        endpoint = renderer.endpoint
        assert endpoint is not None
        yield port, renderer, endpoint
        nursery.cancel_scope.cancel()


async def connected(port: int) -> trio.socket.SocketType:
    """A plain socket connected to the endpoint on ``port`` (it sends what a test says)."""
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    return sock


async def test_at_the_limit_a_connection_without_its_request_head_after_2_s_is_shed(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Regression (slowloris): connections that sent nothing, or a byte at a time, held
    the endpoint's slots for the 10 s a request may take, and a scrape behind them waited
    in the backlog all that time (32 such sockets, reopened every 10 s, kept every
    Prometheus scrape out: its default timeout is 10 s). At the limit, the oldest
    connection whose head is not all in 2 s after it was accepted is now closed without
    an answer, counted in ``shed``; below the limit none is."""
    async with limited_endpoint(mock_clock, 2) as (port, renderer, endpoint):
        silent = await connected(port)
        await settle()
        mock_clock.jump(1.0)
        trickle = await connected(port)
        await trickle.send(b"GE")  # a byte or two at a time, never a whole head
        await settle()
        scrape = await trio.open_tcp_stream("127.0.0.1", port)
        await scrape.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle()
        assert (endpoint.accepted, endpoint.open, endpoint.shed) == (2, 2, 0)
        mock_clock.jump(0.9)  # the silent one 1.9 s old: kept
        await settle()
        assert select.select([scrape.socket, silent], [], [], 0)[0] == []
        mock_clock.jump(0.1)  # 2 s old: shed, and the scrape gets its slot
        await settle()
        assert await silent.recv(100) == b""  # closed without an answer
        async with scrape:
            data = b""
            while chunk := await scrape.receive_some(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nok\n")
        await settle()
        assert (endpoint.accepted, endpoint.shed) == (3, 1)
        # Below the limit (the trickle alone open), none is shed, however old.
        mock_clock.jump(5.0)
        await settle()
        assert (endpoint.open, endpoint.shed) == (1, 1)
        assert select.select([trickle], [], [], 0)[0] == []
        values = samples((await renderer.render()).decode())
        assert values[("nexus_metrics_connections_shed_total", ())] == 1
        silent.close()
        trickle.close()


async def test_at_the_limit_one_connection_is_shed_for_each_one_let_in(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Regression: at the limit, every connection without its head 2 s after its accept
    was shed at once, not the oldest: the shed one still held its slot as the endpoint
    looked again, so it went on to the next (shed 2 of 2 here, where one made the room).
    A slow client that had sent part of its head lost its connection for nobody. Now
    one is shed, its slot waited for, and the next only when the limit is met again."""
    async with limited_endpoint(mock_clock, 2) as (port, _, endpoint):
        silent = await connected(port)
        await settle()
        mock_clock.jump(0.5)
        slow = await connected(port)
        await slow.send(b"GET /hea")  # a slow client: part of its head
        await settle()
        mock_clock.jump(4.5)  # both over 2 s old, at the limit but none waits: both kept
        await settle()
        assert (endpoint.open, endpoint.shed) == (2, 0)
        scrape = await trio.open_tcp_stream("127.0.0.1", port)
        await scrape.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle()
        # The limit met: the oldest (the silent one) shed; the slow one kept.
        assert await silent.recv(100) == b""  # closed without an answer
        async with scrape:  # (its answer sent in one segment)
            assert (await scrape.receive_some(65536)).startswith(b"HTTP/1.1 200 OK\r\n")
        await settle()
        assert (endpoint.accepted, endpoint.shed) == (3, 1)
        assert select.select([slow], [], [], 0)[0] == []  # still open, not answered
        await slow.send(b"lthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := await slow.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert endpoint.shed == 1
        silent.close()
        slow.close()


async def test_at_a_limit_of_1_a_silent_connection_is_shed_for_the_scrape_behind_it(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Regression (slowloris at a limit of 1): the endpoint put a connection among those
    reading their head only once its task ran, and the accept loop looked as the task was
    only started: it saw no head to wait for and waited for a free slot, for good. A
    silent connection, the limit's last (the only one at ``max_connections=1``, or with
    the others' heads all in), was never shed: the scrape behind it waited the 10 s a
    request may take. Now the accept puts it there: shed 2 s after its accept."""
    async with limited_endpoint(mock_clock, 1) as (port, _, endpoint):
        silent = await connected(port)
        await settle()
        mock_clock.jump(2.5)
        await settle()
        scrape = await trio.open_tcp_stream("127.0.0.1", port)
        await scrape.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle()
        assert select.select([silent], [], [], 0)[0] == [silent]  # closed, not held
        assert await silent.recv(100) == b""  # without an answer
        async with scrape:
            assert (await scrape.receive_some(65536)).startswith(b"HTTP/1.1 200 OK\r\n")
        assert (endpoint.accepted, endpoint.shed) == (2, 1)
        silent.close()


async def test_a_head_read_whole_as_the_loop_stalls_past_2_s_is_answered_and_not_counted_shed(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Regression: the accept loop counted a shed as it cancelled the oldest head's read;
    after a stall of the loop past the 2 s, that read may have its head meanwhile (the
    cancel then cuts nothing: the request is answered), yet it was counted shed (here
    ``shed`` 1 with every connection answered or open). Now a shed is counted by the
    connection whose read the cancel cut: ``shed`` is the connections closed without an
    answer. (Which of the two woken tasks runs first is Trio's choice, about even: 12
    runs make the old count's miss near certain, 1 in 4,096 to pass.)"""
    for _ in range(12):
        async with limited_endpoint(mock_clock, 2) as (port, _, endpoint):
            with (
                socket.create_connection(("127.0.0.1", port)) as slow,
                socket.create_connection(("127.0.0.1", port)) as silent,
                socket.create_connection(("127.0.0.1", port)),  # waits: the limit is met
            ):
                slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                await settle()
                # The rest of the head comes as the loop stalls past both connections' 2 s.
                slow.sendall(b"\r\n")
                mock_clock.jump(2.5)
                await settle()
                answer = b""
                while chunk := slow.recv(65536):
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
                await settle()
                # The silent one may be shed (at the limit, over 2 s old) or kept.
                silent_shed = select.select([silent], [], [], 0)[0] == [silent]
                if silent_shed:
                    assert silent.recv(100) == b""
                assert endpoint.shed == int(silent_shed)


def listen_on_two_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint listens on 127.0.0.1 and 127.0.0.2, one port (as on a host that is
    both 127.0.0.1 and ::1): two listeners, two accept loops."""
    open_listeners = trio.open_tcp_listeners

    async def two(port: int, *, host: str | None = None) -> list[trio.SocketListener]:
        first = await open_listeners(port, host="127.0.0.1")
        return first + await open_listeners(first[0].socket.getsockname()[1], host="127.0.0.2")

    monkeypatch.setattr(trio, "open_tcp_listeners", two)


async def test_with_two_listeners_an_idle_one_holds_no_slot_of_the_limit(
    mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: each listener's accept loop took a slot of ``max_connections`` before
    it waited in accept, so with two listeners (a host that is both 127.0.0.1 and ::1,
    as ``localhost`` is on many hosts) the idle one held a slot: at a limit of 1 the
    other's connections waited for good (here the second scrape, whichever listener
    held it), and at a limit of 2 a lone connection was counted at the limit and shed.
    A slot is now taken once a connection waits."""
    listen_on_two_addresses(monkeypatch)
    async with limited_endpoint(mock_clock, 1) as (port, _, endpoint):
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port)) as scrape:
                scrape.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                await settle()
                assert select.select([scrape], [], [], 0)[0] == [scrape]  # answered
                assert scrape.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
            await settle()  # (its close seen: its slot free)
        assert (endpoint.accepted, endpoint.limited, endpoint.shed) == (2, 0, 0)


async def test_with_two_listeners_a_silent_connection_is_shed_for_one_waiting_on_the_other(
    mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: with two listeners at a limit of 1 and a connection arriving on each
    at once, the loop that met the limit while the other's accept was under way saw no
    head to shed, and waited for a free slot with no deadline: the connection let in
    sent nothing, yet none was shed at 2 s (shed 0, the other unanswered until the 10 s
    were up). One loop at a time now takes a slot and accepts: the first is shed at 2 s
    and the other let in."""
    listen_on_two_addresses(monkeypatch)
    async with limited_endpoint(mock_clock, 1) as (port, _, endpoint):
        with (
            socket.create_connection(("127.0.0.1", port)) as first,
            socket.create_connection(("127.0.0.2", port)) as second,
        ):
            await settle()
            mock_clock.jump(2.5)
            await settle()
            closed = select.select([first, second], [], [], 0)[0]
            assert len(closed) == 1  # the one let in first, shed without an answer
            assert closed[0].recv(1) == b""
            waited = second if closed[0] is first else first
            waited.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await settle()
            assert select.select([waited], [], [], 0)[0] == [waited]  # answered
            assert waited.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        assert (endpoint.accepted, endpoint.limited, endpoint.shed) == (2, 1, 1)


async def test_max_connections_is_the_config_key_unless_serve_metrics_is_given_one(
    mock_clock: trio.testing.MockClock, tmp_path: pathlib.Path
) -> None:
    """Regression: the limit of open connections was an argument of ``serve_metrics`` only,
    so ``nexus run --metrics-port`` always kept 32. By default it is now ``[metrics]
    max_connections`` of the kernel's config (what ``nexus run`` serves with); an argument
    still wins."""
    from nexus_trio.config import load_config

    mock_clock.autojump_threshold = 5.0  # as above: the request timeouts do not fire
    file = tmp_path / "config.toml"
    file.write_text("[metrics]\nmax_connections = 4\n", encoding="utf-8")
    env = {"NEXUS_METRICS__MAX_CONNECTIONS": "3"}
    config = load_config(file, env=env).config  # (as nexus run loads it: env wins)
    assert config.metrics.max_connections == 3
    for given, limit in ((None, 3), (5, 5)):
        async with open_test_kernel(config) as kernel, trio.open_nursery() as nursery:
            renderer = MetricsRenderer(kernel, process=False)
            limit_given = {} if given is None else {"max_connections": given}
            serve = functools.partial(
                serve_metrics, kernel, "127.0.0.1", 0, renderer=renderer, **limit_given
            )
            port = await nursery.start(serve)
            idle = []
            for _ in range(8):
                sock = trio.socket.socket()
                await sock.connect(("127.0.0.1", port))
                idle.append(sock)
            await settle()
            endpoint = renderer.endpoint
            assert endpoint is not None
            assert (endpoint.accepted, endpoint.open, endpoint.limited) == (limit, limit, 1)
            for sock in idle:
                sock.close()
            nursery.cancel_scope.cancel()


async def test_clients_that_do_not_read_share_one_copy_of_the_metrics_text(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Regression: each response was its head and the whole rendered text joined in a new
    bytes object, held until the client had read it: 20 clients that asked for /metrics
    and did not read made 20 copies of the text (a per-agent text is a MB per 1,000
    agents). They now share the rendered text: the head is sent on its own."""
    import tracemalloc

    mock_clock.autojump_threshold = 5.0  # as above: the request timeouts do not fire
    text = b"# a large per-agent text\n" * 160_000  # 4 MB
    async with open_test_kernel() as kernel:
        renderer = MetricsRenderer(kernel, cache_seconds=3600, process=False)

        async def cached() -> bytes:
            await trio.lowlevel.checkpoint()
            return text

        renderer.render = cached  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve_metrics(
                    kernel, "127.0.0.1", 0, renderer=renderer, task_status=task_status
                )
            )
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                clients = []
                for _ in range(20):
                    sock = trio.socket.socket()
                    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
                    await sock.connect(("127.0.0.1", port))
                    await sock.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    clients.append(sock)
                await settle()
                held = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            endpoint = renderer.endpoint
            assert endpoint is not None and endpoint.open == 20
            # the 20 responses are being written (the clients read nothing)
            assert held < 2 * len(text), f"{held:,} bytes held for 20 clients"
            for sock in clients:
                sock.close()
            nursery.cancel_scope.cancel()


async def test_a_target_in_absolute_form_is_served_as_its_path():
    """Regression: ``GET http://host:port/metrics HTTP/1.1`` (the absolute form, what a
    client sends through a proxy; RFC 9112 3.2.2: a server must accept it) was answered
    404: the whole URL was taken for the path."""
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)

        async def status_and_body(target: str) -> tuple[int, bytes]:
            request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
            status, _, body = await http(port, request.encode())
            return status, body

        assert await status_and_body(f"http://127.0.0.1:{port}/healthz") == (200, b"ok\n")
        assert await status_and_body("HTTP://Example.com/healthz?x=1") == (200, b"ok\n")
        assert await status_and_body("https://example.com:443/nope") == (404, b"not found\n")
        status, body = await status_and_body(f"http://127.0.0.1:{port}")  # empty path: "/"
        assert status == 200 and body.startswith(b"nexus_trio: GET /metrics")
        status, body = await status_and_body("http://example.com?x=1")
        assert status == 200 and body.startswith(b"nexus_trio: GET /metrics")
        status, body = await status_and_body(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b"nexus_agents_alive" in body
        # the origin form, as before; a path starting with // is a path, not an authority
        assert await status_and_body("//healthz") == (404, b"not found\n")
        nursery.cancel_scope.cancel()


async def test_a_request_head_past_8_kib_gets_431_whatever_its_reads():
    """Regression: the 8 KiB limit was checked before each read of 4 KiB, so a head of up
    to 12 KiB was served or refused depending on how it was cut into reads."""

    def head(size: int) -> bytes:
        line = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        return line + b"X: " + b"a" * (size - len(line) - 3 - 4) + b"\r\n\r\n"

    assert len(head(8192)) == 8192
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)
        assert (await http(port, head(8192)))[:1] == (200,)
        assert (await http(port, head(8193)))[:1] == (431,)
        assert (await http(port, head(12_000)))[:1] == (431,)
        assert (await http(port, head(8192)[:-4] + b"a\r\n\r\n"))[:1] == (431,)
        nursery.cancel_scope.cancel()


async def test_a_request_head_past_8_kib_sent_a_byte_at_a_time_gets_431(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A byte at a time: the end of the head is found across reads, and so is the limit.
    (On the real clock, 8 KiB a byte at a time took more than the endpoint's 10 s for a
    head on a loaded machine: the head was given up, and the answer was empty.)"""
    line = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    for request, expected in (
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\n"),
        (b"GET /healthz HTTP/1.1\nHost: x\n\n", b"HTTP/1.1 200 OK\r\n"),
        (line + b"X: " + b"a" * (8193 - len(line) - 7) + b"\r\n\r\n", b"HTTP/1.1 431 "),
    ):
        data = await _answer_to_a_byte_at_a_time(request, mock_clock)
        assert data.startswith(expected), (request[:40], data[:40])


async def test_empty_lines_before_the_request_line_are_skipped():
    """Regression: a request after an empty line (a client ending its previous request
    with one CRLF too many; RFC 9112 2.2: a server should skip it) got no answer: the
    empty line was taken for the end of an empty head, and the connection closed."""

    requests = (
        b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\r\n\r\n\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\nGET /healthz HTTP/1.1\nHost: x\n\n",
    )
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)
        for request in requests:
            status, _, body = await http(port, request)
            assert (status, body) == (200, b"ok\n"), request
        nursery.cancel_scope.cancel()


async def test_empty_lines_before_the_request_line_sent_a_byte_at_a_time_are_skipped(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A byte at a time, and only empty lines (then no answer: nothing was asked)."""
    for request, expected in (
        (b"\r\n\r\n\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\n"),
        (b"\r\n\r\n\r\n", b""),
    ):
        data = await _answer_to_a_byte_at_a_time(request, mock_clock)
        assert data.startswith(expected) and bool(data) == bool(expected), data[:40]


async def test_an_http_1_1_request_without_host_gets_400_and_http_1_0_is_served():
    """Regression: an HTTP/1.1 request without a ``Host`` header was served; RFC 9112 3.2:
    a server must answer it ``400`` (HTTP/1.0 may omit it)."""
    renderer_requests = (
        b"GET /metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\nX-Host: x\nHosts: x\n\n",
        b"HEAD /metrics HTTP/1.1\r\nUser-Agent: Host: x\r\n\r\n",
    )
    served = (
        (b"GET /healthz HTTP/1.0\r\n\r\n", b"ok\n"),
        (b"GET /healthz HTTP/1.1\r\nhOsT: x\r\n\r\n", b"ok\n"),
        (b"GET /healthz HTTP/1.1\nAccept: */*\nHost:x\n\n", b"ok\n"),
        (b"GET /healthz HTTP/1.1\r\nHost:\r\n\r\n", b"ok\n"),  # empty: allowed
    )
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        renderer = MetricsRenderer(kernel)
        port = await nursery.start(
            lambda task_status: serve_metrics(
                kernel, "127.0.0.1", 0, renderer=renderer, task_status=task_status
            )
        )
        for request in renderer_requests:
            status, headers, body = await http(port, request)
            assert status == 400, request
            expected = b"bad request: an HTTP/1.1 request needs a Host header\n"
            assert body == (b"" if request.startswith(b"HEAD") else expected), request
            assert headers["content-length"] == str(len(expected))
        assert renderer.renders == 0  # nothing was rendered for them
        for request, expected_body in served:
            assert (await http(port, request))[::2] == (200, expected_body), request
        assert (await get(port, "/metrics"))[0] == 200
        assert renderer.renders == 1
        assert renderer.endpoint is not None and renderer.endpoint.accepted == 8
        nursery.cancel_scope.cancel()


async def test_an_http_1_1_request_without_host_sent_a_byte_at_a_time_gets_400(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A byte at a time: the head is read whole before it is judged."""
    data = await _answer_to_a_byte_at_a_time(b"GET /healthz HTTP/1.1\r\n\r\n", mock_clock)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data[:40]


async def test_a_request_with_two_hosts_or_a_host_that_is_not_one_gets_400():
    """Regression: a request with two ``Host`` header lines, or a ``Host`` value with
    spaces or control characters, was served as a normal one; RFC 9112 3.2: a server
    must answer it ``400`` (HTTP/1.0 too). The value is ``host[:port]`` (RFC 3986: a
    name, an IPv4 address or a bracketed IPv6 one), around it spaces and tabs are
    allowed."""
    two = b"bad request: more than one Host header\n"
    not_a_host = b"bad request: the Host header is not a host[:port]\n"
    refused = (
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", two),
        (b"GET /metrics HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n", two),
        (b"HEAD /metrics HTTP/1.1\nHost:\nHOST: b\n\n", two),
        (b"GET /metrics HTTP/1.1\r\nHost: a b\r\n\r\n", not_a_host),
        (b"GET /metrics HTTP/1.1\r\nHost: a\tb\r\n\r\n", not_a_host),
        (b"GET /metrics HTTP/1.1\r\nHost: a\x01b\r\n\r\n", not_a_host),
        (b"GET /metrics HTTP/1.1\r\nHost: a\rb\r\n\r\n", not_a_host),
        (b"GET /metrics HTTP/1.1\r\nHost: a\x7f\r\n\r\n", not_a_host),
        (b"GET /metrics HTTP/1.0\r\nHost: h\xc3\xa9\r\n\r\n", not_a_host),
        (b"GET /metrics HTTP/1.1\r\nHost: a:port\r\n\r\n", not_a_host),
        (b"GET /metrics HTTP/1.1\r\nHost: a/b\r\n\r\n", not_a_host),
        (b"GET /metrics HTTP/1.1\r\nHost: [::1\r\n\r\n", not_a_host),
        (b"GET /metrics HTTP/1.1\r\nHost: a%zz\r\n\r\n", not_a_host),
    )
    served = (
        b"GET /healthz HTTP/1.1\r\nHost: localhost:9464\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: \t 127.0.0.1 \t\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: [::1]:9464\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: my-host.example_1.%41~\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a:\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\nHost: a\r\nX-Host: b\r\n\r\n",
    )
    await _assert_refused_with_400(refused, served)


async def test_a_header_line_without_a_colon_gets_400():
    """Regression: a header line without a colon was skipped and the request served; RFC
    9112 5 makes such a message invalid, and it is answered 400 naming it, as the other
    malformed header lines are. The empty line that ends the head is no header line."""
    expected = b"bad request: a header line without a colon\n"
    refused = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Thing\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\nnot a header line\r\n\r\n",
        b"HEAD /healthz HTTP/1.1\nHost: x\nAccept */*\n\n",
        b"GET /metrics HTTP/1.1\r\nHost x\r\n\r\n",
    )
    served = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Empty:\r\n\r\n",
        b"GET /healthz HTTP/1.0\n\n",
        b"GET /healthz HTTP/1.1\nHost: x\n\n",
    )
    await _assert_refused_with_400([(r, expected) for r in refused], served)


async def _assert_refused_with_400(
    refused: Sequence[tuple[bytes, bytes]], served: Sequence[bytes]
) -> None:
    """Each request of ``refused`` gets 400 with its body (none to a HEAD), counted, and
    nothing rendered; each of ``served`` gets ``/healthz``'s 200."""
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        renderer = MetricsRenderer(kernel)
        port = await nursery.start(
            lambda task_status: serve_metrics(
                kernel, "127.0.0.1", 0, renderer=renderer, task_status=task_status
            )
        )
        for request, expected in refused:
            status, headers, body = await http(port, request)
            assert status == 400, request
            assert body == (b"" if request.startswith(b"HEAD") else expected), request
            assert headers["content-length"] == str(len(expected)), request
        assert renderer.renders == 0  # nothing was rendered for them
        assert renderer.endpoint is not None
        assert renderer.endpoint.refused[400] == len(refused)
        for request in served:
            assert (await http(port, request))[::2] == (200, b"ok\n"), request
        nursery.cancel_scope.cancel()


async def test_http_versions_it_does_not_speak_get_505_and_malformed_ones_400():
    """Regression: any ``HTTP/x.y`` was served: ``GET /metrics HTTP/9.9`` got ``200``.
    RFC 9110 15.6.6 / 9112 2.3: a major version other than 1 gets ``505 HTTP Version Not
    Supported`` (no body to a HEAD), counted as a refusal; a higher 1.x minor is served
    as HTTP/1.1 (so it needs a Host); a version that is not ``HTTP/DIGIT.DIGIT`` is a bad
    request: ``400``."""
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        port = await nursery.start(
            lambda task_status: serve_metrics(
                kernel, "127.0.0.1", 0, renderer=renderer, task_status=task_status
            )
        )
        answers = []
        for version in (b"HTTP/9.9", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.1"):
            answers.append(await http(port, b"GET /metrics " + version + b"\r\nHost: x\r\n\r\n"))
        assert [a[0] for a in answers] == [505] * 4
        assert answers[0][2] == b"HTTP version not supported: this endpoint speaks HTTP/1.1\n"
        assert answers[0][1]["content-length"] == str(len(answers[0][2]))
        # an answer to HEAD has no body, whatever it refuses
        status, headers, body = await http(port, b"HEAD /healthz HTTP/2.0\r\nHost: x\r\n\r\n")
        assert (status, body) == (505, b"")
        assert headers["content-length"] == str(len(answers[0][2]))
        # a higher minor of 1: served as 1.1 (and, as 1.1, it needs a Host)
        assert (await http(port, b"GET /healthz HTTP/1.9\r\nHost: x\r\n\r\n"))[::2] == (
            200,
            b"ok\n",
        )
        no_host = await http(port, b"GET /healthz HTTP/1.2\r\n\r\n")
        assert no_host[::2] == (400, b"bad request: an HTTP/1.1 request needs a Host header\n")
        malformed = (b"HTTP/1", b"HTTP/a.b", b"HTTP/1.10", b"HTTP/01.1", b"HTTP/1.", b"HTTP/")
        for version in malformed:
            status, _, body = await http(port, b"GET /healthz " + version + b"\r\nHost: x\r\n\r\n")
            assert (status, body) == (
                400,
                b"bad request: the HTTP version is not HTTP/DIGIT.DIGIT\n",
            ), version
        endpoint = renderer.endpoint
        assert endpoint is not None
        assert endpoint.refused == {400: 1 + len(malformed), 404: 0, 405: 0, 431: 0, 505: 5}
        nursery.cancel_scope.cancel()


async def test_refused_requests_are_counted_by_status():
    """Regression: the endpoint's 400, 404, 405 and 431 answers were counted nowhere (a
    client sending garbage or scanning paths was invisible). Each is now counted by its
    status (``EndpointStats.refused``, ``nexus_metrics_requests_refused_total{status}``),
    every status there from the start; the answers that serve are not counted."""
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        port = await nursery.start(
            lambda task_status: serve_metrics(
                kernel, "127.0.0.1", 0, renderer=renderer, task_status=task_status
            )
        )
        before = samples((await renderer.render()).decode())
        assert {
            labels: value
            for (name, labels), value in before.items()
            if name == "nexus_metrics_requests_refused_total"
        } == {(("status", s),): 0 for s in ("400", "404", "405", "431", "505")}
        requests = (
            (b"hello\r\n\r\n", 400),
            (b"GET /metrics HTTP/1.1\r\n\r\n", 400),  # no Host
            (b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
            (b"HEAD /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
            (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
            (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", 431),
            (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 200),
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        )
        for request, expected in requests:
            assert (await http(port, request))[0] == expected, request[:40]
        # a connection closed before a request line asked for nothing: no answer, not counted
        assert await http_raw(port, b"\r\n") == b""
        endpoint = renderer.endpoint
        assert endpoint is not None
        assert endpoint.refused == {400: 3, 404: 2, 405: 1, 431: 1, 505: 0}
        after = samples((await renderer.render()).decode())
        nursery.cancel_scope.cancel()
    for status, count in ((400, 3), (404, 2), (405, 1), (431, 1)):
        key = ("nexus_metrics_requests_refused_total", (("status", str(status)),))
        assert after[key] == count, status


async def http_raw(port: int, request: bytes) -> bytes:
    """All a connection answers to ``request`` (nothing, if it answers nothing)."""
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            await stream.send_eof()
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


async def test_whitespace_between_a_header_name_and_its_colon_gets_400():
    """Regression: ``Host : x`` (whitespace between a field name and its colon) was taken
    for no ``Host`` (an HTTP/1.1 request got "needs a Host header", an HTTP/1.0 one was
    served), and any other header line with it was served; RFC 9112 5.1: a server must
    answer such a request ``400``."""
    expected = b"bad request: whitespace between a header name and its colon\n"
    refused = (
        b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost\t: x\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\nX-Thing : y\r\n\r\n",
        b"HEAD /healthz HTTP/1.1\nHost: x\nAccept : */*\n\n",
    )
    served = (
        b"GET /healthz HTTP/1.1\r\nHost:\tx \r\nX-Thing:  a : b \r\n\r\n",
        b"GET /healthz HTTP/1.0\r\nX-Thing: a\tb\r\n\r\n",
    )
    await _assert_refused_with_400([(r, expected) for r in refused], served)


async def test_a_header_line_starting_with_whitespace_gets_400():
    """Regression: a header line starting with a space or a tab (obsolete line folding,
    a continuation of the line before; RFC 9112 5.2 lets a server refuse it) was taken for
    a line of its own, and the request served; it is answered ``400`` now, and so is such
    a line right after the request line (RFC 9112 2.2)."""
    expected = b"bad request: a header line starts with whitespace (obsolete line folding)\n"
    refused = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Thing: a\r\n b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Thing: a\r\n\tb\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n Host: x\r\n\r\n",
        b"HEAD /healthz HTTP/1.0\n\tX: y\n\n",
    )
    served = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Thing: a \t\r\n\r\n",)
    await _assert_refused_with_400([(r, expected) for r in refused], served)


class _ScrapeSteps(trio.abc.Instrument):
    """Counts, for each step of one task (``task``), the agents whose mailbox it read: a
    step is what the task runs between two checkpoints, while no agent runs."""

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.read: set[int] = set()
        self.per_step: list[int] = []

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.per_step.append(len(self.read))
            self.read.clear()


def _count_mailbox_reads(monkeypatch: pytest.MonkeyPatch, steps: _ScrapeSteps) -> None:
    """Make every read of an agent's mailbox by ``steps.task`` count in ``steps.read``."""
    from nexus_trio._cell import AgentCell

    slot = AgentCell.__dict__["mailbox"]

    def read(cell: AgentCell) -> object:
        if trio.lowlevel.current_task() is steps.task:
            steps.read.add(id(cell))
        return slot.__get__(cell, AgentCell)

    monkeypatch.setattr(AgentCell, "mailbox", property(read, slot.__set__))


async def test_a_per_agent_scrape_reads_a_bounded_number_of_agents_between_checkpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: with per-agent series on, the snapshot of a scrape copied the counters of
    every agent (``kernel.stats(agents=True)``) and chose the deepest mailboxes among them
    before the render's first checkpoint: at 100,000 agents 0.13-0.39 s during which no
    agent ran, growing with the agents. It now walks them a slice at a time with a
    checkpoint between slices, and copies the counters of the chosen ones only, a slice at
    a time too: the agents read between two checkpoints are bounded whatever their number."""
    from nexus_trio import metrics

    monkeypatch.setattr(metrics, "_SCAN_VISITS", 200)
    monkeypatch.setattr(metrics, "_SCAN_COPIES", 50)
    steps = _ScrapeSteps()
    _count_mailbox_reads(monkeypatch, steps)
    most: dict[int, int] = {}
    took: dict[int, int] = {}
    for n in (1_000, 4_000):
        async with open_test_kernel() as kernel:
            refs = [kernel.spawn(unnamed) for _ in range(n)]
            await trio.testing.wait_all_tasks_blocked()
            renderer = MetricsRenderer(
                kernel, per_agent=True, per_agent_limit=300, cache_seconds=0, process=False
            )
            steps.task, steps.per_step = trio.lowlevel.current_task(), []
            trio.lowlevel.add_instrument(steps)
            try:
                body = await renderer.render()
            finally:
                trio.lowlevel.remove_instrument(steps)
                steps.task = None
            most[n], took[n] = max(steps.per_step), len(steps.per_step)
            assert sum(steps.per_step) >= n  # every agent was read
            values = samples(body.decode())
            assert values[("nexus_agent_series_exported", ())] == 300
            assert values[("nexus_agent_series_truncated", ())] == 1
            assert values[("nexus_agents_alive", ())] == n
            exported = [
                dict(labels)["agent_id"]
                for name, labels in samples(body.decode())
                if name == "nexus_agent_mailbox_depth"
            ]
            # every mailbox is empty: the earliest spawned, in spawn order
            assert exported == [str(ref.id) for ref in refs[:300]]
    # a slice of 200 visits (and 50 copies after the last): the same bound at 1,000 and
    # 4,000 agents, in more steps
    assert most[1_000] <= 250 and most[4_000] <= 250, most
    assert took[4_000] > took[1_000], took


class _StepPeaks(trio.abc.Instrument):
    """The most memory (traced by ``tracemalloc``) one task held, above what it held
    before the step, in each of its steps (what it runs between two checkpoints)."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        import tracemalloc

        self.task = task
        self.traced = tracemalloc.get_traced_memory
        self.reset_peak = tracemalloc.reset_peak
        self.before = 0
        self.per_step: list[int] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.reset_peak()
            self.before = self.traced()[0]

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.per_step.append(self.traced()[1] - self.before)


async def test_a_per_agent_snapshot_holds_no_list_of_all_the_agents_between_checkpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: a per-agent snapshot walked the agents a slice at a time, but first
    copied the list of all of them in one go (a reference each: 2 ms at 100,000 agents,
    20 ms at 1,000,000, before its first checkpoint). It now follows the kernel's own
    list of live agents a slice at a time: what one step holds does not grow with the
    agents (here a list of 4,000 agents would be 32 kB)."""
    import tracemalloc

    from nexus_trio import metrics

    monkeypatch.setattr(metrics, "_SCAN_VISITS", 200)
    monkeypatch.setattr(metrics, "_SCAN_COPIES", 50)
    most: dict[int, int] = {}
    for n in (1_000, 4_000):
        async with open_test_kernel() as kernel:
            refs = [kernel.spawn(unnamed) for _ in range(n)]
            await trio.testing.wait_all_tasks_blocked()
            steps = _StepPeaks(trio.lowlevel.current_task())
            tracemalloc.start()
            trio.lowlevel.add_instrument(steps)
            try:
                await trio.lowlevel.checkpoint()  # the steps measured start here
                snapshot = await metrics.take_snapshot_in_steps(
                    kernel, per_agent=True, per_agent_limit=10
                )
            finally:
                trio.lowlevel.remove_instrument(steps)
                tracemalloc.stop()
            assert [a.id for a in snapshot.agents] == [ref.id for ref in refs[:10]]
            assert snapshot.agents_left_out == n - 10
            assert len(steps.per_step) >= n // 200  # a step per 200 agents, at least
            most[n] = max(steps.per_step[1:])  # (the first: up to the first checkpoint)
    assert most[4_000] < 8 * 1_000 and most[4_000] - most[1_000] < 1_024, most


def _fill(kernel: Kernel, ref: AgentRef, depth: int) -> None:
    """Send ``ref`` (an agent whose handler waits) ``depth`` messages, and one more for
    its handler to take and wait on."""
    for _ in range(depth + 1):
        kernel.send_nowait(ref, "x")


async def test_a_scrape_in_steps_exports_exactly_the_deepest_mailboxes_earliest_spawned_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Walked a slice at a time, the agents chosen are those chosen among all at once
    (``heapq.nlargest`` over ``stats(agents=True)``, what a scrape did): the
    ``per_agent_limit`` deepest mailboxes, ties to the earliest spawned, deepest first."""
    from nexus_trio import metrics

    monkeypatch.setattr(metrics, "_SCAN_VISITS", 50)
    monkeypatch.setattr(metrics, "_SCAN_COPIES", 7)
    release = trio.Event()

    @agent
    async def held(ctx, msg):
        await release.wait()

    rng = random.Random(7)
    async with open_test_kernel() as kernel:
        refs = [kernel.spawn(held) for _ in range(400)]
        for ref in refs:
            _fill(kernel, ref, rng.choice((0, 0, 1, 2, 3, 5, 8, 8)))
        # each agent took its first message and waits in its handler: the depths stay
        await trio.testing.wait_all_tasks_blocked()
        depth = {ref.id: kernel.mailbox_depth(ref) for ref in refs}
        order = sorted(refs, key=lambda ref: -depth[ref.id])  # stable: spawn order
        expected = order[:60]
        assert depth[order[59].id] == depth[order[60].id]  # a tie at the limit
        at_once = heapq.nlargest(
            60, kernel.stats(agents=True).agents, key=lambda a: a.mailbox_depth
        )
        assert [a.id for a in at_once] == [ref.id for ref in expected]
        renderer = MetricsRenderer(
            kernel, per_agent=True, per_agent_limit=60, cache_seconds=0, process=False
        )
        body = await renderer.render()
        release.set()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    exported = [
        (s.labels["agent_id"], s.value) for s in families["nexus_agent_mailbox_depth"].samples
    ]
    assert exported == [(str(ref.id), depth[ref.id]) for ref in expected]
    values = samples(body.decode())
    assert values[("nexus_agent_series_exported", ())] == 60
    assert values[("nexus_agent_series_truncated", ())] == 1


class _PausedScan:
    """An agent scan that, after its steps numbered in ``pauses``, does not step (the
    scrape goes on checkpointing) until the test has done what it does there."""

    def __init__(self, scan: AgentScan, pauses: list[int]) -> None:
        self.scan = scan
        self.steps = 0
        self.reached = {n: trio.Event() for n in pauses}
        self.go = {n: trio.Event() for n in pauses}

    def step(self) -> bool:
        paused = self.go.get(self.steps)
        if paused is not None and not paused.is_set():
            self.reached[self.steps].set()
            return True
        self.steps += 1
        return self.scan.step()

    def __getattr__(self, name: str) -> object:
        return getattr(self.scan, name)


async def test_agents_that_stop_or_spawn_during_a_scrape_in_steps_do_not_break_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scrape with per-agent series walks the agents across checkpoints: an agent that
    stops before the walk reaches it is not visited, one chosen that stops before its
    counters are copied is left out, one spawned meanwhile waits for the next scrape; the
    scrape answers with the others, the deepest first."""
    from nexus_trio import metrics

    monkeypatch.setattr(metrics, "_SCAN_VISITS", 30)
    monkeypatch.setattr(metrics, "_SCAN_COPIES", 3)
    release = trio.Event()

    @agent(shutdown_timeout=0)  # a stop cancels the handler at once
    async def held(ctx, msg):
        await release.wait()

    rng = random.Random(3)
    async with open_test_kernel() as kernel:
        refs = [kernel.spawn(held) for _ in range(100)]
        for i, ref in enumerate(refs):
            _fill(kernel, ref, {10: 10, 95: 11}.get(i, rng.randrange(10)))
        await trio.testing.wait_all_tasks_blocked()
        depth = {ref.id: kernel.mailbox_depth(ref) for ref in refs}
        # The agents walked, in spawn order: step 1 visits refs[:30], step 4 the last ones
        # (refs[90:]) and copies the 3 deepest chosen.
        visited_early, not_visited = refs[10], refs[95]
        chosen = sorted(
            (ref for ref in refs if ref is not not_visited), key=lambda ref: -depth[ref.id]
        )[:10]
        assert chosen[0] is visited_early
        copied_late = chosen[4]
        real = kernel.scan_agents
        scans: list[_PausedScan] = []

        def scan_agents(limit: int, **steps: int) -> _PausedScan:
            scans.append(_PausedScan(real(limit, **steps), [1, 4]))
            return scans[-1]

        monkeypatch.setattr(kernel, "scan_agents", scan_agents)
        renderer = MetricsRenderer(
            kernel, per_agent=True, per_agent_limit=10, cache_seconds=0, process=False
        )
        bodies: list[bytes] = []

        async def scrape() -> None:
            bodies.append(await renderer.render())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(scrape)
            while not scans:
                await trio.lowlevel.checkpoint()
            scan = scans[0]
            await scan.reached[1].wait()
            await kernel.stop(visited_early)
            await kernel.stop(not_visited)
            newcomer = kernel.spawn(held)
            _fill(kernel, newcomer, 50)  # the deepest now, but spawned after the walk began
            scan.go[1].set()
            await scan.reached[4].wait()
            await kernel.stop(copied_late)
            scan.go[4].set()
        release.set()
    assert len(scans) == 1 and scan.steps > 4
    text = bodies[0].decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    exported = [
        (s.labels["agent_id"], s.value) for s in families["nexus_agent_mailbox_depth"].samples
    ]
    survivors = [ref for ref in chosen if ref not in (visited_early, copied_late)]
    assert exported == [(str(ref.id), depth[ref.id]) for ref in survivors]
    values = samples(text)
    assert values[("nexus_agent_series_exported", ())] == 8
    assert values[("nexus_agent_series_truncated", ())] == 1
    # the kernel-wide values are those of the scrape's start: before the stops and spawn
    assert values[("nexus_agents_alive", ())] == 100
    assert scan.visited == 99  # all but the one stopped before its visit
    assert scan.left_out == 99 - 10


async def _answer_to_a_byte_at_a_time(request: bytes, clock: trio.testing.MockClock) -> bytes:
    """What one connection of the endpoint answers to ``request`` sent a byte at a time
    (each byte read before the next is sent), then the end of the client's side.

    On the test's ``clock``, which jumps only when every task waits (the exchange is in
    memory): the endpoint's timeouts (10 s for a head, 1 s to close) are not raced by a
    loaded machine's slowness, which gave up an 8 KiB head and answered nothing."""
    from nexus_trio import metrics

    clock.autojump_threshold = 0
    async with open_test_kernel() as kernel:
        renderer = MetricsRenderer(kernel, process=False)
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(metrics._handle_connection, server, kernel, renderer)
            for i in range(len(request)):
                await client.send_all(request[i : i + 1])
                await trio.testing.wait_all_tasks_blocked()
            await client.send_eof()
            data = b""
            while chunk := await client.receive_some(65536):
                data += chunk
            await client.aclose()
    return data


async def test_a_head_request_past_8_kib_gets_431_without_a_body():
    """Regression: a ``HEAD`` request whose head was past 8 KiB got its ``431`` with a body
    (``request head too large``), which an answer to ``HEAD`` never has (RFC 9110 9.3.2):
    a client reading it took the body for the start of the next answer. It gets the head
    of the answer only, its ``Content-Length`` saying what a ``GET`` would get; a ``GET``
    still gets the body, and so does a request whose method is not ``HEAD``."""
    huge = b"X: " + b"a" * 9000 + b"\r\n\r\n"
    expected = b"request head too large\n"
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)
        for request, body in (
            (b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n" + huge, b""),
            (b"\r\nHEAD /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b""),  # in its request line
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + huge, expected),
            (b"HEADER /metrics HTTP/1.1\r\nHost: x\r\n" + huge, expected),
        ):
            status, headers, got = await http(port, request)
            assert (status, got) == (431, body), request[:20]
            assert headers["content-length"] == str(len(expected))
        nursery.cancel_scope.cancel()


async def test_a_request_line_of_whitespace_only_gets_400_not_a_silent_close():
    """Regression: a request line of spaces, tabs or other whitespace only (``" \\r\\n\\r\\n"``)
    was taken for no request line at all: the connection was closed without an answer and
    the request counted nowhere. It is a request line that is not ``METHOD TARGET HTTP/x``:
    ``400``, counted; only empty lines before the client's end still get no answer."""
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        renderer = MetricsRenderer(kernel, process=False)
        port = await nursery.start(
            lambda task_status: serve_metrics(
                kernel, "127.0.0.1", 0, renderer=renderer, task_status=task_status
            )
        )
        for request in (b" \r\n\r\n", b"\t\r\nHost: x\r\n\r\n", b"\r\n \x0b", b"\x0c"):
            answer = await http_raw(port, request)
            assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), request
            assert answer.endswith(b"\r\n\r\nbad request\n"), request
        assert await http_raw(port, b"\r\n\r\n\n") == b""
        assert renderer.endpoint is not None
        assert renderer.endpoint.refused[400] == 4
        nursery.cancel_scope.cancel()


async def test_a_request_line_is_split_on_http_whitespace_only():
    """Regression: the request line was split on what Python takes for whitespace in
    Latin-1, so ``GET\\xa0/healthz\\xa0HTTP/1.1`` (no-break spaces, or the bytes 0x1C-0x1F,
    0x85: no separators in HTTP) was served as ``GET /healthz``, where a proxy in front
    sees one word: the two disagree on what was asked. The parts are separated by SP, HTAB,
    VT, FF or a bare CR only (RFC 9112 3); another byte is part of a word."""
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)
        for sep in (b"\xa0", b"\x85", b"\x1c", b"\x1f"):
            request = b"GET" + sep + b"/healthz" + sep + b"HTTP/1.1\r\nHost: x\r\n\r\n"
            assert (await http(port, request))[0] == 400, sep
            request = b"GET /healthz" + sep + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            assert (await http(port, request))[0] == 404, sep  # a path of its own
        for sep in (b" ", b"\t", b"\x0b", b"\x0c", b"\r", b" \t "):
            request = b"GET" + sep + b"/healthz" + sep + b"HTTP/1.1\r\nHost: x\r\n\r\n"
            assert (await http(port, request))[::2] == (200, b"ok\n"), sep
        nursery.cancel_scope.cancel()


async def test_a_target_in_absolute_form_that_is_no_url_gets_400_not_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: a target in absolute form that is no URL (``http://[::1/metrics``: an
    IPv6 literal without its ``]``, or ``http://[abc]/``: not an IP address) made the URL
    parser raise ``ValueError``, taken for a failed render: ``500 the metrics render
    failed``, an ERROR with a traceback logged for each such request (a client could fill
    the log), and not counted as refused. It is a bad request: ``400``, counted, not
    logged."""
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        renderer = MetricsRenderer(kernel, process=False)
        port = await nursery.start(
            lambda task_status: serve_metrics(
                kernel, "127.0.0.1", 0, renderer=renderer, task_status=task_status
            )
        )
        targets = ("http://[::1/metrics", "http://[abc]/metrics", "HTTPS://[", "http://]/")
        for target in targets:
            for method in ("GET", "HEAD"):
                request = f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                status, headers, body = await http(port, request)
                expected = b"bad request: the target is not a URL\n"
                assert (status, body) == (400, b"" if method == "HEAD" else expected), target
                assert headers["content-length"] == str(len(expected))
        assert renderer.endpoint is not None
        assert renderer.endpoint.refused[400] == 2 * len(targets)
        assert renderer.renders == 0
        nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("end", ["timeout", "cancelled", "gets_in"])
async def test_the_accepted_counter_never_goes_down_when_a_waiting_send_gives_up(
    end: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Regression (thirty-first pass): a send waiting for room in a full mailbox is
    counted in ``stats().accepted`` while it waits (conservation: it is in flight) and
    taken out again if it never gets in (``MailboxFull`` at its deadline, or cancelled).
    ``nexus_messages_accepted_total`` exported that value, so the Prometheus counter read
    2, 3, 2: a decrease, which ``rate()`` and ``increase()`` take for a counter reset. It
    counts a waiting send once it got in now: 2, 2, 2 (and 2, 2, 3 when it gets in)."""
    import attrs

    config = attrs.evolve(base_config(), kernel=KernelConfig(send_timeout_ms=100))
    release = trio.Event()

    @agent(name="s", mailbox_capacity=1)
    async def held(ctx: Context, msg: Message) -> None:
        await release.wait()

    def exported(kernel: Kernel) -> float:
        text = render_snapshot(take_snapshot(kernel), process=False).decode()
        return samples(text)[("nexus_messages_accepted_total", ())]

    outcome: list[str] = []

    async def third(kernel: Kernel) -> None:
        try:
            await kernel.send("s", 2)
        except MailboxFull:
            outcome.append("MailboxFull")
        else:
            outcome.append("sent")

    async with open_test_kernel(config) as kernel:
        kernel.spawn(held)
        for i in range(2):  # one in hand, one queued: full
            await kernel.send("s", i)
            await trio.testing.wait_all_tasks_blocked()
        seen = [exported(kernel)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(third, kernel)
            await trio.testing.wait_all_tasks_blocked()
            seen.append(exported(kernel))
            stats = kernel.stats()
            assert (stats.accepted, stats.in_flight) == (3, 3)  # (in flight while it waits)
            if end == "cancelled":
                nursery.cancel_scope.cancel()
            elif end == "gets_in":
                release.set()
        await trio.testing.wait_all_tasks_blocked()
        seen.append(exported(kernel))
        assert kernel.stats().accepted == (3 if end == "gets_in" else 2)
        release.set()
    assert seen == [2, 2, 3 if end == "gets_in" else 2]
    assert outcome == {"timeout": ["MailboxFull"], "cancelled": [], "gets_in": ["sent"]}[end]


async def test_silent_connections_hold_neither_a_shutdown_nor_their_slot_past_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression (fifty-first pass): a connection that was sent nothing is closed at
    once when it ends, without the 1 s of lingering for the client's end that keeps a
    sent answer from a reset. The endpoint's end (a kernel's shutdown) with silent
    clients connected took 1 s, not 0; and a client silent past the 10 s request
    timeout held its slot (``nexus_metrics_connections_open``) until 11 s."""
    async with open_test_kernel() as kernel:
        renderer = MetricsRenderer(kernel, process=False)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve_metrics(
                    kernel, "127.0.0.1", 0, renderer=renderer, task_status=task_status
                )
            )
            assert renderer.endpoint is not None
            slow = await trio.open_tcp_stream("127.0.0.1", port)
            started = trio.current_time()
            assert await slow.receive_some(1) == b""  # closed without an answer
            await trio.testing.wait_all_tasks_blocked()
            assert trio.current_time() - started == pytest.approx(10)
            assert renderer.endpoint.open == 0
            await slow.aclose()

            silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
            await silent[0].send_all(b"GET /metrics HTTP/1.1\r\n")  # a head cut short
            await trio.testing.wait_all_tasks_blocked()
            assert renderer.endpoint.open == 3
            cancelled = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - cancelled == 0
        assert renderer.endpoint.open == 0
        for stream in silent:
            assert await stream.receive_some(1) == b""
            await stream.aclose()


async def test_a_connection_whose_answer_was_cut_holds_neither_a_shutdown_nor_its_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression (fifty-first pass, review): an answer cut short (a client that does
    not read a 32 MB body: its send blocked) has nothing to keep from a reset either,
    as a connection sent nothing has not: it is closed at once, not after 1 s of
    lingering for the client's end. Cut by the 10 s request timeout, its slot was held
    until 11 s; cut by the endpoint's end (a kernel's shutdown), that end took 1 s."""
    body = b"x" * (32 << 20)  # more than both sockets' buffers hold

    async def huge(path: str) -> tuple[int, bytes, str]:
        return 200, body, "text/plain"

    endpoint = EndpointStats()
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(serve_routes, endpoint=endpoint), huge, "127.0.0.1", 0
        )
        reader = await trio.open_tcp_stream("127.0.0.1", port)
        await reader.send_all(request)
        await trio.testing.wait_all_tasks_blocked()
        assert endpoint.open == 1  # its send blocked: the client reads nothing
        await trio.sleep(10.5)  # past the request timeout, not past its 1 s of lingering
        await trio.testing.wait_all_tasks_blocked()
        assert endpoint.open == 0
        await reader.aclose()

        stuck = await trio.open_tcp_stream("127.0.0.1", port)
        await stuck.send_all(request)
        await trio.testing.wait_all_tasks_blocked()
        assert endpoint.open == 1
        cancelled = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - cancelled == 0
    assert endpoint.open == 0
    await stuck.aclose()


class _OddReason(str):
    """A reason, a ``str`` subclass whose own methods raise (``strip``, ``__eq__``)."""

    def strip(self, chars: str | None = None) -> str:
        raise RuntimeError("strip bug")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq bug")

    __hash__ = str.__hash__


async def test_a_readiness_reason_of_a_str_subclass_whose_methods_raise_is_still_said() -> None:
    """Regression (fifty-second pass): a check's reason is any ``str``, a subclass too,
    and ``readiness()`` called the reason's own ``strip``: a subclass whose ``strip``
    raises made ``readiness()`` raise it, so ``/readyz`` answered 500 and every
    ``/metrics`` scrape failed whole. The reason is read as the text it holds (``str``'s
    own methods), so the kernel is not ready, saying it. (Fails with main's metrics.py:
    ``RuntimeError: strip bug`` out of ``readiness()``.)"""
    async with open_test_kernel() as kernel:
        add_readiness(kernel, lambda: _OddReason("  nats down\n"))
        add_readiness(kernel, lambda: _OddReason("nats down"))  # (the same: said once)
        assert readiness(kernel) == "nats down"
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        assert samples((await renderer.render()).decode())[("nexus_ready", ())] == 0


class _FlakyCollector:
    """A collector (as a transport adds one) that yields one gauge, or fails as told."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fault: str | None = None

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, "A series of an added collector.", value=1)
        if self.fault == "raise":
            raise RuntimeError("collector bug")
        if self.fault == "no metric":
            yield "not a family"  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"<collector {self.name}>"


async def test_an_added_collector_that_fails_is_left_out_of_the_scrape_not_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression (fifty-second pass): a collector added with ``add_collector`` whose
    ``collect()`` raised (or yielded what is no ``Metric``) made every snapshot raise:
    each ``/metrics`` scrape answered 500 (as ``prometheus_client``'s registry does), the
    kernel's own series lost with it. Its families are left out, whole (not the half it
    yielded before failing), the kernel's and the other collectors' are scraped, and it
    is logged as it starts failing, as its error changes and once as it works again, as a
    failing readiness check is. (Fails with main's metrics.py: ``RuntimeError:
    collector bug`` out of ``render()``.)"""
    bad, good = _FlakyCollector("nexus_bad_series"), _FlakyCollector("nexus_good_series")
    bad.fault = "raise"
    async with open_test_kernel() as kernel:
        add_collector(kernel, bad)
        add_collector(kernel, good)
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        with caplog.at_level(logging.INFO, logger="nexus_trio.metrics"):
            scraped = [samples((await renderer.render()).decode()) for _ in range(3)]
            bad.fault = "no metric"
            scraped.append(samples((await renderer.render()).decode()))
            bad.fault = None
            scraped.append(samples((await renderer.render()).decode()))
            bad.fault = "raise"
            scraped.append(samples((await renderer.render()).decode()))
            remove_collector(kernel, bad)
            add_collector(kernel, bad)  # (taken out and back: its failure said anew)
            scraped.append(samples((await renderer.render()).decode()))
    assert [("nexus_bad_series", ()) in got for got in scraped] == [
        False, False, False, False, True, False, False
    ]  # fmt: skip
    assert all(got[("nexus_good_series", ())] == 1 for got in scraped)
    assert all(got[("nexus_kernel_up", ())] == 1 for got in scraped)
    lines = [
        (r.levelname, r.getMessage().split(" (")[0], r.exc_info is not None)
        for r in caplog.records
        if "metrics collector" in r.getMessage()
    ]
    assert lines == [
        ("ERROR", "metrics collector <collector nexus_bad_series> raised", True),
        (
            "ERROR",
            "metrics collector <collector nexus_bad_series> yielded 'not a family',"
            " not a prometheus_client Metric",
            False,
        ),
        ("INFO", "metrics collector <collector nexus_bad_series> works again after 4"
         " failed calls in a row", False),
        ("ERROR", "metrics collector <collector nexus_bad_series> raised", True),
        ("ERROR", "metrics collector <collector nexus_bad_series> raised", True),
    ]  # fmt: skip


async def test_a_collector_failing_every_other_scrape_logs_a_few_lines_then_counts(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """Fifty-third pass: a collector (or readiness check) that failed at every other
    scrape logged a line at every scrape: its failure with a traceback, then that it
    works again, 60 lines in 15 minutes of 15 s scrapes. Its failure lines are at most 3
    in 10 minutes (``FLAP_LINES``, ``FLAP_WINDOW``), each followed by its working again;
    the failures past them are counted (``metrics.check_failure``) and said by its next
    failure line. Each scrape still leaves out its series while it fails."""
    bad = _FlakyCollector("nexus_bad_series")
    before = log_lines_dropped().get("metrics.check_failure", 0)
    async with open_test_kernel() as kernel:
        add_collector(kernel, bad)
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        scraped = []
        with caplog.at_level(logging.INFO, logger="nexus_trio.metrics"):
            for scrape in range(60):  # at 0, 15, ..., 885 s: failing at 0, 30, ..., 870
                bad.fault = "raise" if scrape % 2 == 0 else None
                scraped.append(
                    ("nexus_bad_series", ()) in samples((await renderer.render()).decode())
                )
                await trio.sleep(15)
    assert scraped == [False, True] * 30
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "collector" in r.getMessage()]
    name = "metrics collector <collector nexus_bad_series>"
    failed = (
        f"{name} raised (its series are left out of scrapes while it fails; logged again"
        " when its error changes or it works again; failed calls in a row: 1"
    )
    said = "; 17 failures of it not logged before this one: more than 3 in 10 minutes"
    works = (
        "INFO",
        f"{name} works again after 1 failed calls in a row (the last: raised RuntimeError)",
    )
    expected = [("ERROR", f"{failed})"), works] * 3 + [("ERROR", f"{failed}{said})"), works]
    assert lines == expected + [("ERROR", f"{failed})"), works] * 2, lines
    assert log_lines_dropped()["metrics.check_failure"] - before == 17 + 7


async def test_a_check_that_flapped_then_fails_for_good_is_said_as_its_window_ends(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """Fifty-third pass review: a collector (or readiness check) that flapped 3 times in
    10 minutes, then failed for good, had its lasting failure's start held back (the 4th
    failure line in the window) and nothing said of it after: the log's last line of it
    said it worked again while it failed for 13 minutes. A failure whose lines were all
    held back is said at its first call after the window (with its failed calls in a
    row), and so is its end."""
    bad = _FlakyCollector("nexus_bad_series")
    before = log_lines_dropped().get("metrics.check_failure", 0)
    async with open_test_kernel() as kernel:
        add_collector(kernel, bad)
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        with caplog.at_level(logging.INFO, logger="nexus_trio.metrics"):
            for scrape in range(61):  # at 0, 15, ..., 900 s: flapping, then failing at 90 s
                bad.fault = None if scrape in (1, 3, 5, 60) else "raise"
                await renderer.render()
                await trio.sleep(15)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "collector" in r.getMessage()]
    name = "metrics collector <collector nexus_bad_series>"
    failed = (
        f"{name} raised (its series are left out of scrapes while it fails; logged again"
        " when its error changes or it works again; failed calls in a row:"
    )
    works = f"{name} works again after %d failed calls in a row (the last: raised RuntimeError)"
    # (scrape 40, at 600 s, the first after the window: the 35th failed call from scrape 6)
    expected = [("ERROR", f"{failed} 1)"), ("INFO", works % 1)] * 3 + [
        ("ERROR", f"{failed} 35)"),
        ("INFO", works % 54),
    ]
    assert lines == expected, lines
    assert log_lines_dropped()["metrics.check_failure"] - before == 1


class _OddTextCollector:
    """A collector whose label values hold what the text format must escape: quotes, a
    newline, a backslash, a lone surrogate (a non-UTF-8 byte of a node's host name
    decoded with surrogateescape), or, told so, a label value that is no str."""

    def __init__(self) -> None:
        self.no_str = False

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("nexus_odd_nodes", "Nodes by \udcff name.", labels=["node"])
        family.add_metric(["host\udcff1"], 1)
        family.add_metric(['say "hi"\nback\\slash'], 2)
        if self.no_str:
            family.add_metric([7], 3)  # type: ignore[list-item]
        yield family
        yield GaugeMetricFamily("nexus_odd_plain", "A plain series beside it.", value=4)


async def test_an_added_collector_s_label_values_are_escaped_also_lone_surrogates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression (fifty-second pass): a label value (or help text) of an added
    collector holding a lone surrogate made the whole render raise
    ``UnicodeEncodeError`` (a 500, every scrape): it is written as its escape
    (``host\\udcff1``), as the kernel's own ``agent_name`` labels are; quotes,
    newlines and backslashes are escaped by the text format as before, and the body
    parses back to the same values. A label value that is no str (the render raised on
    it too) leaves that collector out, named. (Fails with main's metrics.py:
    ``UnicodeEncodeError: 'utf-8' codec can't encode character '\\udcff'``.)"""
    odd = _OddTextCollector()
    async with open_test_kernel() as kernel:
        add_collector(kernel, odd)
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        body = (await renderer.render()).decode("utf-8")
        assert "# HELP nexus_odd_nodes Nodes by \\\\udcff name.\n" in body
        got = samples(body)
        assert got[("nexus_odd_nodes", (("node", "host\\udcff1"),))] == 1
        assert got[("nexus_odd_nodes", (("node", 'say "hi"\nback\\slash'),))] == 2
        assert got[("nexus_odd_plain", ())] == 4
        odd.no_str = True
        with caplog.at_level(logging.ERROR, logger="nexus_trio.metrics"):
            got = samples((await renderer.render()).decode("utf-8"))
        assert ("nexus_odd_plain", ()) not in got
        assert got[("nexus_kernel_up", ())] == 1
    (said,) = [r.getMessage() for r in caplog.records if "metrics collector" in r.getMessage()]
    assert said.split(" (")[0].endswith(
        "family 'nexus_odd_nodes': a name, help, unit or label is 7, not a str"
    )
