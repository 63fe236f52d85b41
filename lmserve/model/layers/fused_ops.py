"""Fused elementwise kernels for CUDA (Triton): RMSNorm with the residual add, rotary embedding
in place, and SiLU-and-mul. Each replaces 3–10 PyTorch kernels with one — what matters at small
batch, where a decode step is hundreds of tiny launches.

Numerics follow the PyTorch ops they replace (and so HF transformers): float32 arithmetic, cast
back to the input dtype where PyTorch casts (RMSNorm normalises in float32, casts, then scales;
the residual sum is rounded to the dtype before it is normalised). Inside one kernel the compiler
may keep float32 where PyTorch would round an intermediate to bf16 (or contract a multiply-add),
so outputs can differ from PyTorch's in the last bit; tests/model/test_fused_ops.py bounds the
relative error (float32: 1e-6, bf16: 4e-3), and GPU greedy parity with HF follows vLLM's top-5
rule.

The layers call these only for CUDA tensors with triton installed (`use_fused(x)`); the CPU keeps
the PyTorch code, which is the correctness oracle.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from lmserve.triton_utils import pdl_launch_options


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_fused(x: torch.Tensor) -> bool:
    return x.is_cuda and _triton_installed()


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_kernel(
        x_ptr,  # [num_rows, num_heads, n] (num_heads = 1 for a 2-D input)
        residual_ptr,  # [num_rows, n] or unused
        out_ptr,  # [num_rows, num_heads, n], contiguous
        weight_ptr,  # [n]
        stride_x_row,
        stride_x_head,
        stride_res_row,
        num_heads,
        n,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr,  # programmatic dependent launch (lmserve.triton_utils)
    ):
        if USE_PDL:  # the previous kernel's writes are visible past this line
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0)
        row = pid // num_heads
        head = pid % num_heads
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x_off = row.to(tl.int64) * stride_x_row + head * stride_x_head + cols
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0)
        if HAS_RESIDUAL:  # x = x + residual, rounded to the dtype; it becomes the new residual
            res_off = row.to(tl.int64) * stride_res_row + cols
            r = tl.load(residual_ptr + res_off, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(residual_ptr + res_off, x, mask=mask)
        xf = x.to(tl.float32)
        variance = tl.sum(xf * xf, axis=0) / n
        y = (xf * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)  # back to the dtype
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        out = (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + pid.to(tl.int64) * n + cols, out, mask=mask)

    @triton.jit
    def _rotate_heads(base, s_tok, s_head, n_heads, token, cos, sin, HALF, BLOCK_H, BLOCK_D):
        """x * cos + rotate_half(x) * sin for every head of one token, in place."""
        heads = tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < n_heads) & (dims < HALF)
        ptr = base + token * s_tok + heads * s_head + dims
        x1 = tl.load(ptr, mask=mask, other=0.0)
        x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(ptr, (f1 * cos - f2 * sin).to(x1.dtype), mask=mask)
        tl.store(ptr + HALF, (f2 * cos + f1 * sin).to(x1.dtype), mask=mask)

    @triton.jit
    def rotary_kernel(
        q_ptr,  # [num_tokens, num_heads, head_dim], rotated in place
        k_ptr,  # [num_tokens, num_kv_heads, head_dim], rotated in place
        cos_ptr,  # [num_tokens, head_dim] (two equal halves)
        sin_ptr,  # [num_tokens, head_dim]
        stride_q_tok,
        stride_q_head,
        stride_k_tok,
        stride_k_head,
        stride_cs_tok,
        num_heads,
        num_kv_heads,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        USE_PDL: tl.constexpr,  # programmatic dependent launch (lmserve.triton_utils)
    ):
        if USE_PDL:  # the previous kernel's writes are visible past this line
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        token = tl.program_id(0).to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HALF
        cos = tl.load(cos_ptr + token * stride_cs_tok + dims, mask=dim_ok, other=0.0)
        sin = tl.load(sin_ptr + token * stride_cs_tok + dims, mask=dim_ok, other=0.0)
        cos, sin = cos.to(tl.float32)[None, :], sin.to(tl.float32)[None, :]
        _rotate_heads(q_ptr, stride_q_tok, stride_q_head, num_heads, token, cos, sin,
                      HALF, BLOCK_H, BLOCK_D)  # fmt: skip
        _rotate_heads(k_ptr, stride_k_tok, stride_k_head, num_kv_heads, token, cos, sin,
                      HALF, BLOCK_H, BLOCK_D)  # fmt: skip

    @triton.jit
    def silu_and_mul_kernel(
        gate_up_ptr,  # [num_tokens, 2 * d]
        out_ptr,  # [num_tokens, d]
        stride_in,
        d,
        BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr,  # programmatic dependent launch (lmserve.triton_utils)
    ):
        if USE_PDL:  # the previous kernel's writes are visible past this line
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        gate = tl.load(gate_up_ptr + token * stride_in + cols, mask=mask, other=0.0)
        up = tl.load(gate_up_ptr + token * stride_in + d + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # silu, rounded like F.silu
        out = act.to(tl.float32) * up.to(tl.float32)
        tl.store(out_ptr + token * d + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    return rms_norm_kernel, rotary_kernel, silu_and_mul_kernel


def rms_norm(
    x: torch.Tensor,  # [num_tokens, n] or [num_tokens, num_heads, n]; last dim contiguous
    weight: torch.Tensor,  # [n]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, n] contiguous; updated in place
) -> torch.Tensor:  # contiguous, x's shape
    """weight * normalize(x) — or with `residual`: residual += x, then weight * normalize(it)."""
    assert x.stride(-1) == 1 and weight.is_contiguous()
    n = x.shape[-1]
    num_rows = x.shape[0]
    num_heads = x.shape[1] if x.dim() == 3 else 1
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    if residual is not None:
        assert x.dim() == 2 and residual.shape == x.shape and residual.stride(-1) == 1
    kernel = _kernels()[0]
    block = _next_power_of_2(n)
    kernel[(num_rows * num_heads,)](
        x,
        residual if residual is not None else x,
        out,
        weight,
        x.stride(0),
        x.stride(1) if x.dim() == 3 else 0,
        residual.stride(0) if residual is not None else 0,
        num_heads,
        n,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
        **pdl_launch_options(x),
    )
    return out


def rotary_inplace(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]; may be a strided view
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, head_dim]
    sin: torch.Tensor,  # [num_tokens, head_dim]
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_heads, head_dim = query.shape
    if num_tokens == 0:
        return query, key
    assert query.stride(2) == 1 and key.stride(2) == 1 and cos.stride() == sin.stride()
    half = head_dim // 2
    _kernels()[1][(num_tokens,)](
        query,
        key,
        cos,
        sin,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        cos.stride(0),
        num_heads,
        key.shape[1],
        HALF=half,
        BLOCK_H=_next_power_of_2(max(num_heads, key.shape[1])),
        BLOCK_D=_next_power_of_2(half),
        num_warps=4,
        **pdl_launch_options(query),
    )
    return query, key


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2d] -> [num_tokens, d]
    num_tokens, two_d = gate_up.shape
    d = two_d // 2
    assert gate_up.stride(1) == 1
    out = torch.empty((num_tokens, d), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0:
        return out
    block = 1024
    _kernels()[2][(num_tokens, -(-d // block))](
        gate_up,
        out,
        gate_up.stride(0),
        d,
        BLOCK=block,
        num_warps=4,
        **pdl_launch_options(gate_up),
    )
    return out
