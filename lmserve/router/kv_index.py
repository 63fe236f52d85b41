"""What every engine's KV cache holds, from its KV events: block hash -> engines (and tiers).

The engines publish `BlockStored` / `BlockRemoved` / `AllBlocksCleared` (lmserve/core/kv_events.py,
vLLM's wire format). This module decodes those payloads with plain msgpack arrays (no engine
code) and keeps the exact index the kv-aware routing logic scores with:

    index.apply(url, payload)           one event batch from engine `url`
    index.match(url_hashes)             per engine: how many leading blocks of a prompt it holds
    index.clear(url)                    an engine restarted or left: it holds nothing

Each engine's block size and hash algorithm are learned from its own events (a `BlockStored`
carries its tokens and parent, so the router recomputes the hash with each algorithm it knows and
keeps the one that agrees): no setting has to match between engine and router.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from lmserve.prefix_hash import HASH_FUNCTIONS, ROOT_PARENT_HASH, BlockHash, hash_block_tokens

_decode = msgspec.msgpack.Decoder().decode


@dataclass(slots=True)
class EngineLayout:
    """How one engine names its blocks (None until its first verifiable BlockStored)."""

    block_size: int | None = None
    hash_algo: str | None = None


@dataclass(slots=True)
class BatchStats:
    timestamp: float = 0.0  # when the engine stamped the batch (its time.time())
    stored: int = 0
    removed: int = 0
    cleared: bool = False


Media = str | frozenset  # one tier's name ("GPU", "CPU", ...), or a frozenset of several


@dataclass
class KVIndex:
    """block hash -> {engine url: its media}; one event loop, no locks. A block held in one
    tier (nearly all) maps to the tier's name: {url: "GPU"} holds no container, so the index's
    millions of entries cost no set each and Python's cycle collector never walks them."""

    blocks: dict[BlockHash, dict[str, Media]] = field(default_factory=dict)
    held: dict[str, set[BlockHash]] = field(default_factory=dict)  # engine -> its hashes
    layouts: dict[str, EngineLayout] = field(default_factory=dict)
    layout_version: int = 0  # bumped whenever an engine's usable layout is learned or forgotten
    # called with (engine url, hashes) for every BlockStored applied (kv-aware's pending blocks)
    on_stored: list[Callable[[str, Sequence[BlockHash]], None]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def engines(self) -> int:
        return sum(1 for hashes in self.held.values() if hashes)

    def layout(self, url: str) -> EngineLayout:
        return self.layouts.setdefault(url, EngineLayout())

    # ---- events ----------------------------------------------------------------------------
    def apply(self, url: str, payload: bytes) -> BatchStats:
        """Apply one msgpack event batch `[ts, [event, ...], dp_rank]` from engine `url`.
        Raises ValueError on a payload that is not one."""
        try:
            batch = _decode(payload)
            events = batch[1]
        except (msgspec.DecodeError, TypeError, IndexError, KeyError) as e:
            raise ValueError(f"not a KV event batch: {e}") from None
        stats = BatchStats(timestamp=batch[0] if isinstance(batch[0], (int, float)) else 0.0)
        # Consecutive events of one kind and medium are applied as one run (vLLM's engines send
        # a BlockRemoved per evicted block): the same index, in the same order, with one
        # _store / _remove call per run instead of one per event.
        run: list[BlockHash] = []
        run_kind, run_medium = None, None
        layouts = self.layouts
        for event in events:
            kind = event[0]
            if kind == "BlockStored":
                hashes, block_size = event[1], event[4]
                medium = _medium(event, 6)
                if run and (run_kind is not kind_stored or run_medium != medium):
                    self._apply_run(url, run_kind, run, run_medium)
                    run = []
                run_kind, run_medium = kind_stored, medium
                layout = layouts.get(url)
                if layout is None or layout.hash_algo is None or layout.block_size != block_size:
                    self._learn_layout(url, hashes, event[2], event[3], block_size)
                run += hashes
                stats.stored += len(hashes)
            elif kind == "BlockRemoved":
                hashes = event[1]
                medium = _medium(event, 2)
                if run and (run_kind is not kind_removed or run_medium != medium):
                    self._apply_run(url, run_kind, run, run_medium)
                    run = []
                run_kind, run_medium = kind_removed, medium
                run += hashes
                stats.removed += len(hashes)
            elif kind == "AllBlocksCleared":
                if run:
                    self._apply_run(url, run_kind, run, run_medium)
                    run = []
                self.clear(url, forget_layout=False)
                stats.cleared = True
        if run:
            self._apply_run(url, run_kind, run, run_medium)
        return stats

    def _apply_run(self, url: str, kind: str, hashes: list[BlockHash], medium: str) -> None:
        if kind is kind_stored:
            self._store(url, hashes, medium)
        else:
            self._remove(url, hashes, medium)

    def clear(self, url: str, forget_layout: bool = True) -> None:
        """Engine `url` holds nothing (restarted, cleared, or gone)."""
        for h in self.held.pop(url, ()):
            holders = self.blocks.get(h)
            if holders is not None:
                holders.pop(url, None)
                if not holders:
                    del self.blocks[h]
        if forget_layout and self.layouts.pop(url, None) is not None:
            self.layout_version += 1

    def _store(self, url: str, hashes: Iterable[BlockHash], medium: str) -> None:
        held = self.held.get(url)
        if held is None:
            held = self.held[url] = set()
        blocks = self.blocks
        for h in hashes:  # (no setdefault temporaries: most blocks are new to the index)
            holders = blocks.get(h)
            if holders is None:
                blocks[h] = {url: medium}
                continue
            media = holders.get(url)
            if media is None:
                holders[url] = medium
            elif media != medium:
                holders[url] = _media_set(media) | {medium}
        held.update(hashes)
        for listener in self.on_stored:
            listener(url, hashes)

    def _remove(self, url: str, hashes: Iterable[BlockHash], medium: str) -> None:
        held = self.held.get(url, set())
        for h in hashes:
            holders = self.blocks.get(h)
            media = holders.get(url) if holders else None
            if media is None:
                continue
            if media != medium:  # several tiers, or another one
                rest = _media_set(media) - {medium}
                holders[url] = next(iter(rest)) if len(rest) == 1 else rest
                continue
            del holders[url]
            held.discard(h)
            if not holders:
                del self.blocks[h]

    def _learn_layout(
        self,
        url: str,
        hashes: Sequence[BlockHash],
        parent: BlockHash | None,
        token_ids: Sequence[int],
        block_size: int,
    ) -> None:
        layout = self.layout(url)
        if layout.hash_algo is not None and layout.block_size == block_size:
            return
        if not hashes or len(token_ids) < block_size:
            return
        first = token_ids[:block_size]
        for algo, fn in HASH_FUNCTIONS.items():
            if hash_block_tokens(fn, parent or ROOT_PARENT_HASH, first) == hashes[0]:
                layout.block_size, layout.hash_algo = block_size, algo
                self.layout_version += 1
                return
        # A salted or LoRA block: its hash needs keys the router does not see; learn later.

    # ---- lookups -----------------------------------------------------------------------------
    def media(self, url: str, block_hash: BlockHash) -> frozenset[str]:
        """The tiers engine `url` holds the block in (empty if none)."""
        media = self.blocks.get(block_hash, {}).get(url)
        return frozenset() if media is None else _media_set(media)

    def holds(self, url: str, block_hash: BlockHash) -> bool:
        holders = self.blocks.get(block_hash)
        return holders is not None and url in holders

    def match(self, url_hashes: dict[str, Sequence[BlockHash]]) -> dict[str, int]:
        """For each engine, how many leading blocks of its hash chain it holds (any medium).
        The engine's prefix cache reuses only a prefix, so the count stops at its first gap."""
        found = {}
        for url, hashes in url_hashes.items():
            n = 0
            for h in hashes:
                if not self.holds(url, h):
                    break
                n += 1
            found[url] = n
        return found


kind_stored, kind_removed = "BlockStored", "BlockRemoved"  # run kinds of KVIndex.apply


def _media_set(media: Media) -> frozenset[str]:
    return frozenset((media,)) if isinstance(media, str) else media


def _medium(event: list, i: int) -> str:
    return (event[i] if len(event) > i else None) or "GPU"
