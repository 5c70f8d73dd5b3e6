"""Triton fused bias + activation: y = act(x + bias) over [..., N], one read of x, one write of y.

Activations: "gelu_tanh" (gelu_new of GPT-2/GPT-Neo), "gelu" (erf), "relu" (OPT). The tanh form is
written as x * sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3), which needs only exp (no libdevice,
so it also runs under TRITON_INTERPRET=1) and saturates correctly for large |u|."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The kernel's ACTIVATION constexpr for each activation name (the names are the op contract's:
# fusedgpt.ops._limits.ACTIVATIONS).
ACTIVATION_CODES = {"gelu_tanh": 0, "gelu": 1, "relu": 2}


@triton.jit
def _bias_act_fwd_kernel(
    X,  # [rows, N] input, row stride stride_xm
    BIAS,  # [N] (unused unless HAS_BIAS)
    Y,  # [rows, N] output, contiguous
    rows,
    columns,
    stride_xm,
    stride_bias,  # bias's stride (any: an expanded or strided [N] view is read as it is laid out)
    ACTIVATION: tl.constexpr,  # 0 gelu_tanh, 1 gelu, 2 relu
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row_ids = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (row_ids[:, None] < rows) & (cols[None, :] < columns)
    v = tl.load(X + row_ids[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v = v + tl.load(BIAS + cols * stride_bias, mask=cols < columns, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 0:
        inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        v = v / (1.0 + tl.exp(-2.0 * inner))
    elif ACTIVATION == 1:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    else:
        v = tl.where(v < 0.0, 0.0, v)  # NaN passes through, as in torch.relu
    tl.store(Y + row_ids[:, None] * columns + cols[None, :], v.to(Y.dtype.element_ty), mask=mask)


def bias_act_fwd(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """x: [..., N] with unit last stride; bias: [N] (any stride) or None. Returns a contiguous y like x."""
    columns = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x2 = x.reshape(-1, columns)  # (rows, N)
    rows = x2.shape[0]
    block_n = min(1024, triton.next_power_of_2(columns))
    block_m = max(1, 4096 // block_n)  # about 4096 elements per program
    grid = (triton.cdiv(rows, block_m), triton.cdiv(columns, block_n))
    _bias_act_fwd_kernel[grid](
        x2, bias if bias is not None else x2, y, rows, columns, x2.stride(0), bias.stride(0) if bias is not None else 0,
        ACTIVATION=ACTIVATION_CODES[activation], HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    return y
