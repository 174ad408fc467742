"""Stepping a handler coroutine without the exception of its return.

The serve loop steps each handler's coroutine once by hand, so that only a handler that
suspends gets a deadline (arming a timer costs more than a whole message when nothing
awaits). ``coro.send(None)`` tells a handler that returned by raising ``StopIteration``,
and that exception costs about three times as much as the rest of a no-op handler's
call. A :class:`Stepper` runs the handler inside a generator with ``yield from``, where a
return is not an exception: :meth:`Stepper.send` gives :data:`DONE` (the result is in
``box[0]``), :data:`FAILED` (the exception is in ``box[1]``), or the handler's first trap
when it suspended. A suspended stepper belongs to the caller until the handler ends
(:func:`resume`); the kernel's idle one is shared by all its agents (see
``CellDefaults.stepper``), which is safe because a handler that does not suspend runs to
its end before any other task runs. The kernel's stepper runs a serve loop's whole batch
a step (``_cell._serve_batches``, its ``drive``): a resumption per message cost about 700
instructions. :func:`unprotect` keeps the handlers a protected serve loop
steps interruptible by Ctrl-C.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Final, final

import trio

#: what :meth:`Stepper.send` gives for a handler that returned (the result is in ``box[0]``)
DONE: Final = object()
#: ... and for a handler that raised (the exception is in ``box[1]``)
FAILED: Final = object()


@types.coroutine
def _drive(box: list[Any]) -> Generator[Any, Any, None]:
    outcome = DONE
    while True:
        try:
            # The wait for the next handler is inside the ``try`` too: an exception that
            # arrives as the generator resumes (a KeyboardInterrupt from Trio's signal
            # handler) is reported as that handler's failure, and the stepper lives on.
            # Yielded outside the ``except`` block: a generator suspended there would
            # keep the exception (and its traceback's frames) alive until its next step.
            coro: Coroutine[Any, Any, Any] = yield outcome
            box[0] = yield from coro
            outcome = DONE
        except GeneratorExit as exc:
            # This generator closed (its traceback is this frame alone: thrown in at a
            # ``yield``, or raised here once the handler it drove was closed): it ends.
            # A handler that raised GeneratorExit itself (its frames are in the
            # traceback) failed as with any other exception: the stepper the kernel's
            # agents share lives on, or every handler stepped after it would fail.
            traceback = exc.__traceback__
            if traceback is None or traceback.tb_next is None:
                raise
            box[1] = exc
            outcome = FAILED
        except BaseException as exc:
            box[1] = exc
            outcome = FAILED


#: the handlers' code objects marked as the agents' own code (see unprotect)
_UNPROTECTED: Final[set[types.CodeType]] = set()


def unprotect(handler: Callable[..., Any]) -> None:
    """Mark ``handler``'s code as not protected from KeyboardInterrupt, once per code.

    The serve loop that steps handlers is protected (a Ctrl-C there goes to the run's
    main task at its next checkpoint, as in Trio's own code), and so would be whatever
    it calls; Trio decides by the nearest frame whose code is marked, so a handler's
    code marked unprotected is interrupted where it runs, and so are the functions it
    calls (a handler stuck in a loop must stay interruptible). A handler with no code
    of its own to mark (a builtin) stays protected.
    """
    # Once marked, a run pays one read and one set lookup (a method passes the read of
    # ``__code__`` on to its function): the unwrapping below cost 40 opcodes a start.
    if getattr(handler, "__code__", None) in _UNPROTECTED:
        return
    function: Any = handler
    while True:
        if isinstance(function, functools.partial):
            function = function.func
        elif isinstance(function, types.MethodType):
            function = function.__func__
        else:
            break
    code = getattr(function, "__code__", None)
    if not isinstance(code, types.CodeType) or code in _UNPROTECTED:
        return
    trio.lowlevel.disable_ki_protection(function)
    _UNPROTECTED.add(code)


@final
class Stepper:
    """Steps handler coroutines, one at a time (see the module doc)."""

    __slots__ = ("box", "send", "throw")

    def __init__(self, drive: Callable[[list[Any]], Generator[Any, Any, None]] = _drive) -> None:
        #: ``[result, exception, message, count]`` of the last handler (the last two for
        #: a ``drive`` of the caller's that steps several handlers a step: the serve
        #: loop's batches, see ``_cell``)
        self.box: list[Any] = [None, None, None, 0]
        steps = drive(self.box)
        steps.send(None)
        #: ``send(coro)``: run ``coro`` until it returns, raises or suspends
        self.send: Callable[[Any], Any] = steps.send
        self.throw: Callable[[BaseException], Any] = steps.throw

    def failure(self) -> BaseException:
        """The exception the last handler raised (forgotten here)."""
        box = self.box
        exc: BaseException = box[1]
        box[1] = None
        return exc


@types.coroutine
def resume(stepper: Stepper, trap: Any) -> Generator[Any, Any, Any]:
    """Drive a suspended handler to its end, passing its traps to Trio: its result, or
    its exception raised here."""
    send = stepper.send
    throw = stepper.throw
    while True:
        try:
            value = yield trap
        except BaseException as exc:
            trap = throw(exc)
        else:
            trap = send(value)
        if trap is DONE:
            return stepper.box[0]
        if trap is FAILED:
            raise stepper.failure()
