"""The CPU tier's slots: invisible until committed, LRU, never evicting a slot being read."""

from __future__ import annotations

import torch

from lmserve.kv_transfer.slab_tier import SlabCPUTier


def payload(value: int, nbytes: int = 64) -> bytes:
    return bytes([value]) * nbytes


def test_put_then_get_and_acquire_return_the_bytes():
    tier = SlabCPUTier(capacity_bytes=4 * 64, pin=False)
    assert tier.put("a", payload(7))
    assert tier.get("a") == payload(7)
    slot, view = tier.acquire("a")
    assert bytes(view.numpy()) == payload(7)
    tier.release(slot)
    assert tier.stats.bytes_saved["cpu"] == 64 and tier.stats.bytes_loaded["cpu"] == 128


def test_reserved_slot_is_invisible_until_committed():
    tier = SlabCPUTier(capacity_bytes=4 * 64, pin=False)
    slot, view = tier.reserve("a", 64)
    view.copy_(torch.full((64,), 3, dtype=torch.uint8))
    assert not tier.contains("a") and tier.acquire("a") is None
    tier.commit("a", slot)
    assert tier.contains_many(["a", "b"]) == [True, False]
    assert tier.reserve("a", 64) is None  # present: nothing to copy


def test_least_recently_used_slot_is_reused_but_never_one_being_read():
    tier = SlabCPUTier(capacity_bytes=2 * 64, pin=False)
    tier.put("a", payload(1))
    tier.put("b", payload(2))
    held = tier.acquire("a")  # "a" is now the most recent, and being read
    assert tier.put("c", payload(3))  # evicts "b"
    assert tier.contains_many(["a", "b", "c"]) == [True, False, True]
    tier.acquire("c")  # both slots are being read now
    assert not tier.put("d", payload(4))
    assert tier.stats.failures[("cpu", "full")] == 1
    tier.release(held[0])
    assert tier.put("d", payload(4)) and not tier.contains("a")
    assert bytes(held[1].numpy()) == payload(4)  # the slot "a" had now holds "d"


def test_a_chunk_of_another_size_is_refused():
    tier = SlabCPUTier(capacity_bytes=4 * 64, pin=False)
    tier.put("a", payload(1))
    assert not tier.put("b", payload(1, nbytes=32))
    assert tier.stats.failures[("cpu", "size")] == 1


def test_slots_grow_in_segments_up_to_the_capacity():
    tier = SlabCPUTier(capacity_bytes=10 * 64, pin=False)
    for i in range(25):
        assert tier.put(f"k{i}", payload(i))
    assert len(tier) == 10
    assert [tier.get(f"k{i}") == payload(i) for i in range(15, 25)] == [True] * 10


def test_preallocate_makes_every_slot_up_front():
    tier = SlabCPUTier(capacity_bytes=10 * 64, pin=False)
    tier.preallocate(64)
    assert (tier.slot_bytes, tier._num_slots, len(tier._free)) == (64, 10, 10)
    for i in range(12):
        assert tier.put(f"k{i}", payload(i))
    assert len(tier) == 10 and tier._num_slots == 10


def test_slots_made_under_inference_mode_can_be_written_outside_it():
    """The worker's profiling run (under inference_mode) may make the slots; the saver
    thread then writes them outside inference mode."""
    tier = SlabCPUTier(capacity_bytes=4 * 64, pin=False)
    with torch.inference_mode():
        tier.preallocate(64)
    slot, view = tier.reserve("a", 64)
    view.copy_(torch.full((64,), 5, dtype=torch.uint8))  # raised for an inference tensor
    tier.commit("a", slot)
    assert tier.get("a") == payload(5)
