"""Batched sampling: one pass over the batch, per-request parameters as tensors.

Random sampling uses the exponential-race trick: argmax(p / E) with E ~ Exp(1) draws from p,
needs no cumulative sum and no device sync, and lets each seeded request draw its noise from its
own generator, so the same seed gives the same output whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SamplingMetadata:
    temperature: torch.Tensor  # [num_reqs] float32; 0 rows are greedy
    all_greedy: bool
    all_random: bool
    generators: dict[int, torch.Generator]  # batch row -> its seeded generator


class Sampler(torch.nn.Module):
    def forward(
        self,
        logits: torch.Tensor,  # [num_reqs, vocab_size] float32
        metadata: SamplingMetadata,
    ) -> torch.Tensor:  # [num_reqs] int64
        greedy = logits.argmax(dim=-1)
        if metadata.all_greedy:
            return greedy
        # Greedy rows get temperature 1 here; their random draw is discarded below.
        temperature = torch.where(metadata.temperature > 0, metadata.temperature, 1.0)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        sampled = self._random_sample(probs, metadata.generators)
        if metadata.all_random:
            return sampled
        return torch.where(metadata.temperature > 0, sampled, greedy)

    @staticmethod
    def _random_sample(
        probs: torch.Tensor,  # [num_reqs, vocab_size]
        generators: dict[int, torch.Generator],
    ) -> torch.Tensor:  # [num_reqs]
        noise = torch.empty_like(probs).exponential_()
        for row, generator in generators.items():
            noise[row].exponential_(generator=generator)
        return probs.div_(noise).argmax(dim=-1)
