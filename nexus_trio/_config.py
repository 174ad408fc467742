"""Configuration model: every knob of the kernel, with the defaults of the original Nexus.

The sections and key names are those of the TOML file (``[kernel] mailbox_capacity``,
``send_timeout_ms``, ...), so one name means one thing everywhere: in the file, in
``NEXUS_KERNEL__MAILBOX_CAPACITY`` and in Python. Values are validated when a config
object is built; a bad value raises ``ValueError`` naming the section and key. Each field
carries a one-line ``doc`` in its metadata, from which the template and the docs are made.
Reading files and the environment is :mod:`nexus_trio.config`'s business, not this module's.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import json
import math
import re
import socket
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any, Final

import attrs

from ._errors import meant_choice


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


#: Level names accepted in ``[logging] level`` (``trace`` and ``warn`` are the original's).
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical")
#: Formats accepted in ``[logging] format``. ``full`` is the name of the original's default
#: format (tracing-subscriber's ``Full``, one line: time, level, target, message, fields),
#: which a config of the original may carry: an alias of ``compact``, the one-line format
#: that writes the same parts in that order.
LOG_FORMATS = ("compact", "full", "json", "pretty")
#: Built-in demo workloads of ``nexus run`` (``[app] workload``).
WORKLOADS = ("ring", "fanout", "request", "pool")


def _section_of(inst: Any) -> str:
    return str(getattr(type(inst), "_section", type(inst).__name__))


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


#: The largest integer a number key takes: TOML's integers are 64-bit, and a larger one
#: (a mailbox, a buffer, a time in ms) does not fit what the kernel sizes with it.
INT64_MAX = 2**63 - 1

#: The most seconds a duration JetStream takes may be (Go's ``time.Duration``: int64
#: nanoseconds): a larger ``[durable]`` time failed the join with JetStream's raw
#: ``BadRequestError`` 10025 (``cannot unmarshal ... time.Duration``) until the
#: fifty-seventh pass. ``DurableOptions`` takes the same bound, and these integers:
#: ``max_in_flight`` and ``max_waiting`` make the consumer's ``max_ack_pending``
#: (4 x ``max_in_flight`` + ``max_waiting``, Go's int64)
JETSTREAM_SECONDS_MAX = INT64_MAX // 10**9
DURABLE_IN_FLIGHT_MAX = 10**12
DURABLE_WAITING_MAX = 10**18
_ACK_PENDING: Final = "4 x max_in_flight + max_waiting is the consumer's max_ack_pending, 64-bit"


def _shown(value: int) -> str:
    # repr() of an int of more than 4300 digits raises ValueError (sys.int_info)
    return repr(value) if value.bit_length() <= 128 else f"an integer of {value.bit_length()} bits"


#: True while values read from TOML (a config file, a ``NEXUS_*`` variable) are checked:
#: a bad one is shown as TOML writes it (``true``, ``"text"``), not as Python does
_AS_TOML: ContextVar[bool] = ContextVar("nexus_config_values_as_toml", default=False)


@contextmanager
def switched_on(flag: ContextVar[bool]) -> Iterator[None]:
    """Within it, ``flag`` is True (for this thread and task alone, as a ContextVar is)."""
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def values_as_toml() -> AbstractContextManager[None]:
    """Within it, the errors of the validators show a bad value in TOML's spelling."""
    return switched_on(_AS_TOML)


#: the most characters of a refused value (or name) that an error shows: a longer one is cut
SHOWN_MAX: Final = 40


def cut(text: str, spell: Callable[[str], str] = str) -> str:
    """``text`` as an error shows it, spelt by ``spell`` (``repr``, TOML's): whole up to
    :data:`SHOWN_MAX` characters, else its first :data:`SHOWN_MAX` and its length, so
    that a 10 kB value is one line of an error, not 10 kB of it."""
    if len(text) <= SHOWN_MAX:
        return spell(text)
    return f"{spell(text[:SHOWN_MAX])}... ({len(text):,} characters)"


def cut_name(name: str) -> str:
    """A name (a config key, a section, a ``NEXUS_*`` variable) as an error shows it: as
    written when each of its characters is printable, else as a TOML basic string
    (``"a\\u001bb"``, quoted also where the cut leaves the control out), so that an
    escape sequence or a newline in a name reaches the terminal as text, not as a
    control; cut as :func:`cut` cuts. An empty name, or one with a blank (``"" = 1``,
    ``" " = 1``), is quoted too: as written it was nothing in the error."""
    plain = name.isprintable() and name != "" and not any(c.isspace() for c in name)
    return cut(name) if plain else cut(name, _toml)


def shown_path(path: Any) -> str:
    """A file's path as an error shows it: as written when each of its characters is
    printable, else as a TOML basic string (``"/etc/a\\u001b[2Jb.toml"``), as
    :func:`cut_name` shows a name, so that an escape sequence or a newline in a path
    reaches the terminal as text, not as a control (until the fifty-eighth pass ``-c``
    of such a path wrote it raw in its error). Not cut: a path is read whole."""
    text = str(path)
    return text if text.isprintable() else _toml(text)


def shown(value: Any) -> str:
    """A bad value in an error: its ``repr``, or its TOML spelling inside
    :func:`values_as_toml` (``true``, ``"text"``, ``inf``, ``[1, "a"]``, ``{ a = 1 }``).
    A long string is cut (:func:`cut`), and so is a long TOML array or table, to the
    first characters of its spelling: a 10 kB value in a config key or a ``NEXUS_*``
    variable was echoed whole. (An object given to ``Config(...)`` in Python is shown
    whole, as its ``repr``: what was passed, as Python's own errors show it.)"""
    if isinstance(value, int) and not isinstance(value, bool):
        return _shown(value)
    if not _AS_TOML.get():
        return cut(value, repr) if isinstance(value, str) else repr(value)
    if isinstance(value, str):
        return cut(value, _toml)
    spelt = _toml(value)
    if len(spelt) <= 2 * SHOWN_MAX:  # (a short array or table: whole)
        return spelt
    return f"{spelt[:SHOWN_MAX]}... ({len(spelt):,} characters)"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _escaped(character: str) -> str:
    """``character`` as a TOML basic string escapes it: ``\\u200b``, ``\\U000e0001``."""
    code = ord(character)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return _shown(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # a basic string (JSON's escapes are TOML's), every character that is not
        # printable escaped too: DEL, C1 controls, and those that show as nothing or as
        # a blank (U+200B ZERO WIDTH SPACE, U+00A0, a bidi mark), which were written as
        # they are, the name in quotes that looked like the one meant
        spelt = json.dumps(value, ensure_ascii=False)
        return "".join(c if c.isprintable() else _escaped(c) for c in spelt)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = (
            f"{key if _BARE_KEY.fullmatch(str(key)) else _toml(str(key))} = {_toml(item)}"
            for key, item in value.items()
        )
        return "{ " + ", ".join(items) + " }"
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    return repr(value)


#: The most agents ``nexus run``'s demo workload takes (``[app] agents``, ``-n``): ten times
#: the largest run measured (a million, see docs/benchmarks.md), about 100 GB of idle
#: agents at the ~1 KB each measured; a mistyped count such as 10**12 is refused, not spawned.
MAX_AGENTS = 100_000_000


def _bounded_above(
    section: str, name: str, value: int | float, maximum: tuple[int, str] | None = None
) -> None:
    # (below: each validator's own minimum, which NaN fails); ``maximum``: a key's own
    # bound and its name, else a 64-bit integer's
    if isinstance(value, int):
        bound, why = maximum or (INT64_MAX, "a 64-bit integer")
        if value > bound:
            raise ValueError(
                f"[{section}] {name} must be at most {bound} ({why}), got {shown(value)}"
            )
    elif value == math.inf:
        # No number key means "forever" by inf (TOML's inf, or 1e999, read as inf): it
        # would be a timer that never fires, a backoff that never restarts, a render
        # cached for good, or 0's documented meaning spelt another way.
        raise ValueError(f"[{section}] {name} must be a finite number, got {shown(value)}")


def _at_least(
    minimum: float, *, integer: bool = False, maximum: tuple[int, str] | None = None
) -> Any:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        section = _section_of(inst)
        if integer:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"[{section}] {attribute.name} must be an integer, got {shown(value)}"
                )
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"[{section}] {attribute.name} must be a number, got {shown(value)}")
        if not value >= minimum:  # also rejects NaN
            raise ValueError(
                f"[{section}] {attribute.name} must be >= {minimum:g}, got {shown(value)}"
            )
        _bounded_above(section, attribute.name, value, maximum)

    return check


def _positive(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    section = _section_of(inst)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"[{section}] {attribute.name} must be a number, got {shown(value)}")
    if not value > 0:
        raise ValueError(f"[{section}] {attribute.name} must be > 0, got {shown(value)}")
    _bounded_above(section, attribute.name, value)


def _jetstream_seconds(check: Any) -> Any:
    """``check``, and at most :data:`JETSTREAM_SECONDS_MAX`: a ``[durable]`` time
    JetStream takes in nanoseconds (Go's ``time.Duration``)."""

    def bounded(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        check(inst, attribute, value)
        if value > JETSTREAM_SECONDS_MAX:
            raise ValueError(
                f"[{_section_of(inst)}] {attribute.name} must be at most"
                f" {JETSTREAM_SECONDS_MAX} (seconds JetStream takes: Go's time.Duration,"
                f" 64-bit nanoseconds), got {shown(value)}"
            )

    return bounded


def _fraction(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    section = _section_of(inst)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(
            f"[{section}] {attribute.name} must be a number between 0 and 1, got {shown(value)}"
        )


def _lowered(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _in_any_case(choices: tuple[str, ...], value: Any) -> Any:
    """A choice key's value: one of ``choices`` written in any case is taken in lower case,
    as the flags take their choices and ``[logging] level`` its levels (``format = "JSON"``,
    ``workload = "Ring"``, ``NEXUS_LOGGING__FORMAT=JSON``); anything else is left as it was
    written, for the validator to refuse, quoting it."""
    lowered = _lowered(value)
    return lowered if lowered in choices else value


def _to_log_format(value: Any) -> Any:
    return _in_any_case(LOG_FORMATS, value)


def _to_workload(value: Any) -> Any:
    return _in_any_case(WORKLOADS, value)


def _meant_key_choice(value: Any, choices: Iterable[str]) -> str:
    """`` (did you mean "drop_oldest"?)`` for a choice key's value near one of ``choices``
    (``"drop-oldest"``, ``"blok"``), else ''."""
    meant = meant_choice(value, choices)
    return "" if meant is None else f" (did you mean {shown(meant[0])}?)"


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(
                f"[{_section_of(inst)}] {attribute.name} must be one of "
                f"{', '.join(choices)}, got {shown(value)}{_meant_key_choice(value, choices)}"
            )

    return check


def _to_enum(enum_type: type[enum.Enum], section: str, key: str, value: Any) -> Any:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(_lowered(value))
    except (ValueError, TypeError):
        values = [str(m.value) for m in enum_type]
        known = ", ".join(shown(v) for v in values)
        raise ValueError(
            f"[{section}] {key} must be one of {known}, got {shown(value)}"
            f"{_meant_key_choice(value, values)}"
        ) from None


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

    mailbox_capacity: int = attrs.field(
        default=1024,
        validator=_at_least(1, integer=True),
        metadata=_doc("messages an agent's mailbox holds before senders wait (per agent)"),
    )
    send_timeout_ms: float = attrs.field(
        default=500,
        validator=_positive,
        metadata=_doc("how long a send waits for room in a full mailbox before MailboxFull"),
    )
    handle_timeout_ms: float = attrs.field(
        default=30_000,
        validator=_positive,
        metadata=_doc("a handler running longer is cancelled and its message dead-lettered"),
    )
    request_timeout_ms: float = attrs.field(
        default=5_000,
        validator=_positive,
        metadata=_doc("default timeout of kernel.request / ctx.request (RequestTimeout)"),
    )
    overflow: OverflowPolicy = attrs.field(
        default=OverflowPolicy.BLOCK,
        converter=_to_overflow,
        metadata=_doc("full mailbox policy: block, drop_newest, drop_oldest or reject"),
    )
    shutdown_grace_ms: float = attrs.field(
        default=5_000,
        validator=_at_least(0),
        metadata=_doc("at shutdown, time agents get to drain before they are cancelled"),
    )
    batch_size: int = attrs.field(
        default=64,
        validator=_at_least(1, integer=True),
        metadata=_doc("messages an agent handles per wake-up before yielding (fairness)"),
    )
    dead_letter_buffer: int = attrs.field(
        default=1024,
        validator=_at_least(1, integer=True),
        metadata=_doc("recent dead letters kept for kernel.recent_dead_letters()"),
    )
    dead_letter_log_limit: int = attrs.field(
        default=100,
        validator=_at_least(0, integer=True),
        metadata=_doc(
            "dead-letter log lines a second of each reason; the rest are counted and said"
            " in one line a second (0 = a line for every dead letter)"
        ),
    )
    failure_log_limit: int = attrs.field(
        default=100,
        validator=_at_least(0, integer=True),
        metadata=_doc(
            "handler-failure log lines (with tracebacks) a second of each agent; the rest are"
            " counted and said in one line a second (0 = a line for every failure)"
        ),
    )
    log_kind_limit: int = attrs.field(
        default=200,
        validator=_at_least(0, integer=True),
        metadata=_doc(
            "log lines a second of each kind (handler failures, dead letters) over all its"
            " agents or reasons together; the rest are counted and said in one line a second"
            " (0 = no limit of the kind; a per-key limit of 0 lifts it for its kind too)"
        ),
    )
    gc_freeze: bool = attrs.field(
        default=True,
        validator=lambda inst, attribute, value: _boolean(inst, attribute, value),
        metadata=_doc(
            "move running agents' structures out of the cycle collector's scans (gc.freeze)"
        ),
    )

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
        default=RestartStrategy.ONE_FOR_ONE,
        converter=_to_strategy,
        metadata=_doc(
            "which children restart on a failure: one_for_one, one_for_all, rest_for_one"
        ),
    )
    max_restarts: int = attrs.field(
        default=3,
        validator=_at_least(0, integer=True),
        metadata=_doc("restarts allowed within within_ms before the failure escalates"),
    )
    within_ms: float = attrs.field(
        default=5_000,
        validator=_positive,
        metadata=_doc("window of the restart intensity (max_restarts)"),
    )
    backoff_initial_ms: float = attrs.field(
        default=10,
        validator=_at_least(0),
        metadata=_doc("delay before the first restart; doubles with each restart in a row"),
    )
    backoff_max_ms: float = attrs.field(
        default=5_000,
        validator=_at_least(0),
        metadata=_doc("upper bound of the restart delay"),
    )
    backoff_jitter: float = attrs.field(
        default=0.2,
        validator=_fraction,
        metadata=_doc("each delay is stretched by a random factor up to 1 + jitter (0 to 1)"),
    )
    backoff_reset_after_ms: float = attrs.field(
        default=30_000,
        validator=_at_least(0),
        metadata=_doc("a child running this long without failing starts from initial again"),
    )
    escalate_to_kernel: bool = attrs.field(
        default=False,
        validator=lambda inst, attribute, value: _boolean(inst, attribute, value),
        metadata=_doc(
            "what the root does with a child past its restart intensity: false stops that "
            "child for good and keeps serving the others; true shuts the kernel down (OTP)"
        ),
    )


@attrs.frozen
class RuntimeConfig:
    """``[runtime]``: threads for blocking calls (``ctx.run_sync``).

    ``max_blocking_threads`` bounds the threads that run blocking calls at once;
    ``worker_threads`` (0 = automatic) is kept for compatibility with the original: a
    Trio kernel runs its agents on one thread, so when it is set it caps
    ``max_blocking_threads`` too.
    """

    _section = "runtime"

    worker_threads: int = attrs.field(
        default=0,
        validator=_at_least(0, integer=True),
        metadata=_doc("0 = automatic; if set, also caps the threads of ctx.run_sync"),
    )
    max_blocking_threads: int = attrs.field(
        default=512,
        validator=_at_least(1, integer=True),
        metadata=_doc("blocking calls (ctx.run_sync) running in threads at once"),
    )

    @property
    def blocking_thread_limit(self) -> int:
        if self.worker_threads:
            return min(self.worker_threads, self.max_blocking_threads)
        return self.max_blocking_threads


@attrs.frozen
class LoggingConfig:
    """``[logging]``: level, format (``compact``, ``json`` or ``pretty``; ``full`` is
    ``compact``) and queue."""

    _section = "logging"

    level: str = attrs.field(
        default="info",
        metadata=_doc("trace, debug, info, warn(ing), error or critical"),
    )
    format: str = attrs.field(
        default="compact",
        converter=_to_log_format,
        validator=_one_of(LOG_FORMATS),
        metadata=_doc(
            "compact (one line), json (one object per line) or pretty (rich);"
            " full (the original's name) is compact"
        ),
    )
    queue: int = attrs.field(
        default=10000,
        validator=_at_least(0, integer=True),
        metadata=_doc(
            "records waiting for the writer thread of a file, pipe or terminal; "
            "0 = write each one at once"
        ),
    )

    @level.validator
    def _check_level(self, attribute: attrs.Attribute[str], value: str) -> None:
        if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
            raise ValueError(
                f"[logging] level must be one of {', '.join(LOG_LEVELS)}, got {shown(value)}"
            )


def _check_port(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(
            f"[{_section_of(inst)}] {attribute.name} must be an integer from 0 to 65535, "
            f"got {shown(value)}"
        )


def _boolean(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(
            f"[{_section_of(inst)}] {attribute.name} must be true or false, got {shown(value)}"
        )


def unbracketed(host: str) -> str:
    """``host`` as a socket takes it: an IPv6 address without the brackets a URL writes
    it in (``[::1]`` is ``::1``); any other ``host`` as it is."""
    inner = host[1:-1] if host.startswith("[") and host.endswith("]") else ""
    try:
        if isinstance(ipaddress.ip_address(inner), ipaddress.IPv6Address):
            return inner
    except ValueError:
        pass
    return host


def url_host(host: str) -> str:
    """``host`` as a URL or a ``Host`` header names it: an IPv6 address in brackets, its
    zone after ``%25`` (RFC 6874: ``%`` begins an escape in a URL), ``[fe80::1%25eth0]``,
    which ``urllib`` reads back as the zone ``eth0`` (it wrote ``[fe80::1%eth0]``, a URL
    that RFC 3986 and a browser or ``curl`` refuse)."""
    if ":" not in host or host.startswith("["):
        return host
    address, percent, zone = host.partition("%")
    return f"[{address}%25{zone}]" if percent else f"[{host}]"


def header_host(host: str) -> str:
    """``host`` as a ``Host`` header names it: as a URL does (:func:`url_host`), without an
    IPv6 zone, which means nothing to the server (RFC 6874 section 4: it is not sent;
    ``curl`` and ``http.client`` leave it out). ``urllib`` sent the URL's, which the
    metrics endpoint refused: ``400 bad request: the Host header is not a host[:port]``."""
    return url_host(host.partition("%")[0] if ":" in host else host)


#: what a host name has that a resolver is never asked for, and why (``--metrics-host
#: 0.0.0.0:9100`` wrote the port in it, ``http://x`` a URL)
_NOT_IN_A_HOST_NAME: Final = (
    ("/", "a host, not a URL"),
    ("[", "brackets are for an IPv6 address"),
    ("]", "brackets are for an IPv6 address"),
    (":", "a host name has no ':' (an IPv6 address has)"),
)
_WITH_A_PORT: Final = "a host, without its port: the port is given on its own"
_WILDCARD: Final = "a wildcard is no host: all interfaces are 0.0.0.0, or :: for IPv6 too"
#: the most characters of a host name, without a trailing dot (RFC 1035's 255 bytes of a
#: name as DNS sends it): a longer one no resolver looks up
HOST_NAME_MAX: Final = 253


def host_problem(host: str) -> str | None:
    """Why ``host`` is no address (IPv4, or IPv6 with or without brackets) nor a name a
    resolver can be asked, or None: blank; a ``:``, ``/``, bracket or blank in a name;
    a label that IDNA refuses (``x..y``, 64 characters, a byte that is not text), which
    raised ``UnicodeError`` in the thread that looked it up; a name past
    :data:`HOST_NAME_MAX` characters as DNS spells it (``a.`` 2,000 times: each label
    taken, the run failed late, the whole name echoed in its error)."""
    if not host.strip():
        return "blank"
    try:
        address = ipaddress.ip_address(unbracketed(host))
    except ValueError:
        pass
    else:
        return _zone_problem(address)
    head, colon, tail = host.rpartition(":")
    if colon and tail.isdigit() and (":" not in head or unbracketed(head) != head):
        return _WITH_A_PORT  # (0.0.0.0:9100, [::1]:9100)
    for character, why in _NOT_IN_A_HOST_NAME:
        if character in host:
            return why
    if any(c.isspace() for c in host):
        return "a host name has no blanks"
    if "*" in host:
        # (glibc's resolver takes a lone `*` as all interfaces, others look it up as a
        # name; the original had no metrics endpoint to be compatible with)
        return _WILDCARD
    odd = next((c for c in host if c.isascii() and not (c.isalnum() or c in "-_.")), None)
    if odd is not None:
        return f"a host name is letters, digits, '-', '_' and dots, not {odd!r}"
    try:
        spelt = host.encode("idna")
    except UnicodeError as exc:
        cause = exc.__cause__ or exc.__context__
        return str(cause) if cause is not None and str(cause) else "not a host name"
    length = len(spelt.removesuffix(b"."))
    if length > HOST_NAME_MAX:
        return f"a host name has at most {HOST_NAME_MAX} characters, this one {length:,}"
    return _idna_2008_problem(host)


#: what an IPv6 zone (``fe80::1%eth0``) is: an interface's name or index, ASCII without
#: blanks; a URL writes it after ``%25`` (RFC 6874)
_ZONE: Final = re.compile(r"[!-~]+")
#: what a URL carries of a zone as it is (RFC 6874's ZoneID: RFC 3986's unreserved)
_URL_ZONE: Final = re.compile(r"[A-Za-z0-9._~-]+")
#: the most of this host's interfaces a refused zone's error names (a host of containers
#: has hundreds)
_ZONES_SHOWN: Final = 8


def _zone_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why the zone of an IPv6 ``address`` is none, or None: ``ipaddress`` takes any text
    after the ``%`` (``fe80::1%☃``, ``fe80::1%a b``), which the run's listener then failed
    to look up, late (``Name or service not known``); an interface's name or index is
    ASCII without blanks (Linux's are at most 15 bytes, none of them ``/`` or a blank).
    A character a URL writes escaped (``]``, ``#``, ``?``, ``%``: RFC 6874's zone is
    RFC 3986's unreserved) is refused too: no interface is named so in practice, and the
    URL written of it (``http://[fe80::1%25a]b]:P``) was none. A zone this host has no
    interface of (``socket.if_nametoindex``), and that is no index (a number), is refused:
    the config is loaded where it runs (``deploy.sh`` checks it there), and the listener
    failed late on it (``%25eth0``, copied from a URL, is told to write ``%eth0``). So
    is an index no interface of this host has (``%999``: review of the fifty-sixth pass),
    and a name on an address that is not link-local (``::1%lo``), which getaddrinfo
    does not look up: each loaded and failed the run late, as the name rule's did."""
    if not isinstance(address, ipaddress.IPv6Address) or address.scope_id is None:
        return None
    zone = address.scope_id
    if not _ZONE.fullmatch(zone):
        odd = next(c for c in zone if not _ZONE.fullmatch(c))
        return f"an IPv6 zone is an interface's name or index, ASCII without blanks, not {odd!r}"
    if not _URL_ZONE.fullmatch(zone):
        odd = next(c for c in zone if not _URL_ZONE.fullmatch(c))
        return (
            "an IPv6 zone is an interface's name or index: letters, digits, '-', '.', '_'"
            f" and '~' (as a URL writes it, RFC 6874), not {odd!r}"
        )
    if zone.isdigit():
        return _index_problem(zone)
    try:
        index = socket.if_nametoindex(zone)
    except OSError:
        pass
    else:
        if not _link_local(address):
            return (
                f"a zone naming an interface ({cut(zone, repr)}) is looked up for a"
                f" link-local address only (fe80::/10), as getaddrinfo does: write its"
                f" index, %{index}, or no zone"
            )
        return None
    hint = (
        f"; %25 is how a URL writes the %: write %{cut(zone[2:])}"
        if zone.startswith("25") and len(zone) > 2
        else ""
    )
    return f"no interface of this host is named {cut(zone, repr)}{_interfaces()}{hint}"


#: the largest interface index (an ``unsigned int``: getaddrinfo takes no larger zone)
_INDEX_MAX: Final = 2**32 - 1


def _index_problem(zone: str) -> str | None:
    """Why the zone ``zone`` (digits) is no index of an interface of this host, or None:
    ``fe80::1%999`` loaded and failed the run late (``No such device``), and a zone past
    an ``unsigned int`` (``Name or service not known``), where a name this host has no
    interface of is refused at load."""
    index = int(zone) if len(zone) <= len(str(_INDEX_MAX)) else _INDEX_MAX + 1
    if index <= _INDEX_MAX:
        try:
            socket.if_indextoname(index)
        except OSError:
            pass
        else:
            return None
    return f"no interface of this host has the index {cut(zone)}{_interfaces()}"


def _interfaces() -> str:
    """`` (its interfaces: lo 1, eth0 2)``: this host's interfaces and their indexes, up
    to :data:`_ZONES_SHOWN` of them, for the error of a zone naming none; empty when it
    has none, or they cannot be listed."""
    try:
        known = socket.if_nameindex()
    except OSError:
        return ""
    if not known:
        return ""
    shown_names = ", ".join(f"{name} {index}" for index, name in known[:_ZONES_SHOWN])
    more = ", ..." if len(known) > _ZONES_SHOWN else ""
    return f" (its interfaces: {shown_names}{more})"


def _link_local(address: ipaddress.IPv6Address) -> bool:
    """Whether getaddrinfo looks up a zone naming an interface of ``address`` (glibc's
    and musl's ``__inet6_scopeid_pton``/``__lookup_ipliteral``: link-local unicast
    ``fe80::/10``, link- and interface-local multicast ``ff02::``, ``ff01::``); for any
    other address a zone is an index, and ``::1%lo`` failed the run late (``Name or
    service not known``)."""
    top = int(address) >> 112
    return address.is_link_local or (top >> 8 == 0xFF and top & 0xF in (1, 2))


def _check_host(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"[{_section_of(inst)}] {attribute.name} must be a non-empty string, got {shown(value)}"
        )
    problem = host_problem(value)
    if problem is not None:
        raise ValueError(
            f"[{_section_of(inst)}] {attribute.name} must be an address or a host name,"
            f" got {shown(value)} ({problem})"
        )


def _idna_2008_problem(host: str) -> str | None:
    """Why Trio, which the metrics endpoint listens with, cannot look ``host`` up, where
    Python's IDNA 2003 codec took it: an international name IDNA 2008 refuses
    (``☃.net``: ``U+2603 ... not allowed``), which loaded and failed the run, exit 1,
    and which ``nexus health --host`` asked for and called ``unreachable``. Trio encodes
    a name that is not ASCII with the ``idna`` package (its dependency), UTS 46 mapping
    on (``trio.socket.getaddrinfo``); so is it asked here, and so does
    :func:`ascii_host` spell it for a request."""
    if host.isascii():
        return None
    import idna  # (Trio's own import of it, not a second one: Trio is imported first)

    try:
        idna.encode(host, uts46=True)
    except UnicodeError as exc:  # (idna.IDNAError is one)
        return str(exc) or "not a host name"
    return None


def ascii_host(host: str) -> str:
    """``host`` as a request asks for it: an international name in its ASCII form, as
    Trio encodes it to listen (IDNA 2008, UTS 46: ``bücher.example`` is
    ``xn--bcher-kva.example``, ``ß.de`` is ``xn--zca.de``, where Python's IDNA 2003
    codec, which ``urllib`` uses, asks for ``ss.de``); an address or an ASCII name as
    it is. ``host`` is one :func:`host_problem` took."""
    if host.isascii():
        return host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        import idna

        return str(idna.encode(host, uts46=True), "ascii")
    return host  # (an IPv6 address with a zone that is not ASCII: fe80::1%é)


def _unbracketed(value: Any) -> Any:
    # (a converter: it sees any value, which the validator then checks)
    return unbracketed(value) if isinstance(value, str) else value


@attrs.frozen
class MetricsConfig:
    """``[metrics]``: the optional Prometheus endpoint of ``nexus run``.

    A scrape costs O(1) in the number of agents unless ``per_agent`` is set; then the
    ``per_agent_limit`` agents with the deepest mailboxes get series of their own.
    """

    _section = "metrics"

    port: int = attrs.field(
        default=0,
        validator=_check_port,
        metadata=_doc("TCP port of /metrics, /healthz and /readyz; 0 = no endpoint"),
    )
    host: str = attrs.field(
        default="127.0.0.1",
        converter=_unbracketed,
        validator=_check_host,
        metadata=_doc("address the metrics endpoint listens on"),
    )
    per_agent: bool = attrs.field(
        default=False,
        validator=_boolean,
        metadata=_doc("also export per-agent series (costs O(agents) per scrape; off by default)"),
    )
    per_agent_limit: int = attrs.field(
        default=1000,
        validator=_at_least(1, integer=True),
        metadata=_doc("with per_agent: export only this many agents, the deepest mailboxes first"),
    )
    cache_ms: float = attrs.field(
        default=1000,
        validator=_at_least(0),
        metadata=_doc("scrapes within this many ms share one render; 0 = share concurrent only"),
    )
    max_connections: int = attrs.field(
        default=32,
        validator=_at_least(1, integer=True),
        metadata=_doc("connections the endpoint keeps open at once; the next wait in the backlog"),
    )
    group_port: int = attrs.field(
        default=0,
        validator=_check_port,
        metadata=_doc(
            "with nexus run --workers: the parent's port of /metrics, /healthz and /readyz"
            " for the whole group (--group-port); 0 = none; a single run ignores it"
        ),
    )


def _to_commands(value: Any) -> Any:
    # One command may be written as a plain string; anything else is checked below.
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return list(value)
    return value


def is_app_reference(text: str) -> bool:
    """Whether ``text`` reads as a ``package.module:attr`` reference, as ``--app`` and
    ``[app] app`` take one."""
    module, colon, attr = text.partition(":")
    # (Python's identifiers, as ``import`` takes them: also ``é``, ``日本``, where an ASCII
    # pattern refused them, though ``python -c "import é"`` imports ``é.py``)
    return bool(colon) and all(
        name.isidentifier() for name in (*module.split("."), *attr.split("."))
    )


def _meant_app_reference(value: str) -> tuple[str, bool, bool] | None:
    """The reference ``value`` likely meant (see :func:`app_reference_hint`), whether
    ``value`` was written as a file, and whether the object is a placeholder (``NAME``)."""
    text = value.strip()
    placeholder = ":" not in text and (_is_file(text) or text.isidentifier())
    if placeholder:
        # (no object named: its '.py' is no attribute 'py')
        module, sep, attr = text, ":", "NAME"
    else:
        module, sep, attr = text.rpartition(":") if ":" in text else text.rpartition(".")
    if not sep:
        return None
    as_file = _is_file(module)
    if as_file:
        module = module.removesuffix(".py").replace("\\", "/")
        module = ".".join(part for part in module.split("/") if part not in ("", "."))
    guess = f"{module}:{attr}"
    if guess == value or not is_app_reference(guess):
        return None
    return guess, as_file, placeholder


def meant_app_reference(value: str) -> str | None:
    """The ``package.module:attr`` reference ``value`` likely meant, one that names its
    object (``myagents.py:app``: ``myagents:app``), else None."""
    meant = _meant_app_reference(value)
    return None if meant is None or meant[2] else meant[0]


def app_reference_hint(value: str) -> str:
    """What to append to an error about ``value``, a ``package.module:attr`` reference that
    did not work: the reference it likely meant, if there is one (``myagents.py:app``,
    ``./pkg/agents.py:app`` written as a file; ``myagents.app``, a dot for the colon;
    ``myagents:app `` with a stray space; ``myagents.py`` alone, a file without the
    object: ``myagents:NAME``, and ``myagents`` alone, a module without it), else ''."""
    meant = _meant_app_reference(value)
    if meant is None:
        return ""
    guess, as_file, placeholder = meant
    hint = f"; did you mean {cut(guess, repr)}?"
    if not as_file:
        return hint + (" (NAME: the object in it to run)" if placeholder else "")
    hint += " (a module name, as 'python -m' takes it, not a file"
    return hint + ("; NAME: the object in it to run)" if placeholder else ")")


def _is_file(module: str) -> bool:
    """Whether ``module`` (of an ``--app`` reference) is written as a file or a path."""
    return module.endswith(".py") or "/" in module or "\\" in module


def _check_app(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not is_app_reference(value):
        hint = app_reference_hint(value) if isinstance(value, str) else ""
        raise ValueError(
            f"[app] {attribute.name} must look like 'package.module:attr', got {shown(value)}{hint}"
        )


def _check_commands(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, list) or not all(
        isinstance(command, str) and command.strip() for command in value
    ):
        raise ValueError(
            f"[app] {attribute.name} must be a list of non-empty command strings, got {shown(value)}"
        )


@attrs.frozen
class AppConfig:
    """``[app]``: what ``nexus run`` runs when its flags are absent."""

    _section = "app"

    app: str | None = attrs.field(
        default=None,
        validator=_check_app,
        metadata=_doc("your agents as 'package.module:attr'; unset = the built-in demo workload"),
    )
    types: str | None = attrs.field(
        default=None,
        validator=_check_app,
        metadata={
            **_doc(
                "agent types as 'package.module:attr' (a dict: type name -> @agent spec or"
                " Agent subclass), registered before the node joins; needs a cluster"
            ),
            "example": "myproject.agents:TYPES",
        },
    )
    spawn: list[str] = attrs.field(
        factory=list,
        converter=_to_commands,
        validator=_check_commands,
        metadata=_doc("commands of external agent processes (NDJSON bridge) to spawn"),
    )
    agents: int = attrs.field(
        default=1000,
        validator=_at_least(1, integer=True, maximum=(MAX_AGENTS, "the most one run takes")),
        metadata=_doc(f"number of agents of the demo workload (1 to {MAX_AGENTS})"),
    )
    duration: float = attrs.field(
        default=0.0,
        validator=_at_least(0),
        metadata=_doc("seconds to run; 0 = until Ctrl-C / SIGTERM"),
    )
    workload: str = attrs.field(
        default="ring",
        converter=_to_workload,
        validator=_one_of(WORKLOADS),
        metadata=_doc("demo workload: ring, fanout, request or pool"),
    )


# --- [nats]: how `nexus run --nats` / join_cluster reach NATS (owned by nexus_trio._nats) ---


def _check_optional_text(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(
            f"[{_section_of(inst)}] {attribute.name} must be a non-empty string or unset,"
            f" got {shown(value)}"
        )


def _unset_or(check: Any) -> Any:
    def optional(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            check(inst, attribute, value)

    return optional


def _nats_key(doc: str, example: str, *, secret: bool = False) -> Any:
    # ``example``: the commented value in the template; ``secret``: `nexus config show`
    # prints that the key is set, never its value.
    metadata = {**_doc(doc), "example": example, "secret": secret}
    return attrs.field(default=None, validator=_check_optional_text, metadata=metadata)


@attrs.frozen
class NatsConfig:
    """``[nats]``: the NATS server and credentials (keep secrets here or in env, not argv),
    and how long its connection may be down (``server_lost_wait``, the
    ``ClusterOptions`` field of that name, which :func:`join_cluster` takes from here
    when it is given no ``options``)."""

    _section = "nats"

    url: str | None = _nats_key(
        "server URL(s), comma-separated; --nats overrides it", "nats://127.0.0.1:4222"
    )
    user: str | None = _nats_key("user name for user/password auth", "nexus")
    password: str | None = _nats_key("password (or NEXUS_NATS__PASSWORD)", "...", secret=True)
    token: str | None = _nats_key("auth token (or NEXUS_NATS__TOKEN)", "...", secret=True)
    creds_file: str | None = _nats_key(
        "credentials file (user JWT + NKEY seed)", "/etc/nexus/nats.creds"
    )
    nkey_seed: str | None = _nats_key("file holding an NKEY user seed", "/etc/nexus/nats.nk")
    tls_ca: str | None = _nats_key(
        "CA certificate file (PEM) to verify the server", "/etc/nexus/nats-ca.pem"
    )
    tls_cert: str | None = _nats_key(
        "client certificate file (PEM), with tls_key", "/etc/nexus/nats-client.pem"
    )
    tls_key: str | None = _nats_key(
        "client private key file (PEM), with tls_cert", "/etc/nexus/nats-client-key.pem"
    )
    server_lost_wait: float | None = attrs.field(
        default=None,
        validator=_unset_or(_at_least(0)),
        metadata={
            **_doc(
                "seconds a NATS connection may stay down (a failover, a restarted server)"
                " before a node's leave gives up what needs it and a --workers worker fails"
                " (NatsServerLost); unset = [cluster] heartbeat_interval x"
                " missed_heartbeats (5); raise it above how long your servers take to fail"
                " over"
            ),
            "example": 30.0,
        },
    )


# --- [cluster] and [durable]: the ClusterOptions and DurableOptions of a join (owned by
# nexus_trio._nats, which builds its options from them: ClusterOptions.from_config) ---


class CrossKeyError(ValueError):
    """A value valid alone that a rule across keys refuses (``[durable] max_age`` below
    ``duplicate_window``): ``keys`` are the ``"section.key"`` names of the rule, which
    :func:`nexus_trio.config.load_config` says where each was set."""

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.keys = keys


#: A NATS subject token (``[cluster] prefix``): nexus_trio._nats checks the same.
_SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
#: the longest cluster prefix: JetStream takes stream names of at most 255 characters,
#: and the longest a cluster makes is ``KV_<prefix>-placed`` (its placed agents' bucket);
#: past it the join failed saying the server had no usable JetStream
CLUSTER_PREFIX_MAX: Final = 245


def prefix_too_long(value: str) -> str:
    """Why cluster prefix ``value`` (a subject token) is too long, or ""."""
    if len(value) <= CLUSTER_PREFIX_MAX:
        return ""
    return (
        f"is {len(value)} characters long (at most {CLUSTER_PREFIX_MAX}: JetStream names a"
        " stream at most 255 characters, and the cluster's KV bucket KV_<prefix>-placed is one)"
    )


def _check_prefix(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not _SUBJECT_TOKEN.fullmatch(value):
        raise ValueError(
            f"[{_section_of(inst)}] {attribute.name} must be letters, digits, '-' or '_'"
            f" (it is part of NATS subjects), got {shown(value)}"
        )
    if why := prefix_too_long(value):
        raise ValueError(f"[{_section_of(inst)}] {attribute.name} {why}")


def _key(default: Any, check: Any, doc: str, example: Any = None) -> Any:
    # ``example``: the commented value of an unset key in the template
    metadata: dict[str, Any] = _doc(doc)
    if example is not None:
        metadata["example"] = example
    return attrs.field(default=default, validator=check, metadata=metadata)


_COUNT = _at_least(1, integer=True)


@attrs.frozen
class ClusterConfig:
    """``[cluster]``: membership, heartbeats, connection, bounds and leave of a node.

    The fields of ``ClusterOptions`` of the same names (times in seconds), which ``nexus
    run --nats``, each ``--workers`` worker and ``join_cluster`` without ``options`` use
    (``ClusterOptions.from_config``)."""

    _section = "cluster"

    prefix: str = _key(
        "nexus",
        _check_prefix,
        "first token of the cluster's NATS subjects and buckets; every node of a cluster"
        " uses the same (another prefix: another cluster on the same servers)",
    )
    heartbeat_interval: float = _key(1.0, _positive, "seconds between a node's heartbeats")
    missed_heartbeats: int = _key(
        5, _COUNT, "heartbeats missed in a row before the others judge a node lost"
    )
    kv_replicas: int = _key(
        1,
        _COUNT,
        "replicas of the cluster's KV buckets and durable stream (3 on a 3-server NATS"
        " cluster); used by the node that makes them",
    )
    connect_timeout: float = _key(2.0, _positive, "seconds one attempt to reach NATS may take")
    connect_attempts: int = _key(2, _COUNT, "attempts to reach NATS at the join")
    join_timeout: float = _key(15.0, _positive, "seconds the whole join may take")
    reconnect_wait: float = _key(
        0.2, _at_least(0), "seconds between attempts to reconnect a lost connection"
    )
    max_reconnect_attempts: int = _key(
        -1, _at_least(-1, integer=True), "attempts to reconnect a lost connection (-1 = forever)"
    )
    outbox_high_water: int = _key(
        4096, _COUNT, "messages waiting for NATS past which send waits (per node)"
    )
    outbox_limit: int = _key(
        65536, _COUNT, "messages waiting for NATS past which send_nowait raises"
    )
    inbound_limit: int = _key(
        65536, _COUNT, "messages received and not yet delivered past which they are refused"
    )
    parked_limit: int = _key(
        4096, _COUNT, "messages waiting for room in full local mailboxes past which refused"
    )
    node_window: int = _key(
        8192, _COUNT, "tells to one node not yet taken there (credit; measured default)"
    )
    batch_frames: int = _key(
        512, _COUNT, "a node batch is sent at this many messages (measured default)"
    )
    batch_bytes: int = _key(
        256 * 1024, _COUNT, "a node batch is sent at this many bytes (measured default)"
    )
    inbound_streams_limit: int = _key(
        4096, _COUNT, "sending joins of other nodes kept; past it the least active is evicted"
    )
    forget_lost_after: float = _key(
        300.0, _positive, "seconds a lost member stays in the member table"
    )
    last_notice_wait: float | None = _key(
        None,
        _unset_or(_positive),
        "seconds a node awaits the last notice of a node that left; unset ="
        " [nats] server_lost_wait + 13; must be above [nats] server_lost_wait",
        # (above the [nats] example's 30 s: both uncommented load)
        60.0,
    )
    notice_wait_at_leave: float = _key(
        2.0, _at_least(0), "seconds a leave waits for the last notices it still awaits"
    )


@attrs.frozen
class DurableConfig:
    """``[durable]``: the at-least-once path over JetStream (``send_durable``).

    The fields of ``DurableOptions`` of the same names (times in seconds), which
    ``ClusterOptions.from_config`` puts in the options' ``durable``."""

    _section = "durable"

    enabled: bool = _key(
        True, _boolean, "run the durable path (false: no stream, no consumer, no durable sends)"
    )
    ack_wait: float = _key(
        30.0,
        _jetstream_seconds(_positive),
        "seconds a handler has before JetStream delivers the message again",
    )
    max_deliver: int = _key(5, _COUNT, "deliveries of a message before it is dead")
    redelivery_delay: float = _key(
        0.1, _jetstream_seconds(_at_least(0)), "seconds before a failed message is delivered again"
    )
    max_in_flight: int = _key(
        64,
        _at_least(1, integer=True, maximum=(DURABLE_IN_FLIGHT_MAX, _ACK_PENDING)),
        "durable messages a node handles at once",
    )
    duplicate_window: float = _key(
        120.0,
        _jetstream_seconds(_positive),
        "seconds JetStream refuses a resent message of the same id",
    )
    max_age: float | None = _key(
        None,
        _unset_or(_jetstream_seconds(_positive)),
        "seconds a stored message is kept, taken or not (unset = no bound);"
        " at least duplicate_window",
        86400.0,
    )
    max_messages: int | None = _key(
        None,
        _unset_or(_COUNT),
        "messages the stream stores; a send past it is refused (unset = no bound)",
        1_000_000,
    )
    missing_agent_delay: float = _key(
        1.0,
        _jetstream_seconds(_at_least(0)),
        "seconds a message for a name no agent has here waits; doubles each delivery",
    )
    missing_agent_delay_max: float = _key(
        15.0,
        _jetstream_seconds(_at_least(0)),
        "upper bound of that delay; at least missing_agent_delay",
    )
    max_waiting: int = _key(
        10_000,
        _at_least(0, integer=True, maximum=(DURABLE_WAITING_MAX, _ACK_PENDING)),
        "messages that may wait for their agent at once; one more is dead at once",
    )

    def __attrs_post_init__(self) -> None:
        if self.missing_agent_delay_max < self.missing_agent_delay:
            raise CrossKeyError(
                f"[durable] missing_agent_delay_max ({shown(self.missing_agent_delay_max)})"
                f" must be at least [durable] missing_agent_delay"
                f" ({shown(self.missing_agent_delay)}): it caps the delay that grows from it",
                "durable.missing_agent_delay_max",
                "durable.missing_agent_delay",
            )
        if self.max_age is not None and self.max_age < self.duplicate_window:
            raise CrossKeyError(
                f"[durable] max_age ({shown(self.max_age)}) must be at least [durable]"
                f" duplicate_window ({shown(self.duplicate_window)}): JetStream refuses a"
                " stream that forgets a message before the ids it keeps to refuse a resent one",
                "durable.max_age",
                "durable.duplicate_window",
            )


#: seconds ``ClusterOptions.last_notice_wait`` left out adds to ``server_lost_wait``
#: (nexus_trio._nats' ``_LAST_NOTICE_MARGIN``; a test checks that they agree)
LAST_NOTICE_MARGIN = 13.0


def loss_window(heartbeat_interval: float, missed_heartbeats: int) -> float:
    """Seconds the other members still hold a silent node reachable: what
    ``server_lost_wait`` left unset is (``ClusterOptions`` and ``[nats]`` alike)."""
    return float(heartbeat_interval * missed_heartbeats)


def server_lost_wait_of(config: Config) -> float:
    """``[nats] server_lost_wait`` as a node joined from ``config`` uses it: as set, else
    the ``[cluster]`` heartbeats' :func:`loss_window` (5 s at their defaults)."""
    given = config.nats.server_lost_wait
    if given is None:
        return loss_window(config.cluster.heartbeat_interval, config.cluster.missed_heartbeats)
    return given


def derived_when_unset(config: Config, dotted: str) -> str | None:
    """What a key left unset stands for in ``config``, for ``nexus config show``
    (``"5.0 = [cluster] heartbeat_interval x missed_heartbeats"``), or None for a key
    that derives nothing."""
    if dotted == "nats.server_lost_wait":
        return f"{server_lost_wait_of(config)!r} = [cluster] heartbeat_interval x missed_heartbeats"
    if dotted == "cluster.last_notice_wait":
        return (
            f"{server_lost_wait_of(config) + LAST_NOTICE_MARGIN!r} = [nats] server_lost_wait"
            f" + {LAST_NOTICE_MARGIN:g}"
        )
    return None


#: the periodic sweep of the durable stream for messages no node pulls comes this many
#: ``last_notice_wait`` apart (72 s at the defaults; nexus_trio._nats' ``SWEEP_LOOKS``)
DURABLE_SWEEP_LOOKS = 4


def max_age_below_sweep(
    max_age: float | None, last_notice_wait: float, *, age: str, wait: str, derived: str = ""
) -> str | None:
    """A warning when a durable ``max_age`` is not above the sweep's period
    (``DURABLE_SWEEP_LOOKS x last_notice_wait``); else None. ``age`` and ``wait`` are the
    two keys' names as the caller knows them (``[durable] max_age``,
    ``DurableOptions.max_age``), ``derived`` what the wait left unset is. A message stored for a node gone for good after a look
    found nothing waits for the next periodic sweep: one whose ``max_age`` ends first
    goes uncounted. A warning, not an error: the values are valid, and a cluster whose
    senders never outlive a gone node's ``last_notice_wait`` never has such a message."""
    period = DURABLE_SWEEP_LOOKS * last_notice_wait
    if max_age is None or max_age > period:
        return None
    return (
        f"{age} ({max_age:g}s) is not above the durable sweep's period, {DURABLE_SWEEP_LOOKS}"
        f" x {wait} ({derived}{last_notice_wait:g}s) = {period:g}s: a durable message stored for a"
        " node gone for good after its look found nothing can reach its max_age before"
        f" the sweep that takes it over, and goes uncounted; raise {age} well above"
        f" {period:g}s (or lower {wait})"
    )


def durable_max_age_warning(config: Config) -> str | None:
    """:func:`max_age_below_sweep` of ``config``: ``[durable] max_age`` against ``[cluster]
    last_notice_wait`` (as set, else derived from ``server_lost_wait``)."""
    if not config.durable.enabled:
        return None
    given = config.cluster.last_notice_wait
    wait = server_lost_wait_of(config) + LAST_NOTICE_MARGIN if given is None else given
    return max_age_below_sweep(
        config.durable.max_age,
        wait,
        age="[durable] max_age",
        wait="[cluster] last_notice_wait",
        derived=""
        if given is not None
        else f"unset: [nats] server_lost_wait + {LAST_NOTICE_MARGIN:g} = ",
    )


#: the sections whose values :func:`config_warnings` reads (a warning names their keys)
WARNED_SECTIONS: Final = ("nats", "cluster", "durable")

#: each warning a load said, by its words and the identity of each of the loaded
#: config's sections of :data:`WARNED_SECTIONS`, to that section (see :func:`not_said_by_a_load`)
_SAID_BY_LOADS: weakref.WeakValueDictionary[tuple[int, str], Any] = weakref.WeakValueDictionary()


def mark_said_by_a_load(config: Config) -> None:
    """Remember that ``config``'s load said its warnings (``load_config`` does, also
    with ``log_warnings=False``: its ``warnings`` hold them for the caller to say), and
    which of its sections they came with, for as long as those sections live."""
    for said in config_warnings(config):
        for name in WARNED_SECTIONS:
            section = getattr(config, name)
            _SAID_BY_LOADS[id(section), said] = section


def not_said_by_a_load(config: Config) -> tuple[str, ...]:
    """What :func:`config_warnings` says of ``config`` that no load said of it: a warning
    is said already when a load said the same words (the same keys with the same values)
    of a config that shares one of these sections with ``config`` (the same object: the
    config itself, or one ``attrs.evolve`` made of it, which keeps the sections it does
    not replace). One built in Python on its own, or a value changed so that the words
    change, is said."""
    sections = [getattr(config, name) for name in WARNED_SECTIONS]
    return tuple(
        said
        for said in config_warnings(config)
        if not any(_SAID_BY_LOADS.get((id(section), said)) is section for section in sections)
    )


def config_warnings(config: Config) -> tuple[str, ...]:
    """The valid but doubtful values of ``config``, in its keys' words: the checks of
    a load that are no error (:func:`short_server_lost_wait`,
    :func:`durable_max_age_warning`)."""
    said = (short_server_lost_wait(config), durable_max_age_warning(config))
    return tuple(warning for warning in said if warning is not None)


def short_server_lost_wait(config: Config) -> str | None:
    """A warning when ``[nats] server_lost_wait`` (as set, or derived from the
    heartbeats) is above 0 and not above ``[cluster] reconnect_wait``; else None.

    NATS clients try a lost server again at once, then once every ``reconnect_wait``: a
    killed and restarted nats-server was reconnected to after one ``reconnect_wait``
    (0.205 to 0.223 s at 0.2, 2.005 to 2.007 s at 2.0), so a wait no longer than it
    gives up every outage but the shortest, a restart included. A warning, not an error:
    the values are valid (0 gives up at once, as documented, and says nothing), and a
    wait above it may still be shorter than a failover of your servers, which only you
    know."""
    wait, reconnect = server_lost_wait_of(config), config.cluster.reconnect_wait
    if not 0 < wait <= reconnect:
        return None
    given = config.nats.server_lost_wait
    cluster = config.cluster
    what = (
        f"[nats] server_lost_wait ({shown(given)})"
        if given is not None
        else f"[nats] server_lost_wait, unset, is [cluster] heartbeat_interval x"
        f" missed_heartbeats ({shown(cluster.heartbeat_interval)} x"
        f" {shown(cluster.missed_heartbeats)} = {wait:g}), which"
    )
    return (
        f"{what} is not above [cluster] reconnect_wait ({shown(reconnect)}): a node gives"
        " up a lost NATS connection before its second attempt to reconnect, so even a"
        " restart of the server is not ridden out (a --workers worker fails with"
        " NatsServerLost); set [nats] server_lost_wait above reconnect_wait and above how"
        " long your servers take to fail over"
    )


def check_across_sections(config: Config) -> None:
    """The rules across keys of two sections: ``[cluster] last_notice_wait`` above ``[nats]
    server_lost_wait`` (else :class:`CrossKeyError` naming both); left unset, the wait
    derived from ``server_lost_wait`` too (a wait so large, beyond 10**17 s, that adding
    13 s to it changes no float would be refused by the options at the join).
    ``server_lost_wait`` unset is the heartbeats' :func:`loss_window`, and the error then
    names ``[cluster] heartbeat_interval`` and ``missed_heartbeats`` too."""
    given, lost_wait = config.cluster.last_notice_wait, server_lost_wait_of(config)
    lost_keys: tuple[str, ...] = ("nats.server_lost_wait",)
    derived = ""
    if config.nats.server_lost_wait is None:
        lost_keys += ("cluster.heartbeat_interval", "cluster.missed_heartbeats")
        derived = (
            "; [nats] server_lost_wait is unset, so it is [cluster] heartbeat_interval x"
            " missed_heartbeats: set it, or lower those"
        )
    if given is None and not lost_wait + LAST_NOTICE_MARGIN > lost_wait:
        raise CrossKeyError(
            f"[nats] server_lost_wait ({shown(lost_wait)}) is too large: [cluster]"
            f" last_notice_wait, unset, is server_lost_wait + {LAST_NOTICE_MARGIN:g}, which"
            " must be above it and is not (a float that large ignores the addition);"
            f" lower server_lost_wait{derived}",
            *lost_keys,
            "cluster.last_notice_wait",
        )
    if given is not None and not given > lost_wait:
        raise CrossKeyError(
            f"[cluster] last_notice_wait ({shown(given)}) must be above [nats]"
            f" server_lost_wait ({shown(lost_wait)}): a leave riding out a failover sends"
            " its last notice up to server_lost_wait late; raise last_notice_wait, or leave"
            f" it unset (server_lost_wait + 13){derived}",
            "cluster.last_notice_wait",
            *lost_keys,
        )


def _section_object(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A ``Config`` section is its config object: a dict (``Config(kernel={...})``) was
    taken and failed far from here, at ``open_kernel`` (``AttributeError: 'dict' object
    has no attribute 'dead_letter_buffer'``)."""
    wanted = SECTIONS[attribute.name]
    if isinstance(value, wanted):
        return
    name = wanted.__name__
    how = f"Config({attribute.name}={name}(...))"
    if isinstance(value, dict):
        keys = ", ".join(f"{key}={item!r}" for key, item in value.items())
        how = f"Config({attribute.name}={name}({keys}))"
    raise TypeError(
        f"Config {attribute.name}= must be a {name}, got {type(value).__name__}"
        f" {shown(value)}: write {how}"
    )


@attrs.frozen
class Config:
    """The whole configuration; ``Config()`` is the embedded defaults.

    Each section is its own config object (``Config(kernel=KernelConfig(...))``); anything
    else, a mapping of its keys among them, is a ``TypeError`` naming the section.
    """

    kernel: KernelConfig = attrs.field(factory=KernelConfig, validator=_section_object)
    supervision: SupervisionConfig = attrs.field(
        factory=SupervisionConfig, validator=_section_object
    )
    runtime: RuntimeConfig = attrs.field(factory=RuntimeConfig, validator=_section_object)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig, validator=_section_object)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig, validator=_section_object)
    app: AppConfig = attrs.field(factory=AppConfig, validator=_section_object)
    nats: NatsConfig = attrs.field(factory=NatsConfig, validator=_section_object)
    cluster: ClusterConfig = attrs.field(factory=ClusterConfig, validator=_section_object)
    durable: DurableConfig = attrs.field(factory=DurableConfig, validator=_section_object)

    def __attrs_post_init__(self) -> None:
        check_across_sections(self)


#: The TOML sections in file order, each with the class of its table.
SECTIONS: dict[str, type[Any]] = {
    "kernel": KernelConfig,
    "supervision": SupervisionConfig,
    "runtime": RuntimeConfig,
    "logging": LoggingConfig,
    "metrics": MetricsConfig,
    "app": AppConfig,
    "nats": NatsConfig,
    "cluster": ClusterConfig,
    "durable": DurableConfig,
}
