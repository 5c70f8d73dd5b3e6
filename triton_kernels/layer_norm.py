"""Triton LayerNorm over the last dim, optionally fused with the residual add (pre-LN blocks):
s = x + residual (rounded to x's dtype, as the unfused block stores it), y = LN(s) * weight + bias.

One program per row; the whole row (padded to a power of two; the op contract's limit is
fusedgpt.ops._limits.MAX_COLUMNS = 16384) is held in registers, so x and residual are read once and y
and s written once. Statistics in fp32, two-pass variance over the row shifted by its first element."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # [rows, C] input, row stride stride_xm
    RESIDUAL,  # [rows, C] residual (unused unless HAS_RESIDUAL)
    WEIGHT,  # [C] (unused unless HAS_WEIGHT)
    BIAS,  # [C] (unused unless HAS_BIAS)
    Y,  # [rows, C] output, contiguous
    SUM,  # [rows, C] x + residual, contiguous (unused unless HAS_RESIDUAL)
    stride_xm,
    stride_rm,
    stride_w,  # weight's stride (any: an expanded or strided [C] view is read as it is laid out)
    stride_b,  # bias's stride
    columns,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < columns
    x = tl.load(X + row * stride_xm + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(RESIDUAL + row * stride_rm + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(SUM.dtype.element_ty)
        tl.store(SUM + row * columns + cols, x, mask=mask)
    x = x.to(tl.float32)
    # Shift by the row's first element: a large common offset then costs no precision in the mean.
    pivot = tl.sum(tl.where(cols == 0, x, 0.0), axis=0)
    x = tl.where(mask, x - pivot, 0.0)
    mean = tl.sum(x, axis=0) / columns
    centred = tl.where(mask, x - mean, 0.0)
    variance = tl.sum(centred * centred, axis=0) / columns
    y = centred * (1.0 / tl.sqrt(variance + eps))
    if HAS_WEIGHT:
        y = y * tl.load(WEIGHT + cols * stride_w, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(BIAS + cols * stride_b, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * columns + cols, y.to(Y.dtype.element_ty), mask=mask)


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (y, s) with s = x + residual (None without a residual). x: [..., C], unit last stride,
    C <= MAX_COLUMNS (checked by fusedgpt.ops.layer_norm); residual like x; weight, bias: [C] or None, any stride. Outputs are contiguous."""
    columns = x.shape[-1]
    x2 = x.reshape(-1, columns)  # (rows, C), a view when the leading dims allow it
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    rows = x2.shape[0]
    if rows == 0:
        return y, s
    residual2 = residual.reshape(-1, columns) if residual is not None else x2
    block = triton.next_power_of_2(columns)
    # Enough warps that each thread holds at most ~16 fp32 values of the row (4..16 warps).
    num_warps = min(16, max(4, block // 512))
    _layer_norm_fwd_kernel[(rows,)](
        x2, residual2, weight if weight is not None else x2, bias if bias is not None else x2, y,
        s if s is not None else y, x2.stride(0), residual2.stride(0),
        weight.stride(0) if weight is not None else 0, bias.stride(0) if bias is not None else 0, columns, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_C=block, num_warps=num_warps,
    )
    return y, s
