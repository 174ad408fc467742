"""Loading the configuration: TOML file, environment, command-line overrides.

A :class:`~nexus_trio.Config` is built in layers, each overriding the one before:
embedded defaults < the config file < ``NEXUS_SECTION__KEY`` environment variables <
overrides from the command line. The file is ``--config FILE`` when given, else the first
of :func:`search_paths` that exists. Every value is validated in its own layer, so an
error names where the bad value came from: the file and line, the environment variable,
or the override. A file that exists but is broken is an error, never skipped; so is an
unknown key or section (with a "did you mean"), unless unknown names are allowed
(``allow_unknown=True`` or ``NEXUS_ALLOW_UNKNOWN=1``), when they are only warnings. A
config can start programs (``[app] spawn``), so a file that others could have written
(group- or world-writable, or owned by another user than you or root) is refused, as ssh
refuses such files. :class:`LoadedConfig` remembers where each effective value came from,
which :func:`render_effective` prints.

<!-- PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing) -->
"""

from __future__ import annotations

import ast
import errno
import logging
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import cattrs
import tomlkit
import tomlkit.exceptions

from ._config import (
    SECTIONS,
    Config,
    CrossKeyError,
    config_warnings,
    cut,
    cut_name,
    derived_when_unset,
    mark_said_by_a_load,
    shown,
    shown_path,
    values_as_toml,
)
from ._errors import NexusError, nearest

__all__ = [
    "ALLOW_UNKNOWN_ENV",
    "ConfigError",
    "LoadedConfig",
    "check_file_permissions",
    "load_config",
    "render_effective",
    "render_template",
    "search_paths",
    "write_template",
]

log = logging.getLogger("nexus_trio.config")

ENV_PREFIX = "NEXUS_"
#: Set to 1 (or true/yes/on) to make unknown config keys warnings instead of errors.
ALLOW_UNKNOWN_ENV = "NEXUS_ALLOW_UNKNOWN"
SYSTEM_CONFIG = Path("/etc/nexus/config.toml")

# Python values of a Config, enums as their TOML strings (the wire form of the file).
_converter = cattrs.Converter()


class ConfigError(NexusError, ValueError):
    """A configuration value, file or override is invalid.

    ``str(err)`` names where the problem is: ``path:line: message`` for a file (with the
    column for TOML syntax errors), ``environment variable NAME: message``, or
    ``override section.key: message``. The parts are also attributes: ``path``,
    ``line``, ``column``, ``key`` (``"section.key"``) and ``origin``.

    A file or an environment with several problems (bad values, unknown names) raises one
    error for all of them, one line each in the order found, so that one run shows every
    fix to make: its ``problems`` are the bad values, each a ``ConfigError`` of its own
    with its place and key (``(self,)`` for an error of one bad value alone). Unknown
    names are lines of the message only: an error that found nothing else has
    ``problems == ()``.
    """

    problems: tuple[ConfigError, ...]

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        line: int | None = None,
        column: int | None = None,
        key: str | None = None,
        origin: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.column = column
        self.key = key
        self.origin = origin
        self.problems = (self,)
        if path is not None:
            where = shown_path(path)
            if line is not None:
                where += f":{line}"
                if column is not None:
                    where += f":{column}"
            text = f"{where}: {message}"
        elif origin is not None:
            text = f"{origin}: {message}"
        else:
            text = message
        super().__init__(text)


@attrs.frozen
class LoadedConfig:
    """A config together with where it came from.

    ``sources`` maps every ``"section.key"`` to ``"default"``, ``"file /abs/config.toml"``,
    ``"env NEXUS_SECTION__KEY"`` or ``"cli"``; ``warnings`` are the unknown keys found
    (each was also logged to the ``nexus_trio.config`` logger).
    """

    config: Config
    path: Path | None
    sources: Mapping[str, str]
    warnings: tuple[str, ...] = ()
    #: True when ``path`` was given (``--config``), False when it was found in the search path
    explicit: bool = False

    def describe_source(self) -> str:
        """One line saying which config file was loaded and how it was found (for startup logs)."""
        if self.path is None:
            return "no config file loaded (defaults and environment only)"
        how = "given with --config" if self.explicit else "found in the search path"
        return f"loaded config file {self.path} ({how})"


def search_paths(*, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> list[Path]:
    """Where a config file is looked for, in order, when none is given.

    ``./config.toml`` (relative to ``cwd``), ``$XDG_CONFIG_HOME/nexus/config.toml``
    (``~/.config`` when ``XDG_CONFIG_HOME`` is unset, empty or relative, as the XDG spec
    says), ``/etc/nexus/config.toml``.
    """
    env = os.environ if env is None else env
    base = Path.cwd() if cwd is None else Path(cwd)
    xdg = env.get("XDG_CONFIG_HOME", "")
    if xdg and Path(xdg).is_absolute():
        config_home = Path(xdg)
    else:
        home = env.get("HOME")
        config_home = (Path(home) if home else Path.home()) / ".config"
    return [base / "config.toml", config_home / "nexus" / "config.toml", SYSTEM_CONFIG]


# --- the schema --------------------------------------------------------------------------------


def _fields(section: str) -> dict[str, attrs.Attribute[Any]]:
    return {field.name: field for field in attrs.fields(SECTIONS[section])}


def _unknown_key_text(section: str, key: str) -> str:
    # A key of another section first (docs/distributed.md listed [nats] server_lost_wait
    # among the [cluster] options: written there it was refused with "did you mean
    # forget_lost_after?"), as a top-level key names its section.
    owners = [other for other in SECTIONS if other != section and key in _fields(other)]
    known = list(_fields(section))
    match = nearest(key, known)
    if owners:
        hint = f"it is a key of [{owners[0]}]: did you mean [{owners[0]}] {key}?"
    else:
        hint = f"did you mean {match}?" if match else f"known keys: {', '.join(known)}"
    return f"unknown key [{section}] {cut_name(key)} ({hint})"


def _unknown_section_text(section: str) -> str:
    match = nearest(section, SECTIONS)
    hint = f"did you mean [{match}]?" if match else f"known sections: {', '.join(SECTIONS)}"
    return f"unknown section [{cut_name(section)}] ({hint})"


def _unknown_top_level_text(key: str) -> str:
    owners = [section for section in SECTIONS if key in _fields(section)]
    if owners:
        hint = f"did you mean [{owners[0]}] {key}?"  # (a known key: short)
    else:
        match = nearest(key, SECTIONS)
        hint = f"did you mean [{match}]?" if match else f"known sections: {', '.join(SECTIONS)}"
    return f"unknown top-level key {cut_name(key)} ({hint})"


def _check_value(section: str, key: str, value: Any, *, toml: bool = True) -> Any:
    """Validate one value alone; return it converted (e.g. a string to an enum member).
    ``toml``: it was read from TOML (a file, a variable), and a bad one is shown so."""
    try:
        if not toml:
            return getattr(SECTIONS[section](**{key: value}), key)
        with values_as_toml():
            table = SECTIONS[section](**{key: value})
    except CrossKeyError:
        # valid alone (a table's validators run before its rules across keys, which are
        # checked on the whole table: load_config); no key of such a table converts
        return value
    return getattr(table, key)


# --- locating keys in the file text ------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _bare(name: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in name.split("."))


def _key_lines(text: str, section: str | None, key: str) -> list[int]:
    """1-based lines where ``key =`` is set inside ``[section]`` (or ``section.key =`` at top).

    tomlkit does not keep line numbers, so we scan the text; good enough for files people
    write, and when a key is not found the error just has no line.
    """
    key_pattern = re.compile(rf"^\s*([\"']?){re.escape(key)}\1\s*=")
    dotted = (
        re.compile(rf"^\s*([\"']?){re.escape(section)}\1\s*\.\s*([\"']?){re.escape(key)}\2\s*=")
        if section
        else None
    )
    inline = (
        re.compile(rf"^\s*([\"']?){re.escape(section)}\1\s*=\s*\{{.*\b{re.escape(key)}\s*=")
        if section
        else None
    )
    current: str | None = None
    found: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            current = _bare(header.group(1))
            continue
        in_section = current == section and key_pattern.match(line)
        at_top = current is None and (
            (dotted is not None and dotted.match(line))
            or (inline is not None and inline.match(line))
        )
        if in_section or at_top:
            found.append(number)
    return found


def _section_line(text: str, section: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header and _bare(header.group(1)) == section:
            return number
    lines = _key_lines(text, None, section)
    return lines[0] if lines else None


def _first(lines: list[int]) -> int | None:
    return lines[0] if lines else None


# --- who may have written the file ------------------------------------------------------------


def _owner_name(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_file_permissions(path: Path) -> None:
    """Refuse a config file that someone other than you or root could have written.

    A config can start programs (``[app] spawn``) and open ports, so, as ssh does with its
    config files, a file that is writable by its group or by others, or that is owned by
    another user than the current one or root, raises :class:`ConfigError` naming the
    file, its mode and its owner. Does nothing where there are no POSIX owners (Windows).
    """
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None:
        return
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", path=path) from None
    me = geteuid()
    mode = f"mode {stat.filemode(info.st_mode)} ({stat.S_IMODE(info.st_mode):04o})"
    owner = _owner_name(info.st_uid)
    if info.st_uid not in (0, me):
        raise ConfigError(
            f"refusing to load a config file owned by another user: owner {owner}, {mode}; "
            f"it could start programs as you ([app] spawn). It must be owned by you, "
            f"{_owner_name(me)}, or by root",
            path=path,
        )
    writable_by = [
        who
        for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH))
        if info.st_mode & bit
    ]
    if writable_by:
        raise ConfigError(
            f"refusing to load a config file writable by {' and '.join(writable_by)}: "
            f"{mode}, owner {owner}; anyone who can write it could start programs as you "
            f"([app] spawn). Fix it with: chmod go-w {shown_path(path)}",
            path=path,
        )


def _in_file(path: Path, line: int | None, message: str) -> str:
    """``message`` of a place of the file ``path`` (``path:line: message``), as
    :class:`ConfigError` writes one."""
    return f"{shown_path(path)}:{line}: {message}" if line else f"{shown_path(path)}: {message}"


#: what a true/false variable takes, as its errors say it
_ENV_BOOLEAN_WORDS = "a variable also takes 1, yes, on or 0, no, off, in any case"


def _env_boolean(raw: str) -> bool | None:
    """The boolean a variable's text means: 1, true, yes, on (0, false, no, off), in any
    case and with spaces around; None for any other text."""
    word = raw.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    return None


def _allow_unknown_from_env(env: Mapping[str, str]) -> bool:
    raw = env.get(ALLOW_UNKNOWN_ENV, "")
    allow = _env_boolean(raw) if raw.strip() else False
    if allow is not None:
        return allow
    raise ConfigError(
        f"must be 1, true, yes or on (or 0, false, no, off), got {cut(env[ALLOW_UNKNOWN_ENV], repr)}",
        origin=f"environment variable {ALLOW_UNKNOWN_ENV}",
    )


@attrs.define
class _Findings:
    """What the file and environment layers found wrong, in the order found: bad values
    (each a ConfigError) and unknown names (each a line saying where, errors unless
    unknown names are allowed), so that one error can say all of them."""

    problems: list[ConfigError] = attrs.Factory(list)
    unknown: list[str] = attrs.Factory(list)
    #: both, in the order found: a ConfigError, or an index into ``unknown``
    order: list[ConfigError | int] = attrs.Factory(list)

    def bad_value(self, error: ConfigError) -> None:
        self.problems.append(error)
        self.order.append(error)

    def unknown_name(self, text: str) -> None:
        self.order.append(len(self.unknown))
        self.unknown.append(text)

    def error(self, file: Path | None, *, allow_unknown: bool) -> ConfigError | None:
        """None if nothing is wrong; the one bad value's own error if that is all; else
        one error listing every problem, a line each, the first one first."""
        unknown = [] if allow_unknown else self.unknown
        if not unknown and len(self.problems) <= 1:
            return self.problems[0] if self.problems else None
        lines = [
            str(entry) if isinstance(entry, ConfigError) else self.unknown[entry]
            for entry in self.order
            if isinstance(entry, ConfigError) or unknown
        ]
        if unknown:
            lines.append(
                f"(a misspelt key would silently keep its default; to only warn about unknown "
                f"names, set {ALLOW_UNKNOWN_ENV}=1)"
            )
        error = ConfigError("\n".join(lines))
        error.path = file  # each entry already names its file:line or variable, so not in the text
        error.problems = tuple(self.problems)
        return error


# --- the layers --------------------------------------------------------------------------------

_Values = dict[str, dict[str, Any]]


def _toml_problem(exc: tomlkit.exceptions.ParseError, text: str) -> str:
    """What is wrong at ``exc``'s place in ``text``, in the terms of the file's lines
    (a table header, a key, its value) where tomlkit says the character it did not expect
    (``Unexpected character: '\\n'``); tomlkit's own words, escaped, for the others."""
    said = re.sub(r" at line \d+ col \d+$", "", str(exc))
    lines = text.splitlines()
    raw = lines[exc.line - 1] if 0 < exc.line <= len(lines) else ""
    line = raw.strip()
    key, equals, value = (part.strip() for part in line.partition("="))
    header = line.startswith("[")  # (no key starts so: a table header)
    # (where the value starts: an unexpected character there is the value's own)
    value_at = len(raw) - len(raw.partition("=")[2].lstrip())
    # (tomlkit keeps the character only in its message: "Unexpected character: '\\n'")
    shown = re.fullmatch(r"Unexpected character: (.+)", said)
    unexpected = ast.literal_eval(shown.group(1)) if shown else None
    if isinstance(exc, tomlkit.exceptions.InvalidControlChar) and "\\u000a" in said:
        return (
            "a string is not closed on its line: \"...\" and '...' end on the line they start"
            ' ("""...""" holds text over several lines)'
        )
    if text.startswith("\ufeff") and exc.line == 1:  # (Notepad's "UTF-8 with BOM")
        return (
            "the file starts with a byte order mark (U+FEFF), which TOML does not allow:"
            " save it as UTF-8 without BOM"
        )
    if "\x00" in raw:  # (tomlkit's mark of the file's end: read as one, inside it)
        return "a NUL character (\\x00) on this line: TOML allows none in a file"
    if unexpected == "\x00":
        return "the file ends inside a list [...] or an inline table {...} that is not closed"
    # (what is open where the line starts, and at the error: a line of a value written
    # over several lines is no key and no table header, whatever it looks like)
    starts = _line_start(text, exc.line)
    opened = _open_at(text, starts)
    if unexpected is not None and opened and opened[-1][0] == "string":
        return (
            f"`{unexpected}` after the string opened on line {opened[-1][1]}: one value per"
            " line, nothing but a comment after it"
        )
    if unexpected is not None and opened:
        return (
            f"`{unexpected}` in the list or inline table opened on line {opened[-1][1]}: its"
            " items are TOML values (strings in quotes) separated by commas"
        )
    if header and unexpected is not None:
        close = "]]" if line.startswith("[[") else "]"
        if close not in line:
            return f"a table header `{line}` must end with `{close}` on its line"
        return (
            f"a table header `{line}` has `{unexpected}` after its `{close}`: nothing but"
            " a comment may follow it on its line"
        )
    if unexpected is not None and not equals:
        return f"`{line}` is a key without a value: write `{line} = value` (a string in quotes)"
    if unexpected == "\n" and not value:
        return f"`{key}` has no value after `=`"
    if unexpected == "\n" or (unexpected is not None and exc.col <= value_at):
        return (
            f"`{value}` (the value of `{key}`) is no TOML value: a string is written in"
            f' quotes ("{value}"), true and false in lower case'
        )
    if unexpected is not None and _open_at(text, starts + exc.col):
        return (
            f"`{unexpected}` in the value of `{key}`, `{value}`: a list's or inline"
            " table's items are TOML values (strings in quotes) separated by commas"
        )
    if unexpected is not None and value:
        return (
            f"`{unexpected}` after the value of `{key}`: one value per line, nothing but a"
            " comment after it (several values are a list: [1, 2])"
        )
    if isinstance(exc, tomlkit.exceptions.InvalidControlChar):
        code = re.search(r"use (\\u[0-9a-f]{4})", said)
        where = (
            "a comment" if "comments" in said else "a string" if "strings" in said else "the file"
        )
        escape = code.group(1) if code else "\\uXXXX"
        return (
            f"a control character ({escape.replace(chr(92) + 'u', 'U+').upper()}) in {where}:"
            f" TOML allows none there but a tab (in a string, write it as {escape})"
        )
    if isinstance(exc, tomlkit.exceptions.InvalidCharInStringError) and "\\" in raw:
        escape = raw[exc.col - 1 : exc.col + 1]
        return (
            f"`{escape}` in a string is no escape: a"
            ' backslash starts one of \\b \\t \\n \\f \\r \\" \\\\ \\uXXXX \\UXXXXXXXX (a'
            " backslash itself is \\\\, or write the string in '...', where \\ is itself)"
        )
    if isinstance(exc, tomlkit.exceptions.InvalidUnicodeValueError):
        escape = raw[exc.col - 1 : exc.col + 9].split('"')[0].split("'")[0]
        return (
            f"`{escape}` is no unicode escape: \\u takes 4 hexadecimal digits, \\U 8, of a"
            " character's code point (not D800 to DFFF)"
        )
    at_end = _open_at(f"{text} ", len(text))  # (what is open at the end of the file)
    if isinstance(exc, tomlkit.exceptions.UnexpectedEofError) and at_end:
        return (
            f"the file ends inside the string opened on line {at_end[-1][1]}: it is not"
            " closed (\"\"\" or ''' closes a string over several lines)"
        )
    for kind, shape in _DATE_SHAPES.items():
        if isinstance(exc, kind):
            return f"`{value}` (the value of `{key}`) is no valid {shape}"
    if said.startswith("Invalid key "):
        return (
            f"`{key}` is no key: a bare key is letters, digits, `-` and `_` (quote any"
            f' other: "{key}" = ...)'
        )
    if isinstance(exc, tomlkit.exceptions.EmptyKeyError):
        return f"a key is empty (nothing before `=`, or between two dots) in `{line}`"
    if isinstance(exc, tomlkit.exceptions.EmptyTableNameError):
        return f"the table header `{line}` names no table (a name between its dots)"
    if isinstance(exc, tomlkit.exceptions.InvalidNumberError):
        return f"`{value}` (the value of `{key}`) is no valid number"
    return said.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


#: what tomlkit's errors of a date or time value say it should be
_DATE_SHAPES: Final[dict[type[tomlkit.exceptions.ParseError], str]] = {
    tomlkit.exceptions.InvalidDateError: "date (YYYY-MM-DD, a day of that month)",
    tomlkit.exceptions.InvalidTimeError: "time (HH:MM:SS, hours to 23, minutes and seconds to 59)",
    tomlkit.exceptions.InvalidDateTimeError: (
        "date and time (YYYY-MM-DDTHH:MM:SS, then Z or an offset +HH:MM, or neither)"
    ),
    tomlkit.exceptions.InvalidNumberOrDateError: "number or date",
}

#: tomlkit's words for a name defined twice (a key, a table), raised with or without a place
_DEFINED_TWICE = re.compile(r'Key "(.*)" already exists\.|Redefinition of an existing table')


def _parts(name: str) -> tuple[str, ...]:
    return tuple(_bare(name).split("."))


def _shown(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _defined_twice(text: str) -> tuple[int, int, str] | None:
    """The first name ``text`` defines twice, as ``(line, column, what)``: a key given
    twice in a table, a table header given twice, a name that is a value in one place
    and a table in another. tomlkit says ``Key "kernel" already exists.`` for all of
    them, at the place where it noticed (for a table header: its last key's line), or at
    no place (an inline table's key). A line-based scan, as :func:`_key_lines`: None
    where it finds nothing (the error then says tomlkit's words)."""
    defined: dict[tuple[str, ...], tuple[str, int]] = {}
    current: tuple[str, ...] = ()
    start = 0
    for number, raw in enumerate(text.split("\n"), start=1):
        at, start = start, start + len(raw) + 1
        line = raw.strip()
        if not line or line.startswith("#") or _open_at(text, at):
            continue  # (a line inside a value written over several lines)
        column = len(raw) - len(raw.lstrip()) + 1
        header = _HEADER.match(raw)
        if header:
            path = _parts(header.group(1))
            listed = line.startswith("[[")
            shown = f"[[{_shown(path)}]]" if listed else f"[{_shown(path)}]"
            for size in range(1, len(path)):
                kind, first = defined.setdefault(path[:size], ("super", number))
                if kind == "value":
                    return (
                        number,
                        column,
                        (
                            f"{shown} makes `{_shown(path[:size])}` a table, but it is a key"
                            f" with a value on line {first}"
                        ),
                    )
            kind, first = defined.get(path, ("", 0))
            if listed and kind in ("", "list"):
                for sub in [sub for sub in defined if sub[: len(path)] == path != sub]:
                    del defined[sub]  # (a new table of the list: its keys anew)
            elif listed and kind:
                return (
                    number,
                    column,
                    (
                        f"{shown} names the table [{_shown(path)}] of line {first}: a name is"
                        " either a table or a list of tables"
                    ),
                )
            elif kind == "table":
                return (
                    number,
                    column,
                    (
                        f"the table {shown} is given twice, on line {first} and here: a table's"
                        " keys go under one header"
                    ),
                )
            elif kind == "dotted":
                return (
                    number,
                    column,
                    (
                        f"the table {shown} is already made by the dotted keys of line {first}"
                        f" (`{_shown(path[-1:])}.x = ...`): set its keys there, or only here"
                    ),
                )
            elif kind == "value":
                return (
                    number,
                    column,
                    (
                        f"{shown} makes `{_shown(path)}` a table, but it is a key with a value"
                        f" on line {first}"
                    ),
                )
            elif kind == "list":
                return (
                    number,
                    column,
                    (
                        f"{shown} names the list of tables [[{_shown(path)}]] of line {first}: a"
                        " name is either a table or a list of tables"
                    ),
                )
            defined[path] = ("list" if listed else "table", number)
            current = path
            continue
        name, equals, value = raw.partition("=")
        if not equals:
            continue
        keys = _parts(name)
        where = f" of [{_shown(current)}]" if current else ""
        for size in range(1, len(keys)):
            kind, first = defined.setdefault((*current, *keys[:size]), ("dotted", number))
            if kind == "value":
                return (
                    number,
                    column,
                    (
                        f"the dotted key `{_shown(keys)}`{where} makes `{_shown(keys[:size])}` a"
                        f" table, but it is a key with a value on line {first}"
                    ),
                )
        full = (*current, *keys)
        if full in defined:
            kind, first = defined[full]
            said = "given" if kind == "value" else "a table"
            return (
                number,
                column,
                (
                    f"the key `{_shown(keys)}`{where} is given twice, on line {first} and here"
                    if kind == "value"
                    else f"the key `{_shown(keys)}`{where} names the table made on line {first}:"
                    f" a name is either a key with a value or a table ({said})"
                ),
            )
        defined[full] = ("value", number)
        inline = re.findall(r"[{,]\s*([\w\"'.-]+)\s*=", value) if "{" in value else []
        seen: set[str] = set()
        for item in inline:
            if _bare(item) in seen:
                found = raw.find(item, raw.find(item, len(name) + 1) + len(item))
                return (
                    number,
                    found + 1,
                    (
                        f"the key `{_bare(item)}` is given twice in the inline table of"
                        f" `{_shown(keys)}`{where}"
                    ),
                )
            seen.add(_bare(item))
    return None


def _line_start(text: str, line: int) -> int:
    """The index in ``text`` of the first character of its line ``line`` (from 1)."""
    return sum(len(before) + 1 for before in text.split("\n")[: line - 1])


def _open_at(text: str, index: int) -> list[tuple[str, int]]:
    """What is open at ``text[index]`` in the TOML ``text``: the lists ``[...]`` and
    inline tables ``{...}`` of a value (``"["``, ``"{"``), innermost last, then
    ``"string"`` if it is inside a string, each with the line it was opened on.
    Comments are skipped; a ``[`` that is no value (a table header's) opens nothing; a
    string not closed on its line ends there (tomlkit says so before)."""
    opened: list[tuple[str, int]] = []
    at, now, in_value = 0, 1, False
    index = min(index, len(text))
    while at < index:
        char = text[at]
        if char == "\n":
            now += 1
            in_value = in_value and bool(opened)  # (a value ends with its line, unless open)
        elif char == "#":
            newline = text.find("\n", at, index)
            at = index if newline < 0 else newline
            continue
        elif char in "\"'":
            quotes = char * 3 if text.startswith(char * 3, at) else char
            begun = now
            at += len(quotes)
            while at < len(text):
                if at >= index:  # (its closing quotes included)
                    return [*opened, ("string", begun)]
                if text.startswith(quotes, at):
                    break
                if text[at] == "\n":
                    if len(quotes) == 1:
                        break
                    now += 1
                elif text[at] == "\\" and char == '"':
                    at += 1  # (an escape: the next character is the string's)
                at += 1
            if at < len(text) and text[at] != "\n":
                at += len(quotes)
            continue
        elif char == "=" and not opened:
            in_value = True
        elif char in "[{" and (in_value or opened):
            opened.append((char, now))
        elif char in "]}" and opened:
            opened.pop()
        at += 1
    return opened


def _read_file(
    path: Path,
    values: _Values,
    sources: dict[str, str],
    found: _Findings,
    key_lines: dict[str, int] | None = None,
) -> None:
    """Read ``path``'s keys into ``values`` (``key_lines``: each key's line is put there)."""
    try:
        raw, size = _read_at_most(path, CONFIG_FILE_MAX)
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", path=path) from None
    if raw is None:
        raise ConfigError(
            f"a config file has at most {CONFIG_FILE_MAX:,} bytes (1 MiB), this one"
            f" {f'{size:,}' if size > CONFIG_FILE_MAX else 'more'}: is it the config file?",
            path=path,
        )
    unmarked = _utf16_without_mark(raw)
    if unmarked is not None:
        raise ConfigError(
            f"not UTF-8 text: it is {unmarked} without a byte order mark (a NUL byte beside"
            " each ASCII character); save the file as UTF-8",
            path=path,
            line=1,
            column=1,
        )
    try:
        # (newlines as a text file's read takes them: \r\n and \r are \n)
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        # (at the first byte that is not UTF-8, as a TOML error is at its character: a
        # Latin-1 `é` in a comment of a long file was found by bisecting it)
        at = exc.start
        start = raw.rfind(b"\n", 0, at) + 1
        # (a UTF-16 file, as Windows' Notepad "Unicode" and PowerShell 5's `>` write one,
        # is said so by its byte order mark, where "at byte 0xff" was all it said)
        utf16 = next((name for mark, name in _UTF16_MARKS if raw.startswith(mark)), None)
        what = f"it is {utf16} (it starts with its byte order mark)" if utf16 else ""
        raise ConfigError(
            f"not UTF-8 text: {what or f'at byte 0x{raw[at]:02x} ({exc.reason})'};"
            " save the file as UTF-8",
            path=path,
            line=raw.count(b"\n", 0, at) + 1,
            column=len(raw[start:at].decode("utf-8")) + 1,
        ) from None
    try:
        document = tomlkit.parse(text)
    except tomlkit.exceptions.TOMLKitError as exc:
        # A name defined twice is said in the file's terms at the place of its second
        # definition, found in the text: tomlkit says `Key "kernel" already exists.` for a
        # key, a table header or a key and a table of one name alike, at the place it
        # noticed (a repeated table header's last key), at none (before 0.15.3, and in an
        # inline table), or `Redefinition of an existing table`.
        twice = _defined_twice(text) if _DEFINED_TWICE.search(str(exc)) else None
        if twice is not None:
            at, column, problem = twice
            raise ConfigError(
                f"invalid TOML: {problem}", path=path, line=at, column=column
            ) from None
        if isinstance(exc, tomlkit.exceptions.ParseError):
            # tomlkit counts columns from 0; FILE:LINE:COL counts them from 1 (editors,
            # gcc, Python, tomllib), so that a jump to it lands on the bad character
            raise ConfigError(
                f"invalid TOML: {_toml_problem(exc, text)}",
                path=path,
                line=exc.line,
                column=exc.col + 1,
            ) from None
        raise ConfigError(f"invalid TOML: {exc}", path=path) from None
    _refuse_beyond_toml_1_0(text, path)
    source = f"file {path}"
    data: dict[str, Any] = document.unwrap()
    _refuse_huge_integers(data, text, path)
    for section, table in data.items():
        if section not in SECTIONS:
            if isinstance(table, dict):
                message = _unknown_section_text(section)
                line = _section_line(text, section)
            else:
                message = _unknown_top_level_text(section)
                line = _first(_key_lines(text, None, section))
            found.unknown_name(_in_file(path, line, message))
            continue
        if not isinstance(table, dict):
            found.bad_value(
                ConfigError(
                    f"[{section}] must be a table, got {_as_toml(table)}",
                    path=path,
                    line=_section_line(text, section),
                    key=section,
                )
            )
            continue
        known = _fields(section)
        for key, value in table.items():
            line = _first(_key_lines(text, section, key))
            if key not in known:
                message = _unknown_key_text(section, key)
                found.unknown_name(_in_file(path, line, message))
                continue
            try:
                values[section][key] = _check_value(section, key, value)
            except ValueError as exc:
                found.bad_value(ConfigError(str(exc), path=path, line=line, key=f"{section}.{key}"))
                continue
            sources[f"{section}.{key}"] = source
            if key_lines is not None and line is not None:
                key_lines[f"{section}.{key}"] = line


#: where ``tomllib`` says a document is no TOML 1.0 (Python 3.11 says it in the message)
_TOMLLIB_PLACE = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.S)


def _refuse_beyond_toml_1_0(text: str, path: Path) -> None:
    """Refuse what tomlkit reads that TOML 1.0 does not (``tomllib``, Python's strict
    TOML 1.0 parser, checks the text tomlkit parsed; tomlkit stays for its round-trip
    edits): an inline table written over several lines or with a comma after its last
    item, ``a = { x = 1, }``, said in the file's terms naming the key whose value it is;
    anything else in ``tomllib``'s words, at its place."""
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        said = str(exc)
        place = _TOMLLIB_PLACE.match(said)
        if place is None:
            raise ConfigError(f"invalid TOML: {said}", path=path) from None
        line, column = int(place.group(2)), int(place.group(3))
        problem = _inline_table_problem(text, _line_start(text, line) + column - 1)
        raise ConfigError(
            f"invalid TOML: {problem or place.group(1)}", path=path, line=line, column=column
        ) from None


def _inline_table_problem(text: str, index: int) -> str | None:
    """What is wrong at ``text[index]`` if it is in an inline table that TOML 1.0 refuses
    there (tomlkit takes it): a line break (also a comment, which runs to one), or a
    comma after the last item. None if no inline table is open there."""
    opened = _open_at(text, index)
    if not opened or opened[-1][0] != "{":
        return None
    begun = opened[-1][1]
    key = _inline_table_key(text, begun, len(opened))
    table = f"the inline table of {key} opened on line {begun}" if key else "an inline table"
    rest = text[index:].lstrip(" \t")
    if not rest or rest[0] in "\r\n#":
        return (
            f"a line break in {table}: TOML 1.0 writes an inline table on one line (a"
            " [table] of its own takes one key a line)"
        )
    if rest[0] == "}" and text[:index].rstrip(" \t").endswith(","):
        return (
            f"a comma after the last item of {table}: TOML 1.0 allows none before its `}}`"
            " (a list takes one, an inline table does not)"
        )
    return None


def _inline_table_key(text: str, line: int, depth: int) -> str | None:
    """The key whose value is the inline table opened on ``line`` at ``depth`` (the
    how-manieth thing open, lists and inline tables), as written, with its table's
    header if any (``types`` of ``[app]``)."""
    starts = _line_start(text, line)
    raw = text.split("\n")[line - 1]
    for at in range(len(raw) - 1, -1, -1):
        if raw[at] == "{" and len(_open_at(text, starts + at + 1)) == depth:
            key = re.search(r"""([A-Za-z0-9_."' -]+?)\s*=\s*$""", raw[:at])
            if key is None:
                return None
            headers = [_HEADER.match(above) for above in text.split("\n")[: line - 1]]
            section = next((h.group(1) for h in reversed(headers) if h), None)
            named = f"`{key.group(1).strip()}`"
            return f"{named} of [{section}]" if section else named
    return None


def _as_toml(value: Any) -> str:
    with values_as_toml():
        return shown(value)


_HUGE = "holds an integer beyond 64 bits (TOML integers are -2^63 to 2^63-1)"


def _holds_huge_integer(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_holds_huge_integer(item) for item in value.values())
    if isinstance(value, list):
        return any(_holds_huge_integer(item) for item in value)
    return isinstance(value, int) and not -(2**63) <= value < 2**63


def _refuse_huge_integers(data: dict[str, Any], text: str, path: Path) -> None:
    """TOML's integers are 64-bit; tomlkit reads larger ones (even of more digits than
    Python prints), which nothing in a config can use: an error naming where, not a crash."""
    for name, item in data.items():
        keys = list(item.items()) if isinstance(item, dict) else [(None, item)]
        for key, value in keys:
            if not _holds_huge_integer(value):
                continue
            if key is None:
                raise ConfigError(
                    f"invalid TOML: {name} {_HUGE}", path=path, line=_section_line(text, name)
                )
            raise ConfigError(
                f"invalid TOML: [{name}] {key} {_HUGE}",
                path=path,
                line=_first(_key_lines(text, name, key)),
                key=f"{name}.{key}" if name in SECTIONS else None,
            )


def _type_name(field: attrs.Attribute[Any]) -> str:
    # A string (postponed annotations) until nexus_trio's import resolves the public
    # classes' types (MetricsConfig.host is then the class str): the same name either way.
    kind = field.type
    return kind if isinstance(kind, str) else getattr(kind, "__name__", None) or str(kind)


def _is_textual(field: attrs.Attribute[Any]) -> bool:
    # enums are written as strings too
    return _type_name(field) in ("str", "str | None", "OverflowPolicy", "RestartStrategy")


def _parse_env_value(section: str, field: attrs.Attribute[Any], raw: str) -> Any:
    """A TOML value (number, boolean, quoted string, array) or else the raw string.

    For text keys the raw string is the value unless it is quoted, so that
    ``NEXUS_LOGGING__LEVEL=info`` and ``NEXUS_METRICS__HOST=0.0.0.0`` mean what they say.
    For a list key a value starting with ``[`` is an array: ValueError if it is not one
    (``[1``), rather than a one-item list of that text; an empty or blank value is the
    empty list (it was the one-item list ``[""]``, refused: a command that is no command).
    """
    text = raw.strip()
    if text == "" and field.default is None:
        return None
    is_list = _type_name(field).startswith("list")
    if text == "" and is_list:
        return []  # (NEXUS_APP__SPAWN= clears the file's list, as = unsets an optional key)
    if _is_textual(field) and not text.startswith(('"', "'")):
        return raw
    if _type_name(field) == "bool":
        if (boolean := _env_boolean(text)) is not None:
            return boolean  # (also True, 1, yes: what NEXUS_ALLOW_UNKNOWN takes)
        with values_as_toml():
            got = shown(raw)
        raise ValueError(
            f"[{section}] {field.name} must be true or false ({_ENV_BOOLEAN_WORDS}), got {got}"
        )
    if is_list and not text.startswith("["):
        return raw
    try:
        item = tomlkit.value(text)
    except (tomlkit.exceptions.TOMLKitError, ValueError):
        if is_list:
            raise ValueError(
                f"[{section}] {field.name} starts with [ but is not a TOML array (write"
                f' ["one command", "another"], or one command without the [), got {cut(raw, repr)}'
            ) from None
        return raw
    unwrap = getattr(item, "unwrap", None)
    return unwrap() if unwrap is not None else item


def _read_env(
    env: Mapping[str, str], values: _Values, sources: dict[str, str], found: _Findings
) -> None:
    for name in sorted(env):
        if not name.upper().startswith(ENV_PREFIX):
            continue  # (the prefix in any case, as the section and key: nexus_kernel__...)
        if "__" not in name[len(ENV_PREFIX) :]:
            # Not configuration; but NEXUS_KERNEL_MAILBOX_CAPACITY, a section and a key
            # joined by one underscore, is an override mistyped: said, not ignored.
            if (meant := _one_underscore_override(name)) is not None:
                found.unknown_name(
                    f"environment variable {cut_name(name)}: not read: a section and its key are"
                    f" joined by two underscores ({meant})"
                )
            continue
        section_part, _, key_part = name[len(ENV_PREFIX) :].partition("__")
        section, key = section_part.lower(), key_part.lower()
        origin = f"environment variable {name}"
        if section not in SECTIONS:
            found.unknown_name(
                f"environment variable {cut_name(name)}: {_unknown_section_text(section)}"
            )
            continue
        known = _fields(section)
        if key not in known:
            found.unknown_name(
                f"environment variable {cut_name(name)}: {_unknown_key_text(section, key)}"
            )
            continue
        earlier = sources.get(f"{section}.{key}", "")
        if earlier.startswith("env ") and env[earlier.removeprefix("env ")] != env[name]:
            # (names in any case: NEXUS_KERNEL__X and nexus_kernel__x are one key, and
            # which one won depended on their sort order)
            other = earlier.removeprefix("env ")
            found.bad_value(
                ConfigError(
                    f"[{section}] {key} is set twice, differently:"
                    f" {other}={cut(env[other], repr)} and {name}={cut(env[name], repr)}"
                    " (one key in any case: keep one)",
                    origin=origin,
                    key=f"{section}.{key}",
                )
            )
            continue
        try:
            value = _parse_env_value(section, known[key], env[name])
            if _holds_huge_integer(value):
                raise ValueError(f"[{section}] {key} {_HUGE}")
            values[section][key] = _check_value(section, key, value)
        except ValueError as exc:
            found.bad_value(ConfigError(str(exc), origin=origin, key=f"{section}.{key}"))
            continue
        sources[f"{section}.{key}"] = f"env {name}"


def _one_underscore_override(name: str) -> str | None:
    """``NEXUS_KERNEL__MAILBOX_CAPACITY`` for ``NEXUS_KERNEL_MAILBOX_CAPACITY`` (any case):
    the override meant by a variable that joins a known section and one of its keys by
    one underscore; None for any other name."""
    rest = name[len(ENV_PREFIX) :].lower()
    for section in SECTIONS:
        key = rest.removeprefix(section + "_")
        if key != rest and key in _fields(section):
            return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"
    return None


def _apply_overrides(
    overrides: Mapping[str, Any], values: _Values, sources: dict[str, str]
) -> None:
    for dotted, value in overrides.items():
        origin = f"override {dotted}"
        section, _, key = dotted.partition(".")
        unknown = (
            _unknown_section_text(section)
            if section not in SECTIONS
            else _unknown_key_text(section, key)
            if key not in _fields(section)
            else None
        )
        if unknown is not None:  # (a name of no key: shown escaped, cut)
            raise ConfigError(unknown, origin=f"override {cut_name(dotted)}", key=dotted)
        if value is None:
            continue  # a flag that was not given
        try:
            values[section][key] = _check_value(section, key, value, toml=False)
        except ValueError as exc:
            raise ConfigError(str(exc), origin=origin, key=dotted) from None
        sources[dotted] = "cli"


def _looked_up(path: Path, test: Callable[[Path], bool]) -> bool:
    """``path.exists()`` / ``path.is_file()``, or ConfigError naming the path when the system
    cannot tell (a name too long, a directory it may not search): never an OSError."""
    try:
        return test(path)
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", path=path) from None


#: the byte order marks of UTF-16, and its names (a config file in it is said so)
_UTF16_MARKS: Final = (
    (b"\xff\xfe", "UTF-16 (little-endian)"),
    (b"\xfe\xff", "UTF-16 (big-endian)"),
)


def _utf16_without_mark(raw: bytes) -> str | None:
    """The name of UTF-16 that ``raw`` reads as, when it has no byte order mark, or None:
    the first 128 characters' bytes, a NUL in the high byte of three in four of them
    (ASCII text, as a config is) and never in their low byte. Such a file is UTF-8 to
    Python (a NUL is a character), and was said as TOML's ``a NUL character (\\x00) on
    this line``, naming no encoding (``iconv -t UTF-16LE``, .NET's ``Encoding.Unicode``
    without its preamble write one)."""
    head = raw[: min(len(raw), 256) // 2 * 2]
    pairs = len(head) // 2
    if pairs < 2 or b"\x00" not in head or head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return None  # (a mark: said so, where UTF-8 fails to decode it)
    nul_first = head[0::2].count(0)
    nul_second = head[1::2].count(0)
    if nul_second * 4 >= pairs * 3 and nul_first == 0:
        return "UTF-16 (little-endian)"
    if nul_first * 4 >= pairs * 3 and nul_second == 0:
        return "UTF-16 (big-endian)"
    return None


def _read_at_most(path: Path, limit: int) -> tuple[bytes | None, int]:
    """``(content, size)`` of the file at ``path``, or ``(None, size)`` where it has more
    than ``limit`` bytes: its size as its stat says, refused before a byte is read, and
    at most ``limit`` + 1 bytes read all the same, so that a file that grew after that
    stat (a log written to) or whose stat says no size is not read whole (until the
    review of the fifty-fourth pass the check was a stat, then the whole file read)."""
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > limit:
            return None, size
        raw = file.read(limit + 1)
    return (None, size) if len(raw) > limit else (raw, len(raw))


def _not_found(file: Path) -> str:
    """Why ``file``, which does not exist, is not found: a symbolic link that loops (said
    "not found" alone, as for a name nothing has) or one to a missing file is named so."""
    try:
        file.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"config file not found: a symbolic link on its path loops ({exc.strerror})"
    try:
        target = os.readlink(file)
    except OSError:  # (no link: a name nothing has)
        return "config file not found"
    return f"config file not found: it is a symbolic link to {cut_name(target)}, which is not there"


#: the most bytes of a config file: a config is a few kB, and tomlkit reads about 0.6 MB
#: a second here (a 30 MB file took 51 s to say nothing): a larger one is another file
#: given as the config (a log, a data file), refused before it is read
CONFIG_FILE_MAX: Final = 1024 * 1024


def load_config(
    path: Path | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    cwd: Path | None = None,
    allow_unknown: bool | None = None,
    log_warnings: bool = True,
) -> LoadedConfig:
    """Build the effective config: defaults < file < environment < ``overrides``.

    ``path`` is the file to read (it must exist); without it the first existing file of
    :func:`search_paths` is read, or none. ``env`` defaults to ``os.environ``; variables
    ``NEXUS_SECTION__KEY`` set keys, their values read as TOML (numbers, booleans,
    arrays) and otherwise as plain strings. ``overrides`` maps ``"section.key"`` to a
    Python value (``None`` = not given); their source is ``"cli"``.

    Raises :class:`ConfigError` naming the file and line, the variable or the override
    of an invalid value, and for a file that others could have written (see
    :func:`check_file_permissions`). Unknown sections and keys, in the file or the
    environment, raise :class:`ConfigError` listing each with a suggestion; with
    ``allow_unknown=True`` they are warnings instead (logged and returned in
    ``warnings``). ``allow_unknown=None`` reads ``NEXUS_ALLOW_UNKNOWN`` from ``env``.
    ``log_warnings=False``: the warnings (those names, and a ``[nats] server_lost_wait``
    not above ``[cluster] reconnect_wait``) are only returned, for a caller that logs
    them once its logging is set up (``nexus`` does: logged before, they reached
    standard error bare, through Python's last-resort handler, without a level or time).
    Every bad value and unknown name of the file and the environment is said at once, in
    one error of a line each (its ``problems`` are the bad values); an override's is said
    after them, as is a rule across keys of a table.
    """
    env = os.environ if env is None else env
    if allow_unknown is None:
        allow_unknown = _allow_unknown_from_env(env)
    base = Path.cwd() if cwd is None else Path(cwd)
    values: _Values = {section: {} for section in SECTIONS}
    sources: dict[str, str] = {
        f"{section}.{key}": "default" for section in SECTIONS for key in _fields(section)
    }
    found = _Findings()

    file: Path | None = None
    if path is not None:
        file = (base / Path(path).expanduser()).absolute()
        if not _looked_up(file, Path.exists):
            raise ConfigError(_not_found(file), path=file)
        if not _looked_up(file, Path.is_file):
            raise ConfigError("config path is not a file", path=file)
    else:
        for candidate in search_paths(cwd=base, env=env):
            if _looked_up(candidate, Path.is_file):
                file = candidate.absolute()
                break
    lines: dict[str, int] = {}
    if file is not None:
        check_file_permissions(file)
        _read_file(file, values, sources, found, lines)
    _read_env(env, values, sources, found)
    error = found.error(file, allow_unknown=allow_unknown)
    if error is not None:
        raise error
    warnings = found.unknown
    if overrides:
        _apply_overrides(overrides, values, sources)

    tables: dict[str, Any] = {}
    broken = _Findings()
    for section, cls in SECTIONS.items():
        try:
            with values_as_toml():
                tables[section] = cls(**values[section])
        except CrossKeyError as exc:
            broken.bad_value(_rule_error(exc, file, sources, lines))
        except ValueError as exc:  # a rule across keys
            broken.bad_value(ConfigError(str(exc), path=file, origin="config"))
    error = broken.error(file, allow_unknown=True)
    if error is not None:
        raise error
    try:
        with values_as_toml():
            config = Config(**tables)  # (and the rules across sections: see Config)
    except CrossKeyError as exc:
        raise _rule_error(exc, file, sources, lines) from None
    warnings = [*warnings, *config_warnings(config)]
    mark_said_by_a_load(config)  # (join_cluster of its options says nothing again)
    for warning in warnings if log_warnings else ():
        log.warning("%s", warning)
    return LoadedConfig(config, file, sources, tuple(warnings), explicit=path is not None)


def _rule_error(
    exc: CrossKeyError, file: Path | None, sources: Mapping[str, str], lines: Mapping[str, int]
) -> ConfigError:
    """A rule across keys that the effective values break, as a ConfigError naming its
    keys and where each was set: the file and line of the first set in the file (else
    the variable or override of the first set there), the others in the message."""
    where: list[str] = []
    for dotted in exc.keys:
        section, _, key = dotted.partition(".")
        source = sources.get(dotted, "default")
        if source.startswith("file ") and dotted in lines:
            said = f"line {lines[dotted]}"
        elif source.startswith("file "):
            said = "the file"
        elif source.startswith("env "):
            said = f"environment variable {source.removeprefix('env ')}"
        elif source == "cli":
            said = "the command line"
        else:
            said = "its default"
        where.append(f"[{section}] {key} from {said}")
    message = f"{exc} ({'; '.join(where)})"
    set_by = {dotted: sources.get(dotted, "default") for dotted in exc.keys}
    for dotted, source in set_by.items():
        if source.startswith("file "):
            return ConfigError(message, path=file, line=lines.get(dotted), key=dotted)
    for dotted, source in set_by.items():
        if source.startswith("env "):
            origin = f"environment variable {source.removeprefix('env ')}"
            return ConfigError(message, origin=origin, key=dotted)
    for dotted, source in set_by.items():
        if source == "cli":
            return ConfigError(message, origin=f"override {dotted}", key=dotted)
    return ConfigError(message, path=file, origin="config", key=exc.keys[0])


# --- rendering ---------------------------------------------------------------------------------


def _toml(value: Any) -> str:
    return str(tomlkit.item(value).as_string())


def _section_title(section: str) -> str:
    doc = (SECTIONS[section].__doc__ or "").strip().splitlines()[0].replace("``", "")
    return doc.removeprefix(f"[{section}]:").strip()


_PREAMBLE = """\
# nexus_trio configuration (TOML). Every key is optional; the values below are the defaults.
#
# Load order: --config FILE, else the first that exists of ./config.toml,
# $XDG_CONFIG_HOME/nexus/config.toml (~/.config/nexus/config.toml), /etc/nexus/config.toml;
# else the defaults. Environment variables override the file, one per key:
# NEXUS_<SECTION>__<KEY>=value, e.g. NEXUS_KERNEL__MAILBOX_CAPACITY=4096.
# Command-line flags override both.
"""


def render_template() -> str:
    """A commented TOML file with every section and key set to its default.

    Parsing it gives the defaults again: ``load_config(written_template).config == Config()``.
    """
    defaults: dict[str, dict[str, Any]] = _converter.unstructure(Config())
    parts = [_PREAMBLE]
    for section in SECTIONS:
        parts.append(f"\n# {_section_title(section)}\n[{section}]\n")
        for key, field in _fields(section).items():
            value = defaults[section][key]
            doc = field.metadata.get("doc", "")
            if value is None:
                parts.append(
                    f"# {doc} [default: unset]\n"
                    f"# {key} = {_toml(field.metadata.get('example', 'package.module:attr'))}\n"
                )
            else:
                parts.append(f"# {doc} [default: {_toml(value)}]\n{key} = {_toml(value)}\n")
    return "".join(parts)


def write_template(path: Path | str, *, force: bool = False) -> Path:
    """Write :func:`render_template` to ``path`` (creating its directory); return the path.

    Refuses to replace an existing file unless ``force``: :class:`ConfigError`; with it,
    still refuses to replace what is no regular file (a device, a named pipe). A write
    that fails (a full disk) leaves nothing behind: not an empty new file (which the
    next try would refuse to overwrite), and with ``force`` the file it would have
    replaced as it was (the template is written beside it, then put in its place).
    """
    target = Path(path).expanduser().absolute()
    text = render_template()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if force:
            _replace_file(target, text)
        else:
            _write_new_file(target, text, 0o644)
    except (FileExistsError, NotADirectoryError) as exc:
        # (a file where a directory of the path should be: its mkdir fails with
        # FileExistsError too, which is not "file exists" of the target)
        blocking = next(
            (p for p in target.parents if p.exists() and not p.is_dir()),
            None,
        )
        if blocking is not None:
            raise ConfigError(
                f"cannot write config file: {shown_path(blocking)} is a file, not a directory",
                path=target,
            ) from None
        if isinstance(exc, NotADirectoryError):
            raise _cannot_write(exc, target) from None
        raise ConfigError(
            "file exists; refusing to overwrite it (use --force / force=True)", path=target
        ) from None
    except OSError as exc:
        raise _cannot_write(exc, target) from None
    return target


def _cannot_write(exc: OSError, target: Path) -> ConfigError:
    return ConfigError(f"cannot write config file: {exc.strerror or exc}", path=target)


def _write_new_file(target: Path, text: str, mode: int) -> None:
    """Create ``target`` (not there yet: else FileExistsError) with ``text``, mode ``mode``
    at most (the umask may take more away: load_config refuses a config file that the
    group or others can write); removed again if the write fails."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with open(fd, "w", encoding="utf-8") as file:
            file.write(text)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _replace_file(target: Path, text: str) -> None:
    """Put a file with ``text`` in ``target``'s place (through a symbolic link: in the
    place of the file it names), written beside it first; it keeps the old file's
    permissions, less any write permission of the group or others."""
    real = target.resolve() if target.is_symlink() else target
    try:
        mode = real.stat().st_mode
    except FileNotFoundError:
        kept: int | None = None  # (a new file: 0o644 less the umask)
    else:
        if not stat.S_ISREG(mode):
            raise ConfigError(
                f"not a regular file ({_file_kind(mode)}); refusing to replace it", path=target
            )
        kept = stat.S_IMODE(mode) & 0o644
    temporary = real.with_name(f".{real.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    _write_new_file(temporary, text, 0o644 if kept is None else kept)
    try:
        if kept is not None:
            os.chmod(temporary, kept)  # (what the umask took, the old file had)
        os.replace(temporary, real)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _file_kind(mode: int) -> str:
    """What a file that is no regular file is, for an error: ``a named pipe``, ..."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((kind for test, kind in kinds if test(mode)), "of another kind")


def render_effective(loaded: LoadedConfig) -> str:
    """The effective config as TOML, each key followed by ``# from <source>``.

    The output parses back to the same config.
    """
    effective: dict[str, dict[str, Any]] = _converter.unstructure(loaded.config)
    origin = str(loaded.path) if loaded.path is not None else "no file (defaults)"
    parts = [f"# effective nexus_trio configuration; config file: {origin}\n"]
    parts.extend(f"# warning: {warning}\n" for warning in loaded.warnings)
    for section in SECTIONS:
        parts.append(f"\n[{section}]\n")
        for key in _fields(section):
            value = effective[section][key]
            source = loaded.sources.get(f"{section}.{key}", "default")
            if value is None:
                derived = derived_when_unset(loaded.config, f"{section}.{key}")
                said = f": {derived}" if derived is not None else ""
                parts.append(f"# {key} is unset{said}  # from {source}\n")
            elif _fields(section)[key].metadata.get("secret"):
                parts.append(f"# {key} is set (not shown: a secret)  # from {source}\n")
            else:
                parts.append(f"{key} = {_toml(value)}  # from {source}\n")
    return "".join(parts)
