// LayerNorm over the last dim, optionally fused with the residual add of a pre-LN block:
//   s = x + residual (rounded to the input dtype, as the unfused block stores it), y = LN(s).
// One thread block per row; the row stays in registers between the mean, variance and normalise
// passes, so x and residual are read from memory once and y (and s) written once.
// Backward (layer_norm_backward): one block per row for ds = rstd (g - mean(g) - x_hat mean(g x_hat)) (+ the
// returned sum's gradient), g = dy * weight, with the row of s in registers and the statistics recomputed
// as the forward computed them (each row's mean and rstd kept for the second kernel); then a column-parallel
// kernel for dweight = sum dy x_hat and dbias = sum dy over blocks of rows, from fp32 partials (Apex's
// split: coalesced along the columns, no atomics, the same result whatever order blocks run in).
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

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

// Calls run(std::integral_constant<int, ITERS>) for the vectors per thread a launch needs, instantiating
// only those this VEC can reach (the widest rows, kMaxColumns, need kMaxIters): the others would be
// compiled for nothing, and the widest of them spill. Shared by the forward and the backward's row kernel.
template <int VEC, typename Run>
void with_iters(const char* op, int iters, int columns, Run&& run) {
  constexpr int kMaxIters = vectors_per_thread((kMaxColumns + VEC - 1) / VEC);
  if (iters == 1) {
    run(std::integral_constant<int, 1>{});
  } else if (iters == 2) {
    run(std::integral_constant<int, 2>{});
  } else if (iters == 4) {
    run(std::integral_constant<int, 4>{});
  } else if constexpr (kMaxIters >= 8) {
    if (iters == 8) {
      run(std::integral_constant<int, 8>{});
    } else {
      run(std::integral_constant<int, 16>{});
    }
  } else {
    FUSEDGPT_CHECK(false, op, "internal: ", iters, " vectors per thread for ", columns, " columns");
  }
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
  with_iters<VEC>("layer_norm", iters, columns, [&](auto iters_tag) {
    launch(layer_norm_fwd_kernel<T, VEC, decltype(iters_tag)::value>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The backward's first kernel: ds of one row (into dx, and into dresidual when given), and the row's
// statistics (mean of the pivot-shifted row, rstd) for the weight / bias kernel. dy is read twice (the
// second time from cache) so that only the row of s is held in registers, as in the forward.
template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(1024, 1) layer_norm_bwd_dx_kernel(
    const T* __restrict__ dy, const T* __restrict__ dsum, const T* __restrict__ s, const T* __restrict__ weight,
    T* __restrict__ dx, T* __restrict__ dresidual, float* __restrict__ row_mean, float* __restrict__ row_rstd,
    int columns, float inv_columns, int64_t dy_row_stride, int64_t dsum_row_stride, int64_t s_row_stride, float eps) {
  // The row of s stays in registers except at 16 vectors per thread (scalar rows over 8192 columns, 1024
  // threads: 64 registers), where holding it spilled: there each pass reads it again (from cache).
  constexpr bool kHoldRow = ITERS < 16;
  constexpr int kUnroll = kHoldRow ? ITERS : 1;  // (and a rolled loop there: unrolled, it spilled all the same)
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x;
  const T* s_row = s + row * s_row_stride;
  const T* dy_row = dy + row * dy_row_stride;
  float held[kHoldRow ? ITERS : 1][VEC];
  const float pivot = static_cast<float>(s_row[0]);
  float mean = 0.f;
  const auto centred = [&](int i, int col, float (&c)[VEC]) {  // s - pivot - mean of one vector
    if constexpr (kHoldRow) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) c[j] = held[i][j] - mean;
    } else {
      const Vec<T, VEC> sv = *reinterpret_cast<const Vec<T, VEC>*>(s_row + col);
#pragma unroll
      for (int j = 0; j < VEC; ++j) c[j] = static_cast<float>(sv.v[j]) - pivot - mean;
    }
  };
  float local_sum = 0.f;
#pragma unroll kUnroll
  for (int i = 0; i < ITERS; ++i) {
    const int col = (i * blockDim.x + threadIdx.x) * VEC;
    if (col < columns) {
      const Vec<T, VEC> sv = *reinterpret_cast<const Vec<T, VEC>*>(s_row + col);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float shifted = static_cast<float>(sv.v[j]) - pivot;
        if constexpr (kHoldRow) held[i][j] = shifted;
        local_sum += shifted;
      }
    }
  }
  mean = block_sum(local_sum, scratch) * inv_columns;
  float local_squares = 0.f;
#pragma unroll kUnroll
  for (int i = 0; i < ITERS; ++i) {
    const int col = (i * blockDim.x + threadIdx.x) * VEC;
    if (col < columns) {
      float c[VEC];
      centred(i, col, c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) local_squares += c[j] * c[j];
    }
  }
  const float rstd = rsqrtf(block_sum(local_squares, scratch) * inv_columns + eps);
  const auto gradient = [&](int col, float (&g)[VEC]) {  // g = dy * weight for one vector
    const Vec<T, VEC> dv = *reinterpret_cast<const Vec<T, VEC>*>(dy_row + col);
    Vec<T, VEC> wv;
    if (weight != nullptr) wv = *reinterpret_cast<const Vec<T, VEC>*>(weight + col);
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] = static_cast<float>(dv.v[j]) * (weight != nullptr ? static_cast<float>(wv.v[j]) : 1.f);
  };
  float local_g = 0.f, local_gx = 0.f;
#pragma unroll kUnroll
  for (int i = 0; i < ITERS; ++i) {
    const int col = (i * blockDim.x + threadIdx.x) * VEC;
    if (col < columns) {
      float g[VEC], c[VEC];
      gradient(col, g);
      centred(i, col, c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        local_g += g[j];
        local_gx += g[j] * c[j] * rstd;
      }
    }
  }
  const float mean_g = block_sum(local_g, scratch) * inv_columns;
  const float mean_gx = block_sum(local_gx, scratch) * inv_columns;
#pragma unroll kUnroll
  for (int i = 0; i < ITERS; ++i) {
    const int col = (i * blockDim.x + threadIdx.x) * VEC;
    if (col < columns) {
      float g[VEC], c[VEC];
      gradient(col, g);
      centred(i, col, c);
      Vec<T, VEC> sv;
      if (dsum != nullptr) sv = *reinterpret_cast<const Vec<T, VEC>*>(dsum + row * dsum_row_stride + col);
      Vec<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float d = rstd * (g[j] - mean_g - c[j] * rstd * mean_gx);
        if (dsum != nullptr) d += static_cast<float>(sv.v[j]);
        out.v[j] = static_cast<T>(d);
      }
      *reinterpret_cast<Vec<T, VEC>*>(dx + row * columns + col) = out;
      if (dresidual != nullptr) *reinterpret_cast<Vec<T, VEC>*>(dresidual + row * columns + col) = out;
    }
  }
  if (threadIdx.x == 0) {
    row_mean[row] = mean;
    row_rstd[row] = rstd;
  }
}

// The backward's second kernel, grid (row blocks, column blocks): each thread takes one VEC-wide column
// chunk over kParamRows rows, x_hat = (s - s[row, 0] - mean) rstd recomputed, and writes its chunk's
// partial sums of dy x_hat and dy (fp32) once.
constexpr int kParamRows = 64;
constexpr int kParamThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kParamThreads) layer_norm_bwd_params_kernel(
    const T* __restrict__ dy, const T* __restrict__ s, const float* __restrict__ row_mean,
    const float* __restrict__ row_rstd, float* __restrict__ weight_partial, float* __restrict__ bias_partial,
    int64_t rows, int columns, int64_t dy_row_stride, int64_t s_row_stride) {
  const int col = (blockIdx.y * kParamThreads + threadIdx.x) * VEC;
  if (col >= columns) return;
  float dw[VEC], db[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) dw[j] = db[j] = 0.f;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kParamRows, last = min(first + kParamRows, rows);
  for (int64_t row = first; row < last; ++row) {
    const float shift = static_cast<float>(s[row * s_row_stride]), mean = row_mean[row], rstd = row_rstd[row];
    const Vec<T, VEC> dv = *reinterpret_cast<const Vec<T, VEC>*>(dy + row * dy_row_stride + col);
    const Vec<T, VEC> sv = *reinterpret_cast<const Vec<T, VEC>*>(s + row * s_row_stride + col);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float g = static_cast<float>(dv.v[j]);
      dw[j] += g * ((static_cast<float>(sv.v[j]) - shift - mean) * rstd);
      db[j] += g;
    }
  }
  const int64_t at = static_cast<int64_t>(blockIdx.x) * columns + col;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    weight_partial[at + j] = dw[j];
    bias_partial[at + j] = db[j];
  }
}

template <typename T, int VEC>
void launch_layer_norm_backward(const at::Tensor& dy2, const at::Tensor& dsum2, const at::Tensor& s2,
                                const T* weight, T* dx, T* dresidual, at::Tensor& row_mean, at::Tensor& row_rstd,
                                at::Tensor& weight_partial, at::Tensor& bias_partial, float eps,
                                cudaStream_t stream) {
  const int64_t rows = s2.size(0);
  const int columns = static_cast<int>(s2.size(1));
  const int vectors = static_cast<int>(ceil_div(columns, VEC));
  const int iters = vectors_per_thread(vectors);
  const int threads = std::max(32, static_cast<int>(ceil_div(ceil_div(vectors, iters), 32) * 32));
  const auto data = [](const at::Tensor& t) { return t.defined() ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr; };
  auto launch = [&](auto kernel) {
    kernel<<<rows, threads, 0, stream>>>(data(dy2), data(dsum2), data(s2), weight, dx, dresidual,
                                         row_mean.data_ptr<float>(), row_rstd.data_ptr<float>(), columns,
                                         1.f / columns, dy2.stride(0), dsum2.defined() ? dsum2.stride(0) : 0,
                                         s2.stride(0), eps);
  };
  with_iters<VEC>("layer_norm_backward", iters, columns, [&](auto iters_tag) {
    launch(layer_norm_bwd_dx_kernel<T, VEC, decltype(iters_tag)::value>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid(static_cast<unsigned>(weight_partial.size(0)), static_cast<unsigned>(ceil_div(vectors, kParamThreads)));
  layer_norm_bwd_params_kernel<T, VEC><<<grid, kParamThreads, 0, stream>>>(
      data(dy2), data(s2), row_mean.data_ptr<float>(), row_rstd.data_ptr<float>(), weight_partial.data_ptr<float>(),
      bias_partial.data_ptr<float>(), rows, columns, dy2.stride(0), s2.stride(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// (dx, dresidual, dweight, dbias) of y = LN(s) * weight + bias, s the forward's normalised input (x, or the
// x + residual it returned): dresidual equals dx (empty without a residual); dweight and dbias fp32 [C].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(
    const at::Tensor& grad, const c10::optional<at::Tensor>& grad_sum, const at::Tensor& s,
    const c10::optional<at::Tensor>& weight, double eps, bool has_residual) {
  const char* op = "layer_norm_backward";
  check_dtype_in(op, s, "s");
  check_unit_last_stride(op, s, "s");
  const int64_t columns = s.size(-1);
  FUSEDGPT_CHECK(columns >= 1 && columns <= kMaxColumns, op, "s's last dim (hidden size) must be in [1, ",
                 kMaxColumns, "], got ", columns);
  FUSEDGPT_CHECK(eps >= 0, op, "eps must be non-negative, got ", eps);
  for (const auto& [t, name] : {std::pair{&grad, "grad"}, std::pair{grad_sum ? &*grad_sum : nullptr, "grad_sum"}}) {
    if (t == nullptr) continue;
    FUSEDGPT_CHECK(t->sizes() == s.sizes(), op, name, " must have the shape of s (", s.sizes(), "), got ", t->sizes());
    check_same_dtype(op, *t, name, s, "s");
    check_same_device(op, *t, name, s, "s");
    check_unit_last_stride(op, *t, name);
  }
  if (weight) {
    FUSEDGPT_CHECK(weight->dim() == 1 && weight->size(0) == columns, op, "weight must have shape [", columns,
                   "] (s's last dim), got ", weight->sizes());
    check_same_dtype(op, *weight, "weight", s, "s");
    check_same_device(op, *weight, "weight", s, "s");
  }
  require_cuda(op, s, "s");
  const c10::cuda::CUDAGuard guard(s.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor s2 = s.reshape({-1, columns}), dy2 = grad.reshape({-1, columns});
  const at::Tensor dsum2 = grad_sum ? grad_sum->reshape({-1, columns}) : at::Tensor();
  const at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  const int64_t rows = s2.size(0);
  FUSEDGPT_CHECK(rows < (int64_t{1} << 31), op, "s has ", rows, " rows; at most 2^31 - 1 fit one launch");
  at::Tensor dx = at::empty(s.sizes(), s.options());
  at::Tensor dresidual = has_residual ? at::empty(s.sizes(), s.options()) : at::empty({0}, s.options());
  const auto fp32 = s.options().dtype(at::kFloat);
  at::Tensor row_mean = at::empty({rows}, fp32), row_rstd = at::empty({rows}, fp32);
  const int64_t row_blocks = ceil_div(rows, kParamRows);
  at::Tensor weight_partial = at::zeros({std::max<int64_t>(row_blocks, 1), columns}, fp32);
  at::Tensor bias_partial = at::zeros({std::max<int64_t>(row_blocks, 1), columns}, fp32);
  if (rows > 0) {
    FUSEDGPT_DISPATCH_FLOAT_TYPES(s.scalar_type(), op, [&] {
      constexpr int kVec = kVec16<scalar_t>;
      bool vectorised = columns % kVec == 0 && (!w.defined() || is_aligned(w.data_ptr(), 16));
      for (const at::Tensor* t : {&s2, &dy2, &dsum2}) {
        vectorised = vectorised && (!t->defined() || (t->stride(0) % kVec == 0 && is_aligned(t->data_ptr(), 16)));
      }
      const scalar_t* w_ptr = w.defined() ? reinterpret_cast<const scalar_t*>(w.data_ptr()) : nullptr;
      scalar_t* dx_ptr = reinterpret_cast<scalar_t*>(dx.data_ptr());
      scalar_t* dres_ptr = has_residual ? reinterpret_cast<scalar_t*>(dresidual.data_ptr()) : nullptr;
      if (vectorised) {
        launch_layer_norm_backward<scalar_t, kVec>(dy2, dsum2, s2, w_ptr, dx_ptr, dres_ptr, row_mean, row_rstd,
                                                   weight_partial, bias_partial, static_cast<float>(eps), stream);
      } else {
        launch_layer_norm_backward<scalar_t, 1>(dy2, dsum2, s2, w_ptr, dx_ptr, dres_ptr, row_mean, row_rstd,
                                                weight_partial, bias_partial, static_cast<float>(eps), stream);
      }
    });
  }
  return {dx, dresidual, at::sum(weight_partial, {0}), at::sum(bias_partial, {0})};
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
  m.impl("layer_norm_backward", &layer_norm_backward_cuda);
}

// CPU calls run the same checks, then fail with a clear message (see require_cuda).
TORCH_LIBRARY_IMPL(fusedgpt, CPU, m) {
  m.impl("layer_norm", &layer_norm_cuda);
  m.impl("add_layer_norm", &add_layer_norm_cuda);
  m.impl("layer_norm_backward", &layer_norm_backward_cuda);
}

}  // namespace fusedgpt
