// Kernels whose shared-memory bank conflicts and global-memory sectors follow by hand from the model of
// the emulator's memory counters (simt.h), for tests/ops/test_simt_counters.py. Each pattern is one warp
// instruction of interest (or a loop of one), launched as a kernel named after the pattern, then a
// coalesced float store of the result to global memory. Registered as
// torch.ops.fusedgpt_simt.selftest_memory_pattern(pattern, threads); the expected counts are in the test.
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

namespace {

constexpr const char* kPatterns[] = {
    "shared_load_consecutive",        // float tile[lane]
    "shared_load_stride2",            // float tile[2 * lane]: 2 words per bank
    "shared_load_stride32",           // float tile[32 * lane]: every lane in bank 0
    "shared_load_broadcast",          // float tile[7] by every lane
    "shared_load_transposed",         // a loop of `repeats` reads of column k of a 32 x 32 float tile
    "shared_load_transposed_padded",  // the same with rows padded to 33 floats
    "shared_load_vector16",           // uint4 tile[lane]: 4 quarter-warp phases of 128 bytes
    "shared_load_vector16_stride2",   // uint4 tile[2 * lane]
    "shared_load_vector16_quarter",   // uint4 tile[lane], lanes 0-7 only: one active phase
    "shared_load_vector8",            // uint64 tile[lane]: 2 half-warp phases
    "shared_load_vector8_stride2",    // uint64 tile[2 * lane]
    "shared_load_half",               // uint16 tile[lane]: two lanes per word
    "shared_load_half_stride64",      // uint16 tile[64 * lane]: every lane in bank 0
    "shared_store_stride2",           // float tile[2 * lane] = ..., then a read of tile[lane]
    "shared_store_transposed_half",   // the prefill attention's transposed V store at head dim 64
    "global_load_coalesced",          // float x[lane]
    "global_load_stride2",            // float x[2 * lane]
    "global_load_misaligned",         // float x[lane + 1]
    "global_load_vector16",           // uint4 x[lane]
    "global_load_broadcast",          // float x[0] by every lane
};
constexpr int kPatternCount = sizeof(kPatterns) / sizeof(kPatterns[0]);

__global__ void memory_pattern_kernel(int pattern, const float* x, float* out, int repeats) {
  alignas(128) __shared__ float tile[32 * 64];
  const int lane = threadIdx.x % 32;
  const auto* tile_vectors16 = reinterpret_cast<const uint4*>(tile);
  const auto* tile_words64 = reinterpret_cast<const uint64_t*>(tile);
  const auto* tile_halves = reinterpret_cast<const uint16_t*>(tile);
  float value = 0.f;
  switch (pattern) {
    case 0: value = tile[lane]; break;
    case 1: value = tile[2 * lane]; break;
    case 2: value = tile[32 * lane]; break;
    case 3: value = tile[7]; break;
    case 4:
      for (int k = 0; k < repeats; ++k) value += tile[lane * 32 + k];
      break;
    case 5:
      for (int k = 0; k < repeats; ++k) value += tile[lane * 33 + k];
      break;
    case 6: {
      const uint4 v = tile_vectors16[lane];
      value = static_cast<float>(v.x + v.y + v.z + v.w);
      break;
    }
    case 7: {
      const uint4 v = tile_vectors16[2 * lane];
      value = static_cast<float>(v.x + v.y + v.z + v.w);
      break;
    }
    case 8:
      if (lane < 8) {
        const uint4 v = tile_vectors16[lane];
        value = static_cast<float>(v.x + v.y + v.z + v.w);
      }
      break;
    case 9: value = static_cast<float>(tile_words64[lane]); break;
    case 10: value = static_cast<float>(tile_words64[2 * lane]); break;
    case 11: value = static_cast<float>(tile_halves[lane]); break;
    case 12: value = static_cast<float>(tile_halves[64 * lane]); break;
    case 13:
      tile[2 * lane] = x[0];  // (x[0]: a global broadcast load, 1 sector)
      __syncthreads();
      value = tile[lane];
      break;
    case 14: {
      // vt_tile[(c + e) * kVtStride + r] of attention_kernel.cuh, e = 0: r = lane / 8 is the key,
      // c = (lane % 8) * 8 the first of a 16-byte vector's 8 dims, kVtStride = 64 + 8 halves.
      auto* halves = reinterpret_cast<uint16_t*>(tile);
      halves[((lane % 8) * 8) * 72 + lane / 8] = static_cast<uint16_t>(x[0]);
      __syncthreads();
      value = tile[lane];
      break;
    }
    case 15: value = x[lane]; break;
    case 16: value = x[2 * lane]; break;
    case 17: value = x[lane + 1]; break;
    case 18: {
      const uint4 v = reinterpret_cast<const uint4*>(x)[lane];
      value = static_cast<float>(v.x + v.y + v.z + v.w);
      break;
    }
    default: value = x[0]; break;
  }
  out[threadIdx.x] = value;
}

at::Tensor selftest_memory_pattern(c10::string_view pattern, int64_t threads) {
  int index = 0;
  while (index < kPatternCount && pattern != kPatterns[index]) ++index;
  TORCH_CHECK(index < kPatternCount, "selftest_memory_pattern: unknown pattern \"", pattern, "\"");
  TORCH_CHECK(threads >= 1 && threads <= 1024, "selftest_memory_pattern: threads must be in [1, 1024], got ", threads);
  const at::Tensor x = at::arange(32 * 64, at::kFloat);  // 8 KiB
  at::Tensor out = at::empty({threads}, at::kFloat);
  const auto starts_a_sector = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 32 == 0; };
  TORCH_CHECK(starts_a_sector(x) && starts_a_sector(out),
              "selftest_memory_pattern: the expected sector counts need tensors that start on a 32-byte sector");
  ::simt::Launch(kPatterns[index], 1, static_cast<unsigned>(threads))(memory_pattern_kernel, index, x.data_ptr<float>(),
                                                                      out.data_ptr<float>(), 4);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedgpt_simt, m) {
  m.def("selftest_memory_pattern(str pattern, int threads) -> Tensor", &selftest_memory_pattern);
}
