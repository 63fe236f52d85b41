"""The keyed exponential race (lmserve/sample/triton_race.py): one launch draws every row,
token i with probability p_i, each row's draw fixed by its (seed, position) alone.

Runs on CUDA, or on the CPU through Triton's interpreter (slow per program: fewer draws there).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.interpreted import run_kernel_tests_interpreted

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
needs_kernel = pytest.mark.skipif(
    not (CUDA or INTERPRETED),
    reason="needs CUDA or TRITON_INTERPRET=1 (else the test above runs them)",
)


@pytest.mark.skipif(CUDA or INTERPRETED, reason="the kernel tests run here directly")
def test_kernel_tests_pass_in_tritons_interpreter():
    """Without CUDA: this file's kernel tests in Triton's interpreter, in a fresh process."""
    run_kernel_tests_interpreted(__file__, "5 passed")


def race(probs, seeds, positions, chunk=8):
    from lmserve.sample.triton_race import seeded_race

    keys = torch.tensor([seeds, positions], dtype=torch.int64, device=DEVICE)
    return seeded_race(probs.to(DEVICE).contiguous(), keys, chunk=chunk).cpu()


@needs_kernel
def test_each_token_is_drawn_with_its_probability_and_a_zero_one_never():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # two chunks of 8
    draws = 50_000 if CUDA else 300
    tokens = race(p.expand(draws, -1), [11] * draws, list(range(draws)))
    counts = torch.bincount(tokens, minlength=len(p)).double()
    assert counts[4:].sum() == 0
    expected = p[:4].double() * draws
    # a 5-sigma band of each binomial count
    sigma = (expected * (1 - p[:4].double())).sqrt()
    assert ((counts[:4] - expected).abs() <= 5 * sigma).all(), (counts, expected)


@needs_kernel
def test_a_rows_draw_depends_on_its_seed_position_and_probabilities_only():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(6, 40), dim=-1)
    seeds, positions = [3, 3, -5, 2**63 - 1, 0, 9], [0, 1, 7, 100, 2**40, 5]
    together = race(probs, seeds, positions)
    order = [4, 2, 0, 5, 1, 3]
    shuffled = race(probs[order], [seeds[i] for i in order], [positions[i] for i in order])
    assert shuffled.tolist() == together[order].tolist()
    alone = [race(probs[i : i + 1], [seeds[i]], [positions[i]]).item() for i in (0, 3)]
    assert alone == [together[0].item(), together[3].item()]


@needs_kernel
def test_other_positions_and_other_seeds_draw_other_noise():
    p = torch.full((64, 16), 1 / 16)  # uniform: the draw is the noise's argmin
    by_position = race(p, [1] * 64, list(range(64)))
    other_seed = race(p, [2] * 64, list(range(64)))
    assert len(set(by_position.tolist())) > 4  # not one token over and over
    assert by_position.tolist() != other_seed.tolist()
    assert race(p, [1] * 64, list(range(64))).tolist() == by_position.tolist()  # reproducible


@needs_kernel
def test_the_winner_is_found_in_any_chunk_and_ties_go_to_the_lowest_id():
    p = torch.zeros(3, 37)
    p[0, 36] = 1.0  # only the last, partial chunk holds the mass
    p[1, 3] = 1.0
    p[2, 9] = p[2, 30] = 0.5  # two tokens: each wins some draws, never a zero token
    tokens = race(p, [1, 1, 1], [0, 0, 0])
    assert tokens[:2].tolist() == [36, 3] and tokens[2].item() in (9, 30)


@needs_kernel
def test_sampler_takes_the_keyed_race_when_the_metadata_carries_keys():
    from lmserve.sample.metadata import SamplingMetadata
    from lmserve.sample.sampler import Sampler
    from lmserve.sample.triton_race import seeded_race

    torch.manual_seed(1)
    logits = torch.randn(4, 40, device=DEVICE)
    keys = torch.tensor([[5, 6, 7, 8], [10, 10, 10, 10]], device=DEVICE)
    temperature = torch.tensor([1.0, 0.0, 0.7, 1.0], device=DEVICE)
    metadata = SamplingMetadata(temperature, False, False, {}, race_keys=keys)
    sampled = Sampler().sample(logits, metadata).cpu()
    scaled = logits / torch.tensor([1.0, 1.0, 0.7, 1.0], device=DEVICE)[:, None]
    expected = seeded_race(scaled.softmax(-1), keys).cpu()
    assert sampled[[0, 2, 3]].tolist() == expected[[0, 2, 3]].tolist()
    assert sampled[1].item() == logits[1].argmax().item()  # the greedy row


@pytest.mark.skipif(not CUDA, reason="the engine takes the keyed race on CUDA only")
def test_engine_on_cuda_samples_a_seeded_request_alike_alone_and_in_a_crowd_and_twins_apart(
    tiny_model_dir, monkeypatch
):
    from lmserve import LLM, SamplingParams

    monkeypatch.setenv("LMSERVE_ENABLE_MULTIPROCESSING", "0")
    llm = LLM(tiny_model_dir("llama"), device="cuda", dtype="float32", max_model_len=256)
    runner = llm.llm_engine.engine_core.engine_core.executor.worker.model_runner
    assert runner.keyed_race
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    others = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    prompt = {"prompt_token_ids": [10, 11, 12]}
    alone = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids
    crowd = llm.generate(
        [{"prompt_token_ids": [40] * 30}, prompt, {"prompt_token_ids": [7, 8]}],
        [others, seeded, others],
        use_tqdm=False,
    )
    assert crowd[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, seed=99, max_tokens=12, ignore_eos=True)
    assert llm.generate(prompt, other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone
    twins = llm.generate([prompt, prompt], [others, others], use_tqdm=False)  # fresh keys each
    assert twins[0].outputs[0].token_ids != twins[1].outputs[0].token_ids
    llm.shutdown()
