"""Three real `lmserve serve` engines (tiny random Llama, CPU) behind the router, driven through
the official openai client. One module-scoped cluster is shared; the failover test, which kills
and restarts an engine, runs last and leaves the cluster as it found it."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from lmserve.bench.cli import main as bench_main
from lmserve.router.proxy import BACKEND_HEADER
from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME, RemoteServer, start_server
from tests.router.conftest import metric, running_router, wait_until

pytestmark = pytest.mark.slow
LONG = {"ignore_eos": True}  # every answer takes its full max_tokens
SYSTEM = "You are a careful assistant. Answer every question about the valley in one line. " * 3


@pytest.fixture(scope="module")
def engines(tiny_model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("cluster")
    model = tiny_model_dir("llama")
    with ThreadPoolExecutor(3) as pool:  # start-up is mostly waiting: overlap the three
        servers = list(pool.map(lambda _: start_server(model, log_dir=log_dir), range(3)))
    yield servers
    for server in servers:
        server.stop()


def urls(engines: list[RemoteServer]) -> list[str]:
    return [e.url for e in engines]


def ask(client: openai.OpenAI, messages: list[dict], **kwargs) -> tuple[str, str]:
    """(answer, URL of the engine that served it)."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=messages, max_tokens=4, temperature=0, **kwargs
    )
    return raw.parse().choices[0].message.content, raw.headers[BACKEND_HEADER]


def openai_client(router, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=60, **kwargs
    )


def test_roundrobin_spreads_requests_evenly(engines):
    with running_router(urls(engines), backend_api_key=API_KEY) as router:
        client = openai_client(router)
        served = Counter(
            ask(client, [{"role": "user", "content": f"hi {i}"}])[1] for i in range(12)
        )
        assert served == {url: 4 for url in urls(engines)}
        streamed = client.completions.create(
            model=MODEL_NAME, prompt="The farmer", max_tokens=5, stream=True
        )
        assert sum(1 for chunk in streamed if chunk.choices and chunk.choices[0].text) >= 1


def conversation_round(user: int, rounds: list[tuple[str, str]], question: str) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in rounds:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": question}]


def test_prefix_aware_keeps_each_user_of_a_conversation_on_one_engine(engines):
    with running_router(
        urls(engines), routing_logic="prefix-aware", backend_api_key=API_KEY
    ) as router:
        client = openai_client(router)
        homes: dict[int, set[str]] = {u: set() for u in range(6)}
        history: dict[int, list[tuple[str, str]]] = {u: [] for u in range(6)}
        for r in range(3):
            for user in range(6):
                question = f"user {user} round {r}: how far is the city from the river? " * 2
                answer, url = ask(client, conversation_round(user, history[user], question))
                history[user].append((question, answer))
                homes[user].add(url)
        # One request at a time, so no engine is ever busier than another: the shared system
        # prompt may well send every user to the same engine. Spreading under load is tested
        # by test_shared_system_prompt_does_not_send_every_user_to_one_engine.
        assert all(len(h) == 1 for h in homes.values()), homes


def test_shared_system_prompt_does_not_send_every_user_to_one_engine(engines):
    async def run(router) -> Counter:
        client = openai.AsyncOpenAI(
            base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=120
        )

        async def one(user: int) -> str:
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"I am user {user}. What is the weather?"}]  # fmt: skip
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0
            )
            return raw.headers[BACKEND_HEADER]

        return Counter(await asyncio.gather(*(one(u) for u in range(30))))

    with running_router(
        urls(engines), routing_logic="prefix-aware", backend_api_key=API_KEY
    ) as router:
        served = asyncio.run(run(router))
    assert len(served) == 3 and max(served.values()) <= 18, served  # not 30 on one engine


def prefix_hit_rate(engines: list[RemoteServer], before: tuple[float, float] | None = None):
    """(hits, queries) summed over the engines, or the rate since `before`."""
    hits = sum(e.metric("lmserve:prefix_cache_hits_total") for e in engines)
    queries = sum(e.metric("lmserve:prefix_cache_queries_total") for e in engines)
    if before is None:
        return hits, queries
    return (hits - before[0]) / (queries - before[1])


def run_multi_round_qa(router_url: str, seed: int) -> None:
    """24 users arriving at random (4/s), two rounds of long questions and answers, no system
    prompt: the workload where prefix-aware routing's edge is clearest. Every engine hits the
    shared first block (the chat template's 16 tokens) alike; round-robin's hit rate also grows
    with the rounds (round r finds some earlier round of its user on its engine with
    probability 1 - (2/3)^r) and with a shared system prompt, so over many rounds or behind a
    long system prompt no router doubles it: benchmarks/router_prefix_hit.py reports those too.
    Expected here: prefix-aware ~0.35, round-robin ~0.16 (its second round lands on the first's
    engine one time in three)."""
    rc = bench_main(["serve", "--base-url", router_url, "--endpoint", "/v1/chat/completions",
                     "--dataset-name", "multi-round-qa", "--num-users", "24", "--num-rounds", "2",
                     "--request-rate", "4",
                     "--system-prompt-len", "0", "--question-len", "160", "--answer-len", "8",
                     "--ignore-eos", "--seed", str(seed), "--disable-tqdm"])  # fmt: skip
    assert rc == 0


def test_prefix_aware_at_least_doubles_the_engines_prefix_cache_hit_rate(engines, capsys):
    rates = {}
    for seed, logic in enumerate(("roundrobin", "prefix-aware")):
        with running_router(urls(engines), routing_logic=logic, backend_api_key=API_KEY) as router:
            before = prefix_hit_rate(engines)
            run_multi_round_qa(router.url, seed + 100)
            rates[logic] = prefix_hit_rate(engines, before)
    with capsys.disabled():
        print(f"\nmulti-round-qa prefix-cache hit rate: {rates}")
    assert rates["prefix-aware"] >= 2 * rates["roundrobin"], rates


def session_homes(client: openai.OpenAI, sessions: range) -> dict[int, str]:
    homes = {}
    for s in sessions:
        served = {
            ask(client, [{"role": "user", "content": f"s{s}"}], user=f"session-{s}")[1]
            for _ in range(2)
        }
        assert len(served) == 1, f"session {s} split over {served}"
        homes[s] = served.pop()
    return homes


def test_killing_an_engine_moves_only_its_sessions_loses_no_unstarted_request_and_it_rejoins(
    engines, tmp_path, tiny_model_dir
):
    victim = engines[2]
    with (
        running_router(
            urls(engines), routing_logic="session", backend_api_key=API_KEY
        ) as sessions_router,
        running_router(
            urls(engines), routing_logic="roundrobin", backend_api_key=API_KEY
        ) as rr_router,
    ):
        session_client = openai_client(sessions_router)
        before = session_homes(session_client, range(24))
        assert victim.url in before.values()

        results = asyncio.run(_requests_while_killing(rr_router, victim))
        whole, streams = results
        assert all(isinstance(r, str) for r in whole), whole  # every non-streamed request succeeded
        assert metric(rr_router, "lmserve_router:retries_total") >= 1  # some were on the victim
        # A stream that had started on the victim ends with a clean error; none hangs.
        assert all(isinstance(r, str) or isinstance(r, openai.APIError) for r in streams), streams

        wait_until(
            lambda: not sessions_router.state.pool.get(victim.url).healthy,
            what="victim marked dead",
        )
        after = session_homes(session_client, range(24))
        moved = {s for s in before if before[s] != after[s]}
        assert moved == {s for s in before if before[s] == victim.url}

        engines[2] = start_server(
            tiny_model_dir("llama"), log_dir=tmp_path, port=int(victim.url.rsplit(":", 1)[1])
        )
        rejoin_s = wait_until(
            lambda: rr_router.state.pool.get(victim.url).healthy, timeout=10, what="rejoin"
        )
        assert rejoin_s < 5
        served = Counter(
            ask(openai_client(rr_router), [{"role": "user", "content": "again"}])[1]
            for _ in range(6)
        )
        assert served[victim.url] == 2
        wait_until(lambda: sessions_router.state.pool.get(victim.url).healthy, what="rejoin")
        assert session_homes(session_client, range(24)) == before  # its sessions come back


async def _requests_while_killing(router, victim: RemoteServer) -> tuple[list, list]:
    """30 non-streamed and 9 streamed requests in flight over the three engines; the victim is
    killed (SIGKILL) while they run. Returns each one's text or exception."""
    client = openai.AsyncOpenAI(
        base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=120
    )

    async def whole(i: int):
        try:
            reply = await client.completions.create(
                model=MODEL_NAME, prompt=f"The bell {i}", max_tokens=24
            )
            return reply.choices[0].text
        except Exception as e:
            return e

    async def streamed(i: int):
        try:
            stream = await client.completions.create(
                model=MODEL_NAME,
                prompt=f"The river {i}",
                max_tokens=64,
                stream=True,
                extra_body=LONG,
            )
            return "".join([c.choices[0].text async for c in stream if c.choices])
        except openai.APIError as e:
            return e

    tasks = [asyncio.create_task(whole(i)) for i in range(30)]
    tasks += [asyncio.create_task(streamed(i)) for i in range(9)]
    backend = router.state.pool.get(victim.url)
    while backend.in_flight < 5:  # kill it while it holds requests, some of them streams
        await asyncio.sleep(0.01)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)  # no request hangs
    return results[:30], results[30:]
