"""A bounded hash trie from prompt prefixes to the backends that recently served them.

The prompt is cut into fixed-size chunks (characters, or token ids when the router has a
tokenizer). Chunk i's node is keyed by the chain hash of chunks 0..i, as the engine's prefix
cache keys its blocks, so the trie is one flat dict: a node's key names its whole prefix and no
node holds child pointers.

    chunks:   [sys-0][sys-1][user-a-0][user-a-1]
    keys:     h0 = H(root, sys-0);  h1 = H(h0, sys-1);  h2 = H(h1, user-a-0);  ...
    values:   h0 -> (backend-1, backend-2)   the system prompt is held by two backends
              h2 -> (backend-2,)              only backend-2 saw user a

Memory is bounded: at most `max_nodes` nodes (from the byte cap and a measured upper bound of a
node's size), the least recently used evicted first. NOTE a lookup or insert touches the path
from the deepest node back to the root, so every ancestor is more recent than its descendants
and eviction always takes a leaf: no node is left unreachable behind an evicted parent.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter

# An upper bound of one node's memory: the OrderedDict slot and link (~110 B), the int key
# (32 B) and a tuple of one or two backend names (~56 B; the names themselves are shared).
# tests/router/test_prefix_trie.py checks this against tracemalloc.
BYTES_PER_NODE = 240
MAX_BACKENDS_PER_NODE = 4  # the most recent holders of a prefix; older ones are forgotten
_ROOT = 0x5EED
_NO_PRESENT: tuple[object, list[bool]] = (None, [])


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The deepest node of a prompt's prefix that the trie knows."""

    num_chunks: int  # matched chunks (0 = no match)
    backends: tuple[str, ...]  # who served it, most recent last


def extend_chain(hashes: list[int], chunks: Iterable[Hashable]) -> list[int]:
    """Append one chain hash per chunk to `hashes`, continuing from its last (or the root):
    Python's hash of (parent, chunk), deterministic for str and int tuples."""
    append, parent = hashes.append, hashes[-1] if hashes else _ROOT
    for chunk in chunks:
        parent = hash((parent, chunk))
        append(parent)
    return hashes


def _with_last(holders: tuple[str, ...], backend: str) -> tuple[str, ...]:
    """`holders` with `backend` as the most recent (last), keeping at most
    MAX_BACKENDS_PER_NODE."""
    if holders[-1] == backend:
        return holders
    if backend in holders:
        holders = tuple(b for b in holders if b != backend)
    return (*holders[-MAX_BACKENDS_PER_NODE + 1 :], backend)


class PrefixTrie:
    """Chain-hashed prefix → backends map with LRU eviction; not thread-safe (one event loop)."""

    def __init__(self, chunk_size: int, max_bytes: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"prefix chunk size {chunk_size} must be >= 1")
        self.chunk_size = chunk_size
        self.max_nodes = max(1, max_bytes // BYTES_PER_NODE)
        self.num_evictions = 0
        self._nodes: OrderedDict[int, tuple[str, ...]] = OrderedDict()
        # the last match's list and its membership, for an insert of that list next (a
        # routing decision); whatever changes the trie clears it
        self._present: tuple[object, list[bool]] = _NO_PRESENT

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def approx_bytes(self) -> int:
        return len(self._nodes) * BYTES_PER_NODE

    def chain_hashes(self, prompt: str | Sequence[int]) -> list[int]:
        """One hash per full chunk; a trailing partial chunk is left out (it changes as the
        conversation grows, so it would only fill the trie with nodes nobody matches)."""
        size = self.chunk_size
        if isinstance(prompt, str):
            chunks = (prompt[i : i + size] for i in range(0, len(prompt) - size + 1, size))
        else:  # token ids: the full chunks as tuples, cut in C (a partial one is dropped)
            chunks = zip(*[iter(prompt)] * size)
        return extend_chain([], chunks)

    def match(
        self,
        hashes: Sequence[int],
        usable: Callable[[str], bool] = lambda _: True,
        touch: bool = True,
    ) -> PrefixMatch:
        """The longest prefix among `hashes` held by a `usable` backend (one that is healthy
        and serves the model: a deeper node held only by a dead backend does not count).
        Touches the known path as recently used, unless `touch` is False (a caller that
        inserts `hashes` next: insert touches every one of them in the same order)."""
        nodes = self._nodes
        # membership of every hash in one C pass (past the first miss is wasted, but cheap);
        # kept for an insert of the same list before the trie changes (a routing decision)
        present = list(map(nodes.__contains__, hashes))
        self._present = (hashes, present)
        known = present.index(False) if False in present else len(present)
        if touch:
            for h in reversed(hashes[:known]):  # leaf first: ancestors end up more recent
                nodes.move_to_end(h)
        for depth in range(known, 0, -1):
            holders = nodes[hashes[depth - 1]]
            if any(usable(b) for b in holders):
                return PrefixMatch(depth, holders)
        return PrefixMatch(0, ())

    def insert(self, hashes: Sequence[int], backend: str) -> None:
        """Record that `backend` now holds every prefix in `hashes`, then evict to the cap.

        Every node of `hashes` ends up most recent, the deepest first (the order of a walk
        from the leaf back to the root, touching each node). Usually the known nodes are a
        prefix and the rest are new: then the new ones go in with one C call, the known ones
        get their holders updated and are touched, and the evictions are one C loop."""
        nodes = self._nodes
        last_hashes, present = self._present
        self._present = _NO_PRESENT  # the trie changes now
        if last_hashes is not hashes:
            present = list(map(nodes.__contains__, hashes))
        known = present.index(False) if False in present else len(present)
        if True in present[known:]:  # a known node below an unknown one: node by node
            self._insert_walk(hashes, backend)
        else:
            if known < len(hashes):  # a new key goes last: as recent as a touched one
                nodes.update(zip(reversed(hashes[known:]), repeat((backend,))))
            if known:
                prefix = hashes[:known]
                held = list(map(nodes.__getitem__, prefix))
                if list(map(itemgetter(-1), held)).count(backend) != known:
                    # a prompt's nodes share a few distinct holder tuples (a system prompt's
                    # nodes saw the same backends in the same order): each distinct one is
                    # updated once, and every node gets its update in one C pass
                    new = {h: _with_last(h, backend) for h in set(held)}
                    nodes.update(zip(prefix, map(new.__getitem__, held)))
                deque(map(nodes.move_to_end, reversed(prefix)), maxlen=0)
        excess = len(nodes) - self.max_nodes
        if excess > 0:
            deque(map(nodes.popitem, repeat(False, excess)), maxlen=0)
            self.num_evictions += excess

    def _insert_walk(self, hashes: Sequence[int], backend: str) -> None:
        nodes = self._nodes
        get, touch = nodes.get, nodes.move_to_end
        for h in reversed(hashes):
            holders = get(h)
            if holders is None:
                nodes[h] = (backend,)
                continue
            if holders[-1] != backend:
                nodes[h] = _with_last(holders, backend)
            touch(h)

    def forget_backend(self, backend: str) -> None:
        """Drop `backend` from every node (it left the cluster; its KV cache is gone).
        O(nodes); runs only when a backend is removed, never on the request path."""
        self._present = _NO_PRESENT
        for h, holders in list(self._nodes.items()):
            if backend in holders:
                kept = tuple(b for b in holders if b != backend)
                if kept:
                    self._nodes[h] = kept
                else:
                    del self._nodes[h]
