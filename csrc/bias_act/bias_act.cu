// Fused bias + activation for the MLP of GPT-style blocks: y = act(x + bias) over [..., N], one read of
// x and one write of y; and its backward, dx = dy act'(x + bias) and dbias = the column sums of dx, one
// read of dy and x and one write of dx (dbias from fp32 partials per block of rows, summed after). Activations: "gelu_tanh" (GPT-2/GPT-Neo's gelu_new), "gelu" (erf), "relu" (OPT).
// Math in fp32; for fp32 inputs tanhf/erff (not the approximate intrinsics), exact to ~1 ulp. For fp16 and
// bf16, whose outputs round to 11 or 8 bits, gelu_tanh takes the identity 0.5 v (1 + tanh(u)) =
// v / (1 + exp(-2u)): one exp2f and one division instead of tanhf's ~34 instructions (its error, a few fp32
// ulp, is far below the output's rounding).
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <type_traits>

#include "common.h"

namespace fusedgpt {
namespace {

enum class Activation { kGeluTanh, kGelu, kRelu };

template <Activation ACT, typename T>
__device__ __forceinline__ float activate(float v) {
  if constexpr (ACT == Activation::kGeluTanh && !std::is_same_v<T, float>) {
    // exp(-2u) = exp2(v * (k1 + k2 v^2)), u = sqrt(2/pi) (v + 0.044715 v^3); k1 = -2 log2(e) sqrt(2/pi).
    constexpr float kK1 = -2.302208198144325f, kK2 = -2.302208198144325f * 0.044715f;
    return v / (1.f + exp2f(v * (kK1 + kK2 * v * v)));  // v -> -inf: v / inf = -0; v -> +inf: v
  } else if constexpr (ACT == Activation::kGeluTanh) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;
    return 0.5f * v * (1.f + tanhf(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
  } else if constexpr (ACT == Activation::kGelu) {
    return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
  } else {
    return v < 0.f ? 0.f : v;  // NaN passes through, as in torch.relu
  }
}

// d act / dv in fp32. gelu_tanh: with s = sigmoid(2u) = 1 / (1 + exp(-2u)) (= (1 + tanh u) / 2),
// act' = s + 2 v s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 v^2) (expf for fp32, exp2f for fp16 / bf16);
// gelu: Phi(v) + v phi(v); relu: 0 where v <= 0, else 1 (NaN passes dy, as torch's backward).
template <Activation ACT, typename T>
__device__ __forceinline__ float activate_grad(float v) {
  if constexpr (ACT == Activation::kGeluTanh) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;
    float e;  // exp(-2u)
    if constexpr (std::is_same_v<T, float>) {
      e = expf(-2.f * kSqrt2OverPi * (v + 0.044715f * v * v * v));
    } else {
      constexpr float kK1 = -2.302208198144325f, kK2 = -2.302208198144325f * 0.044715f;
      e = exp2f(v * (kK1 + kK2 * v * v));
    }
    const float s = 1.f / (1.f + e);
    return s + 2.f * v * s * (1.f - s) * kSqrt2OverPi * (1.f + 0.134145f * v * v);
  } else if constexpr (ACT == Activation::kGelu) {
    return 0.5f * (1.f + erff(v * 0.7071067811865476f)) + v * 0.3989422804014327f * expf(-0.5f * v * v);
  } else {
    return v <= 0.f ? 0.f : 1.f;
  }
}

// Grid: blocks_per_row * rows blocks; each thread handles kUnroll VEC-wide vectors of one row, blockDim
// vectors apart (coalesced), all loaded before any is computed: more bytes in flight per thread.
constexpr int kUnroll = 2;

template <typename T, int VEC, Activation ACT>
__global__ void bias_act_fwd_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                                    int columns, int64_t x_row_stride, int blocks_per_row) {
  const int64_t row = blockIdx.x / blocks_per_row;
  const int first = ((blockIdx.x % blocks_per_row) * blockDim.x * kUnroll + threadIdx.x) * VEC;
  Vec<T, VEC> xv[kUnroll], bv[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int col = first + u * blockDim.x * VEC;
    if (col < columns) {
      xv[u] = *reinterpret_cast<const Vec<T, VEC>*>(x + row * x_row_stride + col);
      if (bias != nullptr) bv[u] = *reinterpret_cast<const Vec<T, VEC>*>(bias + col);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int col = first + u * blockDim.x * VEC;
    if (col >= columns) continue;
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float v = static_cast<float>(xv[u].v[j]);
      if (bias != nullptr) v += static_cast<float>(bv[u].v[j]);
      out.v[j] = static_cast<T>(activate<ACT, T>(v));
    }
    *reinterpret_cast<Vec<T, VEC>*>(y + row * columns + col) = out;
  }
}

template <typename T, int VEC, Activation ACT>
void launch_bias_act(const at::Tensor& x2, const T* bias, T* y, cudaStream_t stream) {
  const int64_t rows = x2.size(0);
  const int columns = static_cast<int>(x2.size(1));
  const int vectors = static_cast<int>(ceil_div(columns, VEC));  // columns < 2^30
  const int threads = std::min(256, std::max(32, static_cast<int>(ceil_div(ceil_div(vectors, kUnroll), 32) * 32)));
  const int blocks_per_row = static_cast<int>(ceil_div(vectors, threads * kUnroll));
  FUSEDGPT_CHECK(rows * blocks_per_row < (int64_t{1} << 31), "bias_act", "x is too large (", rows,
                 " rows of ", columns, ") for one launch");
  bias_act_fwd_kernel<T, VEC, ACT><<<rows * blocks_per_row, threads, 0, stream>>>(
      reinterpret_cast<const T*>(x2.data_ptr()), bias, y, columns, x2.stride(0), blocks_per_row);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Grid (row blocks, column blocks): each thread takes one VEC-wide column chunk over kBackwardRows rows
// (consecutive threads on consecutive chunks: coalesced), writes dx row by row and its chunk's dbias partial
// (fp32) once: partial[row block][column].
constexpr int kBackwardRows = 32;
constexpr int kBackwardThreads = 256;

template <typename T, int VEC, Activation ACT>
__global__ void __launch_bounds__(kBackwardThreads) bias_act_bwd_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ dx,
    float* __restrict__ partial, int64_t rows, int columns, int64_t dy_row_stride, int64_t x_row_stride) {
  const int col = (blockIdx.y * kBackwardThreads + threadIdx.x) * VEC;
  if (col >= columns) return;
  float b[VEC], sums[VEC];
  Vec<T, VEC> bv;
  if (bias != nullptr) bv = *reinterpret_cast<const Vec<T, VEC>*>(bias + col);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    b[j] = bias != nullptr ? static_cast<float>(bv.v[j]) : 0.f;
    sums[j] = 0.f;
  }
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kBackwardRows;
  const int64_t last = min(first + kBackwardRows, rows);
  for (int64_t row = first; row < last; ++row) {
    const Vec<T, VEC> g = *reinterpret_cast<const Vec<T, VEC>*>(dy + row * dy_row_stride + col);
    const Vec<T, VEC> xv = *reinterpret_cast<const Vec<T, VEC>*>(x + row * x_row_stride + col);
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float v = static_cast<float>(xv.v[j]) + b[j], gj = static_cast<float>(g.v[j]);
      float d;
      if constexpr (ACT == Activation::kRelu) {
        d = v <= 0.f ? 0.f : gj;  // a select (as a product, ptxas spilled the fp16 / bf16 variants)
      } else {
        d = gj * activate_grad<ACT, T>(v);
      }
      out.v[j] = static_cast<T>(d);
      sums[j] += d;
    }
    *reinterpret_cast<Vec<T, VEC>*>(dx + row * columns + col) = out;
  }
  if (partial != nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) partial[static_cast<int64_t>(blockIdx.x) * columns + col + j] = sums[j];
  }
}

Activation parse_activation(const std::string& name) {
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "gelu") return Activation::kGelu;
  FUSEDGPT_CHECK(name == "relu", "bias_act", "activation must be \"gelu_tanh\", \"gelu\" or \"relu\", got \"",
                 name, "\"");
  return Activation::kRelu;
}

// bias: [N] (x's last dim) in x's dtype, on its device, or absent.
void check_bias(const char* op, const c10::optional<at::Tensor>& bias, int64_t columns, const at::Tensor& x) {
  if (!bias) return;
  FUSEDGPT_CHECK(bias->dim() == 1 && bias->size(0) == columns, op, "bias must have shape [", columns,
                 "] (x's last dim), got ", bias->sizes());
  check_same_dtype(op, *bias, "bias", x, "x");
  check_same_device(op, *bias, "bias", x, "x");
}

at::Tensor bias_act_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  const char* op = "bias_act";
  const Activation act = parse_activation(std::string(activation));
  check_dtype_in(op, x, "x");
  check_unit_last_stride(op, x, "x");
  const int64_t columns = x.size(-1);
  check_bias(op, bias, columns, x);
  require_cuda(op, x, "x");
  if (x.numel() == 0) return at::empty(x.sizes(), x.options());  // (x.reshape({-1, 0}) would throw)
  FUSEDGPT_CHECK(columns < (int64_t{1} << 30), op, "x's last dim must be below 2^30, got ", columns);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x2 = x.reshape({-1, columns});
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x2.size(0) == 0) return y;

  FUSEDGPT_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
    const scalar_t* b_ptr = b.defined() ? reinterpret_cast<const scalar_t*>(b.data_ptr()) : nullptr;
    scalar_t* y_ptr = reinterpret_cast<scalar_t*>(y.data_ptr());
    constexpr int kVec = kVec16<scalar_t>;
    const bool vectorised = columns % kVec == 0 && x2.stride(0) % kVec == 0 && is_aligned(x2.data_ptr(), 16) &&
                            (b_ptr == nullptr || is_aligned(b_ptr, 16));
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      switch (act) {
        case Activation::kGeluTanh: launch_bias_act<scalar_t, V, Activation::kGeluTanh>(x2, b_ptr, y_ptr, stream); break;
        case Activation::kGelu: launch_bias_act<scalar_t, V, Activation::kGelu>(x2, b_ptr, y_ptr, stream); break;
        case Activation::kRelu: launch_bias_act<scalar_t, V, Activation::kRelu>(x2, b_ptr, y_ptr, stream); break;
      }
    };
    if (vectorised) launch(std::integral_constant<int, kVec>{});
    else launch(std::integral_constant<int, 1>{});
  });
  return y;
}

// dx (like x, contiguous) and dbias ([N] in bias's dtype; empty without a bias) of y = act(x + bias).
std::tuple<at::Tensor, at::Tensor> bias_act_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                          const c10::optional<at::Tensor>& bias,
                                                          c10::string_view activation) {
  const char* op = "bias_act_backward";
  const Activation act = parse_activation(std::string(activation));
  check_dtype_in(op, x, "x");
  check_same_dtype(op, grad, "grad", x, "x");
  check_same_device(op, grad, "grad", x, "x");
  FUSEDGPT_CHECK(grad.sizes() == x.sizes(), op, "grad must have the shape of x (", x.sizes(), "), got ",
                 grad.sizes());
  check_unit_last_stride(op, x, "x");
  check_unit_last_stride(op, grad, "grad");
  const int64_t columns = x.size(-1);
  check_bias(op, bias, columns, x);
  require_cuda(op, x, "x");
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) {
    return {dx, bias ? at::zeros_like(*bias) : at::empty({0}, x.options())};
  }
  FUSEDGPT_CHECK(columns < (int64_t{1} << 30), op, "x's last dim must be below 2^30, got ", columns);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x2 = x.reshape({-1, columns}), dy2 = grad.reshape({-1, columns});
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const int64_t rows = x2.size(0), row_blocks = ceil_div(rows, kBackwardRows);
  FUSEDGPT_CHECK(row_blocks < (int64_t{1} << 31), op, "x has too many rows (", rows, ") for one launch");
  at::Tensor partial = at::empty({b.defined() ? row_blocks : 0, columns}, x.options().dtype(at::kFloat));

  FUSEDGPT_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
    const scalar_t* b_ptr = b.defined() ? reinterpret_cast<const scalar_t*>(b.data_ptr()) : nullptr;
    constexpr int kVec = kVec16<scalar_t>;
    const bool vectorised = columns % kVec == 0 && x2.stride(0) % kVec == 0 && dy2.stride(0) % kVec == 0 &&
                            is_aligned(x2.data_ptr(), 16) && is_aligned(dy2.data_ptr(), 16) &&
                            (b_ptr == nullptr || is_aligned(b_ptr, 16));
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const dim3 grid(static_cast<unsigned>(row_blocks),
                      static_cast<unsigned>(ceil_div(ceil_div(columns, V), kBackwardThreads)));
      auto run = [&](auto kernel) {
        kernel<<<grid, kBackwardThreads, 0, stream>>>(
            reinterpret_cast<const scalar_t*>(dy2.data_ptr()), reinterpret_cast<const scalar_t*>(x2.data_ptr()),
            b_ptr, reinterpret_cast<scalar_t*>(dx.data_ptr()), b.defined() ? partial.data_ptr<float>() : nullptr,
            rows, static_cast<int>(columns), dy2.stride(0), x2.stride(0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      switch (act) {
        case Activation::kGeluTanh: run(bias_act_bwd_kernel<scalar_t, V, Activation::kGeluTanh>); break;
        case Activation::kGelu: run(bias_act_bwd_kernel<scalar_t, V, Activation::kGelu>); break;
        case Activation::kRelu: run(bias_act_bwd_kernel<scalar_t, V, Activation::kRelu>); break;
      }
    };
    if (vectorised) launch(std::integral_constant<int, kVec>{});
    else launch(std::integral_constant<int, 1>{});
  });
  at::Tensor dbias = b.defined() ? at::sum(partial, {0}).to(x.scalar_type()) : at::empty({0}, x.options());
  return {dx, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgpt, CUDA, m) {
  m.impl("bias_act", &bias_act_cuda);
  m.impl("bias_act_backward", &bias_act_backward_cuda);
}

// CPU calls run the same checks, then fail with a clear message (see require_cuda).
TORCH_LIBRARY_IMPL(fusedgpt, CPU, m) {
  m.impl("bias_act", &bias_act_cuda);
  m.impl("bias_act_backward", &bias_act_backward_cuda);
}

}  // namespace fusedgpt
