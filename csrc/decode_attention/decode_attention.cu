// Decode attention over a static KV cache with the KV-cache append fused in, split along the keys
// (flash-decoding) so that one long sequence fills the GPU. Semantics: python/fusedgpt/ops/decode_attention.py.
//
// Pass 1, grid (splits, B * H, T): one program per (key split, sequence and head, query). Lanes are
// grouped LANES_PER_KEY to a key, each lane holding a 16-byte slice of q, k, v and of the accumulator;
// a group's score is a shuffle reduction inside the group, and each group runs its own online softmax
// over its keys, 4 keys per step, the next step's rows copied (cp.async) while this step's are used. The groups of a
// block are merged in shared memory and the split's partial (max, sum, accumulator) is written out.
// Pass 2, grid (B * H * T): merges the splits; with one split there is nothing to merge and pass 1 writes
// the output itself (no second launch). The launch shape depends on host values only (shapes,
// num_splits, the kernel's occupancy), never on cache_lens: capturable in a CUDA graph, replayable with
// new lengths. num_splits = 0 sizes the splits from occupancy (see choose_splits below).
// The new tokens are read from k, v themselves (never from the cache slots being written in the same
// launch), and the program of split 0 for query t writes token t into the caches if the block fits.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "common.h"
#include "op_limits.h"

namespace fusedgpt {
namespace {

struct DecodeParams {
  const void* q;        // [B, T, H, D]
  void* k_cache;        // [B, S_max, H, D]
  void* v_cache;
  const int* cache_lens;  // [B]
  const void* k_new;    // [B, T, H, D] or nullptr
  const void* v_new;
  const int* kv_start;  // [B] or nullptr
  float* part_acc;      // [B * H, T, splits, D] (unused with one split)
  float* part_stats;    // [B * H, T, splits, 2]: max (log2 units), sum (unused with one split)
  void* out;            // [B, T, H, D]: written here directly when there is one split
  int64_t out_strides[3];
  int64_t q_strides[3], k_cache_strides[3], v_cache_strides[3], k_new_strides[3], v_new_strides[3];
  int heads, tokens, max_len, window, splits;
  float scale_log2;
};

constexpr int kDecodeThreads = 128;
constexpr int kKeysPerStep = 4;
constexpr int kStages = 2;  // of the cp.async pipeline (see attend_keys)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Element>
__device__ __forceinline__ Element from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename Element, int HEAD_DIM>
struct DecodeTraits {
  static constexpr int kVec = 16 / sizeof(Element);                 // elements per lane
  static constexpr int kUsedLanes = HEAD_DIM / kVec;                // lanes holding real dims
  static constexpr int kLanesPerKey = kUsedLanes <= 8 ? 8 : (kUsedLanes <= 16 ? 16 : 32);
  static constexpr int kGroupsPerWarp = 32 / kLanesPerKey;
  static constexpr int kGroups = kGroupsPerWarp * (kDecodeThreads / 32);
  static_assert(HEAD_DIM % kVec == 0 && kUsedLanes <= 32, "head dim must be a multiple of the vector width");
};

template <typename Element, int N>
__device__ __forceinline__ void load_vector(const Element* pointer, bool valid, float (&out)[N]) {
  Vec<Element, N> v;
  if (valid) {
    v = *reinterpret_cast<const Vec<Element, N>*>(pointer);
  }
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = valid ? to_float(v.v[i]) : 0.f;
}

template <typename Element, int HEAD_DIM>
__global__ void __launch_bounds__(kDecodeThreads) decode_attention_split_kernel(const DecodeParams p) {
  using Traits = DecodeTraits<Element, HEAD_DIM>;
  constexpr int kVec = Traits::kVec, kLanesPerKey = Traits::kLanesPerKey, kGroups = Traits::kGroups;
  constexpr float kInf = INFINITY;
  const int split = blockIdx.x, batch_head = blockIdx.y, t = blockIdx.z;
  const int b = batch_head / p.heads, h = batch_head % p.heads;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int lane_in_group = lane % kLanesPerKey;
  const int group = warp * Traits::kGroupsPerWarp + lane / kLanesPerKey;
  const int dim = lane_in_group * kVec;
  const bool dim_valid = lane_in_group < Traits::kUsedLanes;
  const bool has_new = p.k_new != nullptr;

  // Lengths outside [0, S_max] (corrupted) are clamped for reading, as the reference does (the keys are
  // then none or the whole cache, and no loop runs past S_max + T keys); nothing is appended for them.
  const int raw_len = p.cache_lens[b];
  const int cache_len = min(max(raw_len, 0), p.max_len);
  const int cached = cache_len;  // keys j < cached come from the cache
  const int seq_len = has_new ? cache_len + p.tokens : cache_len;
  const int position = seq_len - p.tokens + t;

  const Element* k_cache = static_cast<const Element*>(p.k_cache) + b * p.k_cache_strides[0] + h * p.k_cache_strides[2];
  const Element* v_cache = static_cast<const Element*>(p.v_cache) + b * p.v_cache_strides[0] + h * p.v_cache_strides[2];
  const Element* k_new = has_new ? static_cast<const Element*>(p.k_new) + b * p.k_new_strides[0] + h * p.k_new_strides[2] : nullptr;
  const Element* v_new = has_new ? static_cast<const Element*>(p.v_new) + b * p.v_new_strides[0] + h * p.v_new_strides[2] : nullptr;

  // The fused append: split 0 of query t writes token t, when the whole block of new tokens fits.
  if (has_new && split == 0 && warp == 0 && lane < Traits::kUsedLanes &&
      raw_len >= 0 && raw_len <= p.max_len - p.tokens) {  // (no int overflow, whatever cache_lens holds)
    const int64_t slot = cache_len + t;
    using V = Vec<Element, kVec>;
    *reinterpret_cast<V*>(static_cast<Element*>(p.k_cache) + b * p.k_cache_strides[0] + slot * p.k_cache_strides[1] +
                          h * p.k_cache_strides[2] + lane * kVec) =
        *reinterpret_cast<const V*>(k_new + t * p.k_new_strides[1] + lane * kVec);
    *reinterpret_cast<V*>(static_cast<Element*>(p.v_cache) + b * p.v_cache_strides[0] + slot * p.v_cache_strides[1] +
                          h * p.v_cache_strides[2] + lane * kVec) =
        *reinterpret_cast<const V*>(v_new + t * p.v_new_strides[1] + lane * kVec);
  }

  // This query's visible keys [lo, hi), and this split's share of them.
  int lo = p.kv_start != nullptr ? max(p.kv_start[b], 0) : 0;
  if (p.window > 0) lo = max(lo, position - p.window + 1);
  const int hi = position + 1;
  const int span = max(hi - lo, 0);
  const int chunk = (span + p.splits - 1) / p.splits;
  const int split_lo = lo + split * chunk;
  const int split_hi = min(hi, split_lo + chunk);

  float q[kVec];
  load_vector<Element, kVec>(static_cast<const Element*>(p.q) + b * p.q_strides[0] + t * p.q_strides[1] +
                                 h * p.q_strides[2] + dim, dim_valid, q);
#pragma unroll
  for (int i = 0; i < kVec; ++i) q[i] *= p.scale_log2;

  float acc[kVec] = {};
  float running_max = -kInf, running_sum = 0.f;
  // Folds keys [key_lo, key_hi) into the running softmax; key j's row is rows_k / rows_v + (j - first)
  // rows of their stride. Called for the cached keys of this split and then for its new tokens, so the
  // choice between the cache and k, v is made once per range, not per key. The loop bounds are uniform
  // over the block (the shuffles below need every lane of a warp); each step covers
  // kKeysPerStep * kGroups keys, key = step + u * kGroups + group.
  // Rows arrive through a 2-stage cp.async pipeline in shared memory (FlashInfer's decode): the copies of
  // step n + 1 are issued before step n's math, so each lane keeps 2 x kKeysPerStep 16-byte loads in
  // flight while it computes, without registers to hold them. The stages are thread-private (a thread
  // reads back only what it copied, after its own cp.async wait): no barrier. Keys past the range, and
  // lanes past the head dim, copy zeros (nothing is read): their scores are masked, their values add 0.
  alignas(16) __shared__ uint4 stage_k[kStages][kKeysPerStep][kDecodeThreads];
  alignas(16) __shared__ uint4 stage_v[kStages][kKeysPerStep][kDecodeThreads];
  using V = Vec<Element, kVec>;
  static_assert(sizeof(V) == sizeof(uint4), "one 16-byte vector per lane and key");
  const auto attend_keys = [&](int key_lo, int key_hi, const Element* rows_k, int64_t stride_k,
                               const Element* rows_v, int64_t stride_v, int first) {
    constexpr int kStep = kGroups * kKeysPerStep;
    const auto copy_step = [&](int step, int stage) {
#pragma unroll
      for (int u = 0; u < kKeysPerStep; ++u) {
        const int key = step + u * kGroups + group;
        const bool valid = key < key_hi && dim_valid;
        const int64_t row = valid ? key - first : 0;
        cp_async_16(&stage_k[stage][u][threadIdx.x], rows_k + row * stride_k + (valid ? dim : 0), valid);
        cp_async_16(&stage_v[stage][u][threadIdx.x], rows_v + row * stride_v + (valid ? dim : 0), valid);
      }
      cp_async_commit_group();
    };
    if (key_lo < key_hi) copy_step(key_lo, 0);
    int stage = 0;
    for (int step = key_lo; step < key_hi; step += kStep, stage ^= 1) {
      if (step + kStep < key_hi) {
        copy_step(step + kStep, stage ^ 1);  // in flight during this step's math
        cp_async_wait_group<1>();            // this step's copies have landed
      } else {
        cp_async_wait_group<0>();
      }
      float scores[kKeysPerStep];
      float step_max = running_max;
#pragma unroll
      for (int u = 0; u < kKeysPerStep; ++u) {
        const uint4 raw = stage_k[stage][u][threadIdx.x];
        const V& k = *reinterpret_cast<const V*>(&raw);
        float partial = 0.f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) partial += q[i] * to_float(k.v[i]);
#pragma unroll
        for (int offset = kLanesPerKey / 2; offset > 0; offset >>= 1) {
          partial += __shfl_xor_sync(0xffffffffu, partial, offset);
        }
        scores[u] = step + u * kGroups + group < key_hi ? partial : -kInf;
        step_max = fmaxf(step_max, scores[u]);
      }
      const float safe_max = step_max == -kInf ? 0.f : step_max;
      const float alpha = exp2f(running_max - safe_max);
      running_sum *= alpha;
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] *= alpha;
#pragma unroll
      for (int u = 0; u < kKeysPerStep; ++u) {
        const float weight = exp2f(scores[u] - safe_max);
        running_sum += weight;
        const uint4 raw = stage_v[stage][u][threadIdx.x];
        const V& v = *reinterpret_cast<const V*>(&raw);
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += weight * to_float(v.v[i]);
      }
      running_max = step_max;
    }
  };
  attend_keys(split_lo, min(split_hi, cached), k_cache, p.k_cache_strides[1], v_cache, p.v_cache_strides[1], 0);
  if (has_new) {  // the new tokens (positions cache_len + i) that fall in this split, from k, v themselves
    attend_keys(max(split_lo, cached), split_hi, k_new, p.k_new_strides[1], v_new, p.v_new_strides[1], cache_len);
  }

  // Merge the block's groups, then write this split's partial.
  __shared__ float group_max[kGroups], group_sum[kGroups];
  alignas(16) __shared__ float group_acc[kGroups][HEAD_DIM];
  if (lane_in_group == 0) {
    group_max[group] = running_max;
    group_sum[group] = running_sum;
  }
  if (dim_valid) {
    // 16-byte stores, which the hardware serves 8 lanes at a time: 8 lanes whose dims are 8 floats apart
    // (fp16 / bf16) would put two stores on each half of the banks, so lanes 4-7 of every 8 store their
    // second 4 floats first (the two halves' quads then differ in every lane): no bank conflict.
    using Quad = Vec<float, 4>;
    static_assert(kVec % 4 == 0, "acc is stored in quads");
    constexpr int kQuads = kVec / 4;
    const int rotate = kQuads == 2 ? (lane_in_group >> 2) & 1 : 0;
#pragma unroll
    for (int s = 0; s < kQuads; ++s) {
      const int quad = s ^ rotate;  // 0 or 1 (kVec = 8), 0 (kVec = 4)
      Quad value;
#pragma unroll
      for (int i = 0; i < 4; ++i) value.v[i] = quad == 0 ? acc[i] : acc[(kQuads - 1) * 4 + i];
      *reinterpret_cast<Quad*>(&group_acc[group][dim + 4 * quad]) = value;
    }
  }
  __syncthreads();
  float block_max = -kInf;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) block_max = fmaxf(block_max, group_max[g]);
  const float safe_block_max = block_max == -kInf ? 0.f : block_max;
  float block_sum = 0.f;  // every thread reads the same words: broadcasts
#pragma unroll
  for (int g = 0; g < kGroups; ++g) block_sum += group_sum[g] * exp2f(group_max[g] - safe_block_max);
  // The only split: the output itself, as the combine would write it (nothing visible: zeros).
  const bool only_split = p.splits == 1;
  const float inverse = block_sum > 0.f ? 1.f / block_sum : 0.f;
  Element* out_row = static_cast<Element*>(p.out) + b * p.out_strides[0] + t * p.out_strides[1] + h * p.out_strides[2];
  const int64_t part = (static_cast<int64_t>(batch_head) * p.tokens + t) * p.splits + split;
  for (int d = threadIdx.x; d < HEAD_DIM; d += kDecodeThreads) {
    float total = 0.f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) total += group_acc[g][d] * exp2f(group_max[g] - safe_block_max);
    if (only_split) {
      out_row[d] = from_float<Element>(total * inverse);
    } else {
      p.part_acc[part * HEAD_DIM + d] = total;
    }
  }
  if (!only_split && threadIdx.x == 0) {
    p.part_stats[part * 2] = block_max;
    p.part_stats[part * 2 + 1] = block_sum;
  }
}

// Grid (B * H * T): out[b, t, h] = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M); zeros if nothing visible.
template <typename Element, int HEAD_DIM>
__global__ void __launch_bounds__(kDecodeThreads) decode_attention_combine_kernel(
    const float* __restrict__ part_acc, const float* __restrict__ part_stats, Element* __restrict__ out, int heads,
    int tokens, int splits, int64_t out_stride_b, int64_t out_stride_t, int64_t out_stride_h) {
  const int index = blockIdx.x;  // (batch_head * tokens + t)
  const int t = index % tokens, batch_head = index / tokens;
  const int b = batch_head / heads, h = batch_head % heads;
  const float* stats = part_stats + static_cast<int64_t>(index) * splits * 2;
  float max_all = -INFINITY;
  for (int s = 0; s < splits; ++s) max_all = fmaxf(max_all, stats[2 * s]);
  const float safe_max = max_all == -INFINITY ? 0.f : max_all;
  float sum_all = 0.f;
  for (int s = 0; s < splits; ++s) sum_all += stats[2 * s + 1] * exp2f(stats[2 * s] - safe_max);
  const float inverse = sum_all > 0.f ? 1.f / sum_all : 0.f;
  Element* row = out + b * out_stride_b + t * out_stride_t + h * out_stride_h;
  for (int d = threadIdx.x; d < HEAD_DIM; d += kDecodeThreads) {
    float total = 0.f;
    for (int s = 0; s < splits; ++s) {
      total += part_acc[(static_cast<int64_t>(index) * splits + s) * HEAD_DIM + d] * exp2f(stats[2 * s] - safe_max);
    }
    row[d] = from_float<Element>(total * inverse);
  }
}

// Key splits when the caller gives none: as many programs as the split kernel can keep resident on every
// multiprocessor (cudaOccupancyMaxActiveBlocksPerMultiprocessor x the SM count, FlashInfer's sizing), but
// never a split of fewer than kSplitGranule keys of the longest range a query can see, and at most 128.
// Host values only (shapes, window, the device): a captured step replays with the same launch.
constexpr int kSplitGranule = 64;
constexpr int kMaxAutomaticSplits = 128;

int multiprocessor_count(int device) {
  static std::atomic<int> counts[64];  // per device, 0 until asked
  if (device < 0 || device >= 64) device = 0;
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

template <typename Element, int HEAD_DIM>
int choose_splits(int device, int64_t programs, int64_t keys) {
  static std::atomic<int> resident[64];  // blocks per multiprocessor, per device (same for every device
  if (device < 0 || device >= 64) device = 0;  // of one architecture; asked once each)
  int blocks = resident[device].load(std::memory_order_relaxed);
  if (blocks == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks, decode_attention_split_kernel<Element, HEAD_DIM>, kDecodeThreads, 0));
    blocks = std::max(blocks, 1);
    resident[device].store(blocks, std::memory_order_relaxed);
  }
  const int64_t slots = static_cast<int64_t>(blocks) * multiprocessor_count(device);
  const int64_t tiles = std::max<int64_t>((keys + kSplitGranule - 1) / kSplitGranule, 1);
  const int64_t wanted = (slots + std::max<int64_t>(programs, 1) - 1) / std::max<int64_t>(programs, 1);
  return static_cast<int>(std::clamp<int64_t>(std::min(wanted, tiles), 1, kMaxAutomaticSplits));
}

template <typename Element, int HEAD_DIM>
at::Tensor launch_decode(DecodeParams params, int batch, int64_t requested_splits, int64_t keys,
                         const at::Tensor& q, cudaStream_t stream) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  const int64_t programs = static_cast<int64_t>(batch) * params.heads * params.tokens;
  params.splits = requested_splits > 0 ? static_cast<int>(requested_splits)
                                       : choose_splits<Element, HEAD_DIM>(q.device().index(), programs, keys);
  const int64_t parts = params.splits > 1 ? programs * params.splits : 0;  // one split writes out directly
  at::Tensor part_acc = at::empty({parts * HEAD_DIM}, q.options().dtype(at::kFloat));
  at::Tensor part_stats = at::empty({parts * 2}, q.options().dtype(at::kFloat));
  params.part_acc = part_acc.data_ptr<float>();
  params.part_stats = part_stats.data_ptr<float>();
  params.out = out.data_ptr();
  for (int i = 0; i < 3; ++i) params.out_strides[i] = out.stride(i);
  const dim3 split_grid(params.splits, batch * params.heads, params.tokens);
  decode_attention_split_kernel<Element, HEAD_DIM><<<split_grid, kDecodeThreads, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (params.splits == 1) return out;  // the split kernel wrote the output
  decode_attention_combine_kernel<Element, HEAD_DIM><<<static_cast<unsigned>(programs), kDecodeThreads, 0, stream>>>(
      params.part_acc, params.part_stats, reinterpret_cast<Element*>(out.data_ptr()), params.heads, params.tokens,
      params.splits, out.stride(0), out.stride(1), out.stride(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void check_lengths(const char* op, const at::Tensor& t, const char* name, int64_t batch, const at::Tensor& q) {
  FUSEDGPT_CHECK(t.dim() == 1 && t.size(0) == batch, op, name, " must have shape [", batch, "], got ", t.sizes());
  FUSEDGPT_CHECK(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
  check_same_device(op, t, name, q, "q");
}

void check_vector_layout(const char* op, const at::Tensor& t, const char* name) {
  const int vec = 16 / static_cast<int>(t.element_size());
  FUSEDGPT_CHECK(is_aligned(t.data_ptr(), 16) && t.stride(0) % vec == 0 && t.stride(1) % vec == 0 &&
                     t.stride(2) % vec == 0,
                 op, name, " must start 16-byte aligned with batch/seq/head strides that are multiples of ", vec,
                 " elements (16-byte loads), got strides ", t.strides(),
                 "; fusedgpt.ops.decode_attention routes such tensors to the Triton kernel");
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& cache_lens, const c10::optional<at::Tensor>& k_new,
                                 const c10::optional<at::Tensor>& v_new, c10::optional<int64_t> window, double scale,
                                 const c10::optional<at::Tensor>& kv_start, int64_t num_splits) {
  const char* op = "decode_attention";
  FUSEDGPT_CHECK(k_new.has_value() == v_new.has_value(), op, "give both k and v (to append), or neither");
  std::vector<std::pair<const at::Tensor*, const char*>> tensors = {{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}};
  if (k_new) tensors.insert(tensors.end(), {{&*k_new, "k"}, {&*v_new, "v"}});
  for (const auto& [t, name] : tensors) {
    FUSEDGPT_CHECK(t->dim() == 4, op, name, " must have rank 4, got shape ", t->sizes());
    check_dtype_in(op, *t, name);
    check_same_dtype(op, *t, name, q, "q");
    check_same_device(op, *t, name, q, "q");
    check_unit_last_stride(op, *t, name);
  }
  FUSEDGPT_CHECK(v_cache.sizes() == k_cache.sizes(), op, "v_cache must have the shape of k_cache (", k_cache.sizes(),
                 "), got ", v_cache.sizes());
  const int64_t batch = q.size(0), tokens = q.size(1), heads = q.size(2), dim = q.size(3), max_len = k_cache.size(1);
  FUSEDGPT_CHECK(k_cache.size(0) == batch && k_cache.size(2) == heads && k_cache.size(3) == dim, op,
                 "k_cache must have shape [B, S_max, H, D] = [", batch, ", S_max, ", heads, ", ", dim,
                 "] to match q, got ", k_cache.sizes());
  FUSEDGPT_CHECK(tokens >= 1 && tokens <= kMaxNewTokens, op, "q must hold 1 to ", kMaxNewTokens,
                 " tokens per sequence, got ", tokens);
  FUSEDGPT_CHECK(is_attention_head_dim(dim), op, "head dim D must be ", FUSEDGPT_ATTENTION_HEAD_DIMS_TEXT,
                 " for the CUDA kernel, got ", dim);
  if (k_new) {
    FUSEDGPT_CHECK(k_new->sizes() == q.sizes(), op, "k must have the shape of q (", q.sizes(), "), got ", k_new->sizes());
    FUSEDGPT_CHECK(v_new->sizes() == q.sizes(), op, "v must have the shape of q (", q.sizes(), "), got ", v_new->sizes());
    FUSEDGPT_CHECK(tokens <= max_len, op, "the cache is too small: ", tokens, " new tokens, k_cache holds at most ",
                   max_len);
  }
  FUSEDGPT_CHECK(max_len < (int64_t{1} << 30), op, "k_cache's sequence length must be below 2^30, got ", max_len);
  check_lengths(op, cache_lens, "cache_lens", batch, q);
  if (kv_start) check_lengths(op, *kv_start, "kv_start", batch, q);
  if (window) FUSEDGPT_CHECK(*window >= 1 && *window < (int64_t{1} << 30), op, "window must be a positive int, got ", *window);
  FUSEDGPT_CHECK(num_splits >= 0 && num_splits <= 1024, op, "num_splits must be in [0, 1024] (0: sized from ",
                 "occupancy), got ", num_splits);
  FUSEDGPT_CHECK(batch * heads <= kMaxBatchHeads, op, "B * H must be at most ", kMaxBatchHeads, ", got ",
                 batch * heads);
  for (const auto& [t, name] : tensors) check_vector_layout(op, *t, name);
  require_cuda(op, q, "q");

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (q.numel() == 0) return at::empty(q.sizes(), q.options());
  const at::Tensor lens = cache_lens.contiguous();
  const at::Tensor starts = kv_start ? kv_start->contiguous() : at::Tensor();

  DecodeParams params{};
  params.q = q.data_ptr();
  params.k_cache = k_cache.data_ptr();
  params.v_cache = v_cache.data_ptr();
  params.cache_lens = lens.data_ptr<int>();
  params.k_new = k_new ? k_new->data_ptr() : nullptr;
  params.v_new = v_new ? v_new->data_ptr() : nullptr;
  params.kv_start = starts.defined() ? starts.data_ptr<int>() : nullptr;
  const auto copy_strides = [](int64_t (&to)[3], const at::Tensor& t) {
    for (int i = 0; i < 3; ++i) to[i] = t.stride(i);
  };
  copy_strides(params.q_strides, q);
  copy_strides(params.k_cache_strides, k_cache);
  copy_strides(params.v_cache_strides, v_cache);
  if (k_new) {
    copy_strides(params.k_new_strides, *k_new);
    copy_strides(params.v_new_strides, *v_new);
  }
  params.heads = static_cast<int>(heads);
  params.tokens = static_cast<int>(tokens);
  params.max_len = static_cast<int>(max_len);
  params.window = window ? static_cast<int>(*window) : 0;
  params.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  // One case per head dim of op_limits.h's list (dispatch_head_dim); anything else is an error.
  // The most keys one query can see (the cache or its window, and the new tokens): what the splits share.
  const int64_t keys = (window ? std::min<int64_t>(max_len, *window) : max_len) + tokens;
  at::Tensor out;
  auto run = [&](auto element_tag) {
    using Element = decltype(element_tag);
    dispatch_head_dim(op, dim, [&](auto head_dim) {
      out = launch_decode<Element, decltype(head_dim)::value>(params, static_cast<int>(batch), num_splits, keys, q,
                                                              stream);
    });
  };
  switch (q.scalar_type()) {
    case at::kHalf: run(__half{}); break;
    case at::kBFloat16: run(__nv_bfloat16{}); break;
    case at::kFloat: run(float{}); break;
    default: FUSEDGPT_CHECK(false, op, "no CUDA instantiation for dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgpt, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

// CPU calls run the same checks, then fail with a clear message (see require_cuda).
TORCH_LIBRARY_IMPL(fusedgpt, CPU, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace fusedgpt
