"""Weights kept quantized in memory on the CPU, multiplied by PyTorch's weight-packed kernels.

    Int4Weight   4-bit codes in groups of 32 along K with a scale and a zero per group:
                 w = (code - 8) * scale + zero. GGUF Q4_0, Q4_1 and Q4_K map onto it exactly
                 (gguf_loader.gguf_int4_codes); kernel: aten._weight_int4pack_mm_for_cpu
    Int8Weight   8-bit codes with a scale per group of 32 along K: w = code * scale. GGUF Q8_0
                 exactly; other types (Q6_K, ...) and `--quantization int8` of float
                 checkpoints requantized; multiplied as two 4-bit halves by the same kernel

Why: batch-1 decode reads every weight once per token, so its time is the weight bytes over the
memory bandwidth. The default model's weights are ~540 MB as float32 and ~75 MB packed.

The kernel runs fast only with bfloat16 activations and bfloat16 scales (float32 activations
take a slow path, 10-25x slower on an AVX-512 EPYC): `matmul` casts x to bfloat16 and the
result back to x's dtype. Rounding the scales to bfloat16 costs ~0.2% of each group's scale,
far below the 4-bit codes' own error; the exact path is dequantized float32
(`--quantization none --dtype float32`).
"""

from __future__ import annotations

import torch

GROUP_SIZE = 32  # GGUF's block length for Q4_0 / Q4_1, and Q4_K's sub-block length
REFINED_LOGITS = 64  # logits per row an LM head recomputes exactly (Int8Weight.logits)
_COMPUTE_DTYPE = torch.bfloat16


def packed_kernels_available() -> bool:
    """The CPU int4 kernel exists in this torch build (torch >= 2.5)."""
    ops = torch.ops.aten
    names = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    return all(hasattr(ops, name) for name in names)


class Int4Weight:
    """A [N, K] weight as 4-bit codes, packed for `_weight_int4pack_mm_for_cpu`."""

    kind = "int4"

    def __init__(
        self,
        codes: torch.Tensor,  # [N, K] integers in 0..15
        scales: torch.Tensor,  # [N, K / GROUP_SIZE]
        zeros: torch.Tensor,  # [N, K / GROUP_SIZE]: w = (code - 8) * scale + zero
    ) -> None:
        n, k = codes.shape
        if k % GROUP_SIZE or scales.shape != (n, k // GROUP_SIZE) or zeros.shape != scales.shape:
            raise ValueError(
                f"int4 weight [{n}, {k}] needs K % {GROUP_SIZE} == 0 and scales/zeros of shape "
                f"[{n}, {k // GROUP_SIZE}], got {tuple(scales.shape)} / {tuple(zeros.shape)}"
            )
        self.shape = (n, k)
        codes = codes.to(torch.int32).contiguous()
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # [K / GROUP_SIZE, N, 2]: the kernel's layout
        self.scales_and_zeros = (
            torch.stack([scales.float(), zeros.float()], dim=-1)
            .transpose(0, 1)
            .contiguous()
            .to(_COMPUTE_DTYPE)
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N] in x's dtype
        return _call_2d(self._mm, x)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] bfloat16 -> [M, N] bfloat16
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, GROUP_SIZE, self.scales_and_zeros
        )

    def dequantize(self) -> torch.Tensor:  # [N, K] float32, the values `matmul` multiplies by
        eye = torch.eye(self.shape[1], dtype=_COMPUTE_DTYPE)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, GROUP_SIZE, self.scales_and_zeros
        )  # [K, N]
        return out.float().t().contiguous()

    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes


class Int8Weight:
    """A [N, K] weight as int8 codes with a scale per group of 32 along K: w = code * scale,
    GGUF Q8_0's own layout (requantizing a dequantized Q8_0 tensor gives back its codes and
    scales exactly: each block's largest value is 127 * its scale).

    It multiplies through the int4 kernel, which is faster than torch's int8 one at batch 1
    (1.7 vs 2.3 ms for the default model's LM head on 2 EPYC cores): each code splits into a
    high and a low nibble, code = 16 * (hi - 8) + lo, so W = [W_hi | W_lo] over [x | x] with
    W_hi = (hi - 8) * 16 scale and W_lo = (lo - 8) * scale + 8 scale, exact up to the
    bfloat16 rounding of the scales. The codes stay for embedding lookups."""

    kind = "int8"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes = codes.to(torch.int8).contiguous()  # [N, K]
        self.scales = scales.float().contiguous()  # [N, K / GROUP_SIZE]
        self.shape = tuple(self.codes.shape)
        wide = self.codes.to(torch.int32)
        hi = torch.div(wide, 16, rounding_mode="floor")  # [N, K] in -8..7
        lo = wide - 16 * hi  # [N, K] in 0..15
        self.pair = Int4Weight(
            torch.cat([hi + 8, lo], dim=1),  # [N, 2K]
            torch.cat([16 * self.scales, self.scales], dim=1),
            torch.cat([torch.zeros_like(self.scales), 8 * self.scales], dim=1),
        )

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Weight:
        """Symmetric per-group quantization: scale = max |w| / 127 over each group of 32."""
        n, k = weight.shape
        groups = weight.detach().float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
        scales = groups.abs().amax(dim=-1).clamp_min(1e-30) / 127.0  # [N, K / 32]
        codes = torch.round(groups / scales[..., None]).clamp_(-127, 127)
        return cls(codes.reshape(n, k), scales)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N] in x's dtype
        return self.pair.matmul(torch.cat([x, x], dim=-1))

    def logits(self, x: torch.Tensor, refine: int = REFINED_LOGITS) -> torch.Tensor:
        """x [M, K] times the table: [M, N] float32 logits, the top `refine` of each row
        recomputed exactly in float32 from the codes. The kernel rounds its output to bfloat16,
        a step of 1/16 at a logit of 16: enough to tie the best two tokens, so greedy picks and
        logprobs would depend on that rounding. The best tokens lie within a step of the
        rounded maximum, far inside the top `refine`."""
        y = self.matmul(x).float()  # [M, N], bfloat16 precision
        top = y.topk(min(refine, y.shape[-1]), dim=-1).indices  # [M, refine]
        rows = self.codes[top].float()  # [M, refine, K]
        rows = rows * self.scales[top].repeat_interleave(GROUP_SIZE, dim=-1)
        exact = torch.einsum("mk,mrk->mr", x.float(), rows)  # [M, refine]
        return y.scatter_(-1, top, exact)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` [n] dequantized exactly: [n, K] in `dtype` (an embedding table)."""
        rows = self.codes.index_select(0, ids).float()  # [n, K]
        scales = self.scales.index_select(0, ids).repeat_interleave(GROUP_SIZE, dim=1)
        return (rows * scales).to(dtype)

    def dequantize(self) -> torch.Tensor:  # [N, K] float32
        return self.codes.float() * self.scales.repeat_interleave(GROUP_SIZE, dim=1)

    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.pair.nbytes()


PackedWeight = Int4Weight | Int8Weight


def _call_2d(mm, x: torch.Tensor) -> torch.Tensor:
    """mm on x as [M, K] bfloat16, the result back in x's shape and dtype (no op when x is
    already 2-D bfloat16: on the decode hot path every dispatched op costs microseconds)."""
    if x.dim() != 2:
        return _call_2d(mm, x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    if x.dtype == _COMPUTE_DTYPE:
        return mm(x)
    return mm(x.to(_COMPUTE_DTYPE)).to(x.dtype)


def placeholder_like(weight: torch.Tensor) -> torch.nn.Parameter:
    """A parameter of `weight`'s shape and dtype that holds one element (a zero-stride view):
    what a packed layer keeps as `.weight`, so shape checks still see [N, K] while the float
    values are freed."""
    one = torch.zeros(1, dtype=weight.dtype, device=weight.device)
    return torch.nn.Parameter(one.expand(weight.shape), requires_grad=False)
