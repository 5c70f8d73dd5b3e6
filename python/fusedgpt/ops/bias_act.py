"""bias_act: fused bias + activation, y = act(x + bias), for the MLP of GPT-style blocks.

Contract (CONVENTIONS.md): `bias_act_reference` is the specification; `bias_act` validates, follows
`bias_act_backend` (the one decision of which backend serves a call) and runs it; the activations are
fusedgpt.ops._limits.ACTIVATIONS. GPU paths: fusedgpt::bias_act (csrc/bias_act/bias_act.cu) and
fusedgpt::bias_act_triton (triton_kernels/bias_act.py), both custom ops with fake implementations, each
with its backend's backward (torch.library.register_autograd): fusedgpt::bias_act_backward (CUDA) and
fusedgpt::bias_act_backward_triton, dx and dbias in one pass, themselves without a backward (double
backward is an error). The torch backend trains through torch's own autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fusedgpt._extension import extension_available
from fusedgpt.ops._backend import BackendChoice, decide
from fusedgpt.ops._checks import (check_float, check_tensor, check_unit_last_stride, check_vector, kernel_limits,
                                  needs_autograd)
from fusedgpt.ops._limits import ACTIVATIONS
from fusedgpt.triton_kernels.bias_act import bias_act_bwd, bias_act_fwd

Tensor = torch.Tensor


def bias_act_reference(x: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    """The specification, in float32 (float64 for float64 inputs), returned in x's dtype:
    gelu_tanh(v) = 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3)))  (HF's gelu_new / "gelu_pytorch_tanh"),
    gelu(v) = 0.5 v (1 + erf(v / sqrt(2))), relu(v) = max(v, 0), with v = x + bias."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = x.to(compute)
    if bias is not None:
        v = v + bias.to(compute)
    if activation == "gelu_tanh":
        y = 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v.pow(3))))
    elif activation == "gelu":
        y = 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))
    else:
        y = torch.relu(v)
    return y.to(x.dtype)


def _bias_act_torch(x: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    """The "torch" backend: torch's own GELU (tanh or erf) / ReLU on x + bias, in x's dtype."""
    v = x if bias is None else x + bias
    if activation == "gelu_tanh":
        y = F.gelu(v, approximate="tanh")
    elif activation == "gelu":
        y = F.gelu(v)
    else:
        y = F.relu(v)
    return y.contiguous()


@torch.library.custom_op("fusedgpt::bias_act_triton", mutates_args=())
def _bias_act_triton(x: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    return bias_act_fwd(x, bias, activation)


def _bias_act_fake(x, bias, activation):
    return x.new_empty(x.shape)


_bias_act_triton.register_fake(_bias_act_fake)
if extension_available():
    torch.library.register_fake("fusedgpt::bias_act")(_bias_act_fake)


@torch.library.custom_op("fusedgpt::bias_act_backward_triton", mutates_args=())
def _bias_act_backward_triton(grad: Tensor, x: Tensor, bias: Tensor | None, activation: str) -> tuple[Tensor, Tensor]:
    """(dx, dbias); dbias is empty without a bias (a custom op returns tensors, not None)."""
    dx, dbias = bias_act_bwd(grad, x, bias, activation)
    return dx, dbias if dbias is not None else x.new_empty(0)


@_bias_act_backward_triton.register_fake
def _bias_act_backward_fake(grad, x, bias, activation):
    return x.new_empty(x.shape), bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)


def _bias_act_setup_context(ctx, inputs, output):
    x, bias, activation = inputs
    ctx.save_for_backward(x, bias)
    ctx.activation = activation


def _backward_with(backward_op):
    def backward(ctx, grad):
        x, bias = ctx.saved_tensors
        if grad.stride(-1) != 1:  # e.g. the expanded gradient of a sum: the kernels read rows of unit stride
            grad = grad.contiguous()
        dx, dbias = backward_op(grad, x, bias, ctx.activation)
        return dx, dbias if bias is not None else None, None
    return backward


# Each forward has its backend's backward: Triton's, and the CUDA extension's fusedgpt::bias_act_backward.
_bias_act_triton.register_autograd(_backward_with(_bias_act_backward_triton), setup_context=_bias_act_setup_context)
_CUDA_BACKWARD_BUILT = extension_available() and hasattr(torch.ops.fusedgpt, "bias_act_backward")
if _CUDA_BACKWARD_BUILT:
    torch.library.register_fake("fusedgpt::bias_act_backward")(_bias_act_backward_fake)
    torch.library.register_autograd("fusedgpt::bias_act", _backward_with(torch.ops.fusedgpt.bias_act_backward),
                                    setup_context=_bias_act_setup_context)
_TRAINABLE = ("cuda", "triton", "torch") if _CUDA_BACKWARD_BUILT or not extension_available() else ("triton", "torch")


def _check(x, bias, activation) -> None:
    op = "bias_act"
    check_tensor(op, "x", x, min_rank=1)
    check_float(op, "x", x)
    check_unit_last_stride(op, "x", x)
    check_vector(op, "bias", bias, x.shape[-1], "x", x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"fusedgpt.ops.bias_act: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _decide(x: Tensor, bias: Tensor | None, backend: str | None, explain: bool = True) -> BackendChoice:
    """The decision for checked arguments (bias_act_backend's, which bias_act follows)."""
    return decide("bias_act", x.device, backend, unsupported=lambda: kernel_limits(x), size=x.numel(),
                  autograd=needs_autograd(x, bias), explain=explain, trainable=_TRAINABLE)


def bias_act_backend(x: Tensor, bias: Tensor | None, activation: str, *,
                     backend: str | None = None) -> BackendChoice:
    """Which backend bias_act(x, bias, activation) serves this call with, and why each other backend
    cannot (see BackendChoice; every bias_act call is capturable). The arguments are bias_act's, checked
    as it checks them; nothing runs."""
    _check(x, bias, activation)
    return _decide(x, bias, backend)


def bias_act(x: Tensor, bias: Tensor | None, activation: str, *, backend: str | None = None) -> Tensor:
    """y = activation(x + bias).

    x: [..., N], float16 / bfloat16 / float32 (float64 on the torch backend), last dim contiguous.
    bias: [N] in x's dtype, or None. activation: "gelu_tanh" (GPT-2 / GPT-Neo), "gelu" (erf) or "relu"
    (OPT). Returns a contiguous tensor like x. Math in fp32 on every backend. Every backend trains: each
    kernel's backward is one pass of its own (dx and dbias), the torch backend's is torch's own.
    bias_act_backend(...) says which backend a call gets, and why."""
    _check(x, bias, activation)
    chosen = _decide(x, bias, backend, explain=False).backend
    if chosen == "torch":
        return _bias_act_torch(x, bias, activation)
    if chosen == "cuda":
        return torch.ops.fusedgpt.bias_act(x, bias, activation)
    return _bias_act_triton(x, bias, activation)
