"""TLS from certificate and key files: a server's (the Gateway, the HTTP front) and a client's.

Read and checked at start-up: a certificate without its key (or a key without its
certificate), an unreadable file, a file that is not PEM, or a key that does not match its
certificate fails fast naming the variable. With a client CA file the server requires a
client certificate signed by that CA (mutual TLS).

Variables, for a server with prefix ``P`` (ROUTER, HTTP_FRONT): ``P_TLS_CERT_FILE`` (the
certificate chain, PEM), ``P_TLS_KEY_FILE`` (its private key, PEM), ``P_TLS_CLIENT_CA_FILE``
(optional: the CA client certificates must chain to). For a client with prefix ``P``:
``P_TLS_CA_FILE`` (the CA that signed the server's certificate), ``P_TLS_CERT_FILE`` and
``P_TLS_KEY_FILE`` (optional: the client's certificate, for a server that asks for one).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.env import ConfigError, Env

_PEM = b"-----BEGIN "


def _read_pem(name: str, value: str) -> bytes:
    try:
        data = Path(value).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}={value}: cannot read it ({exc.strerror})") from None
    if _PEM not in data:
        raise ConfigError(f"{name}={value}: not a PEM file (no '-----BEGIN' line)")
    return data


def _pair(env: Env, prefix: str) -> tuple[str, str] | None:
    cert_var, key_var = f"{prefix}_TLS_CERT_FILE", f"{prefix}_TLS_KEY_FILE"
    cert, key = env.optional_str(cert_var), env.optional_str(key_var)
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing = cert_var if cert is None else key_var
        present = key_var if cert is None else cert_var
        raise ConfigError(f"{present} is set but {missing} is not: TLS needs both")
    return cert, key


class _Encrypted(Exception):
    """OpenSSL asked for the key's pass phrase."""


def _no_pass_phrase() -> str:
    raise _Encrypted


def _check_pair(prefix: str, cert: str, key: str) -> None:
    """Loads the pair as OpenSSL will, so a key that does not match fails here. An encrypted
    key is refused (never a pass phrase prompt on the terminal: gRPC cannot use one)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, _no_pass_phrase)
    except _Encrypted:
        raise ConfigError(
            f"{prefix}_TLS_KEY_FILE={key}: the private key is encrypted; give it unencrypted "
            "(PEM, e.g. `openssl pkey -in key.pem -out plain.pem`) on a file only this "
            "service can read"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{prefix}_TLS_CERT_FILE / {prefix}_TLS_KEY_FILE: not a certificate and its "
            f"private key ({exc})"
        ) from None


def _check_ca(name: str, path: str) -> None:
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{name}={path}: not a CA certificate ({exc})") from None


@dataclass(frozen=True)
class ServerTls:
    cert_file: str
    key_file: str
    client_ca_file: str | None  # set = a client certificate signed by this CA is required
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None

    @classmethod
    def read(cls, env: Env, prefix: str) -> ServerTls | None:
        """None when neither file is set (plaintext)."""
        ca_var = f"{prefix}_TLS_CLIENT_CA_FILE"
        ca = env.optional_str(ca_var)
        pair = _pair(env, prefix)
        if pair is None:
            if ca is not None:
                raise ConfigError(
                    f"{ca_var} is set but {prefix}_TLS_CERT_FILE and {prefix}_TLS_KEY_FILE are "
                    "not: client certificates need TLS"
                )
            return None
        cert, key = pair
        chain = _read_pem(f"{prefix}_TLS_CERT_FILE", cert)
        private = _read_pem(f"{prefix}_TLS_KEY_FILE", key)
        _check_pair(prefix, cert, key)
        client_ca = None
        if ca is not None:
            client_ca = _read_pem(ca_var, ca)
            _check_ca(ca_var, ca)
        return cls(cert, key, ca, chain, private, client_ca)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.mutual,
        )

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            context.load_verify_locations(cafile=self.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def describe(self) -> str:
        return "TLS, client certificates required" if self.mutual else "TLS"


@dataclass(frozen=True)
class ClientTls:
    ca: bytes | None  # None = the system's roots
    cert_chain: bytes | None
    private_key: bytes | None

    @classmethod
    def read(cls, env: Env, prefix: str) -> ClientTls | None:
        """None when none of the files is set (plaintext)."""
        ca_var = f"{prefix}_TLS_CA_FILE"
        ca = env.optional_str(ca_var)
        pair = _pair(env, prefix)
        if ca is None and pair is None:
            return None
        ca_pem = None
        if ca is not None:
            ca_pem = _read_pem(ca_var, ca)
            _check_ca(ca_var, ca)
        if pair is None:
            return cls(ca_pem, None, None)
        cert, key = pair
        chain = _read_pem(f"{prefix}_TLS_CERT_FILE", cert)
        private = _read_pem(f"{prefix}_TLS_KEY_FILE", key)
        _check_pair(prefix, cert, key)
        return cls(ca_pem, chain, private)

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca,
            private_key=self.private_key,
            certificate_chain=self.cert_chain,
        )
