"""OPT's patched forward: OPTDecoderLayer with its residual adds folded into the norms that follow them
and fc1's bias + activation fused. (OPT's attention goes through AttentionInterface, attention.py.)
"""

from __future__ import annotations

import torch.nn.functional as F

from fusedgpt.nn import LayerNorm
from fusedgpt.patching.layers import fused_bias_act, named_arguments


def layer_forward(activation: str | None):
    def forward(self, hidden_states, *args, **kwargs):
        """OPTDecoderLayer.forward with the residual adds folded into the norms that follow them (pre-LN:
        the attention's add into final_layer_norm; post-LN, opt-350m: both adds) when the norms are
        fused, and fc1's bias + activation fused when `activation` is given."""
        arguments = named_arguments(type(self).forward, self, hidden_states, *args, **kwargs)
        hidden_states = arguments.pop("hidden_states")
        arguments.pop("use_cache", None)  # the attention takes the cache itself, not the flag
        fused_norms = isinstance(self.final_layer_norm, LayerNorm)
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        attn_output, _ = self.self_attn(hidden_states=hidden_states, **arguments)
        attn_output = F.dropout(attn_output, p=self.dropout, training=self.training)
        if self.do_layer_norm_before:
            if fused_norms:
                mlp_input, residual = self.final_layer_norm(attn_output, residual)
            else:
                residual = residual + attn_output
                mlp_input = self.final_layer_norm(residual)
        else:
            if fused_norms:
                residual, _ = self.self_attn_layer_norm(attn_output, residual)
            else:
                residual = self.self_attn_layer_norm(residual + attn_output)
            mlp_input = residual
        if activation is None:
            hidden = self.activation_fn(self.fc1(mlp_input))
        else:
            hidden = fused_bias_act(F.linear(mlp_input, self.fc1.weight), self.fc1.bias, activation,
                                    self.activation_fn)
        hidden = F.dropout(self.fc2(hidden), p=self.dropout, training=self.training)
        if self.do_layer_norm_before:
            return residual + hidden
        if fused_norms:
            return self.final_layer_norm(hidden, residual)[0]
        return self.final_layer_norm(residual + hidden)
    return forward
