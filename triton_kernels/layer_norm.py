"""Triton LayerNorm over the last dim, optionally fused with the residual add (pre-LN blocks):
s = x + residual (rounded to x's dtype, as the unfused block stores it), y = LN(s) * weight + bias; and
its backward: dx (= dresidual), dweight and dbias in one pass over dy and s.

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


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # [rows, C] gradient of y, row stride stride_dym
    DSUM,  # [rows, C] gradient of the returned x + residual, row stride stride_dsm (unused unless HAS_DSUM)
    S,  # [rows, C] what was normalised (x, or x + residual as the forward stored it), row stride stride_sm
    WEIGHT,  # [C] (unused unless HAS_WEIGHT)
    DX,  # [rows, C] gradient of x, contiguous
    DRESIDUAL,  # [rows, C] gradient of residual, contiguous (unused unless HAS_RESIDUAL): the same values
    DW_PARTIAL,  # [programs, C] fp32: this program's sums of dy * x_hat over its rows
    DB_PARTIAL,  # [programs, C] fp32: this program's sums of dy
    rows,
    columns,
    stride_dym,
    stride_dsm,
    stride_sm,
    stride_w,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows pid, pid + programs, ...: the statistics recomputed from s as the forward computed them,
    x_hat = (s - mean) rstd, g = dy * weight, ds = rstd (g - mean(g) - x_hat mean(g x_hat)) (+ dsum),
    and the weight / bias gradients accumulated in fp32 registers, one partial row per program."""
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < columns
    if HAS_WEIGHT:
        weight = tl.load(WEIGHT + cols * stride_w, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, tl.cdiv(rows - program, programs)):  # (programs <= rows)
        row64 = program.to(tl.int64) + i * programs
        s = tl.load(S + row64 * stride_sm + cols, mask=mask, other=0.0).to(tl.float32)
        pivot = tl.sum(tl.where(cols == 0, s, 0.0), axis=0)
        s = tl.where(mask, s - pivot, 0.0)
        mean = tl.sum(s, axis=0) / columns
        centred = tl.where(mask, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / columns + eps)
        x_hat = centred * rstd
        dy = tl.load(DY + row64 * stride_dym + cols, mask=mask, other=0.0).to(tl.float32)
        g = dy
        if HAS_WEIGHT:
            g = dy * weight
        mean_g = tl.sum(g, axis=0) / columns
        mean_gx = tl.sum(g * x_hat, axis=0) / columns
        ds = rstd * (g - mean_g - x_hat * mean_gx)
        if HAS_DSUM:
            ds += tl.load(DSUM + row64 * stride_dsm + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * columns + cols, ds.to(DX.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:
            tl.store(DRESIDUAL + row64 * columns + cols, ds.to(DRESIDUAL.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        db += dy
    tl.store(DW_PARTIAL + program * columns + cols, dw, mask=mask)
    tl.store(DB_PARTIAL + program * columns + cols, db, mask=mask)


def layer_norm_bwd(dy: torch.Tensor, dsum: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor | None,
                   eps: float, has_residual: bool, programs: int | None = None):
    """Gradients of y = LN(s) * weight + bias with s = x (+ residual). dy, dsum (the gradient of the
    returned sum, or None), s: [..., C] with unit last stride. Returns (dx, dresidual, dweight, dbias): dx and dresidual like s (contiguous, equal
    values; dresidual None without a residual), dweight and dbias [C] in fp32, summed from one partial
    row per program (programs: at most 4 per multiprocessor on a GPU, or the given count)."""
    columns = s.shape[-1]
    s2, dy2 = s.reshape(-1, columns), dy.reshape(-1, columns)  # (rows, C)
    dsum2 = dsum.reshape(-1, columns) if dsum is not None else dy2
    rows = s2.shape[0]
    dx = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    dresidual = torch.empty(s.shape, dtype=s.dtype, device=s.device) if has_residual else None
    if programs is None:
        parallel = 4 * torch.cuda.get_device_properties(s.device).multi_processor_count if s.is_cuda else 4
        programs = max(1, min(rows, parallel))
    partial_w = torch.zeros((programs, columns), dtype=torch.float32, device=s.device)
    partial_b = torch.zeros((programs, columns), dtype=torch.float32, device=s.device)
    if rows > 0:
        block = triton.next_power_of_2(columns)
        _layer_norm_bwd_kernel[(programs,)](
            dy2, dsum2, s2, weight if weight is not None else s2, dx, dresidual if has_residual else dx,
            partial_w, partial_b, rows, columns, dy2.stride(0), dsum2.stride(0), s2.stride(0),
            weight.stride(0) if weight is not None else 0, eps,
            HAS_RESIDUAL=has_residual, HAS_DSUM=dsum is not None, HAS_WEIGHT=weight is not None,
            BLOCK_C=block, num_warps=min(16, max(4, block // 512)),
        )
    return dx, dresidual, partial_w.sum(dim=0), partial_b.sum(dim=0)
