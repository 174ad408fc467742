"""Throwaway credentials for the NATS auth tests: a CA with server and client certificates
(``cryptography``), NKEY users and a decentralised-auth setup with a creds file (``nkeys``).

Each helper writes files into a directory the test owns and returns the nats-server
configuration text that uses them (for :class:`NatsServer`'s ``config``).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Any

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _issue(
    subject: str,
    issuer_name: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        # key identifiers: Python 3.13's default context verifies strictly (RFC 5280,
        # VERIFY_X509_STRICT) and refuses a chain without them ("Missing Authority Key
        # Identifier"), as a real CA's certificates have them
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls(directory: Path) -> tuple[dict[str, str], str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.

    Returns the client's file paths (``tls_ca``, ``tls_cert``, ``tls_key``) and the
    server configuration: TLS required, client certificates verified against the CA.
    """
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("nexus test CA", _name("nexus test CA"), ca_key, ca_key, ca=True)
    files: dict[str, str] = {}
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files["tls_ca"] = str(directory / "ca.pem")
    for role, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(f"nexus test {role}", ca_cert.subject, ca_key, key, usage=usage)
        (directory / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(directory / f"{role}-key.pem", key)
    files["tls_cert"] = str(directory / "client.pem")
    files["tls_key"] = str(directory / "client-key.pem")
    config = f"""
tls {{
  cert_file: {json.dumps(str(directory / "server.pem"))}
  key_file: {json.dumps(str(directory / "server-key.pem"))}
  ca_file: {json.dumps(str(directory / "ca.pem"))}
  verify: true
  timeout: 5
}}
"""
    return files, config


def _new_keys(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def make_nkey_user(directory: Path) -> tuple[str, str]:
    """An NKEY user: the path of its seed file and the server configuration allowing it."""
    user = _new_keys(nkeys.PREFIX_BYTE_USER)
    seed_file = directory / "user.nk"
    seed_file.write_bytes(bytes(user.seed) + b"\n")
    seed_file.chmod(0o600)
    config = f"authorization {{ users: [ {{ nkey: {user.public_key.decode()} }} ] }}\n"
    return str(seed_file), config


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(claims: dict[str, Any], signer: nkeys.KeyPair) -> str:
    """A NATS JWT (v2): ``ed25519-nkey`` signed by ``signer``; ``jti`` as nats-io/jwt
    makes it (base32 of SHA-512/256 of the claims without it)."""
    claims = {"iat": int(time.time()), "iss": signer.public_key.decode(), **claims, "jti": ""}
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode())
    claims["jti"] = base64.b32encode(digest.digest()).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = signer.sign(f"{header}.{body}".encode())
    return f"{header}.{body}.{_b64(signature)}"


def make_creds(directory: Path) -> tuple[str, str]:
    """Decentralised auth: an operator, an account with JetStream and a user, the user's
    creds file (its JWT and seed); returns the creds path and the server configuration
    (operator mode, the account preloaded into a memory resolver)."""
    operator = _new_keys(nkeys.PREFIX_BYTE_OPERATOR)
    account = _new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
    system = _new_keys(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream needs a system account
    user = _new_keys(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    operator_jwt = _jwt(
        {
            "name": "nexus-test-operator",
            "sub": operator.public_key.decode(),
            "nats": {"type": "operator", "version": 2},
        },
        operator,
    )
    account_jwt = _jwt(
        {
            "name": "nexus-test-account",
            "sub": account.public_key.decode(),
            "nats": {
                "type": "account",
                "version": 2,
                "limits": {
                    **unlimited,
                    "wildcards": True,
                    "conn": -1,
                    "leaf": -1,
                    **jetstream,
                },
            },
        },
        operator,
    )
    system_jwt = _jwt(
        {
            "name": "SYS",
            "sub": system.public_key.decode(),
            "nats": {"type": "account", "version": 2, "limits": unlimited},
        },
        operator,
    )
    user_jwt = _jwt(
        {
            "name": "nexus-test-user",
            "sub": user.public_key.decode(),
            "nats": {"type": "user", "version": 2, "pub": {}, "sub": {}, **unlimited},
        },
        account,
    )
    creds = directory / "user.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{bytes(user.seed).decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    creds.chmod(0o600)
    config = (
        f"operator: {json.dumps(operator_jwt)}\n"
        f"system_account: {system.public_key.decode()}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{ {account.public_key.decode()}: {json.dumps(account_jwt)},"
        f" {system.public_key.decode()}: {json.dumps(system_jwt)} }}\n"
    )
    return str(creds), config
