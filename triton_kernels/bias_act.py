"""Triton fused bias + activation: y = act(x + bias) over [..., N], one read of x, one write of y; and its
backward: dx = dy * act'(x + bias) and dbias = sum of dx over the rows, in one pass over dy and x.

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


@triton.jit
def _bias_act_bwd_kernel(
    DY,  # [rows, N] gradient of y, row stride stride_dym
    X,  # [rows, N] the forward's input, row stride stride_xm
    BIAS,  # [N] (unused unless HAS_BIAS)
    DX,  # [rows, N] gradient of x, contiguous
    DBIAS_PARTIAL,  # [row programs, N] fp32: this program's column sums of dx (unused unless HAS_BIAS)
    rows,
    columns,
    stride_dym,
    stride_xm,
    stride_bias,
    ACTIVATION: tl.constexpr,  # 0 gelu_tanh, 1 gelu, 2 relu
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """act' in fp32 on v = x + bias, recomputed (nothing saved but x):
    gelu_tanh: 0.5 (1 + t) + 0.5 v (1 - t^2) c (1 + 3 a v^2), t = tanh(c (v + a v^3)) = 2 sigmoid(2u) - 1;
    gelu: Phi(v) + v phi(v); relu: 1 where v > 0, 0 where v <= 0 (NaN passes dy, as torch's backward)."""
    row_block = tl.program_id(0)
    row_ids = row_block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (row_ids[:, None] < rows) & (cols[None, :] < columns)
    dy = tl.load(DY + row_ids[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    v = tl.load(X + row_ids[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v = v + tl.load(BIAS + cols * stride_bias, mask=cols < columns, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 0:
        inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        slope = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * v * v)
    elif ACTIVATION == 1:
        slope = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476)) + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)
    else:
        slope = tl.where(v <= 0.0, 0.0, 1.0)
    dx = dy * slope
    tl.store(DX + row_ids[:, None] * columns + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.store(DBIAS_PARTIAL + row_block * columns + cols, tl.sum(tl.where(mask, dx, 0.0), axis=0),
                 mask=cols < columns)


def bias_act_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                 activation: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of y = act(x + bias): (dx like x, contiguous; dbias [N] in bias's dtype, or None). dy, x:
    [..., N] with unit last stride; bias: [N] (any stride) or None. dbias sums fp32 column partials (one
    row per program of BLOCK_M rows), so it does not depend on the order programs run in."""
    columns = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x2, dy2 = x.reshape(-1, columns), dy.reshape(-1, columns)  # (rows, N)
    rows = x2.shape[0]
    block_n = min(1024, triton.next_power_of_2(columns))
    block_m = max(1, min(64, 4096 // block_n))  # about 4096 elements per program, at most 64 rows
    row_programs = triton.cdiv(rows, block_m)
    partial = torch.empty((row_programs, columns) if bias is not None else (0,), dtype=torch.float32,
                          device=x.device)
    if rows > 0:
        grid = (row_programs, triton.cdiv(columns, block_n))
        _bias_act_bwd_kernel[grid](
            dy2, x2, bias if bias is not None else x2, dx, partial if bias is not None else dx, rows, columns,
            dy2.stride(0), x2.stride(0), bias.stride(0) if bias is not None else 0,
            ACTIVATION=ACTIVATION_CODES[activation], HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )
    if bias is None:
        return dx, None
    return dx, partial.sum(dim=0).to(bias.dtype)  # (N,)
