// The prefill attention kernel (see attention.h). One CTA per (64 queries, batch * head); 4 warps, each
// computing 16 query rows against 64-key tiles staged in shared memory:
//   S = Q K^T      mma m16n8k16 (Q fragments in registers for the whole loop, K rows from shared memory)
//   online softmax in fp32 with exp2 (row max/sum shared by the 4 threads of an mma quad)
//   O += P V       P re-packed from the S accumulators as the A operand (no shared-memory round trip),
//                  V staged transposed in shared memory so each B fragment is one 32-bit load.
// Only key tiles that can hold a visible key are visited (causal, window, left padding), so a window of
// W costs O(S * W). Tiles crossing a bound are masked; the rest skip the mask.
// Not yet tuned (no GPU measurement so far): loads are synchronous (no cp.async pipeline), fragments
// come from plain 32-bit shared loads (no ldmatrix), 64-row tiles.
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

__device__ __forceinline__ uint32_t load_pair(const void* pointer) {  // two consecutive 16-bit elements
  return *reinterpret_cast<const uint32_t*>(pointer);
}

__device__ __forceinline__ float quad_max(float value) {  // over the 4 threads sharing an mma row
  value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 1));
  return fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 2));
}

__device__ __forceinline__ float quad_sum(float value) {
  value += __shfl_xor_sync(0xffffffffu, value, 1);
  return value + __shfl_xor_sync(0xffffffffu, value, 2);
}

template <typename Element, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const Params p) {
  using Ops = ElementOps<Element>;
  constexpr int kSteps = HEAD_DIM / 16;       // k steps of Q K^T
  constexpr int kKeyTiles = kBlockN / 8;      // n tiles of S
  constexpr int kDimTiles = HEAD_DIM / 8;     // n tiles of O
  constexpr int kKStride = HEAD_DIM + 8;      // padded rows: conflict-free 32-bit fragment loads
  constexpr int kVtStride = kBlockN + 8;
  constexpr int kVectorsPerRow = HEAD_DIM / 8;  // 16-byte vectors per K/V row
  constexpr float kInf = INFINITY;
  alignas(16) __shared__ Element k_tile[kBlockN * kKStride];   // [key][dim]
  alignas(16) __shared__ Element vt_tile[HEAD_DIM * kVtStride];  // [dim][key]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group = lane / 4, quad = lane % 4;  // the mma fragment coordinates
  const int b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
  const int m0 = blockIdx.x * kBlockM;
  const int offset = p.kv_len - p.q_len;  // query i sits at key position i + offset
  const int rows[2] = {m0 + warp * 16 + group, m0 + warp * 16 + group + 8};
  const int positions[2] = {rows[0] + offset, rows[1] + offset};

  const Element* q = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Element* k = static_cast<const Element*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;

  // Q as A fragments, kept in registers for the whole key loop.
  uint32_t q_frag[kSteps][4];
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int col = s * 16 + quad * 2;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // half 0: row group, half 1: row group + 8
      const bool valid = rows[half] < p.q_len;
      const Element* row = q + static_cast<int64_t>(rows[half]) * p.q_seq_stride;
      q_frag[s][half] = valid ? load_pair(row + col) : 0u;
      q_frag[s][half + 2] = valid ? load_pair(row + col + 8) : 0u;
    }
  }

  // Keys that some query of this block can see: [lo, hi), lo rounded down to a tile.
  const int start = p.kv_start != nullptr ? max(p.kv_start[b], 0) : 0;
  const int first_pos = m0 + offset;
  const int last_pos = min(m0 + kBlockM, p.q_len) - 1 + offset;
  int lo = start;
  if (p.window > 0) lo = max(lo, first_pos - p.window + 1);
  lo = (lo / kBlockN) * kBlockN;
  const int hi = p.causal ? min(p.kv_len, last_pos + 1) : p.kv_len;

  float o_acc[kDimTiles][4];
#pragma unroll
  for (int t = 0; t < kDimTiles; ++t) o_acc[t][0] = o_acc[t][1] = o_acc[t][2] = o_acc[t][3] = 0.f;
  float row_max[2] = {-kInf, -kInf};
  float row_sum[2] = {0.f, 0.f};  // this thread's share; summed over the quad at the end

  for (int n0 = lo; n0 < hi; n0 += kBlockN) {
    __syncthreads();  // every warp is done with the previous tile
    for (int index = tid; index < kBlockN * kVectorsPerRow; index += kThreads) {
      const int r = index / kVectorsPerRow, c = (index % kVectorsPerRow) * 8;
      const int key = n0 + r;
      uint4 k_vec = make_uint4(0, 0, 0, 0), v_vec = make_uint4(0, 0, 0, 0);
      if (key < p.kv_len) {
        k_vec = *reinterpret_cast<const uint4*>(k + static_cast<int64_t>(key) * p.k_seq_stride + c);
        v_vec = *reinterpret_cast<const uint4*>(v + static_cast<int64_t>(key) * p.v_seq_stride + c);
      }
      *reinterpret_cast<uint4*>(&k_tile[r * kKStride + c]) = k_vec;
      const Element* v_elements = reinterpret_cast<const Element*>(&v_vec);
#pragma unroll
      for (int e = 0; e < 8; ++e) vt_tile[(c + e) * kVtStride + r] = v_elements[e];
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s_acc[kKeyTiles][4];
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) s_acc[j][0] = s_acc[j][1] = s_acc[j][2] = s_acc[j][3] = 0.f;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) {
        const Element* key_row = &k_tile[(j * 8 + group) * kKStride + s * 16 + quad * 2];
        const uint32_t b_frag[2] = {load_pair(key_row), load_pair(key_row + 8)};
        mma_m16n8k16<Element>(s_acc[j], q_frag[s], b_frag);
      }
    }

    // Scale to log2 units and mask the tiles that cross a bound.
    const bool crosses = n0 < start || n0 + kBlockN > p.kv_len || (p.causal && n0 + kBlockN - 1 > first_pos) ||
                         (p.window > 0 && n0 <= last_pos - p.window);
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float score = s_acc[j][e] * p.scale_log2;
        if (crosses) {
          const int key = n0 + j * 8 + quad * 2 + (e & 1);
          const int pos = positions[e >> 1];
          const bool visible = key >= start && key < p.kv_len && (!p.causal || key <= pos) &&
                               (p.window == 0 || key > pos - p.window);
          score = visible ? score : -kInf;
        }
        s_acc[j][e] = score;
      }
    }

    // Online softmax: new row maxima, rescale of the running sums and of O.
    float alpha[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float tile_max = row_max[half];
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) tile_max = fmaxf(tile_max, fmaxf(s_acc[j][2 * half], s_acc[j][2 * half + 1]));
      const float new_max = quad_max(tile_max);
      const float safe_max = new_max == -kInf ? 0.f : new_max;  // nothing visible yet in this row
      alpha[half] = exp2f(row_max[half] - safe_max);
      float tile_sum = 0.f;
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) {
        s_acc[j][2 * half] = exp2f(s_acc[j][2 * half] - safe_max);
        s_acc[j][2 * half + 1] = exp2f(s_acc[j][2 * half + 1] - safe_max);
        tile_sum += s_acc[j][2 * half] + s_acc[j][2 * half + 1];
      }
      row_sum[half] = row_sum[half] * alpha[half] + tile_sum;
      row_max[half] = new_max;
    }
#pragma unroll
    for (int t = 0; t < kDimTiles; ++t) {
      o_acc[t][0] *= alpha[0];
      o_acc[t][1] *= alpha[0];
      o_acc[t][2] *= alpha[1];
      o_acc[t][3] *= alpha[1];
    }

    // O += P V: two S tiles (16 keys) make one A fragment.
#pragma unroll
    for (int s = 0; s < kBlockN / 16; ++s) {
      const uint32_t p_frag[4] = {Ops::pack(s_acc[2 * s][0], s_acc[2 * s][1]),
                                  Ops::pack(s_acc[2 * s][2], s_acc[2 * s][3]),
                                  Ops::pack(s_acc[2 * s + 1][0], s_acc[2 * s + 1][1]),
                                  Ops::pack(s_acc[2 * s + 1][2], s_acc[2 * s + 1][3])};
#pragma unroll
      for (int t = 0; t < kDimTiles; ++t) {
        const Element* dim_row = &vt_tile[(t * 8 + group) * kVtStride + s * 16 + quad * 2];
        const uint32_t b_frag[2] = {load_pair(dim_row), load_pair(dim_row + 8)};
        mma_m16n8k16<Element>(o_acc[t], p_frag, b_frag);
      }
    }
  }

  // Normalise and store; a row that saw no key has sum 0 and accumulator 0: it stores zeros.
  Element* out = static_cast<Element*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float total = quad_sum(row_sum[half]);  // every lane shuffles, before the row bound check
    const float inverse = total > 0.f ? 1.f / total : 0.f;
    if (rows[half] >= p.q_len) continue;
    Element* row = out + static_cast<int64_t>(rows[half]) * p.out_seq_stride;
#pragma unroll
    for (int t = 0; t < kDimTiles; ++t) {
      *reinterpret_cast<uint32_t*>(row + t * 8 + quad * 2) =
          Ops::pack(o_acc[t][2 * half] * inverse, o_acc[t][2 * half + 1] * inverse);
    }
  }
}

}  // namespace fusedgpt::attention
