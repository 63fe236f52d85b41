"""The router's view of its engines: who exists, who is healthy, what each serves, how busy.

Discovery adds and removes backends; the health checker flips `healthy`, refreshes the model
list and the scraped queue lengths; the proxy counts requests in flight. Everything runs on the
router's one event loop, so plain attributes need no locks.

A backend tells its `watchers` when a field they depend on is assigned a new value: the pool
(health, models: its candidate lists) and the routing logics' load orders (load_order.py: the
load fields), so that neither rescans every backend per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

# What `Backend.load` (and kv-aware's cost) is computed from
LOAD_FIELDS = frozenset(
    {"in_flight", "scraped_running", "scraped_waiting", "in_flight_at_scrape",
     "pending_prefill_tokens"}
)  # fmt: skip
# What decides whether a backend is a candidate for a model
MEMBERSHIP_FIELDS = frozenset({"healthy", "model_cards"})
_WATCHED = LOAD_FIELDS | MEMBERSHIP_FIELDS


class BackendWatcher(Protocol):
    def backend_changed(self, backend: Backend, field_name: str) -> None:
        """`backend.<field_name>` was just assigned a value different from its last one."""


@dataclass(slots=True, eq=False)
class Backend:
    """One `lmserve serve` (or any OpenAI-compatible server) behind the router."""

    url: str  # scheme://host:port, no trailing slash
    # told of changes to the watched fields; set first, so __init__'s own assignments see it
    watchers: list[BackendWatcher] = field(default_factory=list, init=False, repr=False)
    healthy: bool = False  # unknown until the first health check answers
    model_cards: list[dict[str, Any]] = field(default_factory=list)  # its GET /v1/models data
    in_flight: int = 0  # requests this router sent that have not finished
    scraped_running: float = 0.0  # lmserve:num_requests_running at the last scrape
    scraped_waiting: float = 0.0  # lmserve:num_requests_waiting at the last scrape
    in_flight_at_scrape: int = 0  # our in_flight when the scrape was taken
    pending_prefill_tokens: int = 0  # uncached prompt tokens sent, not yet answering (kv-aware)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _WATCHED:
            object.__setattr__(self, name, value)
            return
        old = getattr(self, name, None)  # None while __init__ assigns it the first time
        object.__setattr__(self, name, value)
        if old != value:
            for watcher in self.watchers:
                watcher.backend_changed(self, name)

    @property
    def models(self) -> set[str]:
        return {card["id"] for card in self.model_cards if isinstance(card.get("id"), str)}

    @property
    def load(self) -> float:
        """Requests in flight by our own count, plus what the engine's own metrics showed
        beyond what we had sent at scrape time (other routers' or direct clients' requests).
        A waiting request counts the same as a running one: both delay a new arrival."""
        scraped = self.scraped_running + self.scraped_waiting
        foreign = max(0.0, scraped - self.in_flight_at_scrape)
        return self.in_flight + foreign


class Candidates(tuple):
    """The healthy backends serving one model, in URL order: what `BackendPool.candidates`
    returns. Immutable, and the same object until the pool, a backend's health or its models
    change (then `retired` is set and the next call builds a new one): routing logics key what
    they derive from a candidate set (load order, hash ring, URL map) by its identity."""

    retired = False  # set on an instance when the pool stops handing it out

    @cached_property
    def by_url(self) -> dict[str, Backend]:
        return {b.url: b for b in self}

    @cached_property
    def urls(self) -> tuple[str, ...]:
        return tuple(b.url for b in self)


def by_url(candidates: Iterable[Backend]) -> dict[str, Backend]:
    """URL -> backend of a candidate list (kept with a pool's `Candidates`, built otherwise)."""
    if isinstance(candidates, Candidates):
        return candidates.by_url
    return {b.url: b for b in candidates}


class BackendPool:
    """The set of backends, keyed by URL; listeners hear of additions and removals."""

    _MAX_CACHED_MODELS = 64  # candidate lists kept; any model name may be asked for

    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}
        self.on_added: list[Callable[[Backend], None]] = []
        self.on_removed: list[Callable[[Backend], None]] = []
        self._candidates: dict[str | None, Candidates] = {}  # model -> current candidate set

    def backend_changed(self, backend: Backend, field_name: str) -> None:
        if field_name in MEMBERSHIP_FIELDS:
            self._invalidate()

    def _invalidate(self) -> None:
        for candidates in self._candidates.values():
            candidates.retired = True
        self._candidates.clear()

    def __iter__(self):
        return iter(self._backends.values())

    def __len__(self) -> int:
        return len(self._backends)

    def get(self, url: str) -> Backend | None:
        return self._backends.get(url)

    def add(self, url: str) -> Backend:
        url = normalize_url(url)
        backend = self._backends.get(url)
        if backend is None:
            backend = self._backends[url] = Backend(url)
            backend.watchers.append(self)
            self._invalidate()
            for listener in self.on_added:
                listener(backend)
        return backend

    def remove(self, url: str) -> None:
        backend = self._backends.pop(normalize_url(url), None)
        if backend is not None:
            backend.healthy = False  # requests still holding it will not route to it again
            backend.watchers.remove(self)
            self._invalidate()
            for listener in self.on_removed:
                listener(backend)

    def replace_all(self, urls: Iterable[str]) -> None:
        """Make the pool exactly `urls` (a full listing from discovery)."""
        wanted = {normalize_url(u) for u in urls}
        for url in list(self._backends):
            if url not in wanted:
                self.remove(url)
        for url in sorted(wanted):
            self.add(url)

    def candidates(self, model: str | None) -> Candidates:
        """Healthy backends serving `model` (any healthy backend when no model is named),
        in URL order so that round-robin and tie-breaks are stable. Built once per change of
        the pool or of a backend's health or models, not per request."""
        found = self._candidates.get(model)
        if found is None:
            backends = [
                b
                for b in self._backends.values()
                if b.healthy and (model is None or model in b.models)
            ]
            backends.sort(key=lambda b: b.url)
            if len(self._candidates) >= self._MAX_CACHED_MODELS:
                self._invalidate()
            found = self._candidates[model] = Candidates(backends)
        return found

    def serves(self, model: str) -> bool:
        """Whether any known backend, healthy or not, lists `model`."""
        return any(model in b.models for b in self._backends.values())

    def model_cards(self) -> list[dict[str, Any]]:
        """The union of the healthy backends' model cards, one per model id."""
        cards: dict[str, dict[str, Any]] = {}
        for backend in sorted(self._backends.values(), key=lambda b: b.url):
            if backend.healthy:
                for card in backend.model_cards:
                    cards.setdefault(card.get("id"), card)
        return list(cards.values())


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url
