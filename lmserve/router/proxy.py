"""Forwarding one request: parse just enough of the body to route it, send it, relay the answer.

    client ─▶ read body ─▶ RouteRequest (model, session id, prompt) ─▶ logic.choose(candidates)
           ◀─ answer    ◀─ backend (retried on another if it fails before the client got a byte)

What counts as "before the client got a byte":
  - an answer that is not an event stream (a whole JSON body, or an error) is read completely
    from the backend first, so any failure while reading it is retried;
  - an event stream is committed to the client only once its first chunk has arrived, so a
    backend that dies after its headers but before the first token is retried too (this costs
    nothing: the client could not have seen anything earlier).
After that, chunks pass through as they arrive; if the backend fails mid-stream the client gets
one `data: {"error": ...}` event and the stream ends (the openai client raises APIError).

The body the client sent is forwarded byte for byte (never re-serialized); backend answers,
4xx included, pass through unchanged. Only the router's own failures use its error bodies.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from lmserve.entrypoints.openai.errors import (
    AUTHENTICATION,
    NOT_FOUND,
    SERVICE_UNAVAILABLE,
    OpenAIError,
    error_body,
    invalid_request,
)
from lmserve.router.backends import Backend, BackendPool, Candidates
from lmserve.router.health import HealthChecker
from lmserve.router.metrics import RouterMetrics
from lmserve.router.routing import Decision, RouteRequest, RoutingLogic

logger = logging.getLogger(__name__)

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those we recompute.
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip
# ... and those uvicorn writes itself.
_RESPONSE_DROP = _HOP_HEADERS | {"date", "server"}
BACKEND_HEADER = "x-lmserve-backend"
PREDICTED_CACHED_HEADER = "x-lmserve-predicted-cached-tokens"
_RETRY_STATUSES = frozenset({HTTPStatus.SERVICE_UNAVAILABLE})  # draining or dead engine


class BackendFailed(Exception):
    """This backend could not answer; another may. `response` is its own answer, if any, to
    pass on when no other backend can do better."""

    def __init__(self, reason: str, detail: str, response: Response | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.response = response


@dataclass(frozen=True, slots=True)
class ParsedBody:
    data: dict[str, Any]
    model: str | None


class Proxy:
    def __init__(
        self,
        pool: BackendPool,
        logic: RoutingLogic,
        client: aiohttp.ClientSession | None,
        metrics: RouterMetrics,
        health: HealthChecker,
        *,
        max_retries: int,
        api_key: str | None,
        backend_api_key: str | None,
        session_key: str,
        session_body_field: str | None,
        tokenizer: Any = None,
        prompt_tokenizer: Any = None,
        expected_models: tuple[str, ...] = (),
    ) -> None:
        self.pool = pool
        self.logic = logic
        self.client = client  # set by the app's lifespan (a session needs a running loop)
        self.metrics = metrics
        self.health = health
        self.max_retries = max_retries
        self.api_key = f"Bearer {api_key}".encode() if api_key else None
        self.backend_auth = f"Bearer {backend_api_key}" if backend_api_key else None
        self.session_key = session_key.lower()
        self.session_body_field = session_body_field
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer`, or None: chunk characters
        self.prompt_tokenizer = prompt_tokenizer  # a PromptTokenizer (kv-aware)
        self.expected_models = frozenset(expected_models)  # --models: 503 while none is up

    # ---- the request path --------------------------------------------------------------------
    async def forward(self, request: Request, path: str) -> Response:
        """Proxy one POST to `path` on a backend chosen by the routing logic."""
        start = time.perf_counter()
        self.check_api_key(request)
        parsed = parse_body(await request.body())
        self.count_model(parsed.model)
        route_request = self.route_request(request, parsed)
        headers = self.backend_headers(request)
        tried: set[str] = set()
        failure: BackendFailed | None = None
        for attempt in range(self.max_retries + 1):
            candidates: Sequence[Backend] = self.candidates(parsed.model)
            if tried:  # a retry: a list of its own (the logic derives its state for it anew)
                candidates = [b for b in candidates if b.url not in tried]
            if not candidates:
                break
            if failure is not None:
                self.metrics.retries.labels(failure.reason).inc()
            decision = self.logic.choose(route_request, candidates)
            self.metrics.routing_decisions.labels(decision.reason).inc()
            tried.add(decision.backend.url)
            try:
                return await self._attempt(decision, path, headers, request, start)
            except BackendFailed as e:
                failure = e
                logger.warning("%s failed on %s (attempt %d): %s", path, decision.backend.url,
                               attempt + 1, e)  # fmt: skip
        if failure is not None and failure.response is not None:
            return failure.response  # the backend's own answer (e.g. its 503), unchanged
        raise no_backend(parsed.model, failure)

    def count_model(self, model: str | None) -> None:
        """Requests per model, for autoscaling from zero (only models the cluster knows, so
        clients cannot grow the label set)."""
        if model is not None and (model in self.expected_models or self.pool.serves(model)):
            self.metrics.model_requests.labels(model).inc()

    def candidates(self, model: str | None) -> Candidates:
        """Healthy backends serving `model` (the pool's candidate set, not a copy); 404 if no backend serves it at all and --models
        does not name it (then 503: its backends may be starting)."""
        found = self.pool.candidates(model)
        if (
            not found
            and model is not None
            and model not in self.expected_models
            and not self.pool.serves(model)
        ):
            served = sorted({m for b in self.pool for m in b.models})
            raise OpenAIError(
                f"The model `{model}` does not exist. Served: {served}",
                HTTPStatus.NOT_FOUND,
                NOT_FOUND,
                param="model",
                code="model_not_found",
            )
        return found

    def check_api_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self.api_key):
            raise OpenAIError(
                "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                HTTPStatus.UNAUTHORIZED,
                AUTHENTICATION,
                code="invalid_api_key",
            )

    def route_request(self, request: Request, parsed: ParsedBody) -> RouteRequest:
        session_id = request.headers.get(self.session_key)
        if session_id is None and self.session_body_field:
            value = parsed.data.get(self.session_body_field)
            session_id = None if value is None else str(value)
        if self.logic.needs_tokens:  # kv-aware: the prompt only for its prefix-aware fallback
            token_ids = None
            if self.prompt_tokenizer is not None:
                token_ids = self.prompt_tokenizer.for_body(parsed.data)
            return RouteRequest(
                parsed.model, session_id, None, token_ids, lambda: self._prompt(parsed.data)
            )
        prompt = self._prompt(parsed.data) if self.logic.needs_prompt else None
        return RouteRequest(parsed.model, session_id, prompt)

    def _prompt(self, data: dict) -> str | list[int] | None:
        """What prefix-aware matches: the prompt text, or its ids with --tokenizer."""
        prompt = prompt_of(data)
        if self.tokenizer is not None and isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return prompt

    def backend_headers(self, request: Request) -> list[tuple[str, str]]:
        """The client's headers less hop-by-hop ones; Authorization becomes the backend key,
        or is dropped when it was the router's own key."""
        headers = [
            (k, v)
            for k, v in request.headers.items()
            if k not in _HOP_HEADERS and k != "authorization"
        ]
        if self.backend_auth is not None:
            headers.append(("authorization", self.backend_auth))
        elif self.api_key is None and "authorization" in request.headers:
            headers.append(("authorization", request.headers["authorization"]))
        return headers

    # ---- one attempt -------------------------------------------------------------------------
    async def _attempt(
        self,
        decision: Decision,
        path: str,
        headers: list[tuple[str, str]],
        request: Request,
        start: float,
    ) -> Response:
        body = await request.body()  # cached by Starlette after the first read
        backend = decision.backend
        self._began(decision)
        sent = time.perf_counter()
        try:
            resp = await self.client.post(backend.url + path, data=body, headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            self._answering(decision)
            self._ended(backend, "error")
            if isinstance(e, aiohttp.ClientConnectorError):
                self.health.mark_dead(backend, f"connection refused ({e})")
            raise _failed(e) from None
        if resp.content_type == "text/event-stream":
            return await self._relay_stream(decision, resp, start, sent)
        return await self._relay_whole(decision, resp, start, sent)

    async def _relay_whole(
        self, decision: Decision, resp: aiohttp.ClientResponse, start: float, sent: float
    ) -> Response:
        """Read the backend's whole answer, then pass it on (retryable until it is read)."""
        backend = decision.backend
        status = str(resp.status)
        try:
            content = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            status = "error"
            raise _failed(e) from None
        finally:
            resp.release()
            self._answering(decision)
            self._ended(backend, status)
        if resp.status == HTTPStatus.OK:
            self._check_prediction(decision, content)
        answered = time.perf_counter()
        response = Response(content, resp.status, response_headers(resp, decision))
        if resp.status in _RETRY_STATUSES:
            raise BackendFailed(f"status_{resp.status}", f"HTTP {resp.status}", response)
        self.metrics.added_latency.observe((sent - start) + (time.perf_counter() - answered))
        return response

    async def _relay_stream(
        self, decision: Decision, resp: aiohttp.ClientResponse, start: float, sent: float
    ) -> Response:
        """Wait for the first chunk (retryable until then), then stream the rest as it comes."""
        backend = decision.backend
        try:
            first = await resp.content.readany()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            resp.close()
            self._ended(backend, "error")
            raise _failed(e) from None
        finally:
            self._answering(decision)
        answered = time.perf_counter()
        self.metrics.backend_ttft.labels(backend.url).observe(answered - sent)
        relay = self._stream_chunks(decision, resp, first)
        response = StreamingResponse(relay, resp.status, response_headers(resp, decision))
        self.metrics.added_latency.observe((sent - start) + (time.perf_counter() - answered))
        return response

    async def _stream_chunks(
        self, decision: Decision, resp: aiohttp.ClientResponse, first: bytes
    ) -> AsyncIterator[bytes]:
        backend = decision.backend
        status, chunk = "error", first
        try:
            while chunk:
                yield chunk
                if decision.predicted_cached is not None and b'"usage"' in chunk:
                    self._check_prediction(decision, chunk)
                chunk = await resp.content.readany()
            status = str(resp.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            logger.warning("stream from %s broke: %s: %s", backend.url, type(e).__name__, e)
            yield stream_error_event(f"the backend failed mid-stream ({type(e).__name__})")
        finally:
            # Finished: the connection goes back to the pool. Otherwise (broken, or the client
            # went away and Starlette cancelled us) it is closed, so the engine aborts the request.
            resp.release() if status != "error" else resp.close()
            self._ended(backend, status)

    def _began(self, decision: Decision) -> None:
        backend = decision.backend
        backend.in_flight += 1
        backend.pending_prefill_tokens += decision.prefill_tokens
        self.metrics.child(self.metrics.in_flight, backend.url).set(backend.in_flight)

    def _answering(self, decision: Decision) -> None:
        """The backend answers (or failed): its prefill of this prompt is no longer queued."""
        decision.backend.pending_prefill_tokens -= decision.prefill_tokens

    def _check_prediction(self, decision: Decision, content: bytes) -> None:
        """Compare the cached tokens kv-aware routing predicted with what the engine reports."""
        if decision.predicted_cached is None:
            return
        reported = reported_cached_tokens(content)
        if reported is not None:
            self.metrics.kv_prediction_error.observe(reported - decision.predicted_cached)

    def _ended(self, backend: Backend, status: str) -> None:
        backend.in_flight -= 1
        self.metrics.child(self.metrics.in_flight, backend.url).set(backend.in_flight)
        self.metrics.child(self.metrics.requests, backend.url, status).inc()


# ---- helpers ----------------------------------------------------------------------------------
def parse_body(raw: bytes) -> ParsedBody:
    """The JSON object the client sent; 400 in OpenAI's shape if it is not one."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise invalid_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise invalid_request("the request body must be a JSON object")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid_request(f"model: Input should be a valid string (got {model!r})", "model")
    return ParsedBody(data, model)


def prompt_of(data: dict[str, Any]) -> str | Sequence[int] | None:
    """The text (or token ids) prefix-aware routing keys on. Chat: each message as
    role + content with separators, so a conversation's prompt extends its previous round's."""
    messages = data.get("messages")
    if isinstance(messages, list):
        return "".join(
            f"{m.get('role')}\x1f{_content_text(m.get('content'))}\x1e"
            for m in messages
            if isinstance(m, dict)
        )
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return prompt
        prompt = prompt[0]  # a batch: route by its first prompt
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt
    return prompt if isinstance(prompt, str) else None


_CACHED_TOKENS = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')


def reported_cached_tokens(content: bytes) -> int | None:
    """`usage.prompt_tokens_details.cached_tokens` in a response body or stream chunk."""
    found = _CACHED_TOKENS.search(content)
    return None if found is None else int(found.group(1))


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def response_headers(resp: aiohttp.ClientResponse, decision: Decision) -> dict[str, str]:
    """The backend's response headers for the client (bodies pass on still encoded: the
    client session does not decompress), plus `x-lmserve-backend`: who answered, and with
    kv-aware routing `x-lmserve-predicted-cached-tokens`: what it was expected to reuse."""
    headers = {k.lower(): v for k, v in resp.headers.items() if k.lower() not in _RESPONSE_DROP}
    headers[BACKEND_HEADER] = decision.backend.url
    if decision.predicted_cached is not None:
        headers[PREDICTED_CACHED_HEADER] = str(decision.predicted_cached)
    return headers


def _failed(e: BaseException) -> BackendFailed:
    name = type(e).__name__
    return BackendFailed(name, f"{name}: {e}")


def stream_error_event(message: str) -> bytes:
    body = error_body(message, "server_error", code="backend_failed")
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def no_backend(model: str | None, failure: BackendFailed | None) -> OpenAIError:
    what = f" serving `{model}`" if model else ""
    detail = f"; last failure: {failure}" if failure is not None else ""
    return OpenAIError(
        f"no healthy backend{what} could take the request{detail}",
        HTTPStatus.SERVICE_UNAVAILABLE,
        SERVICE_UNAVAILABLE,
        code="no_healthy_backend",
    )
