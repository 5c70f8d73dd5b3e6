"""Triton cross-entropy over one chunk of a language-model head's logits, for the fused linear +
cross-entropy (fusedgpt.ops.linear_cross_entropy, Liger-Kernel's FusedLinearCrossEntropy idea): per row,
the loss lse - logit[label] and, in the same launch, the gradient of the mean loss with respect to the
logits, (softmax - onehot(label)) * scale, written over the logits themselves, so a chunk needs no
second [rows, vocab] buffer. Rows whose label is ignore_index get loss 0 and gradient 0; a label outside
[0, vocab) gets a NaN loss (never a silently wrong one)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cross_entropy_fwd_bwd_kernel(
    LOGITS,  # [rows, V] fp32, row stride stride_row: read, then overwritten by the gradient (COMPUTE_GRAD)
    LABELS,  # [rows] int64
    LOSS,  # [rows] fp32: this row's loss (0 where ignored)
    SCALE,  # [1] fp32: the gradient's scale, 1 / (number of rows not ignored) for a mean
    stride_row,
    vocab,
    ignore_index,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < vocab)
    cols = tl.arange(0, BLOCK_V)
    # Pass 1: the row's max and sum of exponentials, online over vocabulary blocks.
    row_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        x = tl.load(base + v0 + cols, mask=v0 + cols < vocab, other=float("-inf"))
        new_max = tl.maximum(row_max, x)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - safe) + tl.exp(x - safe)
        row_max = new_max
    m = tl.max(row_max, axis=0)
    safe_m = tl.where(m == float("-inf"), 0.0, m)
    lse = safe_m + tl.log(tl.sum(row_sum * tl.exp(row_max - safe_m), axis=0))
    target = tl.load(base + tl.where(in_range, label, 0))
    loss = tl.where(ignored, 0.0, tl.where(in_range, lse - target, float("nan")))
    tl.store(LOSS + row, loss)
    if COMPUTE_GRAD:
        # Pass 2: d(mean loss)/d(logit) = (softmax - onehot) * scale, in place.
        scale = tl.where(ignored, 0.0, tl.load(SCALE))
        for v0 in range(0, vocab, BLOCK_V):
            mask = v0 + cols < vocab
            x = tl.load(base + v0 + cols, mask=mask, other=float("-inf"))
            grad = tl.exp(x - lse) - tl.where(v0 + cols == label, 1.0, 0.0)
            tl.store(base + v0 + cols, grad * scale, mask=mask)


def cross_entropy_chunk(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, scale: torch.Tensor,
                        compute_grad: bool) -> torch.Tensor:
    """logits [rows, V] fp32 with unit last stride (overwritten by the gradient when compute_grad), labels
    [rows] int64, scale [1] fp32 on the same device. Returns the rows' losses [rows] fp32."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block = min(4096, triton.next_power_of_2(vocab))
    _cross_entropy_fwd_bwd_kernel[(rows,)](
        logits, labels, loss, scale, logits.stride(0), vocab, ignore_index,
        COMPUTE_GRAD=compute_grad, BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return loss
