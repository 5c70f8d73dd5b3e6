"""The compiled extension fusedgpt._C: it loads, registers every op with the expected schema, records its
architectures, and its C++ checks reject bad input with messages that name the argument. These run on
the CPU: the ops are registered for CPU tensors too, where they validate and then refuse to launch.

CI sets FUSEDGPT_REQUIRE_EXTENSION=1 so that a missing build fails here instead of skipping."""

import os

import pytest
import torch

import fusedgpt

if not fusedgpt.extension_available():
    if os.environ.get("FUSEDGPT_REQUIRE_EXTENSION", "0") != "0":
        pytest.fail(f"FUSEDGPT_REQUIRE_EXTENSION is set but {fusedgpt.extension_unavailable_reason()}",
                    pytrace=False)
    pytest.skip(f"the CUDA extension is not built: {fusedgpt.extension_unavailable_reason()}", allow_module_level=True)

ops = torch.ops.fusedgpt

SCHEMAS = {
    "layer_norm": "fusedgpt::layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor",
    "add_layer_norm": "fusedgpt::add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, "
                      "float eps) -> (Tensor, Tensor)",
    "layer_norm_backward": "fusedgpt::layer_norm_backward(Tensor grad, Tensor? grad_sum, Tensor s, Tensor? weight, "
                           "float eps, bool has_residual) -> (Tensor, Tensor, Tensor, Tensor)",
    "bias_act": "fusedgpt::bias_act(Tensor x, Tensor? bias, str activation) -> Tensor",
    "bias_act_backward": "fusedgpt::bias_act_backward(Tensor grad, Tensor x, Tensor? bias, str activation) -> "
                         "(Tensor, Tensor)",
    "kv_append": "fusedgpt::kv_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
                 "Tensor positions) -> ()",
    "attention": "fusedgpt::attention(Tensor q, Tensor k, Tensor v, bool causal, int? window, float scale, "
                 "Tensor? kv_start) -> Tensor",
    "decode_attention": "fusedgpt::decode_attention(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, "
                        "Tensor cache_lens, Tensor? k, Tensor? v, int? window, float scale, Tensor? kv_start, "
                        "int num_splits) -> Tensor",
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_is_registered_with_its_schema(name):
    assert str(getattr(ops, name).default._schema) == SCHEMAS[name]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedgpt::{name}", "CUDA")


def test_build_records_its_architectures():
    archs = fusedgpt.extension_cuda_archs()
    assert archs and all(arch[:2].isdigit() for arch in archs), archs


def _cache(*shape, dtype=torch.float16):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("call,match", [
    # layer_norm / add_layer_norm
    (lambda: ops.layer_norm(torch.randn(4, 8), None, None, 1e-5), "x must be a CUDA tensor, got cpu"),
    (lambda: ops.layer_norm(torch.zeros(4, 8, dtype=torch.int32), None, None, 1e-5),
     "x must be float16, bfloat16 or float32, got Int"),
    (lambda: ops.layer_norm(torch.randn(2, 16385), None, None, 1e-5), r"hidden size\) must be in \[1, 16384\]"),
    (lambda: ops.layer_norm(torch.randn(8, 4).t(), None, None, 1e-5), "x must have a contiguous last dimension"),
    (lambda: ops.layer_norm(torch.randn(4, 8), torch.randn(7), None, 1e-5), r"weight must have shape \[8\]"),
    (lambda: ops.layer_norm(torch.randn(4, 8), None, torch.randn(8).half(), 1e-5), "bias must have the dtype of x"),
    (lambda: ops.layer_norm(torch.randn(4, 8), None, None, -1.0), "eps must be non-negative"),
    (lambda: ops.add_layer_norm(torch.randn(4, 8), torch.randn(4, 9), None, None, 1e-5),
     "residual must have the shape of x"),
    (lambda: ops.add_layer_norm(torch.randn(4, 8), torch.randn(4, 8).double(), None, None, 1e-5),
     "residual must have the dtype of x"),
    # bias_act
    (lambda: ops.bias_act(torch.randn(4, 8), None, "relu"), "x must be a CUDA tensor, got cpu"),
    (lambda: ops.bias_act(torch.randn(4, 8), None, "swish"), 'activation must be "gelu_tanh", "gelu" or "relu"'),
    (lambda: ops.bias_act(torch.randn(4, 8), torch.randn(4), "gelu"), r"bias must have shape \[8\]"),
    (lambda: ops.layer_norm_backward(torch.randn(4, 7), None, torch.randn(4, 8), None, 1e-5, False),
     r"grad must have the shape of s \(\[4, 8\]\)"),
    (lambda: ops.layer_norm_backward(torch.randn(4, 8), None, torch.randn(4, 8), torch.randn(3), 1e-5, False),
     r"weight must have shape \[8\]"),
    (lambda: ops.bias_act_backward(torch.randn(4, 7), torch.randn(4, 8), None, "gelu"),
     r"grad must have the shape of x \(\[4, 8\]\)"),
    (lambda: ops.bias_act_backward(torch.randn(4, 8), torch.randn(4, 8), None, "relu"), "x must be a CUDA tensor"),
    (lambda: ops.bias_act(torch.randn(4, 8).long(), None, "gelu"), "x must be float16, bfloat16 or float32"),
    # kv_append
    (lambda: ops.kv_append(_cache(2, 8, 3, 16), _cache(2, 8, 3, 16), _cache(2, 1, 3, 16), _cache(2, 1, 3, 16),
                           torch.tensor([0, 1], dtype=torch.int32)), "k_cache must be a CUDA tensor, got cpu"),
    (lambda: ops.kv_append(_cache(8, 3, 16), _cache(8, 3, 16), _cache(2, 1, 3, 16), _cache(2, 1, 3, 16),
                           torch.zeros(2, dtype=torch.int32)), r"k_cache must have rank 4 \(\[B, S, H, D\]\)"),
    (lambda: ops.kv_append(_cache(2, 8, 3, 16), _cache(2, 8, 3, 16).float(), _cache(2, 1, 3, 16),
                           _cache(2, 1, 3, 16), torch.zeros(2, dtype=torch.int32)), "v_cache must have the dtype"),
    (lambda: ops.kv_append(_cache(2, 8, 3, 16), _cache(2, 8, 3, 16), _cache(2, 1, 4, 16), _cache(2, 1, 4, 16),
                           torch.zeros(2, dtype=torch.int32)), r"k must have shape \[B, T, H, D\]"),
    (lambda: ops.kv_append(_cache(2, 8, 3, 16), _cache(2, 8, 3, 16), _cache(2, 1, 3, 16), _cache(2, 2, 3, 16),
                           torch.zeros(2, dtype=torch.int32)), "v must have the shape of k"),
    (lambda: ops.kv_append(_cache(2, 4, 3, 16), _cache(2, 4, 3, 16), _cache(2, 5, 3, 16), _cache(2, 5, 3, 16),
                           torch.zeros(2, dtype=torch.int32)), "the cache is too small"),
    (lambda: ops.kv_append(_cache(2, 8, 3, 16), _cache(2, 8, 3, 16), _cache(2, 1, 3, 16), _cache(2, 1, 3, 16),
                           torch.zeros(2, dtype=torch.int64)), "positions must be int32"),
    (lambda: ops.kv_append(_cache(2, 8, 3, 16), _cache(2, 8, 3, 16), _cache(2, 1, 3, 16), _cache(2, 1, 3, 16),
                           torch.zeros(3, dtype=torch.int32)), r"positions must have shape \[2\]"),
    (lambda: ops.kv_append(_cache(2, 8, 3, 16), _cache(2, 8, 3, 16), _cache(2, 2, 3, 16), _cache(2, 2, 3, 16),
                           torch.tensor([0, -1], dtype=torch.int32)), r"positions\[1\] = -1 is out of range"),
    (lambda: ops.kv_append(_cache(2, 8, 3, 16), _cache(2, 8, 3, 16), _cache(2, 2, 3, 16), _cache(2, 2, 3, 16),
                           torch.tensor([0, 99, 50, 7], dtype=torch.int32)[::2]),  # strided host positions
     r"positions\[1\] = 50 is out of range"),
    (lambda: ops.kv_append(_cache(2, 8, 3, 16), _cache(2, 8, 3, 16), _cache(2, 2, 3, 16), _cache(2, 2, 3, 16),
                           torch.tensor([7, 0], dtype=torch.int32)),
     r"positions\[0\] = 7 is out of range: appending 2 tokens to a cache of length 8 needs 0 <= positions\[b\] <= 6"),
    # attention
    (lambda: ops.attention(_cache(1, 4, 2, 64), _cache(1, 6, 2, 64), _cache(1, 6, 2, 64), True, None, 0.1, None),
     "q must be a CUDA tensor, got cpu"),
    (lambda: ops.attention(_cache(4, 2, 64), _cache(1, 6, 2, 64), _cache(1, 6, 2, 64), True, None, 0.1, None),
     r"q must have rank 4"),
    (lambda: ops.attention(*(_cache(1, 4, 2, 64, dtype=torch.float32),) * 3, True, None, 0.1, None),
     "q must be float16 or bfloat16"),
    (lambda: ops.attention(_cache(1, 4, 2, 64), _cache(1, 6, 2, 64), _cache(1, 5, 2, 64), True, None, 0.1, None),
     "v must have the shape of k"),
    (lambda: ops.attention(_cache(1, 8, 2, 64), _cache(1, 6, 2, 64), _cache(1, 6, 2, 64), True, None, 0.1, None),
     r"q has more tokens \(8\) than k \(6\)"),
    (lambda: ops.attention(*(_cache(1, 4, 2, 48),) * 3, True, None, 0.1, None), "head dim D must be 64, 80, 96 or 128"),
    (lambda: ops.attention(*(_cache(1, 4, 2, 64),) * 3, True, 0, 0.1, None), "window must be a positive int"),
    (lambda: ops.attention(*(_cache(1, 4, 2, 64),) * 3, False, 8, 0.1, None), "window needs causal=True"),
    (lambda: ops.attention(*(_cache(2, 4, 2, 64),) * 3, True, None, 0.1, torch.zeros(3, dtype=torch.int32)),
     r"kv_start must have shape \[2\]"),
    (lambda: ops.attention(*(_cache(1, 4, 2, 66)[..., :64],) * 3, True, None, 0.1, None), "16-byte aligned"),
    # decode_attention
    (lambda: ops.decode_attention(_cache(1, 1, 2, 64), _cache(1, 8, 2, 64), _cache(1, 8, 2, 64),
                                  torch.tensor([3], dtype=torch.int32), None, None, None, 0.1, None, 1),
     "q must be a CUDA tensor, got cpu"),
    (lambda: ops.decode_attention(_cache(1, 1, 2, 64), _cache(1, 8, 2, 64), _cache(1, 8, 2, 64),
                                  torch.tensor([3], dtype=torch.int32), _cache(1, 1, 2, 64), None, None, 0.1, None, 1),
     "give both k and v"),
    (lambda: ops.decode_attention(_cache(1, 17, 2, 64), _cache(1, 32, 2, 64), _cache(1, 32, 2, 64),
                                  torch.tensor([3], dtype=torch.int32), None, None, None, 0.1, None, 1),
     "1 to 16 tokens"),
    (lambda: ops.decode_attention(_cache(1, 1, 2, 48), _cache(1, 8, 2, 48), _cache(1, 8, 2, 48),
                                  torch.tensor([3], dtype=torch.int32), None, None, None, 0.1, None, 1),
     "head dim D must be 64, 80, 96 or 128"),
    (lambda: ops.decode_attention(_cache(1, 1, 2, 64), _cache(1, 8, 3, 64), _cache(1, 8, 3, 64),
                                  torch.tensor([3], dtype=torch.int32), None, None, None, 0.1, None, 1),
     r"k_cache must have shape \[B, S_max, H, D\]"),
    (lambda: ops.decode_attention(_cache(1, 2, 2, 64), _cache(1, 1, 2, 64), _cache(1, 1, 2, 64),
                                  torch.tensor([0], dtype=torch.int32), _cache(1, 2, 2, 64), _cache(1, 2, 2, 64), None,
                                  0.1, None, 1), "the cache is too small"),
    (lambda: ops.decode_attention(_cache(1, 1, 2, 64), _cache(1, 8, 2, 64), _cache(1, 8, 2, 64),
                                  torch.tensor([3]), None, None, None, 0.1, None, 1), "cache_lens must be int32"),
    (lambda: ops.decode_attention(_cache(1, 1, 2, 64), _cache(1, 8, 2, 64), _cache(1, 8, 2, 64),
                                  torch.tensor([3], dtype=torch.int32), None, None, None, 0.1, None, -1),
     r"num_splits must be in \[0, 1024\] \(0: sized from occupancy\)"),
])
def test_cpp_checks_name_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
