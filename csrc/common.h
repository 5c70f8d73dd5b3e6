// Shared helpers for fusedgpt's CUDA kernels: argument checks with messages that name the argument,
// 16-byte vector access, dtype dispatch and block reductions, and (from intrinsics.h) the wrappers of
// the device intrinsics. Light includes only (no ATen/cuda/CUDAContext.h: it drags in cuBLAS/cuSPARSE
// headers a minimal CUDA toolkit lacks).
// The kernels also run on the CPU, in the SIMT emulator of tests/simt; intrinsics.h is the one file of
// csrc/ that knows it. Every new intrinsic (inline PTX: cp.async, ldmatrix, another mma, ...) gets its
// emulator twin and selftest in tests/simt first, then a wrapper in intrinsics.h that kernels call;
// intrinsics.h's header spells out the rule.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "intrinsics.h"
#include "op_limits.h"

namespace fusedgpt {

// ---- argument checks (every message starts "fusedgpt::<op>: <argument> ...") -----------------------

#define FUSEDGPT_CHECK(cond, op, ...) TORCH_CHECK((cond), "fusedgpt::", op, ": ", __VA_ARGS__)

inline void check_dtype_in(const char* op, const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  FUSEDGPT_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, op, name,
                 " must be float16, bfloat16 or float32, got ", dt);
}

inline void check_same_dtype(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  FUSEDGPT_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " must have the dtype of ", ref_name, " (",
                 ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  FUSEDGPT_CHECK(t.device() == ref.device(), op, name, " must be on the device of ", ref_name, " (",
                 ref.device(), "), got ", t.device());
}

inline void check_unit_last_stride(const char* op, const at::Tensor& t, const char* name) {
  FUSEDGPT_CHECK(t.dim() >= 1 && (t.stride(-1) == 1 || t.size(-1) == 1), op, name,
                 " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

// Called after the device-agnostic checks: the ops are also registered for CPU so that a CPU call
// reports its bad arguments (testable without a GPU) and then this clear error, never a launch.
// Under the CPU emulator of the kernels (tests/simt) CPU tensors stand for device memory.
inline void require_cuda(const char* op, const at::Tensor& t, const char* name) {
  if constexpr (!kSimtEmulation) {
    FUSEDGPT_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor, got ", t.device(),
                   " (fusedgpt.ops.* routes CPU tensors to the PyTorch reference)");
  }
}

// ---- vectors ---------------------------------------------------------------------------------------

// N elements of T loaded or stored as one aligned access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
constexpr int kVec16 = 16 / sizeof(T);  // elements per 16-byte access

inline bool is_aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// ---- dtype dispatch: binds `scalar_t` to c10::Half, c10::BFloat16 or float -----------------------------

#define FUSEDGPT_DISPATCH_FLOAT_TYPES(dtype, op, ...)                               \
  [&] {                                                                             \
    switch (dtype) {                                                                \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }         \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); } \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }            \
      default: TORCH_CHECK(false, "fusedgpt::", op, ": unsupported dtype ", dtype); \
    }                                                                               \
  }()

// ---- head-dim dispatch: the attention kernels' one switch on D -----------------------------------------

// Calls launch(std::integral_constant<int, D>{}) for dim == D, one case per head dim of op_limits.h's
// list (generated from the op contract); any other head dim is an error, never a neighbour's kernel.
template <typename Launch>
void dispatch_head_dim(const char* op, int64_t dim, Launch&& launch) {
  switch (dim) {
#define FUSEDGPT_HEAD_DIM_CASE(D) \
  case D: launch(std::integral_constant<int, D>{}); return;
    FUSEDGPT_ATTENTION_HEAD_DIMS(FUSEDGPT_HEAD_DIM_CASE)
#undef FUSEDGPT_HEAD_DIM_CASE
    default: FUSEDGPT_CHECK(false, op, "no CUDA instantiation for head dim ", dim, " (built for ",
                            FUSEDGPT_ATTENTION_HEAD_DIMS_TEXT, ")");
  }
}

// ---- reductions --------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 33 floats of shared memory; safe to call repeatedly with the same scratch.
__device__ __forceinline__ float block_sum(float value, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  value = warp_sum(value);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    float total = lane < warps ? scratch[lane] : 0.f;
    total = warp_sum(total);
    if (lane == 0) scratch[32] = total;
  }
  __syncthreads();
  const float result = scratch[32];
  __syncthreads();  // scratch may be reused by the next call
  return result;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fusedgpt
