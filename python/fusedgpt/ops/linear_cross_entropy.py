"""linear_cross_entropy: the language-model head and its cross-entropy loss in one op that never holds the
[tokens, vocab] logits (Liger-Kernel's FusedLinearCrossEntropy idea), for training GPT-style models.

Contract (CONVENTIONS.md): `linear_cross_entropy_reference` is the specification (it materialises the
logits); `linear_cross_entropy` validates, follows `linear_cross_entropy_backend` and runs it. Both
backends run the same chunked pass (_chunked): the tokens in chunks of about hidden-size x tokens logits
each; per chunk logits = h W^T (+ b) in fp32, the loss and the logits' gradient (softmax - onehot) / n in
place (the Triton kernel of triton_kernels/linear_cross_entropy.py, or the same math in torch ops), then
the chunk's dh = g W and its share of dW = g^T h, db = sum g. The gradients are made in the forward, as
Liger does, and the backward scales them by the loss's gradient (torch.library.register_autograd on
fusedgpt::linear_cross_entropy_triton / _torch); a double backward is an error. No CUDA kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from fusedgpt.ops._backend import BackendChoice, decide
from fusedgpt.ops._checks import check_float, check_tensor, check_unit_last_stride, check_vector, kernel_limits, needs_autograd
from fusedgpt.triton_kernels.linear_cross_entropy import cross_entropy_chunk

Tensor = torch.Tensor


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                                   ignore_index: int = -100) -> Tensor:
    """The specification: mean over the rows whose label is not ignore_index of
    -log softmax(hidden @ weight^T + bias)[label], the logits in float32 (float64 for float64 inputs);
    NaN when every row is ignored (as torch's cross_entropy)."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(compute) @ weight.to(compute).T  # (N, V)
    if bias is not None:
        logits = logits + bias.to(compute)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def _cross_entropy_torch(logits: Tensor, labels: Tensor, ignore_index: int, scale: Tensor,
                         compute_grad: bool) -> Tensor:
    """The Triton kernel's math in torch ops, in place on the fp32 logits (the torch backend's step)."""
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[1])
    target = labels.where(in_range, 0)
    lse = torch.logsumexp(logits, dim=1)  # (rows,)
    picked = logits.gather(1, target[:, None])[:, 0]
    loss = torch.where(ignored, 0.0, torch.where(in_range, lse - picked, float("nan")))
    if compute_grad:
        logits.sub_(lse[:, None]).exp_()  # softmax, in place
        logits.scatter_add_(1, target[:, None], -in_range[:, None].to(logits.dtype))
        logits.mul_(torch.where(ignored, 0.0, scale)[:, None])
    return loss


def _chunked(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
             compute_grads: bool, step) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dhidden, dweight, dbias) of the mean loss; the gradients are empty unless compute_grads
    (dbias also without a bias). hidden [N, H], weight [V, H], labels [N] int64."""
    rows, width = hidden.shape
    vocab = weight.shape[0]
    valid = (labels != ignore_index).sum()
    scale = (1.0 / valid.to(torch.float32)).reshape(1)  # inf when nothing counts: the loss is then NaN
    # Chunks of about rows * width / vocab tokens: their fp32 logits are about the size of hidden itself.
    chunk = max(1, min(rows, triton.next_power_of_2(triton.cdiv(rows, triton.cdiv(vocab, width)))))
    losses = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    dhidden = torch.empty_like(hidden) if compute_grads else hidden.new_empty(0)  # (distinct empty outputs:
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if compute_grads \
        else hidden.new_empty(0)  # a custom op's outputs may not alias)
    dbias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if compute_grads and bias is not None \
        else hidden.new_empty(0)
    for first in range(0, rows, chunk):
        h = hidden[first:first + chunk]  # (C, H)
        logits = (h @ weight.T).float() if bias is None else torch.addmm(bias, h, weight.T).float()  # (C, V)
        losses[first:first + chunk] = step(logits, labels[first:first + chunk], ignore_index, scale, compute_grads)
        if compute_grads:  # logits now holds d(mean loss)/d(logits) of the chunk
            grad = logits.to(hidden.dtype)
            torch.mm(grad, weight, out=dhidden[first:first + chunk])
            dweight += (grad.T @ h).float()
            if bias is not None:
                dbias += logits.sum(dim=0)
    loss = losses.sum() * scale[0]
    return (loss, dhidden, dweight.to(weight.dtype) if compute_grads else dweight,
            dbias.to(bias.dtype) if bias is not None and compute_grads else dbias)


@torch.library.custom_op("fusedgpt::linear_cross_entropy_triton", mutates_args=())
def _linear_cross_entropy_triton(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                                 ignore_index: int, compute_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _chunked(hidden, weight, bias, labels, ignore_index, compute_grads, cross_entropy_chunk)


@torch.library.custom_op("fusedgpt::linear_cross_entropy_torch", mutates_args=())
def _linear_cross_entropy_torch(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                                ignore_index: int, compute_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _chunked(hidden, weight, bias, labels, ignore_index, compute_grads, _cross_entropy_torch)


def _fake(hidden, weight, bias, labels, ignore_index, compute_grads):
    loss = hidden.new_empty((), dtype=torch.float32)
    if not compute_grads:
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    return (loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, compute_grads = inputs
    if not compute_grads and any(ctx.needs_input_grad[:3]):
        raise RuntimeError("fusedgpt.ops.linear_cross_entropy: the gradients were not computed in the forward")
    _, dhidden, dweight, dbias = output
    ctx.save_for_backward(dhidden, dweight, dbias)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_loss, *unused):  # the other outputs are the gradients themselves: not differentiated
    dhidden, dweight, dbias = ctx.saved_tensors
    scale = lambda g: g * grad_loss.to(g.dtype)  # noqa: E731
    return scale(dhidden), scale(dweight), scale(dbias) if ctx.has_bias else None, None, None, None


for _op in (_linear_cross_entropy_triton, _linear_cross_entropy_torch):
    _op.register_fake(_fake)
    _op.register_autograd(_backward, setup_context=_setup_context)


def _check(hidden, weight, labels, bias, ignore_index) -> None:
    op = "linear_cross_entropy"
    check_tensor(op, "hidden", hidden, rank=2)
    check_float(op, "hidden", hidden)
    check_tensor(op, "weight", weight, rank=2)
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"fusedgpt.ops.{op}: weight must have hidden's dtype and device ({hidden.dtype}, "
                        f"{hidden.device}), got {weight.dtype}, {weight.device}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"fusedgpt.ops.{op}: weight must have shape [V, {hidden.shape[1]}] (hidden's width), "
                         f"got {tuple(weight.shape)}")
    check_unit_last_stride(op, "hidden", hidden)
    check_vector(op, "bias", bias, weight.shape[0], "hidden", hidden)
    check_tensor(op, "labels", labels, rank=1)
    if labels.dtype != torch.int64 or labels.device != hidden.device or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"fusedgpt.ops.{op}: labels must be int64 [{hidden.shape[0]}] on {hidden.device}, got "
                         f"{labels.dtype} {tuple(labels.shape)} on {labels.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"fusedgpt.ops.{op}: ignore_index must be an int, got {type(ignore_index).__name__}")


def _decide(hidden, weight, bias, backend, explain=True) -> BackendChoice:
    def unsupported():
        return {**kernel_limits(hidden), "cuda": "no CUDA kernel for linear_cross_entropy (Triton serves GPUs)"}
    return decide("linear_cross_entropy", hidden.device, backend, unsupported=unsupported, size=hidden.numel(),
                  autograd=needs_autograd(hidden, weight, bias), explain=explain, trainable=("triton", "torch"))


def linear_cross_entropy_backend(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                                 ignore_index: int = -100, *, backend: str | None = None) -> BackendChoice:
    """Which backend linear_cross_entropy(...) serves this call with, and why each other cannot."""
    _check(hidden, weight, labels, bias, ignore_index)
    return _decide(hidden, weight, bias, backend)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, *, backend: str | None = None) -> Tensor:
    """Mean cross-entropy of the logits hidden @ weight^T + bias against labels, without materialising
    the logits: the loss of a language-model head (HF's *ForCausalLM with labels, after the shift).

    hidden [N, H] float16 / bfloat16 / float32 (float64 on the torch backend), unit last stride; weight
    [V, H] (nn.Linear's layout, e.g. the tied embedding) and bias [V] or None in hidden's dtype; labels
    int64 [N], ignore_index (-100, HF's) for rows that do not count. Returns a float32 scalar (NaN when
    every row is ignored; a label outside [0, V) gives NaN). Memory: one chunk of fp32 logits, about the
    size of hidden, beside the gradients. Backends: "triton" (GPUs; CPU under TRITON_INTERPRET=1),
    "torch" (the same chunked pass in torch ops); both train."""
    _check(hidden, weight, labels, bias, ignore_index)
    chosen = _decide(hidden, weight, bias, backend, explain=False).backend
    grads = needs_autograd(hidden, weight, bias)
    op = _linear_cross_entropy_triton if chosen == "triton" else _linear_cross_entropy_torch
    return op(hidden, weight, bias, labels, ignore_index, grads)[0]
