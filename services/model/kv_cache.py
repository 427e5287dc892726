"""The replica's KV prefix cache: the shared block-hash cache of ``services.common``."""

from services.common.kv_blocks import BLOCK_SIZE, KvBlockCache, block_hashes, reusable_blocks

__all__ = ["BLOCK_SIZE", "KvBlockCache", "block_hashes", "reusable_blocks"]
