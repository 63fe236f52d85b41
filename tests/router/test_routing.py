"""Routing logics on plain Backend objects (no servers)."""

from __future__ import annotations

from collections import Counter

import pytest

from lmserve.router.backends import Backend, BackendPool
from lmserve.router.prefix_trie import PrefixTrie
from lmserve.router.proxy import prompt_of
from lmserve.router.routing import (
    ConsistentHashRing,
    LeastLoaded,
    PrefixAware,
    RoundRobin,
    RouteRequest,
    SessionAffinity,
    make_routing_logic,
)

URLS = ["http://a:8000", "http://b:8000", "http://c:8000"]
SYSTEM = "You are a helpful assistant who answers in one sentence. " * 8


def backends(n: int = 3) -> list[Backend]:
    return [Backend(url, healthy=True) for url in URLS[:n]]


def test_roundrobin_takes_each_backend_in_turn():
    logic, pool = RoundRobin(), backends()
    picks = [logic.choose(RouteRequest("m"), pool).backend.url for _ in range(9)]
    assert picks == URLS * 3


def test_consistent_hashing_moves_only_the_removed_backends_sessions():
    sessions = [f"session-{i}" for i in range(3000)]
    before = {s: ConsistentHashRing(URLS).lookup(s) for s in sessions}
    shares = Counter(before.values())
    assert all(600 < shares[u] < 1400 for u in URLS), shares  # roughly even
    after = {s: ConsistentHashRing(URLS[:2]).lookup(s) for s in sessions}
    moved = {s for s in sessions if before[s] != after[s]}
    assert moved == {s for s in sessions if before[s] == URLS[2]}


def test_consistent_hashing_gives_a_new_backend_only_sessions_it_takes_over():
    sessions = [f"session-{i}" for i in range(3000)]
    three = ConsistentHashRing(URLS)
    four = ConsistentHashRing([*URLS, "http://d:8000"])
    moved = [s for s in sessions if three.lookup(s) != four.lookup(s)]
    assert all(four.lookup(s) == "http://d:8000" for s in moved)
    assert 400 < len(moved) < 1200  # about a quarter


def test_session_affinity_is_stable_and_falls_back_to_least_loaded():
    logic, pool = SessionAffinity(), backends()
    first = logic.choose(RouteRequest("m", "user-42"), pool)
    assert first.reason == "session"
    assert all(
        logic.choose(RouteRequest("m", "user-42"), pool).backend is first.backend for _ in range(5)
    )
    pool[0].in_flight, pool[1].in_flight = 5, 3
    fallback = logic.choose(RouteRequest("m", None), pool)
    assert fallback.reason == "session_fallback" and fallback.backend is pool[2]


def test_least_loaded_counts_the_engines_scraped_queue_beyond_our_own_requests():
    pool = backends()
    pool[0].in_flight = 1
    pool[1].scraped_waiting, pool[1].scraped_running = 6.0, 2.0  # someone else's requests
    pool[2].in_flight = 2
    assert LeastLoaded().choose(RouteRequest("m"), pool).backend is pool[0]
    pool[2].in_flight_at_scrape, pool[2].scraped_running = 2, 2.0  # ours: no extra load
    assert pool[2].load == 2 and pool[1].load == 8


def test_least_loaded_spreads_ties_instead_of_always_taking_the_first():
    logic, pool = LeastLoaded(), backends()
    picks = Counter(logic.choose(RouteRequest("m"), pool).backend.url for _ in range(30))
    assert set(picks.values()) == {10}


def conversation(user: int, rounds: int) -> dict:
    messages = [{"role": "system", "content": SYSTEM}]
    for r in range(rounds):
        messages.append({"role": "user", "content": f"question {r} from user {user} " * 4})
        messages.append({"role": "assistant", "content": f"answer {r} to user {user} " * 4})
    messages.append({"role": "user", "content": f"question {rounds} from user {user} " * 4})
    return {"model": "m", "messages": messages}


def test_chat_prompt_of_a_later_round_extends_the_earlier_one():
    earlier, later = prompt_of(conversation(1, 1)), prompt_of(conversation(1, 2))
    assert later.startswith(earlier[: -len("question 1 from user 1 " * 4) - 1])
    assert prompt_of({"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert prompt_of({"prompt": ["first", "second"]}) == "first"


def test_prefix_aware_keeps_a_conversation_on_the_backend_that_served_it():
    logic = PrefixAware(PrefixTrie(64, 1 << 20), balance_margin=4)
    pool = backends()
    homes = {}
    for user in range(6):
        homes[user] = logic.choose(RouteRequest("m", prompt=prompt_of(conversation(user, 0))), pool)
    for rounds in (1, 2, 3):
        for user in range(6):
            decision = logic.choose(
                RouteRequest("m", prompt=prompt_of(conversation(user, rounds))), pool
            )
            assert decision.backend is homes[user].backend and decision.reason == "prefix_hit"


def test_prefix_aware_spreads_a_shared_system_prompt_under_load():
    """60 users arrive at once, all with the same system prompt; requests stay in flight."""
    logic = PrefixAware(PrefixTrie(64, 1 << 20), balance_margin=4)
    pool = backends()
    reasons = Counter()
    for user in range(60):
        decision = logic.choose(RouteRequest("m", prompt=prompt_of(conversation(user, 0))), pool)
        decision.backend.in_flight += 1
        reasons[decision.reason] += 1
    loads = sorted(b.in_flight for b in pool)
    assert loads[-1] - loads[0] <= 5, loads  # within the margin, not 60 on one engine
    assert reasons["prefix_hit"] > 30  # mostly still cache hits on the shared prompt


def test_prefix_aware_leaves_an_overloaded_holder_for_the_least_loaded():
    logic = PrefixAware(PrefixTrie(64, 1 << 20), balance_margin=2)
    pool = backends()
    first = logic.choose(RouteRequest("m", prompt=prompt_of(conversation(1, 0))), pool)
    first.backend.in_flight = 3  # 3 > 0 + margin 2
    again = logic.choose(RouteRequest("m", prompt=prompt_of(conversation(1, 1))), pool)
    assert again.reason == "prefix_overloaded" and again.backend is not first.backend


def test_prefix_aware_reads_a_supplied_chain_and_stops_trusting_a_wrong_one():
    """The simulator's requests bring the trie's chain hashes of their token ids (computed as
    the conversation grew): decisions are those of the computed chain, and a chain that is
    not the prompt's is caught by a check and never used again."""
    trie = PrefixTrie(4, 1 << 20)
    logic = PrefixAware(trie, balance_margin=4)
    pool = backends()
    prompt = list(range(100, 142))  # 10 full chunks of 4, and 2 ids
    chain = trie.chain_hashes(prompt + [7, 7, 7, 7, 7, 7])  # covers more than the prompt
    first = logic.choose(RouteRequest("m", prompt=prompt, prefix_chain=(4, chain)), pool)
    again = logic.choose(RouteRequest("m", prompt=prompt, prefix_chain=(4, chain)), pool)
    assert again.backend is first.backend and again.reason == "prefix_hit"
    assert logic.supplied_chains.trusted and logic.supplied_chains.used == 2
    other = list(range(500, 542))
    wrong = (4, chain)  # the first prompt's chain, sent with another prompt
    decision = logic.choose(RouteRequest("m", prompt=other, prefix_chain=wrong), pool)
    assert decision.reason == "prefix_miss"  # the computed chain decided: nothing cached
    assert not logic.supplied_chains.trusted
    assert trie.match(trie.chain_hashes(other)).num_chunks == 10  # inserted under its own


def test_pool_candidates_are_the_healthy_backends_serving_the_model():
    pool = BackendPool()
    for url in URLS:
        pool.add(url)
    a, b, c = (pool.get(u) for u in URLS)
    a.healthy = b.healthy = True
    a.model_cards, b.model_cards, c.model_cards = [{"id": "x"}], [{"id": "y"}], [{"id": "x"}]
    assert list(pool.candidates("x")) == [a]  # c serves x but is unhealthy
    assert list(pool.candidates(None)) == [a, b]
    assert pool.serves("x") and not pool.serves("z")
    assert [card["id"] for card in pool.model_cards()] == ["x", "y"]


def test_unknown_routing_logic_is_refused():
    with pytest.raises(ValueError, match="unknown routing logic"):
        make_routing_logic("random")
