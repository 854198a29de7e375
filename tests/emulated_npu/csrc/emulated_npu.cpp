// An emulated Ascend NPU: a PrivateUse1 backend whose device memory is host memory.
//
// What it mirrors (see tests/emulated_npu/__init__.py for the Python side):
// * structural ops (empty, empty_strided, as_strided, resize_, copies, set_, view,
//   _reshape_alias, unfold, _local_scalar_dense) are real device kernels here;
// * every other op runs through a global boxed fallback that executes the CPU kernel on host
//   aliases (the emulation's stand-in for a device kernel, silent and uncounted as a fallback);
// * ops that torch_npu does NOT implement (kNotOnNpu) take torch_npu's CPU-fallback path: one
//   "CAUTION ... fall back to run on the CPU" warning per op, a per-op count, or an error when
//   TORCH_NPU_FALLBACK_CPU_DISABLE=1;
// * an allocator that counts live and peak bytes per device;
// * `_local_scalar_dense` (`.item()`) and device-to-host copies are counted: host syncs.
// Limits: everything runs synchronously on the host (no streams, no real overlap, no
// stream-ordering bugs), and kernels are the CPU's.
#include <torch/extension.h>

#include <ATen/EmptyTensor.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/native/Resize.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_cpu_dispatch.h>
#include <ATen/ops/resize_native.h>
#include <ATen/ops/set_cpu_dispatch.h>
#include <ATen/ops/unfold_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/alloc_cpu.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>

namespace emulated_npu {
namespace {

constexpr int kMaxDevices = 16;
constexpr auto kNpu = c10::DeviceType::PrivateUse1;

// The ops torch_npu (op-plugin master, as read) has no NPU kernel for, among those this
// project calls. `_fused_adamw_` is deliberately absent: it is an NPU kernel (aclnnApplyAdamWV2).
const std::set<std::string> kNotOnNpu = {"aten::_fused_adam_", "aten::_fused_adam"};

c10::DeviceIndex device_count() {
  const char* env = std::getenv("EMULATED_NPU_DEVICE_COUNT");
  int n = env ? std::atoi(env) : 2;
  return static_cast<c10::DeviceIndex>(std::max(1, std::min(n, kMaxDevices)));
}

thread_local c10::DeviceIndex current_device = 0;
thread_local int inside_fallback = 0;  // copies made by the emulation itself are not host syncs

struct Counters {
  std::mutex mu;
  std::unordered_map<void*, std::pair<size_t, int>> live;  // ptr -> (bytes, device)
  std::array<int64_t, kMaxDevices> allocated{};
  std::array<int64_t, kMaxDevices> peak{};
  std::map<std::string, int64_t> npu_fallbacks;  // torch_npu-style CPU fallbacks, per op
  std::map<std::string, int64_t> emulated_ops;   // every op run through the emulation's fallback
  std::set<std::string> warned;
  int64_t local_scalar_dense = 0;
  int64_t device_to_host_copies = 0;
};

Counters& counters() {
  static Counters c;
  return c;
}

void free_device_memory(void* ptr) {
  if (ptr == nullptr) return;
  auto& c = counters();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.live.find(ptr);
    if (it != c.live.end()) {
      c.allocated[it->second.second] -= static_cast<int64_t>(it->second.first);
      c.live.erase(it);
    }
  }
  c10::free_cpu(ptr);
}

struct CountingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    const c10::DeviceIndex dev = current_device;
    void* data = nbytes ? c10::alloc_cpu(nbytes) : nullptr;
    if (data != nullptr) {
      auto& c = counters();
      std::lock_guard<std::mutex> lock(c.mu);
      c.live[data] = {nbytes, dev};
      c.allocated[dev] += static_cast<int64_t>(nbytes);
      c.peak[dev] = std::max(c.peak[dev], c.allocated[dev]);
    }
    return {data, data, &free_device_memory, c10::Device(kNpu, dev)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_device_memory; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CountingAllocator allocator;
REGISTER_ALLOCATOR(kNpu, &allocator);

struct GuardImpl final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kNpu; }
  c10::Device exchangeDevice(c10::Device d) const override {
    c10::Device old = getDevice();
    setDevice(d);
    return old;
  }
  c10::Device getDevice() const override { return c10::Device(kNpu, current_device); }
  void setDevice(c10::Device d) const override {
    TORCH_CHECK(d.type() == kNpu, "expected an npu device, got ", d);
    if (d.index() < 0) return;
    TORCH_CHECK(d.index() < device_count(), "npu:", static_cast<int>(d.index()), " does not exist (",
                static_cast<int>(device_count()), " emulated devices)");
    current_device = d.index();
  }
  void uncheckedSetDevice(c10::Device d) const noexcept override {
    if (d.index() >= 0) current_device = d.index();
  }
  c10::Stream getStream(c10::Device d) const override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream getDefaultStream(c10::Device d) const override { return getStream(d); }
  c10::Stream exchangeStream(c10::Stream s) const override { return s; }
  c10::DeviceIndex deviceCount() const noexcept override { return device_count(); }
  // One synchronous "stream": events and stream waits have nothing to order.
  void destroyEvent(void*, const c10::DeviceIndex) const noexcept override {}
  void record(void**, const c10::Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  bool queryStream(const c10::Stream&) const override { return true; }
  void synchronizeStream(const c10::Stream&) const override {}
  void synchronizeEvent(void*) const override {}
  void synchronizeDevice(const c10::DeviceIndex) const override {}
  void recordDataPtrOnStream(const c10::DataPtr&, const c10::Stream&) const override {}
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, GuardImpl);

struct Hooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return device_count(); }
  c10::DeviceIndex getCurrentDevice() const override { return current_device; }
  void setCurrentDevice(c10::DeviceIndex d) const override { current_device = d; }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex) const override {
    return at::detail::getDefaultCPUGenerator();  // random ops run on the CPU kernels anyway
  }
  at::Device getDeviceFromPtr(void*) const override { return at::Device(kNpu, current_device); }
  at::Allocator* getPinnedMemoryAllocator() const override { return c10::GetCPUAllocator(); }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const override {
    at::native::resize_bytes_cpu(storage.unsafeGetStorageImpl(), newsize);  // uses our allocator
  }
};

const bool hooks_registered = [] {
  at::RegisterPrivateUse1HooksInterface(new Hooks());
  return true;
}();

// A CPU tensor aliasing the same memory: device memory is host memory here.
at::Tensor host_alias(const at::Tensor& t) {
  if (t.device().type() != kNpu) return t;
  return at::from_blob(t.data_ptr(), t.sizes(), t.strides(), t.options().device(at::kCPU));
}

c10::DispatchKeySet npu_keys() { return c10::DispatchKeySet(c10::DispatchKey::PrivateUse1); }

at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<c10::ScalarType> dtype,
                               std::optional<c10::Layout> layout, std::optional<c10::Device> device,
                               std::optional<bool> pin_memory, std::optional<c10::MemoryFormat> memory_format) {
  c10::OptionalDeviceGuard guard(device);
  return at::detail::empty_generic(size, &allocator, npu_keys(), c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<c10::ScalarType> dtype,
                         std::optional<c10::Layout> layout, std::optional<c10::Device> device,
                         std::optional<bool> pin_memory) {
  c10::OptionalDeviceGuard guard(device);
  return at::detail::empty_strided_generic(size, stride, &allocator, npu_keys(), c10::dtype_or_default(dtype));
}

at::Tensor as_strided(const at::Tensor& self, c10::IntArrayRef size, c10::IntArrayRef stride,
                      std::optional<int64_t> storage_offset) {
  return at::cpu::as_strided(self, size, stride, storage_offset);
}

const at::Tensor& resize_(const at::Tensor& self, c10::SymIntArrayRef size,
                          std::optional<c10::MemoryFormat> memory_format) {
  c10::DeviceGuard guard(self.device());
  return at::native::resize_(self, C10_AS_INTARRAYREF_SLOW(size), memory_format);
}

at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  if (self.numel() == 0) return dst;
  if (self.device().type() == kNpu && dst.device().type() == at::kCPU && inside_fallback == 0) {
    std::lock_guard<std::mutex> lock(counters().mu);
    counters().device_to_host_copies += 1;
  }
  host_alias(dst).copy_(host_alias(self));
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  dst.resize_(self.sizes());
  return copy_from(self, dst, false);
}

at::Tensor& set_storage(at::Tensor& self, c10::Storage source) { return at::cpu::set_(self, source); }

at::Tensor& set_storage_offset(at::Tensor& self, c10::Storage source, c10::SymInt offset,
                               c10::SymIntArrayRef size, c10::SymIntArrayRef stride) {
  return at::cpu::set__symint(self, source, offset, size, stride);
}

at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& source) {
  return self.set_(source.storage(), source.storage_offset(), source.sizes(), source.strides());
}

at::Tensor& set_empty(at::Tensor& self) {
  c10::Storage storage(c10::Storage::use_byte_size_t(), 0, &allocator, /*resizable=*/true);
  return self.set_(storage, 0, {0}, {});
}

at::Tensor view(const at::Tensor& self, c10::SymIntArrayRef size) {
  return at::native::view(self, C10_AS_INTARRAYREF_SLOW(size));
}

at::Tensor reshape_alias(const at::Tensor& self, c10::SymIntArrayRef size, c10::SymIntArrayRef stride) {
  return at::native::_reshape_alias(self, C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride));
}

at::Tensor unfold(const at::Tensor& self, int64_t dimension, int64_t size, int64_t step) {
  return at::native::unfold(self, dimension, size, step);
}

c10::Scalar local_scalar_dense(const at::Tensor& self) {
  {
    std::lock_guard<std::mutex> lock(counters().mu);
    counters().local_scalar_dense += 1;
  }
  return at::_local_scalar_dense(host_alias(self));
}

bool fallback_disabled() {
  const char* env = std::getenv("TORCH_NPU_FALLBACK_CPU_DISABLE");
  return env != nullptr && std::string(env) == "1";
}

void boxed_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const std::string name = c10::toString(op.schema().operator_name());
  const std::string base = op.schema().name();
  auto& c = counters();
  const bool not_on_npu = kNotOnNpu.count(base) > 0;
  bool warn = false;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.emulated_ops[name] += 1;
    if (not_on_npu && !fallback_disabled()) {
      c.npu_fallbacks[name] += 1;
      warn = c.warned.insert(name).second;
    }
  }
  if (not_on_npu) {
    TORCH_CHECK_NOT_IMPLEMENTED(!fallback_disabled(), "The operator '", name,
                                "' is not currently implemented for the NPU device, and "
                                "TORCH_NPU_FALLBACK_CPU_DISABLE=1 forbids running it on the CPU.");
    if (warn) {
      TORCH_WARN("CAUTION: The operator '", name, "' is not currently supported on the NPU backend and will "
                 "fall back to run on the CPU. This may have performance implications.");
    }
  }
  inside_fallback += 1;
  try {
    at::native::cpu_fallback(op, stack);
  } catch (...) {
    inside_fallback -= 1;
    throw;
  }
  inside_fallback -= 1;
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("as_strided", as_strided);
  m.impl("resize_", resize_);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("set_.source_Storage", set_storage);
  m.impl("set_.source_Storage_storage_offset", set_storage_offset);
  m.impl("set_.source_Tensor", set_tensor);
  m.impl("set_", set_empty);
  m.impl("view", view);
  m.impl("_reshape_alias", reshape_alias);
  m.impl("unfold", unfold);
  m.impl("_local_scalar_dense", local_scalar_dense);
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&boxed_fallback>());
}

}  // namespace

std::map<std::string, int64_t> memory_stats(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "bad device ", device);
  auto& c = counters();
  std::lock_guard<std::mutex> lock(c.mu);
  return {{"allocated_bytes", c.allocated[device]}, {"peak_bytes", c.peak[device]}};
}

void reset_peak(int device) {
  auto& c = counters();
  std::lock_guard<std::mutex> lock(c.mu);
  c.peak[device] = c.allocated[device];
}

std::map<std::string, int64_t> npu_fallback_counts() {
  std::lock_guard<std::mutex> lock(counters().mu);
  return counters().npu_fallbacks;
}

std::map<std::string, int64_t> emulated_op_counts() {
  std::lock_guard<std::mutex> lock(counters().mu);
  return counters().emulated_ops;
}

std::map<std::string, int64_t> sync_counts() {
  std::lock_guard<std::mutex> lock(counters().mu);
  return {{"local_scalar_dense", counters().local_scalar_dense},
          {"device_to_host_copies", counters().device_to_host_copies}};
}

void reset_counts() {
  auto& c = counters();
  std::lock_guard<std::mutex> lock(c.mu);
  c.npu_fallbacks.clear();
  c.emulated_ops.clear();
  c.local_scalar_dense = 0;
  c.device_to_host_copies = 0;
}

}  // namespace emulated_npu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("device_count", [] { return static_cast<int>(emulated_npu::device_count()); });
  m.def("current_device", [] { return static_cast<int>(emulated_npu::current_device); });
  m.def("set_device", [](int d) {
    c10::impl::getDeviceGuardImpl(c10::DeviceType::PrivateUse1)->setDevice(c10::Device(c10::DeviceType::PrivateUse1, d));
  });
  m.def("host_alias", [](const at::Tensor& t) { return emulated_npu::host_alias(t); },
        "A CPU tensor on the same memory as an npu tensor (it must not outlive it).");
  m.def("memory_stats", &emulated_npu::memory_stats);
  m.def("reset_peak", &emulated_npu::reset_peak);
  m.def("npu_fallback_counts", &emulated_npu::npu_fallback_counts);
  m.def("emulated_op_counts", &emulated_npu::emulated_op_counts);
  m.def("sync_counts", &emulated_npu::sync_counts);
  m.def("reset_counts", &emulated_npu::reset_counts);
}
