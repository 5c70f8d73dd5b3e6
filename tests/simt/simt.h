// A CPU emulator for fusedgpt's CUDA kernels, for machines without a GPU (CI): the real csrc/ sources,
// host code and kernels alike, compiled by the host C++ compiler with this header force-included
// (tests/simt/build.py rewrites each `kernel<<<grid, block, smem, stream>>>(args)` into
// `::simt::Launch(grid, block, smem, stream)(kernel, args)`).
//
// Semantics emulated, one thread block at a time, every CUDA thread a fiber (ucontext) on one OS thread:
//   threadIdx / blockIdx / blockDim / gridDim; __shared__ (function-static storage, shared by the fibers
//   of the running block); __syncthreads (waits for every thread of the block that has not exited);
//   __shfl_xor_sync and mma.sync.m16n8k16 (fp16/bf16 in, fp32 accumulate) as warp collectives: every lane
//   of the warp must arrive at the same collective with the same arguments, as the full 0xffffffff mask
//   demands; a lane that exits while its warp mates wait there, a divergent collective and a deadlock
//   are reported as errors naming the block and thread, never silently run.
// Between two synchronisation points the threads run one after another in a random order, reshuffled at
// every round (seeded by FUSEDGPT_SIMT_SEED, default 0, so a run is reproducible): a read of shared
// memory that a missing __syncthreads leaves unordered against its write then goes wrong in some runs
// instead of always seeing the same lucky order.
// The mma fragment layouts follow the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point
// type"), written independently of the kernel that uses them, so a layout slip in a kernel shows up as
// a wrong result here. Not emulated: memory ordering between threads without a barrier (races), timing,
// and anything a real GPU adds (compute-sanitizer on a GPU covers those).
#pragma once

#define FUSEDGPT_SIMT_EMULATION 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <sys/mman.h>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <cstdlib>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// ---- CUDA keywords and built-in types -------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
using cudaStream_t = struct CUstream_st*;

struct __half {
  uint16_t bits;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float __half2float(__half h) { return c10::detail::fp16_ieee_to_fp32_value(h.bits); }
inline __half __float2half_rn(float f) { return {c10::detail::fp16_ieee_from_fp32_value(f)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return c10::detail::f32_from_bits(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {c10::detail::round_to_nearest_even(f)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

// Device math the host library lacks, and CUDA's min/max overloads for mixed integer types.
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
template <typename A, typename B>
constexpr std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
constexpr std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

namespace simt {

// ---- the scheduler ----------------------------------------------------------------------------------

enum class State { kRunnable, kAtBarrier, kInCollective, kExited };

struct Thread {
  ucontext_t context;
  uint3 index;
  int warp = 0, lane = 0;
  State state = State::kExited;
};

// One warp collective in flight: inputs deposited lane by lane, outputs computed when the last lane
// arrives (so a lane that runs ahead into the next collective cannot clobber what the others read).
struct Slot {
  alignas(8) unsigned char bytes[48];
};
struct Warp {
  int lanes = 0, arrived = 0, exited = 0;
  const char* what = nullptr;  // the collective in flight, e.g. "__shfl_xor_sync"
  int argument = 0;
  void (*compute)(Warp&) = nullptr;
  Slot in[32], out[32];
};

struct Scheduler {
  dim3 grid, block;
  uint3 block_index{0, 0, 0};
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<void*> stacks;
  ucontext_t scheduler_context;
  Thread* current = nullptr;
  int live = 0, at_barrier = 0;
  const std::function<void()>* body = nullptr;
  std::mt19937 random{0};
  const void* scheduler_stack = nullptr;  // AddressSanitizer's view of the stack the launch runs on
  size_t scheduler_stack_bytes = 0;
  std::string error;
  bool running = false;
};

constexpr size_t kStackBytes = 256 * 1024;

inline Scheduler& scheduler() {
  static Scheduler instance = [] {
    Scheduler s;
    const char* seed = std::getenv("FUSEDGPT_SIMT_SEED");
    s.random.seed(seed != nullptr ? std::strtoul(seed, nullptr, 10) : 0);
    return s;
  }();
  return instance;
}

// Context switches, annotated for AddressSanitizer when it is on (the build with
// FUSEDGPT_SIMT_SANITIZE=1), so that it follows the fibers' stacks and checks every access of the
// kernels, global and shared memory alike, for out-of-bounds reads and writes.
inline void enter_fiber(ucontext_t* from, ucontext_t* to, const void* stack) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, stack, kStackBytes);
  swapcontext(from, to);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)stack;
  swapcontext(from, to);
#endif
}

inline void fiber_started() {  // first thing a fiber does, and after every resumption
#if defined(__SANITIZE_ADDRESS__)
  Scheduler& s = scheduler();
  __sanitizer_finish_switch_fiber(nullptr, &s.scheduler_stack, &s.scheduler_stack_bytes);
#endif
}

inline void leave_fiber(ucontext_t* from, bool finished) {
  Scheduler& s = scheduler();
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake_stack, s.scheduler_stack, s.scheduler_stack_bytes);
  if (finished) return;  // the fiber returns to uc_link
  swapcontext(from, &s.scheduler_context);
  __sanitizer_finish_switch_fiber(fake_stack, &s.scheduler_stack, &s.scheduler_stack_bytes);
#else
  if (!finished) swapcontext(from, &s.scheduler_context);
#endif
}

inline std::string where() {
  const Scheduler& s = scheduler();
  std::string text = "block (" + std::to_string(s.block_index.x) + ", " + std::to_string(s.block_index.y) + ", " +
                     std::to_string(s.block_index.z) + ")";
  if (s.current != nullptr) {
    text += ", thread " + std::to_string(s.current->index.x) + " (warp " + std::to_string(s.current->warp) +
            ", lane " + std::to_string(s.current->lane) + ")";
  }
  return text;
}

// Records the error and leaves the running fiber for good; the launch then throws it.
[[noreturn]] inline void fail(const std::string& message) {
  Scheduler& s = scheduler();
  if (s.error.empty()) s.error = "simt: " + message + " at " + where();
  Thread* self = s.current;
  self->state = State::kExited;
  leave_fiber(&self->context, false);
  std::abort();  // never resumed
}

inline void yield_to_scheduler() { leave_fiber(&scheduler().current->context, false); }

inline void release_barrier_if_complete() {
  Scheduler& s = scheduler();
  if (s.at_barrier == 0 || s.at_barrier < s.live) return;
  for (Thread& t : s.threads) {
    if (t.state == State::kAtBarrier) t.state = State::kRunnable;
  }
  s.at_barrier = 0;
}

inline void syncthreads() {
  Scheduler& s = scheduler();
  s.current->state = State::kAtBarrier;
  ++s.at_barrier;
  release_barrier_if_complete();
  if (s.current->state != State::kRunnable) yield_to_scheduler();
}

// Deposits this lane's input, waits for the whole warp, returns this lane's output slot.
inline const Slot& warp_collective(const char* what, int argument, const void* input, size_t bytes,
                                   void (*compute)(Warp&)) {
  Scheduler& s = scheduler();
  Thread* self = s.current;
  Warp& warp = s.warps[self->warp];
  if (warp.exited > 0) {
    fail(std::string(what) + " with the full mask after " + std::to_string(warp.exited) +
         " lane(s) of the warp exited");
  }
  if (warp.arrived == 0) {
    warp.what = what;
    warp.argument = argument;
    warp.compute = compute;
  } else if (std::strcmp(warp.what, what) != 0 || warp.argument != argument) {
    fail(std::string("divergent warp collective: this lane is in ") + what + "(" + std::to_string(argument) +
         ") while others are in " + warp.what + "(" + std::to_string(warp.argument) + ")");
  }
  std::memcpy(warp.in[self->lane].bytes, input, bytes);
  self->state = State::kInCollective;
  if (++warp.arrived == warp.lanes) {
    warp.compute(warp);
    warp.arrived = 0;
    for (Thread& t : s.threads) {
      if (t.warp == self->warp && t.state == State::kInCollective) t.state = State::kRunnable;
    }
  } else {
    yield_to_scheduler();
  }
  return warp.out[self->lane];
}

inline void fiber_main() {
  fiber_started();
  Scheduler& s = scheduler();
  try {
    (*s.body)();
  } catch (const std::exception& e) {
    if (s.error.empty()) s.error = std::string("simt: exception in a kernel: ") + e.what() + " at " + where();
  }
  Thread* self = s.current;
  self->state = State::kExited;
  --s.live;
  Warp& warp = s.warps[self->warp];
  ++warp.exited;
  if (warp.arrived > 0 && s.error.empty()) {
    s.error = "simt: a lane exited while " + std::to_string(warp.arrived) + " lane(s) of its warp wait in " +
              warp.what + " at " + where();
  }
  release_barrier_if_complete();
  leave_fiber(&self->context, true);  // returning switches to uc_link, the scheduler
}

inline void run_block(const std::function<void()>& body) {
  Scheduler& s = scheduler();
  const int count = static_cast<int>(s.block.x * s.block.y * s.block.z);
  s.threads.assign(count, Thread{});
  s.warps.assign((count + 31) / 32, Warp{});
  while (static_cast<int>(s.stacks.size()) < count) {
    void* stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stack == MAP_FAILED) throw std::runtime_error("simt: cannot map a fiber stack");
    s.stacks.push_back(stack);
  }
  s.body = &body;
  s.live = count;
  s.at_barrier = 0;
  for (int i = 0; i < count; ++i) {
    Thread& t = s.threads[i];
    t.index = {static_cast<unsigned>(i % s.block.x), static_cast<unsigned>((i / s.block.x) % s.block.y),
               static_cast<unsigned>(i / (s.block.x * s.block.y))};
    t.warp = i / 32;
    t.lane = i % 32;
    t.state = State::kRunnable;
    ++s.warps[t.warp].lanes;
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = s.stacks[i];
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &s.scheduler_context;
    makecontext(&t.context, fiber_main, 0);
  }
  std::vector<int> order(count);
  for (int i = 0; i < count; ++i) order[i] = i;
  while (s.live > 0 && s.error.empty()) {
    bool ran = false;
    std::shuffle(order.begin(), order.end(), s.random);
    for (const int i : order) {
      Thread& t = s.threads[i];
      if (t.state != State::kRunnable) continue;
      s.current = &t;
      enter_fiber(&s.scheduler_context, &t.context, s.stacks[i]);
      s.current = nullptr;
      ran = true;
      if (!s.error.empty()) break;
    }
    if (!ran && s.error.empty()) {
      int waiting_barrier = 0, waiting_warp = 0;
      for (const Thread& t : s.threads) {
        waiting_barrier += t.state == State::kAtBarrier;
        waiting_warp += t.state == State::kInCollective;
      }
      s.error = "simt: deadlock at " + where() + ": " + std::to_string(waiting_barrier) +
                " thread(s) wait in __syncthreads, " + std::to_string(waiting_warp) + " in warp collectives";
    }
  }
}

// `kernel<<<grid, block, shared_bytes, stream>>>(args...)` becomes `Launch(grid, block, ...)(kernel, args...)`.
struct Launch {
  dim3 grid, block;
  Launch(dim3 grid_, dim3 block_, size_t = 0, cudaStream_t = nullptr) : grid(grid_), block(block_) {}

  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, const Args&... args) const {
    Scheduler& s = scheduler();
    if (s.running) throw std::runtime_error("simt: a kernel launched from inside a kernel");
    const int64_t threads = int64_t{block.x} * block.y * block.z;
    if (threads < 1 || threads > 1024) {
      throw std::runtime_error("simt: invalid launch: " + std::to_string(threads) + " threads per block");
    }
    if (grid.y > 65535 || grid.z > 65535 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
      throw std::runtime_error("simt: invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                               ", " + std::to_string(grid.z) + ")");
    }
    const std::function<void()> body = [&] { kernel(args...); };  // parameters copied per thread, by value
    s.grid = grid;
    s.block = block;
    s.error.clear();
    s.running = true;
    for (unsigned z = 0; z < grid.z && s.error.empty(); ++z) {
      for (unsigned y = 0; y < grid.y && s.error.empty(); ++y) {
        for (unsigned x = 0; x < grid.x && s.error.empty(); ++x) {
          s.block_index = {x, y, z};
          run_block(body);
        }
      }
    }
    s.running = false;
    if (!s.error.empty()) throw std::runtime_error(s.error);
  }
};

// ---- warp collectives -------------------------------------------------------------------------------

template <typename T>
void shuffle_xor_compute(Warp& warp) {
  static_assert(sizeof(T) <= sizeof(Slot));
  for (int lane = 0; lane < 32; ++lane) {
    const int source = lane ^ warp.argument;
    if (lane < warp.lanes) {
      if (source >= warp.lanes) std::memset(warp.out[lane].bytes, 0, sizeof(T));  // (partial warps only)
      else std::memcpy(warp.out[lane].bytes, warp.in[source].bytes, sizeof(T));
    }
  }
}

template <typename T>
T shuffle_xor(unsigned mask, T value, int lane_mask, int width) {
  if (mask != 0xffffffffu) fail("only the full mask 0xffffffff is emulated in __shfl_xor_sync");
  if (width != 32) fail("only width 32 is emulated in __shfl_xor_sync");
  if (lane_mask < 0 || lane_mask > 31) fail("__shfl_xor_sync lane mask out of range");
  const Slot& out = warp_collective("__shfl_xor_sync", lane_mask, &value, sizeof(T), &shuffle_xor_compute<T>);
  T result;
  std::memcpy(&result, out.bytes, sizeof(T));
  return result;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: D = A (16x16) * B (16x8) + C, per lane
// 4 A registers, 2 B registers (two 16-bit elements each, the lower index in the low half) and 4 C floats.
struct MmaFragments {
  uint32_t a[4], b[2];
  float c[4];
};

template <typename Element>
float mma_element(uint32_t word, int half) {
  const uint16_t bits = static_cast<uint16_t>(half == 0 ? word & 0xffffu : word >> 16);
  if constexpr (std::is_same_v<Element, __half>) return __half2float(__half{bits});
  else return __bfloat162float(__nv_bfloat16{bits});
}

template <typename Element>
void mma_compute(Warp& warp) {
  double a[16][16], b[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    MmaFragments f;
    std::memcpy(&f, warp.in[lane].bytes, sizeof(f));
    const int group = lane >> 2, thread_in_group = lane % 4;
    for (int i = 0; i < 8; ++i) {  // A element a_i: register i / 2, half i % 2
      const int row = group + ((i % 4) >= 2 ? 8 : 0);
      const int col = thread_in_group * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      a[row][col] = mma_element<Element>(f.a[i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) {  // B element b_i: register i / 2, half i % 2
      const int row = thread_in_group * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      b[row][group] = mma_element<Element>(f.b[i / 2], i % 2);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    MmaFragments f;
    std::memcpy(&f, warp.in[lane].bytes, sizeof(f));
    const int group = lane >> 2, thread_in_group = lane % 4;
    float d[4];
    for (int i = 0; i < 4; ++i) {  // C/D element c_i
      const int row = group + (i >= 2 ? 8 : 0), col = thread_in_group * 2 + (i & 1);
      double sum = 0.0;
      for (int k = 0; k < 16; ++k) sum += a[row][k] * b[k][col];
      d[i] = static_cast<float>(static_cast<double>(f.c[i]) + sum);
    }
    std::memcpy(warp.out[lane].bytes, d, sizeof(d));
  }
}

template <typename Element>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(sizeof(MmaFragments) <= sizeof(Slot));
  if (scheduler().warps[scheduler().current->warp].lanes != 32) fail("mma.sync needs a full warp");
  MmaFragments f;
  std::memcpy(f.a, a, sizeof(f.a));
  std::memcpy(f.b, b, sizeof(f.b));
  std::memcpy(f.c, c, sizeof(f.c));
  const Slot& out = warp_collective(std::is_same_v<Element, __half> ? "mma.m16n8k16.f16" : "mma.m16n8k16.bf16", 0,
                                    &f, sizeof(f), &mma_compute<Element>);
  std::memcpy(c, out.bytes, sizeof(float) * 4);
}

}  // namespace simt

// ---- the CUDA built-ins the kernels use ---------------------------------------------------------------

#define threadIdx (::simt::scheduler().current->index)
#define blockIdx (::simt::scheduler().block_index)
#define blockDim (::simt::scheduler().block)
#define gridDim (::simt::scheduler().grid)

inline void __syncthreads() { ::simt::syncthreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::simt::shuffle_xor(mask, value, lane_mask, width);
}
