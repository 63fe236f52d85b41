"""Every LMSERVE_* environment variable, typed and documented, in one place.

Read them through this module (`from lmserve import envs; envs.LMSERVE_CACHE_DIR`) so each is
parsed the same way everywhere; values are read when accessed, not at import.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def _bool(name: str, default: bool) -> Callable[[], bool]:
    return lambda: (
        os.environ.get(name, "1" if default else "0").strip().lower() in ("1", "true", "yes")
    )


def _path(name: str, default: str) -> Callable[[], str]:
    return lambda: os.path.expanduser(os.environ.get(name, default))


ENVIRONMENT_VARIABLES: dict[str, tuple[Callable[[], Any], str]] = {
    "LMSERVE_CACHE_DIR": (
        _path(
            "LMSERVE_CACHE_DIR",
            os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "lmserve"),
        ),
        "where lmserve keeps converted models (GGUF → safetensors) and other caches",
    ),
    "LMSERVE_ENABLE_MULTIPROCESSING": (
        _bool("LMSERVE_ENABLE_MULTIPROCESSING", True),
        "1: LLM runs its EngineCore in a background process; 0: in this process (debugging)",
    ),
    "LMSERVE_ENGINE_READY_TIMEOUT_S": (
        lambda: float(os.environ.get("LMSERVE_ENGINE_READY_TIMEOUT_S", "600")),
        "seconds the front-end waits for the EngineCore process to load and report ready",
    ),
    "LMSERVE_RPC_BASE_PATH": (
        _path("LMSERVE_RPC_BASE_PATH", os.environ.get("TMPDIR", "/tmp")),
        "folder for the ZMQ ipc:// sockets between front-end and EngineCore",
    ),
    "LMSERVE_LOGGING_LEVEL": (
        lambda: os.environ.get("LMSERVE_LOGGING_LEVEL", "INFO").upper(),
        "log level of the lmserve logger",
    ),
    "LMSERVE_API_KEY": (
        lambda: os.environ.get("LMSERVE_API_KEY") or None,
        "`lmserve serve`: the API key /v1 routes require (as `Authorization: Bearer KEY`) "
        "when --api-key is not given; unset or empty: no key",
    ),
    "LMSERVE_ATTENTION_BACKEND": (
        lambda: os.environ.get("LMSERVE_ATTENTION_BACKEND", "").strip().lower() or None,
        "force the attention backend: 'torch' (the reference; any device) or 'triton' (CUDA); "
        "unset: triton on CUDA when triton is installed, torch otherwise",
    ),
    "LMSERVE_KEYED_RACE": (
        _bool("LMSERVE_KEYED_RACE", True),
        "CUDA with triton: random sampling draws each row's noise from (seed, position) in one "
        "launch for the batch (default); 0: torch's generators (one launch per seeded row)",
    ),
    "LMSERVE_SHIPPED_KERNELS": (
        _bool("LMSERVE_SHIPPED_KERNELS", True),
        "CUDA: before the first kernel compiles, copy the Triton kernels shipped with lmserve "
        "for this Triton version and GPU (lmserve/kernel_cache/bundles) into Triton's cache, "
        "so a fresh machine does not compile them at start-up; 0: compile them here",
    ),
    "LMSERVE_CPU_THREADS": (
        lambda: os.environ.get("LMSERVE_CPU_THREADS", "auto").strip().lower() or "auto",
        "threads of a CPU engine's steps: 'auto' (default) measures small steps with all cores "
        "and with one and keeps the faster, again every few hundred steps (on a machine shared "
        "with busy processes one thread wins); an integer fixes the count",
    ),
    "LMSERVE_HF_CONFIG_READER": (
        lambda: os.environ.get("LMSERVE_HF_CONFIG_READER", "auto").strip().lower() or "auto",
        "'auto' (default): lmserve reads a Llama/Mistral/Qwen2/Qwen3 config.json itself when it "
        "states every size, without importing transformers (seconds of start-up); "
        "'transformers': always AutoConfig",
    ),
    "LMSERVE_DISABLE_GEMV": (
        _bool("LMSERVE_DISABLE_GEMV", False),
        "1: every linear layer goes to cuBLAS (F.linear), never to the Triton GEMV for 1-8 rows",
    ),
    "LMSERVE_GRAPH_LM_HEAD": (
        _bool("LMSERVE_GRAPH_LM_HEAD", True),
        "1: decode CUDA graphs of 1-8 requests run the LM head too (no eager head launch per "
        "step); 0: the head runs eagerly after the graph, as before",
    ),
    "LMSERVE_SHARED_PREFIX_ATTENTION": (
        _bool("LMSERVE_SHARED_PREFIX_ATTENTION", True),
        "1: decode steps of 16+ requests that all start with the same KV blocks read that prefix "
        "once per tile of requests (cascade attention, Triton backend), where measured to pay; 0: once "
        "per request",
    ),
    "LMSERVE_DISABLE_PDL": (
        _bool("LMSERVE_DISABLE_PDL", False),
        "1: launch lmserve's Triton kernels without programmatic dependent launch "
        "(lmserve/triton_utils.py; it is on for compute capability >= 9.0)",
    ),
    "LMSERVE_MEDIA_FETCH_TIMEOUT_S": (
        lambda: float(os.environ.get("LMSERVE_MEDIA_FETCH_TIMEOUT_S", "5")),
        "seconds to fetch one image URL (connect to last byte) before the request is a 400",
    ),
    "LMSERVE_MAX_MEDIA_BYTES": (
        lambda: int(os.environ.get("LMSERVE_MAX_MEDIA_BYTES", str(20 * 1024 * 1024))),
        "largest image (encoded bytes) fetched from a URL; larger is a 400",
    ),
    "LMSERVE_GRAMMAR_COMPILE_TIMEOUT_S": (
        lambda: float(os.environ.get("LMSERVE_GRAMMAR_COMPILE_TIMEOUT_S", "30")),
        "seconds a structured-output request may wait for its grammar to compile before it "
        "fails with an error (other requests keep running meanwhile)",
    ),
    "LMSERVE_GRAMMAR_COMPILE_THREADS": (
        lambda: int(os.environ.get("LMSERVE_GRAMMAR_COMPILE_THREADS", "2")),
        "threads of the EngineCore's grammar-compiling pool (structured outputs)",
    ),
    "LMSERVE_GRAMMAR_BITMASK_THREADS": (
        lambda: int(
            os.environ.get("LMSERVE_GRAMMAR_BITMASK_THREADS")
            or min(8, max(1, (os.cpu_count() or 2) // 2))
        ),
        "threads that fill one step's token bitmask for the constrained requests together "
        "(structured outputs; default: half the cores, at most 8)",
    ),
}


def __getattr__(name: str) -> Any:
    if name in ENVIRONMENT_VARIABLES:
        return ENVIRONMENT_VARIABLES[name][0]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(ENVIRONMENT_VARIABLES)
