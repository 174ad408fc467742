"""Config loading: layers and their precedence, search order, validation errors, template."""

from __future__ import annotations

import enum
import logging
import math
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest
import tomlkit

import nexus_trio.config as config_module
from nexus_trio import (
    Config,
    KernelConfig,
    LoggingConfig,
    NexusError,
    OverflowPolicy,
    RestartStrategy,
    RuntimeConfig,
    open_kernel,
)
from nexus_trio._config import JETSTREAM_SECONDS_MAX, SECTIONS, AppConfig, MetricsConfig
from nexus_trio.config import (
    ConfigError,
    LoadedConfig,
    load_config,
    render_effective,
    render_template,
    search_paths,
    write_template,
)

ALL_KEYS = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in attrs.fields(cls)}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated world: cwd, HOME and /etc are all under tmp_path."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "home").mkdir()
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", tmp_path / "etc" / "nexus" / "config.toml")
    return tmp_path


def env_for(home: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(home / "home"), **extra}


def load(home: Path, path: Path | str | None = None, **kw: Any) -> LoadedConfig:
    env = kw.pop("env", env_for(home))
    return load_config(path, env=env, cwd=home / "cwd", **kw)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and layers -------------------------------------------------------------------------


def test_no_file_no_env_gives_the_embedded_defaults(home: Path) -> None:
    loaded = load(home)
    assert loaded.config == Config()
    assert loaded.path is None
    assert loaded.warnings == ()
    assert set(loaded.sources) == ALL_KEYS
    assert set(loaded.sources.values()) == {"default"}


def test_original_keys_keep_their_defaults() -> None:
    config = Config()
    assert config.kernel.mailbox_capacity == 1024
    assert config.kernel.send_timeout_ms == 500
    assert config.kernel.handle_timeout_ms == 30_000
    assert config.logging.level == "info"
    assert config.logging.format == "compact"
    assert config.runtime.worker_threads == 0
    assert config.runtime.max_blocking_threads == 512
    assert config.metrics == MetricsConfig(port=0, host="127.0.0.1")
    assert config.app == AppConfig(app=None, spawn=[], agents=1000, duration=0.0, workload="ring")


def test_existing_python_construction_still_works() -> None:
    config = Config(kernel=KernelConfig(mailbox_capacity=8, overflow="reject"))
    assert config.kernel.overflow is OverflowPolicy.REJECT
    assert config.app.agents == 1000


@pytest.mark.parametrize(
    ("section", "value", "wanted", "written"),
    [
        ("kernel", {"mailbox_capacity": 8}, "KernelConfig", "KernelConfig(mailbox_capacity=8)"),
        ("supervision", None, "SupervisionConfig", "SupervisionConfig(...)"),
        ("logging", "debug", "LoggingConfig", "LoggingConfig(...)"),
        ("nats", KernelConfig(), "NatsConfig", "NatsConfig(...)"),
    ],
)
def test_a_config_section_that_is_not_its_config_object_is_refused_naming_it(
    section: str, value: Any, wanted: str, written: str
) -> None:
    """Regression: ``Config(kernel={"mailbox_capacity": 8})`` (the mapping test_config
    takes) was accepted, and ``open_kernel`` failed on it far away with
    ``AttributeError: 'dict' object has no attribute 'dead_letter_buffer'``
    (``supervision=None``: ``... no attribute 'escalate_to_kernel'``)."""
    with pytest.raises(TypeError) as info:
        Config(**{section: value})
    assert str(info.value) == (
        f"Config {section}= must be a {wanted}, got {type(value).__name__} {value!r}:"
        f" write Config({section}={written})"
    )
    with pytest.raises(TypeError, match=r"^Config kernel= must be a KernelConfig, got dict"):
        attrs.evolve(Config(), kernel={})


def test_precedence_is_defaults_then_file_then_env_then_overrides(home: Path) -> None:
    file = write(
        home / "cwd" / "config.toml",
        "[kernel]\nmailbox_capacity = 10\nsend_timeout_ms = 100\nhandle_timeout_ms = 200\n",
    )
    env = env_for(
        home,
        NEXUS_KERNEL__SEND_TIMEOUT_MS="250",
        NEXUS_KERNEL__HANDLE_TIMEOUT_MS="300",
    )
    loaded = load(home, env=env, overrides={"kernel.handle_timeout_ms": 400})
    kernel = loaded.config.kernel
    assert (kernel.mailbox_capacity, kernel.send_timeout_ms, kernel.handle_timeout_ms) == (
        10,
        250,
        400,
    )
    assert kernel.batch_size == 64
    assert loaded.path == file
    assert loaded.sources["kernel.mailbox_capacity"] == f"file {file}"
    assert loaded.sources["kernel.send_timeout_ms"] == "env NEXUS_KERNEL__SEND_TIMEOUT_MS"
    assert loaded.sources["kernel.handle_timeout_ms"] == "cli"
    assert loaded.sources["kernel.batch_size"] == "default"


def test_overrides_of_none_mean_not_given(home: Path) -> None:
    loaded = load(
        home,
        env=env_for(home, NEXUS_LOGGING__LEVEL="debug"),
        overrides={"logging.level": None, "logging.format": "json"},
    )
    assert loaded.config.logging == LoggingConfig(level="debug", format="json")
    assert loaded.sources["logging.level"] == "env NEXUS_LOGGING__LEVEL"
    assert loaded.sources["logging.format"] == "cli"


def test_env_values_are_read_as_toml_values_or_plain_strings(home: Path) -> None:
    env = env_for(
        home,
        NEXUS_METRICS__HOST="0.0.0.0",
        NEXUS_METRICS__PORT="9100",
        NEXUS_LOGGING__LEVEL="warning",
        NEXUS_APP__DURATION="2.5",
        NEXUS_APP__SPAWN='["python agent.py", "node agent.js"]',
        NEXUS_APP__APP="",
        NEXUS_KERNEL__OVERFLOW="drop_oldest",
        NEXUS_SUPERVISION__STRATEGY='"rest_for_one"',
        NEXUS_IGNORED="x",  # no SECTION__KEY shape: not ours
        PATH="/usr/bin",
    )
    loaded = load(home, env=env)
    config = loaded.config
    assert config.metrics == MetricsConfig(port=9100, host="0.0.0.0")
    assert config.logging.level == "warning"
    assert config.app.duration == 2.5
    assert config.app.spawn == ["python agent.py", "node agent.js"]
    assert config.app.app is None
    assert config.kernel.overflow is OverflowPolicy.DROP_OLDEST
    assert config.supervision.strategy is RestartStrategy.REST_FOR_ONE
    assert loaded.warnings == ()


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("NEXUS_KERNEL_MAILBOX_CAPACITY", "NEXUS_KERNEL__MAILBOX_CAPACITY"),
        ("NEXUS_metrics_port", "NEXUS_METRICS__PORT"),
        ("NEXUS_APP_SPAWN", "NEXUS_APP__SPAWN"),
    ],
)
def test_a_section_and_key_joined_by_one_underscore_is_said_not_ignored(
    home: Path, name: str, meant: str
) -> None:
    """Regression: ``NEXUS_KERNEL_MAILBOX_CAPACITY=64`` (one underscore, where the
    override takes two) was ignored as any ``NEXUS_`` variable without ``__`` is: the
    default stayed and nothing said why. A variable that joins a known section and one of
    its keys so is an unknown name now (an error; a warning with allow_unknown), naming
    the override it would be. Other ``NEXUS_`` variables stay ignored."""
    others = {"NEXUS_AGENT_NAME": "x", "NEXUS_WORKER": "worker-0", "NEXUS_KERNEL_X": "1"}
    with pytest.raises(ConfigError) as info:
        load(home, env=env_for(home, **{name: "64"}, **others))
    expected = (
        f"environment variable {name}: not read: a section and its key are joined by two"
        f" underscores ({meant})"
    )
    assert str(info.value).splitlines()[0] == expected
    loaded = load(home, env=env_for(home, **{name: "64"}, **others), allow_unknown=True)
    assert loaded.warnings == (expected,)
    assert loaded.config == load(home).config  # (not read)
    assert load(home, env=env_for(home, **others)).warnings == ()


@pytest.mark.parametrize("raw", ["[1", '["python a.py",', '["python a.py"] x', " [] ]"])
def test_a_spawn_variable_that_starts_a_toml_array_and_is_not_one_is_refused_naming_it(
    home: Path, raw: str
) -> None:
    # A value starting with [ is a TOML array (the rule of list keys): a broken one is a
    # mistake, not the command "[1".
    with pytest.raises(ConfigError) as info:
        load(home, env=env_for(home, NEXUS_APP__SPAWN=raw))
    assert str(info.value) == (
        "environment variable NEXUS_APP__SPAWN: [app] spawn starts with [ but is not a TOML"
        f" array ({TOML_ARRAY_HINT}), got {raw!r}"
    )
    assert info.value.key == "app.spawn"


TOML_ARRAY_HINT = 'write ["one command", "another"], or one command without the ['


def test_a_single_spawn_command_may_be_a_plain_string(home: Path) -> None:
    loaded = load(home, env=env_for(home, NEXUS_APP__SPAWN="python agent.py --fast"))
    assert loaded.config.app.spawn == ["python agent.py --fast"]
    file = write(home / "x.toml", 'spawn = 1\n[app]\nspawn = "node a.js"\n')
    # (the unknown top-level spawn = 1 is allowed here: this test is about the [app] one)
    assert load(home, file, allow_unknown=True).config.app.spawn == ["node a.js"]


@pytest.mark.parametrize("raw", ["", "  "])
def test_an_empty_list_variable_is_the_empty_list(home: Path, raw: str) -> None:
    """Fifty-fifth pass: ``NEXUS_APP__SPAWN=`` (a compose file's or a unit's way to clear a
    value) was refused as the one command ``""``: ``[app] spawn must be a list of non-empty
    command strings, got [""]``. An empty or blank value of a list key is the empty list,
    over the file's, as an empty value unsets an optional key. (With main's config.py:
    ConfigError.)"""
    file = write(home / "x.toml", '[app]\nspawn = ["node a.js"]\n')
    loaded = load(home, file, env=env_for(home, NEXUS_APP__SPAWN=raw))
    assert loaded.config.app.spawn == []
    assert loaded.sources["app.spawn"] == "env NEXUS_APP__SPAWN"


def test_dotted_and_inline_tables_work_too(home: Path) -> None:
    file = write(
        home / "c.toml",
        'kernel.mailbox_capacity = 7\nlogging = { level = "error" }\n',
    )
    loaded = load(home, file)
    assert loaded.config.kernel.mailbox_capacity == 7
    assert loaded.config.logging.level == "error"


def test_a_relative_path_is_relative_to_cwd_and_reported_absolute(home: Path) -> None:
    file = write(home / "cwd" / "conf" / "mine.toml", "[app]\nagents = 5\n")
    loaded = load(home, "conf/mine.toml")
    assert loaded.path == file
    assert loaded.path.is_absolute()
    assert loaded.config.app.agents == 5


# --- search order ------------------------------------------------------------------------------


def test_search_paths_honour_xdg_config_home(tmp_path: Path) -> None:
    env = {"HOME": "/home/u", "XDG_CONFIG_HOME": "/xdg"}
    paths = search_paths(cwd=tmp_path, env=env)
    assert paths == [
        tmp_path / "config.toml",
        Path("/xdg/nexus/config.toml"),
        Path("/etc/nexus/config.toml"),
    ]


@pytest.mark.parametrize("xdg", [None, "", "relative/dir"])
def test_search_paths_fall_back_to_home_dot_config(tmp_path: Path, xdg: str | None) -> None:
    env = {"HOME": "/home/u"} if xdg is None else {"HOME": "/home/u", "XDG_CONFIG_HOME": xdg}
    assert search_paths(cwd=tmp_path, env=env)[1] == Path("/home/u/.config/nexus/config.toml")


def test_search_order_is_cwd_then_xdg_then_etc(home: Path) -> None:
    xdg = home / "xdg"
    env = env_for(home, XDG_CONFIG_HOME=str(xdg))
    etc = write(config_module.SYSTEM_CONFIG, "[app]\nagents = 3\n")
    assert load(home, env=env).path == etc
    assert load(home, env=env).config.app.agents == 3

    user = write(xdg / "nexus" / "config.toml", "[app]\nagents = 2\n")
    assert load(home, env=env).path == user
    assert load(home, env=env).config.app.agents == 2

    local = write(home / "cwd" / "config.toml", "[app]\nagents = 1\n")
    assert load(home, env=env).path == local
    assert load(home, env=env).config.app.agents == 1

    # Only the first file found is read: its missing keys are defaults, not the others'.
    assert load(home, env=env).sources["app.duration"] == "default"

    # --config wins over all of them.
    explicit = write(home / "explicit.toml", "[app]\nagents = 9\n")
    assert load(home, explicit, env=env).config.app.agents == 9


def test_home_dot_config_is_used_without_xdg(home: Path) -> None:
    user = write(home / "home" / ".config" / "nexus" / "config.toml", "[app]\nagents = 4\n")
    loaded = load(home)
    assert loaded.path == user
    assert loaded.config.app.agents == 4


def test_missing_explicit_file_is_an_error_naming_it(home: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(home, "nope.toml")
    assert str(info.value) == f"{home / 'cwd' / 'nope.toml'}: config file not found"
    assert info.value.path == home / "cwd" / "nope.toml"


def test_a_directory_is_not_a_config_file(home: Path) -> None:
    (home / "cwd" / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match=r"dir\.toml: config path is not a file$"):
        load(home, "dir.toml")


# --- validation errors -------------------------------------------------------------------------

# (section, key, TOML value, message after "path:line: ")
BAD_VALUES = [
    ("kernel", "mailbox_capacity", "0", "[kernel] mailbox_capacity must be >= 1, got 0"),
    ("kernel", "mailbox_capacity", "1.5", "[kernel] mailbox_capacity must be an integer, got 1.5"),
    (
        "kernel",
        "mailbox_capacity",
        '"big"',
        '[kernel] mailbox_capacity must be an integer, got "big"',
    ),
    ("kernel", "send_timeout_ms", "0", "[kernel] send_timeout_ms must be > 0, got 0"),
    ("kernel", "send_timeout_ms", "nan", "[kernel] send_timeout_ms must be > 0, got nan"),
    ("kernel", "handle_timeout_ms", "-1", "[kernel] handle_timeout_ms must be > 0, got -1"),
    (
        "kernel",
        "request_timeout_ms",
        "true",
        "[kernel] request_timeout_ms must be a number, got true",
    ),
    (
        "kernel",
        "overflow",
        '"spill"',
        '[kernel] overflow must be one of "block", "drop_newest", "drop_oldest", "reject", '
        'got "spill"',
    ),
    ("kernel", "shutdown_grace_ms", "-5", "[kernel] shutdown_grace_ms must be >= 0, got -5"),
    ("kernel", "batch_size", "0", "[kernel] batch_size must be >= 1, got 0"),
    ("kernel", "dead_letter_buffer", "0", "[kernel] dead_letter_buffer must be >= 1, got 0"),
    (
        "kernel",
        "dead_letter_log_limit",
        "-1",
        "[kernel] dead_letter_log_limit must be >= 0, got -1",
    ),
    ("kernel", "failure_log_limit", "-1", "[kernel] failure_log_limit must be >= 0, got -1"),
    ("kernel", "log_kind_limit", "-1", "[kernel] log_kind_limit must be >= 0, got -1"),
    (
        "supervision",
        "strategy",
        '"random"',
        '[supervision] strategy must be one of "one_for_one", "one_for_all", "rest_for_one", '
        'got "random"',
    ),
    ("supervision", "max_restarts", "-1", "[supervision] max_restarts must be >= 0, got -1"),
    ("supervision", "within_ms", "0", "[supervision] within_ms must be > 0, got 0"),
    (
        "supervision",
        "backoff_initial_ms",
        "-1",
        "[supervision] backoff_initial_ms must be >= 0, got -1",
    ),
    ("supervision", "backoff_max_ms", "-1", "[supervision] backoff_max_ms must be >= 0, got -1"),
    (
        "supervision",
        "backoff_jitter",
        "1.5",
        "[supervision] backoff_jitter must be a number between 0 and 1, got 1.5",
    ),
    (
        "supervision",
        "backoff_reset_after_ms",
        "-1",
        "[supervision] backoff_reset_after_ms must be >= 0, got -1",
    ),
    (
        "supervision",
        "escalate_to_kernel",
        '"yes"',
        '[supervision] escalate_to_kernel must be true or false, got "yes"',
    ),
    (
        "kernel",
        "gc_freeze",
        '"yes"',
        '[kernel] gc_freeze must be true or false, got "yes"',
    ),
    ("runtime", "worker_threads", "-1", "[runtime] worker_threads must be >= 0, got -1"),
    ("runtime", "max_blocking_threads", "0", "[runtime] max_blocking_threads must be >= 1, got 0"),
    (
        "logging",
        "level",
        '"loud"',
        "[logging] level must be one of trace, debug, info, warn, warning, error, critical, "
        'got "loud"',
    ),
    (
        "logging",
        "format",
        '"xml"',
        '[logging] format must be one of compact, full, json, pretty, got "xml"',
    ),
    ("logging", "queue", "-1", "[logging] queue must be >= 0, got -1"),
    ("logging", "queue", '"lots"', '[logging] queue must be an integer, got "lots"'),
    ("metrics", "port", "70000", "[metrics] port must be an integer from 0 to 65535, got 70000"),
    ("metrics", "port", "-1", "[metrics] port must be an integer from 0 to 65535, got -1"),
    ("metrics", "host", '""', '[metrics] host must be a non-empty string, got ""'),
    ("metrics", "per_agent", "1", "[metrics] per_agent must be true or false, got 1"),
    ("metrics", "per_agent_limit", "0", "[metrics] per_agent_limit must be >= 1, got 0"),
    ("metrics", "cache_ms", "-5", "[metrics] cache_ms must be >= 0, got -5"),
    ("metrics", "max_connections", "0", "[metrics] max_connections must be >= 1, got 0"),
    (
        "metrics",
        "group_port",
        "65536",
        "[metrics] group_port must be an integer from 0 to 65535, got 65536",
    ),
    (
        "app",
        "app",
        '"no-colon"',
        "[app] app must look like 'package.module:attr', got \"no-colon\"",
    ),
    ("app", "types", '"a:"', "[app] types must look like 'package.module:attr', got \"a:\""),
    ("app", "spawn", "[1]", "[app] spawn must be a list of non-empty command strings, got [1]"),
    ("app", "agents", "0", "[app] agents must be >= 1, got 0"),
    ("app", "duration", "-1", "[app] duration must be >= 0, got -1"),
    (
        "app",
        "workload",
        '"star"',
        '[app] workload must be one of ring, fanout, request, pool, got "star"',
    ),
    *(
        ("nats", key, '""', f'[nats] {key} must be a non-empty string or unset, got ""')
        for key in (
            "url",
            "user",
            "password",
            "token",
            "creds_file",
            "nkey_seed",
            "tls_ca",
            "tls_cert",
            "tls_key",
        )
    ),
    ("nats", "server_lost_wait", "-1", "[nats] server_lost_wait must be >= 0, got -1"),
    ("nats", "server_lost_wait", "nan", "[nats] server_lost_wait must be >= 0, got nan"),
    ("nats", "server_lost_wait", "inf", "[nats] server_lost_wait must be a finite number, got inf"),
    ("nats", "server_lost_wait", '"10"', '[nats] server_lost_wait must be a number, got "10"'),
    (
        "cluster",
        "prefix",
        '"a.b"',
        "[cluster] prefix must be letters, digits, '-' or '_' (it is part of NATS subjects),"
        ' got "a.b"',
    ),
    *(
        ("cluster", key, "0", f"[cluster] {key} must be > 0, got 0")
        for key in ("heartbeat_interval", "connect_timeout", "join_timeout", "forget_lost_after")
    ),
    *(
        ("cluster", key, "0", f"[cluster] {key} must be >= 1, got 0")
        for key in (
            "missed_heartbeats",
            "kv_replicas",
            "connect_attempts",
            "outbox_high_water",
            "outbox_limit",
            "inbound_limit",
            "parked_limit",
            "node_window",
            "batch_frames",
            "batch_bytes",
            "inbound_streams_limit",
        )
    ),
    ("cluster", "reconnect_wait", "-0.5", "[cluster] reconnect_wait must be >= 0, got -0.5"),
    (
        "cluster",
        "max_reconnect_attempts",
        "-2",
        "[cluster] max_reconnect_attempts must be >= -1, got -2",
    ),
    ("cluster", "last_notice_wait", "0", "[cluster] last_notice_wait must be > 0, got 0"),
    (
        "cluster",
        "notice_wait_at_leave",
        "nan",
        "[cluster] notice_wait_at_leave must be >= 0, got nan",
    ),
    ("durable", "enabled", '"no"', '[durable] enabled must be true or false, got "no"'),
    ("durable", "ack_wait", "0", "[durable] ack_wait must be > 0, got 0"),
    ("durable", "max_deliver", "1.5", "[durable] max_deliver must be an integer, got 1.5"),
    ("durable", "redelivery_delay", "-1", "[durable] redelivery_delay must be >= 0, got -1"),
    ("durable", "max_in_flight", "0", "[durable] max_in_flight must be >= 1, got 0"),
    ("durable", "duplicate_window", "-1", "[durable] duplicate_window must be > 0, got -1"),
    ("durable", "max_age", "inf", "[durable] max_age must be a finite number, got inf"),
    ("durable", "max_messages", "0", "[durable] max_messages must be >= 1, got 0"),
    (
        "durable",
        "missing_agent_delay",
        "true",
        "[durable] missing_agent_delay must be a number, got true",
    ),
    (
        "durable",
        "missing_agent_delay_max",
        "-1",
        "[durable] missing_agent_delay_max must be >= 0, got -1",
    ),
    ("durable", "max_waiting", "-1", "[durable] max_waiting must be >= 0, got -1"),
]


@pytest.mark.parametrize(("section", "key", "value", "message"), BAD_VALUES)
def test_invalid_file_value_names_file_line_and_key(
    home: Path, section: str, key: str, value: str, message: str
) -> None:
    file = write(
        home / "cwd" / "config.toml",
        f"# a comment\n\n[{section}]\n# another\n{key} = {value}\n",
    )
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value) == f"{file}:5: {message}"
    # the value as the file wrote it, not as Python does ('big', True)
    assert str(info.value).endswith(f"got {value}")
    assert (info.value.path, info.value.line, info.value.key) == (file, 5, f"{section}.{key}")
    assert isinstance(info.value, NexusError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("written", "python"),
    [
        ("true", "True"),
        ("false", "False"),
        ('"64"', "'64'"),
        ("'C:\\temp'", None),  # (a literal string: shown as a basic one)
        ('"say \\"hi\\""', "'say \"hi\"'"),
        ("1.5", "1.5"),
        ("inf", "inf"),
        ("-inf", "-inf"),
        ("[1, 2.5, true]", "[1, 2.5, True]"),
        ('["a", "b"]', "['a', 'b']"),
        ("{ a = 1, b = true }", "{'a': 1, 'b': True}"),
        ('{ "odd key" = "x" }', "{'odd key': 'x'}"),
        ("{}", "{}"),
        ("1979-05-27T07:32:00Z", None),
        ("1979-05-27", None),
    ],
)
def test_a_bad_value_is_shown_as_toml_writes_it_not_as_python_does(
    home: Path, written: str, python: str | None
) -> None:
    """Regression: ``mailbox_capacity = true`` was said ``got True``, ``"64"`` was
    ``got '64'``, an array of booleans ``[True]``, a table ``{'a': 1}``: Python's spelling
    of what the file says. The file's (and a variable's) values are shown as TOML writes
    them; one given in Python still as Python does."""
    expected = {"'C:\\temp'": '"C:\\\\temp"'}.get(written, written)
    file = write(home / "cwd" / "config.toml", f"[kernel]\nmailbox_capacity = {written}\n")
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value).endswith(f"mailbox_capacity must be an integer, got {expected}"), str(
        info.value
    )
    assert str(info.value).startswith(f"{file}:2: ")
    if python is not None:
        # the same value given in Python
        value = tomlkit.parse(f"v = {written}").unwrap()["v"]
        with pytest.raises(ValueError, match="mailbox_capacity") as raised:
            KernelConfig(mailbox_capacity=value)
        assert str(raised.value).endswith(f"got {python}")


def test_a_bad_value_of_a_variable_and_a_bad_choice_are_shown_as_toml_writes_them(
    home: Path,
) -> None:
    env = env_for(
        home,
        NEXUS_KERNEL__MAILBOX_CAPACITY="true",
        NEXUS_KERNEL__OVERFLOW="spill",
        NEXUS_SUPERVISION__BACKOFF_JITTER="[0.5]",
    )
    with pytest.raises(ConfigError) as info:
        load(home, env=env)
    assert str(info.value).splitlines()[:3] == [
        "environment variable NEXUS_KERNEL__MAILBOX_CAPACITY: [kernel] mailbox_capacity must"
        " be an integer, got true",
        'environment variable NEXUS_KERNEL__OVERFLOW: [kernel] overflow must be one of "block",'
        ' "drop_newest", "drop_oldest", "reject", got "spill"',
        "environment variable NEXUS_SUPERVISION__BACKOFF_JITTER: [supervision] backoff_jitter"
        " must be a number between 0 and 1, got [0.5]",
    ]


def test_a_choice_key_takes_its_choice_in_any_case_as_its_flag_and_the_level_do(
    home: Path,
) -> None:
    """``-f JSON``, ``-w Ring`` and ``level = "DEBUG"`` were taken and ``format = "JSON"``
    was refused (``must be one of compact, full, json, pretty, got "JSON"``): every choice
    key is now read in any case, from a file, a variable and Python, and kept in lower case;
    a choice that is none in any case is refused as before."""
    write(
        home / "cwd" / "config.toml",
        '[kernel]\noverflow = "Drop_Oldest"\n[supervision]\nstrategy = "REST_FOR_ONE"\n'
        '[app]\nworkload = "Fanout"\n',
    )
    loaded = load(home, env=env_for(home, NEXUS_LOGGING__FORMAT="JSON"))
    assert loaded.config.kernel.overflow is OverflowPolicy.DROP_OLDEST
    assert loaded.config.supervision.strategy is RestartStrategy.REST_FOR_ONE
    assert loaded.config.app.workload == "fanout"
    assert loaded.config.logging.format == "json"
    assert LoggingConfig(format="Pretty").format == "pretty"
    with pytest.raises(
        ValueError, match="format must be one of compact, full, json, pretty, got 'Jsn'"
    ):
        LoggingConfig(format="Jsn")


@pytest.mark.parametrize(
    ("written", "meant"),
    [
        ("True", True),
        ("1", True),
        (" yes ", True),
        ("ON", True),
        ("FALSE", False),
        ("0", False),
        ("No", False),
        (" off ", False),
    ],
)
def test_a_true_false_variable_takes_the_words_nexus_allow_unknown_takes(
    home: Path, written: str, meant: bool
) -> None:
    """``NEXUS_ALLOW_UNKNOWN=1`` (also ``True``, ``yes``, ``on``) was taken and
    ``NEXUS_METRICS__PER_AGENT=1`` or ``=True`` refused (``must be true or false, got 1``):
    a variable of a true/false key takes the same words now, in any case; other text is
    still refused, and a file still takes TOML's ``true`` and ``false`` only."""
    env = env_for(
        home,
        NEXUS_KERNEL__GC_FREEZE=written,
        NEXUS_METRICS__PER_AGENT=written,
        NEXUS_SUPERVISION__ESCALATE_TO_KERNEL=written,
    )
    config = load(home, env=env).config
    assert config.kernel.gc_freeze is meant
    assert config.metrics.per_agent is meant
    assert config.supervision.escalate_to_kernel is meant
    with pytest.raises(ConfigError, match=r'per_agent must be true or false \(.*, got "maybe"'):
        load(home, env=env_for(home, NEXUS_METRICS__PER_AGENT="maybe"))


@pytest.mark.parametrize(
    ("written", "said"),
    [("maybe", '"maybe"'), ("2", '"2"'), ("", '""'), ("enabled", '"enabled"')],
)
def test_a_bad_true_false_variable_says_every_word_a_variable_takes(
    home: Path, written: str, said: str
) -> None:
    """``NEXUS_DURABLE__ENABLED=maybe`` said only ``must be true or false``, though a
    variable also takes 1, yes, on and 0, no, off: the error says every word, and shows
    the variable's text as written (``2`` is not read as the number 2 first)."""
    for name, key in [
        ("NEXUS_DURABLE__ENABLED", "[durable] enabled"),
        ("NEXUS_METRICS__PER_AGENT", "[metrics] per_agent"),
        ("NEXUS_SUPERVISION__ESCALATE_TO_KERNEL", "[supervision] escalate_to_kernel"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load(home, env=env_for(home, **{name: written}))
        assert str(caught.value) == (
            f"environment variable {name}: {key} must be true or false (a variable also"
            f" takes 1, yes, on or 0, no, off, in any case), got {said}"
        )


@pytest.mark.parametrize(
    ("name", "written", "said"),
    [
        (
            "NEXUS_KERNEL__OVERFLOW",
            "drop-oldest",
            '[kernel] overflow must be one of "block", "drop_newest", "drop_oldest", "reject",'
            ' got "drop-oldest" (did you mean "drop_oldest"?)',
        ),
        (
            "NEXUS_KERNEL__OVERFLOW",
            "Blok",
            '[kernel] overflow must be one of "block", "drop_newest", "drop_oldest", "reject",'
            ' got "Blok" (did you mean "block"?)',
        ),
        (
            "NEXUS_SUPERVISION__STRATEGY",
            "One-For-All",
            '[supervision] strategy must be one of "one_for_one", "one_for_all",'
            ' "rest_for_one", got "One-For-All" (did you mean "one_for_all"?)',
        ),
        (
            "NEXUS_LOGGING__FORMAT",
            "jsn",
            '[logging] format must be one of compact, full, json, pretty, got "jsn" (did you'
            ' mean "json"?)',
        ),
        (
            "NEXUS_APP__WORKLOAD",
            "fan-out",
            '[app] workload must be one of ring, fanout, request, pool, got "fan-out" (did you'
            ' mean "fanout"?)',
        ),
        (
            "NEXUS_KERNEL__OVERFLOW",
            "sideways",
            '[kernel] overflow must be one of "block", "drop_newest", "drop_oldest", "reject",'
            ' got "sideways"',
        ),
    ],
)
def test_a_choice_key_near_a_choice_names_the_one_meant(
    home: Path, name: str, written: str, said: str
) -> None:
    """``NEXUS_KERNEL__OVERFLOW=drop-oldest`` was refused with the list of choices only,
    as ``@agent(overflow="drop-oldest")`` was: both name the choice meant now (a ``-``
    for ``_``, a typo); a value near none gets no guess."""
    with pytest.raises(ConfigError) as caught:
        load(home, env=env_for(home, **{name: written}))
    assert str(caught.value) == f"environment variable {name}: {said}"


def test_a_variable_is_read_with_its_prefix_in_any_case_as_its_section_and_key(
    home: Path,
) -> None:
    """``NEXUS_kernel__mailbox_capacity`` was read and ``nexus_kernel__mailbox_capacity``
    silently not (the default kept, nothing said): the prefix is read in any case too, and a
    misspelt name in lower case is refused as in upper case."""
    loaded = load(home, env=env_for(home, nexus_kernel__mailbox_capacity="64"))
    assert loaded.config.kernel.mailbox_capacity == 64
    assert loaded.sources["kernel.mailbox_capacity"] == "env nexus_kernel__mailbox_capacity"
    with pytest.raises(ConfigError, match=r"nexus_kernal__batch_size: unknown section \[kernal\]"):
        load(home, env=env_for(home, nexus_kernal__batch_size="8"))


def test_one_key_set_differently_by_two_variables_in_other_cases_is_refused(home: Path) -> None:
    """``NEXUS_KERNEL__MAILBOX_CAPACITY=64`` beside ``nexus_kernel__mailbox_capacity=32``:
    one key, and the one read was whichever sorted last, without a word; now refused
    naming both. The same value twice is taken."""
    env = env_for(home, NEXUS_KERNEL__MAILBOX_CAPACITY="64", nexus_kernel__mailbox_capacity="32")
    with pytest.raises(ConfigError) as info:
        load(home, env=env)
    assert str(info.value) == (
        "environment variable nexus_kernel__mailbox_capacity: [kernel] mailbox_capacity is set"
        " twice, differently: NEXUS_KERNEL__MAILBOX_CAPACITY='64' and"
        " nexus_kernel__mailbox_capacity='32' (one key in any case: keep one)"
    )
    assert info.value.key == "kernel.mailbox_capacity"
    same = env_for(home, NEXUS_KERNEL__MAILBOX_CAPACITY="64", Nexus_Kernel__Mailbox_Capacity="64")
    assert load(home, env=same).config.kernel.mailbox_capacity == 64


def test_every_key_has_a_bad_value_case() -> None:
    assert {f"{s}.{k}" for s, k, _, _ in BAD_VALUES} == ALL_KEYS


def test_invalid_env_value_names_the_variable(home: Path) -> None:
    env = env_for(home, NEXUS_KERNEL__MAILBOX_CAPACITY="lots")
    with pytest.raises(ConfigError) as info:
        load(home, env=env)
    assert str(info.value) == (
        "environment variable NEXUS_KERNEL__MAILBOX_CAPACITY: "
        '[kernel] mailbox_capacity must be an integer, got "lots"'
    )
    assert info.value.key == "kernel.mailbox_capacity"


def test_invalid_override_names_the_key(home: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(home, overrides={"logging.format": "yaml"})
    assert str(info.value) == (
        "override logging.format: [logging] format must be one of compact, full, json, pretty, got 'yaml'"
    )


def test_unknown_override_key_is_an_error_with_a_suggestion(home: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(home, overrides={"kernel.mailbox_capasity": 5})
    assert str(info.value) == (
        "override kernel.mailbox_capasity: unknown key [kernel] mailbox_capasity "
        "(did you mean mailbox_capacity?)"
    )
    with pytest.raises(
        ConfigError, match=r"unknown section \[kernal\] \(did you mean \[kernel\]\?\)"
    ):
        load(home, overrides={"kernal.mailbox_capacity": 5})


def test_a_bad_file_value_is_an_error_even_when_env_overrides_it(home: Path) -> None:
    file = write(home / "cwd" / "config.toml", "[kernel]\nbatch_size = 0\n")
    with pytest.raises(ConfigError, match=rf"^{file}:2: \[kernel\] batch_size"):
        load(home, env=env_for(home, NEXUS_KERNEL__BATCH_SIZE="8"))


def test_broken_toml_reports_line_and_column(home: Path) -> None:
    file = write(home / "cwd" / "config.toml", "[kernel]\nmailbox_capacity = 1\nbatch_size = \n")
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value) == f"{file}:3:14: invalid TOML: `batch_size` has no value after `=`"
    assert (info.value.line, info.value.column) == (3, 14)


_TWICE = "is given twice, on line"


@pytest.mark.parametrize(
    ("text", "where", "said"),
    [
        (
            "[kernel\nbatch_size = 1\n",
            (1, 8),
            "a table header `[kernel` must end with `]` on its line",
        ),
        ("[[kernel\n", (1, 9), "a table header `[[kernel` must end with `]]` on its line"),
        (
            "[kernel]]\n",
            (1, 9),
            "a table header `[kernel]]` has `]` after its `]`: nothing but a comment may follow"
            " it on its line",
        ),
        (
            "[kernel]\nbatch_size\n",
            (2, 11),
            "`batch_size` is a key without a value: write `batch_size = value` (a string in"
            " quotes)",
        ),
        (
            "[logging]\nlevel = info\n",
            (2, 9),
            "`info` (the value of `level`) is no TOML value: a string is written in quotes"
            ' ("info"), true and false in lower case',
        ),
        (
            "[kernel]\nbatch_size = 1 2\n",
            (2, 16),
            "`2` after the value of `batch_size`: one value per line, nothing but a comment"
            " after it (several values are a list: [1, 2])",
        ),
        (
            '[logging]\nlevel = "info\n',
            (2, 14),
            "a string is not closed on its line: \"...\" and '...' end on the line they start"
            ' ("""...""" holds text over several lines)',
        ),
        (
            "[app]\nspawn = [1, 2\n",
            (2, 1),
            "the file ends inside a list [...] or an inline table {...} that is not closed",
        ),
        # a name defined twice: tomlkit says `Key "x" already exists.` for each, at the
        # place it noticed (a repeated header's last key), at none, or "Redefinition of
        # an existing table"
        (
            "[kernel]\nbatch_size = 5\n\nbatch_size = 6\n",
            (4, 1),
            f"the key `batch_size` of [kernel] {_TWICE} 2 and here",
        ),
        (
            "[kernel]\nmailbox_capacity = 1\n\n[logging]\nlevel = 'info'\n[kernel]\nbatch_size = 3\n",
            (6, 1),
            f"the table [kernel] {_TWICE} 1 and here: a table's keys go under one header",
        ),
        (
            "[kernel]\nx.y = 1\nx.y = 2\n",
            (3, 1),
            f"the key `x.y` of [kernel] {_TWICE} 2 and here",
        ),
        (
            "kernel = 1\n[kernel]\nbatch_size = 1\n",
            (2, 1),
            "[kernel] makes `kernel` a table, but it is a key with a value on line 1",
        ),
        (
            "[kernel]\nt = { a = 1 }\n[kernel.t]\nb = 2\n",
            (3, 1),
            "[kernel.t] makes `kernel.t` a table, but it is a key with a value on line 2",
        ),
        (
            "[kernel]\nt.a = 1\n[kernel.t]\nb = 2\n",
            (3, 1),
            "the table [kernel.t] is already made by the dotted keys of line 2 (`t.x = ...`):"
            " set its keys there, or only here",
        ),
        (
            "[kernel]\nt = { a = 1, a = 2 }\n",
            (2, 14),
            "the key `a` is given twice in the inline table of `t` of [kernel]",
        ),
        (
            "[[kernel]]\nx = 1\n[kernel]\n",
            (3, 1),
            "[kernel] names the list of tables [[kernel]] of line 1: a name is either a table"
            " or a list of tables",
        ),
        (
            "[kernel]\nx = 1\n[[kernel]]\n",
            (3, 1),
            "[[kernel]] names the table [kernel] of line 1: a name is either a table or a"
            " list of tables",
        ),
        # tomlkit's other words
        (
            '[logging]\nlevel = "in\\qfo"\n',
            (2, 13),
            r"`\q` in a string is no escape: a backslash starts one of \b \t \n \f \r"
            r" \" \\ \uXXXX \UXXXXXXXX (a backslash itself is \\, or write the string in"
            r" '...', where \ is itself)",
        ),
        (
            '[logging]\nlevel = "\\uZZZZ"\n',
            (2, 11),
            r"`\uZZZZ` is no unicode escape: \u takes 4 hexadecimal digits, \U 8, of a"
            " character's code point (not D800 to DFFF)",
        ),
        (
            '[logging]\nlevel = """info\n',
            (2, 1),
            'the file ends inside the string opened on line 2: it is not closed (""" or'
            " ''' closes a string over several lines)",
        ),
        (
            '[logging]\nlevel = "in\x01fo"\n',
            (2, 12),
            "a control character (U+0001) in a string: TOML allows none there but a tab (in"
            r" a string, write it as \u0001)",
        ),
        (
            "[kernel]\nd = 2024-13-45\n",
            (2, 15),
            "`2024-13-45` (the value of `d`) is no valid date (YYYY-MM-DD, a day of that month)",
        ),
        (
            "[kernel]\nd = 25:61:00\n",
            (2, 13),
            "`25:61:00` (the value of `d`) is no valid time (HH:MM:SS, hours to 23, minutes"
            " and seconds to 59)",
        ),
        (
            "[kernel]\nd = 2024-02-30T10:00:00\n",
            (2, 24),
            "`2024-02-30T10:00:00` (the value of `d`) is no valid date and time"
            " (YYYY-MM-DDTHH:MM:SS, then Z or an offset +HH:MM, or neither)",
        ),
        (
            "\ufeff[kernel]\nbatch_size = 5\n",
            (1, 1),
            "the file starts with a byte order mark (U+FEFF), which TOML does not allow: save"
            " it as UTF-8 without BOM",
        ),
        (
            "[kernel]\nmail box = 1\n",
            (2, 10),
            "`mail box` is no key: a bare key is letters, digits, `-` and `_` (quote any"
            ' other: "mail box" = ...)',
        ),
    ],
    ids=[
        "header",
        "array header",
        "after a header",
        "key alone",
        "bare word",
        "two values",
        "open string",
        "open list",
        "key twice",
        "table twice",
        "dotted key twice",
        "key then table",
        "inline table then table",
        "dotted keys then table",
        "key twice in an inline table",
        "list of tables then table",
        "table then list of tables",
        "bad escape",
        "bad unicode escape",
        "unterminated string over lines",
        "control character",
        "invalid date",
        "invalid time",
        "invalid date and time",
        "byte order mark",
        "invalid key",
    ],
)
def test_a_toml_error_says_what_is_wrong_in_the_file_s_terms(
    home: Path, text: str, where: tuple[int, int], said: str
) -> None:
    """Forty-sixth pass: tomlkit's ``Unexpected character: '\\n'`` (with its place) was
    all a malformed file heard, whatever was wrong. The error names the file, the line
    and column, and the problem as the file's lines are read (a table header, a key, its
    value). (Fails on f647f8e: ``Unexpected character``, ``Control characters``.)

    Forty-eighth pass, from "key twice" on: a name defined twice kept tomlkit's words,
    `Key "kernel" already exists.`, for a key, a table header or a key and a table of
    one name alike, at the place tomlkit noticed it (a repeated table's last key, not
    its header), at no place (an inline table), or `Redefinition of an existing table`;
    an escape, a date, a time, a control character, a key and a file ending in a string
    over several lines were in tomlkit's words too, and a byte order mark was `a key is
    empty`. (Fails on 5699b98: its config.py swapped in, the 18 new cases fail, the 8
    before pass.)"""
    file = write(home / "cwd" / "config.toml", text)
    with pytest.raises(ConfigError) as info:
        load(home)
    assert (info.value.path, info.value.line, info.value.column) == (file, *where)
    assert str(info.value) == f"{file}:{where[0]}:{where[1]}: invalid TOML: {said}"


_ONE_LINE = (
    "TOML 1.0 writes an inline table on one line (a [table] of its own takes one key a line)"
)
_NO_COMMA = "TOML 1.0 allows none before its `}` (a list takes one, an inline table does not)"


@pytest.mark.parametrize(
    ("text", "where", "said"),
    [
        (
            "[app]\nagents = 5\ntypes = { x = 1, }\n",
            (3, 18),
            f"a comma after the last item of the inline table of `types` of [app] opened on"
            f" line 3: {_NO_COMMA}",
        ),
        (
            "[kernel]\nt = { a = { b = 1 , }, c = 2 }\n",
            (2, 21),
            f"a comma after the last item of the inline table of `a` of [kernel] opened on"
            f" line 2: {_NO_COMMA}",
        ),
        (
            "[app]\ntypes = { x = 1,\n  y = 2 }\n",
            (2, 17),
            f"a line break in the inline table of `types` of [app] opened on line 2: {_ONE_LINE}",
        ),
        (
            "t = {\n  a = 1 }\n",
            (1, 6),
            f"a line break in the inline table of `t` opened on line 1: {_ONE_LINE}",
        ),
        (
            "[kernel]\nt = { a = 1  # why\n}\n",
            (2, 14),
            f"a line break in the inline table of `t` of [kernel] opened on line 2: {_ONE_LINE}",
        ),
        (
            "[app]\nspawn = [{ a = 1, }]\n",
            (2, 19),
            f"a comma after the last item of an inline table: {_NO_COMMA}",
        ),
    ],
    ids=["trailing comma", "nested", "line break", "break after brace", "comment", "in a list"],
)
def test_an_inline_table_past_toml_1_0_is_refused_naming_file_line_and_key(
    home: Path, text: str, where: tuple[int, int], said: str
) -> None:
    """Forty-ninth pass: tomlkit takes an inline table written over several lines or
    with a comma after its last item (``a = { x = 1, }``), which TOML 1.0 refuses (as
    Python's ``tomllib``, Cargo and the original's ``toml`` crate do): the file loaded.
    ``tomllib`` checks the text now and the error says it in the file's terms, at
    tomllib's place. A list still takes its trailing comma and its line breaks. (Fails
    on main, its config.py swapped in: no error raised.)"""
    file = write(home / "cwd" / "config.toml", text)
    with pytest.raises(ConfigError) as info:
        load(home)
    assert (info.value.path, info.value.line, info.value.column) == (file, *where)
    assert str(info.value) == f"{file}:{where[0]}:{where[1]}: invalid TOML: {said}"
    # (a list's trailing comma and line breaks are TOML 1.0: still taken)
    write(home / "cwd" / "config.toml", '[app]\nspawn = [\n  "a b",\n  "c",\n]\n')
    assert list(load(home).config.app.spawn) == ["a b", "c"]


_ITEMS = "its items are TOML values (strings in quotes) separated by commas"


@pytest.mark.parametrize(
    ("text", "where", "said"),
    [
        (
            '[app]\nspawn = [\n  "a",\n  b,\n]\n',
            (4, 3),
            f"`b` in the list or inline table opened on line 2: {_ITEMS}",
        ),
        (
            "[app]\nspawn = [ # ] not this one\n  [1, 2]\n  [3]\n]\n",
            (4, 3),
            f"`[` in the list or inline table opened on line 2: {_ITEMS}",
        ),
        (
            '[app]\nspawn = [\n  "]", { a = 1 },\n  1 = 2\n]\n',
            (4, 5),
            f"`=` in the list or inline table opened on line 2: {_ITEMS}",
        ),
        (
            "[app]\nspawn = [1, 2] x\n",
            (2, 16),
            "`x` after the value of `spawn`: one value per line, nothing but a comment after"
            " it (several values are a list: [1, 2])",
        ),
        (
            "[logging]\nlevel = '''\ninfo\n''' x\n",
            (4, 5),
            "`x` after the string opened on line 2: one value per line, nothing but a"
            " comment after it",
        ),
        (
            "[kernel]\nbatch_size = 1\x00\n",
            (2, 16),
            "a NUL character (\\x00) on this line: TOML allows none in a file",
        ),
    ],
    ids=[
        "bare word",
        "looks like a header",
        "looks like a key",
        "after a list on its line",
        "after a string over several lines",
        "a NUL",
    ],
)
def test_a_toml_error_says_what_is_open_where_it_is(
    home: Path, text: str, where: tuple[int, int], said: str
) -> None:
    """Forty-sixth pass, review: the line at tomlkit's place was read as a key or a table
    header even inside a list written over several lines (``b`` was "a key without a
    value", ``[3]`` "a table header", ``1 = 2`` a bad value of key ``1``): such a line
    is an item of the list, and the error says so, naming where the list was opened
    (strings and comments holding brackets skipped). Likewise a word after a list on its
    line was "in" the list, the line closing a string over several lines a key, and a
    NUL character "the file ends inside a list" (tomlkit's mark of the end). (Fails on
    0b0bac6: checked by running this test there, 6 of 6.)"""
    file = write(home / "cwd" / "config.toml", text)
    with pytest.raises(ConfigError) as info:
        load(home)
    assert (info.value.line, info.value.column) == where
    assert str(info.value) == f"{file}:{where[0]}:{where[1]}: invalid TOML: {said}"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('{"kernel": 1}\n', (1, 1)),
        ("kernel:\n", (1, 7)),
        ("[kernel]\nbatch_size = 1 2\n", (2, 16)),
        ('[logging]\nlevel = "info\n', (2, 14)),
    ],
    ids=["json", "yaml", "two values", "an unterminated string"],
)
def test_a_toml_error_s_column_counts_from_1(home: Path, text: str, where: tuple[int, int]) -> None:
    """Regression: the column came from tomlkit as it counts, from 0, so a file that is
    JSON said `config.toml:1:0:` and an editor or terminal that jumps to FILE:LINE:COL (as
    gcc, Python and tomllib count: from 1) landed one character before the bad one."""
    file = write(home / "cwd" / "config.toml", text)
    with pytest.raises(ConfigError) as info:
        load(home)
    assert (info.value.line, info.value.column) == where
    assert str(info.value).startswith(f"{file}:{where[0]}:{where[1]}: invalid TOML: ")


def test_unterminated_string_reports_its_line(home: Path) -> None:
    file = write(home / "cwd" / "config.toml", '[logging]\nlevel = "info\n')
    with pytest.raises(ConfigError, match=rf"^{file}:2:\d+: invalid TOML: "):
        load(home)


def test_a_duplicate_reported_by_an_older_tomlkit_gets_the_same_place_and_words(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tomlkit before 0.15.3 raises ``KeyAlreadyPresent`` with no place: the same scan
    of the text finds the second key and its column (here indented), as from 0.15.3."""
    file = write(home / "cwd" / "config.toml", "[kernel]\nbatch_size = 5\n\n  batch_size = 6\n")

    def older_parse(text: str) -> Any:
        raise tomlkit.exceptions.KeyAlreadyPresent("batch_size")

    monkeypatch.setattr(tomlkit, "parse", older_parse)
    with pytest.raises(ConfigError) as info:
        load(home)
    assert (info.value.line, info.value.column) == (4, 3)
    assert str(info.value) == (
        f"{file}:4:3: invalid TOML: the key `batch_size` of [kernel] {_TWICE} 2 and here"
    )


def test_duplicate_section_reports_its_line(home: Path) -> None:
    file = write(home / "cwd" / "config.toml", "[kernel]\nbatch_size = 5\n[kernel]\n")
    with pytest.raises(ConfigError, match=rf"^{file}:3:1: invalid TOML: the table \[kernel\]"):
        load(home)


def test_a_section_that_is_not_a_table_is_an_error(home: Path) -> None:
    file = write(home / "cwd" / "config.toml", "# x\nkernel = 5\n")
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value) == f"{file}:2: [kernel] must be a table, got 5"
    file = write(home / "cwd" / "config.toml", "# x\n\n[[kernel]]\nbatch_size = 1\n")
    with pytest.raises(ConfigError) as info:
        load(home)
    # (an array of tables, shown as TOML writes it inline)
    assert str(info.value) == f"{file}:3: [kernel] must be a table, got [{{ batch_size = 1 }}]"


def test_a_file_that_is_not_utf8_is_an_error(home: Path) -> None:
    """Fifty-fourth pass: the error named the file alone (``FILE: not UTF-8 text:
    invalid start byte``); it names the line and column of the first byte that is not
    UTF-8 now (the column in characters, as a TOML error's), and the byte."""
    file = home / "cwd" / "config.toml"
    file.write_bytes(b"[kernel]\nbatch_size = 5 # \xff\n")
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value) == (
        f"{file}:2:18: not UTF-8 text: at byte 0xff (invalid start byte); save the file as UTF-8"
    )
    assert (info.value.line, info.value.column) == (2, 18)
    file.write_bytes("[app]\n# café\nspawn = ['caf".encode() + b"\xe9']\n")
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value).startswith(
        f"{file}:3:14: not UTF-8 text: at byte 0xe9 (invalid continuation byte)"
    )


def refused_file(home: Path, data: bytes) -> tuple[Path, str]:
    """The config file ``data`` in the working directory, and the error its load raises."""
    file = home / "cwd" / "config.toml"
    file.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load(home)
    return file, str(info.value)


@pytest.mark.parametrize(
    ("encoding", "said"),
    [("utf-16", "UTF-16 (little-endian)"), ("utf-16-be", "UTF-16 (big-endian)")],
)
def test_a_utf16_config_file_is_said_to_be_utf16(home: Path, encoding: str, said: str) -> None:
    """Review of the fifty-fourth pass: a UTF-16 file (Windows' Notepad "Unicode",
    PowerShell 5's ``nexus config init > config.toml`` writes one) was said as ``not
    UTF-8 text: at byte 0xff (invalid start byte)``: said as UTF-16 now, by its byte
    order mark, at 1:1."""
    bom = "\ufeff" if encoding == "utf-16-be" else ""  # (Python's utf-16 writes its own)
    file, error = refused_file(home, f"{bom}[kernel]\nbatch_size = 5\n".encode(encoding))
    assert error == (
        f"{file}:1:1: not UTF-8 text: it is {said} (it starts with its byte order mark);"
        " save the file as UTF-8"
    )


@pytest.mark.parametrize("comment", ["ascii", "café"])
@pytest.mark.parametrize(
    ("encoding", "said"),
    [("utf-16-le", "UTF-16 (little-endian)"), ("utf-16-be", "UTF-16 (big-endian)")],
)
def test_a_utf16_config_file_without_a_byte_order_mark_is_said_to_be_utf16(
    home: Path, encoding: str, said: str, comment: str
) -> None:
    """Fifty-fifth pass: UTF-16 without a byte order mark (``iconv -t UTF-16LE``) is UTF-8
    to Python, and was said as TOML's ``invalid TOML: a NUL character (\\x00) on this line:
    TOML allows none in a file``, naming no encoding. Said as UTF-16 now, at 1:1; a UTF-8
    file with a NUL on a line is still TOML's error. (With main's config.py: the NUL
    error; with a character past ASCII, ``at byte 0xe9``.)"""
    file, error = refused_file(home, f"[kernel]\nbatch_size = 5  # {comment}\n".encode(encoding))
    assert error == (
        f"{file}:1:1: not UTF-8 text: it is {said} without a byte order mark (a NUL byte"
        " beside each ASCII character); save the file as UTF-8"
    )
    file.write_bytes(b"[kernel]\nbatch_size = 5 # a\x00b\n")
    with pytest.raises(ConfigError, match=r":2:.*invalid TOML: a NUL character"):
        load(home)


def test_a_config_file_past_one_mib_is_refused_before_it_is_read(home: Path) -> None:
    """Fifty-fourth pass: a file of any size was read whole and parsed: tomlkit reads
    about 0.6 MB a second here, so a 30 MB file given as ``-c`` (a log, a data file)
    took 51 s to load. Refused now past 1 MiB, naming the file and its size, before a
    byte is read; the search path's ``./config.toml`` too."""
    file = home / "cwd" / "config.toml"
    file.write_text("#" * config_module.CONFIG_FILE_MAX + "\n")
    said = (
        f"{file}: a config file has at most 1,048,576 bytes (1 MiB), this one 1,048,577:"
        " is it the config file?"
    )
    for path in [file, None]:
        with pytest.raises(ConfigError) as info:
            load(home, path)
        assert str(info.value) == said
        assert info.value.path == file
    file.write_text("[kernel]\nbatch_size = 5\n")
    assert load(home).config.kernel.batch_size == 5


def test_a_config_file_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit is the most bytes a config file has: one of exactly CONFIG_FILE_MAX
    bytes is read (its size as its stat says, and as read), one of a byte more refused.
    (The limit made 64 bytes here: a real 1 MiB file takes seconds to parse.)"""
    monkeypatch.setattr(config_module, "CONFIG_FILE_MAX", 64)
    head = "[kernel]\nbatch_size = 5\n"
    file = write(home / "cwd" / "config.toml", head + "#" * (64 - len(head) - 1) + "\n")
    assert file.stat().st_size == 64
    assert load(home).config.kernel.batch_size == 5
    file.write_text(head + "#" * (64 - len(head)) + "\n")
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value) == (
        f"{file}: a config file has at most 64 bytes (1 MiB), this one 65: is it the config file?"
    )


@pytest.mark.parametrize("grows", ["as-it-is-opened", "after-its-size-is-read"])
def test_a_config_file_that_grows_past_one_mib_as_it_is_read_is_not_read_whole(
    home: Path, monkeypatch: pytest.MonkeyPatch, grows: str
) -> None:
    """Review of the fifty-fourth pass: the 1 MiB limit was a stat of the path, then the
    whole file read: one that grew in between (a log given as ``-c`` as it is written
    to) was read whole and parsed, however large. The size is the open file's own now,
    and at most 1 MiB + 1 bytes of it are read: past that it is refused all the same."""
    file = write(home / "cwd" / "config.toml", "[kernel]\nbatch_size = 5\n")
    limit = config_module.CONFIG_FILE_MAX
    read: list[int] = []

    def grow() -> None:
        with open(file, "ab") as appended:  # (2 MiB more: one comment line)
            appended.write(b"#" * (2 * limit) + b"\n")

    class Counted:
        """The opened config file, each read's length noted in ``read``."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __enter__(self) -> Counted:
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.close()

        def fileno(self) -> int:
            return int(self.inner.fileno())

        def read(self, *size: int) -> Any:
            data = self.inner.read(*size)
            read.append(len(data))
            return data

    real_open, real_fstat = Path.open, os.fstat

    def opening(self: Path, *args: Any, **kwargs: Any) -> Any:
        opened = real_open(self, *args, **kwargs)
        if self != file:
            return opened
        if grows == "as-it-is-opened":
            grow()
        return Counted(opened)

    def fstat(fd: int) -> os.stat_result:
        result = real_fstat(fd)
        if grows == "after-its-size-is-read" and os.path.samestat(result, os.stat(file)):
            grow()
        return result

    monkeypatch.setattr(Path, "open", opening)
    monkeypatch.setattr(os, "fstat", fstat)
    with pytest.raises(ConfigError) as info:
        load(home, file)
    size = f"{24 + 2 * limit + 1:,}" if grows == "as-it-is-opened" else "more"
    assert str(info.value) == (
        f"{file}: a config file has at most 1,048,576 bytes (1 MiB), this one {size}:"
        " is it the config file?"
    )
    assert read == ([] if grows == "as-it-is-opened" else [limit + 1])


def test_a_config_path_that_is_a_looping_or_dangling_link_says_so(home: Path) -> None:
    """Fifty-fourth pass: ``-c`` naming a symbolic link that loops, or one to a missing
    file, said ``config file not found`` alone, as for a name nothing has. The link is
    named now; a link to a file is read as the file."""
    cwd = home / "cwd"
    (cwd / "one.toml").symlink_to("two.toml")
    (cwd / "two.toml").symlink_to("one.toml")
    (cwd / "dangling.toml").symlink_to("nowhere.toml")
    with pytest.raises(ConfigError) as info:
        load(home, "one.toml")
    assert str(info.value) == (
        f"{cwd / 'one.toml'}: config file not found: a symbolic link on its path loops"
        " (Too many levels of symbolic links)"
    )
    with pytest.raises(ConfigError) as info:
        load(home, "dangling.toml")
    assert str(info.value) == (
        f"{cwd / 'dangling.toml'}: config file not found: it is a symbolic link to"
        " nowhere.toml, which is not there"
    )
    with pytest.raises(ConfigError) as info:
        load(home, "missing.toml")
    assert str(info.value) == f"{cwd / 'missing.toml'}: config file not found"
    (cwd / "nowhere.toml").write_text("[kernel]\nbatch_size = 7\n")
    assert load(home, "dangling.toml").config.kernel.batch_size == 7


# --- unknown keys ------------------------------------------------------------------------------


UNKNOWN_FILE = (
    "[kernel]\nmailbox_capasity = 3\nbatch_size = 8\n[kernal]\nx = 1\n[logging]\nzzz = 1\n"
)


def unknown_names(file: Path) -> tuple[str, ...]:
    return (
        f"{file}:2: unknown key [kernel] mailbox_capasity (did you mean mailbox_capacity?)",
        f"{file}:4: unknown section [kernal] (did you mean [kernel]?)",
        f"{file}:7: unknown key [logging] zzz (known keys: level, format, queue)",
        "environment variable NEXUS_LOGGING__LEVLE: unknown key [logging] levle "
        "(did you mean level?)",
        "environment variable NEXUS_METRIC__PORT: unknown section [metric] "
        "(did you mean [metrics]?)",
    )


def test_unknown_keys_and_sections_are_errors_that_list_each_with_did_you_mean(
    home: Path,
) -> None:
    file = write(home / "cwd" / "config.toml", UNKNOWN_FILE)
    env = env_for(home, NEXUS_LOGGING__LEVLE="debug", NEXUS_METRIC__PORT="1")
    with pytest.raises(ConfigError) as info:
        load(home, env=env)
    lines = str(info.value).splitlines()
    assert tuple(lines[:-1]) == unknown_names(file)
    assert "NEXUS_ALLOW_UNKNOWN=1" in lines[-1]
    assert info.value.path == file


def test_every_problem_of_the_file_and_the_environment_is_said_at_once(home: Path) -> None:
    """Regression: a bad value raised at once, so a file with a bad value and a typo'd
    key (or two bad values, or a bad variable besides) showed the next problem only on
    the next run. One error says them all, a line each in the order found, each naming
    its place, table and key; its ``problems`` are the bad values, each with its own."""
    file = write(
        home / "cwd" / "config.toml",
        "[kernel]\nmailbox_capacity = 0\nbatch_sise = 3\nsend_timeout_ms = -1\n"
        "[logging]\nlevel = 'loud'\n[metric]\nport = 1\n",
    )
    env = env_for(home, NEXUS_KERNEL__BATCH_SIZE="0", NEXUS_RUNTIME__WORKER_THREADS="-1")
    with pytest.raises(ConfigError) as info:
        load(home, env=env)
    lines = str(info.value).splitlines()
    assert lines[:-1] == [
        f"{file}:2: [kernel] mailbox_capacity must be >= 1, got 0",
        f"{file}:3: unknown key [kernel] batch_sise (did you mean batch_size?)",
        f"{file}:4: [kernel] send_timeout_ms must be > 0, got -1",
        f"{file}:6: [logging] level must be one of trace, debug, info, warn, warning, error, "
        'critical, got "loud"',
        f"{file}:7: unknown section [metric] (did you mean [metrics]?)",
        "environment variable NEXUS_KERNEL__BATCH_SIZE: [kernel] batch_size must be >= 1, got 0",
        "environment variable NEXUS_RUNTIME__WORKER_THREADS: [runtime] worker_threads must be "
        ">= 0, got -1",
    ]
    assert "NEXUS_ALLOW_UNKNOWN=1" in lines[-1]
    assert info.value.path == file
    assert [(p.path, p.line, p.key) for p in info.value.problems] == [
        (file, 2, "kernel.mailbox_capacity"),
        (file, 4, "kernel.send_timeout_ms"),
        (file, 6, "logging.level"),
        (None, None, "kernel.batch_size"),
        (None, None, "runtime.worker_threads"),
    ]
    # unknown names allowed: the bad values alone, still all of them, and no advice
    with pytest.raises(ConfigError) as info:
        load(home, env=env, allow_unknown=True)
    assert len(str(info.value).splitlines()) == 5
    assert "unknown" not in str(info.value)
    # one bad value alone: its own error, as before
    write(home / "cwd" / "config.toml", "[kernel]\nmailbox_capacity = 0\n")
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value) == f"{file}:2: [kernel] mailbox_capacity must be >= 1, got 0"
    assert (info.value.line, info.value.key, info.value.problems) == (
        2,
        "kernel.mailbox_capacity",
        (info.value,),
    )
    # unknown names alone: lines of the message, no bad value among the problems
    write(home / "cwd" / "config.toml", "[kernel]\nbatch_sise = 3\n")
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value).splitlines()[0] == (
        f"{file}:2: unknown key [kernel] batch_sise (did you mean batch_size?)"
    )
    assert info.value.problems == ()


def test_a_typo_does_not_fall_back_to_the_default(home: Path) -> None:
    write(home / "cwd" / "config.toml", "[kernel]\nmailbox_capasity = 3\n")
    with pytest.raises(
        ConfigError, match=r"config.toml:2: unknown key \[kernel\] mailbox_capasity"
    ):
        load(home)


@pytest.mark.parametrize("how", ["argument", "env"])
def test_allow_unknown_keeps_them_warnings_with_did_you_mean(
    home: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    file = write(home / "cwd" / "config.toml", UNKNOWN_FILE)
    env = env_for(home, NEXUS_LOGGING__LEVLE="debug", NEXUS_METRIC__PORT="1")
    kw: dict[str, Any] = {"allow_unknown": True}
    if how == "env":
        env["NEXUS_ALLOW_UNKNOWN"] = "1"
        kw = {}
    with caplog.at_level(logging.WARNING, logger="nexus_trio.config"):
        loaded = load(home, env=env, **kw)
    assert loaded.config.kernel.batch_size == 8
    assert loaded.config.kernel.mailbox_capacity == 1024
    assert loaded.warnings == unknown_names(file)
    logged = [r.getMessage() for r in caplog.records if r.name == "nexus_trio.config"]
    assert logged == list(loaded.warnings)


def test_allow_unknown_argument_wins_over_the_environment(home: Path) -> None:
    write(home / "cwd" / "config.toml", "[kernel]\nbatchsize = 1\n")
    env = env_for(home, NEXUS_ALLOW_UNKNOWN="1")
    with pytest.raises(ConfigError, match="did you mean batch_size"):
        load(home, env=env, allow_unknown=False)
    assert load(home, env=env_for(home, NEXUS_ALLOW_UNKNOWN="0"), allow_unknown=True).warnings


def test_a_bad_allow_unknown_variable_is_an_error_naming_it(home: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"^environment variable NEXUS_ALLOW_UNKNOWN: must be 1, .* got 'maybe'"
    ):
        load(home, env=env_for(home, NEXUS_ALLOW_UNKNOWN="maybe"))


def test_a_top_level_key_of_a_section_suggests_the_section(home: Path) -> None:
    file = write(home / "cwd" / "config.toml", "mailbox_capacity = 3\n")
    expected = f"{file}:1: unknown top-level key mailbox_capacity (did you mean [kernel] mailbox_capacity?)"
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value).splitlines()[0] == expected
    loaded = load(home, allow_unknown=True)
    assert loaded.warnings == (expected,)
    assert loaded.config == Config()


def test_a_key_of_another_section_names_that_section(home: Path) -> None:
    """``server_lost_wait`` is a ``[nats]`` key: written under ``[cluster]`` (where the
    cluster's other options are) it was refused with ``did you mean forget_lost_after?``,
    a key of another meaning. The section that has it is named, in a file and in a
    variable, as a top-level key's is."""
    file = write(home / "cwd" / "config.toml", "[cluster]\nserver_lost_wait = 7\n")
    expected = (
        f"{file}:2: unknown key [cluster] server_lost_wait"
        " (it is a key of [nats]: did you mean [nats] server_lost_wait?)"
    )
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value).splitlines()[0] == expected
    env = env_for(home, NEXUS_KERNEL__PORT="9464")
    with pytest.raises(ConfigError) as info:
        load(home, path=write(home / "other.toml", ""), env=env)
    assert str(info.value).splitlines()[0] == (
        "environment variable NEXUS_KERNEL__PORT: unknown key [kernel] port"
        " (it is a key of [metrics]: did you mean [metrics] port?)"
    )


# --- who may have written the file ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "who"), [(0o664, "group"), (0o646, "others"), (0o666, "group and others")]
)
@pytest.mark.parametrize("explicit", [False, True])
def test_a_config_file_writable_by_group_or_others_is_refused(
    home: Path, mode: int, who: str, explicit: bool
) -> None:
    file = write(home / "cwd" / "config.toml", '[app]\nspawn = ["touch pwned"]\n')
    file.chmod(mode)
    with pytest.raises(ConfigError) as info:
        load(home, file if explicit else None)
    text = str(info.value)
    assert text.startswith(f"{file}: refusing to load a config file writable by {who}: ")
    assert f"({mode:04o})" in text and "owner " in text and f"chmod go-w {file}" in text
    file.chmod(0o644)
    assert load(home, file if explicit else None).config.app.spawn == ["touch pwned"]


def test_a_config_file_owned_by_another_user_is_refused(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = write(home / "cwd" / "config.toml", "[app]\nagents = 2\n")
    file.chmod(0o600)
    other_uid = 4242
    if os.geteuid() == 0:
        os.chown(file, other_uid, -1)  # root can give the file away for real
    else:
        # Without root a file cannot be given away: be someone else instead.
        other_uid = os.geteuid()
        monkeypatch.setattr(config_module.os, "geteuid", lambda: other_uid + 1)
    with pytest.raises(ConfigError) as info:
        load(home)
    text = str(info.value)
    assert text.startswith(f"{file}: refusing to load a config file owned by another user: ")
    assert f"uid {other_uid}" in text and "mode -rw------- (0600)" in text
    if os.geteuid() == 0:  # and a file owned by root is trusted, as by ssh
        os.chown(file, 0, -1)
        monkeypatch.setattr(config_module.os, "geteuid", lambda: other_uid)
        assert load(home).config.app.agents == 2


def test_write_template_creates_a_file_load_config_accepts_whatever_the_umask(
    home: Path,
) -> None:
    previous = os.umask(0)
    try:
        path = write_template(home / "cwd" / "config.toml")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
    assert load(home).config == Config()


def test_loaded_config_says_which_file_it_loaded_and_how(home: Path) -> None:
    assert load(home).describe_source() == ("no config file loaded (defaults and environment only)")
    found = write(home / "cwd" / "config.toml", "")
    assert load(home).describe_source() == (
        f"loaded config file {found} (found in the search path)"
    )
    given = write(home / "given.toml", "")
    assert load(home, given).describe_source() == (
        f"loaded config file {given} (given with --config)"
    )


# --- template and rendering --------------------------------------------------------------------


def test_template_round_trip_gives_the_defaults(home: Path) -> None:
    path = write_template(home / "out" / "config.toml")
    assert path == home / "out" / "config.toml"
    assert path.read_text(encoding="utf-8") == render_template()
    loaded = load(home, path)
    assert loaded.config == Config()
    assert loaded.warnings == ()
    # Every key but the optional app.app, app.types and the [nats] keys of the server and
    # its credentials (all unset by default) is written out (those are commented examples).
    written = {k for k, v in loaded.sources.items() if v == f"file {path}"}
    unset = {
        "app.app",
        "app.types",
        "cluster.last_notice_wait",
        "durable.max_age",
        "durable.max_messages",
    } | {k for k in ALL_KEYS if k.startswith("nats.")}
    assert written == ALL_KEYS - unset


def test_template_documents_every_key() -> None:
    text = render_template()
    for section, cls in SECTIONS.items():
        assert f"\n[{section}]\n" in text
        for field in attrs.fields(cls):
            assert field.metadata.get("doc"), f"{section}.{field.name} has no doc"
            assert f"# {field.metadata['doc']} [default: " in text
    assert "# app = " in text
    assert '# types = "myproject.agents:TYPES"' in text
    assert "NEXUS_KERNEL__MAILBOX_CAPACITY" in text


def test_write_template_refuses_to_overwrite(home: Path) -> None:
    path = write(home / "config.toml", "[app]\nagents = 2\n")
    with pytest.raises(ConfigError) as info:
        write_template(path)
    assert str(info.value) == (
        f"{path}: file exists; refusing to overwrite it (use --force / force=True)"
    )
    assert path.read_text(encoding="utf-8") == "[app]\nagents = 2\n"
    assert write_template(path, force=True) == path
    assert path.read_text(encoding="utf-8") == render_template()


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("below", ["config.toml", "sub/config.toml"])
def test_write_template_under_a_file_says_that_the_file_is_no_directory(
    home: Path, force: bool, below: str
) -> None:
    """``nexus config init notes.txt/config.toml`` said ``file exists; refusing to
    overwrite it (use --force ...)``, of a file that is not there (the directory's mkdir
    failed with FileExistsError), and --force said the same; one level further down,
    ``Not a directory`` without saying which. The file in the way is named now."""
    notes = write(home / "notes.txt", "mine\n")
    path = notes / below
    with pytest.raises(ConfigError) as info:
        write_template(path, force=force)
    assert str(info.value) == (
        f"{path}: cannot write config file: {notes} is a file, not a directory"
    )
    assert notes.read_text(encoding="utf-8") == "mine\n"


@pytest.mark.parametrize("link", [False, True])
def test_write_template_with_force_refuses_to_replace_what_is_no_regular_file(
    home: Path, link: bool
) -> None:
    """``nexus config init --force /dev/full`` (run as root) said ``wrote /dev/full``,
    status 0: the template was renamed over the device, which was gone, a regular file in
    its place. A named pipe, a device or a socket is no config file; it is refused, left
    as it was, and nothing is left beside it (also through a symbolic link to it)."""
    fifo = home / "config.toml"
    os.mkfifo(fifo)
    path = fifo
    if link:
        path = home / "link.toml"
        path.symlink_to(fifo)
    with pytest.raises(ConfigError) as info:
        write_template(path, force=True)
    assert str(info.value) == (f"{path}: not a regular file (a named pipe); refusing to replace it")
    assert fifo.is_fifo()
    assert path.is_symlink() is link
    assert [p.name for p in home.iterdir() if p.name.endswith(".tmp")] == []


def test_render_effective_shows_sources_and_parses_back(home: Path) -> None:
    file = write(
        home / "cwd" / "config.toml", '[kernel]\nmailbox_capacity = 10\n[app]\napp = "m:a"\n'
    )
    env = env_for(home, NEXUS_KERNEL__OVERFLOW="reject", NEXUS_APP__SPAWN="python a.py")
    loaded = load(home, env=env, overrides={"logging.level": "debug"})
    text = render_effective(loaded)
    # before: "config file: file /.../config.toml", the source's wording put after a label
    assert text.startswith(f"# effective nexus_trio configuration; config file: {file}\n")
    assert f"mailbox_capacity = 10  # from file {file}\n" in text
    assert 'overflow = "reject"  # from env NEXUS_KERNEL__OVERFLOW\n' in text
    assert 'level = "debug"  # from cli\n' in text
    assert 'spawn = ["python a.py"]  # from env NEXUS_APP__SPAWN\n' in text
    assert "batch_size = 64  # from default\n" in text
    assert 'app = "m:a"  # from file' in text
    again = write(home / "again.toml", text)
    assert load(home, again).config == loaded.config
    assert "# app is unset" not in text


def test_render_effective_of_defaults_comments_out_unset_keys(home: Path) -> None:
    loaded = load(home)
    text = render_effective(loaded)
    assert text.startswith(
        "# effective nexus_trio configuration; config file: no file (defaults)\n"
    )
    assert "# app is unset  # from default\n" in text
    again = write(home / "again.toml", text)
    assert load(home, again).config == Config()


def test_render_effective_says_what_an_unset_wait_stands_for(home: Path) -> None:
    """``[nats] server_lost_wait`` and ``[cluster] last_notice_wait`` unset are derived:
    ``nexus config show`` says the value a node uses and from what (it said only that
    they were unset); the text still loads back to the same config."""
    loaded = load(home, env=env_for(home, NEXUS_CLUSTER__HEARTBEAT_INTERVAL="2"))
    text = render_effective(loaded)
    assert (
        "# server_lost_wait is unset: 10.0 = [cluster] heartbeat_interval x missed_heartbeats"
        "  # from default\n"
    ) in text
    assert (
        "# last_notice_wait is unset: 23.0 = [nats] server_lost_wait + 13  # from default\n" in text
    )
    again = write(home / "again.toml", text)
    assert load(home, again).config == loaded.config


def test_render_effective_lists_warnings(home: Path) -> None:
    write(home / "cwd" / "config.toml", "[kernel]\nbatchsize = 1\n")
    text = render_effective(load(home, allow_unknown=True))
    assert "# warning: " in text
    assert "did you mean batch_size?" in text
    assert tomlkit.parse(text)  # still valid TOML


# --- the runtime mapping -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("worker_threads", "max_blocking_threads", "limit"),
    [(0, 512, 512), (0, 3, 3), (4, 512, 4), (16, 8, 8)],
)
async def test_runtime_keys_size_the_run_sync_thread_limiter(
    worker_threads: int, max_blocking_threads: int, limit: int
) -> None:
    runtime = RuntimeConfig(
        worker_threads=worker_threads, max_blocking_threads=max_blocking_threads
    )
    assert runtime.blocking_thread_limit == limit
    async with open_kernel(Config(runtime=runtime)) as kernel:
        assert kernel._thread_limiter.total_tokens == limit


def test_docs_describe_every_key() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "config.md").read_text(encoding="utf-8")
    for section, cls in SECTIONS.items():
        assert f"### `[{section}]`" in docs
        for field in attrs.fields(cls):
            assert f"| `{field.name}` |" in docs, f"{section}.{field.name} is not documented"


def test_docs_state_the_defaults_of_the_code() -> None:
    """Each key's row in docs/config.md, under its own section, gives the code's default."""
    docs = (Path(__file__).parent.parent / "docs" / "config.md").read_text(encoding="utf-8")
    words = dict(
        enumerate(
            ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"], 1
        )
    )
    assert f"one `Config` value: {words[len(SECTIONS)]} sections" in docs
    tables = re.split(r"^### ", docs, flags=re.M)
    for section, cls in SECTIONS.items():
        [table] = [t for t in tables if t.startswith(f"`[{section}]`")]
        rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", table, flags=re.M))
        assert set(rows) == {f.name for f in attrs.fields(cls)}, section
        for field in attrs.fields(cls):
            written = rows[field.name].strip()
            documented = (
                None if written == "unset" else tomllib.loads(f"v = {written.strip('`')}")["v"]
            )
            default = field.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                default = default.factory()
            default = default.value if isinstance(default, enum.Enum) else default
            assert documented == default, (
                f"[{section}] {field.name}: docs {written}, code {default!r}"
            )


#: the keys that take a number that need not be an integer (times, the run's duration)
FLOAT_KEYS = sorted(
    (section, field.name)
    for section, cls in SECTIONS.items()
    for field in attrs.fields(cls)
    if field.type in (float, "float") and field.name != "backoff_jitter"
)


@pytest.mark.parametrize(("section", "key"), FLOAT_KEYS)
@pytest.mark.parametrize("value", ["inf", "+inf", "1e999"])
def test_an_infinite_time_in_the_file_is_refused_naming_file_line_key_and_value(
    home: Path, section: str, key: str, value: str
) -> None:
    # No key documents a "forever" meaning: inf would be a timer that never fires, a
    # backoff that never restarts, a render cached for good, or 0's meaning spelt twice.
    file = write(home / "cwd" / "config.toml", f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value) == f"{file}:2: [{section}] {key} must be a finite number, got inf"
    assert info.value.key == f"{section}.{key}"


@pytest.mark.parametrize(("section", "key"), FLOAT_KEYS)
def test_an_infinite_time_from_env_or_override_is_refused_naming_where(
    home: Path, section: str, key: str
) -> None:
    variable = f"NEXUS_{section.upper()}__{key.upper()}"
    for raw in ("inf", "1e999"):
        with pytest.raises(ConfigError) as info:
            load(home, env=env_for(home, **{variable: raw}))
        assert str(info.value) == (
            f"environment variable {variable}: [{section}] {key} must be a finite number, got inf"
        )
    with pytest.raises(ConfigError) as info:
        load(home, overrides={f"{section}.{key}": float("inf")})
    assert str(info.value) == (
        f"override {section}.{key}: [{section}] {key} must be a finite number, got inf"
    )
    with pytest.raises(ValueError, match=rf"^\[{section}\] {key} must be a finite number"):
        SECTIONS[section](**{key: math.inf})
    # the largest finite value is still taken (with the key it must not exceed, if any;
    # a [durable] time JetStream takes, in Go's 64-bit nanoseconds, is bounded lower)
    most = float(JETSTREAM_SECONDS_MAX) if section == "durable" else 1e308
    partner = {"missing_agent_delay": {"missing_agent_delay_max": most}}.get(key, {})
    assert getattr(SECTIONS[section](**{key: most}, **partner), key) == most


def test_agents_are_bounded_naming_the_file_variable_or_flag_and_the_bound(home: Path) -> None:
    # A demo of 10**12 agents would try to spawn them (about 1 KB each, idle).
    message = "[app] agents must be at most 100000000 (the most one run takes), got 100000001"
    file = write(home / "cwd" / "config.toml", "[app]\nagents = 100000001\n")
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value) == f"{file}:2: {message}"
    file.unlink()
    with pytest.raises(ConfigError) as info:
        load(home, env=env_for(home, NEXUS_APP__AGENTS="100000001"))
    assert str(info.value) == f"environment variable NEXUS_APP__AGENTS: {message}"
    with pytest.raises(ConfigError) as info:
        load(home, overrides={"app.agents": 10**8 + 1})
    assert str(info.value) == f"override app.agents: {message}"
    assert load(home, overrides={"app.agents": 10**8}).config.app.agents == 10**8


def test_the_original_s_logging_format_full_is_taken_as_compact(home: Path) -> None:
    """Regression (forty-second pass): ``[logging] format = "full"``, the name of the
    original's default format (tracing-subscriber's ``Full``: one line of time, level,
    target, message and fields), which a config of the original may carry, was refused
    (``must be one of compact, json, pretty``). It is taken, as the one-line format that
    writes those parts in that order, ``compact``; so is ``NEXUS_LOGGING__FORMAT=full``."""
    write(home / "cwd" / "config.toml", '[logging]\nformat = "full"\n')
    loaded = load(home)
    assert loaded.config.logging.format == "full"
    env = env_for(home, NEXUS_LOGGING__FORMAT="full")
    assert load(home, env=env).config.logging == LoggingConfig(format="full")


# --- long values and names are cut in errors (fifty-third pass) --------------------------------

LONG = "a" * 10_000
#: how an error shows LONG: its first 40 characters and its length
LONG_CUT = "a" * 40 + "... (10,000 characters)"
#: how an error shows LONG as a TOML string: quoted, then cut
LONG_SAID = '"' + "a" * 40 + '"... (10,000 characters)'


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            f'[app]\nworkload = "{LONG}"\n',
            "config.toml:2: [app] workload must be one of ring, fanout, request, pool, got"
            f" {LONG_SAID}",
        ),
        (f'[app]\nagents = "{LONG}"\n', f"[app] agents must be an integer, got {LONG_SAID}"),
        (
            f'[app]\napp = "{LONG}"\n',
            f"[app] app must look like 'package.module:attr', got {LONG_SAID}; did you mean",
        ),
        (f"[app]\n{LONG} = 1\n", f"config.toml:2: unknown key [app] {LONG_CUT} (known keys: "),
        (f"[{LONG}]\nx = 1\n", f"config.toml:1: unknown section [{LONG_CUT}] (known sections: "),
        (
            f"[app]\nagents = [{', '.join(['1'] * 3000)}]\n",
            "[app] agents must be an integer, got [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,"
            " ... (9,000 characters)",
        ),
    ],
    ids=["value", "number-key", "app", "key", "section", "array"],
)
def test_a_long_value_or_name_in_a_config_file_is_cut_in_its_error(
    home: Path, text: str, said: str
) -> None:
    """Fifty-third pass: the config loader's errors echoed a bad value (a 10 kB string in
    a key, a 3,000-item array) or an unknown key's or section's name whole, 10 kB in one
    error line, where the flags' errors cut it to its first 40 characters and its length.
    Cut the same way now, the key and the file's line still named."""
    write(home / "cwd" / "config.toml", text)
    with pytest.raises(ConfigError) as info:
        load(home)
    message = str(info.value)
    assert said in message
    assert "a" * 41 not in message
    assert len(message) < 400, message


def test_a_long_value_of_a_variable_is_cut_in_its_error(home: Path) -> None:
    """The same from a ``NEXUS_*`` variable (the value, and a variable's unknown key)."""
    with pytest.raises(ConfigError) as info:
        load(home, env=env_for(home, NEXUS_APP__WORKLOAD=LONG))
    assert str(info.value) == (
        "environment variable NEXUS_APP__WORKLOAD: [app] workload must be one of ring,"
        f" fanout, request, pool, got {LONG_SAID}"
    )
    with pytest.raises(ConfigError) as info:
        load(home, env=env_for(home, NEXUS_APP__WORKLOAD="ring", nexus_app__workload=LONG))
    assert str(info.value) == (
        "environment variable nexus_app__workload: [app] workload is set twice, differently:"
        f" NEXUS_APP__WORKLOAD='ring' and nexus_app__workload='{LONG_CUT[:40]}'... (10,000"
        " characters) (one key in any case: keep one)"
    )
    variable = "NEXUS_APP__" + "X" * 100
    with pytest.raises(ConfigError) as info:
        load(home, env=env_for(home, **{variable: "1"}))
    assert str(info.value).startswith(
        f"environment variable {variable[:40]}... (111 characters): unknown key [app]"
        f" {'x' * 40}... (100 characters) (known keys: "
    )
    # a variable's name of 41 characters, of a known key, is not cut
    with pytest.raises(
        ConfigError, match=r"^environment variable NEXUS_SUPERVISION__BACKOFF_RESET"
    ):
        load(home, env=env_for(home, NEXUS_SUPERVISION__BACKOFF_RESET_AFTER_MS="inf"))


def unknown_names_said(home: Path, text: str, count: int) -> list[str]:
    """The first ``count`` lines of the error of a config file ``text``, each without its
    place before and its hint after: ``unknown key [kernel] ""``."""
    write(home / "cwd" / "config.toml", text)
    with pytest.raises(ConfigError) as info:
        load(home)
    lines = str(info.value).splitlines()[:count]
    return [line.split(": ", 1)[1].split(" (")[0] for line in lines]


def test_an_empty_or_blank_name_is_quoted_in_its_error(home: Path) -> None:
    """Review of the fifty-fourth pass: a printable name was shown as written, so an
    empty or blank key or section (TOML takes ``"" = 1``, ``" " = 1``) was nothing in
    its error: ``unknown key [kernel]  (known keys: ...)``. Quoted now, as TOML writes
    it; a bare name is shown as written, as before."""
    text = '[kernel]\n"" = 1\n" " = 2\n"a b" = 3\nab = 4\n[" "]\nk = 1\n'
    assert unknown_names_said(home, text, 5) == [
        'unknown key [kernel] ""',
        'unknown key [kernel] " "',
        'unknown key [kernel] "a b"',
        "unknown key [kernel] ab",
        'unknown section [" "]',
    ]


def test_a_name_with_an_invisible_character_is_escaped_in_its_error(home: Path) -> None:
    """Fifty-fifth pass: a name with a character that is not printable but no control
    (U+200B ZERO WIDTH SPACE, U+00A0, a bidi mark, DEL was escaped already) was quoted
    with the character as it is, so that the error showed ``"mailbox​capacity"``, which
    reads as the name meant. Escaped now, as TOML writes it; the environment's names
    too. (With main's _config.py: the characters raw.)"""
    text = '[kernel]\n"mailbox\u200bcapacity" = 1\n"batch\u00a0size" = 2\n"a\u200fb" = 3\n'
    assert unknown_names_said(home, text, 3) == [
        'unknown key [kernel] "mailbox\\u200bcapacity"',
        'unknown key [kernel] "batch\\u00a0size"',
        'unknown key [kernel] "a\\u200fb"',
    ]
    with pytest.raises(ConfigError) as info:
        load(home, env=env_for(home, **{"NEXUS_KERNEL__X\u200bY": "1"}))
    assert '"NEXUS_KERNEL__X\\u200bY"' in str(info.value)


def test_a_name_with_a_control_character_is_escaped_in_its_error(home: Path) -> None:
    """Fifty-fourth pass: values were escaped in errors, the names of unknown keys,
    sections and ``NEXUS_*`` variables were not: an ESC or a newline in a TOML key or a
    variable's name reached the terminal raw (``unknown key [kernel] ab<ESC>[31mc``,
    which colours the terminal red). A name with a character that is not printable is
    shown as a TOML basic string now, escaped, and cut as a long one is."""
    write(
        home / "cwd" / "config.toml",
        '[kernel]\n"ab\\u001b[31mc\\nd" = 1\n["s\\u001b"]\nk = 1\n'
        f'[app]\n"{"y" * 50}\\u0007" = 1\n',
    )
    with pytest.raises(ConfigError) as info:
        load(home)
    lines = str(info.value).splitlines()
    assert lines[0].endswith(
        'config.toml: unknown key [kernel] "ab\\u001b[31mc\\nd" (known keys:'
        + lines[0].split("(known keys:")[1]
    )
    assert 'unknown section ["s\\u001b"] (known sections:' in lines[1]
    assert f'unknown key [app] "{"y" * 40}"... (51 characters) (known keys:' in lines[2]
    assert len(lines) == 4  # (three names and the hint: no newline of a name splits one)
    for variable, said in [
        (
            "NEXUS_KERNEL__A\x1bB",
            'environment variable "NEXUS_KERNEL__A\\u001bB": unknown key'
            ' [kernel] "a\\u001bb" (known keys: ',
        ),
        (
            "NEXUS_KERNEL__MAILBOX_CAPACITY\n",
            "environment variable"
            ' "NEXUS_KERNEL__MAILBOX_CAPACITY\\n": unknown key [kernel] "mailbox_capacity\\n"'
            " (did you mean mailbox_capacity?)",
        ),
        (
            "NEXUS_X\x1b__Y",
            'environment variable "NEXUS_X\\u001b__Y": unknown section'
            ' ["x\\u001b"] (known sections: ',
        ),
    ]:
        with pytest.raises(ConfigError) as info:
            load(home / "elsewhere", env=env_for(home, **{variable: "1"}))
        assert str(info.value).startswith(said), str(info.value)
        assert "\x1b" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, env={}, cwd=home / "elsewhere", overrides={"kernel.\x1b": 1})
    assert str(info.value).startswith('override "kernel.\\u001b": unknown key [kernel] "\\u001b"')


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("0.0.0.0:9100", "a host, without its port: the port is given on its own"),
        ("[::1]:9100", "a host, without its port: the port is given on its own"),
        ("http://localhost", "a host, not a URL"),
        ("[localhost]", "brackets are for an IPv6 address"),
        ("[::1", "brackets are for an IPv6 address"),
        ("local host", "a host name has no blanks"),
        ("x..y", "label empty or too long"),
    ],
)
def test_a_metrics_host_is_checked_as_the_config_loads(home: Path, host: str, why: str) -> None:
    """Fifty-third pass: ``[metrics] host`` was checked only as not blank, so a host with
    its port, a URL or ``x..y`` loaded, and failed the run late (or was taken unused with
    the endpoint off). Refused at load now, naming the file's line and the key; an IPv6
    address is taken with or without brackets, kept without them (what a socket takes)."""
    file = write(home / "cwd" / "config.toml", f'[metrics]\nhost = "{host}"\n')
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value).startswith(
        f'{file}:2: [metrics] host must be an address or a host name, got "{host}" ({why}'
    )
    assert info.value.key == "metrics.host"
    for taken, kept in [("[::1]", "::1"), ("::", "::"), ("[::]", "::"), ("localhost", "localhost")]:
        file.write_text(f'[metrics]\nhost = "{taken}"\n')
        assert load(home).config.metrics.host == kept
    assert MetricsConfig(host="[::1]").host == "::1"


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("*", "a wildcard is no host: all interfaces are 0.0.0.0, or :: for IPv6 too"),
        ("*.example", "a wildcard is no host: all interfaces are 0.0.0.0, or :: for IPv6 too"),
        ("a@b", "a host name is letters, digits, '-', '_' and dots, not '@'"),
        ("a,b", "a host name is letters, digits, '-', '_' and dots, not ','"),
    ],
)
def test_a_wildcard_or_a_character_no_host_name_has_is_refused_at_load(
    home: Path, host: str, why: str
) -> None:
    """Fifty-fourth pass: ``[metrics] host = "*"`` loaded; glibc's resolver took it as
    all interfaces, another looks it up as a name, and the run logged
    ``metrics on http://*:9464/metrics`` (no URL) while ``nexus health`` asked for
    ``http://*:9464/healthz``; ``a@b`` loaded and failed the run late, exit 1
    (``cannot listen on a@b``). The original had no metrics endpoint, so ``*`` means
    nothing to it: refused at load, naming the key, saying the address to write."""
    file = write(home / "cwd" / "config.toml", f'[metrics]\nhost = "{host}"\n')
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value) == (
        f'{file}:2: [metrics] host must be an address or a host name, got "{host}" ({why})'
    )
    assert info.value.key == "metrics.host"
    with pytest.raises(ConfigError, match=r"^environment variable NEXUS_METRICS__HOST: .*"):
        load(home / "elsewhere", env=env_for(home, NEXUS_METRICS__HOST=host))


#: an interface of this host (``lo`` on Linux, ``lo0`` on macOS) and its index: zones the
#: config takes
AN_INDEX, AN_INTERFACE = socket.if_nameindex()[0]

#: a host name of 253 characters (four labels), the most DNS takes
_NAME_253 = f"{'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 61}"


@pytest.mark.parametrize(
    ("host", "length"),
    [(_NAME_253 + "d", "254"), ("a." * 2000 + "b", "4,001")],
    ids=["254", "4001"],
)
def test_a_metrics_host_longer_than_a_host_name_is_refused_at_load(
    home: Path, host: str, length: str
) -> None:
    """Review of the fifty-third pass: the check at load took any name whose labels IDNA
    takes, also one past the 253 characters of a DNS name (``a.`` 2,000 times), which
    then failed the run late, exit 1, echoing the whole name: 4,389 bytes of error for
    4,001 characters. Refused at load now, cut; a name of 253 characters (254 with a
    trailing dot) and the original's hosts are taken as they were."""
    file = write(home / "cwd" / "config.toml", f'[metrics]\nhost = "{host}"\n')
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value) == (
        f'{file}:2: [metrics] host must be an address or a host name, got "{host[:40]}"...'
        f" ({len(host):,} characters) (a host name has at most 253 characters, this one"
        f" {length})"
    )
    assert info.value.key == "metrics.host"
    taken = [
        _NAME_253,
        _NAME_253 + ".",
        "host.",
        "localhost",
        "0.0.0.0",
        "::",
        "bücher.example",
        f"fe80::1%{AN_INTERFACE}",
    ]
    for name in taken:
        file.write_text(f'[metrics]\nhost = "{name}"\n')
        assert load(home).config.metrics.host == name
    file.write_text(f'[metrics]\nhost = "[fe80::1%{AN_INTERFACE}]"\n')
    assert load(home).config.metrics.host == f"fe80::1%{AN_INTERFACE}"
    with pytest.raises(ConfigError, match=r"^environment variable NEXUS_METRICS__HOST: .* 253"):
        load(home, env=env_for(home, NEXUS_METRICS__HOST=host))


@pytest.mark.parametrize(
    ("host", "odd"),
    [
        ("fe80::1%☃", "'☃'"),
        ("[fe80::1%é]", "'é'"),
        ("fe80::1%a b", "' '"),
        ("fe80::1%e\u200b", "'\\u200b'"),
    ],
)
def test_an_ipv6_zone_that_is_no_interface_name_is_refused_at_load(
    home: Path, host: str, odd: str
) -> None:
    """Fifty-fifth pass: ``ipaddress`` takes any text after an IPv6 address's ``%``, and so
    did the check: ``fe80::1%☃`` loaded, and the listener's lookup failed the run late
    (``Name or service not known``). A zone is an interface's name or index, ASCII without
    blanks: refused at load, naming the key and the character. (With main's _config.py:
    loaded.)"""
    file = write(home / "cwd" / "config.toml", f'[metrics]\nhost = "{host}"\n')
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value).startswith(f"{file}:2: [metrics] host must be an address or a host name")
    assert str(info.value).endswith(
        f"(an IPv6 zone is an interface's name or index, ASCII without blanks, not {odd})"
    )
    assert info.value.key == "metrics.host"
    for taken in [f"fe80::1%{AN_INTERFACE}", f"fe80::1%{AN_INDEX}"]:
        file.write_text(f'[metrics]\nhost = "{taken}"\n')
        assert load(home).config.metrics.host == taken


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("fe80::1%nosuchif", "no interface of this host is named 'nosuchif' (its interfaces: "),
        (
            f"fe80::1%25{AN_INTERFACE}",
            f"no interface of this host is named '25{AN_INTERFACE}' (its interfaces: ",
        ),
        ("fe80::1%a]b", "(as a URL writes it, RFC 6874), not ']')"),
        ("[fe80::1%a#]", "(as a URL writes it, RFC 6874), not '#')"),
        ("fe80::1%eth?0", "(as a URL writes it, RFC 6874), not '?')"),
        ("fe80::1%veth1@if3", "(as a URL writes it, RFC 6874), not '@')"),  # (as `ip link`)
    ],
    ids=["no-such-interface", "url-escaped", "bracket", "hash", "question-mark", "at"],
)
def test_an_ipv6_zone_this_host_has_no_interface_of_is_refused_at_load(
    home: Path, host: str, why: str
) -> None:
    """Fifty-sixth pass: a zone naming no interface (``fe80::1%nosuchif``, ``%25eth0``
    copied from a URL) loaded and failed the run late, as did ``]``, ``#``, ``?`` (written
    unescaped in the run's ``metrics on http://[...]`` URL). The config is loaded where it
    runs: refused at load, naming the key and the zone, with this host's interfaces, and
    ``%25`` told to be written ``%``. (With main's _config.py: each case loaded.)"""
    file = write(home / "cwd" / "config.toml", f'[metrics]\nhost = "{host}"\n')
    with pytest.raises(ConfigError) as info:
        load(home)
    text = str(info.value)
    assert text.startswith(f"{file}:2: [metrics] host must be an address or a host name"), text
    assert why in text, text
    assert info.value.key == "metrics.host"
    if "%25" in host:
        assert text.endswith(f"; %25 is how a URL writes the %: write %{AN_INTERFACE})"), text
    if "no interface" in why:
        assert AN_INTERFACE in text.partition("(its interfaces: ")[2], text


#: an index no interface has (Linux numbers them from 1 up, one per interface made)
_NO_INDEX = 4_000_000_000


@pytest.mark.parametrize(
    ("host", "why"),
    [
        (f"fe80::1%{_NO_INDEX}", f"no interface of this host has the index {_NO_INDEX} ("),
        ("fe80::1%0", "no interface of this host has the index 0 ("),
        ("fe80::1%4294967296", "no interface of this host has the index 4294967296 ("),
        (
            "fe80::1%" + "9" * 5000,
            "no interface of this host has the index 9999999999999999999999999999999999999999"
            "... (5,000 characters) (",
        ),
        (
            "fe80::1%" + "a" * 100_000,
            f"no interface of this host is named '{'a' * 40}'... (100,000 characters) (",
        ),
        (
            f"::1%{AN_INTERFACE}",
            f"a zone naming an interface ('{AN_INTERFACE}') is looked up for a link-local"
            f" address only (fe80::/10), as getaddrinfo does: write its index, %{AN_INDEX},"
            " or no zone)",
        ),
    ],
    ids=["no-such-index", "index-0", "past-unsigned-int", "5000-digits", "long-name", "loopback"],
)
def test_an_ipv6_zone_the_listener_cannot_look_up_is_refused_at_load(
    home: Path, host: str, why: str
) -> None:
    """Review of the fifty-sixth pass: a zone naming no interface was refused at load, but
    an index of none (``fe80::1%999``: the run failed late, ``No such device``; past an
    ``unsigned int``: ``Name or service not known``) loaded, as did a name on an address
    getaddrinfo looks no zone name up for (``::1%lo``: not link-local, ``Name or service
    not known``, late), and a zone of 5,000 digits; a long one was echoed whole (100,000
    characters). (With main's _config.py: all but long-name loaded; long-name's error
    held the zone whole.)"""
    write(home / "cwd" / "config.toml", f'[metrics]\nhost = "{host}"\n')
    with pytest.raises(ConfigError) as info:
        load(home)
    text = str(info.value)
    assert why in text, text[:300]
    assert info.value.key == "metrics.host"
    assert len(text) < 400, len(text)
    if why.startswith("no interface"):
        assert f"(its interfaces: {AN_INTERFACE} {AN_INDEX}" in text, text[:300]
    for taken in [
        f"::1%{AN_INDEX}",
        f"fe80::1%{AN_INDEX}",
        f"fe80::1%000{AN_INDEX}",
        f"ff02::1%{AN_INTERFACE}",
    ]:
        write(home / "cwd" / "config.toml", f'[metrics]\nhost = "{taken}"\n')
        assert load(home).config.metrics.host == taken


@pytest.mark.parametrize("host", ["☃.net", "ü_b.example"])
def test_a_metrics_host_that_trio_cannot_look_up_is_refused_at_load(home: Path, host: str) -> None:
    """Review of the fifty-third pass: the check at load asked Python's IDNA 2003 codec,
    which takes ``☃.net``; Trio, which the endpoint listens with, encodes an international
    name by IDNA 2008 (the ``idna`` package), which refuses it: the name loaded and the run
    failed, exit 1 (``cannot listen on '☃.net': no host name (Codepoint U+2603 ...``).
    Refused at load now, naming the key; an international name both take is taken."""
    file = write(home / "cwd" / "config.toml", f'[metrics]\nhost = "{host}"\n')
    with pytest.raises(ConfigError) as info:
        load(home)
    assert str(info.value).startswith(
        f'{file}:2: [metrics] host must be an address or a host name, got "{host}" (Codepoint U+'
    )
    assert " not allowed)" in str(info.value)
    assert info.value.key == "metrics.host"
    for name in ["bücher.example", "Bücher.example", "ß.de", "a_b.example"]:
        file.write_text(f'[metrics]\nhost = "{name}"\n')
        assert load(home).config.metrics.host == name
