/* The type-generic kernels of kernel.c, included once per dtype with T (float or double) and
 * SFX(name) (name_f32 or name_f64) defined. See kernel.c for layouts, numerics and the buffer. */

/* GCC/clang vector extensions: VL lanes of T, loaded unaligned with memcpy. */
typedef T SFX(vec) __attribute__((vector_size(VBYTES)));
#define VL ((i64)(VBYTES / sizeof(T)))

static inline T SFX(hsum)(SFX(vec) v) {
  T t = 0;
  for (i64 j = 0; j < VL; ++j) t += v[j];
  return t;
}

/* Sums over `rows` rows of S values `stride` apart, in vectors of accumulators (one horizontal
 * sum per call, not per row): sum(p); and with `k`, sum(p - k) and sum((p - k)^2). Four
 * independent accumulators per sum, so that the loop is bound by loads, not by the latency of
 * one chain of vector adds (4x faster on a row in L1 or L2). */
#define LOADV(v, p) __builtin_memcpy(&(v), (p), sizeof(v))
static inline T SFX(rows_sum)(const T *p, i64 stride, i64 rows, i64 S) {
  SFX(vec) a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
  T tail = 0;
  for (i64 r = 0; r < rows; ++r, p += stride) {
    i64 s = 0;
    for (; s + 4 * VL <= S; s += 4 * VL) {
      SFX(vec) v0, v1, v2, v3;
      LOADV(v0, p + s);
      LOADV(v1, p + s + VL);
      LOADV(v2, p + s + 2 * VL);
      LOADV(v3, p + s + 3 * VL);
      a0 += v0;
      a1 += v1;
      a2 += v2;
      a3 += v3;
    }
    for (; s + VL <= S; s += VL) {
      SFX(vec) v;
      LOADV(v, p + s);
      a0 += v;
    }
    for (; s < S; ++s) tail += p[s];
  }
  return SFX(hsum)((a0 + a1) + (a2 + a3)) + tail;
}

static inline void SFX(rows_centered)(const T *p, i64 stride, i64 rows, i64 S, T k, T *s1,
                                      T *s2) {
  SFX(vec) a0 = {0}, a1 = {0}, q0 = {0}, q1 = {0};
  T t1 = 0, t2 = 0;
  for (i64 r = 0; r < rows; ++r, p += stride) {
    i64 s = 0;
    for (; s + 2 * VL <= S; s += 2 * VL) {
      SFX(vec) v0, v1;
      LOADV(v0, p + s);
      LOADV(v1, p + s + VL);
      v0 -= k;
      v1 -= k;
      a0 += v0;
      a1 += v1;
      q0 += v0 * v0;
      q1 += v1 * v1;
    }
    for (; s + VL <= S; s += VL) {
      SFX(vec) v;
      LOADV(v, p + s);
      v -= k;
      a0 += v;
      q0 += v * v;
    }
    for (; s < S; ++s) {
      T d = p[s] - k;
      t1 += d;
      t2 += d * d;
    }
  }
  *s1 = SFX(hsum)(a0 + a1) + t1;
  *s2 = SFX(hsum)(q0 + q1) + t2;
}

/* sum(dy) and sum(dy * (x - m)) over `rows` rows of S values `stride` apart. */
static inline void SFX(rows_dot)(const T *dy, const T *x, i64 stride, i64 rows, i64 S, T m,
                                 T *sdy, T *sdyx) {
  SFX(vec) a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};
  T t1 = 0, t2 = 0;
  for (i64 r = 0; r < rows; ++r, dy += stride, x += stride) {
    i64 s = 0;
    for (; s + 2 * VL <= S; s += 2 * VL) {
      SFX(vec) d0, d1, v0, v1;
      LOADV(d0, dy + s);
      LOADV(d1, dy + s + VL);
      LOADV(v0, x + s);
      LOADV(v1, x + s + VL);
      a0 += d0;
      a1 += d1;
      b0 += d0 * (v0 - m);
      b1 += d1 * (v1 - m);
    }
    for (; s + VL <= S; s += VL) {
      SFX(vec) d, v;
      LOADV(d, dy + s);
      LOADV(v, x + s);
      a0 += d;
      b0 += d * (v - m);
    }
    for (; s < S; ++s) {
      t1 += dy[s];
      t2 += dy[s] * (x[s] - m);
    }
  }
  *sdy = SFX(hsum)(a0 + a1) + t1;
  *sdyx = SFX(hsum)(b0 + b1) + t2;
}

/* The NSC statistics, per channel over `rows` rows of C values (x[r*C + c]), in register tiles
 * of TILE = 4 vectors of channels carried down all the rows (one load per vector and row, and
 * eight independent chains of adds), then the channels left over one at a time. Writing the
 * running sums back to memory on every row (as a loop over c per row does) is bound by stores. */
#define TILE (4 * VL)
#define TILE_LOOP(x0, init, body, done)                                            \
  for (; c + TILE <= C; c += TILE) {                                               \
    init;                                                                          \
    const T *p = (x0) + c;                                                         \
    for (i64 r = 0; r < rows; ++r, p += C) {                                       \
      SFX(vec) v0, v1, v2, v3;                                                     \
      LOADV(v0, p);                                                                \
      LOADV(v1, p + VL);                                                           \
      LOADV(v2, p + 2 * VL);                                                       \
      LOADV(v3, p + 3 * VL);                                                       \
      body;                                                                        \
    }                                                                              \
    done;                                                                          \
  }
#define STOREV(p, v) __builtin_memcpy((p), &(v), sizeof(v))

/* k[c] = sum over the rows of x[r*C + c] */
static void SFX(nsc_sum)(const T *x, i64 C, i64 rows, T *k) {
  i64 c = 0;
  TILE_LOOP(x, SFX(vec) a0 = {0}; SFX(vec) a1 = {0}; SFX(vec) a2 = {0}; SFX(vec) a3 = {0},
            a0 += v0; a1 += v1; a2 += v2; a3 += v3,
            STOREV(k + c, a0); STOREV(k + c + VL, a1); STOREV(k + c + 2 * VL, a2);
            STOREV(k + c + 3 * VL, a3))
  for (; c < C; ++c) {
    T t = 0;
    for (i64 r = 0; r < rows; ++r) t += x[r * C + c];
    k[c] = t;
  }
}

/* s1[c] = sum (x - k[c]), s2[c] = sum (x - k[c])^2 over the rows */
static void SFX(nsc_centered)(const T *x, i64 C, i64 rows, const T *k, T *s1, T *s2) {
  i64 c = 0;
  TILE_LOOP(x,
            SFX(vec) k0; SFX(vec) k1; SFX(vec) k2; SFX(vec) k3; LOADV(k0, k + c);
            LOADV(k1, k + c + VL); LOADV(k2, k + c + 2 * VL); LOADV(k3, k + c + 3 * VL);
            SFX(vec) a0 = {0}; SFX(vec) a1 = {0}; SFX(vec) a2 = {0}; SFX(vec) a3 = {0};
            SFX(vec) q0 = {0}; SFX(vec) q1 = {0}; SFX(vec) q2 = {0}; SFX(vec) q3 = {0},
            v0 -= k0; v1 -= k1; v2 -= k2; v3 -= k3; a0 += v0; a1 += v1; a2 += v2; a3 += v3;
            q0 += v0 * v0; q1 += v1 * v1; q2 += v2 * v2; q3 += v3 * v3,
            STOREV(s1 + c, a0); STOREV(s1 + c + VL, a1); STOREV(s1 + c + 2 * VL, a2);
            STOREV(s1 + c + 3 * VL, a3); STOREV(s2 + c, q0); STOREV(s2 + c + VL, q1);
            STOREV(s2 + c + 2 * VL, q2); STOREV(s2 + c + 3 * VL, q3))
  for (; c < C; ++c) {
    T t1 = 0, t2 = 0;
    for (i64 r = 0; r < rows; ++r) {
      T d = x[r * C + c] - k[c];
      t1 += d;
      t2 += d * d;
    }
    s1[c] = t1;
    s2[c] = t2;
  }
}

/* a[c] = sum dy, b[c] = sum dy * (x - m[c]) over the rows (dy and x in the same layout) */
static void SFX(nsc_dot)(const T *dy, const T *x, i64 C, i64 rows, const T *m, T *a, T *b) {
  i64 c = 0;
  TILE_LOOP(x, const T *q = dy + c; /* dy's rows, alongside x's */
            SFX(vec) m0; SFX(vec) m1; SFX(vec) m2; SFX(vec) m3; LOADV(m0, m + c);
            LOADV(m1, m + c + VL); LOADV(m2, m + c + 2 * VL); LOADV(m3, m + c + 3 * VL);
            SFX(vec) a0 = {0}; SFX(vec) a1 = {0}; SFX(vec) a2 = {0}; SFX(vec) a3 = {0};
            SFX(vec) b0 = {0}; SFX(vec) b1 = {0}; SFX(vec) b2 = {0}; SFX(vec) b3 = {0},
            SFX(vec) d0; SFX(vec) d1; SFX(vec) d2; SFX(vec) d3; LOADV(d0, q);
            LOADV(d1, q + VL); LOADV(d2, q + 2 * VL); LOADV(d3, q + 3 * VL); q += C;
            a0 += d0; a1 += d1; a2 += d2; a3 += d3; b0 += d0 * (v0 - m0);
            b1 += d1 * (v1 - m1); b2 += d2 * (v2 - m2); b3 += d3 * (v3 - m3),
            STOREV(a + c, a0); STOREV(a + c + VL, a1); STOREV(a + c + 2 * VL, a2);
            STOREV(a + c + 3 * VL, a3); STOREV(b + c, b0); STOREV(b + c + VL, b1);
            STOREV(b + c + 2 * VL, b2); STOREV(b + c + 3 * VL, b3))
  for (; c < C; ++c) {
    T t1 = 0, t2 = 0;
    for (i64 r = 0; r < rows; ++r) {
      T d = dy[r * C + c];
      t1 += d;
      t2 += d * (x[r * C + c] - m[c]);
    }
    a[c] = t1;
    b[c] = t2;
  }
}
#undef STOREV
#undef TILE_LOOP
#undef TILE
#undef LOADV
#undef VL

/* Mean and sum of squared deviations of channel c in the NCS layout: blocks of at most BLOCK
 * values (part of a row, or whole rows of this channel), each summed twice while in cache. */
static void SFX(channel_moments_ncs)(const T *x, i64 N, i64 C, i64 S, i64 c, double *mean,
                                     double *q) {
  double na = 0.0, ma = 0.0, qa = 0.0;
  i64 chunk = S < BLOCK ? S : BLOCK, g = S < BLOCK ? BLOCK / S : 1; /* g rows of chunk values */
  for (i64 n0 = 0; n0 < N; n0 += g) {
    i64 rows = N - n0 < g ? N - n0 : g;
    for (i64 s0 = 0; s0 < S; s0 += chunk) {
      i64 len = S - s0 < chunk ? S - s0 : chunk;
      const T *p = x + (n0 * C + c) * S + s0;
      double m = (double)(rows * len), inv = 1.0 / m;
      T k = SFX(rows_sum)(p, C * S, rows, len) / (T)m, s1, s2;
      SFX(rows_centered)(p, C * S, rows, len, k, &s1, &s2);
      double bm = (double)k + (double)s1 * inv;
      double bq = (double)s2 - (double)s1 * (double)s1 * inv;
      if (bq < 0.0) bq = 0.0;
      if (na == 0.0) {
        na = m;
        ma = bm;
        qa = bq;
      } else {
        merge(&na, &ma, &qa, m, bm, bq);
      }
    }
  }
  *mean = ma;
  *q = qa;
}

/* Mean and sum of squared deviations of rows [r0, r1) in the NSC layout, per channel, merged
 * into (*na, ma[C], qa[C]); scratch holds 3*C values of T. */
static void SFX(rows_moments_nsc)(const T *x, i64 C, i64 r0, i64 r1, i64 B, double *na,
                                  double *ma, double *qa, T *scratch) {
  T *k = scratch, *s1 = scratch + C, *s2 = scratch + 2 * C;
  for (i64 b0 = r0; b0 < r1; b0 += B) {
    i64 rows = r1 - b0 < B ? r1 - b0 : B;
    SFX(nsc_sum)(x + b0 * C, C, rows, k);
    T inv = (T)1 / (T)rows;
#pragma omp simd
    for (i64 c = 0; c < C; ++c) k[c] *= inv;
    SFX(nsc_centered)(x + b0 * C, C, rows, k, s1, s2);
    double nb = (double)rows;
    for (i64 c = 0; c < C; ++c) {
      double bm = (double)k[c] + (double)s1[c] / nb;
      double bq = (double)s2[c] - (double)s1[c] * (double)s1[c] / nb;
      double n = *na; /* every channel has the same count */
      merge(&n, ma + c, qa + c, nb, bm, bq < 0.0 ? 0.0 : bq);
    }
    *na += nb;
  }
}

/* Rows per block of the NSC statistics: at most NSC_BLOCK_BYTES of rows and NSC_BLOCK_ROWS rows
 * (values per channel summed in T), and no more than an even share of the R rows over nt
 * threads. */
static i64 SFX(nsc_block_rows)(i64 R, i64 C, int nt) {
  i64 b = NSC_BLOCK_BYTES / (C * (i64)sizeof(T)), share = (R + nt - 1) / nt;
  if (b > NSC_BLOCK_ROWS) b = NSC_BLOCK_ROWS;
  if (b > share) b = share;
  return b < 1 ? 1 : b;
}

/* Forward, before the collective: payload [sum(x) (C), sum(x^2) (C), n] and the header into
 * buf (len numbers). Returns WIRE_OK, or WIRE_NO_MEMORY. */
static int SFX(forward_reduce)(const T *x, i64 N, i64 C, i64 S, int nsc, int nt, double *buf,
                               i64 len, i64 f0, i64 f1, i64 f2, i64 f3, i64 f4, i64 f5) {
  i64 f[NFIELDS] = {f0, f1, f2, f3, f4, f5};
  double *sum_x = buf + 1, *sum_x2 = buf + 1 + C, n = (double)(N * S);
  nt = threads_for(N * C * S, nt);
  pack_header(buf, len, 2 * C + 1, f);
  buf[1 + 2 * C] = n;
  if (N * S == 0) {
    memset(sum_x, 0, sizeof(double) * (size_t)(2 * C));
    return 0;
  }
  if (!nsc) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i64 c = 0; c < C; ++c) {
      double mean, q;
      SFX(channel_moments_ncs)(x, N, C, S, c, &mean, &q);
      sum_x[c] = n * mean;
      sum_x2[c] = q + n * mean * mean;
    }
    return 0;
  }
  i64 R = N * S, B = SFX(nsc_block_rows)(R, C, nt), blocks = (R + B - 1) / B;
  if (nt > blocks) nt = (int)blocks;
  double *acc = malloc(sizeof(double) * (size_t)(nt * (2 * C + 1)));
  T *scratch = malloc(sizeof(T) * (size_t)(nt * 3 * C));
  if (!acc || !scratch) {
    free(acc);
    free(scratch);
    return WIRE_NO_MEMORY;
  }
  memset(acc, 0, sizeof(double) * (size_t)(nt * (2 * C + 1)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int t;
    i64 r0, r1;
    thread_rows(R, B, blocks, &t, &r0, &r1);
    double *mine = acc + t * (2 * C + 1);
    if (r0 < r1)
      SFX(rows_moments_nsc)(x, C, r0, r1, B, mine + 2 * C, mine, mine + C, scratch + t * 3 * C);
  }
  for (int t = 1; t < nt; ++t) { /* in thread order: deterministic for a given nt */
    double *a = acc, *b = acc + t * (2 * C + 1);
    for (i64 c = 0; c < C; ++c) {
      double n = a[2 * C];
      merge(&n, a + c, a + C + c, b[2 * C], b[c], b[C + c]);
    }
    a[2 * C] += b[2 * C];
  }
  for (i64 c = 0; c < C; ++c) {
    sum_x[c] = n * acc[c];
    sum_x2[c] = acc[C + c] + n * acc[c] * acc[c];
  }
  free(acc);
  free(scratch);
  return 0;
}

/* Per-channel a, m, b (in T) of y = (x - m) * a + b: a = invstd * weight, b = bias. */
static inline void SFX(affine)(i64 c, const double *mean, const double *invstd, const void *w,
                               int wc, const void *b, int bc, T *m_o, T *a_o, T *b_o) {
  *m_o = (T)mean[c];
  *a_o = (T)(invstd[c] * (wc == DT_NONE ? 1.0 : load(w, wc, c)));
  *b_o = (T)(bc == DT_NONE ? 0.0 : load(b, bc, c));
}

/* The activation of the affine output z, per element (k: an ACT_* constant at every call, via
 * ACT_SWITCH; p: leaky_relu's slope, elu's alpha), with torch's conventions: act_fwd is
 * F.relu/leaky_relu/elu; act_dz the derivative at z (torch's at z = 0); act_dy the same
 * derivative from the output y (relu, and the invertible kinds: y > 0 exactly when z > 0;
 * elu's alpha * exp(z) is y + alpha); act_inv the z of an output y (invertible kinds; elu's
 * log1p(y / alpha) clamped above -1, so that an output rounded to -alpha gives log(eps/2)). */
static inline T SFX(act_fwd)(int k, T p, T z) {
  if (k == ACT_RELU) return z < 0 ? (T)0 : z;
  if (k == ACT_LEAKY_RELU) return z > 0 ? z : z * p;
  if (k == ACT_ELU) {
    T e = p * (T)expm1_((double)z); /* on every lane, then chosen: the loop stays branch-free */
    return z > 0 ? z : e;
  }
  return z;
}

static inline T SFX(act_dz)(int k, T p, T z) {
  if (k == ACT_RELU) return z > 0 ? (T)1 : (T)0;
  if (k == ACT_LEAKY_RELU) return z > 0 ? (T)1 : p;
  if (k == ACT_ELU) {
    T e = p * (T)exp_((double)z);
    return z > 0 ? (T)1 : e;
  }
  return 1;
}

static inline T SFX(act_dy)(int k, T p, T y) {
  if (k == ACT_RELU) return y > 0 ? (T)1 : (T)0;
  if (k == ACT_LEAKY_RELU) return y > 0 ? (T)1 : p;
  if (k == ACT_ELU) return y > 0 ? (T)1 : y + p;
  return 1;
}

static inline T SFX(act_inv)(int k, T p, T y) {
  if (k == ACT_LEAKY_RELU) return y > 0 ? y : y / p;
  if (k == ACT_ELU) {
    T t = y / p;
    T z = (T)log1p_((double)(t < T_ABOVE_MINUS_ONE ? T_ABOVE_MINUS_ONE : t));
    return y > 0 ? y : z;
  }
  return y;
}

/* y = act((x - mean) * invstd * weight + bias); y may be x. Returns 0, or -1 when out of
 * memory. */
static int SFX(normalize)(const T *x, T *y, i64 N, i64 C, i64 S, int nsc, int nt,
                          const double *mean, const double *invstd, const void *w, int wc,
                          const void *b, int bc, int act, T p) {
  nt = threads_for(N * C * S, nt);
  if (!nsc) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i64 r = 0; r < N * C; ++r) {
      T m, a, bb;
      SFX(affine)(r % C, mean, invstd, w, wc, b, bc, &m, &a, &bb);
      const T *xr = x + r * S;
      T *yr = y + r * S;
#define ROW(K)                                                                                 \
  _Pragma("omp simd") for (i64 s = 0; s < S; ++s) yr[s] = SFX(act_fwd)(K, p, (xr[s] - m) * a + bb)
      ACT_SWITCH(act, ROW)
#undef ROW
    }
    return 0;
  }
  T *coef = malloc(sizeof(T) * (size_t)(3 * C));
  if (!coef) return -1;
  T *m = coef, *a = coef + C, *bb = coef + 2 * C;
  for (i64 c = 0; c < C; ++c) SFX(affine)(c, mean, invstd, w, wc, b, bc, m + c, a + c, bb + c);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (i64 r = 0; r < N * S; ++r) {
    const T *xr = x + r * C;
    T *yr = y + r * C;
#define ROW(K)                                                                                 \
  _Pragma("omp simd") for (i64 c = 0; c < C; ++c)                                              \
      yr[c] = SFX(act_fwd)(K, p, (xr[c] - m[c]) * a[c] + bb[c])
    ACT_SWITCH(act, ROW)
#undef ROW
  }
  free(coef);
  return 0;
}

/* Per-channel coefficients (in T) of an activated backward: m = mean, za = invstd * weight,
 * zb = bias (z = (x - m) * za + zb), wt = weight (xhat = (z - zb) / wt from an output). */
static inline void SFX(act_coef)(i64 c, const double *mean, const double *invstd, const void *w,
                                 int wc, const void *b, int bc, T *m, T *za, T *zb, T *wt) {
  double wv = wc == DT_NONE ? 1.0 : load(w, wc, c);
  *m = (T)mean[c];
  *za = (T)(invstd[c] * wv);
  *zb = (T)(bc == DT_NONE ? 0.0 : load(b, bc, c));
  *wt = (T)wv;
}

/* The backward sums of an activated layer: sums = [sum(dz) (C), sum(dz * xhat) (C)] with
 * dz = dy * act'(z): from x (y NULL: z recomputed, sum(dz * (x - mean)) * invstd) or from the
 * output y alone (x not read: z = act^-1(y), xhat = (z - bias) / weight). Summed in T over at
 * most BLOCK values (NCS) or NSC_BLOCK_ROWS rows (NSC), then in float64, like the plain sums.
 * Returns 0, or -1 when out of memory. */
static int SFX(act_sums)(const T *dy, const T *x, const T *y, i64 N, i64 C, i64 S, int nsc,
                         int nt, const double *mean, const double *invstd, const void *w, int wc,
                         const void *b, int bc, int act, T p, double *sums) {
  if (!nsc) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i64 c = 0; c < C; ++c) {
      T m, za, zb, wt;
      SFX(act_coef)(c, mean, invstd, w, wc, b, bc, &m, &za, &zb, &wt);
      double sdz = 0.0, sdzx = 0.0;
      for (i64 n = 0; n < N; ++n) {
        i64 row = (n * C + c) * S;
        for (i64 s0 = 0; s0 < S; s0 += BLOCK) {
          i64 len = S - s0 < BLOCK ? S - s0 : BLOCK, off = row + s0;
          const T *dr = dy + off;
          T t1 = 0, t2 = 0;
          if (y) {
            const T *yr = y + off;
#define RUN(K)                                                                                 \
  _Pragma("omp simd reduction(+ : t1, t2)") for (i64 s = 0; s < len; ++s) {                   \
    T v = yr[s], g = dr[s] * SFX(act_dy)(K, p, v);                                            \
    t1 += g;                                                                                   \
    t2 += g * ((SFX(act_inv)(K, p, v) - zb) / wt);                                            \
  }
            ACT_SWITCH(act, RUN)
#undef RUN
          } else {
            const T *xr = x + off;
#define RUN(K)                                                                                 \
  _Pragma("omp simd reduction(+ : t1, t2)") for (i64 s = 0; s < len; ++s) {                   \
    T xm = xr[s] - m, g = dr[s] * SFX(act_dz)(K, p, xm * za + zb);                            \
    t1 += g;                                                                                   \
    t2 += g * xm;                                                                              \
  }
            ACT_SWITCH(act, RUN)
#undef RUN
          }
          sdz += (double)t1;
          sdzx += (double)t2;
        }
      }
      sums[c] = sdz;
      sums[C + c] = y ? sdzx : sdzx * invstd[c];
    }
    return 0;
  }
  i64 R = N * S, B = SFX(nsc_block_rows)(R, C, nt), blocks = (R + B - 1) / B;
  if (nt > blocks) nt = (int)blocks;
  double *acc = calloc((size_t)(nt * 2 * C), sizeof(double));
  T *coef = malloc(sizeof(T) * (size_t)((4 + 2 * nt) * C));
  if (!acc || !coef) {
    free(acc);
    free(coef);
    return -1;
  }
  T *m = coef, *za = coef + C, *zb = coef + 2 * C, *wt = coef + 3 * C;
  for (i64 c = 0; c < C; ++c) SFX(act_coef)(c, mean, invstd, w, wc, b, bc, m + c, za + c, zb + c,
                                            wt + c);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int t;
    i64 r0, r1;
    thread_rows(R, B, blocks, &t, &r0, &r1);
    double *mine = acc + t * 2 * C;
    T *ta = coef + (4 + 2 * t) * C, *tb = ta + C;
    for (i64 b0 = r0; b0 < r1; b0 += B) {
      i64 e = r1 - b0 < B ? r1 : b0 + B;
      memset(ta, 0, sizeof(T) * (size_t)(2 * C));
      for (i64 r = b0; r < e; ++r) {
        const T *dr = dy + r * C;
        if (y) {
          const T *yr = y + r * C;
#define RUN(K)                                                                                 \
  _Pragma("omp simd") for (i64 c = 0; c < C; ++c) {                                           \
    T v = yr[c], g = dr[c] * SFX(act_dy)(K, p, v);                                            \
    ta[c] += g;                                                                                \
    tb[c] += g * ((SFX(act_inv)(K, p, v) - zb[c]) / wt[c]);                                   \
  }
          ACT_SWITCH(act, RUN)
#undef RUN
        } else {
          const T *xr = x + r * C;
#define RUN(K)                                                                                 \
  _Pragma("omp simd") for (i64 c = 0; c < C; ++c) {                                           \
    T xm = xr[c] - m[c], g = dr[c] * SFX(act_dz)(K, p, xm * za[c] + zb[c]);                   \
    ta[c] += g;                                                                                \
    tb[c] += g * xm;                                                                           \
  }
          ACT_SWITCH(act, RUN)
#undef RUN
        }
      }
      for (i64 c = 0; c < C; ++c) {
        mine[c] += (double)ta[c];
        mine[C + c] += (double)tb[c];
      }
    }
  }
  for (i64 c = 0; c < C; ++c) { /* in thread order: deterministic for a given nt */
    double sdz = 0.0, sdzx = 0.0;
    for (int t = 0; t < nt; ++t) {
      sdz += acc[t * 2 * C + c];
      sdzx += acc[t * 2 * C + C + c];
    }
    sums[c] = sdz;
    sums[C + c] = y ? sdzx : sdzx * invstd[c];
  }
  free(acc);
  free(coef);
  return 0;
}

/* grad_input of an activated layer: dx = weight * invstd * (dz - sum(dz)/n - xhat *
 * sum(dz * xhat)/n), dz and xhat from x (y NULL; written dz * a + (x - mean) * b + k, mean
 * first) or from the output y alone (dz * a + xhat * b + k). Returns 0, or -1 when out of
 * memory. */
static int SFX(backward_input_act)(const T *dy, const T *x, const T *y, T *dx, i64 N, i64 C,
                                   i64 S, int nsc, int nt, const double *mean,
                                   const double *invstd, const void *w, int wc, const void *b,
                                   int bc, const double *sums, double count, int act, T p) {
  nt = threads_for(N * C * S, nt);
  /* per channel: m, za, zb, wt (act_coef), then gb (the xhat or x - mean term) and gk */
  T *coef = malloc(sizeof(T) * (size_t)(6 * C));
  if (!coef) return -1;
  T *m = coef, *za = coef + C, *zb = coef + 2 * C, *wt = coef + 3 * C, *gb = coef + 4 * C,
    *gk = coef + 5 * C;
  for (i64 c = 0; c < C; ++c) {
    SFX(act_coef)(c, mean, invstd, w, wc, b, bc, m + c, za + c, zb + c, wt + c);
    double wi = invstd[c] * (wc == DT_NONE ? 1.0 : load(w, wc, c));
    gb[c] = (T)(-wi * (y ? 1.0 : invstd[c]) * (sums[C + c] / count));
    gk[c] = (T)(-wi * (sums[c] / count));
  }
  if (!nsc) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i64 r = 0; r < N * C; ++r) {
      i64 c = r % C;
      T mc = m[c], a = za[c], zbc = zb[c], wtc = wt[c], bc_ = gb[c], k = gk[c];
      const T *dr = dy + r * S;
      T *out = dx + r * S;
      if (y) {
        const T *yr = y + r * S;
#define RUN(K)                                                                                 \
  _Pragma("omp simd") for (i64 s = 0; s < S; ++s) {                                           \
    T v = yr[s];                                                                               \
    out[s] = dr[s] * SFX(act_dy)(K, p, v) * a + ((SFX(act_inv)(K, p, v) - zbc) / wtc) * bc_ + k; \
  }
        ACT_SWITCH(act, RUN)
#undef RUN
      } else {
        const T *xr = x + r * S;
#define RUN(K)                                                                                 \
  _Pragma("omp simd") for (i64 s = 0; s < S; ++s) {                                           \
    T xm = xr[s] - mc;                                                                         \
    out[s] = dr[s] * SFX(act_dz)(K, p, xm * a + zbc) * a + xm * bc_ + k;                       \
  }
        ACT_SWITCH(act, RUN)
#undef RUN
      }
    }
    free(coef);
    return 0;
  }
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (i64 r = 0; r < N * S; ++r) {
    const T *dr = dy + r * C;
    T *out = dx + r * C;
    if (y) {
      const T *yr = y + r * C;
#define RUN(K)                                                                                 \
  _Pragma("omp simd") for (i64 c = 0; c < C; ++c) {                                           \
    T v = yr[c];                                                                               \
    out[c] = dr[c] * SFX(act_dy)(K, p, v) * za[c] +                                            \
             ((SFX(act_inv)(K, p, v) - zb[c]) / wt[c]) * gb[c] + gk[c];                        \
  }
      ACT_SWITCH(act, RUN)
#undef RUN
    } else {
      const T *xr = x + r * C;
#define RUN(K)                                                                                 \
  _Pragma("omp simd") for (i64 c = 0; c < C; ++c) {                                           \
    T xm = xr[c] - m[c];                                                                       \
    out[c] = dr[c] * SFX(act_dz)(K, p, xm * za[c] + zb[c]) * za[c] + xm * gb[c] + gk[c];      \
  }
      ACT_SWITCH(act, RUN)
#undef RUN
    }
  }
  free(coef);
  return 0;
}

/* Backward, before the collective: local sum(dy) and sum(dy * xhat) per channel, into the
 * payload [sum(dy) (C), sum(dy * xhat) (C)] of buf with the header (when buf is not NULL), and
 * into the local weight/bias gradients gw, gb (when their codes are not DT_NONE).
 * Returns WIRE_OK, or WIRE_NO_MEMORY. */
static int SFX(backward_reduce)(const T *dy, const T *x, i64 N, i64 C, i64 S, int nsc, int nt,
                                const double *mean, const double *invstd, double *buf, i64 len,
                                i64 f0, i64 f1, i64 f2, i64 f3, i64 f4, i64 f5, void *gw, int gwc,
                                void *gb, int gbc, int act, T p, const T *y, const void *w,
                                int wc, const void *b, int bc) {
  i64 f[NFIELDS] = {f0, f1, f2, f3, f4, f5};
  double *sums = calloc((size_t)(2 * C), sizeof(double));
  if (!sums) return WIRE_NO_MEMORY;
  nt = threads_for(N * C * S, nt);
  if (N * S == 0) {
    /* an empty shard adds nothing (its invstd may be NaN: a global batch of 0) */
  } else if (act != ACT_IDENTITY || y) {
    if (SFX(act_sums)(dy, x, y, N, C, S, nsc, nt, mean, invstd, w, wc, b, bc, act, p, sums)) {
      free(sums);
      return WIRE_NO_MEMORY;
    }
  } else if (!nsc) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i64 c = 0; c < C; ++c) {
      double sdy = 0.0, sdyx = 0.0;
      i64 chunk = S < BLOCK ? S : BLOCK, g = S < BLOCK ? BLOCK / S : 1;
      for (i64 n0 = 0; n0 < N; n0 += g) { /* blocks of at most BLOCK values, as in the forward */
        i64 rows = N - n0 < g ? N - n0 : g;
        for (i64 s0 = 0; s0 < S; s0 += chunk) {
          i64 len = S - s0 < chunk ? S - s0 : chunk, off = (n0 * C + c) * S + s0;
          T a, b;
          SFX(rows_dot)(dy + off, x + off, C * S, rows, len, (T)mean[c], &a, &b);
          sdy += (double)a;
          sdyx += (double)b;
        }
      }
      sums[c] = sdy;
      sums[C + c] = sdyx * invstd[c];
    }
  } else {
    i64 R = N * S, B = SFX(nsc_block_rows)(R, C, nt), blocks = R > 0 ? (R + B - 1) / B : 1;
    if (nt > blocks) nt = (int)blocks;
    double *acc = calloc((size_t)(nt * 2 * C), sizeof(double));
    T *scratch = malloc(sizeof(T) * (size_t)(nt * 3 * C));
    if (!acc || !scratch) {
      free(acc);
      free(scratch);
      free(sums);
      return WIRE_NO_MEMORY;
    }
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      int t;
      i64 r0, r1;
      thread_rows(R, B, blocks, &t, &r0, &r1);
      double *mine = acc + t * 2 * C;
      T *m = scratch + t * 3 * C, *a = m + C, *b = m + 2 * C;
      for (i64 c = 0; c < C; ++c) m[c] = (T)mean[c];
      for (i64 b0 = r0; b0 < r1; b0 += B) {
        i64 e = r1 - b0 < B ? r1 : b0 + B;
        SFX(nsc_dot)(dy + b0 * C, x + b0 * C, C, e - b0, m, a, b);
        for (i64 c = 0; c < C; ++c) {
          mine[c] += (double)a[c];
          mine[C + c] += (double)b[c];
        }
      }
    }
    for (i64 c = 0; c < C; ++c) {
      double sdy = 0.0, sdyx = 0.0;
      for (int t = 0; t < nt; ++t) {
        sdy += acc[t * 2 * C + c];
        sdyx += acc[t * 2 * C + C + c];
      }
      sums[c] = sdy;
      sums[C + c] = sdyx * invstd[c];
    }
    free(acc);
    free(scratch);
  }
  for (i64 c = 0; c < C; ++c) {
    store(gb, gbc, c, sums[c]);
    store(gw, gwc, c, sums[C + c]);
  }
  if (buf) {
    pack_header(buf, len, 2 * C, f);
    memcpy(buf + 1, sums, sizeof(double) * (size_t)(2 * C));
  }
  free(sums);
  return 0;
}

/* Per-channel a, b, k (in T) of dx = dy * a + (x - m) * b + k from the global sums. */
static inline void SFX(grad_coef)(i64 c, i64 C, const double *mean, const double *invstd,
                                  const void *w, int wc, const double *sums, double count,
                                  T *m_o, T *a_o, T *b_o, T *k_o) {
  double wi = invstd[c] * (wc == DT_NONE ? 1.0 : load(w, wc, c));
  *m_o = (T)mean[c];
  *a_o = (T)wi;
  *b_o = (T)(-wi * invstd[c] * (sums[C + c] / count));
  *k_o = (T)(-wi * (sums[c] / count));
}

/* dx = weight * invstd * (dy - sum(dy)/n - xhat * sum(dy * xhat)/n) with the global sums
 * (the reduced payload [sum(dy) (C), sum(dy * xhat) (C)]) and global count n.
 * Returns 0, or -1 when out of memory. */
static int SFX(backward_input)(const T *dy, const T *x, T *dx, i64 N, i64 C, i64 S, int nsc,
                               int nt, const double *mean, const double *invstd, const void *w,
                               int wc, const double *sums, double count) {
  nt = threads_for(N * C * S, nt);
  if (!nsc) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i64 r = 0; r < N * C; ++r) {
      T m, a, b, k;
      SFX(grad_coef)(r % C, C, mean, invstd, w, wc, sums, count, &m, &a, &b, &k);
      const T *dr = dy + r * S, *xr = x + r * S;
      T *out = dx + r * S;
#pragma omp simd
      for (i64 s = 0; s < S; ++s) out[s] = dr[s] * a + (xr[s] - m) * b + k;
    }
    return 0;
  }
  T *coef = malloc(sizeof(T) * (size_t)(4 * C));
  if (!coef) return -1;
  T *m = coef, *a = coef + C, *b = coef + 2 * C, *k = coef + 3 * C;
  for (i64 c = 0; c < C; ++c)
    SFX(grad_coef)(c, C, mean, invstd, w, wc, sums, count, m + c, a + c, b + c, k + c);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (i64 r = 0; r < N * S; ++r) {
    const T *dr = dy + r * C, *xr = x + r * C;
    T *out = dx + r * C;
#pragma omp simd
    for (i64 c = 0; c < C; ++c) out[c] = dr[c] * a[c] + (xr[c] - m[c]) * b[c] + k[c];
  }
  free(coef);
  return 0;
}

/* After the forward collective, in one call: forward_finish (header check, mean, invstd and
 * count into stats, running statistics), then, unless it returned an error, the normalization of
 * x into y. Returns a WIRE_* code. */
static int SFX(forward_apply)(const double *buf, i64 len, double world, i64 f0, i64 f1, i64 f2,
                              i64 f3, i64 f4, i64 f5, double eps, double momentum, void *rmean,
                              int rmean_code, void *rvar, int rvar_code, int policy,
                              double *stats, const T *x, T *y, i64 N, i64 C, i64 S, int nsc,
                              int nt, const void *w, int wc, const void *b, int bc, int act,
                              T p) {
  i64 f[NFIELDS] = {f0, f1, f2, f3, f4, f5};
  int status = forward_finish(buf, len, C, world, f, eps, momentum, rmean, rmean_code, rvar,
                              rvar_code, policy, stats);
  if (status != WIRE_OK) return status;
  if (SFX(normalize)(x, y, N, C, S, nsc, nt, stats, stats + C, w, wc, b, bc, act, p))
    return WIRE_NO_MEMORY;
  return WIRE_OK;
}

/* After the backward collective, in one call: the header check, then grad_input from the
 * reduced payload and the forward's stats (mean, invstd, count); an activated layer's, or one
 * with its output y (x then not read), by backward_input_act. Returns a WIRE_* code (nothing
 * computed on WIRE_MISMATCH). */
static int SFX(backward_apply)(const double *buf, i64 len, double world, i64 f0, i64 f1, i64 f2,
                               i64 f3, i64 f4, i64 f5, const T *dy, const T *x, T *dx, i64 N,
                               i64 C, i64 S, int nsc, int nt, const double *stats, const void *w,
                               int wc, int act, T p, const T *y, const void *b, int bc) {
  i64 f[NFIELDS] = {f0, f1, f2, f3, f4, f5};
  if (!header_ok(buf, len, world, f)) return WIRE_MISMATCH;
  int failed;
  if (act != ACT_IDENTITY || y)
    failed = SFX(backward_input_act)(dy, x, y, dx, N, C, S, nsc, nt, stats, stats + C, w, wc, b,
                                     bc, buf + 1, stats[2 * C], act, p);
  else
    failed = SFX(backward_input)(dy, x, dx, N, C, S, nsc, nt, stats, stats + C, w, wc, buf + 1,
                                 stats[2 * C]);
  return failed ? WIRE_NO_MEMORY : WIRE_OK;
}

/* The exported calls: one argument block each (see kernel.c), unpacked into the calls above. */
#define P(type, v) ((type)(intptr_t)(v))
int SFX(syncbn_forward_reduce)(const forward_reduce_args *a) {
  return SFX(forward_reduce)(P(const T *, a->x), a->N, a->C, a->S, (int)a->nsc, (int)a->nt,
                             P(double *, a->buf), a->len, a->f[0], a->f[1], a->f[2], a->f[3],
                             a->f[4], a->f[5]);
}

int SFX(syncbn_forward_apply)(const forward_apply_args *a) {
  return SFX(forward_apply)(P(const double *, a->buf), a->len, a->world, a->f[0], a->f[1],
                            a->f[2], a->f[3], a->f[4], a->f[5], a->eps, a->momentum,
                            P(void *, a->rmean), (int)a->rmean_code, P(void *, a->rvar),
                            (int)a->rvar_code, (int)a->policy, P(double *, a->stats),
                            P(const T *, a->x), P(T *, a->y), a->N, a->C, a->S, (int)a->nsc,
                            (int)a->nt, P(const void *, a->w), (int)a->wc, P(const void *, a->b),
                            (int)a->bc, (int)a->act, (T)a->act_param);
}

int SFX(syncbn_backward_reduce)(const backward_reduce_args *a) {
  return SFX(backward_reduce)(P(const T *, a->dy), P(const T *, a->x), a->N, a->C, a->S,
                              (int)a->nsc, (int)a->nt, P(const double *, a->mean),
                              P(const double *, a->invstd), P(double *, a->buf), a->len, a->f[0],
                              a->f[1], a->f[2], a->f[3], a->f[4], a->f[5], P(void *, a->gw),
                              (int)a->gwc, P(void *, a->gb), (int)a->gbc, (int)a->act,
                              (T)a->act_param, P(const T *, a->y), P(const void *, a->w),
                              (int)a->wc, P(const void *, a->b), (int)a->bc);
}

int SFX(syncbn_backward_apply)(const backward_apply_args *a) {
  return SFX(backward_apply)(P(const double *, a->buf), a->len, a->world, a->f[0], a->f[1],
                             a->f[2], a->f[3], a->f[4], a->f[5], P(const T *, a->dy),
                             P(const T *, a->x), P(T *, a->dx), a->N, a->C, a->S, (int)a->nsc,
                             (int)a->nt, P(const double *, a->stats), P(const void *, a->w),
                             (int)a->wc, (int)a->act, (T)a->act_param, P(const T *, a->y),
                             P(const void *, a->b), (int)a->bc);
}
#undef P
