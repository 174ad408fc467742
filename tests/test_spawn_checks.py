"""A class or a handler spawned many times is checked once, and again whenever what the
checks read changed: the spec kept for it never hides an error, never keeps it alive."""

from __future__ import annotations

import gc
import re
import weakref
from typing import Any

import attrs
import pytest
import trio.testing

from nexus_trio import Agent, AgentSpec, Context, Message, agent, open_kernel
from nexus_trio._agent import as_spec

from .conftest import make_config


def _idle_class() -> type[Agent]:
    class Idle(Agent):
        async def handle(self, ctx: Context, msg: Message) -> str:
            return "ok"

    return Idle


async def test_a_class_spawned_again_takes_the_spec_of_its_first_spawn() -> None:
    idle = _idle_class()
    async with open_kernel(make_config()) as kernel:
        first = kernel.spawn(idle, name="first")
        second = kernel.spawn(idle, name="second")
        assert [first.name, second.name] == ["first", "second"]
        assert await kernel.request(first, "hi") == "ok"
        # (kept while its agents hold it: one spec for every spawn of the class)
        assert as_spec(idle) is as_spec(idle)
        assert as_spec(idle).factory is idle

    async def handler(ctx: Context, msg: Message) -> str:
        return "ok"

    kept = as_spec(handler)
    assert as_spec(handler) is kept
    assert kept.handler is handler


@pytest.mark.parametrize(
    ("hook", "replacement", "error"),
    [
        ("handle", lambda self, ctx, msg: None, "Idle.handle is a plain function ('def')"),
        ("on_start", lambda self, ctx: None, "Idle.on_start is a plain function ('def')"),
        ("on_stop", lambda self, ctx: None, "Idle.on_stop is a plain function ('def')"),
        ("handle", None, "Idle has no handle(ctx, msg) method"),
    ],
)
async def test_a_class_changed_after_its_first_spawn_is_checked_again(
    hook: str, replacement: Any, error: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    idle = _idle_class()
    async with open_kernel(make_config()) as kernel:
        ref = kernel.spawn(idle)
        monkeypatch.setattr(idle, hook, replacement)
        with pytest.raises(TypeError, match=re.escape(error)):
            kernel.spawn(idle)
        monkeypatch.undo()
        kernel.spawn(idle)
        assert await kernel.request(ref, "hi") == "ok"


async def test_a_handle_whose_signature_changed_after_its_first_spawn_is_refused() -> None:
    idle = _idle_class()

    async def one_argument(self: Any, msg: Any) -> None:
        return None

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(idle)
        handle = idle.handle
        # the same function, its code replaced in place: (self, msg)
        handle.__code__ = one_argument.__code__
        with pytest.raises(TypeError, match=re.escape("Idle.handle(self, msg) cannot be called")):
            kernel.spawn(idle)
        del idle.handle  # Agent's own: an agent of hooks only, taken
        kernel.spawn(idle)


async def test_a_subclass_of_a_class_spawned_before_is_checked_as_itself() -> None:
    idle = _idle_class()

    class Sync(idle):  # type: ignore[misc, valid-type]
        def handle(self, ctx: Any, msg: Any) -> None:
            return None

    class Heir(idle):  # type: ignore[misc, valid-type]
        pass

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(idle)
        with pytest.raises(TypeError, match=re.escape("Sync.handle is a plain function")):
            kernel.spawn(Sync)
        assert as_spec(Heir).factory is Heir
        ref = kernel.spawn(Heir)
        assert await kernel.request(ref, "hi") == "ok"
        # a parent changed after its heir's first spawn: the heir inherits the change
        idle.on_stop = lambda self, ctx: None
        with pytest.raises(TypeError, match=re.escape("Heir.on_stop is a plain function")):
            kernel.spawn(Heir)


async def test_a_handler_changed_after_its_first_spawn_is_checked_again() -> None:
    async def handler(ctx: Context, msg: Message, extra: Any = None) -> None:
        return None

    async def four(ctx: Any, msg: Any, first: Any, second: Any = None) -> None:
        return None

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(handler)
        handler.__defaults__ = None
        shown = "handler(ctx, msg, extra) cannot be called so"
        with pytest.raises(TypeError, match=re.escape(shown)):
            kernel.spawn(handler)
        handler.__defaults__ = (None,)
        kernel.spawn(handler)
        # its code replaced in place (by a coroutine function's: Python 3.12 deprecates a
        # swap of a coroutine's code for a plain function's), one default still: (ctx,
        # msg, first, second=None) cannot be called with two arguments
        handler.__code__ = four.__code__
        shown = "handler(ctx, msg, first, second) cannot be called so"
        with pytest.raises(TypeError, match=re.escape(shown)):
            kernel.spawn(handler)

    async def keyword(ctx: Context, msg: Message, *, flag: Any = None) -> None:
        return None

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(keyword)
        assert keyword.__kwdefaults__ is not None
        del keyword.__kwdefaults__["flag"]  # (the same dict, changed in place)
        with pytest.raises(TypeError, match=re.escape("keyword(ctx, msg, flag) cannot be")):
            kernel.spawn(keyword)


async def test_hooks_that_are_not_plain_functions_are_checked_at_every_spawn() -> None:
    class Static(Agent):
        @staticmethod
        async def handle(ctx: Any, msg: Any) -> str:
            return "static"

    async with open_kernel(make_config()) as kernel:
        ref = kernel.spawn(Static)
        assert await kernel.request(ref, "hi") == "static"

        def sync(ctx: Any, msg: Any) -> None:
            return None

        Static.handle = staticmethod(sync)  # type: ignore[assignment]
        with pytest.raises(TypeError, match=re.escape("Static.handle is a plain function")):
            kernel.spawn(Static)


async def test_a_class_and_a_handler_spawned_then_deleted_are_collected() -> None:
    idle = _idle_class()

    async def handler(ctx: Context, msg: Message) -> str:
        return "ok"

    gone = [weakref.ref(idle), weakref.ref(handler)]
    async with open_kernel(make_config()) as kernel:
        refs = [kernel.spawn(idle), kernel.spawn(handler)]
        for ref in refs:
            assert await kernel.request(ref, "hi") == "ok"
            await kernel.stop(ref)
        await trio.testing.wait_all_tasks_blocked()
    del idle, handler, refs
    gc.collect()
    assert [ref() for ref in gone] == [None, None]


async def test_a_spec_gone_with_its_agents_is_built_again_without_the_checks_failing() -> None:
    idle = _idle_class()
    async with open_kernel(make_config()) as kernel:
        ref = kernel.spawn(idle)
        await kernel.stop(ref)
        await trio.testing.wait_all_tasks_blocked()
        del ref
        gc.collect()
        again = kernel.spawn(idle, name="again")
        assert again.name == "again"
        assert await kernel.request(again, "hi") == "ok"
        assert as_spec(idle).factory is idle


async def test_a_class_whose_metaclass_makes_it_unhashable_is_spawned() -> None:
    class Meta(type):
        def __eq__(cls, other: object) -> bool:
            return cls is other

        __hash__ = None  # type: ignore[assignment]

    class Odd(Agent, metaclass=Meta):
        async def handle(self, ctx: Context, msg: Message) -> str:
            return "odd"

    async with open_kernel(make_config()) as kernel:
        refs = [kernel.spawn(Odd), kernel.spawn(Odd)]
        assert [await kernel.request(ref, "hi") for ref in refs] == ["odd", "odd"]
        Odd.handle = lambda self, ctx, msg: None  # type: ignore[method-assign, assignment]
        with pytest.raises(TypeError, match=re.escape("Odd.handle is a plain function")):
            kernel.spawn(Odd)


def test_a_spec_renamed_keeps_every_other_field() -> None:
    """``with_options(name=)`` (a named spawn's copy) gives every field back by hand: a
    field added to ``AgentSpec`` and not to the copy would fall back to its default."""

    async def handler(ctx: Context, msg: Message) -> str:
        return "ok"

    spec = agent(
        handler,
        name="a",
        mailbox_capacity=3,
        handle_timeout=2.0,
        overflow="drop_newest",
        restart="transient",
        shutdown_timeout=4.0,
        on_error={KeyError: "stop"},
    )
    defaults = {a.name: a.default for a in attrs.fields(AgentSpec)}
    unset = [name for name, default in defaults.items() if getattr(spec, name) == default]
    assert unset == []  # (a new field: give it a value above)
    renamed = spec.with_options(name="b")
    assert renamed == attrs.evolve(spec, name="b")
    assert renamed.name == "b"
    assert [getattr(renamed, n) for n in defaults if n != "name"] == [
        getattr(spec, n) for n in defaults if n != "name"
    ]
    with pytest.raises(ValueError, match="looks like a UUID"):
        spec.with_options(name="6f1c8a52-2c4e-4f0b-9a59-2d5e0b1f3c11")
    with pytest.raises(TypeError, match="agent name must be a string"):
        spec.with_options(name=3)
