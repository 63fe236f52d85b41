"""`lmserve router` flags and the RouterConfig they become (tests build the config directly)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from lmserve.router.routing import ROUTING_LOGICS


@dataclass(frozen=True)
class RouterConfig:
    backends: tuple[str, ...] = ()  # static discovery; empty with --k8s-namespace
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

    @property
    def chunk_size(self) -> int:
        if self.prefix_chunk_size is not None:
            return self.prefix_chunk_size
        return 16 if self.prefix_tokenizer else 128

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RouterConfig:
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values["backends"] = tuple(u for u in (args.backends or "").split(",") if u.strip())
        return cls(**values)


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
    parser.add_argument("--access-log", action="store_true", help="log a line per request")
