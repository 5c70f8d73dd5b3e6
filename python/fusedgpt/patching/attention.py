"""The "fusedgpt" entries of transformers' AttentionMaskInterface (fusedgpt_mask) and AttentionInterface
(fusedgpt_attention), the check of what the kernels can serve, and the fallback to transformers' own
eager attention, warned once per reason. GPT-2 and OPT reach the kernels through both entries; GPT-Neo's
patched attention forward (gpt_neo.py) through the mask entry and the pieces here.

The mask that reaches the kernels. transformers builds one mask per forward through
AttentionMaskInterface; ours turns the 2D padding mask into a compact int32 tensor the kernels read:
  None                 no padding, and the keys end with the queries: plain causal;
  [B, 1, 1, 1]         kv_start per sequence (left padding: keys before it are padding);
  [B, 1, 1, 2]         (kv_start, keys filled) when the cache holds more slots than are filled
                       (transformers' static cache): the queries are the last positions of the filled
                       keys. It is 4D so that transformers passes it through unchanged (generate builds
                       static-cache masks ahead of the forward); an int32 4D mask of that shape given by
                       a caller would be read as ours (transformers' own masks are bool or float).
The keys filled in a static cache live on the device, so a compiled decode step never reads them on the
host: up to 16 new tokens go to fusedgpt.ops.decode_attention (which bounds the keys by that length),
longer prompts over a static cache read the length once (not capturable) and slice the keys.
A dynamic cache gives keys that end with the queries (Sq <= Sk): fusedgpt.ops.attention, whose queries
are bottom-right aligned. Which positions see which is fusedgpt.ops.attention's rule (visible_positions),
also for the mask the eager fallback gets.

transformers is optional: its objects used here are bound by load_transformers(), which register() calls.
"""

from __future__ import annotations

import sys
import warnings

import torch

from fusedgpt.ops import attention, decode_attention
from fusedgpt.ops.attention import visible_positions
from fusedgpt.ops.decode_attention import MAX_NEW_TOKENS

Tensor = torch.Tensor

ATTENTION_NAME = "fusedgpt"  # the key in transformers' AttentionInterface and AttentionMaskInterface

# transformers' objects, bound by load_transformers().
_causal_mask_function = None
_eager_mask = None
_output_collector = None

_warned: set[str] = set()
_FOUR_D_MASK = "a 4D attention mask (the caller's, or transformers' eager mask for a case named in an earlier warning)"


def load_transformers() -> None:
    """Binds the transformers objects the mask and attention functions use (imports transformers)."""
    global _causal_mask_function, _eager_mask, _output_collector
    from transformers.masking_utils import causal_mask_function, eager_mask

    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers layout: output_attentions is then not detected for GPT-2 / OPT
        _active_collector = None
    _causal_mask_function, _eager_mask, _output_collector = causal_mask_function, eager_mask, _active_collector


def warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fusedgpt: {reason}: the fused kernels cannot serve it, so these calls run transformers' "
                      "eager attention (warned once)", UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------
# The mask (AttentionMaskInterface)
# ----------------------------------------------------------------------------------------------------

def _is_descriptor(mask) -> bool:
    """Our compact mask (see the module docstring), as opposed to a 4D bool / float mask."""
    return (isinstance(mask, Tensor) and mask.dtype == torch.int32 and mask.dim() == 4
            and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] in (1, 2))


def fusedgpt_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask: Tensor | None = None, device="cpu", dtype: torch.dtype = torch.float32,
                  **kwargs) -> Tensor | None:
    """transformers' AttentionMaskInterface entry for "fusedgpt": the arguments of its eager / sdpa mask
    functions; returns None, or the int32 [B, 1, 1, 1] / [B, 1, 1, 2] mask of the module docstring.
    Patterns the kernels cannot serve return transformers' eager mask (4D float), which sends the
    attention to its eager fallback."""
    reason = None
    if mask_function is not None and mask_function is not _causal_mask_function:
        reason = "an attention mask other than causal + padding (packed sequences, a bidirectional or custom mask)"
    elif isinstance(kv_offset, Tensor) or kv_offset != 0:
        reason = "a cache that drops old keys (sliding-window cache layers)"
    elif (attention_mask is not None and not isinstance(q_offset, Tensor)
          and attention_mask.shape[-1] != q_offset + q_length):
        reason = "a 2D attention mask whose length is not past + new tokens"
    kv_start = None
    if reason is None and attention_mask is not None:
        padding = attention_mask.to(device=device, dtype=torch.bool)  # (B, L): True = a real token
        leading = (padding.cumsum(-1) == 0).sum(-1)  # (B,) left pads
        # Left padding only: every token after the first real one is real. A host read (as transformers'
        # sdpa mask does), skipped while torch.compile traces, and over a static cache once the mask is
        # longer than the new tokens (the decode steps of transformers' compiled generation, where a
        # sync per token would cost): a right-padded prompt is caught at its prefill; left padding is
        # assumed, as generate produces.
        static_decode = isinstance(q_offset, Tensor) and padding.shape[-1] > q_length
        if (not torch.compiler.is_compiling() and not static_decode
                and not bool((padding.sum(-1) == padding.shape[-1] - leading).all())):
            reason = "a padding mask that is not left padding (right padding or holes)"
        kv_start = leading.to(torch.int32)
    if reason is not None:
        warn_once(reason)
        _warned.add(_FOUR_D_MASK)  # the attention's own warning about the mask returned here would repeat this one
        return _eager_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                           kv_offset=kv_offset, mask_function=mask_function or _causal_mask_function,
                           attention_mask=attention_mask, dtype=dtype, device=device)
    if not isinstance(q_offset, Tensor) and q_offset + q_length == kv_length:  # keys end with the queries
        return None if kv_start is None else kv_start.view(batch_size, 1, 1, 1)
    if kv_start is None:
        kv_start = torch.zeros(batch_size, dtype=torch.int32, device=device)
    # A static cache: kv_length slots, q_offset + q_length of them filled (q_offset is a device tensor).
    filled = torch.as_tensor(q_offset + q_length, device=device).to(torch.int32).expand(batch_size)
    return torch.stack([kv_start, filled], dim=-1).view(batch_size, 1, 1, 2)


def additive_mask(mask, q_length: int, kv_length: int, dtype: torch.dtype, device) -> Tensor:
    """The float [B or 1, 1, Sq, Sk] mask (0 visible, dtype's min hidden) for the eager fallback, from
    None, our descriptor (by fusedgpt.ops.attention's visibility rule: the queries are the last Sq of the
    filled keys) or a 4D mask built by transformers or the caller."""
    if mask is not None and not _is_descriptor(mask):  # already 4D
        if mask.dtype == torch.bool:
            return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask
    key_positions = torch.arange(kv_length, device=device)  # (Sk,)
    first_key, filled = None, kv_length
    if mask is not None:
        first_key = mask[:, 0, 0, 0].to(device, torch.int64).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        if mask.shape[-1] == 2:
            filled = mask[:, 0, 0, 1].to(device, torch.int64).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    query_positions = filled - q_length + torch.arange(q_length, device=device)[:, None]  # (Sq, 1) or (B, 1, Sq, 1)
    visible = visible_positions(query_positions, key_positions, causal=True, window=None, first_key=first_key)
    visible = visible if visible.dim() == 4 else visible[None, None]  # (B or 1, 1, Sq, Sk)
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------------
# Attention (AttentionInterface)
# ----------------------------------------------------------------------------------------------------

def _attentions_requested() -> bool:
    """output_attentions=True (argument or config) in this forward: GPT-2 and OPT do not pass it down to
    the attention function in transformers 5.x, but record it in the output collector their forward sets."""
    if _output_collector is None:
        return False
    collected = _output_collector.get()
    return bool(collected) and "attentions" in collected


def unsupported(query: Tensor, key: Tensor, value: Tensor, mask, *, causal: bool, dropout: float,
                output_attentions: bool, extra: dict | None = None) -> str | None:
    """Why the kernels cannot serve this call (None: they can). query/key/value are [B, S, H, D]; extra:
    the attention function's other keyword arguments."""
    extra = extra or {}
    if output_attentions:
        return "output_attentions=True (the kernels never form the attention weights)"
    if extra.get("head_mask") is not None:
        return "a head_mask"
    for name in ("sliding_window", "softcap", "position_bias", "s_aux"):  # other models' attention features
        if extra.get(name) is not None:
            return f"attention with {name} (a model other than GPT-2 / OPT / GPT-Neo)"
    if query.shape[2] != key.shape[2]:
        return "grouped-query attention (fewer key heads than query heads)"
    if dropout:
        return "attention dropout (a model in training mode)"
    if not causal:
        return "non-causal attention (cross-attention or a bidirectional model)"
    if mask is not None and not _is_descriptor(mask):
        return _FOUR_D_MASK
    if not query.dtype == key.dtype == value.dtype:
        return f"mixed dtypes (query {query.dtype}, key {key.dtype}, value {value.dtype})"
    if query.shape[1] > key.shape[1]:
        return "more queries than keys"
    return None


def run_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, *, scale: float | None,
                  window: int | None) -> Tensor:
    """The fused attention over [B, S, H, D] views; mask is None or our int32 descriptor. Returns a
    contiguous [B, Sq, H, D]."""
    if mask is None:  # no padding, keys end with the queries
        return attention(query, key, value, causal=True, window=window, scale=scale)
    if mask.shape[-1] == 1:  # keys end with the queries (no cache, or a dynamic cache)
        kv_start = mask.reshape(mask.shape[0]).to(query.device)  # (B,) int32, a view
        return attention(query, key, value, causal=True, window=window, scale=scale, kv_start=kv_start)
    kv_start = mask[:, 0, 0, 0].to(query.device).contiguous()  # (B,) int32
    filled = mask[:, 0, 0, 1].to(query.device).contiguous()  # (B,) keys filled in a static cache
    if query.shape[1] <= MAX_NEW_TOKENS:  # decode steps: the length stays on the device (capturable)
        return decode_attention(query, key, value, filled, window=window, scale=scale, kv_start=kv_start)
    end = int(filled[0])  # a long prompt over a static cache: one host read, then the filled keys only
    return attention(query, key[:, :end], value[:, :end], causal=True, window=window, scale=scale, kv_start=kv_start)


def _eager_attention(module, query: Tensor, key: Tensor, value: Tensor, mask, scaling, dropout, **kwargs):
    """transformers' own eager attention on [B, H, S, D] (the fallback): the module's family's
    eager_attention_forward (GPT-2's where the module's file has none), or GPT-2's fp32 upcast path where
    the model asks for it."""
    additive = additive_mask(mask, query.shape[2], key.shape[2], query.dtype, query.device)
    if getattr(module, "reorder_and_upcast_attn", False) and hasattr(module, "_upcast_and_reordered_attn"):
        return module._upcast_and_reordered_attn(query, key, value, additive)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:  # imported here: register() can run while transformers is importing GPT-2's file
        from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward as eager
    return eager(module, query, key, value, additive, scaling=scaling, dropout=dropout, **kwargs)


def fusedgpt_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                       dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                       **kwargs) -> tuple[Tensor, Tensor | None]:
    """transformers' AttentionInterface entry for "fusedgpt" (GPT-2, OPT): query [B, H, Sq, D], key and
    value [B, H, Sk, D] (the cache's keys when there is one), the mask fusedgpt_mask built, the scaling
    (None: D^-0.5). Returns ([B, Sq, H, D] contiguous, None); the fallbacks return eager's weights."""
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D) views
    reason = unsupported(q, k, v, attention_mask, causal=causal, dropout=dropout,
                         output_attentions=_attentions_requested(), extra=kwargs)
    if reason is not None:
        warn_once(reason)
        return _eager_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return run_attention(q, k, v, attention_mask, scale=scaling, window=None), None
