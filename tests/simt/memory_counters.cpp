// The emulator's memory counters (tests/simt/simt.h says what they model). In the counting build
// (FUSEDGPT_SIMT_COUNT=1) gcc's ThreadSanitizer instrumentation, linked with no sanitizer runtime, calls
// the __tsan_* callbacks defined here before every load and store of the library's code; those a kernel's
// thread makes are logged per thread, grouped into warp requests at the end of each block and counted per
// kernel name: shared-memory wavefronts against the ideal, global-memory sectors against the bytes
// requested, and the few static instructions that waste the most. The instrumentation also hands every
// atomic operation to the runtime: they are done here. The ops memory_counters() (JSON text) and
// memory_counters_reset() exist in every build; outside the counting one they report "counting": false
// and no kernels.
#include <dlfcn.h>
#include <link.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

#if defined(FUSEDGPT_SIMT_COUNT)
constexpr const char* kFlavour = "simt-count";
#elif defined(__SANITIZE_ADDRESS__)
constexpr const char* kFlavour = "simt-asan";
#else
constexpr const char* kFlavour = "simt";
#endif

// ---- the loaded library: its file, its load base, its writable segments -----------------------------

struct AddressRange {
  uintptr_t begin = 0, end = 0;
};

constexpr int kMaxSegments = 16;

struct LibraryLayout {
  std::string path;
  uintptr_t base = 0;  // runtime address - base = the address in the file, which addr2line reads
  AddressRange writable[kMaxSegments];  // .data, .bss, ...: the kernels' __shared__ arrays among them
  int writable_count = 0;
};

int find_this_library(dl_phdr_info* info, size_t, void* layout_pointer) {
  const uintptr_t probe = reinterpret_cast<uintptr_t>(&find_this_library);
  bool contains_probe = false;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& segment = info->dlpi_phdr[i];
    const uintptr_t begin = info->dlpi_addr + segment.p_vaddr;
    contains_probe |= segment.p_type == PT_LOAD && probe >= begin && probe < begin + segment.p_memsz;
  }
  if (!contains_probe) return 0;
  LibraryLayout& layout = *static_cast<LibraryLayout*>(layout_pointer);
  layout.path = info->dlpi_name != nullptr ? info->dlpi_name : "";
  layout.base = info->dlpi_addr;
  for (int i = 0; i < info->dlpi_phnum && layout.writable_count < kMaxSegments; ++i) {
    const ElfW(Phdr)& segment = info->dlpi_phdr[i];
    if (segment.p_type == PT_LOAD && (segment.p_flags & PF_W) != 0) {
      const uintptr_t begin = info->dlpi_addr + segment.p_vaddr;
      layout.writable[layout.writable_count++] = {begin, begin + segment.p_memsz};
    }
  }
  return 1;
}

const LibraryLayout& library_layout() {
  static const LibraryLayout layout = [] {
    LibraryLayout found;
    dl_iterate_phdr(&find_this_library, &found);
    return found;
  }();
  return layout;
}

std::string json_string(const std::string& text) {
  std::string quoted = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      quoted += '\\';
      quoted += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof(escaped), "\\u%04x", static_cast<unsigned>(c));
      quoted += escaped;
    } else {
      quoted += c;
    }
  }
  return quoted + "\"";
}

std::string hexadecimal(uintptr_t value) {
  char text[24];
  std::snprintf(text, sizeof(text), "\"0x%llx\"", static_cast<unsigned long long>(value));
  return text;
}

#if defined(FUSEDGPT_SIMT_COUNT)

// ---- logging, on the hot path: no instrumented code, no allocation but realloc ------------------------

struct Access {
  uintptr_t pc;  // the instrumented instruction: the callback's return address - 1, inside its call
  uintptr_t address;
  uint32_t bytes;
  bool is_store, shared;
};

struct AccessLog {  // one thread's accesses in the running block
  Access* entries = nullptr;
  size_t size = 0, capacity = 0;
};

constexpr int kMaxThreads = 1024;
AccessLog thread_logs[kMaxThreads];
AddressRange shared_ranges[kMaxSegments];  // a copy of the layout's: the callbacks read no guarded static
int shared_range_count = 0;

SIMT_UNCOUNTED void record(void* return_address, const void* address, size_t bytes, bool is_store) {
  const simt::Thread* thread = simt::current_thread;
  if (thread == nullptr || thread->uncounted_depth > 0 || bytes == 0) return;
  const uintptr_t where = reinterpret_cast<uintptr_t>(address);
  if (where >= thread->stack_begin && where < thread->stack_end) return;  // locals, spilled registers
  // A read of simt::absent_source is an instruction executed without touching memory (a zero-filling
  // cp.async): logged with no bytes, so it keeps the lane's execution count in step with its warp's.
  const uintptr_t absent = reinterpret_cast<uintptr_t>(simt::absent_source);
  if (where >= absent && where < absent + sizeof(simt::absent_source)) bytes = 0;
  bool shared = false;
  for (int i = 0; i < shared_range_count; ++i) {
    shared = shared || (where >= shared_ranges[i].begin && where < shared_ranges[i].end);
  }
  AccessLog& log = thread_logs[thread->linear];
  if (log.size == log.capacity) {
    const size_t capacity = log.capacity == 0 ? 1024 : 2 * log.capacity;
    void* grown = std::realloc(log.entries, capacity * sizeof(Access));
    if (grown == nullptr) std::abort();
    log.entries = static_cast<Access*>(grown);
    log.capacity = capacity;
  }
  log.entries[log.size++] = Access{reinterpret_cast<uintptr_t>(return_address) - 1, where,
                                   static_cast<uint32_t>(bytes), is_store, shared};
}

// ---- counting, at the end of each block ----------------------------------------------------------------

struct LaneAccess {  // one lane's part of a warp request
  uintptr_t pc;
  uint32_t execution;  // how many times this lane executed pc before, in this block
  bool is_store, shared;
  int lane;
  uintptr_t address;
  uint32_t bytes;
};

auto request_key(const LaneAccess& access) {
  return std::make_tuple(access.pc, access.execution, access.is_store, access.shared);
}

struct SharedTotals {
  uint64_t requests = 0, wavefronts = 0, ideal_wavefronts = 0;
};

struct GlobalTotals {
  uint64_t requests = 0, sectors = 0, requested_bytes = 0;
};

struct InstructionTotals {  // shared or global, as the instruction's key says
  SharedTotals shared;
  GlobalTotals global;
};

using InstructionKey = std::tuple<uintptr_t, bool, bool>;  // (pc, shared, is_store)

// A kernel: the name of its launch in the source, the kernel function's runtime address (0 when not
// known; one launch text can start several instantiations) and the threads per block.
using KernelKey = std::tuple<std::string, uintptr_t, int64_t>;

struct KernelTotals {
  uint64_t launches = 0, blocks = 0;
  uint64_t dynamic_shared_bytes = 0;  // the largest of its launches
  SharedTotals shared_load, shared_store;
  GlobalTotals global_load, global_store;
  std::map<InstructionKey, InstructionTotals> instructions;
};

std::map<KernelKey, KernelTotals>& kernel_totals() {
  static std::map<KernelKey, KernelTotals> totals;
  return totals;
}

KernelTotals* running_kernel = nullptr;

// Wavefronts of one shared-memory request (its lane accesses sorted by lane) and the ideal: 32 banks of
// 4-byte words; 1, 2 or 4 phases for accesses of <= 4, 8 or 16 bytes; per phase with an active lane, the
// most distinct words in one bank (at least 1) against ceil(distinct words / 32).
std::pair<uint64_t, uint64_t> shared_wavefronts(const LaneAccess* first, const LaneAccess* last) {
  uint32_t widest = 0;
  for (const LaneAccess* access = first; access != last; ++access) widest = std::max(widest, access->bytes);
  const int lanes_per_phase = widest <= 4 ? 32 : (widest <= 8 ? 16 : 8);
  uint64_t wavefronts = 0, ideal = 0;
  std::vector<uintptr_t> words;
  for (const LaneAccess* access = first; access != last;) {
    const int phase = access->lane / lanes_per_phase;
    words.clear();
    for (; access != last && access->lane / lanes_per_phase == phase; ++access) {
      for (uintptr_t word = access->address / 4; word <= (access->address + access->bytes - 1) / 4; ++word) {
        words.push_back(word);
      }
    }
    std::sort(words.begin(), words.end());
    words.erase(std::unique(words.begin(), words.end()), words.end());
    int words_in_bank[32] = {};
    int most = 0;
    for (const uintptr_t word : words) most = std::max(most, ++words_in_bank[word % 32]);
    wavefronts += most;
    ideal += (words.size() + 31) / 32;
  }
  return {wavefronts, ideal};
}

// The 32-byte sectors one global-memory request touches, and the distinct bytes it asks for.
std::pair<uint64_t, uint64_t> global_sectors(const LaneAccess* first, const LaneAccess* last) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;  // [begin, end) per lane
  for (const LaneAccess* access = first; access != last; ++access) {
    spans.emplace_back(access->address, access->address + access->bytes);
  }
  std::sort(spans.begin(), spans.end());
  uint64_t sectors = 0, bytes = 0;
  uintptr_t covered_end = 0;         // bytes below it are counted
  uintptr_t next_new_sector = 0;     // sectors below it are counted
  for (const auto& [begin, end] : spans) {
    const uintptr_t new_begin = std::max(begin, covered_end);
    if (new_begin < end) bytes += end - new_begin;
    covered_end = std::max(covered_end, end);
    const uintptr_t first_sector = std::max(begin / 32, next_new_sector), last_sector = (end - 1) / 32;
    if (first_sector <= last_sector) sectors += last_sector - first_sector + 1;
    next_new_sector = std::max(next_new_sector, last_sector + 1);
  }
  return {sectors, bytes};
}

void count_request(KernelTotals& kernel, const LaneAccess* first, const LaneAccess* last) {
  InstructionTotals& instruction = kernel.instructions[{first->pc, first->shared, first->is_store}];
  if (first->shared) {
    const auto [wavefronts, ideal] = shared_wavefronts(first, last);
    for (SharedTotals* totals : {first->is_store ? &kernel.shared_store : &kernel.shared_load, &instruction.shared}) {
      totals->requests += 1;
      totals->wavefronts += wavefronts;
      totals->ideal_wavefronts += ideal;
    }
  } else {
    const auto [sectors, bytes] = global_sectors(first, last);
    for (GlobalTotals* totals : {first->is_store ? &kernel.global_store : &kernel.global_load, &instruction.global}) {
      totals->requests += 1;
      totals->sectors += sectors;
      totals->requested_bytes += bytes;
    }
  }
}

#endif  // FUSEDGPT_SIMT_COUNT

// ---- the report ------------------------------------------------------------------------------------------

std::string memory_counters() {
  const LibraryLayout& layout = library_layout();
  std::ostringstream out;
  out << "{\"flavour\": \"" << kFlavour << "\", \"counting\": "
#if defined(FUSEDGPT_SIMT_COUNT)
      << "true"
#else
      << "false"
#endif
      << ", \"library\": " << json_string(layout.path) << ", \"kernels\": [";
#if defined(FUSEDGPT_SIMT_COUNT)
  constexpr size_t kWorstInstructions = 8;
  bool first_kernel = true;
  for (const auto& [kernel_key, kernel] : kernel_totals()) {
    const auto& [name, entry_address, threads] = kernel_key;
    out << (first_kernel ? "" : ", ") << "{\"name\": " << json_string(name) << ", \"entry_offset\": "
        << (entry_address != 0 ? hexadecimal(entry_address - layout.base) : std::string("null"))
        << ", \"threads\": " << threads
        << ", \"launches\": " << kernel.launches << ", \"blocks\": " << kernel.blocks
        << ", \"dynamic_shared_bytes\": " << kernel.dynamic_shared_bytes;
    for (const auto& [prefix, totals] : {std::pair{"shared_load", &kernel.shared_load},
                                         std::pair{"shared_store", &kernel.shared_store}}) {
      out << ", \"" << prefix << "_requests\": " << totals->requests << ", \"" << prefix
          << "_wavefronts\": " << totals->wavefronts << ", \"" << prefix
          << "_ideal_wavefronts\": " << totals->ideal_wavefronts;
    }
    for (const auto& [prefix, totals] : {std::pair{"global_load", &kernel.global_load},
                                         std::pair{"global_store", &kernel.global_store}}) {
      out << ", \"" << prefix << "_requests\": " << totals->requests << ", \"" << prefix
          << "_sectors\": " << totals->sectors << ", \"" << prefix << "_requested_bytes\": "
          << totals->requested_bytes;
    }
    // The static instructions that waste the most: excess wavefronts, or sector bytes not asked for.
    std::vector<std::pair<uint64_t, const std::pair<const InstructionKey, InstructionTotals>*>> shared, global;
    for (const auto& instruction : kernel.instructions) {
      const auto& [instruction_key, totals] = instruction;
      if (std::get<1>(instruction_key)) {
        const uint64_t excess = totals.shared.wavefronts - totals.shared.ideal_wavefronts;
        if (excess > 0) shared.emplace_back(excess, &instruction);
      } else {
        const uint64_t waste = 32 * totals.global.sectors - totals.global.requested_bytes;
        if (waste > 0) global.emplace_back(waste, &instruction);
      }
    }
    const auto worst_first = [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : std::get<0>(a.second->first) < std::get<0>(b.second->first);
    };
    std::sort(shared.begin(), shared.end(), worst_first);
    std::sort(global.begin(), global.end(), worst_first);
    out << ", \"worst_shared_instructions\": [";
    for (size_t i = 0; i < std::min(shared.size(), kWorstInstructions); ++i) {
      const auto& [instruction_key, totals] = *shared[i].second;
      out << (i == 0 ? "" : ", ") << "{\"pc_offset\": " << hexadecimal(std::get<0>(instruction_key) - layout.base)
          << ", \"is_store\": " << (std::get<2>(instruction_key) ? "true" : "false") << ", \"requests\": "
          << totals.shared.requests << ", \"wavefronts\": " << totals.shared.wavefronts
          << ", \"ideal_wavefronts\": " << totals.shared.ideal_wavefronts << "}";
    }
    out << "], \"worst_global_instructions\": [";
    for (size_t i = 0; i < std::min(global.size(), kWorstInstructions); ++i) {
      const auto& [instruction_key, totals] = *global[i].second;
      out << (i == 0 ? "" : ", ") << "{\"pc_offset\": " << hexadecimal(std::get<0>(instruction_key) - layout.base)
          << ", \"is_store\": " << (std::get<2>(instruction_key) ? "true" : "false") << ", \"requests\": "
          << totals.global.requests << ", \"sectors\": " << totals.global.sectors
          << ", \"requested_bytes\": " << totals.global.requested_bytes << "}";
    }
    out << "]}";
    first_kernel = false;
  }
#endif
  out << "]}";
  return out.str();
}

void memory_counters_reset() {
#if defined(FUSEDGPT_SIMT_COUNT)
  kernel_totals().clear();
#endif
}

}  // namespace

#if defined(FUSEDGPT_SIMT_COUNT)

// ---- the scheduler's hooks (declared in simt.h) ------------------------------------------------------------

namespace simt {

void counters_begin_launch(const char* kernel_name, const void* kernel_entry, int64_t threads_per_block,
                           size_t dynamic_shared_bytes) {
  const LibraryLayout& layout = library_layout();
  std::copy(layout.writable, layout.writable + layout.writable_count, shared_ranges);
  shared_range_count = layout.writable_count;
  KernelTotals& kernel = kernel_totals()[{kernel_name != nullptr ? kernel_name : "(unnamed kernel)",
                                          reinterpret_cast<uintptr_t>(kernel_entry), threads_per_block}];
  kernel.launches += 1;
  kernel.dynamic_shared_bytes = std::max<uint64_t>(kernel.dynamic_shared_bytes, dynamic_shared_bytes);
  running_kernel = &kernel;
}

// The k-th execution of a static instruction by each lane of a warp is one warp request.
void counters_end_block() {
  const Scheduler& s = scheduler();
  const int count = static_cast<int>(s.threads.size());
  if (running_kernel != nullptr && s.error.empty()) {
    running_kernel->blocks += 1;
    std::vector<LaneAccess> accesses;
    std::unordered_map<uintptr_t, uint32_t> executions;
    for (int first_lane = 0; first_lane < count; first_lane += 32) {
      accesses.clear();
      for (int lane = 0; lane < 32 && first_lane + lane < count; ++lane) {
        const AccessLog& log = thread_logs[first_lane + lane];
        executions.clear();
        for (size_t i = 0; i < log.size; ++i) {
          const Access& access = log.entries[i];
          const uint32_t execution = executions[access.pc]++;
          if (access.bytes == 0) continue;  // executed, touched nothing (see record)
          accesses.push_back({access.pc, execution, access.is_store, access.shared, lane, access.address,
                              access.bytes});
        }
      }
      std::sort(accesses.begin(), accesses.end(), [](const LaneAccess& a, const LaneAccess& b) {
        return std::make_tuple(request_key(a), a.lane) < std::make_tuple(request_key(b), b.lane);
      });
      for (size_t begin = 0; begin < accesses.size();) {
        size_t end = begin + 1;
        while (end < accesses.size() && request_key(accesses[end]) == request_key(accesses[begin])) ++end;
        count_request(*running_kernel, accesses.data() + begin, accesses.data() + end);
        begin = end;
      }
    }
  }
  for (int i = 0; i < count && i < kMaxThreads; ++i) thread_logs[i].size = 0;
}

void counters_end_launch() { running_kernel = nullptr; }

}  // namespace simt

// ---- the callbacks of gcc's ThreadSanitizer instrumentation (signatures as gcc declares them) -----------

extern "C" {

#define SIMT_ACCESS_CALLBACKS(BYTES)                                                        \
  SIMT_UNCOUNTED void __tsan_read##BYTES(void* address) {                                  \
    record(__builtin_return_address(0), address, BYTES, false);                            \
  }                                                                                         \
  SIMT_UNCOUNTED void __tsan_write##BYTES(void* address) {                                 \
    record(__builtin_return_address(0), address, BYTES, true);                             \
  }
#define SIMT_UNALIGNED_ACCESS_CALLBACKS(BYTES)                                              \
  SIMT_UNCOUNTED void __tsan_unaligned_read##BYTES(void* address) {                        \
    record(__builtin_return_address(0), address, BYTES, false);                            \
  }                                                                                         \
  SIMT_UNCOUNTED void __tsan_unaligned_write##BYTES(void* address) {                       \
    record(__builtin_return_address(0), address, BYTES, true);                             \
  }

SIMT_ACCESS_CALLBACKS(1)
SIMT_ACCESS_CALLBACKS(2)
SIMT_ACCESS_CALLBACKS(4)
SIMT_ACCESS_CALLBACKS(8)
SIMT_ACCESS_CALLBACKS(16)
SIMT_UNALIGNED_ACCESS_CALLBACKS(2)
SIMT_UNALIGNED_ACCESS_CALLBACKS(4)
SIMT_UNALIGNED_ACCESS_CALLBACKS(8)
SIMT_UNALIGNED_ACCESS_CALLBACKS(16)
#undef SIMT_ACCESS_CALLBACKS
#undef SIMT_UNALIGNED_ACCESS_CALLBACKS

SIMT_UNCOUNTED void __tsan_read_range(void* address, size_t bytes) {
  record(__builtin_return_address(0), address, bytes, false);
}
SIMT_UNCOUNTED void __tsan_write_range(void* address, size_t bytes) {
  record(__builtin_return_address(0), address, bytes, true);
}
// Notifications with nothing to do without a runtime: a file's start, a vtable pointer stored.
SIMT_UNCOUNTED void __tsan_init() {}
SIMT_UNCOUNTED void __tsan_vptr_update(void*, void*) {}

// Atomic operations, which the instrumentation hands to the runtime instead of doing them (host code:
// torch's reference counts, guarded statics). Done here, uninstrumented, always sequentially consistent
// (at least as strong as the order asked for).
#define SIMT_ATOMICS(BITS, TYPE)                                                                       \
  SIMT_UNCOUNTED TYPE __tsan_atomic##BITS##_load(const volatile void* a, int) {                       \
    return __atomic_load_n(static_cast<const volatile TYPE*>(a), __ATOMIC_SEQ_CST);                  \
  }                                                                                                    \
  SIMT_UNCOUNTED void __tsan_atomic##BITS##_store(volatile void* a, TYPE v, int) {                    \
    __atomic_store_n(static_cast<volatile TYPE*>(a), v, __ATOMIC_SEQ_CST);                           \
  }                                                                                                    \
  SIMT_UNCOUNTED TYPE __tsan_atomic##BITS##_exchange(volatile void* a, TYPE v, int) {                 \
    return __atomic_exchange_n(static_cast<volatile TYPE*>(a), v, __ATOMIC_SEQ_CST);                 \
  }                                                                                                    \
  SIMT_UNCOUNTED TYPE __tsan_atomic##BITS##_fetch_add(volatile void* a, TYPE v, int) {                \
    return __atomic_fetch_add(static_cast<volatile TYPE*>(a), v, __ATOMIC_SEQ_CST);                  \
  }                                                                                                    \
  SIMT_UNCOUNTED TYPE __tsan_atomic##BITS##_fetch_sub(volatile void* a, TYPE v, int) {                \
    return __atomic_fetch_sub(static_cast<volatile TYPE*>(a), v, __ATOMIC_SEQ_CST);                  \
  }                                                                                                    \
  SIMT_UNCOUNTED TYPE __tsan_atomic##BITS##_fetch_and(volatile void* a, TYPE v, int) {                \
    return __atomic_fetch_and(static_cast<volatile TYPE*>(a), v, __ATOMIC_SEQ_CST);                  \
  }                                                                                                    \
  SIMT_UNCOUNTED TYPE __tsan_atomic##BITS##_fetch_or(volatile void* a, TYPE v, int) {                 \
    return __atomic_fetch_or(static_cast<volatile TYPE*>(a), v, __ATOMIC_SEQ_CST);                   \
  }                                                                                                    \
  SIMT_UNCOUNTED TYPE __tsan_atomic##BITS##_fetch_xor(volatile void* a, TYPE v, int) {                \
    return __atomic_fetch_xor(static_cast<volatile TYPE*>(a), v, __ATOMIC_SEQ_CST);                  \
  }                                                                                                    \
  SIMT_UNCOUNTED TYPE __tsan_atomic##BITS##_fetch_nand(volatile void* a, TYPE v, int) {               \
    return __atomic_fetch_nand(static_cast<volatile TYPE*>(a), v, __ATOMIC_SEQ_CST);                 \
  }                                                                                                    \
  SIMT_UNCOUNTED bool __tsan_atomic##BITS##_compare_exchange_strong(volatile void* a, void* expected,  \
                                                                    TYPE v, int, int) {                \
    return __atomic_compare_exchange_n(static_cast<volatile TYPE*>(a), static_cast<TYPE*>(expected), v, \
                                       false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
  }                                                                                                    \
  SIMT_UNCOUNTED bool __tsan_atomic##BITS##_compare_exchange_weak(volatile void* a, void* expected,    \
                                                                  TYPE v, int, int) {                  \
    return __atomic_compare_exchange_n(static_cast<volatile TYPE*>(a), static_cast<TYPE*>(expected), v, \
                                       false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
  }                                                                                                    \
  SIMT_UNCOUNTED TYPE __tsan_atomic##BITS##_compare_exchange_val(volatile void* a, TYPE expected,      \
                                                                 TYPE v, int, int) {                   \
    __atomic_compare_exchange_n(static_cast<volatile TYPE*>(a), &expected, v, false, __ATOMIC_SEQ_CST, \
                                __ATOMIC_SEQ_CST);                                                    \
    return expected;                                                                                   \
  }

SIMT_ATOMICS(8, uint8_t)
SIMT_ATOMICS(16, uint16_t)
SIMT_ATOMICS(32, uint32_t)
SIMT_ATOMICS(64, uint64_t)
#undef SIMT_ATOMICS

SIMT_UNCOUNTED void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
SIMT_UNCOUNTED void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

}  // extern "C"

#endif  // FUSEDGPT_SIMT_COUNT

TORCH_LIBRARY_FRAGMENT(fusedgpt_simt, m) {
  m.def("memory_counters() -> str", &memory_counters);
  m.def("memory_counters_reset() -> ()", &memory_counters_reset);
}
