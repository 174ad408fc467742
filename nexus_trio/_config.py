"""Configuration model: every knob of the kernel, with the defaults of the original Nexus.

The sections and key names are those of the TOML file (``[kernel] mailbox_capacity``,
``send_timeout_ms``, ...), so one name means one thing everywhere: in the file, in
``NEXUS_KERNEL__MAILBOX_CAPACITY`` and in Python. Values are validated when a config
object is built; a bad value raises ``ValueError`` naming the section and key.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs


class OverflowPolicy(enum.Enum):
    """What a full mailbox does with one more message."""

    #: wait up to ``send_timeout``, then raise :class:`MailboxFull` (the default)
    BLOCK = "block"
    #: accept the send, dead-letter the new message
    DROP_NEWEST = "drop_newest"
    #: accept the send, dead-letter the oldest queued message to make room
    DROP_OLDEST = "drop_oldest"
    #: raise :class:`MailboxFull` at once
    REJECT = "reject"


class RestartStrategy(enum.Enum):
    """Which siblings a supervisor restarts when one child fails (OTP semantics)."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


def _at_least(minimum: float) -> Any:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        section = getattr(type(inst), "_section", type(inst).__name__)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"[{section}] {attribute.name} must be a number, got {value!r}")
        if value < minimum:
            raise ValueError(f"[{section}] {attribute.name} must be >= {minimum:g}, got {value!r}")

    return check


def _positive(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    section = getattr(type(inst), "_section", type(inst).__name__)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"[{section}] {attribute.name} must be a number, got {value!r}")
    if value <= 0:
        raise ValueError(f"[{section}] {attribute.name} must be > 0, got {value!r}")


def _fraction(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    section = getattr(type(inst), "_section", type(inst).__name__)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"[{section}] {attribute.name} must be between 0 and 1, got {value!r}")


def _to_enum(enum_type: type[enum.Enum], section: str, key: str, value: Any) -> Any:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        known = ", ".join(repr(m.value) for m in enum_type)
        raise ValueError(f"[{section}] {key} must be one of {known}, got {value!r}") from None


def _to_overflow(value: Any) -> OverflowPolicy:
    result: OverflowPolicy = _to_enum(OverflowPolicy, "kernel", "overflow", value)
    return result


def _to_strategy(value: Any) -> RestartStrategy:
    result: RestartStrategy = _to_enum(RestartStrategy, "supervision", "strategy", value)
    return result


@attrs.frozen
class KernelConfig:
    """``[kernel]``: mailboxes, deadlines and shutdown."""

    _section = "kernel"

    mailbox_capacity: int = attrs.field(default=1024, validator=_at_least(1))
    send_timeout_ms: float = attrs.field(default=500, validator=_positive)
    handle_timeout_ms: float = attrs.field(default=30_000, validator=_positive)
    request_timeout_ms: float = attrs.field(default=5_000, validator=_positive)
    overflow: OverflowPolicy = attrs.field(default=OverflowPolicy.BLOCK, converter=_to_overflow)
    shutdown_grace_ms: float = attrs.field(default=5_000, validator=_at_least(0))
    batch_size: int = attrs.field(default=64, validator=_at_least(1))
    dead_letter_buffer: int = attrs.field(default=1024, validator=_at_least(1))

    @property
    def send_timeout(self) -> float:
        return self.send_timeout_ms / 1000

    @property
    def handle_timeout(self) -> float:
        return self.handle_timeout_ms / 1000

    @property
    def request_timeout(self) -> float:
        return self.request_timeout_ms / 1000

    @property
    def shutdown_grace(self) -> float:
        return self.shutdown_grace_ms / 1000


@attrs.frozen
class SupervisionConfig:
    """``[supervision]``: the root supervisor's strategy, intensity and backoff."""

    _section = "supervision"

    strategy: RestartStrategy = attrs.field(
        default=RestartStrategy.ONE_FOR_ONE, converter=_to_strategy
    )
    max_restarts: int = attrs.field(default=3, validator=_at_least(0))
    within_ms: float = attrs.field(default=5_000, validator=_positive)
    backoff_initial_ms: float = attrs.field(default=10, validator=_at_least(0))
    backoff_max_ms: float = attrs.field(default=5_000, validator=_at_least(0))
    backoff_jitter: float = attrs.field(default=0.2, validator=_fraction)
    backoff_reset_after_ms: float = attrs.field(default=30_000, validator=_at_least(0))


@attrs.frozen
class RuntimeConfig:
    """``[runtime]``: threads for blocking calls (``ctx.run_sync``).

    ``max_blocking_threads`` bounds the threads that run blocking calls at once;
    ``worker_threads`` (0 = automatic) is kept for compatibility with the original: a
    Trio kernel runs its agents on one thread, so when it is set it caps
    ``max_blocking_threads`` too.
    """

    _section = "runtime"

    worker_threads: int = attrs.field(default=0, validator=_at_least(0))
    max_blocking_threads: int = attrs.field(default=512, validator=_at_least(1))

    @property
    def blocking_thread_limit(self) -> int:
        if self.worker_threads:
            return min(self.worker_threads, self.max_blocking_threads)
        return self.max_blocking_threads


@attrs.frozen
class LoggingConfig:
    """``[logging]``: level and format (``compact``, ``json`` or ``pretty``)."""

    _section = "logging"

    level: str = attrs.field(default="info")
    format: str = attrs.field(default="compact")

    @level.validator
    def _check_level(self, attribute: attrs.Attribute[str], value: str) -> None:
        levels = ("trace", "debug", "info", "warn", "warning", "error", "critical")
        if not isinstance(value, str) or value.lower() not in levels:
            raise ValueError(f"[logging] level must be one of {', '.join(levels)}, got {value!r}")

    @format.validator
    def _check_format(self, attribute: attrs.Attribute[str], value: str) -> None:
        formats = ("compact", "json", "pretty")
        if value not in formats:
            raise ValueError(f"[logging] format must be one of {', '.join(formats)}, got {value!r}")


@attrs.frozen
class Config:
    """The whole configuration; ``Config()`` is the embedded defaults."""

    kernel: KernelConfig = attrs.field(factory=KernelConfig)
    supervision: SupervisionConfig = attrs.field(factory=SupervisionConfig)
    runtime: RuntimeConfig = attrs.field(factory=RuntimeConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
