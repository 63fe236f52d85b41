"""The fused CUDA kernels (RMSNorm + residual, rotary in place, SiLU-and-mul) against the
PyTorch code they replace, run on the same GPU tensors. Skipped without CUDA and triton."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from lmserve.model.layers.fused_ops import rms_norm, rotary_inplace, silu_and_mul  # noqa: E402
from lmserve.model.layers.norm import RMSNorm  # noqa: E402
from lmserve.model.layers.rotary import rotate_half  # noqa: E402

# Relative error ‖fused − torch‖ / ‖torch‖. float32 differs only by reduction order; bf16 may
# differ by one rounding where the float32 sums differ in their last bits.
MAX_REL = {torch.float32: 1e-6, torch.bfloat16: 4e-3}
DTYPES = [torch.float32, torch.bfloat16]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 896, 4096, 8192])
def test_rms_norm_with_residual_matches_torch(dtype, hidden):
    torch.manual_seed(0)
    norm = RMSNorm(hidden, 1e-5).cuda().to(dtype)
    norm.weight.data.normal_()
    x = torch.randn(37, hidden, device="cuda", dtype=dtype)
    residual = torch.randn(37, hidden, device="cuda", dtype=dtype)
    expected_sum = x + residual
    expected = norm._norm(expected_sum)
    out, new_residual = norm(x, residual.clone())  # the CUDA path: fused
    assert torch.equal(new_residual, expected_sum)  # one rounded add, as PyTorch does it
    assert _rel(out, expected) <= MAX_REL[dtype]
    assert _rel(rms_norm(x, norm.weight, 1e-5), norm._norm(x)) <= MAX_REL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_over_heads_of_a_strided_view_matches_torch(dtype):
    """Qwen3's QK-norm: per head, on q viewed out of the fused qkv output."""
    torch.manual_seed(0)
    qkv = torch.randn(9, 3 * 8 * 128, device="cuda", dtype=dtype)
    q = qkv[:, : 8 * 128].view(9, 8, 128)  # strided: rows are 3*8*128 apart
    norm = RMSNorm(128, 1e-6).cuda().to(dtype)
    norm.weight.data.normal_()
    assert _rel(norm(q), norm._norm(q)) <= MAX_REL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 128), (14, 2, 64), (4, 4, 32)])
def test_rotary_in_place_matches_torch(dtype, heads, kv_heads, head_dim):
    """The kernel keeps float32 between its products and the sum (PyTorch rounds each product to
    the dtype), so results can differ in the last bit: compared by relative error."""
    torch.manual_seed(0)
    n = 23
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    q = qkv[:, : heads * head_dim].view(n, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(n, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    angles = torch.rand(n, head_dim // 2, device="cuda") * 100
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    c, s = cos[:, None, :], sin[:, None, :]
    q_ref, k_ref = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
    rotary_inplace(q, k, cos, sin)
    assert _rel(q, q_ref) <= MAX_REL[dtype] and _rel(k, k_ref) <= MAX_REL[dtype]
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [512, 4864, 14336])
def test_silu_and_mul_matches_torch(dtype, d):
    torch.manual_seed(0)
    gate_up = torch.randn(11, 2 * d, device="cuda", dtype=dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    out = silu_and_mul(gate_up)
    assert _rel(out, expected) <= MAX_REL[dtype]
