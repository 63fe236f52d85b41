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
consistent-hash ring decides: from the hash of the prompt's first tokens, the first engine
clockwise among those left (load_order.AnchorRing): deterministic, the same for every request
that starts alike while that engine stays within the slack (a group's users who all miss land
together and build one copy of their prefix, not four), spread over all engines for unrelated
prompts, and never onto an engine busier than the slack allows.

A decision costs what the prompt's holders cost, not what the pool does: the engines' queue
costs are kept in a LoadOrder (updated as the proxy's counts and the scrapes change them), so
the cheapest engine, and how many lie within the slack, are read without visiting the others;
only the engines holding the prompt's first block are walked; the ring is walked from the
prompt's anchor to the first engine within the slack (about N / (engines within it) points),
or, when few are, each of those is asked for its point nearest the anchor.
Blocks just sent to an engine count as held there for `pending_ttl_s`, until its events
confirm them (from then on its events alone decide, so a block evicted soon after counts as
gone): requests sharing a new prefix that arrive together follow the first.
When a candidate publishes no events the whole decision falls back to prefix-aware. (An
engine, once live, stays live while it is a candidate: its subscriber is replaced only when it
leaves the pool. So per candidate set only the engines not yet live are asked again.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat, takewhile
from types import MappingProxyType

from lmserve.prefix_hash import HASH_FUNCTIONS, BlockHash, extend_block_hashes
from lmserve.router.backends import Backend, by_url
from lmserve.router.kv_index import KVIndex
from lmserve.router.load_order import AnchorRing, LoadOrder, PerCandidates, anchor_hash
from lmserve.router.prefix_trie import PrefixTrie
from lmserve.router.routing import (
    Decision,
    PrefixAware,
    RouteRequest,
    RoutingLogic,
    SuppliedHashes,
)


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
        entries = self.entries
        for h in hashes:  # _drop, inlined: one call per block of every engine's events
            holders = entries.get(h)
            if holders is not None and holders.pop(url, None) is not None and not holders:
                del entries[h]

    def prune(self, now: float) -> None:
        for h in list(self.entries):
            for url in [u for u, expiry in self.entries[h].items() if expiry < now]:
                self._drop(h, url)

    def _drop(self, h: BlockHash, url: str) -> None:
        """Forget `url` as a pending holder of `h` (and `h` once nobody holds it)."""
        holders = self.entries.get(h)
        if holders is not None and holders.pop(url, None) is not None and not holders:
            del self.entries[h]


Layout = tuple[int, str]  # (block size, hash algorithm)
PLACEMENT_STRIDE = 4  # blocks between two recorded placements of a conversation

logger = logging.getLogger(__name__)


class CandidateState:
    """What kv-aware keeps per candidate set: the engines ordered by queue cost, the URL map,
    the anchor ring, which engines are not live yet and each engine's block layout."""

    def __init__(
        self, candidates: Sequence[Backend], key: Callable[[Backend], float], watch: bool
    ) -> None:
        self.candidates = candidates
        self.order = LoadOrder(candidates, key, watch)
        self.by_url = by_url(candidates)
        self.ring = AnchorRing(candidates, build=watch)  # a kept set's ring: built now
        self.not_live: list[str] = [b.url for b in candidates]  # shrinks as engines go live
        self.layout_version = -1  # of the index when layout_of was taken
        self.layout_of: dict[str, Layout] = {}  # engines with a known layout only
        self.layouts: set[Layout] = set()

    def close(self) -> None:
        self.order.close()


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
        # Every PLACEMENT_STRIDE-th hash only (each names its whole prefix): a turn still finds
        # the earlier turns' home, at a fraction of the trie's work per request and memory.
        self.placements = PrefixTrie(1, placement_max_bytes)
        index.on_stored.append(self.pending.confirm)
        self.clock = clock
        self._decisions = 0
        self.known_hashes = SuppliedHashes("kv-aware")  # RouteRequest.block_hashes
        self._states = PerCandidates(
            lambda c, watch: CandidateState(c, self.queue_cost, watch), CandidateState.close
        )

    def queue_cost(self, backend: Backend) -> float:
        """The work queued on `backend`, in prompt tokens: what delays a request sent there
        before its own prefill (which `choose` adds)."""
        return backend.pending_prefill_tokens + self.request_cost * backend.load

    def choose(self, request: RouteRequest, candidates: Sequence[Backend]) -> Decision:
        ids = request.token_ids
        state = self._states.get(candidates)
        if ids is None or not self._all_live(state):
            decision = self.fallback.choose(request, candidates)
            return Decision(decision.backend, "kv_fallback_" + decision.reason)
        now = self.clock()
        self._decisions += 1
        if self._decisions % 1024 == 0:
            self.pending.prune(now)
        by_layout = self._hash_chains(ids, state, request.block_hashes)
        cached = self._cached_tokens(by_layout, state, now)  # engines holding none: absent
        n, key_of, urls = len(ids), state.order.key_of, state.by_url

        def cost(b: Backend) -> float:
            """Work queued there + the prompt tokens it would compute: what delays this one."""
            return key_of[b] + (n - cached.get(b.url, 0))

        lowest = min([state.order.lowest() + n, *(cost(urls[u]) for u in cached)])
        # the smallest layout's hashes, every PLACEMENT_STRIDE-th (see __init__)
        placed = (
            by_layout[min(by_layout)][PLACEMENT_STRIDE - 1 :: PLACEMENT_STRIDE] if by_layout else []
        )
        most = max(cached.values(), default=0)
        best = self._home(placed, state, cost, lowest) if most == 0 else None
        if best is None:
            best = self._cheapest(state, cost, lowest + self.slack, cached, n, _anchor(ids))
        self.placements.insert(placed, best.url)
        predicted = cached.get(best.url, 0)
        reason = "kv_miss" if most == 0 else "kv_hit" if predicted == most else "kv_overloaded"
        layout = state.layout_of.get(best.url)
        hashes = by_layout.get(layout) if layout else None
        if hashes:  # the blocks it will compute: held there once the engine confirms them
            self.pending.add(best.url, hashes[predicted // layout[0] :], now)
        return Decision(best, reason, predicted, n - predicted)

    def _all_live(self, state: CandidateState) -> bool:
        """Whether every candidate publishes events (asks only those not live before)."""
        if state.not_live:
            state.not_live = [url for url in state.not_live if not self.is_live(url)]
        return not state.not_live

    def _hash_chains(
        self,
        ids: Sequence[int],
        state: CandidateState,
        known: tuple[int, str, Sequence[BlockHash]] | None = None,
    ) -> dict[Layout, list[BlockHash]]:
        """The prompt's hashes for the blocks a prefix cache could reuse (all but the last
        token), once per distinct layout (block size, hash algorithm) among the candidates.
        The request's `known` hashes stand in for computing a layout's when they cover it
        (checked now and then against the computed chain: SuppliedHashes)."""
        index = self.index
        if state.layout_version != index.layout_version:
            state.layout_of = {}
            for backend in state.candidates:
                layout = index.layouts.get(backend.url)
                if layout is not None and layout.block_size and layout.hash_algo is not None:
                    state.layout_of[backend.url] = (layout.block_size, layout.hash_algo)
            state.layouts = set(state.layout_of.values())
            state.layout_version = index.layout_version
        by_layout: dict[Layout, list[BlockHash]] = {}
        for block_size, algo in state.layouts:
            blocks = (len(ids) - 1) // block_size
            if (
                known is not None
                and self.known_hashes.trusted
                and (known[0], known[1]) == (block_size, algo)
                and len(known[2]) >= blocks
            ):
                supplied = list(known[2][:blocks])
                hashes = self.known_hashes.take(
                    supplied, _block_hashes, ids, blocks, block_size, algo
                )
            else:
                hashes = _block_hashes(ids, blocks, block_size, algo)
            by_layout[(block_size, algo)] = hashes
        return by_layout

    def _cached_tokens(
        self, by_layout: dict[Layout, list[BlockHash]], state: CandidateState, now: float
    ) -> dict[str, int]:
        """Prompt tokens each candidate holds (its index entries or blocks pending there), for
        the engines that hold at least the first block: only those are walked, so a decision
        costs what the prompt's holders cost, not one lookup per engine of the pool."""
        found: dict[str, int] = {}
        blocks, sent = self.index.blocks, self.pending.entries
        for layout, hashes in by_layout.items():
            if not hashes:
                continue
            first = blocks.get(hashes[0], {})
            urls = [
                url
                for url in dict.fromkeys((*first, *sent.get(hashes[0], ())))
                if url not in found and state.layout_of.get(url) == layout
            ]
            runs = self._event_runs([u for u in urls if u in first], hashes)
            for url in urls:
                n = self._held_blocks(url, hashes, now, runs.get(url, 0))
                if n:
                    found[url] = n * layout[0]
        return found

    def _event_runs(self, urls: list[str], hashes: list[BlockHash]) -> dict[str, int]:
        """How many leading blocks of `hashes` each of `urls` holds by its events, walking the
        chain once for all of them: one index lookup per block and a C-level subset test,
        where a walk per engine costs a lookup in each engine's large set per block (a cache
        miss each: the engines sharing a system prompt are many). One engine left: its own
        set, in one C-level pass."""
        runs: dict[str, int] = {}
        active = set(urls)
        blocks = self.index.blocks
        k = 0
        while len(active) > 1 and k < len(hashes):
            holders = blocks.get(hashes[k], _NO_HOLDERS).keys()
            if not holders >= active:
                gone = active - holders
                runs.update(zip(gone, repeat(k)))
                active -= gone
            k += 1
        for url in active:  # at most one
            contains = self.index.held.get(url, frozenset()).__contains__
            runs[url] = k + len(list(takewhile(contains, islice(hashes, k, None))))
        return runs

    def _held_blocks(
        self, url: str, hashes: list[BlockHash], now: float, start: int | None = None
    ) -> int:
        """How many leading blocks of `hashes` engine `url` holds, by its events or pending
        (`start`: its events' leading run, when already known)."""
        contains = self.index.held.get(url, frozenset()).__contains__
        total = len(hashes)
        n = start if start is not None else len(list(takewhile(contains, hashes)))
        while n < total and self.pending.holds(url, hashes[n], now):
            n += 1  # sent there and not confirmed yet: held until its TTL
            n += len(list(takewhile(contains, islice(hashes, n, None))))
        return n

    def _home(
        self,
        placed: list[BlockHash],
        state: CandidateState,
        cost: Callable[[Backend], float],
        lowest: float,
    ) -> Backend | None:
        """The engine this conversation was last sent to, unless it costs more than the
        cheapest by the slack. Its blocks are gone everywhere (evicted under pressure), but its
        next turns will be sent there too: recomputed there, they are shared again, where a
        fresh pick would spread the conversation's turns over several engines' caches."""
        urls = state.by_url
        match = self.placements.match(
            placed, usable=urls.__contains__, touch=False
        )  # choose inserts
        if match.num_chunks == 0:
            return None
        home = min((urls[u] for u in match.backends if u in urls), key=cost)
        return home if cost(home) <= lowest + self.slack else None

    def _cheapest(
        self,
        state: CandidateState,
        cost: Callable[[Backend], float],
        bound: float,
        cached: dict[str, int],
        n: int,
        anchor: bytes,
    ) -> Backend:
        """Of the engines costing at most `bound`, the one holding the most of the prompt;
        ties go to the first of them clockwise from the prompt's anchor on the ring."""
        urls, order, ring = state.by_url, state.order, state.ring
        near = {u: c for u, c in cached.items() if cost(urls[u]) <= bound}
        most = max(near.values(), default=0)
        point = anchor_hash(anchor)
        if most:
            tied = sorted(order.position[urls[u]] for u, c in near.items() if c == most)
            return ring.first(point, tied)
        # nothing cached on any engine within the bound: every engine costing at most the
        # bound without a cache hit (key + n <= bound) is a candidate
        limit = bound - n
        if order.count_at_most(limit) ** 2 <= len(state.candidates):
            return ring.first_of(point, [order.position[b] for b in order.at_most(limit)])
        key_of = order.key_of
        return ring.walk(point, lambda b: key_of[b] <= limit)  # type: ignore[return-value]


_NO_HOLDERS: Mapping[str, object] = MappingProxyType({})  # read-only


def _block_hashes(ids: Sequence[int], blocks: int, block_size: int, algo: str) -> list[BlockHash]:
    """The engines' hashes of the first `blocks` full blocks of `ids`."""
    hashes: list[BlockHash] = []
    extend_block_hashes(hashes, ids[: blocks * block_size], block_size, HASH_FUNCTIONS[algo])
    return hashes


def _anchor(ids: Sequence[int]) -> bytes:
    """What requests that start alike share: their first 16 token ids."""
    return b",".join(str(t).encode() for t in ids[:16])
