"""Routing logics: given a request and the healthy backends serving its model, pick one.

    roundrobin     each backend in turn
    session        consistent hashing of a session id: the same session lands on the same
                   backend, and adding or removing one backend moves only that backend's share;
                   requests without a session id go to the least-loaded backend
    least-loaded   fewest requests in flight (our count, refined by the engines' own metrics);
                   ties in candidate order, in turn
    prefix-aware   the backend that most recently served the longest prefix of this prompt
                   (its KV cache likely still holds it), unless that backend is busier than the
                   least-loaded one by more than a margin; see prefix_trie.py
    kv-aware       where the engines' own KV events say the prompt's prefix is cached, weighed
                   against each engine's queue; see kv_aware.py (built by the app: it needs
                   the event subscriptions)

Contract: `choose` is called with a non-empty candidate list (healthy, serving the model, not
yet tried for this request) and returns one of them; it may update the logic's own state (the
round-robin counter, the trie) but never a backend's.

Cost: a decision does not visit every candidate. The pool hands out one immutable `Candidates`
per model until its membership or health changes; per such set a logic keeps its load order
(load_order.py: backends bucketed by load, moved when their load fields change), URL map and
hash ring. Any other sequence (a retry's list without the tried backends, a test's list) gets
the same structures built for that one decision: the same choice, at O(candidates).
"""

from __future__ import annotations

import bisect
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import xxhash

from lmserve.router.backends import Backend, by_url
from lmserve.router.load_order import LoadOrder, PerCandidates
from lmserve.router.prefix_trie import PrefixTrie

ROUTING_LOGICS = ("roundrobin", "session", "least-loaded", "prefix-aware", "kv-aware")


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing may look at; filled by the proxy from the headers and the JSON body."""

    model: str | None
    session_id: str | None = None
    prompt: str | Sequence[int] | None = None  # text or token ids (prefix-aware only)
    token_ids: Sequence[int] | None = None  # the engine's prompt ids (kv-aware only)
    # kv-aware: the prompt, computed only if the decision falls back to prefix-aware
    lazy_prompt: Callable[[], str | Sequence[int] | None] | None = None
    # kv-aware: the engines' block hashes of `token_ids` when the caller has them already, as
    # (block size, hash algorithm, hashes of at least every full block of token_ids[:-1]);
    # the simulator's clients do (the proxy does not). See KvAware.choose.
    block_hashes: tuple[int, str, Sequence[bytes]] | None = None
    # prefix-aware: the trie's chain hashes of the token ids in `prompt` when the caller has
    # them already, as (chunk size, hashes of at least every full chunk); the simulator's
    # clients do (the proxy does not). See PrefixAware.choose.
    prefix_chain: tuple[int, Sequence[int]] | None = None

    def prompt_text_or_ids(self) -> str | Sequence[int]:
        if self.prompt is None and self.lazy_prompt is not None:
            return self.lazy_prompt() or ""
        return self.prompt or ""


@dataclass(frozen=True, slots=True)
class Decision:
    backend: Backend
    reason: str  # a label of lmserve_router:routing_decisions_total
    predicted_cached: int | None = None  # prompt tokens the backend should find cached
    prefill_tokens: int = 0  # prompt tokens it must compute (counted as its queue until answered)


logger = logging.getLogger(__name__)


class SuppliedHashes:
    """Hashes a request brings instead of the router computing them (the simulator's clients
    computed them already). They are used while they agree with the computed ones, checked on
    the first 8 uses and one in `check_every` after; one disagreement stops their use."""

    def __init__(self, what: str, check_every: int = 1024) -> None:
        self.what = what
        self.check_every = check_every
        self.trusted = True
        self.used = 0

    def take(self, supplied: list, compute: Callable[..., list], *args: object) -> list:
        """`supplied`, or `compute(*args)` when a check finds them different."""
        self.used += 1
        if self.used <= 8 or self.used % self.check_every == 0:
            computed = compute(*args)
            if computed != supplied:
                logger.warning("%s: the request's hashes are not the prompt's; computing them "
                               "from now on", self.what)  # fmt: skip
                self.trusted = False
                return computed
        return supplied


class RoutingLogic(ABC):
    name: str
    needs_prompt: bool = False  # whether the proxy must extract the prompt for it
    needs_tokens: bool = False  # whether the proxy must compute the engine's prompt token ids

    @abstractmethod
    def choose(self, request: RouteRequest, candidates: Sequence[Backend]) -> Decision:
        """One of `candidates` (non-empty) and why."""


class RoundRobin(RoutingLogic):
    name = "roundrobin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: RouteRequest, candidates: Sequence[Backend]) -> Decision:
        backend = candidates[self._next % len(candidates)]
        self._next += 1
        return Decision(backend, "roundrobin")


class LeastLoaded(RoutingLogic):
    """Lowest `Backend.load`; ties go round the tied backends in turn, so an idle cluster is
    still spread evenly. The lowest-load bucket comes from a LoadOrder: O(1) per decision."""

    name = "least-loaded"

    def __init__(self) -> None:
        self._tie_break = 0
        self._orders = PerCandidates(_load_order, LoadOrder.close)

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        tied = self._orders.get(candidates).tied_lowest()  # positions in `candidates`
        self._tie_break += 1
        return candidates[tied[self._tie_break % len(tied)]]

    def choose(self, request: RouteRequest, candidates: Sequence[Backend]) -> Decision:
        return Decision(self.pick(candidates), "least_loaded")


def _load(backend: Backend) -> float:
    return backend.load


def _load_order(candidates: Sequence[Backend], watch: bool) -> LoadOrder:
    return LoadOrder(candidates, _load, watch)


class ConsistentHashRing:
    """`vnodes` points per backend on a 64-bit ring; a key belongs to the first point at or
    after its hash. Removing a backend hands only its points' arcs to the neighbours. The hash is
    xxh64, stable across processes, so replicas of the router agree."""

    def __init__(self, nodes: Sequence[str], vnodes: int = 160) -> None:
        points = sorted((_hash64(f"{n}#{i}"), n) for n in nodes for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._nodes = [n for _, n in points]

    def lookup(self, key: str) -> str:
        i = bisect.bisect_left(self._hashes, _hash64(key))
        return self._nodes[i % len(self._nodes)]


def _hash64(text: str) -> int:
    return xxhash.xxh64_intdigest(text.encode())


class SessionAffinity(RoutingLogic):
    name = "session"
    _MAX_RINGS = 8  # rings cached per distinct candidate set (models x health states)

    def __init__(self) -> None:
        self._rings: dict[tuple[str, ...], ConsistentHashRing] = {}
        self._fallback = LeastLoaded()
        # a pool's candidate set -> its ring, without hashing its URL tuple per request
        self._ring_of = PerCandidates(lambda c, _: self.ring(tuple(b.url for b in c)))

    def ring(self, urls: tuple[str, ...]) -> ConsistentHashRing:
        ring = self._rings.get(urls)
        if ring is None:
            if len(self._rings) >= self._MAX_RINGS:
                self._rings.pop(next(iter(self._rings)))
            ring = self._rings[urls] = ConsistentHashRing(urls)
        return ring

    def choose(self, request: RouteRequest, candidates: Sequence[Backend]) -> Decision:
        if request.session_id is None:
            return Decision(self._fallback.pick(candidates), "session_fallback")
        url = self._ring_of.get(candidates).lookup(request.session_id)
        return Decision(by_url(candidates)[url], "session")


class PrefixAware(RoutingLogic):
    """Longest cached prefix wins, within `balance_margin` requests of the least-loaded backend.

    Among the backends holding the longest usable prefix, the least loaded (then the most
    recent) is taken. If even it carries more than `balance_margin` requests beyond the
    least-loaded candidate, the request goes to the least-loaded one instead, which then holds
    the prefix too: a system prompt shared by every user spreads over the cluster rather than
    pinning it to one engine."""

    name = "prefix-aware"
    needs_prompt = True

    def __init__(self, trie: PrefixTrie, balance_margin: float) -> None:
        self.trie = trie
        self.balance_margin = balance_margin
        self._least_loaded = LeastLoaded()
        self.supplied_chains = SuppliedHashes("prefix-aware")  # RouteRequest.prefix_chain

    def choose(self, request: RouteRequest, candidates: Sequence[Backend]) -> Decision:
        hashes = self._chain_hashes(request)
        urls = by_url(candidates)
        match = self.trie.match(hashes, usable=urls.__contains__, touch=False)  # inserted below
        least = self._least_loaded.pick(candidates)
        if match.num_chunks == 0:
            decision = Decision(least, "prefix_miss")
        else:
            holders = [urls[u] for u in reversed(match.backends) if u in urls]
            best = min(holders, key=lambda b: b.load)
            if best.load > least.load + self.balance_margin:
                decision = Decision(least, "prefix_overloaded")
            else:
                decision = Decision(best, "prefix_hit")
        self.trie.insert(hashes, decision.backend.url)
        return decision

    def _chain_hashes(self, request: RouteRequest) -> list[int]:
        """The trie's chain hashes of the prompt: the request's own when it brings them for
        token ids with the trie's chunk size (see SuppliedHashes), else computed."""
        prompt = request.prompt_text_or_ids()
        supplied = request.prefix_chain
        if supplied is None or not self.supplied_chains.trusted or isinstance(prompt, str):
            return self.trie.chain_hashes(prompt)
        size, chain = supplied
        chunks = len(prompt) // size
        if size != self.trie.chunk_size or len(chain) < chunks:
            return self.trie.chain_hashes(prompt)
        return self.supplied_chains.take(list(chain[:chunks]), self.trie.chain_hashes, prompt)


def make_routing_logic(
    name: str, trie: PrefixTrie | None = None, balance_margin: float = 4.0
) -> RoutingLogic:
    if name == "roundrobin":
        return RoundRobin()
    if name == "session":
        return SessionAffinity()
    if name == "least-loaded":
        return LeastLoaded()
    if name == "prefix-aware":
        if trie is None:
            raise ValueError("prefix-aware routing needs a prefix trie")
        return PrefixAware(trie, balance_margin)
    if name == "kv-aware":
        raise ValueError("kv-aware routing needs the engines' KV events: the app builds it")
    raise ValueError(f"unknown routing logic {name!r}; choose from {ROUTING_LOGICS}")
