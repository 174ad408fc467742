from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from nexus_trio import Config, KernelConfig, SupervisionConfig

if TYPE_CHECKING:
    from nexus_trio._nats import NatsServer


def make_config(**kernel: object) -> Config:
    """Kernel options in seconds-free TOML units, generous supervision so tests don't escalate."""
    return Config(
        kernel=KernelConfig(**kernel),  # type: ignore[arg-type]
        supervision=SupervisionConfig(max_restarts=1000, backoff_initial_ms=0, backoff_max_ms=0),
    )


@pytest.fixture
def config() -> Config:
    return make_config()


@pytest.fixture
def nats() -> Iterator[NatsServer]:
    """One real nats-server (JetStream, loopback) for the test."""
    from .nats_server import nats_cluster

    with nats_cluster(1) as servers:
        yield servers[0]
