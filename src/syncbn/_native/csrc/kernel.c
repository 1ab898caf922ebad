/* syncbn's fused CPU kernels: the full-size passes of synchronized batch norm, one pass each.
 *
 * Built on first use by syncbn/_kernel.py (cc -O3 -fno-trapping-math -march=native -fopenmp, cached) and called
 * through ctypes; there is no dependency on torch's headers. When it cannot be built, syncbn uses
 * its plain ATen path (identical results up to float rounding).
 *
 * The input is seen as (N, C, S) in one of two contiguous layouts:
 *   NCS  x[(n*C + c)*S + s]   (torch's default contiguous format, S = H*W*...)
 *   NSC  x[(n*S + s)*C + c]   (channels_last, and (N, C) input, i.e. S == 1)
 * Statistics are per channel c over the N*S values. Per-channel vectors (mean, invstd, the
 * collective's buffer) are float64; weight, bias and running statistics are float32 or float64
 * (dtype codes below) or absent (NULL).
 *
 * Numerics: every block of at most BLOCK values (per channel) is summed twice in its own dtype,
 * first for a shift k (its mean), then the shifted sums s1 = sum(x - k), s2 = sum((x - k)^2), while
 * the block is in cache; blocks are merged in float64 with Chan's parallel formula, so the
 * result is accurate whatever mean/std is. The forward sends raw moments
 * sum(x) = n*mean and sum(x^2) = M2 + n*mean^2 in float64, as the ATen path does.
 *
 * The collective's buffer (len numbers, float64) is laid out in wire.h, which mirrors
 * syncbn/_wire.py; every call returns one of its result codes (WIRE_OK, ...).
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, kill, nanosleep, sched_yield (local.h) */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;

#include "wire.h" /* the buffer's layout, header check and result codes */

enum { DT_NONE = 0, DT_F32 = 1, DT_F64 = 2 };
/* Activation kinds (syncbn/_stats.py: IDENTITY, RELU, LEAKY_RELU, ELU), applied to the affine
 * output z in the forward's pass; the backward takes dz = dy * act'(z), with z recomputed from x,
 * or (an in-place layer, y given) recovered from the output y = act(z) alone. */
enum { ACT_IDENTITY = 0, ACT_RELU = 1, ACT_LEAKY_RELU = 2, ACT_ELU = 3 };
/* BODY(K) once per kind, K a constant: each element loop is compiled per activation (no
 * branch on the kind inside a vectorized loop). */
#define ACT_SWITCH(act, BODY)                                                                 \
  switch (act) {                                                                              \
  case ACT_RELU: BODY(ACT_RELU); break;                                                       \
  case ACT_LEAKY_RELU: BODY(ACT_LEAKY_RELU); break;                                           \
  case ACT_ELU: BODY(ACT_ELU); break;                                                         \
  default: BODY(ACT_IDENTITY); break;                                                         \
  }
/* exp(z), expm1(z) and log1p(t) in float64 arithmetic only (no libm call, no branch), so that
 * the activation loops vectorize; elu needs them on every element of its negative side. Within
 * about 2 ulp of float64 for the arguments elu gives them (z <= 0, t in (-1, 0]); float data
 * rounds the float64 result once. (The loops vectorize with -fno-trapping-math: a value computed
 * on every lane and then chosen by a comparison is otherwise moved under the comparison.) exp: z = k*ln2 + r, |r| <= ln2/2, expm1(r) by its Taylor
 * series to r^13 (truncation < 1e-17), 2^k from the exponent bits (z clamped to [-708, 709]).
 * log1p: u = 1 + t = 2^e * m, m in [sqrt(1/2), sqrt(2)), log(m) = 2 atanh((m - 1)/(m + 1)) by
 * its series to s^21, plus (t - (u - 1)) / u for the rounding of u. */
static const double LN2_HI = 6.93147180369123816490e-01, LN2_LO = 1.90821492927058770002e-10;

/* (2^k, expm1(r)) with z = k*ln2 + r. k is rounded to the nearest integer by adding 1.5*2^52,
 * which leaves k in the low bits of that sum: (bits + 1023) << 52 is then 2^k's bit pattern
 * (no float-to-integer conversion: AVX2 has none for 64-bit lanes). */
static inline double exp_parts(double z, double *p) {
  z = z < -708.0 ? -708.0 : (z > 709.0 ? 709.0 : z);
  double t = z * 1.44269504088896338700 + 0x1.8p52, kd = t - 0x1.8p52;
  double r = (z - kd * LN2_HI) - kd * LN2_LO;
  double q = 1.0 / 6227020800.0; /* 1/13! */
  q = q * r + 1.0 / 479001600.0;
  q = q * r + 1.0 / 39916800.0;
  q = q * r + 1.0 / 3628800.0;
  q = q * r + 1.0 / 362880.0;
  q = q * r + 1.0 / 40320.0;
  q = q * r + 1.0 / 5040.0;
  q = q * r + 1.0 / 720.0;
  q = q * r + 1.0 / 120.0;
  q = q * r + 1.0 / 24.0;
  q = q * r + 1.0 / 6.0;
  q = q * r + 0.5;
  *p = r + r * r * q; /* expm1(r) */
  i64 bits;
  double s;
  __builtin_memcpy(&bits, &t, sizeof bits);
  bits = (bits + 1023) << 52;
  __builtin_memcpy(&s, &bits, sizeof s);
  return s;
}

static inline double exp_(double z) {
  double p, s = exp_parts(z, &p);
  return s * p + s;
}

static inline double expm1_(double z) {
  double p, s = exp_parts(z, &p);
  return s * p + (s - 1.0);
}

static inline double log1p_(double t) {
  double u = 1.0 + t, m;
  i64 i;
  __builtin_memcpy(&i, &u, sizeof i);
  i64 e = ((i >> 52) & 0x7ff) - 1023;
  i = (i & 0xfffffffffffffLL) | (1023LL << 52); /* m in [1, 2) */
  __builtin_memcpy(&m, &i, sizeof m);
  int big = m > 1.41421356237309504880;
  m = big ? m * 0.5 : m;
  e = big ? e + 1 : e;
  double s = (m - 1.0) / (m + 1.0), s2 = s * s;
  double q = 1.0 / 21;
  q = q * s2 + 1.0 / 19;
  q = q * s2 + 1.0 / 17;
  q = q * s2 + 1.0 / 15;
  q = q * s2 + 1.0 / 13;
  q = q * s2 + 1.0 / 11;
  q = q * s2 + 1.0 / 9;
  q = q * s2 + 1.0 / 7;
  q = q * s2 + 1.0 / 5;
  q = q * s2 + 1.0 / 3;
  double ed = (double)e;
  double logm = 2.0 * s + 2.0 * s * s2 * q;
  return ed * LN2_HI + (ed * LN2_LO + logm + (t - (u - 1.0)) / u);
}

#define BLOCK 4096            /* values per block in the NCS statistics */
#define VBYTES 32             /* vector width of the NCS sums (AVX2; GCC vector extensions) */
#define NSC_BLOCK_BYTES 262144 /* bytes of rows per block in the NSC statistics (in L2) */
#define NSC_BLOCK_ROWS 1024   /* and at most this many rows: values per channel summed in T */

int syncbn_kernel_version(void) { return 9; }

/* The argument blocks of the four exported calls (per dtype: _f32, _f64), packed by
 * syncbn/_kernel.py with struct formats that must match (_kernel.ARG_FORMATS): one pointer
 * argument per call instead of 14-28 (ctypes converts each argument on every call: ~4 us per
 * call, against ~1 us to pack a block). Pointers travel as int64 (0 for NULL), then doubles
 * first, all fields 8 bytes: no padding. */
typedef struct { /* "<14q" */
  i64 x, N, C, S, nsc, nt, buf, len, f[NFIELDS];
} forward_reduce_args;
/* act, act_param: the activation (ACT_*) and its parameter. forward_apply's y may be x (an
 * in-place layer). The backward calls' y: the saved output (0: none; then x is read and z
 * recomputed from it; else x is not read and may be 0); w, b: the affine parameters z uses. */
typedef struct { /* "<4d26q" */
  double world, eps, momentum, act_param;
  i64 buf, len, f[NFIELDS], rmean, rmean_code, rvar, rvar_code, policy, stats, x, y, N, C, S, nsc,
      nt, w, wc, b, bc, act;
} forward_apply_args;
typedef struct { /* "<d27q" */
  double act_param;
  i64 dy, x, N, C, S, nsc, nt, mean, invstd, buf, len, f[NFIELDS], gw, gwc, gb, gbc, act, y, w, wc,
      b, bc;
} backward_reduce_args;
typedef struct { /* "<2d23q" */
  double world, act_param;
  i64 buf, len, f[NFIELDS], dy, x, dx, N, C, S, nsc, nt, stats, w, wc, act, y, b, bc;
} backward_apply_args;
_Static_assert(sizeof(forward_reduce_args) == 14 * 8, "forward_reduce_args");
_Static_assert(sizeof(forward_apply_args) == 30 * 8, "forward_apply_args");
_Static_assert(sizeof(backward_reduce_args) == 28 * 8, "backward_reduce_args");
_Static_assert(sizeof(backward_apply_args) == 25 * 8, "backward_apply_args");

static inline double load(const void *p, int code, i64 i) {
  if (code == DT_F32) return (double)((const float *)p)[i];
  if (code == DT_F64) return ((const double *)p)[i];
  return 0.0;
}

static inline void store(void *p, int code, i64 i, double v) {
  if (code == DT_F32) ((float *)p)[i] = (float)v;
  else if (code == DT_F64) ((double *)p)[i] = v;
}

/* Chan et al.: merge (nb, mb, qb) into (*na, *ma, *qa); q is the sum of squared deviations. */
static inline void merge(double *na, double *ma, double *qa, double nb, double mb, double qb) {
  if (nb <= 0.0) return;
  double n = *na + nb, d = mb - *ma;
  *ma += d * (nb / n);
  *qa += qb + d * d * (*na) * (nb / n);
  *na = n;
}

/* Rows [*r0, *r1) of R for the calling OpenMP thread (*t): whole blocks of B rows, split evenly
 * and in order over the team. */
static inline void thread_rows(i64 R, i64 B, i64 blocks, int *t, i64 *r0, i64 *r1) {
  int nth = 1;
  *t = 0;
#ifdef _OPENMP
  *t = omp_get_thread_num();
  nth = omp_get_num_threads();
#endif
  i64 per = (blocks + nth - 1) / nth;
  *r0 = *t * per * B;
  *r1 = (*t + 1) * per * B;
  if (*r1 > R) *r1 = R;
}

/* Threads for a pass over numel values: at most one per GRAIN values (torch's grain size for
 * its own CPU kernels), at most nt, at least 1. */
#define GRAIN 16384
static int threads_for(i64 numel, int nt) {
  i64 most = numel / GRAIN;
  if (nt < 1 || most < 2) return 1;
  return most < nt ? (int)most : nt;
}

/* After the forward collective: check the header, then global mean/invstd/count (float64, into
 * stats) and the
 * running statistics (only when the global count is >= 2; the unbiased variance; a non-finite
 * new value keeps the old one under POLICY_SKIP).
 * Returns WIRE_OK, WIRE_NONFINITE for a non-finite statistic under POLICY_RAISE (nothing
 * updated) or WIRE_MISMATCH for a header mismatch (nothing computed). */
static int forward_finish(const double *buf, i64 len, i64 C, double world, const i64 *f,
                             double eps, double momentum, void *rmean, int rmean_code,
                             void *rvar, int rvar_code, int policy, double *stats) {
  if (!header_ok(buf, len, world, f)) return WIRE_MISMATCH;
  const double *sum_x = buf + 1, *sum_x2 = buf + 1 + C;
  double n = buf[1 + 2 * C];
  double *mean_out = stats, *invstd_out = stats + C; /* stats: mean (C), invstd (C), count */
  stats[2 * C] = n;
  if (policy == POLICY_RAISE) {
    for (i64 i = 0; i < 2 * C; ++i)
      if (!isfinite(buf[1 + i])) return WIRE_NONFINITE;
  }
  int update = n >= 2.0;
  for (i64 c = 0; c < C; ++c) {
    double mean = sum_x[c] / n;
    double var = sum_x2[c] / n - mean * mean;
    if (var < 0.0) var = 0.0;
    mean_out[c] = mean;
    invstd_out[c] = 1.0 / sqrt(var + eps);
    if (!update) continue;
    if (rmean_code != DT_NONE) {
      double old = load(rmean, rmean_code, c);
      double v = old * (1.0 - momentum) + mean * momentum;
      store(rmean, rmean_code, c, (policy == POLICY_SKIP && !isfinite(v)) ? old : v);
    }
    if (rvar_code != DT_NONE) {
      double old = load(rvar, rvar_code, c);
      double v = old * (1.0 - momentum) + var * (n / (n - 1.0)) * momentum;
      store(rvar, rvar_code, c, (policy == POLICY_SKIP && !isfinite(v)) ? old : v);
    }
  }
  return WIRE_OK;
}

#include "local.h"

/* Per dtype: T, the name suffix, and the smallest T above -1 (elu's inverse clamps y / alpha
 * there: log1p(-1) is -inf). */
#define T float
#define SFX(name) name##_f32
#define T_ABOVE_MINUS_ONE (-1.0f + FLT_EPSILON / 2)
#include "kernel_body.h"
#undef T
#undef SFX
#undef T_ABOVE_MINUS_ONE

#define T double
#define SFX(name) name##_f64
#define T_ABOVE_MINUS_ONE (-1.0 + DBL_EPSILON / 2)
#include "kernel_body.h"
#undef T
#undef SFX
#undef T_ABOVE_MINUS_ONE
