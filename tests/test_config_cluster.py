"""The ``[cluster]`` and ``[durable]`` sections: each key, from the file and from the
environment, reaches the ``ClusterOptions`` a join without ``options`` uses
(``ClusterOptions.from_config``: ``nexus run --nats``, each ``--workers`` worker,
``join_cluster``); the rules across keys fail at the load, naming the keys and where each
was set, never later inside a run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus_trio import ClusterConfig, Config, DurableConfig, NatsConfig
from nexus_trio._config import LAST_NOTICE_MARGIN, CrossKeyError, server_lost_wait_of
from nexus_trio._nats import NatsServer
from nexus_trio.config import ConfigError, load_config, render_template
from nexus_trio.nats import ClusterOptions, ClusterOptionsWarning, DurableOptions

from . import test_config_fuzz
from .test_cli import Nexus, conserved, nats_url, nexus  # noqa: F401 (fixtures)

#: a valid value other than the default of each key, as TOML writes it, and as Python
#: reads it back
CLUSTER_VALUES: dict[str, tuple[str, Any]] = {
    "prefix": ('"ops"', "ops"),
    "heartbeat_interval": ("0.5", 0.5),
    "missed_heartbeats": ("7", 7),
    "kv_replicas": ("3", 3),
    "connect_timeout": ("4.5", 4.5),
    "connect_attempts": ("6", 6),
    "join_timeout": ("40", 40),
    "reconnect_wait": ("0", 0),
    "max_reconnect_attempts": ("12", 12),
    "outbox_high_water": ("100", 100),
    "outbox_limit": ("200", 200),
    "inbound_limit": ("300", 300),
    "parked_limit": ("400", 400),
    "node_window": ("500", 500),
    "batch_frames": ("64", 64),
    "batch_bytes": ("65536", 65536),
    "inbound_streams_limit": ("50", 50),
    "forget_lost_after": ("60.5", 60.5),
    "last_notice_wait": ("30", 30),
    "notice_wait_at_leave": ("0.25", 0.25),
}
DURABLE_VALUES: dict[str, tuple[str, Any]] = {
    "enabled": ("false", False),
    "ack_wait": ("12.5", 12.5),
    "max_deliver": ("9", 9),
    "redelivery_delay": ("0.75", 0.75),
    "max_in_flight": ("16", 16),
    "duplicate_window": ("90", 90),
    "max_age": ("3600", 3600),
    "max_messages": ("5000", 5000),
    "missing_agent_delay": ("0.5", 0.5),
    "missing_agent_delay_max": ("8", 8),
    "max_waiting": ("0", 0),
}
KEYS = [("cluster", key) for key in CLUSTER_VALUES] + [("durable", key) for key in DURABLE_VALUES]


def values_of(section: str) -> dict[str, tuple[str, Any]]:
    return CLUSTER_VALUES if section == "cluster" else DURABLE_VALUES


def option(options: ClusterOptions, section: str, key: str) -> Any:
    return getattr(options.durable if section == "durable" else options, key)


def load(tmp_path: Path, text: str | None = None, **env: str) -> Config:
    path = None
    if text is not None:
        path = tmp_path / "config.toml"
        path.write_text(text, encoding="utf-8")
        path.chmod(0o600)
    env.setdefault("HOME", str(tmp_path / "home"))
    return load_config(path, env=env, cwd=tmp_path).config


def test_every_option_is_a_key_and_the_values_here_are_no_defaults() -> None:
    """A field added to the options later without its key fails here (the brief: every
    field is a key, docs/config.md says why)."""
    cluster = {f.alias for f in attrs.fields(ClusterOptions)} - {"server_lost_wait", "durable"}
    assert cluster == {f.name for f in attrs.fields(ClusterConfig)} == set(CLUSTER_VALUES)
    durable = {f.name for f in attrs.fields(DurableOptions)}
    assert durable == {f.name for f in attrs.fields(DurableConfig)} == set(DURABLE_VALUES)
    for section, key in KEYS:
        default = option(ClusterOptions(), section, key)
        assert values_of(section)[key][1] != default, (section, key)


def test_a_config_without_the_keys_gives_the_options_of_before(tmp_path: Path) -> None:
    """No key set (``Config()``, an empty file, the template ``nexus config init``
    writes): ``ClusterOptions()``, the options every join used before the keys."""
    assert ClusterOptions.from_config(Config()) == ClusterOptions()
    assert ClusterOptions.from_config(load(tmp_path, "")) == ClusterOptions()
    template = load(tmp_path, render_template())
    assert template == Config()
    assert ClusterOptions.from_config(template) == ClusterOptions()
    # (last_notice_wait left out: derived from [nats] server_lost_wait, as before)
    waited = ClusterOptions.from_config(Config(nats=NatsConfig(server_lost_wait=30.0)))
    assert waited == ClusterOptions(server_lost_wait=30.0)
    assert waited.last_notice_wait == 43.0


def test_server_lost_wait_unset_in_the_file_follows_the_heartbeat_keys(tmp_path: Path) -> None:
    """``[nats] server_lost_wait`` unset is the ``[cluster]`` heartbeats' window, as
    ``ClusterOptions`` left out derives it: a file that slows the heartbeats to 2 s x 7
    gives a node (and the ``--workers`` parent's timers) 14 s, and the last notice's wait
    27 s; a given value wins."""
    config = load(tmp_path, "[cluster]\nheartbeat_interval = 2.0\nmissed_heartbeats = 7\n")
    assert config.nats.server_lost_wait is None
    assert server_lost_wait_of(config) == 14.0
    options = ClusterOptions.from_config(config)
    assert (options.server_lost_wait, options.last_notice_wait) == (14.0, 27.0)
    given = load(tmp_path, "[nats]\nserver_lost_wait = 3\n[cluster]\nheartbeat_interval = 2.0\n")
    assert server_lost_wait_of(given) == ClusterOptions.from_config(given).server_lost_wait == 3


def _load_warnings(tmp_path: Path, text: str) -> tuple[str, ...]:
    """The warnings of loading a config file of ``text``."""
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return load_config(path, env={"HOME": str(tmp_path)}, cwd=tmp_path).warnings


def test_a_server_lost_wait_not_above_reconnect_wait_is_a_warning_at_the_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A wait (given, or derived from fast heartbeats) no longer than ``[cluster]
    reconnect_wait`` gave up every outage before the client's second attempt, a restart
    of the server included, and the load said nothing: it warns now (logged, and in the
    loaded config's warnings, which ``nexus config show`` prints), naming the keys and
    their values. A wait above it, the defaults, and 0 (give up at once) say nothing."""

    def warnings(text: str) -> tuple[str, ...]:
        return _load_warnings(tmp_path, text)

    derived = warnings("[cluster]\nheartbeat_interval = 0.05\nmissed_heartbeats = 3\n")
    assert derived == (
        "[nats] server_lost_wait, unset, is [cluster] heartbeat_interval x missed_heartbeats"
        " (0.05 x 3 = 0.15), which is not above [cluster] reconnect_wait (0.2): a node"
        " gives up a lost NATS connection before its second attempt to reconnect, so even"
        " a restart of the server is not ridden out (a --workers worker fails with"
        " NatsServerLost); set [nats] server_lost_wait above reconnect_wait and above how"
        " long your servers take to fail over",
    )
    assert [r.getMessage() for r in caplog.records] == list(derived)
    given = warnings("[nats]\nserver_lost_wait = 2\n[cluster]\nreconnect_wait = 2.0\n")
    assert len(given) == 1
    assert given[0].startswith(
        "[nats] server_lost_wait (2) is not above [cluster] reconnect_wait (2.0): a node"
    )
    assert warnings("[cluster]\nreconnect_wait = 5\n")[0].startswith(
        "[nats] server_lost_wait, unset, is [cluster] heartbeat_interval x missed_heartbeats"
        " (1.0 x 5 = 5), which is not above [cluster] reconnect_wait (5)"
    )
    for quiet in (
        "",
        "[cluster]\nheartbeat_interval = 0.2\nmissed_heartbeats = 3\n",  # 0.6 > 0.2
        "[nats]\nserver_lost_wait = 2.5\n[cluster]\nreconnect_wait = 2.0\n",
        "[nats]\nserver_lost_wait = 0\n[cluster]\nlast_notice_wait = 1\n",
    ):
        assert warnings(quiet) == (), quiet


def test_a_durable_max_age_not_above_the_sweep_s_period_is_a_warning_at_the_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Forty-fifth pass: a message stored for a node gone for good after its look found
    nothing waits for the periodic sweep (4 x ``[cluster] last_notice_wait``, 72 s at the
    defaults); one whose ``max_age`` ended first went uncounted, and nothing said so. The
    load warns now, naming both keys and the period (given, or derived from
    ``server_lost_wait``); a ``max_age`` above it, none, or the durable path off say
    nothing. (Fails on f4c2c8f: no warning.)"""

    def warnings(text: str) -> tuple[str, ...]:
        return _load_warnings(tmp_path, text)

    derived = warnings("[durable]\nduplicate_window = 30\nmax_age = 60\n")
    assert derived == (
        "[durable] max_age (60s) is not above the durable sweep's period, 4 x [cluster]"
        " last_notice_wait (unset: [nats] server_lost_wait + 13 = 18s) = 72s: a durable"
        " message stored for a node gone for good after its look found nothing can reach"
        " its max_age before the sweep that takes it over, and goes uncounted; raise"
        " [durable] max_age well above 72s (or lower [cluster] last_notice_wait)",
    )
    assert [r.getMessage() for r in caplog.records] == list(derived)
    given = warnings("[cluster]\nlast_notice_wait = 40\n[durable]\nmax_age = 160\n")
    assert given == (
        "[durable] max_age (160s) is not above the durable sweep's period, 4 x [cluster]"
        " last_notice_wait (40s) = 160s: a durable message stored for a node gone for good"
        " after its look found nothing can reach its max_age before the sweep that takes it"
        " over, and goes uncounted; raise [durable] max_age well above 160s (or lower"
        " [cluster] last_notice_wait)",
    )
    for quiet in (
        "",
        "[durable]\nmax_age = 120\n",  # 120 > 72
        "[cluster]\nlast_notice_wait = 40\n[durable]\nmax_age = 161\n",
        "[durable]\nenabled = false\nduplicate_window = 30\nmax_age = 60\n",
    ):
        assert warnings(quiet) == (), quiet


def test_options_built_in_python_with_a_short_server_lost_wait_warn_at_the_users_line(
    tmp_path: Path,
) -> None:
    """The load's warning above was the only one: ``ClusterOptions`` built in Python (no
    config file) with a ``server_lost_wait`` not above ``reconnect_wait`` said nothing.
    They warn now (``ClusterOptionsWarning``), attributed to the line that built them,
    also through ``attrs.evolve``; options of a loaded config (``from_config``, what a
    join without ``options`` and ``nexus run`` use) do not, the load said it, once."""

    with pytest.warns(ClusterOptionsWarning) as given:
        short = ClusterOptions(server_lost_wait=1.0, reconnect_wait=2.0)
    assert [str(w.message) for w in given] == [
        "server_lost_wait (1 s) is not above reconnect_wait (2 s): a node gives up a lost"
        " NATS connection before its second attempt to reconnect, so even a restart of the"
        " server is not ridden out; give server_lost_wait above reconnect_wait and above"
        " how long your servers take to fail over"
    ]
    assert given[0].filename == __file__
    with pytest.warns(ClusterOptionsWarning, match=r"^server_lost_wait \(0.15 s, left out: "):
        ClusterOptions(heartbeat_interval=0.05, missed_heartbeats=3)
    with pytest.warns(ClusterOptionsWarning) as evolved:
        attrs.evolve(short, prefix="ops")
    assert [w.filename for w in evolved] == [__file__]
    with pytest.warns(ClusterOptionsWarning):
        attrs.evolve(ClusterOptions(), heartbeat_interval=0.01)
    path = tmp_path / "config.toml"
    path.write_text("[nats]\nserver_lost_wait = 1\n[cluster]\nreconnect_wait = 2.0\n")
    path.chmod(0o600)
    with warnings_as_errors():
        for quiet in (
            {},
            {"server_lost_wait": 2.5, "reconnect_wait": 2.0},
            {"heartbeat_interval": 0.2, "missed_heartbeats": 3},
            {"server_lost_wait": 0, "last_notice_wait": 1},
        ):
            ClusterOptions(**quiet)
        loaded = load_config(path, env={"HOME": str(tmp_path)}, cwd=tmp_path, log_warnings=False)
        assert len(loaded.warnings) == 1
        assert ClusterOptions.from_config(loaded.config).server_lost_wait == 1.0


def test_a_config_evolved_from_a_loaded_one_does_not_say_again_what_its_load_said(
    tmp_path: Path,
) -> None:
    """Forty-seventh pass: a ``Config`` made by ``attrs.evolve`` of a loaded one counted
    as built in Python, so ``from_config`` (a join without ``options``) said the load's
    doubtful values again as ``ClusterOptionsWarning``. A warning the load said, in the
    same words (the same keys and values) of a config that shares a section with the
    loaded one, is not said again now; new words are (a value the evolve changed), and
    so is a config built on its own with the same values. (Fails on 1242268: the first
    evolve warns.)"""
    text = (
        "[nats]\nserver_lost_wait = 1\n[cluster]\nreconnect_wait = 2.0\nlast_notice_wait = 20\n"
        "[durable]\nduplicate_window = 30\nmax_age = 50\n"
    )
    loaded = load(tmp_path, text)
    kernel = attrs.evolve(loaded.kernel, mailbox_capacity=7)
    with warnings_as_errors():
        ClusterOptions.from_config(loaded)
        ClusterOptions.from_config(attrs.evolve(loaded, kernel=kernel))
        renamed = attrs.evolve(loaded.cluster, prefix="ops")  # (a new [cluster], same words)
        ClusterOptions.from_config(attrs.evolve(loaded, cluster=renamed))
        # (the loaded config itself gone: its sections live on in the copy)
        ClusterOptions.from_config(attrs.evolve(load(tmp_path, text), kernel=kernel))
    changed = attrs.evolve(loaded.cluster, reconnect_wait=3.0)
    with pytest.warns(ClusterOptionsWarning) as said:
        ClusterOptions.from_config(attrs.evolve(loaded, cluster=changed))
    assert [str(w.message).partition(":")[0] for w in said] == [
        "[nats] server_lost_wait (1) is not above [cluster] reconnect_wait (3.0)",
    ]
    alone = Config(
        nats=NatsConfig(server_lost_wait=1.0),
        cluster=ClusterConfig(reconnect_wait=2.0, last_notice_wait=20.0),
        durable=DurableConfig(duplicate_window=30.0, max_age=50.0),
    )
    with pytest.warns(ClusterOptionsWarning) as said:
        ClusterOptions.from_config(alone)
    assert len(said) == 2


@contextlib.contextmanager
def warnings_as_errors() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize(("section", "key"), KEYS)
@pytest.mark.parametrize("where", ["file", "env"])
def test_each_key_reaches_the_options_of_a_join(
    tmp_path: Path, where: str, section: str, key: str
) -> None:
    written, value = values_of(section)[key]
    if where == "file":
        config = load(tmp_path, f"[{section}]\n{key} = {written}\n")
    else:
        config = load(tmp_path, **{f"NEXUS_{section.upper()}__{key.upper()}": written})
    options = ClusterOptions.from_config(config)
    got = option(options, section, key)
    assert got == value and type(got) is type(value), (got, value)
    # and nothing else changed
    expected = (
        attrs.evolve(ClusterOptions(), durable=attrs.evolve(DurableOptions(), **{key: value}))
        if section == "durable"
        else attrs.evolve(ClusterOptions(), **{key: value})
    )
    assert options == expected


def test_all_keys_at_once_reach_the_options_from_file_and_env(tmp_path: Path) -> None:
    text = "[nats]\nserver_lost_wait = 7\n"
    for section in ("cluster", "durable"):
        text += f"[{section}]\n"
        text += "".join(f"{key} = {written}\n" for key, (written, _) in values_of(section).items())
    options = ClusterOptions.from_config(load(tmp_path, text))
    assert options.server_lost_wait == 7
    for section, key in KEYS:
        assert option(options, section, key) == values_of(section)[key][1], (section, key)
    # a variable overrides the file's value
    options = ClusterOptions.from_config(
        load(tmp_path, text, NEXUS_CLUSTER__PREFIX="other", NEXUS_DURABLE__MAX_WAITING="12")
    )
    assert (options.prefix, options.durable.max_waiting) == ("other", 12)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("text", "line", "key", "message"),
    [
        (
            "[durable]\nduplicate_window = 120\n# a comment\nmax_age = 60\n",
            4,
            "durable.max_age",
            "[durable] max_age (60) must be at least [durable] duplicate_window (120):"
            " JetStream refuses a stream that forgets a message before the ids it keeps to"
            " refuse a resent one ([durable] max_age from line 4; [durable] duplicate_window"
            " from line 2)",
        ),
        (
            "[durable]\nmissing_agent_delay = 20.0\n",
            None,  # the first key of the rule is its default: the line of the other
            "durable.missing_agent_delay",
            "[durable] missing_agent_delay_max (15.0) must be at least [durable]"
            " missing_agent_delay (20.0): it caps the delay that grows from it ([durable]"
            " missing_agent_delay_max from its default; [durable] missing_agent_delay from"
            " line 2)",
        ),
        (
            "[cluster]\nlast_notice_wait = 4.5\n",
            None,
            "cluster.last_notice_wait",
            "[cluster] last_notice_wait (4.5) must be above [nats] server_lost_wait (5.0): a"
            " leave riding out a failover sends its last notice up to server_lost_wait late;"
            " raise last_notice_wait, or leave it unset (server_lost_wait + 13); [nats]"
            " server_lost_wait is unset, so it is [cluster] heartbeat_interval x"
            " missed_heartbeats: set it, or lower those ([cluster] last_notice_wait from line"
            " 2; [nats] server_lost_wait from its default; [cluster] heartbeat_interval from"
            " its default; [cluster] missed_heartbeats from its default)",
        ),
        (
            # (unset, [nats] server_lost_wait is the heartbeats' window: 2 s x 5 = 10 s)
            "[cluster]\nheartbeat_interval = 2.0\nlast_notice_wait = 8\n",
            3,
            "cluster.last_notice_wait",
            "[cluster] last_notice_wait (8) must be above [nats] server_lost_wait (10.0): a"
            " leave riding out a failover sends its last notice up to server_lost_wait late;"
            " raise last_notice_wait, or leave it unset (server_lost_wait + 13); [nats]"
            " server_lost_wait is unset, so it is [cluster] heartbeat_interval x"
            " missed_heartbeats: set it, or lower those ([cluster] last_notice_wait from line"
            " 3; [nats] server_lost_wait from its default; [cluster] heartbeat_interval from"
            " line 2; [cluster] missed_heartbeats from its default)",
        ),
        (
            "[nats]\nserver_lost_wait = 40\n[cluster]\nlast_notice_wait = 40\n",
            4,
            "cluster.last_notice_wait",
            "[cluster] last_notice_wait (40) must be above [nats] server_lost_wait (40): a"
            " leave riding out a failover sends its last notice up to server_lost_wait late;"
            " raise last_notice_wait, or leave it unset (server_lost_wait + 13) ([cluster]"
            " last_notice_wait from line 4; [nats] server_lost_wait from line 2)",
        ),
    ],
)
def test_a_rule_across_keys_broken_in_the_file_names_the_file_line_and_keys(
    tmp_path: Path, text: str, line: int | None, key: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path, env={"HOME": str(tmp_path)}, cwd=tmp_path)
    error = raised.value
    line = line if line is not None else 2
    assert str(error) == f"{path}:{line}: {message}"
    assert (error.path, error.line, error.key) == (path, line, key)


def test_the_templates_examples_of_the_two_waits_uncommented_load(tmp_path: Path) -> None:
    """Regression: ``nexus config init`` wrote ``# server_lost_wait = 30.0`` in ``[nats]``
    and ``# last_notice_wait = 30.0`` in ``[cluster]``: a user who uncommented both (a
    30 s failover, as the first one's text advises) got a file its own load refused
    (``last_notice_wait (30.0) must be above [nats] server_lost_wait (30.0)``). The
    examples of keys bound by a rule across keys keep that rule."""
    text = render_template()
    for key in ("server_lost_wait", "last_notice_wait"):
        assert f"\n# {key} = " in text, key
        text = text.replace(f"\n# {key} = ", f"\n{key} = ")
    config = load(tmp_path, text)
    options = ClusterOptions.from_config(config)
    assert options.last_notice_wait > options.server_lost_wait == 30.0


def test_a_rule_across_keys_names_the_variables_and_a_variable_may_mend_it(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, NEXUS_DURABLE__MAX_AGE="10")
    assert str(raised.value) == (
        "environment variable NEXUS_DURABLE__MAX_AGE: [durable] max_age (10) must be at"
        " least [durable] duplicate_window (120.0): JetStream refuses a stream that forgets"
        " a message before the ids it keeps to refuse a resent one ([durable] max_age from"
        " environment variable NEXUS_DURABLE__MAX_AGE; [durable] duplicate_window from its"
        " default)"
    )
    assert raised.value.key == "durable.max_age"
    # the file's value with the variable's: the file's line, the variable named
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, "[nats]\nserver_lost_wait = 9\n", NEXUS_CLUSTER__LAST_NOTICE_WAIT="8")
    assert str(raised.value).startswith(f"{tmp_path / 'config.toml'}:2: [cluster]")
    assert str(raised.value).endswith(
        "([cluster] last_notice_wait from environment variable"
        " NEXUS_CLUSTER__LAST_NOTICE_WAIT; [nats] server_lost_wait from line 2)"
    )
    assert raised.value.key == "nats.server_lost_wait"
    # a variable that mends the file's value: each value is checked alone first
    config = load(tmp_path, "[durable]\nmax_age = 60\n", NEXUS_DURABLE__DUPLICATE_WINDOW="30")
    assert ClusterOptions.from_config(config).durable.duplicate_window == 30
    config = load(tmp_path, "[durable]\nmax_age = 60\n", NEXUS_DURABLE__MAX_AGE="600")
    assert ClusterOptions.from_config(config).durable.max_age == 600
    # a flag (an override) is named as one: after the variable, as a place to fix
    home = tmp_path / "home"  # (no config file there)
    env = {"HOME": str(tmp_path), "NEXUS_CLUSTER__LAST_NOTICE_WAIT": "8"}
    with pytest.raises(ConfigError) as raised:
        load_config(None, env=env, cwd=home, overrides={"nats.server_lost_wait": 9.0})
    assert str(raised.value).startswith("environment variable NEXUS_CLUSTER__LAST_NOTICE_WAIT:")
    assert str(raised.value).endswith("[nats] server_lost_wait from the command line)")
    with pytest.raises(ConfigError) as raised:
        load_config(
            None,
            env={"HOME": str(tmp_path)},
            cwd=home,
            overrides={"nats.server_lost_wait": 2e17},
        )
    assert str(raised.value).startswith("override nats.server_lost_wait: [nats] server_lost_wait")
    assert raised.value.key == "nats.server_lost_wait"


def test_a_server_lost_wait_too_large_for_the_derived_wait_is_refused_at_the_load(
    tmp_path: Path,
) -> None:
    """Regression (found by test_any_config_that_loads_makes_options): ``[nats]
    server_lost_wait = 2e17`` loaded, and every join failed inside the run
    (``ValueError: last_notice_wait (2e+17 s) must be above server_lost_wait``: the float
    ignores the 13 s added). Refused at the load now, naming both keys; a given
    ``last_notice_wait`` above it is taken."""
    path = write(tmp_path, "[nats]\nserver_lost_wait = 2e17\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, env={"HOME": str(tmp_path)}, cwd=tmp_path)
    assert str(raised.value) == (
        f"{path}:2: [nats] server_lost_wait (2e+17) is too large: [cluster] last_notice_wait,"
        " unset, is server_lost_wait + 13, which must be above it and is not (a float that"
        " large ignores the addition); lower server_lost_wait ([nats] server_lost_wait from"
        " line 2; [cluster] last_notice_wait from its default)"
    )
    assert raised.value.key == "nats.server_lost_wait"
    config = load(tmp_path, "[nats]\nserver_lost_wait = 2e17\n[cluster]\nlast_notice_wait = 3e17\n")
    assert ClusterOptions.from_config(config).last_notice_wait == 3e17
    # the margin is the options' own
    assert ClusterOptions().last_notice_wait - ClusterOptions().server_lost_wait == (
        LAST_NOTICE_MARGIN
    )


def test_a_rule_across_keys_in_python_is_a_value_error_naming_the_keys() -> None:
    with pytest.raises(CrossKeyError) as raised:
        DurableConfig(max_age=60.0)
    assert raised.value.keys == ("durable.max_age", "durable.duplicate_window")
    assert isinstance(raised.value, ValueError)
    with pytest.raises(ValueError, match=r"^\[cluster\] last_notice_wait \(3\) must be above"):
        Config(cluster=ClusterConfig(last_notice_wait=3))
    # a value valid alone of a section whose rule it breaks is named as itself first
    with pytest.raises(ValueError, match=r"^\[durable\] max_age must be > 0, got -1"):
        DurableConfig(max_age=-1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_config_that_loads_makes_options(data: st.DataObject) -> None:
    """What the config takes, the options take: no value (nor pair of values) gets past
    the load to fail inside a run (drawn from docs/config.md's "valid" column)."""
    sections: dict[str, dict[str, Any]] = {}
    for section in ("cluster", "durable", "nats"):
        keys = [k for k in test_config_fuzz.KNOWN[section] if section != "nats" or "wait" in k]
        chosen = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=6))
        sections[section] = {
            key: data.draw(test_config_fuzz.valid_for(f"{section}.{key}")) for key in chosen
        }
    try:
        config = Config(
            cluster=ClusterConfig(**sections["cluster"]),
            durable=DurableConfig(**sections["durable"]),
            nats=NatsConfig(**sections["nats"]),
        )
    except CrossKeyError:
        return  # (refused at the load: the tests above)
    with warnings.catch_warnings():  # (a doubtful value, said for a config built here)
        warnings.simplefilter("ignore", ClusterOptionsWarning)
        options = ClusterOptions.from_config(config)
    assert options.durable == DurableOptions.from_config(config.durable)


async def _stream_config(url: str, name: str) -> Any:
    import nats

    client = await nats.connect(url)
    try:
        return (await client.jetstream().stream_info(name)).config
    finally:
        await client.close()


@pytest.mark.skipif(sys.platform == "win32", reason="nats-server on loopback")
@pytest.mark.parametrize("workers", [0, 2])
def test_nexus_run_nats_joins_with_the_config_keys(
    nexus: type[Nexus],  # noqa: F811
    nats_url: str,  # noqa: F811
    tmp_path: Path,
    workers: int,
) -> None:
    """End to end: ``nexus run --nats`` (and ``--workers 2``, each worker loading the
    same config) joins with ``[cluster]`` and ``[durable]`` of its config file and
    environment: the buckets and the durable stream it makes on the server carry them.

    Forty-sixth pass: a join without ``options`` of a ``Config`` built in Python says its
    doubtful values (a ``ClusterOptionsWarning``); ``nexus run --nats`` loads its config
    (whose load says them: a ``server_lost_wait`` not above ``reconnect_wait``, a
    ``max_age`` of 50 s not above 4 x (1.5 + 13) s) and joins without ``options``: each
    is said once, by the load, never as a ``ClusterOptionsWarning``."""
    config = write(
        tmp_path,
        '[cluster]\nprefix = "ops"\nheartbeat_interval = 0.5\nmissed_heartbeats = 7\n'
        "[durable]\nduplicate_window = 30\nmax_age = 50\n",
    )
    env = {
        "NEXUS_DURABLE__MAX_MESSAGES": "777",
        "NEXUS_NATS__SERVER_LOST_WAIT": "1.5",
        "NEXUS_CLUSTER__RECONNECT_WAIT": "2",
    }
    argv = ["run", "--nats", nats_url, "-c", str(config), "-n", "10", "-d", "1", "--json"]
    argv += ["--workers", str(workers)] if workers else ["--node", "n1"]
    run = nexus(argv, env=env)
    status, out = run.finish(timeout=120)
    err = "".join(run.stderr)
    assert status == 0, err
    assert "ClusterOptionsWarning" not in err
    assert err.count("is not above [cluster] reconnect_wait") == 1, err
    assert err.count("[durable] max_age (50s) is not above the durable sweep's period") == 1, err
    if not workers:
        assert conserved(json.loads(out))
    durable = asyncio.run(_stream_config(nats_url, "ops-durable"))
    assert (durable.duplicate_window, durable.max_age, durable.max_msgs) == (30, 50, 777)
    # the members' bucket lives heartbeat_interval x missed_heartbeats
    nodes = asyncio.run(_stream_config(nats_url, "KV_ops-nodes"))
    assert nodes.max_age == 3.5


_BEYOND_JETSTREAM = [
    ("ack_wait", 1e12),
    ("duplicate_window", 9.3e9),
    ("max_age", 1e12),
    ("redelivery_delay", 1e12),
    ("missing_agent_delay_max", 1e12),
]


@pytest.mark.parametrize(("key", "value"), _BEYOND_JETSTREAM)
def test_a_durable_time_beyond_go_s_duration_is_refused_naming_the_key(
    tmp_path: Path, key: str, value: float
) -> None:
    """Fifty-seventh pass: JetStream takes these times in nanoseconds (Go's 64-bit
    ``time.Duration``); a larger one loaded and made options, and the join failed with
    JetStream's raw ``BadRequestError`` 10025 (``cannot unmarshal number 1e21 into ...
    ack_wait of type time.Duration``). Both the load and the options refuse it now, naming
    the key. (On main: ``Failed: DID NOT RAISE``.)"""
    with pytest.raises(ConfigError, match=rf"\[durable\] {key} must be at most 9223372036 "):
        load(tmp_path, f"[durable]\n{key} = {value!r}\n")
    with pytest.raises(ValueError, match=rf"^DurableOptions {key} must be a finite number"):
        DurableOptions(**{key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_deliver", True),
        ("max_deliver", 2**63),
        ("max_in_flight", 2**62),
        ("max_waiting", 2**63),
        ("max_messages", 2**63),
        ("max_in_flight", True),
    ],
)
def test_a_durable_count_jetstream_cannot_take_is_refused_by_the_options(
    key: str, value: int
) -> None:
    """Fifty-seventh pass: ``DurableOptions(max_deliver=True)`` was taken as 1 (the
    config refuses a bool), and counts past a 64-bit integer (``max_deliver``,
    ``max_messages``; ``max_ack_pending``, 4 x ``max_in_flight`` + ``max_waiting``) failed
    the join with JetStream's raw ``cannot unmarshal``. (On main: ``DID NOT RAISE``.)"""
    with pytest.raises(ValueError, match=rf"^DurableOptions {key} must be a whole number from"):
        DurableOptions(**{key: value})


async def test_the_largest_durable_values_the_options_take_are_ones_jetstream_takes(
    nats: NatsServer,
) -> None:
    """The bounds above are not tighter than JetStream's: a node joins with each at its
    most, its consumer's ``ack_wait`` the largest."""
    from nexus_trio._config import DURABLE_IN_FLIGHT_MAX, DURABLE_WAITING_MAX
    from nexus_trio._config import JETSTREAM_SECONDS_MAX as most
    from nexus_trio._nats._aio import call_aio

    from .test_nats import local_node

    largest = DurableOptions(
        ack_wait=most,
        duplicate_window=most,
        max_age=most,
        redelivery_delay=most,
        max_deliver=2**63 - 1,
        max_messages=2**63 - 1,
        max_in_flight=DURABLE_IN_FLIGHT_MAX,
        max_waiting=DURABLE_WAITING_MAX,
    )
    async with local_node(nats.url, durable=largest) as (_kernel, cluster):
        info = await call_aio(cluster.data_js.consumer_info, "nexus-durable", cluster.node)
    assert info.config.ack_wait == most
