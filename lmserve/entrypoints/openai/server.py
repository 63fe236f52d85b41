"""The OpenAI-compatible HTTP server behind `lmserve serve`.

    build_app(engine, args)   the FastAPI app: routes, error handlers, the request gate
    run_server(args)          start the engine, serve until told to stop; returns the exit code

Lifecycle:
  - SIGTERM / SIGINT: drain. The listening socket closes and new requests get 503; requests in
    flight may finish for --shutdown-timeout seconds, then the rest are cancelled (which aborts
    them in the engine); exit code 0.
  - The engine dies: /health answers 503 at once; the watchdog (twice a second) starts a short
    shutdown; exit code 1.
  - Idle, the server wakes twice a second (uvicorn's own loop would wake ten times) and the
    client-disconnect checks wait on the connection instead of polling.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmserve import __version__, envs
from lmserve.config import EngineConfig
from lmserve.dashboard import add_dashboard_routes
from lmserve.dashboard.sources import EngineSource
from lmserve.engine.launcher import EngineLauncher
from lmserve.entrypoints.openai.errors import (
    AUTHENTICATION,
    SERVICE_UNAVAILABLE,
    OpenAIError,
    engine_dead,
    error_response,
    from_validation_error,
    install_error_handlers,
    invalid_request,
)
from lmserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from lmserve.entrypoints.openai.serving_chat import OpenAIServingChat
from lmserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from lmserve.entrypoints.openai.serving_engine import ClientDisconnected, json_response
from lmserve.entrypoints.openai.tool_parsers import get_tool_parser
from lmserve.utils import freeze_startup_heap, process_age_s

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

TICK_S = 0.5  # the main loop's period: watchdog, Date header, exit checks
ENGINE_DEAD_GRACE_S = 1.0  # after the engine died: time for in-flight requests to get a 503
HARD_EXIT_S = 3.0  # ... and if the process still has not exited this long after, it is forced
_MAX_DRAIN_BYTES = 64 * 1024 * 1024  # unread body we consume before rejecting a request


# ---- the app --------------------------------------------------------------------------------
def build_app(engine: Any, args: argparse.Namespace) -> FastAPI:
    """The app for `engine` (an AsyncLLM, or anything with its interface) and the parsed
    `lmserve serve` arguments."""
    served_names = served_model_names(args)
    app = FastAPI(title="lmserve", version=__version__)
    app.state.engine = engine
    app.state.draining = False
    app.state.completion = completion = OpenAIServingCompletion(engine, served_names)
    parser_name = getattr(args, "tool_call_parser", None)
    app.state.chat = chat = OpenAIServingChat(
        engine,
        served_names,
        _load_chat_template(args.chat_template),
        get_tool_parser(parser_name) if parser_name else None,
    )
    install_error_handlers(app)
    app.add_middleware(
        RequestGate,
        state=app.state,
        api_key=args.api_key or envs.LMSERVE_API_KEY,
        max_body_bytes=args.max_request_body_size,
    )
    created = int(time.time())
    model_config = engine.model_config

    def model_card(name: str) -> ModelCard:
        return ModelCard(
            id=name,
            created=created,
            root=model_config.model,
            max_model_len=model_config.max_model_len,
        )

    @app.get("/health")
    async def health() -> Response:
        await engine.check_health()  # EngineDeadError → 503
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response(ModelList(data=[model_card(name) for name in served_names]))

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> Response:
        return json_response(model_card(completion.resolve_model(model)))

    @app.post("/v1/completions")
    async def create_completion(raw_request: Request) -> Response:
        request = await parse_body(raw_request, CompletionRequest)
        return await _unless_disconnected(completion.create_completion(request, raw_request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(raw_request: Request) -> Response:
        request = await parse_body(raw_request, ChatCompletionRequest)
        return await _unless_disconnected(chat.create_chat_completion(request, raw_request))

    @app.post("/tokenize")
    async def tokenize(raw_request: Request) -> Response:
        request = await parse_body(raw_request, TokenizeRequest)
        completion.resolve_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise invalid_request("give exactly one of 'prompt' and 'messages'", "prompt")
        if request.messages is not None:
            token_ids = await chat.render(request.messages, request.add_generation_prompt)
        else:
            token_ids = await completion.encode(request.prompt, request.add_special_tokens)
        return json_response(
            TokenizeResponse(
                count=len(token_ids), max_model_len=model_config.max_model_len, tokens=token_ids
            )
        )

    @app.post("/detokenize")
    async def detokenize(raw_request: Request) -> Response:
        request = await parse_body(raw_request, DetokenizeRequest)
        completion.resolve_model(request.model)
        tokenizer = completion.require_tokenizer("detokenize", "tokens")
        vocab_size = model_config.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab_size]
        if bad:
            raise invalid_request(f"token id {bad[0]} is out of range [0, {vocab_size})", "tokens")
        return json_response(DetokenizeResponse(prompt=tokenizer.decode(request.tokens)))

    add_dashboard_routes(app, EngineSource(engine))  # GET /dashboard, /dashboard/data
    return app


async def parse_body(raw_request: Request, model: type[M]) -> M:
    """JSON body → `model`; any problem is a 400 in OpenAI's error shape."""
    body = await raw_request.body()
    try:
        data = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise invalid_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise invalid_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


async def _unless_disconnected(handler: Awaitable[Response]) -> Response:
    try:
        return await handler
    except ClientDisconnected:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


def served_model_names(args: argparse.Namespace) -> list[str]:
    """--served-model-name, else MODEL as given, else the default model's name."""
    if args.served_model_name:
        return list(args.served_model_name)
    if args.model:
        return [args.model]
    from lmserve.model.default_model import DEFAULT_MODEL_NAME

    return [DEFAULT_MODEL_NAME]


def _load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file, or the Jinja template itself."""
    if value is None or not os.path.isfile(value):
        return value
    with open(value, encoding="utf-8") as f:
        return f.read()


# ---- the request gate -----------------------------------------------------------------------
class RequestGate:
    """ASGI middleware in front of every route:
      - while the server drains (SIGTERM) or the engine is dead, new requests get 503
        (/metrics stays readable);
      - with an API key, every /v1 route needs `Authorization: Bearer <key>` (401);
      - a request body over the limit gets 413: by Content-Length before reading anything,
        or counted as chunks arrive.
    A rejected request's body is read and dropped first (up to a cap), so the client, still
    sending, gets the answer rather than a reset connection."""

    def __init__(self, app: ASGIApp, state: Any, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.state = state
        self.api_key = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._check(scope)
        if error is not None:
            await _drain_body(receive, _MAX_DRAIN_BYTES)
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, self._limit(receive), send)

    def _check(self, scope: Scope) -> OpenAIError | None:
        path = scope["path"]
        if path != "/metrics":
            if self.state.engine.is_dead:
                return engine_dead(self.state.engine.dead_error)
            if self.state.draining:
                return OpenAIError(
                    "the server is shutting down", 503, SERVICE_UNAVAILABLE, code="shutting_down"
                )
        headers = dict(scope["headers"])
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.api_key):
                return OpenAIError(
                    "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                    401,
                    AUTHENTICATION,
                    code="invalid_api_key",
                )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return _too_large(self.max_body_bytes)
        return None

    def _limit(self, receive: Receive) -> Receive:
        received = 0
        limit = self.max_body_bytes

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if message.get("more_body"):
                        await _drain_body(receive, _MAX_DRAIN_BYTES)
                    raise _too_large(limit)
            return message

        return limited_receive


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        f"the request body is larger than the server's limit of {limit} bytes",
        413,
        code="request_too_large",
    )


async def _drain_body(receive: Receive, budget: int) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body"):
            return


# ---- running it -----------------------------------------------------------------------------
class APIServer(uvicorn.Server):
    """uvicorn's Server with our main loop (the engine watchdog) and drain flag."""

    def __init__(self, config: uvicorn.Config, engine: Any, app_state: Any) -> None:
        super().__init__(config)
        self.engine = engine
        self.app_state = app_state
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.app_state.draining = True
        super().handle_exit(sig, frame)

    async def main_loop(self) -> None:
        while not await self.on_tick(0):  # counter 0: refresh the Date header every tick
            if self.engine.is_dead:
                logger.error("the engine died (%s): shutting down", self.engine.dead_error)
                self.exit_code = 1
                self.config.timeout_graceful_shutdown = ENGINE_DEAD_GRACE_S
                return
            await asyncio.sleep(TICK_S)


def run_server(
    args: argparse.Namespace,
    launcher: EngineLauncher | None = None,
    config: EngineConfig | None = None,
) -> int:
    """`lmserve serve`: returns 0 after a drain (SIGTERM/SIGINT), 1 if the engine died.
    `launcher`: an EngineCore process already started (it gets the configuration, unless it
    was launched with `config` already)."""
    logging.basicConfig(
        level=envs.LMSERVE_LOGGING_LEVEL, format="%(asctime)s %(levelname)s [%(name)s] %(message)s"
    )
    try:
        exit_code = asyncio.run(_serve(args, launcher, config))
    finally:
        if launcher is not None:
            launcher.cancel()  # the configuration never came (bad flags, a missing model)
    if exit_code != 0:
        # Leave even if some thread or child would keep the interpreter from exiting.
        timer = threading.Timer(HARD_EXIT_S, os._exit, args=(exit_code,))
        timer.daemon = True
        timer.start()
    return exit_code


async def _serve(
    args: argparse.Namespace, launcher: EngineLauncher | None, config: EngineConfig | None
) -> int:
    from lmserve.engine.arg_utils import engine_kwargs
    from lmserve.engine.async_llm import AsyncLLM
    from lmserve.metrics.prometheus import set_metrics_prefix
    from lmserve.metrics.stats import StatsRecorder

    set_metrics_prefix(getattr(args, "metrics_prefix", "lmserve"))
    if config is None:
        config = EngineConfig.from_kwargs(args.model, **engine_kwargs(args))
    logger.info("server imported, configuration ready %.2f s after launch", process_age_s())
    stats = StatsRecorder(model_name=served_model_names(args)[0])
    engine = AsyncLLM(config, stats=stats, launcher=launcher)
    logger.info("engine ready %.2f s after launch", process_age_s())
    try:
        app = build_app(engine, args)
        uvicorn_config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_access_log,
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
        server = APIServer(uvicorn_config, engine, app.state)
        freeze_startup_heap()  # the tokenizer, templates and app: full collections skip them
        # NOTE uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown so that the
        # default action (death by signal) follows. We drained on purpose and exit 0: the
        # handlers it restores, and re-raises into, are these no-ops.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        await server.serve()
        await _settle(server, app)
        return server.exit_code
    finally:
        engine.shutdown()


async def _settle(server: uvicorn.Server, app: FastAPI, timeout: float = 2.0) -> None:
    """Let requests cancelled at the end of the grace period finish their cleanup (aborting
    their engine requests) before the engine shuts down."""
    pending = set(server.server_state.tasks)
    pending |= app.state.completion.producers | app.state.chat.producers
    if pending:
        await asyncio.wait(pending, timeout=timeout)
