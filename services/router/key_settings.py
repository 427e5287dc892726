"""Where a router or an HTTP front finds the API keys, read from the environment at start-up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.common.env import ConfigError, Env
from services.common.key_store import KeyStore, SeedFileError
from services.common.keyfile import KeyFileError


@dataclass(frozen=True)
class KeyStoreSettings:
    """CACHEMESH_API_KEYS_FILE (required), CACHEMESH_API_KEYS_POLL_S (how often a process looks
    for a change, 0 to 1 s; default 0.25) and CACHEMESH_API_KEYS_SEED_FILE (the keys a missing
    key file is created with)."""

    path: Path
    poll_s: float = 0.25
    seed: Path | None = None

    @classmethod
    def from_env(cls, env: Env) -> KeyStoreSettings:
        seed = env.optional_str("CACHEMESH_API_KEYS_SEED_FILE")
        return cls(
            path=env.path("CACHEMESH_API_KEYS_FILE"),
            poll_s=env.seconds("CACHEMESH_API_KEYS_POLL_S", 0.25, minimum=0.0, maximum=1.0),
            seed=Path(seed) if seed is not None else None,
        )

    def open(self, monotonic: Callable[[], float], wall: Callable[[], float]) -> KeyStore:
        """The store, read now: a missing or malformed file stops the process, naming it and
        its variable (the seed file's own, when the seed file is the one at fault)."""
        try:
            return KeyStore.open(self.path, monotonic, wall, self.poll_s, self.seed)
        except SeedFileError as exc:
            raise ConfigError(f"{exc} (CACHEMESH_API_KEYS_SEED_FILE)") from None
        except (KeyFileError, OSError) as exc:
            raise ConfigError(f"{exc} (CACHEMESH_API_KEYS_FILE)") from None
