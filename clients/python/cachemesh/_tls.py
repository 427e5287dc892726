"""TLS to the Gateway: the CA that signed its certificate, and the client's own certificate
when the Gateway requires one (mutual TLS)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc


def _pem(what: str, path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path} ({exc.strerror})") from None


@dataclass(frozen=True)
class Tls:
    """``ca_file``: PEM of the CA that signed the Gateway's certificate (None = the system's
    roots); ``cert_file`` and ``key_file``: this client's certificate and key, both or none."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        return grpc.ssl_channel_credentials(
            root_certificates=None if self.ca_file is None else _pem("CA file", self.ca_file),
            private_key=None if self.key_file is None else _pem("key file", self.key_file),
            certificate_chain=None if self.cert_file is None else _pem("cert file", self.cert_file),
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
