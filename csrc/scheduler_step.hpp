// Entry points of the fused scheduler step, one per device. Pointers are raw data pointers
// of n elements each; all tensors share one dtype (DType) and one dense layout. Every
// optional pointer may be null. Each function throws std::invalid_argument on bad input.
#pragma once

#include <cstdint>

#include "scheduler_step.h"

namespace fusediff {

struct StepArgs {
  const void* sample = nullptr;        // x, read
  const void* model_output = nullptr;  // m, read
  const void* noise = nullptr;         // n, read; null means zero noise
  const void* history[kMaxHistory] = {nullptr, nullptr, nullptr, nullptr};  // h_j, read
  int num_history = 0;                 // how many of history[] are used, 0..kMaxHistory
  void* out = nullptr;                 // the previous sample, written
  void* pred = nullptr;                // x0 after clipping, written; null to skip
  int64_t numel = 0;                   // elements in each tensor
  int dtype = kFloat32;                // DType of every tensor
};

// C++ loop over the elements; the caller releases the GIL.
void scheduler_step_cpu(const StepArgs& args, const StepCoeffs& coeffs);

// CUDA launch on `stream` (a cudaStream_t) of device `device`, never synchronising with the
// host. Coefficients come from `coeffs_dev` (kNumCoeffs fp32 values in device memory) when it
// is not null, else from `coeffs` by value. Returns an empty string on success, else the
// CUDA error.
const char* scheduler_step_cuda(const StepArgs& args, const StepCoeffs& coeffs,
                                const float* coeffs_dev, uintptr_t stream, int device);

// Throws std::invalid_argument when args are inconsistent; shared by both paths.
void check_args(const StepArgs& args);

bool cuda_built();

}  // namespace fusediff
