"""docker-compose.yml runs what ``make up`` runs: same services, commands and settings.

``docker-compose config`` (the Debian package; ``make test-deps`` installs it) validates and
resolves the file; the result is compared with the stack runner's table. A missing
docker-compose fails the test: the compose file is never left unchecked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from services.tools.stack.environment import port_of
from services.tools.stack.lifecycle import Stack
from services.tools.stack.ports import relocate
from services.tools.stack.service_table import SERVICES, ServiceDef
from tests.unit.compose_config import ROOT, Resolved, resolve

JAEGER_OTLP = "http://jaeger:4317"


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Resolved]:
    yield resolve(tmp_path_factory.mktemp("compose"))


# The README's "Real models" settings for Anthropic, put in .env (which compose reads too)
ANTHROPIC_DOTENV = """
MODEL_BACKEND=anthropic
ANTHROPIC_API_KEY_FILE=/run/secrets/anthropic
MODEL_IDS=claude-haiku-4-5,claude-sonnet-4-5
MODEL_2_IDS=claude-sonnet-4-5
CACHEMESH_AUTO_SMALL=claude-haiku-4-5
CACHEMESH_AUTO_LARGE=claude-sonnet-4-5
CACHEMESH_AUTO_TIERS=medium=claude-sonnet-4-5
"""


def test_compose_serves_the_simulator_whatever_dotenv_says_of_models(tmp_path: Path) -> None:
    # With the Anthropic settings in .env, model-2 kept MODEL_IDS=sim-large under
    # MODEL_BACKEND=anthropic (exit, restart, forever) and the router routed `auto` to models
    # no replica of its MODEL_REPLICAS serves: compose runs the simulator only, wired together.
    resolved = resolve(tmp_path, ANTHROPIC_DOTENV)
    ids = {"model": "sim-small,sim-large", "model-2": "sim-large"}
    for name, served in ids.items():
        env = resolved.service(name)["environment"]
        assert (env["MODEL_BACKEND"], env["MODEL_IDS"]) == ("simulated", served)
    for spec in SERVICES:
        env = resolved.service(spec.name)["environment"]
        auto = {k: env.get(k) for k in ("CACHEMESH_AUTO_SMALL", "CACHEMESH_AUTO_LARGE")}
        assert auto | {"tiers": env.get("CACHEMESH_AUTO_TIERS")} == dict.fromkeys(
            (*auto, "tiers"), ""
        ), spec.name  # empty: the table's own tiers, sim-small and sim-large


def test_same_services_as_the_stack_plus_redis_jaeger_prometheus_grafana(
    resolved: Resolved,
) -> None:
    extra = {"redis", "jaeger", "prometheus", "grafana"}
    assert set(resolved.config["services"]) == {s.name for s in SERVICES} | extra


@pytest.mark.parametrize("name", [*(s.name for s in SERVICES), "redis"])
def test_every_service_restarts_when_it_dies(resolved: Resolved, name: str) -> None:
    assert resolved.service(name)["restart"] == "unless-stopped"


def test_prefix_cache_keeps_its_bills_in_redis_that_fsyncs_every_write(
    resolved: Resolved,
) -> None:
    prefix = resolved.service("prefix-cache")
    assert prefix["environment"]["PREFIX_CACHE_REDIS_URL"] == "redis://redis:6379/0"
    assert prefix["depends_on"]["redis"] == {"condition": "service_healthy"}
    redis = resolved.service("redis")
    script = _redis_script(redis)
    assert "redis-server - --appendonly yes --appendfsync always --save ''" in script
    assert [v.split(":")[:2] for v in redis["volumes"]] == [["redis-data", "/data"]]
    assert not redis.get("ports")  # inside the network only


def _redis_script(redis: dict[str, Any]) -> str:
    """The redis service's ``sh -c`` script (``docker-compose config`` shows a $ as $$)."""
    shell, flag, script = redis["command"]
    assert (shell, flag) == ("sh", "-c")
    return str(script).replace("$$", "$")


def test_compose_redis_requires_the_password_only_the_services_using_it_hold(
    resolved: Resolved,
) -> None:
    """It had none, on the network the internet-facing HTTP front shares: any code run there
    could read every tenant's answers and rewrite bills."""
    password = resolved.keys.redis_password
    redis = resolved.service("redis")
    # a mounted file (tests/unit/test_compose_secrets.py), never in an environment
    assert not any(password in str(v) for v in (redis.get("environment") or {}).values())
    script = _redis_script(redis)
    # the password into the config on stdin, never onto the command line (ps shows argv)
    assert script.startswith("exec docker-entrypoint.sh redis-server - ")
    assert f"<<EOF\nrequirepass $(cat {REDIS_SECRET})\nEOF" in script
    assert password not in script
    # PONG only with the password (test_compose_healthchecks.py runs it)
    check = f'REDISCLI_AUTH="$$(cat {REDIS_SECRET})" redis-cli ping | grep -qx PONG'
    assert redis["healthcheck"]["test"] == ["CMD-SHELL", check]
    urls = {
        "prefix-cache": {"PREFIX_CACHE_REDIS_URL": 0},
        "router": {"ROUTER_LIMITS_REDIS_URL": 1, "ROUTER_ANSWERS_REDIS_URL": 2},
    }
    for spec in SERVICES:
        env = resolved.service(spec.name)["environment"]
        for var, db in urls.get(spec.name, {}).items():
            assert env[var] == f"redis://redis:6379/{db}", var  # the password from the file
            assert env["CACHEMESH_REDIS_PASSWORD_FILE"] == REDIS_SECRET
        if spec.name not in urls:
            assert not env.get("CACHEMESH_REDIS_PASSWORD_FILE"), spec.name
        assert not any(password in str(v) for v in env.values()), spec.name


REDIS_SECRET = "/run/secrets/cachemesh-redis-password"
INTERNAL_SECRET = "/run/secrets/cachemesh-internal-token"


def test_router_keeps_its_billing_outbox_in_a_named_volume(resolved: Resolved) -> None:
    router = resolved.service("router")
    data_dir = router["environment"]["ROUTER_DATA_DIR"]
    volumes = [v.split(":")[:2] for v in router["volumes"]]
    assert [v for v in volumes if v[0] == "router-data"] == [["router-data", data_dir]]
    assert "router-data" in resolved.config["volumes"]


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_command_and_build_match_the_runner(resolved: Resolved, spec: ServiceDef) -> None:
    svc = resolved.service(spec.name)
    assert svc["command"] == list(spec.command)
    dockerfile = f"services/{spec.package}/Dockerfile"
    assert svc["build"] == {"context": str(resolved.work), "dockerfile": dockerfile}
    assert (ROOT / dockerfile).is_file(), f"{dockerfile} is missing"
    cmd_lines = [ln for ln in (ROOT / dockerfile).read_text().splitlines() if ln.startswith("CMD")]
    assert [json.loads(ln.removeprefix("CMD").strip()) for ln in cmd_lines] == [list(spec.command)]


def _container_overrides(resolved: Resolved, spec: ServiceDef) -> dict[str, str]:
    dial = {s.name: f"{s.name}:{resolved.port(s)}" for s in SERVICES}
    moved = relocate(
        resolved.dotenv,
        {spec.name: f"0.0.0.0:{resolved.port(spec)}"},
        dial,
        {spec.name: f"0.0.0.0:{resolved.metrics_port(spec)}"},  # scraped from the network
    )
    overrides = {k: v for k, v in moved.items() if k in spec.env_keys}
    overrides = {k: v for k, v in spec.process_env(overrides).items() if k in spec.env_keys}
    # state on the containers' volumes; prefix-cache's Redis is the compose service
    container_paths = {
        "SEMANTIC_CACHE_DATA_DIR": "/var/lib/cachemesh/semantic-cache",
        "ROUTER_DATA_DIR": "/var/lib/cachemesh/router",
        # the password in the mounted file (CACHEMESH_REDIS_PASSWORD_FILE), not in the URLs
        "PREFIX_CACHE_REDIS_URL": "redis://redis:6379/0",
        "ROUTER_ANSWERS_REDIS_URL": "redis://redis:6379/2",
        "ROUTER_LIMITS_REDIS_URL": "redis://redis:6379/1",
        "CACHEMESH_REDIS_PASSWORD_FILE": REDIS_SECRET,
    }
    overrides |= {k: v for k, v in container_paths.items() if k in spec.env_keys}
    if spec.internal:  # the internal token, a mounted file too: none in the environment
        overrides |= {
            "CACHEMESH_INTERNAL_TOKEN": "",
            "CACHEMESH_INTERNAL_TOKEN_FILE": INTERNAL_SECRET,
        }
    # compose serves the simulator only, whatever .env says of models (tested below)
    simulator = {
        "MODEL_BACKEND": "simulated",
        "CACHEMESH_AUTO_SMALL": "",
        "CACHEMESH_AUTO_LARGE": "",
        "CACHEMESH_AUTO_TIERS": "",
    }
    overrides |= {k: v for k, v in simulator.items() if k in spec.env_keys}
    overrides |= {
        "OTEL_SERVICE_NAME": spec.otel_service_name,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": JAEGER_OTLP,
    }
    return overrides


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_environment_is_the_local_one_but_for_container_overrides(
    resolved: Resolved, spec: ServiceDef
) -> None:
    local = Stack(resolved.work, resolved.work / ".run", environ={}).environment(
        spec, resolved.keys
    )
    expected = {key: local[key] for key in spec.env_keys if key in local}
    expected |= _container_overrides(resolved, spec)
    env = resolved.service(spec.name)["environment"]
    if "CACHEMESH_API_KEYS_FILE" in expected:
        # on the keys volume, created from the mounted key file (tested below)
        expected["CACHEMESH_API_KEYS_FILE"] = KEY_FILE
        expected["CACHEMESH_API_KEYS_SEED_FILE"] = env.get("CACHEMESH_API_KEYS_SEED_FILE")
    if "CACHEMESH_ADMIN_TOKEN_FILE" in expected:
        # the same file, mounted as a secret (tests/unit/test_compose_secrets.py)
        expected["CACHEMESH_ADMIN_TOKEN_FILE"] = "/run/secrets/cachemesh-admin-token"
    else:  # empty: unset (services.common.env.Env)
        assert not env.get("CACHEMESH_ADMIN_TOKEN_FILE"), f"{spec.name} gets the admin token"
    assert not env.get("CACHEMESH_ADMIN_TOKEN"), f"{spec.name} gets the admin token"
    assert {key: env.get(key) for key in expected} == expected
    assert not env.get("CACHEMESH_INTERNAL_TOKEN"), f"{spec.name}: the internal token in its env"
    if spec.internal:  # a mounted file (tests/unit/test_compose_secrets.py)
        assert env["CACHEMESH_INTERNAL_TOKEN_FILE"] == INTERNAL_SECRET
    else:  # the internet-facing front calls only the Gateway, with the caller's own key
        assert not env.get("CACHEMESH_INTERNAL_TOKEN_FILE"), f"{spec.name} gets the internal token"
        assert "CACHEMESH_INTERNAL_TOKEN" not in local


KEY_FILE = "/var/lib/cachemesh/keys/api-keys"


@pytest.mark.parametrize("name", ["router", "http-front"])
def test_router_and_front_share_the_key_file_seeded_from_the_mounted_one(
    resolved: Resolved, name: str
) -> None:
    svc = resolved.service(name)
    assert [v.split(":")[:2] for v in svc["volumes"] if v.startswith("keys:")] == [
        ["keys", "/var/lib/cachemesh/keys"]
    ]
    assert "keys" in resolved.config["volumes"]
    mounts = {
        f"/run/secrets/{s['target']}": resolved.config["secrets"][s["source"]]["file"]
        for s in svc.get("secrets", [])
    }
    seed = svc["environment"]["CACHEMESH_API_KEYS_SEED_FILE"]
    assert mounts.get(seed) == str(resolved.keys.api_keys_file)


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_healthcheck_probes_readiness_on_the_plaintext_metrics_port(
    resolved: Resolved, spec: ServiceDef
) -> None:
    # not the service port: with ROUTER_TLS_* (or HTTP_FRONT_TLS_*) it speaks TLS only, a
    # plaintext probe there says UNREACHABLE and what depends on the service never starts
    test = resolved.service(spec.name)["healthcheck"]["test"]
    port = port_of(resolved.service(spec.name)["environment"][spec.metrics_var])
    # GET /readyz (tests/unit/test_compose_healthchecks.py runs it)
    assert test == ["CMD", "python", "-m", "services.tools.readyz", f"127.0.0.1:{port}"]


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_depends_on_healthy_peers(resolved: Resolved, spec: ServiceDef) -> None:
    depends = resolved.service(spec.name)["depends_on"]
    expected = {peer: {"condition": "service_healthy"} for peer in spec.peer_names}
    if spec.name in ("prefix-cache", "router"):  # commit records; the router's answer ledger
        expected["redis"] = {"condition": "service_healthy"}
    assert {k: v for k, v in depends.items() if k != "jaeger"} == expected
    assert depends["jaeger"] == {"condition": "service_started"}


FRONT_DOORS = ("router", "http-front")  # the Gateway (gRPC) and the HTTP APIs over it


def test_only_the_front_doors_are_published_where_dotenv_says(resolved: Resolved) -> None:
    for spec in SERVICES:
        if spec.name not in FRONT_DOORS:
            assert not resolved.service(spec.name).get("ports"), f"{spec.name} is published"
    for door in (s for s in SERVICES if s.name in FRONT_DOORS):
        listen = resolved.dotenv[door.listen_var]
        assert resolved.service(door.name)["ports"] == [f"{listen}:{resolved.port(door)}/tcp"]


def test_jaeger_takes_otlp_inside_and_shows_its_ui_on_loopback(resolved: Resolved) -> None:
    jaeger = resolved.service("jaeger")
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {"4317", "16686"} <= set(jaeger["expose"])
    assert jaeger["ports"] == ["127.0.0.1:16686:16686/tcp"]


def test_semantic_cache_state_lives_in_a_named_volume(resolved: Resolved) -> None:
    svc = resolved.service("semantic-cache")
    data_dir = svc["environment"]["SEMANTIC_CACHE_DATA_DIR"]
    volumes = [v.split(":") for v in svc["volumes"]]
    assert [v[:2] for v in volumes] == [["semantic-cache-data", data_dir]]
    assert "semantic-cache-data" in resolved.config["volumes"]


def test_images_never_contain_local_secrets() -> None:
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".run/" in ignored and ".venv/" in ignored


PROMETHEUS = ROOT / "services" / "observability" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "services" / "observability" / "grafana"


def test_prometheus_scrapes_every_service_on_its_metrics_port(resolved: Resolved) -> None:
    mounts = resolved.mounts("prometheus")
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {s.name for s in SERVICES}
    for spec in SERVICES:
        [static] = jobs[spec.name]["static_configs"]
        assert static["targets"] == [f"{spec.name}:{resolved.metrics_port(spec)}"]
        env = resolved.service(spec.name)["environment"]
        assert env[spec.metrics_var] == f"0.0.0.0:{resolved.metrics_port(spec)}"
    ports = {resolved.metrics_port(s) for s in SERVICES}
    assert len(ports) == len(SERVICES)  # a port of its own each
    assert not ports & {resolved.port(s) for s in SERVICES}


def test_prometheus_loads_the_alert_rules_mounted_beside_its_config(resolved: Resolved) -> None:
    mounts = resolved.mounts("prometheus")
    config_path = PurePosixPath(
        next(p for p, src in mounts.items() if src == PROMETHEUS)  # /etc/prometheus/...
    )
    config = yaml.safe_load(PROMETHEUS.read_text())
    # relative paths are read from the config file's folder, in the container as here
    loaded = [config_path.parent / name for name in config["rule_files"]]
    assert [mounts.get(str(path)) for path in loaded] == [PROMETHEUS.parent / "alerts.yml"]
    assert all((PROMETHEUS.parent / name).is_file() for name in config["rule_files"])


def test_prometheus_and_grafana_show_their_uis_on_loopback_only(resolved: Resolved) -> None:
    assert resolved.service("prometheus")["ports"] == ["127.0.0.1:9090:9090/tcp"]
    assert resolved.service("grafana")["ports"] == ["127.0.0.1:3000:3000/tcp"]
    for name in ("prometheus", "grafana"):
        assert resolved.service(name)["restart"] == "unless-stopped"
        assert any(v.startswith(f"{name}-data:") for v in resolved.service(name)["volumes"])
        assert f"{name}-data" in resolved.config["volumes"]


def test_grafana_is_read_only_with_no_login_to_guess(resolved: Resolved) -> None:
    env = resolved.service("grafana")["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"
    assert not any("PASSWORD" in key for key in env)


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard(
    resolved: Resolved,
) -> None:
    mounts = resolved.mounts("grafana")
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    dashboards_dir = next(path for path, src in mounts.items() if src == GRAFANA / "dashboards")
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    [source] = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "9090" in resolved.service("prometheus")["expose"]
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/cachemesh.yml").read_text())
    [provider] = providers["providers"]
    assert provider["options"]["path"] == dashboards_dir
    home = resolved.service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/")
    dashboard = json.loads((GRAFANA / "dashboards" / Path(home).name).read_text())
    uids = {
        target["datasource"]["uid"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    assert uids == {source["uid"]}
