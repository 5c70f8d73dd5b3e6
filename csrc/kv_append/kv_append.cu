// KV-cache append: k_cache[b, positions[b] + t] = k[b, t] and v_cache[b, positions[b] + t] = v[b, t]
// for t < T, K and V in one launch. Positions are read on the device (no host sync, capturable in a
// CUDA graph). A sequence whose block would not fit (positions[b] < 0 or positions[b] + T > S_max) is
// skipped whole: nothing is written for it, never out of bounds. Callers learn of it on the host
// (fusedgpt.ops.kv_append validates CPU positions, and check=True validates device positions).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"

namespace fusedgpt {
namespace {

// Element strides of a [B, S, H, D] tensor with unit stride on D.
struct Strides3 {
  int64_t batch, seq, head;
};

inline Strides3 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T, int VEC>
__global__ void kv_append_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache, const T* __restrict__ k,
                                 const T* __restrict__ v, const int* __restrict__ positions, Strides3 k_cache_strides,
                                 Strides3 v_cache_strides, Strides3 k_strides, Strides3 v_strides, int tokens,
                                 int heads, int vectors_per_head, int max_start, int64_t total_vectors) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total_vectors) return;
  const int col = static_cast<int>(index % vectors_per_head) * VEC;
  const int64_t row = index / vectors_per_head;  // (b * tokens + t) * heads + h
  const int h = static_cast<int>(row % heads);
  const int64_t bt = row / heads;
  const int t = static_cast<int>(bt % tokens);
  const int64_t b = bt / tokens;
  const int start = positions[b];
  if (start < 0 || start > max_start) return;  // the whole block would not fit: skip this sequence
  const int64_t slot = start + t;
  using V = Vec<T, VEC>;
  const V kv = *reinterpret_cast<const V*>(k + b * k_strides.batch + t * k_strides.seq + h * k_strides.head + col);
  const V vv = *reinterpret_cast<const V*>(v + b * v_strides.batch + t * v_strides.seq + h * v_strides.head + col);
  *reinterpret_cast<V*>(k_cache + b * k_cache_strides.batch + slot * k_cache_strides.seq +
                        h * k_cache_strides.head + col) = kv;
  *reinterpret_cast<V*>(v_cache + b * v_cache_strides.batch + slot * v_cache_strides.seq +
                        h * v_cache_strides.head + col) = vv;
}

bool strides_allow(const at::Tensor& t, int vec) {
  return is_aligned(t.data_ptr(), 16) && t.stride(0) % vec == 0 && t.stride(1) % vec == 0 && t.stride(2) % vec == 0;
}

void kv_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& positions) {
  const char* op = "kv_append";
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"},
                                std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    FUSEDGPT_CHECK(t->dim() == 4, op, name, " must have rank 4 ([B, S, H, D]), got shape ", t->sizes());
    check_dtype_in(op, *t, name);
    check_same_dtype(op, *t, name, k_cache, "k_cache");
    check_same_device(op, *t, name, k_cache, "k_cache");
    check_unit_last_stride(op, *t, name);
  }
  FUSEDGPT_CHECK(v_cache.sizes() == k_cache.sizes(), op, "v_cache must have the shape of k_cache (",
                 k_cache.sizes(), "), got ", v_cache.sizes());
  FUSEDGPT_CHECK(v.sizes() == k.sizes(), op, "v must have the shape of k (", k.sizes(), "), got ", v.sizes());
  const int64_t batch = k_cache.size(0), max_len = k_cache.size(1), heads = k_cache.size(2), dim = k_cache.size(3);
  const int64_t tokens = k.size(1);
  FUSEDGPT_CHECK(k.size(0) == batch && k.size(2) == heads && k.size(3) == dim, op,
                 "k must have shape [B, T, H, D] = [", batch, ", T, ", heads, ", ", dim,
                 "] to match k_cache, got ", k.sizes());
  FUSEDGPT_CHECK(tokens <= max_len, op, "the cache is too small: k has ", tokens,
                 " tokens but k_cache holds at most ", max_len);
  FUSEDGPT_CHECK(max_len < (int64_t{1} << 31), op, "k_cache's sequence length must be below 2^31, got ", max_len);
  FUSEDGPT_CHECK(heads < (int64_t{1} << 31) && dim < (int64_t{1} << 31), op,
                 "k_cache's head count and head size must be below 2^31, got ", heads, " and ", dim);
  FUSEDGPT_CHECK(positions.dim() == 1 && positions.size(0) == batch, op, "positions must have shape [", batch,
                 "] (one per sequence), got ", positions.sizes());
  FUSEDGPT_CHECK(positions.scalar_type() == at::kInt, op, "positions must be int32, got ", positions.scalar_type());
  const int max_start = static_cast<int>(max_len - tokens);
  if (positions.device().is_cpu()) {  // known on the host: report instead of skipping silently
    const at::Tensor host_positions = positions.contiguous();  // kept alive while pos is read
    const int* pos = host_positions.data_ptr<int>();
    for (int64_t b = 0; b < batch; ++b) {
      FUSEDGPT_CHECK(pos[b] >= 0 && pos[b] <= max_start, op, "positions[", b, "] = ", pos[b],
                     " is out of range: appending ", tokens, " tokens to a cache of length ", max_len,
                     " needs 0 <= positions[b] <= ", max_start);
    }
  } else {
    check_same_device(op, positions, "positions", k_cache, "k_cache");
  }
  require_cuda(op, k_cache, "k_cache");

  const c10::cuda::CUDAGuard guard(k_cache.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor device_positions = positions.to(k_cache.device(), /*non_blocking=*/false).contiguous();
  if (batch == 0 || tokens == 0 || heads == 0 || dim == 0) return;

  FUSEDGPT_DISPATCH_FLOAT_TYPES(k_cache.scalar_type(), op, [&] {
    constexpr int kVec = kVec16<scalar_t>;
    const bool vectorised = dim % kVec == 0 && strides_allow(k_cache, kVec) && strides_allow(v_cache, kVec) &&
                            strides_allow(k, kVec) && strides_allow(v, kVec);
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const int vectors_per_head = static_cast<int>(dim / V);
      const int64_t total = batch * tokens * heads * vectors_per_head;
      constexpr int kThreads = 256;
      const int64_t blocks = ceil_div(total, kThreads);
      FUSEDGPT_CHECK(blocks < (int64_t{1} << 31), op, "k is too large for one launch");
      kv_append_kernel<scalar_t, V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          reinterpret_cast<scalar_t*>(k_cache.data_ptr()), reinterpret_cast<scalar_t*>(v_cache.data_ptr()),
          reinterpret_cast<const scalar_t*>(k.data_ptr()), reinterpret_cast<const scalar_t*>(v.data_ptr()),
          device_positions.data_ptr<int>(), strides_of(k_cache), strides_of(v_cache), strides_of(k), strides_of(v),
          static_cast<int>(tokens), static_cast<int>(heads), vectors_per_head, max_start, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vectorised) launch(std::integral_constant<int, kVec>{});
    else launch(std::integral_constant<int, 1>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgpt, CUDA, m) { m.impl("kv_append", &kv_append_cuda); }

// CPU calls run the same checks, then fail with a clear message (see require_cuda).
TORCH_LIBRARY_IMPL(fusedgpt, CPU, m) { m.impl("kv_append", &kv_append_cuda); }

}  // namespace fusedgpt
