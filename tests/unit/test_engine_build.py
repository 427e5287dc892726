"""The llama-server engine's build tool and stack option, without building anything: the cache's
place, the sha256 pins refusing a changed file, the options, and the settings that put the model
processes in front of the replicas."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cachemesh.envfile import read_env_file
from services.common.env import Env
from services.common.model_overrides import model_table_from_env
from services.prefix_cache.settings import PrefixCacheSettings
from services.router.settings import RouterSettings
from services.tools.engine.build import CMAKE_OPTIONS, BuildError, verify
from services.tools.engine.cache import engine_paths
from services.tools.engine.pins import LLAMA_CPP_PYTHON, Pin
from services.tools.engine.servers import (
    LOCAL_MODELS,
    EngineError,
    EngineOptions,
    LlamaServers,
    Replica,
    local_engine_settings,
)


def test_the_cache_is_outside_the_work_tree_and_keyed_by_version(tmp_path: Path) -> None:
    home = engine_paths({"XDG_CACHE_HOME": str(tmp_path)})
    assert home.root == tmp_path / "cachemesh"
    assert home.server == home.root / f"llama-server-{LLAMA_CPP_PYTHON.version}/bin/llama-server"
    assert home.model.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert engine_paths({"CACHEMESH_CACHE_DIR": str(tmp_path / "x")}).root == tmp_path / "x"
    assert engine_paths({}).root == Path.home() / ".cache" / "cachemesh"
    assert not home.ready()


def test_a_file_whose_sha256_differs_from_the_pin_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pkg.tar.gz"
    path.write_bytes(b"the pinned bytes")
    good = Pin("pkg", "1.0", path.name, hashlib.sha256(b"the pinned bytes").hexdigest())
    verify(path, good)
    path.write_bytes(b"other bytes")
    with pytest.raises(BuildError, match="does not match the pinned"):
        verify(path, good)


def test_the_build_downloads_nothing_and_builds_no_tests_examples_or_ui() -> None:
    options = set(CMAKE_OPTIONS)
    for off in ("TESTS", "EXAMPLES", "UI", "APP"):
        assert f"-DLLAMA_BUILD_{off}=OFF" in options
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in options  # else cmake fetches the web UI
    assert "-DLLAMA_BUILD_SERVER=ON" in options


def test_options_from_the_environment() -> None:
    assert EngineOptions.from_env({}) == EngineOptions(replicas=2, threads=1, context_tokens=4096)
    assert EngineOptions.from_env({"CACHEMESH_LLAMA_THREADS": "2"}).threads == 2
    with pytest.raises(EngineError, match="CACHEMESH_LLAMA_REPLICAS"):
        EngineOptions.from_env({"CACHEMESH_LLAMA_REPLICAS": "0"})


def test_each_replica_runs_one_thread_on_loopback(tmp_path: Path) -> None:
    servers = LlamaServers(
        engine_paths({"CACHEMESH_CACHE_DIR": str(tmp_path)}), tmp_path, EngineOptions()
    )
    command = servers.command(8080)
    assert command[command.index("--threads") + 1] == "1"
    assert command[command.index("--host") + 1] == "127.0.0.1"
    with pytest.raises(EngineError, match="make engine"):
        servers.start([8080])  # nothing built in this cache


def test_a_replica_prefills_in_batches_of_256_tokens(tmp_path: Path) -> None:
    """llama-server looks for a cancelled task only between batches: at its default 2,048 a
    prefill whose client went away ran on to the end of a 2,051-token prompt (15.5 s), and the
    replica's next request waited for it (test_llama_engine checks a cut prefill stops early)."""
    command = LlamaServers(engine_paths({}), tmp_path, EngineOptions()).command(8080)
    assert command[command.index("--batch-size") + 1] == "256"
    assert command[command.index("--ubatch-size") + 1] == "256"


def test_the_model_processes_stand_in_front_of_the_replicas() -> None:
    replicas = [Replica(1, 9001, 11), Replica(2, 9002, 12)]
    settings = {"MODEL_LISTEN": "127.0.0.1:7001", "MODEL_2_LISTEN": "0.0.0.0:7002"}
    env = local_engine_settings(settings, replicas, EngineOptions(threads=2))
    assert env["MODEL_BACKEND"] == "openai"
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:9001/v1"
    assert env["MODEL_2_OPENAI_BASE_URL"] == "http://127.0.0.1:9002/v1"
    assert env["MODEL_REPLICAS"] == (
        "local-small=127.0.0.1:7001,local-small=127.0.0.1:7002,"
        "local-large=127.0.0.1:7001,local-large=127.0.0.1:7002"
    )
    assert env["MODEL_IDS"] == env["MODEL_2_IDS"] == "local-small,local-large"
    # the auto tiers move to the local rows (the table the services load agrees)
    table = model_table_from_env(Env(env))
    assert table.auto == {"small": "local-small", "large": "local-large"}
    # SmolLM2's prefill on two threads, on the local rows (not the router's global 10k/s)
    assert env["CACHEMESH_PRIOR_PREFILL_TPS"] == "local-small=300,local-large=300"
    assert "ROUTER_TTFT_PRIOR_PREFILL_TPS" not in env
    assert table.models["local-small"].prior_prefill_rate == 300.0
    one = local_engine_settings(settings, replicas[:1], EngineOptions())
    assert one["MODEL_2_OPENAI_BASE_URL"] == one["OPENAI_BASE_URL"]


@pytest.mark.parametrize("context", [EngineOptions().context_tokens, 2048, 16384])
def test_the_rows_the_replicas_serve_have_the_replicas_context_window(
    tmp_path: Path, context: int
) -> None:
    """auto trusts the table's window: with local-small's 8,192 and local-large's 32,768 while
    the replicas ran with 4,096, a prompt between reached llama-server and came back refused."""
    options = EngineOptions(context_tokens=context)
    command = LlamaServers(engine_paths({}), tmp_path, options).command(8080)
    started_with = int(command[command.index("--ctx-size") + 1])
    env = local_engine_settings({}, [Replica(1, 9001, 11)], options)
    table = model_table_from_env(Env(env))
    for model in LOCAL_MODELS.values():
        assert table.models[model].context_window_tokens == started_with == context
    assert table.models["sim-large"].context_window_tokens == 200_000  # other rows as they were


def test_the_kv_view_assumes_the_tokens_a_replica_keeps(tmp_path: Path) -> None:
    """What a replica keeps: its one slot's context plus the prompt states --cache-ram holds, at
    SmolLM2-135M's 23,040 bytes a token (f16 K and V: 2 x 30 layers x 3 KV heads x 64 x 2 bytes;
    llama-server saved a 674-token state in 14.774 MiB). .env's simulated capacity, 1,048,576
    tokens, was ~65x that: the view kept conversations warm long after the replica evicted them."""
    options = EngineOptions(context_tokens=4096)
    command = LlamaServers(engine_paths({}), tmp_path, options).command(8080)
    context = int(command[command.index("--ctx-size") + 1])
    cache_bytes = int(command[command.index("--cache-ram") + 1]) * 2**20
    kept = context + cache_bytes // 23_040
    assert kept == 15_746
    env = local_engine_settings({}, [Replica(1, 9001, 11)], options)
    # the settings the services read: the stack's overrides over .env
    stack = Env(
        {
            **read_env_file(Path(__file__).resolve().parents[2] / ".env"),
            **env,
            "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
            "CACHEMESH_API_KEYS_FILE": "/dev/null",
        }
    )
    assert PrefixCacheSettings.from_env(stack).replica_capacity_blocks == kept // 16
    router = RouterSettings.from_env(stack, model_table_from_env(stack))
    assert router.choice.ttft.kv_capacity_tokens == kept
