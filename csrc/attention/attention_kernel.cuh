// The prefill attention kernel (see attention.h for the tile shape and its reasons). One CTA per
// (128 queries, batch * head), 4 warps of 32 query rows, 64-key tiles (32 at D = 128) in shared memory:
//   Q, K and V tiles arrive through cp.async (16-byte copies, no register staging) into row-major tiles
//   padded by 16 bytes per row (conflict-free ldmatrix phases); V stays row-major: ldmatrix.trans gives
//   its B fragments. K and V have one buffer each, overlapped as FlashAttention-2 does: V(n) is copied
//   while S = Q K(n)^T and the softmax run, K(n + 1) while O += P V(n) runs.
//   S = Q K^T      mma m16n8k16, A fragments (Q) by ldmatrix.x4 (kept in registers at D = 64), B fragments
//                  (two key tiles per ldmatrix.x4) shared by the warp's two m16 tiles
//   online softmax in fp32 on raw scores: p = 2^(s c - m c) in one FFMA and ex2.approx (c = scale log2 e
//                  > 0, m the row max of raw scores; the row max/sum shared by the 4 threads of a quad)
//   O += P V       P re-packed from the S accumulators as the A operand (no shared-memory round trip)
//   output         normalised, staged through the Q tile, stored as 16-byte rows
// Only key tiles that can hold a visible key are visited (causal, window, left padding), so a window of
// W costs O(S * W); tiles crossing a bound are masked, the rest skip the mask. Causal query blocks run
// heaviest (last) first, so the longest CTAs do not start in the last wave.
#pragma once

#include <cmath>

#include "attention/attention.h"
#include "intrinsics.h"

namespace fusedgpt::attention {

// pack(lo, hi): two floats rounded to Element in one 32-bit word, lo in the low half (an mma fragment
// register); the mma itself is intrinsics.h's mma_m16n8k16.
template <typename Element>
struct ElementOps;

template <>
struct ElementOps<__half> {
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct ElementOps<__nv_bfloat16> {
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

__device__ __forceinline__ float quad_max(float value) {  // over the 4 threads sharing an mma row
  value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 1));
  return fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 2));
}

__device__ __forceinline__ float quad_sum(float value) {
  value += __shfl_xor_sync(0xffffffffu, value, 1);
  return value + __shfl_xor_sync(0xffffffffu, value, 2);
}

// Rows [first, first + kRows) of a [S, D] slice (row stride seq_stride) into a padded shared tile, rows
// at or past `limit` as zeros (nothing read): 16-byte cp.async copies, not committed here. Each 8-lane
// phase must land in 8 distinct bank groups. Rows of 8 or 16 chunks (D = 64, 128): consecutive threads
// take consecutive chunks, a phase one row's 8 consecutive chunks. Other rows (D = 80, 96): consecutive
// threads take consecutive 16-byte slots of the padded tile, the row's padding slot included (a zero
// copy into the padding, which nothing reads), so a phase is 8 consecutive slots wherever rows end
// (walking chunks instead, a phase across a row end spans 9 slots: 2-way conflicts).
template <typename Element, int HEAD_DIM, int kRows>
__device__ __forceinline__ void copy_rows_async(Element* tile, const Element* base, int64_t seq_stride, int first,
                                                int limit, int tid) {
  using T = Tile<HEAD_DIM>;
  if constexpr (T::kChunks % 8 == 0) {
    static_assert((kRows * T::kChunks) % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int i = 0; i < kRows * T::kChunks / kThreads; ++i) {
      const int index = tid + i * kThreads;
      const int r = index / T::kChunks, c = (index % T::kChunks) * 8;
      const bool valid = first + r < limit;
      const Element* source = valid ? base + static_cast<int64_t>(first + r) * seq_stride + c : base;
      cp_async_16(tile + r * T::kRowStride + c, source, valid);
    }
  } else {
    constexpr int kSlotsPerRow = T::kRowStride / 8, kSlots = kRows * kSlotsPerRow;
    static_assert(kSlotsPerRow == T::kChunks + 1, "one padding slot per row");
#pragma unroll
    for (int i = 0; i < (kSlots + kThreads - 1) / kThreads; ++i) {
      const int slot = tid + i * kThreads;
      if (kSlots % kThreads != 0 && slot >= kSlots) break;  // the last round only, its highest threads
      const int r = slot / kSlotsPerRow, c = (slot % kSlotsPerRow) * 8;
      const bool valid = c < HEAD_DIM && first + r < limit;
      const Element* source = valid ? base + static_cast<int64_t>(first + r) * seq_stride + c : base;
      cp_async_16(tile + r * T::kRowStride + c, source, valid);
    }
  }
}

template <typename Element, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const Params p) {
  using Ops = ElementOps<Element>;
  using T = Tile<HEAD_DIM>;
  constexpr int kBlockN = T::kBlockN;
  constexpr int kSteps = HEAD_DIM / 16;   // k steps of Q K^T
  constexpr int kKeyTiles = kBlockN / 8;  // n tiles of S
  constexpr int kDimTiles = HEAD_DIM / 8;  // n tiles of O
  constexpr int kStride = T::kRowStride;
  constexpr float kInf = INFINITY;
  static_assert(kDimTiles % 2 == 0 && kKeyTiles % 2 == 0, "ldmatrix.x4 reads two n tiles at a time");
  Element* q_tile = dynamic_shared_memory<Element>();  // [kBlockM][kStride]: Q, then the output
  Element* k_tile = q_tile + kBlockM * kStride;         // [kBlockN][kStride]
  Element* v_tile = k_tile + kBlockN * kStride;         // [kBlockN][kStride]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group = lane / 4, quad = lane % 4;  // the mma fragment coordinates
  // ldmatrix.x4 row addresses: lanes 8i .. 8i + 7 give matrix i's rows. For A (Q) and for V (.trans):
  // matrices (rows +0, +8) x (columns +0, +8), row-fastest; for K: (columns +0, +8) x (keys +0, +8).
  const int ld_row = lane % 16, ld_col = (lane / 16) * 8;
  const int ld_key = (lane % 8) + (lane / 16) * 8, ld_dim = ((lane / 8) % 2) * 8;
  const int b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
  const int block = p.causal ? static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x) : blockIdx.x;
  const int m0 = block * kBlockM;
  const int offset = p.kv_len - p.q_len;  // query i sits at key position i + offset
  const int warp_row = warp * kWarpRows;  // this warp's first row in the block

  const Element* q = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Element* k = static_cast<const Element*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;

  // Keys that some query of this block can see: [lo, hi), lo rounded down to a tile.
  const int start = p.kv_start != nullptr ? max(p.kv_start[b], 0) : 0;
  const int first_pos = m0 + offset;
  const int last_pos = min(m0 + kBlockM, p.q_len) - 1 + offset;
  int lo = start;
  if (p.window > 0) lo = max(lo, first_pos - p.window + 1);
  lo = (lo / kBlockN) * kBlockN;
  const int hi = p.causal ? min(p.kv_len, last_pos + 1) : p.kv_len;

  copy_rows_async<Element, HEAD_DIM, kBlockM>(q_tile, q, p.q_seq_stride, m0, p.q_len, tid);
  if (lo < hi) copy_rows_async<Element, HEAD_DIM, kBlockN>(k_tile, k, p.k_seq_stride, lo, p.kv_len, tid);
  cp_async_commit_group();
  cp_async_wait_group<0>();
  __syncthreads();
  if (p.negate_scores) {  // scale < 0: flip the sign bits of Q (a uniform branch: the barrier is safe)
#pragma unroll
    for (int i = 0; i < kBlockM * T::kChunks / kThreads; ++i) {
      const int index = tid + i * kThreads;
      uint4* chunk = reinterpret_cast<uint4*>(q_tile + (index / T::kChunks) * kStride + (index % T::kChunks) * 8);
      uint4 value = *chunk;
      value.x ^= 0x80008000u, value.y ^= 0x80008000u, value.z ^= 0x80008000u, value.w ^= 0x80008000u;
      *chunk = value;
    }
    __syncthreads();
  }

  // A fragments of Q for k step s, m16 tile t: from registers (D = 64) or from the Q tile.
  uint32_t q_registers[T::kQInRegisters ? kSteps : 1][kRowTiles][4];
  auto load_q = [&](uint32_t (&a)[4], int s, int t) {
    ldmatrix_x4<false>(a, q_tile + (warp_row + t * 16 + ld_row) * kStride + s * 16 + ld_col);
  };
  if constexpr (T::kQInRegisters) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
#pragma unroll
      for (int t = 0; t < kRowTiles; ++t) load_q(q_registers[s][t], s, t);
    }
  }

  float o_acc[kRowTiles][kDimTiles][4];
#pragma unroll
  for (int t = 0; t < kRowTiles; ++t) {
#pragma unroll
    for (int d = 0; d < kDimTiles; ++d) o_acc[t][d][0] = o_acc[t][d][1] = o_acc[t][d][2] = o_acc[t][d][3] = 0.f;
  }
  float row_max[kRowTiles][2], row_sum[kRowTiles][2];  // raw-score max; this thread's share of the sum
#pragma unroll
  for (int t = 0; t < kRowTiles; ++t) row_max[t][0] = row_max[t][1] = -kInf, row_sum[t][0] = row_sum[t][1] = 0.f;

  for (int n0 = lo; n0 < hi; n0 += kBlockN) {
    cp_async_wait_group<0>();  // K(n0) landed (this thread's copies) ...
    __syncthreads();           // ... and everyone's; every warp is done with V(n0 - kBlockN)
    copy_rows_async<Element, HEAD_DIM, kBlockN>(v_tile, v, p.v_seq_stride, n0, p.kv_len, tid);
    cp_async_commit_group();

    // S = Q K^T for this warp's 32 rows x 64 keys.
    float s_acc[kRowTiles][kKeyTiles][4];
#pragma unroll
    for (int t = 0; t < kRowTiles; ++t) {
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) s_acc[t][j][0] = s_acc[t][j][1] = s_acc[t][j][2] = s_acc[t][j][3] = 0.f;
    }
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      uint32_t a[kRowTiles][4];
#pragma unroll
      for (int t = 0; t < kRowTiles; ++t) {
        if constexpr (T::kQInRegisters) {
#pragma unroll
          for (int r = 0; r < 4; ++r) a[t][r] = q_registers[s][t][r];
        } else {
          load_q(a[t], s, t);
        }
      }
#pragma unroll
      for (int j = 0; j < kKeyTiles; j += 2) {
        uint32_t b_frag[4];  // key tiles j, j + 1: {b0, b1} each
        ldmatrix_x4<false>(b_frag, k_tile + (j * 8 + ld_key) * kStride + s * 16 + ld_dim);
        const uint32_t b_first[2] = {b_frag[0], b_frag[1]}, b_second[2] = {b_frag[2], b_frag[3]};
#pragma unroll
        for (int t = 0; t < kRowTiles; ++t) {
          mma_m16n8k16<Element>(s_acc[t][j], a[t], b_first);
          mma_m16n8k16<Element>(s_acc[t][j + 1], a[t], b_second);
        }
      }
    }

    // Mask the tiles that cross a bound (raw scores; -inf for a hidden key).
    const bool crosses = n0 < start || n0 + kBlockN > p.kv_len || (p.causal && n0 + kBlockN - 1 > first_pos) ||
                         (p.window > 0 && n0 <= last_pos - p.window);
    if (crosses) {
#pragma unroll
      for (int t = 0; t < kRowTiles; ++t) {
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = n0 + j * 8 + quad * 2 + (e & 1);
            const int pos = m0 + warp_row + t * 16 + group + (e >> 1) * 8 + offset;
            const bool visible = key >= start && key < p.kv_len && (!p.causal || key <= pos) &&
                                 (p.window == 0 || key > pos - p.window);
            if (!visible) s_acc[t][j][e] = -kInf;
          }
        }
      }
    }

    // Online softmax: new row maxima, p = 2^(s c - m c), rescale of the running sums and of O.
#pragma unroll
    for (int t = 0; t < kRowTiles; ++t) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float tile_max = row_max[t][half];
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j) {
          tile_max = fmaxf(tile_max, fmaxf(s_acc[t][j][2 * half], s_acc[t][j][2 * half + 1]));
        }
        const float new_max = quad_max(tile_max);
        const float scaled_max = new_max == -kInf ? 0.f : new_max * p.scale_log2;  // nothing visible yet: 0
        const float alpha = exp2_approx(row_max[t][half] * p.scale_log2 - scaled_max);
        float tile_sum = 0.f;
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            s_acc[t][j][e] = exp2_approx(fmaf(s_acc[t][j][e], p.scale_log2, -scaled_max));
            tile_sum += s_acc[t][j][e];
          }
        }
        row_sum[t][half] = row_sum[t][half] * alpha + tile_sum;
        row_max[t][half] = new_max;
#pragma unroll
        for (int d = 0; d < kDimTiles; ++d) {
          o_acc[t][d][2 * half] *= alpha;
          o_acc[t][d][2 * half + 1] *= alpha;
        }
      }
    }

    cp_async_wait_group<0>();  // V(n0) landed ...
    __syncthreads();           // ... for everyone; every warp is done with K(n0)
    if (n0 + kBlockN < hi) {
      copy_rows_async<Element, HEAD_DIM, kBlockN>(k_tile, k, p.k_seq_stride, n0 + kBlockN, p.kv_len, tid);
      cp_async_commit_group();
    }

    // O += P V: two S tiles (16 keys) make one A fragment; ldmatrix.trans gives two dim tiles of V.
#pragma unroll
    for (int s = 0; s < kBlockN / 16; ++s) {
      uint32_t p_frag[kRowTiles][4];
#pragma unroll
      for (int t = 0; t < kRowTiles; ++t) {
        p_frag[t][0] = Ops::pack(s_acc[t][2 * s][0], s_acc[t][2 * s][1]);
        p_frag[t][1] = Ops::pack(s_acc[t][2 * s][2], s_acc[t][2 * s][3]);
        p_frag[t][2] = Ops::pack(s_acc[t][2 * s + 1][0], s_acc[t][2 * s + 1][1]);
        p_frag[t][3] = Ops::pack(s_acc[t][2 * s + 1][2], s_acc[t][2 * s + 1][3]);
      }
#pragma unroll
      for (int d = 0; d < kDimTiles; d += 2) {
        uint32_t b_frag[4];  // dim tiles d, d + 1: {b0, b1} each
        ldmatrix_x4<true>(b_frag, v_tile + (s * 16 + ld_row) * kStride + d * 8 + ld_col);
        const uint32_t b_first[2] = {b_frag[0], b_frag[1]}, b_second[2] = {b_frag[2], b_frag[3]};
#pragma unroll
        for (int t = 0; t < kRowTiles; ++t) {
          mma_m16n8k16<Element>(o_acc[t][d], p_frag[t], b_first);
          mma_m16n8k16<Element>(o_acc[t][d + 1], p_frag[t], b_second);
        }
      }
    }
  }

  // Normalise into the Q tile (a row that saw no key has sum 0 and accumulator 0: zeros), then store
  // 16-byte rows. Every warp is done with Q and V once all pass the barrier. The store's addresses come
  // from an opaque copy of the thread index: ptxas would otherwise keep the prologue's identical Q-chunk
  // addresses alive across the key loop, and spill them at D >= 96.
  __syncthreads();
  const int store_tid = opaque(tid);
#pragma unroll
  for (int t = 0; t < kRowTiles; ++t) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float total = quad_sum(row_sum[t][half]);
      const float inverse = total > 0.f ? 1.f / total : 0.f;
      Element* row = q_tile + (warp_row + t * 16 + group + half * 8) * kStride + quad * 2;
#pragma unroll
      for (int d = 0; d < kDimTiles; ++d) {
        *reinterpret_cast<uint32_t*>(row + d * 8) =
            Ops::pack(o_acc[t][d][2 * half] * inverse, o_acc[t][d][2 * half + 1] * inverse);
      }
    }
  }
  __syncthreads();
  Element* out = static_cast<Element*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
#pragma unroll
  for (int i = 0; i < kBlockM * T::kChunks / kThreads; ++i) {
    const int index = store_tid + i * kThreads;
    const int r = index / T::kChunks, c = (index % T::kChunks) * 8;
    if (m0 + r < p.q_len) {
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(m0 + r) * p.out_seq_stride + c) =
          *reinterpret_cast<const uint4*>(q_tile + r * kStride + c);
    }
  }
}

}  // namespace fusedgpt::attention
