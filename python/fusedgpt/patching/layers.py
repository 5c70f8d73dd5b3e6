"""What the families' patched forwards share: the LayerNorm class patch() swaps in, bias + activation
through fusedgpt.ops.bias_act (with the plain expression for inputs the op cannot take), the MLP forward
of GPT-2 and GPT-Neo, the *ForCausalLM forward whose training loss never holds the logits, and the
binding of a call to the original forward's argument names.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from fusedgpt.nn import LayerNorm
from fusedgpt.nn.bias_act import HF_ACTIVATIONS
from fusedgpt.ops import bias_act, linear_cross_entropy

Tensor = torch.Tensor

# transformers' activation names (config.activation_function) -> fusedgpt.ops.bias_act's: the models'
# table, so both paths accept the same activations.
FUSED_ACTIVATIONS = HF_ACTIVATIONS


class PatchedLayerNorm(LayerNorm):
    """The class patch() gives a model's torch.nn.LayerNorm modules: fusedgpt.nn.LayerNorm (forward(x) or
    forward(x, residual) -> (LN(x + residual), x + residual)), except that inputs the fused op cannot
    take — mixed dtypes under autocast — run torch's layer_norm on the same math."""

    def forward(self, x: Tensor, residual: Tensor | None = None):
        if self._fusable(x, residual):
            return super().forward(x, residual)
        total = x if residual is None else x + residual
        y = F.layer_norm(total, self.normalized_shape, self.weight, self.bias, self.eps)
        return y if residual is None else (y, total)

    def _fusable(self, x: Tensor, residual: Tensor | None) -> bool:
        tensors = [t for t in (self.weight, self.bias, residual) if t is not None]
        return (x.stride(-1) == 1 and all(t.dtype == x.dtype and t.device == x.device for t in tensors)
                and (residual is None or (residual.shape == x.shape and residual.stride(-1) == 1)))


def fused_bias_act(hidden: Tensor, bias: Tensor | None, activation: str, act_module) -> Tensor:
    """bias_act(hidden, bias) where the op takes it; act_module(hidden + bias) otherwise (autocast)."""
    if bias is None or (bias.dtype == hidden.dtype and bias.device == hidden.device):
        return bias_act(hidden, bias, activation)
    return act_module(hidden + bias)


def mlp_forward(activation: str, conv1d: bool):
    def forward(self, hidden_states):
        """GPT2MLP / GPTNeoMLP.forward with c_fc's bias joined to the activation. GPT-2's Conv1D is
        y = x @ W + b with W [in, out]; GPT-Neo's Linear is y = x @ W.T + b."""
        weight = self.c_fc.weight
        hidden = torch.matmul(hidden_states, weight) if conv1d else F.linear(hidden_states, weight)  # (..., inner)
        hidden = fused_bias_act(hidden, self.c_fc.bias, activation, self.act)
        return self.dropout(self.c_proj(hidden))
    return forward


@functools.cache
def _signature(forward) -> inspect.Signature:
    return inspect.signature(forward)


def named_arguments(forward, module, *args, **kwargs) -> dict:
    """The arguments of a call to the original `forward`, by the names it gives them (its **kwargs merged
    in; defaults left out). A patched forward passes them on under those names: transformers renamed
    `past_key_values` to `cache` (5.2x), and this works, without deprecation warnings, on either side."""
    arguments = dict(_signature(forward).bind(module, *args, **kwargs).arguments)
    arguments.pop("self", None)
    arguments.update(arguments.pop("kwargs", {}))
    return arguments


def causal_lm_forward(original):
    """GPT2LMHeadModel / OPTForCausalLM / GPTNeoForCausalLM.forward, except that a call with labels while
    gradients are on (training) runs the model with its head as the identity, so that the "logits" are the
    last hidden states [B, S, E], and takes the loss from fusedgpt.ops.linear_cross_entropy on them and
    the head's weight: the [B * S, V] logits are never made, and the output's logits are None (as
    Liger-Kernel's fused-loss forwards return). The loss is transformers' ForCausalLMLoss: position t
    predicts labels[t + 1], -100 ignored, the mean over the counted tokens, or their sum divided by
    num_items_in_batch when the Trainer passes it (gradient accumulation). It keeps the original's
    signature (functools.wraps), which generate() inspects to decide what to pass (position ids...)."""
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        arguments = named_arguments(original, self, *args, **kwargs)
        labels = arguments.pop("labels", None)
        if labels is None or not torch.is_grad_enabled():
            return original(self, *args, **kwargs)
        head = self.get_output_embeddings()
        own = head.__dict__.get("forward")
        head.forward = _identity
        try:
            out = original(self, **arguments)
        finally:
            if own is None:
                del head.forward
            else:
                head.forward = own
        hidden = out[0] if isinstance(out, tuple) else out.logits  # (B, S, E): the head was the identity
        weight = head.weight if head.weight.dtype == hidden.dtype else head.weight.to(hidden.dtype)
        bias = head.bias if head.bias is None or head.bias.dtype == hidden.dtype else head.bias.to(hidden.dtype)
        shifted = labels.to(hidden.device)[:, 1:].reshape(-1)  # (B * (S - 1),)
        loss = linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight, shifted, bias)
        items = arguments.get("num_items_in_batch")
        if items is not None:  # the sum over this batch's counted tokens, over the accumulated batches' count
            loss = loss * (shifted != -100).sum() / items
        if isinstance(out, tuple):
            return (loss, None, *out[1:])
        fields = {key: value for key, value in out.items() if key not in ("loss", "logits")}
        return type(out)(loss=loss, logits=None, **fields)
    return forward


def _identity(hidden: Tensor) -> Tensor:
    return hidden
