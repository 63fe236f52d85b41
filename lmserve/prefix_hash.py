"""The prefix cache's block hashes: a chain over full blocks of token ids, from a fixed root.

    h_0 = hash(ROOT_PARENT_HASH + token ids of block 0 [+ cache_salt])   (int64 little-endian)
    h_i = hash(h_{i-1} + token ids of block i [+ content hashes of the images in block i])

An image's placeholder tokens are all the same id, so the block hash names the image too
(`mm_ranges`): the same image at the same positions hits, a different one does not.

The same on every process and machine (no Python `hash`), so what an engine publishes in its
KV events (lmserve/core/kv_events.py) a router or any indexer recomputes from token ids alone.
Light on purpose: the router imports it without the engine.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence
from typing import NamedTuple

BlockHash = bytes
# Root of every hash chain. Fixed (not random) so hashes agree across processes and restarts,
# which a shared KV tier needs.
ROOT_PARENT_HASH: BlockHash = hashlib.sha256(b"lmserve-prefix-cache-v1").digest()


def _sha256(data: bytes) -> BlockHash:
    return hashlib.sha256(data).digest()


def _xxhash128(data: bytes) -> BlockHash:
    import xxhash

    return xxhash.xxh3_128_digest(data)


HASH_FUNCTIONS: dict[str, Callable[[bytes], BlockHash]] = {
    "sha256": _sha256,
    "xxhash": _xxhash128,
}


class MultiModalRange(NamedTuple):
    """Placeholder tokens [offset, offset + length) filled by the item with content hash
    `identifier`."""

    offset: int
    length: int
    identifier: str


def mm_extra_keys(mm_ranges: Sequence[MultiModalRange], start: int, end: int) -> bytes:
    """The content hashes of the items whose placeholders overlap tokens [start, end)."""
    return b"".join(
        r.identifier.encode() for r in mm_ranges if r.offset < end and start < r.offset + r.length
    )


def hash_block_tokens(
    hash_fn: Callable[[bytes], BlockHash],
    parent_hash: BlockHash,
    token_ids: Sequence[int],
    extra_keys: bytes = b"",
) -> BlockHash:
    """hash(parent_hash, block token ids, extra keys) — the link of the prefix hash chain."""
    return hash_fn(parent_hash + array("q", token_ids).tobytes() + extra_keys)


def extend_block_hashes(
    hashes: list[BlockHash],
    token_ids: Sequence[int],
    block_size: int,
    hash_fn: Callable[[bytes], BlockHash],
    cache_salt: str | None = None,
    mm_ranges: Sequence[MultiModalRange] = (),
) -> None:
    """Append the hashes of the full blocks of `token_ids` not in `hashes` yet; `mm_ranges`
    (sorted by offset) adds each image's hash to the blocks its placeholders touch."""
    first, end = len(hashes), len(token_ids) // block_size
    if first >= end:
        return
    data = array("q", token_ids[first * block_size : end * block_size]).tobytes()
    step = block_size * 8  # bytes per block (int64 ids)
    parent = hashes[-1] if first else ROOT_PARENT_HASH
    if not cache_salt and not mm_ranges:
        # the usual case, one C call per block: no extra keys to compute, and SHA-256 without
        # the wrapper function (a third of the time per block when a prompt has ~100)
        append = hashes.append
        if hash_fn is _sha256:
            sha256 = hashlib.sha256
            for offset in range(0, len(data), step):
                parent = sha256(parent + data[offset : offset + step]).digest()
                append(parent)
        else:
            for offset in range(0, len(data), step):
                parent = hash_fn(parent + data[offset : offset + step])
                append(parent)
        return
    for i in range(end - first):
        extra = cache_salt.encode() if first + i == 0 and cache_salt else b""
        if mm_ranges:
            block_start = (first + i) * block_size
            extra += mm_extra_keys(mm_ranges, block_start, block_start + block_size)
        parent = hash_fn(parent + data[i * step : (i + 1) * step] + extra)
        hashes.append(parent)


def block_hashes(
    token_ids: Sequence[int],
    block_size: int = 16,
    hash_algo: str = "sha256",
    cache_salt: str | None = None,
    mm_ranges: Sequence[MultiModalRange] = (),
) -> list[BlockHash]:
    """The hashes an engine with this block size and hash algorithm gives the full blocks of
    a prompt of `token_ids` (as its KV events name them)."""
    hashes: list[BlockHash] = []
    extend_block_hashes(
        hashes, token_ids, block_size, HASH_FUNCTIONS[hash_algo], cache_salt, mm_ranges
    )
    return hashes
