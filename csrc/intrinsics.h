// The device intrinsics of fusedgpt's kernels that CUDA C++ gives no function for (the tensor cores'
// mma.sync m16n8k16, ldmatrix, cp.async, ex2.approx, dynamic shared memory), each behind one wrapper, and the one file of csrc/ that knows about the CPU
// emulator of the kernels (tests/simt/simt.h, force-included by that build, defines
// FUSEDGPT_SIMT_EMULATION): on the GPU a wrapper is its inline PTX, in the emulator it calls its twin in
// namespace ::simt. Kernel sources call the wrappers and carry no emulator #ifdef, no ::simt:: and no
// inline asm (tests/test_kernel_sources.py fails otherwise). common.h includes this header; the attention
// instantiation files include it alone: CUDA headers only, since common.h's ATen headers would add
// about 6 s of host compilation to each of them.
//
// The rule for a new intrinsic (inline PTX of any kind: cp.async, ldmatrix, another mma shape or type,
// ...):
//   1. its emulator twin first, in tests/simt/simt.h (namespace simt), with its definition taken from the
//      PTX ISA, not from the kernel that will use it, and a selftest kernel in tests/simt/selftest.cpp
//      checked by tests/ops/test_cuda_emulated.py (as selftest_mma checks mma_m16n8k16's layouts);
//   2. its wrapper here: the PTX in the #else branch below, the call to the twin in the emulator's;
//   3. the kernel calls the wrapper.
// CUDA C++ built-ins (__syncthreads, __shfl_xor_sync, threadIdx, ...) keep their own names: simt.h
// defines them and rejects what it does not emulate (e.g. a shuffle mask other than 0xffffffff); a new
// built-in, or a use that simt.h rejects, is likewise emulated (and selftested) in simt.h first.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace fusedgpt {

// True in the CPU emulator's build, where CPU tensors stand for device memory (common.h's require_cuda).
#ifdef FUSEDGPT_SIMT_EMULATION
inline constexpr bool kSimtEmulation = true;
#else
inline constexpr bool kSimtEmulation = false;
#endif

// c += a * b for one m16n8k16 tile on the tensor cores: A 16x16 row-major, B 16x8 column-major, both
// Element (__half or __nv_bfloat16), fp32 accumulators; the registers hold the PTX ISA's fragments
// ("Matrix Fragments for mma.m16n8k16 with floating point type"): 4 A words and 2 B words of two
// elements each (lower index in the low half), 4 floats of C. A warp collective: all 32 lanes call it.
template <typename Element>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<Element, __half> || std::is_same_v<Element, __nv_bfloat16>,
                "mma_m16n8k16: Element must be __half or __nv_bfloat16");
#ifdef FUSEDGPT_SIMT_EMULATION
  ::simt::mma_m16n8k16<Element>(c, a, b);
#else
  if constexpr (std::is_same_v<Element, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: four 8x8 matrices of 16-bit elements from shared
// memory, lanes 8i .. 8i + 7 giving the 16-byte-aligned addresses of rows 0 .. 7 of matrix i; lane l gets
// register i = matrix i's (row l / 4, columns 2 (l % 4), +1), or with kTranspose its (rows 2 (l % 4), +1,
// column l / 4): the A and B fragments of mma_m16n8k16 (PTX ISA, "ldmatrix"). A warp collective.
template <bool kTranspose>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&registers)[4], const void* row_address) {
#ifdef FUSEDGPT_SIMT_EMULATION
  ::simt::ldmatrix_x4<kTranspose>(registers, row_address);
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  if constexpr (kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(registers[0]), "=r"(registers[1]), "=r"(registers[2]), "=r"(registers[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(registers[0]), "=r"(registers[1]), "=r"(registers[2]), "=r"(registers[3])
                 : "r"(address));
  }
#endif
}

// cp.async.cg.shared.global: 16 bytes from global memory (source) to shared memory (destination), both
// 16-byte aligned, or 16 zero bytes with nothing read when !valid; it lands only at a later
// cp_async_wait_group / cp_async_wait_all of the same thread (a __syncthreads alone does not wait for it).
__device__ __forceinline__ void cp_async_16(void* destination, const void* source, bool valid) {
#ifdef FUSEDGPT_SIMT_EMULATION
  ::simt::cp_async_16(destination, source, valid);
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(destination));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(source), "r"(valid ? 16 : 0));
#endif
}

// Closes this thread's cp.async copies since the last commit into one group.
__device__ __forceinline__ void cp_async_commit_group() {
#ifdef FUSEDGPT_SIMT_EMULATION
  ::simt::cp_async_commit_group();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are in flight (the older ones landed).
template <int kPending>
__device__ __forceinline__ void cp_async_wait_group() {
#ifdef FUSEDGPT_SIMT_EMULATION
  ::simt::cp_async_wait_group(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// 2^x by the MUFU unit: ex2.approx.ftz.f32 (within 2 ulp; subnormals flushed to zero; -inf gives +0).
__device__ __forceinline__ float exp2_approx(float x) {
#ifdef FUSEDGPT_SIMT_EMULATION
  return ::simt::ex2_approx_ftz(x);
#else
  float result;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(result) : "f"(x));
  return result;
#endif
}

// x, through an empty asm statement the compiler cannot see through: a value derived from it afterwards
// is computed there, not kept alive (or spilled) from an identical expression before (the prefill's
// epilogue recomputes its addresses this way instead of carrying the prologue's across the key loop).
__device__ __forceinline__ int opaque(int x) {
#ifdef FUSEDGPT_SIMT_EMULATION
  return ::simt::opaque(x);
#else
  asm volatile("" : "+r"(x));
  return x;
#endif
}

// The block's dynamic shared memory (the launch's third argument, in bytes), 16-byte aligned; above
// 48 KB the host sets cudaFuncAttributeMaxDynamicSharedMemorySize for the kernel first.
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
#ifdef FUSEDGPT_SIMT_EMULATION
  return static_cast<T*>(::simt::dynamic_shared_memory());
#else
  extern __shared__ __align__(16) unsigned char fusedgpt_dynamic_shared[];
  return reinterpret_cast<T*>(fusedgpt_dynamic_shared);
#endif
}

}  // namespace fusedgpt
