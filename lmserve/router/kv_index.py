"""What every engine's KV cache holds, from its KV events: block hash -> engines (and tiers).

The engines publish `BlockStored` / `BlockRemoved` / `AllBlocksCleared` (lmserve/core/kv_events.py,
vLLM's wire format). This module decodes those payloads with its own msgspec structs (no
engine code) and keeps the exact index the kv-aware routing logic scores with:

    index.apply(url, payload)           one event batch from engine `url`
    index.match(url_hashes)             per engine: how many leading blocks of a prompt it holds
    index.clear(url)                    an engine restarted or left: it holds nothing

Both forms of vLLM's events are read: tagged arrays (`["BlockStored", hashes, ...]`, what
lmserve's engines publish) and, as vLLM 0.26 publishes them, maps (`{"type": "BlockStored",
"block_hashes": ...}`); fields an engine adds after the known ones are ignored, and so are
events of kinds the index does not know.

Each engine's block size and hash algorithm are learned from its own events (a `BlockStored`
carries its tokens and parent, so the router recomputes the hash with each algorithm it knows and
keeps the one that agrees): no setting has to match between engine and router.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from lmserve.prefix_hash import HASH_FUNCTIONS, ROOT_PARENT_HASH, BlockHash, hash_block_tokens

_decode = msgspec.msgpack.Decoder().decode
_encode = msgspec.msgpack.Encoder().encode
_NO_TOKENS = msgspec.Raw(b"\x90")  # an empty msgpack array


# Typed views of the events, for decoding in C. Token ids stay undecoded (msgspec.Raw): the
# index reads them only to learn an engine's layout from its first BlockStored.
class _Stored(msgspec.Struct, array_like=True, tag="BlockStored"):
    block_hashes: list[bytes | int]  # vLLM's ExternalBlockHash
    parent_block_hash: bytes | int | None = None
    token_ids: msgspec.Raw = _NO_TOKENS
    block_size: int = 0
    lora_id: Any = None
    medium: str | None = None  # the tier ("GPU" when absent)


class _Removed(msgspec.Struct, array_like=True, tag="BlockRemoved"):
    block_hashes: list[bytes | int]
    medium: str | None = None


class _Cleared(msgspec.Struct, array_like=True, tag="AllBlocksCleared"):
    pass


class _StoredMap(_Stored, array_like=False, tag_field="type"):
    pass


class _RemovedMap(_Removed, array_like=False, tag_field="type"):
    pass


class _ClearedMap(_Cleared, array_like=False, tag_field="type"):
    pass


class _ArrayBatch(msgspec.Struct, array_like=True):
    ts: Any
    events: list[_Stored | _Removed | _Cleared]


class _MapBatch(msgspec.Struct, array_like=True):
    ts: Any
    events: list[_StoredMap | _RemovedMap | _ClearedMap]


_BATCH_DECODERS = (msgspec.msgpack.Decoder(_ArrayBatch), msgspec.msgpack.Decoder(_MapBatch))
_EVENT_DECODERS = {
    list: msgspec.msgpack.Decoder(_Stored | _Removed | _Cleared),
    dict: msgspec.msgpack.Decoder(_StoredMap | _RemovedMap | _ClearedMap),
}
_KINDS = frozenset({"BlockStored", "BlockRemoved", "AllBlocksCleared"})


def decode_event_batch(payload: bytes) -> tuple[float, list]:
    """(timestamp, typed events) of one batch `[ts, [event, ...], dp_rank]`. Raises ValueError
    on a payload that is not one, or on a known event with fields of the wrong type."""
    for decoder in _BATCH_DECODERS:  # one C pass when every event is of one known form
        try:
            batch = decoder.decode(payload)
        except msgspec.DecodeError:
            continue
        return batch.ts, batch.events
    try:  # mixed forms, or kinds the index does not know: event by event
        batch = _decode(payload)
        ts, raw_events = batch[0], batch[1]
        if not isinstance(raw_events, list):
            raise TypeError("events are not a list")
    except (msgspec.DecodeError, TypeError, IndexError, KeyError) as e:
        raise ValueError(f"not a KV event batch: {e}") from None
    events = []
    for event in raw_events:
        if isinstance(event, dict):
            kind = event.get("type")
        else:
            kind = event[0] if isinstance(event, list) and event else None
        if kind not in _KINDS:
            continue  # a kind a newer engine sends: nothing the index keeps
        try:
            events.append(_EVENT_DECODERS[type(event)].decode(_encode(event)))
        except msgspec.DecodeError as e:
            raise ValueError(f"malformed {kind} event: {e}") from None
    return ts, events


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
        ts, events = decode_event_batch(payload)
        stats = BatchStats(timestamp=ts if isinstance(ts, (int, float)) else 0.0)
        # Consecutive events of one kind and medium are applied as one run (vLLM's engines send
        # a BlockRemoved per evicted block): the same index, in the same order, with one
        # _store / _remove call per run instead of one per event.
        run: list[BlockHash] = []
        run_kind, run_medium = None, None
        layouts = self.layouts
        for event in events:
            if isinstance(event, _Cleared):
                if run:
                    self._apply_run(url, run_kind, run, run_medium)
                    run = []
                self.clear(url, forget_layout=False)
                stats.cleared = True
                continue
            kind = kind_stored if isinstance(event, _Stored) else kind_removed
            hashes, medium = event.block_hashes, event.medium or "GPU"
            if run and (run_kind is not kind or run_medium != medium):
                self._apply_run(url, run_kind, run, run_medium)
                run = []
            run_kind, run_medium = kind, medium
            if kind is kind_stored:
                layout = layouts.get(url)
                block_size = event.block_size
                if layout is None or layout.hash_algo is None or layout.block_size != block_size:
                    self._learn_layout(
                        url, hashes, event.parent_block_hash, event.token_ids, block_size
                    )
                stats.stored += len(hashes)
            else:
                stats.removed += len(hashes)
            run += hashes
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
        token_ids: Sequence[int] | msgspec.Raw,
        block_size: int,
    ) -> None:
        layout = self.layout(url)
        if layout.hash_algo is not None and layout.block_size == block_size:
            return
        if isinstance(token_ids, msgspec.Raw):
            try:
                token_ids = _decode(token_ids)
            except msgspec.DecodeError:
                return
        if not hashes or block_size <= 0 or not isinstance(token_ids, list):
            return
        if len(token_ids) < block_size:
            return
        first = token_ids[:block_size]
        for algo, fn in HASH_FUNCTIONS.items():
            try:
                found = hash_block_tokens(fn, parent or ROOT_PARENT_HASH, first)
            except (TypeError, ValueError, OverflowError):  # not token ids, or an int parent
                return
            if found == hashes[0]:
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
