// The update math of the fused scheduler step, shared by the C++ CPU path and the CUDA
// kernel. The definition lives in kernels/scheduler_step.py (scheduler_step_ref); this file
// computes the same thing element by element, in fp32.
//
// One formulation covers DDPM, DDIM, Euler, Euler ancestral, DPM-Solver++ 2M and PNDM/PLMS
// (kernels/scheduler_step_coeffs.py turns each rule into the coefficients below). Per element,
// with x the sample, m the model output, n the noise, v the optional variance input and h_j
// the history:
//
//   n   = n * exp(V_A + V_B*v)                only when a variance input is given
//   x0  = P_X*x + P_M*m + P_N*n              the predicted clean sample
//   x0  = clamp(x0, -CLIP, CLIP)              only when CLIP > 0 (NaN passes through)
//   out = C_X*x + C_M*m + C_N*n + C_X0*x0 + sum_j C_H[j]*h_j
//
// and x0 (after clipping) is optionally written out, for the multistep history. With dynamic
// thresholding (Saharia et al. 2022, sec. 2.3) x0 is instead rounded to the tensors' dtype and
// replaced by t = round(clamp(x0, -s, s) / s), s the per-item scale of threshold_scale().
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#define FD_UNROLL _Pragma("unroll")
#else
#define FD_HD inline
#define FD_UNROLL
#endif

#if defined(__CUDA_ARCH__)
#define FD_FMA(a, b, c) fmaf(a, b, c)
#else
// The portable host build has no FMA instruction and libm's fmaf is slow without it;
// a multiply and an add differ from it only in rounding.
#define FD_FMA(a, b, c) ((a) * (b) + (c))
#endif

namespace fusediff {

// Positions in the coefficient vector; kernels/scheduler_step_coeffs.py mirrors them.
enum Coef : int {
  P_X = 0,   // x0 <- sample
  P_M = 1,   // x0 <- model output
  P_N = 2,   // x0 <- noise
  C_X = 3,   // out <- sample
  C_M = 4,   // out <- model output
  C_N = 5,   // out <- noise
  C_X0 = 6,  // out <- x0 (after clipping)
  C_H0 = 7,  // out <- history[0] .. history[3] at C_H0 .. C_H0 + 3
  CLIP = 11, // clip range for x0; <= 0 disables clipping
  V_A = 12,  // noise scale exp(V_A + V_B*v), with a variance input v
  V_B = 13,
  kNumCoeffs = 14,
};
constexpr int kMaxHistory = 4;

// Dtype codes shared with kernels/scheduler_step_ext.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct StepCoeffs {
  float c[kNumCoeffs];
};

// The noise n scaled by exp(V_A + V_B*v) (a per-element variance input v).
FD_HD float scaled_noise(const float* c, float n, float v) { return n * expf(FD_FMA(c[V_B], v, c[V_A])); }

// x0 before clipping or thresholding; n already scaled by the variance term.
FD_HD float x0_element(const float* c, float x, float m, float n) {
  return FD_FMA(c[P_X], x, FD_FMA(c[P_M], m, c[P_N] * n));
}

// Written as comparisons so that NaN stays NaN, as torch.clamp does.
FD_HD float clamp_nan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The update from x0 (after clipping or thresholding). NH (0..4) is the number of history
// tensors, fixed at compile time so the history loop unrolls and stays in registers.
template <int NH>
FD_HD float out_element(const float* c, float x, float m, float n, float x0, const float* h) {
  float out = FD_FMA(c[C_X], x, FD_FMA(c[C_M], m, FD_FMA(c[C_N], n, c[C_X0] * x0)));
  FD_UNROLL
  for (int j = 0; j < NH; ++j) out = FD_FMA(c[C_H0 + j], h[j], out);
  return out;
}

// One element of the update without thresholding; x0 (after clipping) is returned in x0.
template <int NH>
FD_HD float step_element(const float* c, float x, float m, float n, const float* h, float& x0) {
  x0 = x0_element(c, x, m, n);
  const float r = c[CLIP];
  if (r > 0.f) x0 = clamp_nan(x0, -r, r);
  return out_element<NH>(c, x, m, n, x0, h);
}

// Where torch.quantile(values, q) reads its sorted input: rank = q*(n - 1) in fp32, the
// elements of 0-based ranks `below` = floor(rank) and `above` = ceil(rank), lerp weight
// rank - below. Computed on the host (kernels/scheduler_step_ext.py) from n and q.
struct QuantileRank {
  int64_t below = 0;
  int64_t above = 0;
  float weight = 0.f;
};

// s = clamp(lerp(v_below, v_above, weight), 1, max_value) with torch's lerp as its CUDA and
// AVX2/AVX-512 CPU kernels compute it: a single fused multiply-add,
//   weight < 0.5 ? fma(weight, d, v_below) : fma(weight - 1, d, v_above),  d = v_above - v_below
// (weight - 1 is exact for weight in [0.5, 1)). NaN stays NaN.
FD_HD float threshold_scale(float v_below, float v_above, float weight, float max_value) {
  const float d = v_above - v_below;
#if defined(__CUDA_ARCH__)
  const float q = weight < 0.5f ? fmaf(weight, d, v_below) : fmaf(weight - 1.f, d, v_above);
#else
  const float q = weight < 0.5f ? std::fma(weight, d, v_below) : std::fma(weight - 1.f, d, v_above);
#endif
  return clamp_nan(q, 1.f, max_value);
}

// clamp(x0, -s, s) / s with IEEE division (x0 already rounded to the tensors' dtype).
FD_HD float threshold_element(float x0, float s) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(clamp_nan(x0, -s, s), s);
#else
  return clamp_nan(x0, -s, s) / s;
#endif
}

// Host-side conversions for the CPU path (the CUDA path uses cuda_fp16.h / cuda_bf16.h).
// Both round to nearest even, as PyTorch does.
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bf16_to_float(uint16_t v) { return bits_to_float(uint32_t(v) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // Subnormal half: value = man * 2^-24, exact in fp32.
    const float f = float(man) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_fp16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to inf (>= 65520)
  if (a < 0x38800000u) {
    // Result is subnormal or zero: round a * 2^24 to an integer, ties to even.
    const float scaled = bits_to_float(a) * 16777216.0f;  // exact: a power-of-two scale
    uint32_t i = uint32_t(scaled);
    const float rem = scaled - float(i);
    if (rem > 0.5f || (rem == 0.5f && (i & 1u))) ++i;
    return uint16_t(sign | i);  // i == 0x400 carries into the smallest normal, as it should
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  uint32_t v = a - 0x38000000u;  // exponent 127 -> 15
  v += 0xfffu + ((v >> 13) & 1u);
  return uint16_t(sign | (v >> 13));
}

}  // namespace fusediff
