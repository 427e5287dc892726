"""The service table is the truth: every variable a service's code reads is listed in it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from cachemesh.envfile import read_env_file
from services.tools.stack.service_table import COMMON_ENV_KEYS, SERVICES, ServiceDef, stop_order

ROOT = Path(__file__).resolve().parents[2]
_ENV_READERS = {"str", "optional_str", "int", "float", "bool", "address", "path", "get"}
_NAME = re.compile(r"^[A-Z][A-Z0-9_]{2,}$")
# services.common.tls: ServerTls.read(env, "P") / ClientTls.read(env, "P") read P_TLS_*
_TLS_READS = {
    "ServerTls": ("_TLS_CERT_FILE", "_TLS_KEY_FILE", "_TLS_CLIENT_CA_FILE"),
    "ClientTls": ("_TLS_CA_FILE", "_TLS_CERT_FILE", "_TLS_KEY_FILE"),
}


def _env_names_read(package: Path) -> set[str]:
    """Variable names passed to Env readers (and ``<PREFIX>_LISTEN`` of from_env,
    ``<PREFIX>_METRICS_LISTEN`` of MetricsSettings.from_env) in a package."""
    names: set[str] = set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        # NAME = "ROUTER_..." at module level, then env.float(NAME, ...): the name counts too
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            literals: list[str] = []
            for a in node.args:
                if isinstance(a, ast.Constant) and isinstance(a.value, str):
                    literals.append(a.value)
                elif isinstance(a, ast.Name) and a.id in constants:
                    literals.append(constants[a.id])
            if node.func.attr in _ENV_READERS and literals and _NAME.match(literals[0]):
                names.add(literals[0])
            owner = node.func.value
            if node.func.attr == "from_env" and literals and _NAME.match(literals[0]):
                metrics = isinstance(owner, ast.Name) and owner.id == "MetricsSettings"
                names.add(f"{literals[0]}_METRICS_LISTEN" if metrics else f"{literals[0]}_LISTEN")
            if node.func.attr == "read" and isinstance(owner, ast.Name) and literals:
                names.update(literals[0] + suffix for suffix in _TLS_READS.get(owner.id, ()))
    return names


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_every_variable_the_service_reads_is_in_the_table(spec: ServiceDef) -> None:
    package = ROOT / "services" / spec.package
    if not (package / "app.py").is_file():
        pytest.fail(f"services/{spec.package}/app.py is missing: the stack cannot run {spec.name}")
    unlisted = _env_names_read(package) - set(spec.env_keys)
    assert not unlisted, (
        f"add {sorted(unlisted)} to {spec.name}'s env keys in services/tools/stack/service_table.py"
    )


def test_every_common_variable_is_in_the_table() -> None:
    unlisted = _env_names_read(ROOT / "services" / "common") - set(COMMON_ENV_KEYS)
    assert not unlisted, (
        f"add {sorted(unlisted)} to COMMON_ENV_KEYS in services/tools/stack/service_table.py"
    )


def test_every_dotenv_setting_is_read_by_some_service() -> None:
    read = {key for s in SERVICES for key in s.env_keys}
    orphans = set(read_env_file(ROOT / ".env")) - read
    assert not orphans, f".env sets {sorted(orphans)} but no service in the table reads them"


def test_each_service_has_its_own_listen_port_in_dotenv() -> None:
    dotenv = read_env_file(ROOT / ".env")
    ports = {s.name: dotenv[s.listen_var].rpartition(":")[2] for s in SERVICES}
    assert len(set(ports.values())) == len(SERVICES)
    assert all(ports[s.name] == str(s.default_port) for s in SERVICES)


def test_each_service_has_its_own_metrics_port_in_dotenv() -> None:
    dotenv = read_env_file(ROOT / ".env")
    ports = {s.name: dotenv[s.metrics_var].rpartition(":")[2] for s in SERVICES}
    assert all(ports[s.name] == str(s.default_metrics_port) for s in SERVICES)
    listen = {dotenv[s.listen_var].rpartition(":")[2] for s in SERVICES}
    assert len(set(ports.values()) | listen) == 2 * len(SERVICES)


def test_the_metrics_reader_is_seen_by_the_check() -> None:
    names = _env_names_read(ROOT / "services" / "router")
    assert {"ROUTER_LISTEN", "ROUTER_METRICS_LISTEN"} <= names


def test_each_caller_stops_before_the_services_it_calls() -> None:
    waves = [[s.name for s in wave] for wave in stop_order()]
    assert waves[0] == ["http-front"]
    assert waves[1] == ["router"]
    assert sorted(waves[2]) == ["model", "model-2", "prefix-cache", "semantic-cache"]
    assert len(waves) == 3


def test_names_modules_and_commands_are_consistent() -> None:
    assert len({s.name for s in SERVICES}) == len(SERVICES)
    for s in SERVICES:
        assert s.module == f"services.{s.package}"
        # a second replica (model-2) runs its first replica's module, reading renamed settings
        base = s.name.rpartition("-")[0] if s.renames else s.name
        assert s.package == base.replace("-", "_")
        assert all(
            target in s.env_keys and source in s.env_keys for target, source in s.renames.items()
        )
        assert s.command == ("python", "-m", s.module)
        assert s.otel_service_name == s.name
        assert all(peer in {x.name for x in SERVICES} for peer in s.peer_names)
