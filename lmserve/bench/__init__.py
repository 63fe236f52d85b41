"""`lmserve bench`: throughput, latency and online-serving benchmarks (vLLM's `vllm bench`).

    lmserve bench throughput [MODEL]   offline, in-process LLM (or HF transformers) on a dataset
    lmserve bench latency [MODEL]      one fixed batch, end-to-end and per-step latency
    lmserve bench serve --base-url URL online client for any OpenAI-compatible server

Benchmarks print a table and can write JSON; they never assert on time.
"""


class BenchError(Exception):
    """A benchmark cannot run (unreachable server, non-OpenAI answers, bad flags): the command
    prints the message on one line and exits with code 2."""
