"""What the families' patched forwards share: the LayerNorm class patch() swaps in, bias + activation
through fusedgpt.ops.bias_act (with the plain expression for inputs the op cannot take), the MLP forward
of GPT-2 and GPT-Neo, and the binding of a call to the original forward's argument names.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from fusedgpt.nn import LayerNorm
from fusedgpt.nn.bias_act import HF_ACTIVATIONS
from fusedgpt.ops import bias_act

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
