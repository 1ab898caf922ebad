/* syncbn's fused CPU kernels: the full-size passes of synchronized batch norm, one pass each.
 *
 * Built on first use by syncbn/_kernel.py (cc -O3 -march=native -fopenmp, cached) and called
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
#define BLOCK 4096            /* values per block in the NCS statistics */
#define VBYTES 32             /* vector width of the NCS sums (AVX2; GCC vector extensions) */
#define NSC_BLOCK_BYTES 262144 /* bytes of rows per block in the NSC statistics (in L2) */
#define NSC_BLOCK_ROWS 1024   /* and at most this many rows: values per channel summed in T */

int syncbn_kernel_version(void) { return 8; }

/* The argument blocks of the four exported calls (per dtype: _f32, _f64), packed by
 * syncbn/_kernel.py with struct formats that must match (_kernel.ARG_FORMATS): one pointer
 * argument per call instead of 14-28 (ctypes converts each argument on every call: ~4 us per
 * call, against ~1 us to pack a block). Pointers travel as int64 (0 for NULL), then doubles
 * first, all fields 8 bytes: no padding. */
typedef struct { /* "<14q" */
  i64 x, N, C, S, nsc, nt, buf, len, f[NFIELDS];
} forward_reduce_args;
typedef struct { /* "<3d25q" */
  double world, eps, momentum;
  i64 buf, len, f[NFIELDS], rmean, rmean_code, rvar, rvar_code, policy, stats, x, y, N, C, S, nsc,
      nt, w, wc, b, bc;
} forward_apply_args;
typedef struct { /* "<21q" */
  i64 dy, x, N, C, S, nsc, nt, mean, invstd, buf, len, f[NFIELDS], gw, gwc, gb, gbc;
} backward_reduce_args;
typedef struct { /* "<d19q" */
  double world;
  i64 buf, len, f[NFIELDS], dy, x, dx, N, C, S, nsc, nt, stats, w, wc;
} backward_apply_args;
_Static_assert(sizeof(forward_reduce_args) == 14 * 8, "forward_reduce_args");
_Static_assert(sizeof(forward_apply_args) == 28 * 8, "forward_apply_args");
_Static_assert(sizeof(backward_reduce_args) == 21 * 8, "backward_reduce_args");
_Static_assert(sizeof(backward_apply_args) == 20 * 8, "backward_apply_args");

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

#define T float
#define SFX(name) name##_f32
#include "kernel_body.h"
#undef T
#undef SFX

#define T double
#define SFX(name) name##_f64
#include "kernel_body.h"
#undef T
#undef SFX
