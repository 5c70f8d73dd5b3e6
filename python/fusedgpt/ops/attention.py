"""attention: fused prefill attention — causal, sliding-window (GPT-Neo's local layers) and
left-padded batches — over [B, S, H, D] tensors.

Contract (CONVENTIONS.md): `attention_reference` is the specification; `attention` validates, follows
`attention_backend` (the one decision of which backend serves a call) and runs it. What each backend
supports: fusedgpt.ops._limits. GPU paths, custom ops with fake implementations:
    fusedgpt::attention          hand-written CUDA, mma.sync tensor cores (csrc/attention/)
    fusedgpt::attention_triton   Triton (triton_kernels/attention.py)
Training (calls that need autograd) runs on fusedgpt::attention_triton_train, the Triton forward that also
returns each row's log-sum-exp, with FlashAttention-2's backward registered on it
(fusedgpt::attention_backward_triton: dQ, dK, dV recomputed tile by tile, causal / window / padding
tiles skipped as in the forward, no S x S tensor; itself without a backward, so a double backward is an
error). The CUDA forward saves no log-sum-exp: its calls that need autograd go to the Triton kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fusedgpt._extension import extension_available
from fusedgpt.ops._backend import BackendChoice, decide
from fusedgpt.ops._checks import (check_head_tensors, check_int32_per_sequence, check_like, check_same_heads,
                                  check_window_and_scale, kernel_limits, needs_autograd)
from fusedgpt.ops._limits import (CUDA_ATTENTION_DTYPES, CUDA_ATTENTION_HEAD_DIMS, MAX_BATCH_HEADS,
                                  TRITON_ATTENTION_MAX_HEAD_DIM)
from fusedgpt.triton_kernels.attention import attention_bwd, attention_fwd

Tensor = torch.Tensor

# The names this module has always exported for the limits (fusedgpt.ops._limits defines them).
MAX_HEAD_DIM = TRITON_ATTENTION_MAX_HEAD_DIM
CUDA_HEAD_DIMS = CUDA_ATTENTION_HEAD_DIMS


def default_scale(head_dim: int) -> float:
    """The attention scale when none is given: D^-0.5."""
    return 1.0 / math.sqrt(head_dim)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: int | None = None,
                        scale: float | None = None, kv_start: Tensor | None = None) -> Tensor:
    """The specification, in float32 (float64 for float64 inputs), returned in q's dtype.

    q [B, Sq, H, D] are the last Sq positions of the Sk keys: query i sits at key position
    p = Sk - Sq + i. Key j is visible iff j >= kv_start[b] (padding), j <= p (causal) and j > p - window
    (window). out = softmax(scale * q k^T over visible keys) v; a query with no visible key gets zeros."""
    batch, q_len, heads, dim = q.shape
    kv_len = k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = default_scale(dim) if scale is None else scale
    qh, kh, vh = (t.to(compute).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    scores = (qh @ kh.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    visible = visible_keys(q_len, kv_len, causal=causal, window=window, kv_start=kv_start, device=q.device)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    # A row with no visible key is all -inf, so softmax gives NaN there: those rows, and only those, are
    # zeros. A NaN from the inputs (q, k, v or the scale) stays NaN, as on the kernels.
    probs = torch.where(visible.any(dim=-1, keepdim=True), probs, 0.0)
    return (probs @ vh).transpose(1, 2).to(q.dtype).contiguous()  # (B, Sq, H, D)


def visible_keys(q_len: int, kv_len: int, *, causal: bool, window: int | None, kv_start: Tensor | None,
                 device: torch.device) -> Tensor:
    """The visibility mask of the specification, broadcastable to (B, H, Sq, Sk): query i sits at key
    position p = Sk - Sq + i and sees key j iff j >= kv_start[b], j <= p (causal), j > p - window."""
    query_pos = (torch.arange(q_len, device=device) + (kv_len - q_len))[:, None]  # (Sq, 1)
    key_pos = torch.arange(kv_len, device=device)[None, :]  # (1, Sk)
    first_key = kv_start.to(device, torch.int64)[:, None, None, None] if kv_start is not None else None  # (B,1,1,1)
    visible = visible_positions(query_pos, key_pos, causal=causal, window=window, first_key=first_key)
    return visible if visible.dim() == 4 else visible[None, None]  # (B or 1, 1, Sq, Sk)


def visible_positions(query_pos: Tensor, key_pos: Tensor, *, causal: bool, window: int | None,
                      first_key: Tensor | None) -> Tensor:
    """The specification's visibility rule on positions: the key at position j is visible from the query at
    position p iff j >= first_key (left padding), j <= p (causal) and j > p - window. The arguments
    broadcast against each other (queries along the second-to-last dim, keys along the last); so does the
    bool result. Prefill attention (reference and torch backend) and the torch backend's decode use it."""
    if causal:
        visible = key_pos <= query_pos
    else:
        visible = torch.ones(torch.broadcast_shapes(query_pos.shape, key_pos.shape), dtype=torch.bool,
                             device=key_pos.device)
    if window is not None:
        visible &= key_pos > query_pos - window  # of visible's shape: in place
    if first_key is not None:
        visible = visible & (key_pos >= first_key)  # first_key may add dims: not in place
    return visible


def _attention_torch(q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None, scale: float,
                     kv_start: Tensor | None) -> Tensor:
    """The "torch" backend: torch's scaled_dot_product_attention (its fused CPU / GPU kernels) with the
    specification's visibility mask, on [B, H, S, D] views of the inputs (no copies). Rows with no visible
    key are zeros, as specified (SDPA leaves them undefined); no host reads."""
    q_len, kv_len = q.shape[1], k.shape[1]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) views
    if kv_start is None and window is None and (not causal or q_len == kv_len):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)  # every row sees a key
    else:
        visible = visible_keys(q_len, kv_len, causal=causal, window=window, kv_start=kv_start, device=q.device)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=visible, scale=scale)
        out = torch.where(visible.any(dim=-1, keepdim=True), out, 0.0)  # (B, H, Sq, D)
    return out.transpose(1, 2).contiguous()  # (B, Sq, H, D)


@torch.library.custom_op("fusedgpt::attention_triton", mutates_args=())
def _attention_triton(q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None, scale: float,
                      kv_start: Tensor | None) -> Tensor:
    return attention_fwd(q, k, v, causal, window, scale, kv_start)


@_attention_triton.register_fake
def _attention_fake(q, k, v, causal, window, scale, kv_start):
    return q.new_empty(q.shape)


@torch.library.custom_op("fusedgpt::attention_triton_train", mutates_args=())
def _attention_triton_train(q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None, scale: float,
                            kv_start: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out, lse): lse [B, H, Sq] fp32, each row's log2-sum-exp2 of its scaled scores (+inf: no key)."""
    return attention_fwd(q, k, v, causal, window, scale, kv_start, store_lse=True)


@_attention_triton_train.register_fake
def _attention_train_fake(q, k, v, causal, window, scale, kv_start):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("fusedgpt::attention_backward_triton", mutates_args=())
def _attention_backward_triton(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                               window: int | None, scale: float,
                               kv_start: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return attention_bwd(grad, q, k, v, out, lse, causal, window, scale, kv_start)


@_attention_backward_triton.register_fake
def _attention_backward_fake(grad, q, k, v, out, lse, causal, window, scale, kv_start):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, causal, window, scale, kv_start = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_start)
    ctx.causal, ctx.window, ctx.scale = causal, window, scale


def _attention_backward(ctx, grad, grad_lse):  # lse is internal: nothing differentiates it
    q, k, v, out, lse, kv_start = ctx.saved_tensors
    if grad.stride(-1) != 1:  # e.g. the expanded gradient of a sum: the kernels read rows of unit stride
        grad = grad.contiguous()
    dq, dk, dv = _attention_backward_triton(grad, q, k, v, out, lse, ctx.causal, ctx.window, ctx.scale, kv_start)
    return dq, dk, dv, None, None, None, None


_attention_triton_train.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def _attention_triton_trained(q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None, scale: float,
                              kv_start: Tensor | None) -> Tensor:
    """The "triton" backend for a call that needs autograd: the forward that keeps the log-sum-exp."""
    return _attention_triton_train(q, k, v, causal, window, scale, kv_start)[0]

_CUDA_OP_BUILT = extension_available() and hasattr(torch.ops.fusedgpt, "attention")
if _CUDA_OP_BUILT:
    torch.library.register_fake("fusedgpt::attention")(_attention_fake)

def torch_dtypes(names: tuple[str, ...]) -> tuple[torch.dtype, ...]:
    """("float16", ...) -> (torch.float16, ...): the dtype names of fusedgpt.ops._limits."""
    return tuple(getattr(torch, name) for name in names)


def attention_kernel_limits(q: Tensor, tensors, *, cuda_op_built: bool,
                            cuda_dtypes: tuple[torch.dtype, ...]) -> dict[str, str]:
    """What the attention kernels (prefill and decode) cannot serve: maps "cuda" / "triton" to the reason.
    The CUDA kernels take the head dims of CUDA_ATTENTION_HEAD_DIMS, B * H <= MAX_BATCH_HEADS and 16-byte
    aligned tensors whose batch/seq/head strides are whole 16-byte vectors; the Triton kernels head dims
    up to TRITON_ATTENTION_MAX_HEAD_DIM and B * H <= MAX_BATCH_HEADS (fusedgpt.ops._limits). What neither
    can serve runs on the torch backend."""
    unsupported = kernel_limits(q)
    batch, heads, dim = q.shape[0], q.shape[2], q.shape[3]
    vector = 16 // q.element_size()
    if not cuda_op_built:
        cuda_reason = "this build of the extension lacks the kernel (rebuild fusedgpt)"
    elif q.dtype not in cuda_dtypes:
        cuda_reason = f"the CUDA kernel takes {[str(d) for d in cuda_dtypes]}, got {q.dtype}"
    elif dim not in CUDA_ATTENTION_HEAD_DIMS:
        cuda_reason = f"the CUDA kernel takes head dims {CUDA_ATTENTION_HEAD_DIMS}, got {dim}"
    elif batch * heads > MAX_BATCH_HEADS:
        cuda_reason = f"the CUDA kernel takes B * H <= {MAX_BATCH_HEADS}"
    elif any(t is not None and (t.data_ptr() % 16 or any(s % vector for s in t.stride()[:3])) for t in tensors):
        cuda_reason = f"the CUDA kernel needs 16-byte aligned tensors with strides that are multiples of {vector}"
    else:
        cuda_reason = None
    if cuda_reason is not None:
        unsupported.setdefault("cuda", cuda_reason)
    if dim > TRITON_ATTENTION_MAX_HEAD_DIM:
        unsupported["triton"] = f"head dim {dim} is above the kernels' limit of {TRITON_ATTENTION_MAX_HEAD_DIM}"
    elif batch * heads > MAX_BATCH_HEADS:  # the launch grid's second axis
        unsupported["triton"] = f"the Triton kernel takes B * H <= {MAX_BATCH_HEADS}"
    return unsupported


def _check(q, k, v, causal, window, scale, kv_start) -> None:
    op = "attention"
    check_head_tensors(op, [("q", q), ("k", k), ("v", v)])
    check_like(op, "k", k, "q", q)
    check_like(op, "v", v, "k", k, shape=True)
    batch, q_len = q.shape[:2]
    check_same_heads(op, "k", k, "Sk", "q", q)
    if q_len > k.shape[1]:
        raise ValueError(f"fusedgpt.ops.attention: q has more tokens ({q_len}) than k ({k.shape[1]}); the queries "
                         "must be the last Sq of the Sk positions (Sq <= Sk)")
    if not isinstance(causal, bool):
        raise TypeError(f"fusedgpt.ops.attention: causal must be a bool, got {type(causal).__name__}")
    check_window_and_scale(op, window, scale)
    if window is not None and not causal:
        raise ValueError("fusedgpt.ops.attention: window needs causal=True (a sliding window looks back only)")
    if kv_start is not None:
        check_int32_per_sequence(op, "kv_start", kv_start, batch, q.device, allow_cpu=True)


def _decide(q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor | None, backend: str | None,
            explain: bool = True) -> BackendChoice:
    """The decision for checked arguments (attention_backend's, which attention follows)."""
    def unsupported():
        return attention_kernel_limits(q, (q, k, v), cuda_op_built=_CUDA_OP_BUILT,
                                       cuda_dtypes=torch_dtypes(CUDA_ATTENTION_DTYPES))
    copied = kv_start is not None and kv_start.device != q.device
    return decide("attention", q.device, backend, unsupported=unsupported, size=q.numel() + k.numel(),
                  autograd=needs_autograd(q, k, v), explain=explain, trainable=("triton",),
                  host_read=f"kv_start on {kv_start.device} is copied to {q.device}" if copied else None)


def attention_backend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: int | None = None,
                      scale: float | None = None, kv_start: Tensor | None = None,
                      backend: str | None = None) -> BackendChoice:
    """Which backend attention(q, k, v, ...) serves this call with, why each other backend cannot, and
    whether the call is capturable in a CUDA graph (see BackendChoice). The arguments are attention's,
    checked as it checks them; nothing runs."""
    _check(q, k, v, causal, window, scale, kv_start)
    return _decide(q, k, v, kv_start, backend)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: int | None = None,
              scale: float | None = None, kv_start: Tensor | None = None, backend: str | None = None) -> Tensor:
    """Fused attention for prompts (prefill).

    q [B, Sq, H, D], k and v [B, Sk, H, D], Sq <= Sk, any strides with unit stride on D (views into a
    fused QKV output, or [B, H, S, D] tensors transposed, need no copy); float16 / bfloat16 / float32
    (float64 on the torch backend). The queries are the last Sq key positions (bottom-right aligned).
    causal: key j visible to query position p iff j <= p. window=W (causal only): also j > p - W; tiles
    outside the window are skipped, so the work is O(S * W). scale: defaults to D^-0.5 (GPT-Neo: 1.0).
    kv_start int32 [B] (on q's device; a CPU tensor is copied there): keys before it are left padding;
    a query with no visible key returns zeros. Returns a contiguous [B, Sq, H, D] in q's dtype.
    Backends: "cuda" (float16/bfloat16, D in 64/80/96/128, 16-byte aligned rows), "triton" (any float
    dtype, D up to 256; float32 with IEEE dots), "torch" (SDPA with the mask, O(S^2) memory, any D). Calls
    that need autograd train on the Triton kernels (FlashAttention-2's backward, O(S) memory), or on the
    reference where Triton cannot run them. attention_backend(...) says which backend a call gets, and
    why."""
    _check(q, k, v, causal, window, scale, kv_start)
    chosen = _decide(q, k, v, kv_start, backend, explain=False).backend
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    kv_start = kv_start.to(q.device) if kv_start is not None else None  # a CPU one is copied over
    if chosen == "reference":
        return attention_reference(q, k, v, causal=causal, window=window, scale=scale, kv_start=kv_start)
    if chosen == "torch":
        return _attention_torch(q, k, v, causal, window, scale, kv_start)
    if chosen == "cuda":
        return torch.ops.fusedgpt.attention(q, k, v, causal, window, scale, kv_start)
    if needs_autograd(q, k, v):
        return _attention_triton_trained(q, k, v, causal, window, scale, kv_start)
    return _attention_triton(q, k, v, causal, window, scale, kv_start)
