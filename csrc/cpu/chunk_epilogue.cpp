#include "chunk_epilogue.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "simd_exp.h"

// The per-row loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
// time (GCC function multi-versioning), so the build needs no -march and stays portable.
// Exponents are formed as (x - x_max) * inv_t, never as x * inv_t - m: with FMA contraction the
// latter skips the rounding of z = x * inv_t, so at |z| ~ 5e8 (a large logit, or T <= 1e-10)
// the max element's exponent was no longer 0, every exp could underflow and lse became -inf
// (log-probs +inf). With the difference taken first, the max element's exponent is exactly 0
// (so sum >= 1) and nothing is left to contract. max(x) * inv_t is max(z) as rounded, since
// inv_t > 0 and rounding is monotonic.
// The clones must be separate functions from the OpenMP region: the outlined parallel body
// would not inherit their target attribute.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEMPO_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEMPO_CPU_CLONES
#endif

namespace mempo {
namespace {

// Rows are swept in blocks small enough to stay in L1 (8 KiB): the block's max is taken first,
// the running sums are rescaled once if it rose, then one exp per element accumulates into
// them. The row therefore comes from memory once, and each element costs one exp (a
// per-element online update would cost two). 2048 rather than 512: the per-block horizontal
// reductions cost ~25% at 512 (measured, AVX-512).
constexpr int64_t kBlock = 2048;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct RowStats {
  float lse, mean_z;
};

MEMPO_CPU_CLONES
RowStats row_stats_one(const float* x, int64_t vocab, float inv_t, bool with_entropy) {
  // mx: running max of the raw logits (m = mx * inv_t is the max of z); s = sum exp(z - m);
  // t = sum exp(z - m) * (z - m). Accumulating t relative to the max keeps the rounding of
  // |z| ~ 1e3 logits out of the entropy, as in the PyTorch statement of the contract. mx starts
  // at -inf, not 0: rows of very negative logits would otherwise underflow every exp to 0.
  float mx = kNegInf, s = 0.0f, t = 0.0f;
  for (int64_t b0 = 0; b0 < vocab; b0 += kBlock) {
    const float* xb = x + b0;
    const int64_t n = std::min(kBlock, vocab - b0);
    float bm = kNegInf;
#pragma omp simd reduction(max : bm)
    for (int64_t i = 0; i < n; ++i) bm = xb[i] > bm ? xb[i] : bm;
    if (bm > mx) {
      if (s > 0.0f) {  // nothing to rescale (and -inf - m would give NaN) before the first
        const float shift = (mx - bm) * inv_t;
        const float c = simd_expf(shift);
        // sum e'(z - m') with e' = e c and z - m' = (z - m) + (m - m').
        t = c * (t + shift * s);
        s *= c;
      }
      mx = bm;
    }
    if (mx == kNegInf) continue;  // all -inf so far: contributes nothing yet
    float bs = 0.0f, bt = 0.0f;
    if (with_entropy) {
#pragma omp simd reduction(+ : bs, bt)
      for (int64_t i = 0; i < n; ++i) {
        const float d = (xb[i] - mx) * inv_t;
        const float e = simd_expf(d);
        bs += e;
        bt += e > 0.0f ? e * d : 0.0f;  // masked (-inf) logits: 0 * -inf would be NaN
      }
    } else {
#pragma omp simd reduction(+ : bs)
      for (int64_t i = 0; i < n; ++i) bs += simd_expf((xb[i] - mx) * inv_t);
    }
    s += bs;
    t += bt;
  }
  const float m = mx * inv_t;
  return {m + std::log(s), m + t / s};
}

MEMPO_CPU_CLONES
float row_max(const float* x, int64_t vocab) {
  float mx = kNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < vocab; ++i) mx = x[i] > mx ? x[i] : mx;
  return mx;
}

MEMPO_CPU_CLONES
void write_logit_grad_one(float* x, int64_t vocab, int64_t target, float inv_t, float lse,
                          float g_logp, const float* g_ent, const float* mean_z) {
  // p = exp(z - lse) = exp((x - mx) * inv_t - log_s), log_s = lse - mx * inv_t >= ~0: the max
  // element's exponent stays <= 0 at any |z| (see the top of the file). With inv_t == 1 the
  // row max is not needed (z - lse has no product to contract).
  const float mx = inv_t == 1.0f ? 0.0f : row_max(x, vocab);
  const float log_s = lse - mx * inv_t;
  const float d_t = (x[target] - mx) * inv_t - log_s;  // z_t - lse; kept: the sweep overwrites it
  float coef_t;
  if (g_ent != nullptr) {
    const float ge = *g_ent, neg_inv_t = -inv_t;
    const float mz = *mean_z - lse;  // (z - mean_z) = (z - lse) - (mean_z - lse)
    coef_t = g_logp + ge * (d_t - mz);
#pragma omp simd
    for (int64_t i = 0; i < vocab; ++i) {
      const float d = (x[i] - mx) * inv_t - log_s;
      // d - mz before scaling: at |z| ~ 1e3 a folded a + b * z would cancel catastrophically.
      x[i] = simd_expf(d) * (g_logp + ge * (d - mz)) * neg_inv_t;
    }
  } else {
    coef_t = g_logp;
    const float scale = -g_logp * inv_t;
#pragma omp simd
    for (int64_t i = 0; i < vocab; ++i) x[i] = simd_expf((x[i] - mx) * inv_t - log_s) * scale;
  }
  // The one-hot term, applied once to the target instead of a compare in every lane.
  x[target] = (g_logp - simd_expf(d_t) * coef_t) * inv_t;
}

}  // namespace

void row_stats_f32(const float* logits, const int64_t* targets, int64_t rows, int64_t vocab,
                   float inv_temperature, float* lse, float* z_target, float* mean_z,
                   int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = logits + r * vocab;
    const RowStats st = row_stats_one(x, vocab, inv_temperature, mean_z != nullptr);
    lse[r] = st.lse;
    z_target[r] = x[targets[r]] * inv_temperature;
    if (mean_z != nullptr) mean_z[r] = st.mean_z;
  }
}

void write_logit_grad_f32(float* logits, const int64_t* targets, int64_t rows, int64_t vocab,
                          float inv_temperature, const float* lse, const float* grad_logp,
                          const float* grad_entropy, const float* mean_z, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t r = 0; r < rows; ++r) {
    write_logit_grad_one(logits + r * vocab, vocab, targets[r], inv_temperature, lse[r],
                         grad_logp[r], grad_entropy ? grad_entropy + r : nullptr,
                         mean_z ? mean_z + r : nullptr);
  }
}

}  // namespace mempo
