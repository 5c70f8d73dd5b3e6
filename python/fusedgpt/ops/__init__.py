"""fusedgpt's ops: one module per kernel family, each with its reference, public function, backend
decision (<family>_backend: which backend serves a call, and why the others cannot) and custom-op
registrations (CONVENTIONS.md, "The op contract"); what each backend supports is in _limits.py."""

from fusedgpt.ops._backend import BACKENDS, BackendChoice, choose_backend
from fusedgpt.ops.attention import attention, attention_backend, attention_reference
from fusedgpt.ops.decode_attention import (DecodeAttentionPlan, decode_attention, decode_attention_backend,
                                           decode_attention_plan, decode_attention_reference)
from fusedgpt.ops.bias_act import bias_act, bias_act_backend, bias_act_reference
from fusedgpt.ops.kv_append import kv_append, kv_append_backend, kv_append_reference
from fusedgpt.ops.layer_norm import layer_norm, layer_norm_backend, layer_norm_reference
from fusedgpt.ops.linear_cross_entropy import (linear_cross_entropy, linear_cross_entropy_backend,
                                               linear_cross_entropy_reference)

__all__ = [
    "BACKENDS", "BackendChoice", "choose_backend",
    "attention", "attention_backend", "attention_reference",
    "bias_act", "bias_act_backend", "bias_act_reference",
    "DecodeAttentionPlan", "decode_attention", "decode_attention_backend", "decode_attention_plan",
    "decode_attention_reference",
    "kv_append", "kv_append_backend", "kv_append_reference",
    "layer_norm", "layer_norm_backend", "layer_norm_reference",
    "linear_cross_entropy", "linear_cross_entropy_backend", "linear_cross_entropy_reference",
]
