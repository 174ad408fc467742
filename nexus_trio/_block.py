"""Async context managers that say how they are used when they are not.

``with open_kernel() as kernel:`` (a plain ``with``) or ``await open_kernel()`` failed on
Python 3.11 with ``'_AsyncGeneratorContextManager' object does not support the context
manager protocol``, naming neither the call nor ``async with``. :func:`async_block` makes an
``@asynccontextmanager`` function whose result refuses both, naming the call.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, final

T = TypeVar("T")
P = ParamSpec("P")


def not_with(call: str, name: str) -> TypeError:
    """The error of ``with call`` or ``await call``: it takes ``async with``."""
    return TypeError(
        f"{call} is an async context manager: write 'async with {call} as {name}:' inside"
        " an 'async def' (run by trio.run), not 'with' or 'await'"
    )


@final
class AsyncBlock(AbstractAsyncContextManager[T], Generic[T]):
    """What an :func:`async_block` function returns: entered with ``async with`` only."""

    __slots__ = ("_call", "_manager", "_name")

    def __init__(self, manager: AbstractAsyncContextManager[T], call: str, name: str) -> None:
        self._manager = manager
        self._call = call
        self._name = name

    async def __aenter__(self) -> T:
        return await self._manager.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._manager.__aexit__(exc_type, exc, tb)

    if not TYPE_CHECKING:  # (a type checker flags 'with' and 'await' itself)

        def __enter__(self) -> Any:
            raise not_with(self._call, self._name)

        def __exit__(self, *exc: object) -> None:
            pass  # (never reached: __enter__ raised)

        def __await__(self) -> Any:
            raise not_with(self._call, self._name)


def async_block(
    call: str, name: str
) -> Callable[[Callable[P, AsyncIterator[T]]], Callable[P, AsyncBlock[T]]]:
    """``@asynccontextmanager``, the result refusing ``with``/``await`` naming ``call``
    (and ``async with call as name:``)."""

    def wrap(function: Callable[P, AsyncIterator[T]]) -> Callable[P, AsyncBlock[T]]:
        manager = asynccontextmanager(function)

        @functools.wraps(function)
        def block(*args: P.args, **kwargs: P.kwargs) -> AsyncBlock[T]:
            return AsyncBlock(manager(*args, **kwargs), call, name)

        return block

    return wrap
