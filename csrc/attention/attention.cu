// Host side of the CUDA prefill attention: argument checks (messages name the argument), the device
// guard and current stream, the dispatch to the (dtype, head dim) instantiation, and the registration.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "attention/attention.h"
#include "common.h"
#include "op_limits.h"

namespace fusedgpt {
namespace {

// 16-byte vector loads of K/V rows and 32-bit loads of Q pairs need aligned bases and row strides.
void check_vector_layout(const char* op, const at::Tensor& t, const char* name) {
  FUSEDGPT_CHECK(is_aligned(t.data_ptr(), 16) && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0,
                 op, name, " must start 16-byte aligned with batch/seq/head strides that are multiples of 8 ",
                 "elements (the CUDA kernel loads 16-byte vectors), got strides ", t.strides(),
                 "; fusedgpt.ops.attention routes such tensors to the Triton kernel");
}

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                          c10::optional<int64_t> window, double scale, const c10::optional<at::Tensor>& kv_start) {
  const char* op = "attention";
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    FUSEDGPT_CHECK(t->dim() == 4, op, name, " must have rank 4 ([B, S, H, D]), got shape ", t->sizes());
    FUSEDGPT_CHECK(t->scalar_type() == at::kHalf || t->scalar_type() == at::kBFloat16, op, name,
                   " must be ", FUSEDGPT_ATTENTION_DTYPES_TEXT, " (float32 runs on the Triton kernel), got ",
                   t->scalar_type());
    check_same_dtype(op, *t, name, q, "q");
    check_same_device(op, *t, name, q, "q");
    check_unit_last_stride(op, *t, name);
  }
  FUSEDGPT_CHECK(v.sizes() == k.sizes(), op, "v must have the shape of k (", k.sizes(), "), got ", v.sizes());
  const int64_t batch = q.size(0), q_len = q.size(1), heads = q.size(2), dim = q.size(3), kv_len = k.size(1);
  FUSEDGPT_CHECK(k.size(0) == batch && k.size(2) == heads && k.size(3) == dim, op,
                 "k must have shape [B, Sk, H, D] = [", batch, ", Sk, ", heads, ", ", dim, "] to match q, got ",
                 k.sizes());
  FUSEDGPT_CHECK(q_len <= kv_len, op, "q has more tokens (", q_len, ") than k (", kv_len, "); Sq <= Sk is required");
  FUSEDGPT_CHECK(is_attention_head_dim(dim), op, "head dim D must be ", FUSEDGPT_ATTENTION_HEAD_DIMS_TEXT,
                 " for the CUDA kernel, got ", dim);
  FUSEDGPT_CHECK(kv_len < (int64_t{1} << 30), op, "k's sequence length must be below 2^30, got ", kv_len);
  FUSEDGPT_CHECK(batch * heads <= kMaxBatchHeads, op, "B * H must be at most ", kMaxBatchHeads, ", got ",
                 batch * heads);
  if (window) {
    FUSEDGPT_CHECK(*window >= 1 && *window < (int64_t{1} << 30), op, "window must be a positive int, got ", *window);
    FUSEDGPT_CHECK(causal, op, "window needs causal=True");
  }
  if (kv_start) {
    FUSEDGPT_CHECK(kv_start->dim() == 1 && kv_start->size(0) == batch, op, "kv_start must have shape [", batch,
                   "], got ", kv_start->sizes());
    FUSEDGPT_CHECK(kv_start->scalar_type() == at::kInt, op, "kv_start must be int32, got ", kv_start->scalar_type());
    check_same_device(op, *kv_start, "kv_start", q, "q");
  }
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_vector_layout(op, *t, name);
  }
  require_cuda(op, q, "q");

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  const at::Tensor starts = kv_start ? kv_start->contiguous() : at::Tensor();

  attention::Params params{};
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.out = out.data_ptr();
  params.kv_start = starts.defined() ? starts.data_ptr<int>() : nullptr;
  params.q_batch_stride = q.stride(0), params.q_seq_stride = q.stride(1), params.q_head_stride = q.stride(2);
  params.k_batch_stride = k.stride(0), params.k_seq_stride = k.stride(1), params.k_head_stride = k.stride(2);
  params.v_batch_stride = v.stride(0), params.v_seq_stride = v.stride(1), params.v_head_stride = v.stride(2);
  params.out_batch_stride = out.stride(0), params.out_seq_stride = out.stride(1), params.out_head_stride = out.stride(2);
  params.batch = static_cast<int>(batch), params.heads = static_cast<int>(heads);
  params.q_len = static_cast<int>(q_len), params.kv_len = static_cast<int>(kv_len);
  params.window = window ? static_cast<int>(*window) : 0;
  params.causal = causal;
  // The kernel folds the scale into the exponent, p = 2^(s c - m c) with m the row's largest raw score s,
  // which needs c > 0: a negative scale negates Q (exact in fp16 / bf16) and uses |scale|; scale 0 uses
  // the smallest normal float, with which every visible key gets 2^0 = 1 exactly as with 0 (|s - m| c
  // is below float32's resolution around 0) while masked keys keep -inf * c = -inf.
  params.negate_scores = scale < 0;
  params.scale_log2 = std::max(static_cast<float>(std::abs(scale) * 1.4426950408889634),
                               std::numeric_limits<float>::min());

  // One case per instantiation file (op_limits.h's lists); anything else is an error, never a neighbour.
  auto run = [&](auto element_tag) {
    using Element = decltype(element_tag);
    dispatch_head_dim(op, dim, [&](auto head_dim) {
      const cudaError_t status = attention::launch<Element, decltype(head_dim)::value>(params, stream);
      C10_CUDA_CHECK(status);  // the shared-memory opt-in
    });
  };
  switch (q.scalar_type()) {
#define FUSEDGPT_DTYPE_CASE(SCALAR_TYPE, ELEMENT) \
  case SCALAR_TYPE: run(ELEMENT{}); break;
    FUSEDGPT_ATTENTION_DTYPES(FUSEDGPT_DTYPE_CASE)
#undef FUSEDGPT_DTYPE_CASE
    default: FUSEDGPT_CHECK(false, op, "no CUDA instantiation for dtype ", q.scalar_type(), " (built for ",
                            FUSEDGPT_ATTENTION_DTYPES_TEXT, ")");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgpt, CUDA, m) { m.impl("attention", &attention_cuda); }

// CPU calls run the same checks, then fail with a clear message (see require_cuda).
TORCH_LIBRARY_IMPL(fusedgpt, CPU, m) { m.impl("attention", &attention_cuda); }

}  // namespace fusedgpt
