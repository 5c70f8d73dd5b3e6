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
  bool negate_scores;    // scale < 0: the kernel negates Q and uses |scale|
  float scale_log2;      // max(|scale| * log2(e), FLT_MIN) > 0: scores go through exp2 (see attention.cu)
};

// Tile shape (FlashAttention-2's forward): 128 query rows per CTA, 4 warps of 32 rows each (two m16 tiles,
// so every K or V fragment read from shared memory feeds two mma: at 16 rows per warp the shared-memory
// reads of the B fragments, 256 bytes per mma, would bound the tensor cores). Q stays in registers across
// the key loop where it fits (D = 64: 32 registers); above, it is re-read from shared memory each tile (at
// D = 128 Q alone would take 64 registers beside O's 128). Keys per tile: 64, but 32 at D >= 96, where
// 64 made ptxas spill at 255 registers (24 bytes at D = 96, 188 at D = 128; S takes 64 registers with
// 64 keys, 32 with 32). sm_90, nvcc 13.0: 234 / 250 / 212 / 249 registers at D = 64 / 80 / 96 / 128, no
// spill, 2 CTAs (8 warps) per SM; bench/results/static-sm_90.csv keeps the current numbers.
constexpr int kBlockM = 128;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpRows = kBlockM / kWarps;  // 32
constexpr int kRowTiles = kWarpRows / 16;    // m16 tiles per warp

// Shared memory per head dim: Q (later the output), K and V tiles, row-major [row][D] with 16 bytes of
// padding per row, so the 8 rows one ldmatrix phase reads (and the 8 16-byte chunks a cp.async phase
// writes at D = 64 / 128) fall in distinct banks.
template <int HEAD_DIM>
struct Tile {
  static constexpr int kBlockN = HEAD_DIM >= 96 ? 32 : 64;  // keys per tile
  static constexpr int kRowStride = HEAD_DIM + 8;      // elements
  static constexpr int kChunks = HEAD_DIM / 8;         // 16-byte chunks per row
  static constexpr bool kQInRegisters = HEAD_DIM <= 64;
  static constexpr int kSharedBytes = (kBlockM + 2 * kBlockN) * kRowStride * 2;
};

template <typename Element, int HEAD_DIM>
cudaError_t launch(const Params& params, cudaStream_t stream);

}  // namespace fusedgpt::attention
