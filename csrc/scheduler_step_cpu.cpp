// The C++ CPU path of the fused scheduler step: one pass over memory, fp32 arithmetic,
// single-threaded (the CPU's default backend is the PyTorch reference; this path exists for
// FUSEDIFF_KERNELS=fused and to test the shared update math without a GPU). Dynamic
// thresholding adds a pass per item that finds the quantile of |x0| with std::nth_element.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "scheduler_step.hpp"

namespace fusediff {
namespace {

struct F32 {
  using T = float;
  static float load(const T* p, int64_t i) { return p[i]; }
  static void store(T* p, int64_t i, float v) { p[i] = v; }
  static float round(float v) { return v; }
};
struct F16 {
  using T = uint16_t;
  static float load(const T* p, int64_t i) { return fp16_to_float(p[i]); }
  static void store(T* p, int64_t i, float v) { p[i] = float_to_fp16(v); }
  static float round(float v) { return fp16_to_float(float_to_fp16(v)); }
};
struct BF16 {
  using T = uint16_t;
  static float load(const T* p, int64_t i) { return bf16_to_float(p[i]); }
  static void store(T* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
  static float round(float v) { return bf16_to_float(float_to_bf16(v)); }
};

// The tensors of one item b: every pointer moved to the item's first element.
template <typename T>
struct Item {
  const T* x;
  const T* m;
  const T* n;   // or null
  const T* v;   // or null
  const T* h[kMaxHistory];
  T* out;
  T* pred;      // or null
};

template <typename T>
Item<T> item(const StepArgs& a, int64_t b) {
  const int64_t off = b * a.inner();
  Item<T> it;
  it.x = static_cast<const T*>(a.sample) + off;
  it.m = static_cast<const T*>(a.model_output) + b * a.m_stride();
  it.n = a.noise ? static_cast<const T*>(a.noise) + off : nullptr;
  it.v = a.variance ? static_cast<const T*>(a.variance) + b * a.v_stride() : nullptr;
  for (int j = 0; j < kMaxHistory; ++j)
    it.h[j] = j < a.num_history ? static_cast<const T*>(a.history[j]) + off : nullptr;
  it.out = static_cast<T*>(a.out) + off;
  it.pred = a.pred ? static_cast<T*>(a.pred) + off : nullptr;
  return it;
}

// The noise of element r, scaled by exp(V_A + V_B*v) when there is a variance input.
template <typename IO>
float noise_at(const Item<typename IO::T>& it, const float* c, int64_t r) {
  if (!it.n) return 0.f;
  const float n = IO::load(it.n, r);
  return it.v ? scaled_noise(c, n, IO::load(it.v, r)) : n;
}

// s of one item: clamp(quantile(|round(x0)|, q), 1, max_value), NaN if any x0 is NaN.
template <typename IO>
float item_scale(const StepArgs& a, const float* c, const Item<typename IO::T>& it,
                 std::vector<float>& buf) {
  const int64_t inner = a.inner();
  buf.resize(size_t(inner));
  for (int64_t r = 0; r < inner; ++r) {
    const float x0 = x0_element(c, IO::load(it.x, r), IO::load(it.m, r), noise_at<IO>(it, c, r));
    const float v = std::fabs(IO::round(x0));
    if (std::isnan(v)) return std::numeric_limits<float>::quiet_NaN();
    buf[size_t(r)] = v;
  }
  auto below = buf.begin() + a.rank.below;
  std::nth_element(buf.begin(), below, buf.end());
  const float v_below = *below;
  // After nth_element every element past `below` is >= it: the next rank is their minimum.
  const float v_above = a.rank.above == a.rank.below ? v_below : *std::min_element(below + 1, buf.end());
  return threshold_scale(v_below, v_above, a.rank.weight, a.max_value);
}

template <typename IO, int NH>
void run(const StepArgs& a, const StepCoeffs& k) {
  using T = typename IO::T;
  const float* c = k.c;
  const int64_t inner = a.inner();
  std::vector<float> buf;
  for (int64_t b = 0; b < a.batch; ++b) {
    const Item<T> it = item<T>(a, b);
    const float s = a.threshold ? item_scale<IO>(a, c, it, buf) : 0.f;
    for (int64_t r = 0; r < inner; ++r) {
      float h[kMaxHistory];
      for (int j = 0; j < NH; ++j) h[j] = IO::load(it.h[j], r);
      const float x = IO::load(it.x, r), m = IO::load(it.m, r), n = noise_at<IO>(it, c, r);
      float x0, o;
      if (a.threshold) {
        x0 = IO::round(threshold_element(IO::round(x0_element(c, x, m, n)), s));
        o = out_element<NH>(c, x, m, n, x0, h);
      } else {
        o = step_element<NH>(c, x, m, n, h, x0);
      }
      IO::store(it.out, r, o);
      if (it.pred) IO::store(it.pred, r, x0);
    }
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
  if (a.batch < 1 || a.numel % a.batch != 0)
    throw std::invalid_argument("scheduler_step: batch must be >= 1 and divide numel");
  if (a.m_batch_stride < -1 || a.v_batch_stride < -1)
    throw std::invalid_argument("scheduler_step: batch strides must be >= 0 (or -1 for dense)");
  if (a.variance && !a.noise)
    throw std::invalid_argument("scheduler_step: a variance input needs noise");
  if (a.threshold) {
    const QuantileRank& q = a.rank;
    if (q.below < 0 || q.above < q.below || q.above > q.below + 1 || (a.numel > 0 && q.above >= a.inner()))
      throw std::invalid_argument("scheduler_step: threshold ranks must satisfy 0 <= below <= above <= below + 1 < numel / batch");
    if (!(q.weight >= 0.f && q.weight < 1.f))
      throw std::invalid_argument("scheduler_step: threshold weight must be in [0, 1)");
    if (!(a.max_value >= 1.f))
      throw std::invalid_argument("scheduler_step: threshold max_value must be >= 1");
  }
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
