// Runtime of the SIMT emulator: runs a grid's blocks one after another on the calling host thread, the
// threads of a block as cooperative fibers (glibc ucontext), and checks what the kernel does in the
// spirit of compute-sanitizer. The kernel translation units are compiled with -fsanitize=kernel-address
// and outline calls, so every load and store of kernel code lands in the __asan_* hooks below.
//
// Checks, each reported with kernel, block, thread and address:
//   global   an access outside every buffer registered for the call, or a store into an input;
//   shared   an access past the launch's dynamic shared memory; a read of a byte no thread of the block
//            has written (shared memory is poisoned at block start); a race: a byte that two threads
//            touch, at least one writing, with no barrier in between (__syncthreads for any two threads,
//            a warp collective for two lanes of one warp);
//   async    (<cuda_pipeline_primitives.h>) a copy that is not 4, 8 or 16 bytes, a pointer not aligned to
//            its size, a destination outside shared or a source outside global memory; an access to
//            shared bytes an asynchronous copy is still filling: issued, not yet landed by the
//            __pipeline_wait_prior that retires its batch (a missing commit or wait);
//   launch   more than 1024 threads, grid y or z above 65535, dynamic shared memory above 48 KiB
//            without the opt-in or above the device profile's opt-in limit;
//   misuse   deadlocks at barriers, partial warp masks, collectives with exited lanes; a WMMA load or
//            store whose pointer is not 256-bit aligned or whose ldm is not a multiple of 16 bytes.
// WMMA fragments hold their elements in a placement scrambled per fragment type (mma.h;
// simt_set_fragment_seed), so kernels that read fragment elements by position compute wrong results.
// It also counts the global bytes each launch reads and writes and, when asked (simt_count_shared_wavefronts),
// the shared-memory wavefronts of the kernel's own loads and stores: the accesses one warp makes at one code
// site between two barriers are one warp request, split into phases of 128 bytes (32 lanes up to 4-byte
// accesses, 16 for 8-byte, 8 for 16-byte), each phase taking as many wavefronts as the most distinct 32-bit
// words any of the 32 banks holds. WMMA fragment loads and stores are counted as bytes only. A lane's k-th visit
// to a site is taken to be the same instruction as its neighbours' k-th: exact for straight-line code and
// loops every lane runs alike, approximate in a loop whose trip count differs between lanes (the lanes that
// run longer pair their extra visits with the others' next ones).
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <link.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "include/simt_device.h"

namespace simt {
namespace {

struct DeviceProfile {
  const char* name;
  int sm_count;
  int max_smem_optin;
};
constexpr DeviceProfile kProfiles[] = {
    {"h100", 132, 227 * 1024},
    {"h200", 132, 227 * 1024},
    {"a100", 108, 163 * 1024},
    // Hopper's shared memory on 4 SMs: small tests reach the plans large grids take (persistent blocks with
    // several tiles each).
    {"hopper-4sm", 4, 227 * 1024},
};
constexpr size_t kDefaultSmemLimit = 48 * 1024;
constexpr size_t kFiberStackBytes = 64 * 1024;
constexpr int kMaxReportsPerLaunch = 12;

enum class FiberState { kRunnable, kAtBarrier, kAtWarp, kDone };

// A fiber starts through ucontext (which sets up its stack); every later switch is a _setjmp/_longjmp
// pair, which unlike swapcontext saves no signal mask and so makes no system call.
// One __pipeline_memcpy_async: it lands (copies) at the __pipeline_wait_prior that retires its batch.
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  size_t bytes;
  size_t zfill;           // trailing bytes filled with zeros instead of read
  uint64_t batch;         // the thread's commit count when it was issued
  bool readable_source;   // false when the source check failed: it lands as poison
};

struct Fiber {
  ucontext_t context;
  jmp_buf resume;
  bool started = false;
  std::vector<unsigned char> stack;
  FiberState state = FiberState::kRunnable;
  uint3 index{};
  int linear = 0;
  std::vector<AsyncCopy> async_copies;  // issued, not landed, in issue order
  uint64_t committed_batches = 0;
  std::unordered_map<uintptr_t, uint32_t> site_visits;  // shared accesses per code site since the last barrier
};

// The lanes of one warp request to shared memory (one code site, one visit, one warp).
struct SharedRequest {
  uint32_t lane_mask = 0;
  uint32_t bytes = 0;
  uintptr_t address[32];
};

struct SharedRequestKey {
  uintptr_t site;
  uint32_t visit;
  int warp;
  bool operator==(const SharedRequestKey& other) const {
    return site == other.site && visit == other.visit && warp == other.warp;
  }
};

struct SharedRequestHash {
  size_t operator()(const SharedRequestKey& key) const {
    return std::hash<uintptr_t>()(key.site) ^ (static_cast<size_t>(key.visit) << 20) ^
           (static_cast<size_t>(key.warp) << 52);
  }
};

struct Warp {
  void* slots[32] = {};
  Combine combine = nullptr;
  int arrived = 0;
  int live = 0;
  uint32_t epoch = 0;
};

struct Access {
  uint32_t block_epoch = 0;
  uint32_t warp_epoch = 0;
  int32_t thread = 0;  // -1: several threads
  int32_t warp = 0;    // -1: several warps
};

struct ShadowByte {
  Access write;
  Access read;
  uint32_t in_flight_block = 0;  // the block_start_epoch while an asynchronous copy is filling the byte
  int32_t in_flight_thread = 0;  // the thread that issued it
};

struct Region {
  uintptr_t begin, end;
  std::string name;
  bool writable;
  uint64_t read_bytes = 0, written_bytes = 0;
};

struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  size_t dynamic_smem;
  uint64_t read_bytes = 0, written_bytes = 0;
  uint64_t shared_requests = 0, shared_wavefronts = 0, shared_conflict_free_wavefronts = 0, fragment_shared_bytes = 0;
  // Asynchronous copies: global bytes they read (also in read_bytes), and the waits, summed over threads, that
  // landed at least one copy (each is one round trip to global memory for its thread).
  uint64_t async_read_bytes = 0, async_landing_waits = 0;
};

struct State {
  const DeviceProfile* profile = &kProfiles[0];
  std::map<const void*, int> smem_optin;
  cudaError_t last_error = cudaSuccess;
  int order = 0;  // 0 forward, 1 reverse, 2 seeded shuffle
  int64_t blocks_to_run = -1;  // per launch, in grid order; -1 all (see simt_set_blocks_to_run)
  uint64_t seed = 0;
  std::mt19937_64 shuffle_rng;
  uint64_t fragment_seed = 1;  // 0: identity placement of fragment elements
  std::map<uint64_t, std::vector<int>> fragment_placements;

  std::vector<Region> regions;
  std::vector<LaunchRecord> launches;
  std::vector<std::string> reports;
  int reports_this_launch = 0;
  int suppressed = 0;

  // Shared memory: the kernel module's thread-local segment, and its dynamic buffers.
  uintptr_t shared_begin = 0, shared_end = 0;
  std::vector<std::pair<uintptr_t, size_t>> dynamic_buffers;
  std::vector<ShadowByte> shadow;
  bool count_wavefronts = false;
  std::unordered_map<SharedRequestKey, SharedRequest, SharedRequestHash> shared_requests;

  // The running launch and block.
  const LaunchRequest* request = nullptr;
  uint3 block{};
  std::vector<Fiber> fibers;  // grows to the largest block seen; the first block_threads are in use
  size_t block_threads = 0;
  std::vector<Warp> warps;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  jmp_buf scheduler_jump;
  int live = 0;
  int at_barrier = 0;
  uint32_t epoch_counter = 0;
  uint32_t block_start_epoch = 0;
  uint32_t block_epoch = 0;
} g;

std::string where() {
  char text[300];
  if (g.current == nullptr) {
    return "host";
  }
  std::snprintf(text, sizeof(text), "kernel %s block (%u,%u,%u) thread (%u,%u,%u)", g.launches.back().kernel.c_str(), g.block.x,
                g.block.y, g.block.z, g.current->index.x, g.current->index.y, g.current->index.z);
  return text;
}

void report(const char* kind, const char* format, ...) {
  if (g.reports_this_launch >= kMaxReportsPerLaunch) {
    ++g.suppressed;
    return;
  }
  ++g.reports_this_launch;
  char detail[512];
  va_list args;
  va_start(args, format);
  std::vsnprintf(detail, sizeof(detail), format, args);
  va_end(args);
  g.reports.push_back(std::string(kind) + ": " + where() + ": " + detail);
}

// ---- memory checks ----

bool ordered(const Access& earlier, int thread, int warp) {
  if (earlier.block_epoch != g.block_epoch) {
    return true;  // a __syncthreads (or the block start) lies between
  }
  if (earlier.thread == thread) {
    return true;
  }
  return earlier.warp == warp && earlier.warp_epoch != g.warps[warp].epoch;
}

std::string who(const Access& access) {
  char text[64];
  if (access.thread >= 0) {
    std::snprintf(text, sizeof(text), "thread %d", access.thread);
  } else if (access.warp >= 0) {
    std::snprintf(text, sizeof(text), "threads of warp %d", access.warp);
  } else {
    std::snprintf(text, sizeof(text), "threads of several warps");
  }
  return text;
}

// Where a shared byte lies: in a dynamic buffer (offset from its start) or among the static arrays.
std::string shared_location(uintptr_t address) {
  char text[96];
  for (const auto& [base, capacity] : g.dynamic_buffers) {
    if (address >= base && address < base + capacity) {
      std::snprintf(text, sizeof(text), "dynamic shared offset %zu", static_cast<size_t>(address - base));
      return text;
    }
  }
  std::snprintf(text, sizeof(text), "static shared byte %zu", static_cast<size_t>(address - g.shared_begin));
  return text;
}

// Checks one access to shared memory and records it; false if it lies past the dynamic shared memory.
bool shared_access(uintptr_t address, size_t bytes, bool is_write) {
  const char* verb = is_write ? "write" : "read";
  for (const auto& [base, capacity] : g.dynamic_buffers) {
    if (address >= base && address < base + capacity) {
      const size_t offset = address - base;
      if (offset + bytes > g.request->dynamic_smem) {
        report("shared out of bounds", "%s of %zu bytes at dynamic shared offset %zu; the launch has %zu bytes", verb,
               bytes, offset, g.request->dynamic_smem);
        return false;
      }
    }
  }
  const int thread = g.current->linear;
  const int warp = thread / 32;
  const uint32_t warp_epoch = g.warps[warp].epoch;
  bool reported = false;  // one report per access, at its first bad byte
  for (size_t i = 0; i < bytes; ++i) {
    ShadowByte& s = g.shadow[address + i - g.shared_begin];
    const bool written = s.write.block_epoch >= g.block_start_epoch;
    std::string problem;
    if (s.in_flight_block == g.block_start_epoch) {
      if (!reported) {
        reported = true;
        report("async copy in flight",
               "%s of %zu bytes at %s: an asynchronous copy of thread %d is still filling it (no "
               "__pipeline_commit/__pipeline_wait_prior has landed it)",
               verb, bytes, shared_location(address + i).c_str(), s.in_flight_thread);
      }
    } else if (is_write) {
      if (written && !ordered(s.write, thread, warp)) {
        problem = "write-after-write race with " + who(s.write);
      } else if (s.read.block_epoch >= g.block_start_epoch && !ordered(s.read, thread, warp)) {
        problem = "write-after-read race with " + who(s.read);
      }
      s.write = Access{g.block_epoch, warp_epoch, thread, warp};
    } else {
      if (!written) {
        problem = "read of never-written shared memory";
        s.write = Access{g.block_start_epoch, warp_epoch, thread, warp};  // report each byte once
      } else if (!ordered(s.write, thread, warp)) {
        problem = "read-after-write race with " + who(s.write);
      }
      if (s.read.block_epoch != g.block_epoch) {
        s.read = Access{g.block_epoch, warp_epoch, thread, warp};
      } else {
        if (s.read.thread != thread) {
          s.read.thread = -1;
          if (s.read.warp != warp) {
            s.read.warp = -1;
          }
        }
        s.read.warp_epoch = warp_epoch;
      }
    }
    if (!problem.empty() && !reported) {
      reported = true;
      report(problem.rfind("read of", 0) == 0 ? "shared uninitialised" : "shared race", "%s of %zu bytes at %s: %s",
             verb, bytes, shared_location(address + i).c_str(), problem.c_str());
    }
  }
  return true;
}

void global_access(uintptr_t address, size_t bytes, bool is_write) {
  for (Region& region : g.regions) {
    if (address >= region.begin && address + bytes <= region.end) {
      if (is_write && !region.writable) {
        report("global write to input", "write of %zu bytes into input %s at byte offset %" PRIuPTR, bytes,
               region.name.c_str(), address - region.begin);
      }
      (is_write ? region.written_bytes : region.read_bytes) += bytes;
      (is_write ? g.launches.back().written_bytes : g.launches.back().read_bytes) += bytes;
      return;
    }
  }
  const Region* nearest = nullptr;
  intptr_t distance = 0;
  for (const Region& region : g.regions) {
    const intptr_t d = address < region.begin ? static_cast<intptr_t>(address - region.begin)
                                              : static_cast<intptr_t>(address - region.end);
    if (nearest == nullptr || std::llabs(d) < std::llabs(distance)) {
      nearest = &region;
      distance = d;
    }
  }
  if (nearest != nullptr && std::llabs(distance) < (1 << 20)) {
    report("global out of bounds", "%s of %zu bytes at 0x%" PRIxPTR ", %" PRIdPTR " bytes %s buffer %s",
           is_write ? "write" : "read", bytes, address, std::llabs(distance), distance < 0 ? "before" : "past the end of",
           nearest->name.c_str());
  } else {
    report("global out of bounds", "%s of %zu bytes at 0x%" PRIxPTR ", in no buffer given to the launch",
           is_write ? "write" : "read", bytes, address);
  }
}

// ---- shared-memory wavefronts ----

// The wavefronts a request takes, and (conflict_free) the phases it has, which is what it would take without
// bank conflicts.
uint64_t wavefronts(const SharedRequest& request, uint64_t* conflict_free) {
  const int lanes_per_phase = 32 / static_cast<int>(std::max<uint32_t>(1, request.bytes / 4));
  uint64_t total = 0;
  for (int phase = 0; phase < 32; phase += lanes_per_phase) {
    const uint32_t phase_lanes = (lanes_per_phase == 32 ? ~0u : (1u << lanes_per_phase) - 1) << phase;
    if ((request.lane_mask & phase_lanes) == 0) {
      continue;
    }
    ++*conflict_free;
    std::vector<uintptr_t> words[32];
    for (int lane = phase; lane < phase + lanes_per_phase; ++lane) {
      if ((request.lane_mask >> lane & 1u) == 0) {
        continue;
      }
      for (uintptr_t word = request.address[lane] / 4; word <= (request.address[lane] + request.bytes - 1) / 4;
           ++word) {
        std::vector<uintptr_t>& bank = words[word % 32];
        if (std::find(bank.begin(), bank.end(), word) == bank.end()) {
          bank.push_back(word);
        }
      }
    }
    size_t most = 0;
    for (const auto& bank : words) {
      most = std::max(most, bank.size());
    }
    total += most;
  }
  return total;
}

// Adds the warp requests made since the last barrier to the launch's counts.
void flush_shared_requests() {
  if (g.shared_requests.empty()) {
    return;
  }
  LaunchRecord& launch = g.launches.back();
  for (const auto& entry : g.shared_requests) {
    ++launch.shared_requests;
    launch.shared_wavefronts += wavefronts(entry.second, &launch.shared_conflict_free_wavefronts);
  }
  g.shared_requests.clear();
  for (Fiber& fiber : g.fibers) {
    fiber.site_visits.clear();
  }
}

void record_shared_request(uintptr_t site, uintptr_t address, size_t bytes) {
  Fiber* fiber = g.current;
  const uint32_t visit = fiber->site_visits[site]++;
  SharedRequest& request = g.shared_requests[SharedRequestKey{site, visit, fiber->linear / 32}];
  const int lane = fiber->linear % 32;
  request.lane_mask |= 1u << lane;
  request.bytes = static_cast<uint32_t>(bytes);
  request.address[lane] = address;
}

[[noreturn]] void finish_fiber();

// site: the kernel code making the access (its return address in the hook), or 0 for an access the emulator
// makes on the kernel's behalf (a WMMA fragment load or store).
inline void on_access(const void* pointer, size_t bytes, bool is_write, uintptr_t site = 0) {
  Fiber* fiber = g.current;
  if (fiber == nullptr) {
    return;  // host code of the launchers
  }
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  const auto stack = reinterpret_cast<uintptr_t>(fiber->stack.data());
  if (address >= stack && address < stack + fiber->stack.size()) {
    return;  // the thread's own locals and arguments
  }
  const bool shared = address >= g.shared_begin && address < g.shared_end;
  // A GPU faults ("misaligned address") on a load or store not aligned to its own size, such as a 16-byte
  // vector load from an odd element offset. The host would run a scalar one silently and crash on a vector
  // one (an aligned SSE move), so the thread stops here, as the GPU's would, before the access.
  if ((bytes == 2 || bytes == 4 || bytes == 8 || bytes == 16) && address % bytes != 0) {
    report("misaligned access", "%s %s of %zu bytes at 0x%" PRIxPTR ", not %zu-byte aligned",
           shared ? "shared" : "global", is_write ? "write" : "read", bytes, address, bytes);
    finish_fiber();
  }
  if (shared) {
    if (shared_access(address, bytes, is_write) && g.count_wavefronts) {
      if (site != 0) {
        record_shared_request(site, address, bytes);
      } else {
        g.launches.back().fragment_shared_bytes += bytes;
      }
    }
  } else {
    global_access(address, bytes, is_write);
  }
}

// ---- scheduling ----

void release_barrier() {
  flush_shared_requests();
  for (Fiber& fiber : g.fibers) {
    if (fiber.state == FiberState::kAtBarrier) {
      fiber.state = FiberState::kRunnable;
    }
  }
  g.at_barrier = 0;
  g.block_epoch = ++g.epoch_counter;
}

void complete_warp(int w) {
  Warp& warp = g.warps[w];
  Combine combine = warp.combine;
  if (combine != nullptr) {
    combine(warp.slots, warp.arrived);
  }
  for (int lane = 0; lane < 32; ++lane) {
    const size_t t = static_cast<size_t>(w) * 32 + lane;
    if (t < g.block_threads && g.fibers[t].state == FiberState::kAtWarp) {
      g.fibers[t].state = FiberState::kRunnable;
    }
    warp.slots[lane] = nullptr;
  }
  warp.arrived = 0;
  warp.combine = nullptr;
  warp.epoch = ++g.epoch_counter;
}

void yield_to_scheduler() {
  if (_setjmp(g.current->resume) == 0) {
    _longjmp(g.scheduler_jump, 1);
  }
}

void fiber_main() {
  g.request->run(g.request->bound);
  finish_fiber();
}

// Ends the current thread (its kernel returned, or it faulted): the block's barriers and warp collectives stop
// waiting for it, and the scheduler runs the others.
[[noreturn]] void finish_fiber() {
  Fiber* self = g.current;
  self->state = FiberState::kDone;
  --g.live;
  Warp& warp = g.warps[self->linear / 32];
  --warp.live;
  if (warp.arrived > 0 && warp.arrived == warp.live) {
    complete_warp(self->linear / 32);
  }
  if (g.at_barrier > 0 && g.at_barrier == g.live) {
    release_barrier();
  }
  _longjmp(g.scheduler_jump, 1);
}

std::vector<int> pass_order(size_t count) {
  std::vector<int> order(count);
  for (size_t i = 0; i < count; ++i) {
    order[i] = static_cast<int>(g.order == 1 ? count - 1 - i : i);
  }
  if (g.order == 2) {
    std::shuffle(order.begin(), order.end(), g.shuffle_rng);
  }
  return order;
}

void run_block(uint3 block) {
  const size_t threads = g.block_threads;
  g.block = block;
  std::memset(reinterpret_cast<void*>(g.shared_begin), 0xff, g.shared_end - g.shared_begin);
  g.block_start_epoch = g.block_epoch = ++g.epoch_counter;
  const dim3 dims = g.request->block;
  g.live = static_cast<int>(threads);
  g.at_barrier = 0;
  for (size_t w = 0; w < g.warps.size(); ++w) {
    g.warps[w] = Warp{};
    g.warps[w].live = static_cast<int>(std::min<size_t>(32, threads - w * 32));
    g.warps[w].epoch = ++g.epoch_counter;
  }
  for (size_t t = 0; t < threads; ++t) {
    Fiber& fiber = g.fibers[t];
    fiber.state = FiberState::kRunnable;
    fiber.linear = static_cast<int>(t);
    fiber.async_copies.clear();  // copies a thread never waited for die with its block
    fiber.committed_batches = 0;
    fiber.index = uint3{static_cast<unsigned>(t % dims.x), static_cast<unsigned>((t / dims.x) % dims.y),
                        static_cast<unsigned>(t / (static_cast<size_t>(dims.x) * dims.y))};
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.data();
    fiber.context.uc_stack.ss_size = fiber.stack.size();
    fiber.context.uc_link = nullptr;
    fiber.started = false;
    makecontext(&fiber.context, fiber_main, 0);
  }
  while (g.live > 0) {
    bool ran = false;
    for (int t : pass_order(threads)) {
      Fiber& fiber = g.fibers[t];
      if (fiber.state != FiberState::kRunnable) {
        continue;
      }
      ran = true;
      g.current = &fiber;
      if (_setjmp(g.scheduler_jump) == 0) {  // the fiber comes back here when it blocks or ends
        if (fiber.started) {
          _longjmp(fiber.resume, 1);
        }
        fiber.started = true;
        swapcontext(&g.scheduler, &fiber.context);
      }
      g.current = nullptr;
    }
    if (!ran) {
      g.current = &g.fibers[0];
      for (size_t t = 0; t < threads; ++t) {
        if (g.fibers[t].state != FiberState::kDone) {
          g.current = &g.fibers[t];
          break;
        }
      }
      report("deadlock", "%d live threads, %d at __syncthreads, none can run", g.live, g.at_barrier);
      g.current = nullptr;
      flush_shared_requests();
      return;  // the blocked fibers are abandoned; their stacks are reused by the next block
    }
  }
  flush_shared_requests();
}

bool check_launch(const LaunchRequest& r, size_t threads) {
  const char* problem = nullptr;
  char text[200];
  if (threads == 0 || threads > 1024 || r.block.z > 64) {
    std::snprintf(text, sizeof(text), "block (%u,%u,%u) has %zu threads; at most 1024", r.block.x, r.block.y,
                  r.block.z, threads);
    problem = text;
  } else if (r.grid.x == 0 || r.grid.y == 0 || r.grid.z == 0 || r.grid.y > 65535 || r.grid.z > 65535 ||
             r.grid.x > 0x7fffffffu) {
    std::snprintf(text, sizeof(text), "grid (%u,%u,%u): x must be in [1, 2^31), y and z in [1, 65535]", r.grid.x,
                  r.grid.y, r.grid.z);
    problem = text;
  } else {
    const auto optin = g.smem_optin.find(r.kernel_id);
    const size_t limit = optin == g.smem_optin.end() ? kDefaultSmemLimit : static_cast<size_t>(optin->second);
    if (r.dynamic_smem > limit) {
      std::snprintf(text, sizeof(text), "%zu bytes of dynamic shared memory, above %s of %zu bytes",
                    r.dynamic_smem, optin == g.smem_optin.end() ? "the default limit (no opt-in)" : "the opt-in",
                    limit);
      problem = text;
    }
  }
  if (problem != nullptr) {
    report("bad launch", "%s (kernel %s)", problem, g.launches.back().kernel.c_str());
    return false;
  }
  return true;
}

}  // namespace

uint3 thread_index() { return g.current->index; }
uint3 block_index() { return g.block; }
dim3 block_dim() { return g.request->block; }
dim3 grid_dim() { return g.request->grid; }
int lane_id() { return g.current->linear % 32; }

void sync_block() {
  g.current->state = FiberState::kAtBarrier;
  if (++g.at_barrier == g.live) {
    release_barrier();
  }
  yield_to_scheduler();
}

void warp_collective(unsigned mask, void* mine, Combine combine) {
  if (mask != 0xffffffffu) {
    report("misuse", "warp mask 0x%08x: only full-warp collectives are emulated", mask);
  }
  const int w = g.current->linear / 32;
  Warp& warp = g.warps[w];
  if (warp.arrived > 0 && warp.combine != combine) {
    report("misuse", "lanes of warp %d are at different warp collectives", w);
  }
  warp.combine = combine;
  warp.slots[g.current->linear % 32] = mine;
  g.current->state = FiberState::kAtWarp;
  if (++warp.arrived == warp.live) {
    complete_warp(w);
  }
  yield_to_scheduler();
}

void check_access(const void* address, size_t bytes, bool is_write) { on_access(address, bytes, is_write); }

// The thread calling a device-only function, or null (reported) when host code calls it.
Fiber* device_thread(const char* function) {
  if (g.current == nullptr) {
    report("misuse", "%s called from host code", function);
  }
  return g.current;
}

void async_copy_issue(void* dst_shared, const void* src_global, size_t size_and_align, size_t zfill) {
  Fiber* fiber = device_thread("__pipeline_memcpy_async");
  if (fiber == nullptr) {
    return;
  }
  const auto dst = reinterpret_cast<uintptr_t>(dst_shared);
  const auto src = reinterpret_cast<uintptr_t>(src_global);
  const auto stack = reinterpret_cast<uintptr_t>(fiber->stack.data());
  const bool src_on_stack = src >= stack && src < stack + fiber->stack.size();
  const bool src_in_shared = src >= g.shared_begin && src < g.shared_end;
  if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16) {
    report("async copy", "__pipeline_memcpy_async of %zu bytes: the size must be 4, 8 or 16", size_and_align);
  } else if (zfill > size_and_align) {
    report("async copy", "__pipeline_memcpy_async zero-fills %zu of %zu bytes", zfill, size_and_align);
  } else if (dst < g.shared_begin || dst + size_and_align > g.shared_end) {
    report("async copy", "__pipeline_memcpy_async destination 0x%" PRIxPTR " is not in shared memory", dst);
  } else if (src_on_stack || src_in_shared) {
    report("async copy", "__pipeline_memcpy_async source 0x%" PRIxPTR " is in %s memory, not global", src,
           src_on_stack ? "local" : "shared");
  } else if (dst % size_and_align != 0 || src % size_and_align != 0) {
    report("async copy",
           "__pipeline_memcpy_async of %zu bytes: destination at %s and source at 0x%" PRIxPTR
           " must both be %zu-byte aligned",
           size_and_align, shared_location(dst).c_str(), src, size_and_align);
  } else {
    const size_t reports_before = g.reports.size() + g.suppressed;
    if (zfill < size_and_align) {
      global_access(src, size_and_align - zfill, false);
      g.launches.back().async_read_bytes += size_and_align - zfill;
    }
    const bool readable_source = g.reports.size() + g.suppressed == reports_before;
    if (!shared_access(dst, size_and_align, true)) {
      return;
    }
    if (g.count_wavefronts) {  // the copy's write to shared memory, counted once, as a store from its issue site
      record_shared_request(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), dst, size_and_align);
    }
    for (size_t i = 0; i < size_and_align; ++i) {
      ShadowByte& s = g.shadow[dst + i - g.shared_begin];
      s.in_flight_block = g.block_start_epoch;
      s.in_flight_thread = fiber->linear;
    }
    std::memset(dst_shared, 0xff, size_and_align);  // poison until it lands (NaN in every float format)
    fiber->async_copies.push_back(AsyncCopy{static_cast<unsigned char*>(dst_shared),
                                            static_cast<const unsigned char*>(src_global), size_and_align, zfill,
                                            fiber->committed_batches, readable_source});
  }
}

void async_copy_commit() {
  if (Fiber* fiber = device_thread("__pipeline_commit")) {
    ++fiber->committed_batches;
  }
}

void async_copy_wait(size_t prior) {
  Fiber* fiber = device_thread("__pipeline_wait_prior");
  if (fiber == nullptr) {
    return;
  }
  const uint64_t pending_allowed = std::min<size_t>(prior, 8);  // the toolkit's header waits on at most 8
  if (fiber->committed_batches < pending_allowed) {
    return;
  }
  const uint64_t landing_below = fiber->committed_batches - pending_allowed;  // batches before it land
  auto& copies = fiber->async_copies;
  if (std::any_of(copies.begin(), copies.end(), [&](const AsyncCopy& copy) { return copy.batch < landing_below; })) {
    ++g.launches.back().async_landing_waits;
  }
  size_t kept = 0;
  for (AsyncCopy& copy : copies) {
    if (copy.batch >= landing_below) {
      copies[kept++] = copy;
      continue;
    }
    const auto dst = reinterpret_cast<uintptr_t>(copy.dst);
    for (size_t i = 0; i < copy.bytes; ++i) {
      g.shadow[dst + i - g.shared_begin].in_flight_block = 0;
    }
    shared_access(dst, copy.bytes, true);  // the landing is this thread's write
    const size_t fetched = copy.bytes - copy.zfill;
    if (copy.readable_source) {
      std::memcpy(copy.dst, copy.src, fetched);
      std::memset(copy.dst + fetched, 0, copy.zfill);
    }
  }
  copies.resize(kept);
}

void report_misuse(const char* what) { report("misuse", "%s", what); }

const int* fragment_placement(uint64_t key, int elements) {
  std::vector<int>& placement = g.fragment_placements[key];
  if (placement.empty()) {
    placement.resize(elements);
    for (int i = 0; i < elements; ++i) {
      placement[i] = i;
    }
    if (g.fragment_seed != 0) {
      std::mt19937_64 rng(g.fragment_seed ^ (key * 0x9e3779b97f4a7c15ull));
      std::shuffle(placement.begin(), placement.end(), rng);
    }
  }
  return placement.data();
}

void copy_unchecked(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }

// The launch helper passes its __PRETTY_FUNCTION__, "... [with auto Kernel = NAME; Args = ...]"; keep NAME
// without its namespaces.
std::string kernel_name(const char* pretty) {
  std::string name = pretty;
  const size_t start = name.find("Kernel = ");
  if (start != std::string::npos) {
    const size_t end = name.find("; Args", start);
    name = name.substr(start + 9, end == std::string::npos ? std::string::npos : end - start - 9);
  }
  const size_t template_start = name.find('<');
  const size_t scope = name.rfind("::", template_start);
  return scope == std::string::npos ? name : name.substr(scope + 2);
}

cudaError_t launch(const LaunchRequest& request) {
  const size_t threads = static_cast<size_t>(request.block.x) * request.block.y * request.block.z;
  g.launches.push_back(LaunchRecord{kernel_name(request.kernel), request.grid, request.block, request.dynamic_smem});
  g.request = &request;
  g.reports_this_launch = 0;
  if (!check_launch(request, threads)) {
    g.request = nullptr;
    return g.last_error = cudaErrorInvalidConfiguration;
  }
  if (g.shared_end == g.shared_begin) {
    report("misuse", "no shared memory bound: call simt_bind_module first");
    return g.last_error = cudaErrorInvalidValue;
  }
  while (g.fibers.size() < threads) {
    g.fibers.emplace_back();
    g.fibers.back().stack.resize(kFiberStackBytes);
  }
  g.warps.assign((threads + 31) / 32, Warp{});
  g.block_threads = threads;
  int64_t ran = 0;
  for (unsigned z = 0; z < request.grid.z; ++z) {
    for (unsigned y = 0; y < request.grid.y; ++y) {
      for (unsigned x = 0; x < request.grid.x; ++x) {
        if (g.blocks_to_run >= 0 && ran++ >= g.blocks_to_run) {
          break;
        }
        run_block(uint3{x, y, z});
      }
    }
  }
  g.request = nullptr;
  return cudaSuccess;
}

}  // namespace simt

using simt::g;

// ---- the CUDA runtime API the launchers call ----

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) {
    return cudaErrorInvalidDevice;
  }
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount:
      *value = g.profile->sm_count;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = g.profile->max_smem_optin;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = static_cast<int>(simt::kDefaultSmemLimit);
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    return g.last_error = cudaErrorInvalidValue;
  }
  if (value < 0 || value > g.profile->max_smem_optin) {
    return g.last_error = cudaErrorInvalidValue;
  }
  g.smem_optin[kernel] = value;
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t error = g.last_error;
  g.last_error = cudaSuccess;
  return error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    default:
      return "unknown error";
  }
}

// ---- control from the tests ----

// Selects the device profile (h100, h200, a100) and forgets earlier opt-ins, as a new process would.
int simt_set_device(const char* name) {
  for (const auto& profile : simt::kProfiles) {
    if (std::strcmp(profile.name, name) == 0) {
      g.profile = &profile;
      g.smem_optin.clear();
      return 0;
    }
  }
  return -1;
}

// Fiber order between barriers: 0 forward, 1 reverse, 2 shuffled with `seed`.
void simt_set_order(int order, uint64_t seed) {
  g.order = order;
  g.seed = seed;
  g.shuffle_rng.seed(seed);
}

// Placement of fragment elements across lanes: 0 identity, else a permutation per fragment type seeded by
// `seed` (mma.h).
void simt_set_fragment_seed(uint64_t seed) {
  g.fragment_seed = seed;
  g.fragment_placements.clear();
}

// The kernel module's thread-local segment becomes shared memory; `dynamic` lists its dynamic buffers.
int simt_bind_module(const void* address_in_module, void* const* dynamic, const size_t* capacity, int count) {
  struct Search {
    uintptr_t address;
    uintptr_t begin = 0, end = 0;
  } search{reinterpret_cast<uintptr_t>(address_in_module)};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) -> int {
        auto* s = static_cast<Search*>(data);
        bool contains = false;
        const ElfW(Phdr)* tls = nullptr;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const auto& ph = info->dlpi_phdr[i];
          const uintptr_t begin = info->dlpi_addr + ph.p_vaddr;
          if (ph.p_type == PT_LOAD && s->address >= begin && s->address < begin + ph.p_memsz) {
            contains = true;
          }
          if (ph.p_type == PT_TLS) {
            tls = &ph;
          }
        }
        if (!contains || tls == nullptr || info->dlpi_tls_data == nullptr) {
          return 0;
        }
        s->begin = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
        s->end = s->begin + tls->p_memsz;
        return 1;
      },
      &search);
  if (search.begin == 0) {
    return -1;
  }
  if (search.begin == g.shared_begin && search.end == g.shared_end) {
    return 0;  // bound already
  }
  g.shared_begin = search.begin;
  g.shared_end = search.end;
  g.shadow.assign(search.end - search.begin, simt::ShadowByte{});
  g.epoch_counter = 1;
  g.dynamic_buffers.clear();
  for (int i = 0; i < count; ++i) {
    g.dynamic_buffers.emplace_back(reinterpret_cast<uintptr_t>(dynamic[i]), capacity[i]);
  }
  return 0;
}

void simt_register_buffer(const void* data, size_t bytes, const char* name, int writable) {
  const auto begin = reinterpret_cast<uintptr_t>(data);
  g.regions.push_back(simt::Region{begin, begin + bytes, name, writable != 0});
}

// Forgets buffers, launches and reports.
void simt_reset() {
  g.regions.clear();
  g.launches.clear();
  g.reports.clear();
  g.reports_this_launch = 0;
  g.suppressed = 0;
  g.last_error = cudaSuccess;
}

int simt_report_count() { return static_cast<int>(g.reports.size()); }
int simt_suppressed_reports() { return g.suppressed; }

const char* simt_report(int index) { return g.reports.at(index).c_str(); }

int simt_launch_count() { return static_cast<int>(g.launches.size()); }

// kernel name, grid, block, dynamic shared bytes, global bytes read and written, shared warp requests, their
// wavefronts and the wavefronts they would take without bank conflicts (0 unless counted), WMMA fragment bytes
// to and from shared memory, bytes read by asynchronous copies and the waits that landed some.
const char* simt_launch(int index, uint64_t numbers[15]) {
  const auto& launch = g.launches.at(index);
  const uint64_t values[15] = {launch.grid.x, launch.grid.y, launch.grid.z, launch.block.x, launch.block.y,
                               launch.block.z, launch.dynamic_smem, launch.read_bytes, launch.written_bytes,
                               launch.shared_requests, launch.shared_wavefronts,
                               launch.shared_conflict_free_wavefronts, launch.fragment_shared_bytes,
                               launch.async_read_bytes, launch.async_landing_waits};
  std::copy(values, values + 15, numbers);
  return launch.kernel.c_str();
}

// Runs only the first `blocks` blocks of every later launch (-1: all). The launch is still checked and
// recorded, and its byte counts are those of the blocks that ran: with 1, one block's traffic, which is how
// tools/gpu reads a launch plan and a block's loads at full-size shapes in seconds. Outputs stay unwritten.
void simt_set_blocks_to_run(int64_t blocks) { g.blocks_to_run = blocks; }

// Counts the shared-memory wavefronts of later launches (see the top of this file); off by default, as it
// slows the emulator.
void simt_count_shared_wavefronts(int on) { g.count_wavefronts = on != 0; }

// Scratch copies of kernels with planted bugs switch them on at run time (one build for all of them).
static int planted_bug = 0;
void simt_set_planted_bug(int bug) { planted_bug = bug; }
int simt_planted_bug() { return planted_bug; }

// ---- the instrumentation hooks (gcc -fsanitize=kernel-address, outline calls) ----

// The access's code site: the hook's return address, in the kernel.
#define SIMT_ACCESS_SITE reinterpret_cast<uintptr_t>(__builtin_return_address(0))
#define SIMT_HOOKS(size)                                                                                      \
  void __asan_load##size##_noabort(const void* p) { simt::on_access(p, size, false, SIMT_ACCESS_SITE); }          \
  void __asan_store##size##_noabort(const void* p) { simt::on_access(p, size, true, SIMT_ACCESS_SITE); }          \
  void __asan_report_load##size##_noabort(const void* p) { simt::on_access(p, size, false, SIMT_ACCESS_SITE); }   \
  void __asan_report_store##size##_noabort(const void* p) { simt::on_access(p, size, true, SIMT_ACCESS_SITE); }
SIMT_HOOKS(1)
SIMT_HOOKS(2)
SIMT_HOOKS(4)
SIMT_HOOKS(8)
SIMT_HOOKS(16)
#undef SIMT_HOOKS
void __asan_loadN_noabort(const void* p, size_t n) { simt::on_access(p, n, false, SIMT_ACCESS_SITE); }
void __asan_storeN_noabort(const void* p, size_t n) { simt::on_access(p, n, true, SIMT_ACCESS_SITE); }
void __asan_report_load_n_noabort(const void* p, size_t n) { simt::on_access(p, n, false, SIMT_ACCESS_SITE); }
void __asan_report_store_n_noabort(const void* p, size_t n) { simt::on_access(p, n, true, SIMT_ACCESS_SITE); }
void __asan_handle_no_return() {}
#undef SIMT_ACCESS_SITE

}  // extern "C"
