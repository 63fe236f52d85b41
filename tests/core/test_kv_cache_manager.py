"""KVCacheManager: the prefix-cache hash chain, hits and misses, ref counts, the LRU free queue,
allocation failure, usage and leaks. Pure Python; no model, no torch."""

from __future__ import annotations

import random

import pytest

from lmserve import prefix_hash
from lmserve.core.kv_cache_manager import (
    FreeKVCacheBlockQueue,
    KVCacheBlock,
    KVCacheBlocks,
    KVCacheManager,
)
from lmserve.prefix_hash import ROOT_PARENT_HASH, hash_block_tokens
from lmserve.request import Request
from lmserve.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(
    req_id: str,
    token_ids: list[int],
    *,
    cache_salt: str | None = None,
    prompt_logprobs: int | None = None,
) -> Request:
    params = SamplingParams(max_tokens=16, prompt_logprobs=prompt_logprobs)
    return Request(req_id, list(token_ids), params, cache_salt=cache_salt)


def make_manager(num_gpu_blocks: int = 16, **kwargs) -> KVCacheManager:
    kwargs.setdefault("block_size", BLOCK_SIZE)
    kwargs.setdefault("max_model_len", 1024)
    return KVCacheManager(num_gpu_blocks=num_gpu_blocks, **kwargs)


def block_hashes(manager: KVCacheManager, request: Request) -> list[bytes]:
    manager._update_block_hashes(request)
    return list(request.block_hashes)


def run_prefill(manager: KVCacheManager, request: Request) -> tuple[int, list[int]]:
    """What the scheduler does for a new request computed in one step: look up the prefix,
    claim it plus room for the rest, then register the written blocks. Returns the hit length
    and the request's block ids."""
    hit_blocks, num_hit = manager.get_computed_blocks(request)
    new = manager.allocate_slots(request, request.num_tokens - num_hit, num_hit, hit_blocks)
    assert new is not None, "test pool too small"
    request.num_computed_tokens = request.num_tokens
    manager.cache_blocks(request, request.num_computed_tokens)
    return num_hit, manager.get_block_ids(request.request_id)


def free_queue_ids(manager: KVCacheManager) -> list[int]:
    return [b.block_id for b in manager.free_queue]


def assert_consistent(manager: KVCacheManager) -> None:
    """Free queue = exactly the ref-0 blocks; every ref count = number of holders; every
    cached_blocks entry points at a block carrying that hash."""
    free_ids = free_queue_ids(manager)
    assert len(free_ids) == len(set(free_ids)) == manager.num_free_blocks
    assert set(free_ids) == {b.block_id for b in manager.blocks if b.ref_cnt == 0}
    holders = [0] * manager.num_gpu_blocks
    for blocks in manager.req_to_blocks.values():
        for b in blocks:
            holders[b.block_id] += 1
    assert holders == [b.ref_cnt for b in manager.blocks]
    for block_hash, block in manager.cached_blocks.items():
        assert block.block_hash == block_hash


# ---- the hash chain ------------------------------------------------------------------------
def test_equal_prefixes_give_equal_block_hashes():
    manager = make_manager()
    a = make_request("a", list(range(12)) + [100, 101])
    b = make_request("b", list(range(12)) + [200, 201, 202, 203])
    ha, hb = block_hashes(manager, a), block_hashes(manager, b)
    assert ha == hb[:3]  # the 3 shared full blocks
    assert len(set(ha)) == 3  # and different blocks hash differently


def test_changing_an_early_token_changes_every_later_block_hash():
    manager = make_manager()
    tokens = list(range(16))
    changed = list(tokens)
    changed[5] = 999  # in block 1 of 4
    ha = block_hashes(manager, make_request("a", tokens))
    hb = block_hashes(manager, make_request("b", changed))
    assert ha[0] == hb[0]
    assert all(x != y for x, y in zip(ha[1:], hb[1:], strict=True))


def test_block_hash_chains_to_the_parent_hash():
    manager = make_manager()
    tokens = list(range(10, 22))
    hashes = block_hashes(manager, make_request("a", tokens))
    parent = ROOT_PARENT_HASH
    for i, h in enumerate(hashes):
        assert h == hash_block_tokens(manager.hash_fn, parent, tokens[i * 4 : (i + 1) * 4])
        parent = h


def test_only_full_blocks_are_hashed():
    manager = make_manager()
    request = make_request("a", list(range(11)))  # 2 full blocks + 3 tokens
    assert len(block_hashes(manager, request)) == 2
    request.append_output_token_ids([11])  # the third block fills up
    assert len(block_hashes(manager, request)) == 3
    request.append_output_token_ids([12])
    assert len(block_hashes(manager, request)) == 3


def test_allocate_slots_hashes_only_the_full_blocks_each_chunk_fills():
    manager = make_manager()  # block_size 4
    request = make_request("a", list(range(11)))
    manager.allocate_slots(request, 3)  # chunk 1: tokens 0-2, not one full block yet
    assert manager.cached_blocks == {}
    request.num_computed_tokens = 3
    manager.allocate_slots(request, 3)  # chunk 2: tokens 3-5, block 0 is now full
    ids = manager.get_block_ids("a")
    assert [b.block_id for b in manager.cached_blocks.values()] == ids[:1]
    request.num_computed_tokens = 6
    manager.allocate_slots(request, 5)  # chunk 3: tokens 6-10, block 1 full, block 2 partial
    ids = manager.get_block_ids("a")
    assert [b.block_id for b in manager.cached_blocks.values()] == ids[:2]
    assert manager.blocks[ids[2]].block_hash is None


def test_freeing_a_step_taken_back_unhashes_the_blocks_it_would_have_filled():
    manager = make_manager()
    request = make_request("a", list(range(12)))
    manager.allocate_slots(request, 8)  # hashes blocks 0 and 1 for this step
    assert len(manager.cached_blocks) == 2
    manager.free(request, num_computed_tokens=0)  # the step never ran (preempted)
    assert manager.cached_blocks == {}
    assert manager.get_computed_blocks(make_request("b", list(range(12))))[1] == 0


def test_cache_salt_changes_every_block_hash():
    manager = make_manager()
    tokens = list(range(12))
    plain = block_hashes(manager, make_request("a", tokens))
    salted = block_hashes(manager, make_request("b", tokens, cache_salt="tenant-1"))
    other = block_hashes(manager, make_request("c", tokens, cache_salt="tenant-2"))
    same_salt = block_hashes(manager, make_request("d", tokens, cache_salt="tenant-1"))
    assert all(p != s for p, s in zip(plain, salted, strict=True))
    assert all(s != o for s, o in zip(salted, other, strict=True))
    assert salted == same_salt


def test_extra_keys_change_the_block_hash():
    manager = make_manager()
    base = hash_block_tokens(manager.hash_fn, ROOT_PARENT_HASH, [1, 2, 3, 4])
    assert hash_block_tokens(manager.hash_fn, ROOT_PARENT_HASH, [1, 2, 3, 4], b"lora-7") != base
    assert hash_block_tokens(manager.hash_fn, ROOT_PARENT_HASH, [1, 2, 3, 4], b"") == base


def test_sha256_and_xxhash_both_work_and_differ():
    pytest.importorskip("xxhash")
    tokens = list(range(12))
    sha = make_manager(hash_algo="sha256")
    xx = make_manager(hash_algo="xxhash")
    hs, hx = (
        block_hashes(sha, make_request("a", tokens)),
        block_hashes(xx, make_request("b", tokens)),
    )
    assert len(hs) == len(hx) == 3
    assert len(hs[0]) == 32 and len(hx[0]) == 16  # sha256 digest vs xxh3-128 digest
    assert hs != hx
    # Both support the full hit path.
    for manager in (sha, xx):
        run_prefill(manager, make_request("first", tokens + [50]))
        assert run_prefill(manager, make_request("second", tokens + [60]))[0] == 12


def test_unknown_hash_algo_is_rejected():
    with pytest.raises(ValueError, match="hash_algo"):
        make_manager(hash_algo="md5")


# ---- hits and misses -----------------------------------------------------------------------
def test_prefix_hit_is_the_longest_cached_prefix_in_whole_blocks():
    manager = make_manager()
    run_prefill(manager, make_request("a", list(range(20))))
    # Shares 10 tokens with "a": 2 whole blocks (8 tokens) hit; the partial 3rd block doesn't.
    b = make_request("b", list(range(10)) + [500 + i for i in range(10)])
    blocks, num_hit = manager.get_computed_blocks(b)
    assert num_hit == 8
    assert blocks.get_block_ids() == manager.get_block_ids("a")[:2]


def test_a_miss_on_an_early_block_ends_the_hit_even_if_later_blocks_match():
    manager = make_manager()
    run_prefill(manager, make_request("a", list(range(16))))
    tokens = list(range(16))
    tokens[1] = 777  # block 0 differs; blocks 1..3 have the same tokens but other parents
    assert manager.get_computed_blocks(make_request("b", tokens))[1] == 0


def test_full_hit_still_leaves_the_last_token_to_compute():
    manager = make_manager()
    tokens = list(range(16))  # exactly 4 full blocks
    run_prefill(manager, make_request("a", tokens))
    blocks, num_hit = manager.get_computed_blocks(make_request("b", tokens))
    assert num_hit == 12 and len(blocks) == 3  # the last block is recomputed for its logits
    # One token past a block edge: every full block hits, only the final token is computed.
    run_prefill(manager, make_request("c", tokens + [99]))
    assert manager.get_computed_blocks(make_request("d", tokens + [99]))[1] == 16


def test_prompt_logprobs_request_skips_the_prefix_cache():
    manager = make_manager()
    tokens = list(range(13))
    run_prefill(manager, make_request("a", tokens))
    blocks, num_hit = manager.get_computed_blocks(make_request("b", tokens, prompt_logprobs=1))
    assert (num_hit, len(blocks)) == (0, 0)


def test_disabled_prefix_caching_never_hits():
    manager = make_manager(enable_caching=False)
    tokens = list(range(13))
    run_prefill(manager, make_request("a", tokens))
    assert manager.cached_blocks == {}
    assert manager.get_computed_blocks(make_request("b", tokens))[1] == 0


def test_prefix_cache_stats_record_lookups_and_hit_rate():
    # The manager's lookups don't count; the scheduler records each admitted request once
    # (see tests/core/test_scheduler.py for that end to end).
    manager = make_manager()
    run_prefill(manager, make_request("a", list(range(13))))
    assert manager.prefix_cache_stats.requests == 0
    stats = manager.prefix_cache_stats
    stats.record(13, 0)
    stats.record(11, 8)
    assert (stats.requests, stats.queries, stats.hits) == (2, 24, 8)
    assert stats.hit_rate == pytest.approx(8 / 24)


def test_hit_rate_is_zero_before_any_query():
    assert make_manager().prefix_cache_stats.hit_rate == 0.0


# ---- ref counts and sharing ----------------------------------------------------------------
def test_shared_blocks_have_ref_count_two_and_survive_freeing_one_request():
    manager = make_manager()
    a = make_request("a", list(range(13)))
    b = make_request("b", list(range(13)) + [50, 51])
    run_prefill(manager, a)
    num_hit, b_ids = run_prefill(manager, b)
    shared = manager.get_block_ids("a")[:3]
    assert num_hit == 12 and b_ids[:3] == shared
    assert [manager.blocks[i].ref_cnt for i in shared] == [2, 2, 2]
    assert manager.blocks[manager.get_block_ids("a")[3]].ref_cnt == 1  # a's private tail
    assert_consistent(manager)

    manager.free(a)
    assert [manager.blocks[i].ref_cnt for i in shared] == [1, 1, 1]
    assert not set(shared) & set(free_queue_ids(manager))  # still in use by b
    assert_consistent(manager)
    manager.free(b)
    assert manager.num_free_blocks == manager.num_gpu_blocks
    assert_consistent(manager)


# ---- the free queue ------------------------------------------------------------------------
def test_free_queue_removes_a_block_from_the_middle_without_walking_the_list(monkeypatch):
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeKVCacheBlockQueue(blocks)
    with monkeypatch.context() as m:  # O(1): only the neighbours' links change
        m.setattr(FreeKVCacheBlockQueue, "__iter__", lambda self: pytest.fail("walked the list"))
        queue.remove(blocks[2])
    assert [b.block_id for b in queue] == [0, 1, 3, 4]
    assert queue.num_free_blocks == 4
    assert blocks[1].next_free is blocks[3] and blocks[3].prev_free is blocks[1]
    assert blocks[2].prev_free is None and blocks[2].next_free is None
    assert [queue.popleft().block_id for _ in range(4)] == [0, 1, 3, 4]
    with pytest.raises(IndexError):
        queue.popleft()
    queue.append(blocks[2])
    assert [b.block_id for b in queue] == [2] and queue.num_free_blocks == 1


def test_blocks_freed_earlier_are_evicted_first():
    manager = make_manager(num_gpu_blocks=4)
    a, b = make_request("a", list(range(8))), make_request("b", list(range(100, 108)))
    run_prefill(manager, a)
    run_prefill(manager, b)
    a_ids, b_ids = manager.get_block_ids("a"), manager.get_block_ids("b")
    manager.free(b)  # b first: its blocks are the least recently freed
    manager.free(a)
    c = make_request("c", list(range(200, 208)))
    assert manager.allocate_slots(c, 8).get_block_ids() == b_ids[::-1]
    assert free_queue_ids(manager) == a_ids[::-1]


def test_a_requests_blocks_are_freed_in_reverse_so_its_last_block_is_evicted_first():
    manager = make_manager(num_gpu_blocks=3)
    a = make_request("a", list(range(12)))
    run_prefill(manager, a)
    first, middle, last = manager.get_block_ids("a")
    manager.free(a)
    assert free_queue_ids(manager) == [last, middle, first]
    # One new block evicts a's last block only; the first two still hit.
    manager.allocate_slots(make_request("x", [7]), 1)
    blocks, num_hit = manager.get_computed_blocks(make_request("b", list(range(12)) + [0]))
    assert num_hit == 8 and blocks.get_block_ids() == [first, middle]


def test_an_arriving_requests_prefix_is_evicted_last_while_it_waits():
    manager = make_manager(num_gpu_blocks=4)
    a, b = make_request("a", list(range(8))), make_request("b", list(range(100, 108)))
    run_prefill(manager, a)
    run_prefill(manager, b)
    manager.free(a)  # a's blocks are the least recently freed: next to be evicted ...
    manager.free(b)
    waiting = make_request("w", list(range(8)) + [50])
    manager.touch_prefix(waiting)  # ... until a request that wants them arrives
    assert (
        free_queue_ids(manager)[-2:]
        == manager.get_computed_blocks(waiting)[0].get_block_ids()[::-1]
    )
    manager.allocate_slots(make_request("x", list(range(200, 208))), 8)  # evicts two blocks
    assert manager.get_computed_blocks(waiting)[1] == 8  # b's went, a's survived


def test_cached_block_at_ref_zero_stays_hittable_and_is_reclaimed_from_the_free_queue():
    manager = make_manager(num_gpu_blocks=8)
    a = make_request("a", list(range(13)))
    run_prefill(manager, a)
    cached_ids = manager.get_block_ids("a")[:3]
    manager.free(a)
    assert manager.num_free_blocks == 8  # nothing referenced ...
    assert all(manager.blocks[i].block_hash is not None for i in cached_ids)  # ... still cached
    num_hit, b_ids = run_prefill(manager, make_request("b", list(range(13)) + [1]))
    assert num_hit == 12 and b_ids[:3] == cached_ids
    assert not set(cached_ids) & set(free_queue_ids(manager))  # pulled out of the middle
    assert [manager.blocks[i].ref_cnt for i in cached_ids] == [1, 1, 1]
    assert_consistent(manager)


def test_evicting_a_cached_block_forgets_its_hash():
    manager = make_manager(num_gpu_blocks=2)
    a = make_request("a", list(range(8)))
    run_prefill(manager, a)
    a_hashes = list(a.block_hashes)
    manager.free(a)
    assert set(a_hashes) <= set(manager.cached_blocks)
    manager.allocate_slots(make_request("x", list(range(500, 508))), 8)  # evicts both blocks
    assert not set(a_hashes) & set(manager.cached_blocks)
    # What stays hashed is x's own content, in x's blocks.
    assert {b.block_id for b in manager.cached_blocks.values()} == set(manager.get_block_ids("x"))
    assert manager.get_computed_blocks(make_request("b", list(range(8)) + [1]))[1] == 0


def test_duplicate_content_keeps_the_first_cached_block():
    manager = make_manager(num_gpu_blocks=8)
    a, b = make_request("a", list(range(9))), make_request("b", list(range(9)))
    # Both computed in the same step, before either is cached: no hit, two copies.
    for request in (a, b):
        manager.allocate_slots(request, 9)
        request.num_computed_tokens = 9
    for request in (a, b):
        manager.cache_blocks(request, 9)
    assert [manager.cached_blocks[h].block_id for h in a.block_hashes] == manager.get_block_ids(
        "a"
    )[:2]
    b_copy = manager.blocks[manager.get_block_ids("b")[0]]
    assert b_copy.block_hash == a.block_hashes[0]  # hashed, but not the registered holder
    manager.free(a)
    manager.free(b)
    # Evicting every block, duplicates included, leaves no dangling cache entry.
    manager.allocate_slots(make_request("x", list(range(100, 132))), 32)
    assert {b.block_id for b in manager.cached_blocks.values()} == set(manager.get_block_ids("x"))
    assert not set(a.block_hashes) & set(manager.cached_blocks)
    assert_consistent(manager)


# ---- allocation ----------------------------------------------------------------------------
def test_allocate_slots_rounds_up_to_whole_blocks_and_returns_only_new_blocks():
    manager = make_manager()
    request = make_request("a", list(range(5)))
    assert len(manager.allocate_slots(request, 5)) == 2
    request.num_computed_tokens = 5
    assert len(manager.allocate_slots(request, 3)) == 0  # 8 tokens still fit in 2 blocks
    request.num_computed_tokens = 8
    new = manager.allocate_slots(request, 1)
    assert isinstance(new, KVCacheBlocks) and len(new) == 1
    assert manager.get_block_ids("a")[-1] == new.get_block_ids()[0]


def test_allocate_slots_reserves_lookahead_slots():
    manager = make_manager()
    request = make_request("a", list(range(4)))
    assert len(manager.allocate_slots(request, 4, num_lookahead_tokens=5)) == 3


def test_allocate_slots_never_exceeds_max_model_len():
    manager = make_manager(max_model_len=8)
    request = make_request("a", list(range(8)))
    assert len(manager.allocate_slots(request, 8, num_lookahead_tokens=8)) == 2


def snapshot(manager: KVCacheManager) -> tuple:
    return (
        free_queue_ids(manager),
        [(b.ref_cnt, b.block_hash) for b in manager.blocks],
        dict(manager.cached_blocks),
        {k: [b.block_id for b in v] for k, v in manager.req_to_blocks.items() if v},
        dict(manager.num_cached_blocks),
    )


def test_allocate_slots_returns_none_and_changes_nothing_when_blocks_run_out():
    manager = make_manager(num_gpu_blocks=4)
    a = make_request("a", list(range(8)))
    run_prefill(manager, a)  # 2 blocks, cached
    manager.free(a)
    run_prefill(manager, make_request("busy", list(range(100, 104))))  # 1 block in use
    before = snapshot(manager)
    # 2 hit blocks (ref 0, in the free queue) + 2 new = 4 > the 3 free blocks.
    b = make_request("b", list(range(8)) + list(range(300, 308)))
    hit, num_hit = manager.get_computed_blocks(b)
    assert num_hit == 8
    assert manager.allocate_slots(b, 8, num_hit, hit) is None
    assert snapshot(manager) == before
    assert manager.get_block_ids("b") == []
    # 2 hit blocks + 1 new = the 3 free blocks: fits.
    c = make_request("c", list(range(8)) + list(range(400, 404)))
    hit, num_hit = manager.get_computed_blocks(c)
    assert manager.allocate_slots(c, 4, num_hit, hit) is not None
    assert manager.num_free_blocks == 0
    assert_consistent(manager)


def test_usage_counts_only_blocks_with_a_reference():
    manager = make_manager(num_gpu_blocks=10)
    assert manager.usage == 0.0
    a = make_request("a", list(range(12)))
    run_prefill(manager, a)
    assert manager.usage == pytest.approx(0.3)
    b = make_request("b", list(range(12)) + [1])
    run_prefill(manager, b)  # 3 shared + 1 own
    assert manager.usage == pytest.approx(0.4)
    assert manager.usage == sum(b.ref_cnt > 0 for b in manager.blocks) / 10
    manager.free(a)
    assert manager.usage == pytest.approx(0.4)  # b still holds the shared blocks
    manager.free(b)
    assert manager.usage == 0.0  # cached-but-free blocks don't count


def test_no_block_leaks_after_every_request_is_freed():
    rng = random.Random(0)
    manager = make_manager(num_gpu_blocks=64)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 20))] for _ in range(4)]
    live: list[Request] = []
    total_hits = 0
    for i in range(300):
        if live and (rng.random() < 0.45 or manager.num_free_blocks < 12):
            manager.free(live.pop(rng.randrange(len(live))))
        else:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(30))]
            request = make_request(f"r{i}", tokens)
            hit, num_hit = manager.get_computed_blocks(request)
            total_hits += num_hit
            if manager.allocate_slots(request, request.num_tokens - num_hit, num_hit, hit):
                request.num_computed_tokens = request.num_tokens
                manager.cache_blocks(request, request.num_tokens)
                live.append(request)
            else:
                manager.free(request)
        assert_consistent(manager)
    assert total_hits > 0
    for request in live:
        manager.free(request)
    assert manager.num_free_blocks == manager.num_gpu_blocks
    assert all(b.ref_cnt == 0 for b in manager.blocks)
    assert manager.req_to_blocks == {} and manager.num_cached_blocks == {}


# ---- reset -----------------------------------------------------------------------------------
def test_reset_prefix_cache_forgets_every_hash_and_is_refused_while_blocks_are_in_use():
    manager = make_manager()
    a = make_request("a", list(range(13)))
    run_prefill(manager, a)
    assert manager.reset_prefix_cache() is False  # a still holds blocks
    assert manager.cached_blocks
    manager.free(a)
    assert manager.reset_prefix_cache() is True
    assert manager.cached_blocks == {}
    assert all(b.block_hash is None for b in manager.blocks)
    assert manager.get_computed_blocks(make_request("b", list(range(13))))[1] == 0


@pytest.mark.parametrize("hash_algo", ["sha256", "xxhash"])
@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_hashes_from_token_ids_alone_equal_the_managers(hash_algo, salt):
    """What a router computes from a prompt's token ids names the engine's blocks."""
    manager = KVCacheManager(64, BLOCK_SIZE, 256, hash_algo=hash_algo)
    request = make_request("a", list(range(3, 30)), cache_salt=salt)
    manager.get_computed_blocks(request)  # fills request.block_hashes
    hashes = prefix_hash.block_hashes(request.all_token_ids, BLOCK_SIZE, hash_algo, salt)
    assert hashes == request.block_hashes
    assert len(request.block_hashes) == 27 // BLOCK_SIZE
