"""What docker-compose.yml puts into the containers' environment: no admin token, internal
token or Redis password (each a mounted secret instead, read through its ``*_FILE``), none
of the credentials ``make up`` keeps from a service (``OUTSIDE_SECRETS``) whatever ``.env``
holds, and the proxy exceptions that keep the traces to Jaeger off a proxy Docker's client
configured. The environment is what ``docker inspect`` shows to anyone allowed to run it."""

from __future__ import annotations

import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from services.common.auth import internal_token_from_env
from services.common.env import Env
from services.router.admin_auth import admin_credential_from_env
from services.tools.stack.lifecycle import OUTSIDE_SECRETS
from services.tools.stack.service_table import SERVICES
from tests.unit.compose_config import ROOT, Resolved, resolve


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> Resolved:
    return resolve(tmp_path_factory.mktemp("compose-secrets"))


def _secret_sources(resolved: Resolved, name: str) -> dict[str, Path]:
    """Container path -> the host file compose mounts there (a file-based secret)."""
    files = resolved.config.get("secrets", {})
    return {
        f"/run/secrets/{s['target']}": Path(files[s["source"]]["file"])
        for s in resolved.service(name).get("secrets", [])
    }


def test_the_admin_token_reaches_the_router_as_a_mounted_file_only(resolved: Resolved) -> None:
    token = resolved.keys.admin_token
    for name, svc in resolved.config["services"].items():
        shown = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        assert not any(token in v for v in shown.values()), f"{name}: the token in its env"
    env = resolved.service("router")["environment"]
    path = env["CACHEMESH_ADMIN_TOKEN_FILE"]
    assert _secret_sources(resolved, "router")[path] == resolved.keys.admin_token_file
    # what the router makes of it, the mounted file read where it lies on this host
    here = {k: str(v) for k, v in env.items()} | {
        "CACHEMESH_ADMIN_TOKEN_FILE": str(resolved.keys.admin_token_file)
    }
    credential = admin_credential_from_env(Env(here), resolved.keys.internal_token)
    assert credential is not None and credential.matches(token)
    for spec in SERVICES:
        if spec.name != "router":
            assert path not in _secret_sources(resolved, spec.name), spec.name


def test_the_mounted_secrets_are_readable_in_the_containers_and_private_here(
    resolved: Resolved,
) -> None:
    # compose v1 bind-mounts a secret as it is on the host (its mode/uid settings ignored):
    # the containers' user (uid 10001) reads it only if others may; .run (0700) keeps it
    # from this host's other users, as for api-keys
    run_dir = resolved.keys.admin_token_file.parent
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    for name in ("admin-token", "internal-token", "redis-password"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o644, name


def _here(resolved: Resolved, name: str) -> dict[str, str]:
    """``name``'s container environment with each mounted secret's path the host file's."""
    mounts = _secret_sources(resolved, name)
    env = {k: str(v) for k, v in resolved.service(name)["environment"].items()}
    return {k: str(mounts.get(v, v)) if k.endswith("_FILE") else v for k, v in env.items()}


def test_the_internal_token_reaches_the_mesh_as_a_mounted_file_only(resolved: Resolved) -> None:
    """It was in every internal container's environment (CACHEMESH_INTERNAL_TOKEN, from
    .run/internal.env): ``docker inspect`` showed it."""
    token = resolved.keys.internal_token
    for name, svc in resolved.config["services"].items():
        shown = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        assert not any(token in v for v in shown.values()), f"{name}: the token in its env"
    for spec in SERVICES:
        mounts = _secret_sources(resolved, spec.name)
        path = resolved.service(spec.name)["environment"].get("CACHEMESH_INTERNAL_TOKEN_FILE")
        if not spec.internal:
            assert not path and not any(p.name == "internal-token" for p in mounts.values())
            continue
        assert mounts[path] == resolved.run_dir / "internal-token", spec.name
        # what the service makes of it, the mounted file read where it lies on this host
        assert internal_token_from_env(Env(_here(resolved, spec.name))) == token, spec.name


def test_the_redis_password_reaches_redis_and_its_users_as_a_mounted_file_only(
    resolved: Resolved,
) -> None:
    """It was in the redis container's environment (REDISCLI_AUTH) and in the router's and
    prefix-cache's Redis URLs (from .run/redis.env and .run/redis-urls.env)."""
    password = resolved.keys.redis_password
    for name, svc in resolved.config["services"].items():
        shown = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        assert not any(password in v for v in shown.values()), f"{name}: the password in its env"
    secret = resolved.run_dir / "redis-password"
    assert _secret_sources(resolved, "redis") == {"/run/secrets/cachemesh-redis-password": secret}
    users: dict[str, tuple[str, ...]] = {"prefix-cache": ("PREFIX_CACHE_REDIS_URL",)}
    users["router"] = ("ROUTER_LIMITS_REDIS_URL", "ROUTER_ANSWERS_REDIS_URL")
    for spec in SERVICES:
        mounts = _secret_sources(resolved, spec.name)
        if spec.name not in users:
            assert secret not in mounts.values(), spec.name
            continue
        env = Env(_here(resolved, spec.name))
        for var in users[spec.name]:
            url = env.redis_url(var)
            assert url is not None and unquote(urlsplit(url).password or "") == password, var


# what an operator's .env may hold for `make up` (or by mistake): none of it reaches a
# container that `make up` would not give it
DOTENV_SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-in-dotenv-0123456789",
    "ANTHROPIC_API_KEY_FILE": "/etc/cachemesh/anthropic-key-in-dotenv",
    "OPENAI_API_KEY": "sk-openai-in-dotenv-0123456789",
    "OPENAI_API_KEY_FILE": "/etc/cachemesh/openai-key-in-dotenv",
    "CACHEMESH_ADMIN_TOKEN": "admin-token-in-dotenv-0123456789",
    "CACHEMESH_ADMIN_TOKEN_FILE": "/etc/cachemesh/admin-token-in-dotenv",
    "CACHEMESH_INTERNAL_TOKEN": "internal-token-in-dotenv-0123456789",
    "CACHEMESH_INTERNAL_TOKEN_FILE": "/etc/cachemesh/internal-token-in-dotenv",
    "CACHEMESH_REDIS_PASSWORD_FILE": "/etc/cachemesh/redis-password-in-dotenv",
}


def test_outside_secrets_in_dotenv_reach_no_container(tmp_path: Path) -> None:
    assert set(DOTENV_SECRETS) == set(OUTSIDE_SECRETS)
    extra = "".join(f"\n{k}={v}" for k, v in DOTENV_SECRETS.items()) + "\n"
    resolved = resolve(tmp_path, extra)
    for name, svc in resolved.config["services"].items():
        shown = [str(v) for v in (svc.get("environment") or {}).values()]
        leaked = [k for k, v in DOTENV_SECRETS.items() if any(v in s for s in shown)]
        assert not leaked, f"{name} gets {leaked} from .env"
    redis = "CACHEMESH_REDIS_PASSWORD_FILE"
    given = {"router": {"CACHEMESH_ADMIN_TOKEN_FILE", redis}, "prefix-cache": {redis}}
    for spec in SERVICES:
        env = Env({k: str(v) for k, v in resolved.service(spec.name)["environment"].items()})
        own = given.get(spec.name, set())
        if spec.internal:
            own = own | {"CACHEMESH_INTERNAL_TOKEN_FILE"}
        # empty reads as unset (services.common.env.Env)
        assert {k for k in OUTSIDE_SECRETS if env.optional_str(k) is not None} == own, spec.name
    # the router still starts: the .env token is blanked, the mounted one read
    router = {k: str(v) for k, v in resolved.service("router")["environment"].items()}
    router["CACHEMESH_ADMIN_TOKEN_FILE"] = str(resolved.keys.admin_token_file)
    assert admin_credential_from_env(Env(router), resolved.keys.internal_token) is not None


def _no_proxy(env: dict[str, object], name: str) -> set[str]:
    return {h.strip() for h in str(env.get(name, "")).split(",") if h.strip()}


def test_calls_inside_the_network_bypass_a_proxy_docker_configured(resolved: Resolved) -> None:
    """docker-compose puts the client's proxies (~/.docker/config.json) into every container;
    gRPC follows https_proxy unless no_proxy names the host: model-2's spans to
    http://jaeger:4317 went to the proxy and were lost."""
    names = set(resolved.config["services"])
    for spec in SERVICES:
        env = resolved.service(spec.name)["environment"]
        collector = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).hostname
        for var in ("no_proxy", "NO_PROXY"):  # gRPC reads the first, other clients the second
            hosts = _no_proxy(env, var)
            assert collector in hosts, (spec.name, var)
            assert names | {"localhost", "127.0.0.1"} <= hosts, (spec.name, var)


def test_the_stop_grace_covers_the_drain_and_says_how_to_keep_it_so(resolved: Resolved) -> None:
    """``stop_grace_period`` is fixed while ``CACHEMESH_GRACE_S`` comes from ``.env``: the
    default fits (the runner's ``max(15, grace + 5)``), and the README's compose section says
    to raise it with the grace, or a raised drain is cut by SIGKILL."""
    grace = float(resolved.dotenv["CACHEMESH_GRACE_S"])
    for spec in SERVICES:
        period = resolved.service(spec.name)["stop_grace_period"]
        assert float(period.removesuffix("s")) >= max(15.0, grace + 5), spec.name
    readme = (ROOT / "README.md").read_text()
    compose = readme.split("## Docker compose", 1)[1].split("\n## ", 1)[0]
    assert "`stop_grace_period`" in compose and "`CACHEMESH_GRACE_S + 5`" in compose
