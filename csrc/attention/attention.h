// Traits and parameters of fusedgpt's hand-written CUDA prefill attention (FlashAttention-2 style, on
// the tensor cores through mma.sync m16n8k16, fp32 accumulation). See attention_kernel.cuh for the
// kernel, attention_launch.cuh for its launch, attention_hdim*_*.cu for one instantiation per
// (head dim, dtype) so that they compile in parallel (generated, with the head-dim list of op_limits.h, by
// csrc/generate_sources.py), and attention.cu for the host function.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fusedgpt::attention {

// Everything the kernel needs, passed by value. Strides are in elements; D has unit stride.
struct Params {
  const void* q;         // [B, Sq, H, D]
  const void* k;         // [B, Sk, H, D]
  const void* v;         // [B, Sk, H, D]
  void* out;             // [B, Sq, H, D]
  const int* kv_start;   // [B] first non-padding key, or nullptr
  int64_t q_batch_stride, q_seq_stride, q_head_stride;
  int64_t k_batch_stride, k_seq_stride, k_head_stride;
  int64_t v_batch_stride, v_seq_stride, v_head_stride;
  int64_t out_batch_stride, out_seq_stride, out_head_stride;
  int batch, heads, q_len, kv_len;
  int window;            // 0: no window
  bool causal;
  float scale_log2;      // scale * log2(e): scores go through exp2
};

// Tile shape: 4 warps, each owning 16 query rows of a 64-row block; 64 keys per iteration.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

template <typename Element, int HEAD_DIM>
void launch(const Params& params, cudaStream_t stream);

}  // namespace fusedgpt::attention
