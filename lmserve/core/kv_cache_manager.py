"""KV cache manager: a pool of fixed-size blocks, ref counts, an LRU free queue, prefix caching.

Block layout of one request (block_size = 4), after `allocate_slots(request, num_new_tokens=5)`:

    tokens:  | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .. .. |
    blocks:  |  block 7    |  block 2    |  block 9    |
              \\_ computed (cached prefix) _/ \\_ new _/
              <- num_computed_tokens = 5 ->  slots for t5..t9 allocated now

Prefix caching: every *full* block gets a hash chained to its parent's,
`hash(parent_hash, block token ids, extra keys)`, so equal hashes mean equal whole prefixes
(extra keys: the cache salt in block 0, the content hash of every image a block holds).
A block whose ref count drops to 0 keeps its hash and stays hittable until the free queue hands
it out again (eviction). Ownership: a block is shared by every request that holds a reference
(`ref_cnt`); only blocks with `ref_cnt == 0` sit in the free queue.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.core.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    KVCacheEvent,
    stored_runs,
)
from lmserve.prefix_hash import HASH_FUNCTIONS, BlockHash, extend_block_hashes
from lmserve.request import Request


class KVCacheBlock:
    """One block of `block_size` token slots. The `prev_free`/`next_free` links belong to the
    free queue and are meaningful only while the block sits in it."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, hashed={self.block_hash is not None})"


class FreeKVCacheBlockQueue:
    """The free blocks, in eviction order: head = evicted first (least recently freed).

    NOTE: why a hand-written doubly linked list and not a deque? A prefix-cache hit on a free
    (ref 0) block must take that block out of the *middle* of the queue; the links make that
    O(1), where a deque needs O(n). Order matters too: blocks are appended to the tail when
    freed and taken from the head when needed, so the queue is LRU and the blocks freed last —
    the most likely to be hit again — are evicted last.
    """

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)  # sentinels: no None checks on the hot path
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free_blocks += 1

    def __iter__(self):
        block = self._head.next_free
        while block is not self._tail:
            yield block
            block = block.next_free


@dataclass(frozen=True, slots=True)
class KVCacheBlocks:
    """The result type between scheduler and manager: an opaque run of blocks. The scheduler
    only reads block ids from it or hands it back to `allocate_slots`."""

    blocks: tuple[KVCacheBlock, ...] = ()

    def get_block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)


@dataclass(slots=True)
class PrefixCacheStats:
    requests: int = 0  # requests looked up
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found in the cache

    def record(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.requests += 1
        self.queries += num_tokens
        self.hits += num_hit_tokens

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


_NO_BLOCKS = KVCacheBlocks()


class KVCacheManager:
    """Allocates, shares, caches and frees KV blocks for requests.

    Contract: the scheduler calls `get_computed_blocks` once when a request is first scheduled
    (or resumed), `allocate_slots` every step it schedules the request, `cache_blocks` after a
    step has written the KV, and `free` when the request finishes or is preempted.
    """

    def __init__(
        self,
        num_gpu_blocks: int,
        block_size: int,
        max_model_len: int,
        enable_caching: bool = True,
        hash_algo: str = "sha256",
        enable_kv_cache_events: bool = False,
    ) -> None:
        if hash_algo not in HASH_FUNCTIONS:
            raise ValueError(f"hash_algo={hash_algo!r}: must be one of {list(HASH_FUNCTIONS)}")
        self.num_gpu_blocks = num_gpu_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.enable_caching = enable_caching
        self.hash_fn = HASH_FUNCTIONS[hash_algo]
        self.blocks = [KVCacheBlock(i) for i in range(num_gpu_blocks)]
        self.free_queue = FreeKVCacheBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}  # hash -> block holding it
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # req -> how many of its blocks are hashed
        self.prefix_cache_stats = PrefixCacheStats()
        # KV cache events since the last take_events() (None: not recorded). A hash is
        # reported stored when it enters cached_blocks and removed when it leaves.
        self.events: list[KVCacheEvent] | None = [] if enable_kv_cache_events else None
        self._last_removed: BlockRemoved | None = None  # the one evicted blocks join

    # ---- queries --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """Share of blocks referenced by a live request (ref > 0); cached-but-free don't count."""
        return 1.0 - self.num_free_blocks / self.num_gpu_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[KVCacheBlocks, int]:
        """Longest cached prefix of `request`, in whole blocks, and its length in tokens.
        Does not take references (pass the blocks to `allocate_slots` to claim them) and does
        not count statistics: the caller records a lookup in `prefix_cache_stats` once the
        request is admitted, so a request that waits for blocks is counted once.

        The hit stops short of the last token: its logits must be computed, so a full hit
        still recomputes (at least) the final token.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return KVCacheBlocks(), 0
        self._update_block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.cached_blocks.get(block_hash)
            if block is None:
                break
            hit.append(block)
        return KVCacheBlocks(tuple(hit)), len(hit) * self.block_size

    def touch_prefix(self, request: Request) -> None:
        """Make the free blocks of `request`'s cached prefix the last to be evicted, as if
        they had just been freed (tail blocks before head blocks, as `free` does). Called when
        the request arrives: under KV pressure, the steps it waits through would otherwise
        evict the prefix it came for (and that a KV-aware router sent it here to find)."""
        hit, _ = self.get_computed_blocks(request)
        for block in reversed(hit.blocks):
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
                self.free_queue.append(block)

    # ---- allocation -----------------------------------------------------------------------
    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        num_new_computed_tokens: int = 0,
        new_computed_blocks: KVCacheBlocks | None = None,
        num_lookahead_tokens: int = 0,
        delay_cache_blocks: bool = False,
    ) -> KVCacheBlocks | None:
        """Make room for `num_new_tokens` more tokens of `request` (plus lookahead slots for
        speculative tokens), first claiming `new_computed_blocks` (a prefix hit worth
        `num_new_computed_tokens` tokens). Returns the newly allocated blocks, or None —
        with nothing changed — when the pool cannot supply them.

        `delay_cache_blocks`: the new tokens' KV is loaded by a KV connector, not computed by
        this step; the caller hashes the blocks (`cache_blocks`) once it has arrived."""
        num_tokens_need_slot = min(
            request.num_computed_tokens
            + num_new_computed_tokens
            + num_new_tokens
            + num_lookahead_tokens,
            self.max_model_len,
        )
        req_blocks = self.req_to_blocks.get(request.request_id)
        if req_blocks is not None and not new_computed_blocks:
            if num_tokens_need_slot <= len(req_blocks) * self.block_size:
                return _NO_BLOCKS  # fast path: most decode steps fit in the last block
        else:
            req_blocks = self.req_to_blocks.setdefault(request.request_id, [])
        computed = new_computed_blocks.blocks if new_computed_blocks else ()
        num_required = -(-num_tokens_need_slot // self.block_size)
        num_new_blocks = max(num_required - len(req_blocks) - len(computed), 0)
        # A hit on a free (ref 0) block takes it out of the free pool too.
        num_hit_free = sum(1 for b in computed if b.ref_cnt == 0)
        if num_new_blocks > self.num_free_blocks - num_hit_free:
            return None
        for block in computed:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1
        req_blocks.extend(computed)
        if computed:
            self.num_cached_blocks[request.request_id] = len(req_blocks)
        new_blocks = [self._pop_free_block() for _ in range(num_new_blocks)]
        req_blocks.extend(new_blocks)
        # Hash the blocks this step fills now, not after the forward: a request admitted later
        # in the same step (e.g. the other n-1 samples of a prompt) then shares them. Safe
        # because every backend writes a layer's new KV before any query of that layer reads
        # it; `free(..., num_computed_tokens)` un-hashes them if this step is taken back.
        if not delay_cache_blocks:
            self.cache_blocks(
                request, request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
            )
        return KVCacheBlocks(tuple(new_blocks))

    def _pop_free_block(self) -> KVCacheBlock:
        block = self.free_queue.popleft()
        self._forget_hash(block)  # eviction: its cached content is gone
        block.ref_cnt = 1
        return block

    def _forget_hash(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached_blocks.get(block.block_hash) is block:
                del self.cached_blocks[block.block_hash]
                if self.events is not None:
                    self._record_removed(block.block_hash)
            block.block_hash = None

    def add_events(self, events: list[KVCacheEvent]) -> None:
        """Events of another medium (a KV connector's tier), published with this step's."""
        if self.events is not None:
            self.events.extend(events)

    def take_events(self) -> list[KVCacheEvent]:
        """The KV cache events since the last call (empty when events are off)."""
        events, self.events = self.events or [], [] if self.events is not None else None
        return events

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the full blocks among the first `num_computed_tokens` tokens (whose KV is
        written by the end of the current step) in the prefix cache."""
        if not self.enable_caching:
            return
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_computed_tokens < (start + 1) * self.block_size:
            return  # no newly filled block (most decode steps)
        req_blocks = self.req_to_blocks.get(request.request_id)
        if not req_blocks:
            return
        num_full = min(num_computed_tokens // self.block_size, len(req_blocks))
        if num_full <= start:
            return
        self._update_block_hashes(request)
        num_full = min(num_full, len(request.block_hashes))  # only blocks of known tokens
        stored: list[int] = []
        for i in range(start, num_full):
            block, block_hash = req_blocks[i], request.block_hashes[i]
            if block.block_hash is None:
                block.block_hash = block_hash
                # Another block may already hold this content; keep the first one.
                if self.cached_blocks.setdefault(block_hash, block) is block:
                    stored.append(i)
        self.num_cached_blocks[request.request_id] = num_full
        if stored and self.events is not None:
            self.events += stored_runs(
                request.block_hashes, request.all_token_ids, self.block_size, stored
            )

    def free(self, request: Request, num_computed_tokens: int | None = None) -> None:
        """Drop the request's references. Blocks reaching ref 0 join the free queue's tail in
        reverse order, so a request's last blocks (least likely shared) are evicted first.

        `num_computed_tokens`: pass it when taking back a step already scheduled (preemption
        in the same step): blocks past it were hashed for KV that will never be written, so
        they lose their hash."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        if num_computed_tokens is not None:
            for block in blocks[num_computed_tokens // self.block_size :]:
                self._forget_hash(block)
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_gpu_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_blocks.clear()
        if self.events is not None:
            self.events.append(AllBlocksCleared())
        return True

    def _record_removed(self, block_hash: BlockHash) -> None:
        """An evicted block: joins the BlockRemoved just before it (the blocks one allocation
        evicts travel as one event), else starts one."""
        assert self.events is not None
        last = self._last_removed
        if last is not None and self.events and self.events[-1] is last:
            last.block_hashes.append(block_hash)
        else:
            self._last_removed = BlockRemoved([block_hash])
            self.events.append(self._last_removed)

    # ---- hashing --------------------------------------------------------------------------
    def _update_block_hashes(self, request: Request) -> None:
        """Extend `request.block_hashes` to cover all of its full blocks."""
        extend_block_hashes(
            request.block_hashes,
            request.all_token_ids,
            self.block_size,
            self.hash_fn,
            request.cache_salt,
            request.mm_features,  # MultiModalFeature has offset, length, identifier
        )
