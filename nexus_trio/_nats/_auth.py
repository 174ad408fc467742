"""Credentials for NATS, and keeping them out of logs, errors and ``ps``.

A node authenticates with one of what NATS deployments use: user and password, a token,
an NKEY seed file, or a credentials file (user JWT + NKEY seed, decentralised auth);
with TLS on top (a CA to verify the server, a client certificate and key for servers
that verify clients). :class:`NatsAuth` holds them, from the ``[nats]`` config section
(and so from ``NEXUS_NATS__*`` environment variables), from credentials written into a
server URL (``nats://user:pass@host``, ``nats://token@host``, moved out of the URL at
once), or given in code. Whatever the source, secrets never reach a log line or an
error text of the NATS layer: :func:`redact` is the one function that removes them
(URL user info, and every secret value a connection was opened with), and
:data:`REDACTING_FILTER` applies it to every record of the ``nexus_trio.nats`` loggers.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, final

import attrs

if TYPE_CHECKING:
    from .._config import NatsConfig

#: what stands in for a secret in logs and errors
MASK: Final = "***"

# ``scheme://userinfo@`` in any text: the user info of a URL (user:password, or a token).
_URL_USERINFO: Final = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/@\s]+)@")

# Secret values this process connected with: redacted wherever they appear (e.g. in an
# exception text that quotes the server's answer). Process-wide because log records
# and exceptions travel beyond the Cluster that opened the connection.
_known_secrets: set[str] = set()


def _mask_userinfo(match: re.Match[str]) -> str:
    info = match.group("info")
    user, colon, _ = info.partition(":")
    # ``user:password`` keeps the user (useful, not secret); a bare ``token`` goes whole.
    return f"{match.group('scheme')}{user}:{MASK}@" if colon else f"{match.group('scheme')}{MASK}@"


def redact(text: str) -> str:
    """``text`` without credentials: URL user info masked (``nats://u:***@h``,
    ``nats://***@h``) and every registered secret value replaced by ``***``."""
    text = _URL_USERINFO.sub(_mask_userinfo, text)
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def register_secret(value: str | None) -> None:
    """Have :func:`redact` mask ``value`` from now on (ignored if empty or tiny: masking
    every "a" in every log line would make them unreadable and hide nothing)."""
    if value and len(value) >= 4:
        _known_secrets.add(value)


@final
class RedactingFilter(logging.Filter):
    """Applies :func:`redact` to a record's message (arguments merged in) and exception."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


REDACTING_FILTER: Final = RedactingFilter()


def install_redaction(names: Iterable[str]) -> None:
    """Put :data:`REDACTING_FILTER` on the loggers ``names`` (filters do not propagate to
    child loggers, so each logger of the NATS layer gets it)."""
    for name in names:
        logger = logging.getLogger(name)
        if REDACTING_FILTER not in logger.filters:
            logger.addFilter(REDACTING_FILTER)


def _secret_repr(value: str | None) -> str:
    return "None" if value is None else repr(MASK)


def _check_file(what: str, path: str | None) -> None:
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"NATS {what} {path!r} is not a readable file")


#: the two blocks of a credentials file (``nsc generate creds``), as nats-py finds them:
#: a line holding the marker, the value on the next line
_CREDS_BLOCKS: Final = (
    (b"BEGIN NATS USER JWT", "user JWT"),
    (b"BEGIN USER NKEY SEED", "NKEY seed"),
)
#: more than any credentials file holds (a JWT of a few KiB and a seed)
_CREDS_READ_LIMIT: Final = 1 << 20


def _first_line(data: bytes) -> bytes:
    return next((line.strip() for line in data.splitlines() if line.strip()), b"")


def _check_creds(path: str) -> None:
    """ValueError naming ``path`` and what is missing if it is no credentials file: a
    user JWT block and an NKEY seed block, each with its value on the next line. nats-py
    reads them only at the connect, from a server that asks for a signature: a file
    without the JWT block spun for ever in its reader (the join's timeout never came:
    the loop holds the thread), one without the seed failed as ``TypeError("object of
    type 'NoneType' has no len()")``."""
    try:
        with open(path, "rb") as file:
            data = file.read(_CREDS_READ_LIMIT)
    except OSError as exc:
        raise ValueError(f"NATS creds_file {path!r} cannot be read: {exc}") from None
    lines = data.splitlines()
    missing = []
    values: dict[str, int] = {}
    for marker, what in _CREDS_BLOCKS:
        at = next((i for i, line in enumerate(lines) if marker in line), None)
        if at is None or at + 1 >= len(lines) or not lines[at + 1].strip():
            missing.append(f"{what} (a '-----{marker.decode()}-----' line, the value below it)")
        else:
            values[what] = at + 1
    if missing:
        hint = ""
        if _first_line(data).startswith(b"SU") and len(lines) <= 2:
            hint = "; it holds a bare NKEY seed: give it as nkey_seed"
        raise ValueError(
            f"NATS creds_file {path!r} is not a NATS credentials file: no"
            f" {' and no '.join(missing)}; a credentials file (`nsc generate creds`) holds a"
            f" user JWT and its NKEY seed{hint}"
        )
    _check_creds_values(path, data.splitlines(keepends=True), values)


def _check_creds_values(path: str, lines: list[bytes], values: dict[str, int]) -> None:
    """ValueError naming ``path`` if nats-py would misread a value of its creds file: it
    takes all of the value's line but its last byte (meant to be the ``\\n``), so a
    Windows line end's ``\\r``, a blank after the value, or the last byte of a final line
    without its ``\\n`` became part of the JWT or the seed (a bare ``ErrInvalidSeed()`` or
    an authorization error at the connect, naming no file); or if the seed is none."""
    wrong = []
    for what, at in values.items():
        line = lines[at]
        if not line.endswith(b"\n"):
            wrong.append(f"its {what} line ends without a '\\n' (nats-py drops its last byte)")
        elif line[:-1] != line[:-1].rstrip():
            tail = line[len(line.rstrip()) :].decode("ascii", "replace")
            wrong.append(f"its {what} line ends in {tail!r}")
        elif line != line.lstrip():
            wrong.append(f"its {what} line starts with a blank")
    if wrong:
        raise ValueError(
            f"NATS creds_file {path!r} is not a NATS credentials file nats-py can read:"
            f" {'; '.join(wrong)}; nats-py takes all of a value's line but its final"
            " '\\n' for the value (a Windows line end's '\\r' too): save it with '\\n' line"
            " ends only (dos2unix)"
        )
    import nkeys  # type: ignore[import-untyped, import-not-found, unused-ignore]

    seed = bytearray(lines[values["NKEY seed"]][:-1])
    try:
        pair = nkeys.from_seed(seed)
    except Exception:  # nkeys raises its own errors, and others on garbage
        raise ValueError(
            f"NATS creds_file {path!r} is not a NATS credentials file nats-py can read:"
            f" the line below its '-----{_CREDS_BLOCKS[1][0].decode()}-----' line is no NKEY"
            " seed"
        ) from None
    pair.wipe()


def _check_seed(path: str, seed: str) -> None:
    """ValueError naming ``path`` if ``seed`` (its stripped text) is no NKEY seed. nats-py
    parses it only at the connect, as a bare ``ErrInvalidSeed()`` that names no file."""
    if "BEGIN NATS USER JWT" in seed:
        raise ValueError(
            f"NATS nkey_seed {path!r} is a credentials file (a user JWT and its seed):"
            " give it as creds_file"
        )
    import nkeys  # type: ignore[import-untyped, import-not-found, unused-ignore]

    try:
        pair = nkeys.from_seed(bytearray(seed.encode("ascii")))
    except Exception:  # nkeys raises its own errors, and others on garbage
        raise ValueError(
            f"NATS nkey_seed {path!r} is not an NKEY seed (one line starting with 'SU',"
            " as `nk -gen user` writes)"
        ) from None
    pair.wipe()


@final
@attrs.frozen
class NatsAuth:
    """How a node proves who it is to NATS, and TLS settings (see the module doc).

    At most one of user/password, ``token``, ``creds_file``, ``nkey_seed`` may be given.
    Setting ``tls_ca`` or ``tls_cert``/``tls_key`` turns TLS on (the server must offer
    it). Files are checked when the connection is opened, with an error naming the key.
    ``repr`` shows ``'***'`` for the password and the token.
    """

    user: str | None = None
    password: str | None = attrs.field(default=None, repr=_secret_repr)
    token: str | None = attrs.field(default=None, repr=_secret_repr)
    creds_file: str | None = None
    nkey_seed: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __attrs_post_init__(self) -> None:
        kinds = [
            name
            for name, given in (
                ("user/password", self.user is not None or self.password is not None),
                ("token", self.token is not None),
                ("creds_file", self.creds_file is not None),
                ("nkey_seed", self.nkey_seed is not None),
            )
            if given
        ]
        if len(kinds) > 1:
            raise ValueError(
                f"NATS auth: give one of user/password, token, creds_file,"
                f" nkey_seed; got {' and '.join(kinds)}"
            )
        if (self.user is None) != (self.password is None):
            missing = "password" if self.password is None else "user"
            raise ValueError(f"NATS auth: user and password go together; {missing} is missing")
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise ValueError(
                f"NATS TLS: a client certificate needs its key (tls_cert with tls_key);"
                f" {missing} is missing"
            )

    @classmethod
    def from_config(cls, section: NatsConfig) -> NatsAuth:
        """The credentials of a ``[nats]`` config section."""
        return cls(
            user=section.user,
            password=section.password,
            token=section.token,
            creds_file=section.creds_file,
            nkey_seed=section.nkey_seed,
            tls_ca=section.tls_ca,
            tls_cert=section.tls_cert,
            tls_key=section.tls_key,
        )

    @property
    def uses_tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    @property
    def has_credentials(self) -> bool:
        return any(v is not None for v in (self.user, self.token, self.creds_file, self.nkey_seed))

    def tls_context(self) -> ssl.SSLContext | None:
        """The client's TLS context, or None without TLS settings."""
        if not self.uses_tls:
            return None
        _check_file("tls_ca", self.tls_ca)
        _check_file("tls_cert", self.tls_cert)
        _check_file("tls_key", self.tls_key)
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert is not None:
            try:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"NATS TLS: cannot load client certificate {self.tls_cert!r} with key"
                    f" {self.tls_key!r}: {exc}"
                ) from None
        return context

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments of ``nats.connect`` for these credentials; registers the
        secret values with :func:`redact`."""
        _check_file("creds_file", self.creds_file)
        _check_file("nkey_seed", self.nkey_seed)
        register_secret(self.password)
        register_secret(self.token)
        options: dict[str, Any] = {}
        if self.user is not None:
            options["user"], options["password"] = self.user, self.password
        if self.token is not None:
            options["token"] = self.token
        if self.creds_file is not None:
            _check_creds(self.creds_file)
            options["user_credentials"] = self.creds_file
        if self.nkey_seed is not None:
            # Read here, stripped, and handed over as a string: nats-py before 2.15 read the
            # file whole and took its final newline for part of the seed (ErrInvalidSeed
            # for a file written by `nk -gen user > user.nk`)
            try:
                with open(self.nkey_seed, encoding="ascii") as file:
                    seed = file.read().strip()
            except UnicodeDecodeError:
                raise ValueError(
                    f"NATS nkey_seed {self.nkey_seed!r} is not an NKEY seed (not ASCII text)"
                ) from None
            register_secret(seed)
            _check_seed(self.nkey_seed, seed)
            options["nkeys_seed_str"] = seed
        context = self.tls_context()
        if context is not None:
            options["tls"] = context
        return options


#: the URL schemes nats-py connects with (a URL without one is taken as nats://)
SERVER_SCHEMES: Final = ("nats", "tls", "ws", "wss")


def check_server_url(url: str) -> None:
    """ValueError naming ``url`` (credentials masked) and what is wrong with it, if it is
    no NATS server address: a scheme other than :data:`SERVER_SCHEMES`, no host, a port
    that is no number from 1 to 65535. nats-py would take ``http://h:4222`` for the host
    ``http``, and fail a bad port only at the connect, as "invalid connect url option"."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"nats://{url}")
    problem = None
    if parts.scheme.lower() not in SERVER_SCHEMES:
        problem = f"scheme {parts.scheme!r} is not one of {', '.join(SERVER_SCHEMES)}"
    else:
        hostport = parts.netloc.rpartition("@")[2]
        port = ""
        if hostport.startswith("["):  # [IPv6]:port
            port = hostport.partition("]")[2].removeprefix(":")
        elif ":" in hostport:
            port = hostport.rpartition(":")[2]
        if not parts.hostname:
            problem = "no host"
        elif port and not (port.isascii() and port.isdigit()):
            problem = f"port {port!r} is not a number"
        elif port and not 1 <= int(port) <= 65535:
            problem = f"port {int(port)} is not from 1 to 65535"
    if problem is not None:
        raise ValueError(f"NATS URL {redact(url)!r}: {problem}")


def split_credentials(urls: Sequence[str], auth: NatsAuth) -> tuple[list[str], NatsAuth]:
    """Server URLs without user info, and ``auth`` with the credentials they carried.

    ``nats://user:pass@h`` gives user/password, ``nats://token@h`` a token. The
    credentials are registered with :func:`redact` at once. Credentials in a URL and in
    ``auth`` at the same time, or different ones in two URLs, are a ValueError (which
    would win is a guess the caller should not have to make), and so is a URL that is no
    server address (:func:`check_server_url`).
    """
    clean: list[str] = []
    found: tuple[str | None, str | None, str | None] | None = None
    for url in urls:
        check_server_url(url)
        parts = urllib.parse.urlsplit(url if "://" in url else f"nats://{url}")
        if "@" not in parts.netloc:
            clean.append(url)
            continue
        info, _, hostport = parts.netloc.rpartition("@")
        user, colon, password = info.partition(":")
        creds: tuple[str | None, str | None, str | None] = (
            (urllib.parse.unquote(user), urllib.parse.unquote(password), None)
            if colon
            else (None, None, urllib.parse.unquote(user))
        )
        register_secret(creds[1])
        register_secret(creds[2])
        if found is not None and found != creds:
            raise ValueError(
                "NATS URLs carry different credentials; give them once, in the [nats] config"
                f" section or NEXUS_NATS__* variables (URLs: {redact(', '.join(urls))})"
            )
        found = creds
        clean.append(urllib.parse.urlunsplit(parts._replace(netloc=hostport)))
    if found is None:
        return clean, auth
    if auth.has_credentials:
        raise ValueError(
            "NATS credentials given both in the URL and in the configuration; keep them in one"
            f" place (URL: {redact(', '.join(urls))})"
        )
    return clean, attrs.evolve(auth, user=found[0], password=found[1], token=found[2])
