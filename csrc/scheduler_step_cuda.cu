// The CUDA path of the fused scheduler step: one pass over memory, fp32 arithmetic,
// 16-byte vector loads and stores (4 fp32 or 8 fp16/bf16 elements) when every pointer is
// 16-byte aligned, scalar accesses otherwise. Launches on the caller's stream and never
// synchronises with the host; coefficients may come from device memory so that a captured
// CUDA graph can replay the step with coefficients written between replays.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>

#include "scheduler_step.hpp"

namespace fusediff {
namespace {

constexpr int kThreads = 256;  // threads per block
// Vectors per thread, all loaded before any is used: 4 on large tensors (more bytes in
// flight per thread), 1 below kManyPacks vectors so that small tensors still spread over
// many blocks (a (2,4,64,64) fp16 latent is 4096 vectors: 16 blocks rather than 4).
constexpr int64_t kManyPacks = int64_t(1) << 18;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC elements of T moved as one access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int NH>
struct Ptrs {
  const T* x;         // sample
  const T* m;         // model output
  const T* n;         // noise, or null
  const T* h[kMaxHistory];  // history; the first NH are used
  T* out;             // previous sample
  T* pred;            // x0 after clipping, or null
};

// Each thread handles ITEMS packs of VEC elements, kThreads packs apart, so each warp's
// accesses are contiguous. Elements past the last whole pack (numel % VEC) are handled by
// block 0 one at a time.
template <typename T, int NH, int VEC, int ITEMS>
__global__ void __launch_bounds__(kThreads)
step_kernel(Ptrs<T, NH> p,
            const float* __restrict__ coeffs_dev,  // kNumCoeffs values in device memory, or null
            StepCoeffs coeffs,                     // used when coeffs_dev is null
            int64_t numel) {
  using P = Pack<T, VEC>;
  float c[kNumCoeffs];
#pragma unroll
  for (int i = 0; i < kNumCoeffs; ++i) c[i] = coeffs_dev ? __ldg(coeffs_dev + i) : coeffs.c[i];

  const int64_t npacks = numel / VEC;
  const int64_t base = int64_t(blockIdx.x) * kThreads * ITEMS + threadIdx.x;
  P x[ITEMS], m[ITEMS], n[ITEMS], h[NH > 0 ? NH : 1][ITEMS];
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = base + int64_t(k) * kThreads;
    if (i < npacks) {
      x[k] = reinterpret_cast<const P*>(p.x)[i];
      m[k] = reinterpret_cast<const P*>(p.m)[i];
      if (p.n) n[k] = reinterpret_cast<const P*>(p.n)[i];
#pragma unroll
      for (int j = 0; j < NH; ++j) h[j][k] = reinterpret_cast<const P*>(p.h[j])[i];
    }
  }
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = base + int64_t(k) * kThreads;
    if (i < npacks) {
      P o, x0p;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float hv[NH > 0 ? NH : 1];
#pragma unroll
        for (int j = 0; j < NH; ++j) hv[j] = to_f(h[j][k].v[e]);
        float x0;
        const float nv = p.n ? to_f(n[k].v[e]) : 0.f;
        o.v[e] = from_f<T>(step_element<NH>(c, to_f(x[k].v[e]), to_f(m[k].v[e]), nv, hv, x0));
        x0p.v[e] = from_f<T>(x0);
      }
      reinterpret_cast<P*>(p.out)[i] = o;
      if (p.pred) reinterpret_cast<P*>(p.pred)[i] = x0p;
    }
  }
  if (VEC > 1 && blockIdx.x == 0) {
    for (int64_t i = npacks * VEC + threadIdx.x; i < numel; i += kThreads) {
      float hv[NH > 0 ? NH : 1];
#pragma unroll
      for (int j = 0; j < NH; ++j) hv[j] = to_f(p.h[j][i]);
      float x0;
      const float nv = p.n ? to_f(p.n[i]) : 0.f;
      p.out[i] = from_f<T>(step_element<NH>(c, to_f(p.x[i]), to_f(p.m[i]), nv, hv, x0));
      if (p.pred) p.pred[i] = from_f<T>(x0);
    }
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T, int NH>
cudaError_t launch(const StepArgs& a, const StepCoeffs& k, const float* coeffs_dev,
                   cudaStream_t stream) {
  Ptrs<T, NH> p;
  p.x = static_cast<const T*>(a.sample);
  p.m = static_cast<const T*>(a.model_output);
  p.n = static_cast<const T*>(a.noise);
  for (int j = 0; j < kMaxHistory; ++j) p.h[j] = static_cast<const T*>(a.history[j]);
  p.out = static_cast<T*>(a.out);
  p.pred = static_cast<T*>(a.pred);

  bool vec = aligned16(p.x) && aligned16(p.m) && aligned16(p.out) &&
             (!p.n || aligned16(p.n)) && (!p.pred || aligned16(p.pred));
  for (int j = 0; j < NH; ++j) vec = vec && aligned16(p.h[j]);

  constexpr int V = 16 / sizeof(T);
  const int64_t packs = vec ? a.numel / V : a.numel;
  const bool many = packs >= kManyPacks;
  const int64_t per_block = int64_t(kThreads) * (many ? 4 : 1);
  const unsigned blocks = unsigned(packs > 0 ? (packs + per_block - 1) / per_block : 1);
  if (vec && many) {
    step_kernel<T, NH, V, 4><<<blocks, kThreads, 0, stream>>>(p, coeffs_dev, k, a.numel);
  } else if (vec) {
    step_kernel<T, NH, V, 1><<<blocks, kThreads, 0, stream>>>(p, coeffs_dev, k, a.numel);
  } else if (many) {
    step_kernel<T, NH, 1, 4><<<blocks, kThreads, 0, stream>>>(p, coeffs_dev, k, a.numel);
  } else {
    step_kernel<T, NH, 1, 1><<<blocks, kThreads, 0, stream>>>(p, coeffs_dev, k, a.numel);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const StepArgs& a, const StepCoeffs& k, const float* cd, cudaStream_t s) {
  switch (a.num_history) {
    case 0: return launch<T, 0>(a, k, cd, s);
    case 1: return launch<T, 1>(a, k, cd, s);
    case 2: return launch<T, 2>(a, k, cd, s);
    case 3: return launch<T, 3>(a, k, cd, s);
    default: return launch<T, 4>(a, k, cd, s);
  }
}

}  // namespace

bool cuda_built() { return true; }

const char* scheduler_step_cuda(const StepArgs& a, const StepCoeffs& k, const float* coeffs_dev,
                                uintptr_t stream, int device) {
  check_args(a);
  if (a.numel == 0) return "";
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  if (current != device && (err = cudaSetDevice(device)) != cudaSuccess)
    return cudaGetErrorString(err);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat32: err = launch_dtype<float>(a, k, coeffs_dev, s); break;
    case kFloat16: err = launch_dtype<__half>(a, k, coeffs_dev, s); break;
    default: err = launch_dtype<__nv_bfloat16>(a, k, coeffs_dev, s); break;
  }
  if (current != device) cudaSetDevice(current);
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

}  // namespace fusediff
