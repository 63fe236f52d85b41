"""The prefix trie: longest match, holders, LRU eviction and the memory cap."""

from __future__ import annotations

import tracemalloc
from collections import OrderedDict

import pytest

from lmserve.router.prefix_trie import BYTES_PER_NODE, PrefixTrie

SYSTEM = "You are a helpful assistant. " * 10  # 290 characters: 2 full chunks of 128


def test_longest_prefix_match_names_the_backend_that_served_it():
    trie = PrefixTrie(chunk_size=16, max_bytes=1 << 20)
    trie.insert(trie.chain_hashes(SYSTEM + "user a: " + "x" * 64), "A")
    trie.insert(trie.chain_hashes(SYSTEM + "user b: " + "y" * 64), "B")
    a_next_round = trie.match(trie.chain_hashes(SYSTEM + "user a: " + "x" * 64 + "more" * 20))
    assert a_next_round.backends == ("A",)
    shared_only = trie.match(trie.chain_hashes(SYSTEM + "user c: " + "z" * 64))
    assert shared_only.num_chunks == len(SYSTEM) // 16  # the system prompt's full chunks
    assert set(shared_only.backends) == {"A", "B"}
    assert trie.match(trie.chain_hashes("unrelated " * 20)).num_chunks == 0


def test_token_ids_chunk_like_characters():
    trie = PrefixTrie(chunk_size=4, max_bytes=1 << 20)
    trie.insert(trie.chain_hashes(list(range(20))), "A")
    assert trie.match(trie.chain_hashes([*range(12), 99, 98, 97, 96])).num_chunks == 3
    assert trie.chain_hashes([1, 2, 3]) == []  # a partial chunk makes no node


def test_a_match_skips_nodes_held_only_by_unusable_backends():
    trie = PrefixTrie(chunk_size=16, max_bytes=1 << 20)
    trie.insert(trie.chain_hashes(SYSTEM), "B")
    trie.insert(trie.chain_hashes(SYSTEM + "a" * 64), "A")  # deeper, but A is dead
    match = trie.match(trie.chain_hashes(SYSTEM + "a" * 64), usable=lambda b: b != "A")
    assert match.num_chunks == len(SYSTEM) // 16 and "B" in match.backends


def test_eviction_takes_least_recently_used_leaves_not_their_ancestors():
    chunk = 8
    trie = PrefixTrie(chunk_size=chunk, max_bytes=6 * BYTES_PER_NODE)
    old = "o" * chunk * 3
    trie.insert(trie.chain_hashes(old), "A")  # 3 nodes
    trie.insert(trie.chain_hashes("s" * chunk * 2), "B")  # 2 nodes
    trie.match(trie.chain_hashes(old[: chunk * 2]))  # touch old's first two chunks
    trie.insert(trie.chain_hashes("n" * chunk * 2), "C")  # 2 more: one eviction needed
    assert len(trie) == 6 and trie.num_evictions == 1
    # The evicted node is old's third chunk (a leaf), not its root: old still matches 2 chunks.
    assert trie.match(trie.chain_hashes(old)).num_chunks == 2


@pytest.mark.slow  # ~6 s: tracemalloc slows every allocation
def test_trie_stays_under_its_memory_cap_after_100k_distinct_prompts():
    cap = 4 * 1024 * 1024
    urls = [f"http://engine-{i}:8000" for i in range(3)]  # shared, as Backend.url is
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        trie = PrefixTrie(chunk_size=64, max_bytes=cap)
        for i in range(100_000):
            prompt = SYSTEM + f"user {i} asks about item {i * 7919} " * 3
            trie.insert(trie.chain_hashes(prompt), urls[i % 3])
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(trie) <= trie.max_nodes == cap // BYTES_PER_NODE
    assert trie.num_evictions > 100_000  # it was full and kept evicting
    assert used <= cap, f"trie uses {used} bytes, cap {cap}"
    assert used / len(trie) <= BYTES_PER_NODE  # the per-node bound the cap relies on
    recent = SYSTEM + f"user {99_999} asks about item {99_999 * 7919} " * 3
    assert trie.match(trie.chain_hashes(recent)).num_chunks == len(recent) // 64


def test_forgetting_a_backend_removes_it_from_every_node():
    trie = PrefixTrie(chunk_size=16, max_bytes=1 << 20)
    trie.insert(trie.chain_hashes(SYSTEM), "A")
    trie.insert(trie.chain_hashes(SYSTEM + "b" * 32), "B")
    trie.forget_backend("A")
    assert "A" not in trie.match(trie.chain_hashes(SYSTEM)).backends
    assert trie.match(trie.chain_hashes(SYSTEM + "b" * 32)).backends == ("B",)


def test_insert_keeps_the_order_and_holders_of_a_node_by_node_walk():
    """insert's bulk path (known nodes a prefix, the rest new), also after a match of the same
    list whose membership it reuses, leaves the trie as the walk from the deepest node back to
    the root does: same holders, same LRU order, same evictions."""
    import random

    from lmserve.router.prefix_trie import MAX_BACKENDS_PER_NODE

    def walk(nodes, hashes, backend, max_nodes):  # the walk insert was before the bulk path
        for h in reversed(hashes):
            holders = nodes.get(h)
            if holders is None:
                nodes[h] = (backend,)
                continue
            if holders[-1] != backend:
                kept = tuple(b for b in holders if b != backend)[-MAX_BACKENDS_PER_NODE + 1 :]
                nodes[h] = (*kept, backend)
            nodes.move_to_end(h)
        while len(nodes) > max_nodes:
            nodes.popitem(last=False)

    rng = random.Random(3)
    trie = PrefixTrie(4, 300 * BYTES_PER_NODE)
    reference: OrderedDict = OrderedDict()
    for _ in range(2000):
        base = rng.randrange(20)
        prompt = [base] * 8 + [rng.randrange(50) for _ in range(rng.randrange(0, 40))]
        hashes = trie.chain_hashes(prompt)
        if rng.random() < 0.1:  # a known node below an unknown one
            hashes = hashes[:1] + [rng.randrange(1 << 60)] + hashes[1:]
        backend = f"b{rng.randrange(6)}"
        if rng.random() < 0.5:  # a routing decision: match, then insert the same list
            trie.match(hashes, touch=False)
            if rng.random() < 0.3:  # another insert in between: match's membership is stale
                other = hashes[: rng.randrange(len(hashes) + 1)]  # its unknown nodes now known
                trie.insert(other, "b9")
                walk(reference, other, "b9", trie.max_nodes)
        trie.insert(hashes, backend)
        walk(reference, hashes, backend, trie.max_nodes)
        assert list(trie._nodes.items()) == list(reference.items())
