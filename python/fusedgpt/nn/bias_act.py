"""fusedgpt.nn.LinearAct: a Linear layer followed by an activation, with the bias add fused into the
activation kernel (the first projection of a GPT MLP: c_fc + gelu_new in GPT-2, fc1 + relu in OPT)."""

from __future__ import annotations

import torch

from fusedgpt.ops._limits import ACTIVATIONS
from fusedgpt.ops.bias_act import bias_act

# Hugging Face's activation_function names -> the activation LinearAct runs for them (the models' config
# conversion and patch() both read it, from here: the layer below them).
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "gelu": "gelu", "relu": "relu"}


class LinearAct(torch.nn.Linear):
    """torch.nn.Linear (same constructor, `weight` [out, in] and `bias` [out], same state-dict keys) whose
    forward is activation(x @ weight.T + bias), with the bias + activation in one fused kernel after the
    matmul. activation: "gelu_tanh", "gelu" or "relu"."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "gelu_tanh",
                 device=None, dtype=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"fusedgpt.nn.LinearAct: activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.linear(x, self.weight)
        # Under autocast h is in the autocast dtype while the bias stays fp32: cast the N-element bias.
        bias = self.bias if self.bias is None or self.bias.dtype == h.dtype else self.bias.to(h.dtype)
        return bias_act(h, bias, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
