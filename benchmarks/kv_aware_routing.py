"""Four CPU engines behind the router: round-robin vs prefix-aware vs kv-aware, at two KV
pressures, on a workload scaled from llm-d's precise-scheduling benchmark.

    python benchmarks/kv_aware_routing.py [--quick]

Workload (chat endpoint, streaming): G groups of users; each group shares a long system prompt;
each user holds a conversation of R rounds (question Q tokens, answer A tokens, ignore_eos),
its history growing every round. Users arrive at a fixed rate; at most C requests are in
flight. KV demand = every group's system prompt + every user's final history, in tokens.
Pressure = demand / the four engines' combined KV pool (each engine's pool set with
--num-gpu-blocks-override): ~75% (everything fits if placed well) and ~140% (blocks get
evicted, so an index of where requests were sent goes stale while the engines' own events
stay exact).

The model is a random Llama (4 layers, hidden 256) with a word-level tokenizer (`w0 w1 ...`,
one token per word) and a chat template, so prompt lengths are exact and an answer re-encodes
to the tokens that were generated. Engines publish KV events in every run (so the engines are
the same for all three logics); the router is `lmserve router` in its own process. Every run
uses fresh prompts (its own seed), so no run finds another's prefixes.

Reports per pressure and logic, as the median of --repeats runs (interleaved: this 2-core
machine runs four engines, the router and the client, and one run varies by 2x): TTFT p50/p90
(first content chunk), output tok/s, the engines' summed prefix-cache hit rate
(lmserve:prefix_cache_hits / queries, before/after), and the router's routing reasons. Then the router's overhead at one request in flight: the same chat
request sent 40 times through the kv-aware router and directly to the engine it picks.
Prints a table; writes benchmarks/results/kv_aware_routing_cpu.json. Never asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import cpu_machine_info  # noqa: E402

from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME, start_server  # noqa: E402
from tests.ports import free_port  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402

RESULT_PATH = os.path.join(os.path.dirname(__file__), "results", "kv_aware_routing_cpu.json")
LOGICS = ("roundrobin", "prefix-aware", "kv-aware")
BLOCK = 16
VOCAB = 2048
MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, vocab_size=VOCAB,
             max_position_embeddings=4096)  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"
    "{% if add_generation_prompt %}w3{% endif %}"
)


# ---- the model -----------------------------------------------------------------------------
def build_model(path: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    make_tiny_model(path, **MODEL)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="w2", chat_template=CHAT_TEMPLATE
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    fast.save_pretrained(path)
    return str(path)


# ---- the workload ----------------------------------------------------------------------------
def workload(quick: bool) -> dict:
    """Groups of users sharing a long system prompt, several turns each (llm-d's shape, scaled
    to four CPU engines); users arrive faster than round-robin's cache hit rate can serve."""
    if quick:
        return dict(groups=8, users=3, rounds=2, system=128, question=16, answer=8,
                    concurrency=12, rate=16.0)  # fmt: skip
    return dict(groups=12, users=8, rounds=3, system=512, question=32, answer=8,
                concurrency=256, rate=24.0)  # fmt: skip


def kv_demand_tokens(w: dict) -> int:
    per_user = w["rounds"] * (w["question"] + w["answer"] + 4)  # + the template's tokens
    return w["groups"] * w["system"] + w["groups"] * w["users"] * per_user


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(8, VOCAB)}" for _ in range(n))


async def run_user(session, url, w, group, system, rng, sem, records, start_at) -> None:
    await asyncio.sleep(start_at)
    messages = [{"role": "system", "content": system}]
    for _ in range(w["rounds"]):
        messages.append({"role": "user", "content": words(rng, w["question"])})
        async with sem:
            record = await stream_chat(session, url, messages, w["answer"])
        record["group"] = group
        records.append(record)
        messages.append({"role": "assistant", "content": record["text"]})


async def stream_chat(session, url, messages, max_tokens) -> dict:
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    ttft, pieces, cached = None, [], None
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:500]!r}")
        backend = resp.headers.get("x-lmserve-backend")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
            choices = chunk["choices"]
            delta = choices[0]["delta"].get("content") if choices else None
            if delta:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                pieces.append(delta)
    return {"ttft": ttft, "e2e": time.perf_counter() - start, "text": "".join(pieces).strip(),
            "output_tokens": max_tokens, "backend": backend, "cached_tokens": cached}  # fmt: skip


async def drive(url: str, w: dict, seed: int) -> tuple[list[dict], float]:
    rng = random.Random(seed)
    systems = [words(rng, w["system"]) for _ in range(w["groups"])]
    users = [
        (g, random.Random(rng.random())) for g in range(w["groups"]) for _ in range(w["users"])
    ]
    rng.shuffle(users)
    sem = asyncio.Semaphore(w["concurrency"])
    records: list[dict] = []
    headers = {"Authorization": f"Bearer {API_KEY}"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(
            run_user(session, url, w, g, systems[g], user_rng, sem, records, i / w["rate"])
            for i, (g, user_rng) in enumerate(users)
        ))  # fmt: skip
        return records, time.perf_counter() - start


# ---- engines and router ----------------------------------------------------------------------
def start_engines(model: str, blocks: int, log_dir: Path) -> list:
    env = {"OMP_NUM_THREADS": "1", "LMSERVE_ENABLE_MULTIPROCESSING": "1"}

    def one(_):
        pub, replay = free_port(), free_port()
        events = {"enable_kv_cache_events": True, "endpoint": f"tcp://*:{pub}",
                  "replay_endpoint": f"tcp://*:{replay}"}  # fmt: skip
        server = start_server(
            model, "--num-gpu-blocks-override", str(blocks), "--max-model-len", str(min(2048, blocks * BLOCK)),
            "--kv-events-config", json.dumps(events), log_dir=log_dir, env=env,
        )  # fmt: skip
        server.events = (pub, replay)
        return server

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(4)))


ROUTER_ARGS: list[str] = []  # --router-args, for the kv-aware router


def start_router(logic: str, engines: list, model: str, log_dir: Path) -> tuple:
    port = free_port()
    args = [sys.executable, "-m", "lmserve.entrypoints.cli", "router", "--host", "127.0.0.1",
            "--port", str(port), "--routing-logic", logic,
            "--backends", ",".join(e.url for e in engines), "--backend-api-key", API_KEY,
            "--health-check-interval", "0.5"]  # fmt: skip
    if logic == "kv-aware":
        args += ["--tokenizer", model,
                 "--kv-events-endpoints", ",".join(f"tcp://*:{e.events[0]}" for e in engines),
                 "--kv-events-replay-endpoints",
                 ",".join(f"tcp://*:{e.events[1]}" for e in engines), *ROUTER_ARGS]  # fmt: skip
    log = open(log_dir / f"router-{logic}-{port}.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            health = json.loads(_get(url + "/health"))
            backends = json.loads(_get(url + "/router/backends"))
            caught_up = all(b.get("kv_events_live", True) for b in backends)  # replayed
            if health.get("healthy_backends") == len(engines) and caught_up:
                return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the {logic} router did not become healthy")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def metric_sum(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def cache_counters(engines) -> tuple[float, float]:
    hits = sum(e.metric("lmserve:prefix_cache_hits_total") for e in engines)
    queries = sum(e.metric("lmserve:prefix_cache_queries_total") for e in engines)
    return hits, queries


def reasons(router_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(_get(router_url + "/metrics")):
        for s in family.samples:
            if s.name == "lmserve_router:routing_decisions_total":
                found[s.labels["reason"]] = s.value
    return found


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def one_run(engines, logic, model, w, seed, log_dir) -> dict:
    proc, url = start_router(logic, engines, model, log_dir)
    try:
        before = cache_counters(engines)
        records, duration = asyncio.run(drive(url, w, seed))
        after = cache_counters(engines)
        why = reasons(url)
        router_metrics = _get(url + "/metrics")
    finally:
        stop(proc)
    ttfts = [r["ttft"] for r in records]
    hits, queries = after[0] - before[0], after[1] - before[1]
    result = {
        "requests": len(records),
        "duration_s": duration,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_p90_ms": 1000 * percentile(ttfts, 90),
        "ttft_mean_ms": 1000 * statistics.mean(ttfts),
        "output_tok_s": sum(r["output_tokens"] for r in records) / duration,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "routing_decisions": why,
        "placement": placement(records),
    }
    if logic == "kv-aware":
        name = "lmserve_router:kv_cached_tokens_prediction_error"
        count = metric_sum(router_metrics, name + "_count")
        exact = metric_sum(
            router_metrics, "lmserve_router:kv_cached_tokens_prediction_error_bucket", le="0.0"
        ) - metric_sum(
            router_metrics, "lmserve_router:kv_cached_tokens_prediction_error_bucket", le="-1.0"
        )
        result["predictions_exact"] = f"{int(exact)}/{int(count)}"
        result["prediction_error_buckets"] = {  # reported - predicted cached tokens, cumulative
            le: metric_sum(router_metrics, name + "_bucket", le=le)
            for le in ("-1024.0", "-256.0", "-64.0", "-16.0", "-1.0", "0.0", "16.0", "64.0",
                       "256.0", "1024.0", "+Inf")
        }  # fmt: skip
        lag = "lmserve_router:kv_event_lag_seconds"
        result["event_lag_buckets"] = {  # cumulative batches applied within each lag
            le: metric_sum(router_metrics, lag + "_bucket", le=le)
            for le in ("0.01", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "+Inf")
        }
    return result


def placement(records: list[dict]) -> dict:
    """Where the requests went: per engine, how many and how many groups; per group, on how
    many engines its requests landed (1 = one copy of its system prompt)."""
    by_engine: dict[str, list[dict]] = {}
    engines_of_group: dict[int, set[str]] = {}
    for r in records:
        by_engine.setdefault(r["backend"], []).append(r)
        engines_of_group.setdefault(r["group"], set()).add(r["backend"])
    spread = [len(e) for e in engines_of_group.values()]
    return {
        "requests_per_engine": sorted(len(v) for v in by_engine.values()),
        "groups_per_engine": sorted(len({r["group"] for r in v}) for v in by_engine.values()),
        "engines_per_group_mean": statistics.mean(spread),
        "cached_tokens_per_engine": sorted(
            sum(r["cached_tokens"] or 0 for r in v) for v in by_engine.values()
        ),
    }


def summarize(trials: list[dict]) -> dict:
    """The median over repeats of each figure (this machine is noisy), and every trial."""
    keys = ("ttft_p50_ms", "ttft_p90_ms", "ttft_mean_ms", "output_tok_s",
            "prefix_cache_hit_rate", "duration_s")  # fmt: skip
    summary = {k: statistics.median(t[k] for t in trials) for k in keys}
    summary["trials"] = trials
    return summary


def router_overhead(engines, model, log_dir, logic: str, n: int = 40) -> dict:
    """One chat request (max_tokens=1) at a time, `n` times, through the router and then
    straight to the engine it picked: the difference of the medians is the router's cost
    (parsing, tokenizing and hashing for kv-aware, routing, the extra HTTP hop). Also the
    router's own added-latency histogram (its time excluding the backend's)."""
    proc, url = start_router(logic, engines, model, log_dir)
    rng = random.Random(7)
    messages = [{"role": "system", "content": words(rng, 768)}, {"role": "user", "content": "w9"}]

    async def timed(base: str) -> tuple[list[float], str | None]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 1, "temperature": 0}
        times, backend = [], None
        async with aiohttp.ClientSession(headers=headers) as session:
            for _ in range(n):
                start = time.perf_counter()
                async with session.post(base + "/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    backend = resp.headers.get("x-lmserve-backend")
                times.append(time.perf_counter() - start)
        return times, backend

    try:
        via_router, backend = asyncio.run(timed(url))
        direct, _ = asyncio.run(timed(backend))
        text = _get(url + "/metrics")
    finally:
        stop(proc)
    name = "lmserve_router:added_latency_seconds"
    count = metric_sum(text, name + "_count")
    within_1ms = metric_sum(text, name + "_bucket", le="0.001")
    # the first request of each side warms the engine's prefix cache: left out
    return {
        "requests": n,
        "prompt_tokens": 768 + 8,
        "median_via_router_ms": 1000 * statistics.median(via_router[1:]),
        "median_direct_ms": 1000 * statistics.median(direct[1:]),
        "end_to_end_overhead_p50_ms": 1000
        * (statistics.median(via_router[1:]) - statistics.median(direct[1:])),
        "added_latency_mean_ms": 1000 * metric_sum(text, name + "_sum") / count,
        "added_latency_within_1ms": within_1ms / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller workload")
    parser.add_argument("--repeats", type=int, default=3, help="runs per logic and pressure")
    parser.add_argument("--out", default=RESULT_PATH)
    parser.add_argument("--logics", default=",".join(LOGICS), help="comma-separated")
    parser.add_argument("--pressures", default="0.75,1.4", help="comma-separated")
    parser.add_argument("--log-dir", default=None, help="keep engine and router logs here")
    parser.add_argument("--set", nargs="*", default=[], help="workload overrides, KEY=VALUE")
    parser.add_argument("--router-args", default="", help="extra flags for the kv-aware router")
    parser.add_argument(
        "--overhead-only", action="store_true", help="only the router's overhead (no pressures)"
    )
    args = parser.parse_args()
    logics = args.logics.split(",")
    ROUTER_ARGS.extend(args.router_args.split())
    pressures = [float(p) for p in args.pressures.split(",")]
    w = workload(args.quick)
    for item in args.set:
        key, value = item.split("=")
        w[key] = type(w[key])(value)
    demand = kv_demand_tokens(w)
    results = {"workload": w, "kv_demand_tokens": demand, "pressures": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.log_dir or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        model = build_model(tmp / "model")
        seed = 100
        for pressure in pressures:
            name = f"~{pressure:.0%}"
            blocks = int(demand / pressure / 4 / BLOCK)
            engines = start_engines(model, blocks, tmp)
            try:
                runs = {"blocks_per_engine": blocks,
                        "pressure": demand / (4 * blocks * BLOCK)}  # fmt: skip
                trials: dict[str, list[dict]] = {logic: [] for logic in logics}
                for _ in range(0 if args.overhead_only else args.repeats):  # interleaved
                    for logic in logics:
                        seed += 1
                        trials[logic].append(one_run(engines, logic, model, w, seed, tmp))
                        print(name, logic, json.dumps(trials[logic][-1]), flush=True)
                for logic in logics:
                    if trials[logic]:
                        runs[logic] = summarize(trials[logic])
                if pressure == pressures[0] and "kv-aware" in logics:
                    results["router_overhead"] = {
                        logic: router_overhead(engines, model, tmp, logic)
                        for logic in ("roundrobin", "kv-aware")
                    }
                    print("overhead", json.dumps(results["router_overhead"]), flush=True)
            finally:
                for engine in engines:
                    engine.stop()
            results["pressures"][name] = runs
            if args.overhead_only:
                break
    print_table(results, logics)
    out = {
        "benchmark": "kv_aware_routing",
        "machine": cpu_machine_info(
            "cpu",
            engines="4 x lmserve serve (random Llama 4x256, float32, 1 thread each) + "
            "lmserve router, all on this machine",
        ),
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"written {args.out}")


def print_table(results: dict, logics: list[str]) -> None:
    print(f"\n{'pressure':<9} {'logic':<13} {'TTFT p50 ms':>11} {'TTFT p90 ms':>11} "
          f"{'out tok/s':>9} {'hit rate':>8}")  # fmt: skip
    for name, runs in results["pressures"].items():
        for logic in [logic for logic in logics if logic in runs]:
            r = runs[logic]
            print(f"{name:<9} {logic:<13} {r['ttft_p50_ms']:>11.0f} {r['ttft_p90_ms']:>11.0f} "
                  f"{r['output_tok_s']:>9.1f} {r['prefix_cache_hit_rate']:>8.3f}")  # fmt: skip
    for logic, o in results.get("router_overhead", {}).items():
        print(f"router overhead, one request in flight, {logic}: "
              f"{o['end_to_end_overhead_p50_ms']:.2f} ms p50 end to end, router's own time "
              f"{o['added_latency_mean_ms']:.2f} ms mean ({100 * o['added_latency_within_1ms']:.0f}% "
              "within 1 ms)")  # fmt: skip


if __name__ == "__main__":
    main()
