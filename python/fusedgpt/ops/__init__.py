"""fusedgpt's ops: one module per kernel family, each with its reference, public function and
custom-op registrations (CONVENTIONS.md, "The op contract")."""

from fusedgpt.ops._backend import BACKENDS, choose_backend
from fusedgpt.ops.attention import attention, attention_reference
from fusedgpt.ops.decode_attention import decode_attention, decode_attention_reference
from fusedgpt.ops.bias_act import bias_act, bias_act_reference
from fusedgpt.ops.kv_append import kv_append, kv_append_reference
from fusedgpt.ops.layer_norm import layer_norm, layer_norm_reference

__all__ = [
    "BACKENDS", "choose_backend",
    "attention", "attention_reference",
    "bias_act", "bias_act_reference",
    "decode_attention", "decode_attention_reference",
    "kv_append", "kv_append_reference",
    "layer_norm", "layer_norm_reference",
]
