from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from nexus_trio import Config, Kernel, KernelConfig, KernelPhase, SupervisionConfig

if TYPE_CHECKING:
    from nexus_trio._nats import NatsServer


def utf8_safe(text: str) -> str:
    """``text`` with its lone surrogates escaped (``\\ud800``), other text as it was."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A report's captured output and failure text with lone surrogates escaped.

    Tests here log and print what hostile peers and children send, lone surrogates
    included ("\\ud800" in JSON). pytest-xdist sends each report from its worker as UTF-8:
    a lone surrogate there was an INTERNALERROR that ended the whole run
    (pytest-dev/pytest-xdist#843)."""
    report = yield
    report.sections = [(title, utf8_safe(text)) for title, text in report.sections]
    if report.failed and report.longrepr is not None:
        text = str(report.longrepr)
        if utf8_safe(text) != text:
            report.longrepr = utf8_safe(text)
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``starts_first`` go to the front of the collection, the rest keep their
    order. pytest-xdist's ``worksteal`` gives each worker a contiguous share of the items
    and steals from the end of a queue, so an item at the end of a share starts late:
    ``test_user_install_then_uninstall`` (pip waiting on the index for minutes) was the
    second to last of its worker's share with ``-n 2`` and ``-n 4``, and with ``-n 2`` it
    ran last (a replay of the scheduler over a ``--durations`` run: docs/benchmarks-history.md).
    At the front it waits while the other workers use the CPU."""
    items.sort(key=lambda item: item.get_closest_marker("starts_first") is None)


def make_config(**kernel: object) -> Config:
    """Kernel options in seconds-free TOML units, generous supervision so tests don't escalate."""
    return Config(
        kernel=KernelConfig(**kernel),  # type: ignore[arg-type]
        supervision=SupervisionConfig(max_restarts=1000, backoff_initial_ms=0, backoff_max_ms=0),
    )


def run_pytest(directory: Path, *, timeout: float) -> subprocess.CompletedProcess[str]:
    """pytest run on ``directory`` in a process of its own (from there, so that its
    ``pytest.ini`` applies), as a user of nexus_trio runs it: what it printed, and how it
    exited."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=directory,
        check=False,
    )


@pytest.fixture
def sighup_default() -> Iterator[None]:
    """SIGHUP at its default action in this process for the test, so that the processes
    it starts take a SIGHUP (pytest run under ``nohup`` would start them with it ignored,
    and an ignored SIGHUP stays ignored: docs/cli.md)."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`nexus run` configures the nexus_trio logger; give the next test what it had."""
    logger = logging.getLogger("nexus_trio")
    handlers, level = list(logger.handlers), logger.level
    yield
    for added in logger.handlers:
        if added not in handlers:
            added.close()  # (a log writer thread of its ends with it)
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory without config files and no NEXUS_* variables; the modules a
    test wrote there (apps loaded with ``--app``) are forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in list(os.environ):
        if name.startswith("NEXUS_"):
            monkeypatch.delenv(name)
    yield tmp_path
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.fixture
def config() -> Config:
    return make_config()


@pytest.fixture
def nats() -> Iterator[NatsServer]:
    """One real nats-server (JetStream, loopback) for the test."""
    from .nats_server import nats_cluster

    with nats_cluster(1) as servers:
        yield servers[0]


async def timed_shutdown(kernel: Kernel, release: trio.Event) -> float:
    """Shut ``kernel`` down, set ``release`` once it drains, and return how long the
    shutdown took (mock time)."""
    took: list[float] = []

    async def shut() -> None:
        start = trio.current_time()
        await kernel.shutdown()
        took.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(shut)
        await trio.testing.wait_all_tasks_blocked()
        assert kernel.phase is KernelPhase.DRAINING
        release.set()
    return took[0]
