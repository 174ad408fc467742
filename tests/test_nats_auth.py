"""NATS credentials: each kind of auth against a real nats-server configured for it, and
secrets kept out of every log line, error text and argv of the NATS layer.

Servers run on 127.0.0.1 with certificates and keys made for the test (tests/nats_auth.py).
Waits are bounded with ``trio.fail_after``.
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from nexus_trio import Config, Context, Message, TransportUnavailable, agent, open_kernel
from nexus_trio._config import NatsConfig
from nexus_trio._nats import NatsServer, join_cluster
from nexus_trio._nats._auth import MASK, NatsAuth, redact, register_secret, split_credentials
from nexus_trio.cli._cluster_cmd import _move_credentials_to_env
from nexus_trio.config import load_config, render_effective

from .nats_auth import make_creds, make_nkey_user, make_tls
from .nats_server import FAST, node_config

PASSWORD = "s3cret-Pa55word"
TOKEN = "tok-9f8e7d6c5b4a"


# --- redaction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nats://alice:pw123@h:4222", f"nats://alice:{MASK}@h:4222"),
        ("nats://tokenvalue@h:4222", f"nats://{MASK}@h:4222"),
        (
            "at tls://u:p%40ss@a:1, nats://b:2 and ws://t0k@c:3/x",
            f"at tls://u:{MASK}@a:1, nats://b:2 and ws://{MASK}@c:3/x",
        ),
        ("cannot connect to nats://127.0.0.1:4222", "cannot connect to nats://127.0.0.1:4222"),
        ("mail alice@example.org", "mail alice@example.org"),  # no scheme: not a URL
    ],
)
def test_redact_masks_url_credentials(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_masks_registered_secret_values_anywhere() -> None:
    register_secret("xyzzy-plugh-42")
    register_secret("ab")  # too short to mask without destroying the text: ignored
    assert (
        redact("server said 'xyzzy-plugh-42' is wrong; ab") == f"server said '{MASK}' is wrong; ab"
    )


def test_credentials_move_out_of_the_url() -> None:
    urls, auth = split_credentials(["nats://bob:p%2Fw@h:1", "nats://bob:p%2Fw@k:2"], NatsAuth())
    assert urls == ["nats://h:1", "nats://k:2"]
    assert (auth.user, auth.password, auth.token) == ("bob", "p/w", None)
    urls, auth = split_credentials(["nats://t0ken-abc@h:1"], NatsAuth())
    assert (urls, auth.token, auth.user) == (["nats://h:1"], "t0ken-abc", None)
    assert "t0ken-abc" not in repr(auth) and "p/w" not in repr(NatsAuth(user="u", password="p/w"))
    with pytest.raises(ValueError, match="different credentials") as info:
        split_credentials(["nats://a:one1@h:1", "nats://a:two2@k:2"], NatsAuth())
    assert "one1" not in str(info.value) and "two2" not in str(info.value)
    with pytest.raises(ValueError, match="both in the URL and in the configuration"):
        split_credentials(["nats://a:pw99@h:1"], NatsAuth(token="other-token"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"user": "u", "password": "p", "token": "t"}, "got user/password and token"),
        ({"creds_file": "a", "nkey_seed": "b"}, "got creds_file and nkey_seed"),
        ({"user": "u"}, "password is missing"),
        ({"tls_cert": "c.pem"}, "tls_key is missing"),
    ],
)
def test_contradictory_auth_settings_are_refused_by_name(
    fields: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        NatsAuth(**fields)


def test_missing_credential_files_are_named() -> None:
    with pytest.raises(ValueError, match=r"NATS creds_file '/nonexistent/x.creds'"):
        NatsAuth(creds_file="/nonexistent/x.creds").connect_options()
    with pytest.raises(ValueError, match=r"NATS tls_ca '/nonexistent/ca.pem'"):
        NatsAuth(tls_ca="/nonexistent/ca.pem").connect_options()


def test_an_nkey_seed_file_s_final_newline_is_not_taken_for_part_of_the_seed(
    tmp_path: Path,
) -> None:
    """Regression: the seed file's path went to nats-py, which before 2.15 read the file
    whole: a seed file ending in a newline (as `nk -gen user > user.nk` writes it) was
    refused with ErrInvalidSeed. The seed is read, stripped and kept out of logs."""
    seed_file, _ = make_nkey_user(tmp_path)
    seed = Path(seed_file).read_text(encoding="ascii")
    assert seed.endswith("\n")
    options = NatsAuth(nkey_seed=seed_file).connect_options()
    assert options == {"nkeys_seed_str": seed.strip()}
    assert redact(f"seed {seed.strip()} in a line") == f"seed {MASK} in a line"
    (tmp_path / "latin1.nk").write_bytes(b"SU\xe9\n")
    with pytest.raises(ValueError, match=r"NATS nkey_seed '.*latin1.nk' is not an NKEY seed"):
        NatsAuth(nkey_seed=str(tmp_path / "latin1.nk")).connect_options()


def _seed_only(tmp_path: Path, creds: str) -> Path:
    """``creds`` without its user JWT block: from its seed block on."""
    text = Path(creds).read_text(encoding="ascii")
    path = tmp_path / "seed-only.creds"
    path.write_text(text[text.index("-----BEGIN USER NKEY SEED") :], encoding="ascii")
    return path


def test_a_creds_file_that_is_no_credentials_file_is_refused_naming_what_it_lacks(
    tmp_path: Path,
) -> None:
    """Regression: nats-py reads a creds file only at the connect. One without its user
    JWT block (the seed part pasted alone) spun for ever in nats-py's reader, holding the
    thread (the join's timeout never came: found by a user's first hour, the join of
    operator-mode auth hung); any other file (a seed file given as creds_file, a text)
    failed as ``TypeError("object of type 'NoneType' has no len()")``. Both are refused
    before the connect now, naming the file and what it lacks."""
    creds, _ = make_creds(tmp_path)
    seed_file, _ = make_nkey_user(tmp_path)
    assert NatsAuth(creds_file=creds).connect_options() == {"user_credentials": creds}
    jwt_block = "no user JWT (a '-----BEGIN NATS USER JWT-----' line, the value below it)"
    seed_block = "no NKEY seed (a '-----BEGIN USER NKEY SEED-----' line, the value below it)"
    seed_only = _seed_only(tmp_path, creds)
    with pytest.raises(ValueError, match="is not a NATS credentials file") as caught:
        NatsAuth(creds_file=str(seed_only)).connect_options()
    assert str(caught.value) == (
        f"NATS creds_file {str(seed_only)!r} is not a NATS credentials file: {jwt_block};"
        " a credentials file (`nsc generate creds`) holds a user JWT and its NKEY seed"
    )
    text = tmp_path / "text.creds"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match="is not a NATS credentials file") as caught:
        NatsAuth(creds_file=str(text)).connect_options()
    assert f"{jwt_block} and {seed_block};" in str(caught.value)
    assert "nkey_seed" not in str(caught.value)
    with pytest.raises(ValueError, match="is not a NATS") as caught:  # a seed as creds_file
        NatsAuth(creds_file=seed_file).connect_options()
    assert str(caught.value).endswith("; it holds a bare NKEY seed: give it as nkey_seed")
    jwt_only = tmp_path / "jwt-only.creds"  # the seed block cut off after its marker line
    full = Path(creds).read_text(encoding="ascii")
    jwt_only.write_text(
        full[: full.index("-----BEGIN USER NKEY SEED")] + "-----BEGIN USER NKEY SEED-----\n"
    )
    with pytest.raises(ValueError, match="is not a NATS credentials file") as caught:
        NatsAuth(creds_file=str(jwt_only)).connect_options()
    assert f": {seed_block};" in str(caught.value)


def test_a_creds_file_whose_values_nats_py_would_misread_is_refused_naming_why(
    tmp_path: Path,
) -> None:
    """Review of the thirty-ninth pass: the check found both blocks in a creds file saved
    with Windows line ends (CRLF) and let it through, but nats-py takes everything up to
    the line's last byte for the value, the ``\\r`` too: the connect failed with a bare
    ``ErrInvalidSeed()`` naming no file. A seed block whose value is no seed failed alike.
    Both are refused before the connect, naming the file; the file nats-py reads is still
    accepted as it is."""
    creds, _ = make_creds(tmp_path)
    good = Path(creds).read_bytes()
    assert b"\r" not in good
    crlf = tmp_path / "crlf.creds"
    crlf.write_bytes(good.replace(b"\n", b"\r\n"))
    with pytest.raises(ValueError, match="is not a NATS credentials file") as caught:
        NatsAuth(creds_file=str(crlf)).connect_options()
    assert str(caught.value) == (
        f"NATS creds_file {str(crlf)!r} is not a NATS credentials file nats-py can read:"
        " its user JWT line ends in '\\r\\n'; its NKEY seed line ends in '\\r\\n'; nats-py"
        " takes all of a value's line but its final '\\n' for the value (a Windows line"
        " end's '\\r' too): save it with '\\n' line ends only (dos2unix)"
    )
    lines = good.split(b"\n")
    at = next(i for i, line in enumerate(lines) if b"BEGIN USER NKEY SEED" in line) + 1
    assert lines[at].startswith(b"SU")
    bad_seed = tmp_path / "bad-seed.creds"
    bad_seed.write_bytes(b"\n".join([*lines[:at], b"SUNOTASEED", *lines[at + 1 :]]))
    with pytest.raises(ValueError, match="is not a NATS credentials file") as caught:
        NatsAuth(creds_file=str(bad_seed)).connect_options()
    assert str(caught.value) == (
        f"NATS creds_file {str(bad_seed)!r} is not a NATS credentials file nats-py can"
        " read: the line below its '-----BEGIN USER NKEY SEED-----' line is no NKEY seed"
    )
    assert "SUNOTASEED" not in str(caught.value)
    spaced = tmp_path / "spaced.creds"  # (a space after the JWT: nats-py would send it)
    jwt_at = next(i for i, line in enumerate(lines) if b"BEGIN NATS USER JWT" in line) + 1
    spaced.write_bytes(b"\n".join([*lines[:jwt_at], lines[jwt_at] + b" ", *lines[jwt_at + 1 :]]))
    with pytest.raises(ValueError, match="its user JWT line ends in ' \\\\n'"):
        NatsAuth(creds_file=str(spaced)).connect_options()
    cut = tmp_path / "cut.creds"  # (ends with the seed's value: nats-py drops its last byte)
    cut.write_bytes(b"\n".join(lines[: at + 1]))
    with pytest.raises(ValueError, match="its NKEY seed line ends without a '\\\\n'"):
        NatsAuth(creds_file=str(cut)).connect_options()
    # what nats-py reads is still accepted: extra blocks and blank lines around them
    extra = tmp_path / "extra.creds"
    extra.write_bytes(b"# a comment\n\n" + good + b"\n-----BEGIN SOMETHING ELSE-----\nx\n")
    assert NatsAuth(creds_file=str(extra)).connect_options() == {"user_credentials": str(extra)}


def test_an_nkey_seed_file_that_holds_no_seed_is_refused_naming_the_file(tmp_path: Path) -> None:
    """Regression: a file that is no seed got nats-py's bare ``ErrInvalidSeed()`` at the
    connect, naming no file; a credentials file given as nkey_seed, the same."""
    creds, _ = make_creds(tmp_path)
    (tmp_path / "text.nk").write_text("hello\n")
    with pytest.raises(ValueError, match="is not an NKEY seed") as caught:
        NatsAuth(nkey_seed=str(tmp_path / "text.nk")).connect_options()
    assert str(caught.value) == (
        f"NATS nkey_seed {str(tmp_path / 'text.nk')!r} is not an NKEY seed (one line starting"
        " with 'SU', as `nk -gen user` writes)"
    )
    with pytest.raises(ValueError, match="is a credentials file") as caught:
        NatsAuth(nkey_seed=creds).connect_options()
    assert str(caught.value) == (
        f"NATS nkey_seed {creds!r} is a credentials file (a user JWT and its seed): give it"
        " as creds_file"
    )


async def test_a_join_with_a_creds_file_without_its_jwt_fails_at_once_naming_the_file(
    server_factory: Any, tmp_path: Path
) -> None:
    """The join of the regression above, on a server in operator mode: it fails with
    ``TransportUnavailable`` naming the file (it hung for ever before)."""
    creds, config = make_creds(tmp_path)
    server = server_factory(config)
    seed_only = _seed_only(tmp_path, creds)
    cfg: Config = attrs.evolve(node_config(), nats=NatsConfig(creds_file=str(seed_only)))
    async with open_kernel(cfg) as kernel:
        with trio.fail_after(30), pytest.raises(TransportUnavailable) as caught:
            async with join_cluster(kernel, server.url, "a", options=FAST):
                pass
    assert f"NATS creds_file {str(seed_only)!r} is not a NATS credentials file" in str(caught.value)


def test_config_and_environment_give_credentials_and_show_hides_them(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text('[nats]\nurl = "nats://127.0.0.1:4222"\nuser = "svc"\n')
    file.chmod(0o600)
    env = {"NEXUS_NATS__PASSWORD": PASSWORD}
    loaded = load_config(file, env=env)
    assert loaded.config.nats == NatsConfig(
        url="nats://127.0.0.1:4222", user="svc", password=PASSWORD
    )
    auth = NatsAuth.from_config(loaded.config.nats)
    assert (auth.user, auth.password) == ("svc", PASSWORD)
    shown = render_effective(loaded)
    assert PASSWORD not in shown
    assert "# password is set (not shown: a secret)  # from env NEXUS_NATS__PASSWORD" in shown


def test_workers_get_url_credentials_in_their_environment_not_argv() -> None:
    env: dict[str, str] = {}
    url = _move_credentials_to_env(f"nats://svc:{PASSWORD}@127.0.0.1:4222", env)
    assert url == "nats://127.0.0.1:4222"
    assert env == {"NEXUS_NATS__USER": "svc", "NEXUS_NATS__PASSWORD": PASSWORD}


# --- against real servers -------------------------------------------------------------------


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[NatsServer] = []

    def start(config: str = "", **kwargs: Any) -> NatsServer:
        server = NatsServer(config=config, **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@agent(name="recorder")
async def recorder(ctx: Context, msg: Message) -> Any:
    return msg.payload  # a reply acknowledges the durable message


async def _join_and_exchange(url: str | None, nats: NatsConfig) -> None:
    """Join with the credentials of ``nats`` (from the kernel's config) and pass a durable
    message through JetStream to a local agent: KV, pub/sub and JetStream all work."""
    config: Config = attrs.evolve(node_config(), nats=nats)
    async with open_kernel(config) as kernel:
        with trio.fail_after(30):
            async with join_cluster(kernel, url, "a", options=FAST) as cluster:
                kernel.spawn(recorder, name="recorder-a")
                await cluster.names_published()
                await cluster.send_durable("recorder-a", "hello")
                while True:  # polling another process's progress (JetStream)
                    if cluster.stats().durable_acked >= 1:
                        break
                    await trio.sleep(0.02)
                await kernel.shutdown()


async def test_a_refusal_followed_by_resets_still_says_what_the_server_answered() -> None:
    """A server that refuses the credentials and then resets the connection (the order
    a real nats-server's close can take): the error names the refusal, not the reset."""
    connections = 0

    async def refuse(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            info = b'{"server_id":"fake","version":"2.10.0","proto":1,"max_payload":1048576,'
            await stream.send_all(b"INFO " + info + b'"auth_required":true}\r\n')
            await stream.receive_some()  # CONNECT and PING
            await stream.send_all(b"-ERR 'Authorization Violation'\r\n")
        # then (and at every later attempt) a reset, not a clean close
        linger_zero = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close sends RST
        stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, linger_zero)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, refuse, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with open_kernel(node_config()) as kernel:
            with trio.fail_after(30), pytest.raises(TransportUnavailable) as info:
                async with join_cluster(
                    kernel,
                    f"nats://127.0.0.1:{port}",
                    "a",
                    options=attrs.evolve(FAST, connect_attempts=2, reconnect_wait=0.0),
                    auth=NatsAuth(user="svc", password="Wrong-pw-3"),
                ):
                    pass
        nursery.cancel_scope.cancel()
    text = str(info.value)
    assert connections >= 2  # the refusal, then at least one attempt that was reset
    assert "(user/password)" in text and "the server said:" in text
    assert "Authorization Violation" in text and "Wrong-pw-3" not in text


async def test_user_and_password_from_config_and_a_wrong_password_is_named_not_shown(
    server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = server_factory(
        f'authorization {{ users: [ {{ user: "svc", password: "{PASSWORD}" }} ] }}\n'
    )
    await _join_and_exchange(None, NatsConfig(url=server.url, user="svc", password=PASSWORD))
    async with open_kernel(node_config()) as kernel:
        with trio.fail_after(30), pytest.raises(TransportUnavailable) as info:
            async with join_cluster(
                kernel,
                server.url,
                "a",
                options=FAST,
                auth=NatsAuth(user="svc", password="Wrong-pw-1"),
            ):
                pass
    text = str(info.value)
    assert "user/password" in text and "uthorization" in text  # "Authorization Violation"
    assert "Wrong-pw-1" not in text and info.value.__cause__ is None
    # the same with the credentials in the URL: the error shows the URL without them
    async with open_kernel(node_config()) as kernel:
        url = f"nats://svc:Wrong-pw-2@127.0.0.1:{server.port}"
        with trio.fail_after(30), pytest.raises(TransportUnavailable) as info:
            async with join_cluster(kernel, url, "a", options=FAST):
                pass
    assert f"nats://127.0.0.1:{server.port}" in str(info.value)
    assert "Wrong-pw-2" not in str(info.value)
    assert "Wrong-pw-1" not in caplog.text and PASSWORD not in caplog.text


async def test_token_auth(server_factory: Any) -> None:
    server = server_factory(token=TOKEN)
    await _join_and_exchange(server.url, NatsConfig(token=TOKEN))
    async with open_kernel(node_config()) as kernel:
        with trio.fail_after(30), pytest.raises(TransportUnavailable, match="no auth"):
            async with join_cluster(kernel, server.url, "a", options=FAST):
                pass


async def test_nkey_seed_auth(server_factory: Any, tmp_path: Path) -> None:
    seed_file, config = make_nkey_user(tmp_path)
    server = server_factory(config)
    await _join_and_exchange(server.url, NatsConfig(nkey_seed=seed_file))


async def test_creds_file_auth_in_operator_mode(server_factory: Any, tmp_path: Path) -> None:
    creds, config = make_creds(tmp_path)
    server = server_factory(config)
    await _join_and_exchange(server.url, NatsConfig(creds_file=creds))


async def test_tls_with_a_client_certificate(server_factory: Any, tmp_path: Path) -> None:
    files, config = make_tls(tmp_path)
    server = server_factory(config)
    await _join_and_exchange(server.url, NatsConfig(**files))
    # without the client certificate the server (verify: true) refuses the handshake
    async with open_kernel(node_config()) as kernel:
        with trio.fail_after(30), pytest.raises(TransportUnavailable, match="TLS"):
            async with join_cluster(
                kernel, server.url, "a", options=FAST, auth=NatsAuth(tls_ca=files["tls_ca"])
            ):
                pass


async def test_a_tls_handshake_that_fails_on_every_attempt_is_named_in_the_error(
    server_factory: Any, tmp_path: Path
) -> None:
    """A client that trusts another CA than the server's: each attempt's handshake fails
    (retried as a connection error until the connect's limit), and the error says why
    (before: only 'no answer within 11.6s'; Python 3.13's strict verification of a CA
    without key identifiers gave the same bare timeout)."""
    (tmp_path / "server").mkdir()
    (tmp_path / "other").mkdir()
    files, config = make_tls(tmp_path / "server")
    other, _ = make_tls(tmp_path / "other")
    server = server_factory(config)
    async with open_kernel(node_config()) as kernel:
        with trio.fail_after(60), pytest.raises(TransportUnavailable) as raised:
            async with join_cluster(
                kernel,
                server.url,
                "a",
                # (one round of attempts, 1 s each: every one fails the same way)
                options=attrs.evolve(FAST, connect_attempts=1, connect_timeout=1.0),
                auth=NatsAuth(
                    tls_ca=other["tls_ca"], tls_cert=files["tls_cert"], tls_key=files["tls_key"]
                ),
            ):
                pass
    assert "(no auth, TLS)" in str(raised.value)
    assert "certificate verify failed" in str(raised.value)


async def test_password_in_the_url_never_reaches_the_logs_across_a_reconnect(
    server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="nexus_trio")
    auth_config = f'authorization {{ users: [ {{ user: "svc", password: "{PASSWORD}" }} ] }}\n'
    server = server_factory(auth_config)
    url = f"nats://svc:{PASSWORD}@127.0.0.1:{server.port}"
    async with open_kernel(node_config()) as kernel:
        with trio.fail_after(60):
            async with join_cluster(kernel, url, "a", options=FAST) as cluster:
                assert cluster.servers == [server.url]
                server.kill()
                server_factory(auth_config, port=server.port)
                while True:  # polling the client's reconnect to the new server
                    if cluster.stats().reconnects >= 1:
                        break
                    await trio.sleep(0.05)
                await kernel.shutdown()
    reconnected = [r for r in caplog.records if "connection to NATS back" in r.getMessage()]
    assert reconnected, caplog.text
    assert PASSWORD not in caplog.text
    assert all(PASSWORD not in str(r.msg) and not r.args for r in reconnected)


def _nexus_run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexus_trio.cli", "run", "-n", "10", "-d", "0.5", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
        cwd=Path(__file__).parent,  # no ./config.toml of the repository
    )


def test_nexus_run_joins_with_url_and_token_from_the_environment(server_factory: Any) -> None:
    server = server_factory(token=TOKEN)
    result = _nexus_run(env={"NEXUS_NATS__URL": server.url, "NEXUS_NATS__TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert f"joined the cluster at {server.url}" in result.stderr
    assert TOKEN not in result.stderr + result.stdout


def test_nexus_run_never_logs_the_token_of_a_nats_url(server_factory: Any) -> None:
    server = server_factory(token=TOKEN)
    url = f"nats://{TOKEN}@127.0.0.1:{server.port}"
    result = _nexus_run("--nats", url, env={})
    assert result.returncode == 0, result.stderr
    assert f"joined the cluster at nats://{MASK}@127.0.0.1:{server.port}" in result.stderr
    assert TOKEN not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:4222", "scheme 'http' is not one of nats, tls, ws, wss"),
        ("nats://127.0.0.1:x", "port 'x' is not a number"),
        ("nats://127.0.0.1:0", "port 0 is not from 1 to 65535"),
        ("nats://u:pw-secret@/", "no host"),
    ],
)
def test_join_cluster_refuses_a_url_that_is_no_server_address_naming_it(
    url: str, problem: str
) -> None:
    """Before, the join handed it to nats-py, which tried 'http' as a host name or said
    'nats: invalid connect url option' (TransportUnavailable after its connect attempts)."""

    async def main() -> None:
        async with open_kernel() as kernel:
            with pytest.raises(ValueError, match=r"^NATS URL ") as caught:
                async with join_cluster(kernel, f"nats://127.0.0.1:4222,{url}", "n1"):
                    pass  # pragma: no cover
            text = str(caught.value)
            assert problem in text
            assert redact(url) in text
            assert "pw-secret" not in text

    trio.run(main)
