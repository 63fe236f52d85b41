"""kv-aware routing: send a request where its prefix really is, unless waiting there costs more
than recomputing it elsewhere.

The engines' KV events (kv_events.py) keep an exact index of the blocks each one holds
(kv_index.py). For a request the proxy supplies the prompt's token ids (prompt_tokens.py);
each engine's block hashes for them are computed with that engine's block size and hash
algorithm, and every candidate gets a cost in prompt tokens:

    cost(e) = queued_prefill(e) + request_cost * requests(e) + (prompt_len - cached(e))

    queued_prefill(e)  uncached prompt tokens the router sent to e that have not started
                       answering (counted from the moment of dispatch, not from a scrape):
                       e computes them before (or, chunked, alongside) a new prompt
    requests(e)        requests on e (ours in flight, plus others seen in its metrics), each
                       worth `request_cost` tokens (128 by default: what balanced best in
                       benchmarks/kv_aware_routing.py; a running request slows every step
                       and holds KV space a new prompt may need)
    cached(e)          the tokens of the prompt e's prefix cache would reuse

Among the engines within `slack` tokens of the cheapest, the longest cached prefix wins: the
engine holding the prefix keeps its requests until its queue outweighs the prefill it would
save by more than the slack (then `kv_overloaded`: the stickiness breaker; the slack is a
hysteresis, since a recomputed prefix also costs the cache space of its copy). Then a
rendezvous hash of the prompt's first tokens decides: deterministic, the same for every
request that starts alike (a group's users who all miss land together and build one copy of
their prefix, not four), spread evenly over the engines for unrelated prompts, and never onto
an engine busier than the slack allows.
Blocks just sent to an engine count as held there for `pending_ttl_s`, until its events
confirm them (from then on its events alone decide, so a block evicted soon after counts as
gone): requests sharing a new prefix that arrive together follow the first.
When a candidate publishes no events the whole decision falls back to prefix-aware.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import xxhash

from lmserve.prefix_hash import HASH_FUNCTIONS, BlockHash, extend_block_hashes
from lmserve.router.backends import Backend
from lmserve.router.kv_index import KVIndex
from lmserve.router.prefix_trie import PrefixTrie
from lmserve.router.routing import Decision, PrefixAware, RouteRequest, RoutingLogic


@dataclass
class PendingBlocks:
    """Blocks dispatched to an engine and not yet confirmed by its events: hash -> {url: expiry}."""

    ttl_s: float
    entries: dict[BlockHash, dict[str, float]] = field(default_factory=dict)

    def add(self, url: str, hashes: Sequence[BlockHash], now: float) -> None:
        expiry = now + self.ttl_s
        for h in hashes:
            self.entries.setdefault(h, {})[url] = expiry

    def holds(self, url: str, h: BlockHash, now: float) -> bool:
        expiry = self.entries.get(h, {}).get(url)
        if expiry is None:
            return False
        if expiry < now:
            self._drop(h, url)
            return False
        return True

    def confirm(self, url: str, hashes: Sequence[BlockHash]) -> None:
        """The engine's events now report these blocks: from here on its events, not the
        dispatch, say whether it holds them (a later BlockRemoved must count)."""
        for h in hashes:
            self._drop(h, url)

    def prune(self, now: float) -> None:
        for h in list(self.entries):
            for url in [u for u, expiry in self.entries[h].items() if expiry < now]:
                self._drop(h, url)

    def _drop(self, h: BlockHash, url: str) -> None:
        """Forget `url` as a pending holder of `h` (and `h` once nobody holds it)."""
        holders = self.entries.get(h)
        if holders is not None and holders.pop(url, None) is not None and not holders:
            del self.entries[h]


class KvAware(RoutingLogic):
    name = "kv-aware"
    needs_prompt = True  # for the prefix-aware fallback
    needs_tokens = True

    def __init__(
        self,
        index: KVIndex,
        is_live: Callable[[str], bool],
        fallback: PrefixAware,
        request_cost: float = 128.0,
        pending_ttl_s: float = 5.0,
        slack: float = 256.0,
        clock: Callable[[], float] = time.monotonic,
        placement_max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.index = index
        self.is_live = is_live
        self.fallback = fallback
        self.request_cost = request_cost
        self.slack = slack
        self.pending = PendingBlocks(pending_ttl_s)
        # Where each conversation was sent (a trie over its block hashes): a prompt cached
        # nowhere returns there, as prefix-aware sends it, instead of wherever is cheapest.
        self.placements = PrefixTrie(1, placement_max_bytes)
        index.on_stored.append(self.pending.confirm)
        self.clock = clock
        self._decisions = 0

    def choose(self, request: RouteRequest, candidates: Sequence[Backend]) -> Decision:
        ids = request.token_ids
        is_live = self.is_live
        if ids is None or not all(is_live(b.url) for b in candidates):
            decision = self.fallback.choose(request, candidates)
            return Decision(decision.backend, "kv_fallback_" + decision.reason)
        now = self.clock()
        self._decisions += 1
        if self._decisions % 1024 == 0:
            self.pending.prune(now)
        chains, by_layout = self._hash_chains(ids, candidates)
        cached = self._cached_tokens(chains, by_layout, now)  # engines holding none: absent
        n, rc = len(ids), self.request_cost
        # work queued there (tokens) + the prompt tokens it would compute: what delays this one
        costs = {
            b.url: (b.pending_prefill_tokens + rc * b.load) + (n - cached.get(b.url, 0))
            for b in candidates
        }
        lowest = min(costs.values())
        placed = by_layout[min(by_layout)] if by_layout else []  # the smallest layout's hashes
        most = max(cached.values(), default=0)
        best = self._home(placed, candidates, costs, lowest) if most == 0 else None
        if best is None:
            best = self._cheapest(candidates, costs, lowest, cached, _anchor(ids))
        self.placements.insert(placed, best.url)
        predicted = cached.get(best.url, 0)
        reason = "kv_miss" if most == 0 else "kv_hit" if predicted == most else "kv_overloaded"
        hashes = chains.get(best.url)
        if hashes:  # the blocks it will compute: held there once the engine confirms them
            block_size = self.index.layouts[best.url].block_size
            self.pending.add(best.url, hashes[predicted // block_size :], now)
        return Decision(best, reason, predicted, n - predicted)

    def _hash_chains(
        self, ids: Sequence[int], candidates: Sequence[Backend]
    ) -> tuple[dict[str, list[BlockHash]], dict[tuple[int, str], list[BlockHash]]]:
        """Each engine's hashes for the blocks its prefix cache could reuse (all but the last
        token), computed once per distinct (block size, hash algorithm): (by engine, by
        layout)."""
        by_layout: dict[tuple[int, str], list[BlockHash]] = {}
        chains = {}
        layouts = self.index.layouts
        for backend in candidates:
            layout = layouts.get(backend.url)
            if layout is None or layout.block_size is None or layout.hash_algo is None:
                continue
            key = (layout.block_size, layout.hash_algo)
            if key not in by_layout:
                usable = (len(ids) - 1) // layout.block_size * layout.block_size
                hashes: list[BlockHash] = []
                extend_block_hashes(hashes, ids[:usable], key[0], HASH_FUNCTIONS[key[1]])
                by_layout[key] = hashes
            chains[backend.url] = by_layout[key]
        return chains, by_layout

    def _cached_tokens(
        self,
        chains: dict[str, list[BlockHash]],
        by_layout: dict[tuple[int, str], list[BlockHash]],
        now: float,
    ) -> dict[str, int]:
        """Prompt tokens each engine holds (its index entries or blocks pending there), for the
        engines that hold at least the first block: only those are walked, so a decision costs
        what the prompt's holders cost, not one lookup per engine of the pool."""
        found: dict[str, int] = {}
        index, pending = self.index, self.pending
        for (block_size, _), hashes in by_layout.items():
            if not hashes:
                continue
            first = hashes[0]
            holders = [*index.blocks.get(first, ()), *pending.entries.get(first, ())]
            for url in holders:
                if url in found or chains.get(url) is not hashes:
                    continue
                n = 0
                for h in hashes:
                    if not index.holds(url, h) and not pending.holds(url, h, now):
                        break
                    n += 1
                if n:
                    found[url] = n * block_size
        return found

    def _home(
        self,
        placed: list[BlockHash],
        candidates: Sequence[Backend],
        costs: dict[str, float],
        lowest: float,
    ) -> Backend | None:
        """The engine this conversation was last sent to, unless it costs more than the
        cheapest by the slack. Its blocks are gone everywhere (evicted under pressure), but its
        next turns will be sent there too: recomputed there, they are shared again, where a
        fresh pick would spread the conversation's turns over several engines' caches."""
        by_url = {b.url: b for b in candidates}
        match = self.placements.match(placed, usable=by_url.__contains__)
        if match.num_chunks == 0:
            return None
        home = min((by_url[u] for u in match.backends), key=lambda b: costs[b.url])
        return home if costs[home.url] <= lowest + self.slack else None

    def _cheapest(
        self,
        candidates: Sequence[Backend],
        costs: dict[str, float],
        lowest: float,
        cached: dict[str, int],
        anchor: bytes,
    ) -> Backend:
        """Of the engines within the slack of the cheapest, the one holding the most of the
        prompt; ties by rendezvous hash of the prompt's start (stable across routers)."""
        bound = lowest + self.slack
        near = [b for b in candidates if costs[b.url] <= bound]
        most = max(cached.get(b.url, 0) for b in near)
        tied = [b for b in near if cached.get(b.url, 0) == most] if most else near
        return max(tied, key=lambda b: _rendezvous(anchor, b.url))


def _anchor(ids: Sequence[int]) -> bytes:
    """What requests that start alike share: their first 16 token ids."""
    return b",".join(str(t).encode() for t in ids[:16])


def _rendezvous(anchor: bytes, url: str) -> int:
    return xxhash.xxh64_intdigest(anchor + url.encode())
