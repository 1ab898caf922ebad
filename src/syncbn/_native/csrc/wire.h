/* The collective's buffer, mirrored from syncbn/_wire.py (its one owner: same names, same numbers).
 *
 *   [1 | payload, zero-padded | (f, f*f) for each of the NFIELDS header fields | 1]
 *   forward payload:  sum(x) (C), sum(x^2) (C), n (1)
 *   backward payload: sum(dy) (C), sum(dy * xhat) (C)
 *
 * After the all_reduce over W ranks, every rank sent the same fields exactly when
 * head[2k] == W * f[k] and head[2k + 1] == W * f[k]^2 for every field, and both sentinels are W.
 */
#ifndef SYNCBN_WIRE_H
#define SYNCBN_WIRE_H

#include <stdint.h>
#include <string.h>

#define NFIELDS 6 /* ones, layer, layer-high, pass, channels, direction (_wire.FIELDS) */

/* Result codes of the kernel's calls (_wire.OK, MISMATCH, NONFINITE, NO_MEMORY). */
enum { WIRE_OK = 0, WIRE_MISMATCH = 1, WIRE_NONFINITE = 2, WIRE_NO_MEMORY = 3 };
/* SYNCBN_NONFINITE policies (_wire.POLICIES). */
enum { POLICY_PROPAGATE = 0, POLICY_SKIP = 1, POLICY_RAISE = 2 };

/* Sentinels, zero padding after `payload` numbers, and the header fields (_wire.pack). */
static void pack_header(double *buf, int64_t len, int64_t payload, const int64_t *f) {
  double *head = buf + len - 1 - 2 * NFIELDS;
  buf[0] = 1.0;
  memset(buf + 1 + payload, 0, sizeof(double) * (size_t)(head - (buf + 1 + payload)));
  for (int k = 0; k < NFIELDS; ++k) {
    head[2 * k] = (double)f[k];
    head[2 * k + 1] = (double)f[k] * (double)f[k];
  }
  buf[len - 1] = 1.0;
}

/* 1 when every one of `world` ranks sent the fields f (_wire.header_ok), else 0. */
static int header_ok(const double *buf, int64_t len, double world, const int64_t *f) {
  const double *head = buf + len - 1 - 2 * NFIELDS;
  if (buf[0] != world || buf[len - 1] != world) return 0;
  for (int k = 0; k < NFIELDS; ++k) {
    double v = (double)f[k];
    if (head[2 * k] != world * v || head[2 * k + 1] != world * v * v) return 0;
  }
  return 1;
}

#endif
