/* The shared-memory all_reduce of the ranks of one machine (included once by kernel.c).
 *
 * syncbn's collectives move a few KB; through gloo's loopback TCP each one costs 0.2-1 ms of
 * thread hand-offs and wake-ups on the 2-core VM of benchmarks/RESULTS.md, far more than the
 * data. When every rank of a CPU group is on this machine, syncbn/_comm.py maps one segment of
 * shared memory for the group (once, with three small collectives of the group itself) and
 * sums the buffers here instead: each rank copies its buffer into its slot and publishes the
 * pass number, waits until every rank has published it, then sums the W slots in rank order.
 * Every rank adds the same numbers in the same order, so the result is bitwise identical on
 * every rank, as with gloo.
 *
 * Segment: W control lines of 64 bytes (seq, pid, len[2]), then for each rank two slots
 * (alternate passes) of slot_len float64. Writing pass k into slot k % 2 is safe: this rank
 * left pass k - 1 only once every rank had published k - 1, i.e. had finished reading pass
 * k - 2, the last user of that slot.
 *
 * The wait is bounded: by the process group's timeout, and by the peers' lives (a rank whose
 * process has exited is reported within a millisecond while spinning, within LOCAL_CHECK_NS
 * after that, not at the timeout).
 *
 * Waiting costs: for spin_ns (SYNCBN_POLL_US) a waiter polls, yielding its core between polls
 * (the hot path: peers arrive within microseconds). After that it sleeps in the kernel until
 * the peer publishes: a futex wait on the peer's seq word (Linux; the peer wakes it only when
 * its `sleepers` count says someone sleeps, so the hot path makes no system call), elsewhere
 * sleeps growing with the wait (1/8 of it, at most 4 ms). A long wait (a checkpoint on one
 * rank) then costs a wake-up per LOCAL_CHECK_NS to see whether the peer is still alive.
 */
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
long syscall(long number, ...); /* <unistd.h> declares it only with _DEFAULT_SOURCE */
#define LOCAL_FUTEX 1
#endif

typedef struct {
  i64 seq; /* the last pass this rank published */
  i64 pid;
  i64 len[2];   /* numbers in each slot */
  i64 sleepers; /* ranks asleep until this rank's seq changes (they need a futex wake) */
  i64 pad[3];
} local_control;
_Static_assert(sizeof(local_control) == 64, "local_control");

/* Argument block of syncbn_local_allreduce ("<11q"): the segment, this rank, the pass, the
 * buffer (summed in place), the wait limits, where to say who failed, and whether this call
 * resumes a wait (the buffer is already published) after LOCAL_AGAIN. */
typedef struct {
  i64 base, world, rank, seq, buf, len, slot_len, timeout_ns, spin_ns, detail, resume;
} local_args;
_Static_assert(sizeof(local_args) == 11 * 8, "local_args");

enum { LOCAL_OK = 0, LOCAL_TIMEOUT = 1, LOCAL_EXITED = 2, LOCAL_LENGTH = 3, LOCAL_TOO_LONG = 4,
       LOCAL_AGAIN = 5 };
/* A wait returns LOCAL_AGAIN after this long, so that the caller (Python) can handle signals,
 * e.g. Ctrl-C, and call again with resume = 1. */
#define LOCAL_SLICE_NS 100000000
/* Between liveness checks of the awaited rank: while spinning, and while asleep. */
#define LOCAL_SPIN_CHECK_NS 1000000
#define LOCAL_CHECK_NS 50000000

static i64 local_now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (i64)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* 1 when the process has exited (gone, or a zombie its parent has not reaped yet). */
static int local_exited(i64 pid) {
  if (pid <= 0) return 0;
  if (kill((pid_t)pid, 0) != 0) return errno == ESRCH;
  char path[64], state = 0;
  snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
  FILE *f = fopen(path, "r");
  if (!f) return 0; /* no /proc: only kill() can tell */
  int ok = fscanf(f, "%*d (%*[^)]) %c", &state);
  fclose(f);
  return ok == 1 && (state == 'Z' || state == 'X');
}

/* The 32 bits of a seq that a futex waits on: its low half. */
static uint32_t *local_word(i64 *seq) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  return (uint32_t *)seq + 1;
#else
  return (uint32_t *)seq;
#endif
}

/* Sleep until *seq differs from seen (a futex wait; woken by local_wake), at most ns; without
 * futexes, a plain sleep of at most 4 ms (waited / 8: a wait overshoots by 1/8 at most). */
static void local_sleep(i64 *seq, i64 seen, i64 ns, i64 waited) {
#ifdef LOCAL_FUTEX
  (void)waited;
  struct timespec t = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
  syscall(SYS_futex, local_word(seq), FUTEX_WAIT, (uint32_t)seen, &t, NULL, 0);
#else
  (void)seq, (void)seen;
  i64 nap = waited / 8;
  if (nap < 50000) nap = 50000;
  if (nap > 4000000) nap = 4000000;
  if (nap > ns) nap = ns;
  struct timespec t = {0, (long)nap};
  nanosleep(&t, NULL);
#endif
}

static void local_wake(i64 *seq) {
#ifdef LOCAL_FUTEX
  syscall(SYS_futex, local_word(seq), FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
#else
  (void)seq;
#endif
}

/* Sum buf (len float64) over the W ranks of the segment, in place. Returns LOCAL_OK, or an
 * error with detail[0] = the rank concerned (and detail[1] = its length for LOCAL_LENGTH). */
int syncbn_local_allreduce(const local_args *a) {
  char *base = (char *)(intptr_t)a->base;
  local_control *ctl = (local_control *)base;
  i64 W = a->world, me = a->rank, k = a->seq, len = a->len, slot = a->slot_len;
  i64 *detail = (i64 *)(intptr_t)a->detail;
  double *buf = (double *)(intptr_t)a->buf;
  double *slots = (double *)(base + W * (i64)sizeof(local_control));
  int gen = (int)(k & 1);
  if (len > slot) {
    detail[0] = me;
    return LOCAL_TOO_LONG;
  }
  if (!a->resume) {
    memcpy(slots + (me * 2 + gen) * slot, buf, sizeof(double) * (size_t)len);
    ctl[me].len[gen] = len;
    /* seq_cst store, then the sleepers load: a waiter increments sleepers, then reads seq
     * (both seq_cst), so either it sees k or this rank sees it and wakes it. */
    __atomic_store_n(&ctl[me].seq, k, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&ctl[me].sleepers, __ATOMIC_SEQ_CST) > 0) local_wake(&ctl[me].seq);
  }
  /* A fresh wait checks the peer's life after a millisecond; a resumed one at once. */
  i64 start = local_now_ns(), next_check = a->resume ? 0 : LOCAL_SPIN_CHECK_NS;
  for (i64 j = 0; j < W; ++j) {
    unsigned spins = 0;
    while (__atomic_load_n(&ctl[j].seq, __ATOMIC_ACQUIRE) < k) {
      if ((++spins & 63) != 0) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        continue;
      }
      i64 now = local_now_ns() - start;
      if (now > a->timeout_ns) {
        detail[0] = j;
        return LOCAL_TIMEOUT;
      }
      if (now > LOCAL_SLICE_NS) return LOCAL_AGAIN;
      int spinning = now < a->spin_ns;
      if (now >= next_check) { /* is rank j still alive? */
        next_check = now + (spinning ? LOCAL_SPIN_CHECK_NS : LOCAL_CHECK_NS);
        if (local_exited(ctl[j].pid) &&
            __atomic_load_n(&ctl[j].seq, __ATOMIC_ACQUIRE) < k) {
          detail[0] = j;
          return LOCAL_EXITED;
        }
      }
      if (spinning) {
        sched_yield(); /* let other threads of this core run (DDP's, gloo's) */
        continue;
      }
      /* A long wait: sleep until rank j publishes, the next check, the slice's end or the
       * timeout, whichever comes first. */
      i64 until = next_check;
      if (until > LOCAL_SLICE_NS + 1) until = LOCAL_SLICE_NS + 1;
      if (until > a->timeout_ns + 1) until = a->timeout_ns + 1;
      __atomic_fetch_add(&ctl[j].sleepers, 1, __ATOMIC_SEQ_CST);
      i64 seen = __atomic_load_n(&ctl[j].seq, __ATOMIC_SEQ_CST);
      if (seen < k) local_sleep(&ctl[j].seq, seen, until > now ? until - now : 1000, now);
      __atomic_fetch_sub(&ctl[j].sleepers, 1, __ATOMIC_SEQ_CST);
    }
  }
  for (i64 j = 0; j < W; ++j) {
    if (ctl[j].len[gen] != len) {
      detail[0] = j;
      detail[1] = ctl[j].len[gen];
      return LOCAL_LENGTH;
    }
  }
  const double *s0 = slots + gen * slot; /* rank 0's slot of this pass */
  for (i64 i = 0; i < len; ++i) {
    double t = s0[i];
    for (i64 j = 1; j < W; ++j) t += s0[j * 2 * slot + i];
    buf[i] = t;
  }
  return LOCAL_OK;
}
