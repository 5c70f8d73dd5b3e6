// Kernels that test the CPU emulator itself (tests/simt/simt.h), built into the same library as the
// emulated csrc/ and registered as torch.ops.fusedgpt_simt.selftest_*: the mma layout against a plain
// matrix product, ldmatrix's fragments, cp.async's landing rules, ex2.approx, dynamic shared memory,
// shuffles, and the errors the emulator must report instead of running on.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

namespace {

template <typename Element>
uint32_t pack_pair(const Element* pointer) {  // elements k and k + 1 of a row, k + 1 in the high half
  uint32_t word;
  std::memcpy(&word, pointer, sizeof(word));
  return word;
}

// D (16 x 8, fp32) = A (16 x 16, row-major) * B^T, with B given as 8 rows of 16 (the column-major
// operand), fragments gathered as the PTX ISA lays them out for mma.m16n8k16.
template <typename Element>
__global__ void mma_kernel(const Element* a, const Element* b, float* d) {
  const int lane = threadIdx.x, group = lane / 4, quad = lane % 4;
  const uint32_t a_frag[4] = {pack_pair(a + group * 16 + quad * 2), pack_pair(a + (group + 8) * 16 + quad * 2),
                              pack_pair(a + group * 16 + quad * 2 + 8), pack_pair(a + (group + 8) * 16 + quad * 2 + 8)};
  const uint32_t b_frag[2] = {pack_pair(b + group * 16 + quad * 2), pack_pair(b + group * 16 + quad * 2 + 8)};
  float c[4] = {1.f, 2.f, 3.f, 4.f};  // checked as D = A B^T + C
  ::simt::mma_m16n8k16<Element>(c, a_frag, b_frag);
  d[group * 8 + quad * 2] = c[0];
  d[group * 8 + quad * 2 + 1] = c[1];
  d[(group + 8) * 8 + quad * 2] = c[2];
  d[(group + 8) * 8 + quad * 2 + 1] = c[3];
}

at::Tensor selftest_mma(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && b.sizes() == at::IntArrayRef({8, 16}) && a.is_contiguous() &&
              b.is_contiguous() && a.scalar_type() == b.scalar_type());
  at::Tensor d = at::empty({16, 8}, a.options().dtype(at::kFloat));
  if (a.scalar_type() == at::kHalf) {
    ::simt::Launch("mma_kernel<__half>", 1, 32)(mma_kernel<__half>, static_cast<const __half*>(a.data_ptr()),
                                                static_cast<const __half*>(b.data_ptr()), d.data_ptr<float>());
  } else {
    ::simt::Launch("mma_kernel<__nv_bfloat16>", 1, 32)(
        mma_kernel<__nv_bfloat16>, static_cast<const __nv_bfloat16*>(a.data_ptr()),
        static_cast<const __nv_bfloat16*>(b.data_ptr()), d.data_ptr<float>());
  }
  return d;
}

// ldmatrix.x4 (kTranspose or not) of the 32 rows of `rows` (32 x 8 16-bit elements), lane l giving the
// address of row order[l] of a shared copy: out[l][i] = lane l's register i.
template <bool kTranspose>
__global__ void ldmatrix_kernel(const uint16_t* rows, const int* order, int32_t* out) {
  alignas(16) __shared__ uint16_t tile[32 * 8];
  const int lane = threadIdx.x;
  for (int e = 0; e < 8; ++e) tile[lane * 8 + e] = rows[lane * 8 + e];
  __syncthreads();
  uint32_t registers[4];
  ::simt::ldmatrix_x4<kTranspose>(registers, tile + order[lane] * 8);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = static_cast<int32_t>(registers[i]);
}

at::Tensor selftest_ldmatrix(const at::Tensor& rows, const at::Tensor& order, bool transpose) {
  TORCH_CHECK(rows.sizes() == at::IntArrayRef({32, 8}) && rows.scalar_type() == at::kShort && rows.is_contiguous());
  TORCH_CHECK(order.sizes() == at::IntArrayRef({32}) && order.scalar_type() == at::kInt && order.is_contiguous());
  at::Tensor out = at::empty({32, 4}, rows.options().dtype(at::kInt));
  const auto* data = static_cast<const uint16_t*>(rows.data_ptr());
  if (transpose) {
    ::simt::Launch("ldmatrix_kernel<true>", 1, 32)(ldmatrix_kernel<true>, data, order.data_ptr<int>(),
                                                   out.data_ptr<int32_t>());
  } else {
    ::simt::Launch("ldmatrix_kernel<false>", 1, 32)(ldmatrix_kernel<false>, data, order.data_ptr<int>(),
                                                    out.data_ptr<int32_t>());
  }
  return out;
}

// cp.async into dynamic shared memory, then the whole buffer (`bytes` of it) copied out after a barrier.
// Each thread copies chunks 2 t and 2 t + 1 (16 bytes each) of `source`, in two groups (one chunk each):
//   mode 0: wait_group<0> after both: everything landed;  1: no wait at all before the barrier, then
//   wait_group<0> after the copy-out (the buffer read shows what was there before: 0xff);  2: wait_group<1>:
//   the first group landed, the second not (until after the copy-out);  3: the second chunk invalid: zeros;
//   4: no wait at all: the thread exits with copies in flight (an error).
__global__ void cp_async_kernel(const uint4* source, uint4* out, int mode, int chunks) {
  uint4* buffer = static_cast<uint4*>(::simt::dynamic_shared_memory());
  const int t = threadIdx.x;
  ::simt::cp_async_16(buffer + 2 * t, source + 2 * t, true);
  ::simt::cp_async_commit_group();
  ::simt::cp_async_16(buffer + 2 * t + 1, source + 2 * t + 1, mode != 3);
  ::simt::cp_async_commit_group();
  if (mode == 0 || mode == 3) ::simt::cp_async_wait_group(0);
  if (mode == 2) ::simt::cp_async_wait_group(1);
  __syncthreads();
  for (int c = t; c < chunks; c += blockDim.x) out[c] = buffer[c];
  __syncthreads();  // every thread has read the buffer before any lands the rest
  if (mode == 1 || mode == 2) ::simt::cp_async_wait_all();
}

at::Tensor selftest_cp_async(const at::Tensor& source, int64_t mode, int64_t shared_bytes, bool set_attribute) {
  TORCH_CHECK(source.scalar_type() == at::kByte && source.is_contiguous() && source.numel() % 32 == 0);
  const int threads = static_cast<int>(source.numel() / 32), chunks = static_cast<int>(shared_bytes / 16);
  TORCH_CHECK(shared_bytes % 16 == 0 && shared_bytes >= source.numel());
  at::Tensor out = at::empty({shared_bytes}, source.options());
  if (set_attribute) {
    TORCH_CHECK(cudaFuncSetAttribute(cp_async_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(shared_bytes)) == cudaSuccess);
  }
  ::simt::Launch("cp_async_kernel", 1, threads, static_cast<size_t>(shared_bytes))(
      cp_async_kernel, static_cast<const uint4*>(source.data_ptr()), static_cast<uint4*>(out.data_ptr()),
      static_cast<int>(mode), chunks);
  return out;
}

__global__ void ex2_kernel(const float* x, float* out) {  // (opaque is the identity)
  out[threadIdx.x] = ::simt::ex2_approx_ftz(x[::simt::opaque(static_cast<int>(threadIdx.x))]);
}

at::Tensor selftest_ex2(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() >= 1 && x.numel() <= 1024);
  at::Tensor out = at::empty_like(x);
  ::simt::Launch("ex2_kernel", 1, static_cast<unsigned>(x.numel()))(ex2_kernel, x.data_ptr<float>(),
                                                                     out.data_ptr<float>());
  return out;
}

// The emulated device's answers to the occupancy queries: [multiprocessors, resident blocks of
// shuffle_kernel at block_size threads and shared_bytes of dynamic shared memory (opted in first)].
__global__ void shuffle_kernel(const float* x, float* out, int offset);

std::vector<int64_t> selftest_occupancy(int64_t block_size, int64_t shared_bytes) {
  int multiprocessors = 0, blocks = -1;
  TORCH_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, 0) == cudaSuccess);
  TORCH_CHECK(cudaFuncSetAttribute(shuffle_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(shared_bytes)) == cudaSuccess);
  TORCH_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, shuffle_kernel, static_cast<int>(block_size),
                                                            static_cast<size_t>(shared_bytes)) == cudaSuccess);
  return {multiprocessors, blocks};
}

// out[i] = sum over the block of x, through shuffles and a shared-memory exchange.
__global__ void shuffle_kernel(const float* x, float* out, int offset) {
  __shared__ float partial[32];
  float value = x[threadIdx.x];
  const float neighbour = __shfl_xor_sync(0xffffffffu, value, offset);
  for (int step = 16; step > 0; step >>= 1) value += __shfl_xor_sync(0xffffffffu, value, step);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = value;
  __syncthreads();
  float total = 0.f;
  for (unsigned w = 0; w < blockDim.x / 32; ++w) total += partial[w];
  out[threadIdx.x] = total + 1000.f * neighbour;
}

at::Tensor selftest_shuffle(const at::Tensor& x, int64_t offset) {
  at::Tensor out = at::empty_like(x);
  ::simt::Launch("shuffle_kernel", 1, static_cast<unsigned>(x.numel()))(
      shuffle_kernel, x.data_ptr<float>(), out.data_ptr<float>(), static_cast<int>(offset));
  return out;
}

// Kernels with the bugs the emulator must catch.
__global__ void broken_kernel(int which, float* out) {
  const int lane = threadIdx.x % 32;
  if (which == 0) {  // deadlock: one lane of warp 1 waits in __syncthreads, its warp mates in a shuffle
    if (threadIdx.x < 32 || threadIdx.x == 40) __syncthreads();
    else out[0] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  } else if (which == 1) {  // a lane returns before its warp's shuffle
    if (lane == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  } else if (which == 2) {  // lanes of one warp in different shuffles
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, lane < 16 ? 1 : 2);
  } else if (which == 3) {  // one element past the end of out (64 floats): AddressSanitizer's to catch
    out[threadIdx.x + 1] = 1.f;
  } else {  // fine: early exit with no collective after it
    if (lane == 5) return;
    out[threadIdx.x] = 1.f;
  }
}

void selftest_broken(int64_t which) {
  at::Tensor out = at::zeros({64});
  ::simt::Launch("broken_kernel", 1, 64)(broken_kernel, static_cast<int>(which), out.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedgpt_simt, m) {
  m.def("selftest_mma(Tensor a, Tensor b) -> Tensor", &selftest_mma);
  m.def("selftest_shuffle(Tensor x, int offset) -> Tensor", &selftest_shuffle);
  m.def("selftest_ldmatrix(Tensor rows, Tensor order, bool transpose) -> Tensor", &selftest_ldmatrix);
  m.def("selftest_cp_async(Tensor source, int mode, int shared_bytes, bool set_attribute) -> Tensor",
        &selftest_cp_async);
  m.def("selftest_ex2(Tensor x) -> Tensor", &selftest_ex2);
  m.def("selftest_occupancy(int block_size, int shared_bytes) -> int[]", &selftest_occupancy);
  m.def("selftest_broken(int which) -> ()", &selftest_broken);
}
