"""layer_norm: LayerNorm over the last dim, optionally fused with the residual add of a pre-LN block.

Contract (CONVENTIONS.md): `layer_norm_reference` is the specification; `layer_norm` validates, follows
`layer_norm_backend` (the one decision of which backend, cuda / triton / torch, serves a call) and runs
it; the hidden-size limit is fusedgpt.ops._limits.MAX_COLUMNS. The GPU paths are torch.library custom
ops with fake implementations:
    fusedgpt::layer_norm, fusedgpt::add_layer_norm                  (csrc/layer_norm/layer_norm.cu)
    fusedgpt::layer_norm_triton, fusedgpt::add_layer_norm_triton    (triton_kernels/layer_norm.py)
Each backend's two forwards have its backward (torch.library.register_autograd): fusedgpt::layer_norm_backward
(CUDA: a row kernel and a column kernel) and fusedgpt::layer_norm_backward_triton (one pass), both dx
(= dresidual), dweight and dbias, themselves without a backward (double backward is an error). The torch
backend trains through torch's own autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedgpt._extension import extension_available
from fusedgpt.ops._backend import BackendChoice, decide
from fusedgpt.ops._checks import (check_float, check_like, check_tensor, check_unit_last_stride, check_vector,
                                  kernel_limits, needs_autograd)
from fusedgpt.ops._limits import MAX_COLUMNS
from fusedgpt.triton_kernels.layer_norm import layer_norm_bwd, layer_norm_fwd

Tensor = torch.Tensor


def layer_norm_reference(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
                         residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The specification. s = x + residual, stored in x's dtype (as an unfused block stores it);
    y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias, with the biased variance (two passes, over
    the row shifted by its first element), computed in float32 (float64 for float64 inputs) and
    returned in x's dtype. Returns y, or (y, s) with a residual."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = x
    if residual is not None:
        s = (x.to(compute) + residual.to(compute)).to(x.dtype)
    # Statistics of the row shifted by its first element: the same math, but a large common offset no
    # longer costs float32 precision in the mean (the kernels do the same).
    shifted = s.to(compute) - s[..., :1].to(compute)
    mean = shifted.mean(dim=-1, keepdim=True)
    centred = shifted - mean
    variance = centred.square().mean(dim=-1, keepdim=True)
    y = centred * torch.rsqrt(variance + eps)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    y = y.to(x.dtype)
    return (y, s) if residual is not None else y


def _layer_norm_torch(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                     residual: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
    """The "torch" backend: torch's own layer_norm (fp32 statistics for fp16 / bf16, as the kernels), the
    residual add in x's dtype as the specification stores it. No host reads."""
    s = x if residual is None else (x + residual).contiguous()
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps).contiguous()
    return (y, s) if residual is not None else y


@torch.library.custom_op("fusedgpt::layer_norm_triton", mutates_args=())
def _layer_norm_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return layer_norm_fwd(x, weight, bias, eps)[0]


@torch.library.custom_op("fusedgpt::add_layer_norm_triton", mutates_args=())
def _add_layer_norm_triton(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None,
                           eps: float) -> tuple[Tensor, Tensor]:
    return layer_norm_fwd(x, weight, bias, eps, residual)


def _layer_norm_fake(x, weight, bias, eps):
    return x.new_empty(x.shape)


def _add_layer_norm_fake(x, residual, weight, bias, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


_layer_norm_triton.register_fake(_layer_norm_fake)
_add_layer_norm_triton.register_fake(_add_layer_norm_fake)
if extension_available():
    torch.library.register_fake("fusedgpt::layer_norm")(_layer_norm_fake)
    torch.library.register_fake("fusedgpt::add_layer_norm")(_add_layer_norm_fake)


@torch.library.custom_op("fusedgpt::layer_norm_backward_triton", mutates_args=())
def _layer_norm_backward_triton(grad: Tensor, grad_sum: Tensor | None, s: Tensor, weight: Tensor | None, eps: float,
                                has_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dweight, dbias); dresidual is empty without a residual, dweight / dbias fp32."""
    dx, dresidual, dweight, dbias = layer_norm_bwd(grad, grad_sum, s, weight, eps, has_residual)
    return dx, dresidual if dresidual is not None else s.new_empty(0), dweight, dbias


@_layer_norm_backward_triton.register_fake
def _layer_norm_backward_fake(grad, grad_sum, s, weight, eps, has_residual):
    columns = s.shape[-1]
    return (s.new_empty(s.shape), s.new_empty(s.shape) if has_residual else s.new_empty(0),
            s.new_empty(columns, dtype=torch.float32), s.new_empty(columns, dtype=torch.float32))


def _unit_last_stride(grad: Tensor | None) -> Tensor | None:
    """A gradient as the backward kernel reads it (rows of unit stride): e.g. a sum's is expanded."""
    return grad.contiguous() if grad is not None and grad.stride(-1) != 1 else grad


def _layer_norm_grads(backward_op, ctx, grad, grad_sum, has_residual):
    s, weight, bias = ctx.saved_tensors
    dx, dresidual, dweight, dbias = backward_op(_unit_last_stride(grad), _unit_last_stride(grad_sum), s, weight,
                                                ctx.eps, has_residual)
    dweight = dweight.to(weight.dtype) if weight is not None and ctx.needs_input_grad[-3] else None
    dbias = dbias.to(bias.dtype) if bias is not None and ctx.needs_input_grad[-2] else None
    return dx, (dresidual if has_residual else None), dweight, dbias


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.eps = eps


def _add_layer_norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    ctx.save_for_backward(output[1], weight, bias)  # s = x + residual, as the forward stored it
    ctx.eps = eps


def _register_backward(plain, with_residual, backward_op) -> None:
    """The autograd formulas of one backend's two forwards (the op names or custom-op objects), on its
    backward op (the same schema for both backends)."""
    def plain_backward(ctx, grad):
        dx, _, dweight, dbias = _layer_norm_grads(backward_op, ctx, grad, None, False)
        return dx, dweight, dbias, None

    def residual_backward(ctx, grad, grad_sum):
        dx, dresidual, dweight, dbias = _layer_norm_grads(backward_op, ctx, grad, grad_sum, True)
        return dx, dresidual, dweight, dbias, None

    torch.library.register_autograd(plain, plain_backward, setup_context=_layer_norm_setup_context)
    torch.library.register_autograd(with_residual, residual_backward, setup_context=_add_layer_norm_setup_context)


# Each backend's forwards get its backward: Triton's, and the CUDA extension's fusedgpt::layer_norm_backward.
_register_backward(_layer_norm_triton, _add_layer_norm_triton, _layer_norm_backward_triton)
_CUDA_BACKWARD_BUILT = extension_available() and hasattr(torch.ops.fusedgpt, "layer_norm_backward")
if _CUDA_BACKWARD_BUILT:
    torch.library.register_fake("fusedgpt::layer_norm_backward")(_layer_norm_backward_fake)
    _register_backward("fusedgpt::layer_norm", "fusedgpt::add_layer_norm", torch.ops.fusedgpt.layer_norm_backward)
_TRAINABLE = ("cuda", "triton", "torch") if _CUDA_BACKWARD_BUILT or not extension_available() else ("triton", "torch")


def _check(x, weight, bias, eps, residual) -> None:
    op = "layer_norm"
    check_tensor(op, "x", x, min_rank=1)
    check_float(op, "x", x)
    check_unit_last_stride(op, "x", x)
    columns = x.shape[-1]
    if not 1 <= columns <= MAX_COLUMNS:
        raise ValueError(f"fusedgpt.ops.layer_norm: x's last dim (hidden size) must be in [1, {MAX_COLUMNS}], "
                         f"got {columns}")
    if x.numel() // columns >= 2**31:
        raise ValueError(f"fusedgpt.ops.layer_norm: x has {x.numel() // columns} rows; at most 2^31 - 1 fit one launch")
    check_vector(op, "weight", weight, columns, "x", x)
    check_vector(op, "bias", bias, columns, "x", x)
    if residual is not None:
        check_tensor(op, "residual", residual)
        check_like(op, "residual", residual, "x", x, shape=True)
        check_unit_last_stride(op, "residual", residual)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):  # NaN fails too
        raise ValueError(f"fusedgpt.ops.layer_norm: eps must be a non-negative finite number, got {eps!r}")


def _decide(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
            backend: str | None, explain: bool = True) -> BackendChoice:
    """The decision for checked arguments (layer_norm_backend's, which layer_norm follows)."""
    return decide("layer_norm", x.device, backend, unsupported=lambda: kernel_limits(x), size=x.numel(),
                  autograd=needs_autograd(x, weight, bias, residual), explain=explain, trainable=_TRAINABLE)


def layer_norm_backend(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
                       residual: Tensor | None = None, *, backend: str | None = None) -> BackendChoice:
    """Which backend layer_norm(x, ...) serves this call with, and why each other backend cannot (see
    BackendChoice; every layer_norm call is capturable). The arguments are layer_norm's, checked as it
    checks them; nothing runs."""
    _check(x, weight, bias, eps, residual)
    return _decide(x, weight, bias, residual, backend)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
               residual: Tensor | None = None, *, backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim of x, fused with the residual add when `residual` is given.

    x: [..., C], float16 / bfloat16 / float32 (float64 on the torch backend), last dim contiguous,
    1 <= C <= 16384. residual: like x (same shape, dtype, device). weight, bias: [C] in x's dtype, or None.
    Returns y = LN(x), or (y, s) with s = x + residual and y = LN(s): the add+norm of a pre-LN block in one
    pass over memory. Outputs are contiguous, in x's dtype; statistics are fp32 on every backend.
    Backends: "cuda", "triton", "torch" (see fusedgpt.ops._backend); every one trains: each kernel has a
    backward of its own (dx = dresidual, dweight, dbias), the torch backend's is torch's own.
    layer_norm_backend(...) says which backend a call gets, and why.
    """
    _check(x, weight, bias, eps, residual)
    chosen = _decide(x, weight, bias, residual, backend, explain=False).backend
    eps = float(eps)
    if chosen == "torch":
        return _layer_norm_torch(x, weight, bias, eps, residual)
    if chosen == "cuda":
        if residual is None:
            return torch.ops.fusedgpt.layer_norm(x, weight, bias, eps)
        return torch.ops.fusedgpt.add_layer_norm(x, residual, weight, bias, eps)
    if residual is None:
        return _layer_norm_triton(x, weight, bias, eps)
    return _add_layer_norm_triton(x, residual, weight, bias, eps)
