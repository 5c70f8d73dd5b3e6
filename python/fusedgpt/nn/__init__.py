"""Drop-in nn.Modules on fusedgpt's fused ops, with the parameter names and state-dict keys of the
torch.nn modules they replace (so checkpoints load unchanged)."""

from fusedgpt.nn.bias_act import LinearAct
from fusedgpt.nn.layer_norm import LayerNorm

__all__ = ["LayerNorm", "LinearAct"]
