"""TLS to the Gateway: the CA that signed its certificate, and the client's own certificate
when the Gateway requires one (mutual TLS). ``add_arguments`` and ``from_args``: the command
lines' TLS options and settings (``cachemesh``, ``cachemesh-load``, the demo), read one way."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from cachemesh._argv import file_named

# how a message names each file setting: Tls's field, the command lines' flag, the variable
CA = "ca_file / --ca-file / CACHEMESH_CA_FILE"
CERT = "cert_file / --cert-file / CACHEMESH_CERT_FILE"
KEY = "key_file / --key-file / CACHEMESH_KEY_FILE"


def _pem(what: str, path: str | Path, block: str, setting: str) -> bytes:
    """The file's bytes; a ValueError naming the file (never its contents) and ``setting``
    when it cannot be read or holds no PEM ``block`` (gRPC takes any bytes, then every call
    waits out its deadline); a value that does not look like a path (a key pasted in place
    of its file) is not echoed."""
    named = file_named(path, setting)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {named} ({exc.strerror})") from None
    if not re.search(rb"-----BEGIN (?:[A-Z0-9]+ )?" + block.encode() + rb"-----", data):
        raise ValueError(
            f"the {what} {named} is not PEM: it holds no {block} block (-----BEGIN {block}-----)"
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
            root_certificates=None if ca is None else _pem("CA file", ca, "CERTIFICATE", CA),
            private_key=None if key is None else _pem("key file", key, "PRIVATE KEY", KEY),
            certificate_chain=None
            if cert is None
            else _pem("cert file", cert, "CERTIFICATE", CERT),
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


def is_loopback(target: str) -> bool:
    """Whether ``target`` names loopback addresses only (127.0.0.0/8, ::1 and its IPv4-mapped
    form, ``localhost``), in any form gRPC dials: ``host``, ``host:port``, ``[::1]``,
    ``[::1]:port``, ``::1``, ``dns:host:port``, ``dns:///host:port``, ``ipv4:`` and ``ipv6:``
    lists (every address loopback), ``localhost`` in any case. No name is resolved: a name
    other than ``localhost`` is not loopback (``localhost.``, ``127.1``: gRPC asks DNS for
    them), nor is ``localhost`` asked of a DNS server the target names (``dns://server/``)."""
    scheme, colon, rest = target.partition(":")
    if colon and scheme in ("dns", "ipv4", "ipv6"):
        authority = ""
        if rest.startswith("//"):
            authority, _, rest = rest[2:].partition("/")
        names = scheme == "dns" and not authority
        addresses = [rest] if scheme == "dns" else rest.split(",")
    else:
        names, addresses = True, [target]
    return all(_loopback_host(_host(address), names) for address in addresses)


def _host(address: str) -> str | None:
    """The host of ``address`` (``host``, ``host:port``, ``[v6]``, ``[v6]:port``, a bare IPv6
    address); None when it is none of those."""
    if address.startswith("["):
        host, bracket, port = address[1:].partition("]")
        if not bracket or (port and not (port[:1] == ":" and port[1:].isdigit())):
            return None
        return host
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def _loopback_host(host: str | None, names: bool) -> bool:
    """Whether ``host`` is a loopback address, or ``localhost`` in any case when ``names``.
    Not ``localhost.`` nor IPv4's short forms (``127.1``): gRPC's resolver asks DNS for those
    (checked: "hostname lookup error"), which may answer anything."""
    if host is None:
        return False
    if names and host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def is_local(target: str) -> bool:
    """Whether ``target`` stays on this host: loopback (``is_loopback``) or a Unix socket
    (``unix:``, ``unix-abstract:``)."""
    return is_loopback(target) or target.startswith(("unix:", "unix-abstract:"))


def cleartext_off_host(target: str, tls: Tls | None, insecure: bool) -> bool:
    """The one rule of the clients, the command lines and the demo: a channel to ``target``
    would carry its secrets in cleartext off this host (no ``tls``, ``target`` neither
    loopback nor a Unix socket), and ``insecure`` does not allow it."""
    return tls is None and not insecure and not is_local(target)


def refuse_plaintext(target: str, tls: Tls | None, insecure: bool, secret: str) -> None:
    """The clients' check (``Client``, ``AsyncClient``, ``AdminClient``): a ValueError naming
    ``target`` and the parameters that allow it when ``target`` is neither loopback nor a Unix
    socket and neither ``tls`` nor ``insecure`` is given, before a channel is made: ``secret``
    (the API key, the admin token), sent with every call, would cross the network in
    cleartext. The command lines check first with their own flags (``check_plaintext``). A
    ``target`` that is not a str is a TypeError (it was an AttributeError of its parsing)."""
    if not isinstance(target, str):
        raise TypeError(f"target must be a str, 'host:port', got {type(target).__name__}")
    if cleartext_off_host(target, tls, insecure):
        raise ValueError(
            f"target {target!r} is not loopback and tls is None: the {secret} would cross the "
            "network in cleartext with every call; pass tls=Tls(...) (Tls() for the system's "
            "CA roots), or insecure=True to allow it"
        )


def check_plaintext(
    target: str,
    tls: Tls | None,
    insecure: bool,
    secrets: str = "the API keys",
    *,
    env_allows: bool = True,
) -> None:
    """Refuses a non-loopback target in plaintext (``secrets``, the keys or token each call
    carries, in cleartext on the network) unless ``insecure`` (``--insecure``): a ValueError
    naming the target and the ways out, CACHEMESH_INSECURE among them only when
    ``env_allows`` (the API keys: not the admin token, which only ``--insecure`` allows). A
    Unix socket is local, as for the clients (``refuse_plaintext``)."""
    if cleartext_off_host(target, tls, insecure):
        allow = (
            f"--insecure (env {INSECURE_ENV}=1) to allow it"
            if env_allows
            else f"--insecure to allow it ({INSECURE_ENV} allows the API keys only)"
        )
        raise ValueError(
            f"--target {target} is not loopback and TLS is off: {secrets} would cross the "
            "network in cleartext; give --tls or --ca-file (env CACHEMESH_TLS, "
            f"CACHEMESH_CA_FILE), or {allow}"
        )


def env_bool(name: str) -> bool:
    """A true/false variable read as the services read theirs: unset or empty is false; any
    other value than 1/0, true/false, yes/no, on/off is an error naming the variable."""
    value = os.environ.get(name, "").strip()
    if value.lower() in ("", "0", "false", "no", "off"):
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be true or false (1/0, yes/no, on/off), got {value!r}")


INSECURE_ENV = "CACHEMESH_INSECURE"


def add_arguments(
    parser: argparse.ArgumentParser, insecure_sends: str, *, inherited: bool = False
) -> None:
    """``--ca-file``, ``--tls``, ``--cert-file``, ``--key-file`` (defaults from this
    environment's ``CACHEMESH_*`` settings) and ``--insecure``, whose help says what it lets
    this tool send in cleartext (``insecure_sends``); ``from_args`` reads the TLS ones,
    ``insecure_from_args`` the last (with ``CACHEMESH_INSECURE``, which allows API keys
    only). ``inherited``: ``parser`` is a subcommand's, the same flags given after it: each
    has no default (``argparse.SUPPRESS``), so one not given there leaves the value the
    command's own parser took (before the subcommand, or its default) as it was."""

    def default(value: str | bool | None) -> str | bool | None:
        return argparse.SUPPRESS if inherited else value

    parser.add_argument(
        "--insecure",
        action="store_true",
        default=default(False),
        help="permit a target that is neither loopback nor a Unix socket in plaintext "
        f"({insecure_sends})",
    )
    parser.add_argument(
        "--ca-file",
        default=default(os.environ.get("CACHEMESH_CA_FILE")),
        help="TLS: the CA that signed the Gateway's certificate, PEM (env CACHEMESH_CA_FILE)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="TLS with the system's CA roots (implied by --ca-file; env CACHEMESH_TLS: "
        "1/0, true/false, yes/no, on/off)",
    )
    parser.add_argument(
        "--cert-file",
        default=default(os.environ.get("CACHEMESH_CERT_FILE")),
        help="mutual TLS: this client's certificate, PEM (env CACHEMESH_CERT_FILE)",
    )
    parser.add_argument(
        "--key-file",
        default=default(os.environ.get("CACHEMESH_KEY_FILE")),
        help="mutual TLS: this client's private key, PEM (env CACHEMESH_KEY_FILE)",
    )


def insecure_from_args(args: argparse.Namespace) -> bool:
    """Whether plaintext off this host is allowed for the API keys: ``--insecure`` or
    ``CACHEMESH_INSECURE``, the one setting of ``cachemesh``, ``cachemesh-load`` and the demo
    (which takes no flags); the admin token needs ``--insecure`` itself (``cachemesh admin``;
    ``cachemesh-load`` never sends it so). A malformed CACHEMESH_INSECURE is a ValueError
    naming it, ``--insecure`` or not (as CACHEMESH_TLS is for ``--tls``)."""
    return env_bool(INSECURE_ENV) or bool(args.insecure)


def from_args(args: argparse.Namespace) -> Tls | None:
    """TLS when asked for in any way: --tls (or CACHEMESH_TLS) or a file given; a file setting
    that is present but empty is an error (never a silent fall back to plaintext)."""
    asked = env_bool("CACHEMESH_TLS") or args.tls  # checked even with --tls
    for flag, variable, value in (
        ("--ca-file", "CACHEMESH_CA_FILE", args.ca_file),
        ("--cert-file", "CACHEMESH_CERT_FILE", args.cert_file),
        ("--key-file", "CACHEMESH_KEY_FILE", args.key_file),
    ):
        if value is not None and not value.strip():
            raise ValueError(
                f"{flag} (env {variable}) is empty: give the PEM file's path, or unset {variable}"
            )
    if (args.cert_file is None) != (args.key_file is None):
        raise ValueError("a client certificate needs --cert-file and --key-file")
    if asked or args.ca_file is not None or args.cert_file is not None:
        return Tls(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    return None
