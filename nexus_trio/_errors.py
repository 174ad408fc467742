"""The exception hierarchy.

Every error the kernel raises derives from :class:`NexusError` and carries the ids
involved as attributes, so that a log line or an ``except`` clause can tell exactly
which agent or message was concerned.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import copyreg
import traceback
import uuid
from collections.abc import Collection, Iterable
from typing import Any, Final, NoReturn, final

import trio


def only_cancels(error: BaseException) -> bool:
    """A ``trio.Cancelled``, also a group of nothing else (a nursery's)."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(trio.Cancelled)[1] is None
    return isinstance(error, trio.Cancelled)


def raise_held(error: BaseException) -> NoReturn:
    """Raise ``error``, held (a Ctrl-C taken, the root's give-up), in place of a
    ``Cancelled`` with its own ``__context__``: raised while that ``Cancelled`` is
    handled, Python would chain it there, losing what the Ctrl-C was raised during and
    printing a cancel it did not come from above it."""
    context = error.__context__
    try:
        raise error
    finally:
        error.__context__ = context


def error_repr(error: object) -> str:
    """``repr(error)``, never raising: an exception a handler raised is user code, and its
    ``__repr__`` may raise (a bug of its own, state that is gone); then its class and what
    the repr raised (``<BadError, whose repr() raised RuntimeError: ...>``), as the
    traceback module shows an exception whose ``__str__`` raises. Any value from outside
    is shown so (:func:`nexus_trio._brief.brief`)."""
    try:
        return repr(error)
    except Exception as exc:  # (not BaseException: a Ctrl-C or a cancel goes on up)
        return repr_raised(error, exc)


def failed_repr(error: BaseException) -> str | None:
    """What :func:`error_repr` shows for ``error`` if its ``repr()`` raises, else None."""
    try:
        repr(error)
    except Exception as exc:
        return repr_raised(error, exc)
    return None


def repr_raised(error: object, exc: Exception) -> str:
    """How :func:`error_repr` shows ``error`` whose ``repr()`` raised ``exc``."""
    try:
        said = f"{type(exc).__name__}: {exc}"
    except Exception:
        said = type(exc).__name__
    return f"<{type(error).__qualname__}, whose repr() raised {said}>"


#: how much of a formatted traceback a dead letter keeps (its first and last lines)
TRACEBACK_TEXT_LIMIT: Final = 8192


def _truncated(text: str) -> str:
    """At most TRACEBACK_TEXT_LIMIT characters, the line saying what was left out
    included: whole lines of the first quarter and of the end (the frame that raised and
    the message), the characters between counted."""
    if len(text) <= TRACEBACK_TEXT_LIMIT:
        return text
    # the line's longest form (what is left out is fewer characters than the text has),
    # and a line end before it
    room = TRACEBACK_TEXT_LIMIT - len(f"\n... ({len(text):,} characters left out) ...\n")
    # cut at the end of a line, unless that would leave out more than half of a part
    head = text[: room // 4]
    line_end = head.rfind("\n") + 1
    if line_end > len(head) // 2:
        head = head[:line_end]
    tail = text[len(text) - (room - len(head)) :]
    line_start = tail.find("\n", 0, len(tail) // 2) + 1
    tail = tail[line_start:]
    left_out = len(text) - len(head) - len(tail)
    if not head.endswith("\n"):
        head += "\n"
    return f"{head}... ({left_out:,} characters left out) ...\n{tail}"


def traceback_text(error: BaseException) -> str:
    """``error`` formatted as a traceback (with its causes and contexts), truncated."""
    return _truncated("".join(traceback.format_exception(error)))


@final
class FramelessTraceback:
    """A traceback kept without its frames: where each exception of a chain passed (file,
    line, function), formatted as ``traceback`` formats it only when read. Taking it costs
    a walk over the traceback (a few microseconds), not its formatting (a hundred)."""

    __slots__ = ("_error", "_stacks", "_text")

    def __init__(
        self, error: BaseException, stacks: dict[int, list[tuple[str, int, str, None]]]
    ) -> None:
        self._error = error
        self._stacks = stacks
        self._text: str | None = None

    def text(self) -> str:
        if self._text is None:
            # what traceback.format_exception builds (causes, contexts, notes, a group's
            # members in their boxes, its width and depth limits), given the stacks kept
            report = traceback.TracebackException.from_exception(self._error, compact=True)
            self._place(report)
            self._text = _truncated("".join(report.format()))
        return self._text

    def _place(self, report: traceback.TracebackException) -> None:
        """Give each exception of ``report`` (built from the copy, which has no frames)
        the stack its original passed through."""
        pending = [(report, self._error)]
        while pending:
            part, error = pending.pop()
            stack = self._stacks.get(id(error))
            if stack:
                part.stack = traceback.StackSummary.from_list(stack)
            if part.__cause__ is not None and error.__cause__ is not None:
                pending.append((part.__cause__, error.__cause__))
            if part.__context__ is not None and error.__context__ is not None:
                pending.append((part.__context__, error.__context__))
            if part.exceptions and isinstance(error, BaseExceptionGroup):
                pending.extend(zip(part.exceptions, error.exceptions, strict=False))


def without_frames(error: BaseException) -> tuple[BaseException, FramelessTraceback]:
    """A copy of ``error`` that holds no frames: same class, ``args``, attributes and notes,
    its cause and context (and a group's exceptions) copied so too, no ``__traceback__``;
    and its traceback without frames, formatted when read.

    A traceback holds the frames it passed through and, with them, every local of the
    handler that raised (``self``, ``ctx``, the message, whatever state it built): a
    record kept for long (the dead-letter ring) keeps this copy instead. Built without
    calling the class's ``__init__`` (user code, whose parameters need not be ``args``);
    an exception whose class cannot be built so is kept as it is.
    """
    stacks: dict[int, list[tuple[str, int, str, None]]] = {}
    copy = _copy_without_frames(error, {}, stacks)
    return copy, FramelessTraceback(copy, stacks)


def _copy_without_frames(
    error: BaseException,
    copies: dict[int, BaseException],
    stacks: dict[int, list[tuple[str, int, str, None]]],
) -> BaseException:
    done = copies.get(id(error))
    if done is not None:  # a cycle of contexts, or one exception met twice
        return done
    cls = type(error)
    try:
        if isinstance(error, BaseExceptionGroup):
            members = [_copy_without_frames(e, copies, stacks) for e in error.exceptions]
            copy = cls.__new__(cls, error.message, members)
            copy.args = (error.message, members)  # not the originals, with their frames
        else:
            copy = cls.__new__(cls, *error.args)
            copy.args = error.args
        state = getattr(error, "__dict__", None)
        if state:
            copy.__dict__.update(state)
    except Exception:  # a __new__ of its own that wants other arguments
        return error
    copies[id(error)] = copy
    stack = []
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        stack.append((code.co_filename, tb.tb_lineno, code.co_name, None))
        tb = tb.tb_next
    stacks[id(copy)] = stack
    if error.__cause__ is not None:
        copy.__cause__ = _copy_without_frames(error.__cause__, copies, stacks)
    if error.__context__ is not None:
        copy.__context__ = _copy_without_frames(error.__context__, copies, stacks)
    copy.__suppress_context__ = error.__suppress_context__
    return copy


class NexusError(Exception):
    """Base class of every error raised by nexus_trio.

    An error pickles (and copies) as what it is: its ``args`` (the message) and its
    attributes, restored without calling ``__init__`` again (whose parameters are not
    its ``args``: Exception's own pickling passed the message to it as the first
    argument, wrapping it twice or failing for want of the others).
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # copyreg.__newobj__(cls) is cls.__new__(cls) (pickle's NEWOBJ; typeshed omits
        # it); ``args`` is set with the attributes, as OSError's __new__ (under
        # TimeoutError) ignores those given to it
        new = copyreg.__newobj__  # type: ignore[attr-defined]
        return new, (type(self),), {"args": self.args, **self.__dict__}


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The one of ``choices`` nearest ``word`` (difflib's ratio, at least 0.6), or None: the
    ``did you mean ...?`` of every error about a misspelt name (an option, a config key, an
    agent's name). difflib is imported on use: only an error pays for it."""
    import difflib

    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return near[0] if near else None


def meant_choice(value: Any, choices: Iterable[str]) -> tuple[str, bool] | None:
    """The one of ``choices`` a text ``value`` means, and whether only its spelling is off:
    itself in another case or with ``-`` or spaces for ``_`` (``'Drop-Oldest'``:
    ``('drop_oldest', True)``), else the :func:`nearest` (``'blok'``: ``('block',
    False)``); None for a value that is no text or near no choice."""
    if not isinstance(value, str):
        return None
    known = list(choices)
    spelled = value.strip().lower().replace("-", "_").replace(" ", "_")
    if spelled in known:
        return spelled, True
    near = nearest(spelled, known)
    return None if near is None else (near, False)


#: the most entries (ids and names) of a kernel's table an AgentNotFound looks through
#: for a name near the one not found: difflib compares each, about 20 ms for 1,000
#: similar names, a good part of a second for 10,000
HINT_LIMIT: Final = 2_000

_NO_HINT: Final = ""


class AgentNotFound(NexusError, LookupError):
    """No agent is registered under ``address`` (an id or a name).

    Shown (``str``), a name not found is followed by the nearest registered name, if one
    is near (``did you mean 'greeter'?``): looked for then, once, in ``known``, the
    kernel's own table (kept, not copied: a failing send pays nothing for the hint), and
    only in a table of at most 2,000 entries (``HINT_LIMIT``). ``args`` hold the message
    without it; never for an id. Pickled or copied, it takes the hint along (looked for
    then if it was not yet), not the table.

    ``node`` names the node that reported it, for a request another node answered so
    (``no agent is registered as 'ghost' on node 'c'``; ``address`` is then the agent
    that node did not find, also one a router agent there sent the query on to); None
    for one raised here.
    """

    # (slots, not the instance dict: the table is neither pickled nor copied with it)
    __slots__ = ("_hint", "_known")

    def __init__(
        self,
        address: uuid.UUID | str,
        known: Collection[object] | None = None,
        *,
        detail: str = "",
        node: str | None = None,
    ) -> None:
        self.address = address
        self.node = node
        #: what the kernel knew of why (it is being stopped, was given up on, is
        #: SYSTEM_ID, ...), or ""; also from another node
        self.detail = detail
        #: the addresses the kernel knew (its live table, or None), for the hint
        self._known = known
        self._hint: str | None = None
        text = f"no agent is registered as {address!r}"
        if node is not None:
            text = f"{text} on node {node!r}"
        super().__init__(f"{text} ({detail})" if detail else text)

    def __str__(self) -> str:
        text = super().__str__()
        hint = self._shown_hint()
        return f"{text}; did you mean {hint!r}?" if hint else text

    def __reduce__(self) -> tuple[Any, ...]:
        # the hint goes with it (worked out now if it was not yet), the table does not
        rebuild, args, state = super().__reduce__()
        return rebuild, args, {**state, "_hint": self._shown_hint()}

    def _shown_hint(self) -> str:
        hint = getattr(self, "_hint", None)
        if hint is None:
            hint = self._hint = self._near_name()
        return hint

    def _near_name(self) -> str:
        # an error that was pickled or copied has no table (its slot unset)
        known = getattr(self, "_known", None)
        self._known = None  # looked at once: the table is not kept past it
        address = self.address
        if known is None or not isinstance(address, str) or len(known) > HINT_LIMIT:
            return _NO_HINT
        try:
            uuid.UUID(address)
        except ValueError:
            pass
        else:
            return _NO_HINT  # an id as text: ids are not misspelt
        try:
            names = [name for name in known if isinstance(name, str) and name != address]
        except RuntimeError:  # changed while read (shown from another thread)
            return _NO_HINT
        return nearest(address, names) or _NO_HINT


class NameTaken(NexusError, ValueError):
    """An agent with this ``name`` is already alive in the kernel (or, ``node`` given, in
    the cluster: the name is held by agent ``holder`` on that node), or (``tree`` set, the
    name of the supervisor spawned) the name is given twice in one tree being spawned,
    ``holder`` then the id the first of the two would have had: nothing of the tree
    was spawned."""

    def __init__(
        self,
        name: str,
        holder: uuid.UUID,
        *,
        node: str | None = None,
        tree: str | None = None,
    ) -> None:
        self.name = name
        self.holder = holder
        self.node = node
        self.tree = tree
        if tree is None:
            where = "" if node is None else f" on node {node!r}"
            text = f"agent name {name!r} is already taken by agent {holder}{where}"
        else:
            text = (
                f"agent name {name!r} is given twice in the tree of supervisor {tree!r}:"
                " nothing of the tree was spawned"
            )
        super().__init__(text)


class MailboxFull(NexusError):
    """The recipient's mailbox stayed full: the message was *not* enqueued.

    Raised by ``send`` after ``send_timeout`` under the ``block`` policy, at once by
    ``send_nowait`` and under the ``reject`` policy.

    ``node`` names the node that refused it, for a request another node answered so (in
    its text too); None for one raised here.

    ``detail``: what ran out when it was not the recipient's mailbox, said in its place
    (a transport's credit window: the recipient's node has taken in none of the sender's
    last ``capacity`` tells, the mailbox itself may have room); "" for a full mailbox.
    """

    def __init__(
        self,
        recipient: uuid.UUID,
        name: str | None,
        capacity: int,
        message_id: uuid.UUID,
        *,
        node: str | None = None,
        detail: str = "",
    ) -> None:
        self.recipient = recipient
        self.name = name
        self.capacity = capacity
        self.message_id = message_id
        self.node = node
        self.detail = detail
        who = f"{name!r} ({recipient})" if name else str(recipient)
        where = f" on node {node!r}" if node is not None else ""
        if detail:
            text = f"{detail}; message {message_id} to agent {who}{where} was not enqueued"
        else:
            text = (
                f"mailbox of agent {who}{where} is full (capacity {capacity}); message"
                f" {message_id} was not enqueued"
            )
        super().__init__(text)


#: what a KernelShuttingDown says of the phase the kernel was in when it refused
_PHASE_SAID: Final = {
    "draining": "kernel is shutting down (draining: requests from outside its agents are refused)",
    "stopping": "kernel is shutting down (stopping: the grace period is over, nothing"
    " more is handled)",
    "stopped": "kernel has shut down (stopped)",
    "detached": "transport detached (the node left its cluster; its kernel runs on)",
}
#: the phases a KernelShuttingDown names (besides "", not known)
SHUTDOWN_PHASES: Final = frozenset(_PHASE_SAID)


class KernelShuttingDown(NexusError):
    """The kernel is stopping and accepts no new messages or agents.

    ``phase`` is the kernel's phase when it refused (``"draining"``, ``"stopping"`` or
    ``"stopped"``: ``KernelPhase``'s names in lower case), named in the message;
    ``"detached"`` for what came from another kernel, or was to go to one, after the
    transport was detached while the kernel runs on (a node that left its cluster);
    ``""`` when not known (an error frame of an earlier version), and for a spawn
    refused as supervision escalates to the kernel, before its shutdown begins."""

    def __init__(self, what: str = "send", phase: str = "") -> None:
        self.what = what
        self.phase = phase
        said = _PHASE_SAID.get(phase, "kernel is shutting down")
        super().__init__(f"{said}: {what} refused")


class AgentNotRunning(NexusError, RuntimeError):
    """The agent a :class:`Context` belongs to is not running, and what was asked of the
    context needs it to: ``ctx.spawn`` and ``ctx.monitor`` once the agent has stopped for
    good (a linked child needs a running parent, a monitor a living watcher), ``ctx.nursery``
    outside a run. A RuntimeError, as Trio's for
    a nursery closed to new arrivals: the context outlived its agent (kept in a closure,
    another agent or a task outside the agent's nursery)."""

    def __init__(self, agent_id: uuid.UUID, name: str | None, problem: str) -> None:
        self.agent_id = agent_id
        self.name = name
        self.problem = problem
        who = f"{name!r} ({agent_id})" if name else str(agent_id)
        super().__init__(f"agent {who} {problem}")


def _addressee(to: uuid.UUID | str, name: str | None) -> str:
    """The agent a request went to, for its error: an id as the other errors write one
    (``'greeter' (5b0c...)``, or the id alone for an agent without a name), a name as
    it was asked (``'greeter'``)."""
    if isinstance(to, uuid.UUID):
        return f"{name!r} ({to})" if name else str(to)
    return repr(to)


class RequestTimeout(NexusError, TimeoutError):
    """No reply to request ``request_id`` arrived within ``timeout`` seconds.

    ``name`` is the name of the agent ``to`` (an id) when it has one and this kernel knew
    it (an agent of another node asked by id is named by its id alone), else None."""

    def __init__(
        self,
        request_id: uuid.UUID,
        to: uuid.UUID | str,
        timeout: float,
        detail: str = "",
        *,
        name: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.to = to
        self.timeout = timeout
        #: what the kernel knows of why (e.g. the handler returned None), or ""
        self.detail = detail
        self.name = name if isinstance(to, uuid.UUID) else None
        text = f"request {request_id} to {_addressee(to, name)} got no reply within {timeout:g}s"
        super().__init__(f"{text} ({detail})" if detail else text)


class AgentStopped(NexusError):
    """The agent stopped before it could answer (e.g. during a request)."""

    def __init__(self, agent_id: uuid.UUID, name: str | None) -> None:
        self.agent_id = agent_id
        self.name = name
        super().__init__(f"agent {name or agent_id} stopped")


class MessageFailed(NexusError):
    """Raised by a handler to fail the current message only; the agent keeps running.

    The message is dead-lettered (reason ``handler_error``, or ``reason`` if given, e.g.
    ``DeadLetterReason.MALFORMED``), counted as failed, and a pending request for it gets
    :class:`RequestFailed`. Unlike any other exception it does not fail the agent, so the
    supervisor does not restart it (used by process agents for a child's error frame).
    """

    def __init__(self, detail: str, *, reason: Any = None) -> None:
        self.detail = detail
        self.reason = reason
        super().__init__(detail)


def unsendable(exc: MessageFailed) -> Exception:
    """What a caller's send gets for a message its transport cannot carry at all (the
    transport's MessageFailed, e.g. a payload NATS cannot encode): the error of an API
    misuse, of its cause's class (TypeError, else ValueError), naming the problem; nothing
    was taken. A handler's message is dead-lettered instead (see the router)."""
    return (TypeError if isinstance(exc.__cause__, TypeError) else ValueError)(exc.detail)


class MessageDecodeError(NexusError, ValueError):
    """Input could not be decoded into a message; ``field`` names what was wrong."""

    def __init__(self, field: str, problem: str, value: Any = None) -> None:
        self.field = field
        self.problem = problem
        self.value = value
        super().__init__(f"invalid message field {field!r}: {problem}")


class SupervisorEscalation(NexusError):
    """A supervisor exceeded its restart intensity and gave up.

    Raised by ``open_kernel`` when the failure reached the kernel (``[supervision]
    escalate_to_kernel``); also the ``error`` of the ``failed`` and ``restarted`` events
    (and the reason of the monitors' ``failed`` notice) of a nested supervisor that gave
    up. ``chain`` names the supervisors and agent the failure went through, innermost
    last; ``last_error`` is the exception that tripped the limit.
    """

    def __init__(self, chain: tuple[str, ...], last_error: BaseException | None) -> None:
        self.chain = chain
        self.last_error = last_error
        path = " -> ".join(chain)
        super().__init__(
            f"restart intensity exceeded along {path}; last error: {error_repr(last_error)}"
        )


class RequestFailed(NexusError):
    """The request was accepted but will never be answered: its Query was dead-lettered.

    ``to`` is the address the request was sent to; ``reason`` is the dead-letter reason
    (e.g. ``"handler_error"``, ``"agent_stopped"``); ``error`` is the handler's exception
    when there was one. ``at`` is the agent where the query failed when a handler at
    ``to`` passed it on there (a pool's worker: ``'workers/0'``), its name if it has one,
    else None. ``node`` names the node where the query was dead-lettered, for a request
    another node answered so (``request ... to 'h' failed on node 'b' (handler_timeout)``);
    None for one failed here. ``name`` is the name of the agent ``to`` (an id) when it has
    one (``request ... to 'greeter' (5b0c...) failed (handler_error)``), else None (the id
    alone in the text).
    """

    def __init__(
        self,
        request_id: uuid.UUID,
        to: uuid.UUID | str,
        reason: str,
        error: BaseException | None,
        *,
        at: uuid.UUID | str | None = None,
        node: str | None = None,
        name: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.to = to
        self.reason = reason
        self.error = error
        self.at = at
        self.node = node
        self.name = name if isinstance(to, uuid.UUID) else None
        detail = f": {error_repr(error)}" if error is not None else ""
        where = f" at {at!r}" if at is not None else ""
        if node is not None:
            where += f" on node {node!r}"
        super().__init__(
            f"request {request_id} to {_addressee(to, name)} failed{where} ({reason}){detail}"
        )


class TransportUnavailable(NexusError):
    """The transport to remote kernels cannot deliver right now (e.g. NATS is unreachable)."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"transport unavailable: {detail}")
