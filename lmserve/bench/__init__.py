"""`lmserve bench`: throughput, latency and online-serving benchmarks (vLLM's `vllm bench`).

    lmserve bench throughput [MODEL]   offline, in-process LLM (or HF transformers) on a dataset
    lmserve bench latency [MODEL]      one fixed batch, end-to-end and per-step latency
    lmserve bench serve --base-url URL online client for any OpenAI-compatible server

Benchmarks print a table and can write JSON; they never assert on time.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request


class BenchError(Exception):
    """A benchmark cannot run (unreachable server, non-OpenAI answers, bad flags): the command
    prints the message on one line and exits with code 2."""


def http_get(url: str, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    """(status, body text) of a GET, whatever the status; OSError when no answer came
    (refused, unreachable, timed out, or the peer spoke no HTTP)."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:  # an answer with an error status
        return e.code, e.read().decode("utf-8", "replace")
    except urllib.error.URLError as e:  # no answer: the cause is the OSError inside
        raise e.reason if isinstance(e.reason, OSError) else OSError(str(e.reason)) from None
    except http.client.HTTPException as e:
        raise OSError(f"not an HTTP answer: {type(e).__name__}: {e}") from None
