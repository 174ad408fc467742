"""Agents as users write them: ``@agent`` on a handler, or a class with ``handle``.

An :class:`AgentSpec` is a recipe: how to build a fresh behaviour (the state that a
restart throws away) plus the agent's limits (mailbox capacity, handle timeout,
overflow policy) and its place under a supervisor (restart type, shutdown timeout).
One spec can be spawned many times. :class:`Context` is everything a running handler
may touch.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
import unicodedata
import uuid
import weakref
from collections.abc import Callable, Collection, Coroutine, Mapping, MutableMapping, Sequence
from threading import get_ident
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, cast, final, overload

import attrs
import trio

from ._brief import brief
from ._child import Directive as Directive
from ._child import RestartType as RestartType
from ._child import enum_member, to_restart
from ._config import OverflowPolicy
from ._errors import AgentNotRunning, NexusError, nearest
from ._logfields import log_fields as log_fields
from ._message import Address, Message, MessageKind, kind_error, new_message, new_query
from ._router import wrong_thread

if TYPE_CHECKING:
    from ._kernel import Kernel
    from ._router import Router
    from ._supervisor import Supervisor


Handler = Callable[["Context", Message], Coroutine[Any, Any, Any]]


class Behaviour(Protocol):
    """What a spec's factory builds for each run of an agent."""

    @property
    def handle(self) -> Handler: ...

    async def on_start(self, ctx: Context) -> None: ...

    async def on_stop(self, ctx: Context) -> None: ...


class Agent:
    """Base class for agents with state and lifecycle.

    Subclass it and override :meth:`handle` (required), :meth:`on_start` and
    :meth:`on_stop`. A fresh instance is created for every run: a restart starts from
    ``__init__`` again. ``__init__`` must take no arguments (use a factory with
    :func:`agent` for parameters)::

        @agent(name="counter")
        class Counter(Agent):
            def __init__(self) -> None:
                self.count = 0

            async def handle(self, ctx, msg):
                self.count += 1
                return {"count": self.count}
    """

    async def on_start(self, ctx: Context) -> None:
        """Runs before the first message of each run (again after a restart)."""

    async def handle(self, ctx: Context, msg: Message) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement handle(ctx, msg)")

    async def on_stop(self, ctx: Context) -> None:
        """Runs when the agent stops for good or before a restart (bounded by its shutdown timeout)."""


@final
class _FunctionBehaviour:
    """The behaviour of a function agent: stateless, so one instance serves every run."""

    __slots__ = ("handle",)

    def __init__(self, handler: Handler) -> None:
        self.handle = handler

    async def on_start(self, ctx: Context) -> None:
        pass

    async def on_stop(self, ctx: Context) -> None:
        pass


def refuse_past_float(name: str, value: Any) -> None:
    """Refuse an integer too large to convert to a float (past about 1.8e308): a time
    of it was accepted, and the deadline or sleep it became raised ``OverflowError``
    where it was used (a kernel's run crashed at its shutdown). Infinity, a float, is
    no such number: it stays "no limit" where a field takes it."""
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            raise ValueError(
                f"{name} must be a number a float holds (at most about 1.8e308),"
                f" got an integer of {value.bit_length()} bits"
            ) from None


def _validate_optional_positive(name: str) -> Callable[[Any, Any, Any], None]:
    def check(inst: Any, attribute: Any, value: Any) -> None:
        if value is None:
            return
        refuse_past_float(name, value)
        # (``not value > 0``: NaN is refused too)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {brief(value, 80)}")

    return check


def _validate_shutdown_timeout(inst: Any, attribute: Any, value: Any) -> None:
    if value is None:
        return
    refuse_past_float("shutdown_timeout", value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {brief(value, 80)}")


def _validate_capacity(inst: Any, attribute: Any, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"mailbox_capacity must be an integer >= 1, got {brief(value, 80)}")


#: the name :meth:`Kernel.describe` and a :class:`SupervisorEscalation`'s chain give the
#: kernel's root supervisor: no agent or supervisor spawned may take it
ROOT_NAME = "root"

#: the most characters a name may hold (Erlang's limit for an atom, a registered name):
#: a name is written whole into log lines, errors and metrics labels, and, on a node
#: joined to a NATS cluster, into a names bucket key, at most 4 * 255 bytes of UTF-8
#: base64-encoded (1,361 characters), inside the 4,096-byte line NATS takes for a
#: publish's subject (a name of 70,000 characters closed the node's control connection)
NAME_MAX: Final = 255

#: Unicode categories a name may not hold anywhere: control characters (``\n``,
#: ``\t``, ``\x1b``, ``\x7f``, C1) and the line and paragraph separators, which
#: split or hide a name in a log line, a terminal or a metrics label
_UNSHOWABLE = frozenset(("Cc", "Zl", "Zp"))


def check_agent_name(value: Any) -> str:
    """``value`` as an agent (or supervisor) name: ``TypeError`` if it is no string,
    ``ValueError`` naming it if it is empty, longer than :data:`NAME_MAX` characters, is
    not UTF-8 text (a lone surrogate, as ``os.fsdecode`` makes of a byte that is not
    UTF-8 in an argument), starts or ends with whitespace (``" "``, ``"echo "``), holds
    a control character or a line separator, is the root supervisor's ``"root"``, or
    looks like a UUID."""
    if not isinstance(value, str):
        raise TypeError(
            f"agent name must be a string (str), got {type(value).__name__} {brief(value, 60)}"
        )
    if not value:
        raise ValueError(f"agent name must be a non-empty string, got {value!r}")
    if len(value) > NAME_MAX:
        raise ValueError(
            f"agent name {value[:40]!r}... is {len(value):,} characters long (at most"
            f" {NAME_MAX}: a name is written whole into log lines, metrics labels and a"
            " NATS cluster's names bucket keys)"
        )
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"agent name {value!r} is not UTF-8 text: it holds a lone surrogate"
            f" ({value[exc.start]!r} at index {exc.start}), and names are written as UTF-8"
            " (to a bridge child, logs, metrics labels, NATS subjects)"
        ) from None
    if not value.isprintable() or value[0].isspace() or value[-1].isspace():
        _check_showable(value)
    if value == ROOT_NAME:
        raise ValueError(
            f"agent name {value!r} is reserved: it names the kernel's root supervisor"
            " (in describe() and in the chain of a SupervisorEscalation)"
        )
    try:
        uuid.UUID(value)
    except ValueError:
        return value
    raise ValueError(
        f"agent name {value!r} looks like a UUID; names and ids share one address space"
    )


def _check_showable(value: str) -> None:
    """The slow part of :func:`check_agent_name`, for a name ``str.isprintable`` refuses
    or that starts or ends with whitespace: what it may not hold, named."""
    for index, char in enumerate(value):
        if unicodedata.category(char) in _UNSHOWABLE:
            raise ValueError(
                f"agent name {value!r} holds a control character or line separator"
                f" ({char!r} at index {index}): a name is written to log lines, terminals"
                " and metrics labels, where it would not show as it is"
            )
    if value.isspace():
        raise ValueError(f"agent name {value!r} is only whitespace")
    if value[0].isspace() or value[-1].isspace():
        raise ValueError(
            f"agent name {value!r} starts or ends with whitespace: it would not be told"
            f" apart from {value.strip()!r} where it is shown (write {value.strip()!r})"
        )


def validate_name(inst: Any, attribute: Any, value: Any) -> None:
    """attrs validator of an optional name field (see :func:`check_agent_name`)."""
    if value is not None:
        check_agent_name(value)


def _to_overflow(value: Any) -> OverflowPolicy | None:
    return None if value is None else enum_member(OverflowPolicy, value, "overflow")


def _to_directive(value: Any) -> Directive:
    return enum_member(Directive, value, "on_error")


#: ``on_error`` as given: one directive, or directives per exception type (first match wins)
OnError = Directive | str | Mapping[type[BaseException], Directive | str]


def _to_on_error(
    value: Any,
) -> Directive | tuple[tuple[type[BaseException], Directive], ...] | None:
    if value is None or isinstance(value, Directive | str):
        return None if value is None else _to_directive(value)
    if isinstance(value, Mapping) or (
        # (the rules as a spec holds them, given back by with_options() / evolve)
        isinstance(value, tuple) and all(isinstance(r, tuple) and len(r) == 2 for r in value)
    ):
        rules = []
        for exc_type, directive in value.items() if isinstance(value, Mapping) else value:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise ValueError(f"on_error keys must be exception types, got {exc_type!r}")
            rules.append((exc_type, _to_directive(directive)))
        return tuple(rules)
    raise ValueError(
        f"on_error must be a directive or a mapping of exception types to directives, got {brief(value, 80)}"
    )


@final
@attrs.frozen
class AgentSpec:
    """How to run an agent. ``None`` limits fall back to the kernel's config.

    ``handle_timeout`` and ``shutdown_timeout`` are in seconds.
    """

    factory: Callable[[], Behaviour]
    name: str | None = attrs.field(default=None, validator=validate_name)
    mailbox_capacity: int | None = attrs.field(default=None, validator=_validate_capacity)
    handle_timeout: float | None = attrs.field(
        default=None, validator=_validate_optional_positive("handle_timeout")
    )
    overflow: OverflowPolicy | None = attrs.field(default=None, converter=_to_overflow)
    restart: RestartType = attrs.field(default=RestartType.PERMANENT, converter=to_restart)
    shutdown_timeout: float | None = attrs.field(default=None, validator=_validate_shutdown_timeout)
    #: the user's function, for function agents (so tests can call it directly)
    handler: Handler | None = None
    #: what a handler's exception does to the agent (see :class:`Directive`); ``None``:
    #: ``resume`` for function agents (no state to reset), ``restart`` for classes
    on_error: Directive | tuple[tuple[type[BaseException], Directive], ...] | None = attrs.field(
        default=None, converter=_to_on_error
    )

    def directive_for(self, error: BaseException) -> Directive:
        """The directive for ``error``: the first matching rule, else the default."""
        on_error = self.on_error
        if isinstance(on_error, Directive):
            return on_error
        if on_error:
            for exc_type, directive in on_error:
                if isinstance(error, exc_type):
                    return directive
        return Directive.RESUME if self.handler is not None else Directive.RESTART

    @property
    def starts_lazily(self) -> bool:
        """Whether the agent's task is only started by its first message.

        True when starting has no observable effect: function agents, and classes that
        do not override :meth:`Agent.on_start`. Such an agent waits, idle, as just an
        address and a mailbox (no task), which is what makes a million idle agents cheap.
        """
        if self.handler is not None:
            return True
        return getattr(self.factory, "on_start", None) is Agent.on_start

    @property
    def stops_quietly(self) -> bool:
        """Whether stopping the agent runs no code of the user's (no ``on_stop``).

        Such agents are stopped together rather than one by one: the order in which
        they stop cannot be observed.
        """
        if self.handler is not None:
            return True
        return getattr(self.factory, "on_stop", None) is Agent.on_stop

    def with_options(self, **changes: Any) -> AgentSpec:
        """A copy with some fields replaced (e.g. ``spec.with_options(name="b")``)."""
        if changes.keys() == {"name"}:
            # (a named spawn's copy: every field given back in order, checked and converted
            # as evolve would, without its walk of the fields: 2.2 us, not 4.1)
            return AgentSpec(
                self.factory,
                changes["name"],
                self.mailbox_capacity,
                self.handle_timeout,
                self.overflow,
                self.restart,
                self.shutdown_timeout,
                self.handler,
                self.on_error,
            )
        try:
            return attrs.evolve(self, **changes)
        except TypeError:
            misspelt = _misspelt_options("AgentSpec.with_options()", changes)
            if misspelt is None:
                raise
            raise misspelt from None


_attrs_spec_init = AgentSpec.__init__


@functools.wraps(_attrs_spec_init)
def _spec_init(self: AgentSpec, *args: Any, **options: Any) -> None:
    """attrs' ``__init__`` of :class:`AgentSpec`; a misspelt keyword (``capacity=``) is
    named with the options and the one meant, as ``agent()`` and ``with_options()`` do,
    not Python's bare "unexpected keyword argument" (only an error looks)."""
    try:
        _attrs_spec_init(self, *args, **options)
    except TypeError:
        misspelt = _misspelt_options("AgentSpec()", options)
        if misspelt is None:
            raise
        raise misspelt from None


def _misspelt_options(call: str, given: Mapping[str, Any]) -> TypeError | None:
    """For a TypeError of attrs' ``__init__`` of :class:`AgentSpec` called with ``given``:
    the error naming its options and the one meant, if a keyword is none of them."""
    fields = attrs.fields_dict(AgentSpec)
    unknown = [key for key in given if key not in fields]
    return unknown_options(call, unknown, list(fields)) if unknown else None


AgentSpec.__init__ = _spec_init  # type: ignore[method-assign]


_T = TypeVar("_T")


def _check_handler_signature(function: Callable[..., Any], shown: str, arguments: int) -> None:
    """A handler the kernel could not call with ``(ctx, msg)`` is refused now, not failed
    at every message."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # no signature to read (a builtin, a C extension)
        return
    try:
        signature.bind(*[None] * arguments)
    except TypeError:
        params = ", ".join(
            {"VAR_POSITIONAL": "*", "VAR_KEYWORD": "**"}.get(p.kind.name, "") + p.name
            for p in signature.parameters.values()
        )
        raise TypeError(
            f"{shown}({params}) cannot be called so: an agent handler is called with"
            " two arguments, handler(ctx, msg)"
        ) from None
    names = [p.name for p in signature.parameters.values()][arguments - 2 : arguments]
    if len(names) == 2 and names[0] in MESSAGE_NAMES and names[1] in CONTEXT_NAMES:
        # (msg, ctx): each would be the other at every call
        raise TypeError(
            f"{shown}({', '.join(p for p in signature.parameters)}) takes its arguments the"
            " other way round: an agent handler is called as handler(ctx, msg)"
        )


#: parameter names that say which argument a handler expects where (also read by
#: ``nexus run --app``, to tell a handler without ``@agent`` from a main)
MESSAGE_NAMES: Final = frozenset({"msg", "message"})
_COMMAND: Final = MessageKind.COMMAND
CONTEXT_NAMES: Final = frozenset({"ctx", "context"})


def checked_seconds(value: Any, what: str, *, zero: bool = False) -> float:
    """An argument in seconds given (not None) checked: a number > 0 (>= 0 with
    ``zero``; NaN is neither), else TypeError / ValueError naming ``what``. (Callers
    take the config's value for None themselves: no call on the request path.)"""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, got {brief(value, 80)}")
    refuse_past_float(what, value)
    if not (value >= 0 if zero else value > 0):
        raise ValueError(
            f"{what} must be {'>=' if zero else '>'} 0 seconds, got {brief(value, 80)}"
        )
    return value


def _spec_for(target: Any, options: dict[str, Any]) -> AgentSpec:
    if isinstance(target, AgentSpec):
        # Only what was given: agent(spec, name="b") keeps the spec's other options.
        changes = {k: v for k, v in options.items() if v is not None}
        if changes.get("restart") is RestartType.PERMANENT:
            del changes["restart"]
        return attrs.evolve(target, **changes)
    if inspect.isclass(target):
        if not callable(getattr(target, "handle", None)):
            raise TypeError(f"agent class {target.__qualname__} has no handle(ctx, msg) method")
        for hook in ("on_start", "on_stop"):
            if not callable(getattr(target, hook, None)):
                # (every run calls both: the first start, or every stop, would fail)
                raise TypeError(
                    f"agent class {target.__qualname__} has no {hook}(ctx) method: subclass"
                    " nexus_trio.Agent, which has both hooks, or define it"
                )
        # (an Agent subclass without a handle of its own is an agent that only runs
        # its hooks and their background tasks: a message to it fails, naming the class)
        handle = inspect.getattr_static(target, "handle")
        for hook, params in (("handle", "ctx, msg"), ("on_start", "ctx"), ("on_stop", "ctx")):
            _check_awaitable_hook(target, hook, params)
        if inspect.isfunction(handle):  # called on an instance: self, ctx, msg
            _check_handler_signature(handle, f"{target.__name__}.handle", 3)
        return _class_spec(target, options)
    if inspect.iscoroutinefunction(target):
        _check_handler_signature(target, target.__name__, 2)
        return _handler_spec(target, options)
    if callable(getattr(target, "handle", None)):
        # (``kernel.spawn(Counter())``: each run builds its own instance from the class)
        name = type(target).__name__
        raise TypeError(
            f"got an instance of the agent class {name}: pass the class {name}, not an"
            " instance (every run, and every restart, builds a fresh one)"
        )
    if inspect.isfunction(target) and target.__name__ != "<lambda>":
        # (the handler is awaited: a 'def' would fail on every message)
        raise TypeError(
            f"@agent needs an 'async def handler(ctx, msg)'; {target.__qualname__} is a plain"
            f" function ('def'): write 'async def {target.__name__}(ctx, msg)'"
        )
    raise TypeError(
        f"@agent needs an 'async def handler(ctx, msg)' or a class with handle(); got {target!r}"
    )


def _check_awaitable_hook(target: type[Any], hook: str, params: str) -> None:
    """A lifecycle method written with ``def`` is refused now: the kernel awaits it, so
    every message (or every start, every stop) would fail with a TypeError that names
    neither the class nor the method."""
    found = inspect.getattr_static(target, hook)
    function = getattr(found, "__func__", found)  # staticmethod / classmethod
    if inspect.isfunction(function) and not inspect.iscoroutinefunction(function):
        raise TypeError(
            f"{target.__qualname__}.{hook} is a plain function ('def'); the kernel awaits"
            f" it: write 'async def {hook}(self, {params})'"
        )


#: the options of ``agent(...)`` and ``@agent(...)``, in its signature's order
AGENT_OPTIONS: Final = (
    "name",
    "mailbox_capacity",
    "handle_timeout",
    "overflow",
    "restart",
    "shutdown_timeout",
    "on_error",
)


def unknown_options(call: str, unknown: Collection[str], options: Sequence[str]) -> TypeError:
    """The error of ``call`` (``agent()``, ``kernel.spawn()``, ...) given keywords that are
    none of its ``options``, where Python would say only "unexpected keyword argument":
    it names them and the options, then the option meant if one is near (``capacity``:
    ``mailbox_capacity``). An agent's own option given to a spawn (which takes the name
    and the supervisor only) says to give it to ``agent()``."""
    what = "unknown options" if len(unknown) > 1 else "an unknown option"
    text = f"{call} got {what} {', '.join(map(repr, unknown))} (its options: {', '.join(options)})"
    first = next(iter(unknown))
    if first == "target" and call == "agent()":
        # (positional only: near 'restart', which it is not)
        return TypeError(f"{text}; pass the handler or agent class first: agent(handler, ...)")
    near = nearest(first, options)
    if near is not None:
        return TypeError(f"{text}; did you mean {near}=?")
    option = first if first in AGENT_OPTIONS else nearest(first, AGENT_OPTIONS)
    if option is not None and "name" in options:
        # (a spawn: an agent's option goes on its spec)
        return TypeError(
            f"{text}; {option}= is an option of the agent, not of the spawn: give it to"
            f" agent(), as {call[:-1]}agent(handler, {option}=...))"
        )
    return TypeError(text)


@overload
def agent(
    target: Handler | type[Any] | AgentSpec,
    /,
    *,
    name: str | None = None,
    mailbox_capacity: int | None = None,
    handle_timeout: float | None = None,
    overflow: OverflowPolicy | str | None = None,
    restart: RestartType | str = RestartType.PERMANENT,
    shutdown_timeout: float | None = None,
    on_error: OnError | None = None,
) -> AgentSpec: ...
@overload
def agent(
    *,
    name: str | None = None,
    mailbox_capacity: int | None = None,
    handle_timeout: float | None = None,
    overflow: OverflowPolicy | str | None = None,
    restart: RestartType | str = RestartType.PERMANENT,
    shutdown_timeout: float | None = None,
    on_error: OnError | None = None,
) -> Callable[[Handler | type[Any]], AgentSpec]: ...


def agent(
    target: Handler | type[Any] | AgentSpec | None = None,
    /,
    *,
    name: str | None = None,
    mailbox_capacity: int | None = None,
    handle_timeout: float | None = None,
    overflow: OverflowPolicy | str | None = None,
    restart: RestartType | str = RestartType.PERMANENT,
    shutdown_timeout: float | None = None,
    on_error: OnError | None = None,
    **unknown: Any,
) -> AgentSpec | Callable[[Handler | type[Any]], AgentSpec]:
    """Turn ``async def handler(ctx, msg)`` or an :class:`Agent` class into an :class:`AgentSpec`.

    Usable bare (``@agent``), with options (``@agent(name="a", handle_timeout=2.0)``) or
    as a call (``agent(Counter, name="counter")``). ``on_error`` is a :class:`Directive`
    (or its name) or a mapping of exception types to directives, first match wins.
    An unknown option is a ``TypeError`` naming the option meant (``capacity``:
    ``mailbox_capacity``) and the options.
    """
    if unknown:
        raise unknown_options("agent()", unknown, AGENT_OPTIONS)
    options: dict[str, Any] = {
        "name": name,
        "mailbox_capacity": mailbox_capacity,
        "handle_timeout": handle_timeout,
        "overflow": overflow,
        "restart": restart,
        "shutdown_timeout": shutdown_timeout,
        "on_error": on_error,
    }
    if target is not None:
        return _spec_for(target, options)
    return lambda t: _spec_for(t, options)


def _class_spec(target: type[Any], options: Mapping[str, Any]) -> AgentSpec:
    """The spec of an agent class already checked."""
    return AgentSpec(factory=cast("Callable[[], Behaviour]", target), **options)


def _handler_spec(target: Handler, options: Mapping[str, Any]) -> AgentSpec:
    """The spec of a handler already checked."""
    behaviour = _FunctionBehaviour(target)
    return AgentSpec(factory=lambda: behaviour, handler=target, **options)


_HOOKS: Final = ("handle", "on_start", "on_stop")
_ABSENT: Final = object()

#: What the checks of a class read when they passed, by class: the ``handle``,
#: ``on_start`` and ``on_stop`` found (held weakly: a method using ``super()`` refers to
#: its class) with each one's code, and the spec built then (held weakly: it holds the
#: class; the agents spawned from it keep it alive). Keyed weakly: a class made in a loop,
#: or deleted, goes with its entry.
_CHECKED_CLASSES: Final[
    weakref.WeakKeyDictionary[type[Any], tuple[tuple[Any, ...], weakref.ref[AgentSpec]]]
] = weakref.WeakKeyDictionary()
#: The same for plain ``async def`` handlers: what the signature check read (the code, how
#: many defaults, the names of the keyword defaults; not the defaults themselves, which
#: may refer to the function), and the spec.
_CHECKED_HANDLERS: Final[
    weakref.WeakKeyDictionary[Callable[..., Any], tuple[tuple[Any, ...], weakref.ref[AgentSpec]]]
] = weakref.WeakKeyDictionary()


def _class_marks(target: type[Any]) -> tuple[Any, ...] | None:
    """What a class's checks read, strongly held, for a class whose hooks are plain
    functions found as they are by ``getattr`` (no metaclass or descriptor between):
    ``(handle, its code, on_start, its code, on_stop, its code)``. ``None`` for any other
    class: it is checked at every spawn, as before the cache."""
    marks: list[Any] = []
    for hook in _HOOKS:
        found = getattr(target, hook, None)
        if (
            type(found) is not types.FunctionType
            or inspect.getattr_static(target, hook) is not found
        ):
            return None
        marks += (found, found.__code__)
    return tuple(marks)


def _cached_class_spec(target: type[Any]) -> AgentSpec | None:
    """The spec of a class checked before, if its hooks are still the ones checked
    (the same function objects, with the same code): else ``None``, to check again."""
    entry = _CHECKED_CLASSES.get(target)
    if entry is None:
        return None
    (handle, handle_code, on_start, start_code, on_stop, stop_code), spec_ref = entry
    # (a hook deleted since: not found, never a dead reference's None)
    found = getattr(target, "handle", _ABSENT)
    if found is not handle() or found.__code__ is not handle_code:
        return None
    found = getattr(target, "on_start", _ABSENT)
    if found is not on_start() or found.__code__ is not start_code:
        return None
    found = getattr(target, "on_stop", _ABSENT)
    if found is not on_stop() or found.__code__ is not stop_code:
        return None
    spec = spec_ref()
    if spec is None:  # every agent of the last one is gone: a new one, not checked again
        spec = _class_spec(target, {})
        _CHECKED_CLASSES[target] = (entry[0], weakref.ref(spec))
    return spec


def _handler_marks(target: Any) -> tuple[Any, ...] | None:
    """What a handler's signature check read, for a plain function whose signature is its
    own (no ``__wrapped__`` or ``__signature__``): its code, how many defaults it has, the
    names of its keyword-only defaults."""
    if type(target) is not types.FunctionType:
        return None
    attributes = target.__dict__
    if "__wrapped__" in attributes or "__signature__" in attributes:
        return None
    return _handler_shape(target)


def _handler_shape(target: Any) -> tuple[Any, ...]:
    keywords = target.__kwdefaults__
    return (
        target.__code__,
        len(target.__defaults__ or ()),
        None if keywords is None else frozenset(keywords),
    )


def _cached_handler_spec(target: Any) -> AgentSpec | None:
    """The spec of a handler checked before, if what its check read is unchanged."""
    entry = _CHECKED_HANDLERS.get(target)
    if entry is None:
        return None
    shape, spec_ref = entry
    attributes = target.__dict__
    if (
        _handler_shape(target) != shape
        or "__wrapped__" in attributes
        or "__signature__" in attributes
    ):
        return None
    spec = spec_ref()
    if spec is None:
        spec = _handler_spec(target, {})
        _CHECKED_HANDLERS[target] = (entry[0], weakref.ref(spec))
    return spec


def as_spec(target: Any) -> AgentSpec:
    """Accept what ``spawn`` accepts besides supervisors: a spec, an agent class, a handler.

    A class or a plain handler is checked at its first spawn; later spawns of it take the
    spec built then while what the checks read is the same (the hooks found, their code;
    the handler's code and defaults), and check again when it changed."""
    if isinstance(target, AgentSpec):
        return target
    if type(target) is types.FunctionType:
        spec = _cached_handler_spec(target)
        if spec is not None:
            return spec
        marks = _handler_marks(target)  # (read before the checks: a change after them misses)
        spec = _spec_for(target, {})
        if marks is not None:
            _CHECKED_HANDLERS[target] = (marks, weakref.ref(spec))
        return spec
    if isinstance(target, type):
        try:
            spec = _cached_class_spec(target)
        except TypeError:  # (a metaclass that makes its classes unhashable)
            return _spec_for(target, {})
        if spec is not None:
            return spec
        marks = _class_marks(target)
        spec = _spec_for(target, {})
        if marks is not None:
            weak = tuple(
                weakref.ref(mark) if index % 2 == 0 else mark for index, mark in enumerate(marks)
            )
            _CHECKED_CLASSES[target] = (weak, weakref.ref(spec))
        return spec
    return _spec_for(target, {})


@final
@attrs.frozen
class AgentRef:
    """The address of a spawned agent or supervisor: usable wherever an address is."""

    id: uuid.UUID
    name: str | None = None

    def __str__(self) -> str:
        return f"{self.name} ({self.id})" if self.name else str(self.id)


def address_of(target: AgentRef | Address) -> Address:
    return target.id if isinstance(target, AgentRef) else target


@final
class _AgentLogAdapter(logging.LoggerAdapter[logging.Logger]):
    """Adds the agent's and the current message's fields to every record."""

    def __init__(self, logger: logging.Logger, ctx: Context) -> None:
        super().__init__(logger, {})
        self._ctx = ctx

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        ctx = self._ctx
        fields: dict[str, Any] = log_fields(ctx.id, ctx.name, ctx.message)
        given = kwargs.get("extra")
        if given:
            fields.update(given)
        kwargs["extra"] = fields
        return msg, kwargs


@final
class ContextCommon:
    """What every :class:`Context` of one kernel holds alike, and none of its sends,
    tells or replies reads: one object per kernel instead of three slots per context."""

    __slots__ = ("kernel", "limiter", "spawn_linked")

    def __init__(
        self,
        kernel: Kernel,
        spawn_linked: Callable[[Any, str | None, Any], AgentRef],
        limiter: trio.CapacityLimiter,
    ) -> None:
        self.kernel = kernel
        self.spawn_linked = spawn_linked
        self.limiter = limiter


class Context:
    """What a handler may touch; one per agent, shared by its runs.

    ``nursery`` is the agent's own nursery for the current run: background tasks there
    are cancelled when the run ends (stop, restart, shutdown), and an exception in one
    of them fails the agent, which its supervisor then handles.
    """

    # Six slots: an object of eight is 16 bytes more in every agent that ran (the
    # allocator's 16-byte steps). What every context of a kernel shares and no send
    # reads is in ``_common``.
    __slots__ = ("_cell", "_common", "_log", "_router", "id", "name")

    def __init__(self, common: ContextCommon, cell: Any, router: Router) -> None:
        self._common = common
        self._cell = cell
        self._router = router
        self.id: uuid.UUID = cell.id
        self.name: str | None = cell.name
        self._log: logging.LoggerAdapter[logging.Logger] | None = None

    @property
    def nursery(self) -> trio.Nursery:
        """The agent's own nursery for this run: background work that dies with it.

        ``ctx.nursery.start_soon(fn, *args)``; its tasks are cancelled when the agent
        stops or restarts, and an exception in one of them fails the agent.
        :class:`AgentNotRunning` outside a run (e.g. once the agent has stopped).
        """
        nursery: trio.Nursery | None = self._cell.background_nursery()
        if nursery is None:
            raise AgentNotRunning(self.id, self.name, "is not running: it has no nursery")
        return nursery

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry ``agent_id`` and ``agent_name``, and the
        ``msg_id`` and ``trace_id`` of the message being handled; ``extra=`` passed by
        the caller is kept too."""
        if self._log is None:
            # Built on first use: a million idle agents should not carry a million adapters.
            self._log = _AgentLogAdapter(logging.getLogger("nexus_trio.agent"), self)
        return self._log

    @property
    def kernel(self) -> Kernel:
        return self._common.kernel

    @property
    def message(self) -> Message | None:
        """The message being handled, if any."""
        current: Message | None = self._cell.current
        return current

    def _outgoing(
        self, to: AgentRef | Address | Message, payload: Any, kind: MessageKind
    ) -> Message:
        if isinstance(to, Message):
            return to
        if kind is not _COMMAND and kind.__class__ is not MessageKind:
            raise kind_error(kind)
        current = self._cell.current
        trace_id = current.trace_id if current is not None else None
        return new_message(self.id, address_of(to), payload, kind, trace_id)

    @trio.lowlevel.enable_ki_protection
    async def send(
        self,
        to: AgentRef | Address | Message,
        payload: Any = None,
        *,
        kind: MessageKind = MessageKind.COMMAND,
    ) -> Message:
        """Send (tell) from this agent; same rules as :meth:`Kernel.send`, except that
        agents may still send to each other while the kernel drains.

        The trace id of the message being handled is carried over.
        """
        msg = self._outgoing(to, payload, kind)
        router = self._router
        fast = router.fast(msg, msg.to if msg.reply_to is None else None, False)
        if fast is not None:
            # (the rest, a transport's asking to yield once included: Router.send)
            await router.send(msg, fast)
        return msg

    @trio.lowlevel.enable_ki_protection
    def send_nowait(
        self,
        to: AgentRef | Address | Message,
        payload: Any = None,
        *,
        kind: MessageKind = MessageKind.COMMAND,
    ) -> Message:
        """Like :meth:`send` but raise :class:`MailboxFull` at once instead of waiting."""
        msg = self._outgoing(to, payload, kind)
        if get_ident() != self._router.thread:
            raise wrong_thread("ctx.send_nowait")
        self._router.send_nowait(msg, external=False)
        return msg

    @trio.lowlevel.enable_ki_protection
    async def request(
        self, to: AgentRef | Address, payload: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Send a Query from this agent and return the reply's payload (see :meth:`Kernel.request`)."""
        if timeout is None:  # (the common case, on the request path: no call)
            timeout = self._common.kernel.config.kernel.request_timeout
        else:
            timeout = checked_seconds(timeout, "request timeout")
        current = self._cell.current
        trace_id = current.trace_id if current is not None else None
        query = new_query(self.id, address_of(to), payload, trace_id)
        return await self._router.request(query, timeout, external=False)

    # (two signatures, one per kind of target, so that a type checker flags an unknown
    # keyword, which the implementation takes to name the option meant)
    @overload
    def spawn(self, target: Supervisor, *, name: str | None = None) -> AgentRef: ...
    @overload
    def spawn(
        self, target: AgentSpec | Handler | type[Any], *, name: str | None = None
    ) -> AgentRef: ...
    @trio.lowlevel.enable_ki_protection
    def spawn(
        self,
        target: AgentSpec | Supervisor | Handler | type[Any],
        *,
        name: str | None = None,
        **unknown: Any,
    ) -> AgentRef:
        """Spawn an agent linked to this one: it stops before this agent does, and when
        this run ends (a restart starts without it).

        :class:`AgentNotRunning` once this agent has stopped for good (a context kept
        past its agent's stop); :class:`KernelShuttingDown` once the kernel stops its
        tree."""
        if unknown:
            raise unknown_options("ctx.spawn()", unknown, ("name",))
        if get_ident() != self._router.thread:
            raise wrong_thread("ctx.spawn")
        return self._common.spawn_linked(target, name, self._cell)

    @trio.lowlevel.enable_ki_protection
    def stop(self) -> None:
        """Stop this agent after the current message (a normal exit; see restart types)."""
        if get_ident() != self._router.thread:
            raise wrong_thread("ctx.stop")
        self._cell.request_exit()

    @property
    def stop_requested(self) -> bool:
        """True once this agent's run is asked to stop (as :meth:`wait_stop_requested`
        returns then): e.g. by its supervisor, which stops what it spawned first."""
        return bool(self._cell.exit_requested)

    @property
    def stop_drains(self) -> bool:
        """True while this agent's stop asks it to handle its queue first
        (``kernel.stop(ref, drain=True)``, Akka's ``PoisonPill``); False before a stop, for
        one without drain, and once such a stop cuts a draining one short."""
        cell = self._cell
        return bool(cell.exit_requested and cell.drain_before_exit)

    async def wait_stop_requested(self) -> None:
        """Return once this agent's run is asked to stop (``kernel.stop``, its supervisor,
        the kernel's shutdown once its grace is over, ``ctx.stop()``).

        For an ``on_start`` that waits on something outside and would rather give up at
        the stop than be cancelled after its ``shutdown_timeout``: cancelling
        ``ctx.nursery.cancel_scope`` then ends the run as a stop, without ``on_stop``.
        """
        await self._cell.wait_stop_requested()

    @trio.lowlevel.enable_ki_protection
    def monitor(self, target: AgentRef | Address) -> None:
        """Receive an ``Event`` message when ``target`` stops or fails.

        The payload is ``{"event": "failed" | "stopped", "agent": <id>, "name": ...,
        "reason": ...}``: ``failed`` each time it fails (it may be restarted), ``stopped``
        once when it stops for good (the monitor is then removed).
        Monitoring an agent that does not exist delivers the event at once with reason
        ``"noproc"`` (as Erlang does).
        Idempotent, as Akka's ``watch``: monitoring the same target again adds nothing
        (one notice per event, whatever the number of calls), and one
        :meth:`demonitor` ends it.
        :class:`AgentNotRunning` once this agent has stopped for good (a context kept
        past its agent's stop): a monitor lives as long as its watcher.
        """
        if get_ident() != self._router.thread:
            raise wrong_thread("ctx.monitor")
        if self._cell.retired:
            raise AgentNotRunning(
                self.id,
                self.name,
                "has stopped: ctx.monitor refused (a monitor lives as long as its watcher)",
            )
        address = address_of(target)
        node = self._router.find(address)
        ledger = self._router.ledger
        if node is None or node.retired:
            if node is None:
                self._router.check_address(address)
            ledger.notify_noproc(self.id, address)
        else:
            ledger.watch(self.id, node.id)

    @trio.lowlevel.enable_ki_protection
    def demonitor(self, target: AgentRef | Address) -> bool:
        """Stop monitoring ``target`` (Akka's ``unwatch``): no more notices of it, however
        many times :meth:`monitor` was called for it. Returns False if this agent did not
        monitor it (never did, or the monitor ended with the target's stop for good). A
        notice already in this agent's mailbox stays there.
        """
        if get_ident() != self._router.thread:
            raise wrong_thread("ctx.demonitor")
        address = address_of(target)
        node = self._router.find(address)
        if node is None:
            self._router.check_address(address)
            return False
        return self._router.ledger.unwatch(self.id, node.id)

    async def run_sync(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run a blocking function in a worker thread, bounded by ``[runtime]`` limits.

        Cancelling the handler abandons the thread (its result is discarded).
        """
        return await trio.to_thread.run_sync(
            fn, *args, limiter=self._common.limiter, abandon_on_cancel=True
        )


#: the ``stopped`` event's reason of an agent whose first start failed and that is not
#: restarted (a pool's worker; a process agent with ``first_start_stops``)
START_FAILED: Final = "start_failed"


async def stop_for_good(ctx: Context) -> None:
    """Ask the kernel to stop this starting agent for good, and return once the stop is
    on its way: its supervisor then takes the failing run as a stop, not as an exit to
    restart (and counts no restart). ``kernel.stop`` takes the agent out of the routing
    table before its first wait, so ``is_local`` turns False then. (``kernel.stop`` from
    inside ``on_start`` would wait for the run it stops: it is started beside it.)"""
    kernel = ctx.kernel
    asked = False

    async def stop() -> None:
        nonlocal asked
        try:
            await kernel.stop(ctx.id, reason=START_FAILED)
        except (NexusError, ValueError):
            pass  # stopped already (by someone else, or with the kernel)
        finally:
            asked = True

    ctx.nursery.start_soon(stop)  # cancelled with this run once the stop is queued
    while not asked and kernel.is_local(ctx.id):
        await trio.lowlevel.checkpoint()
