// fusediff._C: pybind11 bindings over the C++/CUDA kernels. No libtorch (DESIGN.md,
// decision 1): tensors arrive as integer data pointers with an element count and a dtype
// code; CUDA launches take the stream as an integer handle. kernels/*_ext.py wraps these
// functions as torch custom ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "scheduler_step.hpp"

namespace py = pybind11;
using fusediff::kMaxHistory;
using fusediff::kNumCoeffs;

#ifndef FUSEDIFF_WITH_CUDA
namespace fusediff {
bool cuda_built() { return false; }
const char* scheduler_step_cuda(const StepArgs&, const StepCoeffs&, const float*, uintptr_t, int) {
  throw std::runtime_error("fusediff._C was built without CUDA (no CUDA compiler was found)");
}
}  // namespace fusediff
#endif

namespace {

// (below, above, weight, max_value) of dynamic thresholding; absent when not thresholding.
using Threshold = std::optional<std::tuple<int64_t, int64_t, float, float>>;

fusediff::StepArgs make_args(uintptr_t sample, uintptr_t model_output, uintptr_t noise,
                             const std::vector<uintptr_t>& history, uintptr_t out,
                             uintptr_t pred, int64_t numel, int dtype, uintptr_t variance,
                             int64_t batch, int64_t m_batch_stride, int64_t v_batch_stride,
                             const Threshold& threshold) {
  if (history.size() > size_t(kMaxHistory))
    throw std::invalid_argument("scheduler_step: at most 4 history tensors, got " +
                                std::to_string(history.size()));
  fusediff::StepArgs a;
  a.sample = reinterpret_cast<const void*>(sample);
  a.model_output = reinterpret_cast<const void*>(model_output);
  a.noise = reinterpret_cast<const void*>(noise);
  a.variance = reinterpret_cast<const void*>(variance);
  a.num_history = int(history.size());
  for (size_t j = 0; j < history.size(); ++j) a.history[j] = reinterpret_cast<const void*>(history[j]);
  a.out = reinterpret_cast<void*>(out);
  a.pred = reinterpret_cast<void*>(pred);
  a.numel = numel;
  a.dtype = dtype;
  a.batch = batch;
  a.m_batch_stride = m_batch_stride;
  a.v_batch_stride = v_batch_stride;
  if (threshold) {
    a.threshold = true;
    std::tie(a.rank.below, a.rank.above, a.rank.weight, a.max_value) = *threshold;
  }
  fusediff::check_args(a);
  return a;
}

fusediff::StepCoeffs make_coeffs(const std::array<float, kNumCoeffs>& c) {
  fusediff::StepCoeffs k;
  for (int i = 0; i < kNumCoeffs; ++i) k.c[i] = c[i];
  return k;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusediff's compiled kernels (pybind11 over C++/CUDA; no libtorch)";
  // The Python side checks NUM_COEFFS, so a build from before a change of the coefficient
  // vector fails clearly instead of misreading it.
  m.attr("NUM_COEFFS") = int(kNumCoeffs);
  m.attr("MAX_HISTORY") = int(kMaxHistory);
  m.def("cuda_built", &fusediff::cuda_built, "Whether the CUDA kernels were compiled in.");

  m.def(
      "scheduler_step_cpu",
      [](uintptr_t sample, uintptr_t model_output, uintptr_t noise,
         const std::vector<uintptr_t>& history, uintptr_t out, uintptr_t pred, int64_t numel,
         int dtype, const std::array<float, kNumCoeffs>& coeffs, uintptr_t variance, int64_t batch,
         int64_t m_batch_stride, int64_t v_batch_stride, const Threshold& threshold) {
        const auto a = make_args(sample, model_output, noise, history, out, pred, numel, dtype,
                                 variance, batch, m_batch_stride, v_batch_stride, threshold);
        const auto k = make_coeffs(coeffs);
        py::gil_scoped_release release;
        fusediff::scheduler_step_cpu(a, k);
      },
      py::arg("sample"), py::arg("model_output"), py::arg("noise"), py::arg("history"),
      py::arg("out"), py::arg("pred"), py::arg("numel"), py::arg("dtype"), py::arg("coeffs"),
      py::arg("variance") = 0, py::arg("batch") = 1, py::arg("m_batch_stride") = -1,
      py::arg("v_batch_stride") = -1, py::arg("threshold") = py::none(),
      "Fused scheduler step over host memory (pointers as integers; 0 for an absent one). "
      "threshold: (below, above, weight, max_value) of dynamic thresholding, or None.");

  m.def(
      "scheduler_step_cuda",
      [](uintptr_t sample, uintptr_t model_output, uintptr_t noise,
         const std::vector<uintptr_t>& history, uintptr_t out, uintptr_t pred, int64_t numel,
         int dtype, const std::array<float, kNumCoeffs>& coeffs, uintptr_t coeffs_dev,
         uintptr_t stream, int device, uintptr_t variance, int64_t batch, int64_t m_batch_stride,
         int64_t v_batch_stride, const Threshold& threshold, uintptr_t scale) {
        auto a = make_args(sample, model_output, noise, history, out, pred, numel, dtype, variance,
                           batch, m_batch_stride, v_batch_stride, threshold);
        a.scale = reinterpret_cast<float*>(scale);
        if (a.threshold && a.numel > 0 && !a.scale)
          throw std::invalid_argument("scheduler_step: thresholding on CUDA needs a scale buffer");
        const auto k = make_coeffs(coeffs);
        const char* err = fusediff::scheduler_step_cuda(
            a, k, reinterpret_cast<const float*>(coeffs_dev), stream, device);
        if (err[0] != '\0') throw std::runtime_error(std::string("scheduler_step (CUDA): ") + err);
      },
      py::arg("sample"), py::arg("model_output"), py::arg("noise"), py::arg("history"),
      py::arg("out"), py::arg("pred"), py::arg("numel"), py::arg("dtype"), py::arg("coeffs"),
      py::arg("coeffs_dev"), py::arg("stream"), py::arg("device"), py::arg("variance") = 0,
      py::arg("batch") = 1, py::arg("m_batch_stride") = -1, py::arg("v_batch_stride") = -1,
      py::arg("threshold") = py::none(), py::arg("scale") = 0,
      "Fused scheduler step launched on a CUDA stream; coefficients from coeffs_dev when it is "
      "not 0 (device memory), else from coeffs. With threshold, scale is `batch` floats of "
      "device memory the select kernel writes s into.");
}
