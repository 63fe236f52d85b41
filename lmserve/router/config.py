"""`lmserve router` flags and the RouterConfig they become (tests build the config directly)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from lmserve.router.routing import ROUTING_LOGICS


@dataclass(frozen=True)
class RouterConfig:
    backends: tuple[str, ...] = ()  # static discovery; empty with --k8s-namespace
    # models served even while no backend is up (scale to zero): 503 rather than 404
    models: tuple[str, ...] = ()
    routing_logic: str = "roundrobin"
    host: str = "0.0.0.0"
    port: int = 8080
    api_key: str | None = None  # clients must send it (Authorization: Bearer) on /v1 routes
    backend_api_key: str | None = None  # presented to the backends
    # session: the header first, then the top-level body field (OpenAI's own "user" field)
    session_key: str = "x-session-id"
    session_body_field: str | None = "user"
    # prefix-aware
    prefix_chunk_size: int | None = None  # None: 128 characters, or 16 tokens with a tokenizer
    prefix_tokenizer: str | None = None  # tokenizer.json (or its folder): chunk token ids
    prefix_trie_max_bytes: int = 64 * 1024 * 1024
    prefix_balance_margin: float = 4.0  # requests a prefix holder may carry beyond the least
    # kv-aware
    tokenizer: str | None = None  # model folder, tokenizer.json or .gguf: the engines' prompt ids
    chat_template: str | None = None  # as the engines' --chat-template (a file or the text)
    kv_events_endpoints: tuple[str, ...] = ()  # one per --backends entry, same order
    kv_events_replay_endpoints: tuple[str, ...] = ()
    kv_events_topic: str = ""
    k8s_kv_events_port: int | None = None  # discovered pods: their PUB socket's port
    k8s_kv_events_replay_port: int | None = None
    kv_aware_request_cost: float = 128.0  # prompt tokens of delay one request on an engine is
    kv_aware_slack: float = 256.0  # extra cost (tokens) a cached or hashed engine may carry
    kv_aware_pending_ttl: float = 5.0  # seconds dispatched blocks count as held before events
    # health and failover
    health_check_interval: float = 1.0
    health_check_timeout: float = 2.0
    health_failure_threshold: int = 2  # failed checks in a row (a refused connection: one)
    max_retries: int = 2  # other backends tried when one fails before any byte was sent
    backend_connect_timeout: float = 5.0
    backend_read_timeout: float = 600.0  # longest silence between two chunks of an answer
    # Kubernetes discovery
    k8s_namespace: str | None = None
    k8s_label_selector: str | None = None
    k8s_port: int = 8000
    k8s_api_server: str | None = None  # e.g. `kubectl proxy`'s URL; default: in-cluster/kubeconfig
    uvicorn_log_level: str = "warning"
    access_log: bool = False

    def __post_init__(self) -> None:
        if self.routing_logic not in ROUTING_LOGICS:
            raise ValueError(
                f"--routing-logic {self.routing_logic!r}: choose from {ROUTING_LOGICS}"
            )
        if not self.backends and not self.k8s_namespace:
            raise ValueError("give --backends URL[,URL...] or --k8s-namespace")
        if self.backends and self.k8s_namespace:
            raise ValueError("give either --backends or --k8s-namespace, not both")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries {self.max_retries} must be >= 0")
        if self.health_check_interval <= 0 or self.health_check_timeout <= 0:
            raise ValueError("--health-check-interval and --health-check-timeout must be > 0")
        if self.routing_logic == "kv-aware":
            self._check_kv_aware()

    def _check_kv_aware(self) -> None:
        for flag, value in (
            ("--kv-aware-request-cost", self.kv_aware_request_cost),
            ("--kv-aware-slack", self.kv_aware_slack),
            ("--kv-aware-pending-ttl", self.kv_aware_pending_ttl),
        ):
            if not value >= 0:
                raise ValueError(f"{flag} {value} must be >= 0")
        for flag, port in (
            ("--k8s-kv-events-port", self.k8s_kv_events_port),
            ("--k8s-kv-events-replay-port", self.k8s_kv_events_replay_port),
        ):
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"{flag} {port} is not a TCP port (1-65535)")
        if not self.tokenizer:
            raise ValueError(
                "--routing-logic kv-aware needs --tokenizer (the engines' model folder, its "
                "tokenizer.json or their .gguf file) to compute their block hashes"
            )
        if self.k8s_namespace and self.k8s_kv_events_port is None:
            raise ValueError(
                "--routing-logic kv-aware with --k8s-namespace needs --k8s-kv-events-port"
            )
        if self.backends and not self.kv_events_endpoints:
            raise ValueError(
                "--routing-logic kv-aware needs --kv-events-endpoints: each backend's KV events "
                "socket (its --kv-events-config endpoint), in --backends order"
            )
        from lmserve.router.kv_events import static_endpoints

        if self.backends:
            static_endpoints(
                self.backends, self.kv_events_endpoints, self.kv_events_replay_endpoints
            )

    @property
    def chunk_size(self) -> int:
        if self.prefix_chunk_size is not None:
            return self.prefix_chunk_size
        return 16 if self.prefix_tokenizer else 128

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RouterConfig:
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        for name in ("backends", "models", "kv_events_endpoints", "kv_events_replay_endpoints"):
            values[name] = _comma_list(getattr(args, name, None))
        return cls(**values)


def _comma_list(value: str | None) -> tuple[str, ...]:
    return tuple(u.strip() for u in (value or "").split(",") if u.strip())


# (flag, type, help); the dest is the RouterConfig field of the same name.
_FLAGS: list[tuple[str, type, str]] = [
    ("--routing-logic", str, f"one of {', '.join(ROUTING_LOGICS)}"),
    ("--host", str, "address to listen on"),
    ("--port", int, "port to listen on"),
    ("--api-key", str, "clients must send 'Authorization: Bearer KEY' on /v1 routes"),
    ("--backend-api-key", str, "key presented to the backends (else the client's is passed on)"),
    ("--session-key", str, "session routing: header holding the session id"),
    ("--session-body-field", str, "session routing: body field used when the header is absent"),
    ("--prefix-chunk-size", int, "prefix-aware: chunk size (default 128 chars / 16 tokens)"),
    ("--prefix-tokenizer", str, "prefix-aware: tokenizer.json or its folder (chunk token ids)"),
    ("--prefix-trie-max-bytes", int, "prefix-aware: memory cap of the trie (LRU eviction)"),
    (
        "--prefix-balance-margin",
        float,
        "prefix-aware: load a prefix holder may exceed the least by",
    ),
    ("--tokenizer", str, "kv-aware: the engines' model folder, tokenizer.json or .gguf"),
    ("--chat-template", str, "kv-aware: the engines' --chat-template, if they were given one"),
    ("--kv-events-topic", str, "kv-aware: topic the engines publish KV events on"),
    ("--k8s-kv-events-port", int, "kv-aware with discovery: the pods' KV events port"),
    ("--k8s-kv-events-replay-port", int, "kv-aware with discovery: the pods' replay port"),
    (
        "--kv-aware-request-cost",
        float,
        "kv-aware: prompt tokens of delay one request on an engine counts as",
    ),
    (
        "--kv-aware-slack",
        float,
        "kv-aware: extra cost (tokens) the engine holding a prefix may carry over the cheapest",
    ),
    (
        "--kv-aware-pending-ttl",
        float,
        "kv-aware: seconds blocks just sent count as held until events confirm",
    ),
    ("--health-check-interval", float, "seconds between health checks"),
    ("--health-check-timeout", float, "seconds a health check may take"),
    ("--health-failure-threshold", int, "failed checks in a row that mark a backend dead"),
    ("--max-retries", int, "other backends tried when one fails before answering"),
    ("--backend-connect-timeout", float, "seconds to connect to a backend"),
    ("--backend-read-timeout", float, "longest silence allowed within a backend's answer"),
    ("--k8s-namespace", str, "discover backends: ready pods in this namespace"),
    ("--k8s-label-selector", str, "discover backends: pods matching this selector"),
    ("--k8s-port", int, "discover backends: the engines' port in the pods"),
    ("--k8s-api-server", str, "Kubernetes API URL (default: in-cluster config, then kubeconfig)"),
    ("--uvicorn-log-level", str, "uvicorn's log level"),
]


def add_router_args(parser: argparse.ArgumentParser) -> None:
    defaults = RouterConfig.__dataclass_fields__
    parser.add_argument(
        "--backends", default=None, help="comma-separated engine URLs (static discovery)"
    )
    for flag, typ, help_text in _FLAGS:
        dest = flag[2:].replace("-", "_")
        default = defaults[dest].default
        parser.add_argument(
            flag, dest=dest, type=typ, default=default, help=f"{help_text} (default: {default})"
        )
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated models this cluster serves even while none of their backends is "
        "up (scaled to zero): their requests get 503 (retry), not 404, and are counted in "
        "lmserve_router:model_requests_total",
    )
    parser.add_argument(
        "--kv-events-endpoints",
        default=None,
        help="kv-aware: comma-separated KV events sockets (tcp://HOST:PORT; HOST * = the "
        "backend's host), one per --backends entry, same order",
    )
    parser.add_argument(
        "--kv-events-replay-endpoints",
        default=None,
        help="kv-aware: the engines' replay sockets, same order (recovers missed events)",
    )
    parser.add_argument("--access-log", action="store_true", help="log a line per request")
