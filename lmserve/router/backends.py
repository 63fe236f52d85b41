"""The router's view of its engines: who exists, who is healthy, what each serves, how busy.

Discovery adds and removes backends; the health checker flips `healthy`, refreshes the model
list and the scraped queue lengths; the proxy counts requests in flight. Everything runs on the
router's one event loop, so plain attributes need no locks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, eq=False)
class Backend:
    """One `lmserve serve` (or any OpenAI-compatible server) behind the router."""

    url: str  # scheme://host:port, no trailing slash
    healthy: bool = False  # unknown until the first health check answers
    model_cards: list[dict[str, Any]] = field(default_factory=list)  # its GET /v1/models data
    in_flight: int = 0  # requests this router sent that have not finished
    scraped_running: float = 0.0  # lmserve:num_requests_running at the last scrape
    scraped_waiting: float = 0.0  # lmserve:num_requests_waiting at the last scrape
    in_flight_at_scrape: int = 0  # our in_flight when the scrape was taken
    pending_prefill_tokens: int = 0  # uncached prompt tokens sent, not yet answering (kv-aware)

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


class BackendPool:
    """The set of backends, keyed by URL; listeners hear of additions and removals."""

    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}
        self.on_added: list[Callable[[Backend], None]] = []
        self.on_removed: list[Callable[[Backend], None]] = []

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
            for listener in self.on_added:
                listener(backend)
        return backend

    def remove(self, url: str) -> None:
        backend = self._backends.pop(normalize_url(url), None)
        if backend is not None:
            backend.healthy = False  # requests still holding it will not route to it again
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

    def candidates(self, model: str | None) -> list[Backend]:
        """Healthy backends serving `model` (any healthy backend when no model is named),
        in URL order so that round-robin and tie-breaks are stable."""
        found = [
            b for b in self._backends.values() if b.healthy and (model is None or model in b.models)
        ]
        found.sort(key=lambda b: b.url)
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
