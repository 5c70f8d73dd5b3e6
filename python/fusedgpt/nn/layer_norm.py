"""fusedgpt.nn.LayerNorm: torch.nn.LayerNorm on the fused kernel, with the residual add folded in."""

from __future__ import annotations

import torch

from fusedgpt.ops.layer_norm import layer_norm


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm (same constructor, parameters `weight` / `bias`, state-dict keys) whose forward
    runs fusedgpt.ops.layer_norm over the last dim.

    forward(x) -> LN(x); forward(x, residual) -> (LN(x + residual), x + residual), the pre-LN block's
    add+norm in one pass. normalized_shape must be a single dim (the hidden size)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"fusedgpt.nn.LayerNorm: normalized_shape must be one dim (the hidden size), "
                             f"got {self.normalized_shape}")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # Parameters in another dtype than x (fp32 weights under autocast): cast the C-element vectors.
        weight = self.weight if self.weight is None or self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return layer_norm(x, weight, bias, self.eps, residual)
