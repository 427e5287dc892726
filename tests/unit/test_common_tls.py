"""TLS settings (services.common.tls) checked at start-up, with certificates made here."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from services.common.env import ConfigError, Env
from services.common.tls import ClientTls, ServerTls
from tests.certs import Authority, Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Issued, Issued]:
    authority = Authority(tmp_path_factory.mktemp("pki"))
    return authority.ca, authority.issue("server", server=True), authority.issue("c", server=False)


def test_good_settings_give_credentials(pki: tuple[Path, Issued, Issued]) -> None:
    ca, server, _ = pki
    tls = ServerTls.read(
        Env(
            {
                "ROUTER_TLS_CERT_FILE": str(server.cert),
                "ROUTER_TLS_KEY_FILE": str(server.key),
                "ROUTER_TLS_CLIENT_CA_FILE": str(ca),
            }
        ),
        "ROUTER",
    )
    assert tls is not None and tls.mutual and tls.describe() == "TLS, client certificates required"
    assert (
        tls.grpc_credentials() is not None and tls.ssl_context().verify_mode.name == "CERT_REQUIRED"
    )
    plain = ServerTls.read(
        Env({"P_TLS_CERT_FILE": str(server.cert), "P_TLS_KEY_FILE": str(server.key)}), "P"
    )
    assert plain is not None and not plain.mutual
    dial = ClientTls.read(Env({"G_TLS_CA_FILE": str(ca)}), "G")
    assert dial is not None and dial.ca == ca.read_bytes() and dial.cert_chain is None


def test_bad_tls_settings_fail_at_start_up_naming_the_variable(
    pki: tuple[Path, Issued, Issued], tmp_path: Path
) -> None:
    ca, server, client = pki
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    cases = [
        ({"ROUTER_TLS_CERT_FILE": str(server.cert)}, "ROUTER_TLS_KEY_FILE"),
        ({"ROUTER_TLS_CLIENT_CA_FILE": str(ca)}, "ROUTER_TLS_CLIENT_CA_FILE"),
        (  # a key that is not the certificate's
            {"ROUTER_TLS_CERT_FILE": str(server.cert), "ROUTER_TLS_KEY_FILE": str(client.key)},
            "ROUTER_TLS_KEY_FILE",
        ),
        (
            {"ROUTER_TLS_CERT_FILE": str(tmp_path / "no"), "ROUTER_TLS_KEY_FILE": str(server.key)},
            "ROUTER_TLS_CERT_FILE",
        ),
        (
            {"ROUTER_TLS_CERT_FILE": str(not_pem), "ROUTER_TLS_KEY_FILE": str(server.key)},
            "ROUTER_TLS_CERT_FILE",
        ),
        (
            {
                "ROUTER_TLS_CERT_FILE": str(server.cert),
                "ROUTER_TLS_KEY_FILE": str(server.key),
                "ROUTER_TLS_CLIENT_CA_FILE": str(server.key),
            },
            "ROUTER_TLS_CLIENT_CA_FILE",
        ),
    ]
    for environ, named in cases:
        with pytest.raises(ConfigError, match=named):
            ServerTls.read(Env(environ), "ROUTER")
    with pytest.raises(ConfigError, match="G_TLS_CERT_FILE"):
        ClientTls.read(Env({"G_TLS_KEY_FILE": str(client.key)}), "G")
    assert ServerTls.read(Env({}), "ROUTER") is None
    assert ClientTls.read(Env({}), "G") is None


def test_an_encrypted_key_is_refused_naming_it_not_prompted_for(
    pki: tuple[Path, Issued, Issued], tmp_path: Path
) -> None:
    """OpenSSL would prompt for the pass phrase on a terminal (start-up hangs), or fail with
    'Invalid argument' without one: the message says the key is encrypted and what to do."""
    _, server, _ = pki
    key = serialization.load_pem_private_key(server.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass phrase"),
        )
    )
    env = Env({"ROUTER_TLS_CERT_FILE": str(server.cert), "ROUTER_TLS_KEY_FILE": str(encrypted)})
    with pytest.raises(ConfigError, match=r"ROUTER_TLS_KEY_FILE.*private key is encrypted"):
        ServerTls.read(env, "ROUTER")
