// cpu_shm: a collective communication library (CCL) for TVM disco on the CPU.
//
// Workers of a disco ProcessSession (or ThreadedSession) exchange data through one POSIX
// shared-memory segment. The controller creates it in `init_ccl`, every worker maps it in
// `init_ccl_per_worker`, and the controller unlinks its name as soon as every worker has mapped
// it, so no segment outlives the processes using it, whatever happens to them later.
//
// Segment layout: a header (barriers, error slot, worker pids, per-worker collective descriptors,
// point-to-point inboxes) followed by, for each of the two kinds of team (all workers; the worker
// group of a session with num_groups > 1, for in_group collectives), two buffers of `num_workers`
// slots of `slot_bytes` each, then one inbox slot per worker. Every collective is cut into chunks
// of at most one slot per worker; each chunk uses its team kind's next buffer (alternating), so
// one barrier per chunk is enough: a buffer is written again only after the barrier of the chunk
// in between, which every member reaches only after it finished reading that buffer. The teams of
// one kind are disjoint (groups), so they share that kind's buffers, each worker using its own slot.
//
// Groups (pipeline parallelism: a session of num_workers = tp * pp workers in pp groups of tp):
// in_group collectives run among the workers of the caller's group (root: the group's first
// worker), the others among all workers; send_to_next_group / recv_from_prev_group and
// send_to_worker / recv_from_worker move a tensor between two workers through the receiver's
// inbox (one slot; a sender waits until it is empty, the receiver until it holds a chunk from the
// sender it expects), chunk by chunk.
//
// Failure handling: a barrier wait polls whether its peers are alive and gives up after
// LAB_CCL_TIMEOUT_S. The first worker that fails writes the reason into the header and wakes the
// others, which fail with the same reason. Collectives never throw after initialisation: an
// exception leaving a disco worker thread (worker 0 of a ProcessSession runs in the controller
// process) terminates the controller, and a worker process that exits makes the controller's
// next message fail with EPIPE. A failed worker skips this and every later collective instead,
// and the controller reads the error through `runtime.disco.cpu_shm.status` (runtime_patch.disco's
// sessions do at every sync and raise CCLError).
//
// Globals: runtime.disco.cpu_shm.{init_ccl, init_ccl_per_worker, allreduce, allgather,
// broadcast_from_worker0, scatter_from_worker0, gather_to_worker0, sync_worker,
// send_to_next_group, recv_from_prev_group, send_to_worker, recv_from_worker, recv_from_worker0}
// (called by disco), and, in the controller, runtime.disco.cpu_shm.{configure, status, worker_pids, release}.
#include <dlpack/dlpack.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/runtime/disco/builtin.h>
#include <tvm/runtime/disco/disco_worker.h>
#include <tvm/runtime/disco/session.h>
#include <tvm/runtime/tensor.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LAB_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define LAB_CPU_RELAX() asm volatile("yield")
#else
#define LAB_CPU_RELAX() ((void)0)
#endif

namespace tvm_lab {
namespace cpu_shm {

using tvm::runtime::DiscoWorker;
using tvm::runtime::DRef;
using tvm::runtime::ReduceKind;
using tvm::runtime::Session;
using tvm::runtime::Tensor;
namespace ffi = tvm::ffi;

constexpr const char* kName = "cpu_shm";
constexpr uint64_t kMagic = 0x316c63632d62616cULL;  // "lab-ccl1"
constexpr int kMaxWorkers = 64;
constexpr int64_t kDefaultSlotBytes = 4 << 20;
constexpr double kDefaultTimeoutS = 600.0;
constexpr int kSpinIterations = 2000;
constexpr long kFutexWaitNs = 20 * 1000 * 1000;
constexpr auto kPeerCheckInterval = std::chrono::milliseconds(100);

enum class Op : uint32_t {
  kAllReduce = 1,
  kAllGather = 2,
  kBroadcast = 3,
  kScatter = 4,
  kGather = 5,
};

const char* OpName(uint32_t op) {
  switch (static_cast<Op>(op & 0xff)) {
    case Op::kAllReduce:
      return "allreduce";
    case Op::kAllGather:
      return "allgather";
    case Op::kBroadcast:
      return "broadcast_from_worker0";
    case Op::kScatter:
      return "scatter_from_worker0";
    case Op::kGather:
      return "gather_to_worker0";
  }
  return "unknown";
}

// What a worker is about to do with a buffer; compared across workers after each barrier.
struct OpDesc {
  uint64_t seq;        // collectives issued by this worker so far
  uint32_t op;         // Op | (ReduceKind << 8)
  uint32_t dtype;      // code | bits << 8 | lanes << 16
  int64_t shard_bytes; // bytes each worker contributes / receives
};

// The workers a collective runs among: all of them, or the caller's group (in_group collectives
// of a session with num_groups > 1).
enum TeamKind { kAll = 0, kGroup = 1, kTeamKinds = 2 };

struct TeamBarrier {
  alignas(64) std::atomic<uint32_t> count;
  alignas(64) std::atomic<uint32_t> gen;
};

// A worker's inbox for point-to-point transfers: state 0 empty, 1 being written, 2 holding a chunk.
struct Inbox {
  alignas(64) std::atomic<uint32_t> state;
  int32_t sender;
  int64_t total_bytes;  // of the whole message (checked against the receiver's buffer)
  int64_t chunk_bytes;
};

struct SegmentHeader {
  uint64_t magic;
  int32_t num_workers;
  int32_t controller_pid;
  int64_t slot_bytes;
  int64_t header_bytes;
  int64_t total_bytes;
  double timeout_s;

  alignas(64) std::atomic<int32_t> abort_state;  // 0: healthy, 1: message being written, 2: failed
  char abort_message[2048];

  alignas(64) std::atomic<int32_t> pids[kMaxWorkers];
  std::atomic<int32_t> init_state[kMaxWorkers];  // 0: not yet, 1: ready, 2: failed
  // Per team kind (kAll, kGroup): barrier rounds per worker, descriptors per buffer and worker.
  std::atomic<uint64_t> barrier_rounds[kTeamKinds][kMaxWorkers];
  OpDesc desc[kTeamKinds][2][kMaxWorkers];
  TeamBarrier barriers[kMaxWorkers + 1];  // 0: all workers; 1 + g: group g
  Inbox inbox[kMaxWorkers];
};

static_assert(std::atomic<uint32_t>::is_always_lock_free, "shared-memory barrier needs lock-free atomics");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared-memory barrier needs lock-free atomics");

// ---------------------------------------------------------------------------------------------
// Small helpers

int64_t RoundUp(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

std::string Errno(const char* what) {
  std::ostringstream os;
  os << what << ": " << std::strerror(errno);
  return os.str();
}

// Set by the controller before init_ccl (runtime.disco.cpu_shm.configure: runtime_patch.disco.sessions
// passes LAB_CCL_SLOT_BYTES and LAB_CCL_TIMEOUT_S, read in runtime_patch.settings).
struct Config {
  int64_t slot_bytes = kDefaultSlotBytes;
  double timeout_s = kDefaultTimeoutS;
};
Config g_config;
std::mutex g_config_mutex;

void Configure(int64_t slot_bytes, double timeout_s) {
  if (slot_bytes <= 0) TVM_FFI_THROW(ValueError) << "LAB_CCL_SLOT_BYTES=" << slot_bytes << " is not a positive integer";
  if (!(timeout_s > 0))
    TVM_FFI_THROW(ValueError) << "LAB_CCL_TIMEOUT_S=" << timeout_s << " is not a positive number of seconds";
  std::lock_guard<std::mutex> lock(g_config_mutex);
  g_config = Config{slot_bytes, timeout_s};
}

long Futex(std::atomic<uint32_t>* addr, int op, uint32_t val, const timespec* timeout) {
  // Not FUTEX_PRIVATE_FLAG: waiters live in different processes.
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op, val, timeout, nullptr, 0);
}

void FutexWakeAll(std::atomic<uint32_t>* addr) { Futex(addr, FUTEX_WAKE, INT_MAX, nullptr); }

void FutexWait(std::atomic<uint32_t>* addr, uint32_t expected) {
  timespec ts{0, kFutexWaitNs};
  Futex(addr, FUTEX_WAIT, expected, &ts);
}

// A process counts as dead when it is gone or a zombie: a killed worker stays a zombie until
// its parent (the controller) reaps it, and kill(pid, 0) succeeds on zombies.
bool ProcessAlive(int pid) {
  if (pid <= 0) return true;
  if (kill(pid, 0) != 0 && errno == ESRCH) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  if (!stat.is_open()) return access("/proc/self/stat", R_OK) != 0;  // no procfs: trust kill()
  std::string line;
  std::getline(stat, line);
  size_t paren = line.rfind(')');
  if (paren == std::string::npos || paren + 2 >= line.size()) return true;
  char state = line[paren + 2];
  return state != 'Z' && state != 'X';
}

std::string DTypeString(DLDataType t) { return std::string(ffi::DLDataTypeToString(t)); }

uint32_t PackDType(DLDataType t) {
  return static_cast<uint32_t>(t.code) | (static_cast<uint32_t>(t.bits) << 8) |
         (static_cast<uint32_t>(t.lanes) << 16);
}

int64_t ElemBytes(DLDataType t) { return (static_cast<int64_t>(t.bits) * t.lanes + 7) / 8; }

int64_t NumElements(const Tensor& t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

char* DataPtr(const Tensor& t) { return static_cast<char*>(t->data) + t->byte_offset; }

void CheckHostTensor(const Tensor& t, const char* role) {
  if (!t.defined()) TVM_FFI_THROW(ValueError) << "cpu_shm: buffer `" << role << "` must not be None";
  if (t->device.device_type != kDLCPU && t->device.device_type != kDLCUDAHost) {
    TVM_FFI_THROW(ValueError) << "cpu_shm works on CPU tensors only, but `" << role
                              << "` is on device type " << static_cast<int>(t->device.device_type)
                              << "; use the nccl CCL for GPU tensors";
  }
  if (!ffi::IsContiguous(*t.operator->())) {
    TVM_FFI_THROW(ValueError) << "cpu_shm: buffer `" << role << "` must be contiguous";
  }
}

// ---------------------------------------------------------------------------------------------
// float16 / bfloat16 <-> float32 (round to nearest even), so every worker rounds identically.

float HalfToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int shift = 0;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      ++shift;
    }
    man &= 0x3ffu;
    bits = sign | (static_cast<uint32_t>(113 - shift) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or nan
    return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (abs < 0x38800000u) {  // result is subnormal or zero
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
    uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    int shift = 126 - static_cast<int>(abs >> 23);  // 14..24
    uint32_t result = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (result & 1u))) ++result;
    return static_cast<uint16_t>(sign | result);
  }
  uint32_t result = ((abs >> 13) - (112u << 10));
  uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (result & 1u))) ++result;  // may carry into the exponent
  return static_cast<uint16_t>(sign | result);
}

float BF16ToFloat(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint16_t FloatToBF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

// ---------------------------------------------------------------------------------------------
// Reductions. Every worker reduces the same chunks in worker order 0..n-1 with the same code,
// so the results are bit-identical on all workers.

template <typename T>
T Combine(T a, T b, ReduceKind kind) {
  if constexpr (std::is_integral_v<T>) {
    using U = std::make_unsigned_t<T>;
    switch (kind) {
      case ReduceKind::kSum:
      case ReduceKind::kAvg:
        return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));  // wraps, no UB
      case ReduceKind::kProd:
        return static_cast<T>(static_cast<U>(a) * static_cast<U>(b));
      case ReduceKind::kMin:
        return std::min(a, b);
      case ReduceKind::kMax:
        return std::max(a, b);
    }
  } else {
    switch (kind) {
      case ReduceKind::kSum:
      case ReduceKind::kAvg:
        return a + b;
      case ReduceKind::kProd:
        return a * b;
      case ReduceKind::kMin:
        return std::min(a, b);
      case ReduceKind::kMax:
        return std::max(a, b);
    }
  }
  return a;
}

template <typename T>
void ReduceNative(const std::vector<const char*>& src, char* dst_bytes, int64_t m, ReduceKind kind) {
  T* dst = reinterpret_cast<T*>(dst_bytes);
  const T* s0 = reinterpret_cast<const T*>(src[0]);
  std::copy(s0, s0 + m, dst);
  for (size_t j = 1; j < src.size(); ++j) {
    const T* s = reinterpret_cast<const T*>(src[j]);
    for (int64_t k = 0; k < m; ++k) dst[k] = Combine<T>(dst[k], s[k], kind);
  }
  if (kind == ReduceKind::kAvg) {
    T n = static_cast<T>(src.size());
    for (int64_t k = 0; k < m; ++k) dst[k] = dst[k] / n;
  }
}

template <float (*ToFloat)(uint16_t), uint16_t (*FromFloat)(float)>
void Reduce16(const std::vector<const char*>& src, char* dst_bytes, int64_t m, ReduceKind kind,
              std::vector<float>* acc) {
  acc->resize(std::max<int64_t>(m, 1));
  float* a = acc->data();
  const uint16_t* s0 = reinterpret_cast<const uint16_t*>(src[0]);
  for (int64_t k = 0; k < m; ++k) a[k] = ToFloat(s0[k]);
  for (size_t j = 1; j < src.size(); ++j) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src[j]);
    for (int64_t k = 0; k < m; ++k) a[k] = Combine<float>(a[k], ToFloat(s[k]), kind);
  }
  if (kind == ReduceKind::kAvg) {
    float n = static_cast<float>(src.size());
    for (int64_t k = 0; k < m; ++k) a[k] = a[k] / n;
  }
  uint16_t* dst = reinterpret_cast<uint16_t*>(dst_bytes);
  for (int64_t k = 0; k < m; ++k) dst[k] = FromFloat(a[k]);
}

void Reduce(DLDataType t, const std::vector<const char*>& src, char* dst, int64_t m,
            ReduceKind kind, std::vector<float>* acc) {
  if (t.lanes == 1) {
    if (t.code == kDLFloat && t.bits == 32) return ReduceNative<float>(src, dst, m, kind);
    if (t.code == kDLFloat && t.bits == 64) return ReduceNative<double>(src, dst, m, kind);
    if (t.code == kDLFloat && t.bits == 16) {
      return Reduce16<HalfToFloat, FloatToHalf>(src, dst, m, kind, acc);
    }
    if (t.code == kDLBfloat && t.bits == 16) {
      return Reduce16<BF16ToFloat, FloatToBF16>(src, dst, m, kind, acc);
    }
    if (t.code == kDLInt && t.bits == 32) return ReduceNative<int32_t>(src, dst, m, kind);
    if (t.code == kDLInt && t.bits == 64) return ReduceNative<int64_t>(src, dst, m, kind);
    if (t.code == kDLInt && t.bits == 8) return ReduceNative<int8_t>(src, dst, m, kind);
    if (t.code == kDLUInt && t.bits == 8) return ReduceNative<uint8_t>(src, dst, m, kind);
    if (t.code == kDLUInt && t.bits == 32) return ReduceNative<uint32_t>(src, dst, m, kind);
    if (t.code == kDLUInt && t.bits == 64) return ReduceNative<uint64_t>(src, dst, m, kind);
  }
  TVM_FFI_THROW(ValueError) << "cpu_shm allreduce does not support dtype " << DTypeString(t)
                            << " (supported: float16, bfloat16, float32, float64, int8, uint8, "
                               "int32, uint32, int64, uint64)";
}

bool ReducibleDType(DLDataType t) {
  if (t.lanes != 1) return false;
  if (t.code == kDLFloat) return t.bits == 16 || t.bits == 32 || t.bits == 64;
  if (t.code == kDLBfloat) return t.bits == 16;
  if (t.code == kDLInt || t.code == kDLUInt) return t.bits == 8 || t.bits == 32 || t.bits == 64;
  return false;
}

// ---------------------------------------------------------------------------------------------
// Per-worker state

// Thrown inside a collective once the failure is recorded in the header; never leaves this file.
struct Aborted {};

// The workers of one collective: [base, base + size), this worker being `index` among them.
struct Team {
  TeamKind kind;
  int barrier;  // index into SegmentHeader::barriers
  int base;
  int size;
  int index;
  bool Root() const { return index == 0; }
};

struct WorkerContext {
  DiscoWorker* worker = nullptr;
  SegmentHeader* hdr = nullptr;
  size_t mapped_bytes = 0;
  char* slots = nullptr;
  int rank = 0;
  int n = 0;
  int group_size = 0;  // n / num_groups
  bool in_controller = false;
  uint64_t phase[kTeamKinds] = {0, 0};  // chunks done per team kind: the next uses buffer phase & 1
  uint64_t seq[kTeamKinds] = {0, 0};    // collectives done per team kind
  std::string failure; // non-empty once a collective failed: later ones are skipped
  std::vector<float> acc;

  ~WorkerContext() { Release(); }

  void Release() {
    if (hdr != nullptr) munmap(hdr, mapped_bytes);
    hdr = nullptr;
    slots = nullptr;
    mapped_bytes = 0;
    for (int k = 0; k < kTeamKinds; ++k) phase[k] = seq[k] = 0;
    failure.clear();
  }

  // in_group collectives of a session with groups run in this worker's group, all others among all.
  Team TeamOf(bool in_group) const {
    if (in_group && group_size < n) {
      int g = rank / group_size;
      return Team{kGroup, 1 + g, g * group_size, group_size, rank - g * group_size};
    }
    return Team{kAll, 0, 0, n, rank};
  }

  char* Slot(const Team& team, int buf, int worker_id) const {
    return slots + ((static_cast<int64_t>(team.kind) * 2 + buf) * n + worker_id) * hdr->slot_bytes;
  }

  char* InboxSlot(int worker_id) const {
    return slots + (static_cast<int64_t>(kTeamKinds) * 2 * n + worker_id) * hdr->slot_bytes;
  }

  static WorkerContext* Get() {
    thread_local WorkerContext ctx;
    return &ctx;
  }
};

// The error recorded in the header, waiting briefly for a writer that is mid-way.
std::string ReadAbortMessage(SegmentHeader* hdr) {
  for (int i = 0; i < 100000; ++i) {
    if (hdr->abort_state.load(std::memory_order_acquire) == 2) {
      return std::string(hdr->abort_message, strnlen(hdr->abort_message, sizeof(hdr->abort_message)));
    }
    LAB_CPU_RELAX();
  }
  return "cpu_shm: a worker failed while recording its error";
}

// Record `msg` as the group's failure (the first one recorded wins) and wake every waiter.
std::string RecordFailure(SegmentHeader* hdr, const std::string& msg) {
  if (hdr == nullptr) return msg;
  int32_t expected = 0;
  if (hdr->abort_state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
    size_t len = std::min(msg.size(), sizeof(hdr->abort_message) - 1);
    std::memcpy(hdr->abort_message, msg.data(), len);
    hdr->abort_message[len] = '\0';
    hdr->abort_state.store(2, std::memory_order_release);
  }
  for (int b = 0; b <= std::min(hdr->num_workers, kMaxWorkers); ++b) FutexWakeAll(&hdr->barriers[b].gen);
  for (int j = 0; j < std::min(hdr->num_workers, kMaxWorkers); ++j) FutexWakeAll(&hdr->inbox[j].state);
  return ReadAbortMessage(hdr);
}

[[noreturn]] void Fail(WorkerContext* ctx, const std::string& msg) {
  ctx->failure = RecordFailure(ctx->hdr, msg);
  throw Aborted();
}

void CheckPeers(WorkerContext* ctx, const char* what) {
  int self = getpid();
  for (int j = 0; j < ctx->n; ++j) {
    int pid = ctx->hdr->pids[j].load(std::memory_order_relaxed);
    if (j == ctx->rank || pid == self) continue;
    if (!ProcessAlive(pid)) {
      std::ostringstream os;
      os << "cpu_shm: disco worker " << j << " (pid " << pid << ") died (killed or crashed) while worker "
         << ctx->rank << " waited for it in " << what
         << "; the collective group is broken, shut this session down and start a new one";
      Fail(ctx, os.str());
    }
  }
}

// Wait until `ready()` holds, sleeping on `word` (which changes when it may have): fails the
// group when a peer died, another worker failed, or LAB_CCL_TIMEOUT_S passed (`waiting_for`
// completes the timeout's message).
template <typename Ready, typename Describe>
void WaitUntil(WorkerContext* ctx, std::atomic<uint32_t>* word, Ready ready, const char* what,
               Describe waiting_for) {
  SegmentHeader* hdr = ctx->hdr;
  for (int i = 0; i < kSpinIterations; ++i) {
    if (ready()) return;
    LAB_CPU_RELAX();
  }
  auto start = std::chrono::steady_clock::now();
  auto last_check = start;
  auto timeout = std::chrono::duration<double>(hdr->timeout_s);
  while (true) {
    uint32_t seen = word->load(std::memory_order_acquire);
    if (ready()) return;
    if (hdr->abort_state.load(std::memory_order_acquire) != 0) Fail(ctx, "");
    FutexWait(word, seen);
    if (ready()) return;
    auto now = std::chrono::steady_clock::now();
    if (now - last_check >= kPeerCheckInterval) {
      last_check = now;
      CheckPeers(ctx, what);
    }
    if (now - start > timeout) {
      std::ostringstream os;
      os << "cpu_shm: worker " << ctx->rank << " timed out after " << hdr->timeout_s << " s in " << what
         << " waiting for " << waiting_for()
         << " (raise LAB_CCL_TIMEOUT_S if they are legitimately busy)";
      Fail(ctx, os.str());
    }
  }
}

void Barrier(WorkerContext* ctx, const Team& team, const char* what) {
  SegmentHeader* hdr = ctx->hdr;
  TeamBarrier& b = hdr->barriers[team.barrier];
  uint32_t gen = b.gen.load(std::memory_order_acquire);
  uint64_t round = hdr->barrier_rounds[team.kind][ctx->rank].fetch_add(1, std::memory_order_relaxed) + 1;
  if (b.count.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<uint32_t>(team.size)) {
    b.count.store(0, std::memory_order_relaxed);
    b.gen.store(gen + 1, std::memory_order_release);
    FutexWakeAll(&b.gen);
    return;
  }
  WaitUntil(ctx, &b.gen, [&] { return b.gen.load(std::memory_order_acquire) != gen; }, what, [&] {
    std::ostringstream os;
    os << "worker(s)";
    for (int j = team.base; j < team.base + team.size; ++j) {
      if (hdr->barrier_rounds[team.kind][j].load(std::memory_order_relaxed) < round) os << " " << j;
    }
    return os.str();
  });
}

// One chunk's worth of synchronisation: announce what this worker does with the buffer, wait
// for every member of the team, and check that they all called the same collective on the same sizes.
int BeginChunk(WorkerContext* ctx, const Team& team, uint32_t op, DLDataType dtype, int64_t shard_bytes) {
  int buf = static_cast<int>(ctx->phase[team.kind] & 1);
  ctx->hdr->desc[team.kind][buf][ctx->rank] = OpDesc{ctx->seq[team.kind], op, PackDType(dtype), shard_bytes};
  return buf;
}

void EndChunk(WorkerContext* ctx, const Team& team, int buf, const char* what) {
  Barrier(ctx, team, what);
  ++ctx->phase[team.kind];
  const OpDesc& mine = ctx->hdr->desc[team.kind][buf][ctx->rank];
  for (int j = team.base; j < team.base + team.size; ++j) {
    const OpDesc& other = ctx->hdr->desc[team.kind][buf][j];
    if (other.seq != mine.seq || other.op != mine.op || other.dtype != mine.dtype ||
        other.shard_bytes != mine.shard_bytes) {
      std::ostringstream os;
      os << "cpu_shm: workers disagree on a collective: worker " << ctx->rank << " called its collective #"
         << mine.seq << " " << OpName(mine.op) << " on " << mine.shard_bytes << " bytes per worker, worker "
         << j << " called its collective #" << other.seq << " " << OpName(other.op) << " on "
         << other.shard_bytes << " bytes per worker (every worker must call the same collectives in the "
         << "same order, with the same dtype and sizes)";
      Fail(ctx, os.str());
    }
  }
}

// What a collective that did not complete leaves in a buffer it should have written: `src`'s
// bytes [src_off, src_off + src_len) (this worker's own data) repeated to fill `dst` when the sizes
// allow, zeros otherwise. The model running on a failed worker goes on computing with these (the
// controller learns of the failure at its next sync), and reads them as it reads real results:
// worker 0 gathers embedding rows at the token ids that broadcast_from_worker0 delivers, so an
// uninitialised buffer there is an out-of-bounds read that kills the controller. Never throws, and
// writes nothing into a buffer it cannot vouch for.
int64_t WritableBytes(const Tensor& t) {
  if (!t.defined() || t->data == nullptr) return -1;
  if (t->device.device_type != kDLCPU && t->device.device_type != kDLCUDAHost) return -1;
  if (!ffi::IsContiguous(*t.operator->())) return -1;
  return NumElements(t) * ElemBytes(t->dtype);
}

void FillUnreceived(const Tensor& dst, const Tensor& src = Tensor(nullptr), int64_t src_off = 0,
                    int64_t src_len = -1) noexcept {
  try {
    int64_t dst_bytes = WritableBytes(dst);
    if (dst_bytes <= 0) return;
    char* out = DataPtr(dst);
    int64_t src_bytes = WritableBytes(src);
    if (src_len < 0) src_len = src_bytes - src_off;
    if (src_bytes > 0 && src_off >= 0 && src_len > 0 && src_off + src_len <= src_bytes &&
        dst_bytes % src_len == 0) {
      const char* in = DataPtr(src) + src_off;
      if (in == out && src_len == dst_bytes) return;  // in place: already this worker's own data
      std::vector<char> copy(in, in + src_len);        // `dst` may overlap `src`
      for (int64_t off = 0; off < dst_bytes; off += src_len) std::memcpy(out + off, copy.data(), src_len);
      return;
    }
    std::memset(out, 0, dst_bytes);
  } catch (...) {
  }
}

// Runs one collective on this worker. A failure (this worker's, or another's recorded in the
// header) disables this and every later collective of the worker; it is reported to the
// controller by `runtime.disco.cpu_shm.status` and, once per process, on stderr. A collective
// that fails or is skipped runs `unreceived` instead, which fills the buffers it would have
// written (FillUnreceived).
template <typename F, typename G>
void RunCollective(const char* what, F body, G unreceived) {
  WorkerContext* ctx = WorkerContext::Get();
  if (ctx->hdr == nullptr) {
    // Only reachable if disco calls a CCL function on a worker that never initialised it; this
    // worker is then not a thread of the controller (those are initialised before use).
    TVM_FFI_THROW(RuntimeError) << "cpu_shm: " << what << " called on a worker where cpu_shm is not initialised";
  }
  if (!ctx->failure.empty()) {
    unreceived(ctx);
    return;
  }
  try {
    if (ctx->hdr->abort_state.load(std::memory_order_acquire) != 0) Fail(ctx, "");
    body(ctx);  // counts itself in ctx->seq of its team kind where it is a collective
    return;
  } catch (const Aborted&) {
    // ctx->failure holds the group's failure
  } catch (const std::exception& e) {
    ctx->failure = RecordFailure(ctx->hdr, std::string("cpu_shm ") + what + " on worker " +
                                               std::to_string(ctx->rank) + ": " + e.what());
  }
  unreceived(ctx);
  if (ctx->rank == 0 || !ctx->in_controller) {
    std::fprintf(stderr, "[cpu_shm] worker %d: collectives disabled: %s\n", ctx->rank, ctx->failure.c_str());
  }
}

// ---------------------------------------------------------------------------------------------
// Collectives

void AllReduce(Tensor send, int kind_code, bool in_group, Tensor recv) {
  RunCollective("allreduce", [&](WorkerContext* ctx) {
    CheckHostTensor(send, "send");
    CheckHostTensor(recv, "recv");
    if (kind_code < 0 || kind_code > 4) TVM_FFI_THROW(ValueError) << "unknown ReduceKind " << kind_code;
    ReduceKind kind = static_cast<ReduceKind>(kind_code);
    DLDataType dtype = send->dtype;
    if (!ReducibleDType(dtype)) {
      TVM_FFI_THROW(ValueError) << "cpu_shm allreduce does not support dtype " << DTypeString(dtype);
    }
    if (recv->dtype != dtype || NumElements(recv) != NumElements(send)) {
      TVM_FFI_THROW(ValueError) << "allreduce needs `recv` of the same dtype and size as `send`";
    }
    Team team = ctx->TeamOf(in_group);
    int64_t esize = ElemBytes(dtype);
    int64_t numel = NumElements(send);
    int64_t chunk = ctx->hdr->slot_bytes / esize;
    const char* src = DataPtr(send);
    char* dst = DataPtr(recv);
    std::vector<const char*> slots(team.size);
    uint32_t op = static_cast<uint32_t>(Op::kAllReduce) | (static_cast<uint32_t>(kind_code) << 8);
    int64_t off = 0;
    do {
      int64_t m = std::min(chunk, numel - off);
      int buf = BeginChunk(ctx, team, op, dtype, numel * esize);
      std::memcpy(ctx->Slot(team, buf, ctx->rank), src + off * esize, m * esize);
      EndChunk(ctx, team, buf, "allreduce");
      for (int j = 0; j < team.size; ++j) slots[j] = ctx->Slot(team, buf, team.base + j);
      Reduce(dtype, slots, dst + off * esize, m, kind, &ctx->acc);
      off += m;
    } while (off < numel);
    ++ctx->seq[team.kind];
  }, [&](WorkerContext*) { FillUnreceived(recv, send); });
}

void AllGather(Tensor send, bool in_group, Tensor recv) {
  RunCollective("allgather", [&](WorkerContext* ctx) {
    CheckHostTensor(send, "send");
    CheckHostTensor(recv, "recv");
    Team team = ctx->TeamOf(in_group);
    int64_t bytes = NumElements(send) * ElemBytes(send->dtype);
    if (recv->dtype != send->dtype || NumElements(recv) != NumElements(send) * team.size) {
      TVM_FFI_THROW(ValueError) << "allgather needs `recv` of the same dtype as `send` and " << team.size
                                << " (the workers taking part) times its size";
    }
    const char* src = DataPtr(send);
    char* dst = DataPtr(recv);
    int64_t off = 0;
    do {
      int64_t len = std::min(ctx->hdr->slot_bytes, bytes - off);
      int buf = BeginChunk(ctx, team, static_cast<uint32_t>(Op::kAllGather), send->dtype, bytes);
      std::memcpy(ctx->Slot(team, buf, ctx->rank), src + off, len);
      EndChunk(ctx, team, buf, "allgather");
      for (int j = 0; j < team.size; ++j) std::memcpy(dst + j * bytes + off, ctx->Slot(team, buf, team.base + j), len);
      off += len;
    } while (off < bytes);
    ++ctx->seq[team.kind];
  }, [&](WorkerContext*) { FillUnreceived(recv, send); });
}

Tensor ValueOrNull(const ffi::Optional<Tensor>& t) { return t.has_value() ? t.value() : Tensor(nullptr); }

bool IsTeamRoot(const WorkerContext* ctx, bool in_group) { return ctx->TeamOf(in_group).Root(); }

void BroadcastFromWorker0(ffi::Optional<Tensor> send_opt, bool in_group, Tensor recv) {
  RunCollective("broadcast_from_worker0", [&](WorkerContext* ctx) {
    CheckHostTensor(recv, "recv");
    Team team = ctx->TeamOf(in_group);
    bool root = team.Root();
    int64_t bytes = NumElements(recv) * ElemBytes(recv->dtype);
    Tensor send = ValueOrNull(send_opt);
    if (root) {
      CheckHostTensor(send, "send");
      if (NumElements(send) * ElemBytes(send->dtype) != bytes) {
        TVM_FFI_THROW(ValueError) << "broadcast needs `send` and `recv` of the same size on worker 0";
      }
    }
    // The root stages into the team's whole buffer (its members' slots are contiguous).
    int64_t capacity = ctx->hdr->slot_bytes * team.size;
    int64_t off = 0;
    do {
      int64_t len = std::min(capacity, bytes - off);
      int buf = BeginChunk(ctx, team, static_cast<uint32_t>(Op::kBroadcast), recv->dtype, bytes);
      if (root) std::memcpy(ctx->Slot(team, buf, team.base), DataPtr(send) + off, len);
      EndChunk(ctx, team, buf, "broadcast_from_worker0");
      if (root) {
        if (DataPtr(recv) != DataPtr(send)) std::memmove(DataPtr(recv) + off, DataPtr(send) + off, len);
      } else {
        std::memcpy(DataPtr(recv) + off, ctx->Slot(team, buf, team.base), len);
      }
      off += len;
    } while (off < bytes);
    ++ctx->seq[team.kind];
  }, [&](WorkerContext* ctx) {  // zeros off the root
    FillUnreceived(recv, IsTeamRoot(ctx, in_group) ? ValueOrNull(send_opt) : Tensor(nullptr));
  });
}

void ScatterFromWorker0(ffi::Optional<Tensor> send_opt, bool in_group, Tensor recv) {
  RunCollective("scatter_from_worker0", [&](WorkerContext* ctx) {
    CheckHostTensor(recv, "recv");
    Team team = ctx->TeamOf(in_group);
    bool root = team.Root();
    int64_t shard = NumElements(recv) * ElemBytes(recv->dtype);
    Tensor send = ValueOrNull(send_opt);
    if (root) {
      CheckHostTensor(send, "send");
      if (send->dtype != recv->dtype || NumElements(send) != NumElements(recv) * team.size) {
        TVM_FFI_THROW(ValueError) << "scatter needs `send` on worker 0 of the dtype of `recv` and " << team.size
                                  << " (the workers taking part) times its size";
      }
    }
    int64_t off = 0;
    do {
      int64_t len = std::min(ctx->hdr->slot_bytes, shard - off);
      int buf = BeginChunk(ctx, team, static_cast<uint32_t>(Op::kScatter), recv->dtype, shard);
      if (root) {
        for (int j = 0; j < team.size; ++j) {
          std::memcpy(ctx->Slot(team, buf, team.base + j), DataPtr(send) + j * shard + off, len);
        }
      }
      EndChunk(ctx, team, buf, "scatter_from_worker0");
      std::memcpy(DataPtr(recv) + off, ctx->Slot(team, buf, ctx->rank), len);
      off += len;
    } while (off < shard);
    ++ctx->seq[team.kind];
  }, [&](WorkerContext* ctx) {  // the root keeps its own shard (the first)
    FillUnreceived(recv, IsTeamRoot(ctx, in_group) ? ValueOrNull(send_opt) : Tensor(nullptr), 0, WritableBytes(recv));
  });
}

void GatherToWorker0(Tensor send, bool in_group, ffi::Optional<Tensor> recv_opt) {
  RunCollective("gather_to_worker0", [&](WorkerContext* ctx) {
    CheckHostTensor(send, "send");
    Team team = ctx->TeamOf(in_group);
    bool root = team.Root();
    int64_t shard = NumElements(send) * ElemBytes(send->dtype);
    Tensor recv = ValueOrNull(recv_opt);
    if (root) {
      CheckHostTensor(recv, "recv");
      if (send->dtype != recv->dtype || NumElements(recv) != NumElements(send) * team.size) {
        TVM_FFI_THROW(ValueError) << "gather needs `recv` on worker 0 of the dtype of `send` and " << team.size
                                  << " (the workers taking part) times its size";
      }
    }
    int64_t off = 0;
    do {
      int64_t len = std::min(ctx->hdr->slot_bytes, shard - off);
      int buf = BeginChunk(ctx, team, static_cast<uint32_t>(Op::kGather), send->dtype, shard);
      std::memcpy(ctx->Slot(team, buf, ctx->rank), DataPtr(send) + off, len);
      EndChunk(ctx, team, buf, "gather_to_worker0");
      if (root) {
        for (int j = 0; j < team.size; ++j) {
          std::memcpy(DataPtr(recv) + j * shard + off, ctx->Slot(team, buf, team.base + j), len);
        }
      }
      off += len;
    } while (off < shard);
    ++ctx->seq[team.kind];
  }, [&](WorkerContext* ctx) {
    if (IsTeamRoot(ctx, in_group)) FillUnreceived(ValueOrNull(recv_opt), send);
  });
}

// ---------------------------------------------------------------------------------------------
// Point to point: through the receiver's inbox, one chunk (at most a slot) at a time.

void CheckPeer(const WorkerContext* ctx, int peer, const char* what) {
  if (peer < 0 || peer >= ctx->n) {
    TVM_FFI_THROW(ValueError) << "cpu_shm " << what << ": worker " << ctx->rank << " has no peer " << peer
                              << " (the session has " << ctx->n << " workers in groups of " << ctx->group_size << ")";
  }
  if (peer == ctx->rank) TVM_FFI_THROW(ValueError) << "cpu_shm " << what << ": a worker cannot send to itself";
}

void SendTo(Tensor buffer, int receiver, const char* what) {
  RunCollective(what, [&](WorkerContext* ctx) {
    CheckHostTensor(buffer, "buffer");
    CheckPeer(ctx, receiver, what);
    Inbox& box = ctx->hdr->inbox[receiver];
    int64_t bytes = NumElements(buffer) * ElemBytes(buffer->dtype);
    int64_t off = 0;
    do {
      int64_t len = std::min(ctx->hdr->slot_bytes, bytes - off);
      WaitUntil(ctx, &box.state, [&] {
        uint32_t empty = 0;
        return box.state.compare_exchange_strong(empty, 1, std::memory_order_acq_rel);
      }, what, [&] { return "worker " + std::to_string(receiver) + " to empty its inbox"; });
      std::memcpy(ctx->InboxSlot(receiver), DataPtr(buffer) + off, len);
      box.sender = ctx->rank;
      box.total_bytes = bytes;
      box.chunk_bytes = len;
      box.state.store(2, std::memory_order_release);
      FutexWakeAll(&box.state);
      off += len;
    } while (off < bytes);
  }, [&](WorkerContext*) {});
}

void RecvFrom(Tensor buffer, int sender, const char* what) {
  RunCollective(what, [&](WorkerContext* ctx) {
    CheckHostTensor(buffer, "buffer");
    CheckPeer(ctx, sender, what);
    Inbox& box = ctx->hdr->inbox[ctx->rank];
    int64_t bytes = NumElements(buffer) * ElemBytes(buffer->dtype);
    int64_t off = 0;
    do {
      WaitUntil(ctx, &box.state, [&] {
        return box.state.load(std::memory_order_acquire) == 2 && box.sender == sender;
      }, what, [&] { return "worker " + std::to_string(sender) + " to send"; });
      int64_t len = std::min(ctx->hdr->slot_bytes, bytes - off);
      if (box.total_bytes != bytes || box.chunk_bytes != len) {
        std::ostringstream os;
        os << "cpu_shm " << what << ": worker " << sender << " sent " << box.total_bytes << " bytes, worker "
           << ctx->rank << " expected " << bytes << " (sender and receiver must agree on the tensor's size)";
        Fail(ctx, os.str());
      }
      std::memcpy(DataPtr(buffer) + off, ctx->InboxSlot(ctx->rank), len);
      box.state.store(0, std::memory_order_release);
      FutexWakeAll(&box.state);
      off += len;
    } while (off < bytes);
  }, [&](WorkerContext*) { FillUnreceived(buffer); });
}

int GroupSize() {
  const WorkerContext* ctx = WorkerContext::Get();
  return ctx->group_size > 0 ? ctx->group_size : 1;
}

void SendToNextGroup(Tensor buffer) {
  const WorkerContext* ctx = WorkerContext::Get();
  SendTo(buffer, ctx->rank + GroupSize(), "send_to_next_group");
}

void RecvFromPrevGroup(Tensor buffer) {
  const WorkerContext* ctx = WorkerContext::Get();
  RecvFrom(buffer, ctx->rank - GroupSize(), "recv_from_prev_group");
}



// ---------------------------------------------------------------------------------------------
// Initialisation

// Segments this process created and is handing to its workers, with the errors of workers that
// run inside this process and could not map them (they must not throw, see the top of the file).
std::mutex g_pending_mutex;
std::unordered_map<std::string, std::string> g_pending_segments;

bool RecordPendingError(const std::string& name, const std::string& msg) {
  std::lock_guard<std::mutex> lock(g_pending_mutex);
  auto it = g_pending_segments.find(name);
  if (it == g_pending_segments.end()) return false;
  if (it->second.empty()) it->second = msg;
  return true;
}

void InitCCLPerWorker(ffi::Shape device_ids, ffi::String name) {
  DiscoWorker* worker = DiscoWorker::ThreadLocal();
  WorkerContext* ctx = WorkerContext::Get();
  ctx->Release();
  // Never throws (see the top of the file): the controller finds this worker not initialised.
  auto map_error = [&](const std::string& what) {
    std::string msg = "cpu_shm: worker " + std::to_string(worker->worker_id) + " cannot map " +
                      std::string(name) + ": " + what;
    if (!RecordPendingError(name, msg)) std::fprintf(stderr, "[cpu_shm] %s\n", msg.c_str());
  };
  int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) return map_error(Errno("shm_open"));
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(sizeof(SegmentHeader))) {
    close(fd);
    return map_error("segment too small");
  }
  void* p = mmap(nullptr, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return map_error(Errno("mmap"));
  ctx->hdr = static_cast<SegmentHeader*>(p);
  ctx->mapped_bytes = st.st_size;
  SegmentHeader* hdr = ctx->hdr;
  ctx->worker = worker;
  ctx->rank = worker->worker_id;
  ctx->n = worker->num_workers;
  ctx->group_size = worker->num_groups > 0 ? worker->num_workers / worker->num_groups : worker->num_workers;
  ctx->in_controller = getpid() == hdr->controller_pid;
  ctx->slots = reinterpret_cast<char*>(p) + hdr->header_bytes;
  std::string error;
  if (hdr->magic != kMagic || hdr->total_bytes != static_cast<int64_t>(st.st_size)) {
    error = "the segment is not a cpu_shm segment of this plugin version";
  } else if (worker->num_groups < 1 || worker->num_workers % worker->num_groups != 0) {
    error = "num_groups=" + std::to_string(worker->num_groups) + " does not divide the " +
            std::to_string(worker->num_workers) + " workers";
  } else if (hdr->num_workers != worker->num_workers || ctx->rank < 0 || ctx->rank >= ctx->n) {
    error = "worker " + std::to_string(ctx->rank) + " of " + std::to_string(worker->num_workers) +
            " does not fit a segment made for " + std::to_string(hdr->num_workers) + " workers";
  }
  if (!error.empty()) {
    RecordFailure(hdr, "cpu_shm init on worker " + std::to_string(ctx->rank) + ": " + error);
    if (ctx->rank >= 0 && ctx->rank < kMaxWorkers) hdr->init_state[ctx->rank].store(2);
    ctx->Release();
    return;
  }
  hdr->pids[ctx->rank].store(getpid(), std::memory_order_relaxed);
  worker->ccl = kName;
  hdr->init_state[ctx->rank].store(1, std::memory_order_release);
}

// What the controller keeps of a session's segment: the header, to read errors and pids.
struct ControllerView {
  SegmentHeader* hdr = nullptr;
  size_t bytes = 0;
  ~ControllerView() {
    if (hdr != nullptr) munmap(hdr, bytes);
  }
};

std::mutex g_sessions_mutex;
std::unordered_map<const ffi::Object*, std::shared_ptr<ControllerView>> g_sessions;

std::shared_ptr<ControllerView> FindSession(const Session& sess) {
  std::lock_guard<std::mutex> lock(g_sessions_mutex);
  auto it = g_sessions.find(sess.get());
  if (it == g_sessions.end()) {
    TVM_FFI_THROW(ValueError) << "cpu_shm was not initialised on this session (call init_ccl first)";
  }
  return it->second;
}

std::string UniqueSegmentName() {
  static std::atomic<uint64_t> counter{0};
  std::random_device rd;
  std::ostringstream os;
  os << "/tvm_lab_ccl." << getpid() << "." << counter.fetch_add(1) << "." << std::hex << rd();
  return os.str();
}

void InitCCL(Session sess, ffi::Shape device_ids) {
  int n = static_cast<int>(sess->GetNumWorkers());
  if (n < 1 || n > kMaxWorkers) {
    TVM_FFI_THROW(ValueError) << "cpu_shm supports 1.." << kMaxWorkers << " workers, got " << n;
  }
  if (device_ids.size() != 0 && static_cast<int>(device_ids.size()) != n) {
    TVM_FFI_THROW(ValueError) << "cpu_shm: got " << device_ids.size() << " device ids for " << n
                              << " workers (pass one per worker, or none)";
  }
  Config config;
  {
    std::lock_guard<std::mutex> lock(g_config_mutex);
    config = g_config;
  }
  int64_t slot_bytes = RoundUp(config.slot_bytes, 64);
  double timeout_s = config.timeout_s;
  int64_t page = sysconf(_SC_PAGESIZE);
  int64_t header_bytes = RoundUp(sizeof(SegmentHeader), page);
  // two buffers per team kind, and one inbox slot per worker
  int64_t total = header_bytes + (2 * kTeamKinds + 1) * static_cast<int64_t>(n) * slot_bytes;

  std::string name = UniqueSegmentName();
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) TVM_FFI_THROW(RuntimeError) << "cpu_shm: " << Errno(("shm_open " + name).c_str());
  // Unlinks the name however this function ends; the mappings stay valid.
  struct Unlink {
    std::string name;
    ~Unlink() {
      shm_unlink(name.c_str());
      std::lock_guard<std::mutex> lock(g_pending_mutex);
      g_pending_segments.erase(name);
    }
  } unlink_guard{name};
  if (ftruncate(fd, total) != 0) {
    int err = errno;
    close(fd);
    errno = err;
    TVM_FFI_THROW(RuntimeError) << "cpu_shm: " << Errno("ftruncate") << " (" << total
                                << " bytes; is /dev/shm large enough? lower LAB_CCL_SLOT_BYTES)";
  }
  void* p = mmap(nullptr, header_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) TVM_FFI_THROW(RuntimeError) << "cpu_shm: " << Errno("mmap");
  auto view = std::make_shared<ControllerView>();
  view->hdr = new (p) SegmentHeader();
  view->bytes = header_bytes;
  SegmentHeader* hdr = view->hdr;
  hdr->magic = kMagic;
  hdr->num_workers = n;
  hdr->controller_pid = getpid();
  hdr->slot_bytes = slot_bytes;
  hdr->header_bytes = header_bytes;
  hdr->total_bytes = total;
  hdr->timeout_s = timeout_s;
  {
    std::lock_guard<std::mutex> lock(g_pending_mutex);
    g_pending_segments[name] = "";
  }
  std::atomic_thread_fence(std::memory_order_seq_cst);

  try {
    {
      // Dropped before the syncs: a DRef's destructor messages every worker, and it must not
      // run while an exception unwinds because a worker's pipe broke.
      DRef func = sess->GetGlobalFunc("runtime.disco.cpu_shm.init_ccl_per_worker");
      sess->CallPacked(func, device_ids, ffi::String(name));
    }
    for (int i = 0; i < n; ++i) sess->SyncWorker(i);
  } catch (const std::exception& e) {
    std::ostringstream os;
    os << "cpu_shm: initialising the workers failed: " << e.what();
    if (hdr->abort_state.load() != 0) os << "\n" << ReadAbortMessage(hdr);
    os << "\n(each worker process must have the cpu_shm plugin loaded: start the session with "
          "runtime_patch.ccl.start_session, or entrypoint='runtime_patch.disco_worker' and "
          "LAB_CCL_PLUGINS=cpu_shm)";
    TVM_FFI_THROW(RuntimeError) << os.str();
  }
  std::string pending_error;
  {
    std::lock_guard<std::mutex> lock(g_pending_mutex);
    pending_error = g_pending_segments[name];
  }
  if (!pending_error.empty()) TVM_FFI_THROW(RuntimeError) << pending_error;
  if (hdr->abort_state.load() != 0) TVM_FFI_THROW(RuntimeError) << ReadAbortMessage(hdr);
  for (int i = 0; i < n; ++i) {
    if (hdr->init_state[i].load(std::memory_order_acquire) != 1) {
      TVM_FFI_THROW(RuntimeError) << "cpu_shm: worker " << i << " did not initialise (see its stderr)";
    }
  }
  std::lock_guard<std::mutex> lock(g_sessions_mutex);
  g_sessions[sess.get()] = view;
}

ffi::String Status(Session sess) {
  std::shared_ptr<ControllerView> view = FindSession(sess);
  if (view->hdr->abort_state.load(std::memory_order_acquire) == 0) return ffi::String("");
  return ffi::String(ReadAbortMessage(view->hdr));
}

ffi::Shape WorkerPids(Session sess) {
  std::shared_ptr<ControllerView> view = FindSession(sess);
  std::vector<int64_t> pids;
  for (int i = 0; i < view->hdr->num_workers; ++i) pids.push_back(view->hdr->pids[i].load());
  return ffi::Shape(pids);
}

void ReleaseSession(Session sess) {
  std::lock_guard<std::mutex> lock(g_sessions_mutex);
  g_sessions.erase(sess.get());
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("runtime.disco.cpu_shm.configure", Configure)
      .def("runtime.disco.cpu_shm.init_ccl", InitCCL)
      .def("runtime.disco.cpu_shm.init_ccl_per_worker", InitCCLPerWorker)
      .def("runtime.disco.cpu_shm.allreduce", AllReduce)
      .def("runtime.disco.cpu_shm.allgather", AllGather)
      .def("runtime.disco.cpu_shm.broadcast_from_worker0", BroadcastFromWorker0)
      .def("runtime.disco.cpu_shm.scatter_from_worker0", ScatterFromWorker0)
      .def("runtime.disco.cpu_shm.gather_to_worker0", GatherToWorker0)
      .def("runtime.disco.cpu_shm.sync_worker", []() {})
      .def("runtime.disco.cpu_shm.recv_from_worker0", [](Tensor t) { RecvFrom(t, 0, "recv_from_worker0"); })
      .def("runtime.disco.cpu_shm.send_to_next_group", SendToNextGroup)
      .def("runtime.disco.cpu_shm.recv_from_prev_group", RecvFromPrevGroup)
      .def("runtime.disco.cpu_shm.send_to_worker",
           [](Tensor t, int receiver) { SendTo(t, receiver, "send_to_worker"); })
      .def("runtime.disco.cpu_shm.recv_from_worker",
           [](Tensor t, int sender) { RecvFrom(t, sender, "recv_from_worker"); })
      .def("runtime.disco.cpu_shm.status", Status)
      .def("runtime.disco.cpu_shm.worker_pids", WorkerPids)
      .def("runtime.disco.cpu_shm.release", ReleaseSession);
}

}  // namespace cpu_shm
}  // namespace tvm_lab
