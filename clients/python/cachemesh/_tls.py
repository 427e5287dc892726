"""TLS to the Gateway: the CA that signed its certificate, and the client's own certificate
when the Gateway requires one (mutual TLS)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc


def _pem(what: str, path: str | Path, block: str) -> bytes:
    """The file's bytes; a ValueError naming the file (never its contents) when it cannot be
    read or holds no PEM ``block`` (gRPC takes any bytes, then every call waits out its
    deadline)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path} ({exc.strerror})") from None
    if not re.search(rb"-----BEGIN (?:[A-Z0-9]+ )?" + block.encode() + rb"-----", data):
        raise ValueError(
            f"the {what} {path} is not PEM: it holds no {block} block (-----BEGIN {block}-----)"
        )
    return data


@dataclass(frozen=True)
class Tls:
    """``ca_file``: PEM of the CA that signed the Gateway's certificate (None = the system's
    roots); ``cert_file`` and ``key_file``: this client's certificate and key, both or none.
    ``credentials()`` (each client calls it) raises ValueError naming a file that cannot be
    read or is not PEM (no CERTIFICATE block in a CA or cert file, no PRIVATE KEY block in
    the key file)."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        ca, cert, key = self.ca_file, self.cert_file, self.key_file
        return grpc.ssl_channel_credentials(
            root_certificates=None if ca is None else _pem("CA file", ca, "CERTIFICATE"),
            private_key=None if key is None else _pem("key file", key, "PRIVATE KEY"),
            certificate_chain=None if cert is None else _pem("cert file", cert, "CERTIFICATE"),
        )


Options = Sequence[tuple[str, int | str]]


def sync_channel(target: str, tls: Tls | None, options: Options = ()) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options)


def aio_channel(target: str, tls: Tls | None, options: Options = ()) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.credentials(), options=options)
