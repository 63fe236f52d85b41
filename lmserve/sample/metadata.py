"""What the sampler needs for one step: per-request parameters as batched tensors.

Built by the model runner from the persistent batch; row i is the i-th request that samples in
this step. Optional groups are None when no request in the batch uses them, so the common case
(plain greedy or temperature sampling) skips their work entirely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.sample.grammar import GrammarMask


@dataclass(slots=True)
class SamplingMetadata:
    temperature: torch.Tensor  # [num_reqs] float32; 0 = greedy for that row
    all_greedy: bool
    all_random: bool
    generators: dict[int, torch.Generator]  # row -> the request's own seeded generator
    # CUDA, some row random: (seed, position of the token drawn) per row, and the race runs as
    # one Triton launch keyed by them (triton_race.py) instead of one launch per generator
    # and three passes over the batch's probabilities.
    race_keys: torch.Tensor | None = None  # [2, num_reqs] int64

    # Truncation (random rows only; greedy rows ignore them). None = nobody uses it.
    top_k: torch.Tensor | None = None  # [num_reqs] int64; vocab_size = off for that row
    top_p: torch.Tensor | None = None  # [num_reqs] float32; 1.0 = off
    min_p: torch.Tensor | None = None  # [num_reqs] float32; 0.0 = off

    # Penalties (applied to greedy and random rows alike). None = nobody uses them.
    presence_penalties: torch.Tensor | None = None  # [num_reqs] float32; 0 = off
    frequency_penalties: torch.Tensor | None = None  # [num_reqs] float32; 0 = off
    repetition_penalties: torch.Tensor | None = None  # [num_reqs] float32; 1 = off
    # Token ids padded with vocab_size (an id that never occurs); set with the penalties.
    prompt_token_ids: torch.Tensor | None = None  # [num_reqs, max_prompt_len] int64
    output_token_ids: torch.Tensor | None = None  # [num_reqs, max_output_len] int64

    # Additive logit bias as sparse coordinates. None = nobody uses it.
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    #            (rows [k] int64, token ids [k] int64, bias values [k] float32)

    # Tokens banned this step (EOS and stop ids of rows still below min_tokens), as coordinates.
    # (rows [k], token ids [k], -inf [k] float32): the logits set to -inf
    banned_tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # Logprobs: the largest `logprobs` asked for in the batch; None = nobody asked.
    max_num_logprobs: int | None = None

    # Structured outputs: the allowed tokens of constrained rows. None = nobody is constrained.
    grammar_mask: GrammarMask | None = None
