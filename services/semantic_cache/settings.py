"""The semantic cache's settings from ``SEMANTIC_CACHE_*`` variables (fail fast, naming them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.env import C_INT_MAX, ConfigError, Env
from services.semantic_cache.operating_point import OperatingPoint
from services.semantic_cache.policy import TTL_RANGE, NamespacePolicy, valid_ttl
from services.semantic_cache.stats import SCOPE_BYTES

DATA_DIR = "SEMANTIC_CACHE_DATA_DIR"
MAX_BYTES = "SEMANTIC_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB
# The least room for an answer next to one entry's vector that the byte bound must leave
MIN_ANSWER_ROOM = 64 << 10
# The most FAISS or onnxruntime threads: more than any machine's cores (they take a C int, and
# a count past it stopped the start-up with an OverflowError naming no variable)
MAX_THREADS = 256


@dataclass(frozen=True)
class SemanticCacheSettings:
    threshold: float  # cosine similarity in [0, 1]
    verifier_min_p: float  # the verifier's minimum probability of the same meaning
    ambiguity_margin: float  # two answers within it of each other: serve neither (0 = off)
    ttl_s: float  # absolute age after which an entry is never served
    max_entries: int  # total capacity; beyond it the largest tenant's LRU entry goes
    faiss_threads: int
    ort_threads: int
    data_dir: Path | None = None  # where snapshots go; None = no persistence
    snapshot_s: float = 60.0  # period of background snapshots; 0 = only at shutdown
    policy: NamespacePolicy | None = None  # None = ttl_s for every namespace, default rules
    lease_s: float = 30.0  # single flight: a lease ends at this age if no Store ended it
    lease_wait_s: float = 30.0  # the most a lookup waits on another's lease; 0 = no leases
    embed_max_batch: int = 32  # micro-batching: the most texts in one embedding call
    # the most texts waiting to be embedded; beyond, a Lookup skips L1 at once ("busy")
    embed_max_queue: int = 512
    embed_max_queue_per_tenant: int = 256  # ... and the most of one tenant's (default: half)
    ann_min_entries: int = 20_000  # a scope this large is rebuilt as IVF; 0 = always exact
    ann_nprobe: int = 16  # IVF lists searched per lookup
    # threads per operator for a text embedded alone, on a second session; 0 = none (as batches)
    ort_solo_threads: int = 0
    # what the entries hold together (answers, questions, vectors); beyond it the LRU entry of
    # the tenant holding the most bytes goes
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def from_env(cls, env: Env, shipped: OperatingPoint) -> SemanticCacheSettings:
        """``shipped`` (the calibrated operating point) gives the defaults of the first three."""
        ttl_s = env.seconds("SEMANTIC_CACHE_TTL_S", 86_400.0, minimum=None)  # valid_ttl
        if not valid_ttl(ttl_s):
            raise ConfigError(f"SEMANTIC_CACHE_TTL_S must be {TTL_RANGE}, got {ttl_s}")
        max_queue = env.count("SEMANTIC_CACHE_EMBED_MAX_QUEUE", 512, minimum=1)
        return cls(
            threshold=env.float(
                "SEMANTIC_CACHE_THRESHOLD", shipped.threshold, minimum=0.0, maximum=1.0
            ),
            verifier_min_p=env.float(
                "SEMANTIC_CACHE_VERIFIER_MIN_P", shipped.min_probability, minimum=0.0, maximum=1.0
            ),
            ambiguity_margin=env.float(
                "SEMANTIC_CACHE_AMBIGUITY_MARGIN", shipped.margin, minimum=0.0, maximum=1.0
            ),
            ttl_s=ttl_s,
            max_entries=env.count("SEMANTIC_CACHE_MAX_ENTRIES", 100_000, minimum=1),
            # at least one entry's worth once the embedder is known (``check_max_bytes``)
            max_bytes=env.bytes(MAX_BYTES, DEFAULT_MAX_BYTES, minimum=1),
            faiss_threads=env.int(
                "SEMANTIC_CACHE_FAISS_THREADS", 1, minimum=1, maximum=MAX_THREADS
            ),
            ort_threads=env.int("SEMANTIC_CACHE_ORT_THREADS", 1, minimum=1, maximum=MAX_THREADS),
            ort_solo_threads=env.int(
                "SEMANTIC_CACHE_ORT_SOLO_THREADS", 0, minimum=0, maximum=MAX_THREADS
            ),
            data_dir=Path(data_dir) if (data_dir := env.optional_str(DATA_DIR)) else None,
            snapshot_s=env.seconds("SEMANTIC_CACHE_SNAPSHOT_S", 60.0, minimum=0.0),
            policy=NamespacePolicy.from_env(env, ttl_s),
            lease_s=_positive(env, "SEMANTIC_CACHE_LEASE_S", 30.0),
            lease_wait_s=env.seconds("SEMANTIC_CACHE_LEASE_WAIT_S", 30.0, minimum=0.0),
            embed_max_batch=env.count("SEMANTIC_CACHE_EMBED_MAX_BATCH", 32, minimum=1),
            embed_max_queue=max_queue,
            embed_max_queue_per_tenant=_embed_max_queue_per_tenant(env, max_queue),
            ann_min_entries=_ann_min_entries(env),
            # FAISS takes a size_t; past the lists an index has, it searches them all
            ann_nprobe=env.int("SEMANTIC_CACHE_ANN_NPROBE", 16, minimum=1, maximum=C_INT_MAX),
        )

    def check_max_bytes(self, dim: int) -> None:
        """``SEMANTIC_CACHE_MAX_BYTES`` against an embedder of ``dim`` dimensions (known once it
        is loaded): every entry holds its vector, 4 bytes a dimension, so a bound below one
        vector and an answer of 64 KiB refused almost every Store as larger than all of L1 may
        hold, and L1 stored nothing, with no word at the start. An entry alone is alone in its
        scope, whose index is charged too (``SCOPE_BYTES``)."""
        minimum = 4 * dim + MIN_ANSWER_ROOM + SCOPE_BYTES
        if self.max_bytes < minimum:
            raise ConfigError(
                f"{MAX_BYTES} must be at least {minimum:,} bytes with an embedder of {dim} "
                f"dimensions (room for one entry: its vector, {4 * dim:,} bytes, an answer "
                f"of {MIN_ANSWER_ROOM >> 10} KiB and its scope's index, {SCOPE_BYTES:,} bytes), "
                f"got {self.max_bytes:,}"
            )


def _embed_max_queue_per_tenant(env: Env, max_queue: int) -> int:
    """At most the whole queue; by default half of it (one tenant's burst leaves the other
    half to the others)."""
    name = "SEMANTIC_CACHE_EMBED_MAX_QUEUE_PER_TENANT"
    value = env.count(name, max(1, max_queue // 2), minimum=1)
    if value > max_queue:
        raise ConfigError(
            f"{name} must be at most SEMANTIC_CACHE_EMBED_MAX_QUEUE ({max_queue}), got {value}"
        )
    return value


def _ann_min_entries(env: Env) -> int:
    """0 (always exact) or at least 16: an IVF trains a point for each of its >= 16 lists."""
    value = env.count("SEMANTIC_CACHE_ANN_MIN_ENTRIES", 20_000)
    if 0 < value < 16:
        raise ConfigError(
            f"SEMANTIC_CACHE_ANN_MIN_ENTRIES must be 0 (always exact) or at least 16 (an IVF "
            f"needs a training point for each of its >= 16 lists), got {value}"
        )
    return value


def _positive(env: Env, name: str, default: float) -> float:
    value = env.seconds(name, default, minimum=None)
    if value <= 0:
        raise ConfigError(f"{name} must be > 0 seconds, got {value}")
    return value
