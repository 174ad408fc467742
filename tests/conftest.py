from __future__ import annotations

import pytest

from nexus_trio import Config, KernelConfig, SupervisionConfig


def make_config(**kernel: object) -> Config:
    """Kernel options in seconds-free TOML units, generous supervision so tests don't escalate."""
    return Config(
        kernel=KernelConfig(**kernel),  # type: ignore[arg-type]
        supervision=SupervisionConfig(max_restarts=1000, backoff_initial_ms=0, backoff_max_ms=0),
    )


@pytest.fixture
def config() -> Config:
    return make_config()
