"""The encoder cache's bookkeeping: reference counts, eviction only when space is needed, the
per-step encoder budget shortening a step, and image hashes in the prefix-cache block hashes."""

from __future__ import annotations

from lmserve.core.encoder_cache_manager import (
    EncoderCacheManager,
    commit_encoder_inputs,
    schedule_encoder_inputs,
)
from lmserve.core.messages import MultiModalFeature
from lmserve.prefix_hash import block_hashes
from lmserve.request import Request
from lmserve.sampling_params import SamplingParams

IMAGE = 99


def request(req_id: str, images: list[tuple[str, int]], length: int = 8) -> Request:
    """A prompt of text tokens with an image of `length` placeholders at each (hash, offset)."""
    ids = list(range(1, 40))
    features = [MultiModalFeature(h, offset, length) for h, offset in images]
    for f in features:
        ids[f.offset : f.end] = [IMAGE] * length
    return Request(req_id, ids, SamplingParams(max_tokens=4), mm_features=features)


def schedule(cache, req, num_computed, num_new, budget):
    to_encode, num_new, _ = schedule_encoder_inputs(req, num_computed, num_new, budget, cache)
    if num_new:
        commit_encoder_inputs(req, num_computed, num_new, to_encode, cache)
    return to_encode, num_new


def test_shared_image_is_encoded_once_and_referenced_by_each_request():
    cache = EncoderCacheManager(cache_size=32)
    a, b = request("a", [("x", 2)]), request("b", [("x", 4)])
    assert schedule(cache, a, 0, 16, budget=16) == ([0], 16)
    assert schedule(cache, b, 0, 16, budget=16) == ([], 16)  # cached: b only references it
    assert cache.cached["x"] == {"a", "b"} and (cache.queries, cache.hits) == (2, 1)
    cache.free_encoder_input(a, 0)
    assert "x" not in cache.freeable  # b still needs it
    cache.free(b)
    assert list(cache.freeable) == ["x"] and cache.num_free_slots == 24  # kept, evictable


def test_budget_stops_the_step_before_an_image_that_does_not_fit():
    cache = EncoderCacheManager(cache_size=32)
    req = request("a", [("x", 2), ("y", 20)])
    assert schedule(cache, req, 0, 30, budget=8) == ([0], 20)  # stops at y's first placeholder
    assert schedule(cache, req, 20, 10, budget=8) == ([1], 10)  # next step: y encoded


def test_chunked_prefill_reads_one_image_over_several_steps_without_re_encoding():
    cache = EncoderCacheManager(cache_size=32)
    req = request("a", [("x", 2)])
    assert schedule(cache, req, 0, 4, budget=8) == ([0], 4)  # placeholders 2..3 of 2..9
    assert schedule(cache, req, 4, 4, budget=8) == ([], 4)
    assert cache.queries == 1


def test_eviction_happens_only_when_space_is_needed():
    cache = EncoderCacheManager(cache_size=16)
    a, b, c = request("a", [("x", 0)]), request("b", [("y", 0)]), request("c", [("z", 0)])
    schedule(cache, a, 0, 8, budget=16)
    schedule(cache, b, 0, 8, budget=16)
    cache.free(a)
    assert cache.take_freed() == [] and "x" in cache.cached  # freeable, not evicted
    assert schedule(cache, c, 0, 8, budget=16) == ([0], 8)  # needs x's slots
    assert cache.take_freed() == ["x"] and "x" not in cache.cached
    d = request("d", [("w", 0)])
    assert schedule(cache, d, 0, 8, budget=16) == ([], 0)  # y and z referenced: no room


def test_block_hashes_name_the_image_in_each_block():
    ids = [1, 2, IMAGE, IMAGE, IMAGE, IMAGE, 3, 4]
    x = [MultiModalFeature("x", 2, 4)]
    y = [MultiModalFeature("y", 2, 4)]
    hx, hx2, hy = (block_hashes(ids, 4, mm_ranges=r) for r in (x, list(x), y))
    assert hx == hx2
    assert hx[0] != hy[0] and hx[1] != hy[1]
    assert block_hashes(ids, 4) != hx  # text-only hashing ignores nothing silently
