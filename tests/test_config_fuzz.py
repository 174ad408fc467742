"""Hostile config input: files, environment variables and overrides with values of any
type and size. Loading either succeeds with values that pass the documented validation or
raises ConfigError naming the file, variable or key: never another exception."""

from __future__ import annotations

import enum
import math
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
import tomlkit
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nexus_trio import Config, Context, KernelConfig, Message, agent, open_kernel
from nexus_trio._config import LOG_FORMATS, LOG_LEVELS, SECTIONS, WORKLOADS
from nexus_trio.config import ConfigError, LoadedConfig, load_config

from . import test_config

#: the fixture of test_config: cwd, HOME and /etc under tmp_path, no config file but the test's
home = test_config.home

INT64_MAX = 2**63 - 1

#: every key whose value is a number (integer or not), as "section.key"
NUMBER_KEYS = sorted(
    f"{section}.{field.name}"
    for section, cls in SECTIONS.items()
    for field in attrs.fields(cls)
    if field.type in (int, float, "int", "float")
)


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


def test_the_64_bit_bounds_are_toml_s_own_in_the_file_and_the_environment(home: Path) -> None:
    """TOML's integers are -2^63 to 2^63-1: both ends are read, one past either end is
    refused as beyond 64 bits (a top-level unknown key: no bound of a key's own applies)."""
    for inside in (INT64_MAX, -(2**63)):
        file = write(home / "c.toml", f"x = {inside}\n")
        assert load(home, file, allow_unknown=True).warnings
    for outside in (INT64_MAX + 1, -(2**63) - 1):
        file = write(home / "c.toml", f"x = {outside}\n")
        with pytest.raises(ConfigError) as info:
            load(home, file, allow_unknown=True)
        assert str(info.value) == (
            f"{file}:1: invalid TOML: x holds an integer beyond 64 bits"
            " (TOML integers are -2^63 to 2^63-1)"
        )
    name = "NEXUS_APP__AGENTS"
    with pytest.raises(ConfigError) as info:
        load(home, env={name: str(INT64_MAX + 1)})
    assert str(info.value) == (
        f"environment variable {name}: [app] agents holds an integer beyond 64 bits"
        " (TOML integers are -2^63 to 2^63-1)"
    )


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
        f"NEXUS_{dotted.replace('.', '__').upper()}": str(largest(dotted))
        for dotted in NUMBER_KEYS
        if dotted not in ("metrics.port", "metrics.group_port", "supervision.backoff_jitter")
    }
    # ([nats] server_lost_wait unset is heartbeat_interval x missed_heartbeats, here ~10**37 s,
    # which the rule across keys refuses: test_a_rule_across_keys_broken_...; a day here)
    env["NEXUS_NATS__SERVER_LOST_WAIT"] = "86400"
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


# --- the property: any file, environment and overrides ------------------------------------------


def _documented_rules() -> dict[str, str]:
    """``"section.key"`` -> the "valid" column of docs/config.md's key tables."""
    rules: dict[str, str] = {}
    section = None
    for line in (DOCS / "config.md").read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^### `\[(\w+)\]`", line)
        if heading:
            section = heading.group(1)
            continue
        row = re.match(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", line)
        if row and section in SECTIONS:
            rules[f"{section}.{row.group(1)}"] = row.group(2).strip()
    return rules


DOCS = Path(__file__).resolve().parent.parent / "docs"
RULES = _documented_rules()
KNOWN = {section: [field.name for field in attrs.fields(cls)] for section, cls in SECTIONS.items()}
APP_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _at_most(rule: str) -> tuple[str, float]:
    """A rule's ``", at most N"`` (the ``[durable]`` times JetStream takes) cut off, and N
    (inf if the rule says none)."""
    head, sep, most = rule.rpartition(", at most ")
    if not sep:
        return rule.removesuffix(","), math.inf
    return head, float(most.rstrip(","))


def largest(dotted: str) -> int:
    """The largest integer docs/config.md calls valid for number key ``dotted``."""
    rule, most = _at_most(RULES[dotted].removesuffix(" or unset"))
    span = re.fullmatch(r"integer (\d+)\.\.(\d+)", rule)
    if span:
        return int(span.group(2))
    return INT64_MAX if math.isinf(most) else int(most)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def documented_valid(dotted: str, value: Any) -> bool:
    """Whether docs/config.md's "valid" column accepts ``value`` for ``dotted`` (written
    from the docs, not from the code's validators)."""
    rule = RULES[dotted]
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, int) and not isinstance(value, bool) and value > INT64_MAX:
        return False  # TOML's integers are 64-bit (docs: "Integers are TOML's")
    if value is None:  # unset keys
        return rule in ("non-empty string", '`"package.module:attr"`') or rule.endswith(" or unset")
    rule, most = _at_most(rule.removesuffix(" or unset"))
    if rule == "subject token":
        return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_-]+", value) is not None
    if rule.startswith("integer >= "):
        return isinstance(value, int) and _is_number(value) and value >= int(rule.split()[-1])
    span = re.fullmatch(r"integer (\d+)\.\.(\d+)", rule)
    if span:
        low, high = int(span.group(1)), int(span.group(2))
        return isinstance(value, int) and _is_number(value) and low <= value <= high
    if rule.startswith((">= ", "> ")):
        op, bound = rule.split()
        if not _is_number(value):
            return False
        if not math.isfinite(value):
            return False  # docs: "Numbers are finite" (NaN fails the bound too)
        if value > most:
            return False
        return bool(value >= float(bound) if op == ">=" else value > float(bound))
    if rule == "0 to 1":
        return _is_number(value) and 0 <= value <= 1
    if rule in ("true or false", "`true`, `false`"):
        return isinstance(value, bool)
    if rule == "non-empty string":
        return isinstance(value, str) and bool(value.strip())
    if rule == "address or host name":
        return isinstance(value, str) and _is_address_or_host_name(value)
    if rule == '`"package.module:attr"`':
        return isinstance(value, str) and APP_REFERENCE.fullmatch(value) is not None
    if rule.startswith("list of non-empty strings"):
        if isinstance(value, str) and "or one string" in rule:
            return bool(value.strip())  # (one command written as a plain string)
        return isinstance(value, list) and all(isinstance(c, str) and c.strip() for c in value)
    choices = re.findall(r"`(\w+)`", rule)
    assert choices, f"a rule this test does not know: {dotted}: {rule}"
    if not isinstance(value, str):
        return False
    return (value.lower() if "any case" in rule else value) in choices


def _is_address_or_host_name(value: str) -> bool:
    """docs/config.md's "address or host name": an IP address (IPv6 also in brackets), or
    a name of labels of 1 to 63 characters (IDNA) without blanks, ``/``, ``:`` or brackets,
    of at most 253 characters as DNS spells it (without a trailing dot), and one that is not
    ASCII as IDNA 2008 takes it (``☃.net`` is not)."""
    import ipaddress

    import idna

    inner = value[1:-1] if value.startswith("[") and value.endswith("]") else None
    for text, family in ((value, None), (inner, ipaddress.IPv6Address)):
        try:
            address = ipaddress.ip_address(text) if text is not None else None
        except ValueError:
            continue
        if address is not None and (family is None or isinstance(address, family)):
            return True
    if not value.strip() or any(c.isspace() or c in "/:[]" for c in value):
        return False
    try:
        spelt = value.encode("idna")
        if not value.isascii():  # (as Trio, which listens on it, encodes it: IDNA 2008)
            idna.encode(value, uts46=True)
    except UnicodeError:
        return False
    return len(spelt.removesuffix(b".")) <= 253


#: docs/config.md's rules across keys ("Rules across keys"): the first key at least (or
#: above) the second; a rule of a key that is unset holds
CROSS_RULES = [
    ("durable.missing_agent_delay_max", "at least", "durable.missing_agent_delay"),
    ("durable.max_age", "at least", "durable.duplicate_window"),
    ("cluster.last_notice_wait", "above", "nats.server_lost_wait"),
]
_RULE_TEXT = re.compile(
    r"\[(\w+)\] (\w+) \(([^)]*)\) must be (at least|above) \[(\w+)\] (\w+) \(([^)]*)\)"
)


def _bracketed(dotted: str) -> str:
    section, key = dotted.split(".")
    return f"[{section}] {key}"


def rule_broken(relation: str, value: Any, bound: Any) -> bool:
    if value is None:
        return False
    return bool(value < bound if relation == "at least" else value <= bound)


#: docs/config.md: an unset last_notice_wait is server_lost_wait + 13, which must be above
#: it too (a server_lost_wait beyond ~10**17 s is refused: the float ignores the 13)
_TOO_LARGE = re.compile(r"\[nats\] server_lost_wait \(([^)]*)\) is too large: \[cluster\]")


def derived_wait_broken(lost_wait: float) -> bool:
    return not lost_wait + 13 > lost_wait


def broken_rules(values: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    def get(dotted: str) -> Any:
        section, key = dotted.split(".")
        value = values[section][key]
        if dotted == "nats.server_lost_wait" and value is None:
            # (docs/config.md: unset, it is [cluster] heartbeat_interval x missed_heartbeats)
            return float(
                values["cluster"]["heartbeat_interval"] * values["cluster"]["missed_heartbeats"]
            )
        return value

    broken = [rule for rule in CROSS_RULES if rule_broken(rule[1], get(rule[0]), get(rule[2]))]
    if get("cluster.last_notice_wait") is None and derived_wait_broken(
        get("nats.server_lost_wait")
    ):
        broken.append(("cluster.last_notice_wait", "derived", "nats.server_lost_wait"))
    return broken


def test_the_docs_state_the_rules_across_keys() -> None:
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    said = " ".join(text.split("**Rules across keys.**")[1].split("```")[0].split())
    for first, relation, second in CROSS_RULES:
        s1, k1 = first.split(".")
        s2, k2 = second.split(".")
        assert f"`[{s1}] {k1}`" in said or f"[{s1}] {k1}" in said.replace("`", ""), first
        assert f"{k1}` (when set) {relation} `[{s2}]" in said or (
            f"{k1}` {relation} `[{s2}]" in said
        ), (first, relation, second)
        assert f"[{s2}] {k2}" in said.replace("`", ""), second


def check_rule_error(
    error: ConfigError,
    file: Path,
    document: dict[str, Any],
    env: dict[str, str],
    overrides: dict[str, Any],
    allow_unknown: bool,
) -> None:
    """A rule across keys refused: every value was valid alone, the message names a
    documented rule and values that break it, and the error's place is where its key
    was set."""
    message = str(error)
    assert file_problems(document, allow_unknown) == set(), message
    found = _RULE_TEXT.search(message)
    if found:
        first, second = f"{found[1]}.{found[2]}", f"{found[5]}.{found[6]}"
        assert (first, found[4], second) in CROSS_RULES, message
        assert rule_broken(found[4], float(found[3]), float(found[7])), message
    else:
        too_large = _TOO_LARGE.search(message)
        assert too_large, message
        assert derived_wait_broken(float(too_large[1])), message
        first, second = "nats.server_lost_wait", "cluster.last_notice_wait"
    # (an unset [nats] server_lost_wait is the heartbeats': the rule names their keys too)
    heartbeats = ("cluster.heartbeat_interval", "cluster.missed_heartbeats")
    if "[nats] server_lost_wait is unset" in message:
        assert document.get("nats", {}).get("server_lost_wait") is None, message
        assert error.key in (first, second, *heartbeats), message
    else:
        assert error.key in (first, second), message
    section, key = error.key.split(".")
    variable = f"NEXUS_{section.upper()}__{key.upper()}"
    if error.origin == f"override {error.key}":
        assert overrides.get(error.key) is not None, message
    elif error.origin == f"environment variable {variable}":
        assert variable in env, message
    else:
        assert error.path == file and message.startswith(f"{file}:"), message
        assert key in document.get(section, {}), message


def test_the_oracle_knows_every_key_and_agrees_with_the_defaults() -> None:
    assert set(RULES) == {f"{s}.{k}" for s, keys in KNOWN.items() for k in keys}
    defaults = attrs.asdict(Config(), recurse=True)
    for dotted in RULES:
        section, key = dotted.split(".")
        assert documented_valid(dotted, defaults[section][key]), dotted


SPECIAL_INTS = st.sampled_from([0, 1, -1, 2, 65535, 65536, INT64_MAX, INT64_MAX + 1, -(2**63)])
SPECIAL_FLOATS = st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, -1.5, 1e308, math.inf, -math.inf])
NAMES = st.sampled_from(
    [
        *LOG_LEVELS,
        *LOG_FORMATS,
        *WORKLOADS,
        "block",
        "reject",
        "drop_oldest",
        "one_for_all",
        "INFO",
        "Warn",
        "pkg.mod:attr",
        "nocolon",
        "python a.py",
        "nats://h:4222",
        " ",
        "",
    ]
)
SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    SPECIAL_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    SPECIAL_FLOATS,
    st.booleans(),
    st.text(max_size=8),
    NAMES,
    st.just(16**3000),  # more digits than Python prints
    st.dates(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "x", "mailbox_capacity"]), inner, max_size=2),
    ),
    max_leaves=6,
)
KEY_NAMES = st.one_of(
    st.sampled_from(sorted({k for keys in KNOWN.values() for k in keys})),
    st.sampled_from(["mailbox_capacty", "Port", "unknown", "a.b", "", "x y", "ü"]),
)
SECTION_NAMES = st.one_of(*[st.sampled_from(list(SECTIONS))] * 6, st.sampled_from(["kernal", ""]))


def valid_for(dotted: str) -> st.SearchStrategy[Any]:
    """Values docs/config.md calls valid for ``dotted`` (most drawn values are: so that a
    load gets past the file to the environment and the overrides)."""
    rule, most = _at_most(RULES[dotted].removesuffix(" or unset"))
    if rule == "subject token":
        return st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True)
    if rule.startswith("integer >= "):
        return st.integers(int(rule.split()[-1]), INT64_MAX)
    span = re.fullmatch(r"integer (\d+)\.\.(\d+)", rule)
    if span:
        return st.integers(int(span.group(1)), int(span.group(2)))
    if rule.startswith((">= ", "> ")):
        low = float(rule.split()[1])
        floats = st.floats(
            min_value=low,
            max_value=most,
            exclude_min=rule.startswith("> "),
            allow_nan=False,
            allow_infinity=False,
        )
        return st.one_of(floats, st.integers(int(low) + 1, largest(dotted)))
    if rule == "0 to 1":
        return st.floats(0, 1)
    if rule in ("true or false", "`true`, `false`"):
        return st.booleans()
    if rule == "non-empty string":
        return st.text(min_size=1, max_size=8).filter(str.strip)
    if rule == "address or host name":
        return st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "[::1]", "::", "localhost"])
    if rule == '`"package.module:attr"`':
        return st.sampled_from(["pkg.mod:attr", "a:b.c"])
    if rule.startswith("list of non-empty strings"):
        return st.lists(st.sampled_from(["python a.py", "x"]), max_size=2)
    return st.sampled_from(re.findall(r"`(\w+)`", rule))


def mostly_valid(dotted: str | None) -> st.SearchStrategy[Any]:
    if dotted not in RULES:
        return VALUES
    return st.one_of(*[valid_for(dotted)] * 12, VALUES)  # one in 13 is anything at all


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for section in draw(st.lists(SECTION_NAMES, max_size=4, unique=True)):
        shape = draw(st.sampled_from(["table"] * 12 + ["value", "array_of_tables"]))
        if shape == "value":  # wrong nesting: `kernel = 5`
            document[section] = draw(VALUES)
            continue
        keys = KNOWN.get(section) or ["x"]
        names = st.one_of(*[st.sampled_from(keys)] * 8, KEY_NAMES)
        table = {
            key: draw(mostly_valid(f"{section}.{key}"))
            for key in draw(st.lists(names, max_size=4, unique=True))
        }
        document[section] = table if shape == "table" else [table]
    if draw(st.integers(0, 9)) == 0:  # a key at the top, outside any table
        document.setdefault(draw(KEY_NAMES), draw(SCALARS))
    return document


def env_text(value: Any) -> str:
    try:
        return str(tomlkit.item(value).as_string())
    except (ValueError, TypeError):  # (what tomlkit cannot write, e.g. 16**3000)
        return repr(value)


def env_names_and_values(draw: st.DrawFn) -> dict[str, str]:
    env: dict[str, str] = {}
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.integers(0, 9)) == 0:
            name = draw(st.sampled_from(["NEXUS_KERNEL__NOPE", "NEXUS_NOPE__X", "NEXUS_KERNEL__"]))
            env[name] = draw(st.text(max_size=4))
            continue
        dotted = draw(st.sampled_from(sorted(RULES)))
        name = "NEXUS_{}__{}".format(*dotted.upper().split("."))
        env[name] = draw(
            st.one_of(
                *[mostly_valid(dotted).map(env_text)] * 4,
                st.text(max_size=10),
                NAMES,
                st.just("NEXUS_IGNORED_X"),
            )
        )
    return env


ENVS = st.composite(env_names_and_values)()
OVERRIDES = st.dictionaries(
    st.one_of(*[st.sampled_from(sorted(RULES))] * 10, st.sampled_from(["kernel.nope", "x"])),
    st.one_of(st.none(), st.sampled_from(sorted(RULES)).flatmap(mostly_valid), VALUES),
    max_size=2,
)


def file_problems(document: dict[str, Any], allow_unknown: bool) -> set[str | None]:
    """What in ``document`` the docs call wrong: the keys (or sections) with an invalid value;
    None stands for unknown names, wrong only without allow_unknown."""

    def unknown(name: str, value: Any) -> set[str | None]:
        wrong: set[str | None] = set() if allow_unknown else {None}
        return wrong | ({name} if _holds_huge(value) else set())

    problems: set[str | None] = set()
    for section, table in document.items():
        if section not in SECTIONS:
            problems |= unknown(section, table)
        elif not isinstance(table, dict):
            problems.add(section)
        else:
            for key, value in table.items():
                dotted = f"{section}.{key}"
                if key not in KNOWN[section]:
                    problems |= unknown(dotted, value)
                elif not documented_valid(dotted, value):
                    problems.add(dotted)
    return problems


def _holds_huge(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_holds_huge(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_huge(v) for v in value)
    return isinstance(value, int) and not -(2**63) <= value <= INT64_MAX


def check_error(
    error: ConfigError,
    file: Path,
    document: dict[str, Any],
    env: dict[str, str],
    overrides: dict[str, Any],
    allow_unknown: bool,
    *,
    alone: bool = True,
) -> None:
    """A ConfigError names what was wrong, and that was wrong by the docs; one of several
    problems said at once (not ``alone``) too, though others came before it."""
    message, origin = str(error), error.origin or ""
    problems = file_problems(document, allow_unknown)
    if origin.startswith("override "):
        assert origin == f"override {error.key}", message
        assert error.key in overrides, message
        value = overrides[error.key]
        assert error.key not in RULES or not documented_valid(error.key, value), message
        assert problems <= {None}, message  # a bad file value would have been reported first
    elif origin.startswith("environment variable "):
        name = origin.removeprefix("environment variable ")
        assert name in env, message
        section, key = name.removeprefix("NEXUS_").lower().split("__", 1)
        assert error.key == f"{section}.{key}", message
        assert message.startswith(f"{origin}: [{section}] {key} "), message
        assert not alone or problems <= {None}, message
    elif error.key is None:
        assert error.path == file and not origin, message
        if "invalid TOML" in message:  # an integer beyond 64 bits outside the known keys
            assert message.startswith(f"{file}"), message
        else:  # several problems (bad values, unknown names) of the file and the environment
            lines = message.split("\n")
            advised = "NEXUS_ALLOW_UNKNOWN=1" in lines[-1]
            said = lines[:-1] if advised else lines
            bad = [str(problem) for problem in error.problems]
            unknown = [line for line in said if line not in bad]
            assert len(bad) + len(unknown) == len(said) and len(said) >= 1 + (not unknown)
            assert advised == bool(unknown) and not (unknown and allow_unknown), message
            assert all("unknown" in line for line in unknown), message
            assert all(line.startswith((str(file), "environment variable NEXUS_")) for line in said)
            for problem in error.problems:
                assert problem.key is not None, message
                check_error(problem, file, document, env, overrides, allow_unknown, alone=False)
    else:  # from the file: its path, line if found, and a key or table the docs call wrong
        assert error.path == file and not origin, message
        assert message.startswith(f"{file}:"), message
        assert error.key in problems, (message, problems)
        section, _, key = error.key.partition(".")
        assert f"[{section}]" in message and key in message, message


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    document=documents(),
    env=ENVS,
    overrides=OVERRIDES,
    allow_unknown=st.booleans(),
)
def test_any_config_loads_valid_values_or_raises_a_config_error_naming_the_key(
    home: Path,
    document: dict[str, Any],
    env: dict[str, str],
    overrides: dict[str, Any],
    allow_unknown: bool,
) -> None:
    try:
        text = tomlkit.dumps(document)
    except (ValueError, TypeError):  # (16**3000 at the top level: tomlkit cannot write it)
        document = {k: 16**3000 for k in document if re.fullmatch(r"\w+", k)}
        text = "".join(f"{k} = 0x{'f' * 3000}\n" for k in document)
    file = write(home / "cwd" / "config.toml", text)
    try:
        loaded = load(home, file, env=env, overrides=overrides, allow_unknown=allow_unknown)
    except ConfigError as error:
        if _RULE_TEXT.search(str(error)) or _TOO_LARGE.search(str(error)):
            check_rule_error(error, file, document, env, overrides, allow_unknown)
            event("refused: a rule across keys")
            return
        check_error(error, file, document, env, overrides, allow_unknown)
        event(f"refused: {(error.origin or 'file').split(' ')[0]}, key {error.key is not None}")
        return
    event("loaded")
    # loaded: every effective value is one the docs call valid, from the layer that set it
    assert file_problems(document, allow_unknown) == set()
    values = attrs.asdict(loaded.config, recurse=True)
    assert broken_rules(values) == []
    for dotted in RULES:
        section, key = dotted.split(".")
        value = values[section][key]
        assert documented_valid(dotted, value), (dotted, value)
        variable = f"NEXUS_{section.upper()}__{key.upper()}"
        table = document.get(section)
        if overrides.get(dotted) is not None:
            assert loaded.sources[dotted] == "cli"
        elif variable in env:
            assert loaded.sources[dotted] == f"env {variable}"
        elif isinstance(table, dict) and key in table:
            assert loaded.sources[dotted] == f"file {file}"
            written = [table[key]] if key == "spawn" and isinstance(table[key], str) else table[key]
            shown = value.value if isinstance(value, enum.Enum) else value
            assert shown == written, dotted
        else:
            assert loaded.sources[dotted] == "default"


TOML_ISH = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40),
    st.text(alphabet="[]{}=\"'.,#\n\t =-+_:0123456789eafinxkernlpsu\\\r\x00\xe9", max_size=80),
    st.lists(
        st.sampled_from(
            [
                *["[kernel]", "[[app]]", "mailbox_capacity = 1", "x = ", '"a" = 1', "kernel.x = {"],
                *["]", "key = 'unterminated", "a = [1, 'b']", "batch_size = 1", "batch_size = 2"],
                "\ufeff",
            ]
        ),
        max_size=5,
    ).map("\n".join),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=TOML_ISH)
def test_any_file_content_loads_or_raises_a_config_error_naming_the_file(
    home: Path, content: str | bytes
) -> None:
    file = write(home / "cwd" / "config.toml", content)
    refused: ConfigError | None = None
    try:
        load(home, file, allow_unknown=True)
    except ConfigError as error:
        refused = error
    event("loaded" if refused is None else "refused")
    if refused is not None:
        assert refused.path == file
        assert str(refused).startswith(f"{file}:"), str(refused)


def test_files_that_cannot_be_config_files_are_errors_naming_them(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = home / "cwd" / "a-directory.toml"
    directory.mkdir()
    not_utf8 = write(home / "cwd" / "latin1.toml", "[app]\nspawn = 'caf\xe9'\n".encode("latin-1"))
    not_toml = write(home / "cwd" / "yaml.toml", "kernel:\n  mailbox_capacity: 4\n")
    unreadable = write(home / "cwd" / "secret.toml", "[kernel]\n")
    expected = {
        directory: "config path is not a file",
        not_utf8: "not UTF-8 text",
        not_toml: "invalid TOML",
        unreadable: "cannot read config file: Permission denied",
        home / "cwd" / "missing.toml": "config file not found",
    }
    real_open = Path.open

    def opening(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == unreadable:  # (chmod 000 does not stop root, who may run the tests)
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    # (Path.open: the loader reads the file through it, as Path.read_text did)
    monkeypatch.setattr(Path, "open", opening)
    for path, reason in expected.items():
        with pytest.raises(ConfigError) as info:
            load(home, path)
        assert info.value.path == path
        assert str(info.value).startswith(f"{path}") and reason in str(info.value), str(info.value)
