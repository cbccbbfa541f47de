// Entry points of the fused scheduler step, one per device. Pointers are raw data pointers
// of numel elements each; all tensors share one dtype (DType) and one dense layout, except
// that model_output and variance may be "batch-strided": item b (of `batch` items of
// inner = numel / batch elements along dim 0) starts at base + b * batch_stride, its elements
// dense after that (the halves of a (B, 2C, ...) output split along dim 1). Every optional
// pointer may be null. Each function throws std::invalid_argument on bad input.
#pragma once

#include <cstdint>

#include "scheduler_step.h"

namespace fusediff {

struct StepArgs {
  const void* sample = nullptr;        // x, read
  const void* model_output = nullptr;  // m, read
  const void* noise = nullptr;         // n, read; null means zero noise
  const void* variance = nullptr;      // v, read; null means no noise scale (needs noise)
  const void* history[kMaxHistory] = {nullptr, nullptr, nullptr, nullptr};  // h_j, read
  int num_history = 0;                 // how many of history[] are used, 0..kMaxHistory
  void* out = nullptr;                 // the previous sample, written
  void* pred = nullptr;                // x0 after clipping, written; null to skip
  int64_t numel = 0;                   // elements in each tensor
  int dtype = kFloat32;                // DType of every tensor
  int64_t batch = 1;                   // items along dim 0; numel % batch == 0 (1 if numel == 0)
  int64_t m_batch_stride = -1;         // elements from one item of model_output to the next; -1: dense
  int64_t v_batch_stride = -1;         // the same for variance
  bool threshold = false;              // dynamic thresholding of x0 per item (replaces CLIP, ignored then)
  QuantileRank rank;                   // where the quantile of |x0| lies in each sorted item
  float max_value = 1.f;               // cap of the threshold scale s (>= 1)
  float* scale = nullptr;              // CUDA: `batch` floats of device scratch for s; CPU: unused

  int64_t inner() const { return batch > 0 ? numel / batch : 0; }
  int64_t m_stride() const { return m_batch_stride < 0 ? inner() : m_batch_stride; }
  int64_t v_stride() const { return v_batch_stride < 0 ? inner() : v_batch_stride; }
  // Whether a tensor is read through a batch stride other than the dense one.
  bool batch_strided() const {
    return batch > 1 && (m_stride() != inner() || (variance && v_stride() != inner()));
  }
};

// C++ loop over the elements; the caller releases the GIL.
void scheduler_step_cpu(const StepArgs& args, const StepCoeffs& coeffs);

// CUDA launch on `stream` (a cudaStream_t) of device `device`, never synchronising with the
// host. Coefficients come from `coeffs_dev` (kNumCoeffs fp32 values in device memory) when it
// is not null, else from `coeffs` by value. Thresholding is two launches: a select kernel
// writes s per item to args.scale, then the step kernel reads it. Returns an empty string on
// success, else the CUDA error.
const char* scheduler_step_cuda(const StepArgs& args, const StepCoeffs& coeffs,
                                const float* coeffs_dev, uintptr_t stream, int device);

// Throws std::invalid_argument when args are inconsistent; shared by both paths.
void check_args(const StepArgs& args);

bool cuda_built();

}  // namespace fusediff
