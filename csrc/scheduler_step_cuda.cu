// The CUDA path of the fused scheduler step: one pass over memory, fp32 arithmetic,
// 16-byte vector loads and stores (4 fp32 or 8 fp16/bf16 elements) when every pointer is
// 16-byte aligned (and, for batch-strided inputs or thresholding, the item size and batch
// strides are multiples of the vector), scalar accesses otherwise. Dynamic thresholding adds a
// select kernel before the step (one block per item). Launches on the caller's stream and
// never synchronises with the host; coefficients may come from device memory so that a captured
// CUDA graph can replay the step with coefficients written between replays. Built without
// fast math: the thresholding division and expf are IEEE/accurate.
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

template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f(from_f<T>(v)); }

// VEC elements of T moved as one access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int NH>
struct Ptrs {
  const T* x;         // sample
  const T* m;         // model output (batch-strided: item b at m + b * ms)
  const T* n;         // noise, or null
  const T* v;         // variance, or null (batch-strided like m, with vs)
  const T* h[kMaxHistory];  // history; the first NH are used
  T* out;             // previous sample
  T* pred;            // x0 after clipping or thresholding, or null
  const float* scale; // s per item (thresholding), written by select_kernel; or null
  int64_t inner;      // elements per item (numel / batch)
  int64_t ms, vs;     // batch strides of m and v, in elements
};

__device__ __forceinline__ float load_coeff(const float* dev, const StepCoeffs& k, int i) {
  return dev ? __ldg(dev + i) : k.c[i];
}

// Each thread handles ITEMS packs of VEC elements, kThreads packs apart, so each warp's
// accesses are contiguous. Elements past the last whole pack (numel % VEC) are handled by
// block 0 one at a time. IDX: the item b = e / inner of element e is computed per pack, for
// batch-strided m, v and for the per-item threshold scale; the host only takes the vector
// path then when inner and the batch strides are multiples of VEC (so a pack lies in one item
// and numel % VEC == 0). Without IDX every tensor is dense and no division is done.
template <typename T, int NH, int VEC, int ITEMS, bool IDX>
__global__ void __launch_bounds__(kThreads)
step_kernel(Ptrs<T, NH> p,
            const float* __restrict__ coeffs_dev,  // kNumCoeffs values in device memory, or null
            StepCoeffs coeffs,                     // used when coeffs_dev is null
            int64_t numel) {
  using P = Pack<T, VEC>;
  float c[kNumCoeffs];
#pragma unroll
  for (int i = 0; i < kNumCoeffs; ++i) c[i] = load_coeff(coeffs_dev, coeffs, i);

  const int64_t npacks = numel / VEC;
  const int64_t base = int64_t(blockIdx.x) * kThreads * ITEMS + threadIdx.x;
  P x[ITEMS], m[ITEMS], n[ITEMS], v[ITEMS], h[NH > 0 ? NH : 1][ITEMS];
  float s[ITEMS];
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = base + int64_t(k) * kThreads;
    if (i < npacks) {
      const int64_t e = i * VEC;
      int64_t me = e, ve = e;
      s[k] = 0.f;
      if (IDX) {
        const int64_t b = e / p.inner, r = e - b * p.inner;
        me = b * p.ms + r;
        ve = b * p.vs + r;
        if (p.scale) s[k] = p.scale[b];
      }
      x[k] = *reinterpret_cast<const P*>(p.x + e);
      m[k] = *reinterpret_cast<const P*>(p.m + me);
      if (p.n) n[k] = *reinterpret_cast<const P*>(p.n + e);
      if (p.v) v[k] = *reinterpret_cast<const P*>(p.v + ve);
#pragma unroll
      for (int j = 0; j < NH; ++j) h[j][k] = *reinterpret_cast<const P*>(p.h[j] + e);
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
        float nv = p.n ? to_f(n[k].v[e]) : 0.f;
        if (p.v) nv = scaled_noise(c, nv, to_f(v[k].v[e]));
        const float xv = to_f(x[k].v[e]), mv = to_f(m[k].v[e]);
        float x0, out;
        if (IDX && p.scale) {  // dynamic thresholding with this item's s
          x0 = round_to<T>(threshold_element(round_to<T>(x0_element(c, xv, mv, nv)), s[k]));
          out = out_element<NH>(c, xv, mv, nv, x0, hv);
        } else {
          out = step_element<NH>(c, xv, mv, nv, hv, x0);
        }
        o.v[e] = from_f<T>(out);
        x0p.v[e] = from_f<T>(x0);
      }
      reinterpret_cast<P*>(p.out)[i] = o;
      if (p.pred) reinterpret_cast<P*>(p.pred)[i] = x0p;
    }
  }
  if (!IDX && VEC > 1 && blockIdx.x == 0) {
    for (int64_t i = npacks * VEC + threadIdx.x; i < numel; i += kThreads) {
      float hv[NH > 0 ? NH : 1];
#pragma unroll
      for (int j = 0; j < NH; ++j) hv[j] = to_f(p.h[j][i]);
      float x0;
      float nv = p.n ? to_f(p.n[i]) : 0.f;
      if (p.v) nv = scaled_noise(c, nv, to_f(p.v[i]));
      p.out[i] = from_f<T>(step_element<NH>(c, to_f(p.x[i]), to_f(p.m[i]), nv, hv, x0));
      if (p.pred) p.pred[i] = from_f<T>(x0);
    }
  }
}

// -- dynamic thresholding: s per item by radix select ------------------------------------------
// One block per item finds the elements of ranks `below` and `above` of |round(x0)| by their
// uint32 bit patterns, which order non-negative floats (NaN patterns sort above inf; a NaN
// anywhere makes s NaN, as torch.quantile does): four passes of an 8-bit digit, most
// significant first, each a 256-bin shared histogram of the elements matching the digits found
// so far; then, when the element of rank `above` is not a tie of `below`'s, one pass for the
// smallest key above it. Each pass recomputes x0 from x, m (and the noise) instead of storing it.
constexpr int kSelectThreads = 1024;
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__device__ __forceinline__ uint32_t abs_key(const float* c, const T* x, const T* m, const T* n, const T* v,
                                            int64_t r) {
  float nv = n ? to_f(n[r]) : 0.f;
  if (v) nv = scaled_noise(c, nv, to_f(v[r]));
  const float x0 = round_to<T>(x0_element(c, to_f(x[r]), to_f(m[r]), nv));
  return __float_as_uint(x0) & 0x7fffffffu;
}

template <typename T>
__global__ void __launch_bounds__(kSelectThreads)
select_kernel(Ptrs<T, 0> p, const float* __restrict__ coeffs_dev, StepCoeffs coeffs, QuantileRank rank,
              float max_value, float* __restrict__ scale) {
  __shared__ unsigned hist[256];
  __shared__ uint32_t s_prefix;  // digits of the rank-`below` key found so far
  __shared__ unsigned s_k;       // its rank among the elements matching s_prefix
  __shared__ unsigned s_count;   // elements equal to the final key
  __shared__ uint32_t s_min;     // smallest key above it (last pass)
  float c[kNumCoeffs];
#pragma unroll
  for (int i = 0; i < kNumCoeffs; ++i) c[i] = load_coeff(coeffs_dev, coeffs, i);
  const int64_t b = blockIdx.x, inner = p.inner;
  const T* x = p.x + b * inner;
  const T* m = p.m + b * p.ms;
  const T* n = p.n ? p.n + b * inner : nullptr;
  const T* v = p.v ? p.v + b * p.vs : nullptr;
  const int tid = threadIdx.x, lane = tid & 31;
  if (tid == 0) {
    s_prefix = 0;
    s_k = unsigned(rank.below);
    s_min = kFull;
  }
  uint32_t mask = 0;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int i = tid; i < 256; i += kSelectThreads) hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = s_prefix;
    bool nan = false;
    for (int64_t r0 = 0; r0 < inner; r0 += kSelectThreads) {  // uniform trip count: whole warps below
      const int64_t r = r0 + tid;
      bool counted = false;
      unsigned bin = 256;
      if (r < inner) {
        const uint32_t key = abs_key<T>(c, x, m, n, v, r);
        nan |= key > 0x7f800000u;
        counted = (key & mask) == prefix;
        bin = (key >> shift) & 0xffu;
      }
      // Warp-aggregated increments: values of an image share their top digits, so one bin
      // would otherwise take most of the block's atomics.
      const unsigned peers = __match_any_sync(kFull, counted ? bin : 256u);
      if (counted && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], unsigned(__popc(peers)));
    }
    if (pass == 0) {
      if (__syncthreads_or(nan)) {  // torch.quantile of a row holding NaN is NaN
        if (tid == 0) scale[b] = __int_as_float(0x7fc00000);
        return;
      }
    } else {
      __syncthreads();
    }
    if (tid < 32) {  // find the digit whose bin holds rank s_k: a warp scan over 8 bins a lane
      const unsigned k = s_k;
      unsigned local[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) sum += (local[j] = hist[tid * 8 + j]);
      unsigned incl = sum;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned t = __shfl_up_sync(kFull, incl, off);
        if (lane >= off) incl += t;
      }
      __syncwarp();  // every lane has read s_k before one lane rewrites it
      unsigned cum = incl - sum;
      if (cum <= k && k < incl) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (k < cum + local[j]) {
            s_prefix = prefix | (uint32_t(tid * 8 + j) << shift);
            s_k = k - cum;
            s_count = local[j];
            break;
          }
          cum += local[j];
        }
      }
    }
    mask |= 0xffu << shift;
    __syncthreads();
  }
  const uint32_t key_below = s_prefix;
  uint32_t key_above = key_below;
  if (rank.above != rank.below && s_k + 1 >= s_count) {  // rank `above` is the next larger key
    uint32_t best = kFull;
    for (int64_t r = tid; r < inner; r += kSelectThreads) {
      const uint32_t key = abs_key<T>(c, x, m, n, v, r);
      if (key > key_below && key < best) best = key;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) best = min(best, __shfl_down_sync(kFull, best, off));
    if (lane == 0) atomicMin(&s_min, best);
    __syncthreads();
    key_above = s_min;
  }
  if (tid == 0)
    scale[b] = threshold_scale(__uint_as_float(key_below), __uint_as_float(key_above), rank.weight, max_value);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T, int NH, bool IDX>
cudaError_t launch_step(const Ptrs<T, NH>& p, bool vec, int64_t numel, const StepCoeffs& k,
                        const float* coeffs_dev, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t packs = vec ? numel / V : numel;
  const bool many = packs >= kManyPacks;
  const int64_t per_block = int64_t(kThreads) * (many ? 4 : 1);
  const unsigned blocks = unsigned(packs > 0 ? (packs + per_block - 1) / per_block : 1);
  if (vec && many) {
    step_kernel<T, NH, V, 4, IDX><<<blocks, kThreads, 0, stream>>>(p, coeffs_dev, k, numel);
  } else if (vec) {
    step_kernel<T, NH, V, 1, IDX><<<blocks, kThreads, 0, stream>>>(p, coeffs_dev, k, numel);
  } else if (many) {
    step_kernel<T, NH, 1, 4, IDX><<<blocks, kThreads, 0, stream>>>(p, coeffs_dev, k, numel);
  } else {
    step_kernel<T, NH, 1, 1, IDX><<<blocks, kThreads, 0, stream>>>(p, coeffs_dev, k, numel);
  }
  return cudaGetLastError();
}

template <typename T, int NH>
cudaError_t launch(const StepArgs& a, const StepCoeffs& k, const float* coeffs_dev,
                   cudaStream_t stream) {
  Ptrs<T, NH> p;
  p.x = static_cast<const T*>(a.sample);
  p.m = static_cast<const T*>(a.model_output);
  p.n = static_cast<const T*>(a.noise);
  p.v = static_cast<const T*>(a.variance);
  for (int j = 0; j < kMaxHistory; ++j) p.h[j] = static_cast<const T*>(a.history[j]);
  p.out = static_cast<T*>(a.out);
  p.pred = static_cast<T*>(a.pred);
  p.scale = a.threshold ? a.scale : nullptr;
  p.inner = a.inner();
  p.ms = a.m_stride();
  p.vs = a.v_stride();

  constexpr int V = 16 / sizeof(T);
  bool vec = aligned16(p.x) && aligned16(p.m) && aligned16(p.out) && (!p.n || aligned16(p.n)) &&
             (!p.v || aligned16(p.v)) && (!p.pred || aligned16(p.pred));
  for (int j = 0; j < NH; ++j) vec = vec && aligned16(p.h[j]);
  const bool idx = a.threshold || a.batch_strided();
  if (idx) vec = vec && p.inner % V == 0 && p.ms % V == 0 && (!p.v || p.vs % V == 0);

  if (a.threshold) {
    Ptrs<T, 0> q;
    q.x = p.x, q.m = p.m, q.n = p.n, q.v = p.v, q.inner = p.inner, q.ms = p.ms, q.vs = p.vs;
    select_kernel<T><<<unsigned(a.batch), kSelectThreads, 0, stream>>>(q, coeffs_dev, k, a.rank, a.max_value,
                                                                       a.scale);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return idx ? launch_step<T, NH, true>(p, vec, a.numel, k, coeffs_dev, stream)
             : launch_step<T, NH, false>(p, vec, a.numel, k, coeffs_dev, stream);
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
  if (a.threshold && !a.scale) return "thresholding needs a scale buffer";
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
