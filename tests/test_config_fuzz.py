"""Hostile config input: files, environment variables and overrides with values of any
type and size. Loading either succeeds with values that pass the documented validation or
raises ConfigError naming the file, variable or key: never another exception."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest

import nexus_trio.config as config_module
from nexus_trio import Context, KernelConfig, Message, agent, open_kernel
from nexus_trio._config import SECTIONS
from nexus_trio.config import ConfigError, LoadedConfig, load_config

INT64_MAX = 2**63 - 1

#: every key whose value is a number (integer or not), as "section.key"
NUMBER_KEYS = sorted(
    f"{section}.{field.name}"
    for section, cls in SECTIONS.items()
    for field in attrs.fields(cls)
    if field.type in (int, float, "int", "float")
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd, HOME and /etc under tmp_path: no config file but the test's own."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "home").mkdir()
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", tmp_path / "etc" / "nexus" / "config.toml")
    return tmp_path


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(0o644)
    return path


def load(
    home: Path, path: Path | None = None, env: dict[str, str] | None = None, **kw: Any
) -> LoadedConfig:
    return load_config(
        path, env={"HOME": str(home / "home"), **(env or {})}, cwd=home / "cwd", **kw
    )


@agent(name="echo")
async def echo(ctx: Context, msg: Message) -> Any:
    return msg.payload


# --- integers beyond 64 bits ---------------------------------------------------------------------


@pytest.mark.parametrize("dotted", NUMBER_KEYS)
@pytest.mark.parametrize("literal", [str(2**64), str(10**30), "0x" + "f" * 5000, "-" + str(2**64)])
def test_an_integer_beyond_64_bits_in_the_file_is_an_error_naming_the_key(
    home: Path, dotted: str, literal: str
) -> None:
    section, key = dotted.split(".")
    file = write(home / "c.toml", f"[{section}]\n{key} = {literal}\n")
    with pytest.raises(ConfigError) as info:
        load(home, file)
    assert info.value.key == dotted
    assert (info.value.path, info.value.line) == (file, 2)
    assert f"[{section}] {key}" in str(info.value)
    assert "64" in str(info.value)
    assert len(str(info.value)) < 400  # not the 5000 digits


@pytest.mark.parametrize("dotted", NUMBER_KEYS)
def test_an_integer_beyond_64_bits_in_the_environment_is_an_error_naming_it(
    home: Path, dotted: str
) -> None:
    section, key = dotted.split(".")
    name = f"NEXUS_{section.upper()}__{key.upper()}"
    with pytest.raises(ConfigError) as info:
        load(home, env={name: str(10**30)})
    assert info.value.key == dotted
    assert str(info.value).startswith(f"environment variable {name}: [{section}] {key}")


@pytest.mark.parametrize("value", ["[0x" + "f" * 5000 + "]", '["a", ' + str(2**64) + "]"])
def test_a_huge_integer_anywhere_in_the_file_is_an_error_not_a_crash(
    home: Path, value: str
) -> None:
    for text in (f"[app]\nspawn = {value}\n", f"[[kernel]]\nx = {value}\n", f"x = {value}\n"):
        file = write(home / "c.toml", text)
        with pytest.raises(ConfigError) as info:
            load(home, file, allow_unknown=True)
        assert str(info.value).startswith(str(file))
        assert "64" in str(info.value)
        assert len(str(info.value)) < 400


def test_an_integer_beyond_64_bits_in_python_or_an_override_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"\[kernel\] dead_letter_buffer must be at most"):
        KernelConfig(dead_letter_buffer=10**30)
    with pytest.raises(ValueError, match=r"\[kernel\] send_timeout_ms must be at most"):
        KernelConfig(send_timeout_ms=16**5000)
    with pytest.raises(ConfigError) as info:
        load_config(None, env={}, cwd=Path("/nonexistent"), overrides={"app.agents": 10**30})
    assert info.value.key == "app.agents"


async def test_the_largest_accepted_integers_run_a_kernel(home: Path) -> None:
    env = {
        f"NEXUS_{dotted.replace('.', '__').upper()}": str(INT64_MAX)
        for dotted in NUMBER_KEYS
        if dotted not in ("metrics.port", "supervision.backoff_jitter")
    }
    config = load(home, env=env).config
    assert config.kernel.dead_letter_buffer == INT64_MAX
    async with open_kernel(config) as kernel:
        kernel.spawn(echo)
        for i in range(3):
            await kernel.send("echo", i)
        assert await kernel.request("echo", "last") == "last"
        assert kernel.stats().handled == 4


# --- text keys in the environment ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "dotted", "expected"),
    [
        ("NEXUS_NATS__PASSWORD", "12345678", "nats.password", "12345678"),
        ("NEXUS_NATS__TOKEN", "true", "nats.token", "true"),
        ("NEXUS_NATS__TOKEN", "0x1F", "nats.token", "0x1F"),
        ("NEXUS_NATS__USER", "1979-05-27", "nats.user", "1979-05-27"),
        ("NEXUS_NATS__CREDS_FILE", "inf", "nats.creds_file", "inf"),
        ("NEXUS_METRICS__HOST", "1e5", "metrics.host", "1e5"),
        ("NEXUS_METRICS__HOST", "127.1", "metrics.host", "127.1"),
        ("NEXUS_NATS__PASSWORD", '"quoted # kept"', "nats.password", "quoted # kept"),
    ],
)
def test_a_text_key_in_the_environment_is_the_string_as_written(
    home: Path, name: str, raw: str, dotted: str, expected: str
) -> None:
    loaded = load(home, env={name: raw})
    section, key = dotted.split(".")
    assert getattr(getattr(loaded.config, section), key) == expected
    assert loaded.sources[dotted] == f"env {name}"


# --- paths the system cannot look up -------------------------------------------------------------


def test_a_config_path_too_long_to_look_up_is_an_error_naming_it(home: Path) -> None:
    long = home / ("a" * 5000)
    with pytest.raises(ConfigError) as info:
        load(home, long)
    assert info.value.path == long
    assert str(info.value).startswith(str(long))
    assert "cannot read config file: File name too long" in str(info.value)


def test_a_search_path_too_long_to_look_up_is_an_error_naming_it(home: Path) -> None:
    xdg = "/" + "x" * 5000
    with pytest.raises(ConfigError) as info:
        load(home, env={"XDG_CONFIG_HOME": xdg})
    assert info.value.path == Path(xdg) / "nexus" / "config.toml"
    assert "File name too long" in str(info.value)
