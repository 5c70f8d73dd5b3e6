// LayerNorm over the last dim, optionally fused with the residual add of a pre-LN block:
//   s = x + residual (rounded to the input dtype, as the unfused block stores it), y = LN(s).
// One thread block per row; the row stays in registers between the mean, variance and normalise
// passes, so x and residual are read from memory once and y (and s) written once.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"
#include "op_limits.h"

namespace fusedgpt {
namespace {

// The contract's largest hidden size (kMaxColumns) must fit one row per block: at most 16 vectors per
// thread (ITERS) of 1024 threads, with one-element vectors for rows that are not 16-byte aligned.
static_assert(kMaxColumns <= 16 * 1024, "layer_norm holds at most 16 vectors per thread of 1024 threads");

// Each thread owns ITERS vectors of VEC columns: column = (iter * blockDim.x + threadIdx.x) * VEC.
template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(1024, 1) layer_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                      const T* __restrict__ weight, const T* __restrict__ bias,
                                      T* __restrict__ y, T* __restrict__ sum_out, int columns,
                                      float inv_columns, int64_t x_row_stride, int64_t residual_row_stride,
                                      float eps) {
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * x_row_stride;
  float values[ITERS][VEC];

  // Statistics of the row shifted by its first element (s[0], rounded as stored): a large common
  // offset then costs no fp32 precision in the mean. Every thread reads it (one cached load).
  float pivot = static_cast<float>(x_row[0]);
  if (residual != nullptr) {
    pivot = static_cast<float>(static_cast<T>(pivot + static_cast<float>(residual[row * residual_row_stride])));
  }
  float local_sum = 0.f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int col = (i * blockDim.x + threadIdx.x) * VEC;
    if (col < columns) {
      Vec<T, VEC> xv = *reinterpret_cast<const Vec<T, VEC>*>(x_row + col);
      if (residual != nullptr) {
        const Vec<T, VEC> rv = *reinterpret_cast<const Vec<T, VEC>*>(residual + row * residual_row_stride + col);
#pragma unroll
        for (int j = 0; j < VEC; ++j) xv.v[j] = static_cast<T>(static_cast<float>(xv.v[j]) + static_cast<float>(rv.v[j]));
        *reinterpret_cast<Vec<T, VEC>*>(sum_out + row * columns + col) = xv;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        values[i][j] = static_cast<float>(xv.v[j]) - pivot;
        local_sum += values[i][j];
      }
    }
  }
  const float mean = block_sum(local_sum, scratch) * inv_columns;  // of the shifted row; 1/C from the host

  float local_squares = 0.f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int col = (i * blockDim.x + threadIdx.x) * VEC;
    if (col < columns) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float centred = values[i][j] - mean;
        local_squares += centred * centred;
      }
    }
  }
  const float rstd = rsqrtf(block_sum(local_squares, scratch) * inv_columns + eps);

#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int col = (i * blockDim.x + threadIdx.x) * VEC;
    if (col < columns) {
      Vec<T, VEC> wv, bv, out;
      if (weight != nullptr) wv = *reinterpret_cast<const Vec<T, VEC>*>(weight + col);
      if (bias != nullptr) bv = *reinterpret_cast<const Vec<T, VEC>*>(bias + col);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float normalised = (values[i][j] - mean) * rstd;
        if (weight != nullptr) normalised *= static_cast<float>(wv.v[j]);
        if (bias != nullptr) normalised += static_cast<float>(bv.v[j]);
        out.v[j] = static_cast<T>(normalised);
      }
      *reinterpret_cast<Vec<T, VEC>*>(y + row * columns + col) = out;
    }
  }
}

// Threads per row and vectors per thread: up to 512 threads with up to 4 vectors each, then up to 1024
// threads with up to 16. Registers hold ITERS * VEC floats per thread; ptxas (sm_90) reports about 60
// registers at ITERS * VEC = 32 and 160 at 64, which would cap residency at one 256-thread block per SM.
constexpr int vectors_per_thread(int64_t vectors) {
  int iters = 1;
  while (iters < 16 && (iters < 4 ? vectors > 512 * iters : vectors > 1024 * iters)) iters *= 2;
  return iters;
}

template <typename T, int VEC>
void launch_layer_norm(const at::Tensor& x2, const T* residual, int64_t residual_row_stride, const T* weight,
                       const T* bias, T* y, T* sum_out, float eps, cudaStream_t stream) {
  const int64_t rows = x2.size(0);
  const int columns = static_cast<int>(x2.size(1));
  const int vectors = static_cast<int>(ceil_div(columns, VEC));  // columns <= kMaxColumns
  const int iters = vectors_per_thread(vectors);
  const int threads = std::max(32, static_cast<int>(ceil_div(ceil_div(vectors, iters), 32) * 32));
  const T* x = reinterpret_cast<const T*>(x2.data_ptr());
  auto launch = [&](auto kernel) {
    kernel<<<rows, threads, 0, stream>>>(x, residual, weight, bias, y, sum_out, columns, 1.f / columns,
                                         x2.stride(0), residual_row_stride, eps);
  };
  // Only the instantiations this VEC can reach (the widest rows, kMaxColumns, need kMaxIters): the others
  // would be compiled for nothing, and the widest of them spill.
  constexpr int kMaxIters = vectors_per_thread((kMaxColumns + VEC - 1) / VEC);
  if (iters == 1) {
    launch(layer_norm_fwd_kernel<T, VEC, 1>);
  } else if (iters == 2) {
    launch(layer_norm_fwd_kernel<T, VEC, 2>);
  } else if (iters == 4) {
    launch(layer_norm_fwd_kernel<T, VEC, 4>);
  } else if constexpr (kMaxIters >= 8) {
    if (iters == 8) {
      launch(layer_norm_fwd_kernel<T, VEC, 8>);
    } else {
      launch(layer_norm_fwd_kernel<T, VEC, 16>);
    }
  } else {
    FUSEDGPT_CHECK(false, "layer_norm", "internal: ", iters, " vectors per thread for ", columns, " columns");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shared by both ops. Returns (y, s); s is undefined without a residual.
std::tuple<at::Tensor, at::Tensor> layer_norm_impl(const char* op, const at::Tensor& x,
                                                   const c10::optional<at::Tensor>& residual,
                                                   const c10::optional<at::Tensor>& weight,
                                                   const c10::optional<at::Tensor>& bias, double eps) {
  check_dtype_in(op, x, "x");
  check_unit_last_stride(op, x, "x");
  const int64_t columns = x.size(-1);
  FUSEDGPT_CHECK(columns >= 1 && columns <= kMaxColumns, op, "x's last dim (hidden size) must be in [1, ",
                 kMaxColumns, "], got ", columns);
  FUSEDGPT_CHECK(eps >= 0, op, "eps must be non-negative, got ", eps);
  if (residual) {
    FUSEDGPT_CHECK(residual->sizes() == x.sizes(), op, "residual must have the shape of x (", x.sizes(),
                   "), got ", residual->sizes());
    check_same_dtype(op, *residual, "residual", x, "x");
    check_same_device(op, *residual, "residual", x, "x");
    check_unit_last_stride(op, *residual, "residual");
  }
  for (const auto& [param, name] : {std::pair{weight, "weight"}, std::pair{bias, "bias"}}) {
    if (!param) continue;
    FUSEDGPT_CHECK(param->dim() == 1 && param->size(0) == columns, op, name, " must have shape [", columns,
                   "] (x's last dim), got ", param->sizes());
    check_same_dtype(op, *param, name, x, "x");
    check_same_device(op, *param, name, x, "x");
  }
  require_cuda(op, x, "x");

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x2 = x.reshape({-1, columns});  // a view whenever the leading dims allow it
  const at::Tensor residual2 = residual ? residual->reshape({-1, columns}) : at::Tensor();
  const at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor s = residual ? at::empty(x.sizes(), x.options()) : at::Tensor();
  if (x2.size(0) == 0) return {y, s};
  FUSEDGPT_CHECK(x2.size(0) < (int64_t{1} << 31), op, "x has ", x2.size(0), " rows; at most 2^31 - 1 fit one launch");

  FUSEDGPT_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
    const auto ptr = [](const at::Tensor& t) {
      return t.defined() ? reinterpret_cast<const scalar_t*>(t.data_ptr()) : nullptr;
    };
    scalar_t* y_ptr = reinterpret_cast<scalar_t*>(y.data_ptr());
    scalar_t* s_ptr = s.defined() ? reinterpret_cast<scalar_t*>(s.data_ptr()) : nullptr;
    const int64_t residual_stride = residual2.defined() ? residual2.stride(0) : 0;
    constexpr int kVec = kVec16<scalar_t>;
    // 16-byte accesses need every row start 16-byte aligned.
    bool vectorised = columns % kVec == 0 && x2.stride(0) % kVec == 0 && is_aligned(x2.data_ptr(), 16);
    if (residual2.defined()) vectorised = vectorised && residual_stride % kVec == 0 && is_aligned(residual2.data_ptr(), 16);
    for (const at::Tensor& t : {w, b}) vectorised = vectorised && (!t.defined() || is_aligned(t.data_ptr(), 16));
    if (vectorised) {
      launch_layer_norm<scalar_t, kVec>(x2, ptr(residual2), residual_stride, ptr(w), ptr(b), y_ptr, s_ptr,
                                        static_cast<float>(eps), stream);
    } else {
      launch_layer_norm<scalar_t, 1>(x2, ptr(residual2), residual_stride, ptr(w), ptr(b), y_ptr, s_ptr,
                                     static_cast<float>(eps), stream);
    }
  });
  return {y, s};
}

at::Tensor layer_norm_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, double eps) {
  return std::get<0>(layer_norm_impl("layer_norm", x, c10::nullopt, weight, bias, eps));
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                       const c10::optional<at::Tensor>& weight,
                                                       const c10::optional<at::Tensor>& bias, double eps) {
  return layer_norm_impl("add_layer_norm", x, residual, weight, bias, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgpt, CUDA, m) {
  m.impl("layer_norm", &layer_norm_cuda);
  m.impl("add_layer_norm", &add_layer_norm_cuda);
}

// CPU calls run the same checks, then fail with a clear message (see require_cuda).
TORCH_LIBRARY_IMPL(fusedgpt, CPU, m) {
  m.impl("layer_norm", &layer_norm_cuda);
  m.impl("add_layer_norm", &add_layer_norm_cuda);
}

}  // namespace fusedgpt
