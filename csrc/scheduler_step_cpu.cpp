// The C++ CPU path of the fused scheduler step: one pass over memory, fp32 arithmetic,
// single-threaded (the CPU's default backend is the PyTorch reference; this path exists for
// FUSEDIFF_KERNELS=fused and to test the shared update math without a GPU).
#include <stdexcept>

#include "scheduler_step.hpp"

namespace fusediff {
namespace {

struct F32 {
  using T = float;
  static float load(const T* p, int64_t i) { return p[i]; }
  static void store(T* p, int64_t i, float v) { p[i] = v; }
};
struct F16 {
  using T = uint16_t;
  static float load(const T* p, int64_t i) { return fp16_to_float(p[i]); }
  static void store(T* p, int64_t i, float v) { p[i] = float_to_fp16(v); }
};
struct BF16 {
  using T = uint16_t;
  static float load(const T* p, int64_t i) { return bf16_to_float(p[i]); }
  static void store(T* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
};

template <typename IO, int NH>
void run(const StepArgs& a, const StepCoeffs& k) {
  using T = typename IO::T;
  const T* x = static_cast<const T*>(a.sample);
  const T* m = static_cast<const T*>(a.model_output);
  const T* nz = static_cast<const T*>(a.noise);
  const T* hp[kMaxHistory > 0 ? kMaxHistory : 1];
  for (int j = 0; j < kMaxHistory; ++j) hp[j] = static_cast<const T*>(a.history[j]);
  T* out = static_cast<T*>(a.out);
  T* pred = static_cast<T*>(a.pred);
  for (int64_t i = 0; i < a.numel; ++i) {
    float h[kMaxHistory];
    for (int j = 0; j < NH; ++j) h[j] = IO::load(hp[j], i);
    const float n = nz ? IO::load(nz, i) : 0.f;
    float x0;
    const float o = step_element<NH>(k.c, IO::load(x, i), IO::load(m, i), n, h, x0);
    IO::store(out, i, o);
    if (pred) IO::store(pred, i, x0);
  }
}

template <typename IO>
void run_dtype(const StepArgs& a, const StepCoeffs& k) {
  switch (a.num_history) {
    case 0: return run<IO, 0>(a, k);
    case 1: return run<IO, 1>(a, k);
    case 2: return run<IO, 2>(a, k);
    case 3: return run<IO, 3>(a, k);
    case 4: return run<IO, 4>(a, k);
  }
}

}  // namespace

void check_args(const StepArgs& a) {
  if (a.numel < 0) throw std::invalid_argument("scheduler_step: numel must be >= 0");
  if (a.num_history < 0 || a.num_history > kMaxHistory)
    throw std::invalid_argument("scheduler_step: at most 4 history tensors");
  if (a.dtype != kFloat32 && a.dtype != kFloat16 && a.dtype != kBFloat16)
    throw std::invalid_argument("scheduler_step: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (a.numel == 0) return;
  if (!a.sample || !a.model_output || !a.out)
    throw std::invalid_argument("scheduler_step: sample, model_output and out must not be null");
  for (int j = 0; j < a.num_history; ++j)
    if (!a.history[j]) throw std::invalid_argument("scheduler_step: a history pointer is null");
}

void scheduler_step_cpu(const StepArgs& a, const StepCoeffs& k) {
  check_args(a);
  if (a.numel == 0) return;
  switch (a.dtype) {
    case kFloat32: return run_dtype<F32>(a, k);
    case kFloat16: return run_dtype<F16>(a, k);
    case kBFloat16: return run_dtype<BF16>(a, k);
  }
}

}  // namespace fusediff
