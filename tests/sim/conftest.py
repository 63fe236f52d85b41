"""Simulator fixtures: a small step profile with round numbers, and a cluster runner."""

from __future__ import annotations

import pytest

from lmserve.sim.cluster import Cluster, SimConfig
from lmserve.sim.profile import StepProfile
from lmserve.sim.workload import WorkloadSpec


@pytest.fixture
def profile() -> StepProfile:
    """10 ms a step, +1 ms per 100 prompt tokens, +0.1 ms a decode row, no context cost."""
    return StepProfile("test", base_s=0.010, per_token_s=1e-5, per_row_s=1e-4,
                       per_context_token_s=0.0, max_num_batched_tokens=512, max_num_seqs=16,
                       num_gpu_blocks=256, request_overhead_s=0.0, cold_start_s=20.0)  # fmt: skip


def run_cluster(profile: StepProfile, spec: WorkloadSpec, logic: str = "roundrobin",
                replicas: int = 4, **config) -> Cluster:  # fmt: skip
    return Cluster(SimConfig(logic, replicas=replicas, **config), profile, spec).run()


def multi_round(**overrides) -> WorkloadSpec:
    values = dict(request_rate=4.0, num_users=24, num_rounds=3, system_prompt_len=128,
                  num_system_prompts=4, question_len=32, answer_len=16, vocab_size=2048, seed=3)  # fmt: skip
    values.update(overrides)
    return WorkloadSpec("multi-round-qa", **values)
