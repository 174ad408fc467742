"""The API usage files of tests/typing (checked by ``mypy --strict`` in ``nox -s typecheck``)
also run: what they type-check is what works."""

from __future__ import annotations

import trio

from tests.typing import agents, kernel


def test_every_declared_spec_is_a_spec_with_its_options() -> None:
    names = [spec.name for spec in agents.ALL_SPECS]
    assert names == [None, "greeter", None, None, None, "echo-2", "counter", "shout"]
    assert agents.greeter.mailbox_capacity == 64
    assert agents.greeter.handle_timeout == 2.0
    assert agents.Tally.name == "tally"  # type: ignore[attr-defined]  # a spec at run time


def test_a_misspelt_option_is_flagged_and_named() -> None:
    texts = agents.misspelt_options()
    assert len(texts) == 4
    for text in texts:
        assert "unknown option 'capacity'" in text
        assert text.endswith("did you mean mailbox_capacity=?")
    # AgentSpec(...) called directly names its options too (it said only Python's
    # "AgentSpec.__init__() got an unexpected keyword argument 'capacity'")
    assert texts[3].startswith(
        "AgentSpec() got an unknown option 'capacity' (its options: factory, name,"
        " mailbox_capacity, handle_timeout,"
    ), texts[3]


def test_the_kernel_usage_runs_and_sees_what_it_asked_for() -> None:
    seen = trio.run(kernel.main)
    assert seen["count"] == 2  # the told message, then the request
    assert seen["greeting"] == "hello world"
    assert seen["echo"] == [1, 2, 3]
    assert seen["reply_to"] == seen["sent_id"]
    assert seen["evolved_to"] == "greeter"
    assert seen["not_found"] == "AgentNotFound"
    assert seen["request_error"] == "AgentNotFound"
    assert seen["sender_is_system"] is True
    assert seen["agents"] == ["", "greeter", "tally", "team-echo"]
    assert seen["misspelt_option"].startswith(
        "kernel.spawn() got an unknown option 'capacity' (its options: name, supervisor);"
        " mailbox_capacity= is an option of the agent"
    )
