"""Weights kept packed on the CPU (lmserve/model/layers/quantization.py, lmserve/model/quantize.py):
each format against dequantized float32, a packed model against its float twin, the vLLM top-5
rule for the default model, and the settings that choose the path."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lmserve.config import ConfigError, EngineConfig
from lmserve.model.gguf_loader import dequantize_tensor, gguf_int4_codes
from lmserve.model.layers.embedding import LMHead, VocabEmbedding
from lmserve.model.layers.linear import _Linear
from lmserve.model.layers.quantization import GROUP_SIZE, Int4Weight, Int8Weight
from lmserve.model.loader import load_model
from lmserve.model.quantize import quantize_model
from lmserve.worker.cpu_threads import CpuThreadTuner
from tests.model.test_gguf import random_k_quant_blocks, tiny_gguf  # noqa: F401 (fixture)

Q = gguf.GGMLQuantizationType


class _Tensor:
    """What gguf_int4_codes reads of a GGUFReader tensor."""

    def __init__(self, qtype, data: np.ndarray) -> None:
        self.name, self.tensor_type, self.data = "blk.0.ffn_up.weight", qtype, data


def _quantized(qtype, rows: int, cols: int, seed: int = 0) -> _Tensor:
    rng = np.random.default_rng(seed)
    if qtype == Q.Q4_K:  # gguf cannot quantize K-quants: random blocks with sane scales
        return _Tensor(qtype, random_k_quant_blocks(rows, cols, qtype, rng))
    weight = rng.normal(0, 0.1, (rows, cols)).astype(np.float32)
    return _Tensor(qtype, gguf.quants.quantize(weight, qtype))


def _expand(groups: np.ndarray) -> np.ndarray:  # [N, K / 32] -> [N, K]
    return np.repeat(groups, GROUP_SIZE, axis=1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_int4_codes_reproduce_the_gguf_dequantization_exactly(qtype):
    tensor = _quantized(qtype, rows=24, cols=512)
    codes, scales, zeros = gguf_int4_codes(tensor)
    assert codes.shape == (24, 512) and codes.max() <= 15
    assert scales.shape == zeros.shape == (24, 512 // GROUP_SIZE)
    values = (codes.astype(np.float32) - 8) * _expand(scales) + _expand(zeros)
    np.testing.assert_array_equal(values, dequantize_tensor(tensor))


def test_int4_codes_refuse_other_types():
    with pytest.raises(ValueError, match="Q8_0 is not a 4-bit group type"):
        gguf_int4_codes(_quantized(Q.Q8_0, rows=4, cols=64))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_int4_weight_multiplies_like_the_dequantized_float32_weight(qtype):
    tensor = _quantized(qtype, rows=96, cols=256, seed=1)
    codes, scales, zeros = (torch.from_numpy(a) for a in gguf_int4_codes(tensor))
    weight = Int4Weight(codes, scales, zeros)
    reference = torch.from_numpy(dequantize_tensor(tensor)).double()  # [96, 256]
    # The kernel's weights: scales and zeros rounded to bfloat16, nothing else changed.
    deq = weight.dequantize().double()
    assert (deq - reference).abs().max() <= 2**-7 * reference.abs().max()
    x = torch.randn(5, 256)
    y = weight.matmul(x)  # [5, 96], float32 like x
    assert y.dtype == torch.float32 and y.shape == (5, 96)
    expected = x.double() @ reference.T
    assert (y.double() - expected).norm() / expected.norm() < 1e-2


def test_int4_weight_rejects_a_k_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="K % 32 == 0"):
        Int4Weight(torch.zeros(4, 40, dtype=torch.int32), torch.ones(4, 1), torch.zeros(4, 1))


def test_int8_groups_stay_within_half_a_step_of_the_float_weight():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.linspace(0.01, 3.0, 64)[:, None]  # rows of unlike scale
    packed = Int8Weight.from_float(w)
    step = packed.scales.repeat_interleave(GROUP_SIZE, dim=1)  # [64, 128]
    assert ((packed.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(3, 128)
    expected = x.double() @ w.double().T
    assert (packed.matmul(x).double() - expected).norm() / expected.norm() < 1e-2
    ids = torch.tensor([5, 0, 63])
    torch.testing.assert_close(packed.embed(ids, torch.float32), packed.dequantize()[ids])


def test_int8_recovers_q8_0_codes_and_scales_exactly():
    """Requantizing a dequantized Q8_0 tensor gives back its codes and scales, and the two
    4-bit halves the kernel multiplies add up to them (up to the scales' bfloat16 rounding)."""
    tensor = _quantized(Q.Q8_0, rows=16, cols=256, seed=3)
    blocks = tensor.data.reshape(16, -1, 34)  # per block: float16 scale, 32 int8 codes
    scales = blocks[..., :2].copy().view(np.float16).astype(np.float32)[..., 0]  # [16, 8]
    codes = blocks[..., 2:].copy().view(np.int8).reshape(16, 256)
    packed = Int8Weight.from_float(torch.from_numpy(dequantize_tensor(tensor)))
    np.testing.assert_array_equal(packed.codes.numpy(), codes)
    np.testing.assert_array_equal(packed.scales.numpy(), scales)
    halves = packed.pair.dequantize().double()  # [16, 512]: [W_hi | W_lo]
    whole = halves[:, :256] + halves[:, 256:]
    reference = torch.from_numpy(dequantize_tensor(tensor)).double()
    assert (whole - reference).abs().max() <= 2**-7 * reference.abs().max()


def test_lm_head_logits_are_exact_float32_for_the_best_tokens():
    """The kernel's bfloat16 output cannot tell two logits 0.01 apart at a magnitude of 16;
    `logits` recomputes the best ones exactly, so the greedy pick is the float32 one."""
    torch.manual_seed(0)
    table = torch.randn(1008, 64) * 0.5  # rows: a multiple of 16, as the kernel needs
    table[7] = table[3] * 1.0004  # a near tie between tokens 3 and 7
    packed = Int8Weight.from_float(table)
    x = table[3:4] * 4.0  # [1, 64]: tokens 3 and 7 are far ahead of the rest
    exact = x.double() @ packed.dequantize().double().T  # [1, 1008]
    logits = packed.logits(x)
    assert logits.dtype == torch.float32
    best = exact.topk(64).indices[0]
    torch.testing.assert_close(logits[0, best].double(), exact[0, best], rtol=1e-6, atol=1e-5)
    assert logits.argmax().item() == exact.argmax().item()
    assert (logits - exact).abs().max() <= 2**-7 * exact.abs().max()  # the rest: bfloat16


def _float_and_packed(gguf_path: str, folder: str, method: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    float_model = load_model(config, folder, torch.float32, "cpu")
    packed_model = load_model(config, folder, torch.float32, "cpu")
    summary = quantize_model(packed_model, method, folder)
    return float_model, packed_model, summary


def _linears(model) -> dict[str, _Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _Linear)}


@pytest.mark.parametrize(
    "variant, int4_layers",
    [
        ("Q4_1+Q8_0-embedding", 4),  # the default model's mix: every linear layer 4-bit
        ("Q4_0", 4),
        ("Q4_K+Q6_K", 2),  # q/k/v has a Q6_K part, down is Q6_K: o and gate/up stay 4-bit
    ],
)
def test_packed_layers_hold_the_gguf_weights_in_the_float_models_places(
    tiny_gguf,  # noqa: F811
    variant,
    int4_layers,
):
    """Every packed layer multiplies by the weight the float model loaded into the same place
    (fused q/k/v and gate/up, llama.cpp's q/k row order undone), and keeps no float copy."""
    path, folder, _ = tiny_gguf(variant)
    float_model, packed_model, summary = _float_and_packed(path, folder, "gguf")
    float_linears, packed_linears = _linears(float_model), _linears(packed_model)
    layers = len(float_model.model.layers)
    assert summary["int4"] == int4_layers * layers
    assert summary["int4"] + summary["int8"] == len(packed_linears)
    for name, module in packed_linears.items():
        expected = float_linears[name].weight.detach().double()
        got = module.packed.dequantize().double()
        tolerance = 2**-7 if module.packed.kind == "int4" else 2**-7 + 1 / 254
        assert (got - expected).abs().max() <= tolerance * expected.abs().max(), name
        assert module.weight.shape == expected.shape
        assert module.weight.untyped_storage().nbytes() <= 8, f"{name} kept its float weight"
    for module in packed_model.modules():
        if isinstance(module, (VocabEmbedding, LMHead)):
            assert isinstance(module.packed, Int8Weight)
            assert module.weight.untyped_storage().nbytes() <= 8


def test_int8_quantization_packs_every_linear_layer_of_a_float_checkpoint(tiny_gguf):  # noqa: F811
    path, folder, _ = tiny_gguf("F16")
    _, packed_model, summary = _float_and_packed(path, folder, "int8")
    assert summary["int4"] == 0 and summary["int8"] == len(_linears(packed_model))


def _greedy_with_top5(llm, prompts: list[list[int]], max_tokens: int):
    from lmserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]


def assert_top5_rule(ours, reference) -> int:
    """vLLM's check for a lossy path: follow both greedy sequences to their first difference;
    there each side's token must be among the other's top 5. Returns tokens equal before it."""
    (tokens_a, logprobs_a), (tokens_b, logprobs_b) = ours, reference
    for i, (a, b) in enumerate(zip(tokens_a, tokens_b)):
        if a != b:
            assert a in logprobs_b[i], f"token {i}: {a} not in the reference's top 5"
            assert b in logprobs_a[i], f"token {i}: {b} not in our top 5"
            return i
    return min(len(tokens_a), len(tokens_b))


@pytest.mark.slow
def test_default_model_packed_greedy_keeps_the_top5_rule_against_float32(default_model):
    """The default model (Q4_1 with a Q8_0 embedding) packed vs dequantized float32 on the test
    questions. The packed path multiplies in bfloat16, so near-ties may flip: measured, the
    answers agree for their first 8, 16 and 14 tokens, and the top-5 rule holds there."""
    from lmserve import LLM
    from tests.model.test_gguf import QUESTIONS, chat_prompt_ids

    float_llm = LLM(
        device="cpu", dtype="float32", quantization="none", cpu_kvcache_space_gib=0.25,
        max_model_len=1024,
    )  # fmt: skip
    tokenizer = float_llm.get_tokenizer()
    prompts = [chat_prompt_ids(tokenizer, q) for q in QUESTIONS]
    reference = _greedy_with_top5(float_llm, prompts, max_tokens=32)
    float_llm.shutdown()
    packed_llm = LLM(
        device="cpu", cpu_kvcache_space_gib=0.25, max_model_len=1024
    )  # auto: packed for a GGUF
    assert packed_llm.config.model_config.quantization == "gguf"
    ours = _greedy_with_top5(packed_llm, prompts, max_tokens=32)
    packed_llm.shutdown()
    agreed = [assert_top5_rule(a, b) for a, b in zip(ours, reference)]
    assert min(agreed) >= 4, agreed  # a wrong weight would differ from the first tokens


def _engine_config(model: str, **kwargs) -> EngineConfig:
    return EngineConfig.from_kwargs(model, **kwargs)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A config of a .gguf converts it into LMSERVE_CACHE_DIR: a temporary one, not the user's."""
    monkeypatch.setenv("LMSERVE_CACHE_DIR", str(tmp_path / "cache"))


def test_quantization_auto_packs_a_gguf_model_on_the_cpu_only(tiny_gguf, own_cache):  # noqa: F811
    path, folder, _ = tiny_gguf("Q4_0")
    assert _engine_config(path, device="cpu").model_config.quantization == "gguf"
    assert _engine_config(folder, device="cpu").model_config.quantization == "none"
    dummy = _engine_config(path, device="cpu", load_format="dummy")
    assert dummy.model_config.quantization == "none"


def test_quantization_settings_that_cannot_run_fail_clearly(tiny_gguf, own_cache):  # noqa: F811
    path, folder, _ = tiny_gguf("Q4_0")
    with pytest.raises(ConfigError, match="quantization.*must be one of"):
        _engine_config(path, device="cpu", quantization="awq")
    with pytest.raises(ConfigError, match="needs a .gguf model"):
        _engine_config(folder, device="cpu", quantization="gguf")
    assert (
        _engine_config(folder, device="cpu", quantization="int8").model_config.quantization
        == "int8"
    )


def _run(tuner: CpuThreadTuner, seconds: dict[int, float], steps: int) -> list[int]:
    """`steps` small steps, each taking seconds[threads]; the thread counts used."""
    used = []
    for _ in range(steps):
        threads = tuner.threads_for_step(small=True)
        used.append(threads)
        tuner.record(threads, seconds[threads], small=True)
    return used


def test_thread_tuner_keeps_the_faster_count_and_probes_again_later():
    tuner = CpuThreadTuner(max_threads=4, explore_every=10, block_steps=2)
    one_wins = {4: 0.050, 1: 0.020}  # a machine where one thread wins (a busy neighbour)
    assert _run(tuner, one_wins, 8) == [4, 4, 1, 1, 4, 4, 1, 1]  # blocks, twice
    assert tuner.best == 1 and not tuner.probing
    assert tuner.threads_for_step(small=False) == 1  # big steps use the best, never probe
    assert _run(tuner, one_wins, 10) == [1] * 10
    four_wins = {4: 0.010, 1: 0.020}  # the neighbour left
    assert _run(tuner, four_wins, 8) == [4, 4, 1, 1, 4, 4, 1, 1]
    assert tuner.best == 4


def test_thread_tuner_does_not_count_the_first_step_after_a_switch():
    tuner = CpuThreadTuner(max_threads=2, block_steps=2)
    for threads, timed in [(2, False), (2, True), (1, False), (1, True)] * 2:
        assert tuner.threads_for_step(small=True) == threads
        # untimed steps look slow (waking threads); only the timed ones may decide
        tuner.record(threads, 1.0 if not timed else {2: 0.01, 1: 0.02}[threads], small=True)
    assert tuner.best == 2


def test_thread_tuner_with_one_core_never_probes():
    tuner = CpuThreadTuner(max_threads=1)
    assert tuner.threads_for_step(small=True) == 1 and tuner.candidates == [1]


@pytest.mark.parametrize(
    "value, error",
    [("many", "must be 'auto' or an integer"), ("0", "must be >= 1")],
)
def test_cpu_threads_setting_rejects_bad_values(monkeypatch, value, error):
    from lmserve.worker.worker import _make_thread_tuner

    monkeypatch.setenv("LMSERVE_CPU_THREADS", value)
    with pytest.raises(ValueError, match=error):
        _make_thread_tuner()


def test_cpu_threads_setting_fixes_the_count_or_tunes(monkeypatch):
    from lmserve.worker.worker import _make_thread_tuner

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LMSERVE_CPU_THREADS", "1")
        assert _make_thread_tuner() is None and torch.get_num_threads() == 1
        monkeypatch.setenv("LMSERVE_CPU_THREADS", "auto")
        assert isinstance(_make_thread_tuner(), CpuThreadTuner)
    finally:
        torch.set_num_threads(before)
