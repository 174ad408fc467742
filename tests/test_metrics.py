"""The Prometheus endpoint and the health check (nexus_trio.metrics), served from Trio.

These tests run on the real clock (sockets and MockClock's autojump do not mix); they
assert values, never timings.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from nexus_trio import agent
from nexus_trio.metrics import KernelCollector, build_registry, serve_metrics
from nexus_trio.testing import open_test_kernel


@agent(name="echo")
async def echo(ctx, msg):
    return msg.payload


@agent(name="boom")
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


async def test_metrics_endpoint_exposes_the_kernel_counters_and_per_agent_series():
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)
        kernel.spawn(echo)
        kernel.spawn(boom)
        for i in range(5):
            assert await kernel.request("echo", i) == i
        await kernel.send("boom", "x")
        await trio.testing.wait_all_tasks_blocked()

        status, headers, body = await get(port, "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain")
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


async def test_unknown_paths_methods_and_garbage_get_http_errors_and_the_server_goes_on():
    async with open_test_kernel() as kernel, trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)
        assert (await get(port, "/nope"))[0] == 404
        post = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        status, headers, _ = await http(port, post)
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        assert (await http(port, b"hello\r\n\r\n"))[0] == 400
        status, headers, body = await http(port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
        assert (status, body) == (200, b"")
        assert headers["content-length"] == "3"
        assert (await get(port, "/metrics?x=1"))[0] == 200
        assert (await http(port, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n"))[0] == 431
        assert (await get(port, "/healthz"))[0] == 200
        nursery.cancel_scope.cancel()


async def test_per_agent_series_are_left_out_above_the_limit():
    async with open_test_kernel() as kernel:
        kernel.spawn(echo)
        kernel.spawn(boom)
        from prometheus_client import generate_latest

        text = generate_latest(build_registry(kernel, per_agent_limit=1, process=False)).decode()
        values = samples(text)
        assert values[("nexus_agent_series_truncated", ())] == 1
        assert not any(
            name.startswith("nexus_agent_") for name, _ in values if "truncated" not in name
        )
        assert values[("nexus_agents_alive", ())] == 2
        text = generate_latest(build_registry(kernel, per_agent_limit=2, process=False)).decode()
        assert "nexus_agent_handled_total" in text


def test_bad_arguments_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="per_agent_limit"):
        KernelCollector(None, per_agent_limit=-1)  # type: ignore[arg-type]


async def test_serve_metrics_refuses_a_port_out_of_range():
    async with open_test_kernel() as kernel:
        with pytest.raises(ValueError, match=r"metrics port must be within 0\.\.65535, got 70000"):
            await serve_metrics(kernel, "127.0.0.1", 70000)
