"""`lmserve bench serve`: an online benchmark of any OpenAI-compatible server.

    lmserve bench serve --base-url http://127.0.0.1:8000 --endpoint /v1/completions \\
        --dataset-name random --input-len 256 --output-len 64 --num-prompts 200 \\
        --request-rate 8 --goodput ttft:500 tpot:50 --save-result --plot latency.png

Steps: GET /v1/models (the server is reachable and speaks OpenAI; the first model is the default
`--model`), load the tokenizer the datasets are measured with, build the requests, send one test
request (any failure stops here: exit 2 with the reason on one line), then the benchmark. Every
request streams (SSE, `stream_options.include_usage`); the client timestamps each event it reads.

Arrivals: a Poisson process at `--request-rate` requests/s (`inf`: all at once); `--burstiness`
k draws the gaps from a gamma distribution of shape k and the same mean (k = 1 is Poisson, k < 1
burstier, k > 1 more regular). `--max-concurrency` caps requests in flight (the arrival process
still runs; requests wait for a slot, and their timings start when they are sent).

multi-round-qa: `--num-users` users over one shared system prompt; each user's rounds run one
after another, each round's prompt holding the system prompt, the earlier questions and the
answers the server actually returned. Users arrive by the same process as requests (so
`--request-rate inf` starts them all at once), `--user-request-interval` seconds pass between a
user's answer and its next question, and `--max-concurrency` caps requests across users. A failed
round ends its user: the rounds left are recorded as failed, not sent.

Token counts: output tokens are the server's `usage.completion_tokens` when it sends usage, else
the tokenizer's count of the streamed text. Prompt tokens are counted client-side from the
prompt text (chat: the message contents, not the server's template), so two servers given the
same requests report the same input totals.

The result JSON (`--save-result [PATH]`; schema: lmserve/bench/result_schema.json):
    date, lmserve_version, backend ("openai" | "openai-chat"), base_url, endpoint, model_id,
    tokenizer_id, dataset_name, num_prompts, request_rate (number or "inf"), burstiness,
    max_concurrency (null = none), goodput_slos_ms (null or {"ttft"|"tpot"|"e2el": ms}),
    metric_percentiles, and the summary of metrics.py: duration (s), completed, failed,
    total_input_tokens, total_output_tokens, request_throughput (req/s), request_goodput (req/s,
    null without --goodput), output_throughput and total_token_throughput (tok/s),
    max_concurrent_requests, {mean,median,std,pXX}_{ttft,tpot,itl,e2el}_ms.
    multi-round-qa adds num_users, num_rounds and per_round (round, completed, mean_prompt_len,
    mean_ttft_ms, mean_e2el_ms). `--save-detailed` adds per-request lists, in request order:
    input_lens, output_lens, ttfts (s), itls (s, one list per request), e2els (s),
    generated_texts, errors ("" when it succeeded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import numpy as np
from tqdm.auto import tqdm

from lmserve.bench import BenchError, http_get
from lmserve.bench.datasets import (
    SampleRequest,
    UserSession,
    add_dataset_args,
    build_requests,
    dataset_name,
    encode,
    multi_round_qa_sessions,
)
from lmserve.bench.metrics import (
    METRIC_TITLES,
    METRICS,
    RequestRecord,
    format_summary,
    metric_samples,
    parse_goodput,
    per_round_summary,
    returning_rounds_ttft,
    summarize,
    timings_from_events,
)
from lmserve.bench.spec_decode import difference, format_spec_decode, scrape_spec_decode

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
PREFLIGHT_TIMEOUT_S = 10.0
# aiohttp's read buffer; one line may be up to twice this long (a server that answers a whole
# JSON body on one line instead of streaming).
_READ_BUFSIZE = 1 << 22


class RequestFailed(Exception):
    """One request failed (HTTP error, or an answer that is not OpenAI's shape)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    base_url: str  # scheme://host:port, no trailing slash
    path: str  # /v1/completions or /v1/chat/completions
    model: str  # sent as "model"
    api_key: str | None = None

    @property
    def url(self) -> str:
        return self.base_url + self.path

    @property
    def chat(self) -> bool:
        return self.path.endswith("/chat/completions")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True, slots=True)
class RequestInput:
    prompt: str | list[dict[str, str]]  # text, or chat messages
    prompt_len: int  # client-side token count
    max_tokens: int
    user_id: int | None = None
    round_index: int | None = None


@dataclass(frozen=True, slots=True)
class SamplingSettings:
    temperature: float = 0.0
    ignore_eos: bool = False  # sent only when set (not every server knows the field)
    extra_body: dict[str, Any] = field(default_factory=dict)


# ---- one request -----------------------------------------------------------------------------
def request_body(endpoint: Endpoint, req: RequestInput, sampling: SamplingSettings) -> dict:
    body: dict[str, Any] = {"model": endpoint.model}
    if endpoint.chat:
        messages = req.prompt if isinstance(req.prompt, list) else None
        body["messages"] = messages or [{"role": "user", "content": req.prompt}]
        body["max_completion_tokens"] = req.max_tokens
    else:
        assert isinstance(req.prompt, str), "completions take a text prompt"
        body["prompt"] = req.prompt
        body["max_tokens"] = req.max_tokens
    body.update(
        temperature=sampling.temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    if sampling.ignore_eos:
        body["ignore_eos"] = True
    body.update(sampling.extra_body)
    return body


def parse_chunk(payload: str, chat: bool) -> tuple[str, dict | None]:
    """(generated text, usage or None) of one SSE `data:` payload; RequestFailed when it is not
    a completion chunk (not JSON, no `choices`) or carries an error."""
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError:
        raise RequestFailed(f"non-OpenAI stream: an event is not JSON: {payload[:80]!r}") from None
    if not isinstance(chunk, dict):
        raise RequestFailed(f"non-OpenAI stream: an event is not an object: {payload[:80]!r}")
    if "error" in chunk:
        raise RequestFailed(f"the server sent an error in the stream: {_error_text(chunk)}")
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise RequestFailed(f"non-OpenAI stream: an event has no 'choices': {payload[:80]!r}")
    usage = chunk.get("usage") if isinstance(chunk.get("usage"), dict) else None
    return (_choice_text(choices[0], chat) if choices else ""), usage


def _choice_text(choice: Any, chat: bool) -> str:
    if not isinstance(choice, dict):
        raise RequestFailed(f"non-OpenAI answer: a choice is not an object: {str(choice)[:80]!r}")
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or choice.get("message") or {}
    return (delta.get("reasoning_content") or "") + (delta.get("content") or "")


def _error_text(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error if error is not None else body)[:200]


async def _stream(
    client: aiohttp.ClientSession, endpoint: Endpoint, body: dict
) -> tuple[str, list[float], dict | None]:
    """POST and read the answer: (generated text, perf_counter time of every event that carried
    text, usage or None). A server that ignores `stream` and answers one JSON body is accepted
    (one event, at the time the body arrived)."""
    async with client.post(endpoint.url, json=body, headers=endpoint.headers) as resp:
        if resp.status != 200:
            raw = (await resp.read()).decode("utf-8", "replace")
            try:
                reason = _error_text(json.loads(raw))
            except json.JSONDecodeError:
                reason = raw[:200]
            raise RequestFailed(f"HTTP {resp.status} from {endpoint.url}: {reason}")
        parts: list[str] = []
        times: list[float] = []
        usage = None
        lines = _text_lines(resp.content)
        async for raw_line in lines:
            now = time.perf_counter()
            line = raw_line.strip()
            if not line or line.startswith(":"):  # keep-alive comment
                continue
            name, _, value = line.partition(":")
            if name in ("event", "id", "retry"):
                continue
            if name != "data":  # not SSE: read the rest as one JSON answer
                rest = [line] + [rest_line async for rest_line in lines]
                return _whole_body("\n".join(rest), endpoint.chat, time.perf_counter())
            value = value.strip()
            if value == "[DONE]":
                break
            text, chunk_usage = parse_chunk(value, endpoint.chat)
            usage = chunk_usage or usage
            if text:
                parts.append(text)
                times.append(now)
        return "".join(parts), times, usage


async def _text_lines(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The body's lines as text, each yielded as soon as it has arrived."""
    async for raw in content:  # split at b"\n"; SSE lines end in "\n" or "\r\n"
        yield raw.decode("utf-8", "replace")


def _whole_body(raw: str, chat: bool, now: float) -> tuple[str, list[float], dict | None]:
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        raise RequestFailed(
            f"non-OpenAI answer: HTTP 200 with a body that is neither an SSE stream nor JSON: "
            f"{raw[:80]!r}"
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise RequestFailed(f"non-OpenAI answer: HTTP 200 JSON without 'choices': {raw[:80]!r}")
    text = _choice_text(body["choices"][0], chat) if body["choices"] else ""
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
    return text, ([now] if text else []), usage


async def send_request(
    client: aiohttp.ClientSession,
    endpoint: Endpoint,
    req: RequestInput,
    sampling: SamplingSettings,
    tokenizer: Any = None,
) -> RequestRecord:
    """Send one streaming request and time it. Never raises for a failed request: the record
    says success=False and why."""
    record = RequestRecord(
        prompt_len=req.prompt_len, user_id=req.user_id, round_index=req.round_index
    )
    body = request_body(endpoint, req, sampling)
    start = record.start_time = time.perf_counter()
    try:
        text, times, usage = await _stream(client, endpoint, body)
    except (RequestFailed, aiohttp.ClientError, TimeoutError) as e:
        record.latency = time.perf_counter() - start
        record.error = describe_error(e, endpoint.url)
        return record
    end = time.perf_counter()
    record.latency = end - start
    record.generated_text = text
    if not times:
        record.error = "the answer carried no generated text"
        return record
    record.ttft, record.itl, record.latency = timings_from_events(start, times, end)
    completion_tokens = (usage or {}).get("completion_tokens")
    if isinstance(completion_tokens, int) and not isinstance(completion_tokens, bool):
        record.output_len = completion_tokens
    elif tokenizer is not None:
        record.output_len = len(encode(tokenizer, text))
    else:
        record.output_len = len(times)
    record.success = True
    return record


def describe_error(e: BaseException, url: str) -> str:
    """One line on why a request to `url` failed (aiohttp's errors, or http_get's OSErrors)."""
    if isinstance(e, RequestFailed):
        return str(e)
    if isinstance(e, aiohttp.ClientConnectorError | ConnectionRefusedError):
        return f"cannot connect to {url}: {e or type(e).__name__}"
    if isinstance(e, TimeoutError):  # aiohttp's timeouts and socket timeouts included
        return f"timed out waiting for {url} ({type(e).__name__})"
    return f"{type(e).__name__} from {url}: {e}"


# ---- arrivals and runners --------------------------------------------------------------------
async def arrivals(
    items: Sequence[Any], rate: float, burstiness: float, rng: np.random.Generator
) -> AsyncIterator[Any]:
    """Yield `items` at a gamma process of `rate` per second (Poisson when burstiness = 1)."""
    for i, item in enumerate(items):
        if i and math.isfinite(rate):
            await asyncio.sleep(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness)))
        yield item


@dataclass(slots=True)
class RunContext:
    """What every request of one benchmark run shares."""

    client: aiohttp.ClientSession
    endpoint: Endpoint
    sampling: SamplingSettings
    tokenizer: Any
    limiter: asyncio.Semaphore | None
    progress: Any  # tqdm

    async def send(self, req: RequestInput) -> RequestRecord:
        if self.limiter is None:
            record = await send_request(
                self.client, self.endpoint, req, self.sampling, self.tokenizer
            )
        else:
            async with self.limiter:
                record = await send_request(
                    self.client, self.endpoint, req, self.sampling, self.tokenizer
                )
        self.progress.update(1)
        return record


async def run_requests(
    ctx: RunContext, requests: Sequence[RequestInput], rate: float, burstiness: float, seed: int
) -> list[RequestRecord]:
    """Send every request at the arrival process's times; records in request order."""
    tasks = []
    async for req in arrivals(requests, rate, burstiness, np.random.default_rng(seed)):
        tasks.append(asyncio.create_task(ctx.send(req)))
    return list(await asyncio.gather(*tasks))


async def run_user(ctx: RunContext, session: UserSession, interval_s: float) -> list[RequestRecord]:
    """One multi-round-qa user: rounds in order, each carrying the answers so far."""
    answers: list[str] = []
    records: list[RequestRecord] = []
    for k in range(session.num_rounds):
        record = await ctx.send(session_request(session, k, answers, ctx.endpoint, ctx.tokenizer))
        records.append(record)
        if not record.success:
            for later in range(k + 1, session.num_rounds):
                records.append(
                    RequestRecord(
                        error=f"not sent: round {k} of user {session.user_id} failed",
                        user_id=session.user_id,
                        round_index=later,
                    )
                )
                ctx.progress.update(1)
            break
        answers.append(record.generated_text)
        if interval_s > 0 and k + 1 < session.num_rounds:
            await asyncio.sleep(interval_s)
    return records


async def run_sessions(
    ctx: RunContext,
    sessions: Sequence[UserSession],
    rate: float,
    burstiness: float,
    seed: int,
    interval_s: float,
) -> list[RequestRecord]:
    tasks = []
    async for session in arrivals(sessions, rate, burstiness, np.random.default_rng(seed)):
        tasks.append(asyncio.create_task(run_user(ctx, session, interval_s)))
    return [record for user_records in await asyncio.gather(*tasks) for record in user_records]


def session_request(
    session: UserSession, k: int, answers: list[str], endpoint: Endpoint, tokenizer: Any
) -> RequestInput:
    text = session.prompt_text(k, answers)
    prompt = session.messages(k, answers) if endpoint.chat else text
    return RequestInput(
        prompt=prompt,
        prompt_len=len(encode(tokenizer, text)),
        max_tokens=session.answer_len,
        user_id=session.user_id,
        round_index=k,
    )


# ---- the server: reachability, model name, tokenizer -----------------------------------------
def resolve_base_url(args: argparse.Namespace) -> str:
    base = args.base_url or f"http://{args.host}:{args.port}"
    base = base.rstrip("/")
    if base.endswith("/v1"):  # accept http://host:port/v1 as well
        base = base[: -len("/v1")]
    if not base.startswith(("http://", "https://")):
        raise BenchError(f"--base-url {base!r} must start with http:// or https://")
    return base


def fetch_models(base_url: str, api_key: str | None, required: bool = True) -> list[dict[str, Any]]:
    """The model cards of GET /v1/models. BenchError when the server cannot be reached, or (when
    `required`) the answer is not OpenAI's model list; else [] for a server without the route."""
    url = f"{base_url}/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        status, text = http_get(url, headers, PREFLIGHT_TIMEOUT_S)
    except OSError as e:
        raise BenchError(f"{describe_error(e, url)} (is the server running?)") from None
    try:
        if status != 200:
            raise BenchError(f"GET {url} answered HTTP {status}: {text[:200]!r}")
        try:
            cards = json.loads(text)["data"]
            assert isinstance(cards, list) and all(isinstance(c.get("id"), str) for c in cards)
        except (ValueError, KeyError, TypeError, AttributeError, AssertionError):
            raise BenchError(
                f"GET {url} did not answer an OpenAI model list: {text[:80]!r}"
            ) from None
    except BenchError:
        if required:
            raise
        return []  # --model was given: the test request will show whether the server works
    return cards


def load_tokenizer(candidates: Sequence[str]) -> tuple[Any, str]:
    """The first of `candidates` (tokenizer folder, model folder, .gguf file or hub id; local
    paths tried first) that gives a tokenizer, and its name."""
    from transformers import AutoTokenizer

    from lmserve.model.loader import resolve_model_path

    names = list(dict.fromkeys(c for c in candidates if c))
    names.sort(key=lambda name: not os.path.exists(name))
    errors = []
    for name in names:
        try:
            return AutoTokenizer.from_pretrained(resolve_model_path(name)), name
        except Exception as e:  # any failure means: try the next candidate
            errors.append(f"{name}: {type(e).__name__}")
    raise BenchError(
        f"cannot load a tokenizer to measure the dataset (tried {'; '.join(errors) or 'none'}); "
        "pass --tokenizer PATH_OR_HUB_ID"
    )


def tokenizer_candidates(args: argparse.Namespace, model: str, card: dict | None) -> list[str]:
    if args.tokenizer:
        return [args.tokenizer]
    names = [model, (card or {}).get("root")]
    from lmserve.model.default_model import DEFAULT_MODEL_NAME, default_model_path

    if DEFAULT_MODEL_NAME in names:  # an lmserve server on its default model
        try:
            names.append(default_model_path())
        except FileNotFoundError:
            pass
    return [n for n in names if isinstance(n, str)]


# ---- results ---------------------------------------------------------------------------------
def build_result(
    args: argparse.Namespace,
    endpoint: Endpoint,
    tokenizer_id: str,
    summary: dict[str, Any],
    records: Sequence[RequestRecord],
    slos_ms: dict[str, float],
    percentiles: Sequence[float],
) -> dict[str, Any]:
    """The JSON document `--save-result` writes (see the module docstring and the schema)."""
    from lmserve import __version__

    name = dataset_name(args)
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "lmserve_version": __version__,
        "backend": "openai-chat" if endpoint.chat else "openai",
        "base_url": endpoint.base_url,
        "endpoint": endpoint.path,
        "model_id": endpoint.model,
        "tokenizer_id": tokenizer_id,
        "dataset_name": name,
        "num_prompts": len(records),
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "goodput_slos_ms": slos_ms or None,
        "metric_percentiles": list(percentiles),
        **summary,
    }
    if name == "multi-round-qa":
        result.update(
            num_users=args.num_users,
            num_rounds=args.num_rounds,
            per_round=per_round_summary(records),
            returning_rounds_ttft_ms=returning_rounds_ttft(records),
        )
    if args.save_detailed:
        result.update(
            input_lens=[r.prompt_len for r in records],
            output_lens=[r.output_len for r in records],
            ttfts=[r.ttft for r in records],
            itls=[r.itl for r in records],
            e2els=[r.latency for r in records],
            generated_texts=[r.generated_text for r in records],
            errors=[r.error for r in records],
        )
    return result


def default_result_path(args: argparse.Namespace, model: str) -> str:
    rate = "inf" if not math.isfinite(args.request_rate) else f"{args.request_rate:g}"
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    model_name = os.path.basename(model.rstrip("/")) or "model"
    filename = (
        args.result_filename or f"bench-serve-{model_name}-{rate}qps{concurrency}-{stamp}.json"
    )
    return os.path.join(args.result_dir or ".", filename)


def plot_latencies(records: Sequence[RequestRecord], path: str, title: str = "") -> None:
    """A PNG with one panel per metric (TTFT, TPOT, ITL, E2EL): a histogram of the completed
    requests' values in ms, their CDF on the right axis, and p50 / p90 / p99 marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    samples = metric_samples(records)
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, metric in zip(fig.subplots(2, 2).flat, METRICS):
        values = np.sort(np.asarray(samples[metric], dtype=np.float64) * 1000)
        ax.set_title(f"{METRIC_TITLES[metric]} ({metric.upper()}, n={values.size})")
        ax.set_xlabel("ms")
        ax.set_ylabel("gaps" if metric == "itl" else "requests")
        if values.size == 0:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(values, bins=int(min(50, max(5, values.size // 2))), color="C0", alpha=0.6)
        cdf = ax.twinx()
        cdf.plot(values, np.arange(1, values.size + 1) / values.size, color="C1")
        cdf.set_ylim(0, 1.02)
        cdf.set_ylabel("CDF")
        for p in (50, 90, 99):
            x = float(np.percentile(values, p))
            ax.axvline(x, color="gray", linestyle="--", linewidth=0.8)
            ax.text(x, ax.get_ylim()[1] * 0.95, f" p{p}", color="gray", fontsize=8, va="top")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)


# ---- the command -----------------------------------------------------------------------------
def add_serve_args(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument(
        "--base-url", default=None, help="e.g. http://127.0.0.1:8000 (else --host/--port)"
    )
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--endpoint", choices=ENDPOINTS, default="/v1/completions")
    server.add_argument(
        "--model", default=None, help="model name sent (default: first of GET /v1/models)"
    )
    server.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: env OPENAI_API_KEY)",
    )
    server.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer the dataset is measured with (default: the model name, then its root)",
    )
    server.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s (inf = all at once)"
    )
    load.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)"
    )
    load.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    load.add_argument(
        "--user-request-interval",
        type=float,
        default=0.0,
        help="multi-round-qa: seconds between a user's answer and next question",
    )
    load.add_argument("--seed", type=int, default=0, help="dataset and arrival seed")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=0.0)
    sampling.add_argument("--ignore-eos", action="store_true", help='send "ignore_eos": true')
    sampling.add_argument(
        "--extra-body", default=None, help="JSON object merged into every request body"
    )
    add_dataset_args(parser, multi_round=True)
    out = parser.add_argument_group("results")
    out.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:MS",
        help="SLOs, e.g. ttft:500 tpot:50 e2el:3000",
    )
    out.add_argument("--metric-percentiles", default="90,99", help="comma-separated percentiles")
    out.add_argument(
        "--save-result",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="write the result JSON (to PATH, else --result-dir/--result-filename)",
    )
    out.add_argument(
        "--save-detailed", action="store_true", help="add per-request lists to the JSON"
    )
    out.add_argument("--result-dir", default=None)
    out.add_argument("--result-filename", default=None)
    out.add_argument(
        "--plot", default=None, metavar="PATH", help="PNG of the latency distributions"
    )
    out.add_argument("--disable-tqdm", action="store_true")


def _check_args(args: argparse.Namespace) -> tuple[dict[str, float], list[float], dict]:
    if not args.request_rate > 0:
        raise BenchError(f"--request-rate {args.request_rate} must be > 0 (inf = all at once)")
    if not args.burstiness > 0:
        raise BenchError(f"--burstiness {args.burstiness} must be > 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError(f"--max-concurrency {args.max_concurrency} must be >= 1")
    try:
        slos = parse_goodput(args.goodput)
        percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
        assert all(0 <= p <= 100 for p in percentiles)
    except (ValueError, AssertionError) as e:
        raise BenchError(str(e) or f"--metric-percentiles {args.metric_percentiles!r}") from None
    try:
        extra = json.loads(args.extra_body) if args.extra_body else {}
        assert isinstance(extra, dict)
    except (json.JSONDecodeError, AssertionError):
        raise BenchError(f"--extra-body {args.extra_body!r} is not a JSON object") from None
    return slos, percentiles, extra


def main(args: argparse.Namespace) -> int:
    """`lmserve bench serve`; raises BenchError (exit 2) when it cannot run."""
    slos, percentiles, extra_body = _check_args(args)
    base_url = resolve_base_url(args)
    cards = fetch_models(base_url, args.api_key, required=args.model is None)
    if args.model is None and not cards:
        raise BenchError(f"GET {base_url}/v1/models lists no model; pass --model")
    model = args.model or cards[0]["id"]
    card = next((c for c in cards if c.get("id") == model), None)
    tokenizer, tokenizer_id = load_tokenizer(tokenizer_candidates(args, model, card))
    endpoint = Endpoint(base_url, args.endpoint, model, args.api_key)
    sampling = SamplingSettings(args.temperature, args.ignore_eos, extra_body)
    try:
        workload = _build_workload(args, tokenizer, endpoint)
    except ValueError as e:
        raise BenchError(str(e)) from None
    spec_before = scrape_spec_decode(base_url)  # lmserve's counters, if it speculates
    records, duration = asyncio.run(_run(args, endpoint, sampling, tokenizer, workload))
    summary = summarize(records, duration, slos, percentiles)
    print(format_summary(summary, percentiles))
    spec_after = scrape_spec_decode(base_url)
    if spec_after is not None:  # includes the test request
        summary["spec_decode"] = difference(spec_after, spec_before).to_dict()
        print(format_spec_decode(summary["spec_decode"]))
    if dataset_name(args) == "multi-round-qa":
        print(_format_rounds(per_round_summary(records)))
    failed = [r.error for r in records if not r.success]
    if failed:
        print(f"{len(failed)} request(s) failed; first error: {failed[0]}")
    if args.save_result is not None:
        path = args.save_result or default_result_path(args, model)
        result = build_result(args, endpoint, tokenizer_id, summary, records, slos, percentiles)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"result written to {path}")
    if args.plot:
        plot_latencies(records, args.plot, f"{model} via {endpoint.path} ({dataset_name(args)})")
        print(f"latency plot written to {args.plot}")
    return 0


def _build_workload(
    args: argparse.Namespace, tokenizer: Any, endpoint: Endpoint
) -> list[RequestInput] | list[UserSession]:
    if dataset_name(args) == "multi-round-qa":
        return multi_round_qa_sessions(
            tokenizer,
            args.num_users,
            args.num_rounds,
            args.system_prompt_len,
            args.question_len,
            args.answer_len,
            args.seed,
            user_history_len=args.user_history_len,
        )
    samples: list[SampleRequest] = build_requests(
        args, tokenizer, args.seed, progress=not args.disable_tqdm
    )
    return [RequestInput(s.prompt, s.prompt_len, s.expected_output_len) for s in samples]


async def _run(
    args: argparse.Namespace,
    endpoint: Endpoint,
    sampling: SamplingSettings,
    tokenizer: Any,
    workload: list[RequestInput] | list[UserSession],
) -> tuple[list[RequestRecord], float]:
    """The test request, then the benchmark: (records, duration in seconds)."""
    sessions = workload if workload and isinstance(workload[0], UserSession) else None
    # limit=0: no cap on connections (--max-concurrency caps requests in flight instead).
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout, sock_connect=PREFLIGHT_TIMEOUT_S)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, read_bufsize=_READ_BUFSIZE
    ) as client:
        first = (
            session_request(sessions[0], 0, [], endpoint, tokenizer) if sessions else workload[0]
        )
        test = await send_request(client, endpoint, first, sampling, tokenizer)
        if not test.success:
            raise BenchError(f"the test request failed: {test.error}")
        total = sum(s.num_rounds for s in sessions) if sessions else len(workload)
        limiter = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        with tqdm(
            total=total, desc="Requests", disable=args.disable_tqdm, dynamic_ncols=True
        ) as bar:
            ctx = RunContext(client, endpoint, sampling, tokenizer, limiter, bar)
            start = time.perf_counter()
            if sessions:
                records = await run_sessions(
                    ctx,
                    sessions,
                    args.request_rate,
                    args.burstiness,
                    args.seed,
                    args.user_request_interval,
                )
            else:
                records = await run_requests(
                    ctx, workload, args.request_rate, args.burstiness, args.seed
                )
            duration = time.perf_counter() - start
    return records, duration


def _format_rounds(rows: list[dict[str, Any]]) -> str:
    lines = [
        "{s:{c}^50}".format(s=" Multi-round QA, per round ", c="="),
        f"{'round':>5} {'done':>5} {'prompt tok':>11} {'TTFT ms':>10} {'E2EL ms':>10}",
    ]
    for row in rows:
        lines.append(
            f"{row['round']:>5} {row['completed']:>5} {row['mean_prompt_len']:>11.1f} "
            f"{row['mean_ttft_ms']:>10.2f} {row['mean_e2el_ms']:>10.2f}"
        )
    return "\n".join(lines)
