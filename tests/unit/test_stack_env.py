"""services.tools.stack: .env parsing, each process's environment, addresses, free ports."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from cachemesh.envfile import EnvFileError, parse_env_text, set_values
from services.tools.keys import ensure_keys
from services.tools.stack.environment import dial_address, merge_env
from services.tools.stack.lifecycle import Stack
from services.tools.stack.ports import free_port_overrides, relocate
from services.tools.stack.service_table import SERVICES, service

DOTENV = """\
# comment
ROUTER_LISTEN=127.0.0.1:50051
SEMANTIC_CACHE_LISTEN=127.0.0.1:50052
PREFIX_CACHE_LISTEN=127.0.0.1:50053
MODEL_LISTEN=127.0.0.1:50054
MODEL_2_LISTEN=127.0.0.1:50055
MODEL_2_IDS=sim-large
HTTP_FRONT_LISTEN=127.0.0.1:8088
HTTP_FRONT_GATEWAY_ADDR=127.0.0.1:50051

SEMANTIC_CACHE_ADDR=127.0.0.1:50052
PREFIX_CACHE_ADDR=127.0.0.1:50053
MODEL_REPLICAS=sim-small=127.0.0.1:50054,sim-large=127.0.0.1:50054,sim-large=127.0.0.1:50055
SIM_TIME_SCALE=1.0
CACHEMESH_LOG_LEVEL="INFO"
CACHEMESH_GRACE_S=0
"""


def test_parses_comments_blanks_quotes_and_zero() -> None:
    values = parse_env_text(DOTENV)
    assert values["CACHEMESH_LOG_LEVEL"] == "INFO"
    assert values["CACHEMESH_GRACE_S"] == "0"
    replicas = "sim-small=127.0.0.1:50054,sim-large=127.0.0.1:50054,sim-large=127.0.0.1:50055"
    assert values["MODEL_REPLICAS"] == replicas
    assert "# comment" not in values and len(values) == 14


def test_a_malformed_line_names_the_file_and_line() -> None:
    with pytest.raises(EnvFileError, match=r"\.env:2: expected KEY=VALUE"):
        parse_env_text("A=1\nnot a setting\n", ".env")
    with pytest.raises(EnvFileError, match=":1:"):
        parse_env_text("1BAD=x\n")


def test_a_shell_export_is_read_and_a_bad_line_is_never_repeated() -> None:
    assert parse_env_text("export CACHEMESH_KEY_A=cm_x\nB=2\n") == {
        "CACHEMESH_KEY_A": "cm_x",
        "B": "2",
    }
    with pytest.raises(EnvFileError) as caught:
        parse_env_text("cm_secret_value_on_a_line_of_its_own\n", "keys.env")
    assert "keys.env:1" in str(caught.value) and "cm_secret" not in str(caught.value)


def test_later_layers_win() -> None:
    merged = merge_env(
        {"A": "dotenv", "B": "dotenv", "C": "dotenv", "D": "dotenv"},
        {"B": "environ", "C": "environ", "D": "environ"},
        {"C": "injected", "D": "injected"},
        {"D": "override"},
    )
    assert merged == {"A": "dotenv", "B": "environ", "C": "injected", "D": "override"}


def _stack(tmp_path: Path, overrides: dict[str, str], environ: dict[str, str]) -> Stack:
    (tmp_path / ".env").write_text(DOTENV)
    return Stack(tmp_path, tmp_path / "run", overrides, environ=environ, out=io.StringIO())


def test_process_environment_layers_dotenv_environ_secrets_overrides(tmp_path: Path) -> None:
    stack = _stack(
        tmp_path,
        overrides={"SIM_TIME_SCALE": "0.05", "OTEL_TRACES_EXPORTER": "otlp"},
        environ={
            "SIM_TIME_SCALE": "2",
            "CACHEMESH_LOG_LEVEL": "DEBUG",
            "PATH": "/bin",
            "OTEL_SERVICE_NAME": "from-shell",
            "CACHEMESH_INTERNAL_TOKEN": "stale",
        },
    )
    keys = ensure_keys(tmp_path / "run")
    env = stack.environment(service("model"), keys)
    assert env["SIM_TIME_SCALE"] == "0.05"  # explicit override beats the shell and .env
    assert env["CACHEMESH_LOG_LEVEL"] == "DEBUG"  # the shell beats .env
    assert env["PATH"] == "/bin"
    assert env["MODEL_LISTEN"] == "127.0.0.1:50054"  # .env fills the rest
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    assert env["CACHEMESH_INTERNAL_TOKEN"] == keys.internal_token  # this run dir's secret
    assert env["CACHEMESH_API_KEYS_FILE"] == str(tmp_path / "run" / "api-keys")
    assert env["OTEL_SERVICE_NAME"] == "model"  # per service, always
    assert stack.environment(service("router"), keys)["OTEL_SERVICE_NAME"] == "router"


def test_the_stack_gives_its_own_secrets_over_files_named_in_the_shell(tmp_path: Path) -> None:
    """A token file or Redis password file named in .env or the shell (for compose) beside
    what the stack gives itself (the run dir's token, its Redis's URLs with the password)
    was "both set": each service refused to start."""
    stack = _stack(
        tmp_path,
        overrides={"PREFIX_CACHE_REDIS_URL": "redis://127.0.0.1:50056/0"},
        environ={
            "CACHEMESH_INTERNAL_TOKEN_FILE": "/run/secrets/cachemesh-internal-token",
            "CACHEMESH_REDIS_PASSWORD_FILE": "/run/secrets/cachemesh-redis-password",
        },
    )
    keys = ensure_keys(tmp_path / "run")
    prefix = stack.environment(service("prefix-cache"), keys)
    assert prefix["CACHEMESH_INTERNAL_TOKEN"] == keys.internal_token
    assert "CACHEMESH_INTERNAL_TOKEN_FILE" not in prefix
    assert f":{keys.redis_password}@" in prefix["PREFIX_CACHE_REDIS_URL"]
    assert "CACHEMESH_REDIS_PASSWORD_FILE" not in prefix
    front = stack.environment(service("http-front"), keys)  # never a secret of the mesh's
    assert not {"CACHEMESH_INTERNAL_TOKEN_FILE", "CACHEMESH_REDIS_PASSWORD_FILE"} & set(front)


def test_addresses_follow_the_listen_settings(tmp_path: Path) -> None:
    stack = _stack(tmp_path, {"ROUTER_LISTEN": "0.0.0.0:6000"}, environ={})
    assert stack.addresses == {
        "semantic-cache": "127.0.0.1:50052",
        "prefix-cache": "127.0.0.1:50053",
        "model": "127.0.0.1:50054",
        "model-2": "127.0.0.1:50055",
        "router": "127.0.0.1:6000",
        "http-front": "127.0.0.1:8088",
    }
    assert dial_address("[::]:7") == "[::1]:7"
    assert dial_address("10.0.0.2:7") == "10.0.0.2:7"


def test_free_ports_keep_the_stack_wired(tmp_path: Path) -> None:
    stack = Stack.on_free_ports(
        _stack(tmp_path, {}, {}).root, tmp_path / "run", {"SIM_TIME_SCALE": "0"}, environ={}
    )
    settings = stack.settings()
    ports = {s.name: settings[s.listen_var] for s in SERVICES}
    assert len(set(ports.values())) == len(SERVICES) == 6
    assert all(p.startswith("127.0.0.1:") and p != "127.0.0.1:50051" for p in ports.values())
    assert settings["SEMANTIC_CACHE_ADDR"] == ports["semantic-cache"]
    assert settings["PREFIX_CACHE_ADDR"] == ports["prefix-cache"]
    model, model_2 = ports["model"], ports["model-2"]
    assert settings["MODEL_REPLICAS"] == f"sim-small={model},sim-large={model},sim-large={model_2}"
    env = stack.environment(service("model-2"), stack.keys())  # the second replica's own port
    assert (env["MODEL_LISTEN"], env["MODEL_IDS"]) == (model_2, "sim-large")
    assert settings["SIM_TIME_SCALE"] == "0"
    assert stack.router_address == ports["router"]
    assert settings["HTTP_FRONT_GATEWAY_ADDR"] == ports["router"]  # the front finds the router


def test_free_ports_give_every_process_its_own_metrics_port(tmp_path: Path) -> None:
    stack = Stack.on_free_ports(_stack(tmp_path, {}, {}).root, tmp_path / "run", environ={})
    settings = stack.settings()
    metrics = stack.metrics_addresses
    assert set(metrics) == {s.name for s in SERVICES}
    taken = {settings[s.listen_var] for s in SERVICES} | set(metrics.values())
    assert len(taken) == 2 * len(SERVICES)  # no two processes, no two ports the same
    assert not {a.rpartition(":")[2] for a in metrics.values()} & {"9101", "9104", "9105"}
    model_2 = stack.environment(service("model-2"), stack.keys())  # renamed for the process
    assert model_2["MODEL_METRICS_LISTEN"] == metrics["model-2"]
    model = stack.environment(service("model"), stack.keys())
    assert model["MODEL_METRICS_LISTEN"] == metrics["model"] != metrics["model-2"]


def test_relocate_leaves_external_replicas_alone() -> None:
    settings = parse_env_text(DOTENV) | {
        "MODEL_REPLICAS": "sim-small=127.0.0.1:50054,sim-large=gpu-box:9000"
    }
    moved = relocate(settings, {"model": "0.0.0.0:50054"}, {"model": "model:50054"})
    assert moved == {
        "MODEL_LISTEN": "0.0.0.0:50054",
        "MODEL_REPLICAS": "sim-small=model:50054,sim-large=gpu-box:9000",
    }
    assert set(free_port_overrides(settings)) == {
        *(s.listen_var for s in SERVICES),
        *(s.metrics_var for s in SERVICES),
        "SEMANTIC_CACHE_ADDR",
        "PREFIX_CACHE_ADDR",
        "MODEL_REPLICAS",
        "HTTP_FRONT_GATEWAY_ADDR",
    }


def test_set_values_replaces_keeps_and_places_after_the_previous_key() -> None:
    text = "# settings\nA=1\nB=2\n"
    out = set_values(text, [("A", "x"), ("C", "3"), ("D", r"a\b")])
    assert out == "# settings\nA=x\nC=3\nD=a\\b\nB=2\n"
    assert parse_env_text(out) == {"A": "x", "B": "2", "C": "3", "D": "a\\b"}


def test_down_stops_the_stack_whatever_became_of_its_env_file(tmp_path: Path) -> None:
    """A .env broken after ``make up`` (a bad edit) must not keep ``make down`` from stopping
    the stack: it needs only the pid files, and a default grace."""
    import subprocess
    import sys

    from services.tools.stack import processes
    from services.tools.stack.cli import main

    (tmp_path / ".env").write_text("A=1\nexport ONLY_A_NAME\n")
    run_dir = tmp_path / ".run"
    (run_dir / "pids").mkdir(parents=True)
    router = service("router")
    # a process whose command line names the router's module, as the pid check requires
    sleep = [sys.executable, "-c", "import time; time.sleep(60)", router.module]
    sleeper = subprocess.Popen(sleep)
    try:
        # until its exec, the child's command line is this test process's, which the pid
        # check rightly refuses to stop (a loaded machine let ``down`` look that early)
        while not processes.is_alive(sleeper.pid, router.module):  # until it has exec'd
            assert sleeper.poll() is None
            time.sleep(0.01)
        pid_file = run_dir / "pids" / f"{router.name}.pid"
        processes.write_pid(pid_file, sleeper.pid)
        with pytest.raises(SystemExit) as exit_:
            main(["--root", str(tmp_path), "--run-dir", str(run_dir), "down", "--grace", "5"])
        assert exit_.value.code == 0
        assert sleeper.wait(timeout=10) is not None and not pid_file.exists()
    finally:
        sleeper.kill()


def test_a_bad_up_timeout_is_named_and_stops_only_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.tools.stack.cli import main

    monkeypatch.setenv("CACHEMESH_UP_TIMEOUT_S", "2m")
    (tmp_path / ".env").write_text("A=1\n")
    args = ["--root", str(tmp_path), "--run-dir", str(tmp_path / ".run")]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "down"])
    assert exit_.value.code == 0  # down does not read it
    with pytest.raises(SystemExit) as exit_:
        main([*args, "up"])
    assert exit_.value.code == 1
    assert "CACHEMESH_UP_TIMEOUT_S: expected seconds, got '2m'" in capsys.readouterr().err


def test_an_env_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    from cachemesh.envfile import read_env_file

    (tmp_path / ".env").write_bytes("A=caf\xe9\n".encode("latin-1"))
    with pytest.raises(EnvFileError, match=r"\.env is not UTF-8"):
        read_env_file(tmp_path / ".env")


def test_up_on_a_running_stack_names_the_settings_it_would_ignore(tmp_path: Path) -> None:
    # `MODEL_BACKEND=openai ... make up` on a running simulator stack adopted it and said
    # "stack is up": every new setting ignored without a word
    from services.tools.stack.supervisor import Plan

    first = _stack(tmp_path, {}, {"PATH": "/bin"})
    keys = ensure_keys(tmp_path / "run")
    managed = first.managed()
    Plan(str(tmp_path), 1.0, [first._managed_process(s, keys, 0) for s in managed]).write(
        tmp_path / "run"
    )
    same = _stack(tmp_path, {}, {"PATH": "/usr/bin", "OLDPWD": "/elsewhere"})  # shell noise
    assert same.changed_settings(keys, managed) == []
    secret_url = "http://user:S3cret@127.0.0.1:8000/v1"
    other = _stack(tmp_path, {}, {"MODEL_BACKEND": "openai", "OPENAI_BASE_URL": secret_url})
    changed = other.changed_settings(keys, managed)
    assert any(c.startswith("model: ") and "MODEL_BACKEND" in c for c in changed)
    assert "S3cret" not in "; ".join(changed)  # names only, never values


def test_only_the_services_inside_the_mesh_get_the_internal_credentials(tmp_path: Path) -> None:
    """The HTTP front, the stack's internet-facing process, calls only the Gateway with each
    caller's own key: holding the internal token, any code run in it could read and write
    every tenant's L1 and bills straight from the internal services."""
    keys = ensure_keys(tmp_path / ".run")
    (tmp_path / ".env").write_text(DOTENV + "CACHEMESH_INTERNAL_TOKEN=from-dotenv\n")
    # the admin token and provider keys from the shell (cachemesh-load's docs export the former)
    shell = {"CACHEMESH_ADMIN_TOKEN": "adm-x", "OPENAI_API_KEY": "sk-x", "PATH": "/usr/bin"}
    stack = Stack(tmp_path, tmp_path / ".run", environ=shell)
    secrets = {
        "CACHEMESH_INTERNAL_TOKEN", "CACHEMESH_ADMIN_TOKEN", "CACHEMESH_ADMIN_TOKEN_FILE",
        "OPENAI_API_KEY",
    }  # fmt: skip
    for spec in SERVICES:
        env = stack.environment(spec, keys)
        holds = secrets & env.keys()
        if spec.name == "http-front":
            assert not holds
            assert not spec.internal
        else:
            assert "CACHEMESH_INTERNAL_TOKEN" in env
