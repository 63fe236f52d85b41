"""kv-aware routing without engines: the index built from event payloads, the router's prompt
ids against the engine front-end's, and the scoring rules."""

from __future__ import annotations

import msgspec
import pytest

from lmserve.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from lmserve.prefix_hash import block_hashes
from lmserve.router.backends import Backend
from lmserve.router.kv_aware import KvAware, PendingBlocks
from lmserve.router.kv_index import KVIndex
from lmserve.router.prefix_trie import PrefixTrie
from lmserve.router.routing import PrefixAware, RouteRequest

BS = 4


def payload(*events) -> bytes:
    return msgspec.msgpack.encode(KVEventBatch(ts=1.0, events=list(events)))


def stored(tokens: list[int], algo: str = "sha256", start: int = 0) -> BlockStored:
    """The engine's BlockStored for blocks [start, ...) of a prompt `tokens`."""
    hashes = block_hashes(tokens, BS, algo)
    parent = hashes[start - 1] if start else None
    return BlockStored(hashes[start:], parent, tokens[start * BS : len(hashes) * BS], BS)


PROMPT = list(range(100, 117))  # 4 full blocks + 1 token


# ---- the index ---------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["sha256", "xxhash"])
def test_index_learns_each_engines_block_size_and_hash_algorithm_from_its_events(algo):
    index = KVIndex()
    index.apply("http://a", payload(stored(PROMPT[:8], algo), stored(PROMPT, algo, start=2)))
    layout = index.layouts["http://a"]
    assert (layout.block_size, layout.hash_algo) == (BS, algo)
    assert index.match({"http://a": block_hashes(PROMPT, BS, algo)}) == {"http://a": 4}


def test_index_match_stops_at_the_first_block_an_engine_lacks():
    index = KVIndex()
    hashes = block_hashes(PROMPT, BS)
    index.apply("http://a", payload(stored(PROMPT)))
    index.apply("http://b", payload(stored(PROMPT[:8])))
    index.apply("http://a", payload(BlockRemoved([hashes[1]])))
    assert index.match({"http://a": hashes, "http://b": hashes}) == {"http://a": 1, "http://b": 2}


def test_all_blocks_cleared_and_clear_forget_only_that_engine():
    index = KVIndex()
    hashes = block_hashes(PROMPT, BS)
    index.apply("http://a", payload(stored(PROMPT)))
    index.apply("http://b", payload(stored(PROMPT)))
    index.apply("http://a", payload(AllBlocksCleared()))
    assert index.match({"http://a": hashes, "http://b": hashes}) == {"http://a": 0, "http://b": 4}
    index.clear("http://b")
    assert len(index) == 0 and index.engines == 0


def test_a_block_held_in_two_media_stays_until_both_remove_it():
    index = KVIndex()
    hashes = block_hashes(PROMPT[:4], BS)
    index.apply("http://a", payload(stored(PROMPT[:4])))
    cpu = BlockStored(hashes, None, PROMPT[:4], BS, None, "CPU")
    index.apply("http://a", payload(cpu))
    assert index.media("http://a", hashes[0]) == {"GPU", "CPU"}
    index.apply("http://a", payload(BlockRemoved(hashes, "DISK")))  # a tier it is not in
    assert index.media("http://a", hashes[0]) == {"GPU", "CPU"}
    index.apply("http://a", payload(BlockRemoved(hashes)))  # GPU copy evicted
    assert index.media("http://a", hashes[0]) == {"CPU"}
    assert index.match({"http://a": hashes}) == {"http://a": 1}
    index.apply("http://a", payload(BlockRemoved(hashes, "CPU")))
    assert len(index) == 0


def test_a_payload_that_is_not_an_event_batch_is_an_error():
    with pytest.raises(ValueError, match="not a KV event batch"):
        KVIndex().apply("http://a", b"\x01")


def vllm_026_stored(tokens: list[int]) -> dict:
    """A BlockStored as vLLM 0.26 publishes it: a map tagged by "type", with its newer fields."""
    hashes = block_hashes(tokens, BS)
    return {
        "type": "BlockStored", "block_hashes": hashes, "parent_block_hash": None,
        "token_ids": tokens[: len(hashes) * BS], "block_size": BS, "lora_id": None,
        "medium": "GPU", "lora_name": None, "extra_keys": None,
    }  # fmt: skip


def test_vllm_026_map_events_index_like_the_tagged_arrays_lmserve_publishes():
    hashes = block_hashes(PROMPT, BS)
    maps, arrays = KVIndex(), KVIndex()
    removed = {"type": "BlockRemoved", "block_hashes": [hashes[2]], "medium": None,
               "group_idx": 0, "locality": "LOCAL"}  # fmt: skip
    maps.apply("http://a", msgspec.msgpack.encode([2.0, [vllm_026_stored(PROMPT), removed], None]))
    arrays.apply("http://a", payload(stored(PROMPT), BlockRemoved([hashes[2]])))
    assert maps.blocks == arrays.blocks and maps.held == arrays.held
    layout = maps.layouts["http://a"]
    assert (layout.block_size, layout.hash_algo) == (BS, "sha256")  # learned from the map
    assert maps.match({"http://a": hashes}) == {"http://a": 2}
    cleared = msgspec.msgpack.encode([3.0, [{"type": "AllBlocksCleared"}]])
    assert maps.apply("http://a", cleared).cleared and len(maps) == 0


def test_a_vllm_026_batch_with_uint64_block_hashes_is_indexed():
    """vLLM's default block hashes reach the wire as unsigned 64-bit ints, with fields newer
    than the ones the index reads (group_idx, kv_cache_spec_kind)."""
    event = {"type": "BlockStored", "block_hashes": [15760518052499183552, 7], "parent_block_hash":
             None, "token_ids": [151644] * 32, "block_size": 16, "lora_id": None, "medium": "GPU",
             "lora_name": None, "extra_keys": [None, None], "group_idx": 0,
             "kv_cache_spec_kind": "full_attention"}  # fmt: skip
    index = KVIndex()
    stats = index.apply("http://v", msgspec.msgpack.encode([1789095808.8, [event], 0]))
    assert stats.stored == 2 and stats.timestamp == 1789095808.8
    assert index.holds("http://v", 15760518052499183552) and index.holds("http://v", 7)


def test_unknown_event_kinds_and_extra_fields_are_skipped_and_the_rest_applied():
    hashes = block_hashes(PROMPT, BS)
    event = ["BlockStored", hashes, None, PROMPT[:16], BS, None, "GPU", "lora", [None] * 4]
    mixed = [event, ["KVCacheResized", 4096], {"type": "BlockRemoved", "block_hashes": hashes[3:]}]
    index = KVIndex()
    stats = index.apply("http://a", msgspec.msgpack.encode([1.0, mixed, 0]))
    assert (stats.stored, stats.removed) == (4, 1)
    assert index.match({"http://a": hashes}) == {"http://a": 3}


def test_a_known_event_with_fields_of_the_wrong_type_is_an_error():
    bad = msgspec.msgpack.encode([1.0, [["BlockStored", "not a list", None, [], "16"], ["?"]]])
    with pytest.raises(ValueError, match="malformed BlockStored"):
        KVIndex().apply("http://a", bad)
    unhashable = msgspec.msgpack.encode([1.0, [["BlockRemoved", [[1, 2]]]]])
    with pytest.raises(ValueError, match="BlockRemoved"):
        KVIndex().apply("http://a", unhashable)
    tier = msgspec.msgpack.encode(
        [1.0, [{"type": "BlockRemoved", "block_hashes": [], "medium": [1]}]]
    )
    with pytest.raises(ValueError, match="BlockRemoved"):
        KVIndex().apply("http://a", tier)


def test_token_ids_that_are_not_ids_leave_the_layout_unknown_without_an_error():
    hashes = block_hashes(PROMPT, BS)
    odd = ["BlockStored", hashes, None, ["a"] * 16, BS]
    index = KVIndex()
    index.apply("http://a", msgspec.msgpack.encode([1.0, [odd]]))
    assert index.layouts["http://a"].hash_algo is None
    assert index.holds("http://a", hashes[0])  # the blocks are indexed all the same


# ---- scoring -----------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_logic(index: KVIndex, live=lambda url: True, **kwargs) -> KvAware:
    fallback = PrefixAware(PrefixTrie(chunk_size=4, max_bytes=1 << 20), balance_margin=4)
    return KvAware(index, live, fallback, **{"request_cost": 64.0, "slack": 64.0, **kwargs})


def engines(*names: str) -> list[Backend]:
    return [Backend(f"http://{n}", healthy=True) for n in names]


def warm_index(prompt: list[int], holders: dict[str, int]) -> KVIndex:
    """Each named engine holds the first n blocks of `prompt`; the others hold one unrelated
    block (so every engine's layout is known)."""
    index = KVIndex()
    for name in "abc":
        n = holders.get(name, 0)
        if n:
            index.apply(f"http://{name}", payload(stored(prompt[: n * BS + 1])))
        else:
            index.apply(f"http://{name}", payload(stored([7, 7, 7, 7, 7])))
    return index


def test_the_engine_holding_the_longest_prefix_wins_and_the_prediction_is_its_cached_tokens():
    prompt = list(range(200, 241))  # 41 tokens: 10 blocks usable
    logic = make_logic(warm_index(prompt, {"a": 3, "b": 7}))
    decision = logic.choose(RouteRequest(None, token_ids=prompt), engines("a", "b", "c"))
    assert decision.backend.url == "http://b" and decision.reason == "kv_hit"
    assert decision.predicted_cached == 7 * BS and decision.prefill_tokens == 41 - 28


def test_a_full_hit_stops_short_of_the_last_token_as_the_engine_does():
    prompt = list(range(300, 316))  # exactly 4 blocks: the engine reuses 3
    index = KVIndex()
    index.apply("http://a", payload(stored(prompt + [1])))
    decision = make_logic(index).choose(RouteRequest(None, token_ids=prompt), engines("a"))
    assert decision.predicted_cached == 12


def test_the_cached_engine_is_skipped_when_its_queue_outweighs_the_prefill_it_saves():
    prompt = list(range(200, 241))
    logic = make_logic(warm_index(prompt, {"a": 10}))
    a, b, c = engines("a", "b", "c")
    # a's cost: queue + 1 token to compute; b's and c's: 41. a keeps the request while its
    # queue is at most the 40 tokens it saves plus the 64-token slack.
    a.pending_prefill_tokens = 40 + 64
    assert logic.choose(RouteRequest(None, token_ids=prompt), [a, b, c]).backend is a
    a.pending_prefill_tokens = 40 + 64 + 1
    decision = logic.choose(RouteRequest(None, token_ids=prompt), [a, b, c])
    assert decision.backend is not a and decision.reason == "kv_overloaded"
    assert decision.predicted_cached == 0


def test_cold_prompts_spread_by_their_start_and_alike_ones_land_together():
    logic = make_logic(warm_index([1] * 9, {}), pending_ttl_s=0.0)
    cands = engines("a", "b", "c")
    picks = [
        logic.choose(RouteRequest(None, token_ids=[i] * 20), cands).backend.url for i in range(30)
    ]
    assert set(picks) == {b.url for b in cands}  # unrelated prompts: every engine gets some
    shared = list(range(500, 520))
    homes = {
        logic.choose(RouteRequest(None, token_ids=shared + [i] * 9), cands).backend.url
        for i in range(5)
    }
    assert len(homes) == 1  # same start, nothing cached: deterministic, together
    decision = logic.choose(RouteRequest(None, token_ids=shared), cands)
    assert decision.reason == "kv_miss"


def test_a_cold_prompt_avoids_an_engine_busier_than_the_slack():
    logic = make_logic(warm_index([1] * 9, {}), pending_ttl_s=0.0)
    cands = engines("a", "b", "c")
    prompt = list(range(600, 620))
    home = logic.choose(RouteRequest(None, token_ids=prompt), cands).backend
    home.in_flight = 2  # two requests more than the others: beyond one request's slack
    assert logic.choose(RouteRequest(None, token_ids=prompt), cands).backend is not home


def test_blocks_just_sent_count_as_held_there_until_their_ttl_passes():
    clock = Clock()
    logic = make_logic(warm_index([1] * 9, {}), pending_ttl_s=5.0, clock=clock)
    cands = engines("a", "b", "c")
    shared = list(range(400, 433))
    first = logic.choose(RouteRequest(None, token_ids=shared), cands)
    second = logic.choose(RouteRequest(None, token_ids=shared + [9, 9]), cands)
    assert second.backend is first.backend and second.reason == "kv_hit"
    clock.now = 6.0
    third = logic.choose(RouteRequest(None, token_ids=shared + [8]), cands)
    assert third.reason == "kv_miss"


def test_the_held_prefix_runs_through_pending_blocks_and_stops_at_the_first_block_neither_has():
    index = KVIndex()
    logic = make_logic(index, pending_ttl_s=5.0, clock=Clock())
    prompt = list(range(400, 433))  # 8 blocks
    hashes = block_hashes(prompt, BS, "sha256")
    index.apply("http://a", payload(stored(prompt)))
    index.apply("http://a", payload(BlockRemoved([hashes[3], hashes[6]], None)))
    assert logic._held_blocks("http://a", hashes, 0.0) == 3
    logic.pending.add("http://a", [hashes[3]], 0.0)  # sent there since, not confirmed yet
    assert logic._held_blocks("http://a", hashes, 0.0) == 6
    logic.pending.add("http://a", [hashes[6]], 0.0)
    assert logic._held_blocks("http://a", hashes, 0.0) == 8
    assert logic._held_blocks("http://a", hashes, 6.0) == 3  # past the TTL: events alone
    assert logic._held_blocks("http://z", hashes, 0.0) == 0  # an engine it never heard of


def test_a_sent_block_the_engine_stored_and_then_evicted_counts_as_gone_before_its_ttl():
    clock = Clock()
    index = warm_index([1] * 9, {})
    logic = make_logic(index, pending_ttl_s=5.0, clock=clock)
    cands = engines("a", "b", "c")
    prompt = list(range(400, 433))  # 8 usable blocks
    first = logic.choose(RouteRequest(None, token_ids=prompt), cands)
    url = first.backend.url
    index.apply(url, payload(stored(prompt)))  # the engine computed them: confirmed
    hashes = block_hashes(prompt, BS, "sha256")
    index.apply(url, payload(BlockRemoved(hashes[2:], None)))  # then evicted all but two
    clock.now = 1.0  # well inside the pending TTL
    again = logic.choose(RouteRequest(None, token_ids=prompt + [5]), [first.backend])
    assert again.predicted_cached == 2 * BS


def test_an_engine_without_events_sends_the_decision_to_prefix_aware():
    logic = make_logic(warm_index([1] * 9, {"a": 1}), live=lambda url: url != "http://c")
    decision = logic.choose(
        RouteRequest(None, prompt="hello", token_ids=[1] * 9), engines("a", "c")
    )
    assert decision.reason.startswith("kv_fallback_prefix")
    assert decision.predicted_cached is None


def test_the_prompt_for_the_fallback_is_computed_only_when_the_fallback_decides():
    computed = []

    def lazy_prompt():
        computed.append(1)
        return "hello"

    request = RouteRequest(None, token_ids=[1] * 9, lazy_prompt=lazy_prompt)
    make_logic(warm_index([1] * 9, {"a": 1})).choose(request, engines("a", "c"))
    assert computed == []  # every engine publishes events: no prompt text needed
    live = lambda url: url != "http://c"  # noqa: E731
    decision = make_logic(warm_index([1] * 9, {"a": 1}), live=live).choose(
        request, engines("a", "c")
    )
    assert decision.reason.startswith("kv_fallback_prefix") and computed == [1]


# ---- the router's prompt ids are the engine's ------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "hello there"}],
    [
        {"role": "system", "content": "You are brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "two"}, {"type": "text", "text": "parts"}],
        },
        {"role": "assistant", "content": "ok", "name": None},
        {"role": "user", "content": "and again"},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_router_chat_ids_equal_the_engine_front_ends(
    tiny_model_dir, conversation, add_generation_prompt
):
    from transformers import AutoTokenizer

    from lmserve.engine.chat import apply_chat_template, validate_conversation
    from lmserve.router.prompt_tokens import PromptTokenizer

    path = tiny_model_dir("llama")
    engine_side = apply_chat_template(
        AutoTokenizer.from_pretrained(path),
        validate_conversation(conversation),
        add_generation_prompt=add_generation_prompt,
    )
    router_side = PromptTokenizer.load(path).for_body(
        {"messages": conversation, "add_generation_prompt": add_generation_prompt}
    )
    assert router_side == engine_side


def test_router_completion_ids_equal_the_engine_front_ends(tiny_model_dir):
    from transformers import AutoTokenizer

    from lmserve.router.prompt_tokens import PromptTokenizer

    path = tiny_model_dir("llama")
    tokens = PromptTokenizer.load(path)
    text = "The quick brown fox, again and again."
    assert tokens.for_body({"prompt": text}) == AutoTokenizer.from_pretrained(path).encode(text)
    assert tokens.for_body({"prompt": [[5, 6, 7]]}) == [5, 6, 7]
    assert tokens.for_body({"prompt": ["a", "b"]}) is None  # a batch: no single prompt
    assert tokens.for_body({"messages": "not a list"}) is None  # the engine answers 400


def test_a_chat_with_an_image_has_no_router_ids_so_kv_aware_falls_back(tiny_model_dir):
    """The engine's block hashes of an image's placeholders include the image's content hash,
    which the router cannot compute: it gives such a chat no ids (kv-aware then routes it by
    prefix-aware's rule), never ids that would predict a hit on another image's blocks."""
    from lmserve.router.prompt_tokens import PromptTokenizer

    tokens = PromptTokenizer.load(tiny_model_dir("llama"))
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    text = {"type": "text", "text": "What is in this picture?"}
    assert tokens.for_body({"messages": [{"role": "user", "content": [text]}]})
    assert tokens.for_body({"messages": [{"role": "user", "content": [text, image]}]}) is None
    logic = make_logic(warm_index([1] * 9, {"a": 1}))
    decision = logic.choose(RouteRequest(None, prompt="hi", token_ids=None), engines("a", "c"))
    assert decision.reason.startswith("kv_fallback_prefix")
    assert decision.predicted_cached is None


def test_a_chat_template_flag_overrides_the_tokenizers(tiny_model_dir, tmp_path):
    from lmserve.router.prompt_tokens import PromptTokenizer

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    tokens = PromptTokenizer.load(tiny_model_dir("llama"), str(template))
    ids = tokens.for_body({"messages": [{"role": "user", "content": "hi"}]})
    assert tokens.tokenizer.decode(ids) == "[hi]"


def test_pending_blocks_expire_confirm_and_prune_per_engine():
    pending = PendingBlocks(ttl_s=5.0)
    pending.add("a", [b"h1", b"h2"], now=0.0)
    pending.add("b", [b"h1"], now=3.0)
    assert pending.holds("a", b"h1", 4.0) and pending.holds("b", b"h1", 4.0)
    assert not pending.holds("b", b"h2", 4.0)  # never sent there
    pending.confirm("a", [b"h1"])  # a's events report h1: the dispatch no longer counts
    assert not pending.holds("a", b"h1", 4.0) and pending.holds("b", b"h1", 4.0)
    assert not pending.holds("a", b"h2", 5.5)  # expired, and forgotten on the way
    assert b"h2" not in pending.entries
    pending.prune(now=9.0)  # b's h1 expired at 8.0
    assert pending.entries == {}


def test_a_conversation_cached_nowhere_returns_to_the_engine_it_was_sent_to():
    """Under KV pressure a conversation's blocks are evicted everywhere between its turns. Its
    next turn goes back where the earlier ones went (they are recomputed there and shared
    again), not wherever a fresh pick among equally cheap engines would land."""
    logic = make_logic(warm_index([1] * 9, {}), pending_ttl_s=0.0)
    a, b, c = cands = engines("a", "b", "c")
    a.in_flight = b.in_flight = 5  # beyond the slack: every first turn goes to c
    firsts = [list(range(1000 * i, 1000 * i + 40)) for i in range(1, 9)]
    assert {logic.choose(RouteRequest(None, token_ids=p), cands).backend.url for p in firsts} == {
        c.url
    }
    a.in_flight = b.in_flight = 0
    for prompt in firsts:  # nothing cached anywhere (pending blocks expire at once here)
        decision = logic.choose(RouteRequest(None, token_ids=prompt + [7] * 30), cands)
        assert (decision.backend.url, decision.reason) == (c.url, "kv_miss")
    # ... unless home is busier than the slack: then the cheapest engine takes it (and is home)
    c.in_flight = 5
    moved = logic.choose(RouteRequest(None, token_ids=firsts[0] + [7] * 60), cands).backend
    assert moved is not c
    c.in_flight = 0
    again = logic.choose(RouteRequest(None, token_ids=firsts[0] + [7] * 90), cands).backend
    assert again is moved


# ---- the same answers, computed faster ---------------------------------------------------------
def test_known_block_hashes_stand_in_for_computing_them_and_a_wrong_one_is_caught():
    prompt = PROMPT * 3
    hashes = block_hashes(prompt, BS)
    index = warm_index(prompt, {"a": 2})
    logic = make_logic(index)
    computed = logic._hash_chains(prompt, logic._states.get(engines("a", "b", "c")))
    known = (BS, "sha256", hashes)
    cands = engines("a", "b", "c")
    decision = logic.choose(RouteRequest(None, token_ids=prompt, block_hashes=known), cands)
    assert decision.backend.url == "http://a" and logic.known_hashes.trusted
    assert computed == {(BS, "sha256"): hashes[: (len(prompt) - 1) // BS]}
    wrong = (BS, "sha256", [b"x" * 32] * len(hashes))
    decision = logic.choose(RouteRequest(None, token_ids=prompt, block_hashes=wrong), cands)
    assert decision.backend.url == "http://a" and not logic.known_hashes.trusted


def test_a_batch_is_indexed_as_its_events_one_by_one():
    """KVIndex.apply takes runs of same-kind events at once: the index (and the pending
    blocks it confirms) end up as applying each event in its own batch leaves them."""
    hashes = block_hashes(PROMPT, BS)
    events = [stored(PROMPT[:8]), stored(PROMPT, start=2), BlockRemoved([hashes[1]]),
              BlockRemoved([hashes[3]]), BlockStored([hashes[3]], hashes[2], PROMPT[12:16], BS),
              BlockStored([hashes[0]], None, PROMPT[:4], BS, None, "CPU"),
              BlockRemoved([hashes[0]]), AllBlocksCleared(), stored(PROMPT[:8]),
              BlockRemoved([hashes[0]], "CPU")]  # fmt: skip
    together, apart = KVIndex(), KVIndex()
    confirmed: list = []
    together.on_stored.append(lambda url, hs: confirmed.extend(hs))
    together.apply("http://a", payload(*events))
    for event in events:
        apart.apply("http://a", payload(event))
    assert together.blocks == apart.blocks and together.held == apart.held
    assert confirmed == [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]


def test_one_walk_over_the_chain_finds_each_engines_held_run_as_a_walk_per_engine_would():
    """_event_runs walks the prompt's blocks once for all engines holding its first block; each
    engine's run must equal the plain per-engine count, gaps and single survivors included."""
    import random

    rng = random.Random(7)
    prompt = list(range(500, 561))  # 15 full blocks
    hashes = block_hashes(prompt, BS, "sha256")
    for _ in range(50):
        index = KVIndex()
        logic = make_logic(index, clock=Clock())
        urls = [f"http://e{i}" for i in range(rng.randint(1, 6))]
        for url in urls:
            index.apply(url, payload(stored(prompt[: rng.randint(1, len(hashes)) * BS + 1])))
            gaps = rng.sample(hashes, rng.randint(0, 3))
            if gaps:
                index.apply(url, payload(BlockRemoved(gaps, None)))
        holders = [u for u in urls if index.holds(u, hashes[0])]
        runs = logic._event_runs(holders, hashes)
        assert runs == index.match({u: hashes for u in holders})
