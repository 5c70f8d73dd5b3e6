// fusedgpt operator schemas: the one place the `fusedgpt` torch.library namespace is declared.
// Kernels live in csrc/<family>/<family>.cu and register themselves with TORCH_LIBRARY_IMPL;
// fake (meta) implementations live in python/fusedgpt/ops/<family>.py.
#include <torch/library.h>

#include <iterator>
#include <string>
#include <vector>

#include "op_limits.h"

#ifndef FUSEDGPT_CUDA_ARCHS
#define FUSEDGPT_CUDA_ARCHS unknown
#endif
#define FUSEDGPT_STRINGIFY_(x) #x
#define FUSEDGPT_STRINGIFY(x) FUSEDGPT_STRINGIFY_(x)

namespace fusedgpt {
namespace {
// Which GPU architectures this library was compiled for, e.g. "80,90,90ptx". The build passes them as one
// preprocessor token joined by '_' (-DFUSEDGPT_CUDA_ARCHS=80_90_90ptx): a comma would be split by nvcc's
// and CMake's argument handling.
std::string cuda_archs() {
  std::string archs = FUSEDGPT_STRINGIFY(FUSEDGPT_CUDA_ARCHS);
  for (char& c : archs) {
    if (c == '_') c = ',';
  }
  return archs;
}
}  // namespace
}  // namespace fusedgpt

namespace fusedgpt {
// The head dims this library's attention kernels were instantiated for (op_limits.h, generated from
// python/fusedgpt/ops/_limits.py), which the tests hold to the Python side's list.
static std::vector<int64_t> cuda_head_dims() {
  return {std::begin(kAttentionHeadDims), std::end(kAttentionHeadDims)};
}
}  // namespace fusedgpt

TORCH_LIBRARY(fusedgpt, m) {
  m.def("cuda_archs() -> str", &fusedgpt::cuda_archs);
  m.def("cuda_head_dims() -> int[]", &fusedgpt::cuda_head_dims);
  // y = LayerNorm(x) over the last dim.
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  // s = x + residual; y = LayerNorm(s). Returns (y, s).
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)");
  // (dx, dresidual, dweight, dbias) of either, from s (what was normalised) and the gradients of y (and of
  // the returned sum); dresidual equals dx (empty without a residual), dweight / dbias are fp32.
  m.def("layer_norm_backward(Tensor grad, Tensor? grad_sum, Tensor s, Tensor? weight, float eps, "
        "bool has_residual) -> (Tensor, Tensor, Tensor, Tensor)");
  // y = activation(x + bias), activation in {"gelu_tanh", "gelu", "relu"}.
  m.def("bias_act(Tensor x, Tensor? bias, str activation) -> Tensor");
  // (dx, dbias) of bias_act: dx = grad * activation'(x + bias), dbias = sum of dx over rows (empty: no bias).
  m.def("bias_act_backward(Tensor grad, Tensor x, Tensor? bias, str activation) -> (Tensor, Tensor)");
  // k_cache[b, positions[b] + t] = k[b, t] (same for v), for every sequence whose block fits the cache.
  m.def("kv_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor positions) -> ()");
  // Prefill attention over [B, S, H, D]: causal / sliding window / left padding (kv_start).
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal, int? window, float scale, Tensor? kv_start) -> Tensor");
  // Decode attention over the KV cache; with k, v it also appends them at cache_lens (in place).
  m.def("decode_attention(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_lens, Tensor? k, "
        "Tensor? v, int? window, float scale, Tensor? kv_start, int num_splits) -> Tensor");
}

#ifdef FUSEDGPT_PYTHON_MODULE
// Built by setup.py as the Python module fusedgpt._C: importing it runs the registrations above.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif
