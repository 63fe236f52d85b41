"""Performance profiles: how long one engine step takes, and the engine's limits.

    step_time = base_s + per_token_s * prefill_tokens + per_row_s * decode_rows
                + per_context_token_s * context_tokens + per_attention_pair_s * attention_pairs

    prefill_tokens   prompt tokens scheduled in the step (chunks of prompts being computed)
    decode_rows      requests in the step that compute one token to sample the next (decodes)
    context_tokens   KV tokens the step's rows attend to (each row's length after the step)
    attention_pairs  (query, key) pairs of the step's prompt chunks: a chunk of n tokens after
                     c computed ones has n * (c + (n + 1) / 2). Prefill attention grows with
                     the square of the prompt, and a short question after a long cached
                     history still attends to all of it; the linear terms miss both.

A linear model in the quantities the scheduler controls: what its token budget trades (prompt
tokens against decode rows) and what grows with a conversation's history. Prompt tokens and
decode rows have separate costs because they do on a GPU: a prefill is compute-bound (~28 us a
token for Llama-3-8B on an H100), while a decode row adds little to a step that must read every
weight anyway.
Each coefficient carries the measurement it came from (`sources`), so a profile can be checked.

`fit_profile` fits it, non-negative least squares on relative error, from
  - `lmserve bench latency --output-json` results: each gives a prefill time for
    `batch_size x input_len` prompt tokens and a decode step at `batch_size` rows and
    ~`input_len + output_len / 2` context (the engine alone, in-process); or
  - `lmserve bench serve --save-result` results of the random dataset at a fixed
    --max-concurrency: the median ITL is a decode step of that many rows, and at concurrency 1
    the median TTFT is one prefill plus the per-request overhead of serving (HTTP, tokenizing,
    streaming back), which the fit then estimates as `request_overhead_s`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

BUILTIN_PROFILES = ("cpu-tiny-llama", "h100-llama3-8b")


@dataclass(frozen=True)
class StepProfile:
    """One engine's step-time model and scheduler limits (lmserve/core/scheduler.py's)."""

    name: str
    base_s: float
    per_token_s: float
    per_row_s: float
    per_context_token_s: float
    per_attention_pair_s: float = 0.0
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    num_gpu_blocks: int = 4096
    block_size: int = 16
    hash_algo: str = "sha256"
    # Latency a client sees outside engine steps: its request reaching the engine (HTTP, the
    # router's hop, tokenization) and the first token coming back (detokenize, SSE).
    request_overhead_s: float = 0.0
    cold_start_s: float = 30.0  # pod created -> serving (the measured process start -> first token)
    # Engines sharing a host's CPU cores: a step runs slower by busy engines / cores when more
    # engines step at once than there are cores. None: no sharing (one GPU each; or a profile
    # calibrated on the shared host itself, whose coefficients include it).
    host_cores: float | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def step_time(
        self, prefill_tokens: int, decode_rows: int, context_tokens: int, attention_pairs: float = 0
    ) -> float:
        return (
            self.base_s
            + self.per_token_s * prefill_tokens
            + self.per_row_s * decode_rows
            + self.per_context_token_s * context_tokens
            + self.per_attention_pair_s * attention_pairs
        )

    def with_overrides(self, **changes: Any) -> StepProfile:
        values = asdict(self)
        values.update({k: v for k, v in changes.items() if v is not None})
        return StepProfile(**values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def load_profile(name_or_path: str) -> StepProfile:
    """A built-in profile by name (BUILTIN_PROFILES) or a profile JSON file."""
    if name_or_path in BUILTIN_PROFILES:
        text = resources.files("lmserve.sim").joinpath(f"profiles/{name_or_path}.json").read_text()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(
                f"profile {name_or_path!r}: not a file nor one of {', '.join(BUILTIN_PROFILES)}"
            )
        text = path.read_text()
    data = json.loads(text)
    known = StepProfile.__dataclass_fields__
    return StepProfile(**{k: v for k, v in data.items() if k in known})


# ---- fitting -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Observation:
    """One measured step (or run of identical steps): its features and its mean time."""

    prefill_tokens: float
    decode_rows: float
    context_tokens: float
    seconds: float
    source: str
    overhead: float = 0.0  # 1 when the time includes the per-request overhead (a served TTFT)
    attention_pairs: float = 0.0


def prefill_pairs(new_tokens: float, computed: float = 0.0) -> float:
    """(query, key) pairs of a prompt chunk of `new_tokens` after `computed` tokens (causal)."""
    return new_tokens * (computed + (new_tokens + 1) / 2)


def observations_from_latency_result(result: dict[str, Any], source: str) -> list[Observation]:
    """A `lmserve bench latency --output-json` result: the prefill (time to every first token,
    split into the steps the token budget allows) and the mean decode step."""
    batch, n_in, n_out = result["batch_size"], result["input_len"], result["output_len"]
    budget = result.get("max_num_batched_tokens") or 8192
    prompt_tokens = batch * n_in
    steps = max(1, math.ceil(prompt_tokens / budget))
    per_step_tokens = prompt_tokens / steps
    pairs = batch * prefill_pairs(n_in) / steps
    found = [
        Observation(
            per_step_tokens, 0, per_step_tokens, result["avg_ttft"] / steps, source,
            attention_pairs=pairs,
        )
    ]  # fmt: skip
    if n_out > 1 and result.get("avg_decode_step_latency"):
        context = batch * (n_in + n_out / 2)
        found.append(Observation(0, batch, context, result["avg_decode_step_latency"], source))
    return found


def observations_from_serve_result(
    result: dict[str, Any], source: str, engines: int = 1
) -> list[Observation]:
    """A `lmserve bench serve --save-result` result of the random dataset at a fixed
    concurrency c (--max-concurrency c, --request-rate inf, --ignore-eos), against one engine
    or a round-robin router over `engines`: the median ITL is a decode step of c / engines rows
    (context: prompt + half the output each); with c = 1 the median TTFT is the request
    overhead plus one uncached prefill of the prompt."""
    c = result.get("max_concurrency") or 0
    done = result.get("completed") or 0
    if result.get("dataset_name") != "random" or c < 1 or done < 1:
        raise ValueError(
            f"{source}: calibrate uses `bench serve` results of --dataset-name random with "
            "--max-concurrency"
        )
    n_in = result["total_input_tokens"] / done
    n_out = result["total_output_tokens"] / done
    rows = max(1.0, c / engines)
    found = [
        Observation(0, rows, rows * (n_in + n_out / 2), result["median_itl_ms"] / 1000, source)
    ]
    if c == 1:
        ttft = result["median_ttft_ms"] / 1000
        found.append(Observation(n_in, 0, n_in, ttft, source, 1.0, prefill_pairs(n_in)))
    return found


def observations_from_result(
    result: dict[str, Any], source: str, engines: int = 1
) -> list[Observation]:
    if "avg_decode_step_latency" in result:
        return observations_from_latency_result(result, source)
    return observations_from_serve_result(result, source, engines)


def fit_coefficients(observations: list[Observation]) -> tuple[np.ndarray, float]:
    """(base, per_token, per_row, per_context, request_overhead, per_attention_pair) >= 0
    minimizing the relative squared error, and the fit's mean absolute relative error.
    Non-negativity by active-set elimination: a negative coefficient is dropped (set to 0) and
    the rest refitted. The pair term is fitted only when the prompts measured differ enough in
    length to tell it from the per-token one (longest >= 4x the shortest prompt)."""
    x = np.array(
        [
            [1.0, o.prefill_tokens, o.decode_rows, o.context_tokens, o.overhead, o.attention_pairs]
            for o in observations
        ]
    )
    y = np.array([o.seconds for o in observations])
    w = 1.0 / y  # relative error: a 5 ms step matters as much as a 500 ms prefill
    active = (
        [0, 1, 2, 3]
        + ([4] if x[:, 4].any() else [])
        + ([5] if _pairs_identifiable(observations) else [])
    )
    coef = np.zeros(6)
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    error = float(np.mean(np.abs(x @ coef - y) / y))
    return coef, error


def _pairs_identifiable(observations: list[Observation]) -> bool:
    # pairs per prompt token: about half a prompt's length (a batch of equal prompts included)
    lengths = [o.attention_pairs / o.prefill_tokens for o in observations if o.attention_pairs]
    return len(lengths) >= 2 and max(lengths) >= 4 * min(lengths)


def fit_profile(
    results: list[tuple[str, dict[str, Any]]], name: str, engines: int = 1, **limits: Any
) -> StepProfile:
    """A profile fitted to `lmserve bench latency` or `bench serve` results [(source name,
    result JSON)]; `engines`: the serve results went through a round-robin router to that
    many engines."""
    observations = [o for src, r in results for o in observations_from_result(r, src, engines)]
    if len(observations) < 4:
        raise ValueError(
            f"{len(observations)} observations: give `bench latency` results (a prefill and a "
            "decode step each) or `bench serve` random-dataset results at several "
            "--max-concurrency values, including 1, with different lengths"
        )
    coef, error = fit_coefficients(observations)
    files = ", ".join(sorted({o.source for o in observations}))
    how = f"least-squares fit (relative error {100 * error:.1f}% mean) to {files}"
    return StepProfile(
        name=name,
        base_s=float(coef[0]),
        per_token_s=float(coef[1]),
        per_row_s=float(coef[2]),
        per_context_token_s=float(coef[3]),
        request_overhead_s=float(coef[4]),
        per_attention_pair_s=float(coef[5]),
        sources={
            k: how
            for k in ("base_s", "per_token_s", "per_row_s", "per_context_token_s")
            + (("request_overhead_s",) if coef[4] else ())
            + (("per_attention_pair_s",) if coef[5] else ())
        },
        **limits,
    )
